//! Tasks: starting one and following it (`--wait`, `tasks watch`: exit by how it ended),
//! listing them (`GET /v1/tasks`, page by page), and showing one with a row per machine.

use serde_json::Value;

use super::api::{self, decode, Api, Call, TaskFilter};
use super::table::{self, cut, keep, opt, WIDTH};
use super::{exit_for, watch, CtlError, Format, Out};
use crate::exit::Exit;
use crate::proto::api::{Task, TaskCreated};
use crate::proto::ctl::TaskSummary;

/// Sends a call that starts a task (`{"task_id": ...}`); prints the id, or follows the task.
pub async fn start(api: &Api, c: &Call, wait: bool, out: Out) -> Result<Exit, CtlError> {
    let (created, raw) = api.get::<TaskCreated>(c).await?;
    started(api, &created.task_id, &raw, wait, out).await
}

async fn started(api: &Api, id: &str, raw: &Value, wait: bool, out: Out) -> Result<Exit, CtlError> {
    if !wait {
        out.either(raw, || format!("task {id}\n"))?;
        return Ok(Exit::Ok);
    }
    if out.format == Format::Table {
        out.text(&format!("task {id}\n"))?;
    }
    finish(api, id, out).await
}

/// Follows a task to its end, prints it, and exits by its state (`tasks watch`, `--wait`).
pub async fn finish(api: &Api, id: &str, out: Out) -> Result<Exit, CtlError> {
    let (stream, tty) = out.progress();
    let (task, raw) = watch::follow(api, id, stream, tty).await?;
    out.either(&raw, || {
        format!(
            "{}task {} {}\n",
            machines_table(&task),
            task.task_id,
            task.state
        )
    })?;
    Ok(exit_for(task.state))
}

pub async fn resume(api: &Api, id: &str, wait: bool, out: Out) -> Result<Exit, CtlError> {
    let c = api::resume(id);
    if wait {
        let (t, raw) = api.get::<Task>(&c).await?;
        return started(api, &t.task_id, &raw, true, out).await;
    }
    tasks_show(api, &c, out).await
}

/// `SUCCEEDED 3, FAILED 1`.
fn counts(t: &TaskSummary) -> String {
    let parts: Vec<String> = t
        .machine_states
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    parts.join(", ")
}

pub fn tasks_table(ts: &[TaskSummary]) -> String {
    let rows: Vec<Vec<String>> = ts
        .iter()
        .map(|t| {
            vec![
                t.task_id.clone(),
                t.kind.to_string(),
                opt(t.pool_id.as_deref()),
                t.state.to_string(),
                opt(t.created_at.as_deref()),
                counts(t),
            ]
        })
        .collect();
    let cols = [
        keep("TASK"),
        cut("KIND"),
        cut("POOL"),
        keep("STATE"),
        cut("CREATED"),
        cut("MACHINES"),
    ];
    table::render(&cols, &rows, WIDTH)
}

pub async fn tasks_ls(
    api: &Api,
    filter: &TaskFilter,
    limit: Option<usize>,
    out: Out,
) -> Result<Exit, CtlError> {
    let page = limit.map_or(super::fleet::PAGE, |l| l.min(super::fleet::PAGE));
    let (rows, call) = api
        .list(|cursor| api::tasks(filter, Some(page), cursor), limit)
        .await?;
    let ts = rows
        .iter()
        .map(|v| decode::<TaskSummary>(&call, v))
        .collect::<Result<Vec<_>, _>>()?;
    out.either(&Value::Array(rows), || tasks_table(&ts))?;
    Ok(Exit::Ok)
}

/// The machines of a task: one row each, with the first line of its output.
pub fn machines_table(t: &Task) -> String {
    let rows: Vec<Vec<String>> = t
        .machines
        .iter()
        .map(|m| {
            let first = |s: &str| s.lines().next().unwrap_or("").to_string();
            let output = match first(&m.stdout) {
                o if o.is_empty() => first(&m.stderr),
                o => o,
            };
            vec![
                m.machine_id.clone(),
                m.batch.to_string(),
                m.state.to_string(),
                opt(m.exit_code),
                opt(m.error_code),
                output,
            ]
        })
        .collect();
    let cols = [
        keep("MACHINE"),
        keep("BATCH"),
        keep("STATE"),
        keep("EXIT"),
        cut("ERROR"),
        cut("OUTPUT (first line)"),
    ];
    table::render(&cols, &rows, WIDTH)
}

pub fn task_text(t: &Task) -> String {
    let items = [
        ("task", t.task_id.clone()),
        ("kind", t.kind.to_string()),
        ("pool", t.pool_id.clone()),
        ("state", t.state.to_string()),
        ("created", t.created_at.clone()),
        ("finished", opt(t.finished_at.as_deref())),
        ("batches", watch::summary(t)),
    ];
    format!("{}{}", table::pairs(&items, WIDTH), machines_table(t))
}

/// Prints the task a call answers with (`GET /v1/tasks/{id}`, cancel, resume).
pub async fn tasks_show(api: &Api, c: &Call, out: Out) -> Result<Exit, CtlError> {
    let (t, raw) = api.get::<Task>(c).await?;
    out.either(&raw, || task_text(&t))?;
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn task_tables_fit_80_columns() {
        let t: TaskSummary = serde_json::from_value(json!({
            "task_id": "3f0c9a52-5b1e-4c1a-9d7e-0a4b2c6d8e10", "kind": "script_execution",
            "pool_id": "instant-clone-pool-east", "state": "SUCCEEDED",
            "created_at": "2026-12-01T10:22:33.123Z",
            "machine_states": {"SUCCEEDED": 1187, "FAILED": 13}
        }))
        .unwrap();
        let out = tasks_table(&[t]);
        assert!(out.lines().all(|l| l.chars().count() <= WIDTH), "{out}");
        assert!(
            out.contains("3f0c9a52-5b1e-4c1a-9d7e-0a4b2c6d8e10 "),
            "{out}"
        );
    }
}
