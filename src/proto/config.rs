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
    /// One controller: the shorthand of a one-element `controller_urls`.
    pub controller_url: Option<String>,
    /// Controller replicas, tried in order; the agent fails over between them.
    pub controller_urls: Option<Vec<String>>,
    /// No longer used (the controller decides pools); accepted with a warning so an old
    /// config keeps working.
    pub pool_id: Option<String>,
    /// The id this machine enrolls as; default: the host name.
    pub machine_id: Option<String>,
    /// A file holding an enrollment token (`POST /v1/enrollment-tokens`).
    pub enrollment_token_file: Option<PathBuf>,
    /// The token itself, for tests and the quickstart; prefer `enrollment_token_file`.
    pub enrollment_token: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// Where images live (`<image_id>/`, `current`, `previous`); default `state_dir/images`.
    pub image_root: Option<PathBuf>,
    /// The data area a rebuild keeps or empties (seed 003); default `state_dir/data`.
    pub data_dir: Option<PathBuf>,
    /// Whether this machine has a GPU; unset: detected on the PCI bus.
    pub gpu: Option<bool>,
    pub socket_path: Option<PathBuf>,
    /// Group owning the status socket; its members may run `fieldhand status`.
    pub socket_group: Option<String>,
    pub tls: RawTls,
    #[serde(default)]
    pub exec: RawExec,
    #[serde(default)]
    pub connection: RawConnection,
    #[serde(default)]
    pub payloads: RawPayloads,
    #[serde(default)]
    pub power: RawPower,
    #[serde(default)]
    pub sessions: RawSessions,
    #[serde(default)]
    pub metrics: RawAgentMetrics,
}

/// `[metrics]`: the agent's counters for node_exporter's textfile collector.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentMetrics {
    /// A `.prom` file rewritten atomically every `textfile_every_seconds` (default 15).
    pub textfile: Option<PathBuf>,
    pub textfile_every_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPower {
    pub reboot_command: Option<Vec<String>>,
    pub shutdown_command: Option<Vec<String>>,
    pub boot_id_path: Option<PathBuf>,
    pub reboot_timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    /// Ask systemd-logind (through loginctl) when it runs; else read utmp.
    pub logind: Option<bool>,
    pub utmp_path: Option<PathBuf>,
    /// Where session terminals live (`/dev`): warnings are written to `<tty_dir>/<line>`.
    pub tty_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPayloads {
    /// Hex ed25519 public keys (from `fieldhand-controller pki signing-key`).
    pub trusted_keys: Option<Vec<String>>,
    pub require_signed_payloads: Option<bool>,
    /// Free space kept back; default min(5% of the filesystem, 1 GiB).
    pub reserve_bytes: Option<u64>,
    pub max_archive_entries: Option<u64>,
    pub max_unpacked_bytes: Option<u64>,
    /// Staged versions kept per thing.
    pub keep_versions: Option<u64>,
    /// Download bandwidth cap; unset means unlimited.
    pub max_download_bytes_per_second: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExec {
    pub kill_grace_seconds: Option<u64>,
    /// Contain each run in its own cgroup v2 group (default true; false: the subreaper).
    pub cgroups: Option<bool>,
    /// A cgroup2 directory made for the agent's runs; default: the agent's own group.
    pub cgroup_root: Option<PathBuf>,
    /// Per-run memory limit: bytes, or with a K, M or G suffix.
    pub memory_max: Option<String>,
    /// Per-run CPU limit: a percentage of one CPU (`"50%"`, `"200%"`).
    pub cpu_max: Option<String>,
    /// Per-run limit on processes and threads.
    pub tasks_max: Option<u64>,
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
    /// How long a machine may take to come back from a reboot it announced.
    pub reboot_grace_seconds: Option<u64>,
    /// ed25519 PKCS#8 key (`pki signing-key`); when set, every payload reference is signed.
    pub signing_key: Option<PathBuf>,
    /// Lifetime of the agent certificates the controller signs (enrollment, renewal).
    pub agent_cert_validity_seconds: Option<u64>,
    /// How long a second session of one identity must stay silent before a conflict clears.
    pub identity_conflict_quiet_seconds: Option<u64>,
    /// Connections open at once, and how many of them only operators may take.
    pub max_connections: Option<u64>,
    pub operator_reserve_connections: Option<u64>,
    /// Connections one agent identity may hold at once.
    pub max_connections_per_agent: Option<u64>,
    /// Machines of the whole fleet that may be at work on an assignment with a reboot or
    /// shutdown at once; unset: no limit.
    pub max_concurrent_power_operations: Option<u64>,
    /// Time limits for the request head (and the idle wait between requests) and the body.
    pub request_header_timeout_seconds: Option<u64>,
    pub request_body_timeout_seconds: Option<u64>,
    /// `POST /v1/blobs`: the largest blob, all blobs together, and how long one that nothing
    /// refers to is kept.
    pub max_blob_bytes: Option<u64>,
    pub blob_quota_bytes: Option<u64>,
    pub blob_retention_seconds: Option<u64>,
    /// How long a finished task (its machines' rows and output) is kept; unset or 0: for ever.
    pub task_retention_seconds: Option<u64>,
    /// Where payload blobs live (default `data_dir/blobs`); with PostgreSQL, a directory
    /// every replica reaches, given explicitly.
    pub blob_dir: Option<PathBuf>,
    pub tls: RawTls,
    #[serde(default)]
    pub enrollment: RawEnrollment,
}

/// `[enrollment]`: the CA the controller signs agent certificates with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnrollment {
    /// The issuing CA (`pki init` writes `issuing-ca.pem`); unset: enrollment and renewal
    /// are refused.
    pub issuing_cert: Option<PathBuf>,
    pub issuing_key: Option<PathBuf>,
    /// Enrollment attempts accepted per second, all sources together (default 20).
    pub attempts_per_second: Option<u64>,
}

/// `~/.config/fieldhand/ctl.toml`: the operator CLI's connection settings, each of which a
/// flag or an environment variable overrides (`config::ctl`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCtl {
    /// `https://HOST[:PORT]` of the controller.
    pub url: Option<String>,
    /// The fleet CA (`ca.pem`), and the operator's certificate and key (`pki issue --operator`).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}
