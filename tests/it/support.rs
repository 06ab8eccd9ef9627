//! Test support: a PKI made with the real CLI, and the real controller and agent binaries started
//! as processes over mutual TLS on 127.0.0.1 with port 0, each in its own temp dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fieldhand::net::client::HttpsClient;
use http::Method;
use serde_json::{json, Value};

pub const CONTROLLER: &str = env!("CARGO_BIN_EXE_fieldhand-controller");
pub const AGENT: &str = env!("CARGO_BIN_EXE_fieldhand");

pub fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("run binary")
}

/// Polls `probe` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temp dir with a PKI (CA, controller, operator `op`) made by `fieldhand-controller pki`.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub pki: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Env {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = tmp.path().join("pki");
        let out = run(CONTROLLER, &["pki", "init", "--dir", pki.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "pki init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run(
            CONTROLLER,
            &[
                "pki",
                "issue",
                "--dir",
                pki.to_str().unwrap(),
                "--operator",
                "op",
            ],
        );
        assert!(
            out.status.success(),
            "pki issue: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Env { tmp, pki, rt }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// A hand-issued agent certificate in no pool (`pki issue --agent ID`).
    pub fn issue_agent(&self, id: &str) {
        self.issue_agent_in(id, None)
    }

    /// A hand-issued agent certificate, bound to `pool` when given (`--pool`).
    pub fn issue_agent_in(&self, id: &str, pool: Option<&str>) {
        let cert = self.pki.join("agents").join(format!("{id}.pem"));
        if cert.exists() {
            return;
        }
        let mut args = vec![
            "pki",
            "issue",
            "--dir",
            self.pki.to_str().unwrap(),
            "--agent",
            id,
        ];
        if let Some(p) = pool {
            args.extend(["--pool", p]);
        }
        let out = run(CONTROLLER, &args);
        assert!(
            out.status.success(),
            "pki issue agent: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a controller in `<tmp>/controller` on an ephemeral port.
    pub fn controller(&self) -> Controller {
        Controller::start(self, "127.0.0.1:0", "")
    }

    /// A controller whose config starts with `extra` (top-level keys).
    pub fn controller_with(&self, extra: &str) -> Controller {
        Controller::start(self, "127.0.0.1:0", extra)
    }

    /// Starts an agent with machine id `id` whose hand-issued certificate binds it to `pool`.
    pub fn agent(&self, ctl: &Controller, id: &str, pool: &str) -> Agent {
        self.issue_agent_in(id, Some(pool));
        Agent::start(self, &ctl.url(), id, Certs::Issued, "")
    }

    /// An agent whose config ends with `extra` (e.g. a `[payloads]` table).
    pub fn agent_with(&self, ctl: &Controller, id: &str, pool: &str, extra: &str) -> Agent {
        self.issue_agent_in(id, Some(pool));
        Agent::start(self, &ctl.url(), id, Certs::Issued, extra)
    }

    /// An agent with no certificate, only `token`: it enrolls as `machine_id = id`. Its key
    /// and certificate are written under its own directory (`tls/`). `extra` as for
    /// [`Env::agent_with`].
    pub fn enrolling_agent(&self, ctl: &Controller, id: &str, token: &str, extra: &str) -> Agent {
        let top = format!("machine_id = \"{id}\"\nenrollment_token = \"{token}\"\n");
        Agent::start(
            self,
            &ctl.url(),
            id,
            Certs::Enrolled,
            &format!("{top}{extra}"),
        )
    }

    /// `POST /v1/enrollment-tokens`; returns the token (panics unless created).
    pub fn token(&self, ctl: &Controller, body: Value) -> String {
        let (s, v) = self.operator(ctl).post("/v1/enrollment-tokens", body);
        assert_eq!(s, 200, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    /// A client with the given cert/key (paths relative to the PKI dir), or none.
    pub fn client(&self, ctl: &Controller, cert: Option<(&str, &str)>) -> Client<'_> {
        let ca = self.pki.join("ca.pem");
        let tls = match cert {
            Some((c, k)) => {
                fieldhand::tls::client_config(&ca, &self.pki.join(c), &self.pki.join(k))
            }
            None => fieldhand::tls::client_config_without_cert(&ca),
        }
        .expect("client tls");
        self.client_with(ctl, tls)
    }

    pub fn client_with(
        &self,
        ctl: &Controller,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Client<'_> {
        Client {
            http: HttpsClient::new(&ctl.url(), tls).expect("client"),
            rt: &self.rt,
        }
    }

    pub fn operator(&self, ctl: &Controller) -> Client<'_> {
        self.client(ctl, Some(("operators/op.pem", "operators/op-key.pem")))
    }

    pub fn agent_client(&self, ctl: &Controller, id: &str) -> Client<'_> {
        self.issue_agent(id);
        let cert = format!("agents/{id}.pem");
        let key = format!("agents/{id}-key.pem");
        self.client(ctl, Some((&cert, &key)))
    }
}

/// A JSON client over mutual TLS.
pub struct Client<'a> {
    pub http: HttpsClient,
    rt: &'a tokio::runtime::Runtime,
}

impl Client<'_> {
    /// `(status, body)`; transport failures are `Err`.
    pub fn try_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let bytes = body.map(|b| bytes::Bytes::from(serde_json::to_vec(&b).unwrap()));
        let res = self.rt.block_on(self.http.request(
            method,
            path,
            bytes,
            Some("application/json"),
            Duration::from_secs(30),
        ));
        match res {
            Ok((status, body)) => {
                let v = if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&body)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()))
                };
                Ok((status.as_u16(), v))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.try_call(method, path, body).expect("request")
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(body))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None)
    }

    pub fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::PUT, path, Some(body))
    }

    /// A GET with extra headers: `(status, headers, body)`.
    pub fn get_with(
        &self,
        path: &str,
        headers: &[(http::header::HeaderName, String)],
    ) -> (u16, http::HeaderMap, Vec<u8>) {
        self.rt.block_on(async {
            use http_body_util::BodyExt;
            let r = self
                .http
                .get_stream(path, headers, Duration::from_secs(30))
                .await
                .expect("request");
            let body = r.body.collect().await.expect("body").to_bytes().to_vec();
            (r.status.as_u16(), r.headers, body)
        })
    }

    /// A request with a raw body: `(status, body as JSON)`.
    pub fn try_call_raw(&self, method: Method, path: &str, body: Vec<u8>) -> (u16, Value) {
        let (status, body) = self
            .rt
            .block_on(self.http.request(
                method,
                path,
                Some(bytes::Bytes::from(body)),
                Some("application/octet-stream"),
                Duration::from_secs(60),
            ))
            .expect("request");
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
        (status.as_u16(), v)
    }

    /// `POST /v1/blobs` with raw bytes; returns the sha256 (panics unless stored).
    pub fn upload(&self, data: &[u8]) -> String {
        let (status, body) = self
            .rt
            .block_on(self.http.request(
                Method::POST,
                "/v1/blobs",
                Some(bytes::Bytes::copy_from_slice(data)),
                Some("application/octet-stream"),
                Duration::from_secs(60),
            ))
            .expect("upload");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status.as_u16(), 200, "{v}");
        assert_eq!(v["size"], data.len() as u64);
        v["sha256"].as_str().unwrap().to_string()
    }

    /// Submits a script execution; panics unless accepted. Returns the task id.
    pub fn execute(&self, pool: &str, body: Value) -> String {
        let (status, v) = self.post(&format!("/v1/pools/{pool}/script-executions"), body);
        assert_eq!(status, 200, "script-executions refused: {v}");
        v["task_id"].as_str().expect("task_id").to_string()
    }

    pub fn task(&self, id: &str) -> Value {
        let (status, v) = self.get(&format!("/v1/tasks/{id}"));
        assert_eq!(status, 200, "{v}");
        v
    }

    pub fn wait_task(&self, id: &str, timeout: Duration) -> Value {
        wait_until(&format!("task {id} to finish"), timeout, || {
            let t = self.task(id);
            (!t["finished_at"].is_null()).then_some(t)
        })
    }

    /// Waits until the machine's state in the task is `state`.
    pub fn wait_machine_state(
        &self,
        task: &str,
        machine: &str,
        state: &str,
        timeout: Duration,
    ) -> Value {
        wait_until(
            &format!("{machine} to be {state} in {task}"),
            timeout,
            || {
                let t = self.task(task);
                let m = machine_of(&t, machine).clone();
                (m["state"] == state).then_some(m)
            },
        )
    }

    pub fn wait_online(&self, ids: &[&str], timeout: Duration) {
        wait_until(&format!("machines {ids:?} online"), timeout, || {
            let (status, v) = self.get("/v1/machines");
            assert_eq!(status, 200, "{v}");
            let online: Vec<&str> = v
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["online"] == true)
                .filter_map(|m| m["machine_id"].as_str())
                .collect();
            ids.iter().all(|id| online.contains(id)).then_some(())
        })
    }

    pub fn script(&self, name: &str, command_type: &str, content: &str) -> String {
        let (status, v) = self.post(
            "/v1/scripts",
            json!({"name": name, "command_type": command_type, "content": content}),
        );
        assert_eq!(status, 200, "{v}");
        v["script_id"].as_str().unwrap().to_string()
    }
}

