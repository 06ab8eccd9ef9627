//! The core: the one task that owns the agent's state. It feeds each input to the pure state
//! machine (`machine::step`) and performs the effects in the order they come: persist, queue
//! in the outbox, start or resume the executor, run the logoff and power steps in the
//! background, acknowledge.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use super::executor::{self, ExecReport, ExecSettings};
use super::identity;
use super::link::LinkState;
use super::logoff;
use super::machine::{self, AgentState, Effect, Event};
use super::metrics::WorkLabel;
use super::store::{Outbox, StateStore};
use super::{AgentError, Input};
use crate::proto::agent::{Assignment, ComponentProgress, EventBody, RunResult, Work};
use crate::proto::state::StateFile;
use crate::proto::status::{RunningStatus, StatusReport, WaitingStatus};
use crate::sys::clock;

/// The core: owns the state and performs effects.
pub(super) struct Core {
    pub(super) state: AgentState,
    pub(super) store: StateStore,
    pub(super) outbox: Arc<Mutex<Outbox>>,
    pub(super) outbox_wake: Arc<Notify>,
    pub(super) exec: ExecSettings,
    pub(super) exec_tx: mpsc::Sender<Input>,
    pub(super) cancel: Option<(String, watch::Sender<bool>)>,
    pub(super) link: Arc<LinkState>,
    pub(super) identity: Arc<identity::IdentityState>,
    /// The controller replicas; status names the one in use.
    pub(super) controllers: super::failover::Controllers,
    /// Latest staging progress of the running assignment (not persisted); the link
    /// forwards it to the controller, the status socket reads it here.
    pub(super) progress_tx: watch::Sender<Option<(String, Vec<ComponentProgress>)>>,
    pub(super) power: crate::config::agent::PowerSettings,
    pub(super) sessions: crate::sys::sessions::SessionSource,
    /// What the running assignment waits for, and the task doing the waiting.
    pub(super) waiting: Option<(String, WaitingStatus)>,
    pub(super) side_task: Option<(String, tokio::task::JoinHandle<()>)>,
    pub(super) metrics: Arc<super::metrics::AgentMetrics>,
}

fn work_label(w: &Work) -> WorkLabel {
    match w {
        Work::Scripts(_) => WorkLabel::Scripts,
        Work::SoftwareStage(_) => WorkLabel::SoftwareStage,
        Work::ImageStage { .. } => WorkLabel::ImageStage,
        Work::ImageApply(_) => WorkLabel::ImageApply,
        Work::ImageRemove(_) => WorkLabel::ImageRemove,
        Work::Invalid { .. } => WorkLabel::Invalid,
    }
}

impl Core {
    /// Steps the machine and performs its effects; returns the acknowledgements it produced.
    pub(super) fn apply(&mut self, ev: Event) -> Result<(Vec<String>, Vec<String>), AgentError> {
        // What runs now, for the counters of its result (the step may end it).
        let running = self.state.running.as_ref().map(|r| {
            (
                r.assignment.assignment_id.clone(),
                work_label(&r.assignment.work),
            )
        });
        let (next, effects) = machine::step(std::mem::take(&mut self.state), ev, clock::now());
        self.state = next;
        let mut acks = (Vec::new(), Vec::new());
        for fx in effects {
            match fx {
                Effect::Persist => self.store.save(&StateFile::from(&self.state))?,
                Effect::Emit(ev) => {
                    if let EventBody::Result(r) = &ev.body {
                        self.count_result(running.as_ref(), &ev.assignment_id, r);
                    }
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
                } => {
                    self.metrics.power(kind);
                    self.power(assignment_id, kind, deadline)
                }
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

    /// Counts a result on its way to the outbox: what it ran (known while it ran) and, for
    /// staging, the bytes its last progress report had moved.
    fn count_result(&self, running: Option<&(String, WorkLabel)>, id: &str, r: &RunResult) {
        let work = match running {
            Some((rid, w)) if rid == id => *w,
            // A result without a run here: refused before it started (invalid, expired).
            Some(_) | None => WorkLabel::Invalid,
        };
        let bytes = match &*self.progress_tx.borrow() {
            Some((pid, comps)) if pid == id => comps.iter().map(|c| c.bytes_done).sum(),
            Some(_) | None => 0,
        };
        self.metrics.result(work, r, bytes);
    }

    /// Whether an assignment runs or waits.
    pub(super) fn busy(&self) -> bool {
        self.state.running.is_some() || !self.state.queue.is_empty()
    }

    /// One line for systemd's STATUS=.
    pub(super) fn summary(&self) -> String {
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
        let phase = match a.work {
            Work::SoftwareStage(_) | Work::ImageStage { .. } => "staging",
            Work::ImageApply(_) => "image step",
            Work::ImageRemove(_) => "image removal",
            Work::Scripts(_) => "scripts",
            Work::Invalid { .. } => "invalid",
        };
        tracing::info!(task_id = %a.task_id, assignment_id = %a.assignment_id, phase, scripts = a.work.scripts().len(), from, "starting assignment");
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
            controller_url: self.controllers.current_url(),
            controller_urls: self.controllers.urls(),
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
                .filter(|r| matches!(r.assignment.work, Work::ImageStage { .. }))
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

    pub(super) fn handle(&mut self, input: Input) -> Result<(), AgentError> {
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
pub(super) async fn flush_outbox(outbox: &Mutex<Outbox>, worth_waiting: impl Fn() -> bool) {
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
