//! Global settings (`GET/PUT /v1/settings`, seed 000 "Global Settings") and the defaults the
//! operations share: the logoff timeout and the force-logoff grace period.

use super::audit;
use super::errors::ApiError;
use super::store::{StoreError, Tx};
use super::Controller;
use crate::pki::Identity;
use crate::proto::api;
use crate::proto::domain::AuditAction;

pub const DEFAULT_LOGOFF_TIMEOUT_SECONDS: i64 = 3600;
pub const DEFAULT_FORCE_LOGOFF_GRACE_SECONDS: i64 = 300;
const GRACE_KEY: &str = "force_logoff_grace_seconds";

pub fn force_logoff_grace(tx: &mut Tx<'_>) -> Result<i64, StoreError> {
    Ok(tx
        .setting(GRACE_KEY)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_FORCE_LOGOFF_GRACE_SECONDS))
}

pub async fn get_settings(ctl: &Controller) -> Result<api::Settings, ApiError> {
    let grace = ctl.store.tx(force_logoff_grace).await?;
    Ok(api::Settings {
        force_logoff_grace_seconds: grace,
    })
}

/// Applies to tasks created afterwards; running tasks keep the value they started with.
pub async fn put_settings(
    ctl: &Controller,
    by: &Identity,
    s: api::Settings,
) -> Result<api::Settings, ApiError> {
    let g = s.force_logoff_grace_seconds;
    if !(0..=86_400).contains(&g) {
        return Err(ApiError::invalid(format!(
            "force_logoff_grace_seconds {g} must be 0..=86400"
        )));
    }
    let (by, request) = (by.clone(), s.clone());
    ctl.store
        .tx(move |tx| {
            tx.set_setting(GRACE_KEY, &g.to_string())?;
            audit::record(tx, &by, AuditAction::SettingsChange, GRACE_KEY, &request)
        })
        .await?;
    Ok(s)
}
