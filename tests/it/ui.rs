//! The rollout page in a real browser: Debian's chromium driven by playwright-core
//! (`tests/ui/rollout.spec.mjs`) through the loopback forwarder (`fieldhand-controller ui`),
//! against a real controller and real agents; and the page's size and load time at a task of
//! 10,000 machines (rows put in through the store). Skipped, saying why, where chromium or
//! `target/ui-test/node_modules` (`npm ci` from `tests/ui`, as `.ci/run` does) is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Where playwright-core is installed (`target/ui-test`), if chromium and node are there too.
fn browser() -> Option<PathBuf> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-test");
    let missing = if !Path::new(CHROMIUM).exists() {
        Some(format!("{CHROMIUM} (apt-get install chromium)"))
    } else if !base
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        Some(format!(
            "{}/node_modules/playwright-core (npm ci with tests/ui/package-lock.json)",
            base.display()
        ))
    } else if Command::new("node").arg("--version").output().is_err() {
        Some("node".into())
    } else {
        None
    };
    match missing {
        Some(what) => {
            eprintln!("skipped: the browser test needs {what}");
            None
        }
        None => Some(base),
    }
}

/// The loopback forwarder on a free port: the process and its one-time URL. `fieldhandctl ui`
/// (the operator's CLI, with its usual connection flags) or `fieldhand-controller ui`: both
/// run the same `uiproxy`.
struct Forwarder {
    child: Child,
    open_url: String,
    addr: String,
}

impl Forwarder {
    fn start(env: &Env, ctl: &Controller) -> Forwarder {
        Self::start_with(env, ctl, false)
    }

