//! Raw config files as written by operators (`agent.toml`, `controller.toml`). Unknown keys are
//! errors; defaults and validation live in `crate::config`, which turns these into typed configs.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub controller_url: String,
    pub pool_id: String,
    pub state_dir: Option<PathBuf>,
    pub socket_path: Option<PathBuf>,
    pub tls: RawTls,
    #[serde(default)]
    pub exec: RawExec,
    #[serde(default)]
    pub connection: RawConnection,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExec {
    pub kill_grace_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnection {
    pub retry_initial_ms: Option<u64>,
    pub retry_max_ms: Option<u64>,
    pub long_poll_seconds: Option<u64>,
    pub heartbeat_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawController {
    pub listen: String,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub offline_after_seconds: Option<u64>,
    pub unreachable_grace_seconds: Option<u64>,
    pub tls: RawTls,
}
