//! The agent's side of the agent protocol: the long-poll loop, the heartbeat, and delivery of the
//! durable outbox. Failures back off exponentially with jitter (never a hot loop), and a change
//! of connectivity is logged once, not on every attempt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::backoff::Backoff;
use super::failover::Controllers;
use super::identity::IdentityState;
use super::store::Outbox;
use super::Input;
use crate::net::NetError;
use crate::proto::agent::{
    AgentEvent, EventBatch, EventBody, EventsApplied, Heartbeat, PollRequest, PollResponse,
    Progress,
};
use crate::proto::domain::ErrorCode;
use crate::proto::status::{IdentityPhase, LinkPhase};
use crate::sys::clock;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Outbox entries sent in one `POST /agent/v1/events` (the fleet simulator sends as many).
/// The controller applies them in one transaction, in order, each under its own key.
pub const EVENTS_PER_REQUEST: usize = 16;

#[derive(Debug, Default)]
struct LinkInner {
    connected: bool,
    reported: bool,
    last_contact: Option<OffsetDateTime>,
    last_error: Option<String>,
}

/// What the agent knows about its connection, shared by the loops and the status socket.
#[derive(Debug, Default)]
pub struct LinkState {
    inner: Mutex<LinkInner>,
}

impl LinkState {
    pub fn up(&self) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !i.connected {
            tracing::info!("connected to the controller");
        }
        i.connected = true;
        i.reported = true;
        i.last_contact = Some(clock::now());
        i.last_error = None;
    }

    pub fn down(&self, err: &NetError) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if i.connected || !i.reported {
            tracing::warn!(error = %err, "cannot reach the controller; retrying with backoff");
        }
        i.connected = false;
        i.reported = true;
        i.last_error = Some(err.to_string());
    }

    pub fn snapshot(&self) -> (bool, Option<OffsetDateTime>) {
        let i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (i.connected, i.last_contact)
    }

    /// `connecting` until the first answer or error (a first long poll may be open for
    /// its whole wait), then connected or unreachable; and the last error.
    pub fn phase(&self) -> (LinkPhase, Option<String>) {
        let i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let phase = match (i.connected, &i.last_error) {
            (true, _) => LinkPhase::Connected,
            (false, None) => LinkPhase::Connecting,
            (false, Some(_)) => LinkPhase::Unreachable,
        };
        (phase, i.last_error.clone())
    }
}

/// Everything the loops share.
pub struct Link {
    /// The controller replicas; requests go to the one in use.
    pub client: Controllers,
    pub identity: Arc<IdentityState>,
    /// Becomes `true` once a usable certificate is in place.
    pub ready: watch::Receiver<bool>,
    pub state: Arc<LinkState>,
    pub long_poll: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Becomes `true` once the first heartbeat was answered (or failed): the first poll
    /// follows it over the same connection, so a fleet that starts at once opens one
    /// connection per agent, not two.
    pub introduced: watch::Sender<bool>,
}

async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

/// Waits until the agent has a certificate; `true` if stopped first.
async fn wait_ready(link: &Link, stop: &mut watch::Receiver<bool>) -> bool {
    let mut ready = link.ready.clone();
    tokio::select! {
        r = ready.wait_for(|r| *r) => r.is_err(),
        _ = stop.changed() => true,
    }
}

