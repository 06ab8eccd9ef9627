//! The operator API (`/v1/...`) that changes things: scripts, script executions
//! (validation, task creation) and cancelling a task. What it answers with is built by
//! `views`. Errors are [`ApiError`]s (`errors`).

use http::StatusCode;
use sha2::{Digest, Sha256};

use super::errors::{logoff_policy, one_of};
pub use super::errors::{no_machines, parse_json, ApiError};
use super::rollout::{plan_batches, TaskState};
use super::settings::{
    force_logoff_grace, DEFAULT_FORCE_LOGOFF_GRACE_SECONDS, DEFAULT_LOGOFF_TIMEOUT_SECONDS,
};
use super::store::{RolloutRow, ScriptRow, TaskRow};
use super::views::{task_not_found, task_view};
use super::Controller;
use super::{audit, engine};
use crate::pki::Identity;
use crate::proto::agent::{PowerSpec, ScriptPayload};
use crate::proto::api::{self, Amount};
use crate::proto::domain::{AuditAction, ErrorCode, PostFinish, PreStart, TaskKind};
use crate::sys::clock;

/// The interpreters a script may name in `command_type`.
pub const COMMAND_TYPES: [&str; 3] = ["sh", "bash", "python3"];
/// `execution_timeout_seconds` upper bound (48 h); `execution_timeout` minutes are capped alike.
pub const MAX_TIMEOUT_SECONDS: i64 = 172_800;
const MAX_SCRIPT_BYTES: usize = 1024 * 1024;

fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    crate::pki::validate_name(field, value).map_err(|e| ApiError::invalid(e.to_string()))
}

fn check_command_type(field: &str, value: &str) -> Result<(), ApiError> {
    if COMMAND_TYPES.contains(&value) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} {value:?} is not one of {}",
            COMMAND_TYPES.join(", ")
        )))
    }
}

