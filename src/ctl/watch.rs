//! Following a task to its end (`tasks watch`, and `--wait` on every command that starts
//! one): `GET /v1/tasks/{id}/summary` once a second (the counts only, a few hundred bytes
//! however many machines the task has), shown as one progress bar per batch with its
//! machines counted by state when the output is a terminal, and otherwise as plain lines,
//! one per change (not per poll), so a log or a CI job gets a short readable history.
//! When the task has ended, `GET /v1/tasks/{id}` once for the rows the final table shows.
//! A controller that cannot be reached is retried for [`GIVE_UP_AFTER`]; then the watch ends
//! with the connection error (the task itself goes on without us).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::api::{self, Api};
use super::CtlError;
use crate::net::NetError;
use crate::proto::api::{Task, TaskProgress};
use crate::proto::domain::{MachineState, TaskState};

/// How often the task is read.
pub const POLL: Duration = Duration::from_secs(1);
/// How long the controller may stay unreachable before the watch gives up.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

/// Where progress goes: stdout for tables, stderr when stdout carries JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One batch's machines by state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchCount {
    pub index: u32,
    pub total: u64,
    pub by_state: BTreeMap<MachineState, u64>,
}

impl BatchCount {
    /// Machines that have ended (any final state).
    pub fn done(&self) -> u64 {
        self.by_state
            .iter()
            .filter(|(s, _)| s.is_final())
            .map(|(_, n)| n)
            .sum()
    }

    /// `SUCCEEDED 2, RUNNING 1`.
    pub fn states(&self) -> String {
        let parts: Vec<String> = self
            .by_state
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        parts.join(", ")
    }
}

/// The task's batches with their machines counted by state.
pub fn batch_counts(task: &Task) -> Vec<BatchCount> {
    let mut out: Vec<BatchCount> = task
        .batches
        .iter()
        .map(|b| BatchCount {
            index: b.index,
            total: b.machine_ids.len() as u64,
            by_state: BTreeMap::new(),
        })
        .collect();
    for m in &task.machines {
        let i = match out.iter().position(|b| b.index == m.batch) {
            Some(i) => i,
            None => {
                // A machine in a batch the task does not list: count it all the same.
                out.push(BatchCount {
                    index: m.batch,
                    total: 0,
                    by_state: BTreeMap::new(),
                });
                out.len() - 1
            }
        };
        *out[i].by_state.entry(m.state).or_default() += 1;
    }
    for b in &mut out {
        b.total = b.total.max(b.by_state.values().sum());
    }
    out.sort_by_key(|b| b.index);
    out
}

/// The batches of a task's summary (`GET /v1/tasks/{id}/summary`), as [`batch_counts`]
/// makes them from the whole task.
pub fn progress_counts(p: &TaskProgress) -> Vec<BatchCount> {
    let mut out: Vec<BatchCount> = p
        .batches
        .iter()
        .map(|b| BatchCount {
            index: b.index,
            total: u64::from(b.machines),
            by_state: b
                .machine_states
                .iter()
                .map(|(s, n)| (*s, u64::from(*n)))
                .collect(),
        })
        .collect();
    for b in &mut out {
        b.total = b.total.max(b.by_state.values().sum());
    }
    out.sort_by_key(|b| b.index);
    out
}

/// The plain line for a task in `state` with these batches: its state, then each batch.
pub fn line(state: TaskState, batches: &[BatchCount]) -> String {
    let batches: Vec<String> = batches
        .iter()
        .map(|b| format!("batch {}: {}", b.index, b.states()))
        .collect();
    format!("{:<10} {}", state.as_str(), batches.join(" | "))
        .trim_end()
        .to_string()
}

/// The plain line for the task as it is now.
pub fn summary(task: &Task) -> String {
    line(task.state, &batch_counts(task))
}

trait Show {
    fn show(&mut self, p: &TaskProgress);
    fn done(&mut self);
}

/// Plain lines: one when the summary changes.
struct Lines {
    stream: Stream,
    last: Option<String>,
}

impl Show for Lines {
    fn show(&mut self, p: &TaskProgress) {
        let line = line(p.state, &progress_counts(p));
        if self.last.as_deref() == Some(line.as_str()) {
            return;
        }
        // A closed pipe is no reason to stop following the task (its exit code matters).
        let _ = match self.stream {
            Stream::Stdout => writeln!(std::io::stdout(), "{line}"),
            Stream::Stderr => writeln!(std::io::stderr(), "{line}"),
        };
        self.last = Some(line);
    }

    fn done(&mut self) {}
}

/// Bars in place on a terminal: a head line with the task's state, and one bar per batch.
struct Bars {
    multi: MultiProgress,
    head: ProgressBar,
    bars: Vec<ProgressBar>,
}

impl Bars {
    fn new(stream: Stream) -> Self {
        let target = match stream {
            Stream::Stdout => ProgressDrawTarget::stdout(),
            Stream::Stderr => ProgressDrawTarget::stderr(),
        };
        let multi = MultiProgress::with_draw_target(target);
        let head = multi.add(ProgressBar::new_spinner());
        head.set_style(
            ProgressStyle::with_template("{spinner} task {prefix} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Bars {
            multi,
            head,
            bars: Vec::new(),
        }
    }
}

impl Show for Bars {
    fn show(&mut self, p: &TaskProgress) {
        self.head.set_prefix(p.task_id.clone());
        self.head.set_message(p.state.as_str());
        self.head.tick();
        // 80 columns: "batch NN [20] NNNN/NNNN " leaves about 40 for the states.
        let style = ProgressStyle::with_template(
            "batch {prefix:>2} [{bar:20.cyan/blue}] {pos:>4}/{len:<4} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        for (i, b) in progress_counts(p).iter().enumerate() {
            if i == self.bars.len() {
                let bar = self.multi.add(ProgressBar::new(b.total));
                bar.set_style(style.clone());
                self.bars.push(bar);
            }
            let bar = &self.bars[i];
            bar.set_prefix(b.index.to_string());
            bar.set_length(b.total);
            bar.set_position(b.done());
            bar.set_message(b.states());
        }
    }

