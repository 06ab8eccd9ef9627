//! `GET /metrics`: the controller's metrics in the Prometheus text format, over the same mutual
//! TLS as everything else, for operator certificates and `metrics` ones (`pki issue --metrics
//! NAME`), which may read this and nothing else.
//!
//! Two kinds of series. Counters and histograms (HTTP requests, events applied, dispatch and
//! result latency, transaction time, machines declared unreachable, tasks pruned) count what this replica
//! did since it started. Gauges about the fleet (machines by pool and online, tasks by kind
//! and state, machines by task state, identity conflicts, outbox backlogs, certificate
//! expiry) are read from the database at scrape time, so every replica reports the same fleet:
//! aggregate them with `max`, not `sum`, when several replicas are scraped.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::errors::ApiError;
use super::store::FleetGauges;
use super::Controller;
use crate::sys::clock;

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Certificates expiring within this are counted apart (the alert's horizon).
const CERT_SOON: Duration = Duration::from_secs(14 * 86_400);

/// The controller's series.
pub struct ControllerMetrics {
    registry: Registry,
    http_requests: Family<Labels, Counter>,
    http_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    events: Family<Labels, Counter>,
    unreachable: Counter,
    pruned: Counter,
    dispatch_seconds: Histogram,
    result_seconds: Histogram,
    polls_open: Gauge,
    machines: Family<Labels, Gauge>,
    identity_conflicts: Gauge,
    tasks: Family<Labels, Gauge>,
    task_machines: Family<Labels, Gauge>,
    outbox_events: Gauge,
    outbox_backlogged: Gauge,
    outbox_max: Gauge,
    cert_soonest: Gauge,
    certs_expiring: Gauge,
    db_queue_lag: Gauge<f64, AtomicU64>,
}

impl ControllerMetrics {
    /// Registers every series; `transaction_seconds` is the store's own histogram.
    pub fn new(transaction_seconds: Histogram) -> Self {
        let mut r = Registry::with_prefix("fieldhand");
        let http_requests = Family::<Labels, Counter>::default();
        r.register(
            "http_requests",
            "Requests answered, by route, method and status",
            http_requests.clone(),
        );
        let http_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        r.register_with_unit(
            "http_request_duration",
            "Time to answer a request (a long poll's wait included), by route",
            Unit::Seconds,
            http_seconds.clone(),
        );
        let events = Family::<Labels, Counter>::default();
        r.register(
            "agent_events",
            "Agent events: applied, or duplicates whose idempotency key was applied before",
            events.clone(),
        );
        let unreachable = Counter::default();
        r.register(
            "machines_declared_unreachable",
            "Machines the reaper declared MACHINE_UNREACHABLE",
            unreachable.clone(),
        );
        let pruned = Counter::default();
        r.register(
            "tasks_pruned",
            "Finished tasks removed past task_retention_seconds, with their machines' rows",
            pruned.clone(),
        );
        let dispatch_seconds = latency_histogram();
        r.register_with_unit(
            "dispatch_latency",
            "From an assignment's dispatch to its agent's acknowledgement",
            Unit::Seconds,
            dispatch_seconds.clone(),
        );
        let result_seconds = latency_histogram();
        r.register_with_unit(
            "result_latency",
            "From a run's end on the machine (its clock) to its result being recorded",
            Unit::Seconds,
            result_seconds.clone(),
        );
        r.register_with_unit(
            "db_transaction_duration",
            "Time a transaction's statements took (its wait for the writer excluded)",
            Unit::Seconds,
            transaction_seconds,
        );
        let db_queue_lag = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "db_queue_lag",
            "How long the last group of transactions waited for the writer",
            Unit::Seconds,
            db_queue_lag.clone(),
        );
        let polls_open = Gauge::default();
        r.register(
            "long_polls_open",
            "Agent long polls open on this replica",
            polls_open.clone(),
        );
        let machines = Family::<Labels, Gauge>::default();
        r.register(
            "machines",
            "Machines (not decommissioned) by pool and whether they were heard from within \
             offline_after_seconds",
            machines.clone(),
        );
        let identity_conflicts = Gauge::default();
        r.register(
            "identity_conflicts",
            "Machines whose certificate two live agents present",
            identity_conflicts.clone(),
        );
        let tasks = Family::<Labels, Gauge>::default();
        r.register("tasks", "Tasks by kind and state", tasks.clone());
        let task_machines = Family::<Labels, Gauge>::default();
        r.register(
            "task_machines",
            "Machines of unfinished tasks, by their state in the task",
            task_machines.clone(),
        );
        let outbox_events = Gauge::default();
        r.register(
            "agent_outbox_events",
            "Events waiting in agents' outboxes, summed (as their last heartbeats said)",
            outbox_events.clone(),
        );
        let outbox_backlogged = Gauge::default();
        r.register(
            "agents_with_outbox_backlog",
            "Agents whose last heartbeat reported undelivered events",
            outbox_backlogged.clone(),
        );
        let outbox_max = Gauge::default();
        r.register(
            "agent_outbox_events_max",
            "The largest outbox an agent reported",
            outbox_max.clone(),
        );
        let cert_soonest = Gauge::default();
        r.register(
            "agent_certificate_soonest_expiry_timestamp_seconds",
            "When the first machine certificate expires (Unix time; 0 without machines)",
            cert_soonest.clone(),
        );
        let certs_expiring = Gauge::default();
        r.register(
            "agent_certificates_expiring_14d",
            "Machine certificates that expire within 14 days (or have expired)",
            certs_expiring.clone(),
        );
        ControllerMetrics {
            registry: r,
            http_requests,
            http_seconds,
            events,
            unreachable,
            pruned,
            dispatch_seconds,
            result_seconds,
            polls_open,
            machines,
            identity_conflicts,
            tasks,
            task_machines,
            outbox_events,
            outbox_backlogged,
            outbox_max,
            cert_soonest,
            certs_expiring,
            db_queue_lag,
        }
    }

    /// A request was answered; `route` is its pattern (`v1/tasks/*`), never the raw path.
    pub fn request(&self, route: &str, method: &str, status: u16, took: Duration) {
        self.http_requests
            .get_or_create(&vec![
                ("route".into(), route.into()),
                ("method".into(), method.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
        self.http_seconds
            .get_or_create(&vec![("route".into(), route.into())])
            .observe(took.as_secs_f64());
    }

    pub fn events(&self, applied: u32, duplicates: u32) {
        for (outcome, n) in [("applied", applied), ("duplicate", duplicates)] {
            if n > 0 {
                self.events
                    .get_or_create(&vec![("outcome".into(), outcome.into())])
                    .inc_by(u64::from(n));
            }
        }
    }

    pub fn unreachable(&self, n: usize) {
        self.unreachable.inc_by(n as u64);
    }

    pub fn pruned(&self, n: usize) {
        self.pruned.inc_by(n as u64);
    }

    /// Acknowledged assignments, by when each was dispatched.
    pub fn acknowledged(&self, dispatched_ms: &[i64], now_ms: i64) {
        for d in dispatched_ms {
            self.dispatch_seconds
                .observe((now_ms - d).max(0) as f64 / 1000.0);
        }
    }

    /// Results recorded, by when each run ended on its machine.
    pub fn results(&self, finished_ms: &[i64], now_ms: i64) {
        for f in finished_ms {
            self.result_seconds
                .observe((now_ms - f).max(0) as f64 / 1000.0);
        }
    }

    fn set_fleet(&self, g: &FleetGauges) {
        self.machines.clear();
        for (pool, online, n) in &g.machines {
            self.machines
                .get_or_create(&vec![
                    ("pool".into(), pool.clone()),
                    ("online".into(), online.to_string()),
                ])
                .set(*n);
        }
        self.identity_conflicts.set(g.identity_conflicts);
        self.tasks.clear();
        for (kind, state, n) in &g.tasks {
            self.tasks
                .get_or_create(&vec![
                    ("kind".into(), kind.as_str().into()),
                    ("state".into(), state.as_str().into()),
                ])
                .set(*n);
        }
        self.task_machines.clear();
        for (state, n) in &g.task_machines {
            self.task_machines
                .get_or_create(&vec![("state".into(), state.as_str().into())])
                .set(*n);
        }
        self.outbox_events.set(g.outbox_events);
        self.outbox_backlogged.set(g.outbox_backlogged);
        self.outbox_max.set(g.outbox_max);
        self.cert_soonest
            .set(g.cert_soonest_ms.map(|ms| ms / 1000).unwrap_or(0));
        self.certs_expiring.set(g.certs_expiring);
    }
}

/// The text exposition, with the fleet's gauges read now.
pub async fn render(ctl: &Controller) -> Result<String, ApiError> {
    let now_ms = clock::unix_ms(clock::now());
    let offline_ms = ctl.cfg.offline_after.as_millis() as i64;
    let soon_ms = now_ms + CERT_SOON.as_millis() as i64;
    let gauges = ctl
        .store
        .read(move |tx| tx.fleet_gauges(now_ms - offline_ms, soon_ms))
        .await?;
    let m = &ctl.metrics;
    m.set_fleet(&gauges);
    m.polls_open.set(ctl.polling().len() as i64);
    m.db_queue_lag.set(ctl.store.queue_lag().as_secs_f64());
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &m.registry);
    Ok(crate::metrics_text::to_prometheus(&out))
}
