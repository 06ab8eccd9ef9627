//! The fleet: machines, pools (with their power limits), enrollment tokens, moves,
//! decommissioning and revocation, and the operators' audit trail.

use serde::{Deserialize, Serialize};

use super::{MachineImage, ProvisioningStatus};
use crate::proto::agent::HostFacts;
use crate::proto::domain::AuditAction;

/// One row of `GET /v1/pools`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct PoolSummary {
    pub pool_id: String,
    /// Machines in service in the pool.
    pub machines: u32,
    pub online: u32,
    /// What `GET /v1/pools/{pool_id}/provisioning-status` answers.
    pub provisioning: ProvisioningStatus,
}

/// `GET /v1/pools/{pool_id}`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Pool {
    pub pool_id: String,
    /// Its machines' ids, sorted.
    pub machines: Vec<String>,
    pub online: u32,
    pub provisioning: ProvisioningStatus,
}

/// One row of `GET /v1/audit`: an operator's action.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub audit_id: String,
    pub at: String,
    /// The operator's name, from the verified client certificate.
    pub operator: String,
    pub action: AuditAction,
    /// What it acted on: the id in the request's path, or the id it created.
    pub target: String,
    /// The request body (secrets removed), `{}` for a request without one.
    pub request: serde_json::Value,
}

/// `PUT /v1/pools/{pool_id}/power-limit`: how many of the pool's machines may be at work on
/// an assignment with a reboot or shutdown at once; `null` clears the limit.
#[derive(utoipa::ToSchema, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerLimit {
    /// Signed on the wire, so that 0 or a negative value gets our own error.
    pub max_concurrent_power_operations: Option<i64>,
}

/// The answer to `GET`/`PUT /v1/pools/{pool_id}/power-limit`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct PoolPowerLimit {
    pub pool_id: String,
    /// `null`: no limit for the pool (the controller-wide one still holds).
    pub max_concurrent_power_operations: Option<u32>,
    /// The controller's `max_concurrent_power_operations` (config), `null` when unset.
    pub controller_max_concurrent_power_operations: Option<u32>,
}

/// One row of `GET /v1/machines`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub machine_id: String,
    /// Decided by the controller only: at enrollment (the token's pool), by the pool bound in
    /// a hand-issued certificate, or by an operator (`PUT /v1/machines/{id}/pool`). `null`:
    /// in no pool until an operator moves it.
    pub pool_id: Option<String>,
    pub online: bool,
    pub last_seen: String,
    pub agent_version: String,
    /// As reported by the agent (hostname, OS, GPU): shown, never trusted for identity.
    pub facts: Option<HostFacts>,
    /// Serial (hex) and expiry of the certificate the machine last presented.
    #[serde(default)]
    pub certificate_serial: Option<String>,
    #[serde(default)]
    pub certificate_not_after: Option<String>,
    /// Two live agents present this identity (a cloned certificate): nothing new is
    /// dispatched to it until only one is left.
    #[serde(default)]
    pub identity_conflict: bool,
    /// The machine's images, once it has had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<MachineImage>,
}

/// `POST /v1/enrollment-tokens`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    pub pool_id: String,
    /// How many machines may enroll with it; absent: any number until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<i64>,
    /// Default 86400 (one day); at most one year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
}

/// One enrollment token, as listed (`GET /v1/enrollment-tokens`): never the secret.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub token_id: String,
    pub pool_id: String,
    /// `null`: unlimited.
    pub uses_left: Option<u32>,
    pub expires_at: String,
    pub created_at: String,
    pub created_by: String,
}

/// The answer to `POST /v1/enrollment-tokens`: the only time the secret is shown.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentTokenCreated {
    pub token_id: String,
    /// `<token_id>.<secret>`, for the agents' `enrollment_token_file`.
    pub token: String,
    pub pool_id: String,
    pub uses_left: Option<u32>,
    pub expires_at: String,
}

/// `PUT /v1/machines/{machine_id}/pool`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveMachine {
    pub pool_id: String,
}

/// The answer to `DELETE /v1/machines/{machine_id}`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Decommissioned {
    pub machine_id: String,
    /// The certificate serial revoked with it, if the machine ever presented one.
    pub revoked_serial: Option<String>,
    /// Assignments of this machine that ended `CANCELLED`.
    pub cancelled_assignments: u32,
}

/// `POST /v1/revocations`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// Hex serial, as `certificate_serial` shows it (colons and case are ignored).
    pub serial: String,
}

/// One revoked certificate (`GET /v1/revocations`).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub serial: String,
    pub revoked_at: String,
    pub revoked_by: String,
    /// The machine whose certificate it was, when the controller knows.
    pub machine_id: Option<String>,
}
