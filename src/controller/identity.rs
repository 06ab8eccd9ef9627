//! Fleet identity on the controller: enrollment tokens, enrollment and renewal (the
//! controller signs with its issuing CA), operator moves between pools, decommission and
//! revocation, and the gate every agent request passes (revoked, decommissioned, two live
//! agents behind one certificate).
//!
//! What a machine belongs to is decided here and only here: a pool comes from the token a
//! machine enrolled with, the pool bound in a hand-issued certificate, or an operator's
//! `PUT /v1/machines/{id}/pool`. Nothing an agent sends moves it.

use std::collections::HashSet;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use http::StatusCode;
use sha2::{Digest, Sha256};

use super::api::{parse_json, ApiError};
use super::engine;
use super::rollout::MachineState;
use super::store::{EnrollmentTokenRow, Outcome, RevocationRow, Store, StoreError, TokenCheck, Tx};
use super::Controller;
use crate::pki::Identity;
use crate::proto::agent::{EnrollRequest, Enrolled, RenewRequest};
use crate::proto::api;
use crate::sys::clock;
use crate::tls::CertInfo;

pub const IDENTITY_CONFLICT: &str = "IDENTITY_CONFLICT";
pub const CERT_REVOKED: &str = "CERT_REVOKED";
pub const MACHINE_DECOMMISSIONED: &str = "MACHINE_DECOMMISSIONED";
pub const MACHINE_ID_TAKEN: &str = "MACHINE_ID_TAKEN";
pub const INVALID_TOKEN: &str = "INVALID_TOKEN";
pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
pub const TOKEN_USED_UP: &str = "TOKEN_USED_UP";

const DEFAULT_TOKEN_SECONDS: i64 = 86_400;
const MAX_TOKEN_SECONDS: i64 = 366 * 86_400;

fn now_ms() -> i64 {
    clock::unix_ms(clock::now())
}

fn ms_text(ms: i64) -> String {
    clock::from_unix_ms(ms)
        .map(clock::rfc3339)
        .unwrap_or_default()
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Revoked serials, held in memory so every request is checked without a query, and
/// reloaded from the store every second so a revocation made through another replica (or
/// before a restart) holds everywhere.
#[derive(Default)]
pub struct Revoked {
    serials: RwLock<HashSet<String>>,
    since_ms: Mutex<i64>,
}

impl Revoked {
    pub fn contains(&self, serial: &str) -> bool {
        self.serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    pub fn insert(&self, serial: String) {
        self.serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(serial);
    }

    /// Loads revocations recorded since the last load (all of them the first time).
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let since = *self.since_ms.lock().unwrap_or_else(|p| p.into_inner());
        let rows = store.tx(move |tx| tx.revocations_since(since)).await?;
        let mut newest = since;
        for (serial, ms) in rows {
            newest = newest.max(ms);
            self.insert(serial);
        }
        // Revocations at the same millisecond as the newest are read again next time, so
        // one committed just after this read is not skipped.
        *self.since_ms.lock().unwrap_or_else(|p| p.into_inner()) = newest;
        Ok(())
    }
}

/// A token bucket: enrollment is reachable without a certificate, so it is rate-limited.
pub struct RateLimit {
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        let burst = f64::from(per_second) * 2.0;
        RateLimit {
            per_second: f64::from(per_second),
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token; `Err(wait)` when there is none.
    pub fn take(&self) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let burst = self.per_second * 2.0;
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_second).min(burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.0) / self.per_second))
        }
    }
}

/// An agent's session, from its `fieldhand-session` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub key: String,
    pub instance: String,
}

impl Session {
    /// `None` for agents of protocol 1, which send no header: they are tracked as one
    /// session, as before.
    pub fn from_header(value: Option<&str>) -> Result<Option<Session>, ApiError> {
        let Some(v) = value else { return Ok(None) };
        let ok = v.len() <= 200
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        let instance = v.split_once('.').map(|(i, _)| i).unwrap_or("");
        if !ok || instance.is_empty() {
            return Err(ApiError::invalid(format!(
                "header {}: {v:?} is not <instance_id>.<boot_id>",
                crate::proto::agent::SESSION_HEADER
            )));
        }
        Ok(Some(Session {
            key: v.to_string(),
            instance: instance.to_string(),
        }))
    }

    fn legacy() -> Session {
        Session {
            key: "legacy".into(),
            instance: "legacy".into(),
        }
    }
}

