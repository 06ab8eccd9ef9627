//! The task and machine views the operator API answers with: a task whole, as counts
//! (`/summary`), or a page of its machines; a machine with its image and whether it is
//! online. Read-only: what changes a task is in `api` and `engine`.

use super::errors::{one_of, ApiError};
use super::rollout::batch_state;
use super::store::{MachineRow, StoreError, TaskMachineRow, TaskRow, Tx};
use super::Controller;
use crate::proto::agent::HostFacts;
use crate::proto::api;
use crate::proto::domain::{BatchState, ErrorCode, MachineState};
use crate::sys::clock;

fn ms_text(ms: Option<i64>) -> Option<String> {
    ms.and_then(clock::from_unix_ms).map(clock::rfc3339)
}

pub fn task_view(task: &TaskRow, machines: &[TaskMachineRow]) -> api::Task {
    let batch_count = machines.iter().map(|m| m.batch + 1).max().unwrap_or(0);
    let batches = (0..batch_count)
        .map(|index| {
            let members: Vec<&TaskMachineRow> =
                machines.iter().filter(|m| m.batch == index).collect();
            let states: Vec<_> = members.iter().map(|m| m.state).collect();
            api::Batch {
                index,
                machine_ids: members.iter().map(|m| m.machine_id.clone()).collect(),
                state: batch_state(&states),
            }
        })
        .collect();
    api::Task {
        task_id: task.task_id.clone(),
        kind: task.kind,
        pool_id: task.pool_id.clone(),
        state: task.state,
        created_at: ms_text(Some(task.created_ms)).unwrap_or_default(),
        finished_at: ms_text(task.finished_ms),
        created_by: task.created_by.clone(),
        cancelled_by: task.cancelled_by.clone(),
        gray_count: task.rollout.gray_count,
        max_concurrency: task.rollout.max_concurrency,
        max_errors: task.rollout.max_errors,
        retry_of: task.rollout.retry_of.clone(),
        batches,
        machines: machines
            .iter()
            .map(|m| task_machine_view(task, m))
            .collect(),
    }
}

fn task_machine_view(task: &TaskRow, m: &TaskMachineRow) -> api::TaskMachine {
    api::TaskMachine {
        machine_id: m.machine_id.clone(),
        batch: m.batch,
        state: m.state,
        exit_code: m.outcome.exit_code,
        stdout: m.outcome.stdout.clone(),
        stderr: m.outcome.stderr.clone(),
        output_truncated: m.outcome.output_truncated,
        started_at: m.outcome.started_at.clone(),
        finished_at: m.outcome.finished_at.clone(),
        error_code: m.outcome.error_code,
        error_msg: m.outcome.error_msg.clone(),
        components: crate::controller::software::component_view(task, m),
        power_state: m.power_state,
    }
}

pub async fn get_task(ctl: &Controller, task_id: String) -> Result<api::Task, ApiError> {
    ctl.store
        .read(move |tx| {
            let task = tx.task(&task_id)?.ok_or_else(|| task_not_found(&task_id))?;
            let machines = tx.task_machines(&task_id)?;
            Ok(task_view(&task, &machines))
        })
        .await
}

/// The 404 of a task id that names no task.
pub fn task_not_found(task_id: &str) -> ApiError {
    ApiError::not_found(
        ErrorCode::TaskNotFound,
        format!("task_id {task_id:?} does not exist"),
    )
}

/// Counts by state from `(batch, state, count)` rows: the whole task's, and each batch's.
type Counts = std::collections::BTreeMap<MachineState, u32>;