/// The most intervals `[start, end]` that overlap at one moment (an end at the very moment
/// of a start does not overlap it).
pub fn peak_overlap(intervals: &[(u128, u128)]) -> usize {
    let mut edges: Vec<(u128, i32)> = intervals
        .iter()
        .flat_map(|(a, b)| [(*a, 1), (*b, -1)])
        .collect();
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

/// Nanoseconds since the epoch, on the clock `date +%s%N` reads.
pub fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The ids of the machines a task ran on, in the order the controller lists them.
pub fn machine_ids(task: &Value) -> Vec<&str> {
    task["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["machine_id"].as_str().unwrap())
        .collect()
}

pub fn machine_of<'a>(task: &'a Value, id: &str) -> &'a Value {
    task["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["machine_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in task {task}"))
}

fn spawn(bin: &str, args: &[&str], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin)
        .args(args)
        .env("FIELDHAND_LOG", "debug")
        // Scripts must never see the agent's environment.
        .env("FIELDHAND_TEST_LEAK", "leaked")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn")
}

fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// With `FIELDHAND_TEST_POSTGRES` set (a server URL, e.g. from `tests/pg/cluster.sh`), every
/// controller of the suite runs on a database of its own on that server: the same tests cover
/// both stores. Unset: SQLite in the controller's directory, as the default config does.
pub fn postgres_database(dir: &Path) -> String {
    match postgres_url_for_new_database() {
        Some(url) => format!(
            "database_url = \"{url}\"\nblob_dir = \"{}\"\n",
            dir.join("blobs").display()
        ),
        None => String::new(),
    }
}

