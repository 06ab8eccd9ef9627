//! stub: config/mod.rs (being written)
