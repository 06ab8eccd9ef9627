//! The HTTPS accept loop: TLS with a required client certificate, HTTP/1.1, one task per
//! connection, and a graceful stop that lets in-flight requests finish for a bounded time.

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
use crate::tls::CertInfo;

/// A client that opens a socket and never finishes the handshake must not hold a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NetError> {
    let acceptor = TlsAcceptor::from(tls);
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
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
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
            "INTERNAL",
            format!("cannot encode the answer: {e}"),
        ),
    }
}

/// The API's one error shape: `{error_code, error_msg}`.
pub fn error_response(status: StatusCode, code: &str, msg: impl Into<String>) -> Response<Body> {
    let body = ErrorBody {
        error_code: code.to_string(),
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
        br#"{"error_code":"INTERNAL","error_msg":"cannot build the response"}"#,
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
