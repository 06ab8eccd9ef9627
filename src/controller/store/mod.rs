//! The controller's durable state: the only module that speaks SQL. SQLite (WAL, synchronous
//! FULL) is the embedded default; the statements stay within what PostgreSQL also runs
//! (`ON CONFLICT DO NOTHING`, integer millisecond timestamps, TEXT ids), so a second backend only
//! replaces this module. Callers work inside one transaction at a time through [`Tx`].
//!
//! `migrate`: the schema, as numbered migrations recorded in `PRAGMA user_version`;
//! `identity`: machines' certificates, sessions, enrollment tokens and revocations;
//! `blobrefs`: what refers to payload blobs (for their garbage collection).

mod blobrefs;
mod identity;
mod migrate;

pub use identity::{EnrollmentTokenRow, RevocationRow, SessionVerdict, TokenCheck};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::rollout::{MachineState, TaskState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database error while {what}: {source}")]
    Sql {
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("database holds an invalid {what}: {value:?}")]
    Corrupt { what: &'static str, value: String },
    #[error("database worker stopped: {0}")]
    Worker(String),
}

trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T> Ctx<T> for Result<T, rusqlite::Error> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sql { what, source })
    }
}

/// Version 1: the schema of 0.1.0 (before migrations were recorded). `IF NOT EXISTS`, so a
/// database made by 0.1.0 (user_version 0) passes through it unchanged.
const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS machines (
    machine_id    TEXT PRIMARY KEY,
    pool_id       TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    facts_json    TEXT
);
CREATE INDEX IF NOT EXISTS machines_pool ON machines (pool_id);
CREATE TABLE IF NOT EXISTS scripts (
    script_id    TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    command_type TEXT NOT NULL,
    content      TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    created_ms   BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id             TEXT PRIMARY KEY,
    kind                TEXT NOT NULL,
    pool_id             TEXT NOT NULL,
    state               TEXT NOT NULL,
    created_ms          BIGINT NOT NULL,
    finished_ms         BIGINT,
    gray_fail_threshold BIGINT,
    timeout_seconds     BIGINT NOT NULL,
    scripts_json        TEXT NOT NULL,
    power_json          TEXT
);
CREATE TABLE IF NOT EXISTS task_machines (
    task_id              TEXT NOT NULL,
    machine_id           TEXT NOT NULL,
    assignment_id        TEXT NOT NULL UNIQUE,
    batch                BIGINT NOT NULL,
    state                TEXT NOT NULL,
    delivered            BIGINT NOT NULL DEFAULT 0,
    cancel_requested     BIGINT NOT NULL DEFAULT 0,
    cancel_delivered     BIGINT NOT NULL DEFAULT 0,
    dispatched_ms        BIGINT,
    started_received_ms  BIGINT,
    exit_code            BIGINT,
    stdout               TEXT NOT NULL DEFAULT '',
    stderr               TEXT NOT NULL DEFAULT '',
    output_truncated     BIGINT NOT NULL DEFAULT 0,
    started_at           TEXT,
    finished_at          TEXT,
    error_code           TEXT,
    error_msg            TEXT,
    progress_seq         BIGINT NOT NULL DEFAULT -1,
    progress_json        TEXT,
    power_state          TEXT,
    power_ms             BIGINT,
    PRIMARY KEY (task_id, machine_id)
);
CREATE INDEX IF NOT EXISTS task_machines_machine ON task_machines (machine_id, state);
CREATE TABLE IF NOT EXISTS software_commits (
    machine_id  TEXT NOT NULL,
    commit_no   BIGINT NOT NULL,
    doc_json    TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    PRIMARY KEY (machine_id, commit_no)
);
CREATE TABLE IF NOT EXISTS host_software (
    machine_id     TEXT PRIMARY KEY,
    staged_commit  BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    image_id    TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    os_type     TEXT NOT NULL,
    gpu         BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    size        BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS pool_images (
    pool_id           TEXT PRIMARY KEY,
    operation         TEXT NOT NULL,
    task_id           TEXT,
    stage_task_id     TEXT,
    apply_task_id     TEXT,
    remove_task_id    TEXT,
    released          BIGINT NOT NULL DEFAULT 0,
    request_json      TEXT,
    start_ms          BIGINT,
    selective         BIGINT NOT NULL DEFAULT 0,
    pending_image_id  TEXT,
    pending_state     TEXT,
    current_image_id  TEXT,
    current_state     TEXT
);
CREATE TABLE IF NOT EXISTS machine_images (
    machine_id        TEXT PRIMARY KEY,
    current_image_id  TEXT,
    current_state     TEXT,
    pending_image_id  TEXT,
    pending_state     TEXT,
    language          TEXT
);
CREATE TABLE IF NOT EXISTS assignment_payloads (
    assignment_id  TEXT PRIMARY KEY,
    payload_json   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS applied_events (
    machine_id      TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    applied_ms      BIGINT NOT NULL,
    PRIMARY KEY (machine_id, idempotency_key)
);
"#;

#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    pub machine_id: String,
    /// `None`: in no pool (a hand-issued certificate without `--pool`, until an operator
    /// moves it).
    pub pool_id: Option<String>,
    pub agent_version: String,
    pub last_seen_ms: i64,
    pub facts_json: Option<String>,
    /// The certificate the machine last presented (or was enrolled with).
    pub cert_serial: Option<String>,
    pub cert_not_after_ms: Option<i64>,
    /// Set while two live sessions present this identity.
    pub conflict_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub image_id: String,
    pub name: String,
    pub version: String,
    pub os_type: String,
    pub gpu: bool,
    pub sha256: String,
    pub size: u64,
    pub created_ms: i64,
}

/// A pool's image operation and images (seed 001), one row per pool that ever had one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolImageRow {
    pub pool_id: String,
    /// `NONE`, `INITIAL_PUBLISH`, `SCHEDULE_PUSH_IMAGE`, `CANCEL_SCHEDULED_PUSH_IMAGE`,
    /// `FINAL_UNPUBLISH`.
    pub operation: String,
    /// The operator's task of the last operation (a push's apply task, or a removal).
    pub task_id: Option<String>,
    pub stage_task_id: Option<String>,
    pub apply_task_id: Option<String>,
    pub remove_task_id: Option<String>,
    /// Whether the apply task may run (its start time came and the image is `READY`).
    pub released: bool,
    /// The push request (`proto::api::PushImage` JSON), for reschedule comparisons.
    pub request_json: Option<String>,
    pub start_ms: Option<i64>,
    pub selective: bool,
    pub pending_image_id: Option<String>,
    pub pending_state: Option<String>,
    pub current_image_id: Option<String>,
    pub current_state: Option<String>,
}

