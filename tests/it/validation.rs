//! Every validation rule of the operator API, each answered with `{error_code, error_msg}`, the
//! right status, and a message naming the field and value.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::Env;

#[test]
fn script_execution_validation_rules() {
    let env = Env::new();
    let ctl = env.controller();
    let _a: Vec<_> = ["m1", "m2"]
        .iter()
        .map(|id| env.agent(&ctl, id, "pool-v"))
        .collect();
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2"], Duration::from_secs(60));
    let script = op.script("ok", "sh", "true");
    let ok = || json!({"command_content": "true", "command_type": "sh"});
    let with = |extra: Value| {
        let mut v = ok();
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v
    };
    let cases: Vec<(&str, Value, u16, &str, &[&str])> = vec![
        (
            "pool-v",
            with(json!({"script_ids": [script]})),
            400,
            "INVALID_PARAMETER",
            &["script_ids", "command_content"],
        ),
        (
            "pool-v",
            json!({}),
            400,
            "INVALID_PARAMETER",
            &["script_ids", "command_content"],
        ),
        (
            "pool-v",
            with(json!({"command_type": null})),
            400,
            "INVALID_PARAMETER",
            &["command_type"],
        ),
        (
            "pool-v",
            with(json!({"command_type": "perl"})),
            400,
            "INVALID_PARAMETER",
            &["command_type", "perl"],
        ),
        (
            "pool-v",
            json!({"script_ids": [script], "command_type": "sh"}),
            400,
            "INVALID_PARAMETER",
            &["command_type"],
        ),
        (
            "pool-v",
            with(json!({"gray_count": 3})),
            400,
            "INVALID_PARAMETER",
            &["gray_count", "3"],
        ),
        (
            "pool-v",
            with(json!({"gray_count": 0})),
            400,
            "INVALID_PARAMETER",
            &["gray_count", "0"],
        ),
        (
            "pool-v",
            with(json!({"gray_desktop_ids": ["m9"]})),
            400,
            "INVALID_PARAMETER",
            &["gray_desktop_ids", "m9"],
        ),
        (
            "pool-v",
            with(json!({"gray_fail_threshold": 1})),
            400,
            "INVALID_PARAMETER",
            &["gray_fail_threshold"],
        ),
        (
            "pool-v",
            with(json!({"gray_count": 1, "gray_fail_threshold": 0})),
            400,
            "INVALID_PARAMETER",
            &["gray_fail_threshold", "0"],
        ),
        (
            "pool-v",
            with(json!({"pre_start": "hibernate"})),
            400,
            "INVALID_PARAMETER",
            &["pre_start", "hibernate"],
        ),
        (
            "pool-v",
            with(json!({"post_finish": "logoff"})),
            400,
            "INVALID_PARAMETER",
            &["post_finish", "logoff"],
        ),
        (
            "pool-v",
            with(json!({"logoff_policy": "NEVER"})),
            400,
            "INVALID_PARAMETER",
            &["logoff_policy", "NEVER"],
        ),
        (
            "pool-v",
            with(json!({"logoff_timeout_seconds": 0})),
            400,
            "INVALID_PARAMETER",
            &["logoff_timeout_seconds", "0"],
        ),
        (
            "pool-v",
            with(json!({"execution_timeout_seconds": 0})),
            400,
            "INVALID_PARAMETER",
            &["execution_timeout_seconds", "0"],
        ),
        (
            "pool-v",
            with(json!({"execution_timeout_seconds": 172801})),
            400,
            "INVALID_PARAMETER",
            &["execution_timeout_seconds", "172801"],
        ),
        (
            "pool-v",
            with(json!({"execution_timeout": 0})),
            400,
            "INVALID_PARAMETER",
            &["execution_timeout", "0"],
        ),
        (
            "pool-v",
            with(json!({"gray_count": "one"})),
            400,
            "INVALID_PARAMETER",
            &["gray_count"],
        ),
        (
            "pool-v",
            with(json!({"surprise": true})),
            400,
            "INVALID_PARAMETER",
            &["surprise"],
        ),
        ("pool-empty", ok(), 404, "POOL_NOT_FOUND", &["pool-empty"]),
        (
            "pool-v",
            json!({"script_ids": ["nope"]}),
            404,
            "SCRIPT_NOT_FOUND",
            &["script_ids", "nope"],
        ),
        ("bad pool!", ok(), 400, "INVALID_PARAMETER", &["pool_id"]),
    ];
    for (pool, body, status, code, words) in cases {
        let (st, v) = op.post(
            &format!("/v1/pools/{}/script-executions", pool.replace(' ', "%20")),
            body.clone(),
        );
        assert_eq!(st, status, "{body} -> {v}");
        assert_eq!(v["error_code"], code, "{body} -> {v}");
        let msg = v["error_msg"].as_str().unwrap();
        for w in words {
            assert!(msg.contains(w), "{body}: message {msg:?} should name {w:?}");
        }
    }
    // Nothing was created by the refused requests: a valid one is the first task the pool runs.
    let task = op.execute("pool-v", ok());
    assert_eq!(
        op.wait_task(&task, Duration::from_secs(60))["state"],
        "SUCCEEDED"
    );
}

