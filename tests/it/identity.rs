//! Fleet identity end to end: enrollment with tokens, pools decided by the controller only,
//! one live agent per identity (a lock per state dir, conflicts between clones), sealing a
//! golden image, renewal, decommission and revocation.

use std::path::Path;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use crate::support::{machine_ids, machine_of, run, wait_until, Agent, Certs, Env, AGENT};

const T: Duration = Duration::from_secs(60);

fn machine(op: &crate::support::Client<'_>, id: &str) -> Value {
    let (s, v) = op.get(&format!("/v1/machines/{id}"));
    assert_eq!(s, 200, "{v}");
    v
}

/// A script that appends `<task> <work dir>` to `log`: which agent ran which task.
fn tally(log: &Path) -> String {
    format!("echo \"$FIELDHAND_TASK_ID $(pwd)\" >> {}\n", log.display())
}

/// A directory holding a copy of the hand-issued certificate and key of `id` (as a cloned
/// disk would), for an agent started with [`Certs::Enrolled`].
fn copied_identity(env: &Env, id: &str, dir: &str) -> std::path::PathBuf {
    let d = env.path().join(dir);
    std::fs::create_dir_all(d.join("tls")).unwrap();
    std::fs::copy(
        env.pki.join(format!("agents/{id}.pem")),
        d.join("tls/agent.pem"),
    )
    .unwrap();
    std::fs::copy(
        env.pki.join(format!("agents/{id}-key.pem")),
        d.join("tls/agent-key.pem"),
    )
    .unwrap();
    d
}

fn runs_of(log: &Path, task: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(task))
        .map(str::to_string)
        .collect()
}

