//! The agent's validated configuration (`/etc/fieldhand/agent.toml`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{invalid, non_empty_path, parse_toml, read, ConfigError, TlsFiles};
use crate::proto::config::RawAgent;

pub const DEFAULT_PATH: &str = "/etc/fieldhand/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fieldhand";
pub const DEFAULT_SOCKET_PATH: &str = "/run/fieldhand/agent.sock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// `https://HOST[:PORT]` of each controller replica, in the order they are tried; never
    /// empty, no duplicates (`controller_url` is the one-element shorthand).
    pub controller_urls: Vec<String>,
    /// The id to enroll as (`machine_id`); `None`: the host name. A hand-issued certificate
    /// names its own.
    pub machine_id: Option<String>,
    /// Where the enrollment token comes from, if this machine enrolls itself.
    pub enrollment: Option<TokenSource>,
    /// Things in the file that still work but should change (e.g. a `pool_id` key), for the
    /// log once logging is up.
    pub warnings: Vec<String>,
    pub state_dir: PathBuf,
    /// Images: `<image_id>/`, `current` and `previous` (boot tooling reads these).
    pub image_root: PathBuf,
    /// The data area: kept or emptied by a rebuild (seed 003).
    pub data_dir: PathBuf,
    /// Declared GPU; `None`: detected.
    pub gpu: Option<bool>,
    pub socket_path: PathBuf,
    pub socket_group: Option<String>,
    pub tls: TlsFiles,
    /// SIGTERM to SIGKILL grace for a script's process group.
    pub kill_grace: Duration,
    /// `[exec] cgroups` and `cgroup_root`: how runs are contained.
    pub cgroups: bool,
    pub cgroup_root: Option<PathBuf>,
    pub limits: crate::sys::cgroup::RunLimits,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub long_poll: Duration,
    pub heartbeat_every: Duration,
    pub payloads: PayloadSettings,
    pub power: PowerSettings,
    pub sessions: crate::sys::sessions::SessionSource,
    /// `[metrics] textfile`, and how often it is rewritten.
    pub metrics_textfile: Option<(PathBuf, Duration)>,
}

/// Where the agent reads its enrollment token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Inline(String),
}

/// `[power]`: how the agent reboots and shuts the machine down, and how it tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerSettings {
    pub reboot_command: Vec<String>,
    pub shutdown_command: Vec<String>,
    pub boot_id_path: PathBuf,
    pub reboot_timeout: Duration,
}

/// `[payloads]`: how the agent downloads, verifies and unpacks payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadSettings {
    /// Raw 32-byte ed25519 public keys.
    pub trusted_keys: Vec<[u8; 32]>,
    pub require_signed: bool,
    /// `None`: min(5% of the filesystem, 1 GiB).
    pub reserve_bytes: Option<u64>,
    pub max_archive_entries: u64,
    pub max_unpacked_bytes: u64,
    pub keep_versions: u64,
    pub max_download_bytes_per_second: Option<u64>,
}

impl Default for PayloadSettings {
    fn default() -> Self {
        PayloadSettings {
            trusted_keys: Vec::new(),
            require_signed: false,
            reserve_bytes: None,
            max_archive_entries: 100_000,
            max_unpacked_bytes: 64 << 30,
            keep_versions: 2,
            max_download_bytes_per_second: None,
        }
    }
}

