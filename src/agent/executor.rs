//! Runs one assignment: each script is written to a private file and run by its interpreter
//! through `sys::process`, in order, under one deadline for the whole run; the first failure
//! ends the run. Output of all scripts is captured together in bounded memory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::proto::agent::{Assignment, AssignmentKind, RunResult};
use crate::sys::clock;
use crate::sys::process::{self, Capture, Ending, ScriptSpec};

/// Bytes kept from the start and from the end of each stream.
pub const CAPTURE_HEAD: usize = 32 * 1024;
pub const CAPTURE_TAIL: usize = 32 * 1024;
/// The PATH scripts get: the clean environment must not depend on how the agent was started.
pub const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub const EXECUTION_TIMEOUT: &str = "EXECUTION_TIMEOUT";
pub const NON_ZERO_EXIT: &str = "NON_ZERO_EXIT";
pub const KILLED_BY_SIGNAL: &str = "KILLED_BY_SIGNAL";
pub const SPAWN_FAILED: &str = "SPAWN_FAILED";
pub const MEMORY_LIMIT_EXCEEDED: &str = "MEMORY_LIMIT_EXCEEDED";

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
    /// For payload downloads.
    pub client: crate::net::client::HttpsClient,
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

fn safe_name(i: usize, name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{i:02}-{cleaned}")
}

fn write_script(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

/// Runs `a` to its end and sends `Finished` (always exactly once). `cancel` flips to true when
/// the operator cancels.
pub async fn run(
    settings: ExecSettings,
    a: Assignment,
    from: usize,
    mut cancel: watch::Receiver<bool>,
    reports: mpsc::Sender<ExecReport>,
) {
    let started_at = clock::now_rfc3339();
    let id = a.assignment_id.clone();
    let dir = settings.work_root.join(&id);
    let mut reboot_after = None;
    let result = match a.kind {
        AssignmentKind::ScriptExecution => {
            let run = Run {
                s: &settings,
                a: &a,
                dir: &dir,
                reports: &reports,
            };
            execute(run, from, &mut cancel, started_at, &mut reboot_after).await
        }
        AssignmentKind::SoftwareStage | AssignmentKind::ImageStage => {
            super::stage::run(&settings, &a, &mut cancel, &reports, started_at).await
        }
        AssignmentKind::ImageApply => {
            // Cancel is not passed on: once an image is being switched in, the step runs
            // to its end (the controller only cancels while users are being logged off).
            let run = Run {
                s: &settings,
                a: &a,
                dir: &dir,
                reports: &reports,
            };
            super::image::apply(run, from, started_at, &mut reboot_after).await
        }
        AssignmentKind::ImageRemove => super::image::remove(&settings, &a, started_at),
        // Refused by `machine::validate` before it could be queued.
        AssignmentKind::Unknown => RunResult {
            error_code: Some(super::machine::INVALID_ASSIGNMENT.into()),
            error_msg: Some("unknown assignment kind".into()),
            ..captured(
                "FAILED",
                &started_at,
                &Capture::new(0, 0),
                &Capture::new(0, 0),
            )
        },
    };
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove work directory");
        }
    }
    let _ = reports
        .send(ExecReport::Finished {
            assignment_id: id,
            result,
            reboot_after,
        })
        .await;
}

