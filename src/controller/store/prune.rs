//! Pruning finished tasks past `task_retention_seconds`: the task, its machines' rows (with
//! their output), their assignment payloads and the event keys applied for them. Never a
//! task that has not finished, nor one a pool's image operation still names. A task is
//! removed a chunk of machines per transaction, because every transaction holds the
//! replicas' one write lock: a task of 100,000 machines must not stall the fleet while it
//! goes. The task row goes last, so a task is listed until all of it is gone and a
//! prune cut short (a crash, a restart) is finished by the next one.

use super::sql::params;
use super::{Ctx, StoreError, Tx};

impl Tx<'_> {
    /// Up to `limit` tasks that finished before `cutoff_ms` and that no pool's image
    /// operation names, oldest first.
    pub fn prunable_tasks(
        &mut self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.tx
            .all(
                "SELECT t.task_id FROM tasks t
                 WHERE t.finished_ms IS NOT NULL AND t.finished_ms < ?1
                   AND NOT EXISTS (SELECT 1 FROM pool_images p
                        WHERE p.task_id = t.task_id OR p.stage_task_id = t.task_id
                           OR p.apply_task_id = t.task_id OR p.remove_task_id = t.task_id)
                 ORDER BY t.finished_ms, t.task_id LIMIT ?2",
                params![cutoff_ms, limit as i64],
                |r| r.get(0),
            )
            .ctx("finding tasks past their retention")
    }

    /// Removes up to `chunk` of the machines of a task that finished before `cutoff_ms`:
    /// their event keys, assignment payloads and rows. The number of machines removed (0:
    /// none left, or the task is no longer due).
    pub fn prune_task_machines(
        &mut self,
        task_id: &str,
        cutoff_ms: i64,
        chunk: usize,
    ) -> Result<usize, StoreError> {
        let what = "pruning a finished task";
        // Only while it is still finished past the cutoff: a halted task an operator resumed
        // between two chunks is left whole from then on.
        let due: i64 = self
            .tx
            .one(
                "SELECT COUNT(*) FROM tasks WHERE task_id = ?1
                   AND finished_ms IS NOT NULL AND finished_ms < ?2",
                params![task_id, cutoff_ms],
                |r| r.get(0),
            )
            .ctx(what)?;
        if due == 0 {
            return Ok(0);
        }
        // The same chunk in all three statements: the first `chunk` machines by id.
        // Keys are `<assignment_id>:started`, `:result`, `:power:<n>:<phase>`; assignment
        // ids are UUIDs, so the pattern has no wildcard of its own.
        self.tx
            .exec(
                "DELETE FROM applied_events WHERE (machine_id, idempotency_key) IN (
                    SELECT e.machine_id, e.idempotency_key
                    FROM (SELECT machine_id, assignment_id FROM task_machines
                          WHERE task_id = ?1 ORDER BY machine_id LIMIT ?2) c
                    JOIN applied_events e ON e.machine_id = c.machine_id
                     AND e.idempotency_key LIKE c.assignment_id || ':%')",
                params![task_id, chunk as i64],
            )
            .ctx(what)?;
        self.tx
            .exec(
                "DELETE FROM assignment_payloads WHERE assignment_id IN (
                    SELECT assignment_id FROM task_machines
                    WHERE task_id = ?1 ORDER BY machine_id LIMIT ?2)",
                params![task_id, chunk as i64],
            )
            .ctx(what)?;
        self.tx
            .exec(
                "DELETE FROM task_machines WHERE task_id = ?1 AND machine_id IN (
                    SELECT machine_id FROM task_machines
                    WHERE task_id = ?1 ORDER BY machine_id LIMIT ?2)",
                params![task_id, chunk as i64],
            )
            .ctx(what)
    }

    /// Removes the row of a task that finished before `cutoff_ms` once none of its machines
    /// is left; whether it did.
    pub fn prune_task_row(&mut self, task_id: &str, cutoff_ms: i64) -> Result<bool, StoreError> {
        let n = self
            .tx
            .exec(
                "DELETE FROM tasks WHERE task_id = ?1
                   AND finished_ms IS NOT NULL AND finished_ms < ?2
                   AND NOT EXISTS (SELECT 1 FROM task_machines WHERE task_id = ?1)",
                params![task_id, cutoff_ms],
            )
            .ctx("pruning a finished task")?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::both_databases;
    use super::super::{PoolImageRow, RolloutRow, Store, TaskRow};
    use super::*;
    use crate::proto::domain::{TaskKind, TaskState};

    fn task(id: &str, finished_ms: Option<i64>) -> TaskRow {
        TaskRow {
            task_id: id.into(),
            kind: TaskKind::ScriptExecution,
            pool_id: "p".into(),
            state: if finished_ms.is_some() {
                TaskState::Succeeded
            } else {
                TaskState::Running
            },
            created_ms: 1,
            finished_ms,
            gray_fail_threshold: None,
            timeout_seconds: 60,
            scripts_json: "[]".into(),
            power_json: None,
            created_by: None,
            cancelled_by: None,
            rollout: RolloutRow::default(),
        }
    }

    /// Old finished task `a` goes, a chunk at a time, with its event keys and payloads;
    /// what a pool's image operation names (`b`), what has not finished (`c`), what finished
    /// after the cutoff (`d`), and another task's keys on the same machine stay.
    #[tokio::test]
    async fn only_old_finished_tasks_go_and_all_of_them_goes() {
        let dir = tempfile::tempdir().unwrap();
        for db in both_databases(dir.path()) {
            let store = Store::open(&db).unwrap();
            let got = store
                .tx(|tx| {
                    let m = |i: u32, t: &str| (format!("m{i}"), format!("{t}-aid-{i}"), 0);
                    for (id, fin) in [
                        ("a", Some(100)),
                        ("b", Some(100)),
                        ("c", None),
                        ("d", Some(5000)),
                    ] {
                        let machines: Vec<_> = (1..=3).map(|i| m(i, id)).collect();
                        tx.insert_task(&task(id, fin), &machines)?;
                        for (mid, aid, _) in &machines {
                            tx.claim_event(mid, &format!("{aid}:started"), 1)?;
                            tx.claim_event(mid, &format!("{aid}:result"), 1)?;
                            tx.claim_event(mid, &format!("{aid}:power:1:REBOOTING"), 1)?;
                            tx.put_assignment_payload(aid, "{}")?;
                        }
                    }
                    tx.put_pool_image(&PoolImageRow {
                        pool_id: "p".into(),
                        stage_task_id: Some("b".into()),
                        ..Default::default()
                    })?;
                    let listed = tx.prunable_tasks(1000, 10)?;
                    let chunks = [
                        tx.prune_task_machines("a", 1000, 2)?,
                        tx.prune_task_machines("a", 1000, 2)?,
                        tx.prune_task_machines("a", 1000, 2)?,
                    ];
                    let row = tx.prune_task_row("a", 1000)?;
                    // Not due: unfinished, or finished after the cutoff.
                    let kept = [
                        tx.prune_task_machines("c", 1000, 10)?,
                        tx.prune_task_machines("d", 1000, 10)?,
                    ];
                    let kept_rows = [tx.prune_task_row("c", 1000)?, tx.prune_task_row("d", 1000)?];
                    // A key of the pruned task can be claimed again (it is gone); the others
                    // are still applied.
                    let a_key_free = tx.claim_event("m2", "a-aid-2:power:1:REBOOTING", 2)?;
                    let d_key_free = tx.claim_event("m2", "d-aid-2:result", 2)?;
                    let payloads = [
                        tx.assignment_payload("a-aid-1")?.is_some(),
                        tx.assignment_payload("d-aid-1")?.is_some(),
                    ];
                    let tasks = [
                        tx.task("a")?.is_some(),
                        tx.task("b")?.is_some(),
                        tx.task("c")?.is_some(),
                        tx.task("d")?.is_some(),
                    ];
                    let machines = [tx.task_machines("a")?.len(), tx.task_machines("b")?.len()];
                    Ok::<_, StoreError>((
                        listed, chunks, row, kept, kept_rows, a_key_free, d_key_free, payloads,
                        tasks, machines,
                    ))
                })
                .await
                .unwrap();
            let (listed, chunks, row, kept, kept_rows, a_free, d_free, payloads, tasks, machines) =
                got;
            assert_eq!(listed, vec!["a".to_string()], "{db}");
            assert_eq!(chunks, [2, 1, 0], "{db}");
            assert!(row, "{db}");
            assert_eq!(kept, [0, 0], "{db}");
            assert_eq!(kept_rows, [false, false], "{db}");
            assert!(a_free, "the pruned task's keys went with it ({db})");
            assert!(
                !d_free,
                "another task's keys on the same machine stay ({db})"
            );
            assert_eq!(payloads, [false, true], "{db}");
            assert_eq!(tasks, [false, true, true, true], "{db}");
            assert_eq!(machines, [0, 3], "{db}");
        }
    }
}