/// A new, empty database on the test server, if there is one.
pub fn postgres_url_for_new_database() -> Option<String> {
    let base = std::env::var("FIELDHAND_TEST_POSTGRES").ok()?;
    let name = format!("fh_{}", uuid::Uuid::new_v4().simple());
    let mut admin = postgres::Client::connect(&base, postgres::NoTls)
        .unwrap_or_else(|e| panic!("FIELDHAND_TEST_POSTGRES={base}: {e}"));
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let (root, _) = base.rsplit_once('/').expect("a URL ending in /DATABASE");
    Some(format!("{root}/{name}"))
}

/// Whether the suite runs on PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var_os("FIELDHAND_TEST_POSTGRES").is_some()
}

pub struct Controller {
    pub dir: PathBuf,
    pub addr: String,
    config: PathBuf,
    child: Option<Child>,
}

impl Controller {
    fn start(env: &Env, listen: &str, extra: &str) -> Self {
        Self::start_in(env, "controller", listen, extra)
    }

    /// A controller in `<tmp>/<name>`: replicas sharing one database each have their own.
    pub fn start_in(env: &Env, name: &str, listen: &str, extra: &str) -> Self {
        let dir = env.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("controller.toml");
        let pki = &env.pki;
        let database = if extra.contains("database_url") {
            String::new()
        } else {
            postgres_database(&dir)
        };
        std::fs::write(
            &config,
            format!(
                "{extra}\n{database}listen = \"{listen}\"\ndata_dir = \"{}\"\noffline_after_seconds = 3\nunreachable_grace_seconds = 3\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[enrollment]\nissuing_cert = \"{}\"\nissuing_key = \"{}\"\n",
                dir.display(),
                pki.join("ca.pem").display(),
                pki.join("controller.pem").display(),
                pki.join("controller-key.pem").display(),
                pki.join("issuing-ca.pem").display(),
                pki.join("issuing-ca-key.pem").display()
            ),
        )
        .unwrap();
        let mut c = Controller {
            dir,
            addr: String::new(),
            config,
            child: None,
        };
        c.launch();
        c
    }

