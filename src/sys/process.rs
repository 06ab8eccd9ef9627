//! Running one script as its own process group, in its own cgroup (see [`super::cgroup`]),
//! with a hard timeout, cancellation, and bounded output capture.
//!
//! Invariant: when `ScriptRun::wait` returns, no process the script started is left
//! running: the group is stopped with SIGTERM, then SIGKILL after the grace period (and
//! leftovers of a script that exited normally are SIGKILLed), and then its cgroup is killed
//! whole, which no `setsid`, job control or double fork escapes. The child joins its cgroup
//! before it executes anything. Without cgroups, the agent is a child subreaper and kills
//! every descendant it has left.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long to keep reading pipes after the group is gone; a process that escaped the
/// group may hold them open forever.
const PIPE_DRAIN: Duration = Duration::from_secs(2);
/// How often to look for survivors during the grace period.
const POLL: Duration = Duration::from_millis(20);

pub struct ScriptSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The whole environment: nothing is inherited from the agent.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub timeout: Duration,
    /// SIGTERM to SIGKILL.
    pub kill_grace: Duration,
    /// The run's cgroup (made by the caller before the spawn); `None`: the subreaper
    /// fallback.
    pub group: Option<super::cgroup::RunGroup>,
}

/// Keeps the first `head` and last `tail` bytes of a stream and counts what fell between.
#[derive(Debug, Clone)]
pub struct Capture {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_max: usize,
    tail_max: usize,
    total: u64,
}

impl Capture {
    pub fn new(head: usize, tail: usize) -> Self {
        Capture {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_max: head,
            tail_max: tail,
            total: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = self.head_max - self.head.len();
        if room > 0 {
            let n = room.min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        if bytes.len() >= self.tail_max {
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - self.tail_max..]);
        } else {
            let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.tail_max);
            self.tail.drain(..overflow);
            self.tail.extend(bytes);
        }
    }

    /// Appends another capture as if its bytes had followed ours.
    pub fn append(&mut self, other: &Capture) {
        self.push(&other.head);
        let skipped = other.omitted();
        if skipped > 0 {
            // `other` is truncated, so its tail is full and pushes out everything before it.
            self.total += skipped;
            self.tail.clear();
        }
        let tail: Vec<u8> = other.tail.iter().copied().collect();
        self.push(&tail);
    }

    fn omitted(&self) -> u64 {
        self.total - self.head.len() as u64 - self.tail.len() as u64
    }

    pub fn is_truncated(&self) -> bool {
        self.omitted() > 0
    }

    /// Lossy UTF-8, with a marker where bytes were dropped.
    pub fn to_text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).into_owned();
        let omitted = self.omitted();
        if omitted > 0 {
            s.push_str(&format!("\n…[{omitted} bytes omitted]…\n"));
        }
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        s.push_str(&String::from_utf8_lossy(&tail));
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Cancelled,
}

#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    pub stdout: Capture,
    pub stderr: Capture,
    /// The run's memory limit was reached (the kernel OOM-killed in its group).
    pub oom_killed: bool,
    /// How the script's own process ended: its exit code, or 128 + the signal. Known for a
    /// timed-out or cancelled run too (it is what the stop did to it).
    pub exit_code: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// A started script. `pgid` is known before `wait`, so the caller can persist it: if the
/// agent dies, the next start can kill what is left.
pub struct ScriptRun {
    pub pgid: i32,
    group: Option<super::cgroup::RunGroup>,
    child: tokio::process::Child,
    readers: [(Arc<Mutex<Capture>>, JoinHandle<()>); 2],
    cancel_rx: watch::Receiver<bool>,
    cancel_tx: Arc<watch::Sender<bool>>,
    timeout: Duration,
    kill_grace: Duration,
}

#[derive(Clone)]
pub struct Canceller(Arc<watch::Sender<bool>>);

impl Canceller {
    pub fn cancel(&self) {
        let _ = self.0.send(true);
    }
}

pub async fn spawn(spec: ScriptSpec, head: usize, tail: usize) -> Result<ScriptRun, ProcessError> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(procs) = spec.group.as_ref().and_then(|g| g.procs_path()) {
        // In the child, between fork and exec: join the run's cgroup before the script
        // runs a single instruction, so there is no moment it is outside. Only raw
        // syscalls here (no allocation: the path was made before the fork).
        // SAFETY: the closure calls only async-signal-safe functions (open, write, close).
        // The crate denies unsafe code; this is its one exception.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                let fd =
                    nix::libc::open(procs.as_ptr(), nix::libc::O_WRONLY | nix::libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                nix::libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: spec.program.display().to_string(),
        source,
    })?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let reader = |pipe: Option<Box<dyn AsyncRead + Send + Unpin>>| {
        let cap = Arc::new(Mutex::new(Capture::new(head, tail)));
        let sink = cap.clone();
        let task = tokio::spawn(async move {
            let Some(mut pipe) = pipe else { return };
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(&buf[..n]),
                }
            }
        });
        (cap, task)
    };
    let out = child
        .stdout
        .take()
        .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>);
    let err = child
        .stderr
        .take()
        .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>);
    let (tx, rx) = watch::channel(false);
    Ok(ScriptRun {
        pgid,
        group: spec.group,
        child,
        readers: [reader(out), reader(err)],
        cancel_rx: rx,
        cancel_tx: Arc::new(tx),
        timeout: spec.timeout,
        kill_grace: spec.kill_grace,
    })
}

