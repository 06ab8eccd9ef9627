//! The low-level run of one process for the agent: the settings every run works with, the
//! reports a run sends the core, the clean environment scripts and hooks start with, and
//! `run_process` (its cgroup made first, its process group reported, cancel wired in).
//! Below script runs, image steps and staging; it uses none of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::proto::agent::{Assignment, RunResult};
use crate::proto::domain::RunState;
use crate::sys::clock;
use crate::sys::process::{self, Capture, ScriptSpec};

/// Bytes kept from the start and from the end of each stream.
pub const CAPTURE_HEAD: usize = 32 * 1024;
pub const CAPTURE_TAIL: usize = 32 * 1024;
/// The PATH scripts get: the clean environment must not depend on how the agent was started.
pub const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The interpreter for a `command_type`.
pub fn interpreter(command_type: &str) -> Option<&'static str> {
    match command_type {
        "sh" => Some("/bin/sh"),
        "bash" => Some("/bin/bash"),
        // Found through SCRIPT_PATH: distributions put python3 in different places.
        "python3" => Some("python3"),
        _ => None,
    }
}

#[derive(Debug, Clone)]
pub struct ExecSettings {
    /// Parent of the per-assignment work directories (under `state_dir`).
    pub work_root: PathBuf,
    pub machine_id: String,
    pub kill_grace: Duration,
    /// HOME for scripts.
    pub home: String,
    pub state_dir: PathBuf,
    /// Images (`<image_id>/`, `current`, `previous`).
    pub image_root: PathBuf,
    /// The data area a rebuild keeps or empties.
    pub data_dir: PathBuf,
    /// For payload downloads (from the controller in use).
    pub client: super::failover::Controllers,
    /// Each run's cgroup (or the subreaper fallback).
    pub containment: crate::sys::cgroup::Containment,
    pub payloads: crate::config::agent::PayloadSettings,
}

/// Messages from a run to the core.
#[derive(Debug)]
// A run sends one `Finished`; boxing its result would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ExecReport {
    Spawned {
        assignment_id: String,
        pgid: i32,
    },
    Finished {
        assignment_id: String,
        result: RunResult,
        /// Index of the script that exited with 194 ("succeeded, please reboot").
        reboot_after: Option<usize>,
    },
    /// Staging progress of the running assignment.
    Progress {
        assignment_id: String,
        components: Vec<crate::proto::agent::ComponentProgress>,
    },
}

/// A result with the captured output of a run and no error yet.
pub fn captured(state: RunState, started_at: &str, out: &Capture, err: &Capture) -> RunResult {
    RunResult {
        state,
        exit_code: None,
        stdout: out.to_text(),
        stderr: err.to_text(),
        output_truncated: out.is_truncated() || err.is_truncated(),
        started_at: Some(started_at.to_string()),
        finished_at: clock::now_rfc3339(),
        error_code: None,
        error_msg: None,
        staged_commit: None,
        image: None,
    }
}

/// What a script run works with.
pub struct Run<'a> {
    pub s: &'a ExecSettings,
    pub a: &'a Assignment,
    pub dir: &'a Path,
    pub reports: &'a mpsc::Sender<ExecReport>,
}

/// The environment every script and hook starts with (nothing is inherited from the agent).
pub fn base_env(s: &ExecSettings, a: &Assignment) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), SCRIPT_PATH.into()),
        ("HOME".into(), s.home.clone()),
        ("LANG".into(), "C.UTF-8".into()),
        ("FIELDHAND_TASK_ID".into(), a.task_id.clone()),
        ("FIELDHAND_MACHINE_ID".into(), s.machine_id.clone()),
        ("FIELDHAND_ASSIGNMENT_ID".into(), a.assignment_id.clone()),
    ]
}

/// Starts one process, reports its process group to the core (so a restart can kill it),
/// and waits for it; `cancel`, when given, stops it.
pub async fn run_process(
    mut spec: ScriptSpec,
    containment: &crate::sys::cgroup::Containment,
    assignment_id: &str,
    reports: &mpsc::Sender<ExecReport>,
    mut cancel: Option<&mut watch::Receiver<bool>>,
) -> Result<process::Outcome, process::ProcessError> {
    // The group exists (named after the persisted running assignment) before the process
    // does: an agent that dies at any moment after this finds it at its next start.
    spec.group =
        containment
            .group_for(assignment_id)
            .map_err(|e| process::ProcessError::Spawn {
                program: spec.program.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
    let run = process::spawn(spec, CAPTURE_HEAD, CAPTURE_TAIL).await?;
    let _ = reports
        .send(ExecReport::Spawned {
            assignment_id: assignment_id.to_string(),
            pgid: run.pgid,
        })
        .await;
    let canceller = run.canceller();
    let wait = run.wait();
    tokio::pin!(wait);
    Ok(loop {
        let Some(c) = cancel.as_deref_mut() else {
            break wait.await;
        };
        tokio::select! {
            o = &mut wait => break o,
            changed = c.changed() => {
                if changed.is_err() || *c.borrow() {
                    canceller.cancel();
                }
            }
        }
    })
}
