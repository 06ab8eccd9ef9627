//! One way to run a statement on either database: the store's SQL is written once, with
//! SQLite's numbered placeholders (`?1`), and runs on SQLite (rusqlite) or PostgreSQL
//! (postgres), which sees `$1`. Parameters and columns pass through [`Value`], so the store's
//! code reads a row the same way whichever database answered.
//!
//! Both sides prepare each statement once per connection (a poll runs the same few
//! statements thousands of times a second at fleet size; parsing them again each time was
//! most of the database's CPU).

use std::collections::HashMap;

/// A parameter or a column: what the store's tables hold (integers, text, bytes, NULL).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_text(.0))]
    Postgres(#[from] postgres::Error),
    #[error("the query returned no row")]
    NoRow,
    #[error("column {index}: {why}")]
    Column { index: usize, why: String },
    #[error("{0}")]
    Refused(String),
}

/// PostgreSQL's own message (with its detail), not only "db error".
fn pg_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({}): {d}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

impl SqlError {
    /// Whether the connection itself failed (the database went away), rather than one
    /// statement: the writer then connects again before the next group.
    pub fn connection_lost(&self) -> bool {
        match self {
            // No answer from the server, or one that ends the session: class 08 (connection
            // exception) or 57 (operator intervention: shutdown, admin termination).
            SqlError::Postgres(e) => {
                e.is_closed()
                    || e.as_db_error()
                        .is_none_or(|db| matches!(&db.code().code()[..2], "08" | "57"))
            }
            SqlError::Sqlite(_)
            | SqlError::NoRow
            | SqlError::Column { .. }
            | SqlError::Refused(_) => false,
        }
    }
}

pub type SqlResult<T> = Result<T, SqlError>;

/// `QueryReturnedNoRows` as `None`, as rusqlite's `OptionalExtension` does.
pub trait Optional<T> {
    fn optional(self) -> SqlResult<Option<T>>;
}

impl<T> Optional<T> for SqlResult<T> {
    fn optional(self) -> SqlResult<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(SqlError::NoRow) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A value the store passes as a parameter.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

/// A value the store reads out of a column.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Result<Self, String>;
}

macro_rules! int_value {
    ($($t:ty),+) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
        }
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, String> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i)
                        .map_err(|_| format!("{i} does not fit a {}", stringify!($t))),
                    other @ (Value::Null | Value::Text(_) | Value::Blob(_)) => {
                        Err(format!("expected an integer, found {other:?}"))
                    }
                }
            }
        }
    )+};
}
int_value!(i64, i32, u32);

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}

impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, String> {
        i64::from_value(v).map(|i| i != 0)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other @ (Value::Null | Value::Int(_) | Value::Blob(_)) => {
                Err(format!("expected text, found {other:?}"))
            }
        }
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            other @ (Value::Null | Value::Int(_) | Value::Text(_)) => {
                Err(format!("expected bytes, found {other:?}"))
            }
        }
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            other @ (Value::Int(_) | Value::Text(_) | Value::Blob(_)) => {
                T::from_value(other).map(Some)
            }
        }
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

/// The parameters of one statement, as `rusqlite::params!` writes them.
macro_rules! params {
    () => { &[] as &[&dyn $crate::controller::store::sql::ToValue] };
    ($($p:expr),+ $(,)?) => {
        &[$(&$p as &dyn $crate::controller::store::sql::ToValue),+]
            as &[&dyn $crate::controller::store::sql::ToValue]
    };
}
pub(crate) use params;

/// A column's position (only `usize`, so `r.get(0)` needs no suffix).
pub trait ColIndex {
    fn at(self) -> usize;
}

impl ColIndex for usize {
    fn at(self) -> usize {
        self
    }
}

/// One row, read out whole.
pub struct Row(Vec<Value>);

impl Row {
    /// Column `index` as `T` (`r.get::<_, i64>(3)`, as with rusqlite).
    pub fn get<I: ColIndex, T: FromValue>(&self, index: I) -> SqlResult<T> {
        let index = index.at();
        let v = self.0.get(index).ok_or_else(|| SqlError::Column {
            index,
            why: format!("the row has {} columns", self.0.len()),
        })?;
        T::from_value(v).map_err(|why| SqlError::Column { index, why })
    }
}

/// Statements prepared on one PostgreSQL connection, by their text.
#[derive(Default)]
pub struct PgStatements(HashMap<String, postgres::Statement>);

