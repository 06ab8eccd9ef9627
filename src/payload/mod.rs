//! The payload engine: verified downloads with resume, signatures, disk-space checks, and
//! hardened tar.gz extraction. Shared by software staging and (later) image pushes.

pub mod entry_path;
pub mod extract;
pub mod fetch;
pub mod sign;