/// A result with the captured output of a run and no error yet.
pub(super) fn captured(state: &str, started_at: &str, out: &Capture, err: &Capture) -> RunResult {
    RunResult {
        state: state.into(),
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
pub(super) struct Run<'a> {
    pub s: &'a ExecSettings,
    pub a: &'a Assignment,
    pub dir: &'a Path,
    pub reports: &'a mpsc::Sender<ExecReport>,
}

/// The environment every script and hook starts with (nothing is inherited from the agent).
pub(super) fn base_env(s: &ExecSettings, a: &Assignment) -> Vec<(String, String)> {
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
pub(super) async fn run_process(
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

/// Runs the scripts from index `from`. A script that exits with 194 ("succeeded, please
/// reboot") ends the run there and its index goes to `reboot_at`.
async fn execute(
    run: Run<'_>,
    from: usize,
    cancel: &mut watch::Receiver<bool>,
    started_at: String,
    reboot_at: &mut Option<usize>,
) -> RunResult {
    let Run { s, a, dir, reports } = run;
    let mut stdout = Capture::new(CAPTURE_HEAD, CAPTURE_TAIL);
    let mut stderr = Capture::new(CAPTURE_HEAD, CAPTURE_TAIL);
    let finish = |state: &str,
                  exit_code,
                  code: Option<&str>,
                  msg: Option<String>,
                  out: &Capture,
                  err: &Capture| RunResult {
        exit_code,
        error_code: code.map(str::to_string),
        error_msg: msg,
        ..captured(state, &started_at, out, err)
    };
    // A previous attempt's leftovers (an agent killed mid-run) must not leak into this run.
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = crate::sys::fsutil::ensure_dir(dir, 0o700) {
        let msg = format!("cannot create work directory {}: {e}", dir.display());
        return finish(
            "FAILED",
            None,
            Some(SPAWN_FAILED),
            Some(msg),
            &stdout,
            &stderr,
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_seconds);
    let mut last_exit = None;
    for (i, script) in a.scripts.iter().enumerate().skip(from) {
        if *cancel.borrow() {
            return finish(
                "CANCELLED",
                last_exit,
                None,
                Some("cancelled by the operator".into()),
                &stdout,
                &stderr,
            );
        }
        let Some(program) = interpreter(&script.command_type) else {
            let msg = format!("unknown command_type {:?}", script.command_type);
            return finish(
                "FAILED",
                None,
                Some(SPAWN_FAILED),
                Some(msg),
                &stdout,
                &stderr,
            );
        };
        let path = dir.join(safe_name(i, &script.name));
        if let Err(e) = write_script(&path, &script.content) {
            let msg = format!("cannot write script {}: {e}", path.display());
            return finish(
                "FAILED",
                None,
                Some(SPAWN_FAILED),
                Some(msg),
                &stdout,
                &stderr,
            );
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            let msg = format!(
                "timed out after {} s before script {:?} started",
                a.timeout_seconds, script.name
            );
            return finish(
                "TIMED_OUT",
                None,
                Some(EXECUTION_TIMEOUT),
                Some(msg),
                &stdout,
                &stderr,
            );
        }
        let spec = ScriptSpec {
            program: PathBuf::from(program),
            args: vec![OsString::from(&path)],
            env: base_env(s, a),
            cwd: dir.to_path_buf(),
            timeout: remaining,
            kill_grace: s.kill_grace,
            group: None,
        };
        let outcome = match run_process(
            spec,
            &s.containment,
            &a.assignment_id,
            reports,
            Some(&mut *cancel),
        )
        .await
        {
            Ok(o) => o,
            Err(e) => {
                return finish(
                    "FAILED",
                    None,
                    Some(SPAWN_FAILED),
                    Some(e.to_string()),
                    &stdout,
                    &stderr,
                )
            }
        };
        stdout.append(&outcome.stdout);
        stderr.append(&outcome.stderr);
        if outcome.oom_killed {
            let msg = format!(
                "script {:?} reached the run's memory limit ([exec] memory_max) and was killed",
                script.name
            );
            let exit = match outcome.ending {
                Ending::Exited(c) => Some(c),
                Ending::Signaled(sig) => Some(128 + sig),
                Ending::TimedOut | Ending::Cancelled => None,
            };
            return finish(
                "FAILED",
                exit,
                Some(MEMORY_LIMIT_EXCEEDED),
                Some(msg),
                &stdout,
                &stderr,
            );
        }
        match outcome.ending {
            Ending::Exited(0) => last_exit = Some(0),
            Ending::Exited(super::machine::EXIT_REBOOT) => {
                *reboot_at = Some(i);
                let msg = format!(
                    "script {:?} exited with 194: succeeded, reboot requested",
                    script.name
                );
                return finish(
                    "SUCCEEDED",
                    Some(super::machine::EXIT_REBOOT),
                    None,
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
            Ending::Exited(code) => {
                let msg = format!("script {:?} exited with code {code}", script.name);
                return finish(
                    "FAILED",
                    Some(code),
                    Some(NON_ZERO_EXIT),
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
            Ending::Signaled(sig) => {
                let msg = format!("script {:?} was killed by signal {sig}", script.name);
                return finish(
                    "FAILED",
                    Some(128 + sig),
                    Some(KILLED_BY_SIGNAL),
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
            Ending::TimedOut => {
                let msg = format!(
                    "script {:?} exceeded the execution timeout of {} s; its process group was stopped",
                    script.name, a.timeout_seconds
                );
                return finish(
                    "TIMED_OUT",
                    None,
                    Some(EXECUTION_TIMEOUT),
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
            Ending::Cancelled => {
                let msg = format!(
                    "script {:?} was stopped: cancelled by the operator",
                    script.name
                );
                // What the stop did to it (e.g. 143 for SIGTERM) stays visible.
                return finish(
                    "CANCELLED",
                    outcome.exit_code,
                    None,
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
        }
    }
    finish("SUCCEEDED", last_exit, None, None, &stdout, &stderr)
}
