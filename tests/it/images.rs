//! Image pushes (seeds 000 and 001) with real agents: staging, the scheduled apply with a
//! reboot (the fake reboot of `support::machine`), health-gated commit and rollback, cancel,
//! reschedule, selective and stop-on-first-error pushes, and the provisioning status.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    machine, machine_of, machine_with, one_machine, wait_until, Client, Env, Machine, Reboot,
};

const T: Duration = Duration::from_secs(60);

/// An image tar.gz: `fieldhand/activate` and `fieldhand/health-check` append a line to
/// `log` (`<machine> <hook> <image name>`), the health check exits `health_exit`, and
/// `padding` bytes of noise make the download take a while when throttled.
fn image_targz(name: &str, log: &std::path::Path, health_exit: i32, padding: usize) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    let activate = format!(
        "#!/bin/sh\necho \"$FIELDHAND_MACHINE_ID activate {name}\" >> {log}\nenv | grep ^FIELDHAND_ | sort > \"$FIELDHAND_IMAGE_ROOT/../activate-{name}.env\"\necho \"LANG=$LANG\" >> \"$FIELDHAND_IMAGE_ROOT/../activate-{name}.env\"\nif [ -d \"$FIELDHAND_DATA_DIR\" ]; then touch \"$FIELDHAND_DATA_DIR/written-by-{name}\"; fi\necho activated {name}\n",
        log = log.display()
    );
    let health = format!(
        "#!/bin/sh\necho \"$FIELDHAND_MACHINE_ID health {name}\" >> {log}\necho checked {name}\nexit {health_exit}\n",
        log = log.display()
    );
    let noise: Vec<u8> = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ name.len() as u64;
        (0..padding)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let files: [(&str, &[u8], u32); 4] = [
        ("fieldhand/activate", activate.as_bytes(), 0o755),
        ("fieldhand/health-check", health.as_bytes(), 0o755),
        ("etc/image-name", name.as_bytes(), 0o644),
        ("var/noise", &noise, 0o644),
    ];
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Registered test images whose hooks log to one file.
pub struct Fleet {
    log: PathBuf,
}

impl Fleet {
    pub fn new(env: &Env) -> Fleet {
        Fleet {
            log: env.path().join("hooks.log"),
        }
    }

    /// Uploads and registers a linux, non-GPU image; returns its id.
    pub fn image(&self, op: &Client, name: &str, healthy: bool, padding: usize) -> String {
        self.image_as(op, name, healthy, padding, "linux", false)
    }

    pub fn image_as(
        &self,
        op: &Client,
        name: &str,
        healthy: bool,
        padding: usize,
        os_type: &str,
        gpu: bool,
    ) -> String {
        let data = image_targz(name, &self.log, if healthy { 0 } else { 1 }, padding);
        let sha = op.upload(&data);
        let (s, v) = op.post(
            "/v1/images",
            json!({"name": name, "version": "1", "os_type": os_type, "gpu": gpu, "sha256": sha}),
        );
        assert_eq!(s, 200, "{v}");
        v["image_id"].as_str().unwrap().to_string()
    }

