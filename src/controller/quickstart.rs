//! `fieldhand-controller quickstart`: the main job on the embedded default, end to end. It
//! creates a PKI, starts a real controller on SQLite, makes an enrollment token, starts N real
//! agents as child processes (each with its own state dir and only the token: each makes its
//! own key and enrolls), submits a gray-batch script execution through the operator API over
//! mutual TLS, and prints the per-machine result table. It leaves a `ctl.toml` for
//! `fieldhandctl` (the operator certificate) in its directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;

use crate::net::client::HttpsClient;
use crate::net::NetError;
use crate::pki::Identity;
use crate::proto::api;
use crate::proto::domain::ErrorCode;
use crate::sys::child::{self, Child};

pub const POOL: &str = "quickstart";
const OPERATOR: &str = "quickstart-operator";

#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub agents: u32,
    /// Stop everything after the table instead of waiting for Ctrl-C.
    pub exit: bool,
    pub controller_bin: PathBuf,
    pub agent_bin: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error("--agents {0} must be 1..=50")]
    Agents(u32),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("operator API: {0}")]
    Api(#[from] NetError),
    #[error("{what} did not happen within {after:?}; logs are in {logs}")]
    Timeout {
        what: String,
        after: Duration,
        logs: PathBuf,
    },
    #[error("{dir} is in use by another quickstart (pid {pid}); stop it (Ctrl-C) or use --dir with another directory")]
    InUse { dir: PathBuf, pid: String },
    #[error("cannot lock {dir}: {reason}")]
    Lock { dir: PathBuf, reason: String },
    #[error("{name} exited early ({status}); see {log}")]
    ChildDied {
        name: String,
        status: String,
        log: PathBuf,
    },
}

