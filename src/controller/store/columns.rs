//! How the domain's enums sit in a column: as their wire text (`as_str`), so the database
//! reads the same as the API and a database of 0.1.0 (which stored the same strings) keeps
//! working. Text that is no variant is a corrupt row, named in the error; an error code a
//! newer release stored reads as `UNKNOWN`.

use crate::proto::domain::{
    CurrentImageState, ErrorCode, LogoffPolicy, MachineState, PendingImageState, PoolOperation,
    PowerPhase, TaskKind, TaskState,
};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

macro_rules! text_column {
    ($($ty:ident),+) => {$(
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                $ty::parse(text).ok_or_else(|| {
                    FromSqlError::Other(
                        format!("{text:?} is not a {} ({})", stringify!($ty), $ty::texts()).into(),
                    )
                })
            }
        }
    )+};
}

text_column!(
    TaskKind,
    TaskState,
    MachineState,
    PowerPhase,
    LogoffPolicy,
    PoolOperation,
    PendingImageState,
    CurrentImageState
);

impl ToSql for ErrorCode {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for ErrorCode {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Ok(ErrorCode::from_stored(value.as_str()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_are_stored_as_their_wire_text_and_bad_text_is_refused() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let back: String = db
            .query_row("SELECT ?1", [TaskKind::ImageRebuild], |r| r.get(0))
            .unwrap();
        assert_eq!(back, "image_rebuild");
        let kind: TaskKind = db
            .query_row("SELECT 'software_stage'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kind, TaskKind::SoftwareStage);
        let bad = db.query_row("SELECT 'nap'", [], |r| r.get::<_, TaskState>(0));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("\"nap\" is not a TaskState"));
        let code: ErrorCode = db
            .query_row("SELECT 'NEWER_CODE'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(code, ErrorCode::Unknown);
    }
}
