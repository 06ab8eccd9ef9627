//! The rollout rules of seed 002 as pure functions: how a pool is split into a gray batch and
//! the rest, and what a task does next given the states of its machines. No I/O here, so every
//! rule is unit-tested on plain values.

pub use crate::proto::domain::{BatchState, MachineState, TaskState};

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
pub fn batch_state(states: &[MachineState]) -> BatchState {
    if states.iter().all(|s| *s == MachineState::Pending) {
        BatchState::Pending
    } else if states.iter().any(|s| !s.is_final()) {
        BatchState::Running
    } else if states.iter().all(|s| *s == MachineState::Skipped) {
        BatchState::Skipped
    } else if states.iter().all(|s| *s == MachineState::Succeeded) {
        BatchState::Succeeded
    } else if states.iter().any(|s| s.is_failure()) {
        BatchState::Failed
    } else {
        BatchState::Cancelled
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
        assert_eq!(batch_state(&[Pending, Pending]), BatchState::Pending);
        assert_eq!(batch_state(&[Succeeded, Running]), BatchState::Running);
        assert_eq!(batch_state(&[Skipped]), BatchState::Skipped);
        assert_eq!(batch_state(&[Succeeded]), BatchState::Succeeded);
        assert_eq!(batch_state(&[Succeeded, Failed]), BatchState::Failed);
        assert_eq!(batch_state(&[Succeeded, Cancelled]), BatchState::Cancelled);
    }

    #[test]
    fn state_names_round_trip() {
        for s in MachineState::ALL {
            assert_eq!(MachineState::parse(s.as_str()), Some(*s));
        }
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(*s));
        }
    }
}
