//! Global settings (`GET/PUT /v1/settings`, seed 000 "Global Settings"), the defaults the
//! operations share (the logoff timeout and the force-logoff grace period), and each pool's
//! power limit (`GET/PUT /v1/pools/{pool_id}/power-limit`).

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
    let grace = ctl.store.read(force_logoff_grace).await?;
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

/// The largest per-pool power limit (and the config's): beyond any fleet.
pub const MAX_POWER_LIMIT: i64 = 1_000_000;

/// `GET /v1/pools/{pool_id}/power-limit`.
pub async fn get_power_limit(
    ctl: &Controller,
    pool_id: String,
) -> Result<api::PoolPowerLimit, ApiError> {
    crate::pki::validate_name("pool_id", &pool_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let pid = pool_id.clone();
    let limit = ctl.store.tx(move |tx| tx.pool_power_limit(&pid)).await?;
    Ok(api::PoolPowerLimit {
        pool_id,
        max_concurrent_power_operations: limit,
        controller_max_concurrent_power_operations: ctl.cfg.max_concurrent_power_operations,
    })
}

/// `PUT /v1/pools/{pool_id}/power-limit`: applies at once to every task, running ones too
/// (machines already at work are never stopped; a lower limit only holds new ones back). A
/// raised or cleared limit lets the machines that waited for a slot go now.
pub async fn put_power_limit(
    ctl: &Controller,
    pool_id: String,
    req: api::PowerLimit,
) -> Result<api::PoolPowerLimit, ApiError> {
    crate::pki::validate_name("pool_id", &pool_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let limit = match req.max_concurrent_power_operations {
        None => None,
        Some(n) if (1..=MAX_POWER_LIMIT).contains(&n) => Some(n as u32),
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "max_concurrent_power_operations {n} must be 1..={MAX_POWER_LIMIT}, or null for no limit"
            )))
        }
    };
    let now_ms = crate::sys::clock::unix_ms(crate::sys::clock::now());
    let pid = pool_id.clone();
    let wake = ctl
        .store
        .tx(move |tx| {
            tx.set_pool_power_limit(&pid, limit)?;
            let mut wake = Vec::new();
            super::engine::release_power(
                tx,
                super::engine::POWER_WAITERS_PER_TICK,
                now_ms,
                &mut wake,
            )?;
            tracing::info!(pool_id = %pid, limit = ?limit, "pool power limit set");
            Ok::<_, StoreError>(wake)
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::PoolPowerLimit {
        pool_id,
        max_concurrent_power_operations: limit,
        controller_max_concurrent_power_operations: ctl.cfg.max_concurrent_power_operations,
    })
}
