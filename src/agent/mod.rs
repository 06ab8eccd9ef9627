//! The agent daemon. One task (the core loop in this file) owns the state and applies a closed
//! set of inputs through the pure state machine in [`machine`], then performs its effects in
//! order. Around it: the link loops (poll, heartbeat, outbox delivery), the executor of the
//! running assignment, and the status socket.

pub mod executor;
pub mod link;
pub mod machine;
pub mod stage;
pub mod status;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::agent::AgentConfig;
use crate::pki::Role;
use crate::proto::agent::Assignment;
use crate::proto::agent::ComponentProgress;
use crate::proto::state::StateFile;
use crate::proto::status::{RunningStatus, StatusReport};
use crate::sys::clock;
use executor::{ExecReport, ExecSettings};
use link::{Link, LinkState};
use machine::{AgentState, Effect, Event};
use store::{Outbox, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
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
    /// A status-socket client.
    Status(oneshot::Sender<StatusReport>),
}

/// The core: owns the state and performs effects.
struct Core {
    state: AgentState,
    store: StateStore,
    outbox: Arc<Mutex<Outbox>>,
    outbox_wake: Arc<Notify>,
    exec: ExecSettings,
    exec_tx: mpsc::Sender<Input>,
    cancel: Option<(String, watch::Sender<bool>)>,
    link: Arc<LinkState>,
    machine_id: String,
    pool_id: String,
    controller_url: String,
    /// Latest staging progress of the running assignment (not persisted).
    progress: Option<(String, Vec<ComponentProgress>)>,
    progress_tx: watch::Sender<Option<(String, Vec<ComponentProgress>)>>,
}

/// Progress of the running assignment, as the link forwards it.
pub type ProgressFeed = watch::Receiver<Option<(String, Vec<ComponentProgress>)>>;

