//! The controller's content-addressed payload store under `data_dir/blobs`: streamed uploads
//! (`POST /v1/blobs`), ranged downloads for agents (`GET /agent/v1/blobs/{sha256}`), and a
//! count of bytes served per blob so resumed downloads are observable.

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

use super::api::ApiError;
use crate::net::Body;
use crate::proto::api;

/// Chunk size for streaming a blob out; large chunks keep per-frame overhead negligible.
const CHUNK: usize = 1 << 20;

pub struct BlobStore {
    root: PathBuf,
    served: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "INTERNAL_ERROR",
        format!("cannot {what} {}: {e}", path.display()),
    )
}

impl BlobStore {
    /// Opens (creating) `data_dir/blobs` and removes uploads a crash left half-written.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("blobs");
        crate::sys::fsutil::ensure_dir(&root.join("sha256"), 0o700)?;
        let tmp = root.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        crate::sys::fsutil::ensure_dir(&tmp, 0o700)?;
        Ok(BlobStore {
            root,
            served: Mutex::new(HashMap::new()),
        })
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
    /// its digest. Storing a blob that exists already leaves the existing one untouched.
    pub async fn upload(&self, mut body: Incoming) -> Result<api::Blob, ApiError> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
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
            while let Some(frame) = body.frame().await {
                let frame = frame
                    .map_err(|e| ApiError::invalid(format!("the upload was interrupted: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    hasher.update(&data);
                    size += data.len() as u64;
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
            } else {
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
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
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
                            error_code: "RANGE_NOT_SATISFIABLE".into(),
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
                "INTERNAL_ERROR",
                e.to_string(),
            )
        })
    }
}

fn unknown(sha256: &str) -> ApiError {
    ApiError::not_found("NOT_FOUND", format!("no blob with sha256 {sha256:?}"))
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
    fn digests_are_lowercase_hex_of_64() {
        assert!(valid_sha256(&"a1".repeat(32)));
        assert!(!valid_sha256(&"A1".repeat(32)));
        assert!(!valid_sha256("../../etc/passwd"));
    }
}
