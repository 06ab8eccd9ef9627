//! Group commit: one thread owns the database connection and runs every transaction. It
//! takes the transactions waiting in its queue (up to [`MAX_GROUP`]), runs each inside a
//! savepoint of one SQLite transaction, commits once (one fsync for all of them), and only
//! then answers each caller. A transaction that fails or panics rolls back its own savepoint
//! and leaves the others alone, so callers see exactly the semantics of one transaction each;
//! what changes is that 100 polls cost one fsync instead of 100, and no thread waits on a
//! mutex for the connection.
//!
//! The same machinery in [`Mode::Read`] is the store's reader: a second thread on a second
//! connection whose groups are read-only transactions without the replicas' write lock.
//!
//! The queue is bounded: when it is full, callers wait (back-pressure). The router sheds new
//! agent requests with 503 while transactions wait long ([`Writer::lag`]): how long the
//! oldest one waited is the signal, not how many there are, because a burst the writer
//! clears in a second (10,000 polls woken by one dispatch) is no overload.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::{mpsc, oneshot};

use super::sql::{self, Conn};
use super::{pg, Ctx, StoreError, Tx};

/// Transactions committed together at most.
const MAX_GROUP: usize = 256;
/// On PostgreSQL: each savepoint that writes is a subtransaction, and past 64 in one
/// transaction the server's per-backend cache overflows, which slows every other session's
/// snapshots. 64 polls still share one commit.
const MAX_GROUP_PG: usize = 64;
/// Transactions that may wait for the writer.
pub const QUEUE: usize = 4096;

/// What a finished job does once the group's commit is known: answer its caller.
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A transaction body. `Some(reply)`: it succeeded and waits for the commit; `None`: it
/// failed (its savepoint is rolled back) and has answered already.
type Body = Box<dyn for<'a> FnOnce(&mut Tx<'a>) -> Option<Reply> + Send>;

struct Job {
    queued: Instant,
    body: Body,
}

/// What a worker's transactions may do. A reader runs the operator's and the background
/// loops' reads on a connection of its own, so they wait neither for the writer's queue
/// nor, on PostgreSQL, for the write lock every replica's groups take; the database refuses
/// a write in its transactions (`READ ONLY`, SQLite's `query_only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Write,
    Read,
}

#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    depth: Arc<AtomicUsize>,
    /// How long the oldest transaction of the last group waited, in ms (0 when idle).
    lag_ms: Arc<AtomicU64>,
    /// How long each transaction's body ran (shared with the metrics registry).
    tx_seconds: Histogram,
}

