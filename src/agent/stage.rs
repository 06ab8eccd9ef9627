//! Runs a `SoftwareStage` or `ImageStage` assignment: check signatures and disk space,
//! download and verify every payload, unpack it, and make `state_dir/software/<commit>/` (or
//! `image_root/<image_id>/`) appear complete in one rename. Staging installs nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::codes::Failure;
use super::runner::{ExecReport, ExecSettings};
use crate::payload::extract::{self, Limits};
use crate::payload::fetch::{self, Cache, FetchError};
use crate::proto::agent::{
    Assignment, ComponentProgress, PayloadRef, RunResult, StagePayload, Work,
};
use crate::proto::domain::{ComponentPhase, ErrorCode, RunState};
use crate::sys::{clock, facts, fsutil};

/// Progress goes to the core at most this often (the link reports it onwards).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// `state_dir/software`.
pub fn software_root(state_dir: &Path) -> PathBuf {
    state_dir.join("software")
}

pub fn payload_cache(state_dir: &Path) -> Cache {
    Cache::new(state_dir.join("payloads"))
}

impl From<FetchError> for Failure {
    fn from(e: FetchError) -> Self {
        Failure::new(e.code(), e.to_string())
    }
}

/// How a staging run that did not succeed ends: its state, code (none for a cancel) and why.
struct Ended {
    state: RunState,
    code: Option<ErrorCode>,
    msg: String,
}

impl From<Failure> for Ended {
    fn from(f: Failure) -> Self {
        Ended {
            state: RunState::Failed,
            code: Some(f.code),
            msg: f.msg,
        }
    }
}

/// Shared progress table, pushed to the core now and then; and the run's stop flag, which
/// the download and the (blocking) extraction both watch.
#[derive(Clone)]
struct Progress {
    id: String,
    table: Arc<Mutex<Vec<ComponentProgress>>>,
    reports: mpsc::Sender<ExecReport>,
    last: Arc<Mutex<Option<tokio::time::Instant>>>,
    stop: Arc<AtomicBool>,
}

/// Bytes an extraction may write beyond the declared `unpacked_size`: 1%, at least 1 MiB
/// (tar rounds nothing up, but archives are often declared by `du`, which does).
pub fn unpacked_tolerance(declared: u64) -> u64 {
    (declared / 100).max(1 << 20)
}

