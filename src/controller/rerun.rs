//! Running a finished script execution again: `POST /v1/tasks/{task_id}/retry` (a new task
//! over the machines that failed, linked by `retry_of`) and `POST /v1/tasks/{task_id}/resume`
//! (a `HALTED` task goes on with its next batch or wave; the rule is `engine::resume`).

use super::audit;
use super::engine;
use super::errors::ApiError;
use super::rollout::{plan_batches, TaskState};
use super::store::{RolloutRow, TaskRow};
use super::views::{task_not_found, task_view};
use super::Controller;
use crate::pki::Identity;
use crate::proto::api;
use crate::proto::domain::{AuditAction, ErrorCode, TaskKind};
use crate::sys::clock;

fn conflict(msg: String) -> ApiError {
    ApiError::new(
        http::StatusCode::CONFLICT,
        ErrorCode::NotAllowedInCurrentState,
        msg,
    )
}

/// The batches of a retry over `targets` (sorted): the original's gray rule again. A
/// `gray_count` is resolved against the retried machines (at most all of them); a gray batch
/// given by ids keeps those of its machines that are retried, and none is left when none is.
/// Returns the batches and the gray threshold (never larger than the new gray batch).
fn retry_batches(
    original: &TaskRow,
    first_batch: &[String],
    targets: &[String],
) -> (Vec<Vec<String>>, Option<u32>) {
    let gray_count = original
        .rollout
        .gray_count
        .map(|g| g.of(targets.len()).min(targets.len()));
    let gray_ids: Vec<String> = targets
        .iter()
        .filter(|m| first_batch.contains(m))
        .cloned()
        .collect();
    let had_gray = original.gray_fail_threshold.is_some();
    let batches = match (had_gray, gray_count) {
        (false, _) => vec![targets.to_vec()],
        (true, Some(n)) => plan_batches(targets, Some(n), None),
        (true, None) if gray_ids.is_empty() => vec![targets.to_vec()],
        (true, None) => plan_batches(targets, None, Some(&gray_ids)),
    };
    let gray_size = batches[0].len();
    let threshold = if had_gray && !(gray_count.is_none() && gray_ids.is_empty()) {
        original
            .gray_fail_threshold
            .map(|t| t.min(u32::try_from(gray_size).unwrap_or(u32::MAX)))
    } else {
        None
    };
    (batches, threshold)
}

