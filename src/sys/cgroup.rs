//! Containment of script runs: each run (a script or an image hook) gets its own cgroup v2
//! group, made before the process starts; ending the run kills the whole group
//! (`cgroup.kill`, or freeze and SIGKILL each member where that file is missing), so nothing
//! a script starts outlives it, whatever it does with sessions, process groups or forks.
//!
//! Where cgroup v2 lives differs: a pure-v2 host mounts it at `/sys/fs/cgroup`, a hybrid one
//! (v1 controllers) at `/sys/fs/cgroup/unified`; the mount comes from `/proc/self/mountinfo`.
//! Under systemd the unit delegates its group to the agent (`Delegate=yes`): the agent moves
//! itself into `<own>/agent` and makes runs under `<own>/runs/` (a group with processes
//! cannot hand controllers to its children). Outside a delegated group, or where cgroup v2 is
//! not writable, the agent falls back to being a child subreaper: orphans of a script are
//! re-parented to the agent, and the end of a run kills every descendant of the agent.

use std::ffi::CString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Per-run limits (`[exec] memory_max`, `cpu_max`, `tasks_max`), written to each run's group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunLimits {
    /// Bytes (`memory.max`).
    pub memory_max: Option<u64>,
    /// `cpu.max` as written: `"<quota_us> <period_us>"`.
    pub cpu_max: Option<String>,
    pub tasks_max: Option<u64>,
}

impl RunLimits {
    pub fn is_empty(&self) -> bool {
        self.memory_max.is_none() && self.cpu_max.is_none() && self.tasks_max.is_none()
    }

    fn controllers(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.memory_max.is_some() {
            c.push("memory");
        }
        if self.cpu_max.is_some() {
            c.push("cpu");
        }
        if self.tasks_max.is_some() {
            c.push("pids");
        }
        c
    }
}

/// How runs are contained on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// Runs get groups under `runs` (a directory in a cgroup2 filesystem).
    Cgroup { runs: PathBuf, limits: RunLimits },
    /// No usable cgroup v2: the agent is a child subreaper and kills descendants.
    Subreaper { why: String },
}

/// One run's group, made before its process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunGroup {
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot prepare the run's cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The cgroup2 mount point, from `/proc/self/mountinfo` (field 5 is the mount point; the
/// filesystem type follows the ` - ` separator).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// This process's cgroup v2 path (the `0::PATH` line of `/proc/self/cgroup`).
pub fn own_group(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

impl Containment {
    /// Decides containment once at start. `root`: `[exec] cgroup_root`, a directory in a
    /// cgroup2 filesystem made for the agent; `None`: the agent's own group, used only when
    /// it is delegated (not the root of the hierarchy). `enabled = false` forces the
    /// fallback.
    pub fn detect(root: Option<&Path>, enabled: bool, limits: &RunLimits) -> Containment {
        if !enabled {
            return Containment::Subreaper {
                why: "cgroups are off in the config ([exec] cgroups = false)".into(),
            };
        }
        let base = match root {
            Some(r) => r.to_path_buf(),
            None => match Self::own_base() {
                Ok(b) => b,
                Err(why) => return Containment::Subreaper { why },
            },
        };
        match Self::prepare_base(&base, root.is_none(), limits) {
            Ok(runs) => Containment::Cgroup {
                runs,
                limits: limits.clone(),
            },
            Err(e) => Containment::Subreaper {
                why: format!("cgroup v2 at {} is not usable: {e}", base.display()),
            },
        }
    }

    fn own_base() -> Result<PathBuf, String> {
        let mi = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mi).ok_or("no cgroup2 filesystem is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|s| own_group(&s))
            .ok_or("this process has no cgroup v2 group")?;
        if own == "/" {
            return Err(format!(
                "the agent runs in the root of the cgroup hierarchy at {}, not in a delegated \
                 group (run it from its systemd unit, which has Delegate=yes, or set \
                 [exec] cgroup_root)",
                mount.display()
            ));
        }
        Ok(mount.join(own.trim_start_matches('/')))
    }

    /// Makes `<base>/runs`. For the agent's own (delegated) group, first moves the agent
    /// into `<base>/agent`, so `base` holds no process and may enable controllers below.
    fn prepare_base(base: &Path, own: bool, limits: &RunLimits) -> io::Result<PathBuf> {
        if !base.join("cgroup.procs").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "not a cgroup v2 directory",
            ));
        }
        if own {
            let agent = base.join("agent");
            mkdir(&agent)?;
            write_file(&agent.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        let runs = base.join("runs");
        mkdir(&runs)?;
        // Controllers the limits need, where the hierarchy has them (a hybrid host has
        // none on v2); a run without them is still contained, only not limited.
        let wanted = limits.controllers();
        if !wanted.is_empty() {
            let have = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
            let enable: Vec<String> = wanted
                .iter()
                .filter(|c| have.split_whitespace().any(|h| h == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !enable.is_empty() {
                let line = enable.join(" ");
                write_file(&base.join("cgroup.subtree_control"), &line)?;
                write_file(&runs.join("cgroup.subtree_control"), &line)?;
            }
        }
        Ok(runs)
    }

    /// What `fieldhand status` and the log say about containment.
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup { runs, .. } => {
                format!("cgroup v2 groups under {}", runs.display())
            }
            Containment::Subreaper { why } => {
                format!("child subreaper (weaker: an agent restart cannot find escaped processes): {why}")
            }
        }
    }

    /// Makes the group for one run, named `name` (the assignment id), with the limits.
    /// `None` in the fallback.
    pub fn group_for(&self, name: &str) -> Result<Option<RunGroup>, CgroupError> {
        let Containment::Cgroup { runs, limits } = self else {
            return Ok(None);
        };
        let dir = runs.join(name);
        let err = |source| CgroupError::Io {
            path: dir.clone(),
            source,
        };
        // A group left by an earlier run of the same assignment (an agent restart) goes
        // first, with whatever is still in it.
        if dir.exists() {
            kill_and_remove(&dir);
        }
        mkdir(&dir).map_err(err)?;
        if let Some(m) = limits.memory_max {
            write_limit(&dir, "memory.max", &m.to_string());
            // One OOM kill ends the run: the whole group goes, not one victim.
            write_limit(&dir, "memory.oom.group", "1");
        }
        if let Some(c) = &limits.cpu_max {
            write_limit(&dir, "cpu.max", c);
        }
        if let Some(t) = limits.tasks_max {
            write_limit(&dir, "pids.max", &t.to_string());
        }
        Ok(Some(RunGroup { dir }))
    }

    /// Kills and removes every run group left behind (an agent that died with runs in
    /// flight); called at start, before anything runs.
    pub fn kill_leftovers(&self) -> usize {
        let Containment::Cgroup { runs, .. } = self else {
            return 0;
        };
        let Ok(rd) = std::fs::read_dir(runs) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            if e.path().is_dir() {
                let g = RunGroup { dir: e.path() };
                if !g.members().is_empty() {
                    n += 1;
                }
                kill_and_remove(&e.path());
            }
        }
        n
    }
}

