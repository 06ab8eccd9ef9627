//! Rebuilding desktops (seed 003) with real agents: one result code per desktop, the
//! all-or-nothing request checks, a fresh system slot, and the data-area rules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::images::{current_link, image_root, machine_image, pump, Fleet};
use crate::support::{
    machine_of, machine_with, wait_until, Client, Controller, Env, Machine, Reboot,
};

const T: Duration = Duration::from_secs(60);

/// A machine in `pool` with a declared GPU (or not) and its own data area.
fn desktop(env: &Env, ctl: &Controller, id: &str, pool: &str, gpu: bool) -> (Machine, PathBuf) {
    let data = env.path().join("data").join(id);
    std::fs::create_dir_all(&data).unwrap();
    let m = machine_with(
        env,
        ctl,
        id,
        pool,
        Reboot::Real,
        &format!("gpu = {gpu}\ndata_dir = \"{}\"\n", data.display()),
    );
    (m, data)
}

fn rebuild(op: &Client, body: Value) -> (u16, Value) {
    op.post("/v1/desktops/rebuild", body)
}

fn code_of<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["rebuild_results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["desktop_id"] == id)
        .unwrap_or_else(|| panic!("no result for {id}: {v:#}"))
}

/// Runs a rebuild of one desktop to its end (rebooting it); returns the machine's task row.
fn rebuild_one(op: &Client, m: &mut Machine, body: Value) -> Value {
    let (s, v) = rebuild(op, body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(code_of(&v, &m.agent.id)["code"], "Success", "{v:#}");
    let task = v["request_id"].as_str().unwrap().to_string();
    let id = m.agent.id.clone();
    pump(&mut [m], "the rebuild to end", || {
        let t = op.task(&task);
        (!t["finished_at"].is_null()).then(|| machine_of(&t, &id).clone())
    })
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn every_desktop_gets_its_own_code() {
    let env = Env::new();
    let ctl = env.controller();
    let (mut m1, _) = desktop(&env, &ctl, "m1", "p", false);
    let (m2, _) = desktop(&env, &ctl, "m2", "busy", false);
    let (mut m3, _) = desktop(&env, &ctl, "m3", "p", false);
    let (m4, _) = desktop(&env, &ctl, "m4", "p", true);
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2", "m3", "m4"], T);
    wait_until("m4's facts to declare its GPU", T, || {
        let (_, v) = op.get("/v1/machines/m4");
        (v["facts"]["gpu"] == true).then_some(())
    });
    let fleet = Fleet::new(&env);
    let plain = fleet.image(&op, "plain", true, 16);
    let gpux = fleet.image_as(&op, "gpux", true, 16, "linux", true);
    // m2 is busy with a script; m3 goes offline.
    let busy = op.execute(
        "busy",
        json!({"command_content": "sleep 30", "command_type": "sh"}),
    );
    op.wait_machine_state(&busy, "m2", "RUNNING", T);
    m3.agent.kill();
    wait_until("m3 to be offline", T, || {
        let (_, v) = op.get("/v1/machines/m3");
        (v["online"] == false).then_some(())
    });

    let (s, v) = rebuild(
        &op,
        json!({"desktop_ids": ["m1", "m2", "m3", "m4", "ghost"], "image_id": plain}),
    );
    assert_eq!(s, 200, "{v}");
    let ok = code_of(&v, "m1");
    assert_eq!(ok["code"], "Success", "{v:#}");
    assert!(ok.get("message").is_none(), "no message on Success: {ok}");
    for (id, why) in [
        ("m2", "another operation"),
        ("m3", "offline"),
        ("ghost", "unknown"),
    ] {
        let r = code_of(&v, id);
        assert_eq!(r["code"], "IncorrectDesktopStatus", "{id}: {v:#}");
        assert!(r["message"].as_str().unwrap().contains(why), "{id}: {r}");
    }
    let r = code_of(&v, "m4");
    assert_eq!(r["code"], "IncompatibleImage", "{v:#}");
    assert!(r["message"].as_str().unwrap().contains("has a GPU"), "{r}");
    // The request follows only the started rebuild, to its end.
    let task = v["request_id"].as_str().unwrap().to_string();
    let t = pump(&mut [&mut m1], "the rebuild to end", || {
        let t = op.task(&task);
        (!t["finished_at"].is_null()).then_some(t)
    });
    assert_eq!(t["machines"].as_array().unwrap().len(), 1, "{t:#}");
    assert_eq!(machine_of(&t, "m1")["state"], "SUCCEEDED", "{t:#}");
    assert_eq!(machine_of(&t, "m1")["power_state"], "REBOOTED", "{t:#}");
    assert_eq!(machine_image(&op, "m1")["current_image_id"], plain.as_str());
    assert_eq!(
        fleet.hooks(),
        vec!["m1 activate plain", "m1 health plain"],
        "nothing ran anywhere else"
    );
    assert!(m4.power_log().is_empty() && m2.power_log().is_empty());

    // The other GPU direction: a GPU image on a machine without one.
    let (s, v) = rebuild(&op, json!({"desktop_ids": ["m1"], "image_id": gpux}));
    assert_eq!(s, 200, "{v}");
    let r = code_of(&v, "m1");
    assert_eq!(r["code"], "IncompatibleImage", "{v:#}");
    assert!(r["message"].as_str().unwrap().contains("has no GPU"), "{r}");
    let t = op.task(v["request_id"].as_str().unwrap());
    assert_eq!(t["state"], "FAILED", "nothing started: {t:#}");
    assert!(t["machines"].as_array().unwrap().is_empty());
    let (s, _) = op.post(&format!("/v1/tasks/{busy}/cancel"), json!({}));
    assert_eq!(s, 200);
}

#[test]
fn invalid_requests_touch_no_machine() {
    let env = Env::new();
    let ctl = env.controller();
    let (m1, data) = desktop(&env, &ctl, "m1", "p", false);
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let fleet = Fleet::new(&env);
    let img = fleet.image(&op, "plain", true, 16);
    std::fs::write(data.join("mine.txt"), "x").unwrap();
    let many: Vec<String> = (0..21).map(|i| format!("m{i}")).collect();
    let mut with_m1 = many.clone();
    with_m1[0] = "m1".into();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"desktop_ids": [], "image_id": img}),
            "desktop_ids has 0",
        ),
        (
            json!({"desktop_ids": with_m1, "image_id": img}),
            "desktop_ids has 21",
        ),
        (
            json!({"desktop_ids": ["m1", "m1"], "image_id": img}),
            "twice",
        ),
        (json!({"desktop_ids": ["m1"], "image_id": "nope"}), "nope"),
        (
            json!({"desktop_ids": ["m1"], "image_id": img, "operate_type": "wipe"}),
            "wipe",
        ),
        (
            json!({"desktop_ids": ["m1"], "image_id": img, "language": "fr-FR"}),
            "fr-FR",
        ),
        (
            json!({"desktop_ids": ["m1"], "image_id": img, "region_id": "cn"}),
            "region_id",
        ),
    ];
    for (body, needle) in cases {
        let (s, v) = rebuild(&op, body.clone());
        assert_eq!(s, 400, "{body} -> {v}");
        let msg = v["error_msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should name {needle:?}"
        );
        assert!(v.get("request_id").is_none(), "{v}");
    }
    // Nothing reached the machine.
    std::thread::sleep(Duration::from_millis(500));
    assert!(fleet.hooks().is_empty());
    assert!(m1.power_log().is_empty());
    assert!(machine_image(&op, "m1").is_null());
    assert!(m1.agent.status()["recent_results"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(names(&data), vec!["mine.txt"]);
}

#[test]
fn the_system_slot_is_fresh_and_the_data_area_follows_the_seed() {
    let env = Env::new();
    let ctl = env.controller();
    let (mut m, data) = desktop(&env, &ctl, "m1", "p", false);
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let fleet = Fleet::new(&env);
    let lin1 = fleet.image_as(&op, "lin1", true, 16, "linux", false);
    let lin2 = fleet.image_as(&op, "lin2", true, 16, "linux", false);
    let win = fleet.image_as(&op, "win", true, 16, "windows", false);
    let bad = fleet.image_as(&op, "bad", false, 16, "windows", false);
    std::fs::write(data.join("keep.txt"), "user data").unwrap();

    // No image yet: nothing to compare the OS with, so the data area is kept.
    let r = rebuild_one(
        &op,
        &mut m,
        json!({"desktop_ids": ["m1"], "image_id": lin1}),
    );
    assert_eq!(r["state"], "SUCCEEDED", "{r:#}");
    assert!(data.join("keep.txt").exists());
    let slot1 = current_link(&m).unwrap();
    assert!(slot1.starts_with(&format!("{lin1}.")), "{slot1}");
    std::fs::write(image_root(&m).join(&slot1).join("left-behind"), "x").unwrap();

    // Same image (the default), same OS, no operate_type: a fresh slot, data kept.
    let r = rebuild_one(
        &op,
        &mut m,
        json!({"desktop_ids": ["m1"], "language": "ja-JP"}),
    );
    assert_eq!(r["state"], "SUCCEEDED", "{r:#}");
    let slot2 = current_link(&m).unwrap();
    assert_ne!(slot1, slot2, "a used slot is never reused");
    assert!(slot2.starts_with(&format!("{lin1}.")), "{slot2}");
    assert!(
        !image_root(&m).join(&slot1).exists(),
        "the old slot is deleted"
    );
    assert!(!image_root(&m).join(&slot2).join("left-behind").exists());
    assert_eq!(
        std::fs::read_to_string(data.join("keep.txt")).unwrap(),
        "user data",
        "same OS: the data area is kept"
    );
    let env_file = std::fs::read_to_string(m.agent.dir.join("state/activate-lin1.env")).unwrap();
    assert!(env_file.lines().any(|l| l == "LANG=ja-JP"), "{env_file}");
    assert!(
        env_file.lines().any(|l| l == "FIELDHAND_LANGUAGE=ja-JP"),
        "{env_file}"
    );
    assert_eq!(machine_image(&op, "m1")["language"], "ja-JP");

    // replace: emptied even for the same OS; the directory itself stays.
    let r = rebuild_one(
        &op,
        &mut m,
        json!({"desktop_ids": ["m1"], "image_id": lin2, "operate_type": "replace"}),
    );
    assert_eq!(r["state"], "SUCCEEDED", "{r:#}");
    assert_eq!(
        names(&data),
        vec!["written-by-lin2"],
        "only what the new image wrote"
    );

    // Another OS without operate_type: emptied.
    std::fs::write(data.join("again.txt"), "x").unwrap();
    let r = rebuild_one(&op, &mut m, json!({"desktop_ids": ["m1"], "image_id": win}));
    assert_eq!(r["state"], "SUCCEEDED", "{r:#}");
    assert_eq!(names(&data), vec!["written-by-win"]);
    let win_slot = current_link(&m).unwrap();

    // A failed health check rolls back: the previous slot and the data area as they were.
    std::fs::write(data.join("precious.txt"), "keep me").unwrap();
    let before = names(&data);
    let r = rebuild_one(
        &op,
        &mut m,
        json!({"desktop_ids": ["m1"], "image_id": bad, "operate_type": "replace"}),
    );
    assert_eq!(r["state"], "FAILED", "{r:#}");
    assert_eq!(r["error_code"], "IMAGE_HEALTH_CHECK_FAILED", "{r:#}");
    assert_eq!(current_link(&m).as_deref(), Some(win_slot.as_str()));
    assert_eq!(names(&data), before, "the failed attempt changed nothing");
    assert_eq!(
        std::fs::read_to_string(data.join("precious.txt")).unwrap(),
        "keep me"
    );
    let mi = machine_image(&op, "m1");
    assert_eq!(mi["current_image_id"], win.as_str(), "{mi:#}");
    assert_eq!(mi["current_image_state"], "READY", "{mi:#}");
}
