//! The operators' audit trail: one row per action, written in the action's own transaction,
//! listed newest first in keyset pages.

use super::sql::{params, Row, SqlResult};
use super::{Ctx, StoreError, Tx};
use crate::proto::domain::AuditAction;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub audit_id: String,
    pub at_ms: i64,
    /// The operator's name (its certificate's identity).
    pub operator: String,
    pub action: AuditAction,
    pub target: String,
    /// The request body as JSON, secrets removed.
    pub request_json: String,
}

const AUDIT_COLS: &str = "audit_id, at_ms, operator, action, target, request_json";

fn audit_row(r: &Row) -> SqlResult<AuditRow> {
    Ok(AuditRow {
        audit_id: r.get(0)?,
        at_ms: r.get(1)?,
        operator: r.get(2)?,
        action: r.get(3)?,
        target: r.get(4)?,
        request_json: r.get(5)?,
    })
}

impl Tx<'_> {
    pub fn insert_audit(&mut self, a: &AuditRow) -> Result<(), StoreError> {
        self.tx
            .exec(
                &format!("INSERT INTO audit ({AUDIT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    a.audit_id,
                    a.at_ms,
                    a.operator,
                    a.action,
                    a.target,
                    a.request_json
                ],
            )
            .ctx("recording an operator action")?;
        Ok(())
    }

    /// Up to `limit` records, newest first (`at_ms` DESC, `audit_id` DESC), after `after`
    /// (the last `(at_ms, audit_id)` of the previous page).
    pub fn audit_page(
        &mut self,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let order = "ORDER BY at_ms DESC, audit_id DESC LIMIT ?1";
        match after {
            None => self.tx.all(
                &format!("SELECT {AUDIT_COLS} FROM audit {order}"),
                params![i64::from(limit)],
                audit_row,
            ),
            Some((ms, id)) => self.tx.all(
                &format!(
                    "SELECT {AUDIT_COLS} FROM audit
                     WHERE at_ms < ?2 OR (at_ms = ?2 AND audit_id < ?3) {order}"
                ),
                params![i64::from(limit), ms, id],
                audit_row,
            ),
        }
        .ctx("listing the audit trail")
    }
}
