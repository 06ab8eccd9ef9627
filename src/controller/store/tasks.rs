//! The store's task tables: tasks and their machines (one assignment each), dispatch (whole
//! batches, or the next k of a wave), counts and pages of a task's machines, and
//! cancellation. Delivery to agents and results are in `delivery`, the power limits' counts
//! in `power`.

use super::sql::{params, Optional, ToValue};

use super::{
    finish_task, finish_tm, machine_state, task_row, tm_row, Ctx, StoreError, TaskMachineRow,
    TaskRow, Tx, TASK_COLS, TM_COLS,
};
use crate::proto::agent::PowerSpec;
use crate::proto::api::Amount;
use crate::proto::domain::{ErrorCode, MachineState, TaskState};

/// Machines per `INSERT` when a task is saved (SQLite allows 32,766 parameters, PostgreSQL
/// 65,535; this takes 304).
const MACHINES_PER_INSERT: usize = 100;

/// The `INSERT` of [`MACHINES_PER_INSERT`] task machines (`many`), or of one: `?1` task,
/// `?2` state, `?3` whether the task has a power step, `?4` its pool, then `(machine_id,
/// assignment_id, batch)` per machine. Two texts only, so the statement caches hold two.
fn task_machines_insert(many: bool) -> &'static str {
    fn make(n: usize) -> String {
        let rows: Vec<String> = (0..n)
            .map(|i| {
                let (m, a, b) = (5 + 3 * i, 6 + 3 * i, 7 + 3 * i);
                format!(
                    "(?1, ?{m}, ?{a}, ?{b}, ?2, CASE WHEN ?3 = 1 THEN COALESCE(
                        (SELECT p.pool_id FROM machines p WHERE p.machine_id = ?{m}), ?4)
                        ELSE NULL END)"
                )
            })
            .collect();
        format!(
            "INSERT INTO task_machines
                (task_id, machine_id, assignment_id, batch, state, power_pool)
             VALUES {}",
            rows.join(",\n")
        )
    }
    static ONE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static MANY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if many {
        MANY.get_or_init(|| make(MACHINES_PER_INSERT))
    } else {
        ONE.get_or_init(|| make(1))
    }
}

