//! Host facts for the heartbeat: what an operator needs to see a machine is the one they
//! think it is, and whether it has room for the next payload.

use std::path::Path;

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::proto::agent::HostFacts;

/// Blocking (reads /proc); call it from `spawn_blocking`. Missing facts become empty or
/// zero rather than failing the heartbeat: liveness matters more than completeness.
/// `gpu`: what the machine's config declares; `None` detects it.
pub fn gather(state_dir: &Path, agent_version: &str, gpu: Option<bool>) -> HostFacts {
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
        gpu: gpu.unwrap_or_else(|| has_gpu(Path::new("/sys/bus/pci/devices"))),
    }
}

/// The host name (the default machine id an agent enrolls as); empty when unknown.
pub fn hostname() -> String {
    System::host_name().unwrap_or_default()
}

/// PCI vendors whose display controllers are GPUs (NVIDIA, AMD, Intel discrete cards are
/// class 0x0302); an emulated VGA adapter (e.g. QEMU's, vendor 0x1234) is not a GPU.
const GPU_VENDORS: [&str; 2] = ["0x10de", "0x1002"];

/// Whether a PCI device under `pci` (sysfs layout) is a GPU: a 3D controller (class
/// 0x0302), or a display controller (0x03xx) from a GPU vendor.
pub fn has_gpu(pci: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(pci) else {
        return false;
    };
    rd.flatten().any(|dev| {
        let read = |f: &str| {
            std::fs::read_to_string(dev.path().join(f))
                .map(|s| s.trim().to_ascii_lowercase())
                .unwrap_or_default()
        };
        let class = read("class");
        class.starts_with("0x0302")
            || (class.starts_with("0x03") && GPU_VENDORS.contains(&read("vendor").as_str()))
    })
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
        let f = gather(dir.path(), "9.9.9", None);
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

    #[test]
    fn gpus_are_found_by_pci_class_and_vendor() {
        let dir = tempfile::tempdir().unwrap();
        let dev = |name: &str, class: &str, vendor: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        };
        dev("0000:00:02.0", "0x030000", "0x1234"); // emulated VGA
        dev("0000:00:03.0", "0x020000", "0x10de"); // an NVIDIA NIC is not a GPU
        assert!(!has_gpu(dir.path()));
        dev("0000:01:00.0", "0x030000", "0x10de");
        assert!(has_gpu(dir.path()));
        assert!(!has_gpu(&dir.path().join("missing")));
        let f = gather(dir.path(), "9.9.9", Some(true));
        assert!(f.gpu, "the declaration wins");
    }
}
