//! The operator CLI's connection settings (`fieldhandctl`): each of `url`, `ca`, `cert` and
//! `key` comes from its flag, else its environment variable, else the config file, so a
//! one-off flag beats a shell's `export`, which beats the file an operator keeps.
//!
//! The file is `--config PATH`, else `$FIELDHAND_CTL_CONFIG`, else
//! `$XDG_CONFIG_HOME/fieldhand/ctl.toml` (`~/.config/fieldhand/ctl.toml`). A file named by
//! the flag or the variable must exist; the default one may be absent. Relative paths in the
//! file are resolved against its directory (as in the daemons' configs), relative paths from
//! flags and variables against the working directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{non_empty_path, parse_toml, read, ConfigError, TlsFiles};
use crate::proto::config::RawCtl;

/// Names the config file instead of the default location.
pub const CONFIG_ENV: &str = "FIELDHAND_CTL_CONFIG";

/// What the command line said; `None` where a flag was not given.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub url: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Where to reach the controller, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlConfig {
    pub url: String,
    pub tls: TlsFiles,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlConfigError {
    #[error(
        "no {what}: pass {flag}, set {env}, or set `{key}` in {file}",
        file = match file { Some(f) => f.display().to_string(), None => "the config file (HOME is not set, so there is no default; use --config)".into() }
    )]
    Missing {
        what: &'static str,
        flag: &'static str,
        env: &'static str,
        key: &'static str,
        /// The file that was looked at (it may not exist).
        file: Option<PathBuf>,
    },
    #[error(transparent)]
    File(#[from] ConfigError),
}

/// One setting's three sources, in order of precedence.
struct Setting {
    what: &'static str,
    flag: &'static str,
    env: &'static str,
    key: &'static str,
}

const URL: Setting = Setting {
    what: "controller URL",
    flag: "--url",
    env: "FIELDHAND_URL",
    key: "url",
};
const CA: Setting = Setting {
    what: "CA certificate",
    flag: "--ca",
    env: "FIELDHAND_CA",
    key: "ca",
};
const CERT: Setting = Setting {
    what: "operator certificate",
    flag: "--cert",
    env: "FIELDHAND_CERT",
    key: "cert",
};
const KEY: Setting = Setting {
    what: "operator key",
    flag: "--key",
    env: "FIELDHAND_KEY",
    key: "key",
};

/// The default file: `$XDG_CONFIG_HOME/fieldhand/ctl.toml`, else `$HOME/.config/...`.
pub fn default_path(env: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    match set("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        Some(xdg) => Some(xdg.join("fieldhand/ctl.toml")),
        None => set("HOME").map(|h| h.join(".config/fieldhand/ctl.toml")),
    }
}

impl CtlConfig {
    /// Resolves every setting; `env` reads an environment variable (the process's, in the
    /// binary; a map, in tests). An empty variable counts as unset.
    pub fn resolve(
        flags: Flags,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Self, CtlConfigError> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        let (file, required) = match (flags.config.clone(), var(CONFIG_ENV)) {
            (Some(p), _) => (Some(p), true),
            (None, Some(p)) => (Some(PathBuf::from(p)), true),
            (None, None) => (default_path(env), false),
        };
        let raw = match &file {
            Some(path) if required || path.exists() => parse_toml::<RawCtl>(&read(path)?, path)?,
            Some(_) | None => RawCtl::default(),
        };
        let origin = file.clone().unwrap_or_default();
        let missing = |s: &Setting| CtlConfigError::Missing {
            what: s.what,
            flag: s.flag,
            env: s.env,
            key: s.key,
            file: file.clone(),
        };
        let path = |s: &Setting, flag: Option<PathBuf>, from_file: Option<PathBuf>| match (
            flag,
            var(s.env),
        ) {
            (Some(p), _) => Ok(p),
            (None, Some(p)) => Ok(PathBuf::from(p)),
            (None, None) => match from_file {
                Some(p) => Ok(non_empty_path(&origin, s.key, p)?),
                None => Err(missing(s)),
            },
        };
        let url = match (flags.url, var(URL.env)) {
            (Some(u), _) => u,
            (None, Some(u)) => u.to_string_lossy().into_owned(),
            (None, None) => raw
                .url
                .filter(|u| !u.is_empty())
                .ok_or_else(|| missing(&URL))?,
        };
        Ok(CtlConfig {
            url,
            tls: TlsFiles {
                ca: path(&CA, flags.ca, raw.ca)?,
                cert: path(&CERT, flags.cert, raw.cert)?,
                key: path(&KEY, flags.key, raw.key)?,
            },
        })
    }
}

/// The text of a `ctl.toml` for these settings (the quickstart writes one).
pub fn render(url: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    format!(
        "# fieldhandctl connection settings (flags and FIELDHAND_* variables override them)\nurl = {url:?}\nca = {}\ncert = {}\nkey = {}\n",
        q(ca),
        q(cert),
        q(key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn flag_beats_env_beats_file_and_file_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ctl.toml");
        std::fs::write(
            &file,
            "url = \"https://file:1\"\nca = \"ca.pem\"\ncert = \"op.pem\"\nkey = \"op-key.pem\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let only_file = CtlConfig::resolve(Flags::default(), &env_of(&[(CONFIG_ENV, f)])).unwrap();
        assert_eq!(only_file.url, "https://file:1");
        assert_eq!(only_file.tls.ca, dir.path().join("ca.pem"));
        let env = env_of(&[
            (CONFIG_ENV, f),
            ("FIELDHAND_URL", "https://env:2"),
            ("FIELDHAND_KEY", "k"),
        ]);
        let c = CtlConfig::resolve(Flags::default(), &env).unwrap();
        assert_eq!(
            (c.url.as_str(), c.tls.key.as_path()),
            ("https://env:2", Path::new("k"))
        );
        assert_eq!(c.tls.cert, dir.path().join("op.pem"));
        let flags = Flags {
            url: Some("https://flag:3".into()),
            ..Flags::default()
        };
        assert_eq!(
            CtlConfig::resolve(flags, &env).unwrap().url,
            "https://flag:3"
        );
    }

    #[test]
    fn a_missing_setting_names_flag_variable_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let flags = Flags {
            url: Some("https://x".into()),
            ca: Some("ca".into()),
            key: Some("k".into()),
            ..Flags::default()
        };
        let e = CtlConfig::resolve(flags, &env_of(&[("HOME", home)]))
            .unwrap_err()
            .to_string();
        for word in [
            "--cert",
            "FIELDHAND_CERT",
            "`cert`",
            ".config/fieldhand/ctl.toml",
        ] {
            assert!(e.contains(word), "{word} not in {e}");
        }
    }

    #[test]
    fn a_named_file_must_exist_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ctl.toml");
        let flags = Flags {
            config: Some(file.clone()),
            ..Flags::default()
        };
        let e = CtlConfig::resolve(flags.clone(), &env_of(&[])).unwrap_err();
        assert!(e.to_string().contains("ctl.toml"), "{e}");
        std::fs::write(&file, "url = \"https://x\"\nport = 3\n").unwrap();
        let e = CtlConfig::resolve(flags, &env_of(&[])).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        // The default file may be absent: then the error is about the setting.
        let e = CtlConfig::resolve(
            Flags::default(),
            &env_of(&[("XDG_CONFIG_HOME", dir.path().to_str().unwrap())]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--url"), "{e}");
    }
}