/// How long a stopped run waits for its extraction to remove the partial tree and close its
/// files before it reports anyway (the extraction stops within one 1 MiB chunk).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Resolves once `flag` is set.
async fn stopped(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Progress {
    fn new(assignment_id: &str, comps: &[PayloadRef], reports: &mpsc::Sender<ExecReport>) -> Self {
        Progress {
            id: assignment_id.to_string(),
            table: Arc::new(Mutex::new(
                comps
                    .iter()
                    .map(|c| ComponentProgress {
                        name: c.name.clone(),
                        phase: ComponentPhase::Pending,
                        bytes_done: 0,
                        bytes_total: c.size,
                    })
                    .collect(),
            )),
            reports: reports.clone(),
            last: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn set(&self, name: &str, phase: ComponentPhase, done: u64, force: bool) {
        {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = t.iter_mut().find(|c| c.name == name) {
                c.phase = phase;
                c.bytes_done = done;
            }
        }
        let now = tokio::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let stale = match *last {
            Some(l) => now.duration_since(l) >= PROGRESS_EVERY,
            None => true,
        };
        if force || stale {
            *last = Some(now);
            let snapshot = self.table.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let _ = self.reports.try_send(ExecReport::Progress {
                assignment_id: self.id.clone(),
                components: snapshot,
            });
        }
    }
}

pub async fn run(
    s: &ExecSettings,
    a: &Assignment,
    cancel: &mut watch::Receiver<bool>,
    reports: &mpsc::Sender<ExecReport>,
    started_at: String,
) -> RunResult {
    let finish =
        |state: RunState, code: Option<ErrorCode>, msg: Option<String>, out: String, commit| {
            RunResult {
                state,
                exit_code: None,
                stdout: out,
                stderr: String::new(),
                output_truncated: false,
                started_at: Some(started_at.clone()),
                finished_at: clock::now_rfc3339(),
                error_code: code,
                error_msg: msg,
                staged_commit: commit,
                image: None,
            }
        };
    // What to stage: a software commit, or an image into its directory.
    let (stage, image) = match &a.work {
        Work::SoftwareStage(stage) => (Some(stage), None),
        Work::ImageStage { image, payload } => {
            let dir = image.slot.as_deref().unwrap_or(&image.image_id);
            (None, Some((dir, payload)))
        }
        Work::Scripts(_) | Work::ImageApply(_) | Work::ImageRemove(_) | Work::Invalid { .. } => {
            return finish(
                RunState::Failed,
                Some(ErrorCode::InvalidAssignment),
                Some("not a staging assignment".into()),
                String::new(),
                None,
            )
        }
    };
    let components: &[PayloadRef] = match (stage, image) {
        (Some(stage), _) => &stage.components,
        (None, Some((_, p))) => std::slice::from_ref(p),
        (None, None) => &[],
    };
    let progress = Progress::new(&a.assignment_id, components, reports);
    let timeout = Duration::from_secs(a.timeout_seconds);
    let work = async {
        match (stage, image) {
            (Some(stage), _) => stage_commit(s, stage, &progress).await,
            (None, Some((dir, p))) => stage_image(s, dir, p, &progress).await,
            (None, None) => Err(Failure::new(
                ErrorCode::InvalidAssignment,
                "nothing to stage",
            )),
        }
    };
    tokio::pin!(work);
    let stopped_by = tokio::select! {
        r = &mut work => Ok(r.map_err(Ended::from)),
        _ = tokio::time::sleep(timeout) => Err(Ended {
            state: RunState::TimedOut,
            code: Some(ErrorCode::TimedOut),
            msg: format!("staging did not finish within timeout_seconds {}", a.timeout_seconds),
        }),
        _ = cancel.wait_for(|c| *c) => Err(Ended {
            state: RunState::Cancelled,
            code: None,
            msg: "cancelled by the operator".into(),
        }),
    };
    let outcome = match stopped_by {
        Ok(r) => r,
        Err(why) => {
            // Stop the work, and report only once it has: an extraction in its blocking
            // thread removes its partial tree and closes its files first.
            progress.stop.store(true, Ordering::Relaxed);
            let since = tokio::time::Instant::now();
            match tokio::time::timeout(STOP_GRACE, &mut work).await {
                // It finished in the moment before it saw the stop: the commit is staged,
                // and saying otherwise would be untrue.
                Ok(Ok(summary)) => Ok(summary),
                Ok(Err(_)) => {
                    tracing::info!(
                        assignment_id = %a.assignment_id,
                        stopped_in_ms = since.elapsed().as_millis() as u64,
                        "staging stopped"
                    );
                    Err(why)
                }
                Err(_) => {
                    tracing::error!(assignment_id = %a.assignment_id, "staging did not stop within {STOP_GRACE:?}");
                    Err(why)
                }
            }
        }
    };
    // Leave nothing half-built behind; completed downloads stay cached for a retry.
    if let Some(stage) = stage {
        let _ = std::fs::remove_dir_all(partial_dir(s, &stage.commit));
    }
    let commit = stage.map(|st| st.commit.clone());
    match outcome {
        Ok(summary) => finish(RunState::Succeeded, None, None, summary, commit),
        Err(e) => finish(e.state, e.code, Some(e.msg), String::new(), None),
    }
}

fn partial_dir(s: &ExecSettings, commit: &str) -> PathBuf {
    software_root(&s.state_dir).join(format!(".{commit}.partial"))
}

fn fetch_settings(s: &ExecSettings) -> fetch::FetchSettings {
    fetch::FetchSettings {
        trusted_keys: s.payloads.trusted_keys.clone(),
        require_signed: s.payloads.require_signed,
        max_bytes_per_second: s.payloads.max_download_bytes_per_second,
    }
}

/// Unpacks a verified tar.gz into `dest` (which appears in one rename) on a blocking
/// thread, then drops the download.
async fn unpack(
    s: &ExecSettings,
    blob: PathBuf,
    dest: &Path,
    c: &PayloadRef,
    progress: &Progress,
) -> Result<(), Failure> {
    let name = &c.name;
    progress.set(name, ComponentPhase::Extracting, 0, true);
    // What the archive may write: its declared size (plus a small tolerance), never more
    // than the configured cap.
    let cap = match c.unpacked_size {
        Some(d) => d
            .saturating_add(unpacked_tolerance(d))
            .min(s.payloads.max_unpacked_bytes),
        None => s.payloads.max_unpacked_bytes,
    };
    let limits = Limits {
        max_entries: s.payloads.max_archive_entries,
        max_unpacked_bytes: cap,
    };
    let reserve = reserve_bytes(s, dest);
    let (blob2, dest2, name2) = (blob.clone(), dest.to_path_buf(), name.to_string());
    let p = progress.clone();
    tokio::task::spawn_blocking(move || {
        let mut report = |done: u64| p.set(&name2, ComponentPhase::Extracting, done, false);
        let guard = extract::Guard {
            cancel: &p.stop,
            reserve_bytes: reserve,
        };
        extract::extract_tar_gz(&blob2, &dest2, &limits, &guard, &mut report)
    })
    .await
    .map_err(|e| {
        Failure::new(
            ErrorCode::StagingIoError,
            format!("extraction task failed: {e}"),
        )
    })?
    .map_err(|e| Failure::new(e.code(), format!("payload {name:?}: {e}")))?;
    let _ = std::fs::remove_file(&blob);
    Ok(())
}

/// Downloads and verifies one payload, reporting progress.
async fn download(
    s: &ExecSettings,
    cache: &Cache,
    c: &PayloadRef,
    settings: &fetch::FetchSettings,
    progress: &Progress,
) -> Result<PathBuf, Failure> {
    let (name, p) = (c.name.clone(), progress.clone());
    let mut report = move |done: u64| p.set(&name, ComponentPhase::Downloading, done, false);
    // From the controller in use (fetch resumes an interrupted download on it a few times);
    // the poll and the outbox, not a download, decide when to move to another replica.
    let client = s.client.current();
    tokio::select! {
        r = fetch::fetch(&client, cache, c, settings, &mut report) => Ok(r?),
        _ = stopped(&progress.stop) => Err(Failure::new(ErrorCode::Cancelled, "download stopped")),
    }
}

async fn stage_commit(
    s: &ExecSettings,
    stage: &StagePayload,
    progress: &Progress,
) -> Result<String, Failure> {
    let root = software_root(&s.state_dir);
    let dest = root.join(&stage.commit);
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Failure::new(
            ErrorCode::StagingIoError,
            format!("cannot {what} {}: {e}", p.display()),
        )
    };
    fsutil::ensure_dir(&root, 0o755).map_err(|e| io("create", &root, e))?;
    let cache = payload_cache(&s.state_dir);
    cache.ensure().map_err(|e| io("create", &cache.root, e))?;
    let summary = |stage: &StagePayload| {
        stage
            .components
            .iter()
            .map(|c| {
                format!(
                    "staged {} {} ({} bytes, {})\n",
                    c.name, c.version, c.size, c.format
                )
            })
            .collect::<String>()
    };
    if dest.is_dir() {
        for c in &stage.components {
            progress.set(&c.name, ComponentPhase::Staged, c.size, false);
        }
        return Ok(summary(stage));
    }
    let fetch_settings = fetch_settings(s);
    let now = clock::now();
    for c in &stage.components {
        fetch::check_signature(c, &fetch_settings, now)?;
    }
    check_space(s, &cache, &stage.components)?;

    let work = partial_dir(s, &stage.commit);
    let _ = std::fs::remove_dir_all(&work);
    fsutil::ensure_dir(&work, 0o700).map_err(|e| io("create", &work, e))?;
    for c in &stage.components {
        let blob = download(s, &cache, c, &fetch_settings, progress).await?;
        let target = work.join(&c.name);
        if c.format == "tar.gz" {
            unpack(s, blob, &target, c, progress).await?;
        } else {
            fsutil::ensure_dir(&target, 0o755).map_err(|e| io("create", &target, e))?;
            let file = target.join(&c.name);
            std::fs::rename(&blob, &file).map_err(|e| io("move", &file, e))?;
            std::fs::File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("sync", &file, e))?;
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .map_err(|e| io("chmod", &file, e))?;
            fsutil::fsync_dir(&target).map_err(|e| io("sync", &target, e))?;
        }
        progress.set(&c.name, ComponentPhase::Staged, c.size, true);
    }
    std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| io("chmod", &work, e))?;
    fsutil::fsync_dir(&work).map_err(|e| io("sync", &work, e))?;
    std::fs::rename(&work, &dest).map_err(|e| io("publish", &dest, e))?;
    fsutil::fsync_dir(&root).map_err(|e| io("sync", &root, e))?;
    retain(&root, s.payloads.keep_versions as usize, &stage.commit);
    Ok(summary(stage))
}

