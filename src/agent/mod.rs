//! The agent daemon. One task (the core loop in this file) owns the state and applies a closed
//! set of inputs through the pure state machine in [`machine`], then performs its effects in
//! order. Around it: the link loops (poll, heartbeat, outbox delivery), the executor of the
//! running assignment, and the status socket.

pub mod backoff;
pub mod codes;
pub mod executor;
pub mod identity;
pub mod image;
pub mod layout;
pub mod link;
pub mod logoff;
pub mod machine;
pub mod runner;
pub mod stage;
pub mod status;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::config::agent::AgentConfig;
use crate::pki::Role;
use crate::proto::agent::ComponentProgress;
use crate::proto::agent::{Assignment, AssignmentKind};
use crate::proto::state::StateFile;
use crate::proto::status::{RunningStatus, StatusReport, WaitingStatus};
use crate::sys::clock;
use executor::{ExecReport, ExecSettings};
use link::{Link, LinkState};
use machine::{AgentState, Effect, Event};
use store::{Outbox, StateStore};

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
    identity: Arc<identity::IdentityState>,
    controller_url: String,
    /// Latest staging progress of the running assignment (not persisted); the link
    /// forwards it to the controller, the status socket reads it here.
    progress_tx: watch::Sender<Option<(String, Vec<ComponentProgress>)>>,
    power: crate::config::agent::PowerSettings,
    sessions: crate::sys::sessions::SessionSource,
    /// What the running assignment waits for, and the task doing the waiting.
    waiting: Option<(String, WaitingStatus)>,
    side_task: Option<(String, tokio::task::JoinHandle<()>)>,
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
                Effect::Start(a) => self.start(a, 0),
                Effect::Resume { assignment, from } => self.start(assignment, from),
                Effect::Logoff {
                    assignment_id,
                    spec,
                } => self.logoff(assignment_id, spec),
                Effect::Power {
                    assignment_id,
                    kind,
                    deadline,
                } => self.power(assignment_id, kind, deadline),
                Effect::WaitReboot {
                    assignment_id,
                    deadline,
                } => self.wait_reboot(assignment_id, deadline),
                Effect::Cancel(id) => {
                    match &self.cancel {
                        Some((running, tx)) if *running == id => {
                            tracing::info!(assignment_id = %id, "cancelling the running assignment");
                            let _ = tx.send(true);
                        }
                        _ => {}
                    }
                    if let Some((sid, h)) = self.side_task.take() {
                        if sid == id {
                            h.abort();
                        } else {
                            self.side_task = Some((sid, h));
                        }
                    }
                }
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

    /// Whether an assignment runs or waits.
    fn busy(&self) -> bool {
        self.state.running.is_some() || !self.state.queue.is_empty()
    }

    /// One line for systemd's STATUS=.
    fn summary(&self) -> String {
        use crate::proto::status::{IdentityPhase, LinkPhase};
        let link = match (self.identity.snapshot().phase, self.link.phase().0) {
            (IdentityPhase::Enrolling, _) => "enrolling",
            (IdentityPhase::CertificateInvalid, _) => "certificate not valid",
            (IdentityPhase::Conflict, _) => "identity conflict: taking no work",
            (IdentityPhase::Revoked, _) => "revoked: taking no work",
            (IdentityPhase::Enrolled, LinkPhase::Connected) => "connected",
            (IdentityPhase::Enrolled, LinkPhase::Connecting) => "connecting",
            (IdentityPhase::Enrolled, LinkPhase::Unreachable) => "controller not reachable",
        };
        let work = match (&self.state.running, &self.waiting) {
            (Some(r), Some((_, w))) => {
                format!("task {}: waiting for {}", r.assignment.task_id, w.what)
            }
            (Some(r), None) => format!("running task {}", r.assignment.task_id),
            (None, _) => "idle".into(),
        };
        format!("{work}; {} queued; {link}", self.state.queue.len())
    }

    fn set_waiting(&mut self, id: String, w: Option<WaitingStatus>) {
        self.waiting = w.map(|w| (id, w));
    }

    /// Runs the logoff step in the background; it reports `LogoffDone`.
    fn logoff(&mut self, id: String, spec: crate::proto::agent::PowerSpec) {
        tracing::info!(assignment_id = %id, phase = "logoff", policy = %spec.logoff_policy, "ending user sessions before the next step");
        let inputs = self.exec_tx.clone();
        let src = self.sessions.clone();
        let task_id = self.running_task_id();
        let aid = id.clone();
        let h = tokio::spawn(async move {
            let w_inputs = inputs.clone();
            let w_id = aid.clone();
            let waiting = move |w: Option<WaitingStatus>| {
                let _ = w_inputs.try_send(Input::Waiting(w_id.clone(), w));
            };
            let outcome = logoff::run(&src, &spec, &task_id, &waiting).await;
            let _ = inputs
                .send(Input::Event(Event::LogoffDone {
                    assignment_id: aid,
                    outcome,
                }))
                .await;
        });
        self.side_task = Some((id, h));
    }

    /// Announces, then runs the power command; reports `PowerIssued`/`PowerFailed`, and
    /// `RebootTimeout` if this process is still alive at `deadline`.
    fn power(
        &mut self,
        id: String,
        kind: crate::proto::state::PowerKind,
        deadline: time::OffsetDateTime,
    ) {
        use crate::proto::state::PowerKind;
        let (argv, what) = match kind {
            PowerKind::Stop => (
                self.power.shutdown_command.clone(),
                "the machine to shut down",
            ),
            PowerKind::Reboot => (self.power.reboot_command.clone(), "the machine to reboot"),
        };
        tracing::warn!(assignment_id = %id, phase = %kind, command = ?argv, "running the power command");
        let inputs = self.exec_tx.clone();
        let outbox = self.outbox.clone();
        let wake = self.outbox_wake.clone();
        let aid = id.clone();
        self.wait_for(&id, what, deadline);
        let h = tokio::spawn(async move {
            // Give the announcement a few seconds to reach the controller, never longer.
            wake.notify_one();
            flush_outbox(&outbox, || true).await;
            let ev = match crate::sys::power::run_command(&argv).await {
                Ok(()) => Event::PowerIssued {
                    assignment_id: aid.clone(),
                },
                Err(msg) => Event::PowerFailed {
                    assignment_id: aid.clone(),
                    msg,
                },
            };
            let failed = matches!(ev, Event::PowerFailed { .. });
            let _ = inputs.send(Input::Event(ev)).await;
            if !failed {
                reboot_timeout_at(deadline, aid, inputs).await;
            }
        });
        self.side_task = Some((id, h));
    }

    /// After a restart in the same boot: keep waiting for the requested reboot.
    fn wait_reboot(&mut self, id: String, deadline: time::OffsetDateTime) {
        tracing::warn!(assignment_id = %id, deadline = %clock::rfc3339(deadline), "restarted while a reboot was pending; waiting for it");
        self.wait_for(&id, "the machine to reboot", deadline);
        let h = tokio::spawn(reboot_timeout_at(
            deadline,
            id.clone(),
            self.exec_tx.clone(),
        ));
        self.side_task = Some((id, h));
    }

    fn wait_for(&mut self, id: &str, what: &str, deadline: time::OffsetDateTime) {
        let status = WaitingStatus {
            what: what.into(),
            since: clock::now_rfc3339(),
            until: Some(clock::rfc3339(deadline)),
        };
        self.waiting = Some((id.to_string(), status));
    }

    fn running_task_id(&self) -> String {
        self.state
            .running
            .as_ref()
            .map(|r| r.assignment.task_id.clone())
            .unwrap_or_default()
    }

    fn start(&mut self, a: Assignment, from: usize) {
        self.waiting = None;
        let phase = match a.kind {
            AssignmentKind::SoftwareStage | AssignmentKind::ImageStage => "staging",
            AssignmentKind::ImageApply => "image step",
            AssignmentKind::ImageRemove => "image removal",
            AssignmentKind::ScriptExecution => "scripts",
            AssignmentKind::Unknown => "unknown",
        };
        tracing::info!(task_id = %a.task_id, assignment_id = %a.assignment_id, phase, scripts = a.scripts.len(), from, "starting assignment");
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
        tokio::spawn(executor::run(self.exec.clone(), a, from, rx, rtx));
    }

    fn status(&self) -> StatusReport {
        let (connected, last_contact) = self.link.snapshot();
        let (link, last_error) = self.link.phase();
        let (events, results) = self
            .outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts()
            .unwrap_or((0, 0));
        let now = clock::now();
        StatusReport {
            machine_id: self.identity.machine_id(),
            controller_url: self.controller_url.clone(),
            connected,
            link,
            last_contact: last_contact.map(clock::rfc3339),
            last_error,
            identity: self.identity.snapshot(),
            containment: self.exec.containment.describe(),
            running: self.state.running.as_ref().map(|r| RunningStatus {
                cancelling: r.cancel_requested,
                assignment_id: r.assignment.assignment_id.clone(),
                task_id: r.assignment.task_id.clone(),
                started_at: r.started_at.clone(),
                elapsed_seconds: clock::parse_rfc3339(&r.started_at)
                    .map(|t| (now - t).whole_seconds().max(0) as u64)
                    .unwrap_or(0),
                waiting: self
                    .waiting
                    .as_ref()
                    .filter(|(id, _)| *id == r.assignment.assignment_id)
                    .map(|(_, w)| w.clone()),
                components: self
                    .progress_tx
                    .borrow()
                    .as_ref()
                    .filter(|(id, _)| *id == r.assignment.assignment_id)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default(),
            }),
            staged_commit: self.state.staged_commit.clone(),
            image: self.state.image.clone(),
            pending_image_progress: self
                .state
                .running
                .as_ref()
                .filter(|r| r.assignment.kind == AssignmentKind::ImageStage)
                .and_then(|r| {
                    let feed = self.progress_tx.borrow();
                    let (id, comps) = feed.as_ref()?;
                    (*id == r.assignment.assignment_id)
                        .then(|| comps.first().cloned())
                        .flatten()
                }),
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
                    self.progress_tx
                        .send_replace(Some((assignment_id, components)));
                }
            }
            Input::Event(ev) => {
                if matches!(ev, Event::LogoffDone { .. }) {
                    self.waiting = None;
                }
                self.apply(ev)?;
            }
            Input::Waiting(id, w) => {
                let current = self
                    .state
                    .running
                    .as_ref()
                    .is_some_and(|r| r.assignment.assignment_id == id);
                if current {
                    self.set_waiting(id, w);
                }
            }
            Input::Exec(ExecReport::Finished {
                assignment_id,
                result,
                reboot_after,
            }) => {
                self.progress_tx.send_replace(None);
                let task_id = self.running_task_id();
                tracing::info!(%assignment_id, %task_id, phase = "finished", state = %result.state, exit_code = ?result.exit_code, error_code = ?result.error_code, "assignment finished");
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
                    reboot_after,
                })?;
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Identity(machine_id) => {
                // Scripts started from now on see the id the controller knows this machine by.
                self.exec.machine_id = machine_id;
            }
        }
        Ok(())
    }
}

