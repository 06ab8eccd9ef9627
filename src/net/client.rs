//! The HTTPS client used by agents, the CLI and tests: one TLS connection per request.
//!
//! Opening a connection per request costs a handshake (about a millisecond on a LAN) but
//! means a half-dead pooled connection can never swallow a result; long polls hold their
//! connection for the whole wait anyway.

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
    ) -> Result<(StatusCode, Bytes), NetError> {
        let mut headers = Vec::new();
        if let Some(ct) = content_type {
            headers.push((header::CONTENT_TYPE, ct.to_string()));
        }
        let (resp, _driver) = self.send(url, method, path, body, &headers).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| NetError::Http {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .to_bytes();
        Ok((status, body))
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
        let http_err = |e: hyper::Error| NetError::Http {
            url: url.to_string(),
            reason: describe(&e),
        };
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(4 << 20)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(http_err)?;
        let driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        for (k, v) in self.headers.iter().chain(headers) {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| NetError::BadUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http_err)?;
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
        let (status, bytes) = self.request(method, path, payload, ct, timeout).await?;
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
        serde_json::from_slice(text).map_err(|e| NetError::Decode {
            url,
            reason: e.to_string(),
        })
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