    fn done(&mut self) {
        for b in &self.bars {
            b.abandon();
        }
        self.head.abandon();
    }
}

/// Whether an error is worth retrying: the controller may come back (a restart, a
/// failover), while an answer it gave (404, 403) will not change.
fn transient(e: &CtlError) -> bool {
    match e {
        CtlError::Api(n) => match n {
            NetError::Connect { .. }
            | NetError::Tls { .. }
            | NetError::Http { .. }
            | NetError::Timeout { .. }
            | NetError::Busy { .. } => true,
            NetError::BadUrl { .. }
            | NetError::Status { .. }
            | NetError::Decode { .. }
            | NetError::Encode { .. } => false,
        },
        CtlError::Config(_)
        | CtlError::MissingRoute { .. }
        | CtlError::Decode { .. }
        | CtlError::Read { .. }
        | CtlError::Write(_)
        | CtlError::Refused(_) => false,
    }
}

/// Follows task `id` until it has ended; returns it (decoded, and as the controller sent
/// it). `tty` says whether `stream` is a terminal (bars) or not (lines).
pub async fn follow(
    api: &Api,
    id: &str,
    stream: Stream,
    tty: bool,
) -> Result<(Task, Value), CtlError> {
    let mut show: Box<dyn Show> = if tty {
        Box::new(Bars::new(stream))
    } else {
        Box::new(Lines { stream, last: None })
    };
    let poll = api::task_summary(id);
    let mut reached = Instant::now();
    loop {
        match api.get::<TaskProgress>(&poll).await {
            Ok((p, _)) => {
                reached = Instant::now();
                show.show(&p);
                if p.state.is_terminal() {
                    show.done();
                    break;
                }
            }
            Err(e) if transient(&e) && reached.elapsed() < GIVE_UP_AFTER => {}
            Err(e) => {
                show.done();
                return Err(e);
            }
        }
        tokio::time::sleep(POLL).await;
    }
    // An ended task no longer changes: its rows, once, for the final table (or JSON).
    let whole = api::task(id);
    let ended = Instant::now();
    loop {
        match api.get::<Task>(&whole).await {
            Ok(t) => return Ok(t),
            Err(e) if transient(&e) && ended.elapsed() < GIVE_UP_AFTER => {}
            Err(e) => return Err(e),
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(state: &str, machines: &[(&str, u32, &str)]) -> Task {
        serde_json::from_value(json!({
            "task_id": "t1", "kind": "script_execution", "pool_id": "p", "state": state,
            "created_at": "2026-01-01T00:00:00Z", "finished_at": null,
            "batches": [{"index": 0, "machine_ids": ["a"], "state": "RUNNING"},
                        {"index": 1, "machine_ids": ["b", "c"], "state": "PENDING"}],
            "machines": machines.iter().map(|(id, batch, st)| json!({
                "machine_id": id, "batch": batch, "state": st, "exit_code": null,
                "stdout": "", "stderr": "", "output_truncated": false, "started_at": null,
                "finished_at": null, "error_code": null, "error_msg": null})).collect::<Vec<_>>()
        }))
        .unwrap()
    }

    #[test]
    fn the_summary_counts_each_batch_by_state() {
        let t = task(
            "RUNNING",
            &[
                ("a", 0, "SUCCEEDED"),
                ("b", 1, "RUNNING"),
                ("c", 1, "PENDING"),
            ],
        );
        assert_eq!(
            summary(&t),
            "RUNNING    batch 0: SUCCEEDED 1 | batch 1: PENDING 1, RUNNING 1"
        );
        let b = &batch_counts(&t)[1];
        assert_eq!((b.total, b.done()), (2, 0));
        let t = task(
            "HALTED",
            &[("a", 0, "FAILED"), ("b", 1, "SKIPPED"), ("c", 1, "SKIPPED")],
        );
        assert_eq!(batch_counts(&t)[1].done(), 2);
        assert!(summary(&t).starts_with("HALTED "));
    }

    #[test]
    fn the_summary_route_gives_the_same_line_as_the_whole_task() {
        let t = task(
            "RUNNING",
            &[
                ("a", 0, "SUCCEEDED"),
                ("b", 1, "RUNNING"),
                ("c", 1, "PENDING"),
            ],
        );
        // What GET /v1/tasks/{id}/summary answers for that task.
        let p: TaskProgress = serde_json::from_value(json!({
            "task_id": "t1", "kind": "script_execution", "pool_id": "p", "state": "RUNNING",
            "created_at": "2026-01-01T00:00:00Z", "finished_at": null, "machines": 3,
            "machine_states": {"SUCCEEDED": 1, "RUNNING": 1, "PENDING": 1},
            "batches": [
                {"index": 1, "state": "RUNNING", "machines": 2,
                 "machine_states": {"RUNNING": 1, "PENDING": 1}},
                {"index": 0, "state": "SUCCEEDED", "machines": 1,
                 "machine_states": {"SUCCEEDED": 1}}]
        }))
        .unwrap();
        assert_eq!(progress_counts(&p), batch_counts(&t));
        assert_eq!(line(p.state, &progress_counts(&p)), summary(&t));
    }
}