/// Who an agent request comes from, as the router established it.
#[derive(Debug, Clone)]
pub struct AgentCall {
    pub machine_id: String,
    pub cert: CertInfo,
    pub session: Option<Session>,
}

impl AgentCall {
    /// The session assignments are bound to.
    pub fn session(&self) -> Session {
        self.session.clone().unwrap_or_else(Session::legacy)
    }
}

/// The outcome of [`gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub conflict: bool,
}

/// Every agent request passes here, inside its transaction: a decommissioned machine is
/// refused; a session's request is recorded and judged. `contact` records the machine
/// (polls and heartbeats, which carry the agent's version and facts).
pub fn gate(
    tx: &mut Tx<'_>,
    call: &AgentCall,
    contact: Option<(&str, Option<&str>)>,
    now_ms: i64,
    quiet: Duration,
) -> Result<Gate, ApiError> {
    gate_holding(tx, call, contact, now_ms, quiet, None)
}

/// [`gate`] for a long poll that will wait until `hold_until_ms`.
pub fn gate_holding(
    tx: &mut Tx<'_>,
    call: &AgentCall,
    contact: Option<(&str, Option<&str>)>,
    now_ms: i64,
    quiet: Duration,
    hold_until_ms: Option<i64>,
) -> Result<Gate, ApiError> {
    let decommissioned = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            MACHINE_DECOMMISSIONED,
            format!(
                "machine {:?} was decommissioned; enroll it again with a token",
                call.machine_id
            ),
        )
    };
    match contact {
        Some((version, facts)) => {
            let known = tx.record_contact(
                &call.machine_id,
                call.cert.pool.as_deref(),
                &call.cert.serial,
                call.cert.not_after_ms,
                version,
                facts,
                now_ms,
            )?;
            if !known {
                return Err(decommissioned());
            }
        }
        None => {
            if let Some((_, Some(_))) = tx.machine(&call.machine_id)? {
                return Err(decommissioned());
            }
        }
    }
    let Some(s) = &call.session else {
        return Ok(Gate { conflict: false });
    };
    let v = tx.touch_session(
        &call.machine_id,
        &s.key,
        &s.instance,
        now_ms,
        quiet.as_millis() as i64,
        hold_until_ms,
    )?;
    if v.noticed_now {
        tracing::warn!(
            machine_id = %call.machine_id,
            serial = %call.cert.serial,
            "identity conflict: two live agents present this machine's certificate; nothing \
             new is dispatched to it until only one is left"
        );
    }
    Ok(Gate {
        conflict: v.conflict,
    })
}

pub fn conflict_error(machine_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        IDENTITY_CONFLICT,
        format!(
            "another live agent presents the certificate of machine {machine_id:?} (a cloned \
             identity); no work is handed out until only one is left. A clone with an \
             enrollment token re-enrolls under its own machine_id"
        ),
    )
}

fn random_hex(bytes: usize) -> Result<String, ApiError> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ApiError::internal("the system random source failed"))?;
    Ok(hex::encode(b))
}

fn token_view(t: &EnrollmentTokenRow) -> api::EnrollmentToken {
    api::EnrollmentToken {
        token_id: t.token_id.clone(),
        pool_id: t.pool_id.clone(),
        uses_left: t.uses_left,
        expires_at: ms_text(t.expires_ms),
        created_at: ms_text(t.created_ms),
        created_by: t.created_by.clone(),
    }
}

/// `POST /v1/enrollment-tokens`.
pub async fn create_token(
    ctl: &Controller,
    operator: &Identity,
    req: api::CreateEnrollmentToken,
) -> Result<api::EnrollmentTokenCreated, ApiError> {
    crate::pki::validate_name("pool_id", &req.pool_id)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let uses = match req.uses {
        None => None,
        Some(n) if (1..=1_000_000).contains(&n) => Some(n as u32),
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "uses {n} must be 1..=1000000 (leave it out for any number until expiry)"
            )))
        }
    };
    let secs = req.expires_in_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS);
    if !(1..=MAX_TOKEN_SECONDS).contains(&secs) {
        return Err(ApiError::invalid(format!(
            "expires_in_seconds {secs} must be 1..={MAX_TOKEN_SECONDS}"
        )));
    }
    let token_id = random_hex(8)?;
    let secret = random_hex(32)?;
    let now = now_ms();
    let row = EnrollmentTokenRow {
        token_id: token_id.clone(),
        secret_sha256: sha256_hex(&secret),
        pool_id: req.pool_id.clone(),
        uses_left: uses,
        expires_ms: now + secs * 1000,
        created_ms: now,
        created_by: operator.name.clone(),
    };
    let saved = row.clone();
    ctl.store.tx(move |tx| tx.insert_token(&saved)).await?;
    tracing::info!(token_id, pool_id = %row.pool_id, uses = ?uses, by = %operator, "enrollment token created");
    Ok(api::EnrollmentTokenCreated {
        token: format!("{token_id}.{secret}"),
        token_id,
        pool_id: row.pool_id,
        uses_left: uses,
        expires_at: ms_text(row.expires_ms),
    })
}

