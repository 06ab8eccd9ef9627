//! The logoff step before a power step or `pre_start: logoff`, under the task's policy
//! (seed 000): WAIT_FOR_LOGOFF waits for users to leave, FORCE_LOGOFF warns them, waits the
//! grace period, and ends their sessions.

use std::time::Duration;

use time::OffsetDateTime;

use super::codes::Failure;
use crate::proto::agent::PowerSpec;
use crate::proto::domain::{ErrorCode, LogoffPolicy};
use crate::proto::status::WaitingStatus;
use crate::sys::clock;
use crate::sys::sessions::{self, Session, SessionSource};

/// WAIT_FOR_LOGOFF re-checks this often (the seed asks for at least every 5 s).
const RECHECK: Duration = Duration::from_secs(1);

async fn list(src: &SessionSource) -> Vec<Session> {
    let src = src.clone();
    tokio::task::spawn_blocking(move || sessions::list(&src))
        .await
        .unwrap_or_default()
}

fn names(v: &[Session]) -> String {
    v.iter()
        .map(Session::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

fn until(since: OffsetDateTime, secs: u64) -> Option<String> {
    Some(clock::rfc3339(since + Duration::from_secs(secs)))
}

/// Runs the step; `waiting` is told what the agent waits for (shown by `fieldhand status`).
pub async fn run(
    src: &SessionSource,
    spec: &PowerSpec,
    task_id: &str,
    waiting: &(dyn Fn(Option<WaitingStatus>) + Send + Sync),
) -> Result<(), Failure> {
    let since = clock::now();
    let result = if spec.logoff_policy == LogoffPolicy::ForceLogoff {
        force(src, spec, task_id, since, waiting).await
    } else {
        wait(src, spec, since, waiting).await
    };
    waiting(None);
    result
}

async fn wait(
    src: &SessionSource,
    spec: &PowerSpec,
    since: OffsetDateTime,
    waiting: &(dyn Fn(Option<WaitingStatus>) + Send + Sync),
) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.logoff_timeout_seconds);
    loop {
        let now = list(src).await;
        if now.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::new(
                ErrorCode::WaitForLogoffTimeout,
                format!(
                    "users were still logged in after logoff_timeout_seconds {} (WAIT_FOR_LOGOFF): {}",
                    spec.logoff_timeout_seconds,
                    names(&now)
                ),
            ));
        }
        waiting(Some(WaitingStatus {
            what: format!("users to log off (WAIT_FOR_LOGOFF): {}", names(&now)),
            since: clock::rfc3339(since),
            until: until(since, spec.logoff_timeout_seconds),
        }));
        tokio::time::sleep(RECHECK).await;
    }
}

async fn force(
    src: &SessionSource,
    spec: &PowerSpec,
    task_id: &str,
    since: OffsetDateTime,
    waiting: &(dyn Fn(Option<WaitingStatus>) + Send + Sync),
) -> Result<(), Failure> {
    let first = list(src).await;
    if first.is_empty() {
        return Ok(());
    }
    let grace = spec.force_logoff_grace_seconds;
    let warn_all = |sessions: Vec<Session>, msg: String| {
        let src = src.clone();
        tokio::task::spawn_blocking(move || {
            for s in &sessions {
                sessions::warn(&src, s, &msg);
            }
        })
    };
    let _ = warn_all(
        first.clone(),
        format!(
            "fieldhand task {task_id}: you will be logged off in {grace} seconds for maintenance. Save your work now."
        ),
    )
    .await;
    waiting(Some(WaitingStatus {
        what: format!(
            "the grace period before a forced logoff (FORCE_LOGOFF): {}",
            names(&first)
        ),
        since: clock::rfc3339(since),
        until: until(since, grace),
    }));
    if grace > 60 {
        tokio::time::sleep(Duration::from_secs(grace - 60)).await;
        let still = list(src).await;
        let _ = warn_all(
            still,
            format!("fieldhand task {task_id}: you will be logged off in 1 minute."),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    } else {
        tokio::time::sleep(Duration::from_secs(grace)).await;
    }
    let remaining = list(src).await;
    let _ = tokio::task::spawn_blocking(move || {
        for s in &remaining {
            sessions::terminate(s);
        }
    })
    .await;
    for _ in 0..20 {
        let left = list(src).await;
        if left.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let left = list(src).await;
    Err(Failure::new(
        ErrorCode::ForceLogoffFailed,
        format!("sessions survived a forced logoff: {}", names(&left)),
    ))
}