/// Stages an image into `image_root/<dir>` for a rebuild's first step. Progress goes to the
/// core like a stage assignment's.
pub(super) async fn stage_image_into(
    s: &ExecSettings,
    dir: &str,
    p: &PayloadRef,
    reports: &mpsc::Sender<ExecReport>,
    assignment_id: &str,
) -> Result<String, Failure> {
    let progress = Progress::new(assignment_id, std::slice::from_ref(p), reports);
    stage_image(s, dir, p, &progress).await
}

/// Downloads and unpacks an image into `image_root/<dir>` (one rename when complete).
/// Other images that are neither current, previous nor this one are removed first: an
/// image left behind by a failed or cancelled push is never needed again.
async fn stage_image(
    s: &ExecSettings,
    dir: &str,
    p: &PayloadRef,
    progress: &Progress,
) -> Result<String, Failure> {
    let root = &s.image_root;
    let io = |what: &str, path: &Path, e: std::io::Error| {
        Failure::new(
            ErrorCode::StagingIoError,
            format!("cannot {what} {}: {e}", path.display()),
        )
    };
    fsutil::ensure_dir(root, 0o755).map_err(|e| io("create", root, e))?;
    let dest = super::layout::image_dir(root, dir);
    let summary = format!(
        "staged image {dir} ({} bytes) in {}\n",
        p.size,
        dest.display()
    );
    if dest.is_dir() {
        progress.set(&p.name, ComponentPhase::Staged, p.size, false);
        return Ok(summary);
    }
    super::layout::prune(root, &[dir]);
    let cache = payload_cache(&s.state_dir);
    cache.ensure().map_err(|e| io("create", &cache.root, e))?;
    let fetch_settings = fetch_settings(s);
    fetch::check_signature(p, &fetch_settings, clock::now())?;
    check_space(s, &cache, std::slice::from_ref(p))?;
    let blob = download(s, &cache, p, &fetch_settings, progress).await?;
    unpack(s, blob, &dest, p, progress).await?;
    fsutil::fsync_dir(root).map_err(|e| io("sync", root, e))?;
    progress.set(&p.name, ComponentPhase::Staged, p.size, true);
    Ok(summary)
}

