//! The controller's content-addressed payload store under `data_dir/blobs`: streamed uploads
//! (`POST /v1/blobs`, bounded by `max_blob_bytes`, `blob_quota_bytes` and a time limit per
//! chunk), ranged downloads for agents (`GET /agent/v1/blobs/{sha256}`), a count of bytes
//! served per blob so resumed downloads are observable, and removal: by an operator
//! (`DELETE /v1/blobs/{sha256}`) or, after `blob_retention_seconds`, of any blob nothing
//! refers to.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::errors::ApiError;
use crate::net::Body;
use crate::proto::api;
use crate::proto::domain::ErrorCode;

/// An upload untouched this long was abandoned (its request is long gone).
const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Chunk size for streaming a blob out; large chunks keep per-frame overhead negligible.
const CHUNK: usize = 1 << 20;

pub struct BlobStore {
    root: PathBuf,
    served: Mutex<HashMap<String, Arc<AtomicU64>>>,
    limits: crate::config::controller::BlobLimits,
    /// Bytes stored, and bytes of uploads under way (counted against the quota as they come).
    used: AtomicU64,
}

/// Every blob digest a JSON document names (fields called `sha256`, at any depth).
pub fn digests_in(json: &str, out: &mut std::collections::HashSet<String>) {
    #[allow(clippy::wildcard_enum_match_arm)] // JSON: only objects and arrays hold more
    fn walk(v: &serde_json::Value, out: &mut std::collections::HashSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match v {
                        serde_json::Value::String(s) if k == "sha256" && valid_sha256(s) => {
                            out.insert(s.clone());
                        }
                        v => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
        walk(&v, out);
    }
}

/// Reads (and drops) a little more of a refused upload, so a client still sending it reads
/// our 413 instead of a broken pipe; bounded (8 MiB, 2 s), so a flood cannot hold us.
async fn linger(body: &mut Incoming) {
    let mut left: i64 = 8 << 20;
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while left > 0 {
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(Ok(f))) => left -= f.data_ref().map_or(0, |d| d.len() as i64),
            _ => return,
        }
    }
}

fn too_large(msg: String) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        msg,
    )
}

pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::InternalError,
        format!("cannot {what} {}: {e}", path.display()),
    )
}

