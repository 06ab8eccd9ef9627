//! Images on the machine: the on-disk layout under `image_root` (one directory per staged
//! image, `current` as an atomically switched symlink, and `previous` kept until the new
//! image is committed so that it can be rolled back to), and the steps of an `ImageApply`
//! and an `ImageRemove` assignment.
//!
//! An `ImageApply` runs as numbered steps, each started by the state machine (so every
//! step is persisted before it starts, and a reboot sits between steps):
//! - [`ACTIVATE_STEP`]: switch `current` to the image, run `fieldhand/activate`; success asks
//!   for a reboot, failure switches back at once (the machine never booted the image);
//! - [`HEALTH_STEP`] (new boot): run `fieldhand/health-check`; success commits (drops
//!   `previous`), failure rolls back and asks for a reboot;
//! - [`VERIFY_STEP`] (boot after a rollback): run the health check of the image that is
//!   current again and report `IMAGE_HEALTH_CHECK_FAILED` with what it found;
//! - [`UNDO_STEP`] (the agent restarted during activation): switch back and report.
//!
//! A rebuild (seed 003) is the same apply with a payload: [`ACTIVATE_STEP`] first extracts
//! the image into a fresh slot `<image_id>.<tag>`, and empties the data area when asked by
//! moving its contents aside ([`data`]); the commit deletes them, every switch back restores
//! them.
//!
//! ```text
//! image_root/
//!   <image_id>/            an extracted image (fieldhand/activate, fieldhand/health-check)
//!   current -> <image_id>  what the machine runs (boot tooling points here)
//!   previous -> <image_id> the image to roll back to, until the new one is committed
//! ```

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use super::codes::{
    ACTIVATE_HOOK, ACTIVATE_STEP, HEALTH_HOOK, HEALTH_STEP, UNDO_STEP, VERIFY_STEP,
};
pub use super::layout::{
    cleanup, commit, current, hook, image_dir, image_of, previous, prune, remove_link, rollback,
    switch_to, CURRENT, PREVIOUS,
};
use super::runner::{self, ExecSettings, Run, CAPTURE_HEAD, CAPTURE_TAIL};
use crate::proto::agent::{ImageAssignment, ImageRecord, RunResult};
use crate::proto::domain::{CurrentImageState, ErrorCode, RunState};
use crate::sys::clock;
use crate::sys::process::{Capture, Ending, ScriptSpec};

/// What one hook did.
struct HookRun {
    /// `None`: the image has no such hook (that counts as success).
    ending: Option<Ending>,
    stdout: Capture,
    stderr: Capture,
    error: Option<String>,
}

impl HookRun {
    fn ok(&self) -> bool {
        self.error.is_none() && matches!(self.ending, None | Some(Ending::Exited(0)))
    }

    fn describe(&self, hook: &str, image_id: &str) -> String {
        match (&self.error, self.ending) {
            (Some(e), _) => format!("{hook} of image {image_id} could not run: {e}"),
            (None, None) => format!("image {image_id} has no {hook} hook"),
            (None, Some(Ending::Exited(c))) => {
                format!("{hook} of image {image_id} exited with {c}")
            }
            (None, Some(Ending::Signaled(sig))) => {
                format!("{hook} of image {image_id} was killed by signal {sig}")
            }
            (None, Some(Ending::TimedOut)) => {
                format!("{hook} of image {image_id} exceeded its timeout and was stopped")
            }
            (None, Some(Ending::Cancelled)) => format!("{hook} of image {image_id} was stopped"),
        }
    }
}

/// What the executor reports after an image step: the image `current` now holds, in
/// `state` (the state machine adds the pending image).
fn current_image(root: &Path, state: CurrentImageState) -> ImageRecord {
    let cur = current(root);
    ImageRecord {
        current_image_state: cur.as_ref().map(|_| state),
        current_image_id: cur.map(|c| image_of(&c)),
        ..ImageRecord::default()
    }
}