impl ScriptRun {
    pub fn canceller(&self) -> Canceller {
        Canceller(self.cancel_tx.clone())
    }

    pub async fn wait(mut self) -> Outcome {
        let stop = tokio::select! {
            s = self.child.wait() => Err(s),
            _ = tokio::time::sleep(self.timeout) => Ok(Ending::TimedOut),
            _ = self.cancel_rx.wait_for(|c| *c) => Ok(Ending::Cancelled),
        };
        let ending = match stop {
            Err(status) => {
                // The script is done; anything it left running in its group goes with it.
                let _ = kill_group(self.pgid, Signal::SIGKILL);
                match status {
                    Ok(s) => match (s.code(), s.signal()) {
                        (Some(c), _) => Ending::Exited(c),
                        (None, Some(sig)) => Ending::Signaled(sig),
                        (None, None) => Ending::Signaled(0),
                    },
                    Err(_) => Ending::Signaled(0),
                }
            }
            Ok(ending) => {
                self.stop_group().await;
                ending
            }
        };
        let exit_code = self
            .child
            .try_wait()
            .ok()
            .flatten()
            .and_then(|s| s.code().or(s.signal().map(|sig| 128 + sig)));
        // Whatever the script started, in any session or group, ends with its cgroup (or,
        // without one, with the agent's other descendants).
        let group = self.group.take();
        let oom_killed = tokio::task::spawn_blocking(move || match group {
            Some(g) => {
                g.kill();
                let oom = g.oom_killed();
                g.remove();
                oom
            }
            None => {
                if SUBREAPER.load(std::sync::atomic::Ordering::Relaxed) {
                    kill_descendants();
                }
                false
            }
        })
        .await
        .unwrap_or(false);
        let [(out, out_task), (err, err_task)] = self.readers;
        let drain = async {
            let _ = out_task.await;
            let _ = err_task.await;
        };
        if tokio::time::timeout(PIPE_DRAIN, drain).await.is_err() {
            tracing::warn!(
                pgid = self.pgid,
                "a process outside the script's group still holds its output open; output capture stopped"
            );
        }
        let take = |c: Arc<Mutex<Capture>>| c.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Outcome {
            ending,
            stdout: take(out),
            stderr: take(err),
            oom_killed,
            exit_code,
        }
    }

