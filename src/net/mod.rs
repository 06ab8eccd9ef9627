//! HTTPS over mutual TLS: a small client (one connection per request) and a server loop
//! that hands each request to a `Handler` together with the verified peer identity.

pub mod client;
pub mod server;

/// Every response body in the crate is a single buffered chunk.
pub type Body = http_body_util::Full<bytes::Bytes>;

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
    #[error("cannot decode the answer from {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("cannot encode the request to {url}: {reason}")]
    Encode { url: String, reason: String },
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
}