/// The environment of a hook: the base script environment, the image ids, and the push's
/// parameters (`FIELDHAND_COMPUTE_PROFILE_*`, `FIELDHAND_ADD_VIRTUAL_TPM`, ...).
fn hook_env(run: &Run<'_>, dir: &str) -> Vec<(String, String)> {
    let root = &run.s.image_root;
    let mut env = runner::base_env(run.s, run.a);
    env.push(("FIELDHAND_IMAGE_ID".into(), image_of(dir)));
    env.push((
        "FIELDHAND_IMAGE_DIR".into(),
        image_dir(root, dir).display().to_string(),
    ));
    env.push(("FIELDHAND_IMAGE_ROOT".into(), root.display().to_string()));
    env.push((
        "FIELDHAND_DATA_DIR".into(),
        run.s.data_dir.display().to_string(),
    ));
    if let Some(prev) = previous(root) {
        env.push(("FIELDHAND_PREVIOUS_IMAGE_ID".into(), image_of(&prev)));
    }
    if let Some(img) = run.a.work.image() {
        if let Some(lang) = &img.language {
            // Seed 003: the rebuild's language reaches the image as its locale.
            env.retain(|(k, _)| k != "LANG");
            env.push(("LANG".into(), lang.clone()));
            env.push(("FIELDHAND_LANGUAGE".into(), lang.clone()));
        }
        for (k, v) in &img.env {
            if !env.iter().any(|(e, _)| e == k) {
                env.push((k.clone(), v.clone()));
            }
        }
    }
    env
}