#[test]
fn an_agent_with_only_a_token_enrolls_into_the_tokens_pool_and_works() {
    let env = Env::new();
    // SQLite on either half of the suite: the test reads the database file's bytes.
    let ctl = env.controller_with("database_url = \"sqlite://fieldhand.db\"");
    let op = env.operator(&ctl);
    let (s, created) = op.post(
        "/v1/enrollment-tokens",
        json!({"pool_id": "vdi", "uses": 2, "expires_in_seconds": 3600}),
    );
    assert_eq!(s, 200, "{created}");
    assert_eq!(created["uses_left"], 2);
    let token = created["token"].as_str().unwrap().to_string();
    let started = Instant::now();
    let agent = env.enrolling_agent(&ctl, "desk-1", &token, "");
    op.wait_online(&["desk-1"], T);
    let task = op.execute(
        "vdi",
        json!({"command_content": "echo hi from $FIELDHAND_MACHINE_ID", "command_type": "sh"}),
    );
    let t = op.wait_task(&task, T);
    println!(
        "first start with a token to first completed assignment: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    assert!(machine_of(&t, "desk-1")["stdout"]
        .as_str()
        .unwrap()
        .contains("hi from desk-1"));
    let m = machine(&op, "desk-1");
    assert_eq!(m["pool_id"], "vdi");
    let serial = m["certificate_serial"].as_str().unwrap();
    let st = agent.status();
    assert_eq!(st["identity"]["phase"], "enrolled", "{st:#}");
    assert_eq!(st["identity"]["certificate_serial"], serial);
    assert_eq!(st["link"], "connected");
    // The key was made on the machine, 0600, and never sent: only the certificate came back.
    use std::os::unix::fs::PermissionsExt;
    let key = agent.dir.join("tls/agent-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Listing never shows the secret; one use is gone.
    let (_, list) = op.get("/v1/enrollment-tokens");
    let row = &list.as_array().unwrap()[0];
    assert_eq!(row["uses_left"], 1);
    assert!(row.get("token").is_none() && !list.to_string().contains(&token));
    // The database holds only a hash of the secret.
    let secret = token.split_once('.').unwrap().1;
    let db = std::fs::read(ctl.dir.join("fieldhand.db")).unwrap();
    let wal = std::fs::read(ctl.dir.join("fieldhand.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the token's secret is stored in the clear"
        );
    }
}

#[test]
fn bad_used_up_expired_and_taken_enrollments_are_refused_with_clear_codes() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let anon = env.client(&ctl, None);
    let csr = || fieldhand::pki::new_key_and_csr().unwrap().1;
    let enroll = |token: &str, id: &str| {
        anon.post(
            "/agent/v1/enroll",
            json!({"token": token, "machine_id": id, "csr_pem": csr()}),
        )
    };
    let once = env.token(&ctl, json!({"pool_id": "p", "uses": 1}));
    let (s, v) = enroll(&once, "m1");
    assert_eq!(s, 200, "{v}");
    assert!(v["certificate_pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let code = |r: (u16, Value)| (r.0, r.1["error_code"].as_str().unwrap_or("").to_string());
    assert_eq!(code(enroll(&once, "m2")), (403, "TOKEN_USED_UP".into()));
    let (id, _) = once.split_once('.').unwrap();
    assert_eq!(
        code(enroll(&format!("{id}.wrong"), "m2")),
        (401, "INVALID_TOKEN".into())
    );
    assert_eq!(code(enroll("garbage", "m2")), (401, "INVALID_TOKEN".into()));
    let short = env.token(&ctl, json!({"pool_id": "p", "expires_in_seconds": 1}));
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(code(enroll(&short, "m2")), (403, "TOKEN_EXPIRED".into()));
    let many = env.token(&ctl, json!({"pool_id": "p"}));
    let (s, v) = enroll(&many, "m1");
    assert_eq!(
        (s, v["error_code"].as_str()),
        (409, Some("MACHINE_ID_TAKEN")),
        "{v}"
    );
    assert!(v["error_msg"].as_str().unwrap().contains("m1"), "{v}");
    let (s, v) = anon.post(
        "/agent/v1/enroll",
        json!({"token": many, "machine_id": "m3", "csr_pem": "not a csr"}),
    );
    assert_eq!(
        (s, v["error_code"].as_str()),
        (400, Some("INVALID_PARAMETER")),
        "{v}"
    );
    // A deleted token stops working.
    let (s, _) = op.call(
        Method::DELETE,
        &format!("/v1/enrollment-tokens/{}", many.split_once('.').unwrap().0),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(code(enroll(&many, "m4")), (401, "INVALID_TOKEN".into()));
    // Bad token requests name the field.
    let (s, v) = op.post("/v1/enrollment-tokens", json!({"pool_id": "p", "uses": 0}));
    assert_eq!(s, 400);
    assert!(v["error_msg"].as_str().unwrap().contains("uses"), "{v}");

    // An agent with a used-up token keeps retrying and says why.
    let agent = env.enrolling_agent(&ctl, "m9", &once, "");
    let st = wait_until("the refusal in status", T, || {
        let st = agent.status();
        st["identity"]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("TOKEN_USED_UP"))
            .then_some(st)
    });
    assert_eq!(st["identity"]["phase"], "enrolling", "{st:#}");
    assert!(agent.log().contains("TOKEN_USED_UP"));
}

#[test]
fn a_machine_never_chooses_its_pool_or_receives_another_pools_work() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let log = env.path().join("ran.log");
    let token = env.token(&ctl, json!({"pool_id": "own"}));
    // An old config still naming a pool: a warning, never applied.
    let liar = env.enrolling_agent(&ctl, "liar", &token, "pool_id = \"other\"\n");
    let _other = env.agent(&ctl, "o1", "other");
    op.wait_online(&["liar", "o1"], T);
    assert!(liar.log().contains("`pool_id`"), "{}", liar.log());
    assert_eq!(machine(&op, "liar")["pool_id"], "own");
    // A raw heartbeat claiming a pool, a host name and a GPU: facts shown as reported, pool kept.
    let raw = fieldhand::tls::client_config(
        &env.pki.join("ca.pem"),
        &liar.dir.join("tls/agent.pem"),
        &liar.dir.join("tls/agent-key.pem"),
    )
    .unwrap();
    let raw = env.client_with(&ctl, raw);
    let facts = json!({"hostname": "fake", "os": "x", "kernel": "x", "cpu_count": 1,
        "memory_total_bytes": 1, "memory_available_bytes": 1, "disk_free_bytes": 1,
        "uptime_seconds": 1, "agent_version": "0", "gpu": true});
    let (s, v) = raw.post(
        "/agent/v1/heartbeat",
        json!({"pool_id": "other", "agent_version": "0", "facts": facts}),
    );
    assert_eq!(s, 204, "{v}");
    let m = machine(&op, "liar");
    assert_eq!(m["pool_id"], "own");
    assert_eq!(m["facts"]["hostname"], "fake");
    let task = op.execute(
        "other",
        json!({"command_content": tally(&log), "command_type": "sh"}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    assert_eq!(machine_ids(&t), ["o1"], "{t:#}");
    assert_eq!(runs_of(&log, &task).len(), 1);
    // An operator moves it; then, and only then, it gets that pool's work.
    let (s, v) = op.put("/v1/machines/liar/pool", json!({"pool_id": "other"}));
    assert_eq!((s, v["pool_id"].as_str()), (200, Some("other")), "{v}");
    let task = op.execute(
        "other",
        json!({"command_content": tally(&log), "command_type": "sh"}),
    );
    assert_eq!(op.wait_task(&task, T)["state"], "SUCCEEDED");
    assert_eq!(runs_of(&log, &task).len(), 2);
    // A hand-issued certificate without --pool puts its machine in no pool.
    let _nopool = {
        env.issue_agent("np1");
        Agent::start_in(
            &env,
            &ctl.url(),
            "np1",
            &env.path().join("agents/np1"),
            Certs::Issued,
            "",
        )
    };
    op.wait_online(&["np1"], T);
    assert_eq!(machine(&op, "np1")["pool_id"], Value::Null);
}

#[test]
fn a_second_agent_on_one_state_dir_exits_75_and_touches_nothing() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let first = env.agent(&ctl, "m1", "p");
    op.wait_online(&["m1"], T);
    let sock_before = std::fs::metadata(&first.socket).unwrap();
    let out = run(
        AGENT,
        &["agent", "--config", first.config.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let state = first.dir.join("state");
    assert!(err.contains(&state.display().to_string()), "{err}");
    let pid = std::fs::read_to_string(state.join("agent.lock")).unwrap();
    assert!(err.contains(&format!("pid {}", pid.trim())), "{err}");
    // The first one's socket is the same file and still answers; work still runs once.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&first.socket).unwrap().ino(),
        sock_before.ino()
    );
    assert_eq!(first.status()["machine_id"], "m1");
    let log = env.path().join("ran.log");
    let task = op.execute(
        "p",
        json!({"command_content": tally(&log), "command_type": "sh"}),
    );
    assert_eq!(op.wait_task(&task, T)["state"], "SUCCEEDED");
    assert_eq!(runs_of(&log, &task).len(), 1);
}

#[test]
fn one_certificate_in_two_state_dirs_never_runs_an_assignment_twice() {
    let env = Env::new();
    let ctl = env.controller_with("identity_conflict_quiet_seconds = 3");
    let op = env.operator(&ctl);
    let log = env.path().join("ran.log");
    let original = env.agent(&ctl, "dup", "p");
    op.wait_online(&["dup"], T);
    let first = op.execute(
        "p",
        json!({"command_content": tally(&log), "command_type": "sh"}),
    );
    assert_eq!(op.wait_task(&first, T)["state"], "SUCCEEDED");
    // A clone: the same certificate and key from another state dir, with a token and its own
    // machine id (what a cloned desktop with the agent in its image has).
    let token = env.token(&ctl, json!({"pool_id": "clones"}));
    let clone_dir = copied_identity(&env, "dup", "clone");
    let clone = Agent::start_in(
        &env,
        &ctl.url(),
        "dup",
        &clone_dir,
        Certs::Enrolled,
        &format!("machine_id = \"clone-7\"\nenrollment_token = \"{token}\"\n"),
    );
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(op.execute(
            "p",
            json!({"command_content": tally(&log), "command_type": "sh"}),
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until("the conflict to show", T, || {
        (machine(&op, "dup")["identity_conflict"] == true).then_some(())
    });
    let noticed = ctl.log().matches("identity conflict").count();
    assert_eq!(noticed, 1, "logged once");
    // The clone re-enrolls as itself, into the token's pool.
    wait_until("the clone to re-enroll", T, || {
        let (s, v) = op.get("/v1/machines/clone-7");
        (s == 200 && v["pool_id"] == "clones").then_some(())
    });
    assert!(clone.log().contains("re-enrolling"), "{}", clone.log());
    // Every task ends, each assignment ran exactly once, and the conflict clears.
    for t in &tasks {
        let done = op.wait_task(t, T);
        assert_eq!(done["state"], "SUCCEEDED", "{done:#}");
        let runs = runs_of(&log, t);
        assert_eq!(runs.len(), 1, "task {t} ran {runs:?}");
    }
    wait_until("the conflict to clear", T, || {
        (machine(&op, "dup")["identity_conflict"] == false).then_some(())
    });
    let st = original.status();
    assert_eq!(st["machine_id"], "dup", "{st:#}");
    let after = op.execute(
        "p",
        json!({"command_content": tally(&log), "command_type": "sh"}),
    );
    assert_eq!(op.wait_task(&after, T)["state"], "SUCCEEDED");
    let runs = runs_of(&log, &after);
    assert_eq!(runs.len(), 1);
    assert!(runs[0].contains(original.dir.to_str().unwrap()), "{runs:?}");
}

#[test]
fn a_clone_without_a_token_stops_asking_for_work_and_says_why() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let _original = env.agent(&ctl, "dup", "p");
    op.wait_online(&["dup"], T);
    let dir = copied_identity(&env, "dup", "clone");
    let clone = Agent::start_in(&env, &ctl.url(), "dup", &dir, Certs::Enrolled, "");
    let log = env.path().join("ran.log");
    let task = op.execute(
        "p",
        json!({"command_content": tally(&log), "command_type": "sh"}),
    );
    wait_until("a side to report the conflict", T, || {
        let st = clone.status();
        (st["identity"]["phase"] == "conflict").then_some(())
    });
    assert!(clone.status()["identity"]["problem"]
        .as_str()
        .unwrap()
        .contains("IDENTITY_CONFLICT"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(runs_of(&log, &task).len() <= 1, "ran twice");
}

#[test]
fn seal_removes_the_identity_so_the_image_enrolls_fresh() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let token = env.token(&ctl, json!({"pool_id": "golden"}));
    let mut golden = env.enrolling_agent(&ctl, "golden", &token, "");
    op.wait_online(&["golden"], T);
    let cert = golden.cert.clone();
    let instance = std::fs::read_to_string(golden.dir.join("state/instance-id")).unwrap();
    // Refused while the agent runs; nothing is removed.
    let out = run(
        AGENT,
        &["seal", "--config", golden.config.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(cert.exists());
    golden.kill();
    let out = run(
        AGENT,
        &["seal", "--config", golden.config.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    for gone in [
        cert.clone(),
        golden.dir.join("tls/agent-key.pem"),
        golden.dir.join("state/instance-id"),
        golden.dir.join("state/state.json"),
    ] {
        assert!(!gone.exists(), "{} survived seal", gone.display());
    }
    // The clone booted from the image: a new machine id (its host name), a fresh enrollment.
    // The golden machine itself leaves the fleet; its clones join it.
    let (s, v) = op.call(Method::DELETE, "/v1/machines/golden", None);
    assert_eq!(s, 200, "{v}");
    let text = std::fs::read_to_string(&golden.config).unwrap();
    std::fs::write(
        &golden.config,
        text.replace("machine_id = \"golden\"", "machine_id = \"clone-1\""),
    )
    .unwrap();
    golden.start_again();
    op.wait_online(&["clone-1"], T);
    assert_ne!(
        std::fs::read_to_string(golden.dir.join("state/instance-id")).unwrap(),
        instance
    );
    assert_eq!(machine(&op, "clone-1")["pool_id"], "golden");
    let task = op.execute(
        "golden",
        json!({"command_content": "true", "command_type": "sh", "gray_desktop_ids": ["clone-1"]}),
    );
    assert_eq!(op.wait_task(&task, T)["state"], "SUCCEEDED");
}

#[test]
fn certificates_renew_by_themselves_while_tasks_keep_running() {
    let env = Env::new();
    let ctl = env.controller_with("agent_cert_validity_seconds = 6");
    let op = env.operator(&ctl);
    let token = env.token(&ctl, json!({"pool_id": "p"}));
    let agent = env.enrolling_agent(&ctl, "r1", &token, "");
    op.wait_online(&["r1"], T);
    let mut serials = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(16) {
        let task = op.execute(
            "p",
            json!({"command_content": "sleep 0.5; echo ok", "command_type": "sh"}),
        );
        let t = op.wait_task(&task, T);
        assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
        serials.insert(agent.status()["identity"]["certificate_serial"].to_string());
    }
    assert!(
        serials.len() >= 3,
        "renewed only {} times: {serials:?}",
        serials.len() - 1
    );
    let m = machine(&op, "r1");
    assert!(
        serials.contains(&m["certificate_serial"].to_string()),
        "{m:#}"
    );
    assert!(agent.log().contains("certificate renewed"));
    // A hand-issued certificate renews the same way: a new key, the same identity.
    let hand = env.agent_client(&ctl, "h1");
    let (key, csr) = fieldhand::pki::new_key_and_csr().unwrap();
    let (s, v) = hand.post("/agent/v1/renew", json!({"csr_pem": csr}));
    assert_eq!(s, 200, "{v}");
    let dir = env.path().join("renewed");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), v["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join("k.pem"), key).unwrap();
    let info = fieldhand::tls::cert_info_of_file(&dir.join("c.pem")).unwrap();
    assert_eq!(info.identity, Some(fieldhand::pki::Identity::agent("h1")));
    let renewed = fieldhand::tls::client_config(
        &env.pki.join("ca.pem"),
        &dir.join("c.pem"),
        &dir.join("k.pem"),
    )
    .unwrap();
    let renewed = env.client_with(&ctl, renewed);
    let (s, v) = renewed.post(
        "/agent/v1/poll",
        json!({"agent_version": "x", "wait_ms": 0}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        machine(&op, "h1")["certificate_serial"],
        info.serial.as_str()
    );
}

#[test]
fn decommission_and_revocation_hold_on_every_route_and_survive_a_restart() {
    let env = Env::new();
    let mut ctl = env.controller();
    let op = env.operator(&ctl);
    let m1 = env.agent(&ctl, "m1", "p");
    let _m2 = env.agent(&ctl, "m2", "p");
    op.wait_online(&["m1", "m2"], T);
    let serial = machine(&op, "m1")["certificate_serial"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        machine(&op, "m1")["certificate_not_after"]
            .as_str()
            .map(|s| s.len() > 10),
        Some(true)
    );
    // A queued assignment: m1 busy with a long script, a second task waits behind it.
    let long = op.execute(
        "p",
        json!({"command_content": "sleep 30", "command_type": "sh", "gray_desktop_ids": ["m1"]}),
    );
    op.wait_machine_state(&long, "m1", "RUNNING", T);
    let raw = env.agent_client(&ctl, "m1");
    let (s, v) = op.call(Method::DELETE, "/v1/machines/m1", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["revoked_serial"], serial.as_str());
    // Every route refuses the certificate at once.
    let forbidden = |r: (u16, Value)| (r.0, r.1["error_code"].as_str().unwrap_or("").to_string());
    for (m, path, body) in [
        (
            Method::POST,
            "/agent/v1/poll",
            Some(json!({"agent_version": "x", "wait_ms": 0})),
        ),
        (Method::POST, "/agent/v1/heartbeat", Some(json!({}))),
        (
            Method::POST,
            "/agent/v1/events",
            Some(json!({"events": []})),
        ),
        (Method::GET, "/agent/v1/assignments/x", None),
        (
            Method::GET,
            &format!("/agent/v1/blobs/{}", "0".repeat(64)),
            None,
        ),
        (
            Method::POST,
            "/agent/v1/renew",
            Some(json!({"csr_pem": "x"})),
        ),
    ] {
        assert_eq!(
            forbidden(raw.call(m, path, body)),
            (403, "CERT_REVOKED".into()),
            "{path}"
        );
    }
    let t = op.wait_task(&long, T);
    assert_eq!(machine_of(&t, "m1")["state"], "CANCELLED", "{t:#}");
    assert_eq!(machine_of(&t, "m1")["error_code"], "MACHINE_DECOMMISSIONED");
    // Out of the pool, kept in history.
    let (_, list) = op.get("/v1/machines");
    assert!(!list.to_string().contains("\"m1\""), "{list}");
    let (s, _) = op.get(&format!("/v1/tasks/{long}"));
    assert_eq!(s, 200);
    let next = op.execute(
        "p",
        json!({"command_content": "true", "command_type": "sh"}),
    );
    let t = op.wait_task(&next, T);
    assert_eq!(machine_ids(&t), ["m2"], "{t:#}");
    let st = wait_until("the agent to see it", T, || {
        let st = m1.status();
        (st["identity"]["phase"] == "revoked").then_some(st)
    });
    assert!(
        st["identity"]["problem"]
            .as_str()
            .unwrap()
            .contains("CERT_REVOKED"),
        "{st:#}"
    );

    // Revocation by serial, for operators too.
    env.issue_agent("spare");
    let (s, _) = op.post("/v1/revocations", json!({"serial": "zz"}));
    assert_eq!(s, 400);
    let out = run(
        crate::support::CONTROLLER,
        &[
            "pki",
            "issue",
            "--dir",
            env.pki.to_str().unwrap(),
            "--operator",
            "op2",
        ],
    );
    assert!(out.status.success());
    let op2 = env.client(&ctl, Some(("operators/op2.pem", "operators/op2-key.pem")));
    let op2_serial = fieldhand::tls::cert_info_of_file(&env.pki.join("operators/op2.pem"))
        .unwrap()
        .serial;
    assert_eq!(op2.get("/v1/machines").0, 200);
    let (s, v) = op.post(
        "/v1/revocations",
        json!({"serial": op2_serial.to_uppercase()}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        forbidden(op2.get("/v1/machines")),
        (403, "CERT_REVOKED".into())
    );
    // A restart keeps every revocation.
    ctl.restart();
    let op = env.operator(&ctl);
    let op2 = env.client(&ctl, Some(("operators/op2.pem", "operators/op2-key.pem")));
    let raw = env.agent_client(&ctl, "m1");
    assert_eq!(
        forbidden(op2.get("/v1/machines")),
        (403, "CERT_REVOKED".into())
    );
    assert_eq!(
        forbidden(raw.post(
            "/agent/v1/poll",
            json!({"agent_version": "x", "wait_ms": 0})
        )),
        (403, "CERT_REVOKED".into())
    );
    let (_, list) = op.get("/v1/revocations");
    let serials: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["serial"].as_str().unwrap().to_string())
        .collect();
    assert!(
        serials.contains(&serial) && serials.contains(&op2_serial),
        "{list}"
    );
    // A decommissioned machine comes back only by enrolling again.
    let token = env.token(&ctl, json!({"pool_id": "p"}));
    let anon = env.client(&ctl, None);
    let csr = fieldhand::pki::new_key_and_csr().unwrap().1;
    let (s, v) = anon.post(
        "/agent/v1/enroll",
        json!({"token": token, "machine_id": "m1", "csr_pem": csr}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(machine(&op, "m1")["pool_id"], "p");
}

#[test]
fn status_says_connecting_then_shows_expiry_and_the_last_error() {
    let env = Env::new();
    // A controller that takes the connection and has not answered yet (a first long poll):
    // "connecting", not "NOT connected; last contact never".
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("https://{}", hole.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hole.incoming().flatten() {
            held.push(c);
        }
    });
    env.issue_agent_in("c1", Some("p"));
    let c1 = Agent::start_in(
        &env,
        &hole_url,
        "c1",
        &env.path().join("agents/c1"),
        Certs::Issued,
        "",
    );
    std::thread::sleep(Duration::from_millis(500));
    let st = c1.status();
    assert_eq!(st["link"], "connecting", "{st:#}");
    let text =
        String::from_utf8(run(AGENT, &["status", "--socket", c1.socket.to_str().unwrap()]).stdout)
            .unwrap();
    assert!(
        text.contains("(connecting)") && !text.contains("never"),
        "{text}"
    );

    let mut ctl = env.controller();
    let op = env.operator(&ctl);
    let token = env.token(&ctl, json!({"pool_id": "p"}));
    let a = env.enrolling_agent(&ctl, "s1", &token, "");
    op.wait_online(&["s1"], T);
    let st = a.status();
    let not_after = st["identity"]["certificate_not_after"]
        .as_str()
        .unwrap()
        .to_string();
    let text =
        String::from_utf8(run(AGENT, &["status", "--socket", a.socket.to_str().unwrap()]).stdout)
            .unwrap();
    assert!(text.contains(&format!("expires {not_after}")), "{text}");
    ctl.kill();
    let st = wait_until("the lost controller", T, || {
        let st = a.status();
        (st["link"] == "unreachable").then_some(st)
    });
    assert!(
        st["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{st:#}"
    );
    let text =
        String::from_utf8(run(AGENT, &["status", "--socket", a.socket.to_str().unwrap()]).stdout)
            .unwrap();
    assert!(text.contains("last error:"), "{text}");
    ctl.restart();
    wait_until("the link back", T, || {
        (a.status()["link"] == "connected").then_some(())
    });
}

#[test]
fn an_expired_certificate_is_reported_at_start_with_its_date() {
    let env = Env::new();
    // 5 s: long enough that a loaded machine (the PostgreSQL half runs every test at once)
    // enrolls and is seen online before the first certificate runs out.
    let ctl = env.controller_with("agent_cert_validity_seconds = 5");
    let op = env.operator(&ctl);
    let token = env.token(&ctl, json!({"pool_id": "p"}));
    let mut a = env.enrolling_agent(&ctl, "e1", &token, "");
    op.wait_online(&["e1"], T);
    a.kill();
    // Let the certificate run out while the agent is down (any it had, renewed or not, was
    // signed before the kill); without a token it cannot fix it.
    std::thread::sleep(Duration::from_secs(6));
    let text = std::fs::read_to_string(&a.config).unwrap();
    let no_token: String = text
        .lines()
        .filter(|l| !l.starts_with("enrollment_token"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&a.config, no_token).unwrap();
    a.start_again();
    let st = wait_until("the expiry in status", T, || {
        let st = a.status();
        (st["identity"]["phase"] == "certificate_invalid").then_some(st)
    });
    let why = st["identity"]["problem"].as_str().unwrap();
    assert!(why.contains("expired at 20"), "{why}");
    assert!(a.log().contains("expired at"), "{}", a.log());
}