/// `[exec] memory_max`, `cpu_max`, `tasks_max`.
fn run_limits(
    origin: &Path,
    raw: &crate::proto::config::RawExec,
) -> Result<crate::sys::cgroup::RunLimits, ConfigError> {
    let memory_max = match &raw.memory_max {
        None => None,
        Some(v) => {
            let t = v.trim();
            let (num, mult) = match t.chars().last() {
                Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
                Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
                Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
                _ => (t, 1),
            };
            let n = num
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .filter(|n| *n >= 1 << 20)
                .ok_or_else(|| {
                    invalid(
                        origin,
                        "exec.memory_max",
                        v,
                        "must be bytes or a number with K, M or G, at least 1M (e.g. \"512M\")",
                    )
                })?;
            Some(n)
        }
    };
    let cpu_max = match &raw.cpu_max {
        None => None,
        Some(v) => {
            let pct = v
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<u64>().ok())
                .filter(|n| (1..=100_000).contains(n))
                .ok_or_else(|| {
                    invalid(
                        origin,
                        "exec.cpu_max",
                        v,
                        "must be a percentage of one CPU, e.g. \"50%\" or \"200%\"",
                    )
                })?;
            // cpu.max: quota and period in microseconds.
            Some(format!("{} 100000", pct * 1000))
        }
    };
    if raw.tasks_max == Some(0) {
        return Err(invalid(origin, "exec.tasks_max", 0, "must be at least 1"));
    }
    Ok(crate::sys::cgroup::RunLimits {
        memory_max,
        cpu_max,
        tasks_max: raw.tasks_max,
    })
}

fn power_settings(
    origin: &Path,
    raw: crate::proto::config::RawPower,
) -> Result<PowerSettings, ConfigError> {
    let command = |key: &'static str, v: Option<Vec<String>>, default: &[&str]| {
        let v = v.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
        if v.is_empty() || v[0].trim().is_empty() {
            return Err(invalid(
                origin,
                key,
                format!("{v:?}"),
                "must be a non-empty command, e.g. [\"systemctl\", \"reboot\"]",
            ));
        }
        Ok(v)
    };
    let timeout = raw.reboot_timeout_seconds.unwrap_or(600);
    if !(1..=86_400).contains(&timeout) {
        return Err(invalid(
            origin,
            "power.reboot_timeout_seconds",
            timeout,
            "must be 1..=86400",
        ));
    }
    Ok(PowerSettings {
        reboot_command: command(
            "power.reboot_command",
            raw.reboot_command,
            &["systemctl", "reboot"],
        )?,
        shutdown_command: command(
            "power.shutdown_command",
            raw.shutdown_command,
            &["systemctl", "poweroff"],
        )?,
        boot_id_path: match raw.boot_id_path {
            Some(p) => non_empty_path(origin, "power.boot_id_path", p)?,
            None => PathBuf::from(crate::sys::bootid::DEFAULT_BOOT_ID_PATH),
        },
        reboot_timeout: Duration::from_secs(timeout),
    })
}

fn payload_settings(
    origin: &Path,
    raw: crate::proto::config::RawPayloads,
) -> Result<PayloadSettings, ConfigError> {
    let d = PayloadSettings::default();
    let mut keys = Vec::new();
    for k in raw.trusted_keys.unwrap_or_default() {
        let bytes = hex::decode(k.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                invalid(
                    origin,
                    "payloads.trusted_keys",
                    &k,
                    "must be a hex ed25519 public key (64 hex digits, as in signing-key.pub)",
                )
            })?;
        let mut a = [0u8; 32];
        a.copy_from_slice(&bytes);
        keys.push(a);
    }
    let require_signed = raw.require_signed_payloads.unwrap_or(false);
    if require_signed && keys.is_empty() {
        return Err(invalid(
            origin,
            "payloads.require_signed_payloads",
            true,
            "needs at least one key in payloads.trusted_keys",
        ));
    }
    let positive = |key: &'static str, v: Option<u64>, default: u64| match v {
        Some(0) => Err(invalid(origin, key, 0, "must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let max_download_bytes_per_second = match raw.max_download_bytes_per_second {
        Some(v) if v < 1024 => {
            return Err(invalid(
                origin,
                "payloads.max_download_bytes_per_second",
                v,
                "must be at least 1024 (or unset for no limit)",
            ))
        }
        v => v,
    };
    Ok(PayloadSettings {
        trusted_keys: keys,
        require_signed,
        reserve_bytes: raw.reserve_bytes,
        max_archive_entries: positive(
            "payloads.max_archive_entries",
            raw.max_archive_entries,
            d.max_archive_entries,
        )?,
        max_unpacked_bytes: positive(
            "payloads.max_unpacked_bytes",
            raw.max_unpacked_bytes,
            d.max_unpacked_bytes,
        )?,
        keep_versions: positive("payloads.keep_versions", raw.keep_versions, d.keep_versions)?,
        max_download_bytes_per_second,
    })
}

