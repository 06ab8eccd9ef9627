//! The HTTPS client used by agents, the CLI and tests. Connections are kept alive: a request
//! takes an idle connection of this client (and its clones) if there is one, so an agent's
//! polls, heartbeats and events do not pay a TLS handshake each (at fleet size, handshakes
//! were a third of the controller's idle CPU). A kept connection is used only while it is
//! young (below the controller's idle limit), and a request that a dead connection never
//! sent is sent again on a fresh one; a request that may have been sent is not retried here
//! (the agent's outbox retries under the same idempotency key). Payload downloads
//! (`get_stream`) keep a connection of their own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::NetError;
use crate::proto::api::ErrorBody;

/// Upper bound on an answer we are willing to buffer.
const MAX_RESPONSE: usize = 64 << 20;
/// Idle connections kept per client (a long poll holds one more while it waits).
const MAX_IDLE: usize = 2;
/// An idle connection older than this is closed rather than used: the controller closes
/// keep-alive connections idle for `request_header_timeout_seconds` (10 s by default), and a
/// request must not race that close.
const IDLE_FOR_AT_MOST: Duration = Duration::from_secs(4);

/// A kept-alive connection waiting for its next request.
struct Idle {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: AbortOnDrop,
    since: std::time::Instant,
}

/// Aborts the connection task when the response is dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response whose body has not been read yet.
pub struct Streamed {
    pub url: String,
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Incoming,
    _conn: AbortOnDrop,
}

#[derive(Clone)]
pub struct HttpsClient {
    base: String,
    host: String,
    port: u16,
    authority: String,
    /// Shared by every clone, so a renewed certificate ([`HttpsClient::set_tls`]) is used by
    /// all of the agent's loops from their next request on.
    tls: Arc<std::sync::RwLock<TlsConnector>>,
    /// Sent with every request (the agent's session header).
    headers: Arc<Vec<(header::HeaderName, String)>>,
    /// Kept-alive connections, shared by every clone.
    idle: Arc<std::sync::Mutex<Vec<Idle>>>,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient")
            .field("base", &self.base)
            .finish()
    }
}

