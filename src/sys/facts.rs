//! Host facts for the heartbeat: what an operator needs to see a machine is the one they
//! think it is, and whether it has room for the next payload.

use std::path::Path;

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::proto::agent::HostFacts;

/// Blocking (reads /proc); call it from `spawn_blocking`. Missing facts become empty or
/// zero rather than failing the heartbeat: liveness matters more than completeness.
pub fn gather(state_dir: &Path, agent_version: &str) -> HostFacts {
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    HostFacts {
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        cpu_count: sys.cpus().len() as u32,
        memory_total_bytes: sys.total_memory(),
        memory_available_bytes: sys.available_memory(),
        disk_free_bytes: disk_free(state_dir).unwrap_or(0),
        uptime_seconds: System::uptime(),
        agent_version: agent_version.to_string(),
    }
}

/// Free bytes available to unprivileged writers on the filesystem holding `path`.
pub fn disk_free(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Total size of the filesystem holding `path`.
pub fn disk_total(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks() as u64 * st.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_describe_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let f = gather(dir.path(), "9.9.9");
        // sysinfo counts online CPUs; the scheduler may allow us fewer, never more.
        let usable = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        assert!(f.cpu_count as usize >= usable, "{f:?}");
        assert!(f.memory_total_bytes > 0, "{f:?}");
        assert!(f.memory_available_bytes <= f.memory_total_bytes, "{f:?}");
        assert!(f.disk_free_bytes > 0, "{f:?}");
        assert_eq!(f.agent_version, "9.9.9");
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(f.kernel, kernel.trim());
    }
}
