//! The rollout rules of seed 002 as pure functions: how a pool is split into a gray batch and
//! the rest, and what a task does next given the states of its machines. No I/O here, so every
//! rule is unit-tested on plain values.

use std::fmt;

/// A machine's state within one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    Pending,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Skipped,
    Cancelled,
}

impl MachineState {
    pub const ALL: [MachineState; 8] = [
        MachineState::Pending,
        MachineState::Dispatched,
        MachineState::Running,
        MachineState::Succeeded,
        MachineState::Failed,
        MachineState::TimedOut,
        MachineState::Skipped,
        MachineState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Pending => "PENDING",
            MachineState::Dispatched => "DISPATCHED",
            MachineState::Running => "RUNNING",
            MachineState::Succeeded => "SUCCEEDED",
            MachineState::Failed => "FAILED",
            MachineState::TimedOut => "TIMED_OUT",
            MachineState::Skipped => "SKIPPED",
            MachineState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        match self {
            MachineState::Pending | MachineState::Dispatched | MachineState::Running => false,
            MachineState::Succeeded
            | MachineState::Failed
            | MachineState::TimedOut
            | MachineState::Skipped
            | MachineState::Cancelled => true,
        }
    }

    /// What counts against `gray_fail_threshold` and makes a task `FAILED`.
    pub fn is_failure(self) -> bool {
        matches!(self, MachineState::Failed | MachineState::TimedOut)
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Halted,
    /// Cancelled, but machines are still ending their runs (not terminal).
    Cancelling,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Halted,
        TaskState::Cancelling,
        TaskState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Running => "RUNNING",
            TaskState::Succeeded => "SUCCEEDED",
            TaskState::Failed => "FAILED",
            TaskState::Halted => "HALTED",
            TaskState::Cancelling => "CANCELLING",
            TaskState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether the task still moves on its own (a cancelled task may still have machines
    /// finishing, but nothing new is dispatched).
    pub fn is_active(self) -> bool {
        matches!(self, TaskState::Pending | TaskState::Running)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits a pool (sorted machine ids) into batches. Batch 0 is the gray batch: the first
/// `gray_count` machines, or else `gray_ids`; `gray_count` wins when both are given (seed 002).
/// With neither, the whole pool is one batch. Inputs are validated by the API beforehand.
pub fn plan_batches(
    pool: &[String],
    gray_count: Option<usize>,
    gray_ids: Option<&[String]>,
) -> Vec<Vec<String>> {
    let gray: Vec<String> = match (gray_count, gray_ids) {
        (Some(n), _) => pool.iter().take(n).cloned().collect(),
        (None, Some(ids)) => pool.iter().filter(|m| ids.contains(m)).cloned().collect(),
        (None, None) => return vec![pool.to_vec()],
    };
    let rest: Vec<String> = pool.iter().filter(|m| !gray.contains(m)).cloned().collect();
    if rest.is_empty() {
        vec![gray]
    } else {
        vec![gray, rest]
    }
}

/// What a running task should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Machines are still working; nothing to do.
    Wait,
    /// Dispatch the pending machines of this batch.
    Dispatch(u32),
    /// The gray batch reached the failure threshold: skip the rest, task `HALTED`.
    Halt,
    /// Every machine is final.
    Finish(TaskState),
}

/// Decides the next step of an active task from its machines' `(batch, state)`.
pub fn next_step(machines: &[(u32, MachineState)], gray_fail_threshold: Option<u32>) -> Step {
    let open_batch = machines
        .iter()
        .filter(|(_, s)| !s.is_final())
        .map(|(b, _)| *b)
        .min();
    let Some(batch) = open_batch else {
        let all_ok = machines.iter().all(|(_, s)| *s == MachineState::Succeeded);
        return Step::Finish(if all_ok {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        });
    };
    let in_batch = || machines.iter().filter(move |(b, _)| *b == batch);
    if in_batch().any(|(_, s)| matches!(s, MachineState::Dispatched | MachineState::Running)) {
        return Step::Wait;
    }
    // Every open machine of `batch` is Pending and every earlier batch is final.
    if batch > 0 {
        if let Some(threshold) = gray_fail_threshold {
            let gray_failures = machines
                .iter()
                .filter(|(b, s)| *b == 0 && s.is_failure())
                .count();
            if gray_failures >= threshold as usize {
                return Step::Halt;
            }
        }
    }
    Step::Dispatch(batch)
}

/// A batch's state for the task view, derived from its machines.
pub fn batch_state(states: &[MachineState]) -> &'static str {
    if states.iter().all(|s| *s == MachineState::Pending) {
        "PENDING"
    } else if states.iter().any(|s| !s.is_final()) {
        "RUNNING"
    } else if states.iter().all(|s| *s == MachineState::Skipped) {
        "SKIPPED"
    } else if states.iter().all(|s| *s == MachineState::Succeeded) {
        "SUCCEEDED"
    } else if states.iter().any(|s| s.is_failure()) {
        "FAILED"
    } else {
        "CANCELLED"
    }
}

#[cfg(test)]
mod tests {
    use super::MachineState::*;
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn batches_follow_the_seed_precedence() {
        let pool = ids(4);
        assert_eq!(plan_batches(&pool, None, None), vec![pool.clone()]);
        assert_eq!(
            plan_batches(&pool, Some(1), None),
            vec![ids(1), pool[1..].to_vec()]
        );
        let gray = vec!["m3".to_string()];
        let b = plan_batches(&pool, None, Some(&gray));
        assert_eq!(b[0], gray);
        assert_eq!(b[1], vec!["m1", "m2", "m4"]);
        // gray_count wins over gray_desktop_ids.
        assert_eq!(plan_batches(&pool, Some(2), Some(&gray))[0], ids(2));
        // A gray batch covering the pool leaves a single batch.
        assert_eq!(plan_batches(&pool, Some(4), None).len(), 1);
    }

    #[test]
    fn gray_batch_runs_first_then_rest() {
        let m = [(0, Pending), (1, Pending)];
        assert_eq!(next_step(&m, Some(1)), Step::Dispatch(0));
        let m = [(0, Running), (1, Pending)];
        assert_eq!(next_step(&m, Some(1)), Step::Wait);
        let m = [(0, Succeeded), (1, Pending)];
        assert_eq!(next_step(&m, Some(1)), Step::Dispatch(1));
        let m = [(0, Succeeded), (1, Succeeded)];
        assert_eq!(next_step(&m, Some(1)), Step::Finish(TaskState::Succeeded));
    }

    #[test]
    fn threshold_counts_failed_and_timed_out() {
        let m = [(0, Failed), (0, TimedOut), (0, Succeeded), (1, Pending)];
        assert_eq!(next_step(&m, Some(2)), Step::Halt);
        assert_eq!(next_step(&m, Some(3)), Step::Dispatch(1));
        assert_eq!(next_step(&m, None), Step::Dispatch(1));
        // Cancelled machines are not failures.
        let m = [(0, Cancelled), (1, Pending)];
        assert_eq!(next_step(&m, Some(1)), Step::Dispatch(1));
    }

    #[test]
    fn outcome_is_failed_when_any_machine_failed() {
        let m = [(0, Succeeded), (1, Succeeded), (1, TimedOut)];
        assert_eq!(next_step(&m, Some(5)), Step::Finish(TaskState::Failed));
    }

    #[test]
    fn batch_states() {
        assert_eq!(batch_state(&[Pending, Pending]), "PENDING");
        assert_eq!(batch_state(&[Succeeded, Running]), "RUNNING");
        assert_eq!(batch_state(&[Skipped]), "SKIPPED");
        assert_eq!(batch_state(&[Succeeded, Failed]), "FAILED");
        assert_eq!(batch_state(&[Succeeded, Cancelled]), "CANCELLED");
    }

    #[test]
    fn state_names_round_trip() {
        for s in MachineState::ALL {
            assert_eq!(MachineState::parse(s.as_str()), Some(s));
        }
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
    }
}