    fn start_with(env: &Env, ctl: &Controller, through_ctl: bool) -> Forwarder {
        let pki = &env.pki;
        let mut cmd = if through_ctl {
            let mut c = Command::new(env!("CARGO_BIN_EXE_fieldhandctl"));
            c.args(["--url", &ctl.url()]);
            c
        } else {
            let mut c = Command::new(CONTROLLER);
            c.args(["ui", "--listen", "127.0.0.1:0", "--url", &ctl.url()]);
            c
        };
        cmd.arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("operators/op.pem"))
            .arg("--key")
            .arg(pki.join("operators/op-key.pem"));
        if through_ctl {
            cmd.args(["ui", "--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the forwarder");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let open_url = loop {
            let line = lines
                .next()
                .expect("the forwarder printed its URL")
                .unwrap();
            if let Some(url) = line.strip_prefix("open ") {
                break url.to_string();
            }
        };
        let addr = open_url
            .strip_prefix("http://")
            .and_then(|r| r.split_once('/'))
            .map(|(a, _)| a.to_string())
            .expect("http://ADDR/open?token=...");
        Forwarder {
            child,
            open_url,
            addr,
        }
    }

    /// A raw HTTP/1.1 GET with the given Host and extra header lines: the status code.
    fn raw_get(&self, path: &str, host: &str, extra: &str) -> u16 {
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the spec in `mode` with `vars`; returns what it wrote to its result file.
fn spec(base: &Path, mode: &str, fwd: &Forwarder, vars: &[(&str, String)]) -> Value {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let profile = base.join(format!("profile-{run}"));
    let result = base.join(format!("result-{run}.json"));
    let mut cmd = Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/rollout.spec.mjs"))
        .env("UI_MODE", mode)
        .env("UI_NODE_BASE", base)
        .env("UI_OPEN_URL", &fwd.open_url)
        .env("UI_USER_DATA_DIR", &profile)
        .env("UI_RESULT", &result)
        .env("UI_CHROMIUM", CHROMIUM);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run node");
    let _ = std::fs::remove_dir_all(&profile);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser spec ({mode}) failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
    let text = std::fs::read_to_string(&result).expect("the spec's result file");
    let _ = std::fs::remove_file(&result);
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_rollout_page_follows_a_rollout_and_cancels_a_task_in_chromium() {
    let Some(base) = browser() else { return };
    let env = Env::new();
    let ctl = env.controller();
    let web = ["w1", "w2", "w3", "w4"];
    let _agents: Vec<Agent> = web
        .iter()
        .map(|id| env.agent(&ctl, id, "web"))
        .chain([env.agent(&ctl, "l1", "long")])
        .collect();
    let op = env.operator(&ctl);
    op.wait_online(&["w1", "w2", "w3", "w4", "l1"], Duration::from_secs(60));
    // Through the operator's CLI (`fieldhandctl ui`); the 10,000-machine test goes through
    // the controller binary's.
    let fwd = Forwarder::start_with(&env, &ctl, true);
    // The forwarder is no open door: without the cookie of its one-time URL, or under another
    // host name (a DNS-rebinding page), nothing is forwarded.
    assert_eq!(fwd.raw_get("/ui/", &fwd.addr, ""), 403);
    assert_eq!(
        fwd.raw_get("/open?token=guess", &fwd.addr, ""),
        403,
        "a wrong token lets no one in"
    );
    let token = fwd.open_url.rsplit_once("token=").unwrap().1.to_string();
    let cookie = format!("Cookie: fieldhand_ui={token}\r\n");
    assert_eq!(fwd.raw_get("/ui/", &fwd.addr, &cookie), 200);
    assert_eq!(fwd.raw_get("/ui/", "rebound.example:80", &cookie), 421);
    assert_eq!(
        fwd.raw_get(
            "/v1/machines",
            &fwd.addr,
            &format!("{cookie}Origin: http://evil.example\r\n")
        ),
        403
    );
    let screenshot = std::env::var("FIELDHAND_UI_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| base.join("ui-task.png"));
    let r = spec(
        &base,
        "rollout",
        &fwd,
        &[
            ("UI_POOL", "web".into()),
            ("UI_POOL_LONG", "long".into()),
            ("UI_SCREENSHOT", screenshot.display().to_string()),
        ],
    );
    // What the page showed is what the controller recorded.
    let first = op.task(r["rollout_task"].as_str().unwrap());
    assert_eq!(first["state"], "SUCCEEDED", "{first}");
    assert_eq!(machine_ids(&first).len(), 4);
    let seen: Vec<&str> = r["rollout_states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        seen.contains(&"RUNNING") && seen.last() == Some(&"SUCCEEDED"),
        "{seen:?}"
    );
    let second = op.task(r["cancel_task"].as_str().unwrap());
    assert_eq!(second["state"], "CANCELLED", "{second}");
    let seen: Vec<&str> = r["cancel_states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let at = |s: &str| seen.iter().position(|v| *v == s);
    assert!(
        at("CANCELLING").is_some() && at("CANCELLING") < at("CANCELLED"),
        "the page showed CANCELLING, then CANCELLED: {seen:?}"
    );
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "a screenshot of the task view"
    );
}

#[test]
fn the_rollout_page_shows_a_task_of_10000_machines() {
    let Some(base) = browser() else { return };
    let env = Env::new();
    let dir = env.path().join("controller");
    std::fs::create_dir_all(&dir).unwrap();
    // The rows go in through the store before the controller starts (10,000 agents would be
    // 10,000 certificates and processes): a task whose gray batch succeeded and whose second
    // batch is under way.
    let (db, extra) = match postgres_url_for_new_database() {
        Some(url) => (
            fieldhand::controller::store::Database::Postgres(url.clone()),
            format!(
                "database_url = \"{url}\"\nblob_dir = \"{}\"\n",
                dir.join("blobs").display()
            ),
        ),
        None => (
            fieldhand::controller::store::Database::Sqlite(dir.join("fieldhand.db")),
            String::new(),
        ),
    };
    let task_id = uuid::Uuid::new_v4().to_string();
    fill_task(&db, &task_id, 10_000);
    let ctl = Controller::start_in(&env, "controller", "127.0.0.1:0", &extra);
    let fwd = Forwarder::start(&env, &ctl);
    let r = spec(&base, "measure", &fwd, &[("UI_TASK", task_id.clone())]);
    let page_bytes = fieldhand::controller::ui::size() as u64;
    assert_eq!(
        r["asset_bytes"].as_u64(),
        Some(page_bytes),
        "the browser loaded exactly the three files: {r}"
    );
    assert_eq!(r["rows"], 100, "one page of rows: {r}");
    assert_eq!(r["second_page"], "rows 101–200 of 10000", "{r}");
    eprintln!("rollout page at 10,000 machines: {page_bytes} bytes (HTML+JS+CSS); {r}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-test/measure-10k.json");
    let _ = std::fs::write(out, serde_json::to_string_pretty(&r).unwrap());
}

/// A task of `n` machines in two batches: the gray batch (1%) succeeded; of the rest, 60%
/// succeeded, 0.5% failed, 5% run and the others wait.
fn fill_task(db: &fieldhand::controller::store::Database, task_id: &str, n: usize) {
    use fieldhand::controller::store::{Outcome, Store, StoreError, TaskRow};
    use fieldhand::proto::domain::{ErrorCode, MachineState, TaskKind, TaskState};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Store::open(db).unwrap();
    let task_id = task_id.to_string();
    rt.block_on(store.tx(move |tx| {
        let gray = n / 100;
        let machines: Vec<(String, String, u32)> = (0..n)
            .map(|i| {
                (
                    format!("sim-{i:05}"),
                    format!("{task_id}-{i}"),
                    u32::from(i >= gray),
                )
            })
            .collect();
        tx.insert_task(
            &TaskRow {
                task_id: task_id.clone(),
                kind: TaskKind::ScriptExecution,
                pool_id: "sim".into(),
                state: TaskState::Running,
                created_ms: 1_770_000_000_000,
                finished_ms: None,
                gray_fail_threshold: Some(1),
                timeout_seconds: 3600,
                scripts_json: "[]".into(),
                power_json: None,
                created_by: None,
                cancelled_by: None,
                rollout: Default::default(),
            },
            &machines,
        )?;
        for (i, (_, assignment, _)) in machines.iter().enumerate() {
            let rest = i.saturating_sub(gray) * 1000 / (n - gray);
            let (state, exit, code) = match (i < gray, rest) {
                (true, _) | (false, 0..=599) => (MachineState::Succeeded, Some(0), None),
                (false, 600..=604) => (MachineState::Failed, Some(1), Some(ErrorCode::NonZeroExit)),
                (false, 605..=654) => {
                    tx.mark_running(assignment, "2026-02-02T02:40:00Z", 1_770_000_000_000)?;
                    continue;
                }
                (false, _) => continue,
            };
            tx.set_final(
                assignment,
                state,
                &Outcome {
                    exit_code: exit,
                    stdout: format!(
                        "updated sim-{i:05}\npackages: 12 upgraded\nreboot: not needed\nmore\n"
                    ),
                    error_code: code,
                    ..Outcome::default()
                },
            )?;
        }
        Ok::<_, StoreError>(())
    }))
    .unwrap();
}

/// `pki issue --operator NAME --p12`: a PKCS#12 file a browser imports, readable with the
/// password printed once, holding the operator's key, its certificate and the root CA.
#[test]
fn an_operator_certificate_is_exported_as_pkcs12_for_a_browser() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let pki = env.pki.to_str().unwrap();
    let out = run(
        CONTROLLER,
        &["pki", "issue", "--dir", pki, "--operator", "alice", "--p12"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let password = stdout
        .lines()
        .find_map(|l| l.split_once("stored nowhere): ").map(|(_, p)| p.trim()))
        .expect("the password is printed");
    let path = env.pki.join("operators/alice.p12");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let der = std::fs::read(&path).unwrap();
    assert!(
        p12_keystore::KeyStore::from_pkcs12(&der, "wrong", Default::default()).is_err(),
        "another password opens nothing"
    );
    let store = p12_keystore::KeyStore::from_pkcs12(
        &der,
        password,
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .unwrap();
    let (_, chain) = store.private_key_chain().expect("a key with its chain");
    let pem_der = |p: &str| {
        fieldhand::tls::load_certs(&env.pki.join(p)).unwrap()[0]
            .as_ref()
            .to_vec()
    };
    let certs: Vec<Vec<u8>> = chain.certs().iter().map(|c| c.as_der().to_vec()).collect();
    assert_eq!(
        certs,
        vec![pem_der("operators/alice.pem"), pem_der("ca.pem")]
    );
    let key = fieldhand::tls::load_key(&env.pki.join("operators/alice-key.pem")).unwrap();
    assert_eq!(chain.key().as_der(), key.secret_der());
    // The same certificate works as an operator's (what the browser will present).
    let ctl = env.controller();
    let (s, _) = env
        .client(
            &ctl,
            Some(("operators/alice.pem", "operators/alice-key.pem")),
        )
        .get("/ui/app.js");
    assert_eq!(s, 200);
    // The page is the operator API's: not an agent's, not a client's without a certificate.
    let (s, _) = env.agent_client(&ctl, "m2").get("/ui/");
    assert_eq!(s, 403);
    let (s, _) = env.client(&ctl, None).get("/ui/");
    assert_eq!(s, 401);
    // --p12 is for operators only, and never overwrites.
    let again = run(
        CONTROLLER,
        &["pki", "issue", "--dir", pki, "--agent", "m1", "--p12"],
    );
    assert!(!again.status.success());
}
