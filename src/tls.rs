//! stub: tls.rs (being written)
