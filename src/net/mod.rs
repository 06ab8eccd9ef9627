//! stub: net/mod.rs (being written)
