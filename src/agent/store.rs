//! The agent's files under `state_dir`: the state file (`state.json`) and the durable outbox
//! (`outbox/<seq>.json`, one event per file). Every write is atomic (temp, fsync, rename, fsync
//! the directory). The outbox takes its sequence numbers from the files on disk, so a crash
//! between emitting and persisting the state can never reuse a number and overwrite an event.

use std::path::{Path, PathBuf};

use crate::proto::agent::{AgentEvent, EventBody};
use crate::proto::state::{OutboxRecord, StateFile};
use crate::sys::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(state_dir: &Path) -> Self {
        StateStore {
            path: state_dir.join("state.json"),
        }
    }

    /// The saved state, or a fresh one on first start. A corrupt file is an error, never
    /// silently replaced: it may describe a run whose result is still owed.
    pub fn load(&self) -> Result<StateFile, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
            Err(e) => Err(io("read", &self.path)(e)),
        }
    }

    pub fn save(&self, f: &StateFile) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(f).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        fsutil::atomic_write(&self.path, &bytes, 0o600).map_err(io("write", &self.path))
    }
}

/// Events waiting for delivery, oldest first.
pub struct Outbox {
    dir: PathBuf,
    rejected: PathBuf,
    next_seq: u64,
}

impl Outbox {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("outbox");
        let rejected = state_dir.join("outbox-rejected");
        for d in [&dir, &rejected] {
            fsutil::ensure_dir(d, 0o700).map_err(io("create", d))?;
        }
        let mut ob = Outbox {
            dir,
            rejected,
            next_seq: 1,
        };
        let max = ob.seqs()?.into_iter().max().unwrap_or(0);
        ob.next_seq = max + 1;
        Ok(ob)
    }

    fn file(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }

    fn seqs(&self) -> Result<Vec<u64>, StoreError> {
        let rd = std::fs::read_dir(&self.dir).map_err(io("list", &self.dir))?;
        let mut v = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io("list", &self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Leftover temp files from an interrupted write have another shape and are skipped.
            if let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<u64>().ok())
            {
                v.push(seq);
            }
        }
        v.sort_unstable();
        Ok(v)
    }

    /// Durably appends an event; returns its sequence number.
    pub fn push(&mut self, event: AgentEvent) -> Result<u64, StoreError> {
        let seq = self.next_seq;
        let path = self.file(seq);
        let rec = OutboxRecord { seq, event };
        let bytes = serde_json::to_vec(&rec).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        fsutil::atomic_write(&path, &bytes, 0o600).map_err(io("write", &path))?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// All pending records, oldest first.
    pub fn pending(&self) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut out = Vec::new();
        for seq in self.seqs()? {
            let path = self.file(seq);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("read", &path)(e)),
            };
            out.push(
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    path: path.clone(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// (events, results) waiting.
    pub fn counts(&self) -> Result<(u32, u32), StoreError> {
        let pending = self.pending()?;
        let results = pending
            .iter()
            .filter(|r| matches!(r.event.body, EventBody::Result(_)))
            .count();
        Ok((pending.len() as u32, results as u32))
    }

    /// Events waiting in a shared outbox; 0 when it cannot be read (the delivery loop
    /// reports that).
    pub fn pending_events(outbox: &std::sync::Mutex<Outbox>) -> u32 {
        outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts()
            .map(|(e, _)| e)
            .unwrap_or(0)
    }

    /// Delivered: forget it.
    pub fn remove(&self, seq: u64) -> Result<(), StoreError> {
        let path = self.file(seq);
        match std::fs::remove_file(&path) {
            Ok(()) => fsutil::fsync_dir(&self.dir).map_err(io("sync", &self.dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    /// The controller refused it for good: keep it for an operator, out of the delivery path.
    pub fn reject(&self, seq: u64) -> Result<PathBuf, StoreError> {
        let from = self.file(seq);
        let to = self.rejected.join(format!("{seq:020}.json"));
        std::fs::rename(&from, &to).map_err(io("move", &from))?;
        fsutil::fsync_dir(&self.dir).map_err(io("sync", &self.dir))?;
        Ok(to)
    }
}
