//! The store's side of the power limits: the controller-wide limit, each pool's own
//! (`pool_settings`), the machines with a power step at work, and the tasks waiting for a
//! slot. `controller::rollout` decides with these counts; `engine` asks for them.

use super::sql::{params, Optional};
use super::{Ctx, StoreError, Tx};

impl Tx<'_> {
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
}
