//! The rollout rules as pure functions: how a pool is split into a gray batch and the rest
//! (seed 002), what a task does next given the states of its machines (the gray gate, waves of
//! `max_concurrency`, the `max_errors` halt), and how much room the power limits leave. No I/O
//! here, so every rule is unit-tested on plain values.

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

/// The rules a task's rollout follows, from its request (and what resumes accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rules {
    /// Seed 002: the gray batch's failures that halt the task before the rest.
    pub gray_fail_threshold: Option<u32>,
    /// Whether batch 0 is a gray batch (waves pace only the machines after it).
    pub has_gray: bool,
    /// `max_concurrency`, resolved: machines after the gray batch at work at once.
    pub wave: Option<u32>,
    /// `max_errors`, resolved: failures over the whole task beyond which nothing starts.
    pub max_errors: Option<u32>,
    /// An operator resumed the task past its gray gate.
    pub gray_accepted: bool,
    /// Failures already counted when the task was resumed; `max_errors` counts the rest.
    pub errors_accepted: u32,
}

/// Why a task halts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// The gray batch's failures reached `gray_fail_threshold` (seed 002).
    GrayThreshold,
    /// More machines failed than `max_errors`.
    MaxErrors,
}

/// What a running task should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Machines are still working; nothing to do.
    Wait,
    /// Dispatch pending machines of this batch: at most `up_to`, or all of them (`None`).
    Dispatch { batch: u32, up_to: Option<usize> },
    /// Skip every machine not started; the task is `HALTED` once none is at work.
    Halt(Halt),
    /// Every machine is final.
    Finish(TaskState),
}

/// The batch a task is in: the first with a machine not final (every earlier one is final).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    pub batch: u32,
    pub has_pending: bool,
    /// Machines of this batch dispatched or running.
    pub in_flight: usize,
}

/// What the task does next while `open` is its batch, with `failures` failed machines in
/// the whole task, `gray_failures` of them in batch 0. The same rule serves a full re-plan
/// (`next_step`) and an event's O(1) refill (`engine::settle`), which counts these by index.
pub fn decide(open: Open, failures: usize, gray_failures: usize, rules: &Rules) -> Step {
    if !open.has_pending {
        // Only machines at work are left in this batch.
        return Step::Wait;
    }
    if open.batch > 0 && !rules.gray_accepted {
        if let Some(threshold) = rules.gray_fail_threshold {
            if gray_failures >= threshold as usize {
                return Step::Halt(Halt::GrayThreshold);
            }
        }
    }
    if let Some(max) = rules.max_errors {
        if failures.saturating_sub(rules.errors_accepted as usize) > max as usize {
            return Step::Halt(Halt::MaxErrors);
        }
    }
    let first_paced = u32::from(rules.has_gray);
    match rules.wave {
        Some(w) if open.batch >= first_paced => {
            let room = (w as usize).saturating_sub(open.in_flight);
            if room == 0 {
                Step::Wait
            } else {
                Step::Dispatch {
                    batch: open.batch,
                    up_to: Some(room),
                }
            }
        }
        // A batch without waves goes at once; machines still pending while others of it
        // are at work waited for a power slot, and go as soon as there is one.
        Some(_) | None => Step::Dispatch {
            batch: open.batch,
            up_to: None,
        },
    }
}

/// How a task whose machines are all final ended: a machine is skipped only by a halt.
pub fn outcome(states: &[MachineState]) -> TaskState {
    if states.iter().all(|s| *s == MachineState::Succeeded) {
        TaskState::Succeeded
    } else if states.contains(&MachineState::Skipped) {
        TaskState::Halted
    } else {
        TaskState::Failed
    }
}

/// Decides the next step of an active task from its machines' `(batch, state)`.
pub fn next_step(machines: &[(u32, MachineState)], rules: &Rules) -> Step {
    let open_batch = machines
        .iter()
        .filter(|(_, s)| !s.is_final())
        .map(|(b, _)| *b)
        .min();
    let Some(batch) = open_batch else {
        let states: Vec<MachineState> = machines.iter().map(|(_, s)| *s).collect();
        return Step::Finish(outcome(&states));
    };
    let in_batch = || machines.iter().filter(move |(b, _)| *b == batch);
    let open = Open {
        batch,
        has_pending: in_batch().any(|(_, s)| *s == MachineState::Pending),
        in_flight: in_batch()
            .filter(|(_, s)| matches!(s, MachineState::Dispatched | MachineState::Running))
            .count(),
    };
    let failures = machines.iter().filter(|(_, s)| s.is_failure()).count();
    let gray_failures = machines
        .iter()
        .filter(|(b, s)| *b == 0 && s.is_failure())
        .count();
    decide(open, failures, gray_failures, rules)
}

