//! What operators watch: a pool's provisioning status (seed 001) and each machine's images.

use super::*;
use crate::controller::errors::ApiError;
use crate::controller::store::{MachineImageRow, StoreError, Tx};
use crate::controller::Controller;
use crate::proto::agent::ComponentProgress;
use crate::proto::api;
use crate::proto::domain::{ComponentPhase, ErrorCode, MachineState, PendingImageState};

/// Percent of bytes staged, from an image stage task's machine rows.
pub(super) fn percent(machines: &[crate::controller::store::TaskMachineRow]) -> Option<u32> {
    let (mut done, mut total) = (0u128, 0u128);
    for m in machines {
        let comps: Vec<ComponentProgress> = m
            .progress_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        // Past the download (verifying, extracting: their byte counts start again from 0),
        // a component counts as fully downloaded, so the percentage never goes back.
        let (d, t) = comps.iter().fold((0u64, 0u64), |(d, t), c| {
            let done = match c.phase {
                ComponentPhase::Pending | ComponentPhase::Downloading => c.bytes_done,
                ComponentPhase::Verifying | ComponentPhase::Extracting | ComponentPhase::Staged => {
                    c.bytes_total
                }
            };
            (d + done, t + c.bytes_total)
        });
        if m.state == MachineState::Succeeded {
            done += 100;
        } else if t > 0 {
            done += u128::from(d.min(t)) * 100 / u128::from(t);
        }
        total += 100;
    }
    (total > 0).then(|| (done * 100 / total) as u32)
}

/// `GET /v1/pools/{pool_id}/provisioning-status` (seed 001).
pub async fn provisioning_status(
    ctl: &Controller,
    pool_id: String,
) -> Result<api::ProvisioningStatus, ApiError> {
    check_pool(&pool_id)?;
    Ok(ctl
        .store
        .read(move |tx| provisioning_in(tx, &pool_id))
        .await?)
}

/// A pool's provisioning status (seed 001), inside a transaction: what
/// `provisioning-status` answers and what the pool views show.
pub fn provisioning_in(
    tx: &mut Tx<'_>,
    pool_id: &str,
) -> Result<api::ProvisioningStatus, StoreError> {
    let op = pool_row(tx, pool_id)?;
    let mut counts = api::MachineCounts::default();
    let mut first_error: Option<(ErrorCode, String)> = None;
    if let Some(task) = &op.task_id {
        for m in tx.task_machines(task)? {
            counts.total += 1;
            if first_error.is_none() && m.state.is_final() {
                if let Some(code) = &m.outcome.error_code {
                    let msg = m.outcome.error_msg.clone().unwrap_or_default();
                    first_error = Some((*code, msg));
                }
            }
            match m.state {
                MachineState::Succeeded => counts.succeeded += 1,
                MachineState::Failed | MachineState::TimedOut => counts.failed += 1,
                MachineState::Skipped | MachineState::Cancelled => counts.skipped += 1,
                MachineState::Pending | MachineState::Dispatched | MachineState::Running => {
                    counts.pending += 1
                }
            }
        }
    }
    let progress = match (&op.stage_task_id, op.pending_state.is_some()) {
        (Some(stage), true) => percent(&tx.task_machines(stage)?),
        _ => None,
    };
    Ok(api::ProvisioningStatus {
        operation: op.operation,
        pending_image_state: op.pending_state,
        current_image_state: op.current_state,
        pending_image_id: op.pending_image_id,
        current_image_id: op.current_image_id,
        pending_image_progress: progress,
        start_time: op.start_ms,
        error_code: first_error.as_ref().map(|e| e.0),
        error_msg: first_error.map(|e| e.1),
        task_id: op.task_id,
        machines: counts,
    })
}

/// A machine's images, for `GET /v1/machines[/{machine_id}]`; `None` if it never had any.
pub fn machine_view(
    tx: &mut Tx<'_>,
    machine_id: &str,
    pool_id: &str,
) -> Result<Option<api::MachineImage>, StoreError> {
    let m = tx.machine_image(machine_id)?;
    if m == (MachineImageRow {
        machine_id: machine_id.to_string(),
        ..MachineImageRow::default()
    }) {
        return Ok(None);
    }
    let mut progress = None;
    if m.pending_state == Some(PendingImageState::Publishing) {
        if let Some(stage) = tx.pool_image(pool_id)?.and_then(|o| o.stage_task_id) {
            // Its own row only: a fleet list during a push must not read the whole stage
            // task once per machine.
            let rows: Vec<_> = tx.task_machine(&stage, machine_id)?.into_iter().collect();
            progress = percent(&rows);
        }
    }
    Ok(Some(api::MachineImage {
        current_image_id: m.current_image_id,
        current_image_state: m.current_state,
        pending_image_id: m.pending_image_id,
        pending_image_state: m.pending_state,
        pending_image_progress: progress,
        language: m.language,
    }))
}