/// `controller_urls`, or `controller_url` as its one-element shorthand: exactly one of the
/// two. Each is `https://HOST[:PORT]` (a trailing slash is dropped), none twice.
fn controller_urls(
    origin: &Path,
    one: Option<String>,
    many: Option<Vec<String>>,
) -> Result<Vec<String>, ConfigError> {
    let (key, list) = match (one, many) {
        (Some(one), Some(many)) => {
            return Err(invalid(
                origin,
                "controller_urls",
                format!("{many:?}"),
                &format!("set either controller_urls or controller_url (here {one:?}), not both"),
            ))
        }
        (None, None) => {
            return Err(invalid(
                origin,
                "controller_urls",
                "",
                "is required: the controller replicas as [\"https://HOST[:PORT]\", ...] \
                 (or controller_url = \"https://HOST[:PORT]\" for one)",
            ))
        }
        (Some(one), None) => ("controller_url", vec![one]),
        (None, Some(many)) => ("controller_urls", many),
    };
    if list.is_empty() {
        return Err(invalid(
            origin,
            key,
            "[]",
            "must list at least one https://HOST[:PORT]",
        ));
    }
    let mut urls: Vec<String> = Vec::with_capacity(list.len());
    for raw in list {
        let url = raw.trim();
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| invalid(origin, key, url, "must start with https://"))?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(invalid(
                origin,
                key,
                url,
                "must be https://HOST[:PORT] with no path",
            ));
        }
        let url = format!("https://{host}");
        // Host names are case-insensitive: the same replica twice would only be tried twice.
        if urls.iter().any(|u| u.eq_ignore_ascii_case(&url)) {
            return Err(invalid(origin, key, &raw, "is listed twice"));
        }
        urls.push(url);
    }
    Ok(urls)
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?, path)
    }

    /// `origin` is the file the text came from: relative paths resolve against its directory.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: RawAgent = parse_toml(text, origin)?;
        let controller_urls = controller_urls(origin, raw.controller_url, raw.controller_urls)?;
        let mut warnings = Vec::new();
        if let Some(p) = &raw.pool_id {
            warnings.push(format!(
                "config {}: key `pool_id` = {p:?} is ignored: the controller decides a machine's \
                 pool (from its enrollment token, its certificate, or an operator's move); \
                 remove the key",
                origin.display()
            ));
        }
        if let Some(m) = &raw.machine_id {
            if let Err(e) = crate::pki::validate_name("machine_id", m) {
                return Err(invalid(origin, "machine_id", m, &e.to_string()));
            }
        }
        let machine_id = raw.machine_id;
        let enrollment = match (raw.enrollment_token_file, raw.enrollment_token) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    origin,
                    "enrollment_token",
                    "…",
                    "set either enrollment_token_file or enrollment_token, not both",
                ))
            }
            (Some(f), None) => Some(TokenSource::File(non_empty_path(
                origin,
                "enrollment_token_file",
                f,
            )?)),
            (None, Some(t)) if t.trim().is_empty() => {
                return Err(invalid(origin, "enrollment_token", "", "must not be empty"))
            }
            (None, Some(t)) => Some(TokenSource::Inline(t.trim().to_string())),
            (None, None) => None,
        };
        let secs = |key: &'static str, v: Option<u64>, default: u64, max: u64| {
            let v = v.unwrap_or(default);
            if v > max {
                return Err(invalid(origin, key, v, &format!("must be at most {max}")));
            }
            Ok(v)
        };
        let kill_grace = secs(
            "exec.kill_grace_seconds",
            raw.exec.kill_grace_seconds,
            10,
            3600,
        )?;
        let c = raw.connection;
        let retry_initial = secs(
            "connection.retry_initial_ms",
            c.retry_initial_ms,
            500,
            600_000,
        )?;
        let retry_max = secs("connection.retry_max_ms", c.retry_max_ms, 30_000, 3_600_000)?;
        if retry_initial == 0 {
            return Err(invalid(
                origin,
                "connection.retry_initial_ms",
                0,
                "must be at least 1",
            ));
        }
        if retry_max < retry_initial {
            return Err(invalid(
                origin,
                "connection.retry_max_ms",
                retry_max,
                "must not be below connection.retry_initial_ms",
            ));
        }
        let long_poll = secs("connection.long_poll_seconds", c.long_poll_seconds, 25, 300)?;
        if long_poll == 0 {
            return Err(invalid(
                origin,
                "connection.long_poll_seconds",
                0,
                "must be at least 1",
            ));
        }
        let heartbeat = secs(
            "connection.heartbeat_seconds",
            c.heartbeat_seconds,
            60,
            86_400,
        )?;
        if heartbeat == 0 {
            return Err(invalid(
                origin,
                "connection.heartbeat_seconds",
                0,
                "must be at least 1",
            ));
        }
        let state_dir = non_empty_path(
            origin,
            "state_dir",
            raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        )?;
        let image_root = match raw.image_root {
            Some(p) => non_empty_path(origin, "image_root", p)?,
            None => state_dir.join("images"),
        };
        let data_dir = match raw.data_dir {
            Some(p) => non_empty_path(origin, "data_dir", p)?,
            None => state_dir.join("data"),
        };
        if data_dir == Path::new("/") || image_root == Path::new("/") {
            return Err(invalid(
                origin,
                if data_dir == Path::new("/") {
                    "data_dir"
                } else {
                    "image_root"
                },
                "/",
                "must not be the root directory",
            ));
        }
        Ok(AgentConfig {
            controller_urls,
            machine_id,
            enrollment,
            warnings,
            state_dir,
            image_root,
            data_dir,
            gpu: raw.gpu,
            socket_path: non_empty_path(
                origin,
                "socket_path",
                raw.socket_path
                    .unwrap_or_else(|| DEFAULT_SOCKET_PATH.into()),
            )?,
            socket_group: match raw.socket_group {
                Some(g) if g.trim().is_empty() => {
                    return Err(invalid(origin, "socket_group", "", "must not be empty"))
                }
                g => g,
            },
            tls: TlsFiles::from_raw(origin, raw.tls)?,
            kill_grace: Duration::from_secs(kill_grace),
            cgroups: raw.exec.cgroups.unwrap_or(true),
            cgroup_root: match raw.exec.cgroup_root.clone() {
                Some(p) => Some(non_empty_path(origin, "exec.cgroup_root", p)?),
                None => None,
            },
            limits: run_limits(origin, &raw.exec)?,
            retry_initial: Duration::from_millis(retry_initial),
            retry_max: Duration::from_millis(retry_max),
            long_poll: Duration::from_secs(long_poll),
            heartbeat_every: Duration::from_secs(heartbeat),
            payloads: payload_settings(origin, raw.payloads)?,
            power: power_settings(origin, raw.power)?,
            sessions: crate::sys::sessions::SessionSource {
                logind: raw.sessions.logind.unwrap_or(true),
                utmp_path: match raw.sessions.utmp_path {
                    Some(p) => non_empty_path(origin, "sessions.utmp_path", p)?,
                    None => PathBuf::from(crate::sys::sessions::DEFAULT_UTMP),
                },
                tty_dir: match raw.sessions.tty_dir {
                    Some(p) => non_empty_path(origin, "sessions.tty_dir", p)?,
                    None => PathBuf::from("/dev"),
                },
            },
            metrics_textfile: match raw.metrics.textfile {
                Some(p) => {
                    let every = raw.metrics.textfile_every_seconds.unwrap_or(15);
                    if !(1..=3600).contains(&every) {
                        return Err(invalid(
                            origin,
                            "metrics.textfile_every_seconds",
                            every,
                            "must be 1..=3600",
                        ));
                    }
                    let p = non_empty_path(origin, "metrics.textfile", p)?;
                    if p.extension().and_then(|e| e.to_str()) != Some("prom") {
                        return Err(invalid(
                            origin,
                            "metrics.textfile",
                            p.display(),
                            "must end in .prom (node_exporter's textfile collector reads only those)",
                        ));
                    }
                    Some((p, Duration::from_secs(every)))
                }
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
controller_url = "https://ctl.example:8443/"
machine_id = "m1"
[tls]
ca = "pki/ca.pem"
cert = "/etc/fieldhand/m1.pem"
key = "pki/m1-key.pem"
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let c = AgentConfig::parse(MIN, Path::new("/etc/fieldhand/agent.toml")).unwrap();
        assert_eq!(
            c.controller_urls,
            vec!["https://ctl.example:8443".to_string()]
        );
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(c.tls.ca, PathBuf::from("/etc/fieldhand/pki/ca.pem"));
        assert_eq!(c.tls.cert, PathBuf::from("/etc/fieldhand/m1.pem"));
        assert_eq!(c.kill_grace, Duration::from_secs(10));
    }

    fn err(text: &str) -> String {
        AgentConfig::parse(text, Path::new("a.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&MIN.replace("https://", "http://")).contains("controller_url"));
        assert!(err(&MIN.replace("\"m1\"", "\"bad id\"")).contains("machine_id"));
        let unknown = format!("{MIN}\n[exec]\nkill_grace = 3\n");
        assert!(err(&unknown).contains("kill_grace"), "{}", err(&unknown));
        let both = format!("enrollment_token = \"a.b\"\nenrollment_token_file = \"t\"\n{MIN}");
        assert!(err(&both).contains("enrollment_token"), "{}", err(&both));
        let backwards = format!("{MIN}\n[connection]\nretry_initial_ms = 500\nretry_max_ms = 10\n");
        assert!(err(&backwards).contains("connection.retry_max_ms"));
    }

    #[test]
    fn controller_urls_list_the_replicas_in_order() {
        let many = MIN.replace(
            "controller_url = \"https://ctl.example:8443/\"",
            "controller_urls = [\"https://a:8443/\", \" https://b:8443\", \"https://[::1]:9\"]",
        );
        let c = AgentConfig::parse(&many, Path::new("a.toml")).unwrap();
        assert_eq!(
            c.controller_urls,
            vec!["https://a:8443", "https://b:8443", "https://[::1]:9"]
        );
        // The shorthand is a list of one.
        let one = MIN.replace(
            "controller_url = \"https://ctl.example:8443/\"",
            "controller_urls = [\"https://ctl.example:8443\"]",
        );
        assert_eq!(
            AgentConfig::parse(&one, Path::new("a.toml")).unwrap(),
            AgentConfig::parse(MIN, Path::new("a.toml")).unwrap()
        );
    }

    #[test]
    fn controller_urls_errors_name_the_key_and_the_value() {
        let with = |line: &str| MIN.replace("controller_url = \"https://ctl.example:8443/\"", line);
        for (line, key, value) in [
            ("controller_urls = []", "controller_urls", "[]"),
            (
                "controller_urls = [\"https://a:8443\", \"https://A:8443/\"]",
                "controller_urls",
                "https://A:8443/",
            ),
            (
                "controller_urls = [\"https://a:8443\", \"http://b:8443\"]",
                "controller_urls",
                "http://b:8443",
            ),
            (
                "controller_urls = [\"https://a:8443/x\"]",
                "controller_urls",
                "https://a:8443/x",
            ),
            (
                "controller_url = \"https://a\"\ncontroller_urls = [\"https://b\"]",
                "controller_urls",
                "https://b",
            ),
            (
                "controller_url = \"http://a\"",
                "controller_url",
                "http://a",
            ),
            ("", "controller_urls", "is required"),
        ] {
            let e = err(&with(line));
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(value),
                "{line}: {e}"
            );
        }
        let e = err(&with(
            "controller_url = \"https://a\"\ncontroller_urls = [\"https://b\"]",
        ));
        assert!(e.contains("not both") && e.contains("https://a"), "{e}");
    }

    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../../packaging/agent.toml");
        let c = AgentConfig::parse(text, Path::new(DEFAULT_PATH)).unwrap();
        assert_eq!(
            c.controller_urls,
            vec!["https://fieldhand-controller.example:8443"]
        );
    }

    #[test]
    fn an_old_pool_id_is_a_warning_that_names_the_key() {
        let old = format!("pool_id = \"pool-a\"\n{MIN}");
        let c = AgentConfig::parse(&old, Path::new("/etc/fieldhand/agent.toml")).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("`pool_id`"), "{:?}", c.warnings);
        assert!(AgentConfig::parse(MIN, Path::new("a.toml"))
            .unwrap()
            .warnings
            .is_empty());
        let tok = format!("enrollment_token_file = \"token\"\n{MIN}");
        let c = AgentConfig::parse(&tok, Path::new("/etc/fieldhand/agent.toml")).unwrap();
        assert_eq!(
            c.enrollment,
            Some(TokenSource::File("/etc/fieldhand/token".into()))
        );
    }

    #[test]
    fn run_limits_are_parsed_and_checked() {
        let ok =
            format!("{MIN}\n[exec]\nmemory_max = \"512M\"\ncpu_max = \"50%\"\ntasks_max = 64\n");
        let c = AgentConfig::parse(&ok, Path::new("a.toml")).unwrap();
        assert_eq!(c.limits.memory_max, Some(512 << 20));
        assert_eq!(c.limits.cpu_max.as_deref(), Some("50000 100000"));
        assert_eq!(c.limits.tasks_max, Some(64));
        assert!(c.cgroups);
        for (k, v) in [
            ("memory_max", "\"lots\""),
            ("memory_max", "\"1K\""),
            ("cpu_max", "\"0.5\""),
            ("tasks_max", "0"),
        ] {
            let e = err(&format!("{MIN}\n[exec]\n{k} = {v}\n"));
            assert!(e.contains(&format!("exec.{k}")), "{e}");
        }
    }

    #[test]
    fn payload_settings_are_checked() {
        let c = AgentConfig::parse(MIN, Path::new("a.toml")).unwrap();
        assert_eq!(c.payloads, PayloadSettings::default());
        let key = "ab".repeat(32);
        let ok = format!(
            "{MIN}\n[payloads]\ntrusted_keys = [\"{key}\"]\nrequire_signed_payloads = true\nkeep_versions = 3\n"
        );
        let c = AgentConfig::parse(&ok, Path::new("a.toml")).unwrap();
        assert_eq!(c.payloads.trusted_keys, vec![[0xab; 32]]);
        assert!(c.payloads.require_signed);
        assert_eq!(c.payloads.keep_versions, 3);
        let short = format!("{MIN}\n[payloads]\ntrusted_keys = [\"abcd\"]\n");
        let e = err(&short);
        assert!(
            e.contains("payloads.trusted_keys") && e.contains("abcd"),
            "{e}"
        );
        let lonely = format!("{MIN}\n[payloads]\nrequire_signed_payloads = true\n");
        assert!(err(&lonely).contains("payloads.require_signed_payloads"));
        let zero = format!("{MIN}\n[payloads]\nkeep_versions = 0\n");
        assert!(err(&zero).contains("payloads.keep_versions"));
        let slow = format!("{MIN}\n[payloads]\nmax_download_bytes_per_second = 10\n");
        assert!(err(&slow).contains("max_download_bytes_per_second"));
    }
}
