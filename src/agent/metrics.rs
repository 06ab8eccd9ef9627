//! The agent's own counters, in the Prometheus text format (`fieldhand status --metrics`, and
//! `[metrics] textfile` for node_exporter's textfile collector): scripts run by outcome,
//! staging bytes and duration, power steps, and, read from the status snapshot when rendered,
//! the outbox, the queue, the last contact's age and the certificate's expiry.
//!
//! Counters count since the agent started (Prometheus expects counters to reset on a restart;
//! `rate()` handles it). The core increments them as it performs effects; nothing here does
//! I/O but [`write_textfile`].

use std::path::Path;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::proto::agent::RunResult;
use crate::proto::state::PowerKind;
use crate::proto::status::StatusReport;

type Labels = Vec<(String, String)>;

/// What the agent counts.
pub struct AgentMetrics {
    registry: Registry,
    /// Assignment results handed to the outbox, by what they ran and how they ended.
    results: Family<Labels, Counter>,
    staging_bytes: Counter,
    staging_seconds: Histogram,
    power_steps: Family<Labels, Counter>,
    outbox: Gauge,
    queued: Gauge,
    running: Gauge,
    last_contact_age: Gauge<f64, AtomicU64>,
    cert_expiry: Gauge,
    connected: Gauge,
}

/// What an assignment ran, for the `work` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkLabel {
    Scripts,
    SoftwareStage,
    ImageStage,
    ImageApply,
    ImageRemove,
    Invalid,
}

impl WorkLabel {
    fn as_str(self) -> &'static str {
        match self {
            WorkLabel::Scripts => "scripts",
            WorkLabel::SoftwareStage => "software_stage",
            WorkLabel::ImageStage => "image_stage",
            WorkLabel::ImageApply => "image_apply",
            WorkLabel::ImageRemove => "image_remove",
            WorkLabel::Invalid => "invalid",
        }
    }

    fn stages(self) -> bool {
        match self {
            WorkLabel::SoftwareStage | WorkLabel::ImageStage => true,
            WorkLabel::Scripts
            | WorkLabel::ImageApply
            | WorkLabel::ImageRemove
            | WorkLabel::Invalid => false,
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fieldhand_agent");
        let results = Family::<Labels, Counter>::default();
        registry.register(
            "results",
            "Assignment results handed to the outbox, by work and outcome",
            results.clone(),
        );
        let staging_bytes = Counter::default();
        registry.register_with_unit(
            "staging",
            "Payload bytes staged (downloaded and verified) by finished staging assignments",
            Unit::Bytes,
            staging_bytes.clone(),
        );
        let staging_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register_with_unit(
            "staging_duration",
            "How long staging assignments took, start to result",
            Unit::Seconds,
            staging_seconds.clone(),
        );
        let power_steps = Family::<Labels, Counter>::default();
        registry.register(
            "power_steps",
            "Power commands run (reboot, stop)",
            power_steps.clone(),
        );
        let outbox = Gauge::default();
        registry.register(
            "outbox_events",
            "Events waiting in the durable outbox for the controller",
            outbox.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "queued_assignments",
            "Assignments waiting behind the running one",
            queued.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "running_assignments",
            "1 while an assignment runs",
            running.clone(),
        );
        let last_contact_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "last_contact_age",
            "Time since the last successful exchange with the controller (-1: never)",
            Unit::Seconds,
            last_contact_age.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the machine's certificate expires (Unix time; 0 without one)",
            cert_expiry.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "connected",
            "1 while the controller answers",
            connected.clone(),
        );
        AgentMetrics {
            registry,
            results,
            staging_bytes,
            staging_seconds,
            power_steps,
            outbox,
            queued,
            running,
            last_contact_age,
            cert_expiry,
            connected,
        }
    }

    /// A result went to the outbox; `staged_bytes` is what its staging moved, if it staged.
    pub fn result(&self, work: WorkLabel, r: &RunResult, staged_bytes: u64) {
        self.results
            .get_or_create(&vec![
                ("work".to_string(), work.as_str().to_string()),
                ("outcome".to_string(), r.state.as_str().to_string()),
            ])
            .inc();
        if work.stages() {
            self.staging_bytes.inc_by(staged_bytes);
            if let Some(secs) = seconds_between(r.started_at.as_deref(), &r.finished_at) {
                self.staging_seconds.observe(secs);
            }
        }
    }

    /// A power command is about to run.
    pub fn power(&self, kind: PowerKind) {
        self.power_steps
            .get_or_create(&vec![("kind".to_string(), kind.as_str().to_string())])
            .inc();
    }

    /// The text exposition, with the gauges read from `status` at `now`.
    pub fn render(&self, status: &StatusReport, now: time::OffsetDateTime) -> String {
        self.outbox.set(i64::from(
            status.undelivered_events + status.undelivered_results,
        ));
        self.queued.set(i64::from(status.queued));
        self.running.set(i64::from(status.running.is_some()));
        self.connected.set(i64::from(status.connected));
        let age = status
            .last_contact
            .as_deref()
            .and_then(crate::sys::clock::parse_rfc3339)
            .map(|t| (now - t).as_seconds_f64().max(0.0))
            .unwrap_or(-1.0);
        self.last_contact_age.set(age);
        let expiry = status
            .identity
            .certificate_not_after
            .as_deref()
            .and_then(crate::sys::clock::parse_rfc3339)
            .map(|t| t.unix_timestamp())
            .unwrap_or(0);
        self.cert_expiry.set(expiry);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        crate::metrics_text::to_prometheus(&out)
    }
}