fn check_content(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(format!("{field} must not be empty")));
    }
    if value.len() > MAX_SCRIPT_BYTES {
        return Err(ApiError::invalid(format!(
            "{field} is {} bytes; the limit is {MAX_SCRIPT_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub async fn create_script(
    ctl: &Controller,
    by: &Identity,
    req: api::CreateScript,
) -> Result<api::ScriptCreated, ApiError> {
    if req.name.trim().is_empty() || req.name.len() > 255 {
        return Err(ApiError::invalid(format!(
            "name {:?} must be 1 to 255 characters",
            req.name
        )));
    }
    check_command_type("command_type", &req.command_type)?;
    check_content("content", &req.content)?;
    let row = ScriptRow {
        script_id: uuid::Uuid::new_v4().to_string(),
        sha256: sha256_hex(req.content.as_bytes()),
        name: req.name,
        command_type: req.command_type,
        content: req.content,
        created_ms: clock::unix_ms(clock::now()),
    };
    let out = api::ScriptCreated {
        script_id: row.script_id.clone(),
        sha256: row.sha256.clone(),
    };
    let by = by.clone();
    let request = api::CreateScript {
        name: row.name.clone(),
        command_type: row.command_type.clone(),
        content: row.content.clone(),
    };
    ctl.store
        .tx(move |tx| {
            tx.insert_script(&row)?;
            audit::record(tx, &by, AuditAction::ScriptCreate, &row.script_id, &request)
        })
        .await?;
    Ok(out)
}

/// What to run, decided from the request alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commands {
    Scripts(Vec<String>),
    Inline {
        command_type: String,
        content: String,
    },
}

/// A script execution request that passed every check not needing the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionSpec {
    pub commands: Commands,
    /// Resolved against the pool in the transaction that creates the task.
    pub gray_count: Option<Amount>,
    pub gray_desktop_ids: Option<Vec<String>>,
    pub gray_fail_threshold: Option<u32>,
    pub timeout_seconds: u64,
    /// The power and logoff plan (the grace period is filled in from settings).
    pub power: PowerSpec,
    pub max_concurrency: Option<Amount>,
    pub max_errors: Option<Amount>,
}

/// Validates `POST /v1/pools/{pool_id}/script-executions` without touching the store.
pub fn validate_execution(req: &api::CreateScriptExecution) -> Result<ExecutionSpec, ApiError> {
    let pre_start = match &req.pre_start {
        Some(v) => Some(one_of("pre_start", v, PreStart::parse, PreStart::texts())?),
        None => None,
    };
    let post_finish = match &req.post_finish {
        Some(v) => Some(one_of(
            "post_finish",
            v,
            PostFinish::parse,
            PostFinish::texts(),
        )?),
        None => None,
    };
    let logoff_policy = logoff_policy(req.logoff_policy.as_deref())?;
    let logoff_timeout = req
        .logoff_timeout_seconds
        .unwrap_or(DEFAULT_LOGOFF_TIMEOUT_SECONDS);
    if !(1..=86_400).contains(&logoff_timeout) {
        return Err(ApiError::invalid(format!(
            "logoff_timeout_seconds {logoff_timeout} must be 1..=86400"
        )));
    }
    let power = PowerSpec {
        pre_start,
        post_finish,
        logoff_policy,
        logoff_timeout_seconds: logoff_timeout as u64,
        force_logoff_grace_seconds: DEFAULT_FORCE_LOGOFF_GRACE_SECONDS as u64,
    };
    let commands = match (&req.script_ids, &req.command_content) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "script_ids and command_content are mutually exclusive: set exactly one",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "one of script_ids or command_content is required",
            ))
        }
        (Some(ids), None) => {
            if ids.is_empty() {
                return Err(ApiError::invalid("script_ids must not be empty"));
            }
            if let Some(t) = &req.command_type {
                return Err(ApiError::invalid(format!(
                    "command_type {t:?} applies only to command_content, not to script_ids"
                )));
            }
            for id in ids {
                if id.is_empty() {
                    return Err(ApiError::invalid("script_ids contains an empty id"));
                }
            }
            Commands::Scripts(ids.clone())
        }
        (None, Some(content)) => {
            let Some(t) = &req.command_type else {
                return Err(ApiError::invalid(
                    "command_type is required with command_content (sh, bash or python3)",
                ));
            };
            check_command_type("command_type", t)?;
            check_content("command_content", content)?;
            Commands::Inline {
                command_type: t.clone(),
                content: content.clone(),
            }
        }
    };
    let mut timeout_seconds = 60;
    if let Some(m) = req.execution_timeout {
        if !(1..=MAX_TIMEOUT_SECONDS / 60).contains(&m) {
            return Err(ApiError::invalid(format!(
                "execution_timeout {m} must be 1..={} minutes",
                MAX_TIMEOUT_SECONDS / 60
            )));
        }
        timeout_seconds = m * 60;
    }
    if let Some(s) = req.execution_timeout_seconds {
        if !(1..=MAX_TIMEOUT_SECONDS).contains(&s) {
            return Err(ApiError::invalid(format!(
                "execution_timeout_seconds {s} must be 1..={MAX_TIMEOUT_SECONDS}"
            )));
        }
        timeout_seconds = s;
    }
    // Zero, negative and malformed amounts were refused while decoding (`Amount`).
    let gray_count = req.gray_count;
    if let Some(ids) = &req.gray_desktop_ids {
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "gray_desktop_ids must not be empty when given",
            ));
        }
        for (i, id) in ids.iter().enumerate() {
            check_name("gray_desktop_ids", id)?;
            if ids[..i].contains(id) {
                return Err(ApiError::invalid(format!(
                    "gray_desktop_ids lists {id:?} twice"
                )));
            }
        }
    }
    // The gray batch, when there is one, and its size (gray_count wins over the ids). A
    // percentage is at least one machine; its size is checked against the threshold when
    // the pool is known.
    let gray_size = match gray_count {
        Some(Amount::Count(n)) => Some(n as usize),
        Some(Amount::Percent(_)) => Some(usize::MAX),
        None => req.gray_desktop_ids.as_ref().map(Vec::len),
    };
    let gray_fail_threshold = match req.gray_fail_threshold {
        // Seed 002 gives no default; a gray batch that can never halt is no gate, so one
        // failure halts unless the operator says otherwise.
        None => gray_size.map(|_| 1),
        Some(t) if t < 1 || t > i64::from(u32::MAX) => {
            return Err(ApiError::invalid(format!(
                "gray_fail_threshold {t} must be at least 1"
            )))
        }
        Some(t) => {
            let Some(size) = gray_size else {
                return Err(ApiError::invalid(format!(
                    "gray_fail_threshold {t} needs a gray batch: set gray_count or gray_desktop_ids"
                )));
            };
            if t as usize > size {
                return Err(ApiError::invalid(format!(
                    "gray_fail_threshold {t} is larger than the gray batch ({size} machines): it could never halt the task"
                )));
            }
            Some(t as u32)
        }
    };
    Ok(ExecutionSpec {
        commands,
        gray_count,
        gray_desktop_ids: req.gray_desktop_ids.clone(),
        gray_fail_threshold,
        timeout_seconds: timeout_seconds as u64,
        power,
        max_concurrency: req.max_concurrency,
        max_errors: req.max_errors,
    })
}

