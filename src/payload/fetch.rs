//! Verified downloads: a payload is streamed from the controller into `partial/`, hashed as
//! it arrives, resumed after interruptions (even across agent restarts) with `Range` +
//! `If-Range`, and moved into `verified/` only once its size and sha256 match.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{header, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::net::client::HttpsClient;
use crate::proto::agent::{PayloadManifest, PayloadRef};
use crate::proto::domain::ErrorCode;
use crate::proto::state::PartialDownload;
use crate::sys::{clock, fsutil};

/// How much is written between checkpoints of the resume offset. Checkpoints are hints, not
/// fsynced: a resumed prefix is re-hashed, and a resumed download that fails its sha256 is
/// restarted from zero, so a prefix torn by a power cut costs a re-download, never a bad
/// payload.
const CHECKPOINT: u64 = 16 << 20;
const WRITE_BUFFER: usize = 4 << 20;
const ATTEMPTS: u32 = 5;

/// What the download may rely on from the agent config.
#[derive(Debug, Clone, Default)]
pub struct FetchSettings {
    pub trusted_keys: Vec<[u8; 32]>,
    pub require_signed: bool,
    pub max_bytes_per_second: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{name}: download from {url} failed: {reason}")]
    Download {
        name: String,
        url: String,
        reason: String,
    },
    #[error("{name}: received {got} bytes, expected {want}")]
    Size { name: String, got: u64, want: u64 },
    #[error("{name}: sha256 is {got}, expected {want}")]
    Hash {
        name: String,
        got: String,
        want: String,
    },
    #[error("{name}: the payload is not signed, and payloads.require_signed_payloads is set")]
    Unsigned { name: String },
    #[error("{name}: the signature does not verify against any of payloads.trusted_keys")]
    BadSignature { name: String },
    #[error("{name}: the signature expired at {expires_at}")]
    Expired { name: String, expires_at: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FetchError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FetchError::Download { .. } => ErrorCode::DownloadFailed,
            FetchError::Size { .. } => ErrorCode::SizeMismatch,
            FetchError::Hash { .. } => ErrorCode::HashMismatch,
            FetchError::Unsigned { .. } => ErrorCode::SignatureRequired,
            FetchError::BadSignature { .. } => ErrorCode::SignatureInvalid,
            FetchError::Expired { .. } => ErrorCode::SignatureExpired,
            FetchError::Io { .. } => ErrorCode::StagingIoError,
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks the payload's signature before a byte is downloaded.
pub fn check_signature(
    r: &PayloadRef,
    s: &FetchSettings,
    now: OffsetDateTime,
) -> Result<(), FetchError> {
    let name = r.name.clone();
    let Some(sig) = &r.signature else {
        return if s.require_signed {
            Err(FetchError::Unsigned { name })
        } else {
            Ok(())
        };
    };
    if s.trusted_keys.is_empty() {
        // Signed, but we were given nothing to check against: only a problem if required.
        return if s.require_signed {
            Err(FetchError::BadSignature { name })
        } else {
            Ok(())
        };
    }
    let manifest = PayloadManifest {
        sha256: r.sha256.clone(),
        size: r.size,
        name: r.name.clone(),
        expires_at: sig.expires_at.clone(),
    };
    if !super::sign::verify(&s.trusted_keys, &manifest, &sig.ed25519) {
        return Err(FetchError::BadSignature { name });
    }
    match clock::parse_rfc3339(&sig.expires_at) {
        Some(t) if t > now => Ok(()),
        _ => Err(FetchError::Expired {
            name,
            expires_at: sig.expires_at.clone(),
        }),
    }
}

/// The on-disk layout of the payload cache under `root` (`state_dir/payloads`).
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn new(root: PathBuf) -> Self {
        Cache { root }
    }
    pub fn partial_dir(&self) -> PathBuf {
        self.root.join("partial")
    }
    pub fn verified(&self, sha256: &str) -> PathBuf {
        self.root.join("verified").join(sha256)
    }
    fn part(&self, sha256: &str) -> PathBuf {
        self.partial_dir().join(format!("{sha256}.part"))
    }
    fn record(&self, sha256: &str) -> PathBuf {
        self.partial_dir().join(format!("{sha256}.json"))
    }

    pub fn ensure(&self) -> std::io::Result<()> {
        fsutil::ensure_dir(&self.partial_dir(), 0o700)?;
        fsutil::ensure_dir(&self.root.join("verified"), 0o700)
    }

    /// Bytes of `sha256` already on disk (verified, or a resumable prefix).
    pub fn have(&self, sha256: &str) -> u64 {
        if let Ok(m) = std::fs::metadata(self.verified(sha256)) {
            return m.len();
        }
        self.read_record(sha256).map(|r| r.offset).unwrap_or(0)
    }

    fn read_record(&self, sha256: &str) -> Option<PartialDownload> {
        let text = std::fs::read(self.record(sha256)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Removes partial downloads and verified payloads not in `keep` (start-up cleanup).
    pub fn prune(&self, keep: &[String]) {
        for dir in [self.partial_dir(), self.root.join("verified")] {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let sha = name.split('.').next().unwrap_or("");
                if !keep.iter().any(|k| k == sha) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    pub fn discard(&self, sha256: &str) {
        let _ = std::fs::remove_file(self.part(sha256));
        let _ = std::fs::remove_file(self.record(sha256));
        let _ = std::fs::remove_file(self.verified(sha256));
    }
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Writes a small hint file by rename (never torn), without the cost of an fsync.
fn write_hint(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Downloads and verifies `r`; returns the path of the verified file. `progress` gets the
/// bytes on disk so far. Transient failures are retried (resuming) a few times.
pub async fn fetch(
    client: &HttpsClient,
    cache: &Cache,
    r: &PayloadRef,
    s: &FetchSettings,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<PathBuf, FetchError> {
    let done = cache.verified(&r.sha256);
    if std::fs::metadata(&done)
        .map(|m| m.len() == r.size)
        .unwrap_or(false)
    {
        let path = done.clone();
        let sum = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .ok()
            .and_then(Result::ok);
        if sum.as_deref() == Some(r.sha256.as_str()) {
            progress(r.size);
            return Ok(done);
        }
        cache.discard(&r.sha256);
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match fetch_once(client, cache, r, s, progress).await {
            Ok(p) => return Ok(p),
            Err(e @ FetchError::Download { .. }) if attempt < ATTEMPTS => {
                tracing::warn!(name = %r.name, attempt, error = %e, "download interrupted; resuming");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The kept prefix of a partial download, opened for appending, with its hash so far.
struct Sink {
    file: std::fs::File,
    hasher: Sha256,
    offset: u64,
}

/// Opens the `.part` file; keeps (and re-hashes) the recorded prefix if `keep` is set.
fn open_sink(part: &Path, keep: Option<u64>) -> std::io::Result<Sink> {
    use std::io::{Read, Seek};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)?;
    let mut hasher = Sha256::new();
    let keep = keep.unwrap_or(0);
    file.set_len(keep)?;
    file.seek(std::io::SeekFrom::Start(0))?;
    let copied = std::io::copy(&mut (&mut file).take(keep), &mut hasher)?;
    file.seek(std::io::SeekFrom::Start(copied))?;
    Ok(Sink {
        file,
        hasher,
        offset: copied,
    })
}

async fn fetch_once(
    client: &HttpsClient,
    cache: &Cache,
    r: &PayloadRef,
    s: &FetchSettings,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<PathBuf, FetchError> {
    let part = cache.part(&r.sha256);
    let record_path = cache.record(&r.sha256);
    let on_disk = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let resume = cache
        .read_record(&r.sha256)
        .filter(|p| p.sha256 == r.sha256 && p.size == r.size && p.offset <= on_disk)
        .filter(|p| p.offset > 0 && p.offset < r.size);
    let open = |keep: Option<u64>| {
        let part = part.clone();
        async move {
            tokio::task::spawn_blocking(move || open_sink(&part, keep))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
        }
    };
    let mut sink = open(resume.as_ref().map(|p| p.offset))
        .await
        .map_err(io(&part))?;
    let path = format!("/agent/v1/blobs/{}", r.sha256);
    let mut headers = Vec::new();
    if let (Some(p), true) = (&resume, sink.offset > 0) {
        headers.push((header::RANGE, format!("bytes={}-", sink.offset)));
        headers.push((header::IF_RANGE, p.etag.clone()));
    }
    let failed = |url: &str, reason: String| FetchError::Download {
        name: r.name.clone(),
        url: url.to_string(),
        reason,
    };
    let resp = client
        .get_stream(&path, &headers, Duration::from_secs(30))
        .await
        .map_err(|e| failed(&format!("{}{path}", client.base_url()), e.to_string()))?;
    let url = resp.url.clone();
    let whole = match resp.status {
        StatusCode::PARTIAL_CONTENT if sink.offset > 0 => {
            let want = format!("bytes {}-{}/{}", sink.offset, r.size - 1, r.size);
            let got = resp
                .headers
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if got != want {
                // Not the bytes we asked for: trust nothing and start over next attempt.
                cache.discard(&r.sha256);
                return Err(failed(
                    &url,
                    format!("Content-Range {got:?} does not match {want:?}; restarting"),
                ));
            }
            false
        }
        StatusCode::OK => true,
        StatusCode::RANGE_NOT_SATISFIABLE => {
            cache.discard(&r.sha256);
            return Err(failed(&url, "range not satisfiable; restarting".into()));
        }
        other => {
            let body = resp
                .body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            return Err(failed(&url, format!("HTTP {other}: {text}")));
        }
    };
    if whole && sink.offset > 0 {
        // A full answer (the validator changed): start from byte 0.
        drop(sink);
        sink = open(None).await.map_err(io(&part))?;
    }
    let etag = resp
        .headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let start = sink.offset;

    // Receiving (TLS) and hashing + writing run on different threads, so the two halves
    // overlap instead of taking turns.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(32);
    let (rec_sha, rec_size, rec_path) = (r.sha256.clone(), r.size, record_path.clone());
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<Sink> {
        use std::io::Write;
        let mut since_checkpoint = 0u64;
        let mut w = std::io::BufWriter::with_capacity(WRITE_BUFFER, sink.file);
        while let Some(data) = rx.blocking_recv() {
            sink.hasher.update(&data);
            w.write_all(&data)?;
            sink.offset += data.len() as u64;
            since_checkpoint += data.len() as u64;
            if since_checkpoint >= CHECKPOINT && !etag.is_empty() {
                since_checkpoint = 0;
                w.flush()?;
                let rec = PartialDownload {
                    sha256: rec_sha.clone(),
                    size: rec_size,
                    etag: etag.clone(),
                    offset: sink.offset,
                };
                write_hint(&rec_path, &serde_json::to_vec(&rec).unwrap_or_default())?;
            }
        }
        w.flush()?;
        sink.file = w.into_inner().map_err(|e| e.into_error())?;
        Ok(sink)
    });
    let mut body = resp.body;
    let started = tokio::time::Instant::now();
    let mut received = 0u64;
    progress(start);
    let streamed: Result<(), FetchError> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| failed(&url, e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received += data.len() as u64;
            if start + received > r.size {
                return Err(FetchError::Size {
                    name: r.name.clone(),
                    got: start + received,
                    want: r.size,
                });
            }
            if tx.send(data).await.is_err() {
                break; // the writer failed; its error is reported below
            }
            progress(start + received);
            if let Some(rate) = s.max_bytes_per_second {
                let due = Duration::from_secs_f64(received as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let sink = writer
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(io(&part))?;
    if let Err(e) = streamed {
        if matches!(e, FetchError::Size { .. }) {
            cache.discard(&r.sha256);
        }
        return Err(e);
    }
    if sink.offset != r.size {
        // A complete HTTP answer (hyper reports cut connections as errors, which are retried)
        // that is shorter than the payload: the served blob is not the one we were promised.
        cache.discard(&r.sha256);
        return Err(FetchError::Size {
            name: r.name.clone(),
            got: sink.offset,
            want: r.size,
        });
    }
    let got = hex::encode(sink.hasher.finalize());
    if got != r.sha256 {
        cache.discard(&r.sha256);
        if !whole {
            // The kept prefix may be what was wrong (e.g. torn by a power cut): retry whole.
            return Err(failed(
                &url,
                format!("the resumed download hashed to {got}; restarting from zero"),
            ));
        }
        return Err(FetchError::Hash {
            name: r.name.clone(),
            got,
            want: r.sha256.clone(),
        });
    }
    // Not fsynced here: the consumer makes what it keeps durable (extracted trees are synced
    // before they are published), and a verified file found later is re-hashed before use.
    drop(sink.file);
    let dest = cache.verified(&r.sha256);
    std::fs::rename(&part, &dest).map_err(io(&dest))?;
    let _ = std::fs::remove_file(&record_path);
    if let Some(dir) = dest.parent() {
        fsutil::fsync_dir(dir).map_err(io(dir))?;
    }
    Ok(dest)
}