/// `POST /v1/tasks/{task_id}/retry`: a new task over the machines of a finished script
/// execution that ended `FAILED` (unreachable ones included) or `TIMED_OUT` and are still in
/// its pool, with the same scripts (as they were), power plan and rate controls.
pub async fn retry(
    ctl: &Controller,
    by: &Identity,
    task_id: String,
) -> Result<api::TaskCreated, ApiError> {
    let now_ms = clock::unix_ms(clock::now());
    let by = by.clone();
    let (new_id, wake) = ctl
        .store
        .tx(move |tx| {
            let task = tx.task(&task_id)?.ok_or_else(|| task_not_found(&task_id))?;
            if task.kind != TaskKind::ScriptExecution {
                return Err(conflict(format!(
                    "task {task_id:?} is a {}: only a script execution can be retried",
                    task.kind
                )));
            }
            if task.finished_ms.is_none() {
                return Err(conflict(format!(
                    "task {task_id:?} is {}: retry it once it has finished",
                    task.state
                )));
            }
            let machines = tx.task_machines(&task_id)?;
            let pool = tx.pool_machines(&task.pool_id)?;
            let mut targets: Vec<String> = machines
                .iter()
                .filter(|m| m.state.is_failure() && pool.contains(&m.machine_id))
                .map(|m| m.machine_id.clone())
                .collect();
            targets.sort();
            if targets.is_empty() {
                return Err(conflict(format!(
                    "task {task_id:?} has nothing to retry: no machine still in pool {:?} \
                     ended FAILED, TIMED_OUT or MACHINE_UNREACHABLE",
                    task.pool_id
                )));
            }
            let first: Vec<String> = machines
                .iter()
                .filter(|m| m.batch == 0)
                .map(|m| m.machine_id.clone())
                .collect();
            let (batches, threshold) = retry_batches(&task, &first, &targets);
            let n = |a: api::Amount| u32::try_from(a.of(targets.len())).unwrap_or(u32::MAX);
            let r = &task.rollout;
            let row = TaskRow {
                task_id: uuid::Uuid::new_v4().to_string(),
                kind: TaskKind::ScriptExecution,
                pool_id: task.pool_id.clone(),
                state: TaskState::Pending,
                created_ms: now_ms,
                finished_ms: None,
                gray_fail_threshold: threshold,
                timeout_seconds: task.timeout_seconds,
                scripts_json: task.scripts_json.clone(),
                power_json: task.power_json.clone(),
                created_by: Some(by.name.clone()),
                cancelled_by: None,
                rollout: RolloutRow {
                    gray_count: r.gray_count.filter(|_| threshold.is_some()),
                    max_concurrency: r.max_concurrency,
                    max_errors: r.max_errors,
                    wave_limit: r.max_concurrency.map(n),
                    error_limit: r.max_errors.map(n),
                    retry_of: Some(task_id.clone()),
                    ..RolloutRow::default()
                },
            };
            let rows: Vec<(String, String, u32)> = batches
                .iter()
                .enumerate()
                .flat_map(|(b, ids)| {
                    ids.iter()
                        .map(move |m| (m.clone(), uuid::Uuid::new_v4().to_string(), b as u32))
                })
                .collect();
            tx.insert_task(&row, &rows)?;
            let mut wake = Vec::new();
            engine::advance(tx, &row.task_id, now_ms, &mut wake)?;
            audit::record(
                tx,
                &by,
                AuditAction::TaskRetry,
                &row.task_id,
                &serde_json::json!({"retry_of": task_id, "machine_ids": targets}),
            )?;
            tracing::info!(task_id = %row.task_id, retry_of = %task_id, machines = targets.len(), "task retried");
            Ok::<_, ApiError>((row.task_id, wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::TaskCreated { task_id: new_id })
}

/// `POST /v1/tasks/{task_id}/resume`: the task view after it went on.
pub async fn resume(
    ctl: &Controller,
    by: &Identity,
    task_id: String,
) -> Result<api::Task, ApiError> {
    let now_ms = clock::unix_ms(clock::now());
    let by = by.clone();
    let (view, wake) = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            let task = engine::resume(tx, &task_id, now_ms, &mut wake)?;
            audit::record(
                tx,
                &by,
                AuditAction::TaskResume,
                &task_id,
                &serde_json::json!({}),
            )?;
            tracing::info!(task_id = %task_id, "halted task resumed");
            let machines = tx.task_machines(&task_id)?;
            Ok::<_, ApiError>((task_view(&task, &machines), wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::api::Amount;

    fn task(threshold: Option<u32>, gray: Option<Amount>) -> TaskRow {
        TaskRow {
            task_id: "t".into(),
            kind: TaskKind::ScriptExecution,
            pool_id: "p".into(),
            state: TaskState::Failed,
            created_ms: 0,
            finished_ms: Some(1),
            gray_fail_threshold: threshold,
            timeout_seconds: 60,
            scripts_json: "[]".into(),
            power_json: None,
            created_by: None,
            cancelled_by: None,
            rollout: RolloutRow {
                gray_count: gray,
                ..RolloutRow::default()
            },
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_retry_keeps_the_gray_rule_over_the_retried_machines() {
        let targets = ids(&["m2", "m3", "m5"]);
        // No gray batch: one batch.
        let (b, t) = retry_batches(&task(None, None), &[], &targets);
        assert_eq!((b, t), (vec![targets.clone()], None));
        // gray_count 2 of three retried machines; the threshold fits the new batch.
        let (b, t) = retry_batches(&task(Some(2), Some(Amount::Count(2))), &[], &targets);
        assert_eq!(b, vec![ids(&["m2", "m3"]), ids(&["m5"])]);
        assert_eq!(t, Some(2));
        // A count larger than what is retried covers all of it.
        let (b, t) = retry_batches(&task(Some(3), Some(Amount::Count(9))), &[], &targets);
        assert_eq!((b.len(), t), (1, Some(3)));
        // Gray by ids: those of the old gray batch that are retried.
        let (b, t) = retry_batches(&task(Some(1), None), &ids(&["m3", "m9"]), &targets);
        assert_eq!(b, vec![ids(&["m3"]), ids(&["m2", "m5"])]);
        assert_eq!(t, Some(1));
        // None of them retried: no gray batch, no threshold.
        let (b, t) = retry_batches(&task(Some(1), None), &ids(&["m9"]), &targets);
        assert_eq!((b, t), (vec![targets], None));
    }
}
