//! The fleet simulator: one real controller (the release binary, as a child process, so its
//! CPU and memory are its own) and N simulated agents in this process. Each agent has its own
//! certificate from the real PKI and speaks the agent protocol through the library's own
//! client (`net::client::HttpsClient`), with the real agent's timers: the long poll
//! (`connection.long_poll_seconds`, 25 s), a heartbeat every 60 s, acknowledgements in the
//! next poll, and STARTED then RESULT through an outbox that retries with the agent's backoff.
//!
//! `cargo bench --bench fleet -- --agents 10000` prints: time until all are online; idle
//! controller CPU and RSS; dispatch latency p50/p99/max (the operator's POST until the
//! assignment reaches its agent); the time until every result is recorded; peak and final
//! RSS; and errors by kind. It measures, it asserts nothing: `.ci/run` runs it small to see
//! that it works.
//!
//! Options: `--agents N` (1000), `--idle-seconds S` (20), `--rollout-timeout S` (120),
//! `--events-per-request N` (how many outbox entries the agent sends in one request; the
//! agent's own `link::EVENTS_PER_REQUEST` by default), `--controller PATH` (another build of
//! the controller, to compare), `--keep DIR` (keep the PKI and data there),
//! `--postgres URL` (a PostgreSQL server: the controllers run on a new database there instead
//! of SQLite), `--replicas N` (N controllers on that one database; agent i talks to replica
//! i mod N and the operator to the first, so dispatch to the others crosses replicas).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fieldhand::net::client::HttpsClient;
use fieldhand::net::NetError;
use fieldhand::pki::{Identity, Role};
use http::{header::HeaderName, Method};
use serde_json::{json, Value};

const POOL: &str = "fleet";
const LONG_POLL: Duration = Duration::from_secs(25);
const HEARTBEAT: Duration = Duration::from_secs(60);
const RETRY_INITIAL: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

struct Args {
    agents: usize,
    idle: Duration,
    rollout_timeout: Duration,
    per_request: usize,
    controller: PathBuf,
    keep: Option<PathBuf>,
    postgres: Option<String>,
    replicas: usize,
}

fn args() -> Args {
    let mut a = Args {
        agents: 1000,
        idle: Duration::from_secs(20),
        rollout_timeout: Duration::from_secs(120),
        per_request: fieldhand::agent::link::EVENTS_PER_REQUEST,
        controller: PathBuf::from(env!("CARGO_BIN_EXE_fieldhand-controller")),
        keep: None,
        postgres: None,
        replicas: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--agents" => a.agents = v().parse().expect("--agents N"),
            "--idle-seconds" => a.idle = Duration::from_secs(v().parse().expect("seconds")),
            "--rollout-timeout" => {
                a.rollout_timeout = Duration::from_secs(v().parse().expect("seconds"))
            }
            "--events-per-request" => a.per_request = v().parse().expect("--events-per-request N"),
            "--controller" => a.controller = PathBuf::from(v()),
            "--keep" => a.keep = Some(PathBuf::from(v())),
            "--postgres" => a.postgres = Some(v()),
            "--replicas" => a.replicas = v().parse().expect("--replicas N"),
            // cargo bench passes --bench; nothing else is expected.
            "--bench" => {}
            other => panic!("unknown option {other:?}"),
        }
    }
    a
}

/// What the agents saw, shared by all of them.
#[derive(Default)]
struct Shared {
    online: AtomicUsize,
    /// Assignment id -> when it reached its agent, and the replica that agent talks to.
    received: Mutex<BTreeMap<String, (Instant, usize)>>,
    /// When the last RESULT was handed to the outbox (the "script" ended).
    last_end: Mutex<Option<Instant>>,
    errors: Mutex<BTreeMap<String, u64>>,
    requests: AtomicU64,
}

