//! The store's task tables: tasks and their machines (one assignment each), dispatch (whole
//! batches, or the next k of a wave) and delivery to agents, applied event keys, results,
//! progress and power steps, and what the power limits count (`pool_settings`, machines with
//! a power step at work, tasks waiting for a slot).

use super::sql::{params, Optional};

use super::{
    finish_task, finish_tm, machine_state, task_row, tm_row, Ctx, InFlight, Outcome, StoreError,
    TaskMachineRow, TaskRow, Tx, Undelivered, TASK_COLS, TM_COLS,
};
use crate::proto::agent::PowerSpec;
use crate::proto::api::Amount;
use crate::proto::domain::{ErrorCode, MachineState, PowerPhase, TaskKind, TaskState};

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
        for (machine_id, assignment_id, batch) in machines {
            self.tx
                .exec(
                    "INSERT INTO task_machines
                        (task_id, machine_id, assignment_id, batch, state, power_pool)
                     VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?6 = 1 THEN COALESCE(
                        (SELECT m.pool_id FROM machines m WHERE m.machine_id = ?2), ?7)
                        ELSE NULL END)",
                    params![
                        t.task_id,
                        machine_id,
                        assignment_id,
                        i64::from(*batch),
                        MachineState::Pending.as_str(),
                        i64::from(power),
                        t.pool_id
                    ],
                )
                .ctx("saving a task's machines")?;
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

    /// The pools of a batch's `PENDING` machines that count against a power limit (a
    /// rebuild may span pools; it has at most a few dozen machines).
    pub fn pending_power_pools(
        &mut self,
        task_id: &str,
        batch: u32,
    ) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .tx
            .statement(
                "SELECT DISTINCT power_pool FROM task_machines WHERE task_id = ?1 AND batch = ?2
                 AND state = 'PENDING' AND power_pool IS NOT NULL ORDER BY power_pool",
            )
            .ctx("looking at a batch")?;
        let rows = st
            .query_map(params![task_id, i64::from(batch)], |r| r.get(0))
            .ctx("looking at a batch")?;
        rows.collect::<Result<_, _>>().ctx("looking at a batch")
    }

    /// Machines at work (dispatched or running) on an assignment with a power step, in
    /// `pool` or in the whole fleet: O(those machines) by `task_machines_power`.
    pub fn power_at_work(&mut self, pool: Option<&str>) -> Result<usize, StoreError> {
        let n: i64 = match pool {
            Some(p) => self.tx.one(
                "SELECT COUNT(*) FROM task_machines WHERE state IN ('DISPATCHED', 'RUNNING')
                 AND power_pool = ?1",
                params![p],
                |r| r.get(0),
            ),
            None => self.tx.one(
                "SELECT COUNT(*) FROM task_machines WHERE state IN ('DISPATCHED', 'RUNNING')
                 AND power_pool IS NOT NULL",
                params![],
                |r| r.get(0),
            ),
        }
        .ctx("counting power operations")?;
        Ok(n as usize)
    }

    /// The controller-wide power limit of this controller's config.
    pub fn power_limit(&self) -> Option<u32> {
        self.power_limit
    }

    /// A pool's power limit (`PUT /v1/pools/{pool_id}/power-limit`).
    pub fn pool_power_limit(&mut self, pool_id: &str) -> Result<Option<u32>, StoreError> {
        let v: Option<Option<i64>> = self
            .tx
            .one(
                "SELECT max_concurrent_power_operations FROM pool_settings WHERE pool_id = ?1",
                params![pool_id],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading a pool's settings")?;
        Ok(v.flatten().map(|n| n as u32))
    }

    pub fn set_pool_power_limit(
        &mut self,
        pool_id: &str,
        limit: Option<u32>,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO pool_settings (pool_id, max_concurrent_power_operations)
                 VALUES (?1, ?2) ON CONFLICT (pool_id)
                 DO UPDATE SET max_concurrent_power_operations = excluded.max_concurrent_power_operations",
                params![pool_id, limit.map(i64::from)],
            )
            .ctx("saving a pool's settings")?;
        Ok(())
    }

    /// Records which batch of the task waits for a power slot (`None`: none does).
    pub fn set_power_waiting(
        &mut self,
        task_id: &str,
        batch: Option<u32>,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE tasks SET power_waiting = ?2 WHERE task_id = ?1",
                params![task_id, batch.map(i64::from)],
            )
            .ctx("updating a task")?;
        Ok(())
    }

    /// The oldest tasks waiting for a power slot, at most `limit` (`tasks_power_waiting`).
    pub fn power_waiting_tasks(&mut self, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .tx
            .statement(
                "SELECT task_id FROM tasks WHERE power_waiting IS NOT NULL
                 ORDER BY created_ms, task_id LIMIT ?1",
            )
            .ctx("listing tasks waiting for power")?;
        let rows = st
            .query_map(params![limit as i64], |r| r.get(0))
            .ctx("listing tasks waiting for power")?;
        rows.collect::<Result<_, _>>()
            .ctx("listing tasks waiting for power")
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

    /// What a machine's agent has not yet acknowledged: dispatched assignments (with their
    /// task) and cancellations. An assignment is offered to one session: again to the same
    /// one (or to a restart of its state directory, which knows it by id), and to another only
    /// once the first has been silent since `silent_since_ms` (it is gone, not a second agent).
    pub fn undelivered_for(
        &mut self,
        machine_id: &str,
        session: &str,
        instance: &str,
        silent_since_ms: i64,
    ) -> Result<Undelivered, StoreError> {
        let assignments: Vec<TaskMachineRow> = {
            let mut st = self
                .tx
                .statement(&format!(
                    "SELECT {TM_COLS} FROM task_machines tm WHERE machine_id = ?1
                     AND state = 'DISPATCHED' AND delivered = 0 AND cancel_requested = 0
                     AND (offered_session IS NULL OR offered_session = ?2
                          OR offered_instance = ?3
                          OR NOT EXISTS (SELECT 1 FROM agent_sessions s
                                         WHERE s.machine_id = ?1
                                         AND s.session = tm.offered_session
                                         AND (s.last_ms >= ?4 OR s.hold_ms >= ?4)))
                     ORDER BY dispatched_ms, task_id"
                ))
                .ctx("polling")?;
            let rows = st
                .query_map(
                    params![machine_id, session, instance, silent_since_ms],
                    tm_row,
                )
                .ctx("polling")?;
            let pairs: Vec<_> = rows.collect::<Result<_, _>>().ctx("polling")?;
            pairs.into_iter().map(finish_tm).collect::<Result<_, _>>()?
        };
        for a in &assignments {
            self.tx
                .exec(
                    "UPDATE task_machines SET offered_session = ?2, offered_instance = ?3
                     WHERE assignment_id = ?1",
                    params![a.assignment_id, session, instance],
                )
                .ctx("polling")?;
        }
        let mut out = Vec::with_capacity(assignments.len());
        for a in assignments {
            let task = self.task(&a.task_id)?.ok_or(StoreError::Corrupt {
                what: "assignment without task",
                value: a.assignment_id.clone(),
            })?;
            out.push((a, task));
        }
        let cancels: Vec<String> = {
            let mut st = self
                .tx
                .statement(
                    "SELECT assignment_id FROM task_machines WHERE machine_id = ?1
                     AND cancel_requested = 1 AND cancel_delivered = 0
                     AND state IN ('DISPATCHED', 'RUNNING')",
                )
                .ctx("polling")?;
            let rows = st
                .query_map(params![machine_id], |r| r.get(0))
                .ctx("polling")?;
            rows.collect::<Result<_, _>>().ctx("polling")?
        };
        Ok((out, cancels))
    }

    /// Records what the agent acknowledged; the dispatch times of the assignments it
    /// acknowledged for the first time (for the dispatch latency).
    pub fn ack(
        &mut self,
        machine_id: &str,
        assignments: &[String],
        cancels: &[String],
    ) -> Result<Vec<i64>, StoreError> {
        let mut dispatched = Vec::new();
        for a in assignments {
            let first: Vec<Option<i64>> = self
                .tx
                .all(
                    "UPDATE task_machines SET delivered = 1
                     WHERE machine_id = ?1 AND assignment_id = ?2 AND delivered = 0
                     RETURNING dispatched_ms",
                    params![machine_id, a],
                    |r| r.get(0),
                )
                .ctx("acknowledging an assignment")?;
            dispatched.extend(first.into_iter().flatten());
        }
        for a in cancels {
            self.tx
                .exec(
                    "UPDATE task_machines SET cancel_delivered = 1
                     WHERE machine_id = ?1 AND assignment_id = ?2",
                    params![machine_id, a],
                )
                .ctx("acknowledging a cancellation")?;
        }
        Ok(dispatched)
    }

    /// Records an idempotency key; `false` if it had been applied before.
    pub fn claim_event(
        &mut self,
        machine_id: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .tx
            .exec(
                "INSERT INTO applied_events (machine_id, idempotency_key, applied_ms)
                 VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![machine_id, key, now_ms],
            )
            .ctx("recording an event key")?;
        Ok(n == 1)
    }

    pub fn mark_running(
        &mut self,
        assignment_id: &str,
        started_at: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE task_machines SET state = 'RUNNING', delivered = 1, started_at = ?2,
                    started_received_ms = ?3
                 WHERE assignment_id = ?1 AND state IN ('PENDING', 'DISPATCHED')",
                params![assignment_id, started_at, now_ms],
            )
            .ctx("marking a machine running")?;
        Ok(())
    }

    pub fn set_final(
        &mut self,
        assignment_id: &str,
        state: MachineState,
        o: &Outcome,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE task_machines SET state = ?2, delivered = 1, exit_code = ?3, stdout = ?4,
                    stderr = ?5, output_truncated = ?6, started_at = COALESCE(?7, started_at),
                    finished_at = ?8, error_code = ?9, error_msg = ?10
                 WHERE assignment_id = ?1",
                params![
                    assignment_id,
                    state.as_str(),
                    o.exit_code.map(i64::from),
                    o.stdout,
                    o.stderr,
                    i64::from(o.output_truncated),
                    o.started_at,
                    o.finished_at,
                    o.error_code,
                    o.error_msg
                ],
            )
            .ctx("recording a result")?;
        Ok(())
    }

    /// Machines of active or cancelled tasks that an agent should be working on:
    /// `(machine row, task timeout seconds)`.
    pub fn in_flight(&mut self) -> Result<Vec<InFlight>, StoreError> {
        let mut st = self
            .tx
            .statement(&format!(
                "SELECT {}, t.timeout_seconds, t.power_json, t.kind FROM task_machines tm
                 JOIN tasks t ON t.task_id = tm.task_id
                 WHERE tm.state IN ('DISPATCHED', 'RUNNING')",
                TM_COLS
                    .split(", ")
                    .map(|c| format!("tm.{}", c.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .ctx("scanning in-flight machines")?;
        let rows = st
            .query_map(params![], |r| {
                // timeout_seconds follows the task-machine columns.
                let at = TM_COLS.split(',').count();
                Ok((
                    tm_row(r)?,
                    r.get::<_, i64>(at)? as u64,
                    r.get::<_, Option<String>>(at + 1)?,
                    r.get::<_, TaskKind>(at + 2)?,
                ))
            })
            .ctx("scanning in-flight machines")?;
        let pairs: Vec<_> = rows
            .collect::<Result<_, _>>()
            .ctx("scanning in-flight machines")?;
        pairs
            .into_iter()
            .map(|(p, timeout_seconds, power_json, kind)| {
                Ok(InFlight {
                    row: finish_tm(p)?,
                    timeout_seconds,
                    power_json,
                    kind,
                })
            })
            .collect()
    }

    /// Records progress unless a newer one (higher `seq`) is already stored.
    pub fn set_progress(
        &mut self,
        assignment_id: &str,
        seq: u64,
        json: &str,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE task_machines SET progress_seq = ?2, progress_json = ?3
                 WHERE assignment_id = ?1 AND progress_seq < ?2",
                params![assignment_id, seq as i64, json],
            )
            .ctx("saving progress")?;
        Ok(())
    }

    /// Whether an in-flight assignment of `machine_id` references blob `sha256`.
    pub fn assigned_blob(&mut self, machine_id: &str, sha256: &str) -> Result<bool, StoreError> {
        // Payload JSON holds the digest as a quoted string; 64 hex digits cannot collide
        // with any other field, and hold no LIKE wildcard (LIKE: both databases run it).
        let needle = format!("%\"{sha256}\"%");
        self.tx
            .one(
                "SELECT EXISTS (SELECT 1 FROM task_machines tm JOIN tasks t ON t.task_id = tm.task_id
                 LEFT JOIN assignment_payloads ap ON ap.assignment_id = tm.assignment_id
                 WHERE tm.machine_id = ?1 AND tm.state IN ('DISPATCHED', 'RUNNING')
                 AND (t.scripts_json LIKE ?2 OR COALESCE(ap.payload_json, '') LIKE ?2))",
                params![machine_id, needle],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .ctx("checking a blob download")
    }

    pub fn set_power_state(
        &mut self,
        assignment_id: &str,
        phase: PowerPhase,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE task_machines SET power_state = ?2, power_ms = ?3 WHERE assignment_id = ?1",
                params![assignment_id, phase, now_ms],
            )
            .ctx("saving a power step")?;
        Ok(())
    }
}
