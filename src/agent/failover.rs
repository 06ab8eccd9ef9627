//! Which controller replica the agent talks to (`controller_urls`): the first one to start
//! with, the next one (round robin) when a request cannot reach the current one, and the one
//! that answers for as long as it answers. [`Endpoints`] is the pure choice (no I/O, tested
//! alone); [`Controllers`] is the agent's client over it: one [`HttpsClient`] per URL (each
//! its own TLS server name and kept-alive connections), the requests going to the current
//! one and their outcome fed back.
//!
//! Only a failure to reach a replica moves the agent on: connect refused or timed out, a
//! failed TLS handshake, a reset connection, no answer in time, or a 502/503/504 from
//! whatever stands in front of it. An answer, even a refusal, proves the replica alive, and
//! a controller that sheds load (`NetError::Busy`, 503 with `Retry-After`) is alive too: the
//! agent waits what it asked for and stays. Moving within a round waits a short jitter (a
//! fleet that lost one replica spreads over the next instead of arriving in one instant);
//! once every URL failed in a row, the agent's usual exponential backoff with jitter is
//! waited before the next round, so 10,000 agents never spin on a dead fleet.
//!
//! Nothing else changes on a move: events carry idempotency keys, so a batch whose answer
//! was lost on one replica and is sent again to another is applied once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, Method};

use super::backoff::Backoff;
use crate::net::client::HttpsClient;
use crate::net::NetError;

/// The URL a request went to, and which choice it was made under: a failure seen after the
/// agent already moved on (another loop's request failed first) must not move it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    epoch: u64,
}

/// The choice of controller URL: pure, the caller passes the time.
pub struct Endpoints {
    urls: Vec<String>,
    current: usize,
    /// Bumped at every failure counted, so stale outcomes are recognised ([`Pick`]).
    epoch: u64,
    /// Consecutive failures since the last answer; each multiple of `urls.len()` ends a
    /// full round of failures.
    failures: u64,
    /// Grows only between full rounds; reset by an answer.
    backoff: Backoff,
    /// Upper bound of the jitter waited when moving on within a round.
    step: Duration,
    /// When the agent may ask again, shared by all its loops (the last delay handed out).
    retry_at: Option<Instant>,
}

impl Endpoints {
    /// `urls` must not be empty (the config guarantees it). `initial` and `max` are the
    /// agent's `connection.retry_initial_ms` and `retry_max_ms`.
    pub fn new(urls: Vec<String>, initial: Duration, max: Duration) -> Self {
        assert!(!urls.is_empty(), "at least one controller URL");
        Endpoints {
            urls,
            current: 0,
            epoch: 0,
            failures: 0,
            backoff: Backoff::new(initial, max),
            step: initial,
            retry_at: None,
        }
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn current_url(&self) -> &str {
        &self.urls[self.current]
    }

    /// Where the next request goes.
    pub fn pick(&self) -> Pick {
        Pick {
            index: self.current,
            epoch: self.epoch,
        }
    }

    /// The replica answered: stay on it, and start the next failure's count from nothing.
    /// A late answer from a replica already left changes nothing (no flapping back).
    pub fn on_success(&mut self, pick: Pick) {
        if pick.epoch != self.epoch {
            return;
        }
        self.failures = 0;
        self.backoff.reset();
        self.retry_at = None;
    }

    /// The replica could not be reached: move to the next URL and return how long to wait
    /// before the next request: a jitter up to `initial` within a round, the exponential
    /// backoff once a full round failed. A failure under a choice already superseded moves
    /// nothing and returns what is left of the wait already handed out.
    pub fn on_failure(&mut self, pick: Pick, now: Instant) -> Duration {
        if pick.epoch != self.epoch {
            return self.wait(now);
        }
        self.epoch += 1;
        self.failures += 1;
        self.current = (self.current + 1) % self.urls.len();
        let delay = if self.failures % self.urls.len() as u64 == 0 {
            self.backoff.next_delay()
        } else {
            Duration::from_millis(fastrand::u64(0..=self.step.as_millis() as u64))
        };
        self.retry_at = Some(now + delay);
        delay
    }

    /// What is left of the last wait handed out.
    pub fn wait(&self, now: Instant) -> Duration {
        self.retry_at
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
    }
}

/// How a failed request bears on the replica it went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The replica answered (an error of that one request, or load shedding): stay.
    Answered,
    /// The replica could not be reached: move on.
    Unreachable,
    /// Nothing left the agent (a bad URL, a body that cannot be encoded): says nothing.
    NotSent,
}

