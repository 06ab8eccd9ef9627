//! What operators do to machines' identities: move a machine between pools (the only way
//! its pool changes), decommission it, revoke any certificate by serial.

use super::{ms_text, now_ms};
use crate::controller::audit;
use crate::controller::errors::ApiError;
use crate::controller::rollout::MachineState;
use crate::controller::store::{Outcome, RevocationRow, StoreError};
use crate::controller::Controller;
use crate::pki::Identity;
use crate::proto::api;
use crate::proto::domain::{AuditAction, ErrorCode};

fn check_machine_id(id: &str) -> Result<(), ApiError> {
    crate::pki::validate_name("machine_id", id).map_err(|e| ApiError::invalid(e.to_string()))
}

fn no_machine(id: &str) -> ApiError {
    ApiError::not_found(
        ErrorCode::NotFound,
        format!("machine_id {id:?}: no such machine in service"),
    )
}

/// `PUT /v1/machines/{machine_id}/pool`.
pub async fn move_machine(
    ctl: &Controller,
    operator: &Identity,
    machine_id: String,
    req: api::MoveMachine,
) -> Result<(), ApiError> {
    check_machine_id(&machine_id)?;
    crate::pki::validate_name("pool_id", &req.pool_id)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let (m, by) = (machine_id.clone(), operator.clone());
    let request = req.clone();
    let moved = ctl
        .store
        .tx(move |tx| {
            if !tx.set_machine_pool(&m, &request.pool_id)? {
                return Ok::<_, StoreError>(false);
            }
            audit::record(tx, &by, AuditAction::MachineMove, &m, &request)?;
            Ok(true)
        })
        .await?;
    if !moved {
        return Err(no_machine(&machine_id));
    }
    tracing::info!(machine_id, pool_id = %req.pool_id, by = %operator, "machine moved");
    Ok(())
}

/// `DELETE /v1/machines/{machine_id}`: revokes its certificate, closes its polls, ends its
/// unfinished assignments `CANCELLED`, and takes it out of its pool (its history stays).
pub async fn decommission(
    ctl: &Controller,
    operator: &Identity,
    machine_id: String,
) -> Result<api::Decommissioned, ApiError> {
    check_machine_id(&machine_id)?;
    let now = now_ms();
    let (m, by) = (machine_id.clone(), operator.to_string());
    let who = operator.clone();
    let (serial, cancelled, wake) = ctl
        .store
        .tx(move |tx| {
            let Some((row, None)) = tx.machine(&m)? else {
                return Err(no_machine(&m));
            };
            if let Some(serial) = &row.cert_serial {
                tx.revoke(&RevocationRow {
                    serial: serial.clone(),
                    revoked_ms: now,
                    revoked_by: by.clone(),
                    machine_id: Some(m.clone()),
                })?;
            }
            tx.decommission(&m, now)?;
            let mut wake = vec![m.clone()];
            let ids = tx.unfinished_assignments(&m)?;
            for id in &ids {
                if let Some(tm) = tx.assignment(id)? {
                    let outcome = Outcome {
                        started_at: tm.outcome.started_at.clone(),
                        error_code: Some(ErrorCode::MachineDecommissioned),
                        error_msg: Some(format!("machine {m:?} was decommissioned by {by}")),
                        ..Outcome::default()
                    };
                    crate::controller::progress::end_assignment(
                        tx,
                        &tm,
                        MachineState::Cancelled,
                        &outcome,
                        now,
                        &mut wake,
                    )?;
                }
            }
            audit::record(
                tx,
                &who,
                AuditAction::MachineDecommission,
                &m,
                &serde_json::json!({}),
            )?;
            Ok::<_, ApiError>((row.cert_serial, ids.len() as u32, wake))
        })
        .await?;
    if let Some(s) = &serial {
        ctl.revoked.insert(s.clone());
    }
    ctl.wake(&wake);
    tracing::warn!(machine_id, serial = ?serial, cancelled, by = %operator, "machine decommissioned");
    Ok(api::Decommissioned {
        machine_id,
        revoked_serial: serial,
        cancelled_assignments: cancelled,
    })
}

/// Serials as operators paste them: hex, any case, colons allowed.
fn normalize_serial(s: &str) -> Result<String, ApiError> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let ok = !hex.is_empty() && hex.len() <= 64 && hex.chars().all(|c| c.is_ascii_hexdigit());
    if !ok {
        return Err(ApiError::invalid(format!(
            "serial {s:?} is not a hex certificate serial (as certificate_serial shows it)"
        )));
    }
    Ok(hex)
}

/// `POST /v1/revocations`.
pub async fn revoke(
    ctl: &Controller,
    operator: &Identity,
    req: api::Revoke,
) -> Result<api::Revocation, ApiError> {
    let serial = normalize_serial(&req.serial)?;
    let now = now_ms();
    let (s, by) = (serial.clone(), operator.to_string());
    let who = operator.clone();
    let row = ctl
        .store
        .tx(move |tx| {
            audit::record(tx, &who, AuditAction::Revocation, &s, &req)?;
            let machine_id = tx.machine_of_serial(&s)?;
            let row = RevocationRow {
                serial: s.clone(),
                revoked_ms: now,
                revoked_by: by,
                machine_id,
            };
            if !tx.revoke(&row)? {
                return Ok::<_, StoreError>(
                    tx.revocations()?
                        .into_iter()
                        .find(|r| r.serial == s)
                        .unwrap_or(row),
                );
            }
            Ok(row)
        })
        .await?;
    ctl.revoked.insert(serial.clone());
    if let Some(m) = &row.machine_id {
        ctl.wake(std::slice::from_ref(m));
    }
    tracing::warn!(serial, machine_id = ?row.machine_id, by = %operator, "certificate revoked");
    Ok(revocation_view(&row))
}

fn revocation_view(r: &RevocationRow) -> api::Revocation {
    api::Revocation {
        serial: r.serial.clone(),
        revoked_at: ms_text(r.revoked_ms),
        revoked_by: r.revoked_by.clone(),
        machine_id: r.machine_id.clone(),
    }
}

/// `GET /v1/revocations`.
pub async fn list_revocations(ctl: &Controller) -> Result<Vec<api::Revocation>, ApiError> {
    let rows = ctl.store.read(|tx| tx.revocations()).await?;
    Ok(rows.iter().map(revocation_view).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalized_and_checked() {
        assert_eq!(normalize_serial(" AB:cd:01 ").unwrap(), "abcd01");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
    }
}
