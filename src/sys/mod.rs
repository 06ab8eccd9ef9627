//! Seams for every side effect the agent and controller have on the host: spawning
//! processes, the clock, the boot id, host facts, and crash-safe file writes.
//!
//! Invariant: nothing outside `sys` spawns a process, reads the boot id or gathers host
//! facts, so a reader can audit what fieldhand does to a machine from this module alone.

// The one place allowed to spawn processes and read the wall clock (clippy.toml lists the
// methods; everything else goes through these seams).
#![allow(clippy::disallowed_methods)]

pub mod bootid;
pub mod cgroup;
pub mod child;
pub mod clock;
pub mod facts;
pub mod fdlimit;
pub mod fsutil;
pub mod notify;
pub mod power;
pub mod process;
pub mod sessions;
