//! The controller's durable state: the only module that speaks SQL. SQLite (WAL, synchronous
//! FULL) is the embedded default; the statements stay within what PostgreSQL also runs
//! (`ON CONFLICT DO NOTHING`, integer millisecond timestamps, TEXT ids), so a second backend only
//! replaces this module. Callers work inside one transaction at a time through [`Tx`]:
//! [`Store::tx`] for anything that writes (the writer thread, group commit, the replicas'
//! write lock), [`Store::read`] for what only reads (a reader thread on its own
//! connection, read-only transactions, no lock).
//!
//! `migrate`: the schema, as numbered migrations recorded in `PRAGMA user_version`;
//! `rows`: the rows handed out and how they are read back; `identity`: machines'
//! certificates, sessions, enrollment tokens and revocations; `blobrefs`: what refers to
//! payload blobs (for their garbage collection); `images`: the image registry, pool
//! operations and machines' images; `software`: desired-software commits and settings;
//! `tasks`: tasks, their machines and dispatch; `delivery`: what agents are sent and the
//! results they report; `power`: the power limits' counts; `prune`: finished tasks past
//! their retention, removed a chunk at a time; `lists`: the paged lists of
//! tasks, machines and scripts (keyset pages) and the pools' counts; `audit`: the
//! operators' audit trail.

mod audit;
mod blobrefs;
mod columns;
mod delivery;
mod gauges;
mod identity;
mod images;
mod lists;
mod migrate;
mod pg;
mod power;
mod prune;
mod rows;
mod software;
pub(crate) mod sql;
mod tasks;
mod writer;

pub use audit::AuditRow;
pub use gauges::FleetGauges;
pub use identity::{EnrollmentTokenRow, RevocationRow, SessionVerdict, TokenCheck};
pub use images::{ImageRow, MachineImageRow, PoolImageRow};
pub use lists::{MachineFilter, PoolCount, TaskFilter, TaskSummaryRow};
pub use pg::Wake;
use rows::{finish_task, finish_tm, machine_state, task_row, tm_row, TASK_COLS, TM_COLS};
pub use rows::{
    InFlight, MachineRow, Outcome, RolloutRow, ScriptRow, TaskMachineRow, TaskRow, Undelivered,
};

use std::path::Path;

use sql::{params, Optional, SqlError, SqlResult};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {target}: {source}")]
    Open { target: String, source: SqlError },
    #[error("database error while {what}: {source}")]
    Sql {
        what: &'static str,
        source: SqlError,
    },
    #[error("database holds an invalid {what}: {value:?}")]
    Corrupt { what: &'static str, value: String },
    #[error("database worker stopped: {0}")]
    Worker(String),
}

trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<SqlError>> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Sql {
            what,
            source: e.into(),
        })
    }
}

/// A handle to the database; clones share its writer ([`writer`]: group commit).
#[derive(Clone)]
pub struct Store {
    writer: writer::Writer,
    /// Read-only transactions ([`Store::read`]), on a connection of their own.
    reader: writer::Writer,
    database: Database,
    /// Handed to every transaction ([`Tx::power_limit`]).
    power_limit: Option<u32>,
}

/// One open transaction (a savepoint of its group's transaction; see [`writer`]). Every
/// method is a single statement or a short fixed sequence.
pub struct Tx<'a> {
    tx: sql::Conn<'a>,
    /// What to do once this transaction is durable ([`Tx::after_commit`]).
    committed: Vec<Box<dyn FnOnce() + Send>>,
    /// The controller-wide `max_concurrent_power_operations` (config), for the engine.
    power_limit: Option<u32>,
}

pub use crate::config::controller::Database;

/// Brings the database to this build's schema without serving (`fieldhand-controller
/// migrate`); the version it is at now.
pub fn migrate_only(db: &Database) -> Result<u32, StoreError> {
    drop(Store::open(db)?);
    Ok(migrate::LATEST)
}

