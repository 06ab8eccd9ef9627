//! The store's identity tables: which certificate each machine presents, its pool (set
//! only at enrollment, from a hand-issued certificate's binding, or by an operator), the
//! sessions behind one identity, enrollment tokens (only a hash of the secret), and
//! revocations.

use super::sql::{params, Optional, Row, SqlResult};

use super::{Ctx, MachineRow, StoreError, Tx};

pub(super) const MACHINE_COLS: &str =
    "machine_id, pool_id, agent_version, last_seen_ms, facts_json, \
    cert_serial, cert_not_after_ms, conflict_ms, decommissioned_ms";

pub(super) fn machine_row(r: &Row) -> SqlResult<(MachineRow, Option<i64>)> {
    Ok((
        MachineRow {
            machine_id: r.get(0)?,
            pool_id: r.get(1)?,
            agent_version: r.get(2)?,
            last_seen_ms: r.get(3)?,
            facts_json: r.get(4)?,
            cert_serial: r.get(5)?,
            cert_not_after_ms: r.get(6)?,
            conflict_ms: r.get(7)?,
        },
        r.get(8)?,
    ))
}

/// What a session's request tells about its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionVerdict {
    /// Another session of this identity was live while this one was: two agents.
    pub conflict: bool,
    /// The conflict was noticed by this request (log it once).
    pub noticed_now: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentTokenRow {
    pub token_id: String,
    pub secret_sha256: String,
    pub pool_id: String,
    pub uses_left: Option<u32>,
    pub expires_ms: i64,
    pub created_ms: i64,
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRow {
    pub serial: String,
    pub revoked_ms: i64,
    pub revoked_by: String,
    pub machine_id: Option<String>,
}

/// Why a token cannot be used (or that it can).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    Usable(EnrollmentTokenRow),
    /// Unknown id, wrong secret, or deleted: one answer for all, so a guesser learns nothing.
    Invalid,
    Expired {
        expires_ms: i64,
    },
    UsedUp,
}

