//! stub: agent/mod.rs (being written)
