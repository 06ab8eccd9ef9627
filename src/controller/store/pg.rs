//! PostgreSQL, for several controller replicas on one database: the writer's connection
//! (reconnected when the server goes away), the lock that applies the replicas'
//! transactions one group at a time, and the LISTEN connection that carries long-poll
//! wake-ups between replicas.
//!
//! Why one lock: the engine was written against SQLite, where transactions never overlap,
//! and its rules (an assignment handed out once, a result applied once, a batch advanced
//! once, a schedule fired once) are read-then-write inside one transaction. Taking one
//! advisory lock per group keeps exactly those semantics across replicas, whatever they
//! race on; groups (up to 256 transactions, one commit) keep the lock's cost per
//! transaction small. It bounds write throughput to one database, not one replica.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;

use super::sql::{PgStatements, SqlResult};

/// The advisory lock every transaction group and every migration takes first.
pub const WRITE_LOCK: i64 = 0x6669_656c_6468; // "fieldh"

/// The channel wake-ups travel on; the payload is `replica|machine,machine,...`.
pub const WAKE_CHANNEL: &str = "fieldhand_wake";

/// `NOTIFY` payloads stay under PostgreSQL's 8,000-byte limit.
pub const WAKE_PAYLOAD_MAX: usize = 7_000;

pub fn connect(url: &str) -> SqlResult<postgres::Client> {
    let mut cfg: postgres::Config = url.parse()?;
    cfg.application_name("fieldhand-controller")
        .connect_timeout(Duration::from_secs(10));
    let mut client = cfg.connect(postgres::NoTls)?;
    // A statement that waits this long on a lock is a stuck replica's, not a busy one's.
    client.batch_execute(
        "SET lock_timeout = '60s'; SET idle_in_transaction_session_timeout = '60s'",
    )?;
    Ok(client)
}

/// The writer thread's connection and its prepared statements.
pub struct Writer {
    url: String,
    client: Option<postgres::Client>,
    statements: PgStatements,
}

impl Writer {
    pub fn new(url: String, client: postgres::Client) -> Self {
        Writer {
            url,
            client: Some(client),
            statements: PgStatements::default(),
        }
    }

    /// The connection (connected again if it was lost) and its statements.
    pub fn parts(&mut self) -> SqlResult<(&mut postgres::Client, &mut PgStatements)> {
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => self.client.insert(c),
            _ => {
                // Statements belong to the connection they were prepared on.
                self.statements = PgStatements::default();
                let c = connect(&self.url)?;
                tracing::info!("database connection established again");
                self.client.insert(c)
            }
        };
        Ok((client, &mut self.statements))
    }

    /// Drops the connection after it failed, so the next group connects again.
    pub fn lost(&mut self) {
        self.client = None;
    }
}

/// What a wake-up names.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// The listener (re)connected and may have missed notifications: wake every poll.
    All,
    Machines(Vec<String>),
}

/// Payloads for `machines`, each under the size limit: `replica|m1,m2`.
pub fn wake_payloads(replica: &str, machines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = format!("{replica}|");
    let empty = cur.len();
    for m in machines {
        if cur.len() > empty && cur.len() + m.len() + 1 > WAKE_PAYLOAD_MAX {
            out.push(std::mem::replace(&mut cur, format!("{replica}|")));
        }
        if cur.len() > empty {
            cur.push(',');
        }
        cur.push_str(m);
    }
    if cur.len() > empty {
        out.push(cur);
    }
    out
}

/// The machines of a payload, unless this replica sent it (it woke its own polls already).
pub fn parse_wake(replica: &str, payload: &str) -> Option<Vec<String>> {
    let (from, list) = payload.split_once('|')?;
    if from == replica {
        return None;
    }
    Some(
        list.split(',')
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect(),
    )
}

/// Listens for wake-ups on its own connection, in its own thread, until `on` returns false.
/// Reconnects after a failure (then reports [`Wake::All`]).
pub fn listen(url: String, replica: String, on: impl Fn(Wake) -> bool + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("fieldhand-listen".into())
        .spawn(move || loop {
            let mut client = match connect(&url) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to listen for wake-ups; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            if let Err(e) = client.batch_execute(&format!("LISTEN {WAKE_CHANNEL}")) {
                tracing::warn!(error = %e, "cannot LISTEN for wake-ups; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            if !on(Wake::All) {
                return;
            }
            'conn: loop {
                {
                    let mut notes = client.notifications();
                    // Returns `None` after a second without notifications, or when the
                    // connection closed (told apart below).
                    let mut it = notes.timeout_iter(Duration::from_secs(1));
                    loop {
                        match it.next() {
                            Ok(Some(n)) => {
                                if let Some(m) = parse_wake(&replica, n.payload()) {
                                    if !on(Wake::Machines(m)) {
                                        return;
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "wake-up listener failed");
                                break 'conn;
                            }
                        }
                    }
                }
                if client.is_closed() {
                    break;
                }
                // A quiet second: is the listener still wanted?
                if !on(Wake::Machines(Vec::new())) {
                    return;
                }
            }
            tracing::warn!("the wake-up connection closed; reconnecting");
            std::thread::sleep(Duration::from_millis(200));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the wake-up listener");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_payloads_stay_under_the_limit_and_skip_their_own_replica() {
        let machines: Vec<String> = (0..1000).map(|i| format!("machine-{i:05}")).collect();
        let payloads = wake_payloads("r1", &machines);
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() <= WAKE_PAYLOAD_MAX));
        let back: Vec<String> = payloads
            .iter()
            .flat_map(|p| parse_wake("r2", p).unwrap())
            .collect();
        assert_eq!(back, machines);
        assert_eq!(parse_wake("r1", &payloads[0]), None);
        assert!(wake_payloads("r1", &[]).is_empty());
    }
}
