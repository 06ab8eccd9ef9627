//! The local status socket: server side (answers from the core, so it works while the controller
//! is down), client side (`fieldhand status`), and the human-readable rendering.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::metrics::AgentMetrics;
use super::Input;
use crate::proto::status::{MetricsReply, StatusReport, StatusRequest};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot create the status socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("socket_group {name:?} does not exist (create it, e.g. `groupadd --system {name}`)")]
    NoGroup { name: String },
    #[error("cannot connect to the agent at {path}: {source} (is `fieldhand agent` running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent at {path} did not answer within {after:?}")]
    Timeout { path: PathBuf, after: Duration },
    #[error("the agent at {path} sent an unreadable answer: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Binds the socket with mode 0660. It is bound under a temporary name and renamed into place,
/// so no client ever sees it with looser permissions.
/// Binds the socket (mode 0660, group `group` if given: its members may query status).
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, StatusError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |source| StatusError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::sys::fsutil::ensure_dir(parent, 0o755).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(StatusError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(name) = group {
        let gid = nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| StatusError::NoGroup {
                name: name.to_string(),
            })?
            .gid;
        nix::unistd::chown(&tmp, None, Some(gid)).map_err(|e| err(e.into()))?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(listener)
}

/// Answers status requests until `stop`.
pub async fn serve(
    listener: UnixListener,
    inputs: mpsc::Sender<Input>,
    metrics: Arc<AgentMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        match conn {
            Ok((stream, _)) => {
                let (inputs, metrics) = (inputs.clone(), metrics.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, inputs, metrics).await {
                        tracing::debug!(error = %e, "status client");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "status socket accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn answer(
    stream: UnixStream,
    inputs: mpsc::Sender<Input>,
    metrics: Arc<AgentMetrics>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let read = BufReader::new(r).take_line(&mut line);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let reply = match serde_json::from_str::<StatusRequest>(line.trim()) {
        Ok(StatusRequest::Status) => {
            let (tx, rx) = oneshot::channel();
            if inputs.send(Input::Status(tx)).await.is_err() {
                return Ok(());
            }
            match rx.await {
                Ok(report) => serde_json::to_string(&report).map_err(std::io::Error::other)?,
                Err(_) => return Ok(()),
            }
        }
        Ok(StatusRequest::Metrics) => {
            let (tx, rx) = oneshot::channel();
            if inputs.send(Input::Status(tx)).await.is_err() {
                return Ok(());
            }
            match rx.await {
                Ok(report) => serde_json::to_string(&MetricsReply {
                    metrics: metrics.render(&report, crate::sys::clock::now()),
                })
                .map_err(std::io::Error::other)?,
                Err(_) => return Ok(()),
            }
        }
        Err(e) => format!("{{\"error\":{:?}}}", e.to_string()),
    };
    w.write_all(reply.as_bytes()).await?;
    w.write_all(b"\n").await?;
    w.shutdown().await
}

trait TakeLine {
    async fn take_line(self, buf: &mut String) -> std::io::Result<usize>;
}

impl<R: tokio::io::AsyncRead + Unpin> TakeLine for BufReader<R> {
    async fn take_line(mut self, buf: &mut String) -> std::io::Result<usize> {
        // A request is one short line; cap it so a client cannot make us buffer without end.
        use tokio::io::AsyncReadExt;
        let mut limited = (&mut self).take(4096);
        limited.read_line(buf).await
    }
}

/// Asks a running agent for its status.
pub async fn query(path: &Path, timeout: Duration) -> Result<StatusReport, StatusError> {
    ask(path, timeout, &StatusRequest::Status).await
}

/// Asks a running agent for its counters, in the Prometheus text format.
pub async fn query_metrics(path: &Path, timeout: Duration) -> Result<String, StatusError> {
    let r: MetricsReply = ask(path, timeout, &StatusRequest::Metrics).await?;
    Ok(r.metrics)
}

async fn ask<T: serde::de::DeserializeOwned>(
    path: &Path,
    timeout: Duration,
    request: &StatusRequest,
) -> Result<T, StatusError> {
    let p = path.to_path_buf();
    let work = async {
        let mut s = UnixStream::connect(path)
            .await
            .map_err(|source| StatusError::Connect {
                path: p.clone(),
                source,
            })?;
        let io = |source| StatusError::Io {
            path: p.clone(),
            source,
        };
        let req = serde_json::to_string(request).unwrap_or_default();
        s.write_all(req.as_bytes()).await.map_err(io)?;
        s.write_all(b"\n").await.map_err(io)?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await.map_err(io)?;
        serde_json::from_str(line.trim()).map_err(|source| StatusError::Decode {
            path: p.clone(),
            source,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| StatusError::Timeout {
            path: path.to_path_buf(),
            after: timeout,
        })?
}

fn elapsed(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The text `fieldhand status` prints.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<20} {v}\n"));
    use crate::proto::status::{IdentityPhase, LinkPhase};
    line(&mut out, "machine:", r.machine_id.clone());
    let id = &r.identity;
    let cert = match (&id.certificate_serial, &id.certificate_not_after) {
        (Some(s), Some(t)) => format!("serial {s}, expires {t}"),
        _ => "none yet".into(),
    };
    let phase = match id.phase {
        IdentityPhase::Enrolled => "enrolled",
        IdentityPhase::Enrolling => "ENROLLING",
        IdentityPhase::CertificateInvalid => "CERTIFICATE NOT VALID",
        IdentityPhase::Conflict => "IDENTITY CONFLICT, taking no work",
        IdentityPhase::Revoked => "REVOKED, taking no work",
    };
    line(&mut out, "identity:", format!("{phase} ({cert})"));
    line(&mut out, "containment:", r.containment.clone());
    if let Some(p) = &id.problem {
        line(&mut out, "  why:", p.clone());
    }
    let contact = r.last_contact.clone().unwrap_or_else(|| "never".into());
    let link = match r.link {
        LinkPhase::Connecting => "connecting".to_string(),
        LinkPhase::Connected => format!("connected; last contact {contact}"),
        LinkPhase::Unreachable => format!("NOT connected; last contact {contact}"),
    };
    line(
        &mut out,
        "controller:",
        format!("{} ({link})", r.controller_url),
    );
    if r.controller_urls.len() > 1 {
        // Which replica is in use is the line above; these are where it fails over to.
        line(&mut out, "  replicas:", r.controller_urls.join(", "));
    }
    if let (Some(e), false) = (&r.last_error, r.connected) {
        line(&mut out, "  last error:", e.clone());
    }
    line(
        &mut out,
        "running:",
        match &r.running {
            Some(run) => format!(
                "assignment {} of task {} for {}{}",
                run.assignment_id,
                run.task_id,
                elapsed(run.elapsed_seconds),
                if run.cancelling {
                    " (CANCELLING: being stopped)"
                } else {
                    ""
                }
            ),
            None => "nothing".into(),
        },
    );
    if let Some(run) = &r.running {
        if let Some(w) = &run.waiting {
            let until = w.until.as_deref().unwrap_or("no limit");
            line(
                &mut out,
                "waiting for:",
                format!("{} (since {}, until {until})", w.what, w.since),
            );
        }
        for c in &run.components {
            let pct = (c.bytes_done as f64 * 100.0 / c.bytes_total.max(1) as f64).min(100.0);
            out.push_str(&format!(
                "  {:<18} {:<12} {} / {} bytes ({pct:.0}%)\n",
                c.name, c.phase, c.bytes_done, c.bytes_total
            ));
        }
    }
    line(&mut out, "queued:", r.queued.to_string());
    line(
        &mut out,
        "staged software:",
        r.staged_commit
            .as_deref()
            .map(|c| format!("commit {c}"))
            .unwrap_or_else(|| "none".into()),
    );
    let img = &r.image;
    let with_state = |id: &Option<String>, state: Option<&str>| match id {
        Some(id) => format!("{id} ({})", state.unwrap_or("?")),
        None => "none".into(),
    };
    line(
        &mut out,
        "current image:",
        with_state(
            &img.current_image_id,
            img.current_image_state.map(|s| s.as_str()),
        ),
    );
    let mut pending = with_state(
        &img.pending_image_id,
        img.pending_image_state.map(|s| s.as_str()),
    );
    if let Some(p) = &r.pending_image_progress {
        let pct = (p.bytes_done as f64 * 100.0 / p.bytes_total.max(1) as f64).min(100.0);
        pending.push_str(&format!(", {} {pct:.0}%", p.phase));
    }
    line(&mut out, "pending image:", pending);
    line(
        &mut out,
        "undelivered:",
        format!(
            "{} results ({} events)",
            r.undelivered_results, r.undelivered_events
        ),
    );
    if r.recent_results.is_empty() {
        line(&mut out, "recent results:", "none".into());
    } else {
        out.push_str("recent results:\n");
        for x in &r.recent_results {
            let code = x.error_code.map(|c| format!(" {c}")).unwrap_or_default();
            let exit = x
                .exit_code
                .map(|c| format!(" exit={c}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {}  {:<10} task {} assignment {}{exit}{code}\n",
                x.finished_at, x.state, x.task_id, x.assignment_id
            ));
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::proto::agent::ComponentProgress;
    use crate::proto::agent::ImageRecord;

    /// A report with a bit of everything, for rendering tests.
    pub(crate) fn sample_report() -> StatusReport {
        StatusReport {
            machine_id: "m1".into(),
            controller_url: "https://c".into(),
            controller_urls: vec!["https://b".into(), "https://c".into()],
            connected: false,
            link: crate::proto::status::LinkPhase::Connecting,
            last_contact: None,
            last_error: None,
            identity: crate::proto::status::IdentityStatus {
                phase: crate::proto::status::IdentityPhase::Enrolled,
                certificate_serial: Some("ab".into()),
                certificate_not_after: Some("2027-01-01T00:00:00Z".into()),
                problem: None,
            },
            containment: "cgroup v2 groups under /x".into(),
            running: None,
            queued: 0,
            undelivered_events: 0,
            undelivered_results: 0,
            recent_results: Vec::new(),
            staged_commit: None,
            image: ImageRecord {
                current_image_id: Some("img-1".into()),
                current_image_state: Some(crate::proto::domain::CurrentImageState::Ready),
                pending_image_id: Some("img-2".into()),
                pending_image_state: Some(crate::proto::domain::PendingImageState::Publishing),
            },
            pending_image_progress: Some(ComponentProgress {
                name: "img-2".into(),
                phase: crate::proto::domain::ComponentPhase::Downloading,
                bytes_done: 25,
                bytes_total: 100,
            }),
        }
    }

    #[test]
    fn render_shows_the_images_and_staging_progress() {
        let r = sample_report();
        let text = render(&r);
        assert!(
            text.contains("current image:       img-1 (READY)"),
            "{text}"
        );
        assert!(
            text.contains("controller:          https://c (connecting)"),
            "{text}"
        );
        assert!(
            text.contains("  replicas:          https://b, https://c"),
            "{text}"
        );
        assert!(
            text.contains(
                "identity:            enrolled (serial ab, expires 2027-01-01T00:00:00Z)"
            ),
            "{text}"
        );
        assert!(
            text.contains("pending image:       img-2 (PUBLISHING), DOWNLOADING 25%"),
            "{text}"
        );
    }
}
