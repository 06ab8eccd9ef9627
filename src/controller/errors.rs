//! The controller's one error shape, [`ApiError`]: it becomes `{error_code, error_msg}` with
//! the matching status, and its message names the offending field and value. Also the body
//! parser every handler uses, and the answers several operations share. A leaf: every
//! handler module uses it, it uses none of them.

use http::StatusCode;

use super::store::StoreError;
use crate::proto::domain::{ErrorCode, LogoffPolicy};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub msg: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            msg: msg.into(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidParameter, msg)
    }
    pub fn not_found(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, msg)
    }
    /// 409: the request is valid but the target's state does not allow it now.
    pub fn conflict(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::NotAllowedInCurrentState,
            msg,
        )
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            e.to_string(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            e.to_string(),
        )
    }
}

/// Reads an enum field from its wire text; the error names the field, the value and what is
/// accepted (`pre_start "nap" must be one of reboot, logoff`).
pub fn one_of<T>(
    field: &str,
    value: &str,
    parse: impl Fn(&str) -> Option<T>,
    accepted: String,
) -> Result<T, ApiError> {
    parse(value)
        .ok_or_else(|| ApiError::invalid(format!("{field} {value:?} must be one of {accepted}")))
}

/// Seed 000's `logoff_policy`, `WAIT_FOR_LOGOFF` when absent.
pub fn logoff_policy(value: Option<&str>) -> Result<LogoffPolicy, ApiError> {
    match value {
        Some(v) => one_of(
            "logoff_policy",
            v,
            LogoffPolicy::parse,
            LogoffPolicy::texts(),
        ),
        None => Ok(LogoffPolicy::WaitForLogoff),
    }
}

/// Decodes a JSON body; the error names the field path (`gray_count: invalid type ...`).
/// Parses a request body: exactly one JSON object (nothing after it: a second object or
/// junk would otherwise be dropped silently, with every field in it), then the fields.
/// The same answer, from every operation, for a pool with no machines in service.
pub fn no_machines(pool_id: &str) -> ApiError {
    ApiError::not_found(
        ErrorCode::PoolNotFound,
        format!("pool_id {pool_id:?} has no machines (see GET /v1/machines)"),
    )
}

pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        let what = if e.is_eof() && bytes.iter().all(u8::is_ascii_whitespace) {
            "the request body is empty; expected a JSON object".to_string()
        } else {
            format!("the request body is not one JSON value ({e})")
        };
        ApiError::invalid(what)
    })?;
    let kind = match &value {
        serde_json::Value::Object(_) => None,
        serde_json::Value::Null => Some("null"),
        serde_json::Value::Array(_) => Some("an array"),
        serde_json::Value::String(_) => Some("a string"),
        serde_json::Value::Number(_) => Some("a number"),
        serde_json::Value::Bool(_) => Some("a boolean"),
    };
    if let Some(kind) = kind {
        return Err(ApiError::invalid(format!(
            "the request body is {kind}; expected a JSON object"
        )));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::invalid(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::invalid(format!("field {path}: {inner}"))
        }
    })
}
