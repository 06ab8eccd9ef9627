//! The store's side of delivery: what an agent has not yet acknowledged, acknowledgements,
//! applied event keys (each result applied once), running and final states, progress and
//! power steps, and the in-flight assignments the reaper watches.

use super::sql::params;
use super::{
    finish_tm, tm_row, Ctx, InFlight, Outcome, StoreError, TaskMachineRow, Tx, Undelivered, TM_COLS,
};
use crate::proto::domain::{MachineState, PowerPhase, TaskKind};

impl Tx<'_> {
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