fn seconds_between(start: Option<&str>, end: &str) -> Option<f64> {
    let s = crate::sys::clock::parse_rfc3339(start?)?;
    let e = crate::sys::clock::parse_rfc3339(end)?;
    Some((e - s).as_seconds_f64().max(0.0))
}

/// Writes `text` to `path` atomically (temp, fsync, rename), for node_exporter's textfile
/// collector, which must never read a half-written file.
pub fn write_textfile(path: &Path, text: &str) -> std::io::Result<()> {
    crate::sys::fsutil::atomic_write(path, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::domain::RunState;

    fn result(state: RunState, started: &str, finished: &str) -> RunResult {
        RunResult {
            state,
            exit_code: Some(0),
            stdout: String::new(),
            stderr: String::new(),
            output_truncated: false,
            started_at: Some(started.into()),
            finished_at: finished.into(),
            error_code: None,
            error_msg: None,
            staged_commit: None,
            image: None,
        }
    }

    #[test]
    fn counters_move_with_the_work_and_render_as_prometheus_text() {
        let m = AgentMetrics::new();
        let status = crate::agent::status::tests::sample_report();
        let before = m.render(&status, crate::sys::clock::now());
        assert!(!before.contains("outcome=\"SUCCEEDED\""), "{before}");
        m.result(
            WorkLabel::Scripts,
            &result(
                RunState::Succeeded,
                "2026-12-01T10:00:00Z",
                "2026-12-01T10:00:01Z",
            ),
            0,
        );
        m.result(
            WorkLabel::SoftwareStage,
            &result(
                RunState::Succeeded,
                "2026-12-01T10:00:00Z",
                "2026-12-01T10:00:03Z",
            ),
            4096,
        );
        m.power(PowerKind::Reboot);
        let text = m.render(&status, crate::sys::clock::now());
        assert!(
            text.contains(
                "fieldhand_agent_results_total{work=\"scripts\",outcome=\"SUCCEEDED\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("fieldhand_agent_staging_bytes_total 4096"),
            "{text}"
        );
        assert!(
            text.contains("fieldhand_agent_staging_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("fieldhand_agent_power_steps_total{kind=\"reboot\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fieldhand_agent_results_total counter"),
            "{text}"
        );
    }
}
