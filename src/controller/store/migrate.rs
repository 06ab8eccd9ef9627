//! Schema migrations: numbered steps, each applied once, in order, in one transaction
//! together with the `PRAGMA user_version` that records it. A database made by 0.1.0 has
//! version 0 and its tables already exist, which `SCHEMA_V1` (`IF NOT EXISTS`) leaves alone.
//!
//! On SQLite the transaction is `IMMEDIATE`: it takes the write lock before reading the
//! version, so two controllers starting on one file at once apply each step once. On
//! PostgreSQL the same steps run under the replicas' advisory lock, and the version is a row
//! of `fieldhand_schema`. The steps use only what both databases run (TEXT, BIGINT).

use super::sql::{SqlError, SqlResult};

/// `(version, statements)`, in order. Never edit a released step: add the next one.
const STEPS: &[(u32, &str)] = &[
    (1, SCHEMA_V1),
    (2, V2_IDENTITY),
    (3, V3_BATCH_INDEX),
    (4, V4_LISTS_AND_AUDIT),
    (5, V5_RATE),
    (6, V6_OUTBOX),
    (7, V7_INDEXES),
];

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

/// Version 2: the controller alone decides pools (so `machines.pool_id` may be empty), the
/// certificate each machine presents, sessions per identity (two live agents behind one
/// certificate), enrollment tokens, revocations, and which session an assignment was
/// offered to.
const V2_IDENTITY: &str = r#"
CREATE TABLE machines_v2 (
    machine_id         TEXT PRIMARY KEY,
    pool_id            TEXT,
    agent_version      TEXT NOT NULL,
    last_seen_ms       BIGINT NOT NULL,
    facts_json         TEXT,
    cert_serial        TEXT,
    cert_not_after_ms  BIGINT,
    decommissioned_ms  BIGINT,
    conflict_ms        BIGINT
);
INSERT INTO machines_v2 (machine_id, pool_id, agent_version, last_seen_ms, facts_json)
    SELECT machine_id, pool_id, agent_version, last_seen_ms, facts_json FROM machines;
DROP TABLE machines;
ALTER TABLE machines_v2 RENAME TO machines;
CREATE INDEX machines_pool ON machines (pool_id);
CREATE TABLE agent_sessions (
    machine_id  TEXT NOT NULL,
    session     TEXT NOT NULL,
    instance    TEXT NOT NULL,
    first_ms    BIGINT NOT NULL,
    last_ms     BIGINT NOT NULL,
    hold_ms     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (machine_id, session)
);
CREATE TABLE enrollment_tokens (
    token_id       TEXT PRIMARY KEY,
    secret_sha256  TEXT NOT NULL,
    pool_id        TEXT NOT NULL,
    uses_left      BIGINT,
    expires_ms     BIGINT NOT NULL,
    created_ms     BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    deleted_ms     BIGINT
);
CREATE TABLE revocations (
    serial      TEXT PRIMARY KEY,
    revoked_ms  BIGINT NOT NULL,
    revoked_by  TEXT NOT NULL,
    machine_id  TEXT
);
ALTER TABLE task_machines ADD COLUMN offered_session TEXT;
ALTER TABLE task_machines ADD COLUMN offered_instance TEXT;
"#;

/// Version 3: whether a batch still has machines at work is one index probe, so an event
/// costs the same in a task of 10 machines as in one of 10,000.
const V3_BATCH_INDEX: &str = r#"
CREATE INDEX task_machines_batch ON task_machines (task_id, batch, state);
"#;

/// Version 4: who made and who cancelled each task, the operators' audit trail, and the
/// indexes the lists page through (newest first, the id breaking ties, so a page is one
/// index range scan wherever the previous one ended).
const V4_LISTS_AND_AUDIT: &str = r#"
ALTER TABLE tasks ADD COLUMN created_by TEXT;
ALTER TABLE tasks ADD COLUMN cancelled_by TEXT;
CREATE INDEX tasks_created ON tasks (created_ms, task_id);
CREATE INDEX tasks_pool_created ON tasks (pool_id, created_ms, task_id);
CREATE INDEX scripts_created ON scripts (created_ms, script_id);
CREATE TABLE audit (
    audit_id      TEXT PRIMARY KEY,
    at_ms         BIGINT NOT NULL,
    operator      TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT NOT NULL,
    request_json  TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at_ms, audit_id);
"#;

