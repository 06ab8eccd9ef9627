//! The operator API's lists: tasks (with their machines counted by state in the same
//! statement), machines and scripts, each as keyset pages: a page starts strictly after the
//! last key of the previous one in a total order (a time, then the id), so rows added
//! meanwhile never make a page repeat or skip one, and a page is one index range scan
//! however deep it is. Also the pools' members, for the pool views.

use std::collections::BTreeMap;

use super::identity::{machine_row, MACHINE_COLS};
use super::sql::{params, ToValue, Value};
use super::{machine_state, Ctx, MachineRow, ScriptRow, StoreError, Tx};
use crate::proto::domain::{MachineState, TaskKind, TaskState};

/// What `GET /v1/tasks` narrows the list to; `None`: any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    pub pool_id: Option<String>,
    pub state: Option<TaskState>,
    pub kind: Option<TaskKind>,
    /// Only tasks created strictly after this time (epoch ms).
    pub created_after_ms: Option<i64>,
}

/// What `GET /v1/machines` narrows the list to (in the database; `online` is decided by
/// the controller, which knows the polls it holds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineFilter {
    pub pool_id: Option<String>,
}

/// One task of a list: its summary columns and its machines counted by state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSummaryRow {
    pub task_id: String,
    pub kind: TaskKind,
    pub pool_id: String,
    pub state: TaskState,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub created_by: Option<String>,
    pub cancelled_by: Option<String>,
    pub machine_states: BTreeMap<MachineState, u32>,
}

/// A machine in service and its pool, for the pool views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCount {
    pub pool_id: String,
    pub machine_id: String,
    pub last_seen_ms: i64,
}

/// `WHERE` clauses and their values, numbered from `?2` (`?1` is always the limit).
struct Conditions {
    clauses: Vec<String>,
    values: Vec<Value>,
}

impl Conditions {
    fn new() -> Self {
        Conditions {
            clauses: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Adds a clause whose `{}`s are filled with the next placeholders, one per value.
    fn add(&mut self, clause: &str, values: Vec<Value>) {
        let mut text = clause.to_string();
        for v in values {
            self.values.push(v);
            text = text.replacen("{}", &format!("?{}", self.values.len() + 1), 1);
        }
        self.clauses.push(text);
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.clauses.join(" AND "))
        }
    }

    /// The limit first, then the clauses' values.
    fn params(&self, limit: u32) -> Vec<Value> {
        let mut all = vec![Value::Int(i64::from(limit))];
        all.extend(self.values.iter().cloned());
        all
    }
}

fn refs(values: &[Value]) -> Vec<&dyn ToValue> {
    values.iter().map(|v| v as &dyn ToValue).collect()
}

