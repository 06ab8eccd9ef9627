//! Hardened tar.gz extraction (placeholder until implemented).
