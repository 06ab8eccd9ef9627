//! stub: sys/mod.rs (being written)
