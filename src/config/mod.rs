//! Configuration: TOML parsed into raw serde structs (`deny_unknown_fields`), then validated into
//! typed configs. `parse` is pure; `load` reads the file and calls it. Every error names the key.
//! Relative paths are resolved against the config file's directory, so a config can travel with
//! its certificates.

pub mod agent;
pub mod controller;
pub mod ctl;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: key `{key}` = {value:?}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })
}

/// Resolves `p` against the directory holding the config file.
fn resolve(origin: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match origin.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

fn invalid(origin: &Path, key: &'static str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        path: origin.to_path_buf(),
        key,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn non_empty_path(origin: &Path, key: &'static str, p: PathBuf) -> Result<PathBuf, ConfigError> {
    if p.as_os_str().is_empty() {
        return Err(invalid(origin, key, "", "must not be empty"));
    }
    Ok(resolve(origin, &p))
}

/// The `[tls]` table both configs share: the CA that signs every peer, and our own pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Names the config key of the file a TLS error is about.
    pub fn explain(&self, e: crate::tls::TlsError) -> crate::tls::KeyedTlsError {
        let p = e.path();
        let key = if p == self.ca {
            "tls.ca"
        } else if p == self.cert {
            "tls.cert"
        } else {
            "tls.key"
        };
        crate::tls::KeyedTlsError { key, error: e }
    }

    fn from_raw(origin: &Path, raw: crate::proto::config::RawTls) -> Result<Self, ConfigError> {
        Ok(TlsFiles {
            ca: non_empty_path(origin, "tls.ca", raw.ca)?,
            cert: non_empty_path(origin, "tls.cert", raw.cert)?,
            key: non_empty_path(origin, "tls.key", raw.key)?,
        })
    }
}