/// `GET /v1/enrollment-tokens`.
pub async fn list_tokens(ctl: &Controller) -> Result<Vec<api::EnrollmentToken>, ApiError> {
    let rows = ctl.store.tx(|tx| tx.tokens()).await?;
    Ok(rows.iter().map(token_view).collect())
}

/// `DELETE /v1/enrollment-tokens/{token_id}`.
pub async fn delete_token(
    ctl: &Controller,
    operator: &Identity,
    token_id: String,
) -> Result<api::EnrollmentToken, ApiError> {
    let id = token_id.clone();
    let now = now_ms();
    let row = ctl
        .store
        .tx(move |tx| {
            let row = tx.tokens()?.into_iter().find(|t| t.token_id == id);
            if row.is_some() {
                tx.delete_token(&id, now)?;
            }
            Ok::<_, StoreError>(row)
        })
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "TOKEN_NOT_FOUND",
                format!("token_id {token_id:?}: no such enrollment token"),
            )
        })?;
    tracing::info!(token_id, by = %operator, "enrollment token deleted");
    Ok(token_view(&row))
}

fn enroll_error(status: StatusCode, code: &'static str, msg: String) -> ApiError {
    ApiError::new(status, code, msg)
}

/// `POST /agent/v1/enroll`: reachable without a client certificate.
pub async fn enroll(ctl: &Controller, body: &[u8]) -> Result<Enrolled, ApiError> {
    if let Err(wait) = ctl.enroll_limit.take() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!(
                "too many enrollment attempts; retry in {} ms",
                wait.as_millis().max(1)
            ),
        ));
    }
    let req: EnrollRequest = parse_json(body)?;
    crate::pki::validate_name("machine_id", &req.machine_id)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let Some(issuer) = ctl.issuer.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENROLLMENT_DISABLED",
            "this controller does not enroll agents: set [enrollment] issuing_cert and \
             issuing_key in its config",
        ));
    };
    let (token_id, secret) = req.token.trim().split_once('.').unwrap_or(("", ""));
    let (token_id, hash) = (token_id.to_string(), sha256_hex(secret));
    let validity = ctl.cfg.agent_cert_validity;
    let now = now_ms();
    let machine_id = req.machine_id.clone();
    let out = ctl
        .store
        .tx(move |tx| {
            let token = match tx.check_token(&token_id, &hash, now)? {
                TokenCheck::Usable(t) => t,
                TokenCheck::Invalid => {
                    return Err(enroll_error(
                        StatusCode::UNAUTHORIZED,
                        INVALID_TOKEN,
                        "the enrollment token is not valid (unknown, wrong secret, or deleted)"
                            .into(),
                    ))
                }
                TokenCheck::Expired { expires_ms } => {
                    return Err(enroll_error(
                        StatusCode::FORBIDDEN,
                        TOKEN_EXPIRED,
                        format!(
                            "enrollment token {token_id} expired at {}",
                            ms_text(expires_ms)
                        ),
                    ))
                }
                TokenCheck::UsedUp => {
                    return Err(enroll_error(
                        StatusCode::FORBIDDEN,
                        TOKEN_USED_UP,
                        format!("enrollment token {token_id} has no uses left"),
                    ))
                }
            };
            if let Some((m, None)) = tx.machine(&machine_id)? {
                // Live: a certificate that is neither revoked nor expired (or one from
                // before certificates were recorded). Taking it over would hand this
                // machine another's work.
                let live = match (&m.cert_serial, m.cert_not_after_ms) {
                    (Some(serial), Some(not_after)) => not_after > now && !tx.is_revoked(serial)?,
                    _ => true,
                };
                if live {
                    return Err(enroll_error(
                        StatusCode::CONFLICT,
                        MACHINE_ID_TAKEN,
                        format!(
                            "machine_id {machine_id:?} is enrolled and its certificate is valid; \
                             choose another machine_id, or decommission it first \
                             (DELETE /v1/machines/{machine_id})"
                        ),
                    ));
                }
            }
            let issued = issuer
                .sign_csr(&req.csr_pem, &Identity::agent(&machine_id), None, validity)
                .map_err(|e| ApiError::invalid(format!("csr_pem: {e}")))?;
            let not_after = clock::unix_ms(issued.not_after);
            tx.enroll_machine(&machine_id, &token.pool_id, &issued.serial, not_after, now)?;
            tx.use_token(&token.token_id)?;
            Ok((token, issued))
        })
        .await?;
    let (token, issued) = out;
    tracing::info!(machine_id = %req.machine_id, pool_id = %token.pool_id, token_id = %token.token_id, serial = %issued.serial, "machine enrolled");
    Ok(Enrolled {
        machine_id: req.machine_id,
        pool_id: Some(token.pool_id),
        certificate_pem: issued.chain_pem,
        serial: issued.serial,
        not_after: clock::rfc3339(issued.not_after),
    })
}