    /// SIGTERM the group (and every member of the cgroup), give it `kill_grace` to go,
    /// then SIGKILL whatever is left.
    async fn stop_group(&mut self) {
        let _ = kill_group(self.pgid, Signal::SIGTERM);
        if let Some(g) = &self.group {
            g.signal(Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + self.kill_grace;
        let mut leader_done = false;
        while tokio::time::Instant::now() < deadline {
            if !leader_done {
                leader_done = matches!(self.child.try_wait(), Ok(Some(_)));
            }
            if leader_done && !group_alive(self.pgid) {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
        let _ = kill_group(self.pgid, Signal::SIGKILL);
        let _ = self.child.wait().await;
    }
}

/// The fallback without cgroups (the agent is a child subreaper, so orphans of a script
/// are its descendants): SIGKILLs every descendant of this process. The agent runs one
/// thing at a time, so at the end of a run every descendant is that run's.
pub fn kill_descendants() -> usize {
    let me = std::process::id() as i32;
    let mut killed = 0;
    // Descendants may fork while we look: go round until none is left (bounded).
    for _ in 0..50 {
        let tree = descendants(me);
        if tree.is_empty() {
            break;
        }
        for pid in tree {
            if nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    killed
}

/// Set once this process is a child subreaper (the agent's fallback): only then are its
/// descendants the runs' (a process running several things at once, a test harness say,
/// must not have them killed).
static SUBREAPER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this process a child subreaper: orphans of its descendants become its children.
pub fn become_subreaper() -> Result<(), nix::Error> {
    nix::sys::prctl::set_child_subreaper(true)?;
    SUBREAPER.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Living (not zombie) descendants of `root`, from `/proc/*/stat`.
fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parent = std::collections::HashMap::new();
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state != "Z" {
            parent.insert(pid, ppid);
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &pp) in &parent {
            if pp == p && child != root && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Kills processes whose environment carries `var=value` (the fallback's way, after an
/// agent restart, to find what an interrupted run left: `FIELDHAND_ASSIGNMENT_ID`).
pub fn kill_tagged(var: &str, value: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let needle = format!("{var}={value}");
    let me = std::process::id() as i32;
    let mut n = 0;
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != me)
    {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
            && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// Signals every process in group `pgid`. `Ok(false)` if the group no longer exists.
/// Refuses pgid 0 and 1, which would mean our own group or init's.
pub fn kill_group(pgid: i32, sig: Signal) -> Result<bool, nix::Error> {
    if pgid <= 1 {
        return Err(Errno::EINVAL);
    }
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether any non-zombie process is in group `pgid`. Zombies count as gone: they run no
/// code, and a parent that never reaps (e.g. a minimal PID 1) would keep them forever.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_stat)
        .any(|(state, pgrp)| pgrp == pgid && running(state))
}

/// Whether a process exists and is not a zombie (see `group_alive` for why).
pub fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| running(state))
}

fn running(state: char) -> bool {
    state != 'Z' && state != 'X'
}

/// `(state, process group)` from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command, which may itself contain spaces or ')'.
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next();
    Some((state, f.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_head_and_tail() {
        let mut c = Capture::new(4, 3);
        c.push(b"ab");
        assert_eq!((c.to_text().as_str(), c.is_truncated()), ("ab", false));
        c.push(b"cdefg");
        assert_eq!((c.to_text().as_str(), c.is_truncated()), ("abcdefg", false));
        c.push(b"hij");
        assert!(c.is_truncated());
        assert_eq!(c.to_text(), "abcd\n…[3 bytes omitted]…\nhij");
        c.push(b"0123456789");
        assert_eq!(c.to_text(), "abcd\n…[13 bytes omitted]…\n789");
    }

    #[test]
    fn append_matches_pushing_the_same_bytes() {
        let data: Vec<u8> = (0..200u8).collect();
        for split in [0usize, 3, 50, 120, 199] {
            let mut whole = Capture::new(16, 8);
            whole.push(&data[..10]);
            whole.push(&data[10..]);
            let mut a = Capture::new(16, 8);
            a.push(&data[..10]);
            let mut b = Capture::new(16, 8);
            b.push(&data[10..10 + split.min(190)]);
            b.push(&data[10 + split.min(190)..]);
            a.append(&b);
            assert_eq!(a.to_text(), whole.to_text(), "split {split}");
        }
    }

    fn spec(script: &str, timeout_ms: u64) -> ScriptSpec {
        ScriptSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("X".into(), "42".into()),
            ],
            cwd: std::env::temp_dir(),
            timeout: Duration::from_millis(timeout_ms),
            kill_grace: Duration::from_millis(300),
            group: None,
        }
    }

    #[tokio::test]
    async fn exit_code_output_and_environment() {
        let run = spawn(
            spec(
                "echo out $X; echo err >&2; [ -z \"$HOME\" ] && exit 3",
                10_000,
            ),
            100,
            100,
        )
        .await
        .unwrap();
        let o = run.wait().await;
        assert_eq!(o.ending, Ending::Exited(3));
        assert_eq!(o.stdout.to_text(), "out 42\n");
        assert_eq!(o.stderr.to_text(), "err\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group_even_if_it_ignores_term() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "trap '' TERM; (trap '' TERM; echo $$ > /dev/null; sh -c 'echo $$ > {p}; trap \"\" TERM; while :; do sleep 0.05; done') & wait",
            p = pidfile.display()
        );
        let run = spawn(spec(&script, 300), 100, 100).await.unwrap();
        let pgid = run.pgid;
        let o = run.wait().await;
        assert_eq!(o.ending, Ending::TimedOut);
        assert!(!group_alive(pgid), "group {pgid} survived");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .map(|i| stat[i + 1..].split_whitespace().next().unwrap_or(""))
            .unwrap_or("");
        assert!(
            state.is_empty() || state == "Z",
            "grandchild {pid} still running: {stat}"
        );
    }

    #[tokio::test]
    async fn background_leftovers_die_with_a_finished_script() {
        let run = spawn(spec("sleep 30 & exit 0", 10_000), 100, 100)
            .await
            .unwrap();
        let pgid = run.pgid;
        let o = run.wait().await;
        assert_eq!(o.ending, Ending::Exited(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while group_alive(pgid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!group_alive(pgid));
    }

    #[tokio::test]
    async fn cancel_stops_the_script() {
        let run = spawn(spec("echo started; sleep 30", 60_000), 100, 100)
            .await
            .unwrap();
        let c = run.canceller();
        let waiter = tokio::spawn(run.wait());
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.cancel();
        let o = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.ending, Ending::Cancelled);
        assert_eq!(o.stdout.to_text(), "started\n");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error_naming_it() {
        let mut s = spec("true", 1000);
        s.program = "/nonexistent/interp".into();
        let e = spawn(s, 10, 10).await.err().unwrap();
        assert!(e.to_string().contains("/nonexistent/interp"), "{e}");
    }

    #[test]
    fn refuses_to_signal_our_own_or_inits_group() {
        assert_eq!(kill_group(0, Signal::SIGTERM), Err(Errno::EINVAL));
        assert_eq!(kill_group(1, Signal::SIGTERM), Err(Errno::EINVAL));
    }
}