impl Writer {
    /// Starts the worker thread on `backend`.
    pub fn start(mut backend: Backend, mode: Mode) -> Writer {
        let (jobs, mut rx) = mpsc::channel::<Job>(QUEUE);
        let depth = Arc::new(AtomicUsize::new(0));
        let lag_ms = Arc::new(AtomicU64::new(0));
        let (d, lag) = (depth.clone(), lag_ms.clone());
        // 100 µs to about 3 s.
        let tx_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        let seconds = tx_seconds.clone();
        let name = match mode {
            Mode::Write => "fieldhand-db",
            Mode::Read => "fieldhand-db-read",
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let max_group = match backend {
                    Backend::Sqlite(_) => MAX_GROUP,
                    Backend::Postgres(_) => MAX_GROUP_PG,
                };
                let mut group: Vec<Job> = Vec::with_capacity(max_group);
                loop {
                    let first = match rx.try_recv() {
                        Ok(j) => j,
                        Err(_) => {
                            lag.store(0, Ordering::Relaxed);
                            match rx.blocking_recv() {
                                Some(j) => j,
                                None => break,
                            }
                        }
                    };
                    lag.store(first.queued.elapsed().as_millis() as u64, Ordering::Relaxed);
                    group.push(first);
                    while group.len() < max_group {
                        match rx.try_recv() {
                            Ok(j) => group.push(j),
                            Err(_) => break,
                        }
                    }
                    d.fetch_sub(group.len(), Ordering::Relaxed);
                    run_group(&mut backend, mode, &mut group, &seconds);
                }
            })
            .expect("start the database writer thread");
        Writer {
            jobs,
            depth,
            lag_ms,
            tx_seconds,
        }
    }

    pub fn transaction_seconds(&self) -> Histogram {
        self.tx_seconds.clone()
    }

    /// Transactions waiting for the writer now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// How long the transactions the writer took last had waited for it.
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.lag_ms.load(Ordering::Relaxed))
    }

    /// Runs `f` as one transaction of the next group; answers after the group committed.
    pub async fn tx<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<R, E>>();
        let body: Body = Box::new(move |tx: &mut Tx<'_>| match f(tx) {
            Ok(out) => {
                let committed = std::mem::take(&mut tx.committed);
                Some(Box::new(move |commit: Result<(), String>| {
                    let _ = reply_tx.send(match commit {
                        Ok(()) => {
                            committed.into_iter().for_each(|f| f());
                            Ok(out)
                        }
                        Err(e) => Err(E::from(StoreError::Worker(e))),
                    });
                }) as Reply)
            }
            Err(e) => {
                let _ = reply_tx.send(Err(e));
                None
            }
        });
        let job = Job {
            queued: Instant::now(),
            body,
        };
        self.depth.fetch_add(1, Ordering::Relaxed);
        if self.jobs.send(job).await.is_err() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(E::from(StoreError::Worker(
                "the database writer stopped".into(),
            )));
        }
        match reply_rx.await {
            Ok(r) => r,
            Err(_) => Err(E::from(StoreError::Worker(
                "the transaction did not commit (it panicked, or its group could not reach \
                 the database); nothing of it was kept"
                    .into(),
            ))),
        }
    }
}

/// The connection the writer thread owns.
pub enum Backend {
    Sqlite(rusqlite::Connection),
    Postgres(Box<pg::Writer>),
}

/// Runs the jobs of one group in one transaction, each in its own savepoint.
fn run_group(backend: &mut Backend, mode: Mode, group: &mut Vec<Job>, seconds: &Histogram) {
    let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
    let outcome = match backend {
        Backend::Sqlite(conn) => (|| -> Result<(), StoreError> {
            let mut t = conn.transaction().ctx("starting a transaction")?;
            for job in group.drain(..) {
                let sp = t.savepoint().ctx("starting a savepoint")?;
                run_job(
                    job,
                    Tx {
                        tx: Conn::Sqlite(sp),
                        committed: Vec::new(),
                        power_limit: None,
                    },
                    &mut replies,
                    seconds,
                )?;
            }
            t.commit().ctx("committing")
        })(),
        Backend::Postgres(w) => {
            // One round trip: the transaction, the lock every replica's groups take first
            // (see `pg`), and the savepoint the first job runs under.
            // Reads take no lock: one snapshot for the group, which began after every job
            // of it was queued, so a read sees every write answered before it was asked.
            let begin = match mode {
                Mode::Write => format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({}); {}",
                    pg::WRITE_LOCK,
                    sql::PG_SAVEPOINT
                ),
                Mode::Read => format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
                    sql::PG_SAVEPOINT
                ),
            };
            // A connection the server ended (a restart, a failover) is often only found out
            // by the next statement: before any job ran, connect again and begin once more,
            // so the group is not lost with it.
            let began = match w.parts().and_then(|(c, _)| Ok(c.batch_execute(&begin)?)) {
                Err(e) if e.connection_lost() => {
                    w.lost();
                    w.parts().and_then(|(c, _)| Ok(c.batch_execute(&begin)?))
                }
                other => other,
            };
            let r = (|| -> Result<(), StoreError> {
                began.ctx("starting a transaction")?;
                let (client, statements) = w.parts().ctx("connecting")?;
                let mut run = || -> Result<(), StoreError> {
                    for job in group.drain(..) {
                        let tx = Tx {
                            tx: Conn::Postgres {
                                client: &mut *client,
                                statements: &mut *statements,
                            },
                            committed: Vec::new(),
                            power_limit: None,
                        };
                        run_job(job, tx, &mut replies, seconds)?;
                    }
                    client.batch_execute("COMMIT").ctx("committing")
                };
                let r = run();
                if r.is_err() {
                    // Nothing of a group that did not commit stays (the connection may be
                    // gone already, which ends the transaction too).
                    let _ = client.batch_execute("ROLLBACK");
                }
                r
            })();
            if let Err(StoreError::Sql { source, .. }) = &r {
                if source.connection_lost() {
                    w.lost();
                }
            }
            r
        }
    };
    // Jobs not reached (a failed savepoint statement) are dropped: their callers get an error.
    group.clear();
    let commit = outcome.map_err(|e| {
        tracing::error!(error = %e, "a group of transactions could not commit");
        e.to_string()
    });
    for reply in replies {
        reply(commit.clone());
    }
}

