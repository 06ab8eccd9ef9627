//! Crash-safe file writes: after `atomic_write` returns, a power cut leaves either the old
//! content or the new, never a torn file.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// temp file in the same directory, write, fsync, rename over `path`, fsync the directory.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:08x}",
        name.to_string_lossy(),
        std::process::id(),
        fastrand::u32(..)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed `mode`; the caller asked for exactly this.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` (and parents) if missing; a directory we create gets `mode`.
/// An existing directory keeps its mode: an operator may have chosen it.
pub fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", path.display()),
        )),
        Err(_) => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
            Ok(())
        }
    }
}

/// An exclusive lock on a file, held until dropped (or the process dies: the kernel
/// releases it, so a crash never leaves a stale lock).
pub struct LockGuard {
    _lock: nix::fcntl::Flock<fs::File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the lock file {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("{path} is locked by process {pid}")]
    Held {
        path: std::path::PathBuf,
        /// As the holder wrote it; `?` when unreadable.
        pid: String,
    },
}

/// Takes an exclusive, non-blocking `flock` on `path` (created 0600) and writes our pid
/// into it, for the message the next process gets.
pub fn lock_exclusive(path: &Path) -> Result<LockGuard, LockError> {
    let open_err = |source| LockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(open_err)?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let _ = lock.set_len(0);
            let _ = (&*lock).write_all(format!("{}\n", std::process::id()).as_bytes());
            let _ = lock.sync_all();
            Ok(LockGuard { _lock: lock })
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Held {
            path: path.to_path_buf(),
            pid: fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "?".into()),
        }),
        Err((_, e)) => Err(open_err(e.into())),
    }
}

/// Makes a rename or create in `dir` durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one", 0o600).unwrap();
        atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.lock");
        let held = lock_exclusive(&p).unwrap();
        match lock_exclusive(&p) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Held, got {:?}", other.err()),
        }
        drop(held);
        lock_exclusive(&p).unwrap();
    }

    #[test]
    fn ensure_dir_creates_and_rejects_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        ensure_dir(&d, 0o700).unwrap();
        assert!(d.is_dir());
        ensure_dir(&d, 0o700).unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(ensure_dir(&f, 0o700).is_err());
    }
}
