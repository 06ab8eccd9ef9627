//! stub: controller/mod.rs (being written)