async fn run_hook(run: &Run<'_>, dir: &str, hook_name: &str, timeout: Duration) -> HookRun {
    let mut out = HookRun {
        ending: None,
        stdout: Capture::new(CAPTURE_HEAD, CAPTURE_TAIL),
        stderr: Capture::new(CAPTURE_HEAD, CAPTURE_TAIL),
        error: None,
    };
    let Some(path) = hook(&run.s.image_root, dir, hook_name) else {
        return out;
    };
    // Hooks run with /bin/sh unless they are executable (then their #! line decides), so
    // a hook packed without the executable bit still runs.
    let executable = std::fs::metadata(&path)
        .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0);
    let (program, args) = if executable {
        (path.clone(), Vec::new())
    } else {
        (PathBuf::from("/bin/sh"), vec![OsString::from(&path)])
    };
    let spec = ScriptSpec {
        program,
        args,
        env: hook_env(run, dir),
        cwd: image_dir(&run.s.image_root, dir),
        timeout,
        kill_grace: run.s.kill_grace,
        group: None,
    };
    match runner::run_process(
        spec,
        &run.s.containment,
        &run.a.assignment_id,
        run.reports,
        None,
    )
    .await
    {
        Ok(o) => {
            out.ending = Some(o.ending);
            out.stdout = o.stdout;
            out.stderr = o.stderr;
        }
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

/// The data area during a rebuild that empties it: the old contents are moved aside (same
/// filesystem, so one rename each) and deleted only when the new image is committed; a
/// rollback moves them back. The directory itself (often a mount point) is never removed.
pub mod data {
    use std::io;
    use std::path::{Path, PathBuf};

    use crate::sys::fsutil;

    const ASIDE_PREFIX: &str = ".fieldhand-aside-";

    fn aside(data: &Path, tag: &str) -> PathBuf {
        data.join(format!("{ASIDE_PREFIX}{tag}"))
    }

    fn entries(data: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(data)? {
            let e = e?;
            if !e.file_name().to_string_lossy().starts_with(ASIDE_PREFIX) {
                out.push(e.path());
            }
        }
        Ok(out)
    }

    fn remove(p: &Path) -> io::Result<()> {
        let res = if std::fs::symlink_metadata(p)?.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        match res {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Empties `data` by moving its contents into an aside directory. Idempotent.
    pub fn move_aside(data: &Path, tag: &str) -> io::Result<()> {
        fsutil::ensure_dir(data, 0o755)?;
        let a = aside(data, tag);
        fsutil::ensure_dir(&a, 0o700)?;
        for p in entries(data)? {
            if let Some(name) = p.file_name() {
                std::fs::rename(&p, a.join(name))?;
            }
        }
        fsutil::fsync_dir(&a)?;
        fsutil::fsync_dir(data)
    }

    /// Undoes [`move_aside`]: what the failed attempt wrote goes, the old contents return.
    pub fn restore(data: &Path, tag: &str) -> io::Result<()> {
        let a = aside(data, tag);
        if !a.is_dir() {
            return Ok(());
        }
        for p in entries(data)? {
            remove(&p)?;
        }
        for e in std::fs::read_dir(&a)? {
            let e = e?;
            std::fs::rename(e.path(), data.join(e.file_name()))?;
        }
        std::fs::remove_dir(&a)?;
        fsutil::fsync_dir(data)
    }

    /// The new image is committed: the old contents go for good.
    pub fn drop_aside(data: &Path, tag: &str) -> io::Result<()> {
        let a = aside(data, tag);
        match std::fs::remove_dir_all(&a) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => fsutil::fsync_dir(data),
        }
    }
}

/// One `ImageApply` step (see the module docs). `reboot_after` is set to the step when a
/// reboot must follow it.
pub(super) async fn apply(
    run: Run<'_>,
    step: usize,
    started_at: String,
    reboot_after: &mut Option<usize>,
) -> RunResult {
    let root = run.s.image_root.clone();
    let data_dir = run.s.data_dir.clone();
    let tag = run.a.assignment_id.clone();
    let img: ImageAssignment = run.a.work.image().cloned().unwrap_or_default();
    let image_id = img.image_id.clone();
    // Where the image lives: its own id for a push, a fresh slot for a rebuild.
    let dir = img.slot.clone().unwrap_or_else(|| image_id.clone());
    let timeout = Duration::from_secs(run.a.timeout_seconds);
    let mut stdout = Capture::new(CAPTURE_HEAD, CAPTURE_TAIL);
    let mut stderr = Capture::new(CAPTURE_HEAD, CAPTURE_TAIL);
    let report = |root: &Path, state: CurrentImageState| current_image(root, state);
    let finish = |ok: bool,
                  code: Option<ErrorCode>,
                  msg: String,
                  out: &Capture,
                  err: &Capture,
                  image: Option<ImageRecord>| RunResult {
        error_code: code,
        error_msg: Some(msg),
        image: image.map(Box::new),
        ..runner::captured(
            if ok {
                RunState::Succeeded
            } else {
                RunState::Failed
            },
            &started_at,
            out,
            err,
        )
    };
    let io_fail = |what: &str, e: io::Error| {
        finish(
            false,
            Some(ErrorCode::ImageIoError),
            format!("cannot {what} under {}: {e}", root.display()),
            &Capture::new(0, 0),
            &Capture::new(0, 0),
            Some(report(&root, CurrentImageState::Ready)),
        )
    };
    // Switches away from `dir` (to `previous`, or to nothing) and brings the data back.
    let switch_back = |root: &Path| -> io::Result<Option<String>> {
        let back = if current(root).as_deref() == Some(dir.as_str()) {
            match previous(root) {
                Some(_) => rollback(root).map(Some)?,
                None => {
                    remove_link(root, CURRENT)?;
                    None
                }
            }
        } else {
            current(root)
        };
        if img.empty_data {
            data::restore(&data_dir, &tag)?;
        }
        Ok(back)
    };
    match step {
        ACTIVATE_STEP => {
            if let Some(p) = &img.payload {
                // A rebuild: the system area is extracted afresh into a new slot.
                if let Err(f) =
                    super::stage::stage_image_into(run.s, &dir, p, run.reports, &tag).await
                {
                    return finish(false, Some(f.code), f.msg, &stdout, &stderr, None);
                }
            }
            if !image_dir(&root, &dir).is_dir() {
                let msg = format!(
                    "image {image_id} is not staged under {}; stage it first",
                    root.display()
                );
                return finish(
                    false,
                    Some(ErrorCode::ImageNotStaged),
                    msg,
                    &stdout,
                    &stderr,
                    None,
                );
            }
            if img.empty_data {
                if let Err(e) = data::move_aside(&data_dir, &tag) {
                    let _ = data::restore(&data_dir, &tag);
                    return io_fail("empty the data area", e);
                }
            }
            if let Err(e) = switch_to(&root, &dir) {
                let _ = switch_back(&root);
                return io_fail("switch to the new image", e);
            }
            let h = run_hook(&run, &dir, ACTIVATE_HOOK, timeout).await;
            stdout.append(&h.stdout);
            stderr.append(&h.stderr);
            let what = h.describe(ACTIVATE_HOOK, &image_id);
            if h.ok() {
                *reboot_after = Some(ACTIVATE_STEP);
                let msg = format!("switched to image {image_id} ({what}); rebooting into it");
                return finish(true, None, msg, &stdout, &stderr, None);
            }
            // The machine never booted the image: switching back is the whole rollback.
            if let Err(e) = switch_back(&root) {
                return io_fail("switch back after a failed activation", e);
            }
            let msg = format!("{what}; switched back, no reboot was needed");
            finish(
                false,
                Some(ErrorCode::ImageActivateFailed),
                msg,
                &stdout,
                &stderr,
                Some(report(&root, CurrentImageState::Ready)),
            )
        }
        HEALTH_STEP => {
            if current(&root).as_deref() != Some(dir.as_str()) {
                let msg = format!(
                    "after the reboot, current is {:?}, not image {image_id}",
                    current(&root)
                );
                return finish(
                    false,
                    Some(ErrorCode::ImageHealthCheckFailed),
                    msg,
                    &stdout,
                    &stderr,
                    Some(report(&root, CurrentImageState::Failed)),
                );
            }
            let h = run_hook(&run, &dir, HEALTH_HOOK, timeout).await;
            stdout.append(&h.stdout);
            stderr.append(&h.stderr);
            let what = h.describe(HEALTH_HOOK, &image_id);
            if h.ok() {
                let committed = commit(&root).and_then(|()| {
                    if img.empty_data {
                        data::drop_aside(&data_dir, &tag)
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = committed {
                    return io_fail("commit the new image", e);
                }
                let msg = format!("image {image_id} is current and committed ({what})");
                return finish(
                    true,
                    None,
                    msg,
                    &stdout,
                    &stderr,
                    Some(report(&root, CurrentImageState::Ready)),
                );
            }
            let notes = match switch_back(&root) {
                Ok(Some(p)) => format!("{what}; rolled back to image {}; rebooting", image_of(&p)),
                Ok(None) => format!(
                    "{what}; no previous image: the machine has no current image now; rebooting"
                ),
                Err(e) => return io_fail("roll back", e),
            };
            *reboot_after = Some(HEALTH_STEP);
            finish(
                false,
                Some(ErrorCode::ImageHealthCheckFailed),
                notes,
                &stdout,
                &stderr,
                Some(report(&root, CurrentImageState::Ready)),
            )
        }
        VERIFY_STEP => {
            let (msg, state) = match current(&root) {
                Some(cur) => {
                    let h = run_hook(&run, &cur, HEALTH_HOOK, timeout).await;
                    stdout.append(&h.stdout);
                    stderr.append(&h.stderr);
                    let healthy = h.ok();
                    let cur_id = image_of(&cur);
                    let what = h.describe(HEALTH_HOOK, &cur_id);
                    let verdict = if healthy { "healthy" } else { "NOT healthy" };
                    (
                        format!(
                            "image {image_id} failed its health check and was rolled back; image {cur_id} is current again and {verdict} ({what})"
                        ),
                        if healthy {
                            CurrentImageState::Ready
                        } else {
                            CurrentImageState::Failed
                        },
                    )
                }
                None => (
                    format!(
                        "image {image_id} failed its health check and was rolled back; there is no previous image"
                    ),
                    CurrentImageState::Ready,
                ),
            };
            finish(
                false,
                Some(ErrorCode::ImageHealthCheckFailed),
                msg,
                &stdout,
                &stderr,
                Some(report(&root, state)),
            )
        }
        _ => {
            // UNDO_STEP: the agent restarted during activation.
            if let Err(e) = switch_back(&root) {
                return io_fail("switch back after an interrupted activation", e);
            }
            let msg = format!(
                "the agent restarted while image {image_id} was being activated; switched back to {:?} and stopped",
                current(&root).map(|c| image_of(&c))
            );
            finish(
                false,
                Some(ErrorCode::AgentRestarted),
                msg,
                &stdout,
                &stderr,
                Some(report(&root, CurrentImageState::Ready)),
            )
        }
    }
}

/// An `ImageRemove` assignment: drop a pending image (never the current or previous one),
/// or every image (`remove_all`).
pub(super) fn remove(s: &ExecSettings, img: &ImageAssignment, started_at: String) -> RunResult {
    let root = &s.image_root;
    let image_id = img.image_id.clone();
    let remove_all = img.remove_all;
    let res: io::Result<String> = (|| {
        if remove_all {
            remove_link(root, CURRENT)?;
            remove_link(root, PREVIOUS)?;
            prune(root, &[]);
            return Ok(format!("removed every image under {}", root.display()));
        }
        if current(root).as_deref() == Some(image_id.as_str())
            || previous(root).as_deref() == Some(image_id.as_str())
        {
            return Ok(format!("image {image_id} is in use; kept"));
        }
        match std::fs::remove_dir_all(image_dir(root, &image_id)) {
            Ok(()) => Ok(format!("removed pending image {image_id}")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Ok(format!("image {image_id} was not staged here"))
            }
            Err(e) => Err(e),
        }
    })();
    let (ok, msg) = match res {
        Ok(m) => (true, m),
        Err(e) => (
            false,
            format!("cannot remove images under {}: {e}", root.display()),
        ),
    };
    RunResult {
        state: if ok {
            RunState::Succeeded
        } else {
            RunState::Failed
        },
        exit_code: None,
        stdout: format!("{msg}\n"),
        stderr: String::new(),
        output_truncated: false,
        started_at: Some(started_at),
        finished_at: clock::now_rfc3339(),
        error_code: (!ok).then_some(ErrorCode::ImageIoError),
        error_msg: (!ok).then_some(msg),
        staged_commit: None,
        image: Some(Box::new(current_image(root, CurrentImageState::Ready))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(root: &Path, id: &str) {
        std::fs::create_dir_all(image_dir(root, id).join("fieldhand")).unwrap();
    }

    #[test]
    fn switch_commit_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        staged(root, "img-1");
        staged(root, "img-2");
        assert_eq!(switch_to(root, "img-1").unwrap(), None);
        assert_eq!(current(root).as_deref(), Some("img-1"));
        assert_eq!(previous(root), None);
        // A new image: the old one is kept for a rollback.
        assert_eq!(switch_to(root, "img-2").unwrap().as_deref(), Some("img-1"));
        assert_eq!(current(root).as_deref(), Some("img-2"));
        assert_eq!(previous(root).as_deref(), Some("img-1"));
        assert_eq!(
            switch_to(root, "img-2").unwrap().as_deref(),
            Some("img-1"),
            "idempotent"
        );
        // Roll back: img-1 is current again and img-2 is still on disk.
        assert_eq!(rollback(root).unwrap(), "img-1");
        assert_eq!(current(root).as_deref(), Some("img-1"));
        assert_eq!(previous(root), None);
        assert!(image_dir(root, "img-2").is_dir());
        assert!(rollback(root).is_err(), "nothing left to roll back to");
        // Switch again and commit: the previous image goes away.
        switch_to(root, "img-2").unwrap();
        commit(root).unwrap();
        assert_eq!(current(root).as_deref(), Some("img-2"));
        assert_eq!(previous(root), None);
        assert!(!image_dir(root, "img-1").exists());
        // The symlink is what boot tooling reads.
        let resolved = std::fs::canonicalize(root.join(CURRENT)).unwrap();
        assert_eq!(
            resolved,
            std::fs::canonicalize(image_dir(root, "img-2")).unwrap()
        );
    }

    #[test]
    fn refuses_unknown_or_unsafe_images_and_finds_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(switch_to(root, "missing").is_err());
        assert!(switch_to(root, "../etc").is_err());
        staged(root, "img-1");
        assert_eq!(hook(root, "img-1", "activate"), None);
        std::fs::write(
            image_dir(root, "img-1").join("fieldhand/activate"),
            "#!/bin/sh\n",
        )
        .unwrap();
        assert_eq!(
            hook(root, "img-1", "activate"),
            Some(image_dir(root, "img-1").join("fieldhand/activate"))
        );
    }
}