#[test]
fn other_operator_api_errors() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let (st, v) = op.get("/v1/tasks/does-not-exist");
    assert_eq!(
        (st, v["error_code"].as_str()),
        (404, Some("TASK_NOT_FOUND"))
    );
    assert!(v["error_msg"].as_str().unwrap().contains("does-not-exist"));
    let (st, v) = op.post("/v1/tasks/does-not-exist/cancel", json!({}));
    assert_eq!(st, 404, "{v}");
    let (st, v) = op.post(
        "/v1/scripts",
        json!({"name": "x", "command_type": "zsh", "content": "true"}),
    );
    assert_eq!(st, 400);
    assert!(v["error_msg"].as_str().unwrap().contains("zsh"));
    let (st, v) = op.post(
        "/v1/scripts",
        json!({"name": "x", "command_type": "sh", "content": ""}),
    );
    assert_eq!(st, 400);
    assert!(v["error_msg"].as_str().unwrap().contains("content"));
    let (st, v) = op.post(
        "/v1/scripts",
        json!({"name": "x", "command_type": "sh", "content": "true"}),
    );
    assert_eq!(st, 200);
    assert_eq!(v["sha256"], sha256_of("true"));
    let (st, v) = op.get("/v1/nothing-here");
    assert_eq!((st, v["error_code"].as_str()), (404, Some("NOT_FOUND")));
    let (st, v) = op.get("/v1/machines");
    assert_eq!((st, v), (200, json!([])));
}

fn sha256_of(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[test]
fn one_error_vocabulary_and_405_for_a_known_path() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    // A known path with the wrong method: 405 with Allow; an unknown path: 404.
    // (`GET /v1/scripts` is a list now: a POST-only path serves the check.)
    let (s, h, body) = op.get_with("/v1/desktops/rebuild", &[]);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (s, v["error_code"].as_str()),
        (405, Some("METHOD_NOT_ALLOWED")),
        "{v}"
    );
    assert_eq!(h[http::header::ALLOW], "POST");
    let (s, v) = op.get("/v1/nothing-here");
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{v}"
    );
    // Every route the table names is served for its method (never 405 or "no route").
    for (m, pattern) in fieldhand::controller::router::ROUTES {
        if !pattern.starts_with("v1/") {
            continue;
        }
        let path = format!("/{}", pattern.replace('*', "x"));
        let method: http::Method = m.parse().unwrap();
        let (s, v) = op.call(method, &path, Some(json!({})));
        assert_ne!(s, 405, "{m} {path}: {v}");
        assert!(
            !v["error_msg"]
                .as_str()
                .unwrap_or("")
                .starts_with("no route"),
            "{m} {path}: {v}"
        );
    }
    // The same condition gets the same answer from every operation: a pool with no machines.
    let (s1, v1) = op.post(
        "/v1/pools/empty/script-executions",
        json!({"command_content": "true", "command_type": "sh"}),
    );
    let (s, img) = op.post("/v1/images", json!({"name": "i", "version": "1", "os_type": "linux", "gpu": false, "sha256": op.upload(b"img")}));
    assert_eq!(s, 200, "{img}");
    let (s2, v2) = op.post(
        "/v1/pools/empty/push-image",
        json!({"image_id": img["image_id"]}),
    );
    assert_eq!(
        (s1, v1["error_code"].clone()),
        (s2, v2["error_code"].clone()),
        "{v1} {v2}"
    );
    assert_eq!(
        (s1, v1["error_code"].as_str()),
        (404, Some("POOL_NOT_FOUND"))
    );
    // Bad fields are INVALID_PARAMETER everywhere, staging included.
    let (s, v) = op.post("/v1/hosts/-bad/software/stage", json!({}));
    assert_eq!(
        (s, v["error_code"].as_str()),
        (400, Some("INVALID_PARAMETER")),
        "{v}"
    );
}
