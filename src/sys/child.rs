//! Long-lived child processes (the quickstart's controller and agents): started with their
//! output appended to a log file, stopped with SIGTERM and then SIGKILL.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running child; dropping it kills it, so a failing caller never leaks daemons.
pub struct Child {
    inner: tokio::process::Child,
    name: String,
}

pub fn spawn_logged<I, S>(name: &str, program: &Path, args: I, log: &Path) -> std::io::Result<Child>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    let inner = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()?;
    Ok(Child {
        inner,
        name: name.to_string(),
    })
}

impl Child {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it has exited (and how).
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.inner.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.inner.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(grace, self.inner.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.inner.kill().await;
    }
}
