//! The thin layer above the engine: what changes a task (an agent's event, a machine that
//! ended without a word) goes through the engine, and the image operations then observe the
//! change. The engine stays generic (it knows no images); `images` uses the engine; this
//! module uses both.

use super::engine::{self, EngineError, Wake};
use super::images;
use super::reports::{self, Applied};
use super::rollout::MachineState;
use super::store::{Outcome, StoreError, TaskMachineRow, Tx};
use crate::proto::agent::{AgentEvent, EventBody};

/// Applies one agent event (`reports::apply_event`), then lets the image operation of its
/// task see it.
pub fn apply_event(
    tx: &mut Tx<'_>,
    machine_id: &str,
    ev: &AgentEvent,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<Applied, EngineError> {
    let applied = reports::apply_event(tx, machine_id, ev, now_ms, wake)?;
    let moves_task = matches!(ev.body, EventBody::Started | EventBody::Result(_));
    if applied == Applied::Applied && moves_task {
        if let Some(row) = tx.assignment(&ev.assignment_id)? {
            observe(tx, &row, Some(&ev.body), now_ms, wake)?;
        }
    }
    Ok(applied)
}

/// Ends one machine's assignment without word from its agent, and lets images see it.
pub fn end_assignment(
    tx: &mut Tx<'_>,
    row: &TaskMachineRow,
    state: MachineState,
    outcome: &Outcome,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    engine::end_assignment(tx, row, state, outcome, now_ms, wake)?;
    observe(tx, row, None, now_ms, wake)
}

/// Declares silent machines unreachable (`reports::reap`); returns how many.
pub fn reap(
    tx: &mut Tx<'_>,
    now_ms: i64,
    grace_ms: i64,
    offline_ms: i64,
    reboot_grace_ms: i64,
    wake: &mut Wake,
) -> Result<usize, StoreError> {
    let ended = reports::reap(tx, now_ms, grace_ms, offline_ms, reboot_grace_ms, wake)?;
    for row in &ended {
        observe(tx, row, None, now_ms, wake)?;
    }
    Ok(ended.len())
}

fn observe(
    tx: &mut Tx<'_>,
    row: &TaskMachineRow,
    body: Option<&EventBody>,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    match tx.task(&row.task_id)? {
        Some(task) => images::observe(
            tx,
            &task,
            &row.assignment_id,
            &row.machine_id,
            body,
            now_ms,
            wake,
        ),
        None => Ok(()),
    }
}
