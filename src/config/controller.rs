//! The controller's validated configuration (`/etc/fieldhand-controller/controller.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{invalid, non_empty_path, parse_toml, read, ConfigError, TlsFiles};
use crate::proto::config::RawController;

/// Where the package installs it.
pub const DEFAULT_PATH: &str = "/etc/fieldhand-controller/controller.toml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `database_url`: SQLite in `data_dir` by default, or PostgreSQL.
    pub database: Database,
    /// Payload blobs (`blob_dir`, default `data_dir/blobs`).
    pub blob_dir: PathBuf,
    pub tls: TlsFiles,
    /// A machine not heard from for this long is shown offline.
    pub offline_after: Duration,
    /// Extra time past a machine's execution timeout before it counts as `MACHINE_UNREACHABLE`.
    pub unreachable_grace: Duration,
    /// How long an announced reboot may take before the machine counts as unreachable.
    pub reboot_grace: Duration,
    /// Payload signing key (PKCS#8 PEM), if payloads are signed.
    pub signing_key: Option<PathBuf>,
    /// The issuing CA's certificate and key, when the controller enrolls and renews agents.
    pub issuing: Option<(PathBuf, PathBuf)>,
    pub agent_cert_validity: Duration,
    pub enroll_per_second: u32,
    pub identity_conflict_quiet: Duration,
    pub net: crate::net::server::Limits,
    pub body_timeout: Duration,
    pub blobs: BlobLimits,
    /// `max_concurrent_power_operations`: machines of the whole fleet that may be at work on
    /// an assignment with a power step at once (`None`: no limit).
    pub max_concurrent_power_operations: Option<u32>,
    /// `task_retention_seconds`: finished tasks older than this are pruned (`None`: kept).
    pub task_retention: Option<Duration>,
}