fn count_states(rows: &[(u32, MachineState, u32)]) -> (Counts, Vec<api::BatchSummary>) {
    let mut total = Counts::new();
    let mut batches: Vec<api::BatchSummary> = Vec::new();
    for &(batch, state, n) in rows {
        *total.entry(state).or_default() += n;
        if batches.last().is_none_or(|b| b.index != batch) {
            batches.push(api::BatchSummary {
                index: batch,
                state: BatchState::Pending,
                machines: 0,
                machine_states: Counts::new(),
            });
        }
        let b = batches.last_mut().expect("pushed above");
        b.machines += n;
        b.machine_states.insert(state, n);
    }
    for b in &mut batches {
        // `batch_state` asks only "all" and "any" of its states, so the distinct states of
        // the batch decide it as the full list would.
        let states: Vec<MachineState> = b.machine_states.keys().copied().collect();
        b.state = batch_state(&states);
    }
    (total, batches)
}

/// `GET /v1/tasks/{task_id}/summary`: the task with counts, no per-machine row.
pub async fn task_summary(
    ctl: &Controller,
    task_id: String,
) -> Result<api::TaskProgress, ApiError> {
    ctl.store
        .read(move |tx| {
            let task = tx.task(&task_id)?.ok_or_else(|| task_not_found(&task_id))?;
            let (machine_states, batches) = count_states(&tx.task_counts(&task_id)?);
            Ok(api::TaskProgress {
                task_id: task.task_id,
                kind: task.kind,
                pool_id: task.pool_id,
                state: task.state,
                created_at: ms_text(Some(task.created_ms)).unwrap_or_default(),
                finished_at: ms_text(task.finished_ms),
                machines: machine_states.values().sum(),
                machine_states,
                batches,
            })
        })
        .await
}

/// What a page of a task's machines may hold at most (and holds without `limit`).
pub const PAGE_LIMIT_MAX: u32 = 1000;
pub const PAGE_LIMIT_DEFAULT: u32 = 100;

/// The query of `GET /v1/tasks/{task_id}/machines`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    pub state: Option<MachineState>,
    pub limit: u32,
    pub offset: u32,
}

/// Parses `state=&limit=&offset=` (an empty value is the default; any other key is
/// refused, as unknown body fields are).
pub fn page_query(query: Option<&str>) -> Result<PageQuery, ApiError> {
    let mut q = PageQuery {
        state: None,
        limit: PAGE_LIMIT_DEFAULT,
        offset: 0,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if value.is_empty() {
            continue;
        }
        let number = |max: u32| {
            value
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    ApiError::invalid(format!("{key} {value:?} must be an integer 0..={max}"))
                })
        };
        match key {
            "state" => {
                q.state = Some(one_of(
                    "state",
                    value,
                    MachineState::parse,
                    MachineState::texts(),
                )?)
            }
            "limit" => {
                q.limit = number(PAGE_LIMIT_MAX)?;
                if q.limit == 0 {
                    return Err(ApiError::invalid(format!(
                        "limit 0 must be 1..={PAGE_LIMIT_MAX}"
                    )));
                }
            }
            "offset" => q.offset = number(u32::MAX)?,
            _ => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {key:?}; known: state, limit, offset"
                )))
            }
        }
    }
    Ok(q)
}

/// `GET /v1/tasks/{task_id}/machines`: one page of the task's machines and its counts.
pub async fn task_machines_page(
    ctl: &Controller,
    task_id: String,
    q: PageQuery,
) -> Result<api::TaskMachinePage, ApiError> {
    ctl.store
        .read(move |tx| {
            let task = tx.task(&task_id)?.ok_or_else(|| task_not_found(&task_id))?;
            let (machine_states, _) = count_states(&tx.task_counts(&task_id)?);
            let rows = tx.task_machines_page(&task_id, q.state, q.limit, q.offset)?;
            let total = match q.state {
                Some(s) => machine_states.get(&s).copied().unwrap_or(0),
                None => machine_states.values().sum(),
            };
            Ok(api::TaskMachinePage {
                machines: rows.iter().map(|m| task_machine_view(&task, m)).collect(),
                task_id: task.task_id,
                state: task.state,
                filter_state: q.state,
                total,
                offset: q.offset,
                limit: q.limit,
                machine_states,
            })
        })
        .await
}

/// What makes a machine online: heard from within `offline_after`, or holding a poll open
/// on this replica now.
pub struct Liveness {
    now_ms: i64,
    offline_ms: i64,
    polling: std::collections::HashSet<String>,
}