/// The gray batch's size for a pool of `pool` machines: a count must fit the pool, a
/// percentage is rounded up (at least one machine).
fn gray_size(gray: Amount, pool: usize, pool_id: &str) -> Result<usize, ApiError> {
    let n = gray.of(pool);
    if n > pool {
        return Err(ApiError::invalid(format!(
            "gray_count {gray} is larger than pool {pool_id:?} ({pool} machines)"
        )));
    }
    Ok(n)
}

/// What a task's rate controls come to for its `machines` targeted machines.
fn resolve_rate(
    spec_wave: Option<Amount>,
    spec_errors: Option<Amount>,
    machines: usize,
) -> (Option<u32>, Option<u32>) {
    let n = |a: Amount| u32::try_from(a.of(machines)).unwrap_or(u32::MAX);
    (spec_wave.map(n), spec_errors.map(n))
}

pub async fn create_execution(
    ctl: &Controller,
    by: &Identity,
    pool_id: String,
    req: api::CreateScriptExecution,
) -> Result<api::TaskCreated, ApiError> {
    check_name("pool_id", &pool_id)?;
    let spec = validate_execution(&req)?;
    let by = by.clone();
    let task_id = uuid::Uuid::new_v4().to_string();
    let now_ms = clock::unix_ms(clock::now());
    let tid = task_id.clone();
    let wake = ctl
        .store
        .tx(move |tx| {
            let pool = tx.pool_machines(&pool_id)?;
            if pool.is_empty() {
                return Err(no_machines(&pool_id));
            }
            let gray_count = match spec.gray_count {
                Some(g) => Some(gray_size(g, pool.len(), &pool_id)?),
                None => None,
            };
            if let (Some(n), Some(t)) = (gray_count, spec.gray_fail_threshold) {
                if t as usize > n {
                    return Err(ApiError::invalid(format!(
                        "gray_fail_threshold {t} is larger than the gray batch ({n} machines): it could never halt the task"
                    )));
                }
            }
            if let Some(ids) = &spec.gray_desktop_ids {
                if let Some(unknown) = ids.iter().find(|id| !pool.contains(id)) {
                    return Err(ApiError::invalid(format!(
                        "gray_desktop_ids: {unknown:?} is not a machine of pool {pool_id:?}"
                    )));
                }
            }
            let scripts = match &spec.commands {
                Commands::Inline {
                    command_type,
                    content,
                } => vec![ScriptPayload {
                    name: "command_content".into(),
                    command_type: command_type.clone(),
                    content: content.clone(),
                    sha256: sha256_hex(content.as_bytes()),
                }],
                Commands::Scripts(ids) => {
                    let mut v = Vec::with_capacity(ids.len());
                    for id in ids {
                        let s = tx.script(id)?.ok_or_else(|| {
                            ApiError::not_found(
                                ErrorCode::ScriptNotFound,
                                format!("script_ids: {id:?} does not exist"),
                            )
                        })?;
                        v.push(ScriptPayload {
                            name: s.name,
                            command_type: s.command_type,
                            content: s.content,
                            sha256: s.sha256,
                        });
                    }
                    v
                }
            };
            let mut power = spec.power.clone();
            power.force_logoff_grace_seconds = force_logoff_grace(tx)? as u64;
            let power_json = serde_json::to_string(&power).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::InternalError,
                    e.to_string(),
                )
            })?;
            let batches = plan_batches(&pool, gray_count, spec.gray_desktop_ids.as_deref());
            let (wave_limit, error_limit) =
                resolve_rate(spec.max_concurrency, spec.max_errors, pool.len());
            let mut machines = Vec::with_capacity(pool.len());
            for (i, batch) in batches.iter().enumerate() {
                for m in batch {
                    machines.push((m.clone(), uuid::Uuid::new_v4().to_string(), i as u32));
                }
            }
            let scripts_json = serde_json::to_string(&scripts).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::InternalError,
                    e.to_string(),
                )
            })?;
            tx.insert_task(
                &TaskRow {
                    task_id: tid.clone(),
                    kind: TaskKind::ScriptExecution,
                    pool_id,
                    state: TaskState::Pending,
                    created_ms: now_ms,
                    finished_ms: None,
                    gray_fail_threshold: spec.gray_fail_threshold,
                    timeout_seconds: spec.timeout_seconds,
                    scripts_json,
                    power_json: Some(power_json),
                    created_by: Some(by.name.clone()),
                    cancelled_by: None,
                    rollout: RolloutRow {
                        gray_count: spec.gray_count,
                        max_concurrency: spec.max_concurrency,
                        max_errors: spec.max_errors,
                        wave_limit,
                        error_limit,
                        ..RolloutRow::default()
                    },
                },
                &machines,
            )?;
            audit::record(tx, &by, AuditAction::TaskCreate, &tid, &req)?;
            let mut wake = Vec::new();
            engine::advance(tx, &tid, now_ms, &mut wake)?;
            Ok(wake)
        })
        .await?;
    ctl.wake(&wake);
    Ok(api::TaskCreated { task_id })
}