/// How many more machines with a power step may start: the least room under the
/// controller-wide and the pool's limit, each `(limit, at work now)`; `None`: no limit.
pub fn power_room(global: Option<(u32, usize)>, pool: Option<(u32, usize)>) -> Option<usize> {
    let room = |(limit, busy): (u32, usize)| (limit as usize).saturating_sub(busy);
    match (global.map(room), pool.map(room)) {
        (None, None) => None,
        (Some(a), None) | (None, Some(a)) => Some(a),
        (Some(a), Some(b)) => Some(a.min(b)),
    }
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

    fn gate(threshold: Option<u32>) -> Rules {
        Rules {
            gray_fail_threshold: threshold,
            has_gray: threshold.is_some(),
            ..Rules::default()
        }
    }

    fn all(batch: u32) -> Step {
        Step::Dispatch { batch, up_to: None }
    }

    #[test]
    fn gray_batch_runs_first_then_rest() {
        let m = [(0, Pending), (1, Pending)];
        assert_eq!(next_step(&m, &gate(Some(1))), all(0));
        let m = [(0, Running), (1, Pending)];
        assert_eq!(next_step(&m, &gate(Some(1))), Step::Wait);
        let m = [(0, Succeeded), (1, Pending)];
        assert_eq!(next_step(&m, &gate(Some(1))), all(1));
        let m = [(0, Succeeded), (1, Succeeded)];
        assert_eq!(
            next_step(&m, &gate(Some(1))),
            Step::Finish(TaskState::Succeeded)
        );
    }

    #[test]
    fn threshold_counts_failed_and_timed_out() {
        let m = [(0, Failed), (0, TimedOut), (0, Succeeded), (1, Pending)];
        assert_eq!(
            next_step(&m, &gate(Some(2))),
            Step::Halt(Halt::GrayThreshold)
        );
        assert_eq!(next_step(&m, &gate(Some(3))), all(1));
        assert_eq!(next_step(&m, &gate(None)), all(1));
        // Cancelled machines are not failures.
        let m = [(0, Cancelled), (1, Pending)];
        assert_eq!(next_step(&m, &gate(Some(1))), all(1));
        // An operator's resume passes the gate.
        let m = [(0, Failed), (1, Pending)];
        let resumed = Rules {
            gray_accepted: true,
            ..gate(Some(1))
        };
        assert_eq!(next_step(&m, &resumed), all(1));
    }

    #[test]
    fn outcome_is_failed_when_any_machine_failed() {
        let m = [(0, Succeeded), (1, Succeeded), (1, TimedOut)];
        assert_eq!(
            next_step(&m, &gate(Some(5))),
            Step::Finish(TaskState::Failed)
        );
        // Skipped machines mean a halt, once the last machine at work has ended.
        let m = [(0, Failed), (0, Failed), (0, Succeeded), (0, Skipped)];
        assert_eq!(next_step(&m, &gate(None)), Step::Finish(TaskState::Halted));
    }

    #[test]
    fn waves_pace_the_machines_after_the_gray_batch() {
        let rules = Rules {
            wave: Some(2),
            ..gate(Some(1))
        };
        // The gray batch goes at once, whatever the wave.
        let m = [(0, Pending), (0, Pending), (0, Pending), (1, Pending)];
        assert_eq!(next_step(&m, &rules), all(0));
        let m = [(0, Succeeded), (1, Pending), (1, Pending), (1, Pending)];
        let two = Step::Dispatch {
            batch: 1,
            up_to: Some(2),
        };
        assert_eq!(next_step(&m, &rules), two);
        // One of the wave ended: exactly one more starts.
        let m = [(0, Succeeded), (1, Succeeded), (1, Running), (1, Pending)];
        let one = Step::Dispatch {
            batch: 1,
            up_to: Some(1),
        };
        assert_eq!(next_step(&m, &rules), one);
        let m = [(0, Succeeded), (1, Dispatched), (1, Running), (1, Pending)];
        assert_eq!(next_step(&m, &rules), Step::Wait);
        // Without a gray batch, the wave paces batch 0.
        let flat = Rules {
            wave: Some(1),
            ..Rules::default()
        };
        let m = [(0, Running), (0, Pending)];
        assert_eq!(next_step(&m, &flat), Step::Wait);
    }

    #[test]
    fn max_errors_halts_once_exceeded_and_resume_counts_from_there() {
        let rules = Rules {
            wave: Some(2),
            max_errors: Some(1),
            ..Rules::default()
        };
        // One failure is not more than 1: the next starts.
        let m = [(0, Failed), (0, Running), (0, Pending)];
        assert_eq!(
            next_step(&m, &rules),
            Step::Dispatch {
                batch: 0,
                up_to: Some(1)
            }
        );
        // Two are: nothing new starts, though one is still at work.
        let m = [(0, Failed), (0, TimedOut), (0, Running), (0, Pending)];
        assert_eq!(next_step(&m, &rules), Step::Halt(Halt::MaxErrors));
        // Resumed with both failures accepted: it goes on.
        let resumed = Rules {
            errors_accepted: 2,
            ..rules
        };
        assert_eq!(
            next_step(&m, &resumed),
            Step::Dispatch {
                batch: 0,
                up_to: Some(1)
            }
        );
    }

    #[test]
    fn power_room_is_the_tighter_limit() {
        assert_eq!(power_room(None, None), None);
        assert_eq!(power_room(Some((2, 1)), None), Some(1));
        assert_eq!(power_room(None, Some((3, 3))), Some(0));
        assert_eq!(power_room(Some((10, 2)), Some((3, 1))), Some(2));
        // A limit lowered below what is at work leaves no room (never negative).
        assert_eq!(power_room(Some((1, 4)), None), Some(0));
    }

    /// Runs a task to its end under `rules`: every step the engine would take, machines
    /// ending in the order `order` picks among those at work, failing where `fails` says.
    /// Returns the most paced machines at once, whether a machine started after failures
    /// exceeded `max_errors`, the end state and the machines' states.
    fn simulate(
        gray: usize,
        n: usize,
        rules: &Rules,
        fails: &[bool],
        order: &[usize],
    ) -> (usize, bool, TaskState, Vec<MachineState>) {
        let mut m: Vec<(u32, MachineState)> = (0..n)
            .map(|i| (u32::from(i >= gray && rules.has_gray), Pending))
            .collect();
        let paced_from = u32::from(rules.has_gray);
        let (mut peak, mut late_start, mut turn) = (0, false, 0);
        for _ in 0..10 * n + 10 {
            let failures = m.iter().filter(|(_, s)| s.is_failure()).count();
            match next_step(&m, rules) {
                Step::Finish(end) => {
                    return (peak, late_start, end, m.iter().map(|(_, s)| *s).collect());
                }
                Step::Dispatch { batch, up_to } => {
                    let over = rules
                        .max_errors
                        .is_some_and(|e| failures > e as usize + rules.errors_accepted as usize);
                    late_start |= over;
                    let mut left = up_to.unwrap_or(usize::MAX);
                    for x in m.iter_mut().filter(|(b, s)| *b == batch && *s == Pending) {
                        if left == 0 {
                            break;
                        }
                        x.1 = Dispatched;
                        left -= 1;
                    }
                }
                Step::Halt(_) => {
                    for x in m.iter_mut().filter(|(_, s)| *s == Pending) {
                        x.1 = Skipped;
                    }
                }
                Step::Wait => {
                    let busy: Vec<usize> = (0..n).filter(|i| !m[*i].1.is_final()).collect();
                    let busy: Vec<usize> =
                        busy.into_iter().filter(|i| m[*i].1 != Pending).collect();
                    assert!(!busy.is_empty(), "Wait with nothing at work: {m:?}");
                    let i = busy[order[turn % order.len()] % busy.len()];
                    turn += 1;
                    m[i].1 = if fails[i] { Failed } else { Succeeded };
                }
            }
            let at_work = m
                .iter()
                .filter(|(b, s)| *b >= paced_from && matches!(s, Dispatched | Running))
                .count();
            peak = peak.max(at_work);
        }
        panic!("the task never finished: {m:?}");
    }

    proptest::proptest! {
        #[test]
        fn waves_and_max_errors_hold_for_any_order(
            n in 1usize..40,
            gray_pick in 0usize..5,
            wave in proptest::option::of(1u32..6),
            max_errors in proptest::option::of(1u32..5),
            fails in proptest::collection::vec(proptest::bool::weighted(0.2), 40),
            order in proptest::collection::vec(0usize..100, 1..20),
        ) {
            let gray = gray_pick.min(n.saturating_sub(1));
            let rules = Rules {
                gray_fail_threshold: (gray > 0).then_some(gray as u32),
                has_gray: gray > 0,
                wave,
                max_errors,
                ..Rules::default()
            };
            let (peak, late, end, states) = simulate(gray, n, &rules, &fails, &order);
            // Never more than the wave at work after the gray batch, never stalled (simulate
            // panics on a Wait with nothing at work), nothing started past max_errors.
            if let Some(w) = wave {
                proptest::prop_assert!(peak <= w as usize, "peak {peak} > wave {w}");
            }
            proptest::prop_assert!(!late, "a machine started after max_errors was exceeded");
            let failed = states.iter().filter(|s| s.is_failure()).count();
            let skipped = states.iter().filter(|s| **s == Skipped).count();
            match end {
                TaskState::Halted => proptest::prop_assert!(skipped > 0),
                TaskState::Succeeded => proptest::prop_assert_eq!(failed + skipped, 0),
                TaskState::Failed => proptest::prop_assert!(failed > 0 && skipped == 0),
                other @ (TaskState::Pending | TaskState::Running | TaskState::Cancelling
                | TaskState::Cancelled) => proptest::prop_assert!(false, "ended {other}"),
            }
            // Skipped machines only when a gate closed: the gray threshold, or max_errors.
            if skipped > 0 {
                let gray_failed = states[..gray].iter().filter(|s| s.is_failure()).count();
                let gate = gray > 0 && gray_failed >= gray;
                let errors = max_errors.is_some_and(|e| failed > e as usize);
                proptest::prop_assert!(gate || errors, "skipped without a reason: {states:?}");
            }
        }
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