impl Liveness {
    pub fn of(ctl: &Controller) -> Liveness {
        Liveness {
            now_ms: clock::unix_ms(clock::now()),
            offline_ms: ctl.cfg.offline_after.as_millis() as i64,
            polling: ctl.polling(),
        }
    }

    pub fn online_at(&self, machine_id: &str, last_seen_ms: i64) -> bool {
        self.now_ms - last_seen_ms <= self.offline_ms || self.polling.contains(machine_id)
    }

    pub fn online(&self, m: &MachineRow) -> bool {
        self.online_at(&m.machine_id, m.last_seen_ms)
    }
}

/// One machine as `GET /v1/machines[/{machine_id}]` shows it.
pub fn machine_view(
    tx: &mut Tx<'_>,
    m: MachineRow,
    live: &Liveness,
) -> Result<api::Machine, StoreError> {
    let pool = m.pool_id.as_deref().unwrap_or("");
    let image = super::images::machine_view(tx, &m.machine_id, pool)?;
    Ok(api::Machine {
        online: live.online(&m),
        last_seen: ms_text(Some(m.last_seen_ms)).unwrap_or_default(),
        facts: m
            .facts_json
            .as_deref()
            .and_then(|j| serde_json::from_str::<HostFacts>(j).ok()),
        machine_id: m.machine_id,
        pool_id: m.pool_id,
        agent_version: m.agent_version,
        certificate_serial: m.cert_serial,
        certificate_not_after: m.cert_not_after_ms.and_then(|ms| ms_text(Some(ms))),
        identity_conflict: m.conflict_ms.is_some(),
        image,
    })
}

/// `GET /v1/machines/{machine_id}`: one machine in service (one row read, not the fleet).
pub async fn get_machine(ctl: &Controller, machine_id: String) -> Result<api::Machine, ApiError> {
    crate::pki::validate_name("machine_id", &machine_id)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let live = Liveness::of(ctl);
    let id = machine_id.clone();
    ctl.store
        .read(move |tx| match tx.machine(&id)? {
            Some((m, None)) => Ok(Some(machine_view(tx, m, &live)?)),
            Some((_, Some(_))) | None => Ok::<_, StoreError>(None),
        })
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                ErrorCode::NotFound,
                format!("machine_id {machine_id:?}: no such machine has ever connected"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn page_queries_are_checked() {
        assert_eq!(
            page_query(None).unwrap(),
            PageQuery {
                state: None,
                limit: PAGE_LIMIT_DEFAULT,
                offset: 0
            }
        );
        assert_eq!(
            page_query(Some("state=FAILED&limit=5&offset=10&")).unwrap(),
            PageQuery {
                state: Some(MachineState::Failed),
                limit: 5,
                offset: 10
            }
        );
        assert_eq!(page_query(Some("state=&limit=")).unwrap().limit, 100);
        for (q, says) in [
            ("state=DONE", "state"),
            ("limit=0", "limit 0"),
            ("limit=1001", "limit"),
            ("offset=-1", "offset"),
            ("cursor=x", "unknown query parameter \"cursor\""),
        ] {
            let e = page_query(Some(q)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{q}");
            assert!(e.msg.contains(says), "{q}: {}", e.msg);
        }
    }

    #[test]
    fn counts_make_batches_as_the_full_list_does() {
        use MachineState::*;
        let (total, batches) = count_states(&[
            (0, Failed, 1),
            (0, Succeeded, 4),
            (1, Pending, 3),
            (2, Running, 1),
            (2, Succeeded, 2),
        ]);
        assert_eq!(total.values().sum::<u32>(), 11);
        assert_eq!(total[&Succeeded], 6);
        let got: Vec<(u32, BatchState, u32)> = batches
            .iter()
            .map(|b| (b.index, b.state, b.machines))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, BatchState::Failed, 5),
                (1, BatchState::Pending, 3),
                (2, BatchState::Running, 3)
            ]
        );
    }
}