/// Waits up to 3 s for the outbox to empty (the delivery loop does the sending), while
/// `worth_waiting` holds. Never longer: a power step or a stop must not hang on the network.
async fn flush_outbox(outbox: &Mutex<Outbox>, worth_waiting: impl Fn() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until && worth_waiting() {
        let pending = Outbox::pending_events(outbox);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reports `RebootTimeout` at `deadline`, unless the process is gone by then (the reboot).
async fn reboot_timeout_at(
    deadline: time::OffsetDateTime,
    id: String,
    inputs: mpsc::Sender<Input>,
) {
    let left = (deadline - clock::now()).whole_milliseconds().max(0) as u64;
    tokio::time::sleep(Duration::from_millis(left)).await;
    let _ = inputs
        .send(Input::Event(Event::RebootTimeout { assignment_id: id }))
        .await;
}

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
    let instance = instance_id(&cfg.state_dir)?;
    let session = format!("{instance}.{}", session_safe(&boot_id));
    let client = crate::net::client::HttpsClient::new(&cfg.controller_url, tls)?
        .with_header(
            http::header::HeaderName::from_static(crate::proto::agent::SESSION_HEADER),
            session,
        )
        .with_header(
            http::header::HeaderName::from_static(crate::proto::agent::PROTOCOL_HEADER),
            crate::proto::agent::PROTOCOL_VERSION.to_string(),
        );
    let anon = crate::net::client::HttpsClient::new(
        &cfg.controller_url,
        crate::tls::client_config_without_cert(&cfg.tls.ca)?,
    )?;
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
            .flat_map(|a| {
                let stage = a.stage.iter().flat_map(|s| s.components.iter());
                let image = a.image.iter().filter_map(|i| i.payload.as_ref());
                stage.chain(image).map(|c| c.sha256.clone())
            })
            .collect();
        image::cleanup(&cfg.image_root);
        stage::cleanup(
            &cfg.state_dir,
            cfg.payloads.keep_versions as usize,
            core.state.staged_commit.as_deref(),
            &needed,
        );
    }
    tracing::info!(%machine_id, %instance, controller = %cfg.controller_url, socket = %cfg.socket_path.display(), "agent started");

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
            cfg.gpu,
            outbox.clone(),
            stop.clone(),
        )),
        tokio::spawn(enroller.run(stop.clone())),
        tokio::spawn(link::progress_loop(link.clone(), progress_rx, stop.clone())),
        tokio::spawn(link::deliver_loop(link, outbox, outbox_wake, stop.clone())),
        tokio::spawn(status::serve(listener, inputs_tx.clone(), stop.clone())),
    ];
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

