//! Interactive user sessions: listing them (systemd-logind when it runs, else utmp),
//! warning them on their terminal the way `wall` does, and ending them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const DEFAULT_UTMP: &str = "/var/run/utmp";
const UTMP_RECORD: usize = 384;
const USER_PROCESS: i32 = 7;

/// Where sessions come from; tests point `utmp_path` and `tty_dir` at their own files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSource {
    /// Use systemd-logind (through `loginctl`) when systemd is the init system.
    pub logind: bool,
    pub utmp_path: PathBuf,
    /// Terminals live here (`/dev`); a session on line `pts/3` is warned at `<tty_dir>/pts/3`.
    pub tty_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub user: String,
    pub tty: Option<String>,
    pub leader: Option<i32>,
    pub via_logind: bool,
}

impl Session {
    pub fn describe(&self) -> String {
        match &self.tty {
            Some(t) => format!("{} on {t}", self.user),
            None => format!("{} (session {})", self.user, self.id),
        }
    }
}

fn logind_available(src: &SessionSource) -> bool {
    src.logind && Path::new("/run/systemd/system").is_dir()
}

/// The interactive sessions now. Blocking (runs loginctl or reads utmp).
pub fn list(src: &SessionSource) -> Vec<Session> {
    if logind_available(src) {
        if let Some(v) = list_logind() {
            return v;
        }
    }
    list_utmp(&src.utmp_path)
}

fn loginctl(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("loginctl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn list_logind() -> Option<Vec<Session>> {
    let ids = loginctl(&["list-sessions", "--no-legend"])?;
    let mut v = Vec::new();
    for line in ids.lines() {
        let Some(id) = line.split_whitespace().next() else {
            continue;
        };
        let Some(props) = loginctl(&[
            "show-session",
            id,
            "-p",
            "Name",
            "-p",
            "TTY",
            "-p",
            "Leader",
            "-p",
            "Class",
            "-p",
            "State",
        ]) else {
            continue;
        };
        let get = |k: &str| {
            props
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        if get("Class") != "user" || get("State") == "closing" {
            continue;
        }
        let tty = get("TTY");
        v.push(Session {
            id: id.to_string(),
            user: get("Name"),
            tty: (!tty.is_empty()).then_some(tty),
            leader: get("Leader").parse().ok(),
            via_logind: true,
        });
    }
    Some(v)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// USER_PROCESS records of a utmp file whose process still runs (utmp keeps stale rows).
pub fn list_utmp(path: &Path) -> Vec<Session> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    data.chunks_exact(UTMP_RECORD)
        .filter_map(|r| {
            let ut_type = i32::from_ne_bytes(r[0..4].try_into().ok()?);
            let pid = i32::from_ne_bytes(r[4..8].try_into().ok()?);
            if ut_type != USER_PROCESS || pid <= 1 || !super::process::alive(pid) {
                return None;
            }
            let line = cstr(&r[8..40]);
            Some(Session {
                id: format!("utmp:{pid}"),
                user: cstr(&r[44..76]),
                tty: (!line.is_empty()).then_some(line),
                leader: Some(pid),
                via_logind: false,
            })
        })
        .collect()
}

/// Builds one utmp USER_PROCESS record (for tests and tools that fake a login).
pub fn utmp_record(pid: i32, line: &str, user: &str) -> Vec<u8> {
    let mut r = vec![0u8; UTMP_RECORD];
    r[0..4].copy_from_slice(&USER_PROCESS.to_ne_bytes());
    r[4..8].copy_from_slice(&pid.to_ne_bytes());
    r[8..8 + line.len().min(32)].copy_from_slice(&line.as_bytes()[..line.len().min(32)]);
    r[44..44 + user.len().min(32)].copy_from_slice(&user.as_bytes()[..user.len().min(32)]);
    r
}

/// Writes `msg` to the session's terminal, as `wall` does. Best effort.
pub fn warn(src: &SessionSource, s: &Session, msg: &str) -> bool {
    let Some(tty) = &s.tty else {
        return false;
    };
    if tty.contains("..") || tty.starts_with('/') {
        return false;
    }
    let path = src.tty_dir.join(tty);
    let text = format!("\r\n\x07Broadcast message from fieldhand:\r\n\r\n{msg}\r\n\r\n");
    // Never block on a stuck terminal, never make it our controlling terminal.
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(&path);
    match file {
        Ok(mut f) => f.write_all(text.as_bytes()).is_ok(),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot warn a session");
            false
        }
    }
}

/// Ends a session: logind's TerminateSession, or SIGTERM then SIGKILL to its leader.
pub fn terminate(s: &Session) {
    if s.via_logind && loginctl(&["terminate-session", &s.id]).is_some() {
        return;
    }
    let Some(pid) = s.leader.filter(|p| *p > 1) else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    for _ in 0..50 {
        if !super::process::alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utmp_lists_live_user_processes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("utmp");
        let me = std::process::id() as i32;
        let mut data = utmp_record(me, "pts/7", "alice");
        data.extend(utmp_record(999_999, "pts/8", "ghost"));
        let mut dead = utmp_record(me, "tty1", "bob");
        dead[0..4].copy_from_slice(&8i32.to_ne_bytes()); // DEAD_PROCESS
        data.extend(dead);
        std::fs::write(&path, &data).unwrap();
        let v = list_utmp(&path);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].user, "alice");
        assert_eq!(v[0].tty.as_deref(), Some("pts/7"));
        assert_eq!(v[0].leader, Some(me));
        assert!(list_utmp(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn warnings_go_to_the_terminal_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pts")).unwrap();
        std::fs::write(dir.path().join("pts/7"), b"").unwrap();
        let src = SessionSource {
            logind: false,
            utmp_path: dir.path().join("utmp"),
            tty_dir: dir.path().to_path_buf(),
        };
        let s = Session {
            id: "x".into(),
            user: "alice".into(),
            tty: Some("pts/7".into()),
            leader: None,
            via_logind: false,
        };
        assert!(warn(&src, &s, "logging you off in 5 s"));
        let text = std::fs::read_to_string(dir.path().join("pts/7")).unwrap();
        assert!(text.contains("logging you off in 5 s"), "{text}");
        let evil = Session {
            tty: Some("../../etc/passwd".into()),
            ..s
        };
        assert!(!warn(&src, &evil, "x"));
    }
}