/// How long an agent the controller refuses for its identity (a conflict, a revocation)
/// waits before asking again: slowly, it takes no work meanwhile.
fn refused_wait(link: &Link) -> Duration {
    (link.retry_max * 10).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// How long a poll that brought work waits for the outbox to empty before the next poll.
pub const DELIVER_BEFORE_POLLING: Duration = Duration::from_secs(1);

/// Long-polls for work, hands it to the core, and acknowledges what the core persisted in the
/// next poll. After a poll that brought work, the next one waits (up to
/// [`DELIVER_BEFORE_POLLING`]) for the outbox to empty: the events it produced at once (a
/// `STARTED`, the result of a quick script) then go out over the connection the poll just
/// freed, instead of a second connection (and handshake) per agent at the moment the whole
/// fleet reports at once.
pub async fn poll_loop(
    link: Arc<Link>,
    inputs: mpsc::Sender<Input>,
    outbox: Arc<Mutex<Outbox>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(link.retry_initial, link.retry_max);
    let (mut ack_a, mut ack_c) = (Vec::new(), Vec::new());
    if wait_ready(&link, &mut stop).await {
        return;
    }
    let mut identity_changed = link.identity.subscribe();
    let mut introduced = link.introduced.subscribe();
    tokio::select! {
        _ = introduced.wait_for(|i| *i) => {}
        _ = stop.changed() => return,
    }
    loop {
        let req = PollRequest {
            agent_version: AGENT_VERSION.into(),
            wait_ms: link.long_poll.as_millis() as u64,
            ack_assignments: ack_a.clone(),
            ack_cancels: ack_c.clone(),
        };
        let call = link.client.json::<_, PollResponse>(
            Method::POST,
            "/agent/v1/poll",
            Some(&req),
            link.long_poll + Duration::from_secs(15),
        );
        let res = tokio::select! {
            r = call => r,
            _ = stop.changed() => return,
        };
        match res {
            Ok(resp) => {
                link.state.up();
                link.identity.accepted();
                backoff.reset();
                ack_a.clear();
                ack_c.clear();
                if !resp.assignments.is_empty() {
                    let (tx, rx) = oneshot::channel();
                    if inputs
                        .send(Input::Offered(resp.assignments, tx))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    ack_a = rx.await.unwrap_or_default();
                }
                if !resp.cancels.is_empty() {
                    let (tx, rx) = oneshot::channel();
                    if inputs.send(Input::Cancels(resp.cancels, tx)).await.is_err() {
                        return;
                    }
                    ack_c = rx.await.unwrap_or_default();
                }
                if !ack_a.is_empty() || !ack_c.is_empty() {
                    let until = tokio::time::Instant::now() + DELIVER_BEFORE_POLLING;
                    while Outbox::pending_events(&outbox) > 0 && tokio::time::Instant::now() < until
                    {
                        if sleep_or_stop(Duration::from_millis(10), &mut stop).await {
                            return;
                        }
                    }
                }
            }
            Err(NetError::Status {
                status,
                error_code,
                error_msg,
                ..
            }) if refuses_identity(ErrorCode::from_stored(&error_code)) => {
                link.state.up();
                let phase = if status == 409 {
                    IdentityPhase::Conflict
                } else {
                    IdentityPhase::Revoked
                };
                link.identity
                    .refused(phase, format!("the controller takes no work from this identity: {error_code}: {error_msg}"));
                if phase == IdentityPhase::Conflict {
                    link.identity.request_reenroll();
                }
                identity_changed.borrow_and_update();
                tokio::select! {
                    _ = tokio::time::sleep(refused_wait(&link)) => {}
                    _ = identity_changed.changed() => {}
                    _ = stop.changed() => return,
                }
            }
            Err(e) => {
                let wait = link.client.retry_wait(&e, &mut backoff);
                link.state.down(&e);
                if sleep_or_stop(wait, &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// Sends host facts now and then; the poll keeps `last_seen` fresh in between.
pub async fn heartbeat_loop(
    link: Arc<Link>,
    every: Duration,
    state_dir: std::path::PathBuf,
    gpu: Option<bool>,
    outbox: Arc<Mutex<Outbox>>,
    mut stop: watch::Receiver<bool>,
) {
    if wait_ready(&link, &mut stop).await {
        return;
    }
    loop {
        let dir = state_dir.clone();
        let facts = tokio::task::spawn_blocking(move || {
            crate::sys::facts::gather(&dir, AGENT_VERSION, gpu)
        })
        .await
        .unwrap_or_default();
        let pending = Outbox::pending_events(&outbox);
        let hb = Heartbeat {
            agent_version: AGENT_VERSION.into(),
            facts,
            outbox: pending,
        };
        let res = link
            .client
            .json::<_, ()>(
                Method::POST,
                "/agent/v1/heartbeat",
                Some(&hb),
                Duration::from_secs(30),
            )
            .await;
        link.introduced.send_replace(true);
        let wait = match res {
            Ok(()) => {
                link.state.up();
                every
            }
            // Retry sooner so facts appear soon after the controller comes back.
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat failed");
                every.min(link.retry_max)
            }
        };
        if sleep_or_stop(wait, &mut stop).await {
            return;
        }
    }
}

/// Forwards staging progress to the controller: on change at most once a second, and the
/// latest again every 2 s while something is staging. Best effort, newest wins, so it does
/// not go through the outbox; `seq` is the send time in ms, which only grows.
pub async fn progress_loop(
    link: Arc<Link>,
    mut feed: super::ProgressFeed,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_sent = tokio::time::Instant::now();
    let mut dirty = false;
    if wait_ready(&link, &mut stop).await {
        return;
    }
    loop {
        // Idle (nothing staging): sleep until there is progress, not on a timer.
        let idle = feed.borrow().is_none();
        let tick = async {
            if idle {
                std::future::pending::<()>().await
            }
            tokio::time::sleep(Duration::from_millis(250)).await
        };
        tokio::select! {
            r = feed.changed() => {
                if r.is_err() { return; }
                dirty = true;
            }
            _ = tick => {}
            _ = stop.changed() => return,
        }
        let now = tokio::time::Instant::now();
        let since = now.duration_since(last_sent);
        let due = (dirty && since >= Duration::from_secs(1)) || since >= Duration::from_secs(2);
        let current = feed.borrow().clone();
        let Some((assignment_id, components)) = current else {
            dirty = false;
            continue;
        };
        if !due {
            continue;
        }
        dirty = false;
        last_sent = now;
        let seq = clock::unix_ms(clock::now()).max(0) as u64;
        let batch = EventBatch {
            events: vec![AgentEvent {
                idempotency_key: format!("{assignment_id}:progress:{seq}"),
                assignment_id,
                at: clock::now_rfc3339(),
                body: EventBody::Progress(Progress { seq, components }),
            }],
        };
        // Best effort with a short timeout: a slow answer here must not move the agent off
        // a replica the poll and the outbox reach, so it bypasses the failover's count.
        let res = link
            .client
            .current()
            .json::<_, EventsApplied>(
                Method::POST,
                "/agent/v1/events",
                Some(&batch),
                Duration::from_secs(5),
            )
            .await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "progress not delivered (the next report supersedes it)");
        }
    }
}

/// The codes by which the controller refuses this identity any work (not a failure of one
/// request): the agent stops asking for a while and says why.
/// Every other code is about one request (or unknown) and is retried with backoff.
fn refuses_identity(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::IdentityConflict | ErrorCode::CertRevoked | ErrorCode::MachineDecommissioned
    )
}

/// 4xx answers that will never change on retry: the event is moved aside, not resent forever.
fn permanent(status: u16) -> bool {
    matches!(status, 400 | 403 | 404 | 409 | 413 | 422)
}

/// Delivers the outbox in order, up to [`EVENTS_PER_REQUEST`] events per request, until each
/// is acknowledged. When the controller refuses a batch for good, its events are sent one by
/// one, so only the one it refuses is moved aside.
pub async fn deliver_loop(
    link: Arc<Link>,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(link.retry_initial, link.retry_max);
    if wait_ready(&link, &mut stop).await {
        return;
    }
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let pending = {
            let ob = outbox.lock().unwrap_or_else(|p| p.into_inner());
            ob.pending()
        };
        let pending = match pending {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                if sleep_or_stop(link.retry_max, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        if pending.is_empty() {
            tokio::select! {
                _ = &mut notified => continue,
                _ = stop.changed() => return,
            }
        }
        let mut single = false;
        let mut pending = std::collections::VecDeque::from(pending);
        while !pending.is_empty() {
            let n = if single {
                1
            } else {
                EVENTS_PER_REQUEST.min(pending.len())
            };
            let recs: Vec<_> = pending.iter().take(n).cloned().collect();
            let batch = EventBatch {
                events: recs.iter().map(|r| r.event.clone()).collect(),
            };
            let res = tokio::select! {
                r = link.client.json::<_, EventsApplied>(Method::POST, "/agent/v1/events", Some(&batch), Duration::from_secs(30)) => r,
                _ = stop.changed() => return,
            };
            let ob = || outbox.lock().unwrap_or_else(|p| p.into_inner());
            match res {
                Ok(_) => {
                    link.state.up();
                    backoff.reset();
                    for rec in &recs {
                        if let Err(e) = ob().remove(rec.seq) {
                            tracing::error!(error = %e, "cannot remove a delivered event");
                        }
                    }
                    pending.drain(..n);
                }
                Err(NetError::Status { status, .. }) if permanent(status) && n > 1 => {
                    // One of them is refused: find it by sending them one at a time.
                    link.state.up();
                    single = true;
                }
                Err(NetError::Status {
                    status,
                    ref error_code,
                    ref error_msg,
                    ..
                }) if permanent(status) => {
                    link.state.up();
                    let rec = &recs[0];
                    let kept = ob().reject(rec.seq);
                    tracing::error!(
                        key = %rec.event.idempotency_key,
                        status, error_code, error_msg,
                        kept_at = ?kept.as_ref().ok(),
                        "the controller refused an event for good; it was moved aside"
                    );
                    pending.pop_front();
                }
                Err(e) => {
                    let wait = link.client.retry_wait(&e, &mut backoff);
                    link.state.down(&e);
                    if sleep_or_stop(wait, &mut stop).await {
                        return;
                    }
                    break;
                }
            }
        }
    }
}
