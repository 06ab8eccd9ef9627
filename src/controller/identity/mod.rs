//! Fleet identity on the controller: enrollment tokens, enrollment and renewal (the
//! controller signs with its issuing CA), operator moves between pools, decommission and
//! revocation, and the gate every agent request passes (revoked, decommissioned, two live
//! agents behind one certificate).
//!
//! What a machine belongs to is decided here and only here: a pool comes from the token a
//! machine enrolled with, the pool bound in a hand-issued certificate, or an operator's
//! `PUT /v1/machines/{id}/pool`. Nothing an agent sends moves it.
//!
//! `gate`: what every agent request passes (revocations, sessions, conflicts) and the
//! enrollment rate limit; `enroll`: tokens, enrollment and renewal; `fleet`: operator moves,
//! decommission and revocation.

mod enroll;
mod fleet;
mod gate;

pub use enroll::{create_token, delete_token, enroll, list_tokens, renew};
pub use fleet::{decommission, list_revocations, move_machine, revoke};
pub use gate::{conflict_error, gate, gate_holding, AgentCall, Gate, RateLimit, Revoked, Session};

use sha2::{Digest, Sha256};

use crate::sys::clock;

pub(crate) const DEFAULT_TOKEN_SECONDS: i64 = 86_400;
pub(crate) const MAX_TOKEN_SECONDS: i64 = 366 * 86_400;

pub(crate) fn now_ms() -> i64 {
    clock::unix_ms(clock::now())
}

pub(crate) fn ms_text(ms: i64) -> String {
    clock::from_unix_ms(ms)
        .map(clock::rfc3339)
        .unwrap_or_default()
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}