impl Store {
    /// Opens the database and brings its schema to this build's version ([`migrate`]).
    pub fn open(db: &Database) -> Result<Self, StoreError> {
        let open_err = |source: SqlError| StoreError::Open {
            target: db.to_string(),
            source,
        };
        let (backend, reading) = match db {
            Database::Sqlite(path) => (
                writer::Backend::Sqlite(open_sqlite(path).map_err(open_err)?),
                // After the writer's connection, which made the file and its schema.
                writer::Backend::Sqlite(open_sqlite_reader(path).map_err(open_err)?),
            ),
            Database::Postgres(url) => {
                // The client runs its own small runtime, which may not start inside the
                // caller's: connect and migrate on a thread of their own.
                let (client, reader) = std::thread::scope(|s| {
                    s.spawn(|| {
                        let mut client = pg::connect(url)?;
                        migrate::apply_pg(&mut client)?;
                        Ok((client, pg::connect(url)?))
                    })
                    .join()
                    .unwrap_or_else(|_| {
                        Err(SqlError::Refused("the connecting thread panicked".into()))
                    })
                })
                .map_err(open_err)?;
                (
                    writer::Backend::Postgres(Box::new(pg::Writer::new(url.clone(), client))),
                    writer::Backend::Postgres(Box::new(pg::Writer::new(url.clone(), reader))),
                )
            }
        };
        Ok(Store {
            writer: writer::Writer::start(backend, writer::Mode::Write),
            reader: writer::Writer::start(reading, writer::Mode::Read),
            database: db.clone(),
            power_limit: None,
        })
    }

    /// The same store, whose transactions see the controller-wide power limit (config
    /// `max_concurrent_power_operations`); the engine reads it from the transaction, so every
    /// path that dispatches (API, events, reaper, start-up) holds to it.
    pub fn with_power_limit(mut self, limit: Option<u32>) -> Store {
        self.power_limit = limit;
        self
    }

    /// The database this store runs on.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Whether other controller replicas may share this database (PostgreSQL): their
    /// changes arrive as wake-ups ([`Store::on_wake`]).
    pub fn shared(&self) -> bool {
        match self.database {
            Database::Sqlite(_) => false,
            Database::Postgres(_) => true,
        }
    }

    /// Calls `on` with every wake-up another replica publishes ([`Tx::publish_wake`]) until
    /// it returns false. Nothing to listen to on SQLite (one controller per file).
    pub fn on_wake(&self, replica: &str, on: impl Fn(Wake) -> bool + Send + 'static) {
        match &self.database {
            Database::Sqlite(_) => {}
            Database::Postgres(url) => pg::listen(url.clone(), replica.to_string(), on),
        }
    }

    /// Runs `f` in one transaction; commits only if `f` returns `Ok`, and answers only once
    /// the commit is durable. Transactions queued together share one commit.
    pub async fn tx<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let limit = self.power_limit;
        self.writer
            .tx(move |tx| {
                tx.power_limit = limit;
                f(tx)
            })
            .await
    }

    /// Runs `f` in a read-only transaction on the reader's connection: for what only reads
    /// (the operator's views and lists, metrics gauges, revocation reloads). It waits
    /// neither behind the writer's queue nor, on PostgreSQL, for the write lock; it sees
    /// every transaction committed before it was asked; a write in it fails.
    pub async fn read<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        self.reader.tx(f).await
    }

    /// Transactions waiting for the database now.
    pub fn queue_depth(&self) -> usize {
        self.writer.depth()
    }

    /// How long each transaction's statements take (for `GET /metrics`).
    pub fn transaction_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.writer.transaction_seconds()
    }

    /// How long transactions wait for the database (the load the router sheds on).
    pub fn queue_lag(&self) -> std::time::Duration {
        self.writer.lag()
    }
}

fn open_sqlite(path: &Path) -> SqlResult<rusqlite::Connection> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a result acknowledged to an agent must survive a power cut of the controller.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(256);
    migrate::apply(&mut conn)?;
    Ok(conn)
}

/// The reader's connection to the file the writer opened: WAL lets it read while the
/// writer writes; `query_only` makes a write in it an error, not a second writer.
fn open_sqlite_reader(path: &Path) -> SqlResult<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "query_only", true)?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

