//! The fleet as numbers, for `GET /metrics`: a handful of GROUP BY queries over indexed
//! columns, read at scrape time (every 15–60 s), never per request.

use super::sql::params;
use super::{Ctx, StoreError, Tx};
use crate::proto::domain::{MachineState, TaskKind, TaskState};

/// What the scrape reports about the fleet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetGauges {
    /// `(pool, online, machines)`; a machine in no pool has pool `""`.
    pub machines: Vec<(String, bool, i64)>,
    pub identity_conflicts: i64,
    pub tasks: Vec<(TaskKind, TaskState, i64)>,
    /// Machines of unfinished tasks, by state.
    pub task_machines: Vec<(MachineState, i64)>,
    pub outbox_events: i64,
    pub outbox_backlogged: i64,
    pub outbox_max: i64,
    pub cert_soonest_ms: Option<i64>,
    pub certs_expiring: i64,
}

impl Tx<'_> {
    /// The gauges; `online_since_ms`: heard from since then counts as online;
    /// `expiring_before_ms`: certificates expiring before then are counted.
    pub fn fleet_gauges(
        &mut self,
        online_since_ms: i64,
        expiring_before_ms: i64,
    ) -> Result<FleetGauges, StoreError> {
        let what = "reading the fleet's gauges";
        let machines = self
            .tx
            .all(
                "SELECT COALESCE(pool_id, ''), CASE WHEN last_seen_ms >= ?1 THEN 1 ELSE 0 END,
                        COUNT(*)
                 FROM machines WHERE decommissioned_ms IS NULL
                 GROUP BY 1, 2",
                params![online_since_ms],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?)),
            )
            .ctx(what)?;
        let (identity_conflicts, outbox_events, outbox_backlogged, outbox_max) = self
            .tx
            .one(
                "SELECT COUNT(conflict_ms),
                        CAST(COALESCE(SUM(outbox_events), 0) AS BIGINT),
                        CAST(COALESCE(SUM(CASE WHEN outbox_events > 0 THEN 1 ELSE 0 END), 0)
                             AS BIGINT),
                        CAST(COALESCE(MAX(outbox_events), 0) AS BIGINT)
                 FROM machines WHERE decommissioned_ms IS NULL",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .ctx(what)?;
        let (cert_soonest_ms, certs_expiring) = self
            .tx
            .one(
                "SELECT MIN(cert_not_after_ms),
                        CAST(COALESCE(SUM(CASE WHEN cert_not_after_ms < ?1 THEN 1 ELSE 0 END), 0)
                             AS BIGINT)
                 FROM machines WHERE decommissioned_ms IS NULL AND cert_not_after_ms IS NOT NULL",
                params![expiring_before_ms],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ctx(what)?;
        let tasks = self
            .tx
            .all(
                "SELECT kind, state, COUNT(*) FROM tasks GROUP BY kind, state",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .ctx(what)?;
        let task_machines = self
            .tx
            .all(
                "SELECT tm.state, COUNT(*) FROM task_machines tm
                 JOIN tasks t ON t.task_id = tm.task_id
                 WHERE t.finished_ms IS NULL GROUP BY tm.state",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ctx(what)?;
        Ok(FleetGauges {
            machines,
            identity_conflicts,
            tasks,
            task_machines,
            outbox_events,
            outbox_backlogged,
            outbox_max,
            cert_soonest_ms,
            certs_expiring,
        })
    }

    /// What the machine's last heartbeat said its outbox holds.
    pub fn set_outbox(&mut self, machine_id: &str, events: u32) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE machines SET outbox_events = ?2 WHERE machine_id = ?1",
                params![machine_id, events],
            )
            .ctx("recording a machine's outbox")?;
        Ok(())
    }
}