impl QuickstartError {
    pub fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            QuickstartError::Agents(_) => Exit::Usage,
            QuickstartError::InUse { .. } => Exit::TempFail,
            QuickstartError::Lock { .. } => Exit::CantCreate,
            QuickstartError::Io { .. } => Exit::CantCreate,
            QuickstartError::Pki(_) | QuickstartError::Tls(_) => Exit::Config,
            QuickstartError::Api(_)
            | QuickstartError::Timeout { .. }
            | QuickstartError::ChildDied { .. } => Exit::Unavailable,
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> QuickstartError {
    let path = path.to_path_buf();
    move |source| QuickstartError::Io {
        action,
        path,
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), QuickstartError> {
    crate::sys::fsutil::atomic_write(path, text.as_bytes(), 0o600).map_err(io("write", path))
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// The demo script: proves each machine ran it, as itself, with the clean environment.
const HELLO: &str = r#"echo "hello from $FIELDHAND_MACHINE_ID (task $FIELDHAND_TASK_ID)"
uname -sr
"#;

/// The final task, for the caller to decide the exit code.
pub struct Report {
    pub task: api::Task,
}

pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Report, QuickstartError> {
    if !(1..=50).contains(&opts.agents) {
        return Err(QuickstartError::Agents(opts.agents));
    }
    let dir = &opts.dir;
    crate::sys::fsutil::ensure_dir(dir, 0o700).map_err(io("create", dir))?;
    // One quickstart per directory: a second would fight the first over its PKI, ports
    // and agents' state.
    let _lock =
        crate::sys::fsutil::lock_exclusive(&dir.join("quickstart.lock")).map_err(|e| match e {
            crate::sys::fsutil::LockError::Held { pid, .. } => QuickstartError::InUse {
                dir: dir.clone(),
                pid,
            },
            e => QuickstartError::Lock {
                dir: dir.clone(),
                reason: e.to_string(),
            },
        })?;
    let pki = dir.join("pki");
    if !pki.join("ca.pem").exists() {
        crate::pki::init(&pki, &[])?;
    }
    let ensure_issued = |who: &Identity, cert: &Path| -> Result<(), QuickstartError> {
        if !cert.exists() {
            crate::pki::issue(&pki, who, None)?;
        }
        Ok(())
    };
    let op_cert = pki.join("operators").join(format!("{OPERATOR}.pem"));
    ensure_issued(&Identity::operator(OPERATOR), &op_cert)?;

    // Controller.
    let cdir = dir.join("controller");
    crate::sys::fsutil::ensure_dir(&cdir, 0o700).map_err(io("create", &cdir))?;
    let addr_file = cdir.join("listen-addr");
    let _ = std::fs::remove_file(&addr_file);
    let ccfg = cdir.join("controller.toml");
    write(
        &ccfg,
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {}\nunreachable_grace_seconds = 30\n\n[tls]\nca = {}\ncert = {}\nkey = {}\n\n[enrollment]\nissuing_cert = {}\nissuing_key = {}\n",
            toml_str(&cdir),
            toml_str(&pki.join("ca.pem")),
            toml_str(&pki.join("controller.pem")),
            toml_str(&pki.join("controller-key.pem")),
            toml_str(&pki.join("issuing-ca.pem")),
            toml_str(&pki.join("issuing-ca-key.pem")),
        ),
    )?;
    let clog = cdir.join("controller.log");
    let mut children: Vec<(Child, PathBuf)> = Vec::new();
    let controller = child::spawn_logged(
        "controller",
        &opts.controller_bin,
        ["serve", "--config", &ccfg.display().to_string()],
        &clog,
    )
    .map_err(io("start", &opts.controller_bin))?;
    children.push((controller, clog.clone()));
    let addr = wait_for(
        &mut children,
        "the controller to listen",
        Duration::from_secs(20),
        dir,
        || {
            std::fs::read_to_string(&addr_file)
                .ok()
                .map(|s| s.trim().to_string())
        },
    )
    .await?;
    println!(
        "controller listening on https://{addr} (logs: {})",
        clog.display()
    );

    let tls = crate::tls::client_config(
        &pki.join("ca.pem"),
        &op_cert,
        &pki.join("operators").join(format!("{OPERATOR}-key.pem")),
    )?;
    let client = HttpsClient::new(&format!("https://{addr}"), tls)?;
    let t = Duration::from_secs(10);
    // One token for the pool; each agent enrolls with it (a key made by the agent itself).
    let token: api::EnrollmentTokenCreated = client
        .json(
            Method::POST,
            "/v1/enrollment-tokens",
            Some(&api::CreateEnrollmentToken {
                pool_id: POOL.into(),
                uses: Some(i64::from(opts.agents)),
                expires_in_seconds: Some(3600),
            }),
            t,
        )
        .await?;
    println!(
        "enrollment token {} for pool {POOL:?} ({} uses)",
        token.token_id, opts.agents
    );

    // Agents.
    for i in 1..=opts.agents {
        let id = format!("qs-agent-{i}");
        let adir = dir.join("agents").join(&id);
        crate::sys::fsutil::ensure_dir(&adir, 0o700).map_err(io("create", &adir))?;
        let acfg = adir.join("agent.toml");
        write(
            &acfg,
            &format!(
                "controller_url = \"https://{addr}\"\nmachine_id = \"{id}\"\nenrollment_token = \"{}\"\nstate_dir = {}\nsocket_path = {}\n\n[tls]\nca = {}\ncert = {}\nkey = {}\n\n[connection]\nretry_max_ms = 2000\n",
                token.token,
                toml_str(&adir.join("state")),
                toml_str(&adir.join("agent.sock")),
                toml_str(&pki.join("ca.pem")),
                toml_str(&adir.join("tls/agent.pem")),
                toml_str(&adir.join("tls/agent-key.pem")),
            ),
        )?;
        let log = adir.join("agent.log");
        let c = child::spawn_logged(
            &id,
            &opts.agent_bin,
            ["agent", "--config", &acfg.display().to_string()],
            &log,
        )
        .map_err(io("start", &opts.agent_bin))?;
        children.push((c, log));
    }

    let want = opts.agents as usize;
    let expected: Vec<String> = (1..=opts.agents).map(|i| format!("qs-agent-{i}")).collect();
    wait_for_async(
        &mut children,
        "every agent to connect",
        Duration::from_secs(30),
        dir,
        || async {
            let ms: Vec<api::Machine> = client
                .json::<(), _>(Method::GET, "/v1/machines", None, t)
                .await
                .ok()?;
            let online = ms
                .iter()
                .filter(|m| m.online && expected.contains(&m.machine_id))
                .count();
            (online >= want).then_some(())
        },
    )
    .await?;
    println!("{want} agents enrolled and connected in pool {POOL:?}");

    let script: api::ScriptCreated = client
        .json(
            Method::POST,
            "/v1/scripts",
            Some(&api::CreateScript {
                name: "hello".into(),
                command_type: "sh".into(),
                content: HELLO.into(),
            }),
            t,
        )
        .await?;
    let req = api::CreateScriptExecution {
        script_ids: Some(vec![script.script_id]),
        gray_count: Some(crate::proto::api::Amount::Count(1)),
        gray_fail_threshold: Some(1),
        execution_timeout_seconds: Some(60),
        ..Default::default()
    };
    let created: api::TaskCreated = client
        .json(
            Method::POST,
            &format!("/v1/pools/{POOL}/script-executions"),
            Some(&req),
            t,
        )
        .await?;
    println!(
        "submitted task {} (gray batch of 1, then the rest; halts if the gray machine fails)\n",
        created.task_id
    );
    let path = format!("/v1/tasks/{}", created.task_id);
    let task = wait_for_async(
        &mut children,
        "the task to finish",
        Duration::from_secs(180),
        dir,
        || async {
            let task: api::Task = client
                .json::<(), _>(Method::GET, &path, None, t)
                .await
                .ok()?;
            task.finished_at.is_some().then_some(task)
        },
    )
    .await?;
    print!("{}", table(&task));
    println!("\ntask {} {}", task.task_id, task.state);

    if opts.exit {
        stop_all(children).await;
        return Ok(Report { task });
    }
    // The operator CLI's settings for this quickstart's controller and operator.
    let ctl_toml = dir.join(CTL_CONFIG);
    write(
        &ctl_toml,
        &crate::config::ctl::render(
            &format!("https://{addr}"),
            &pki.join("ca.pem"),
            &op_cert,
            &pki.join("operators").join(format!("{OPERATOR}-key.pem")),
        ),
    )?;
    println!(
        "\nStill running; press Ctrl-C to stop. Paste this into a shell to use the operator CLI:\n\n{}\n\nor the raw API with curl:\n\n{}\n  op $URL/v1/machines\n\nand ask an agent what it is doing:\n\n  {agent} status --socket {sock}",
        ctl_usage(&ctl_toml, &opts.controller_bin.with_file_name("fieldhandctl")),
        operator_helper(&pki, &addr),
        agent = opts.agent_bin.display(),
        sock = dir.join("agents/qs-agent-1/agent.sock").display(),
    );
    shutdown.await;
    stop_all(children).await;
    Ok(Report { task })
}

/// The operator CLI's config file, in the quickstart's directory.
pub const CTL_CONFIG: &str = "ctl.toml";

/// Shell lines that point `fieldhandctl` at the quickstart (`FIELDHAND_CTL_CONFIG`, so
/// every later command in that shell uses it) and run two commands.
pub fn ctl_usage(ctl_toml: &Path, ctl_bin: &Path) -> String {
    format!(
        "  export {}='{}'\n  {ctl} machines ls\n  {ctl} run --pool {POOL} --command 'uname -sr' --wait",
        crate::config::ctl::CONFIG_ENV,
        ctl_toml.display(),
        ctl = ctl_bin.display(),
    )
}

/// Shell lines that define `URL` and `op` (curl with the operator's certificate), with
/// absolute paths so they work from any directory.
pub fn operator_helper(pki: &Path, addr: &str) -> String {
    let p = |f: &str| pki.join(f).display().to_string();
    format!(
        "  URL=https://{addr}\n  op() {{ curl -sS --cacert '{}' --cert '{}' --key '{}' \"$@\"; echo; }}",
        p("ca.pem"),
        p(&format!("operators/{OPERATOR}.pem")),
        p(&format!("operators/{OPERATOR}-key.pem")),
    )
}

async fn stop_all(children: Vec<(Child, PathBuf)>) {
    // Agents first, so none of them logs a lost controller on the way out.
    for (c, _) in children.into_iter().rev() {
        c.stop(Duration::from_secs(10)).await;
    }
}

fn check_children(children: &mut [(Child, PathBuf)]) -> Result<(), QuickstartError> {
    for (c, log) in children.iter_mut() {
        if let Some(status) = c.try_status() {
            return Err(QuickstartError::ChildDied {
                name: c.name().to_string(),
                status: status.to_string(),
                log: log.clone(),
            });
        }
    }
    Ok(())
}

async fn wait_for<T>(
    children: &mut [(Child, PathBuf)],
    what: &str,
    after: Duration,
    logs: &Path,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, QuickstartError> {
    wait_for_async(children, what, after, logs, || std::future::ready(probe())).await
}

async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    children: &mut [(Child, PathBuf)],
    what: &str,
    after: Duration,
    logs: &Path,
    mut probe: impl FnMut() -> F,
) -> Result<T, QuickstartError> {
    let deadline = tokio::time::Instant::now() + after;
    loop {
        check_children(children)?;
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(QuickstartError::Timeout {
                what: what.to_string(),
                after,
                logs: logs.to_path_buf(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The per-machine result table.
pub fn table(task: &api::Task) -> String {
    let mut out = format!(
        "{:<14} {:<5} {:<10} {:<4} {:<18} {}\n",
        "MACHINE", "BATCH", "STATE", "EXIT", "ERROR", "OUTPUT (first line)"
    );
    for m in &task.machines {
        let first = m.stdout.lines().next().unwrap_or("");
        out.push_str(&format!(
            "{:<14} {:<5} {:<10} {:<4} {:<18} {}\n",
            m.machine_id,
            m.batch,
            m.state,
            m.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            m.error_code.map_or("-", ErrorCode::as_str),
            first
        ));
    }
    out
}
