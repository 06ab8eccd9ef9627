//! The HTTPS accept loop: TLS (a client certificate verified when sent), HTTP/1.1, one task
//! per connection, and a graceful stop that lets in-flight requests finish for a bounded time.
//!
//! It sheds hostile clients: every stage of a connection has a time limit (handshake,
//! request head, and the idle wait between keep-alive requests; bodies are bounded by their
//! readers), connections are capped per agent identity and in total, and a reserve of the
//! total is kept for operators, so a flood of agent or anonymous connections cannot lock
//! operators out.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::{Body, NetError};
use crate::pki::Identity;
use crate::proto::api::ErrorBody;
use crate::proto::domain::ErrorCode;
use crate::tls::CertInfo;

/// Connection limits and per-stage timeouts (`controller.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, in every state.
    pub max_connections: usize,
    /// Of those, this many only operators may take: agents and clients without a
    /// certificate are refused once `max_connections - operator_reserve` are open.
    pub operator_reserve: usize,
    /// Connections one agent identity may hold at once (an agent needs about three).
    pub per_agent: usize,
    /// A client that opens a socket and never finishes the handshake must not hold a task.
    pub handshake_timeout: Duration,
    /// For a request head to arrive, counted from when the connection is ready for one
    /// (so it also ends an idle keep-alive connection).
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            operator_reserve: 64,
            per_agent: 16,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Open connections: in total, and per agent identity. A slot is released on drop.
#[derive(Default)]
struct Gauge {
    total: std::sync::atomic::AtomicUsize,
    per: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// When the last "refused" warning was logged (refusals come in floods).
    warned: std::sync::Mutex<Option<std::time::Instant>>,
}

struct Slot {
    gauge: Arc<Gauge>,
    identity: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.gauge.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = &self.identity {
            let mut per = self.gauge.per.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    per.remove(id);
                }
            }
        }
    }
}

impl Gauge {
    fn open(self: &Arc<Self>, max: usize) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        let n = self.total.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            gauge: self.clone(),
            identity: None,
        };
        (n < max).then_some(slot)
    }

    /// After the handshake: whether this peer may keep its connection.
    fn admit(&self, slot: &mut Slot, peer: &Peer, limits: &Limits) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let role = peer.identity().map(|i| i.role);
        if role == Some(crate::pki::Role::Operator) {
            return Ok(());
        }
        let open = self.total.load(Ordering::Relaxed);
        let cap = limits
            .max_connections
            .saturating_sub(limits.operator_reserve);
        if open > cap {
            return Err(format!(
                "{open} connections open; the last {} are kept for operators",
                limits.operator_reserve
            ));
        }
        if let Some(id) = peer.identity() {
            let key = id.to_string();
            let mut per = self.per.lock().unwrap_or_else(|p| p.into_inner());
            let n = per.entry(key.clone()).or_default();
            if *n >= limits.per_agent {
                return Err(format!(
                    "{key} already holds {n} connections (at most {})",
                    limits.per_agent
                ));
            }
            *n += 1;
            slot.identity = Some(key);
        }
        Ok(())
    }

    fn warn(&self, remote: std::net::SocketAddr, why: &str) {
        let mut w = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if w.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
            *w = Some(now);
            tracing::warn!(%remote, why, "connections refused (logged at most every 10 s)");
        }
    }
}
/// How long a stopping server waits for in-flight requests (long polls included).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The verified client certificate; `None` when the client sent none (it may only
    /// enroll).
    pub cert: Option<CertInfo>,
    pub remote: std::net::SocketAddr,
}

impl Peer {
    /// The fieldhand identity of the verified certificate, if it names one.
    pub fn identity(&self) -> Option<&Identity> {
        self.cert.as_ref().and_then(|c| c.identity.as_ref())
    }
}

/// What the server calls for every request, with the peer of its connection.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Serves until `shutdown` resolves, then drains connections for up to `DRAIN_TIMEOUT`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NetError> {
    let acceptor = TlsAcceptor::from(tls);
    let gauge = Arc::new(Gauge::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut accept_errors = 0u32;
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => { accept_errors = 0; x }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, keep serving.
                    accept_errors += 1;
                    tracing::warn!(error = %e, "accept failed");
                    let wait = Duration::from_millis(10u64 << accept_errors.min(7));
                    tokio::time::sleep(wait).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Some(mut slot) = gauge.open(limits.max_connections) else {
            gauge.warn(remote, "max_connections reached");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let gauge = gauge.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
            let peer = Peer {
                cert: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(crate::tls::cert_info),
                remote,
            };
            if let Err(why) = gauge.admit(&mut slot, &peer, &limits) {
                gauge.warn(remote, &why);
                return;
            }
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r { tracing::debug!(%remote, error = %e, "connection ended"); }
                    return;
                }
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = conns.len(),
            "closing connections still busy after the drain timeout"
        );
        conns.shutdown().await;
    }
    Ok(())
}

pub fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    match serde_json::to_vec(body) {
        Ok(v) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(super::full(v))
            .unwrap_or_else(|_| internal()),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            format!("cannot encode the answer: {e}"),
        ),
    }
}

/// The API's one error shape: `{error_code, error_msg}`.
pub fn error_response(
    status: StatusCode,
    code: ErrorCode,
    msg: impl Into<String>,
) -> Response<Body> {
    let body = ErrorBody {
        error_code: code,
        error_msg: msg.into(),
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(super::full(bytes))
        .unwrap_or_else(|_| internal())
}

fn internal() -> Response<Body> {
    let mut r = Response::new(super::full(Bytes::from_static(
        br#"{"error_code":"INTERNAL_ERROR","error_msg":"cannot build the response"}"#,
    )));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("cannot read the request body: {0}")]
    Read(hyper::Error),
}

/// Buffers a request body, refusing (without reading further) past `limit` bytes.
pub async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
