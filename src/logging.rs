//! stub: logging.rs (being written)