/// Which database the controller runs on (`database_url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// The embedded default: one file, one controller.
    Sqlite(PathBuf),
    /// A PostgreSQL server (its URL), shared by any number of controller replicas.
    Postgres(String),
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            // A password in the URL stays out of logs and error messages.
            Database::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            match auth.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &auth[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `max_blob_bytes`, `blob_quota_bytes`, `blob_retention_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLimits {
    pub max_bytes: u64,
    pub quota_bytes: u64,
    pub retention: Duration,
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?, path)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: RawController = parse_toml(text, origin)?;
        let listen: SocketAddr = raw.listen.trim().parse().map_err(|_| {
            invalid(
                origin,
                "listen",
                &raw.listen,
                "must be IP:PORT, e.g. 127.0.0.1:8443 (port 0 picks a free port)",
            )
        })?;
        let data_dir = non_empty_path(origin, "data_dir", raw.data_dir)?;
        let database = match raw.database_url {
            None => Database::Sqlite(data_dir.join("fieldhand.db")),
            Some(url) => {
                if let Some(p) = url.strip_prefix("sqlite://").filter(|p| !p.is_empty()) {
                    Database::Sqlite(super::resolve(origin, Path::new(p)))
                } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                    Database::Postgres(url)
                } else {
                    return Err(invalid(
                        origin,
                        "database_url",
                        redact(&url),
                        "must be sqlite://PATH or postgres://USER@HOST/DATABASE",
                    ));
                }
            }
        };
        let blob_dir = match (raw.blob_dir, &database) {
            (Some(p), _) => non_empty_path(origin, "blob_dir", p)?,
            (None, Database::Sqlite(_)) => data_dir.join("blobs"),
            (None, Database::Postgres(_)) => {
                return Err(invalid(
                    origin,
                    "blob_dir",
                    "(unset)",
                    "is required with a postgres:// database_url: a directory every \
                     replica reaches (payload blobs are served by whichever replica an agent \
                     asks)",
                ))
            }
        };
        let offline = raw.offline_after_seconds.unwrap_or(30);
        if !(1..=86_400).contains(&offline) {
            return Err(invalid(
                origin,
                "offline_after_seconds",
                offline,
                "must be 1..=86400",
            ));
        }
        let grace = raw.unreachable_grace_seconds.unwrap_or(60);
        if grace > 86_400 {
            return Err(invalid(
                origin,
                "unreachable_grace_seconds",
                grace,
                "must be at most 86400",
            ));
        }
        let reboot_grace = raw.reboot_grace_seconds.unwrap_or(600);
        if !(1..=86_400).contains(&reboot_grace) {
            return Err(invalid(
                origin,
                "reboot_grace_seconds",
                reboot_grace,
                "must be 1..=86400",
            ));
        }
        let validity = raw.agent_cert_validity_seconds.unwrap_or(90 * 86_400);
        if !(2..=825 * 86_400).contains(&validity) {
            return Err(invalid(
                origin,
                "agent_cert_validity_seconds",
                validity,
                "must be 2..=71280000 (825 days)",
            ));
        }
        let quiet = raw.identity_conflict_quiet_seconds.unwrap_or(120);
        if !(1..=86_400).contains(&quiet) {
            return Err(invalid(
                origin,
                "identity_conflict_quiet_seconds",
                quiet,
                "must be 1..=86400",
            ));
        }
        let e = raw.enrollment;
        let issuing = match (e.issuing_cert, e.issuing_key) {
            (Some(c), Some(k)) => Some((
                non_empty_path(origin, "enrollment.issuing_cert", c)?,
                non_empty_path(origin, "enrollment.issuing_key", k)?,
            )),
            (None, None) => None,
            (Some(c), None) => {
                return Err(invalid(
                    origin,
                    "enrollment.issuing_key",
                    "",
                    &format!("is needed with enrollment.issuing_cert ({})", c.display()),
                ))
            }
            (None, Some(k)) => {
                return Err(invalid(
                    origin,
                    "enrollment.issuing_cert",
                    "",
                    &format!("is needed with enrollment.issuing_key ({})", k.display()),
                ))
            }
        };
        let rate = e.attempts_per_second.unwrap_or(20);
        if !(1..=10_000).contains(&rate) {
            return Err(invalid(
                origin,
                "enrollment.attempts_per_second",
                rate,
                "must be 1..=10000",
            ));
        }
        let num = |key: &'static str, v: Option<u64>, default: u64, min: u64, max: u64| {
            let v = v.unwrap_or(default);
            if !(min..=max).contains(&v) {
                return Err(invalid(origin, key, v, &format!("must be {min}..={max}")));
            }
            Ok(v)
        };
        let d = crate::net::server::Limits::default();
        let max_connections = num(
            "max_connections",
            raw.max_connections,
            d.max_connections as u64,
            16,
            1_000_000,
        )?;
        let reserve = num(
            "operator_reserve_connections",
            raw.operator_reserve_connections,
            d.operator_reserve as u64,
            1,
            max_connections - 1,
        )?;
        let per_agent = num(
            "max_connections_per_agent",
            raw.max_connections_per_agent,
            d.per_agent as u64,
            2,
            10_000,
        )?;
        let header = num(
            "request_header_timeout_seconds",
            raw.request_header_timeout_seconds,
            10,
            1,
            3600,
        )?;
        let body = num(
            "request_body_timeout_seconds",
            raw.request_body_timeout_seconds,
            60,
            1,
            86_400,
        )?;
        let max_blob = num("max_blob_bytes", raw.max_blob_bytes, 16 << 30, 1, u64::MAX)?;
        let quota = num(
            "blob_quota_bytes",
            raw.blob_quota_bytes,
            256 << 30,
            1,
            u64::MAX,
        )?;
        if max_blob > quota {
            return Err(invalid(
                origin,
                "max_blob_bytes",
                max_blob,
                "must not exceed blob_quota_bytes",
            ));
        }
        let retention = num(
            "blob_retention_seconds",
            raw.blob_retention_seconds,
            7 * 86_400,
            1,
            10 * 365 * 86_400,
        )?;
        let task_retention = match raw.task_retention_seconds {
            None | Some(0) => None,
            Some(n) if n <= 10 * 365 * 86_400 => Some(Duration::from_secs(n)),
            Some(n) => {
                return Err(invalid(
                    origin,
                    "task_retention_seconds",
                    n,
                    "must be at most 315360000 (10 years; 0 or unset keeps finished tasks)",
                ))
            }
        };
        let max_power = match raw.max_concurrent_power_operations {
            None => None,
            Some(n) if (1..=1_000_000).contains(&n) => Some(n as u32),
            Some(n) => {
                return Err(invalid(
                    origin,
                    "max_concurrent_power_operations",
                    n,
                    "must be 1..=1000000 (leave it unset for no limit)",
                ))
            }
        };
        Ok(ControllerConfig {
            max_concurrent_power_operations: max_power,
            task_retention,
            net: crate::net::server::Limits {
                max_connections: max_connections as usize,
                operator_reserve: reserve as usize,
                per_agent: per_agent as usize,
                handshake_timeout: d.handshake_timeout,
                header_timeout: Duration::from_secs(header),
            },
            body_timeout: Duration::from_secs(body),
            blobs: BlobLimits {
                max_bytes: max_blob,
                quota_bytes: quota,
                retention: Duration::from_secs(retention),
            },
            issuing,
            agent_cert_validity: Duration::from_secs(validity),
            enroll_per_second: rate as u32,
            identity_conflict_quiet: Duration::from_secs(quiet),
            listen,
            data_dir,
            database,
            blob_dir,
            tls: TlsFiles::from_raw(origin, raw.tls)?,
            offline_after: Duration::from_secs(offline),
            unreachable_grace: Duration::from_secs(grace),
            reboot_grace: Duration::from_secs(reboot_grace),
            signing_key: match raw.signing_key {
                Some(p) => Some(non_empty_path(origin, "signing_key", p)?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
listen = "127.0.0.1:0"
data_dir = "/var/lib/fieldhand-controller"
[tls]
ca = "ca.pem"
cert = "controller.pem"
key = "controller-key.pem"
"#;

    #[test]
    fn defaults() {
        let c = ControllerConfig::parse(MIN, Path::new("/etc/fh/c.toml")).unwrap();
        assert_eq!(
            c.database,
            Database::Sqlite(PathBuf::from("/var/lib/fieldhand-controller/fieldhand.db"))
        );
        assert_eq!(
            c.blob_dir,
            PathBuf::from("/var/lib/fieldhand-controller/blobs")
        );
        assert_eq!(c.tls.key, PathBuf::from("/etc/fh/controller-key.pem"));
        assert_eq!(c.listen.port(), 0);
    }

    #[test]
    fn errors_name_the_key() {
        let e = |t: &str| {
            ControllerConfig::parse(t, Path::new("c.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(e(&MIN.replace("127.0.0.1:0", "localhost")).contains("`listen`"));
        let pg = format!("database_url = \"postgres://fh:secret@db/fh\"\n{MIN}");
        let err = e(&pg);
        assert!(err.contains("blob_dir") && err.contains("replica"), "{err}");
        assert!(e(&format!("database_url = \"mysql://x\"\n{MIN}")).contains("database_url"));
        let ok = ControllerConfig::parse(
            &format!("database_url = \"postgres://fh:secret@db/fh\"\nblob_dir = \"/srv/b\"\n{MIN}"),
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(ok.blob_dir, PathBuf::from("/srv/b"));
        assert_eq!(ok.database.to_string(), "postgres://fh:***@db/fh");
        assert!(e(&format!("bogus = 1\n{MIN}")).contains("bogus"));
        let zero = e(&format!("max_concurrent_power_operations = 0\n{MIN}"));
        assert!(zero.contains("max_concurrent_power_operations"), "{zero}");
        let c = |t: &str| ControllerConfig::parse(t, Path::new("c.toml")).unwrap();
        assert_eq!(c(MIN).max_concurrent_power_operations, None);
        let two = c(&format!("max_concurrent_power_operations = 2\n{MIN}"));
        assert_eq!(two.max_concurrent_power_operations, Some(2));
        assert_eq!(c(MIN).task_retention, None);
        assert_eq!(
            c(&format!("task_retention_seconds = 0\n{MIN}")).task_retention,
            None
        );
        let month = c(&format!("task_retention_seconds = 2592000\n{MIN}"));
        assert_eq!(month.task_retention, Some(Duration::from_secs(2_592_000)));
        let long = e(&format!("task_retention_seconds = 315360001\n{MIN}"));
        assert!(
            long.contains("task_retention_seconds") && long.contains("315360001"),
            "{long}"
        );
    }

    #[test]
    fn the_packaged_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let one = root.join("packaging/controller.toml");
        let c = ControllerConfig::load(&one).unwrap();
        assert!(matches!(c.database, Database::Sqlite(_)));
        let replica = root.join("packaging/controller-replica.toml.example");
        let r = ControllerConfig::load(&replica).unwrap();
        assert_eq!(
            r.database,
            Database::Postgres("postgres://fieldhand@db.example.net/fieldhand".into())
        );
        assert_eq!(r.blob_dir, PathBuf::from("/srv/fieldhand-blobs"));
        assert_eq!(r.task_retention, Some(Duration::from_secs(30 * 86_400)));
    }
}
