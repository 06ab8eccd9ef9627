//! The operator API's lists (`GET /v1/tasks`, `/v1/machines`, `/v1/scripts`, `/v1/pools`) and
//! the audit trail (`GET /v1/audit`, `created_by`/`cancelled_by`), against the real controller:
//! pages neither skip nor repeat rows while rows are added, filters narrow, bad parameters get
//! a 400 naming them, and each action is recorded under the certificate's operator.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::{run, Client, Controller, Env, CONTROLLER};

const NEXT: &str = "fieldhand-next-cursor";

/// A machine known to the controller (one heartbeat under a certificate bound to `pool`),
/// without an agent: its tasks stay unfinished, which is all a list needs.
fn known_machine(env: &Env, ctl: &Controller, id: &str, pool: &str) {
    env.issue_agent_in(id, Some(pool));
    let c = env.client(
        ctl,
        Some((&format!("agents/{id}.pem"), &format!("agents/{id}-key.pem"))),
    );
    let facts = json!({"hostname": id, "os": "x", "kernel": "x", "cpu_count": 1,
        "memory_total_bytes": 1, "memory_available_bytes": 1, "disk_free_bytes": 1,
        "uptime_seconds": 1, "agent_version": "0"});
    let (s, v) = c.post(
        "/agent/v1/heartbeat",
        json!({"agent_version": "0", "facts": facts}),
    );
    assert_eq!(s, 204, "{v}");
}

/// `GET path`: `(status, body, next cursor)`.
fn get_page(c: &Client, path: &str) -> (u16, Value, Option<String>) {
    let (s, headers, body) = c.get_with(path, &[]);
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let next = headers.get(NEXT).map(|h| h.to_str().unwrap().to_string());
    (s, v, next)
}

/// Every row of a list, page by page (`path` has a `?`); also how many pages it took.
/// `between` runs after the first page (to add rows meanwhile).
fn all_pages(c: &Client, path: &str, mut between: impl FnMut()) -> (Vec<Value>, usize) {
    let (mut rows, mut pages) = (Vec::new(), 0);
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(k) => format!("{path}&cursor={k}"),
            None => path.to_string(),
        };
        let (s, v, next) = get_page(c, &url);
        assert_eq!(s, 200, "{url}: {v}");
        rows.extend(v.as_array().expect("a list is an array").iter().cloned());
        pages += 1;
        if pages == 1 {
            between();
        }
        match next {
            Some(k) => cursor = Some(k),
            None => return (rows, pages),
        }
    }
}

fn ids(rows: &[Value], field: &str) -> Vec<String> {
    rows.iter()
        .map(|r| r[field].as_str().unwrap().to_string())
        .collect()
}

fn refused(c: &Client, path: &str) -> String {
    let (s, v) = c.get(path);
    assert_eq!(
        (s, v["error_code"].as_str()),
        (400, Some("INVALID_PARAMETER")),
        "{path}: {v}"
    );
    v["error_msg"].as_str().unwrap().to_string()
}

fn script_run() -> Value {
    json!({"command_content": "true", "command_type": "sh"})
}