pub fn outcome(e: &NetError) -> Outcome {
    match e {
        NetError::Connect { .. }
        | NetError::Tls { .. }
        | NetError::Http { .. }
        | NetError::Timeout { .. } => Outcome::Unreachable,
        // A proxy or load balancer in front of a replica that is gone (a controller's own
        // shedding carries Retry-After and is `Busy`).
        NetError::Status {
            status: 502..=504, ..
        } => Outcome::Unreachable,
        NetError::Status { .. } | NetError::Busy { .. } | NetError::Decode { .. } => {
            Outcome::Answered
        }
        NetError::BadUrl { .. } | NetError::Encode { .. } => Outcome::NotSent,
    }
}

/// The agent's client: the controller replicas of `controller_urls`, one in use at a time.
/// Clones share the clients and the choice.
#[derive(Clone)]
pub struct Controllers {
    /// One per URL, in the order of [`Endpoints::urls`].
    clients: Arc<Vec<HttpsClient>>,
    endpoints: Arc<Mutex<Endpoints>>,
}

impl std::fmt::Debug for Controllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controllers")
            .field("current", &self.current_url())
            .finish()
    }
}

impl Controllers {
    /// A client per URL, made at start so a bad URL fails the start, not a later request.
    pub fn new(
        urls: &[String],
        tls: Arc<rustls::ClientConfig>,
        retry_initial: Duration,
        retry_max: Duration,
    ) -> Result<Self, NetError> {
        let clients = Self::clients(urls, tls)?;
        Ok(Controllers {
            clients: Arc::new(clients),
            endpoints: Arc::new(Mutex::new(Endpoints::new(
                urls.to_vec(),
                retry_initial,
                retry_max,
            ))),
        })
    }