pub async fn cancel_task(
    ctl: &Controller,
    by: &Identity,
    task_id: String,
) -> Result<api::Task, ApiError> {
    let now_ms = clock::unix_ms(clock::now());
    let by = by.clone();
    let (view, wake) = ctl
        .store
        .tx(move |tx| {
            let mut wake = Vec::new();
            engine::cancel(tx, &task_id, now_ms, &mut wake)?;
            tx.set_task_cancelled_by(&task_id, &by.name)?;
            audit::record(
                tx,
                &by,
                AuditAction::TaskCancel,
                &task_id,
                &serde_json::json!({}),
            )?;
            let task = tx.task(&task_id)?.ok_or_else(|| task_not_found(&task_id))?;
            let machines = tx.task_machines(&task_id)?;
            Ok::<_, ApiError>((task_view(&task, &machines), wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> api::CreateScriptExecution {
        api::CreateScriptExecution {
            command_content: Some("echo hi".into()),
            command_type: Some("sh".into()),
            ..Default::default()
        }
    }

    fn msg(r: api::CreateScriptExecution) -> (StatusCode, ErrorCode, String) {
        let e = validate_execution(&r).unwrap_err();
        (e.status, e.code, e.msg)
    }

    #[test]
    fn defaults_follow_the_seed() {
        let s = validate_execution(&req()).unwrap();
        assert_eq!(
            s.timeout_seconds, 60,
            "execution_timeout defaults to 1 minute"
        );
        let s = validate_execution(&api::CreateScriptExecution {
            execution_timeout: Some(3),
            execution_timeout_seconds: Some(5),
            ..req()
        })
        .unwrap();
        assert_eq!(s.timeout_seconds, 5, "seconds override minutes");
    }

    #[test]
    fn rejections_name_field_and_value() {
        let (st, code, m) = msg(api::CreateScriptExecution {
            post_finish: Some("hibernate".into()),
            ..req()
        });
        assert_eq!(
            (st, code),
            (StatusCode::BAD_REQUEST, ErrorCode::InvalidParameter)
        );
        assert!(m.contains("post_finish") && m.contains("hibernate"));
        let (_, _, m) = msg(api::CreateScriptExecution {
            logoff_policy: Some("ASK_NICELY".into()),
            ..req()
        });
        assert!(m.contains("logoff_policy") && m.contains("ASK_NICELY"));
        let (_, _, m) = msg(api::CreateScriptExecution {
            logoff_timeout_seconds: Some(0),
            ..req()
        });
        assert!(m.contains("logoff_timeout_seconds 0"));
        let (_, _, m) = msg(api::CreateScriptExecution {
            script_ids: Some(vec!["x".into()]),
            ..req()
        });
        assert!(m.contains("mutually exclusive"));
        let (_, _, m) = msg(api::CreateScriptExecution {
            command_type: Some("perl".into()),
            ..req()
        });
        assert!(m.contains("command_type") && m.contains("perl"));
        let (_, _, m) = msg(api::CreateScriptExecution {
            execution_timeout_seconds: Some(172_801),
            ..req()
        });
        assert!(m.contains("execution_timeout_seconds") && m.contains("172801"));
        let (_, _, m) = msg(api::CreateScriptExecution {
            gray_fail_threshold: Some(1),
            ..req()
        });
        assert!(m.contains("gray_fail_threshold"));
        let (_, _, m) = msg(api::CreateScriptExecution {
            command_type: None,
            ..req()
        });
        assert!(m.contains("command_type is required"));
    }

    #[test]
    fn amounts_are_a_count_or_a_percentage_and_errors_name_field_and_value() {
        let body = |field: &str, v: &str| {
            format!(r#"{{"command_content":"true","command_type":"sh","{field}":{v}}}"#)
        };
        for field in ["gray_count", "max_concurrency", "max_errors"] {
            for bad in [
                "0",
                "-1",
                "1.5",
                r#""0%""#,
                r#""101%""#,
                r#""abc""#,
                r#""-5%""#,
                r#""%""#,
            ] {
                let e = parse_json::<api::CreateScriptExecution>(body(field, bad).as_bytes())
                    .unwrap_err();
                assert_eq!(e.status, StatusCode::BAD_REQUEST, "{field} {bad}");
                let shown = bad.trim_matches('"');
                assert!(
                    e.msg.contains(field) && e.msg.contains(shown),
                    "{field} {bad}: {}",
                    e.msg
                );
            }
            for (good, want) in [
                ("3", Amount::Count(3)),
                (r#""10%""#, Amount::Percent(10)),
                (r#""100%""#, Amount::Percent(100)),
                (r#""1%""#, Amount::Percent(1)),
            ] {
                let r: api::CreateScriptExecution =
                    parse_json(body(field, good).as_bytes()).unwrap();
                let got = match field {
                    "gray_count" => r.gray_count,
                    "max_concurrency" => r.max_concurrency,
                    _ => r.max_errors,
                };
                assert_eq!(got, Some(want), "{field} {good}");
                // And back out the same way.
                assert_eq!(serde_json::to_string(&want).unwrap(), good);
            }
        }
        // Percentages round up and are at least one machine.
        assert_eq!(Amount::Percent(10).of(2000), 200);
        assert_eq!(Amount::Percent(10).of(5), 1);
        assert_eq!(Amount::Percent(34).of(3), 2);
        assert_eq!(Amount::Percent(1).of(0), 1);
        assert_eq!(Amount::Count(7).of(3), 7);
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<api::CreateScriptExecution>(br#"{"gray_count":"two"}"#).unwrap_err();
        assert!(e.msg.contains("gray_count"), "{}", e.msg);
        let e = parse_json::<api::CreateScriptExecution>(br#"{"grey_count":1}"#).unwrap_err();
        assert!(e.msg.contains("grey_count"), "{}", e.msg);
    }

    #[test]
    fn a_body_is_exactly_one_object() {
        // Two objects: the second one's gray batch would be dropped without a word.
        for body in [
            &br#"{"command_content":"true","command_type":"sh"} {"gray_count":1}"#[..],
            br#"{"command_content":"true","command_type":"sh"} junk"#,
        ] {
            let e = parse_json::<api::CreateScriptExecution>(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.msg.contains("not one JSON value"), "{}", e.msg);
        }
        let e = parse_json::<api::CreateScriptExecution>(b"hello").unwrap_err();
        assert!(e.msg.contains("request body"), "{}", e.msg);
        assert!(!e.msg.contains("field ?"), "{}", e.msg);
        for (body, kind) in [
            (&b"null"[..], "null"),
            (b"[]", "an array"),
            (b"3", "a number"),
        ] {
            let e = parse_json::<api::CreateScriptExecution>(body).unwrap_err();
            assert!(
                e.msg.contains(kind) && e.msg.contains("expected a JSON object"),
                "{}",
                e.msg
            );
        }
        let e = parse_json::<api::CreateScriptExecution>(b" ").unwrap_err();
        assert!(e.msg.contains("empty"), "{}", e.msg);
    }
}
