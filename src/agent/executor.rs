//! Runs one assignment: the dispatch by kind (scripts here; staging, image steps and removal
//! in their modules), and the script run itself: each script is written to a private file
//! and run by its interpreter (`runner::run_process`), in order, under one deadline for the
//! whole run; the first failure ends the run. Output of all scripts is captured together in
//! bounded memory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::proto::agent::{Assignment, RunResult, Work};
use crate::proto::domain::{ErrorCode, RunState};
use crate::sys::clock;
use crate::sys::process::{Capture, Ending, ScriptSpec};

pub use super::runner::{
    base_env, captured, interpreter, run_process, ExecReport, ExecSettings, Run, CAPTURE_HEAD,
    CAPTURE_TAIL, SCRIPT_PATH,
};

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
    let result = match &a.work {
        Work::Scripts(_) => {
            let run = Run {
                s: &settings,
                a: &a,
                dir: &dir,
                reports: &reports,
            };
            execute(run, from, &mut cancel, started_at, &mut reboot_after).await
        }
        Work::SoftwareStage(_) | Work::ImageStage { .. } => {
            super::stage::run(&settings, &a, &mut cancel, &reports, started_at).await
        }
        Work::ImageApply(_) => {
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
        Work::ImageRemove(image) => super::image::remove(&settings, image, started_at),
        // Refused by `machine::validate` before it could be queued.
        Work::Invalid { why, .. } => RunResult {
            error_code: Some(ErrorCode::InvalidAssignment),
            error_msg: Some(why.clone()),
            ..captured(
                RunState::Failed,
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
    let finish = |state: RunState,
                  exit_code,
                  code: Option<ErrorCode>,
                  msg: Option<String>,
                  out: &Capture,
                  err: &Capture| RunResult {
        exit_code,
        error_code: code,
        error_msg: msg,
        ..captured(state, &started_at, out, err)
    };
    // A previous attempt's leftovers (an agent killed mid-run) must not leak into this run.
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = crate::sys::fsutil::ensure_dir(dir, 0o700) {
        let msg = format!("cannot create work directory {}: {e}", dir.display());
        return finish(
            RunState::Failed,
            None,
            Some(ErrorCode::SpawnFailed),
            Some(msg),
            &stdout,
            &stderr,
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_seconds);
    let mut last_exit = None;
    for (i, script) in a.work.scripts().iter().enumerate().skip(from) {
        if *cancel.borrow() {
            return finish(
                RunState::Cancelled,
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
                RunState::Failed,
                None,
                Some(ErrorCode::SpawnFailed),
                Some(msg),
                &stdout,
                &stderr,
            );
        };
        let path = dir.join(safe_name(i, &script.name));
        if let Err(e) = write_script(&path, &script.content) {
            let msg = format!("cannot write script {}: {e}", path.display());
            return finish(
                RunState::Failed,
                None,
                Some(ErrorCode::SpawnFailed),
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
                RunState::TimedOut,
                None,
                Some(ErrorCode::ExecutionTimeout),
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
                    RunState::Failed,
                    None,
                    Some(ErrorCode::SpawnFailed),
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
                RunState::Failed,
                exit,
                Some(ErrorCode::MemoryLimitExceeded),
                Some(msg),
                &stdout,
                &stderr,
            );
        }
        match outcome.ending {
            Ending::Exited(0) => last_exit = Some(0),
            Ending::Exited(super::codes::EXIT_REBOOT) => {
                *reboot_at = Some(i);
                let msg = format!(
                    "script {:?} exited with 194: succeeded, reboot requested",
                    script.name
                );
                return finish(
                    RunState::Succeeded,
                    Some(super::codes::EXIT_REBOOT),
                    None,
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
            Ending::Exited(code) => {
                let msg = format!("script {:?} exited with code {code}", script.name);
                return finish(
                    RunState::Failed,
                    Some(code),
                    Some(ErrorCode::NonZeroExit),
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
            Ending::Signaled(sig) => {
                let msg = format!("script {:?} was killed by signal {sig}", script.name);
                return finish(
                    RunState::Failed,
                    Some(128 + sig),
                    Some(ErrorCode::KilledBySignal),
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
                    RunState::TimedOut,
                    None,
                    Some(ErrorCode::ExecutionTimeout),
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
                    RunState::Cancelled,
                    outcome.exit_code,
                    None,
                    Some(msg),
                    &stdout,
                    &stderr,
                );
            }
        }
    }
    finish(RunState::Succeeded, last_exit, None, None, &stdout, &stderr)
}