impl BlobStore {
    /// Opens (creating) `data_dir/blobs` and removes uploads a crash left half-written.
    pub fn open(
        root: &Path,
        limits: crate::config::controller::BlobLimits,
    ) -> std::io::Result<Self> {
        let root = root.to_path_buf();
        crate::sys::fsutil::ensure_dir(&root.join("sha256"), 0o700)?;
        let tmp = root.join("tmp");
        crate::sys::fsutil::ensure_dir(&tmp, 0o700)?;
        // Uploads a crash left half-written. Only old ones: the directory may be shared with
        // other replicas (PostgreSQL), whose uploads in progress stay.
        for e in std::fs::read_dir(&tmp)?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_UPLOAD);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let used = std::fs::read_dir(root.join("sha256"))?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        Ok(BlobStore {
            root,
            served: Mutex::new(HashMap::new()),
            limits,
            used: AtomicU64::new(used),
        })
    }

    /// Bytes stored (and being uploaded).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Removes a blob; `false` if there was none.
    pub fn remove(&self, sha256: &str) -> Result<Option<u64>, ApiError> {
        let Some(size) = self.size(sha256) else {
            return Ok(None);
        };
        let p = self.path(sha256);
        // The space is free once the blob is gone (a reader that sees it gone may upload at
        // once), so the count drops first and comes back if the removal fails.
        self.used.fetch_sub(size, Ordering::Relaxed);
        if let Err(e) = std::fs::remove_file(&p) {
            self.used.fetch_add(size, Ordering::Relaxed);
            return Err(internal("remove", &p, e));
        }
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sha256);
        Ok(Some(size))
    }

    /// Blobs older than the retention that `referenced` does not name: `(sha256, size)`.
    pub fn expired(&self, referenced: &std::collections::HashSet<String>) -> Vec<(String, u64)> {
        let Ok(rd) = std::fs::read_dir(self.root.join("sha256")) else {
            return Vec::new();
        };
        let now = crate::sys::clock::system_now();
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let m = e.metadata().ok()?;
                let age = now.duration_since(m.modified().ok()?).unwrap_or_default();
                (valid_sha256(&name) && !referenced.contains(&name) && age >= self.limits.retention)
                    .then_some((name, m.len()))
            })
            .collect()
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256)
    }

    /// Size of a stored blob, if it exists.
    pub fn size(&self, sha256: &str) -> Option<u64> {
        if !valid_sha256(sha256) {
            return None;
        }
        std::fs::metadata(self.path(sha256)).ok().map(|m| m.len())
    }

    fn counter(&self, sha256: &str) -> Arc<AtomicU64> {
        let mut m = self.served.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(sha256.to_string()).or_default().clone()
    }

    pub fn info(&self, sha256: &str) -> Result<api::Blob, ApiError> {
        let size = self.size(sha256).ok_or_else(|| unknown(sha256))?;
        Ok(api::Blob {
            sha256: sha256.to_string(),
            size,
            bytes_served: Some(self.counter(sha256).load(Ordering::Relaxed)),
        })
    }

    /// Streams the request body to a temp file while hashing, then moves it into place under
    /// its digest. Storing a blob that exists already leaves the existing one untouched. An
    /// upload past `max_blob_bytes` or the quota stops there (413, naming the limit); one
    /// whose next chunk takes longer than `chunk_timeout` is dropped (408).
    pub async fn upload(
        &self,
        mut body: Incoming,
        declared: Option<u64>,
        chunk_timeout: std::time::Duration,
    ) -> Result<api::Blob, ApiError> {
        let max = self.limits.max_bytes;
        let quota = self.limits.quota_bytes;
        if let Some(n) = declared {
            let refused = if n > max {
                Some(format!(
                    "the blob is {n} bytes, larger than max_blob_bytes {max}"
                ))
            } else if self.used().saturating_add(n) > quota {
                Some(format!(
                    "storing {n} more bytes would pass blob_quota_bytes {quota} ({} used); delete blobs nothing needs (DELETE /v1/blobs/{{sha256}})",
                    self.used()
                ))
            } else {
                None
            };
            if let Some(msg) = refused {
                linger(&mut body).await;
                return Err(too_large(msg));
            }
        }
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        // Bytes of this upload counted in `used` so far (released unless it is stored).
        let counted = AtomicU64::new(0);
        let result = async {
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .await
                .map_err(|e| internal("create", &tmp, e))?;
            let mut w = tokio::io::BufWriter::with_capacity(CHUNK, file);
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            loop {
                let frame = match tokio::time::timeout(chunk_timeout, body.frame()).await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) => {
                        return Err(ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            ErrorCode::RequestTimeout,
                            format!(
                                "no data for {} s (request_body_timeout_seconds); the upload was dropped",
                                chunk_timeout.as_secs()
                            ),
                        ))
                    }
                };
                let frame = frame
                    .map_err(|e| ApiError::invalid(format!("the upload was interrupted: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    hasher.update(&data);
                    size += data.len() as u64;
                    if size > max {
                        return Err(too_large(format!(
                            "the upload passed max_blob_bytes {max}; it was dropped"
                        )));
                    }
                    let before = self.used.fetch_add(data.len() as u64, Ordering::Relaxed);
                    counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if before + data.len() as u64 > quota {
                        return Err(too_large(format!(
                            "the upload passed blob_quota_bytes {quota}; it was dropped"
                        )));
                    }
                    w.write_all(&data)
                        .await
                        .map_err(|e| internal("write", &tmp, e))?;
                }
            }
            w.flush().await.map_err(|e| internal("write", &tmp, e))?;
            let file = w.into_inner();
            file.sync_all()
                .await
                .map_err(|e| internal("sync", &tmp, e))?;
            drop(file);
            let sha256 = hex::encode(hasher.finalize());
            let dest = self.path(&sha256);
            if dest.exists() {
                let _ = tokio::fs::remove_file(&tmp).await;
                self.used.fetch_sub(counted.swap(0, Ordering::Relaxed), Ordering::Relaxed);
                // Stored again: its retention starts over.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&dest)
                    .and_then(|f| f.set_modified(crate::sys::clock::system_now()));
            } else {
                counted.store(0, Ordering::Relaxed);
                tokio::fs::rename(&tmp, &dest)
                    .await
                    .map_err(|e| internal("store", &dest, e))?;
                let dir = self.root.join("sha256");
                crate::sys::fsutil::fsync_dir(&dir).map_err(|e| internal("sync", &dir, e))?;
            }
            Ok(api::Blob {
                sha256,
                size,
                bytes_served: None,
            })
        }
        .await;
        if let Err(e) = &result {
            let _ = tokio::fs::remove_file(&tmp).await;
            self.used
                .fetch_sub(counted.load(Ordering::Relaxed), Ordering::Relaxed);
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                linger(&mut body).await;
            }
        }
        result
    }

    /// Serves a blob, whole or from a `Range: bytes=N-[M]`. `If-Range` with a different
    /// validator yields the whole blob (200), as HTTP says.
    pub fn download(&self, sha256: &str, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
        let size = self.size(sha256).ok_or_else(|| unknown(sha256))?;
        let etag = format!("\"{sha256}\"");
        let range_applies = match headers.get(header::IF_RANGE) {
            None => true,
            Some(v) => v.to_str().map(|v| v == etag).unwrap_or(false),
        };
        let range = match headers.get(header::RANGE) {
            Some(r) if range_applies => Some(parse_range(r.to_str().unwrap_or(""), size)),
            _ => None,
        };
        let (status, start, end) = match range {
            None => (StatusCode::OK, 0, size),
            Some(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
            Some(None) => {
                return Ok(Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(crate::net::full(
                        serde_json::to_vec(&api::ErrorBody {
                            error_code: ErrorCode::RangeNotSatisfiable,
                            error_msg: format!("Range is outside blob {sha256} of {size} bytes"),
                        })
                        .unwrap_or_default(),
                    ))
                    .unwrap_or_default());
            }
        };
        let path = self.path(sha256);
        let mut file = std::fs::File::open(&path).map_err(|e| internal("open", &path, e))?;
        let counter = self.counter(sha256);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = file.seek(SeekFrom::Start(start)) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
            let mut left = end - start;
            while left > 0 {
                let mut buf = vec![0u8; CHUNK.min(left as usize)];
                match file.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
                left -= buf.len() as u64;
                let n = buf.len() as u64;
                // A closed channel means the client went away: stop reading.
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return;
                }
                counter.fetch_add(n, Ordering::Relaxed);
            }
        });
        let mut b = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, end - start)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, &etag);
        if status == StatusCode::PARTIAL_CONTENT {
            b = b.header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{size}", end - 1),
            );
        }
        b.body(crate::net::channel_body(rx)).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::InternalError,
                e.to_string(),
            )
        })
    }
}