    /// Hook runs so far, as `<machine> <hook> <image name>` lines.
    pub fn hooks(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn hooks_of(&self, m: &str) -> Vec<String> {
        self.hooks()
            .into_iter()
            .filter(|l| l.starts_with(&format!("{m} ")))
            .collect()
    }
}

pub fn push(op: &Client, pool: &str, body: Value) -> String {
    let (s, v) = op.post(&format!("/v1/pools/{pool}/push-image"), body);
    assert_eq!(s, 200, "push refused: {v}");
    v["task_id"].as_str().unwrap().to_string()
}

fn status(op: &Client, pool: &str) -> Value {
    let (s, v) = op.get(&format!("/v1/pools/{pool}/provisioning-status"));
    assert_eq!(s, 200, "{v}");
    v
}

pub fn machine_image(op: &Client, id: &str) -> Value {
    let (s, v) = op.get(&format!("/v1/machines/{id}"));
    assert_eq!(s, 200, "{v}");
    v["image"].clone()
}

pub fn image_root(m: &Machine) -> PathBuf {
    m.agent.dir.join("state/images")
}

pub fn current_link(m: &Machine) -> Option<String> {
    std::fs::read_link(image_root(m).join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Restarts every agent that went down (a fake reboot cuts its power) until `done`.
pub fn pump<T>(ms: &mut [&mut Machine], what: &str, mut done: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        for m in ms.iter_mut() {
            if m.agent.exited() {
                m.agent.start_again();
            }
        }
        if let Some(v) = done() {
            return v;
        }
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the pool's operation to return to `NONE`, rebooting agents on the way.
pub fn settle(op: &Client, pool: &str, ms: &mut [&mut Machine]) -> Value {
    pump(ms, "the pool's operation to end", || {
        let s = status(op, pool);
        (s["operation"] == "NONE").then_some(s)
    })
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// (operation, pending state, current state) of a status, for transition checks.
fn triple(s: &Value) -> (String, String, String) {
    let t = |v: &Value| v.as_str().unwrap_or("null").to_string();
    (
        t(&s["operation"]),
        t(&s["pending_image_state"]),
        t(&s["current_image_state"]),
    )
}

#[test]
fn a_scheduled_push_stages_first_applies_on_time_and_commits() {
    let env = Env::new();
    let ctl = env.controller();
    // Throttled downloads make PUBLISHING last long enough to be seen.
    let mut m = machine_with(
        &env,
        &ctl,
        "m1",
        "p",
        Reboot::Real,
        "[payloads]\nmax_download_bytes_per_second = 400000\n",
    );
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let fleet = Fleet::new(&env);
    let a = fleet.image(&op, "alpha", true, 16);
    assert_eq!(triple(&status(&op, "p")).0, "NONE");

    // The first image the pool gets is an INITIAL_PUBLISH.
    let t1 = push(&op, "p", json!({"image_id": a}));
    let s = status(&op, "p");
    assert_eq!(s["operation"], "INITIAL_PUBLISH", "{s:#}");
    assert_eq!(s["task_id"], t1.as_str());
    let s = settle(&op, "p", &mut [&mut m]);
    assert_eq!(s["current_image_id"], a.as_str(), "{s:#}");
    assert_eq!(s["current_image_state"], "READY");
    assert!(s["pending_image_state"].is_null(), "{s:#}");
    assert_eq!(current_link(&m).as_deref(), Some(a.as_str()));
    assert_eq!(
        fleet.hooks_of("m1"),
        vec!["m1 activate alpha", "m1 health alpha"]
    );

    // Now a second image, scheduled 6 s ahead; its 1.2 MB take about 3 s to download.
    let b = fleet.image(&op, "beta", true, 1_200_000);
    let start = unix_ms() + 6_000;
    let t2 = push(
        &op,
        "p",
        json!({"image_id": b, "start_time": start, "compute_profile_num_cpus": 4,
               "compute_profile_num_cores_per_socket": 2, "compute_profile_ram_mb": 4096,
               "add_virtual_tpm": true}),
    );
    assert_ne!(t1, t2);
    let mut seen: Vec<(String, String, String)> = Vec::new();
    let mut progress: Vec<u64> = Vec::new();
    let mut machine_progress: Vec<u64> = Vec::new();
    let end = pump(&mut [&mut m], "the push to end", || {
        let s = status(&op, "p");
        let tr = triple(&s);
        if seen.last() != Some(&tr) {
            seen.push(tr.clone());
        }
        if s["pending_image_state"] == "PUBLISHING" {
            progress.extend(s["pending_image_progress"].as_u64());
            // The machine's own view reads its own row of the stage task.
            let (_, mv) = op.get("/v1/machines/m1");
            if mv["image"]["pending_image_state"] == "PUBLISHING" {
                machine_progress.extend(mv["image"]["pending_image_progress"].as_u64());
            }
        }
        if s["pending_image_state"] == "READY" {
            assert_eq!(s["pending_image_progress"], 100, "{s:#}");
        }
        if s["pending_image_state"] == "READY" && unix_ms() < start - 500 {
            assert!(
                !fleet.hooks().iter().any(|l| l.contains("beta")),
                "nothing of the image runs before start_time"
            );
        }
        (tr.0 == "NONE").then_some(s)
    });
    let expected = [
        ("SCHEDULE_PUSH_IMAGE", "PENDING_PUBLISH", "READY"),
        ("SCHEDULE_PUSH_IMAGE", "PUBLISHING", "READY"),
        ("SCHEDULE_PUSH_IMAGE", "READY", "READY"),
        ("NONE", "null", "READY"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    // Every observed state is one of the expected ones, in their order; PUBLISHING, READY
    // and the end were all observed.
    let mut at = 0;
    for tr in &seen {
        let pos = expected[at..]
            .iter()
            .position(|e| e == tr)
            .unwrap_or_else(|| panic!("unexpected or out-of-order state {tr:?} in {seen:?}"));
        at += pos;
    }
    for must in &expected[1..] {
        assert!(seen.contains(must), "{must:?} never observed: {seen:?}");
    }
    assert!(
        progress.iter().any(|p| *p < 100) && progress.windows(2).all(|w| w[0] <= w[1]),
        "pending_image_progress grows while PUBLISHING: {progress:?}"
    );
    assert!(
        machine_progress.iter().any(|p| *p < 100)
            && machine_progress.windows(2).all(|w| w[0] <= w[1]),
        "the machine's pending_image_progress grows while PUBLISHING: {machine_progress:?}"
    );
    assert_eq!(
        seen.iter().filter(|t| t.1 == "READY").count(),
        1,
        "READY once: {seen:?}"
    );
    assert_eq!(end["current_image_id"], b.as_str(), "{end:#}");
    let task = op.task(&t2);
    let mm = machine_of(&task, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    assert_eq!(mm["power_state"], "REBOOTED", "{mm:#}");
    assert!(
        mm["error_msg"].as_str().unwrap().contains("committed"),
        "{mm:#}"
    );
    let applied_at = mm["started_at"].as_str().unwrap();
    let applied_ms =
        time::OffsetDateTime::parse(applied_at, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp_nanos()
            / 1_000_000;
    assert!(
        applied_ms as i64 >= start,
        "applied at {applied_at}, before start_time {start}"
    );
    // Committed: current is beta, previous is gone with alpha's directory.
    assert_eq!(current_link(&m).as_deref(), Some(b.as_str()));
    assert!(!image_root(&m).join("previous").exists());
    assert!(!image_root(&m).join(&a).exists());
    assert_eq!(
        std::fs::read_to_string(image_root(&m).join("current/etc/image-name")).unwrap(),
        "beta"
    );
    // The activate hook got the push's parameters.
    let env_file = std::fs::read_to_string(m.agent.dir.join("state/activate-beta.env")).unwrap();
    for line in [
        "FIELDHAND_COMPUTE_PROFILE_NUM_CPUS=4".to_string(),
        "FIELDHAND_COMPUTE_PROFILE_NUM_CORES_PER_SOCKET=2".into(),
        "FIELDHAND_COMPUTE_PROFILE_RAM_MB=4096".into(),
        "FIELDHAND_ADD_VIRTUAL_TPM=true".into(),
        format!("FIELDHAND_IMAGE_ID={b}"),
        format!("FIELDHAND_PREVIOUS_IMAGE_ID={a}"),
        format!("FIELDHAND_POOL_PREVIOUS_IMAGE_ID={a}"),
        "FIELDHAND_LOGOFF_POLICY=WAIT_FOR_LOGOFF".into(),
    ] {
        assert!(env_file.lines().any(|l| l == line), "{line} in {env_file}");
    }
    // Per machine, on the controller and on the agent.
    let mi = machine_image(&op, "m1");
    assert_eq!(mi["current_image_id"], b.as_str(), "{mi:#}");
    assert_eq!(mi["current_image_state"], "READY");
    assert!(mi["pending_image_id"].is_null(), "{mi:#}");
    let st = m.agent.status();
    assert_eq!(st["image"]["current_image_id"], b.as_str(), "{st:#}");
    assert_eq!(st["image"]["current_image_state"], "READY");
    assert!(st["image"]["pending_image_id"].is_null());
    assert_eq!(m.power_log(), vec!["reboot", "reboot"]);

    // FINAL_UNPUBLISH removes the pool's images from its machines.
    let (s, v) = op.call(http::Method::DELETE, "/v1/pools/p/image", None);
    assert_eq!(s, 200, "{v}");
    let s = status(&op, "p");
    assert_eq!(s["operation"], "FINAL_UNPUBLISH", "{s:#}");
    assert!(
        ["PENDING_UNPUBLISH", "UNPUBLISHING"].contains(&s["current_image_state"].as_str().unwrap()),
        "{s:#}"
    );
    let s = settle(&op, "p", &mut [&mut m]);
    assert!(s["current_image_id"].is_null(), "{s:#}");
    assert!(s["current_image_state"].is_null(), "{s:#}");
    assert_eq!(current_link(&m), None);
    assert!(!image_root(&m).join(&b).exists());
    let mi = machine_image(&op, "m1");
    assert!(mi["current_image_id"].is_null(), "{mi:#}");
}

#[test]
fn reschedule_cancel_and_conflicts() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);
    let fleet = Fleet::new(&env);
    let a = fleet.image(&op, "alpha", true, 16);
    let b = fleet.image(&op, "beta", true, 16);
    let later = unix_ms() + 3_600_000;
    let body = json!({"image_id": a, "start_time": later, "logoff_policy": "WAIT_FOR_LOGOFF"});
    let t1 = push(&op, "p", body.clone());
    wait_until("the pending image to be READY", T, || {
        (status(&op, "p")["pending_image_state"] == "READY").then_some(())
    });
    assert!(image_root(&m).join(&a).join("fieldhand/activate").exists());
    let st = m.agent.status();
    assert_eq!(st["image"]["pending_image_id"], a.as_str(), "{st:#}");
    assert_eq!(st["image"]["pending_image_state"], "READY", "{st:#}");
    assert!(st["image"]["current_image_id"].is_null(), "{st:#}");
    assert_eq!(machine_image(&op, "m1")["pending_image_state"], "READY");

    // Same request, other start time: the same task, rescheduled (defaults spelled out or not).
    let again = json!({"image_id": a, "start_time": later + 60_000, "stop_on_first_error": true});
    let (s, v) = op.post("/v1/pools/p/push-image", again);
    assert_eq!((s, v["task_id"].as_str()), (200, Some(t1.as_str())), "{v}");
    assert_eq!(status(&op, "p")["start_time"], later + 60_000);
    // Any other difference is refused, naming the field.
    let (s, v) = op.post(
        "/v1/pools/p/push-image",
        json!({"image_id": a, "start_time": later, "add_virtual_tpm": true}),
    );
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error_code"], "NOT_ALLOWED_IN_CURRENT_STATE");
    assert!(
        v["error_msg"].as_str().unwrap().contains("add_virtual_tpm"),
        "{v}"
    );
    let (s, v) = op.post("/v1/pools/p/push-image", json!({"image_id": b}));
    assert_eq!(s, 409, "{v}");
    assert!(v["error_msg"].as_str().unwrap().contains("image_id"), "{v}");
    // No unpublish while a push is scheduled.
    let (s, v) = op.call(http::Method::DELETE, "/v1/pools/p/image", None);
    assert_eq!(s, 409, "{v}");

    // Cancel before the start: the pending image leaves the machine, the task is CANCELLED.
    let (s, v) = op.post("/v1/pools/p/push-image/cancel", json!({}));
    assert_eq!(s, 200, "{v}");
    assert!(
        ["CANCEL_SCHEDULED_PUSH_IMAGE", "NONE"].contains(&v["operation"].as_str().unwrap()),
        "{v:#}"
    );
    let s = settle(&op, "p", &mut [&mut m]);
    assert!(s["pending_image_id"].is_null(), "{s:#}");
    assert!(s["current_image_id"].is_null(), "{s:#}");
    assert_eq!(op.task(&t1)["state"], "CANCELLED");
    wait_until("the pending image to be removed", T, || {
        (!image_root(&m).join(&a).exists()).then_some(())
    });
    assert!(fleet.hooks().is_empty(), "nothing was applied");
    let (s, v) = op.post("/v1/pools/p/push-image/cancel", json!({}));
    assert_eq!(s, 409, "{v}");

    // A push that starts now waits for the logged-in user (WAIT_FOR_LOGOFF); it has
    // started, so it can no longer be cancelled, and no other push is accepted meanwhile.
    let mut alice = m.login("alice", 1);
    let t2 = push(&op, "p", json!({"image_id": b}));
    assert_ne!(t1, t2);
    let w = wait_until("the agent to wait for alice", T, || {
        let s = m.agent.status();
        let w = s["running"]["waiting"].clone();
        w.is_object().then_some(w)
    });
    assert!(w["what"].as_str().unwrap().contains("alice"), "{w}");
    let (s, v) = op.post("/v1/pools/p/push-image/cancel", json!({}));
    assert_eq!(s, 409, "{v}");
    assert!(v["error_msg"].as_str().unwrap().contains("started"), "{v}");
    let (s, v) = op.post("/v1/pools/p/push-image", json!({"image_id": a}));
    assert_eq!(
        (s, v["error_code"].as_str()),
        (409, Some("NOT_ALLOWED_IN_CURRENT_STATE")),
        "{v}"
    );
    assert!(
        fleet.hooks().is_empty(),
        "nothing switched while alice is logged in"
    );
    alice.kill().unwrap();
    alice.wait().unwrap();
    let s = settle(&op, "p", &mut [&mut m]);
    assert_eq!(s["current_image_id"], b.as_str(), "{s:#}");
    assert_eq!(machine_of(&op.task(&t2), "m1")["state"], "SUCCEEDED");
}

#[test]
fn a_failed_health_check_rolls_back_to_the_healthy_previous_image() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);
    let fleet = Fleet::new(&env);
    let good = fleet.image(&op, "good", true, 16);
    let bad = fleet.image(&op, "bad", false, 16);
    push(&op, "p", json!({"image_id": good}));
    let s = settle(&op, "p", &mut [&mut m]);
    assert_eq!(s["current_image_id"], good.as_str());

    let t = push(&op, "p", json!({"image_id": bad}));
    let s = settle(&op, "p", &mut [&mut m]);
    let mm = machine_of(&op.task(&t), "m1").clone();
    assert_eq!(mm["state"], "FAILED", "{mm:#}");
    assert_eq!(mm["error_code"], "IMAGE_HEALTH_CHECK_FAILED", "{mm:#}");
    let msg = mm["error_msg"].as_str().unwrap();
    assert!(
        msg.contains(&format!("image {good} is current again and healthy")),
        "{msg}"
    );
    assert!(
        mm["stdout"].as_str().unwrap().contains("checked bad"),
        "{mm:#}"
    );
    // The good image is current again, on disk and in every view; the bad one is FAILED.
    assert_eq!(current_link(&m).as_deref(), Some(good.as_str()));
    assert!(!image_root(&m).join("previous").exists());
    assert_eq!(s["current_image_id"], good.as_str(), "{s:#}");
    assert_eq!(s["current_image_state"], "READY", "{s:#}");
    assert_eq!(s["pending_image_state"], "FAILED", "{s:#}");
    let mi = machine_image(&op, "m1");
    assert_eq!(mi["current_image_id"], good.as_str(), "{mi:#}");
    assert_eq!(mi["current_image_state"], "READY", "{mi:#}");
    assert_eq!(mi["pending_image_state"], "FAILED", "{mi:#}");
    let st = m.agent.status();
    assert_eq!(st["image"]["current_image_id"], good.as_str(), "{st:#}");
    assert_eq!(st["image"]["pending_image_state"], "FAILED", "{st:#}");
    // good: activate + health; bad: activate + failed health; good's health after rollback.
    assert_eq!(
        fleet.hooks_of("m1"),
        vec![
            "m1 activate good",
            "m1 health good",
            "m1 activate bad",
            "m1 health bad",
            "m1 health good"
        ]
    );
    assert_eq!(m.power_log(), vec!["reboot", "reboot", "reboot"]);
}

#[test]
fn selective_push_with_stop_on_first_error_skips_the_rest() {
    let env = Env::new();
    let ctl = env.controller();
    let mut m1 = machine(&env, &ctl, "m1", "p", Reboot::Real);
    let mut m2 = machine(&env, &ctl, "m2", "p", Reboot::Real);
    let mut m3 = machine(&env, &ctl, "m3", "p", Reboot::Real);
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2", "m3"], T);
    let fleet = Fleet::new(&env);
    let bad = fleet.image(&op, "bad", false, 16);
    let t = push(
        &op,
        "p",
        json!({"image_id": bad, "selective_push_image": true, "machine_ids": ["m1", "m2"]}),
    );
    settle(&op, "p", &mut [&mut m1, &mut m2, &mut m3]);
    let task = op.task(&t);
    assert_eq!(task["state"], "HALTED", "{task:#}");
    // One machine went first and failed; the other never started.
    let first = task["batches"][0]["machine_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let other = if first == "m1" { "m2" } else { "m1" };
    assert_eq!(machine_of(&task, &first)["state"], "FAILED", "{task:#}");
    assert_eq!(
        machine_of(&task, &first)["error_code"],
        "IMAGE_HEALTH_CHECK_FAILED"
    );
    assert_eq!(machine_of(&task, other)["state"], "SKIPPED", "{task:#}");
    assert_eq!(
        task["machines"].as_array().unwrap().len(),
        2,
        "only the listed machines: {task:#}"
    );
    let ms = [&m1, &m2, &m3];
    let by_id = |id: &str| *ms.iter().find(|m| m.agent.id == id).unwrap();
    assert_eq!(by_id(&first).power_log(), vec!["reboot", "reboot"]);
    assert!(by_id(other).power_log().is_empty());
    assert!(fleet.hooks_of(other).is_empty());
    // The skipped machine staged the image (staging is for every target) but never ran it.
    assert!(image_root(by_id(other)).join(&bad).exists());
    // m3 was not listed: nothing reached it.
    assert!(m3.power_log().is_empty());
    assert!(!image_root(&m3).join(&bad).exists());
    assert!(machine_image(&op, "m3").is_null());
    let s = status(&op, "p");
    assert_eq!(s["pending_image_state"], "FAILED", "{s:#}");
    assert_eq!(
        (
            s["machines"]["total"].as_u64(),
            s["machines"]["failed"].as_u64(),
            s["machines"]["skipped"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{s:#}"
    );
}

#[test]
fn force_logoff_ends_the_session_before_the_image_is_switched() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);
    let (s, _) = op.put("/v1/settings", json!({"force_logoff_grace_seconds": 1}));
    assert_eq!(s, 200);
    let fleet = Fleet::new(&env);
    let a = fleet.image(&op, "alpha", true, 16);
    let mut bob = m.login("bob", 3);
    push(
        &op,
        "p",
        json!({"image_id": a, "logoff_policy": "FORCE_LOGOFF"}),
    );
    wait_until("bob's warning", T, || {
        m.tty(3).contains("logged off").then_some(())
    });
    let s = settle(&op, "p", &mut [&mut m]);
    assert_eq!(s["current_image_id"], a.as_str(), "{s:#}");
    let st = bob.wait().unwrap();
    assert!(!st.success(), "bob's session was ended: {st:?}");
    assert_eq!(
        fleet.hooks_of("m1"),
        vec!["m1 activate alpha", "m1 health alpha"]
    );
}

#[test]
fn a_machine_offline_at_start_time_catches_up() {
    let env = Env::new();
    let ctl = env.controller();
    let mut m1 = machine(&env, &ctl, "m1", "p", Reboot::Real);
    let mut m2 = machine(&env, &ctl, "m2", "p", Reboot::Real);
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2"], T);
    let fleet = Fleet::new(&env);
    let a = fleet.image(&op, "alpha", true, 16);
    let start = unix_ms() + 3_000;
    let t = push(
        &op,
        "p",
        json!({"image_id": a, "start_time": start, "stop_on_first_error": false}),
    );
    wait_until("READY", T, || {
        (status(&op, "p")["pending_image_state"] == "READY").then_some(())
    });
    m2.agent.kill(); // offline through the start time
    pump(&mut [&mut m1], "m1 to apply", || {
        let task = op.task(&t);
        (machine_of(&task, "m1")["state"] == "SUCCEEDED").then_some(())
    });
    assert!(unix_ms() >= start);
    let s = status(&op, "p");
    assert_eq!(
        s["operation"], "INITIAL_PUBLISH",
        "still in progress: {s:#}"
    );
    assert_eq!(s["machines"]["pending"], 1, "{s:#}");
    assert_eq!(s["machines"]["succeeded"], 1, "{s:#}");
    assert!(fleet.hooks_of("m2").is_empty());
    m2.agent.start_again();
    let s = settle(&op, "p", &mut [&mut m1, &mut m2]);
    assert_eq!(s["current_image_id"], a.as_str(), "{s:#}");
    assert_eq!(machine_of(&op.task(&t), "m2")["state"], "SUCCEEDED");
    assert_eq!(current_link(&m2).as_deref(), Some(a.as_str()));
    assert_eq!(
        fleet.hooks_of("m2"),
        vec!["m2 activate alpha", "m2 health alpha"]
    );
}

#[test]
fn push_requests_are_validated_with_the_field_named() {
    let env = Env::new();
    let (ctl, _m) = one_machine(&env);
    let op = env.operator(&ctl);
    let fleet = Fleet::new(&env);
    let a = fleet.image(&op, "alpha", true, 16);
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({}), 400, "image_id"),
        (json!({"image_id": "nope"}), 400, "nope"),
        (json!({"image_id": a, "logoff_policy": "SOON"}), 400, "SOON"),
        (
            json!({"image_id": a, "machine_ids": ["m1"]}),
            400,
            "selective_push_image",
        ),
        (
            json!({"image_id": a, "selective_push_image": true}),
            400,
            "machine_ids",
        ),
        (
            json!({"image_id": a, "selective_push_image": true, "machine_ids": ["m9"]}),
            400,
            "m9",
        ),
        (
            json!({"image_id": a, "compute_profile_num_cores_per_socket": 2, "compute_profile_num_cpus": 4}),
            400,
            "compute_profile_ram_mb",
        ),
        (
            json!({"image_id": a, "compute_profile_num_cores_per_socket": 4, "compute_profile_num_cpus": 6, "compute_profile_ram_mb": 1024}),
            400,
            "multiple",
        ),
        (
            json!({"image_id": a, "compute_profile_ram_mb": 0}),
            400,
            "compute_profile_ram_mb 0",
        ),
        (
            json!({"image_id": a, "start_time": -1}),
            400,
            "start_time -1",
        ),
        (
            json!({"image_id": a, "timeout_seconds": 0}),
            400,
            "timeout_seconds 0",
        ),
        (
            json!({"image_id": a, "parent_vm_id": "vm-1"}),
            400,
            "parent_vm_id",
        ),
    ];
    for (body, code, needle) in cases {
        let (s, v) = op.post("/v1/pools/p/push-image", body.clone());
        assert_eq!(s, code, "{body} -> {v}");
        let msg = v["error_msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should name {needle:?}"
        );
    }
    // A pool with no machines: the same answer as for a script execution.
    let (s, v) = op.post("/v1/pools/empty/push-image", json!({"image_id": a}));
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("POOL_NOT_FOUND")),
        "{v}"
    );
    let (s, v) = op.post("/v1/pools/p/push-image/cancel", json!({}));
    assert_eq!(s, 409, "{v}");
    let (s, v) = op.call(http::Method::DELETE, "/v1/pools/p/image", None);
    assert_eq!(s, 409, "{v}");
    assert!(v["error_msg"].as_str().unwrap().contains("no image"), "{v}");
    let (s, v) = op.get("/v1/machines/nobody");
    assert_eq!(s, 404, "{v}");
    // Nothing was created by the refusals.
    let s = status(&op, "p");
    assert_eq!(s["operation"], "NONE", "{s:#}");
    assert!(s["task_id"].is_null(), "{s:#}");
}

#[test]
fn a_push_whose_staging_fails_says_why() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);
    // An image archive with a symlink that leaves its directory.
    let evil = {
        let mut h = tar::Header::new_ustar();
        h.set_path("escape").unwrap();
        h.set_link_name("../../..").unwrap();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        b.append(&h, std::io::empty()).unwrap();
        b.into_inner().unwrap().finish().unwrap()
    };
    let sha = op.upload(&evil);
    let (s, v) = op.post(
        "/v1/images",
        json!({"name": "evil", "version": "1", "os_type": "linux", "gpu": false, "sha256": sha}),
    );
    assert_eq!(s, 200, "{v}");
    let t = push(&op, "p", json!({"image_id": v["image_id"]}));
    let s = settle(&op, "p", &mut [&mut m]);
    assert_eq!(s["pending_image_state"], "FAILED", "{s:#}");
    assert_eq!(s["error_code"], "UNSAFE_ARCHIVE", "{s:#}");
    let task = op.task(&t);
    let mm = machine_of(&task, "m1");
    assert_eq!(mm["state"], "FAILED", "{task:#}");
    assert_eq!(mm["error_code"], "UNSAFE_ARCHIVE", "{task:#}");
    assert!(
        mm["error_msg"]
            .as_str()
            .unwrap()
            .contains("staging the image failed on m1"),
        "{mm:#}"
    );
}