impl Tx<'_> {
    /// Up to `limit` tasks, newest first (`created_ms` DESC, `task_id` DESC), after the key
    /// `after` of the previous page, with their machines counted by state: one statement,
    /// whose `GROUP BY` counts only the page's tasks.
    pub fn task_page(
        &mut self,
        filter: &TaskFilter,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<TaskSummaryRow>, StoreError> {
        let mut c = Conditions::new();
        if let Some(p) = &filter.pool_id {
            c.add("pool_id = {}", vec![Value::Text(p.clone())]);
        }
        if let Some(s) = filter.state {
            c.add("state = {}", vec![Value::Text(s.as_str().into())]);
        }
        if let Some(k) = filter.kind {
            c.add("kind = {}", vec![Value::Text(k.as_str().into())]);
        }
        if let Some(ms) = filter.created_after_ms {
            c.add("created_ms > {}", vec![Value::Int(ms)]);
        }
        if let Some((ms, id)) = after {
            c.add(
                "(created_ms < {} OR (created_ms = {} AND task_id < {}))",
                vec![Value::Int(ms), Value::Int(ms), Value::Text(id.into())],
            );
        }
        let cols = "task_id, kind, pool_id, state, created_ms, finished_ms, created_by, \
                    cancelled_by";
        let sql = format!(
            "SELECT t.task_id, t.kind, t.pool_id, t.state, t.created_ms, t.finished_ms,
                    t.created_by, t.cancelled_by, tm.state, COUNT(tm.machine_id)
             FROM (SELECT {cols} FROM tasks {}
                   ORDER BY created_ms DESC, task_id DESC LIMIT ?1) t
             LEFT JOIN task_machines tm ON tm.task_id = t.task_id
             GROUP BY t.task_id, t.kind, t.pool_id, t.state, t.created_ms, t.finished_ms,
                      t.created_by, t.cancelled_by, tm.state
             ORDER BY t.created_ms DESC, t.task_id DESC",
            c.sql()
        );
        let values = c.params(limit);
        let rows = self
            .tx
            .all(&sql, &refs(&values), |r| {
                Ok((
                    TaskSummaryRow {
                        task_id: r.get(0)?,
                        kind: r.get(1)?,
                        pool_id: r.get(2)?,
                        state: r.get(3)?,
                        created_ms: r.get(4)?,
                        finished_ms: r.get(5)?,
                        created_by: r.get(6)?,
                        cancelled_by: r.get(7)?,
                        machine_states: BTreeMap::new(),
                    },
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, i64>(9)?,
                ))
            })
            .ctx("listing tasks")?;
        // The rows of one task are adjacent (the outer ORDER BY is the page's order).
        let mut out: Vec<TaskSummaryRow> = Vec::new();
        for (task, state, n) in rows {
            if out.last().map(|t| &t.task_id) != Some(&task.task_id) {
                out.push(task);
            }
            if let (Some(state), Some(last)) = (state, out.last_mut()) {
                last.machine_states
                    .insert(machine_state(state)?, u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
        Ok(out)
    }

    /// Up to `limit` machines in service by id, after `after`.
    pub fn machine_page(
        &mut self,
        filter: &MachineFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<MachineRow>, StoreError> {
        let mut c = Conditions::new();
        c.add("decommissioned_ms IS NULL", vec![]);
        if let Some(p) = &filter.pool_id {
            c.add("pool_id = {}", vec![Value::Text(p.clone())]);
        }
        if let Some(id) = after {
            c.add("machine_id > {}", vec![Value::Text(id.into())]);
        }
        let sql = format!(
            "SELECT {MACHINE_COLS} FROM machines {} ORDER BY machine_id LIMIT ?1",
            c.sql()
        );
        let values = c.params(limit);
        let rows = self
            .tx
            .all(&sql, &refs(&values), machine_row)
            .ctx("listing machines")?;
        Ok(rows.into_iter().map(|(m, _)| m).collect())
    }

    /// Up to `limit` scripts, newest first, after `after`; without their content (a list
    /// shows none, and a script may be a megabyte).
    pub fn script_page(
        &mut self,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<ScriptRow>, StoreError> {
        let mut c = Conditions::new();
        if let Some((ms, id)) = after {
            c.add(
                "(created_ms < {} OR (created_ms = {} AND script_id < {}))",
                vec![Value::Int(ms), Value::Int(ms), Value::Text(id.into())],
            );
        }
        let sql = format!(
            "SELECT script_id, name, command_type, sha256, created_ms FROM scripts {}
             ORDER BY created_ms DESC, script_id DESC LIMIT ?1",
            c.sql()
        );
        let values = c.params(limit);
        self.tx
            .all(&sql, &refs(&values), |r| {
                Ok(ScriptRow {
                    script_id: r.get(0)?,
                    name: r.get(1)?,
                    command_type: r.get(2)?,
                    content: String::new(),
                    sha256: r.get(3)?,
                    created_ms: r.get(4)?,
                })
            })
            .ctx("listing scripts")
    }

    /// The machines in service of one pool, or of every pool, with when each was last
    /// seen: the pool views' counts (only the three narrow columns are read).
    pub fn pool_members(&mut self, pool_id: Option<&str>) -> Result<Vec<PoolCount>, StoreError> {
        let row = |r: &super::sql::Row| {
            Ok(PoolCount {
                pool_id: r.get(0)?,
                machine_id: r.get(1)?,
                last_seen_ms: r.get(2)?,
            })
        };
        let base = "SELECT pool_id, machine_id, last_seen_ms FROM machines
                    WHERE decommissioned_ms IS NULL AND pool_id IS NOT NULL";
        match pool_id {
            Some(p) => self.tx.all(
                &format!("{base} AND pool_id = ?1 ORDER BY machine_id"),
                params![p],
                row,
            ),
            None => self.tx.all(
                &format!("{base} ORDER BY pool_id, machine_id"),
                params![],
                row,
            ),
        }
        .ctx("counting pools' machines")
    }

    /// Pools that have (or had) an image operation.
    pub fn image_pools(&mut self) -> Result<Vec<String>, StoreError> {
        self.tx
            .all(
                "SELECT pool_id FROM pool_images ORDER BY pool_id",
                params![],
                |r| r.get(0),
            )
            .ctx("listing pools with images")
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Database, Store, TaskRow};
    use super::*;

    fn task(id: &str, pool: &str, ms: i64, state: TaskState) -> TaskRow {
        TaskRow {
            task_id: id.into(),
            kind: TaskKind::ScriptExecution,
            pool_id: pool.into(),
            state,
            created_ms: ms,
            finished_ms: None,
            gray_fail_threshold: None,
            timeout_seconds: 60,
            scripts_json: "[]".into(),
            power_json: None,
            created_by: Some("op".into()),
            cancelled_by: None,
            rollout: Default::default(),
        }
    }

    async fn pages(store: &Store) {
        store
            .tx(|tx| {
                // Three tasks in one millisecond: the id breaks the tie.
                for (id, pool, ms) in [("a", "p", 5), ("b", "p", 5), ("c", "q", 5), ("d", "p", 9)] {
                    let machines = [
                        ("m1".to_string(), format!("{id}-1"), 0),
                        ("m2".to_string(), format!("{id}-2"), 0),
                    ];
                    tx.insert_task(&task(id, pool, ms, TaskState::Pending), &machines)?;
                }
                tx.set_machines_where(
                    "b",
                    MachineState::Pending,
                    MachineState::Cancelled,
                    (crate::proto::domain::ErrorCode::TaskCancelled, "test"),
                )?;
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
        let (first, second, pool_p, after) = store
            .tx(|tx| {
                let all = TaskFilter::default();
                let first = tx.task_page(&all, None, 2)?;
                let last = first.last().unwrap();
                let second = tx.task_page(&all, Some((last.created_ms, &last.task_id)), 10)?;
                let p = TaskFilter {
                    pool_id: Some("p".into()),
                    ..TaskFilter::default()
                };
                let after = TaskFilter {
                    created_after_ms: Some(5),
                    ..TaskFilter::default()
                };
                Ok::<_, StoreError>((
                    first,
                    second,
                    tx.task_page(&p, None, 10)?,
                    tx.task_page(&after, None, 10)?,
                ))
            })
            .await
            .unwrap();
        let ids = |v: &[TaskSummaryRow]| v.iter().map(|t| t.task_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ["d", "c"]);
        assert_eq!(ids(&second), ["b", "a"]);
        assert_eq!(ids(&pool_p), ["d", "b", "a"]);
        assert_eq!(ids(&after), ["d"]);
        assert_eq!(
            second[0].machine_states,
            BTreeMap::from([(MachineState::Cancelled, 2)])
        );
        assert_eq!(
            second[1].machine_states,
            BTreeMap::from([(MachineState::Pending, 2)])
        );
        assert_eq!(second[1].created_by.as_deref(), Some("op"));
    }

    #[tokio::test]
    async fn task_pages_follow_the_key_and_count_machines_by_state() {
        let dir = tempfile::tempdir().unwrap();
        pages(&Store::open(&Database::Sqlite(dir.path().join("t.db"))).unwrap()).await;
    }

    #[tokio::test]
    async fn task_pages_follow_the_key_and_count_machines_by_state_on_postgres() {
        let Some(url) = super::super::tests::postgres_database() else {
            return;
        };
        pages(&Store::open(&Database::Postgres(url)).unwrap()).await;
    }
}
