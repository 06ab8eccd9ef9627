//! stub: pki.rs (being written)