impl HttpsClient {
    /// `url` is `https://HOST[:PORT]`, with an optional trailing slash and no path.
    pub fn new(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, NetError> {
        let bad = |reason: &str| NetError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https://"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad("must be https://HOST[:PORT] with no path"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("port must be a number"))?,
                None if after.is_empty() => 443,
                None => return Err(bad("junk after ']'")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| bad("port must be a number"))?,
                ),
                None => (authority.to_string(), 443),
            }
        };
        if host.is_empty() {
            return Err(bad("host is empty"));
        }
        ServerName::try_from(host.clone()).map_err(|_| bad("host is not a DNS name or IP"))?;
        Ok(HttpsClient {
            base: format!("https://{authority}"),
            host,
            port,
            authority: authority.to_string(),
            tls: Arc::new(std::sync::RwLock::new(TlsConnector::from(tls))),
            headers: Arc::new(Vec::new()),
            idle: Arc::default(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Replaces the TLS configuration (a renewed or newly enrolled certificate) for this
    /// client and all its clones; connections already open keep theirs.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        let mut w = self.tls.write().unwrap_or_else(|p| p.into_inner());
        *w = TlsConnector::from(tls);
        // Kept connections were made with the old certificate.
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// A young idle connection, if there is one.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.since.elapsed() < IDLE_FOR_AT_MOST && !c.sender.is_closed() {
                return Some(c);
            }
        }
        None
    }

    fn keep_idle(&self, c: Idle) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| c.since.elapsed() < IDLE_FOR_AT_MOST && !c.sender.is_closed());
        if idle.len() < MAX_IDLE {
            idle.push(c);
            // Closed when it has been idle too long to use, not when the controller's
            // idle limit closes it: an agent between heartbeats holds no second connection.
            let pool = Arc::downgrade(&self.idle);
            tokio::spawn(async move {
                tokio::time::sleep(IDLE_FOR_AT_MOST).await;
                if let Some(pool) = pool.upgrade() {
                    pool.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|c| c.since.elapsed() < IDLE_FOR_AT_MOST);
                }
            });
        }
    }

    /// A client that sends `name: value` with every request.
    pub fn with_header(mut self, name: header::HeaderName, value: String) -> Self {
        let mut h = (*self.headers).clone();
        h.push((name, value));
        self.headers = Arc::new(h);
        self
    }

    /// One request; the whole exchange (connect, handshake, answer) is bounded by `timeout`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), NetError> {
        self.request_with_headers(method, path, body, content_type, timeout)
            .await
            .map(|(status, _, body)| (status, body))
    }

    /// [`HttpsClient::request`] with the answer's headers (the loopback forwarder passes
    /// them on to the browser).
    pub async fn request_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
        timeout: Duration,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), NetError> {
        let url = format!("{}{}", self.base, path);
        match tokio::time::timeout(
            timeout,
            self.exchange(&url, method, path, body, content_type),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout {
                url,
                after: timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        url: &str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), NetError> {
        let mut headers = Vec::new();
        if let Some(ct) = content_type {
            headers.push((header::CONTENT_TYPE, ct.to_string()));
        }
        let body = body.unwrap_or_default();
        let http_err = |e: hyper::Error| NetError::Http {
            url: url.to_string(),
            reason: describe(&e),
        };
        let mut kept = self.take_idle();
        loop {
            let reused = kept.is_some();
            let (mut sender, driver) = match kept.take() {
                Some(c) => (c.sender, c.driver),
                None => self.connect(url).await?,
            };
            if reused && sender.ready().await.is_err() {
                // Closed while idle: nothing was sent on it.
                continue;
            }
            let req = self.build(url, method.clone(), path, body.clone(), &headers)?;
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                // Never written to the dead connection: safe to send on a fresh one.
                Err(e) if reused && e.is_canceled() => continue,
                Err(e) => return Err(http_err(e)),
            };
            let status = resp.status();
            let head = resp.headers().clone();
            let close = resp
                .headers()
                .get(header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let (_, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| NetError::Http {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            if !close {
                self.keep_idle(Idle {
                    sender,
                    driver,
                    since: std::time::Instant::now(),
                });
            }
            return Ok((status, head, body));
        }
    }

    /// Opens a connection: TCP, TLS, HTTP/1.1. It lives as long as the returned guard.
    async fn connect(
        &self,
        url: &str,
    ) -> Result<
        (
            hyper::client::conn::http1::SendRequest<Full<Bytes>>,
            AbortOnDrop,
        ),
        NetError,
    > {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| NetError::Connect {
                url: url.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|_| NetError::BadUrl {
            url: url.to_string(),
            reason: "host is not a DNS name or IP".into(),
        })?;
        let connector = self.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|source| NetError::Tls {
                url: url.to_string(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(4 << 20)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| NetError::Http {
                url: url.to_string(),
                reason: describe(&e),
            })?;
        let driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        Ok((sender, driver))
    }

    fn build(
        &self,
        url: &str,
        method: Method,
        path: &str,
        body: Bytes,
        headers: &[(header::HeaderName, String)],
    ) -> Result<Request<Full<Bytes>>, NetError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        for (k, v) in self.headers.iter().chain(headers) {
            req = req.header(k, v);
        }
        req.body(Full::new(body)).map_err(|e| NetError::BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })
    }

    /// Connects, sends one request and returns the response head with its unread body. The
    /// connection lives as long as the returned guard.
    async fn send(
        &self,
        url: &str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(header::HeaderName, String)],
    ) -> Result<(http::Response<Incoming>, AbortOnDrop), NetError> {
        let (mut sender, driver) = self.connect(url).await?;
        let req = self.build(url, method, path, body.unwrap_or_default(), headers)?;
        let resp = sender.send_request(req).await.map_err(|e| NetError::Http {
            url: url.to_string(),
            reason: describe(&e),
        })?;
        Ok((resp, driver))
    }

    /// A GET whose body the caller streams (payload downloads). `timeout` bounds the time to
    /// the response head only; the caller bounds the body.
    pub async fn get_stream(
        &self,
        path: &str,
        headers: &[(header::HeaderName, String)],
        timeout: Duration,
    ) -> Result<Streamed, NetError> {
        let url = format!("{}{}", self.base, path);
        let (resp, guard) =
            tokio::time::timeout(timeout, self.send(&url, Method::GET, path, None, headers))
                .await
                .map_err(|_| NetError::Timeout {
                    url: url.clone(),
                    after: timeout,
                })??;
        let (parts, body) = resp.into_parts();
        Ok(Streamed {
            url,
            status: parts.status,
            headers: parts.headers,
            body,
            _conn: guard,
        })
    }

    /// A JSON call. Non-2xx answers become `NetError::Status` with the API's error body;
    /// an empty 2xx body decodes as JSON `null` (so `R = ()` fits 204 answers).
    pub async fn json<T, R>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
        timeout: Duration,
    ) -> Result<R, NetError>
    where
        T: serde::Serialize + ?Sized,
        R: serde::de::DeserializeOwned,
    {
        self.json_with_headers(method, path, body, timeout)
            .await
            .map(|(r, _)| r)
    }

    /// [`HttpsClient::json`], with the response headers (e.g. a listing's next-page cursor).
    pub async fn json_with_headers<T, R>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
        timeout: Duration,
    ) -> Result<(R, http::HeaderMap), NetError>
    where
        T: serde::Serialize + ?Sized,
        R: serde::de::DeserializeOwned,
    {
        let url = format!("{}{}", self.base, path);
        let payload = match body {
            Some(b) => Some(Bytes::from(serde_json::to_vec(b).map_err(|e| {
                NetError::Encode {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            })?)),
            None => None,
        };
        let ct = payload.as_ref().map(|_| "application/json");
        let (status, head, bytes) =
            match tokio::time::timeout(timeout, self.exchange(&url, method, path, payload, ct))
                .await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(NetError::Timeout {
                        url,
                        after: timeout,
                    })
                }
            };
        let retry_after = head
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if let (StatusCode::SERVICE_UNAVAILABLE, Some(after)) = (status, retry_after) {
            return Err(NetError::Busy {
                url,
                retry_after: after,
            });
        }
        if !status.is_success() {
            let (error_code, error_msg) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.error_code.to_string(), e.error_msg),
                Err(_) => (
                    status.canonical_reason().unwrap_or("ERROR").to_string(),
                    String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                ),
            };
            return Err(NetError::Status {
                url,
                status: status.as_u16(),
                error_code,
                error_msg,
            });
        }
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"null"
        } else {
            &bytes
        };
        let value = serde_json::from_slice(text).map_err(|e| NetError::Decode {
            url,
            reason: e.to_string(),
        })?;
        Ok((value, head))
    }
}

/// hyper's top-level error often hides the TLS alert (e.g. "certificate required") in
/// its source chain; show the chain so a rejected client learns why.
fn describe(e: &hyper::Error) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        )
    }

    #[test]
    fn urls_parse() {
        let c = HttpsClient::new("https://127.0.0.1:8443/", cfg()).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8443));
        assert_eq!(c.base_url(), "https://127.0.0.1:8443");
        let c = HttpsClient::new("https://[::1]:9", cfg()).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 9));
        let c = HttpsClient::new("https://ctl.example", cfg()).unwrap();
        assert_eq!(c.port, 443);
        for bad in [
            "http://x",
            "https://",
            "https://x/path",
            "https://x:port",
            "https://[::1",
        ] {
            let e = HttpsClient::new(bad, cfg()).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