impl Core {
    /// Steps the machine and performs its effects; returns the acknowledgements it produced.
    fn apply(&mut self, ev: Event) -> Result<(Vec<String>, Vec<String>), AgentError> {
        let (next, effects) = machine::step(std::mem::take(&mut self.state), ev, clock::now());
        self.state = next;
        let mut acks = (Vec::new(), Vec::new());
        for fx in effects {
            match fx {
                Effect::Persist => self.store.save(&StateFile::from(&self.state))?,
                Effect::Emit(ev) => {
                    let key = ev.idempotency_key.clone();
                    self.outbox
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(ev)?;
                    tracing::debug!(key, "event queued");
                    self.outbox_wake.notify_one();
                }
                Effect::Start(a) => self.start(a),
                Effect::Cancel(id) => match &self.cancel {
                    Some((running, tx)) if *running == id => {
                        tracing::info!(assignment_id = %id, "cancelling the running assignment");
                        let _ = tx.send(true);
                    }
                    _ => {}
                },
                Effect::KillGroup(pgid) => {
                    use nix::sys::signal::Signal;
                    match crate::sys::process::kill_group(pgid, Signal::SIGKILL) {
                        Ok(true) => tracing::warn!(
                            pgid,
                            "killed the process group left by an interrupted run"
                        ),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(pgid, error = %e, "cannot kill an interrupted run's process group")
                        }
                    }
                }
                Effect::Ack {
                    assignments,
                    cancels,
                } => {
                    acks.0.extend(assignments);
                    acks.1.extend(cancels);
                }
            }
        }
        Ok(acks)
    }

    fn start(&mut self, a: Assignment) {
        tracing::info!(task_id = %a.task_id, assignment_id = %a.assignment_id, scripts = a.scripts.len(), "starting assignment");
        let (tx, rx) = watch::channel(false);
        self.cancel = Some((a.assignment_id.clone(), tx));
        let (rtx, mut rrx) = mpsc::channel(8);
        let inputs = self.exec_tx.clone();
        // Forward executor reports into the core's single input queue.
        tokio::spawn(async move {
            while let Some(r) = rrx.recv().await {
                if inputs.send(Input::Exec(r)).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(executor::run(self.exec.clone(), a, rx, rtx));
    }

    fn status(&self) -> StatusReport {
        let (connected, last_contact) = self.link.snapshot();
        let (events, results) = self
            .outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts()
            .unwrap_or((0, 0));
        let now = clock::now();
        StatusReport {
            machine_id: self.machine_id.clone(),
            pool_id: self.pool_id.clone(),
            controller_url: self.controller_url.clone(),
            connected,
            last_contact: last_contact.map(clock::rfc3339),
            running: self.state.running.as_ref().map(|r| RunningStatus {
                assignment_id: r.assignment.assignment_id.clone(),
                task_id: r.assignment.task_id.clone(),
                started_at: r.started_at.clone(),
                elapsed_seconds: clock::parse_rfc3339(&r.started_at)
                    .map(|t| (now - t).whole_seconds().max(0) as u64)
                    .unwrap_or(0),
                components: self
                    .progress
                    .as_ref()
                    .filter(|(id, _)| *id == r.assignment.assignment_id)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default(),
            }),
            staged_commit: self.state.staged_commit.clone(),
            queued: self.state.queue.len() as u32,
            undelivered_events: events,
            undelivered_results: results,
            recent_results: self.state.recent.iter().cloned().collect(),
        }
    }

    fn handle(&mut self, input: Input) -> Result<(), AgentError> {
        match input {
            Input::Offered(list, reply) => {
                let (acks, _) = self.apply(Event::Offered(list))?;
                let _ = reply.send(acks);
            }
            Input::Cancels(ids, reply) => {
                let (_, acks) = self.apply(Event::CancelRequested(ids))?;
                let _ = reply.send(acks);
            }
            Input::Exec(ExecReport::Spawned {
                assignment_id,
                pgid,
            }) => {
                self.apply(Event::Spawned {
                    assignment_id,
                    pgid,
                })?;
            }
            Input::Exec(ExecReport::Progress {
                assignment_id,
                components,
            }) => {
                let still_running = self
                    .state
                    .running
                    .as_ref()
                    .is_some_and(|r| r.assignment.assignment_id == assignment_id);
                if still_running {
                    self.progress = Some((assignment_id, components));
                    let _ = self.progress_tx.send(self.progress.clone());
                }
            }
            Input::Exec(ExecReport::Finished {
                assignment_id,
                result,
            }) => {
                self.progress = None;
                let _ = self.progress_tx.send(None);
                tracing::info!(%assignment_id, state = %result.state, exit_code = ?result.exit_code, error_code = ?result.error_code, "assignment finished");
                if self
                    .cancel
                    .as_ref()
                    .is_some_and(|(id, _)| *id == assignment_id)
                {
                    self.cancel = None;
                }
                self.apply(Event::Finished {
                    assignment_id,
                    result,
                })?;
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
        Ok(())
    }
}

/// Runs the agent until `shutdown` completes. Everything that can fail at start-up (certificate,
/// directories, state, status socket) fails before any work is taken.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let identity = crate::tls::identity_of_file(&cfg.tls.cert)?;
    if identity.role != Role::Agent {
        return Err(AgentError::NotAnAgent {
            path: cfg.tls.cert.clone(),
            identity: identity.to_string(),
        });
    }
    let machine_id = identity.name.clone();
    let tls = crate::tls::client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    let client = crate::net::client::HttpsClient::new(&cfg.controller_url, tls)?;
    let dir_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| AgentError::Dir { path, source }
    };
    crate::sys::fsutil::ensure_dir(&cfg.state_dir, 0o700).map_err(dir_err(&cfg.state_dir))?;
    let work_root = cfg.state_dir.join("work");
    crate::sys::fsutil::ensure_dir(&work_root, 0o700).map_err(dir_err(&work_root))?;
    let boot_path = PathBuf::from(crate::sys::bootid::DEFAULT_BOOT_ID_PATH);
    let boot_id =
        crate::sys::bootid::read_boot_id(&boot_path).map_err(|source| AgentError::BootId {
            path: boot_path.clone(),
            source,
        })?;
    let store = StateStore::new(&cfg.state_dir);
    let state = AgentState::from(store.load()?);
    let outbox = Arc::new(Mutex::new(Outbox::open(&cfg.state_dir)?));
    let listener = status::bind(&cfg.socket_path)?;

    let (inputs_tx, mut inputs) = mpsc::channel::<Input>(64);
    let (progress_tx, progress_rx) = watch::channel(None);
    let (stop_tx, stop) = watch::channel(false);
    let link_state = Arc::new(LinkState::default());
    let outbox_wake = Arc::new(Notify::new());
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
            client: client.clone(),
            payloads: cfg.payloads.clone(),
        },
        progress: None,
        progress_tx,
        exec_tx: inputs_tx.clone(),
        cancel: None,
        link: link_state.clone(),
        machine_id: machine_id.clone(),
        pool_id: cfg.pool_id.clone(),
        controller_url: cfg.controller_url.clone(),
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
            .filter_map(|a| a.stage.as_ref())
            .flat_map(|s| s.components.iter().map(|c| c.sha256.clone()))
            .collect();
        stage::cleanup(
            &cfg.state_dir,
            cfg.payloads.keep_versions as usize,
            core.state.staged_commit.as_deref(),
            &needed,
        );
    }
    tracing::info!(%machine_id, pool_id = %cfg.pool_id, controller = %cfg.controller_url, socket = %cfg.socket_path.display(), "agent started");

    let link = Arc::new(Link {
        client,
        pool_id: cfg.pool_id.clone(),
        state: link_state,
        long_poll: cfg.long_poll,
        retry_initial: cfg.retry_initial,
        retry_max: cfg.retry_max,
    });
    let tasks = vec![
        tokio::spawn(link::poll_loop(
            link.clone(),
            inputs_tx.clone(),
            stop.clone(),
        )),
        tokio::spawn(link::heartbeat_loop(
            link.clone(),
            cfg.heartbeat_every,
            cfg.state_dir.clone(),
            stop.clone(),
        )),
        tokio::spawn(link::progress_loop(link.clone(), progress_rx, stop.clone())),
        tokio::spawn(link::deliver_loop(link, outbox, outbox_wake, stop.clone())),
        tokio::spawn(status::serve(listener, inputs_tx.clone(), stop.clone())),
    ];
    drop(inputs_tx);

    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            input = inputs.recv() => match input {
                Some(input) => {
                    if let Err(e) = core.handle(input) {
                        // Failing to persist must stop the agent: continuing would run work
                        // without a durable record. systemd restarts it; recovery reports.
                        break Err(e);
                    }
                }
                None => break Ok(()),
            },
        }
    };
    let _ = stop_tx.send(true);
    // Stopping the agent stops the running script too (as systemd's control-group kill would);
    // its run stays recorded and is reported as AGENT_RESTARTED on the next start.
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
            AgentError::Tls(_) | AgentError::NotAnAgent { .. } | AgentError::Net(_) => Exit::Config,
            AgentError::Dir { .. } => Exit::CantCreate,
            AgentError::BootId { .. } | AgentError::Store(_) => Exit::IoErr,
            AgentError::Status(_) => Exit::CantCreate,
        }
    }
}