/// One machine's images as the controller last heard of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineImageRow {
    pub machine_id: String,
    pub current_image_id: Option<String>,
    pub current_state: Option<String>,
    pub pending_image_id: Option<String>,
    pub pending_state: Option<String>,
    /// The language of the last rebuild that set one.
    pub language: Option<String>,
}

const POOL_IMAGE_COLS: &str = "pool_id, operation, task_id, stage_task_id, apply_task_id, \
    remove_task_id, released, request_json, start_ms, selective, pending_image_id, \
    pending_state, current_image_id, current_state";

fn pool_image_row(r: &Row<'_>) -> rusqlite::Result<PoolImageRow> {
    Ok(PoolImageRow {
        pool_id: r.get(0)?,
        operation: r.get(1)?,
        task_id: r.get(2)?,
        stage_task_id: r.get(3)?,
        apply_task_id: r.get(4)?,
        remove_task_id: r.get(5)?,
        released: r.get::<_, i64>(6)? != 0,
        request_json: r.get(7)?,
        start_ms: r.get(8)?,
        selective: r.get::<_, i64>(9)? != 0,
        pending_image_id: r.get(10)?,
        pending_state: r.get(11)?,
        current_image_id: r.get(12)?,
        current_state: r.get(13)?,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRow {
    pub script_id: String,
    pub name: String,
    pub command_type: String,
    pub content: String,
    pub sha256: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub task_id: String,
    pub kind: String,
    pub pool_id: String,
    pub state: TaskState,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub gray_fail_threshold: Option<u32>,
    pub timeout_seconds: u64,
    /// `Vec<proto::agent::ScriptPayload>` as JSON: the scripts as they were when the task was
    /// created, so later edits never change a running task.
    pub scripts_json: String,
    /// `proto::agent::PowerSpec` as JSON, for script executions.
    pub power_json: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMachineRow {
    pub task_id: String,
    pub machine_id: String,
    pub assignment_id: String,
    pub batch: u32,
    pub state: MachineState,
    pub delivered: bool,
    pub cancel_requested: bool,
    pub dispatched_ms: Option<i64>,
    pub started_received_ms: Option<i64>,
    pub outcome: Outcome,
    /// Latest `proto::agent::Progress` components as JSON, if any arrived.
    pub progress_json: Option<String>,
    /// The last power step the agent announced, and when it arrived.
    pub power_state: Option<String>,
    pub power_ms: Option<i64>,
}

/// A machine an agent holds (dispatched or running), with what its deadline depends on.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub row: TaskMachineRow,
    pub timeout_seconds: u64,
    pub power_json: Option<String>,
    /// The task's kind.
    pub kind: String,
}

/// Dispatched assignments (with their task) and cancellations an agent has not acknowledged.
pub type Undelivered = (Vec<(TaskMachineRow, TaskRow)>, Vec<String>);

/// A handle to the database; clones share one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

/// One open transaction. Every method is a single statement or a short fixed sequence.
pub struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // FULL: a result acknowledged to an agent must survive a power cut of the controller.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let mut conn = conn;
        migrate::apply(&mut conn).map_err(open_err)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` in one transaction on a blocking thread; commits only if `f` returns `Ok`.
    pub async fn tx<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let conn = self.conn.clone();
        let joined = tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves the connection usable (the transaction is
            // rolled back on drop), so a poisoned lock is recovered rather than propagated.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = guard
                .transaction()
                .ctx("starting a transaction")
                .map_err(E::from)?;
            let mut tx = Tx { tx };
            let out = f(&mut tx)?;
            tx.tx.commit().ctx("committing").map_err(E::from)?;
            Ok(out)
        })
        .await;
        match joined {
            Ok(r) => r,
            Err(e) => Err(E::from(StoreError::Worker(e.to_string()))),
        }
    }
}

fn machine_state(s: String) -> Result<MachineState, StoreError> {
    MachineState::parse(&s).ok_or(StoreError::Corrupt {
        what: "machine state",
        value: s,
    })
}

fn task_row(r: &Row<'_>) -> rusqlite::Result<(TaskRow, String)> {
    let state: String = r.get(3)?;
    Ok((
        TaskRow {
            task_id: r.get(0)?,
            kind: r.get(1)?,
            pool_id: r.get(2)?,
            state: TaskState::Pending,
            created_ms: r.get(4)?,
            finished_ms: r.get(5)?,
            gray_fail_threshold: r.get::<_, Option<i64>>(6)?.map(|v| v as u32),
            timeout_seconds: r.get::<_, i64>(7)? as u64,
            scripts_json: r.get(8)?,
            power_json: r.get(9)?,
        },
        state,
    ))
}

const TASK_COLS: &str = "task_id, kind, pool_id, state, created_ms, finished_ms, \
                         gray_fail_threshold, timeout_seconds, scripts_json, power_json";
const TM_COLS: &str = "task_id, machine_id, assignment_id, batch, state, delivered, \
    cancel_requested, dispatched_ms, started_received_ms, exit_code, stdout, stderr, \
    output_truncated, started_at, finished_at, error_code, error_msg, progress_json, \
    power_state, power_ms";

fn tm_row(r: &Row<'_>) -> rusqlite::Result<(TaskMachineRow, String)> {
    let state: String = r.get(4)?;
    Ok((
        TaskMachineRow {
            task_id: r.get(0)?,
            machine_id: r.get(1)?,
            assignment_id: r.get(2)?,
            batch: r.get::<_, i64>(3)? as u32,
            state: MachineState::Pending,
            delivered: r.get::<_, i64>(5)? != 0,
            cancel_requested: r.get::<_, i64>(6)? != 0,
            dispatched_ms: r.get(7)?,
            started_received_ms: r.get(8)?,
            outcome: Outcome {
                exit_code: r.get::<_, Option<i64>>(9)?.map(|v| v as i32),
                stdout: r.get(10)?,
                stderr: r.get(11)?,
                output_truncated: r.get::<_, i64>(12)? != 0,
                started_at: r.get(13)?,
                finished_at: r.get(14)?,
                error_code: r.get(15)?,
                error_msg: r.get(16)?,
            },
            progress_json: r.get(17)?,
            power_state: r.get(18)?,
            power_ms: r.get(19)?,
        },
        state,
    ))
}

fn finish_task(pair: (TaskRow, String)) -> Result<TaskRow, StoreError> {
    let (mut t, s) = pair;
    t.state = TaskState::parse(&s).ok_or(StoreError::Corrupt {
        what: "task state",
        value: s,
    })?;
    Ok(t)
}

fn finish_tm(pair: (TaskMachineRow, String)) -> Result<TaskMachineRow, StoreError> {
    let (mut t, s) = pair;
    t.state = machine_state(s)?;
    Ok(t)
}

impl Tx<'_> {
    pub fn machine_last_seen(&mut self, machine_id: &str) -> Result<Option<i64>, StoreError> {
        self.tx
            .query_row(
                "SELECT last_seen_ms FROM machines WHERE machine_id = ?1",
                params![machine_id],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading a machine")
    }

    /// Machine ids of a pool, sorted, so batch plans are deterministic.
    pub fn pool_machines(&mut self, pool_id: &str) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .tx
            .prepare(
                "SELECT machine_id FROM machines WHERE pool_id = ?1
                 AND decommissioned_ms IS NULL ORDER BY machine_id",
            )
            .ctx("listing a pool")?;
        let rows = st
            .query_map(params![pool_id], |r| r.get(0))
            .ctx("listing a pool")?;
        rows.collect::<Result<_, _>>().ctx("listing a pool")
    }

    pub fn insert_script(&mut self, s: &ScriptRow) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO scripts (script_id, name, command_type, content, sha256, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    s.script_id,
                    s.name,
                    s.command_type,
                    s.content,
                    s.sha256,
                    s.created_ms
                ],
            )
            .ctx("saving a script")?;
        Ok(())
    }

    pub fn script(&mut self, script_id: &str) -> Result<Option<ScriptRow>, StoreError> {
        self.tx
            .query_row(
                "SELECT script_id, name, command_type, content, sha256, created_ms
                 FROM scripts WHERE script_id = ?1",
                params![script_id],
                |r| {
                    Ok(ScriptRow {
                        script_id: r.get(0)?,
                        name: r.get(1)?,
                        command_type: r.get(2)?,
                        content: r.get(3)?,
                        sha256: r.get(4)?,
                        created_ms: r.get(5)?,
                    })
                },
            )
            .optional()
            .ctx("reading a script")
    }

    /// Inserts a task and its machines (`(machine_id, assignment_id, batch)`), all `PENDING`.
    pub fn insert_task(
        &mut self,
        t: &TaskRow,
        machines: &[(String, String, u32)],
    ) -> Result<(), StoreError> {
        self.tx
            .execute(
                &format!(
                    "INSERT INTO tasks ({TASK_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
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
                    t.power_json
                ],
            )
            .ctx("saving a task")?;
        for (machine_id, assignment_id, batch) in machines {
            self.tx
                .execute(
                    "INSERT INTO task_machines (task_id, machine_id, assignment_id, batch, state)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        t.task_id,
                        machine_id,
                        assignment_id,
                        i64::from(*batch),
                        MachineState::Pending.as_str()
                    ],
                )
                .ctx("saving a task's machines")?;
        }
        Ok(())
    }

    pub fn task(&mut self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        let pair = self
            .tx
            .query_row(
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
            .prepare(&format!(
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

    pub fn assignment(
        &mut self,
        assignment_id: &str,
    ) -> Result<Option<TaskMachineRow>, StoreError> {
        let pair = self
            .tx
            .query_row(
                &format!("SELECT {TM_COLS} FROM task_machines WHERE assignment_id = ?1"),
                params![assignment_id],
                tm_row,
            )
            .optional()
            .ctx("reading an assignment")?;
        pair.map(finish_tm).transpose()
    }

    pub fn set_task_state(
        &mut self,
        task_id: &str,
        state: TaskState,
        finished_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.tx
            .execute(
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
                .prepare(
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
            .execute(
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
        why: (&str, &str),
    ) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = {
            let mut st = self
                .tx
                .prepare("SELECT machine_id FROM task_machines WHERE task_id = ?1 AND state = ?2")
                .ctx("updating machines")?;
            let rows = st
                .query_map(params![task_id, from.as_str()], |r| r.get(0))
                .ctx("updating machines")?;
            rows.collect::<Result<_, _>>().ctx("updating machines")?
        };
        self.tx
            .execute(
                "UPDATE task_machines SET state = ?3, error_code = ?4, error_msg = ?5
                 WHERE task_id = ?1 AND state = ?2",
                params![task_id, from.as_str(), to.as_str(), why.0, why.1],
            )
            .ctx("updating machines")?;
        Ok(ids)
    }

    /// Flags the task's machines that an agent holds (delivered, not final) for cancellation.
    pub fn request_cancel(&mut self, task_id: &str) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = {
            let mut st = self
                .tx
                .prepare(
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
            .execute(
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
                .prepare(&format!(
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
                .execute(
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
                .prepare(
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

    pub fn ack(
        &mut self,
        machine_id: &str,
        assignments: &[String],
        cancels: &[String],
    ) -> Result<(), StoreError> {
        for a in assignments {
            self.tx
                .execute(
                    "UPDATE task_machines SET delivered = 1
                     WHERE machine_id = ?1 AND assignment_id = ?2",
                    params![machine_id, a],
                )
                .ctx("acknowledging an assignment")?;
        }
        for a in cancels {
            self.tx
                .execute(
                    "UPDATE task_machines SET cancel_delivered = 1
                     WHERE machine_id = ?1 AND assignment_id = ?2",
                    params![machine_id, a],
                )
                .ctx("acknowledging a cancellation")?;
        }
        Ok(())
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
            .execute(
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
            .execute(
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
            .execute(
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
            .prepare(&format!(
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
            .query_map([], |r| {
                // timeout_seconds follows the task-machine columns.
                let at = TM_COLS.split(',').count();
                Ok((
                    tm_row(r)?,
                    r.get::<_, i64>(at)? as u64,
                    r.get::<_, Option<String>>(at + 1)?,
                    r.get::<_, String>(at + 2)?,
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
            .execute(
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
        // with any other field.
        let needle = format!("\"{sha256}\"");
        self.tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM task_machines tm JOIN tasks t ON t.task_id = tm.task_id
                 LEFT JOIN assignment_payloads ap ON ap.assignment_id = tm.assignment_id
                 WHERE tm.machine_id = ?1 AND tm.state IN ('DISPATCHED', 'RUNNING')
                 AND (instr(t.scripts_json, ?2) > 0 OR instr(COALESCE(ap.payload_json, ''), ?2) > 0))",
                params![machine_id, needle],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .ctx("checking a blob download")
    }

    pub fn set_power_state(
        &mut self,
        assignment_id: &str,
        phase: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE task_machines SET power_state = ?2, power_ms = ?3 WHERE assignment_id = ?1",
                params![assignment_id, phase, now_ms],
            )
            .ctx("saving a power step")?;
        Ok(())
    }

    pub fn insert_image(&mut self, i: &ImageRow) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO images (image_id, name, version, os_type, gpu, sha256, size, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    i.image_id,
                    i.name,
                    i.version,
                    i.os_type,
                    i64::from(i.gpu),
                    i.sha256,
                    i.size as i64,
                    i.created_ms
                ],
            )
            .ctx("saving an image")?;
        Ok(())
    }

    pub fn images(&mut self) -> Result<Vec<ImageRow>, StoreError> {
        let mut st = self
            .tx
            .prepare(
                "SELECT image_id, name, version, os_type, gpu, sha256, size, created_ms
                 FROM images ORDER BY created_ms, image_id",
            )
            .ctx("listing images")?;
        let rows = st
            .query_map([], |r| {
                Ok(ImageRow {
                    image_id: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get(2)?,
                    os_type: r.get(3)?,
                    gpu: r.get::<_, i64>(4)? != 0,
                    sha256: r.get(5)?,
                    size: r.get::<_, i64>(6)? as u64,
                    created_ms: r.get(7)?,
                })
            })
            .ctx("listing images")?;
        rows.collect::<Result<_, _>>().ctx("listing images")
    }

    pub fn setting(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        self.tx
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading a setting")
    }

    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .ctx("saving a setting")?;
        Ok(())
    }

    /// Whether the machine has an operation that is not final (queued ones included).
    pub fn machine_busy(&mut self, machine_id: &str) -> Result<bool, StoreError> {
        self.tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM task_machines WHERE machine_id = ?1
                 AND state IN ('PENDING', 'DISPATCHED', 'RUNNING')
                 AND task_id NOT IN (SELECT apply_task_id FROM pool_images
                                     WHERE released = 0 AND apply_task_id IS NOT NULL))",
                params![machine_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .ctx("checking a machine's operations")
    }

    /// Stores a new desired-software document; returns its commit number (previous + 1).
    pub fn insert_commit(
        &mut self,
        machine_id: &str,
        doc_json: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let next: i64 = self
            .tx
            .query_row(
                "SELECT COALESCE(MAX(commit_no), 0) + 1 FROM software_commits WHERE machine_id = ?1",
                params![machine_id],
                |r| r.get(0),
            )
            .ctx("numbering a commit")?;
        self.tx
            .execute(
                "INSERT INTO software_commits (machine_id, commit_no, doc_json, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![machine_id, next, doc_json, now_ms],
            )
            .ctx("saving a commit")?;
        Ok(next)
    }

    /// The newest commit of a machine: `(commit, doc_json)`.
    pub fn latest_commit(&mut self, machine_id: &str) -> Result<Option<(i64, String)>, StoreError> {
        self.tx
            .query_row(
                "SELECT commit_no, doc_json FROM software_commits WHERE machine_id = ?1
                 ORDER BY commit_no DESC LIMIT 1",
                params![machine_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .ctx("reading the latest commit")
    }

    pub fn commit_doc(
        &mut self,
        machine_id: &str,
        commit: i64,
    ) -> Result<Option<String>, StoreError> {
        self.tx
            .query_row(
                "SELECT doc_json FROM software_commits WHERE machine_id = ?1 AND commit_no = ?2",
                params![machine_id, commit],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading a commit")
    }

    pub fn set_staged_commit(&mut self, machine_id: &str, commit: i64) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO host_software (machine_id, staged_commit) VALUES (?1, ?2)
                 ON CONFLICT (machine_id) DO UPDATE SET staged_commit = excluded.staged_commit",
                params![machine_id, commit],
            )
            .ctx("saving the staged commit")?;
        Ok(())
    }

    pub fn staged_commit(&mut self, machine_id: &str) -> Result<Option<i64>, StoreError> {
        self.tx
            .query_row(
                "SELECT staged_commit FROM host_software WHERE machine_id = ?1",
                params![machine_id],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading the staged commit")
    }

    pub fn pool_image(&mut self, pool_id: &str) -> Result<Option<PoolImageRow>, StoreError> {
        self.tx
            .query_row(
                &format!("SELECT {POOL_IMAGE_COLS} FROM pool_images WHERE pool_id = ?1"),
                params![pool_id],
                pool_image_row,
            )
            .optional()
            .ctx("reading a pool's images")
    }

    /// Pools with an image operation in progress.
    pub fn busy_pool_images(&mut self) -> Result<Vec<PoolImageRow>, StoreError> {
        let mut st = self
            .tx
            .prepare(&format!(
                "SELECT {POOL_IMAGE_COLS} FROM pool_images WHERE operation <> 'NONE' ORDER BY pool_id"
            ))
            .ctx("listing image operations")?;
        let rows = st
            .query_map([], pool_image_row)
            .ctx("listing image operations")?;
        rows.collect::<Result<_, _>>()
            .ctx("listing image operations")
    }

    pub fn put_pool_image(&mut self, p: &PoolImageRow) -> Result<(), StoreError> {
        self.tx
            .execute(
                &format!(
                    "INSERT INTO pool_images ({POOL_IMAGE_COLS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                     ON CONFLICT (pool_id) DO UPDATE SET operation = excluded.operation,
                     task_id = excluded.task_id, stage_task_id = excluded.stage_task_id,
                     apply_task_id = excluded.apply_task_id,
                     remove_task_id = excluded.remove_task_id, released = excluded.released,
                     request_json = excluded.request_json, start_ms = excluded.start_ms,
                     selective = excluded.selective,
                     pending_image_id = excluded.pending_image_id,
                     pending_state = excluded.pending_state,
                     current_image_id = excluded.current_image_id,
                     current_state = excluded.current_state"
                ),
                params![
                    p.pool_id,
                    p.operation,
                    p.task_id,
                    p.stage_task_id,
                    p.apply_task_id,
                    p.remove_task_id,
                    i64::from(p.released),
                    p.request_json,
                    p.start_ms,
                    i64::from(p.selective),
                    p.pending_image_id,
                    p.pending_state,
                    p.current_image_id,
                    p.current_state
                ],
            )
            .ctx("saving a pool's images")?;
        Ok(())
    }

    /// Whether `task_id` is a push's apply task still waiting for its start time.
    pub fn task_held(&mut self, task_id: &str) -> Result<bool, StoreError> {
        self.tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pool_images WHERE apply_task_id = ?1 AND released = 0)",
                params![task_id],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .ctx("checking a held task")
    }

    pub fn machine_image(&mut self, machine_id: &str) -> Result<MachineImageRow, StoreError> {
        Ok(self
            .tx
            .query_row(
                "SELECT current_image_id, current_state, pending_image_id, pending_state, language
                 FROM machine_images WHERE machine_id = ?1",
                params![machine_id],
                |r| {
                    Ok(MachineImageRow {
                        machine_id: machine_id.to_string(),
                        current_image_id: r.get(0)?,
                        current_state: r.get(1)?,
                        pending_image_id: r.get(2)?,
                        pending_state: r.get(3)?,
                        language: r.get(4)?,
                    })
                },
            )
            .optional()
            .ctx("reading a machine's images")?
            .unwrap_or_else(|| MachineImageRow {
                machine_id: machine_id.to_string(),
                ..MachineImageRow::default()
            }))
    }

    pub fn put_machine_image(&mut self, m: &MachineImageRow) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO machine_images (machine_id, current_image_id, current_state,
                 pending_image_id, pending_state, language) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (machine_id) DO UPDATE SET
                 current_image_id = excluded.current_image_id,
                 current_state = excluded.current_state,
                 pending_image_id = excluded.pending_image_id,
                 pending_state = excluded.pending_state,
                 language = excluded.language",
                params![
                    m.machine_id,
                    m.current_image_id,
                    m.current_state,
                    m.pending_image_id,
                    m.pending_state,
                    m.language
                ],
            )
            .ctx("saving a machine's images")?;
        Ok(())
    }

    /// A payload for one assignment, when its task's machines get different ones (rebuild).
    pub fn put_assignment_payload(
        &mut self,
        assignment_id: &str,
        json: &str,
    ) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO assignment_payloads (assignment_id, payload_json) VALUES (?1, ?2)",
                params![assignment_id, json],
            )
            .ctx("saving an assignment payload")?;
        Ok(())
    }

    pub fn assignment_payload(
        &mut self,
        assignment_id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.tx
            .query_row(
                "SELECT payload_json FROM assignment_payloads WHERE assignment_id = ?1",
                params![assignment_id],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading an assignment payload")
    }

    pub fn image(&mut self, image_id: &str) -> Result<Option<ImageRow>, StoreError> {
        Ok(self.images()?.into_iter().find(|i| i.image_id == image_id))
    }

    /// Tasks that have not reached their end (`finished_ms` unset).
    pub fn unfinished_tasks(&mut self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .tx
            .prepare("SELECT task_id FROM tasks WHERE finished_ms IS NULL")
            .ctx("listing unfinished tasks")?;
        let rows = st
            .query_map([], |r| r.get(0))
            .ctx("listing unfinished tasks")?;
        rows.collect::<Result<_, _>>()
            .ctx("listing unfinished tasks")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_database_from_0_1_0_is_migrated_in_place_and_keeps_its_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/controller-0.1.0-before-migrations.db"
            ),
            &path,
        )
        .unwrap();
        let store = Store::open(&path).unwrap();
        let (task, machines, tm) = store
            .tx(|tx| {
                let id = "6d0e0fb0-1b71-4502-973a-24b0543a5d5d";
                Ok::<_, StoreError>((tx.task(id)?, tx.machines()?, tx.task_machines(id)?))
            })
            .await
            .unwrap();
        let task = task.expect("the 0.1.0 task survived");
        assert_eq!(task.state, TaskState::Succeeded);
        assert_eq!(tm.len(), 2);
        assert!(tm.iter().all(|m| m.state == MachineState::Succeeded));
        let pools: Vec<_> = machines
            .iter()
            .map(|m| (m.machine_id.as_str(), m.pool_id.as_deref()))
            .collect();
        assert_eq!(
            pools,
            vec![
                ("qs-agent-1", Some("quickstart")),
                ("qs-agent-2", Some("quickstart"))
            ]
        );
        drop(store);
        // Opening again applies nothing twice.
        Store::open(&path).unwrap();
    }

    #[tokio::test]
    async fn survives_reopen_and_dedups_event_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Store::open(&path).unwrap();
        store
            .tx(|tx| {
                tx.record_contact("m1", Some("p"), "ab", 2, "0.1", None, 1)?;
                tx.insert_task(
                    &TaskRow {
                        task_id: "t1".into(),
                        kind: "script_execution".into(),
                        pool_id: "p".into(),
                        state: TaskState::Pending,
                        created_ms: 1,
                        finished_ms: None,
                        gray_fail_threshold: Some(1),
                        timeout_seconds: 60,
                        scripts_json: "[]".into(),
                        power_json: None,
                    },
                    &[("m1".into(), "a1".into(), 0)],
                )?;
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let (first, second, rows) = store
            .tx(|tx| {
                let a = tx.claim_event("m1", "a1:result", 2)?;
                let b = tx.claim_event("m1", "a1:result", 3)?;
                Ok::<_, StoreError>((a, b, tx.task_machines("t1")?))
            })
            .await
            .unwrap();
        assert!(first && !second);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].assignment_id, "a1");
        assert_eq!(rows[0].state, MachineState::Pending);
    }
}
