//! The gate every agent request passes inside its transaction (decommissioned, sessions,
//! two live agents behind one certificate), the in-memory revocation list, and the
//! enrollment rate limit.

use std::collections::HashSet;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::controller::errors::ApiError;
use crate::controller::store::{Store, StoreError, Tx};
use crate::proto::domain::ErrorCode;
use crate::tls::CertInfo;

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
        let rows = store.read(move |tx| tx.revocations_since(since)).await?;
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
            ErrorCode::MachineDecommissioned,
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
        ErrorCode::IdentityConflict,
        format!(
            "another live agent presents the certificate of machine {machine_id:?} (a cloned \
             identity); no work is handed out until only one is left. A clone with an \
             enrollment token re-enrolls under its own machine_id"
        ),
    )
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
    fn the_enrollment_bucket_refuses_past_its_burst() {
        let r = RateLimit::new(2);
        let taken = (0..10).filter(|_| r.take().is_ok()).count();
        assert_eq!(taken, 4, "a burst of twice the rate");
        assert!(r.take().unwrap_err() > Duration::ZERO);
    }
}