/// `POST /agent/v1/renew`: a new certificate for the presenting one's identity.
pub async fn renew(ctl: &Controller, call: AgentCall, body: &[u8]) -> Result<Enrolled, ApiError> {
    let req: RenewRequest = parse_json(body)?;
    let Some(issuer) = ctl.issuer.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ENROLLMENT_DISABLED",
            "this controller does not renew certificates: set [enrollment] issuing_cert and \
             issuing_key in its config",
        ));
    };
    let validity = ctl.cfg.agent_cert_validity;
    let quiet = ctl.cfg.identity_conflict_quiet;
    let now = now_ms();
    let c = call.clone();
    let (issued, pool) = ctl
        .store
        .tx(move |tx| {
            if gate(tx, &c, None, now, quiet)?.conflict {
                return Err(conflict_error(&c.machine_id));
            }
            let issued = issuer
                .sign_csr(
                    &req.csr_pem,
                    &Identity::agent(&c.machine_id),
                    None,
                    validity,
                )
                .map_err(|e| ApiError::invalid(format!("csr_pem: {e}")))?;
            tx.set_machine_cert(
                &c.machine_id,
                &issued.serial,
                clock::unix_ms(issued.not_after),
            )?;
            let pool = tx.machine(&c.machine_id)?.and_then(|(m, _)| m.pool_id);
            Ok::<_, ApiError>((issued, pool))
        })
        .await?;
    tracing::info!(machine_id = %call.machine_id, old_serial = %call.cert.serial, serial = %issued.serial, "certificate renewed");
    Ok(Enrolled {
        machine_id: call.machine_id,
        pool_id: pool,
        certificate_pem: issued.chain_pem,
        serial: issued.serial,
        not_after: clock::rfc3339(issued.not_after),
    })
}

fn check_machine_id(id: &str) -> Result<(), ApiError> {
    crate::pki::validate_name("machine_id", id).map_err(|e| ApiError::invalid(e.to_string()))
}

fn no_machine(id: &str) -> ApiError {
    ApiError::not_found(
        "NOT_FOUND",
        format!("machine_id {id:?}: no such machine in service"),
    )
}

/// `PUT /v1/machines/{machine_id}/pool`.
pub async fn move_machine(
    ctl: &Controller,
    operator: &Identity,
    machine_id: String,
    req: api::MoveMachine,
) -> Result<(), ApiError> {
    check_machine_id(&machine_id)?;
    crate::pki::validate_name("pool_id", &req.pool_id)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let (m, p) = (machine_id.clone(), req.pool_id.clone());
    if !ctl.store.tx(move |tx| tx.set_machine_pool(&m, &p)).await? {
        return Err(no_machine(&machine_id));
    }
    tracing::info!(machine_id, pool_id = %req.pool_id, by = %operator, "machine moved");
    Ok(())
}

