//! The controller's background loops: resuming tasks at start, the push schedule, the
//! unreachable-machine reaper, revocation reloads, blob collection and the pruning of
//! finished tasks past their retention.

use std::sync::Arc;
use std::time::Duration;

use super::{engine, images, progress, store, Controller};
use crate::sys::clock;

pub(super) async fn resume_tasks(ctl: &Controller) -> Result<(), store::StoreError> {
    let now = clock::unix_ms(clock::now());
    let wake = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            for t in tx.unfinished_tasks()? {
                engine::advance(tx, &t, now, &mut wake)?;
            }
            Ok::<_, store::StoreError>(wake)
        })
        .await?;
    ctl.wake(&wake);
    Ok(())
}

/// How often scheduled pushes are checked for their start time.
const SCHEDULE_EVERY: Duration = Duration::from_millis(250);

/// Starts scheduled image pushes when their start time comes.
pub(super) async fn schedule_loop(ctl: Arc<Controller>) {
    let mut tick = tokio::time::interval(SCHEDULE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::unix_ms(clock::now());
        let res = ctl
            .store
            .tx(move |tx| {
                let mut wake = Vec::new();
                images::tick(tx, now, &mut wake)?;
                Ok::<_, store::StoreError>(wake)
            })
            .await;
        match res {
            Ok(wake) => ctl.wake(&wake),
            Err(e) => tracing::error!(error = %e, "image scheduler failed; retrying"),
        }
    }
}

/// Removes blobs nothing refers to once they are older than `blob_retention_seconds`.
pub(super) async fn blob_gc_loop(ctl: Arc<Controller>) {
    let every =
        (ctl.cfg.blobs.retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let referenced = match ctl.referenced_blobs().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e.msg, "blob collection cannot read references; retrying");
                continue;
            }
        };
        for (sha, size) in ctl.blobs.expired(&referenced) {
            match ctl.blobs.remove(&sha) {
                Ok(_) => tracing::info!(sha256 = %sha, size, "removed a blob nothing refers to"),
                Err(e) => tracing::warn!(sha256 = %sha, error = %e.msg, "cannot remove a blob"),
            }
        }
    }
}

/// Reloads revocations every second, so one made through another controller sharing the
/// database holds here within a second too.
pub(super) async fn revocation_loop(ctl: Arc<Controller>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = ctl.revoked.refresh(&ctl.store).await {
            tracing::error!(error = %e, "cannot reload revocations; retrying");
        }
    }
}

/// The `settings` key of the reaper's last round, and the least time between two rounds.
/// The tick is a second; 800 ms lets a lone controller's round start up to 200 ms late
/// without losing it (and a lost round only puts the next one a second later), while
/// replicas ticking out of phase still make at most 1.25 rounds a second together.
const REAPER_ROUND: &str = "reaper_round_ms";
const REAPER_GAP_MS: i64 = 800;

/// Declares machines silent past their deadlines unreachable, once a second (one replica's
/// round each second), and lets tasks waiting for a power slot go on.
pub(super) async fn reap_loop(ctl: Arc<Controller>) {
    let grace = ctl.cfg.unreachable_grace;
    tokio::time::sleep(grace.max(ctl.cfg.offline_after)).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::unix_ms(clock::now());
        let (grace_ms, offline_ms, reboot_ms) = (
            grace.as_millis() as i64,
            ctl.cfg.offline_after.as_millis() as i64,
            ctl.cfg.reboot_grace.as_millis() as i64,
        );
        let res = ctl
            .store
            .tx(move |tx| {
                let mut wake = Vec::new();
                // One round a second for the whole fleet, whichever replica takes it: the
                // scan reads every machine at work, so N replicas must not do it N times.
                if !tx.claim_round(REAPER_ROUND, now, REAPER_GAP_MS)? {
                    return Ok((0, wake));
                }
                let n = progress::reap(tx, now, grace_ms, offline_ms, reboot_ms, &mut wake)?;
                // A safety net for the power limits: tasks waiting for a slot that no ending
                // reached (more waiting than one ending looks at, a limit changed on another
                // replica's config) go on within a second.
                engine::release_power(tx, engine::POWER_WAITERS_PER_TICK, now, &mut wake)?;
                Ok::<_, store::StoreError>((n, wake))
            })
            .await;
        match res {
            Ok((n, wake)) => {
                ctl.metrics.unreachable(n);
                if n > 0 {
                    tracing::warn!(machines = n, "declared silent machines unreachable");
                }
                ctl.wake(&wake);
            }
            Err(e) => tracing::error!(error = %e, "reaper failed; retrying"),
        }
    }
}

/// Finished tasks looked at per pruning round, and machines removed per transaction: every
/// transaction holds the one write lock, so a large task goes a chunk at a time.
const PRUNE_TASKS_PER_ROUND: usize = 100;
pub const PRUNE_CHUNK: usize = 1000;

/// Removes finished tasks older than `task_retention_seconds`, the oldest first.
pub(super) async fn prune_loop(ctl: Arc<Controller>, retention: Duration) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock::unix_ms(clock::now());
        match prune(&ctl.store, now - retention.as_millis() as i64).await {
            Ok(0) => {}
            Ok(n) => {
                ctl.metrics.pruned(n);
                tracing::info!(
                    tasks = n,
                    retention_seconds = retention.as_secs(),
                    "pruned finished tasks past their retention"
                );
            }
            Err(e) => tracing::error!(error = %e, "pruning finished tasks failed; retrying"),
        }
    }
}

/// One round: up to [`PRUNE_TASKS_PER_ROUND`] tasks that finished before `cutoff_ms`; how
/// many were removed. Harmless on several replicas at once: each chunk re-checks its task.
pub async fn prune(store: &store::Store, cutoff_ms: i64) -> Result<usize, store::StoreError> {
    let tasks = store
        .tx(move |tx| tx.prunable_tasks(cutoff_ms, PRUNE_TASKS_PER_ROUND))
        .await?;
    let mut removed = 0;
    for task in tasks {
        loop {
            let id = task.clone();
            let (machines, gone) = store
                .tx(move |tx| {
                    let n = tx.prune_task_machines(&id, cutoff_ms, PRUNE_CHUNK)?;
                    // The last chunk takes the task row with it.
                    let gone = n < PRUNE_CHUNK && tx.prune_task_row(&id, cutoff_ms)?;
                    Ok::<_, store::StoreError>((n, gone))
                })
                .await?;
            if gone {
                removed += 1;
                tracing::debug!(task_id = %task, "pruned a finished task");
            }
            if machines < PRUNE_CHUNK {
                break;
            }
        }
    }
    Ok(removed)
}