fn mkdir(p: &Path) -> io::Result<()> {
    match std::fs::create_dir(p) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

fn write_limit(dir: &Path, file: &str, value: &str) {
    let p = dir.join(file);
    if p.exists() {
        if let Err(e) = write_file(&p, value) {
            tracing::warn!(path = %p.display(), value, error = %e, "cannot set a run limit");
        }
    }
}

fn kill_and_remove(dir: &Path) {
    let g = RunGroup {
        dir: dir.to_path_buf(),
    };
    g.kill();
    g.remove();
}

impl RunGroup {
    /// The path the child writes itself into, prepared before `fork` (no allocation after).
    pub fn procs_path(&self) -> Option<CString> {
        CString::new(
            self.dir
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .ok()
    }

    /// Pids in the group.
    pub fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends `sig` to every member (a polite first step; `kill` is the sure one).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        for pid in self.members() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// Kills every process of the group and waits (up to 2 s) until it is empty.
    pub fn kill(&self) {
        let kill_file = self.dir.join("cgroup.kill");
        if kill_file.exists() {
            let _ = write_file(&kill_file, "1");
        } else {
            // Before cgroup.kill (Linux 5.14): freeze, so nothing forks while we kill.
            let freeze = self.dir.join("cgroup.freeze");
            let _ = write_file(&freeze, "1");
            self.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = write_file(&freeze, "0");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.members().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the kernel OOM-killed in this group (its memory limit was reached).
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
    }

    /// Removes the (empty) group.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_mount_is_found_on_pure_and_hybrid_hosts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("1 2 0:1 / /proc rw - proc proc rw\n"), None);
        assert_eq!(
            own_group("4:memory:/x\n0::/system.slice/fieldhand.service\n").as_deref(),
            Some("/system.slice/fieldhand.service")
        );
    }

    #[test]
    fn an_oom_kill_in_the_group_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let g = RunGroup {
            dir: dir.path().to_path_buf(),
        };
        assert!(!g.oom_killed(), "no memory.events: no OOM");
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n",
        )
        .unwrap();
        assert!(!g.oom_killed());
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nmax 9\noom 2\noom_kill 1\n",
        )
        .unwrap();
        assert!(g.oom_killed());
    }

    #[test]
    fn off_or_not_a_cgroup_falls_back_and_says_why() {
        let c = Containment::detect(None, false, &RunLimits::default());
        assert!(c.describe().contains("cgroups = false"), "{}", c.describe());
        let dir = tempfile::tempdir().unwrap();
        let c = Containment::detect(Some(dir.path()), true, &RunLimits::default());
        assert!(matches!(c, Containment::Subreaper { .. }), "{c:?}");
        assert!(
            c.describe().contains("not a cgroup v2 directory"),
            "{}",
            c.describe()
        );
        assert_eq!(c.group_for("a").unwrap(), None);
    }
}