impl Shared {
    fn error(&self, e: &NetError) {
        let kind = match e {
            NetError::Status { status, .. } => format!("HTTP {status}"),
            NetError::Timeout { .. } => "timeout".into(),
            NetError::Busy { .. } => "busy (503, Retry-After)".into(),
            NetError::Connect { source, .. } => format!("connect: {}", source.kind()),
            NetError::Tls { .. } => "tls".into(),
            NetError::Http { .. } => "http".into(),
            NetError::BadUrl { .. } | NetError::Decode { .. } | NetError::Encode { .. } => {
                "other".into()
            }
        };
        let mut errors = self.errors.lock().unwrap();
        let n = errors.entry(kind).or_default();
        *n += 1;
        // The first few of each kind, word for word, for whoever reads the run.
        if *n <= 3 {
            eprintln!("fleet: {e}");
        }
    }
}

fn now_text() -> String {
    fieldhand::sys::clock::now_rfc3339()
}

async fn call(
    c: &HttpsClient,
    shared: &Shared,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, NetError> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    c.json::<Value, Value>(Method::POST, path, Some(body), timeout)
        .await
}

/// Sleeps for the backoff after a failure; honours `Retry-After` when the controller sent
/// one (as the agent's own backoff does).
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(RETRY_INITIAL)
    }
    async fn wait(&mut self, e: &NetError) {
        if let Some(d) = fieldhand::agent::failover::busy_wait(e) {
            tokio::time::sleep(d).await;
            return;
        }
        let jitter = 0.5 + fastrand::f64();
        tokio::time::sleep(self.0.mul_f64(jitter)).await;
        self.0 = (self.0 * 2).min(RETRY_MAX);
    }
    fn reset(&mut self) {
        self.0 = RETRY_INITIAL;
    }
}

/// One simulated agent: heartbeat, long poll, and an outbox delivered in order.
async fn agent(
    id: String,
    client: HttpsClient,
    shared: Arc<Shared>,
    per_request: usize,
    replica: usize,
) {
    let outbox: Arc<tokio::sync::Mutex<Vec<Value>>> = Arc::default();
    let wake = Arc::new(tokio::sync::Notify::new());
    // Heartbeat loop; the first poll follows the first heartbeat, as the agent's does.
    let (introduced, mut first_heartbeat) = tokio::sync::watch::channel(false);
    {
        let (c, s, id) = (client.clone(), shared.clone(), id.clone());
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let hb = json!({"agent_version": "fleet-sim", "outbox": 0, "facts": {
                    "hostname": id, "os": "Linux", "kernel": "6", "cpu_count": 2,
                    "memory_total_bytes": 1u64 << 30, "memory_available_bytes": 1u64 << 29,
                    "disk_free_bytes": 1u64 << 34, "uptime_seconds": 1, "agent_version": "fleet-sim"}});
                let ok =
                    match call(&c, &s, "/agent/v1/heartbeat", &hb, Duration::from_secs(30)).await {
                        Ok(_) => true,
                        Err(e) => {
                            s.error(&e);
                            false
                        }
                    };
                if ok && first {
                    first = false;
                    s.online.fetch_add(1, Ordering::Relaxed);
                }
                introduced.send_replace(true);
                tokio::time::sleep(if ok {
                    HEARTBEAT
                } else {
                    HEARTBEAT.min(RETRY_MAX)
                })
                .await;
            }
        });
    }
    // Delivery loop: in order, `per_request` at a time, until each is acknowledged.
    {
        let (c, s, ob, wake) = (client.clone(), shared.clone(), outbox.clone(), wake.clone());
        tokio::spawn(async move {
            let mut backoff = Backoff::new();
            loop {
                let notified = wake.notified();
                let batch: Vec<Value> = ob.lock().await.iter().take(per_request).cloned().collect();
                if batch.is_empty() {
                    notified.await;
                    continue;
                }
                let body = json!({ "events": batch });
                match call(&c, &s, "/agent/v1/events", &body, Duration::from_secs(30)).await {
                    Ok(_) => {
                        backoff.reset();
                        let mut q = ob.lock().await;
                        let n = batch.len().min(q.len());
                        q.drain(..n);
                    }
                    Err(e) => {
                        s.error(&e);
                        backoff.wait(&e).await;
                    }
                }
            }
        });
    }
    // Poll loop.
    let _ = first_heartbeat.wait_for(|i| *i).await;
    let mut acks: Vec<String> = Vec::new();
    let mut backoff = Backoff::new();
    loop {
        let req = json!({"agent_version": "fleet-sim", "wait_ms": LONG_POLL.as_millis() as u64,
                         "ack_assignments": acks, "ack_cancels": []});
        match call(
            &client,
            &shared,
            "/agent/v1/poll",
            &req,
            LONG_POLL + Duration::from_secs(15),
        )
        .await
        {
            Ok(resp) => {
                backoff.reset();
                acks.clear();
                let list = resp["assignments"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    continue;
                }
                let at = Instant::now();
                let mut q = outbox.lock().await;
                for a in list {
                    let aid = a["assignment_id"].as_str().unwrap_or_default().to_string();
                    shared
                        .received
                        .lock()
                        .unwrap()
                        .entry(aid.clone())
                        .or_insert((at, replica));
                    acks.push(aid.clone());
                    let started = now_text();
                    q.push(json!({"idempotency_key": format!("{aid}:started"),
                        "assignment_id": aid, "at": started, "body": {"type": "STARTED"}}));
                    // A trivial script: it ends at once, exit 0.
                    q.push(json!({"idempotency_key": format!("{aid}:result"),
                        "assignment_id": aid, "at": now_text(), "body": {"type": "RESULT",
                        "state": "SUCCEEDED", "exit_code": 0, "stdout": "", "stderr": "",
                        "output_truncated": false, "started_at": started,
                        "finished_at": now_text(), "error_code": null, "error_msg": null}}));
                }
                *shared.last_end.lock().unwrap() = Some(Instant::now());
                drop(q);
                wake.notify_one();
                // As the agent does: the events go out over the connection this poll freed
                // before the next poll takes it (`link::DELIVER_BEFORE_POLLING`).
                let until = Instant::now() + fieldhand::agent::link::DELIVER_BEFORE_POLLING;
                while !outbox.lock().await.is_empty() && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Err(e) => {
                shared.error(&e);
                backoff.wait(&e).await;
            }
        }
    }
}