    fn clients(
        urls: &[String],
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Vec<HttpsClient>, NetError> {
        urls.iter()
            .map(|u| HttpsClient::new(u, tls.clone()))
            .collect()
    }

    /// Clients for the same URLs with another TLS config (enrollment, without a
    /// certificate) and no extra headers, sharing the choice: a replica found dead while
    /// enrolling is not tried first again by the poll.
    pub fn sibling(&self, tls: Arc<rustls::ClientConfig>) -> Result<Self, NetError> {
        let urls = self.lock().urls().to_vec();
        Ok(Controllers {
            clients: Arc::new(Self::clients(&urls, tls)?),
            endpoints: self.endpoints.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Endpoints> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every client sends `name: value` with every request.
    pub fn with_header(self, name: header::HeaderName, value: String) -> Self {
        let clients = self
            .clients
            .iter()
            .map(|c| c.clone().with_header(name.clone(), value.clone()))
            .collect();
        Controllers {
            clients: Arc::new(clients),
            endpoints: self.endpoints,
        }
    }

    /// A renewed or newly enrolled certificate, for every replica's client.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        for c in self.clients.iter() {
            c.set_tls(tls.clone());
        }
    }

    /// The URL in use now.
    pub fn current_url(&self) -> String {
        self.lock().current_url().to_string()
    }

    pub fn urls(&self) -> Vec<String> {
        self.lock().urls().to_vec()
    }

    /// The client of the URL in use, for requests whose failures should not move the agent
    /// (best-effort progress, payload downloads that resume on their own).
    pub fn current(&self) -> HttpsClient {
        let i = self.lock().pick().index;
        self.clients[i].clone()
    }

    /// A JSON call to the replica in use ([`HttpsClient::json`]); its outcome decides
    /// whether the agent stays on it.
    pub async fn json<T, R>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
        timeout: Duration,
    ) -> Result<R, NetError>
    where
        T: serde::Serialize + ?Sized,
        R: serde::de::DeserializeOwned,
    {
        let pick = self.lock().pick();
        let res = self.clients[pick.index]
            .json(method, path, body, timeout)
            .await;
        self.record(pick, res.as_ref().err());
        res
    }

    fn record(&self, pick: Pick, err: Option<&NetError>) {
        let mut ep = self.lock();
        match err.map(outcome) {
            None | Some(Outcome::Answered) => ep.on_success(pick),
            Some(Outcome::NotSent) => {}
            Some(Outcome::Unreachable) => {
                let from = ep.current_url().to_string();
                let stale = pick != ep.pick();
                let delay = ep.on_failure(pick, Instant::now());
                if !stale && ep.urls().len() > 1 {
                    tracing::warn!(
                        from = %from,
                        to = %ep.current_url(),
                        after = ?delay,
                        error = %err.map(|e| e.to_string()).unwrap_or_default(),
                        "controller unreachable; failing over"
                    );
                }
            }
        }
    }

    /// How long a loop waits after `e` before its next request: what a shedding controller
    /// asked for; for an unreachable replica, the wait [`Endpoints`] handed out (shared by
    /// every loop); for any other error, the loop's own `backoff`.
    pub fn retry_wait(&self, e: &NetError, backoff: &mut Backoff) -> Duration {
        if let Some(w) = busy_wait(e) {
            return w;
        }
        match outcome(e) {
            Outcome::Unreachable => self.lock().wait(Instant::now()),
            Outcome::Answered | Outcome::NotSent => backoff.next_delay(),
        }
    }
}

/// How long to wait when the controller sheds load (503 with `Retry-After`): what it asked
/// for, spread by up to half again so a shed fleet does not come back in one instant.
pub fn busy_wait(e: &NetError) -> Option<Duration> {
    match e {
        NetError::Busy { retry_after, .. } => {
            Some(retry_after.mul_f64(1.0 + fastrand::f64() / 2.0))
        }
        NetError::BadUrl { .. }
        | NetError::Connect { .. }
        | NetError::Tls { .. }
        | NetError::Http { .. }
        | NetError::Timeout { .. }
        | NetError::Status { .. }
        | NetError::Decode { .. }
        | NetError::Encode { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn three() -> Endpoints {
        Endpoints::new(
            vec!["https://a".into(), "https://b".into(), "https://c".into()],
            100 * MS,
            800 * MS,
        )
    }

    #[test]
    fn starts_on_the_first_and_moves_round_robin_on_failure() {
        let mut e = three();
        let now = Instant::now();
        assert_eq!(e.current_url(), "https://a");
        e.on_failure(e.pick(), now);
        assert_eq!(e.current_url(), "https://b");
        e.on_failure(e.pick(), now);
        assert_eq!(e.current_url(), "https://c");
        e.on_failure(e.pick(), now);
        assert_eq!(e.current_url(), "https://a", "round robin wraps around");
    }

    #[test]
    fn stays_on_a_url_that_answers_without_flapping_back() {
        let mut e = three();
        let now = Instant::now();
        e.on_failure(e.pick(), now);
        for _ in 0..5 {
            e.on_success(e.pick());
            assert_eq!(e.current_url(), "https://b");
        }
        // The next failure moves on to c, not back to the first URL.
        e.on_failure(e.pick(), now);
        assert_eq!(e.current_url(), "https://c");
    }

    #[test]
    fn a_stale_outcome_moves_nothing() {
        let mut e = three();
        let now = Instant::now();
        // Two loops sent to a at once; both fail.
        let (p1, p2) = (e.pick(), e.pick());
        let d = e.on_failure(p1, now);
        let again = e.on_failure(p2, now);
        assert_eq!(e.current_url(), "https://b", "one failure of a, one move");
        assert_eq!(
            again, d,
            "the second loop waits what is left of the first wait"
        );
        // A late answer from a does not bring the agent back to it.
        e.on_success(p1);
        assert_eq!(e.current_url(), "https://b");
        assert_eq!(e.failures, 1, "nor does it reset the count of the round");
    }

    #[test]
    fn jitter_within_a_round_and_backoff_between_rounds() {
        let now = Instant::now();
        for _ in 0..200 {
            let mut e = three();
            for round in 0..5u32 {
                // Within a round: a jitter in [0, initial].
                for _ in 0..2 {
                    let d = e.on_failure(e.pick(), now);
                    assert!(d <= 100 * MS, "round {round}: in-round wait {d:?}");
                }
                // The round's last failure: equal-jitter backoff, doubling up to the cap.
                let base = (100 * MS * 2u32.pow(round)).min(800 * MS);
                let d = e.on_failure(e.pick(), now);
                assert!(
                    d >= base / 2 && d <= base,
                    "round {round}: {d:?} not within [{:?}, {base:?}]",
                    base / 2
                );
                assert_eq!(e.current_url(), "https://a");
            }
            // An answer resets the backoff.
            e.on_success(e.pick());
            e.on_failure(e.pick(), now);
            e.on_failure(e.pick(), now);
            let d = e.on_failure(e.pick(), now);
            assert!(d >= 50 * MS && d <= 100 * MS, "after a reset: {d:?}");
        }
    }

    #[test]
    fn jitter_spreads_the_fleet() {
        let now = Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut e = three();
            seen.insert(e.on_failure(e.pick(), now));
        }
        assert!(
            seen.len() > 10,
            "agents moving on at once wait alike: {seen:?}"
        );
    }

    #[test]
    fn the_wait_is_shared_and_runs_out() {
        let mut e = three();
        let now = Instant::now();
        assert_eq!(e.wait(now), Duration::ZERO, "no failure, no wait");
        e.on_failure(e.pick(), now);
        e.on_failure(e.pick(), now);
        let d = e.on_failure(e.pick(), now);
        assert_eq!(e.wait(now), d);
        assert_eq!(e.wait(now + d / 2), d - d / 2);
        assert_eq!(e.wait(now + d + MS), Duration::ZERO);
        e.on_success(e.pick());
        assert_eq!(e.wait(now), Duration::ZERO);
    }

    #[test]
    fn one_url_backs_off_on_every_failure() {
        let mut e = Endpoints::new(vec!["https://a".into()], 100 * MS, 800 * MS);
        let now = Instant::now();
        for i in 0..5u32 {
            let base = (100 * MS * 2u32.pow(i)).min(800 * MS);
            let d = e.on_failure(e.pick(), now);
            assert!(d >= base / 2 && d <= base, "{i}: {d:?}");
            assert_eq!(e.current_url(), "https://a");
        }
    }

    #[test]
    fn only_failures_to_reach_a_replica_move_the_agent() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = |status| NetError::Status {
            url: "u".into(),
            status,
            error_code: "X".into(),
            error_msg: String::new(),
        };
        for e in [
            NetError::Connect {
                url: "u".into(),
                source: io(),
            },
            NetError::Tls {
                url: "u".into(),
                source: io(),
            },
            NetError::Http {
                url: "u".into(),
                reason: "connection reset".into(),
            },
            NetError::Timeout {
                url: "u".into(),
                after: MS,
            },
            status(502),
            status(503),
            status(504),
        ] {
            assert_eq!(outcome(&e), Outcome::Unreachable, "{e}");
        }
        for e in [
            NetError::Busy {
                url: "u".into(),
                retry_after: MS,
            },
            status(500),
            status(409),
            NetError::Decode {
                url: "u".into(),
                reason: String::new(),
            },
        ] {
            assert_eq!(outcome(&e), Outcome::Answered, "{e}");
        }
        assert_eq!(
            outcome(&NetError::BadUrl {
                url: "u".into(),
                reason: String::new()
            }),
            Outcome::NotSent
        );
    }

    #[test]
    fn a_shed_agent_waits_what_it_was_told_spread_by_up_to_half_again() {
        let busy = NetError::Busy {
            url: "https://c/agent/v1/poll".into(),
            retry_after: Duration::from_secs(2),
        };
        for _ in 0..100 {
            let w = busy_wait(&busy).expect("a 503 with Retry-After is waited out");
            assert!(
                w >= Duration::from_secs(2) && w <= Duration::from_secs(3),
                "{w:?}"
            );
        }
        let refused = NetError::Status {
            url: "u".into(),
            status: 503,
            error_code: "ENROLLMENT_DISABLED".into(),
            error_msg: String::new(),
        };
        assert_eq!(
            busy_wait(&refused),
            None,
            "no Retry-After: the normal backoff"
        );
    }
}
