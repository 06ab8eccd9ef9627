//! The loopback forwarder for the rollout page (`fieldhand-controller ui`, later the operator
//! CLI): plain HTTP on a loopback address, each request sent on to the controller over mutual
//! TLS with the operator's certificate, so a person opens the page in any browser without
//! importing a certificate.
//!
//! Whatever reaches the port acts as that operator, so the port is guarded: it listens on a
//! loopback address only; the `Host` header must name that address (a DNS-rebinding page
//! names its own host); and every request must carry the cookie that the one-time URL printed
//! at start sets (`/open?token=...`, `HttpOnly; SameSite=Strict`), so neither another user of
//! the machine nor a page of another site (its cross-site requests carry no such cookie) can
//! use it. A request that does carry an `Origin` must come from this origin.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::net::client::HttpsClient;
use crate::net::server::error_response;
use crate::net::{Body, NetError};
use crate::proto::domain::ErrorCode;

/// A request body the forwarder buffers at most (script executions, not blob uploads: upload
/// blobs to the controller directly).
const BODY_LIMIT: usize = 8 << 20;
/// How long the controller may take to answer one forwarded request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const COOKIE: &str = "fieldhand_ui";
/// The answer headers the page relies on; the rest (connection, length) are hop-by-hop.
const PASSED_ON: [&str; 10] = [
    "content-type",
    "content-security-policy",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "cache-control",
    "allow",
    "retry-after",
    "fieldhand-next-cursor",
    "location",
];

/// What to listen on and where to forward to.
#[derive(Debug, Clone)]
pub struct Options {
    /// A loopback address (`127.0.0.1:PORT`, `[::1]:PORT`); port 0 picks one.
    pub listen: SocketAddr,
    /// The controller, `https://HOST[:PORT]`.
    pub url: String,
    /// The fleet's CA certificate, and the operator's certificate and key.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the forwarder listens, once it does.
#[derive(Debug, Clone)]
pub struct Listening {
    pub addr: SocketAddr,
    /// The one-time URL that lets a browser in (it sets the cookie and opens `/ui/`).
    pub open_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UiProxyError {
    #[error("--listen {addr}: the forwarder gives an operator's authority to whoever reaches it, so it listens on a loopback address only (127.0.0.1 or [::1])")]
    NotLoopback { addr: SocketAddr },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no random token: {0}")]
    Random(String),
}

impl UiProxyError {
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            UiProxyError::NotLoopback { .. } => Exit::Usage,
            UiProxyError::Tls(_) => Exit::Config,
            UiProxyError::Net(_) => Exit::Usage,
            UiProxyError::Listen { .. } => Exit::Unavailable,
            UiProxyError::Random(_) => Exit::Software,
        }
    }
}

struct Forwarder {
    client: HttpsClient,
    token: String,
    /// `Host` values that name this listener.
    hosts: Vec<String>,
}

/// What both `fieldhandctl ui` and `fieldhand-controller ui` do: forward until SIGINT or
/// SIGTERM, after printing where (`forwarding http://ADDR to URL`) and the one-time address
/// to open (`open http://ADDR/?token=...`) on stdout, one line each.
pub async fn run_until_signal(opts: Options) -> Result<(), UiProxyError> {
    let url = opts.url.clone();
    run(
        opts,
        |l| {
            println!("forwarding http://{} to {url}", l.addr);
            println!("open {}", l.open_url);
        },
        crate::daemon::shutdown_signal(),
    )
    .await
}