/// `DELETE /v1/machines/{machine_id}`: revokes its certificate, closes its polls, ends its
/// unfinished assignments `CANCELLED`, and takes it out of its pool (its history stays).
pub async fn decommission(
    ctl: &Controller,
    operator: &Identity,
    machine_id: String,
) -> Result<api::Decommissioned, ApiError> {
    check_machine_id(&machine_id)?;
    let now = now_ms();
    let (m, by) = (machine_id.clone(), operator.to_string());
    let (serial, cancelled, wake) = ctl
        .store
        .tx(move |tx| {
            let Some((row, None)) = tx.machine(&m)? else {
                return Err(no_machine(&m));
            };
            if let Some(serial) = &row.cert_serial {
                tx.revoke(&RevocationRow {
                    serial: serial.clone(),
                    revoked_ms: now,
                    revoked_by: by.clone(),
                    machine_id: Some(m.clone()),
                })?;
            }
            tx.decommission(&m, now)?;
            let mut wake = vec![m.clone()];
            let ids = tx.unfinished_assignments(&m)?;
            for id in &ids {
                if let Some(tm) = tx.assignment(id)? {
                    let outcome = Outcome {
                        started_at: tm.outcome.started_at.clone(),
                        error_code: Some(MACHINE_DECOMMISSIONED.into()),
                        error_msg: Some(format!("machine {m:?} was decommissioned by {by}")),
                        ..Outcome::default()
                    };
                    engine::end_assignment(
                        tx,
                        &tm,
                        MachineState::Cancelled,
                        &outcome,
                        now,
                        &mut wake,
                    )?;
                }
            }
            Ok::<_, ApiError>((row.cert_serial, ids.len() as u32, wake))
        })
        .await?;
    if let Some(s) = &serial {
        ctl.revoked.insert(s.clone());
    }
    ctl.wake(&wake);
    tracing::warn!(machine_id, serial = ?serial, cancelled, by = %operator, "machine decommissioned");
    Ok(api::Decommissioned {
        machine_id,
        revoked_serial: serial,
        cancelled_assignments: cancelled,
    })
}

/// Serials as operators paste them: hex, any case, colons allowed.
fn normalize_serial(s: &str) -> Result<String, ApiError> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let ok = !hex.is_empty() && hex.len() <= 64 && hex.chars().all(|c| c.is_ascii_hexdigit());
    if !ok {
        return Err(ApiError::invalid(format!(
            "serial {s:?} is not a hex certificate serial (as certificate_serial shows it)"
        )));
    }
    Ok(hex)
}

/// `POST /v1/revocations`.
pub async fn revoke(
    ctl: &Controller,
    operator: &Identity,
    req: api::Revoke,
) -> Result<api::Revocation, ApiError> {
    let serial = normalize_serial(&req.serial)?;
    let now = now_ms();
    let (s, by) = (serial.clone(), operator.to_string());
    let row = ctl
        .store
        .tx(move |tx| {
            let machine_id = tx.machine_of_serial(&s)?;
            let row = RevocationRow {
                serial: s.clone(),
                revoked_ms: now,
                revoked_by: by,
                machine_id,
            };
            if !tx.revoke(&row)? {
                return Ok::<_, StoreError>(
                    tx.revocations()?
                        .into_iter()
                        .find(|r| r.serial == s)
                        .unwrap_or(row),
                );
            }
            Ok(row)
        })
        .await?;
    ctl.revoked.insert(serial.clone());
    if let Some(m) = &row.machine_id {
        ctl.wake(std::slice::from_ref(m));
    }
    tracing::warn!(serial, machine_id = ?row.machine_id, by = %operator, "certificate revoked");
    Ok(revocation_view(&row))
}

fn revocation_view(r: &RevocationRow) -> api::Revocation {
    api::Revocation {
        serial: r.serial.clone(),
        revoked_at: ms_text(r.revoked_ms),
        revoked_by: r.revoked_by.clone(),
        machine_id: r.machine_id.clone(),
    }
}

/// `GET /v1/revocations`.
pub async fn list_revocations(ctl: &Controller) -> Result<Vec<api::Revocation>, ApiError> {
    let rows = ctl.store.tx(|tx| tx.revocations()).await?;
    Ok(rows.iter().map(revocation_view).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_parse_and_bad_headers_name_the_header() {
        assert_eq!(Session::from_header(None).unwrap(), None);
        let s = Session::from_header(Some("ab12.boot-1")).unwrap().unwrap();
        assert_eq!(s.instance, "ab12");
        for bad in ["", ".x", "a b.c", "x/y.z"] {
            let e = Session::from_header(Some(bad)).unwrap_err();
            assert!(e.msg.contains("fieldhand-session"), "{bad}: {}", e.msg);
        }
    }

    #[test]
    fn serials_are_normalized_and_checked() {
        assert_eq!(normalize_serial(" AB:cd:01 ").unwrap(), "abcd01");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
    }

    #[test]
    fn the_enrollment_bucket_refuses_past_its_burst() {
        let r = RateLimit::new(2);
        let taken = (0..10).filter(|_| r.take().is_ok()).count();
        assert_eq!(taken, 4, "a burst of twice the rate");
        assert!(r.take().unwrap_err() > Duration::ZERO);
    }
}