/// The id of this state directory's agent: made once (random), kept across restarts and
/// reboots, gone with `fieldhand seal`. Two agents behind one certificate differ in it (or in
/// the boot id), which is how the controller tells them apart.
fn instance_id(state_dir: &std::path::Path) -> Result<String, AgentError> {
    let path = state_dir.join("instance-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(s.to_string());
        }
    }
    let mut b = [0u8; 12];
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AgentError::Dir {
            path: path.clone(),
            source: std::io::Error::other("the system random source failed"),
        })?;
    let id = hex::encode(b);
    crate::sys::fsutil::atomic_write(&path, format!("{id}\n").as_bytes(), 0o600)
        .map_err(|source| AgentError::Dir { path, source })?;
    Ok(id)
}

/// A boot id as it may stand in the session header (letters, digits, `-`).
fn session_safe(boot_id: &str) -> String {
    boot_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The files `seal` removes: everything that makes this machine itself to the controller
/// (certificate, key, instance id) and its record of work (state, outbox). Staged software,
/// images and the data area stay: they are the golden image's content.
pub fn seal(cfg: &AgentConfig) -> Result<Vec<PathBuf>, AgentError> {
    let lock = cfg.state_dir.join("agent.lock");
    let _guard = if cfg.state_dir.exists() {
        Some(
            crate::sys::fsutil::lock_exclusive(&lock).map_err(|e| match e {
                crate::sys::fsutil::LockError::Held { pid, .. } => AgentError::Locked {
                    dir: cfg.state_dir.clone(),
                    pid,
                },
                e => AgentError::Lock(e),
            })?,
        )
    } else {
        None
    };
    let with = |p: &PathBuf, s: &str| {
        let mut o = p.as_os_str().to_owned();
        o.push(s);
        PathBuf::from(o)
    };
    let mut candidates = vec![
        cfg.tls.cert.clone(),
        cfg.tls.key.clone(),
        with(&cfg.tls.cert, ".new"),
        with(&cfg.tls.key, ".new"),
    ];
    for name in [
        "state.json",
        "instance-id",
        "outbox",
        "outbox-rejected",
        "work",
    ] {
        candidates.push(cfg.state_dir.join(name));
    }
    let mut removed = Vec::new();
    for p in candidates {
        let res = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(_) => continue,
        };
        res.map_err(|source| AgentError::Dir {
            path: p.clone(),
            source,
        })?;
        removed.push(p);
    }
    Ok(removed)
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