fn unknown(sha256: &str) -> ApiError {
    ApiError::not_found(
        ErrorCode::NotFound,
        format!("no blob with sha256 {sha256:?}"),
    )
}

/// One `bytes=N-` or `bytes=N-M` range → half-open `[start, end)`. Multiple ranges and
/// suffix ranges are not needed by agents and are refused like unsatisfiable ones.
pub fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => size,
        m => m.parse::<u64>().ok()?.saturating_add(1).min(size),
    };
    if start >= size || start >= end {
        return None;
    }
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 10)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 10)));
        assert_eq!(parse_range("bytes=4-5", 10), Some((4, 6)));
        assert_eq!(parse_range("bytes=4-99", 10), Some((4, 10)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=5-4", 10), None);
        assert_eq!(parse_range("bytes=-5", 10), None);
        assert_eq!(parse_range("items=0-", 10), None);
    }

    #[test]
    fn digests_are_found_at_any_depth() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let json = format!(
            r#"{{"components":[{{"sha256":"{a}"}}],"image":{{"payload":{{"sha256":"{b}"}}}},"sha256":"short"}}"#
        );
        let mut found = std::collections::HashSet::new();
        digests_in(&json, &mut found);
        assert_eq!(found, [a, b].into_iter().collect());
    }

    #[test]
    fn digests_are_lowercase_hex_of_64() {
        assert!(valid_sha256(&"a1".repeat(32)));
        assert!(!valid_sha256(&"A1".repeat(32)));
        assert!(!valid_sha256("../../etc/passwd"));
    }
}
