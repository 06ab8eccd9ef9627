//! The agent daemon. One task (the core, in `core`) owns the state and applies a closed
//! set of inputs through the pure state machine in [`machine`], then performs its effects in
//! order. Around it: the link loops (poll, heartbeat, outbox delivery), the executor of the
//! running assignment, and the status socket.

pub mod backoff;
pub mod codes;
mod core;
pub mod executor;
pub mod failover;
pub mod identity;
pub mod image;
pub mod instance;
pub mod layout;
pub mod link;
pub mod logoff;
pub mod machine;
pub mod metrics;
pub mod runner;
pub mod stage;
pub mod status;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::agent::AgentConfig;
use crate::pki::Role;
use crate::proto::agent::{Assignment, ComponentProgress};
use crate::proto::status::{StatusReport, WaitingStatus};
use executor::{ExecReport, ExecSettings};
use link::{Link, LinkState};
use machine::{AgentState, Event};
use store::{Outbox, StateStore};

use self::core::{flush_outbox, Core};
pub use instance::seal;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    TlsFile(#[from] crate::tls::KeyedTlsError),
    #[error("certificate {path} is for {identity}, not for an agent")]
    NotAnAgent { path: PathBuf, identity: String },
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the boot id from {path}: {source}")]
    BootId {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error("another agent (pid {pid}) is running on state_dir {dir}; it keeps its files (stop it first)")]
    Locked { dir: PathBuf, pid: String },
    #[error(transparent)]
    Lock(crate::sys::fsutil::LockError),
    #[error("no certificate at {path} and no enrollment token configured: set enrollment_token_file, or put a certificate there (pki issue --agent)")]
    NoIdentity { path: PathBuf },
    #[error("machine_id {value:?} (the host name) is not a usable machine id: {reason}; set machine_id in the config")]
    BadMachineId { value: String, reason: String },
    #[error("cannot finish the certificate swap at {path}: {source}")]
    Swap {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Inputs of the core loop: a closed set.
#[derive(Debug)]
pub enum Input {
    /// Offered by the controller; the reply lists the ids durably accepted (to acknowledge).
    Offered(Vec<Assignment>, oneshot::Sender<Vec<String>>),
    /// Cancelled by the operator; the reply lists the ids durably recorded.
    Cancels(Vec<String>, oneshot::Sender<Vec<String>>),
    /// From the executor of the running assignment.
    Exec(ExecReport),
    /// From a logoff, power or timer task: fed to the state machine as is.
    Event(Event),
    /// What the running assignment waits for (for `fieldhand status`).
    Waiting(String, Option<WaitingStatus>),
    /// A status-socket client.
    Status(oneshot::Sender<StatusReport>),
    /// The certificate in place names this machine id (after enrollment, or a re-enrollment
    /// under the machine's own id).
    Identity(String),
}

/// Progress of the running assignment, as the link forwards it.
pub type ProgressFeed = watch::Receiver<Option<(String, Vec<ComponentProgress>)>>;

/// Runs the agent until `shutdown` completes. Everything that can fail at start-up (certificate,
/// directories, state, status socket) fails before any work is taken.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let dir_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| AgentError::Dir { path, source }
    };
    crate::sys::fsutil::ensure_dir(&cfg.state_dir, 0o700).map_err(dir_err(&cfg.state_dir))?;
    // One agent per state directory: a second one would run every assignment again. Taken
    // before anything else is touched (the status socket, the state, the certificate).
    let _lock = crate::sys::fsutil::lock_exclusive(&cfg.state_dir.join("agent.lock")).map_err(
        |e| match e {
            crate::sys::fsutil::LockError::Held { pid, .. } => AgentError::Locked {
                dir: cfg.state_dir.clone(),
                pid,
            },
            e => AgentError::Lock(e),
        },
    )?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let files = identity::Files {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
    };
    files.recover().map_err(|source| AgentError::Swap {
        path: cfg.tls.cert.clone(),
        source,
    })?;
    let own_machine_id = cfg
        .machine_id
        .clone()
        .unwrap_or_else(crate::sys::facts::hostname);
    // The client starts with the certificate in place, or with none until enrollment.
    let (machine_id, tls) = match files.current() {
        Some(info) => {
            let info = info.map_err(|e| cfg.tls.explain(e))?;
            let name = match &info.identity {
                Some(id) if id.role == Role::Agent => id.name.clone(),
                other => {
                    return Err(AgentError::NotAnAgent {
                        path: cfg.tls.cert.clone(),
                        identity: other
                            .as_ref()
                            .map(|i| i.to_string())
                            .unwrap_or_else(|| "no fieldhand identity".into()),
                    })
                }
            };
            (name, files.client_config().map_err(|e| cfg.tls.explain(e))?)
        }
        None if cfg.enrollment.is_none() => {
            return Err(AgentError::NoIdentity {
                path: cfg.tls.cert.clone(),
            })
        }
        None => {
            crate::pki::validate_name("machine_id", &own_machine_id).map_err(|e| {
                AgentError::BadMachineId {
                    value: own_machine_id.clone(),
                    reason: e.to_string(),
                }
            })?;
            (
                own_machine_id.clone(),
                crate::tls::client_config_without_cert(&cfg.tls.ca)
                    .map_err(|e| cfg.tls.explain(e))?,
            )
        }
    };
    let work_root = cfg.state_dir.join("work");
    crate::sys::fsutil::ensure_dir(&work_root, 0o700).map_err(dir_err(&work_root))?;
    crate::sys::fsutil::ensure_dir(&cfg.image_root, 0o755).map_err(dir_err(&cfg.image_root))?;
    let boot_path = cfg.power.boot_id_path.clone();
    let boot_id =
        crate::sys::bootid::read_boot_id(&boot_path).map_err(|source| AgentError::BootId {
            path: boot_path.clone(),
            source,
        })?;
    let instance = instance::instance_id(&cfg.state_dir)?;
    let session = format!("{instance}.{}", instance::session_safe(&boot_id));
    // One client per controller replica, all made now (a bad URL fails the start); requests
    // go to the one in use (`failover`).
    let client =
        failover::Controllers::new(&cfg.controller_urls, tls, cfg.retry_initial, cfg.retry_max)?
            .with_header(
                http::header::HeaderName::from_static(crate::proto::agent::SESSION_HEADER),
                session,
            )
            .with_header(
                http::header::HeaderName::from_static(crate::proto::agent::PROTOCOL_HEADER),
                crate::proto::agent::PROTOCOL_VERSION.to_string(),
            );
    let anon = client.sibling(crate::tls::client_config_without_cert(&cfg.tls.ca)?)?;
    let identity_state = Arc::new(identity::IdentityState::new(
        machine_id.clone(),
        files.cert.exists(),
    ));
    // Containment first: what an earlier agent left running is killed before anything runs.
    let containment = crate::sys::cgroup::Containment::detect(
        cfg.cgroup_root.as_deref(),
        cfg.cgroups,
        &cfg.limits,
    );
    match &containment {
        crate::sys::cgroup::Containment::Cgroup { .. } => {
            tracing::info!(containment = %containment.describe(), "runs are contained")
        }
        crate::sys::cgroup::Containment::Subreaper { .. } => {
            tracing::warn!(containment = %containment.describe(), "runs are contained by the fallback");
            if let Err(e) = crate::sys::process::become_subreaper() {
                tracing::error!(error = %e, "cannot become a child subreaper");
            }
            if !cfg.limits.is_empty() {
                tracing::warn!(
                    "[exec] memory_max, cpu_max and tasks_max need cgroups; they are not applied"
                );
            }
        }
    }
    let left = containment.kill_leftovers();
    if left > 0 {
        tracing::warn!(
            groups = left,
            "killed the runs an earlier agent left behind"
        );
    }
    let store = StateStore::new(&cfg.state_dir);
    let mut state = AgentState::from(store.load()?);
    if let (crate::sys::cgroup::Containment::Subreaper { .. }, Some(r)) =
        (&containment, &state.running)
    {
        // Without cgroups, what the interrupted run started carries its assignment id.
        let n = crate::sys::process::kill_tagged(
            "FIELDHAND_ASSIGNMENT_ID",
            &r.assignment.assignment_id,
        );
        if n > 0 {
            tracing::warn!(processes = n, assignment_id = %r.assignment.assignment_id, "killed what an interrupted run left");
        }
    }
    state.reboot_timeout = cfg.power.reboot_timeout;
    let outbox = Arc::new(Mutex::new(Outbox::open(&cfg.state_dir)?));
    let listener = status::bind(&cfg.socket_path, cfg.socket_group.as_deref())?;

    let (inputs_tx, mut inputs) = mpsc::channel::<Input>(64);
    let (progress_tx, progress_rx) = watch::channel(None);
    let (stop_tx, stop) = watch::channel(false);
    let link_state = Arc::new(LinkState::default());
    let outbox_wake = Arc::new(Notify::new());
    let metrics = Arc::new(metrics::AgentMetrics::new());
    let mut core = Core {
        state,
        store,
        outbox: outbox.clone(),
        outbox_wake: outbox_wake.clone(),
        exec: ExecSettings {
            work_root,
            machine_id: machine_id.clone(),
            kill_grace: cfg.kill_grace,
            home: std::env::var("HOME").unwrap_or_else(|_| "/".into()),
            state_dir: cfg.state_dir.clone(),
            image_root: cfg.image_root.clone(),
            data_dir: cfg.data_dir.clone(),
            client: client.clone(),
            payloads: cfg.payloads.clone(),
            containment: containment.clone(),
        },
        progress_tx,
        power: cfg.power.clone(),
        sessions: cfg.sessions.clone(),
        waiting: None,
        side_task: None,
        exec_tx: inputs_tx.clone(),
        cancel: None,
        link: link_state.clone(),
        identity: identity_state.clone(),
        controllers: client.clone(),
        metrics: metrics.clone(),
    };
    core.apply(Event::Boot { boot_id })?;
    {
        // Housekeeping once the state says what is still needed (a resumed stage keeps its
        // partial downloads).
        let needed: Vec<String> = core
            .state
            .running
            .iter()
            .map(|r| &r.assignment)
            .chain(core.state.queue.iter())
            .flat_map(|a| a.work.payloads().into_iter().map(|c| c.sha256.clone()))
            .collect();
        image::cleanup(&cfg.image_root);
        stage::cleanup(
            &cfg.state_dir,
            cfg.payloads.keep_versions as usize,
            core.state.staged_commit.as_deref(),
            &needed,
        );
    }
    tracing::info!(%machine_id, %instance, controllers = ?cfg.controller_urls, socket = %cfg.socket_path.display(), "agent started");

    let outbox_for_stop = outbox.clone();
    let link_for_stop = link_state.clone();
    let (ready_tx, ready) = watch::channel(false);
    let (busy_tx, busy) = watch::channel(core.busy());
    let enroller = identity::Enroller {
        files,
        token: cfg.enrollment.clone(),
        own_machine_id,
        client: client.clone(),
        anon,
        state: identity_state.clone(),
        ready: ready_tx,
        inputs: inputs_tx.clone(),
        busy,
        outbox: outbox.clone(),
        retry_initial: cfg.retry_initial,
        retry_max: cfg.retry_max,
    };
    let link = Arc::new(Link {
        client,
        identity: identity_state,
        ready,
        state: link_state.clone(),
        long_poll: cfg.long_poll,
        retry_initial: cfg.retry_initial,
        retry_max: cfg.retry_max,
        introduced: watch::channel(false).0,
    });
    let mut tasks = vec![
        tokio::spawn(link::poll_loop(
            link.clone(),
            inputs_tx.clone(),
            outbox.clone(),
            stop.clone(),
        )),
        tokio::spawn(link::heartbeat_loop(
            link.clone(),
            cfg.heartbeat_every,
            cfg.state_dir.clone(),
            cfg.gpu,
            outbox.clone(),
            stop.clone(),
        )),
        tokio::spawn(enroller.run(stop.clone())),
        tokio::spawn(link::progress_loop(link.clone(), progress_rx, stop.clone())),
        tokio::spawn(link::deliver_loop(link, outbox, outbox_wake, stop.clone())),
        tokio::spawn(status::serve(
            listener,
            inputs_tx.clone(),
            metrics.clone(),
            stop.clone(),
        )),
    ];
    if let Some((path, every)) = cfg.metrics_textfile.clone() {
        tasks.push(tokio::spawn(textfile_loop(
            path,
            every,
            inputs_tx.clone(),
            metrics.clone(),
            stop.clone(),
        )));
    }
    drop(inputs_tx);

    tokio::pin!(shutdown);
    let mut last_status = core.summary();
    crate::sys::notify::ready(&last_status);
    // The watchdog is fed from this loop, so a wedged core gets restarted by systemd.
    let mut dog = crate::sys::notify::watchdog_interval().map(tokio::time::interval);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = async { match dog.as_mut() { Some(d) => { d.tick().await; } None => std::future::pending::<()>().await } } => {
                crate::sys::notify::watchdog();
            }
            input = inputs.recv() => match input {
                Some(input) => {
                    if let Err(e) = core.handle(input) {
                        // Failing to persist must stop the agent: continuing would run work
                        // without a durable record. systemd restarts it; recovery reports.
                        break Err(e);
                    }
                    busy_tx.send_if_modified(|b| std::mem::replace(b, core.busy()) != *b);
                    let now = core.summary();
                    if now != last_status {
                        crate::sys::notify::status(&now);
                        last_status = now;
                    }
                }
                None => break Ok(()),
            },
        }
    };
    crate::sys::notify::stopping();
    // Stopping (e.g. for a shutdown this agent asked for): give queued events a moment to
    // reach the controller; whatever is left is delivered after the next start.
    flush_outbox(&outbox_for_stop, || link_for_stop.snapshot().0).await;
    let _ = stop_tx.send(true);
    // Stopping the agent stops the running script too (as systemd's control-group kill would);
    // its run stays recorded and is reported as ErrorCode::AgentRestarted on the next start.
    if let Some(pgid) = core.state.running.as_ref().and_then(|r| r.pgid) {
        let _ = crate::sys::process::kill_group(pgid, nix::sys::signal::Signal::SIGKILL);
    }
    for t in tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.socket_path);
    tracing::info!("agent stopped");
    result
}