/// Runs one job in its savepoint: released if the job succeeded, rolled back if it failed or
/// panicked (a panic drops the job's reply sender, so its caller learns of it; the other
/// jobs of the group go on).
fn run_job(
    job: Job,
    mut tx: Tx<'_>,
    replies: &mut Vec<Reply>,
    seconds: &Histogram,
) -> Result<(), StoreError> {
    let began = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| (job.body)(&mut tx)));
    seconds.observe(began.elapsed().as_secs_f64());
    match outcome {
        Ok(Some(reply)) => {
            tx.tx.finish(true).ctx("releasing a savepoint")?;
            replies.push(reply);
        }
        Ok(None) | Err(_) => {
            tx.tx.finish(false).ctx("rolling back a savepoint")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::sql::params;
    use super::super::Store;
    use super::*;

    #[test]
    fn a_group_commits_the_good_and_rolls_back_only_the_bad() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&super::super::Database::Sqlite(dir.path().join("t.db"))).unwrap();
        group_semantics(store);
    }

    #[test]
    fn a_group_commits_the_good_and_rolls_back_only_the_bad_on_postgres() {
        let Some(url) = super::super::tests::postgres_database() else {
            return;
        };
        group_semantics(Store::open(&super::super::Database::Postgres(url)).unwrap());
    }

    #[test]
    fn after_commit_runs_only_for_a_transaction_that_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&super::super::Database::Sqlite(dir.path().join("t.db"))).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let r = ran.clone();
            store
                .tx(move |tx| {
                    tx.after_commit(move || {
                        r.fetch_add(1, Ordering::SeqCst);
                    });
                    Ok::<_, StoreError>(())
                })
                .await
                .unwrap();
            let r = ran.clone();
            let failed = store
                .tx(move |tx| {
                    tx.after_commit(move || {
                        r.fetch_add(10, Ordering::SeqCst);
                    });
                    Err::<(), _>(StoreError::Worker("refused".into()))
                })
                .await;
            assert!(failed.is_err());
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1, "only the committed one ran");
    }

    fn group_semantics(store: Store) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            store
                .tx(|tx| tx.tx.batch("CREATE TABLE scratch (n BIGINT)").ctx("test"))
                .await
                .unwrap();
            let mut all = Vec::new();
            for n in 0..200i64 {
                let s = store.clone();
                all.push(tokio::spawn(async move {
                    s.tx(move |tx| {
                        tx.tx
                            .exec("INSERT INTO scratch (n) VALUES (?1)", params![n])
                            .ctx("test")?;
                        match n % 10 {
                            // Fails after writing: its row must not stay.
                            3 => Err(StoreError::Worker("refused".into())),
                            // Panics after writing: its row must not stay either.
                            7 if n == 7 => panic!("a bug in one transaction"),
                            _ => Ok(n),
                        }
                    })
                    .await
                }));
            }
            let mut ok = 0;
            let mut failed = 0;
            for h in all {
                match h.await.unwrap() {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            assert_eq!((ok, failed), (179, 21));
            let rows: i64 = store
                .tx(|tx| {
                    tx.tx
                        .one("SELECT COUNT(*) FROM scratch", params![], |r| r.get(0))
                        .ctx("test")
                })
                .await
                .unwrap();
            assert_eq!(
                rows, 179,
                "exactly the rows of the transactions that succeeded"
            );
        });
    }
}
