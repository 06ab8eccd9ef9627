//! The operators' audit trail: every operator action is recorded, with the operator's name
//! from the verified client certificate, in the same transaction as the action (so the two
//! commit together or not at all), and told to the journal once it has committed
//! (`FIELDHAND_OPERATOR`, `FIELDHAND_ACTION`, `FIELDHAND_TARGET`). `GET /v1/audit` lists the
//! records newest first (`lists::audit`).
//!
//! A request is stored without its secrets: a field named like one ([`SECRET_FIELDS`]) is
//! replaced wherever it is, so a request type that gains such a field later cannot leak it
//! into the trail.

use serde::Serialize;

use super::errors::ApiError;
use super::store::{AuditRow, StoreError, Tx};
use super::Controller;
use crate::pki::Identity;
use crate::proto::domain::AuditAction;
use crate::sys::clock;

/// Fields whose values never reach the trail.
pub const SECRET_FIELDS: &[&str] = &["token", "secret", "password", "private_key", "key"];
/// What a removed secret reads as.
pub const REMOVED: &str = "[removed]";

/// `value` with every secret field's value replaced by [`REMOVED`], at any depth.
pub fn without_secrets(mut value: serde_json::Value) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if SECRET_FIELDS.contains(&k.to_ascii_lowercase().as_str()) {
                        *v = serde_json::Value::String(REMOVED.into());
                    } else {
                        walk(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            // Only objects name their values; nothing else can be a secret field.
            serde_json::Value::Null
            | serde_json::Value::Bool(_)
            | serde_json::Value::Number(_)
            | serde_json::Value::String(_) => {}
        }
    }
    walk(&mut value);
    value
}

/// Records that `by` did `action` on `target` with `request` (the request's body, or
/// `serde_json::json!({})` for one without), inside the action's own transaction; the
/// journal hears of it once that transaction has committed.
pub fn record<T: Serialize + ?Sized>(
    tx: &mut Tx<'_>,
    by: &Identity,
    action: AuditAction,
    target: &str,
    request: &T,
) -> Result<(), StoreError> {
    let request = serde_json::to_value(request)
        .map(without_secrets)
        .unwrap_or_else(|e| serde_json::Value::String(format!("(not serializable: {e})")));
    let row = AuditRow {
        audit_id: uuid::Uuid::new_v4().to_string(),
        at_ms: clock::unix_ms(clock::now()),
        operator: by.name.clone(),
        action,
        target: target.to_string(),
        request_json: request.to_string(),
    };
    tx.insert_audit(&row)?;
    tx.after_commit(move || journal(&row));
    Ok(())
}

/// The journal's record of one action. Field names become journald's with the prefix
/// `daemon::init_logging` configures: `operator` is `FIELDHAND_OPERATOR`.
fn journal(row: &AuditRow) {
    tracing::info!(
        operator = %row.operator,
        action = %row.action,
        target = %row.target,
        audit_id = %row.audit_id,
        "operator action"
    );
}

/// `POST /v1/blobs` in the trail: the upload itself is no transaction (the blob is a file),
/// so the record is one of its own, written once the blob is stored.
pub async fn record_alone<T: Serialize + Send + 'static>(
    ctl: &Controller,
    by: &Identity,
    action: AuditAction,
    target: String,
    request: T,
) -> Result<(), ApiError> {
    let by = by.clone();
    ctl.store
        .tx(move |tx| record(tx, &by, action, &target, &request))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::{Context, SubscriberExt};

    #[test]
    fn secrets_are_removed_at_any_depth() {
        let v = serde_json::json!({
            "pool_id": "p",
            "token": "abc.def",
            "nested": [{"Secret": "s", "keep": 1}],
        });
        let out = without_secrets(v);
        assert_eq!(
            out,
            serde_json::json!({
                "pool_id": "p",
                "token": REMOVED,
                "nested": [{"Secret": REMOVED, "keep": 1}],
            })
        );
    }

    /// Collects the field names of every event.
    struct Fields(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Fields {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            for f in event.fields() {
                self.0.lock().unwrap().push(f.name().to_string());
            }
        }
    }

    #[test]
    fn the_journal_gets_fieldhand_operator_and_fieldhand_action() {
        let names = Arc::new(Mutex::new(Vec::new()));
        let sub = tracing_subscriber::registry().with(Fields(names.clone()));
        tracing::subscriber::with_default(sub, || {
            journal(&AuditRow {
                audit_id: "a".into(),
                at_ms: 0,
                operator: "alice".into(),
                action: AuditAction::TaskCancel,
                target: "t".into(),
                request_json: "{}".into(),
            })
        });
        let journald: Vec<String> = names
            .lock()
            .unwrap()
            .iter()
            .map(|n| crate::daemon::journald_field_name(n))
            .collect();
        for want in ["FIELDHAND_OPERATOR", "FIELDHAND_ACTION", "FIELDHAND_TARGET"] {
            assert!(journald.iter().any(|n| n == want), "{want} in {journald:?}");
        }
    }
}