impl Tx<'_> {
    /// Machines in service (not decommissioned), by id.
    pub fn machines(&mut self) -> Result<Vec<MachineRow>, StoreError> {
        let mut st = self
            .tx
            .statement(&format!(
                "SELECT {MACHINE_COLS} FROM machines WHERE decommissioned_ms IS NULL
                 ORDER BY machine_id"
            ))
            .ctx("listing machines")?;
        let rows = st
            .query_map(params![], machine_row)
            .ctx("listing machines")?;
        let rows: Vec<_> = rows.collect::<Result<_, _>>().ctx("listing machines")?;
        Ok(rows.into_iter().map(|(m, _)| m).collect())
    }

    /// One machine, with when it was decommissioned (if it was).
    pub fn machine(
        &mut self,
        machine_id: &str,
    ) -> Result<Option<(MachineRow, Option<i64>)>, StoreError> {
        self.tx
            .one(
                &format!("SELECT {MACHINE_COLS} FROM machines WHERE machine_id = ?1"),
                params![machine_id],
                machine_row,
            )
            .optional()
            .ctx("reading a machine")
    }

    /// Records a request from a machine's agent. An unknown machine is created in the pool
    /// its certificate was issued for (or in none); what the agent says never moves it.
    /// `facts_json` is kept when `None` (polls carry none). Returns `false`, and records
    /// nothing, for a decommissioned machine: only a new enrollment brings it back.
    #[allow(clippy::too_many_arguments)]
    pub fn record_contact(
        &mut self,
        machine_id: &str,
        cert_pool: Option<&str>,
        serial: &str,
        not_after_ms: i64,
        agent_version: &str,
        facts_json: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .tx
            .exec(
                "INSERT INTO machines (machine_id, pool_id, agent_version, last_seen_ms,
                    facts_json, cert_serial, cert_not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (machine_id) DO UPDATE SET
                    agent_version = excluded.agent_version,
                    last_seen_ms = excluded.last_seen_ms,
                    facts_json = COALESCE(excluded.facts_json, machines.facts_json),
                    cert_serial = excluded.cert_serial,
                    cert_not_after_ms = excluded.cert_not_after_ms
                 WHERE machines.decommissioned_ms IS NULL",
                params![
                    machine_id,
                    cert_pool,
                    agent_version,
                    now_ms,
                    facts_json,
                    serial,
                    not_after_ms
                ],
            )
            .ctx("recording a machine")?;
        Ok(n > 0)
    }

    /// Records one request of `session` (`<instance>.<boot>`) and judges it: a conflict is
    /// two sessions whose spans of activity overlap, i.e. one of them spoke after the other
    /// had appeared. A restart keeps its session; a reboot's new session starts after the
    /// old one's last word. A session is forgotten once it has been silent for `quiet_ms`
    /// past both its last request and the end of the long poll it may still hold
    /// (`hold_until_ms`, for a poll that starts waiting now); that is how a conflict clears
    /// once only one agent is left. An open poll keeps a session remembered, never counts as
    /// it speaking: a dead connection is not a second agent.
    pub fn touch_session(
        &mut self,
        machine_id: &str,
        session: &str,
        instance: &str,
        now_ms: i64,
        quiet_ms: i64,
        hold_until_ms: Option<i64>,
    ) -> Result<SessionVerdict, StoreError> {
        let what = "recording an agent session";
        self.tx
            .exec(
                "DELETE FROM agent_sessions WHERE machine_id = ?1
                 AND last_ms < ?2 AND hold_ms < ?2",
                params![machine_id, now_ms - quiet_ms],
            )
            .ctx(what)?;
        self.tx
            .exec(
                "INSERT INTO agent_sessions (machine_id, session, instance, first_ms, last_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (machine_id, session) DO UPDATE SET last_ms = excluded.last_ms",
                params![machine_id, session, instance, now_ms],
            )
            .ctx(what)?;
        let overlap: bool = self
            .tx
            .one(
                "SELECT EXISTS (SELECT 1 FROM agent_sessions o, agent_sessions me
                    WHERE me.machine_id = ?1 AND me.session = ?2
                    AND o.machine_id = ?1 AND o.session <> ?2 AND o.last_ms >= me.first_ms)",
                params![machine_id, session],
                |r| r.get(0),
            )
            .ctx(what)?;
        let was: Option<i64> = self
            .tx
            .one(
                "SELECT conflict_ms FROM machines WHERE machine_id = ?1",
                params![machine_id],
                |r| r.get(0),
            )
            .optional()
            .ctx(what)?
            .flatten();
        if let (false, Some(hold)) = (overlap, hold_until_ms) {
            self.tx
                .exec(
                    "UPDATE agent_sessions SET hold_ms = ?3 WHERE machine_id = ?1 AND session = ?2",
                    params![machine_id, session, hold],
                )
                .ctx(what)?;
        }
        let set = match (overlap, was) {
            (true, None) => Some(Some(now_ms)),
            (false, Some(_)) => Some(None),
            _ => None,
        };
        if let Some(v) = set {
            self.tx
                .exec(
                    "UPDATE machines SET conflict_ms = ?2 WHERE machine_id = ?1",
                    params![machine_id, v],
                )
                .ctx(what)?;
        }
        Ok(SessionVerdict {
            conflict: overlap,
            noticed_now: overlap && was.is_none(),
        })
    }

    /// A session's long poll ended at `now_ms`.
    pub fn release_hold(
        &mut self,
        machine_id: &str,
        session: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE agent_sessions SET hold_ms = ?3
                 WHERE machine_id = ?1 AND session = ?2 AND hold_ms > ?3",
                params![machine_id, session, now_ms],
            )
            .ctx("recording an agent session")?;
        Ok(())
    }

    /// The newest session of a machine (the only one that may be handed work).
    pub fn newest_session(&mut self, machine_id: &str) -> Result<Option<String>, StoreError> {
        self.tx
            .one(
                "SELECT session FROM agent_sessions WHERE machine_id = ?1
                 ORDER BY first_ms DESC, session LIMIT 1",
                params![machine_id],
                |r| r.get(0),
            )
            .optional()
            .ctx("reading agent sessions")
    }

    /// Operator move. `false` if there is no such machine in service.
    pub fn set_machine_pool(
        &mut self,
        machine_id: &str,
        pool_id: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .tx
            .exec(
                "UPDATE machines SET pool_id = ?2 WHERE machine_id = ?1
                 AND decommissioned_ms IS NULL",
                params![machine_id, pool_id],
            )
            .ctx("moving a machine")?;
        Ok(n > 0)
    }

    /// Takes a machine out of service: out of every pool, its sessions forgotten. Its
    /// history (task rows) stays.
    pub fn decommission(&mut self, machine_id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE machines SET decommissioned_ms = ?2, pool_id = NULL, conflict_ms = NULL
                 WHERE machine_id = ?1",
                params![machine_id, now_ms],
            )
            .ctx("decommissioning a machine")?;
        self.tx
            .exec(
                "DELETE FROM agent_sessions WHERE machine_id = ?1",
                params![machine_id],
            )
            .ctx("decommissioning a machine")?;
        Ok(())
    }

    /// The assignment ids of a machine that have not ended.
    pub fn unfinished_assignments(&mut self, machine_id: &str) -> Result<Vec<String>, StoreError> {
        let mut st = self
            .tx
            .statement(
                "SELECT assignment_id FROM task_machines WHERE machine_id = ?1
                 AND state IN ('PENDING', 'DISPATCHED', 'RUNNING')",
            )
            .ctx("listing a machine's assignments")?;
        let rows = st
            .query_map(params![machine_id], |r| r.get(0))
            .ctx("listing a machine's assignments")?;
        rows.collect::<Result<_, _>>()
            .ctx("listing a machine's assignments")
    }

    /// Enrolls (or re-enrolls after a decommission) a machine with its new certificate,
    /// in `pool_id`. The caller has checked that the id is free.
    pub fn enroll_machine(
        &mut self,
        machine_id: &str,
        pool_id: &str,
        serial: &str,
        not_after_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO machines (machine_id, pool_id, agent_version, last_seen_ms,
                    cert_serial, cert_not_after_ms)
                 VALUES (?1, ?2, '', ?3, ?4, ?5)
                 ON CONFLICT (machine_id) DO UPDATE SET pool_id = excluded.pool_id,
                    last_seen_ms = excluded.last_seen_ms, cert_serial = excluded.cert_serial,
                    cert_not_after_ms = excluded.cert_not_after_ms, decommissioned_ms = NULL,
                    conflict_ms = NULL",
                params![machine_id, pool_id, now_ms, serial, not_after_ms],
            )
            .ctx("enrolling a machine")?;
        self.tx
            .exec(
                "DELETE FROM agent_sessions WHERE machine_id = ?1",
                params![machine_id],
            )
            .ctx("enrolling a machine")?;
        Ok(())
    }

    /// A renewal's certificate becomes the machine's.
    pub fn set_machine_cert(
        &mut self,
        machine_id: &str,
        serial: &str,
        not_after_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE machines SET cert_serial = ?2, cert_not_after_ms = ?3
                 WHERE machine_id = ?1",
                params![machine_id, serial, not_after_ms],
            )
            .ctx("recording a renewed certificate")?;
        Ok(())
    }

    pub fn insert_token(&mut self, t: &EnrollmentTokenRow) -> Result<(), StoreError> {
        self.tx
            .exec(
                "INSERT INTO enrollment_tokens (token_id, secret_sha256, pool_id, uses_left,
                    expires_ms, created_ms, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t.token_id,
                    t.secret_sha256,
                    t.pool_id,
                    t.uses_left,
                    t.expires_ms,
                    t.created_ms,
                    t.created_by
                ],
            )
            .ctx("saving an enrollment token")?;
        Ok(())
    }

    /// Tokens not deleted, newest first (expired and used-up ones too: an operator may
    /// want to see why an enrollment failed).
    pub fn tokens(&mut self) -> Result<Vec<EnrollmentTokenRow>, StoreError> {
        let mut st = self
            .tx
            .statement(
                "SELECT token_id, secret_sha256, pool_id, uses_left, expires_ms, created_ms,
                    created_by FROM enrollment_tokens WHERE deleted_ms IS NULL
                 ORDER BY created_ms DESC, token_id",
            )
            .ctx("listing enrollment tokens")?;
        let rows = st
            .query_map(params![], token_row)
            .ctx("listing enrollment tokens")?;
        rows.collect::<Result<_, _>>()
            .ctx("listing enrollment tokens")
    }

    /// `false` if there is no such token (or it was deleted already).
    pub fn delete_token(&mut self, token_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self
            .tx
            .exec(
                "UPDATE enrollment_tokens SET deleted_ms = ?2
                 WHERE token_id = ?1 AND deleted_ms IS NULL",
                params![token_id, now_ms],
            )
            .ctx("deleting an enrollment token")?;
        Ok(n > 0)
    }

    /// Checks a presented token (`secret_sha256` is the hash of the presented secret).
    pub fn check_token(
        &mut self,
        token_id: &str,
        secret_sha256: &str,
        now_ms: i64,
    ) -> Result<TokenCheck, StoreError> {
        let row = self
            .tx
            .one(
                "SELECT token_id, secret_sha256, pool_id, uses_left, expires_ms, created_ms,
                    created_by FROM enrollment_tokens WHERE token_id = ?1 AND deleted_ms IS NULL",
                params![token_id],
                token_row,
            )
            .optional()
            .ctx("reading an enrollment token")?;
        Ok(match row {
            None => TokenCheck::Invalid,
            Some(t) if t.secret_sha256 != secret_sha256 => TokenCheck::Invalid,
            Some(t) if t.expires_ms <= now_ms => TokenCheck::Expired {
                expires_ms: t.expires_ms,
            },
            Some(t) if t.uses_left == Some(0) => TokenCheck::UsedUp,
            Some(t) => TokenCheck::Usable(t),
        })
    }

    /// One use of a token with a limited number.
    pub fn use_token(&mut self, token_id: &str) -> Result<(), StoreError> {
        self.tx
            .exec(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1
                 WHERE token_id = ?1 AND uses_left > 0",
                params![token_id],
            )
            .ctx("using an enrollment token")?;
        Ok(())
    }

    /// `false` if the serial was revoked before.
    pub fn revoke(&mut self, r: &RevocationRow) -> Result<bool, StoreError> {
        let n = self
            .tx
            .exec(
                "INSERT INTO revocations (serial, revoked_ms, revoked_by, machine_id)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (serial) DO NOTHING",
                params![r.serial, r.revoked_ms, r.revoked_by, r.machine_id],
            )
            .ctx("revoking a certificate")?;
        Ok(n > 0)
    }

    pub fn revocations(&mut self) -> Result<Vec<RevocationRow>, StoreError> {
        let mut st = self
            .tx
            .statement(
                "SELECT serial, revoked_ms, revoked_by, machine_id FROM revocations
                 ORDER BY revoked_ms DESC, serial",
            )
            .ctx("listing revocations")?;
        let rows = st
            .query_map(params![], |r| {
                Ok(RevocationRow {
                    serial: r.get(0)?,
                    revoked_ms: r.get(1)?,
                    revoked_by: r.get(2)?,
                    machine_id: r.get(3)?,
                })
            })
            .ctx("listing revocations")?;
        rows.collect::<Result<_, _>>().ctx("listing revocations")
    }

    pub fn is_revoked(&mut self, serial: &str) -> Result<bool, StoreError> {
        self.tx
            .one(
                "SELECT EXISTS (SELECT 1 FROM revocations WHERE serial = ?1)",
                params![serial],
                |r| r.get(0),
            )
            .ctx("reading revocations")
    }

    /// `(serial, revoked_ms)` of revocations at or after `since_ms`.
    pub fn revocations_since(&mut self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let mut st = self
            .tx
            .statement("SELECT serial, revoked_ms FROM revocations WHERE revoked_ms >= ?1")
            .ctx("reading revocations")?;
        let rows = st
            .query_map(params![since_ms], |r| Ok((r.get(0)?, r.get(1)?)))
            .ctx("reading revocations")?;
        rows.collect::<Result<_, _>>().ctx("reading revocations")
    }

    /// The machine that last presented `serial`, if any.
    pub fn machine_of_serial(&mut self, serial: &str) -> Result<Option<String>, StoreError> {
        self.tx
            .one(
                "SELECT machine_id FROM machines WHERE cert_serial = ?1",
                params![serial],
                |r| r.get(0),
            )
            .optional()
            .ctx("looking up a certificate")
    }
}

fn token_row(r: &Row) -> SqlResult<EnrollmentTokenRow> {
    Ok(EnrollmentTokenRow {
        token_id: r.get(0)?,
        secret_sha256: r.get(1)?,
        pool_id: r.get(2)?,
        uses_left: r.get(3)?,
        expires_ms: r.get(4)?,
        created_ms: r.get(5)?,
        created_by: r.get(6)?,
    })
}