#[test]
fn task_lists_page_newest_first_without_skipping_or_repeating_and_filter() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    for (m, p) in [("m1", "p1"), ("m2", "p1"), ("m3", "p2")] {
        known_machine(&env, &ctl, m, p);
    }
    let mut p1: Vec<String> = (0..7).map(|_| op.execute("p1", script_run())).collect();
    let p2: Vec<String> = (0..3).map(|_| op.execute("p2", script_run())).collect();
    let cancelled: Vec<String> = p1[..2].to_vec();
    for id in &cancelled {
        let (s, v) = op.post(&format!("/v1/tasks/{id}/cancel"), json!({}));
        assert_eq!(s, 200, "{v}");
    }

    // Pages of 3 over 10 tasks, one more task created after the first page.
    let mut added = None;
    let (rows, pages) = all_pages(&op, "/v1/tasks?limit=3", || {
        added = Some(op.execute("p1", script_run()));
    });
    let seen = ids(&rows, "task_id");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a row twice: {seen:?}");
    for id in p1.iter().chain(&p2) {
        assert!(seen.contains(id), "{id} missing from {seen:?}");
    }
    let added = added.unwrap();
    assert!(
        !seen.contains(&added),
        "a task newer than the first page appeared in a later one"
    );
    assert_eq!((seen.len(), pages), (10, 4));
    // Newest first; the id breaks ties within a millisecond.
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["created_at"].as_str().unwrap().into(),
                r["task_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(keys, sorted);
    p1.push(added);

    // The row itself: machines counted by state, who made it.
    let (_, all, next) = get_page(&op, "/v1/tasks");
    assert_eq!(next, None, "one page of 11 rows under the default limit");
    let one = all
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == p2[0].as_str())
        .unwrap();
    assert_eq!(one["kind"], "script_execution");
    assert_eq!(one["pool_id"], "p2");
    assert_eq!(one["created_by"], "op");
    let counts = one["machine_states"].as_object().unwrap();
    assert_eq!(
        counts.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        1,
        "{one}"
    );

    // Filters.
    let (rows, _) = all_pages(&op, "/v1/tasks?pool_id=p2&limit=2", || {});
    assert_eq!(
        ids(&rows, "task_id").into_iter().collect::<HashSet<_>>(),
        p2.iter().cloned().collect()
    );
    // A cancelled task is CANCELLING until its dispatched machines end (here: when the
    // controller gives up on them), then CANCELLED; it only ever moves that way, so asking
    // for CANCELLING first and CANCELLED next finds each one at least once.
    let mut found = HashSet::new();
    for state in ["CANCELLING", "CANCELLED"] {
        let (rows, _) = all_pages(&op, &format!("/v1/tasks?state={state}&limit=1"), || {});
        for r in &rows {
            assert_eq!(r["state"], state, "{r}");
            assert_eq!(r["cancelled_by"], "op", "{r}");
            let n: u64 = r["machine_states"]
                .as_object()
                .unwrap()
                .values()
                .map(|n| n.as_u64().unwrap())
                .sum();
            assert_eq!(n, 2, "{r}");
            found.insert(r["task_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(found, cancelled.iter().cloned().collect());
    let (s, v, _) = get_page(&op, "/v1/tasks?kind=image_stage");
    assert_eq!((s, v), (200, json!([])));
    let (_, v, _) = get_page(&op, "/v1/tasks?kind=script_execution&pool_id=p1");
    assert_eq!(v.as_array().unwrap().len(), p1.len());
    // created_after: strictly newer than the given time.
    let newest_p2 = op.task(&p2[2]);
    let at = newest_p2["created_at"].as_str().unwrap();
    let (_, v, _) = get_page(&op, &format!("/v1/tasks?created_after={at}"));
    for t in v.as_array().unwrap() {
        assert!(t["created_at"].as_str().unwrap() > at, "{t}");
    }
    assert!(ids(v.as_array().unwrap(), "task_id").contains(&p1[7]));

    // Bad parameters name themselves.
    for (path, word) in [
        ("/v1/tasks?limit=0", "limit"),
        ("/v1/tasks?limit=1001", "limit"),
        ("/v1/tasks?limit=many", "limit"),
        ("/v1/tasks?cursor=nope", "cursor"),
        ("/v1/tasks?state=DONE", "state"),
        ("/v1/tasks?kind=nap", "kind"),
        ("/v1/tasks?created_after=yesterday", "created_after"),
        ("/v1/tasks?pool=p1", "pool"),
        ("/v1/machines?limit=0", "limit"),
        ("/v1/machines?online=maybe", "online"),
        ("/v1/scripts?limit=2000", "limit"),
        ("/v1/audit?cursor=zz", "cursor"),
    ] {
        let msg = refused(&op, path);
        assert!(
            msg.starts_with(word) || msg.contains(&format!("\"{word}\"")),
            "{path}: {msg}"
        );
    }
    // A cursor of one list is not one of another.
    let (_, _, next) = get_page(&op, "/v1/tasks?limit=1");
    let msg = refused(&op, &format!("/v1/audit?cursor={}", next.unwrap()));
    assert!(msg.contains("cursor"), "{msg}");
}

#[test]
fn machines_pools_and_scripts_are_listed() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    for (m, p) in [("m1", "p1"), ("m2", "p1"), ("m3", "p2")] {
        known_machine(&env, &ctl, m, p);
    }
    // Without parameters: every machine, one array, as before lists had pages.
    let (s, all, next) = get_page(&op, "/v1/machines");
    assert_eq!((s, next), (200, None));
    assert_eq!(
        ids(all.as_array().unwrap(), "machine_id"),
        ["m1", "m2", "m3"]
    );
    let (rows, pages) = all_pages(&op, "/v1/machines?limit=2", || {});
    assert_eq!(
        (ids(&rows, "machine_id"), pages),
        (vec!["m1".into(), "m2".into(), "m3".into()], 2)
    );
    let (_, v, _) = get_page(&op, "/v1/machines?pool_id=p1");
    assert_eq!(ids(v.as_array().unwrap(), "machine_id"), ["m1", "m2"]);
    // `online` splits the fleet (each machine on one side or, if it changed in between,
    // both: never neither).
    let mut sides = HashSet::new();
    for o in ["true", "false"] {
        let (rows, _) = all_pages(&op, &format!("/v1/machines?online={o}&limit=1"), || {});
        for r in rows {
            assert_eq!(r["online"].to_string(), o, "{r}");
            sides.insert(r["machine_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(sides.len(), 3, "{sides:?}");

    // Pools: every pool with machines; one pool with its members; 404 for nobody's.
    let (s, pools) = op.get("/v1/pools");
    assert_eq!(s, 200, "{pools}");
    let summary: Vec<(String, u64)> = pools
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pool_id"].as_str().unwrap().into(),
                p["machines"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(summary, [("p1".to_string(), 2), ("p2".to_string(), 1)]);
    let (_, status) = op.get("/v1/pools/p1/provisioning-status");
    assert_eq!(pools[0]["provisioning"], status);
    assert_eq!(status["operation"], "NONE");
    let (s, p1) = op.get("/v1/pools/p1");
    assert_eq!(s, 200, "{p1}");
    assert_eq!(p1["machines"], json!(["m1", "m2"]));
    assert!(p1["online"].as_u64().unwrap() <= 2);
    assert_eq!(p1["provisioning"], status);
    let (s, v) = op.get("/v1/pools/nobody");
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{v}"
    );

    // Scripts: newest first in pages, one with its content, 404 for an unknown one.
    let made: Vec<String> = (0..3)
        .map(|i| op.script(&format!("s{i}"), "sh", &format!("echo {i}")))
        .collect();
    let (rows, pages) = all_pages(&op, "/v1/scripts?limit=2", || {});
    assert_eq!(pages, 2);
    assert_eq!(
        ids(&rows, "script_id").into_iter().collect::<HashSet<_>>(),
        made.iter().cloned().collect()
    );
    assert!(rows.iter().all(|r| r.get("content").is_none()), "{rows:?}");
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["created_at"].as_str().unwrap().into(),
                r["script_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(keys, sorted);
    let (s, one) = op.get(&format!("/v1/scripts/{}", made[1]));
    assert_eq!(s, 200, "{one}");
    assert_eq!(
        (one["name"].as_str(), one["content"].as_str()),
        (Some("s1"), Some("echo 1"))
    );
    assert_eq!(one["command_type"], "sh");
    assert_eq!(one["sha256"].as_str().unwrap().len(), 64);
    let (s, v) = op.get("/v1/scripts/nope");
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("SCRIPT_NOT_FOUND")),
        "{v}"
    );
}

#[test]
fn the_audit_trail_names_each_operator_and_keeps_no_secret() {
    let env = Env::new();
    let out = run(
        CONTROLLER,
        &[
            "pki",
            "issue",
            "--dir",
            env.pki.to_str().unwrap(),
            "--operator",
            "op2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let op2 = env.client(&ctl, Some(("operators/op2.pem", "operators/op2-key.pem")));
    known_machine(&env, &ctl, "m1", "p1");

    let token = env.token(&ctl, json!({"pool_id": "p1", "uses": 1}));
    let (token_id, secret) = token.split_once('.').unwrap();
    let (s, v) = op2.call(
        http::Method::DELETE,
        &format!("/v1/enrollment-tokens/{token_id}"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let script = op.script("hello", "sh", "echo hello");
    let task = op2.execute("p1", json!({"script_ids": [script]}));
    let (s, v) = op.post(&format!("/v1/tasks/{task}/cancel"), json!({}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["created_by"].as_str(), v["cancelled_by"].as_str()),
        (Some("op2"), Some("op"))
    );
    let t = op.task(&task);
    assert_eq!(
        (t["created_by"].as_str(), t["cancelled_by"].as_str()),
        (Some("op2"), Some("op"))
    );
    let (s, v) = op2.put("/v1/settings", json!({"force_logoff_grace_seconds": 60}));
    assert_eq!(s, 200, "{v}");
    let sha = op.upload(b"some bytes");
    // A refused action is no action: nothing recorded.
    let (s, _) = op2.post(&format!("/v1/tasks/{task}/cancel"), json!({}));
    assert_eq!(s, 409);

    let (s, all, next) = get_page(&op, "/v1/audit");
    assert_eq!((s, next), (200, None), "{all}");
    let rows = all.as_array().unwrap();
    let got: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["operator"].as_str().unwrap().into(),
                r["action"].as_str().unwrap().into(),
                r["target"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("op", "enrollment_token_create", token_id),
        ("op2", "enrollment_token_delete", token_id),
        ("op", "script_create", script.as_str()),
        ("op2", "task_create", task.as_str()),
        ("op", "task_cancel", task.as_str()),
        ("op2", "settings_change", "force_logoff_grace_seconds"),
        ("op", "blob_upload", sha.as_str()),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(
        got.iter().cloned().collect::<HashSet<_>>(),
        want.iter().cloned().collect::<HashSet<_>>(),
        "{all:#}"
    );
    assert_eq!(got.len(), want.len(), "{all:#}");
    // Newest first (times and ids descending).
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["at"].as_str().unwrap().into(),
                r["audit_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(keys, sorted);
    // The request is kept; the token's secret never is.
    let exec = rows.iter().find(|r| r["action"] == "task_create").unwrap();
    assert_eq!(exec["request"]["script_ids"], json!([script]), "{exec}");
    let made = rows
        .iter()
        .find(|r| r["action"] == "enrollment_token_create")
        .unwrap();
    assert_eq!(made["request"]["pool_id"], "p1");
    assert!(
        !all.to_string().contains(secret),
        "the secret is in the trail: {all}"
    );
    // Pages of 2 give the same rows.
    let (paged, pages) = all_pages(&op, "/v1/audit?limit=2", || {});
    assert_eq!(pages, 4);
    assert_eq!(&paged, rows);
}
