//! This state directory's identity on disk: the instance id that tells two agents behind one
//! certificate apart, and `fieldhand seal`, which removes everything that makes a golden
//! image's machine itself before it is cloned.

use std::path::PathBuf;

use super::AgentError;
use crate::config::agent::AgentConfig;

/// The id of this state directory's agent: made once (random), kept across restarts and
/// reboots, gone with `fieldhand seal`. Two agents behind one certificate differ in it (or in
/// the boot id), which is how the controller tells them apart.
pub(super) fn instance_id(state_dir: &std::path::Path) -> Result<String, AgentError> {
    let path = state_dir.join("instance-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(s.to_string());
        }
    }
    let mut b = [0u8; 12];
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AgentError::Dir {
            path: path.clone(),
            source: std::io::Error::other("the system random source failed"),
        })?;
    let id = hex::encode(b);
    crate::sys::fsutil::atomic_write(&path, format!("{id}\n").as_bytes(), 0o600)
        .map_err(|source| AgentError::Dir { path, source })?;
    Ok(id)
}

/// A boot id as it may stand in the session header (letters, digits, `-`).
pub(super) fn session_safe(boot_id: &str) -> String {
    boot_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The files `seal` removes: everything that makes this machine itself to the controller
/// (certificate, key, instance id) and its record of work (state, outbox). Staged software,
/// images and the data area stay: they are the golden image's content.
pub fn seal(cfg: &AgentConfig) -> Result<Vec<PathBuf>, AgentError> {
    let lock = cfg.state_dir.join("agent.lock");
    let _guard = if cfg.state_dir.exists() {
        Some(
            crate::sys::fsutil::lock_exclusive(&lock).map_err(|e| match e {
                crate::sys::fsutil::LockError::Held { pid, .. } => AgentError::Locked {
                    dir: cfg.state_dir.clone(),
                    pid,
                },
                e => AgentError::Lock(e),
            })?,
        )
    } else {
        None
    };
    let with = |p: &PathBuf, s: &str| {
        let mut o = p.as_os_str().to_owned();
        o.push(s);
        PathBuf::from(o)
    };
    let mut candidates = vec![
        cfg.tls.cert.clone(),
        cfg.tls.key.clone(),
        with(&cfg.tls.cert, ".new"),
        with(&cfg.tls.key, ".new"),
    ];
    for name in [
        "state.json",
        "instance-id",
        "outbox",
        "outbox-rejected",
        "work",
    ] {
        candidates.push(cfg.state_dir.join(name));
    }
    let mut removed = Vec::new();
    for p in candidates {
        let res = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(_) => continue,
        };
        res.map_err(|source| AgentError::Dir {
            path: p.clone(),
            source,
        })?;
        removed.push(p);
    }
    Ok(removed)
}
