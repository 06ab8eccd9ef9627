//! The process's descriptor limit: raised to what the system allows, and the connection cap
//! fitted under it, so the controller refuses connections it cannot serve instead of failing
//! to open its own database file (EMFILE) in the middle of a rollout.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors kept free of connections: the database and its journal, blobs being served
/// or uploaded, logs.
pub const RESERVE: u64 = 512;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit now in force.
pub fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// The connection cap that fits `limit` descriptors (at least 16).
pub fn connections_within(limit: u64, wanted: usize) -> usize {
    let room = limit.saturating_sub(RESERVE).max(16);
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_free() {
        assert_eq!(connections_within(20_000, 30_000), 19_488);
        assert_eq!(connections_within(20_000, 4096), 4096);
        assert_eq!(connections_within(100, 4096), 16);
        assert!(raise_nofile() >= 16);
    }
}
