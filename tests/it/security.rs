//! Mutual TLS and identity: who may call what, taken only from the verified certificate.

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::support::{machine_of, Env};

const T: Duration = Duration::from_secs(60);

#[test]
fn mtls_rejections() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = env.agent(&ctl, "a1", "pool-s");
    let _b = env.agent(&ctl, "b1", "pool-s");
    let op = env.operator(&ctl);
    op.wait_online(&["a1", "b1"], T);

    // No client certificate: nothing but enrollment is served, on either API.
    let anon = env.client(&ctl, None);
    for (m, path) in [
        (Method::GET, "/v1/machines"),
        (Method::POST, "/agent/v1/poll"),
        (Method::GET, "/agent/v1/blobs/00"),
        (Method::POST, "/v1/enrollment-tokens"),
    ] {
        let (status, v) = anon.call(m, path, Some(json!({})));
        assert_eq!(
            (status, v["error_code"].as_str()),
            (401, Some("CERTIFICATE_REQUIRED")),
            "{path}: {v}"
        );
    }

    // A certificate from another CA: refused too.
    let other = Env::new();
    other.issue_agent("a1");
    let foreign_tls = fieldhand::tls::client_config(
        &env.pki.join("ca.pem"),
        &other.pki.join("operators/op.pem"),
        &other.pki.join("operators/op-key.pem"),
    )
    .unwrap();
    let foreign = env.client_with(&ctl, foreign_tls);
    assert!(foreign.try_call(Method::GET, "/v1/machines", None).is_err());

    // An agent certificate on the operator API, and an operator on the agent protocol.
    let agent_a = env.agent_client(&ctl, "a1");
    let (status, v) = agent_a.get("/v1/machines");
    assert_eq!(
        (status, v["error_code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{v}"
    );
    assert!(v["error_msg"].as_str().unwrap().contains("agent"));
    let (status, v) = op.post(
        "/agent/v1/poll",
        json!({"pool_id": "pool-s", "agent_version": "x", "wait_ms": 0}),
    );
    assert_eq!(status, 403, "{v}");

    // Agent A asking for, and reporting on, B's work.
    let task = op.execute(
        "pool-s",
        json!({"command_content": "sleep 2", "command_type": "sh", "gray_desktop_ids": ["b1"]}),
    );
    op.wait_machine_state(&task, "b1", "RUNNING", T);
    let b_assignment = {
        let agent_b = env.agent_client(&ctl, "b1");
        // Assignment ids are only ever shown to their machine: read B's from its state file.
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.path().join("agents/b1/state/state.json")).unwrap(),
        )
        .unwrap();
        let id = state["running"]["assignment"]["assignment_id"]
            .as_str()
            .unwrap()
            .to_string();
        let (status, v) = agent_b.get(&format!("/agent/v1/assignments/{id}"));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["task_id"], task.as_str());
        id
    };
    let (status, v) = agent_a.get(&format!("/agent/v1/assignments/{b_assignment}"));
    assert_eq!(
        (status, v["error_code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{v}"
    );
    let forged = json!({"events": [{
        "idempotency_key": format!("{b_assignment}:result"),
        "assignment_id": b_assignment,
        "at": "2026-01-01T00:00:00Z",
        "body": {"type": "RESULT", "state": "FAILED", "exit_code": 1, "stdout": "", "stderr": "",
                 "output_truncated": false, "started_at": null, "finished_at": "2026-01-01T00:00:00Z",
                 "error_code": "FORGED", "error_msg": "forged"}
    }]});
    let (status, v) = agent_a.post("/agent/v1/events", forged);
    assert_eq!(status, 403, "{v}");
    // A's long-poll never returns B's work.
    let (status, v) = agent_a.post(
        "/agent/v1/poll",
        json!({"pool_id": "pool-s", "agent_version": "x", "wait_ms": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["assignments"], json!([]));
    let t = op.wait_task(&task, T);
    assert_eq!(
        machine_of(&t, "b1")["state"],
        "SUCCEEDED",
        "the forged result was not applied: {t:#}"
    );
}
