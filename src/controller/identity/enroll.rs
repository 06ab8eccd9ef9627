//! Enrollment tokens (only a hash of the secret is stored), enrollment (the one route
//! served without a client certificate) and renewal; the controller signs both with its
//! issuing CA.

use http::StatusCode;

use super::gate::{conflict_error, gate, AgentCall};
use super::{ms_text, now_ms, sha256_hex, DEFAULT_TOKEN_SECONDS, MAX_TOKEN_SECONDS};
use crate::controller::audit;
use crate::controller::errors::{parse_json, ApiError};
use crate::controller::store::{EnrollmentTokenRow, StoreError, TokenCheck};
use crate::controller::Controller;
use crate::pki::Identity;
use crate::proto::agent::{EnrollRequest, Enrolled, RenewRequest};
use crate::proto::api;
use crate::proto::domain::{AuditAction, ErrorCode};
use crate::sys::clock;

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
    let by = operator.clone();
    // The request holds no secret (the controller makes it); `audit` would remove one.
    ctl.store
        .tx(move |tx| {
            tx.insert_token(&saved)?;
            audit::record(
                tx,
                &by,
                AuditAction::EnrollmentTokenCreate,
                &saved.token_id,
                &req,
            )
        })
        .await?;
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
    let rows = ctl.store.read(|tx| tx.tokens()).await?;
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
    let by = operator.clone();
    let row = ctl
        .store
        .tx(move |tx| {
            let row = tx.tokens()?.into_iter().find(|t| t.token_id == id);
            if row.is_some() {
                tx.delete_token(&id, now)?;
                audit::record(
                    tx,
                    &by,
                    AuditAction::EnrollmentTokenDelete,
                    &id,
                    &serde_json::json!({}),
                )?;
            }
            Ok::<_, StoreError>(row)
        })
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                ErrorCode::TokenNotFound,
                format!("token_id {token_id:?}: no such enrollment token"),
            )
        })?;
    tracing::info!(token_id, by = %operator, "enrollment token deleted");
    Ok(token_view(&row))
}

fn enroll_error(status: StatusCode, code: ErrorCode, msg: String) -> ApiError {
    ApiError::new(status, code, msg)
}

/// `POST /agent/v1/enroll`: reachable without a client certificate.
pub async fn enroll(ctl: &Controller, body: &[u8]) -> Result<Enrolled, ApiError> {
    if let Err(wait) = ctl.enroll_limit.take() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
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
            ErrorCode::EnrollmentDisabled,
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
                        ErrorCode::InvalidToken,
                        "the enrollment token is not valid (unknown, wrong secret, or deleted)"
                            .into(),
                    ))
                }
                TokenCheck::Expired { expires_ms } => {
                    return Err(enroll_error(
                        StatusCode::FORBIDDEN,
                        ErrorCode::TokenExpired,
                        format!(
                            "enrollment token {token_id} expired at {}",
                            ms_text(expires_ms)
                        ),
                    ))
                }
                TokenCheck::UsedUp => {
                    return Err(enroll_error(
                        StatusCode::FORBIDDEN,
                        ErrorCode::TokenUsedUp,
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
                        ErrorCode::MachineIdTaken,
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
            ErrorCode::EnrollmentDisabled,
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