    fn launch(&mut self) {
        let addr_file = self.dir.join("listen-addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = self.dir.join("controller.log");
        let mut child = spawn(
            CONTROLLER,
            &["serve", "--config", self.config.to_str().unwrap()],
            &log,
        );
        self.addr = wait_until("the controller to listen", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "controller exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&addr_file)
                .ok()
                .map(|s| s.trim().to_string())
        });
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The controller's resident memory, from /proc (KiB).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }

    /// Starts again on the same address and database.
    pub fn restart(&mut self) {
        self.kill();
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("listen") {
                    format!("listen = \"{}\"", self.addr)
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&self.config, text).unwrap();
        self.launch();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where an agent's certificate comes from.
#[derive(Clone, Copy, PartialEq)]
pub enum Certs {
    /// Hand-issued into the test PKI (`pki/agents/ID.pem`).
    Issued,
    /// Made by the agent's own enrollment (`agents/ID/tls/agent.pem`).
    Enrolled,
}

pub struct Agent {
    pub id: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub cert: PathBuf,
    /// The agent binary (this build's, or another release's).
    pub bin: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(env: &Env, url: &str, id: &str, certs: Certs, extra: &str) -> Self {
        Self::start_in(
            env,
            url,
            id,
            &env.path().join("agents").join(id),
            certs,
            extra,
        )
    }

    /// An agent in `dir` (several agents may share one certificate from different dirs).
    pub fn start_in(env: &Env, url: &str, id: &str, dir: &Path, certs: Certs, extra: &str) -> Self {
        Self::write_config(env, url, id, dir, certs, extra).started()
    }

    fn write_config(env: &Env, url: &str, id: &str, dir: &Path, certs: Certs, extra: &str) -> Self {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.toml");
        let pki = &env.pki;
        let socket = dir.join("agent.sock");
        // A test that sets its own [exec] table replaces this one.
        let exec = if extra.contains("[exec]") {
            ""
        } else {
            "[exec]\nkill_grace_seconds = 1\n"
        };
        let (cert, key) = match certs {
            Certs::Issued => (
                pki.join(format!("agents/{id}.pem")),
                pki.join(format!("agents/{id}-key.pem")),
            ),
            Certs::Enrolled => (dir.join("tls/agent.pem"), dir.join("tls/agent-key.pem")),
        };
        // Top-level keys at the head of `extra` must come before the first table.
        let split = extra
            .lines()
            .position(|l| l.trim_start().starts_with('['))
            .unwrap_or(extra.lines().count());
        let top: String = extra
            .lines()
            .take(split)
            .map(|l| format!("{l}\n"))
            .collect();
        let extra: String = extra
            .lines()
            .skip(split)
            .map(|l| format!("{l}\n"))
            .collect();
        // A test that lists its own `controller_urls` (failover) replaces `controller_url`.
        let url = if top.contains("controller_urls") {
            String::new()
        } else {
            format!("controller_url = \"{url}\"\n")
        };
        std::fs::write(
            &config,
            format!(
                "{url}state_dir = \"{}\"\nsocket_path = \"{}\"\n{top}[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{exec}[connection]\nretry_initial_ms = 100\nretry_max_ms = 500\n{extra}\n",
                dir.join("state").display(),
                socket.display(),
                pki.join("ca.pem").display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        Agent {
            id: id.to_string(),
            dir,
            config,
            socket,
            cert,
            bin: PathBuf::from(AGENT),
            child: None,
        }
    }

    /// Launches the agent (after its config is written).
    pub fn started(mut self) -> Self {
        self.launch();
        self
    }

    /// The same agent, not yet launched, to be run by `bin` (e.g. the previous release).
    pub fn configured_in(
        env: &Env,
        url: &str,
        id: &str,
        dir: &Path,
        certs: Certs,
        extra: &str,
        bin: &Path,
    ) -> Self {
        let mut a = Self::write_config(env, url, id, dir, certs, extra);
        a.bin = bin.to_path_buf();
        a
    }

    fn launch(&mut self) {
        let log = self.dir.join("agent.log");
        self.child = Some(spawn(
            self.bin.to_str().unwrap(),
            &["agent", "--config", self.config.to_str().unwrap()],
            &log,
        ));
        let socket = self.socket.clone();
        wait_until("the agent's status socket", Duration::from_secs(20), || {
            socket.exists().then_some(())
        });
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, as a crash would: the running script is left behind as an orphan.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Waits until the agent process has exited on its own (e.g. a simulated power cut).
    pub fn wait_exit(&mut self, timeout: Duration) {
        let child = self.child.as_mut().expect("agent running");
        wait_until("the agent to go down", timeout, || {
            child.try_wait().ok().flatten().map(|_| ())
        });
        self.child = None;
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Whether the agent process has exited on its own (e.g. a simulated power cut).
    pub fn exited(&mut self) -> bool {
        let gone = match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_some(),
            None => true,
        };
        if gone {
            self.child = None;
            let _ = std::fs::remove_file(&self.socket);
        }
        gone
    }

    /// Starts the agent again after it went down.
    pub fn start_again(&mut self) {
        self.launch();
    }

    /// `fieldhand status --json` through the real CLI.
    pub fn status(&self) -> Value {
        let out = run(
            AGENT,
            &[
                "status",
                "--json",
                "--socket",
                self.socket.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a process is still running (a zombie counts as dead).
pub use fieldhand::sys::process::alive;

/// Reads a pid written by a script.
pub fn read_pid(path: &Path, timeout: Duration) -> i32 {
    wait_until(&format!("pid file {}", path.display()), timeout, || {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    })
}

/// A fake machine for power tests: a reboot command that writes a new boot id (or not) and
/// cuts the agent's power, a shutdown command that only logs, and utmp sessions.
pub struct Machine {
    pub agent: Agent,
    pub boot_file: PathBuf,
    pub power_log: PathBuf,
    pub utmp: PathBuf,
    pub ttys: PathBuf,
}

/// How the fake reboot command behaves.
#[derive(Clone, Copy, PartialEq)]
pub enum Reboot {
    /// New boot id, then a power cut.
    Real,
    /// A power cut but the same boot id: only the agent restarted.
    Fake,
}

pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A controller and one online machine, `m1` in pool `p`, that really reboots.
pub fn one_machine(env: &Env) -> (Controller, Machine) {
    let ctl = env.controller();
    let m = machine(env, &ctl, "m1", "p", Reboot::Real);
    env.operator(&ctl)
        .wait_online(&["m1"], Duration::from_secs(60));
    (ctl, m)
}

pub fn machine(env: &Env, ctl: &Controller, id: &str, pool: &str, reboot: Reboot) -> Machine {
    machine_with(env, ctl, id, pool, reboot, "")
}

/// [`machine`] with more agent config: top-level keys first, then tables.
pub fn machine_with(
    env: &Env,
    ctl: &Controller,
    id: &str,
    pool: &str,
    reboot: Reboot,
    more: &str,
) -> Machine {
    let dir = env.path().join("hw").join(id);
    std::fs::create_dir_all(dir.join("ttys/pts")).unwrap();
    let boot_file = dir.join("boot_id");
    std::fs::write(&boot_file, "boot-0\n").unwrap();
    let power_log = dir.join("power.log");
    let new_boot = if reboot == Reboot::Real {
        format!("echo \"boot-$(date +%s%N)\" > {}", boot_file.display())
    } else {
        String::new()
    };
    let reboot_cmd = dir.join("reboot.sh");
    write_script(
        &reboot_cmd,
        &format!(
            "date +%s%N >> {times}\necho reboot >> {log}\n{new_boot}\nkill -9 $PPID",
            log = power_log.display(),
            times = dir.join("reboot.times").display()
        ),
    );
    let stop_cmd = dir.join("poweroff.sh");
    write_script(&stop_cmd, &format!("echo stop >> {}", power_log.display()));
    let utmp = dir.join("utmp");
    let ttys = dir.join("ttys");
    let extra = format!(
        "{more}\n[power]\nreboot_command = [\"{}\"]\nshutdown_command = [\"{}\"]\nboot_id_path = \"{}\"\nreboot_timeout_seconds = 3\n[sessions]\nlogind = false\nutmp_path = \"{}\"\ntty_dir = \"{}\"\n",
        reboot_cmd.display(),
        stop_cmd.display(),
        boot_file.display(),
        utmp.display(),
        ttys.display()
    );
    let agent = env.agent_with(ctl, id, pool, &extra);
    Machine {
        agent,
        boot_file,
        power_log,
        utmp,
        ttys,
    }
}

impl Machine {
    pub fn boot_id(&self) -> String {
        std::fs::read_to_string(&self.boot_file)
            .unwrap()
            .trim()
            .to_string()
    }

    /// When each reboot command began (ns since the epoch), from `reboot.times`.
    pub fn reboot_times(&self) -> Vec<u128> {
        let path = self.power_log.with_file_name("reboot.times");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn power_log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.power_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits for the power cut the reboot command causes, then boots the agent again.
    pub fn survive_reboot(&mut self) {
        self.agent.wait_exit(Duration::from_secs(60));
        self.agent.start_again();
    }

    /// A logged-in user: a live process recorded in utmp on terminal `pts/<n>`.
    pub fn login(&self, user: &str, n: u32) -> Child {
        let child = Command::new("sleep").arg("1000").spawn().unwrap();
        let line = format!("pts/{n}");
        std::fs::write(self.ttys.join(&line), b"").unwrap();
        let rec = fieldhand::sys::sessions::utmp_record(child.id() as i32, &line, user);
        let mut data = std::fs::read(&self.utmp).unwrap_or_default();
        data.extend(rec);
        std::fs::write(&self.utmp, data).unwrap();
        child
    }

    pub fn tty(&self, n: u32) -> String {
        std::fs::read_to_string(self.ttys.join(format!("pts/{n}"))).unwrap_or_default()
    }
}
