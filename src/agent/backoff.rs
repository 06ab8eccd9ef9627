//! Exponential backoff with jitter, for every retry loop of the agent (link, enrollment,
//! renewal): never a hot loop, and a fleet that lost its controller at once does not come
//! back in lockstep.

use std::time::Duration;

/// Exponential backoff with "equal jitter": half fixed, half random, so a fleet that lost its
/// controller at the same moment does not return in lockstep.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = Duration::from_millis((100u64 << i.min(3)).min(800));
            assert!(
                *d >= base / 2 && *d <= base,
                "step {i}: {d:?} not within [{:?}, {base:?}]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
