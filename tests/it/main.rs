//! The integration tests: one binary that starts the real controller and agents as processes
//! over mutual TLS on 127.0.0.1 (port 0), each test in its own temp dir.

// Tests start the real binaries and tools as processes, and time what they measure.
#![allow(clippy::disallowed_methods)]

mod batches;
mod cli;
mod compat;
mod contain;
mod ctl;
mod durability;
mod failover;
mod faults;
mod identity;
mod images;
mod latency;
mod lists;
mod metrics;
mod power;
mod props;
mod rate;
mod rebuild;
mod replicas;
mod retention;
mod security;
mod shedding;
mod staging;
mod support;
mod tidy;
mod ui;
mod validation;