/// Listens on `opts.listen`, calls `on_listening` once it does, and forwards requests until
/// `shutdown` completes.
pub async fn run(
    opts: Options,
    on_listening: impl FnOnce(&Listening),
    shutdown: impl Future<Output = ()>,
) -> Result<(), UiProxyError> {
    if !opts.listen.ip().is_loopback() {
        return Err(UiProxyError::NotLoopback { addr: opts.listen });
    }
    let tls = crate::tls::client_config(&opts.ca, &opts.cert, &opts.key)?;
    let client = HttpsClient::new(&opts.url, tls)?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| UiProxyError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| UiProxyError::Listen {
            addr: opts.listen,
            source,
        })?;
    let mut raw = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|e| UiProxyError::Random(e.to_string()))?;
    let token = hex::encode(raw);
    let port = addr.port();
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_ipv4() {
        hosts.push(format!("localhost:{port}"));
    }
    let fwd = Arc::new(Forwarder {
        client,
        token,
        hosts,
    });
    on_listening(&Listening {
        addr,
        open_url: format!("http://{addr}/open?token={}", fwd.token),
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let fwd = fwd.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let fwd = fwd.clone();
                async move { Ok::<_, std::convert::Infallible>(fwd.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn refuse(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    error_response(status, ErrorCode::Forbidden, msg)
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Equal without telling how much of a guess was right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Forwarder {
    /// The refusal, unless the request may be forwarded.
    fn refusal(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let text = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let host = text(header::HOST);
        if !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Some(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host {host:?} is not this forwarder ({}): open the URL it printed",
                    self.hosts.join(" or ")
                ),
            ));
        }
        let origin = text(header::ORIGIN);
        if !origin.is_empty() && !origin.eq_ignore_ascii_case(&format!("http://{host}")) {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                format!("a request from {origin} may not use this forwarder"),
            ));
        }
        let ok = cookie(text(header::COOKIE), COOKIE).is_some_and(|v| same(v, &self.token));
        if !ok {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                "this browser has not been let in: open the URL the forwarder printed at start \
                 (http://.../open?token=...)",
            ));
        }
        None
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() == "/open" {
            return self.open(&req);
        }
        if let Some(refused) = self.refusal(&req) {
            return refused;
        }
        if req.uri().path() == "/" {
            return redirect("/ui/");
        }
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::RequestTooLarge,
                    format!("the forwarder takes bodies up to {BODY_LIMIT} bytes: {e}"),
                )
            }
        };
        let body = (!body.is_empty()).then_some(body);
        match self
            .client
            .request_with_headers(method, &path, body, content_type.as_deref(), ANSWER_TIMEOUT)
            .await
        {
            Ok((status, headers, bytes)) => {
                let mut r = Response::new(crate::net::full(bytes));
                *r.status_mut() = status;
                for name in PASSED_ON {
                    for v in headers.get_all(name) {
                        r.headers_mut().append(name, v.clone());
                    }
                }
                r
            }
            Err(e) => error_response(
                StatusCode::BAD_GATEWAY,
                ErrorCode::InternalError,
                format!("the forwarder could not reach the controller: {e}"),
            ),
        }
    }

    /// `/open?token=T`: lets this browser in (the cookie) and opens the page.
    fn open(&self, req: &Request<Incoming>) -> Response<Body> {
        let given = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|p| p.strip_prefix("token="))
            .unwrap_or("");
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) || !same(given, &self.token) {
            return refuse(
                StatusCode::FORBIDDEN,
                "wrong or missing token: use the URL the forwarder printed at start",
            );
        }
        let mut r = redirect("/ui/");
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            self.token
        )) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = Response::new(crate::net::full(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_tokens() {
        assert_eq!(cookie("a=1; fieldhand_ui=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("fieldhand_uix=1", COOKIE), None);
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd") && !same("abc", "ab") && !same("", "a"));
    }

    #[tokio::test]
    async fn a_listen_address_off_loopback_is_refused() {
        let opts = Options {
            listen: "0.0.0.0:0".parse().unwrap(),
            url: "https://127.0.0.1:1".into(),
            ca: "/nonexistent".into(),
            cert: "/nonexistent".into(),
            key: "/nonexistent".into(),
        };
        let e = run(opts, |_| {}, std::future::pending()).await.unwrap_err();
        assert!(matches!(e, UiProxyError::NotLoopback { .. }), "{e}");
        assert!(e.to_string().contains("loopback"));
    }
}