/// An open transaction (a savepoint of its group's transaction) on either database.
pub enum Conn<'a> {
    Sqlite(rusqlite::Savepoint<'a>),
    /// Inside the group's transaction, under its savepoint `job` (the writer manages both
    /// with plain statements: releasing one job's savepoint and opening the next one's is
    /// one round trip to the server, not two).
    Postgres {
        client: &'a mut postgres::Client,
        statements: &'a mut PgStatements,
    },
}

/// The savepoint every job of a PostgreSQL group runs under.
pub const PG_SAVEPOINT: &str = "SAVEPOINT job";

/// `?1` → `$1`: the store writes SQLite's placeholders; PostgreSQL numbers with `$`.
pub fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut in_text = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_text = !in_text;
                out.push(c);
            }
            '?' if !in_text && chars.peek().is_some_and(|n| n.is_ascii_digit()) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

impl<'a> Conn<'a> {
    /// Runs a statement; the number of rows it changed.
    pub fn exec(&mut self, sql: &str, params: &[&dyn ToValue]) -> SqlResult<usize> {
        match self {
            Conn::Sqlite(tx) => {
                let values: Vec<Value> = params.iter().map(|p| p.to_value()).collect();
                Ok(tx
                    .prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(values.iter()))?)
            }
            Conn::Postgres { client, statements } => {
                let st = pg_statement(client, statements, sql)?;
                let values: Vec<Value> = params.iter().map(|p| p.to_value()).collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values
                    .iter()
                    .map(|v| v as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                Ok(client.execute(&st, &refs)? as usize)
            }
        }
    }

    /// Every row of a query, each turned into a `T` by `f`.
    pub fn all<T>(
        &mut self,
        sql: &str,
        params: &[&dyn ToValue],
        mut f: impl FnMut(&Row) -> SqlResult<T>,
    ) -> SqlResult<Vec<T>> {
        let values: Vec<Value> = params.iter().map(|p| p.to_value()).collect();
        match self {
            Conn::Sqlite(tx) => {
                let mut st = tx.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(values.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut cols = Vec::with_capacity(n);
                    for i in 0..n {
                        cols.push(sqlite_value(r.get_ref(i)?));
                    }
                    out.push(f(&Row(cols))?);
                }
                Ok(out)
            }
            Conn::Postgres { client, statements } => {
                let st = pg_statement(client, statements, sql)?;
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values
                    .iter()
                    .map(|v| v as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                let mut out = Vec::new();
                for r in client.query(&st, &refs)? {
                    let mut cols = Vec::with_capacity(r.len());
                    for i in 0..r.len() {
                        cols.push(r.try_get::<_, Value>(i)?);
                    }
                    out.push(f(&Row(cols))?);
                }
                Ok(out)
            }
        }
    }

    /// The first row of a query; [`SqlError::NoRow`] when there is none.
    pub fn one<T>(
        &mut self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnOnce(&Row) -> SqlResult<T>,
    ) -> SqlResult<T> {
        let mut f = Some(f);
        let mut first = self.all(sql, params, |r| match f.take() {
            Some(f) => f(r).map(Some),
            None => Ok(None),
        })?;
        match first.first_mut().and_then(Option::take) {
            Some(v) => Ok(v),
            None => Err(SqlError::NoRow),
        }
    }

    /// Several statements without parameters (the tests' scratch tables).
    #[cfg(test)]
    pub fn batch(&mut self, sql: &str) -> SqlResult<()> {
        match self {
            Conn::Sqlite(tx) => Ok(tx.execute_batch(sql)?),
            Conn::Postgres { client, .. } => Ok(client.batch_execute(sql)?),
        }
    }

    /// A statement to run with [`Statement::query_map`] (the shape of rusqlite's).
    pub fn statement<'c>(&'c mut self, sql: &str) -> SqlResult<Statement<'c, 'a>> {
        Ok(Statement {
            conn: self,
            sql: sql.to_string(),
        })
    }

    /// Ends this savepoint: released (`commit`) or rolled back.
    pub fn finish(self, commit: bool) -> SqlResult<()> {
        match self {
            Conn::Sqlite(mut sp) => {
                if commit {
                    sp.commit()?;
                } else {
                    sp.rollback()?;
                }
            }
            // The savepoint stays open for the next job either way.
            Conn::Postgres { client, .. } => {
                if commit {
                    client.batch_execute("RELEASE SAVEPOINT job; SAVEPOINT job")?;
                } else {
                    client.batch_execute("ROLLBACK TO SAVEPOINT job")?;
                }
            }
        }
        Ok(())
    }