impl AgentError {
    /// The process exit code for this failure.
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            AgentError::Tls(_)
            | AgentError::TlsFile(_)
            | AgentError::NotAnAgent { .. }
            | AgentError::Net(_)
            | AgentError::NoIdentity { .. }
            | AgentError::BadMachineId { .. } => Exit::Config,
            AgentError::Dir { .. } | AgentError::Lock(_) | AgentError::Swap { .. } => {
                Exit::CantCreate
            }
            AgentError::BootId { .. } | AgentError::Store(_) => Exit::IoErr,
            AgentError::Status(_) => Exit::CantCreate,
            AgentError::Locked { .. } => Exit::TempFail,
        }
    }
}

/// Rewrites `[metrics] textfile` every `every` until `stop`, atomically, from the same
/// snapshot `fieldhand status --metrics` renders.
async fn textfile_loop(
    path: std::path::PathBuf,
    every: std::time::Duration,
    inputs: mpsc::Sender<Input>,
    metrics: Arc<metrics::AgentMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if inputs.send(Input::Status(tx)).await.is_err() {
            return;
        }
        let Ok(report) = rx.await else { return };
        let text = metrics.render(&report, crate::sys::clock::now());
        if let Err(e) = metrics::write_textfile(&path, &text) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics textfile");
        }
    }
}