/// Version 5: rollout rate controls, retry and resume, power limits.
///
/// - `tasks`: the request's `gray_count`, `max_concurrency` and `max_errors` as given (`5`,
///   `10%`: shown, and re-resolved by a retry), what they came to for this task's machines
///   (`wave_limit`, `error_limit`), what an operator's resume accepted (`gray_accepted`, and
///   `errors_accepted`: the failures counted when the task was resumed), `retry_of`, and
///   `power_waiting`: the batch that has machines left `PENDING` only because a power limit
///   was reached (NULL otherwise), so a freed slot finds the waiting tasks by index.
/// - `task_machines.power_pool`: the pool a machine counts against while its assignment
///   carries a reboot or shutdown (NULL: no power step), with an index that counts those at
///   work per pool and in total in O(at work).
/// - `task_machines_wave`: the next `PENDING` machines of a batch in machine order, LIMIT k,
///   without sorting the batch.
/// - `pool_settings`: the operator's per-pool power limit.
const V5_RATE: &str = r#"
ALTER TABLE tasks ADD COLUMN gray_count TEXT;
ALTER TABLE tasks ADD COLUMN max_concurrency TEXT;
ALTER TABLE tasks ADD COLUMN max_errors TEXT;
ALTER TABLE tasks ADD COLUMN wave_limit BIGINT;
ALTER TABLE tasks ADD COLUMN error_limit BIGINT;
ALTER TABLE tasks ADD COLUMN gray_accepted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN errors_accepted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN retry_of TEXT;
ALTER TABLE tasks ADD COLUMN power_waiting BIGINT;
CREATE INDEX tasks_power_waiting ON tasks (power_waiting, created_ms);
ALTER TABLE task_machines ADD COLUMN power_pool TEXT;
CREATE INDEX task_machines_power ON task_machines (state, power_pool);
CREATE INDEX task_machines_wave ON task_machines (task_id, batch, state, machine_id);
CREATE TABLE pool_settings (
    pool_id                          TEXT PRIMARY KEY,
    max_concurrent_power_operations  BIGINT
);
"#;

/// Every version a database made by this build has passed through, in order.
#[cfg(test)]
pub fn versions() -> Vec<u32> {
    STEPS.iter().map(|(v, _)| *v).collect()
}

/// Version 6: what each agent's last heartbeat said its outbox holds (`GET /metrics`).
const V6_OUTBOX: &str = r#"
ALTER TABLE machines ADD COLUMN outbox_events BIGINT;
"#;

/// The version this build writes.
/// Version 7: finished tasks by when they finished, for pruning them past
/// `task_retention_seconds` without reading every task; and machines by certificate
/// serial, for a revocation's look-up (`machine_of_serial`), which read every machine.
const V7_INDEXES: &str = r#"
CREATE INDEX tasks_finished ON tasks (finished_ms);
CREATE INDEX machines_cert_serial ON machines (cert_serial);
"#;

pub const LATEST: u32 = STEPS[STEPS.len() - 1].0;

fn newer(current: u32) -> SqlError {
    SqlError::Refused(format!(
        "the database is at schema version {current}, newer than this controller's {LATEST}; \
         run the newer controller"
    ))
}

/// Brings a SQLite database to [`LATEST`]. A database newer than this build is refused
/// rather than written with an older idea of its tables.
pub fn apply(conn: &mut rusqlite::Connection) -> SqlResult<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > LATEST {
        return Err(newer(current));
    }
    for (version, sql) in STEPS.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tracing::info!(version, "database schema migrated");
    }
    Ok(tx.commit()?)
}

/// Brings a PostgreSQL database to [`LATEST`], under the write lock every replica takes, so
/// replicas starting together apply each step once. The version is a row of
/// `fieldhand_schema` (PostgreSQL has no `user_version`).
pub fn apply_pg(client: &mut postgres::Client) -> SqlResult<()> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&super::pg::WRITE_LOCK],
    )?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS fieldhand_schema (version BIGINT NOT NULL)")?;
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM fieldhand_schema",
            &[],
        )?
        .get(0);
    let current = u32::try_from(current).unwrap_or(u32::MAX);
    if current > LATEST {
        return Err(newer(current));
    }
    for (version, sql) in STEPS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO fieldhand_schema (version) VALUES ($1)",
            &[&i64::from(*version)],
        )?;
        tracing::info!(version, "database schema migrated");
    }
    Ok(tx.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn a_new_database_reaches_the_latest_version_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("x.db")).unwrap();
        apply(&mut c).unwrap();
        apply(&mut c).unwrap();
        let v: u32 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, LATEST);
        // Version 5's table and columns are there.
        c.execute(
            "INSERT INTO pool_settings (pool_id, max_concurrent_power_operations) VALUES ('p', 2)",
            [],
        )
        .unwrap();
        c.prepare("SELECT retry_of, power_waiting, errors_accepted, wave_limit FROM tasks")
            .unwrap();
        c.prepare("SELECT power_pool FROM task_machines").unwrap();
        // Version 6's column.
        c.prepare("SELECT outbox_events FROM machines").unwrap();
        // Version 7's indexes.
        let idx: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index'
                 AND name IN ('tasks_finished', 'machines_cert_serial')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(idx, 2);
        assert_eq!(LATEST, 7);
        // Version 2's columns are there.
        c.execute(
            "INSERT INTO machines (machine_id, agent_version, last_seen_ms, cert_serial)
             VALUES ('m', '', 0, 'ab')",
            [],
        )
        .unwrap();
        // And version 4's.
        c.execute(
            "INSERT INTO audit (audit_id, at_ms, operator, action, target, request_json)
             VALUES ('a', 0, 'op', 'task_cancel', 't', '{}')",
            [],
        )
        .unwrap();
        let by: Option<String> = c
            .query_row("SELECT MAX(created_by) FROM tasks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(by, None);
    }

    #[test]
    fn a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("x.db")).unwrap();
        c.pragma_update(None, "user_version", LATEST + 1).unwrap();
        let e = apply(&mut c).unwrap_err().to_string();
        assert!(e.contains("newer than this controller"), "{e}");
    }
}