/// Controller CPU ticks (user + system) and RSS / peak RSS in KiB, from /proc.
fn proc_stats(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks, kib("VmRSS:"), kib("VmHWM:"))
}

fn ticks_per_second() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on Linux.
    100.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn issue_all(pki: &Path, n: usize) {
    let started = Instant::now();
    for i in 0..n {
        let id = Identity {
            role: Role::Agent,
            name: format!("sim-{i:05}"),
        };
        if pki.join("agents").join(format!("{}.pem", id.name)).exists() {
            continue;
        }
        fieldhand::pki::issue(pki, &id, Some(POOL)).expect("issue an agent certificate");
    }
    eprintln!(
        "fleet: {n} agent certificates ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// The bench starts the controller it measures, as a process of its own.
#[allow(clippy::disallowed_methods)]
fn main() {
    let a = args();
    let tmp = tempfile::tempdir().unwrap();
    let root = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let pki = root.join("pki");
    if !pki.join("ca.pem").exists() {
        fieldhand::pki::init(&pki, &[]).expect("pki init");
        fieldhand::pki::issue(
            &pki,
            &Identity {
                role: Role::Operator,
                name: "op".into(),
            },
            None,
        )
        .expect("operator certificate");
    }
    issue_all(&pki, a.agents);
    assert!(
        a.replicas == 1 || a.postgres.is_some(),
        "--replicas needs --postgres (replicas share one PostgreSQL database)"
    );
    let database = a.postgres.as_ref().map(|server| {
        let name = format!("fleet_{}", uuid::Uuid::new_v4().simple());
        let mut admin = postgres::Client::connect(server, postgres::NoTls).expect("--postgres");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let (base, _) = server.rsplit_once('/').expect("a URL ending in /DATABASE");
        format!(
            "database_url = \"{base}/{name}\"\nblob_dir = \"{}\"\n",
            root.join("blobs").display()
        )
    });
    let mut children = Vec::new();
    let mut urls = Vec::new();
    for r in 0..a.replicas {
        let (child, url) = start_controller(&a, &root, &pki, r, database.as_deref().unwrap_or(""));
        children.push(child);
        urls.push(url);
    }
    let pid = children[0].id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(run(&a, &pki, &urls, pid));
    // The agents stop before the controller does, so no one reports its going as an error.
    rt.shutdown_timeout(Duration::from_millis(200));
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!("{report}");
}

/// Starts controller replica `r` (its own data directory; `database` is the shared
/// `database_url`, empty for SQLite) and waits until it listens.
#[allow(clippy::disallowed_methods)]
fn start_controller(
    a: &Args,
    root: &Path,
    pki: &Path,
    r: usize,
    database: &str,
) -> (std::process::Child, String) {
    let data = root.join(format!("controller-{r}"));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let config = data.join("controller.toml");
    let conns = (a.agents * 2 + 256).max(4096);
    std::fs::write(
        &config,
        format!(
            "{database}listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmax_connections = {conns}\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            data.display(),
            pki.join("ca.pem").display(),
            pki.join("controller.pem").display(),
            pki.join("controller-key.pem").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(data.join("controller.log")).unwrap();
    let child = std::process::Command::new(&a.controller)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("FIELDHAND_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the controller");
    let addr_file = data.join("listen-addr");
    let t0 = Instant::now();
    let addr = loop {
        if let Ok(s) = std::fs::read_to_string(&addr_file) {
            if !s.trim().is_empty() {
                break s.trim().to_string();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the controller did not start: {}",
            std::fs::read_to_string(data.join("controller.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    (child, format!("https://{addr}"))
}

async fn run(a: &Args, pki: &Path, urls: &[String], pid: u32) -> String {
    let url = urls[0].as_str();
    let shared = Arc::new(Shared::default());
    let ca = pki.join("ca.pem");
    let session = HeaderName::from_static(fieldhand::proto::agent::SESSION_HEADER);
    let protocol = HeaderName::from_static(fieldhand::proto::agent::PROTOCOL_HEADER);
    let (_, base_rss, _) = proc_stats(pid);
    let started = Instant::now();
    for i in 0..a.agents {
        let name = format!("sim-{i:05}");
        let tls = fieldhand::tls::client_config(
            &ca,
            &pki.join("agents").join(format!("{name}.pem")),
            &pki.join("agents").join(format!("{name}-key.pem")),
        )
        .expect("agent tls");
        let client = HttpsClient::new(&urls[i % urls.len()], tls)
            .unwrap()
            .with_header(session.clone(), format!("sim{i}.boot1"))
            .with_header(
                protocol.clone(),
                fieldhand::proto::agent::PROTOCOL_VERSION.to_string(),
            );
        tokio::spawn(agent(
            name,
            client,
            shared.clone(),
            a.per_request,
            i % urls.len(),
        ));
        // The fleet starts over a few seconds, as machines do, not in one instant.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let op_tls = fieldhand::tls::client_config(
        &ca,
        &pki.join("operators/op.pem"),
        &pki.join("operators/op-key.pem"),
    )
    .unwrap();
    let op = HttpsClient::new(url, op_tls).unwrap();
    // All online, as the controller sees them.
    let online_at = loop {
        let (_, body) = op
            .request(
                Method::GET,
                "/v1/machines",
                None,
                None,
                Duration::from_secs(60),
            )
            .await
            .unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let n = v
            .as_array()
            .map(|l| l.iter().filter(|m| m["online"] == true).count())
            .unwrap_or(0);
        if n >= a.agents {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(600) {
            break Duration::MAX;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Let every agent settle into its long poll, then measure idle.
    tokio::time::sleep(LONG_POLL.min(a.idle)).await;
    let (t1, _, _) = proc_stats(pid);
    let idle_from = Instant::now();
    tokio::time::sleep(a.idle).await;
    let (t2, idle_rss, _) = proc_stats(pid);
    let idle_cpu = (t2 - t1) as f64 / ticks_per_second() / idle_from.elapsed().as_secs_f64();
    // The rollout: one trivial script to the whole pool, no gray batch.
    let body = json!({"command_content": "true", "command_type": "sh"});
    let posted = Instant::now();
    let (status, out) = op
        .request(
            Method::POST,
            &format!("/v1/pools/{POOL}/script-executions"),
            Some(Bytes::from(serde_json::to_vec(&body).unwrap())),
            Some("application/json"),
            Duration::from_secs(60),
        )
        .await
        .expect("create the task");
    assert!(status.is_success(), "{}", String::from_utf8_lossy(&out));
    let task: Value = serde_json::from_slice(&out).unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_string();
    let mut peak_rss = 0;
    let (recorded, recorded_n) = loop {
        let (_, rss, _) = proc_stats(pid);
        peak_rss = peak_rss.max(rss);
        let r = op
            .request(
                Method::GET,
                &format!("/v1/tasks/{task_id}"),
                None,
                None,
                Duration::from_secs(60),
            )
            .await;
        let v: Value = r
            .ok()
            .and_then(|(_, b)| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let done = v["machines"]
            .as_array()
            .map(|l| l.iter().filter(|m| m["state"] == "SUCCEEDED").count())
            .unwrap_or(0);
        if done >= a.agents {
            break (Some(posted.elapsed()), done);
        }
        if posted.elapsed() > a.rollout_timeout {
            break (None, done);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let recorded_at = Instant::now();
    let received = shared.received.lock().unwrap().clone();
    let mut dispatch: Vec<Duration> = received
        .values()
        .map(|(t, _)| t.saturating_duration_since(posted))
        .collect();
    dispatch.sort();
    // To agents of the other replicas: the operator's POST reached the first one.
    let mut crossed: Vec<Duration> = received
        .values()
        .filter(|(_, r)| *r != 0)
        .map(|(t, _)| t.saturating_duration_since(posted))
        .collect();
    crossed.sort();
    let after_last_end = shared
        .last_end
        .lock()
        .unwrap()
        .map(|t| recorded_at.saturating_duration_since(t));
    // Back to idle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (_, final_rss, hwm) = proc_stats(pid);
    let errors = shared.errors.lock().unwrap().clone();
    let mut out = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "fleet: {} agents against {} on {} ({})",
        a.agents,
        urls.join(", "),
        if a.postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        a.controller.display()
    );
    let _ = writeln!(
        out,
        "  all online after        {}",
        if online_at == Duration::MAX {
            "not within 600 s".into()
        } else {
            format!("{:.1} s", online_at.as_secs_f64())
        }
    );
    let _ = writeln!(
        out,
        "  idle controller CPU     {:.1}% of a core (over {} s)",
        idle_cpu * 100.0,
        a.idle.as_secs()
    );
    let _ = writeln!(
        out,
        "  controller RSS          {} MiB before agents, {} MiB idle",
        base_rss / 1024,
        idle_rss / 1024
    );
    let _ = writeln!(
        out,
        "  dispatch                p50 {}, p99 {}, max {} ({} of {} received)",
        ms(pct(&dispatch, 0.5)),
        ms(pct(&dispatch, 0.99)),
        ms(dispatch.last().copied().unwrap_or_default()),
        dispatch.len(),
        a.agents
    );
    if !crossed.is_empty() {
        let _ = writeln!(
            out,
            "  dispatch across replicas p50 {}, p99 {} ({} agents on replicas 2..{})",
            ms(pct(&crossed, 0.5)),
            ms(pct(&crossed, 0.99)),
            crossed.len(),
            urls.len()
        );
    }
    match recorded {
        Some(d) => {
            let _ = writeln!(
                out,
                "  results recorded/s      {:.0} ({} results)",
                a.agents as f64 / d.as_secs_f64(),
                a.agents
            );
            let _ = writeln!(
                out,
                "  all results recorded    {:.2} s after the POST; {} after the last script ended",
                d.as_secs_f64(),
                after_last_end.map(ms).unwrap_or_else(|| "-".into())
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  results recorded        {recorded_n} of {} after {} s",
                a.agents,
                a.rollout_timeout.as_secs()
            );
        }
    }
    let _ = writeln!(
        out,
        "  controller RSS          peak {} MiB during the rollout (high-water {} MiB), {} MiB 10 s after",
        peak_rss / 1024,
        hwm / 1024,
        final_rss / 1024
    );
    let _ = writeln!(
        out,
        "  requests                {}",
        shared.requests.load(Ordering::Relaxed)
    );
    if errors.is_empty() {
        let _ = writeln!(out, "  errors                  none");
    } else {
        for (k, n) in errors {
            let _ = writeln!(out, "  errors                  {k}: {n}");
        }
    }
    out
}
