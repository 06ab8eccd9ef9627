//! Fuzz target: decoding the agent protocol on both ends (what a controller sends an agent,
//! what an agent sends a controller) and the agent's checks of an offered assignment. No
//! input may panic.
#![no_main]

use fieldhand::controller::api::parse_json;
use fieldhand::proto::agent::{
    EnrollRequest, EventBatch, Heartbeat, PollRequest, PollResponse, RenewRequest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Controller side: every agent body goes through the API's own parser.
    let _ = parse_json::<PollRequest>(data);
    let _ = parse_json::<Heartbeat>(data);
    let _ = parse_json::<EnrollRequest>(data);
    let _ = parse_json::<RenewRequest>(data);
    if let Ok(batch) = parse_json::<EventBatch>(data) {
        for ev in &batch.events {
            let _ = serde_json::to_vec(ev);
        }
    }
    // Agent side: an answer to a poll, then the checks before an assignment is accepted.
    if let Ok(resp) = serde_json::from_slice::<PollResponse>(data) {
        for a in &resp.assignments {
            let _ = fieldhand::agent::machine::validate(a);
        }
    }
    // The session header the controller parses from every agent request.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = fieldhand::controller::identity::Session::from_header(Some(s));
    }
});
