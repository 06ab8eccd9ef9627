//! How the domain's enums sit in a column: as their wire text (`as_str`), so the database
//! reads the same as the API and a database of 0.1.0 (which stored the same strings) keeps
//! working. Text that is no variant is a corrupt row, named in the error; an error code a
//! newer release stored reads as `UNKNOWN`.

use super::sql::{FromValue, ToValue, Value};
use crate::proto::domain::{
    AuditAction, CurrentImageState, ErrorCode, LogoffPolicy, MachineState, PendingImageState,
    PoolOperation, PowerPhase, TaskKind, TaskState,
};

fn text(v: &Value) -> Result<&str, String> {
    match v {
        Value::Text(t) => Ok(t),
        other @ (Value::Null | Value::Int(_) | Value::Blob(_)) => {
            Err(format!("expected text, found {other:?}"))
        }
    }
}

macro_rules! text_column {
    ($($ty:ident),+) => {$(
        impl ToValue for $ty {
            fn to_value(&self) -> Value {
                Value::Text(self.as_str().to_string())
            }
        }

        impl FromValue for $ty {
            fn from_value(v: &Value) -> Result<Self, String> {
                let text = text(v)?;
                $ty::parse(text).ok_or_else(|| {
                    format!("{text:?} is not a {} ({})", stringify!($ty), $ty::texts())
                })
            }
        }
    )+};
}

text_column!(
    AuditAction,
    TaskKind,
    TaskState,
    MachineState,
    PowerPhase,
    LogoffPolicy,
    PoolOperation,
    PendingImageState,
    CurrentImageState
);

impl ToValue for ErrorCode {
    fn to_value(&self) -> Value {
        Value::Text(self.as_str().to_string())
    }
}

impl FromValue for ErrorCode {
    fn from_value(v: &Value) -> Result<Self, String> {
        Ok(ErrorCode::from_stored(text(v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::sql::{params, Conn};
    use super::*;

    #[test]
    fn enums_are_stored_as_their_wire_text_and_bad_text_is_refused() {
        let mut db = rusqlite::Connection::open_in_memory().unwrap();
        let mut c = Conn::Sqlite(db.savepoint().unwrap());
        let back: String = c
            .one("SELECT ?1", params![TaskKind::ImageRebuild], |r| r.get(0))
            .unwrap();
        assert_eq!(back, "image_rebuild");
        let kind: TaskKind = c
            .one("SELECT 'software_stage'", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(kind, TaskKind::SoftwareStage);
        let bad = c.one("SELECT 'nap'", params![], |r| r.get::<_, TaskState>(0));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("\"nap\" is not a TaskState"));
        let code: ErrorCode = c
            .one("SELECT 'NEWER_CODE'", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(code, ErrorCode::Unknown);
    }
}
