//! Failover between controller replicas: an agent whose first `controller_urls` entry is
//! dead moves on to the live controller, takes and reports work there, and `fieldhand status`
//! names the controller in use. Without failover it would stay on the dead URL and never
//! come online.

use std::time::Duration;

use serde_json::json;

use crate::support::{machine_of, run, Env, AGENT};

const T: Duration = Duration::from_secs(60);

#[test]
fn an_agent_fails_over_from_a_dead_url_to_the_live_controller() {
    let env = Env::new();
    let ctl = env.controller();
    // A port nothing listens on: bound to learn a free one, then closed (connect refused).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let live = ctl.url();
    let a = env.agent_with(
        &ctl,
        "m1",
        "pool-f",
        &format!("controller_urls = [\"{dead}\", \"{live}\"]\n"),
    );
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let task = op.execute(
        "pool-f",
        json!({"command_content": "echo replica-ok", "command_type": "sh", "execution_timeout": 30}),
    );
    let t = op.wait_task(&task, T);
    let m = machine_of(&t, "m1");
    assert_eq!(m["state"], "SUCCEEDED", "{m:#}");
    assert!(
        m["stdout"].as_str().unwrap().contains("replica-ok"),
        "{m:#}"
    );

    let s = a.status();
    assert_eq!(s["controller_url"], live.as_str(), "{s:#}");
    assert_eq!(s["controller_urls"], json!([dead, live]), "{s:#}");
    assert_eq!(s["link"], "connected", "{s:#}");
    let out = run(AGENT, &["status", "--socket", a.socket.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("controller:") && l.contains(&live) && !l.contains(&dead)),
        "{text}"
    );
    assert!(
        a.log().contains("failing over"),
        "the move is logged: {}",
        a.log()
    );
}
