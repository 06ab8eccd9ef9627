//! HTTPS over mutual TLS: a small client (one connection per request) and a server loop
//! that hands each request to a `Handler` together with the verified peer identity.

pub mod client;
pub mod server;

/// Response bodies: usually one buffered chunk ([`full`]), or a stream for payloads.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

/// A body of one buffered chunk.
pub fn full(bytes: impl Into<bytes::Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A streamed body fed by a channel (e.g. a blocking file reader); the stream ends when the
/// sender is dropped, and an `Err` item aborts the response.
pub fn channel_body(rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>) -> Body {
    use http_body_util::BodyExt;
    ChannelBody { rx }.boxed()
}

struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
}

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("TLS handshake with {url} failed: {source}")]
    Tls { url: String, source: std::io::Error },
    #[error("HTTP exchange with {url} failed: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} did not answer within {after:?}")]
    Timeout {
        url: String,
        after: std::time::Duration,
    },
    #[error("{url} answered {status}: {error_code}: {error_msg}")]
    Status {
        url: String,
        status: u16,
        error_code: String,
        error_msg: String,
    },
    /// 503 with `Retry-After`: the controller sheds load and says when to come back.
    #[error("{url} is busy; retry after {retry_after:?}")]
    Busy {
        url: String,
        retry_after: std::time::Duration,
    },
    #[error("cannot decode the answer from {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("cannot encode the request to {url}: {reason}")]
    Encode { url: String, reason: String },
}