    /// Which database this is, for the few statements that differ.
    pub fn is_postgres(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres { .. } => true,
        }
    }
}

/// A query bound to its connection, read row by row into `T`s.
pub struct Statement<'c, 'a> {
    conn: &'c mut Conn<'a>,
    sql: String,
}

impl Statement<'_, '_> {
    pub fn query_map<T>(
        &mut self,
        params: &[&dyn ToValue],
        mut f: impl FnMut(&Row) -> SqlResult<T>,
    ) -> SqlResult<std::vec::IntoIter<SqlResult<T>>> {
        let rows = self.conn.all(&self.sql, params, |r| Ok(f(r)))?;
        Ok(rows.into_iter())
    }
}

fn pg_statement(
    client: &mut postgres::Client,
    statements: &mut PgStatements,
    sql: &str,
) -> SqlResult<postgres::Statement> {
    if let Some(st) = statements.0.get(sql) {
        return Ok(st.clone());
    }
    let st = client.prepare(&pg_placeholders(sql))?;
    statements.0.insert(sql.to_string(), st.clone());
    Ok(st)
}

fn sqlite_value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        // The store keeps no REAL columns; one read as text keeps its digits.
        ValueRef::Real(f) => Value::Text(f.to_string()),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

/// A parameter takes the type PostgreSQL inferred for its place: integers become the
/// column's integer width (or a boolean, for `EXISTS`-like places), text stays text.
impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, BoxError> {
        use postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => {
                if *ty == Type::INT8 {
                    i.to_sql(ty, out)
                } else if *ty == Type::INT4 {
                    i32::try_from(*i)?.to_sql(ty, out)
                } else if *ty == Type::INT2 {
                    i16::try_from(*i)?.to_sql(ty, out)
                } else if *ty == Type::BOOL {
                    (*i != 0).to_sql(ty, out)
                } else if *ty == Type::TEXT || *ty == Type::VARCHAR {
                    i.to_string().to_sql(ty, out)
                } else {
                    Err(format!("an integer parameter cannot be a {ty}").into())
                }
            }
            Value::Text(s) => s.to_sql(ty, out),
            Value::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for Value {
    fn from_sql(ty: &postgres::types::Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        use postgres::types::{FromSql, Type};
        Ok(if *ty == Type::INT8 {
            Value::Int(i64::from_sql(ty, raw)?)
        } else if *ty == Type::INT4 {
            Value::Int(i64::from(i32::from_sql(ty, raw)?))
        } else if *ty == Type::INT2 {
            Value::Int(i64::from(i16::from_sql(ty, raw)?))
        } else if *ty == Type::BOOL {
            Value::Int(i64::from(bool::from_sql(ty, raw)?))
        } else if *ty == Type::BYTEA {
            Value::Blob(Vec::<u8>::from_sql(ty, raw)?)
        } else if <String as FromSql>::accepts(ty) {
            Value::Text(String::from_sql(ty, raw)?)
        } else {
            return Err(format!("a column of type {ty} is not one the store reads").into());
        })
    }

    fn from_sql_null(_: &postgres::types::Type) -> Result<Self, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_outside_text_only() {
        assert_eq!(
            pg_placeholders("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d IN (?10, ?3)"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d IN ($10, $3)"
        );
    }

    #[test]
    fn sqlite_rows_read_back_through_values() {
        let mut c = rusqlite::Connection::open_in_memory().unwrap();
        let sp = c.savepoint().unwrap();
        let mut conn = Conn::Sqlite(sp);
        conn.batch("CREATE TABLE t (a BIGINT, b TEXT)").unwrap();
        let none: Option<String> = None;
        conn.exec("INSERT INTO t VALUES (?1, ?2)", params![7i64, none])
            .unwrap();
        let (a, b) = conn
            .one("SELECT a, b FROM t", params![], |r| {
                Ok((r.get::<_, u32>(0)?, r.get::<_, Option<String>>(1)?))
            })
            .unwrap();
        assert_eq!((a, b), (7, None));
        let missing = conn
            .one("SELECT a FROM t WHERE a = ?1", params![8i64], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .unwrap();
        assert_eq!(missing, None);
        let bad = conn.one("SELECT b FROM t", params![], |r| r.get::<_, i64>(0));
        assert!(bad.unwrap_err().to_string().contains("column 0"));
    }
}
