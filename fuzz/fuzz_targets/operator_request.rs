//! Fuzz target: operator request bodies through the API's parser and validation (script
//! executions, image pushes, rebuilds, enrollment tokens, moves, revocations). No input may
//! panic, and a refusal always names what was wrong.
#![no_main]

use fieldhand::controller::api::{parse_json, validate_execution};
use fieldhand::proto::api;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let named = |e: fieldhand::controller::api::ApiError| {
        assert!(!e.msg.is_empty(), "a refusal without a message");
        assert!(e.status.is_client_error(), "{}: {}", e.status, e.msg);
    };
    match parse_json::<api::CreateScriptExecution>(data) {
        Ok(req) => {
            if let Err(e) = validate_execution(&req) {
                named(e)
            }
        }
        Err(e) => named(e),
    }
    if let Ok(req) = parse_json::<api::PushImage>(data) {
        if let Err(e) = fieldhand::controller::images::validate_push(&req) {
            named(e)
        }
    }
    if let Ok(req) = parse_json::<api::RebuildDesktops>(data) {
        if let Err(e) = fieldhand::controller::rebuild::validate(&req) {
            named(e)
        }
    }
    let _ = parse_json::<api::CreateEnrollmentToken>(data);
    let _ = parse_json::<api::MoveMachine>(data);
    let _ = parse_json::<api::Revoke>(data);
    let _ = parse_json::<api::DesiredSoftware>(data);
    let _ = parse_json::<api::CreateScript>(data);
});