impl Tx<'_> {
    /// Inserts a task and its machines (`(machine_id, assignment_id, batch)`), all `PENDING`.
    pub fn insert_task(
        &mut self,
        t: &TaskRow,
        machines: &[(String, String, u32)],
    ) -> Result<(), StoreError> {
        let r = &t.rollout;
        self.tx
            .exec(
                &format!(
                    "INSERT INTO tasks ({TASK_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
                     ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"
                ),
                params![
                    t.task_id,
                    t.kind,
                    t.pool_id,
                    t.state.as_str(),
                    t.created_ms,
                    t.finished_ms,
                    t.gray_fail_threshold.map(i64::from),
                    t.timeout_seconds as i64,
                    t.scripts_json,
                    t.power_json,
                    t.created_by,
                    t.cancelled_by,
                    r.gray_count.map(Amount::text),
                    r.max_concurrency.map(Amount::text),
                    r.max_errors.map(Amount::text),
                    r.wave_limit.map(i64::from),
                    r.error_limit.map(i64::from),
                    i64::from(r.gray_accepted),
                    i64::from(r.errors_accepted),
                    r.retry_of,
                    r.power_waiting.map(i64::from)
                ],
            )
            .ctx("saving a task")?;
        // Every machine of a task with a reboot or shutdown counts against the power limits
        // of the pool it is in now (a rebuild's machines may be in several pools).
        let power = t
            .power_json
            .as_deref()
            .and_then(|j| serde_json::from_str::<PowerSpec>(j).ok())
            .is_some_and(|p| p.has_power_step());
        // Rows go in statements of MACHINES_PER_INSERT (the rest one by one), so a task of
        // 10,000 machines is 100 round trips to PostgreSQL under the write lock, not 10,000.
        // The machine's pool is read in the statement, as the power limits count it.
        let shared: [&dyn ToValue; 4] = [
            &t.task_id,
            &MachineState::Pending.as_str(),
            &i64::from(power),
            &t.pool_id,
        ];
        let batches: Vec<i64> = machines.iter().map(|m| i64::from(m.2)).collect();
        let mut at = 0;
        while at < machines.len() {
            let many = machines.len() - at >= MACHINES_PER_INSERT;
            let n = if many { MACHINES_PER_INSERT } else { 1 };
            let mut values: Vec<&dyn ToValue> = shared.to_vec();
            for (i, (machine_id, assignment_id, _)) in machines[at..at + n].iter().enumerate() {
                values.push(machine_id);
                values.push(assignment_id);
                values.push(&batches[at + i]);
            }
            self.tx
                .exec(task_machines_insert(many), &values)
                .ctx("saving a task's machines")?;
            at += n;
        }
        Ok(())
    }

    /// Moves up to `limit` (all when `None`) `PENDING` machines of one batch to
    /// `DISPATCHED`, in machine order, only those counting against `power_pool` when given;
    /// returns their machine ids. With a limit it costs O(limit) (`task_machines_wave`).
    pub fn dispatch_some(
        &mut self,
        task_id: &str,
        batch: u32,
        limit: Option<usize>,
        power_pool: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        if limit.is_none() && power_pool.is_none() {
            return self.dispatch_batch(task_id, batch, now_ms);
        }
        let what = "dispatching machines";
        let n = limit.map_or(i64::MAX, |n| n.min(i64::MAX as usize) as i64);
        let ids: Vec<String> = {
            let sql = match power_pool {
                None => {
                    "SELECT machine_id FROM task_machines
                     WHERE task_id = ?1 AND batch = ?2 AND state = 'PENDING'
                     ORDER BY machine_id LIMIT ?3"
                }
                Some(_) => {
                    "SELECT machine_id FROM task_machines
                     WHERE task_id = ?1 AND batch = ?2 AND state = 'PENDING'
                     AND power_pool = ?4 ORDER BY machine_id LIMIT ?3"
                }
            };
            let mut st = self.tx.statement(sql).ctx(what)?;
            let b = i64::from(batch);
            let rows = match power_pool {
                None => st.query_map(params![task_id, b, n], |r| r.get(0)),
                Some(pool) => st.query_map(params![task_id, b, n, pool], |r| r.get(0)),
            }
            .ctx(what)?;
            rows.collect::<Result<_, _>>().ctx(what)?
        };
        for id in &ids {
            self.tx
                .exec(
                    "UPDATE task_machines SET state = 'DISPATCHED', dispatched_ms = ?3
                     WHERE task_id = ?1 AND machine_id = ?2 AND state = 'PENDING'",
                    params![task_id, id, now_ms],
                )
                .ctx(what)?;
        }
        Ok(ids)
    }

    /// How many machines of one batch are in one of `states` (one index range per state:
    /// O(the count), used for the few at work and the few failed, never for `PENDING`).
    pub fn count_in_batch(
        &mut self,
        task_id: &str,
        batch: u32,
        states: &[MachineState],
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for st in states {
            let c: i64 = self
                .tx
                .one(
                    "SELECT COUNT(*) FROM task_machines
                     WHERE task_id = ?1 AND batch = ?2 AND state = ?3",
                    params![task_id, i64::from(batch), st.as_str()],
                    |r| r.get(0),
                )
                .ctx("counting a batch's machines")?;
            n += c as usize;
        }
        Ok(n)
    }

    /// Whether one batch still has a machine `PENDING` (one index probe).
    pub fn batch_pending(&mut self, task_id: &str, batch: u32) -> Result<bool, StoreError> {
        self.tx
            .one(
                "SELECT EXISTS (SELECT 1 FROM task_machines WHERE task_id = ?1 AND batch = ?2
                 AND state = 'PENDING')",
                params![task_id, i64::from(batch)],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .ctx("looking at a batch")
    }

    /// What an operator's resume accepted (`gray_accepted`, `errors_accepted`).
    pub fn set_accepted(
        &mut self,
        task_id: &str,
        gray_accepted: bool,
        errors_accepted: u32,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE tasks SET gray_accepted = ?2, errors_accepted = ?3 WHERE task_id = ?1",
                params![
                    task_id,
                    i64::from(gray_accepted),
                    i64::from(errors_accepted)
                ],
            )
            .ctx("updating a task")?;
        Ok(())
    }

    /// Makes the machines a halt skipped (`error_code` one of `codes`) `PENDING` again, with
    /// no reason left on them; returns how many.
    pub fn unskip(&mut self, task_id: &str, codes: &[ErrorCode]) -> Result<usize, StoreError> {
        let mut n = 0;
        for code in codes {
            n += self
                .tx
                .exec(
                    "UPDATE task_machines SET state = 'PENDING', error_code = NULL,
                        error_msg = NULL
                     WHERE task_id = ?1 AND state = 'SKIPPED' AND error_code = ?2",
                    params![task_id, *code],
                )
                .ctx("resuming machines")?;
        }
        Ok(n)
    }

    pub fn task(&mut self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        let pair = self
            .tx
            .one(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE task_id = ?1"),
                params![task_id],
                task_row,
            )
            .optional()
            .ctx("reading a task")?;
        pair.map(finish_task).transpose()
    }

    pub fn task_machines(&mut self, task_id: &str) -> Result<Vec<TaskMachineRow>, StoreError> {
        let mut st = self
            .tx
            .statement(&format!(
                "SELECT {TM_COLS} FROM task_machines WHERE task_id = ?1 ORDER BY batch, machine_id"
            ))
            .ctx("reading a task's machines")?;
        let rows = st
            .query_map(params![task_id], tm_row)
            .ctx("reading a task's machines")?;
        let pairs: Vec<_> = rows
            .collect::<Result<_, _>>()
            .ctx("reading a task's machines")?;
        pairs.into_iter().map(finish_tm).collect()
    }

    /// One machine's row of a task, by the primary key.
    pub fn task_machine(
        &mut self,
        task_id: &str,
        machine_id: &str,
    ) -> Result<Option<TaskMachineRow>, StoreError> {
        let what = "reading a task's machine";
        let rows = self
            .tx
            .all(
                &format!(
                    "SELECT {TM_COLS} FROM task_machines WHERE task_id = ?1 AND machine_id = ?2"
                ),
                params![task_id, machine_id],
                tm_row,
            )
            .ctx(what)?;
        rows.into_iter().next().map(finish_tm).transpose()
    }

    /// A task's machines counted by batch and state: `(batch, state, count)`, in batch
    /// order. One GROUP BY over the task's rows (its primary key's prefix), so the page's
    /// poll reads no per-machine row.
    pub fn task_counts(
        &mut self,
        task_id: &str,
    ) -> Result<Vec<(u32, MachineState, u32)>, StoreError> {
        let rows = self
            .tx
            .all(
                "SELECT batch, state, COUNT(*) FROM task_machines WHERE task_id = ?1
                 GROUP BY batch, state ORDER BY batch, state",
                params![task_id],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .ctx("counting a task's machines")?;
        rows.into_iter()
            .map(|(batch, state, n)| Ok((batch as u32, machine_state(state)?, n as u32)))
            .collect()
    }

    /// One page of a task's machines, in the order of [`Tx::task_machines`], optionally only
    /// those in `state`. Two statements rather than `?2 IS NULL OR ...`: PostgreSQL cannot
    /// type a parameter that is only compared with NULL.
    pub fn task_machines_page(
        &mut self,
        task_id: &str,
        state: Option<MachineState>,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<TaskMachineRow>, StoreError> {
        let (limit, offset) = (i64::from(limit), i64::from(offset));
        let pairs = match state {
            None => self.tx.all(
                &format!(
                    "SELECT {TM_COLS} FROM task_machines WHERE task_id = ?1
                     ORDER BY batch, machine_id LIMIT ?2 OFFSET ?3"
                ),
                params![task_id, limit, offset],
                tm_row,
            ),
            Some(s) => self.tx.all(
                &format!(
                    "SELECT {TM_COLS} FROM task_machines WHERE task_id = ?1 AND state = ?2
                     ORDER BY batch, machine_id LIMIT ?3 OFFSET ?4"
                ),
                params![task_id, s.as_str(), limit, offset],
                tm_row,
            ),
        }
        .ctx("reading a page of a task's machines")?;
        pairs.into_iter().map(finish_tm).collect()
    }

    pub fn assignment(
        &mut self,
        assignment_id: &str,
    ) -> Result<Option<TaskMachineRow>, StoreError> {
        let pair = self
            .tx
            .one(
                &format!("SELECT {TM_COLS} FROM task_machines WHERE assignment_id = ?1"),
                params![assignment_id],
                tm_row,
            )
            .optional()
            .ctx("reading an assignment")?;
        pair.map(finish_tm).transpose()
    }

    /// Records who cancelled a task (the first operator to ask: a second cancel of a task
    /// already cancelling changes nothing).
    pub fn set_task_cancelled_by(&mut self, task_id: &str, by: &str) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE tasks SET cancelled_by = ?2 WHERE task_id = ?1 AND cancelled_by IS NULL",
                params![task_id, by],
            )
            .ctx("recording who cancelled a task")?;
        Ok(())
    }

    pub fn set_task_state(
        &mut self,
        task_id: &str,
        state: TaskState,
        finished_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE tasks SET state = ?2, finished_ms = ?3 WHERE task_id = ?1",
                params![task_id, state.as_str(), finished_ms],
            )
            .ctx("updating a task")?;
        Ok(())
    }

    /// Moves one batch's `PENDING` machines to `DISPATCHED`; returns their machine ids.
    pub fn dispatch_batch(
        &mut self,
        task_id: &str,
        batch: u32,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = {
            let mut st = self
                .tx
                .statement(
                    "SELECT machine_id FROM task_machines
                     WHERE task_id = ?1 AND batch = ?2 AND state = 'PENDING'",
                )
                .ctx("dispatching a batch")?;
            let rows = st
                .query_map(params![task_id, i64::from(batch)], |r| r.get(0))
                .ctx("dispatching a batch")?;
            rows.collect::<Result<_, _>>().ctx("dispatching a batch")?
        };
        self.tx
            .exec(
                "UPDATE task_machines SET state = 'DISPATCHED', dispatched_ms = ?3
                 WHERE task_id = ?1 AND batch = ?2 AND state = 'PENDING'",
                params![task_id, i64::from(batch), now_ms],
            )
            .ctx("dispatching a batch")?;
        Ok(ids)
    }

    /// Sets every machine of the task that is in `from` to `to` (used for halt and cancel).
    /// Moves a task's machines in state `from` to `to`, saying why (`error_code`,
    /// `error_msg`): a machine that never ran carries the reason it did not.
    pub fn set_machines_where(
        &mut self,
        task_id: &str,
        from: MachineState,
        to: MachineState,
        why: (ErrorCode, &str),
    ) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = {
            let mut st = self
                .tx
                .statement("SELECT machine_id FROM task_machines WHERE task_id = ?1 AND state = ?2")
                .ctx("updating machines")?;
            let rows = st
                .query_map(params![task_id, from.as_str()], |r| r.get(0))
                .ctx("updating machines")?;
            rows.collect::<Result<_, _>>().ctx("updating machines")?
        };
        self.tx
            .exec(
                "UPDATE task_machines SET state = ?3, error_code = ?4, error_msg = ?5
                 WHERE task_id = ?1 AND state = ?2",
                params![task_id, from.as_str(), to.as_str(), why.0, why.1],
            )
            .ctx("updating machines")?;
        Ok(ids)
    }

    /// Whether `batch` of the task has a machine dispatched or running (one index probe).
    pub fn batch_in_flight(&mut self, task_id: &str, batch: u32) -> Result<bool, StoreError> {
        self.tx
            .one(
                "SELECT EXISTS (SELECT 1 FROM task_machines WHERE task_id = ?1 AND batch = ?2
                 AND state IN ('DISPATCHED', 'RUNNING'))",
                params![task_id, i64::from(batch)],
                |r| r.get(0),
            )
            .ctx("looking at a batch")
    }

    /// Flags the task's machines that an agent holds (delivered, not final) for cancellation.
    pub fn request_cancel(&mut self, task_id: &str) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = {
            let mut st = self
                .tx
                .statement(
                    "SELECT machine_id FROM task_machines WHERE task_id = ?1
                     AND state IN ('DISPATCHED', 'RUNNING')",
                )
                .ctx("cancelling")?;
            let rows = st
                .query_map(params![task_id], |r| r.get(0))
                .ctx("cancelling")?;
            rows.collect::<Result<_, _>>().ctx("cancelling")?
        };
        self.tx
            .exec(
                "UPDATE task_machines SET cancel_requested = 1 WHERE task_id = ?1
                 AND state IN ('DISPATCHED', 'RUNNING')",
                params![task_id],
            )
            .ctx("cancelling")?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::both_databases;
    use super::super::{RolloutRow, Store};
    use super::*;
    use crate::proto::domain::TaskKind;

    /// 250 machines: two statements of 100 and 50 of one. Every row is there with its
    /// assignment and batch, and, for a task with a reboot, the pool each machine is in
    /// (or the task's, for a machine the controller has never heard from).
    #[tokio::test]
    async fn a_task_of_many_machines_is_saved_whole() {
        let dir = tempfile::tempdir().unwrap();
        for db in both_databases(dir.path()) {
            let store = Store::open(&db).unwrap();
            let rows = store
                .tx(|tx| {
                    for i in 0..250 {
                        if i % 3 != 0 {
                            let pool = if i % 2 == 0 { "even" } else { "odd" };
                            tx.record_contact(&format!("m{i:03}"), Some(pool), "ab", 2, "0", None, 1)?;
                        }
                    }
                    let machines: Vec<(String, String, u32)> = (0..250)
                        .map(|i| (format!("m{i:03}"), format!("a{i:03}"), i / 100))
                        .collect();
                    tx.insert_task(
                        &TaskRow {
                            task_id: "t".into(),
                            kind: TaskKind::ScriptExecution,
                            pool_id: "task-pool".into(),
                            state: TaskState::Pending,
                            created_ms: 1,
                            finished_ms: None,
                            gray_fail_threshold: None,
                            timeout_seconds: 60,
                            scripts_json: "[]".into(),
                            power_json: Some(
                                r#"{"post_finish":"reboot","logoff_policy":"WAIT_FOR_LOGOFF","logoff_timeout_seconds":1,"force_logoff_grace_seconds":1}"#
                                    .into(),
                            ),
                            created_by: None,
                            cancelled_by: None,
                            rollout: RolloutRow::default(),
                        },
                        &machines,
                    )?;
                    tx.task_machines("t")
                })
                .await
                .unwrap();
            assert_eq!(rows.len(), 250, "{db}");
            for (i, r) in rows.iter().enumerate() {
                let i = i as u32;
                assert_eq!(r.machine_id, format!("m{i:03}"), "{db}");
                assert_eq!(r.assignment_id, format!("a{i:03}"), "{db}");
                assert_eq!(r.batch, i / 100, "{db}");
                assert_eq!(r.state, MachineState::Pending, "{db}");
                let pool = match (i % 3, i % 2) {
                    (0, _) => "task-pool",
                    (_, 0) => "even",
                    _ => "odd",
                };
                assert_eq!(r.power_pool.as_deref(), Some(pool), "m{i:03} on {db}");
            }
        }
    }
}