/// The free space kept back on `path`'s filesystem: `payloads.reserve_bytes`, or
/// min(5% of it, 1 GiB).
fn reserve_bytes(s: &ExecSettings, path: &Path) -> u64 {
    let probe = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let total = facts::disk_total(probe).unwrap_or(0);
    s.payloads
        .reserve_bytes
        .unwrap_or_else(|| (total / 20).min(1 << 30))
}

/// Needed = what is left to download + the declared unpacked size + the reserve.
fn check_space(s: &ExecSettings, cache: &Cache, comps: &[PayloadRef]) -> Result<(), Failure> {
    let download: u64 = comps
        .iter()
        .map(|c| c.size.saturating_sub(cache.have(&c.sha256)))
        .sum();
    let unpacked: u64 = comps
        .iter()
        .filter(|c| c.format == "tar.gz")
        .map(|c| c.unpacked_size.unwrap_or(c.size))
        .sum();
    let root = &s.state_dir;
    let free = facts::disk_free(root).unwrap_or(0);
    let reserve = reserve_bytes(s, root);
    let needed = download.saturating_add(unpacked).saturating_add(reserve);
    if needed > free {
        return Err(Failure::new(
            ErrorCode::InsufficientDiskSpace,
            format!(
                "staging needs {needed} bytes on {} (download {download} + unpacked {unpacked} + reserve {reserve}) but only {free} are free",
                root.display()
            ),
        ));
    }
    Ok(())
}

/// Keeps the newest `keep` commits (always including `current`) and removes older ones.
pub fn retain(root: &Path, keep: usize, current: &str) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let mut commits: Vec<(u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    commits.sort_by_key(|c| std::cmp::Reverse(c.0));
    for (i, (n, path)) in commits.iter().enumerate() {
        if i >= keep.max(1) && n.to_string() != current {
            if let Err(e) = std::fs::remove_dir_all(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old staged commit");
            }
        }
    }
}

/// Start-up housekeeping: half-built commit directories go, old commits beyond `keep` go,
/// and cached downloads not needed by `keep_payloads` (queued or running stages) go.
pub fn cleanup(state_dir: &Path, keep: usize, current: Option<&str>, keep_payloads: &[String]) {
    let root = software_root(state_dir);
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".partial") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    retain(&root, keep, current.unwrap_or(""));
    payload_cache(state_dir).prune(keep_payloads);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_and_the_current() {
        let dir = tempfile::tempdir().unwrap();
        for c in ["1", "2", "3", "10", ".4.partial"] {
            std::fs::create_dir_all(dir.path().join(c)).unwrap();
        }
        retain(dir.path(), 2, "2");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![".4.partial", "10", "2", "3"]);
    }
}