impl Tx<'_> {
    /// Runs `f` once this transaction has committed, and never if it rolls back: what tells
    /// the world about a change (a journal record) never reports one that did not happen.
    pub fn after_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.committed.push(Box::new(f));
    }

    pub fn machine_last_seen(&mut self, machine_id: &str) -> Result<Option<i64>, StoreError> {
        self.tx
            .one(
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
            .statement(
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
            .exec(
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
            .one(
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

    /// Whether the machine has an operation that is not final (queued ones included).
    pub fn machine_busy(&mut self, machine_id: &str) -> Result<bool, StoreError> {
        self.tx
            .one(
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

    /// Tells the other replicas to wake these machines' long polls once this transaction
    /// commits (`NOTIFY` is transactional). Nothing on SQLite.
    pub fn publish_wake(&mut self, replica: &str, machines: &[String]) -> Result<(), StoreError> {
        if !self.tx.is_postgres() {
            return Ok(());
        }
        for payload in pg::wake_payloads(replica, machines) {
            self.tx
                .exec(
                    "SELECT pg_notify(?1, ?2)",
                    params![pg::WAKE_CHANNEL, payload],
                )
                .ctx("publishing a wake-up")?;
        }
        Ok(())
    }

    /// Tasks that have not reached their end (`finished_ms` unset).
    pub fn unfinished_tasks(&mut self) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .tx
            .statement("SELECT task_id FROM tasks WHERE finished_ms IS NULL")
            .ctx("listing unfinished tasks")?;
        let rows = st
            .query_map(params![], |r| r.get(0))
            .ctx("listing unfinished tasks")?;
        rows.collect::<Result<_, _>>()
            .ctx("listing unfinished tasks")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::domain::{MachineState, TaskKind, TaskState};

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
        let store = Store::open(&Database::Sqlite(path.clone())).unwrap();
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
        Store::open(&Database::Sqlite(path.clone())).unwrap();
    }

    /// The database of the release before PostgreSQL (schema 3, made by its quickstart):
    /// migrated in place to this build's schema, its task and results kept, and an event it
    /// applied before the upgrade still refused after it (a result is never applied twice
    /// across the controller's upgrade).
    #[tokio::test]
    async fn a_database_of_the_previous_release_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prev.db");
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/controller-schema-3.db"
            ),
            &path,
        )
        .unwrap();
        let store = Store::open(&Database::Sqlite(path.clone())).unwrap();
        let (task, tm, again) = store
            .tx(|tx| {
                let id = "e01943b8-06de-42b1-a849-f69843a9eb26";
                let again = tx.claim_event(
                    "qs-agent-1",
                    "164b7a8a-8948-4660-a826-2b5e5d5225cc:result",
                    9,
                )?;
                Ok::<_, StoreError>((tx.task(id)?, tx.task_machines(id)?, again))
            })
            .await
            .unwrap();
        assert_eq!(task.expect("the task survived").state, TaskState::Succeeded);
        assert_eq!(tm.len(), 3);
        assert!(tm.iter().all(|m| m.state == MachineState::Succeeded));
        assert!(tm.iter().all(|m| m.outcome.stdout.contains("hello from")));
        assert!(
            !again,
            "the key applied before the upgrade is still applied"
        );
        drop(store);
        let c = rusqlite::Connection::open(&path).unwrap();
        let v: u32 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, migrate::LATEST);
    }

    #[tokio::test]
    async fn survives_reopen_and_dedups_event_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Store::open(&Database::Sqlite(path.clone())).unwrap();
        store
            .tx(|tx| {
                tx.record_contact("m1", Some("p"), "ab", 2, "0.1", None, 1)?;
                tx.insert_task(
                    &TaskRow {
                        task_id: "t1".into(),
                        kind: TaskKind::ScriptExecution,
                        pool_id: "p".into(),
                        state: TaskState::Pending,
                        created_ms: 1,
                        finished_ms: None,
                        gray_fail_threshold: Some(1),
                        timeout_seconds: 60,
                        scripts_json: "[]".into(),
                        power_json: None,
                        created_by: None,
                        cancelled_by: None,
                        rollout: RolloutRow::default(),
                    },
                    &[("m1".into(), "a1".into(), 0)],
                )?;
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
        drop(store);
        let store = Store::open(&Database::Sqlite(path.clone())).unwrap();
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

    /// The page's two reads: counts by batch and state, and one page of rows in the order
    /// of the full list, with and without a state filter, on SQLite and (when the suite has
    /// a server) PostgreSQL.
    #[tokio::test]
    async fn task_counts_and_pages_agree_with_the_full_list() {
        let dir = tempfile::tempdir().unwrap();
        for db in both_databases(dir.path()) {
            let store = Store::open(&db).unwrap();
            let (counts, all, page, failed, past_end) = store
                .tx(|tx| {
                    let machines: Vec<(String, String, u32)> = (0..25)
                        .map(|i| (format!("m{i:02}"), format!("a{i}"), u32::from(i >= 5)))
                        .collect();
                    tx.insert_task(
                        &TaskRow {
                            task_id: "t1".into(),
                            kind: TaskKind::ScriptExecution,
                            pool_id: "p".into(),
                            state: TaskState::Running,
                            created_ms: 1,
                            finished_ms: None,
                            gray_fail_threshold: Some(1),
                            timeout_seconds: 60,
                            scripts_json: "[]".into(),
                            power_json: None,
                            created_by: None,
                            cancelled_by: None,
                            rollout: Default::default(),
                        },
                        &machines,
                    )?;
                    for i in 0..5 {
                        let state = if i == 3 {
                            MachineState::Failed
                        } else {
                            MachineState::Succeeded
                        };
                        tx.set_final(&format!("a{i}"), state, &Outcome::default())?;
                    }
                    tx.set_final("a20", MachineState::Failed, &Outcome::default())?;
                    Ok::<_, StoreError>((
                        tx.task_counts("t1")?,
                        tx.task_machines("t1")?,
                        tx.task_machines_page("t1", None, 10, 8)?,
                        tx.task_machines_page("t1", Some(MachineState::Failed), 10, 0)?,
                        tx.task_machines_page("t1", None, 10, 25)?,
                    ))
                })
                .await
                .unwrap();
            assert_eq!(
                counts,
                vec![
                    (0, MachineState::Failed, 1),
                    (0, MachineState::Succeeded, 4),
                    (1, MachineState::Failed, 1),
                    (1, MachineState::Pending, 19),
                ],
                "{db}"
            );
            let ids = |rows: &[TaskMachineRow]| -> Vec<String> {
                rows.iter().map(|r| r.machine_id.clone()).collect()
            };
            assert_eq!(ids(&page), ids(&all[8..18]), "{db}");
            assert_eq!(ids(&failed), vec!["m03", "m20"], "{db}");
            assert!(past_end.is_empty(), "{db}");
        }
    }

    /// A new SQLite database in `dir`, and a new PostgreSQL one when the suite has a server.
    pub(super) fn both_databases(dir: &std::path::Path) -> Vec<Database> {
        let mut dbs = vec![Database::Sqlite(dir.join("t.db"))];
        if let Some(url) = postgres_database() {
            dbs.push(Database::Postgres(url));
        }
        dbs
    }

    /// A new database on the PostgreSQL server of `FIELDHAND_TEST_POSTGRES`, if set.
    pub(super) fn postgres_database() -> Option<String> {
        let Ok(base) = std::env::var("FIELDHAND_TEST_POSTGRES") else {
            eprintln!("skipped: set FIELDHAND_TEST_POSTGRES (tests/pg/cluster.sh) to run it");
            return None;
        };
        let name = format!("fh_unit_{}", uuid::Uuid::new_v4().simple());
        let url = base.clone();
        std::thread::spawn(move || {
            let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .unwrap();
            let (root, _) = url.rsplit_once('/').unwrap();
            Some(format!("{root}/{name}"))
        })
        .join()
        .unwrap()
    }

    #[test]
    fn replicas_migrating_one_database_at_once_apply_each_step_once() {
        let Some(url) = postgres_database() else {
            return;
        };
        let db = Database::Postgres(url.clone());
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let db = db.clone();
                std::thread::spawn(move || Store::open(&db).map(drop))
            })
            .collect();
        for o in opened {
            o.join().unwrap().unwrap();
        }
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let rows: Vec<i64> = c
            .query("SELECT version FROM fieldhand_schema ORDER BY version", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let want: Vec<i64> = migrate::versions().into_iter().map(i64::from).collect();
        assert_eq!(rows, want);
        // A database newer than this build is refused, naming both versions.
        c.execute(
            "INSERT INTO fieldhand_schema (version) VALUES ($1)",
            &[&(i64::from(migrate::LATEST) + 1)],
        )
        .unwrap();
        let e = Store::open(&db).err().expect("refused").to_string();
        assert!(e.contains("newer than this controller"), "{e}");
    }

    #[tokio::test]
    async fn a_lost_database_connection_is_made_again() {
        let Some(url) = postgres_database() else {
            return;
        };
        let store = Store::open(&Database::Postgres(url.clone())).unwrap();
        let one = |store: &Store, id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .tx(move |tx| {
                        tx.record_contact(id, Some("p"), "ab", 2, "0.1", None, 1)?;
                        tx.machine_last_seen(id)
                    })
                    .await
            }
        };
        assert_eq!(one(&store, "m1").await.unwrap(), Some(1));
        // The server ends every other session of this database (a restart, a failover).
        let name = url.rsplit_once('/').unwrap().1.to_string();
        let base = std::env::var("FIELDHAND_TEST_POSTGRES").unwrap();
        std::thread::spawn(move || {
            let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&name],
                )
                .unwrap();
        })
        .join()
        .unwrap();
        // The group that meets the dead connection fails (its callers see an error, nothing
        // is half-applied); the next one connects again.
        let first = one(&store, "m2").await;
        let again = match first {
            Ok(v) => v,
            Err(_) => one(&store, "m2").await.unwrap(),
        };
        assert_eq!(again, Some(1));
        assert_eq!(one(&store, "m1").await.unwrap(), Some(1));
        // The reader's connection was ended too; it connects again the same way.
        let read = || store.read(|tx| tx.machine_last_seen("m2"));
        let seen = match read().await {
            Ok(v) => v,
            Err(_) => read().await.unwrap(),
        };
        assert_eq!(seen, Some(1));
    }

    /// A read sees every write answered before it was asked, and cannot write.
    #[tokio::test]
    async fn reads_see_what_was_written_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        for db in both_databases(dir.path()) {
            let store = Store::open(&db).unwrap();
            for at in 1..=3 {
                store
                    .tx(move |tx| tx.record_contact("m1", Some("p"), "ab", 2, "0", None, at))
                    .await
                    .unwrap();
                let seen = store.read(|tx| tx.machine_last_seen("m1")).await.unwrap();
                assert_eq!(seen, Some(at), "{db}");
            }
            let refused = store.read(|tx| tx.set_setting("k", "v")).await;
            assert!(refused.is_err(), "a read wrote on {db}");
            let kept = store.tx(|tx| tx.setting("k")).await.unwrap();
            assert_eq!(kept, None, "{db}");
        }
    }

    /// On PostgreSQL a read does not wait for the write lock: with the lock held elsewhere
    /// (another replica's long group), the read is answered and the write is not, until
    /// the lock is let go.
    #[tokio::test]
    async fn reads_do_not_wait_for_the_replicas_write_lock() {
        let Some(url) = postgres_database() else {
            return;
        };
        let store = Store::open(&Database::Postgres(url.clone())).unwrap();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let mut t = c.transaction().unwrap();
            t.execute("SELECT pg_advisory_xact_lock($1)", &[&pg::WRITE_LOCK])
                .unwrap();
            locked_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            t.commit().unwrap();
        });
        locked_rx.recv().unwrap();
        let write = tokio::spawn({
            let store = store.clone();
            async move { store.tx(|tx| tx.set_setting("k", "v")).await }
        });
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            store.read(|tx| tx.setting("k")),
        )
        .await
        .expect("the read waited for the write lock")
        .unwrap();
        assert_eq!(read, None);
        assert!(!write.is_finished(), "the write did not wait for the lock");
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        write.await.unwrap().unwrap();
        let after = store.read(|tx| tx.setting("k")).await.unwrap();
        assert_eq!(after.as_deref(), Some("v"));
    }
}
