//! Log lines that an attacker (or a storm) can trigger at will are written at most once per
//! interval, with the number of occurrences that were not written: an operator sees the
//! event and its rate, and a flood of refused connections cannot flood the log.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// One rate-limited log line.
#[derive(Debug)]
pub struct Every {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    skipped: u64,
}

impl Every {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Every {
            interval,
            state: Mutex::new(State {
                last: None,
                skipped: 0,
            }),
        }
    }

    /// Called once per occurrence: `Some(n)` when this one should be logged, `n` being how
    /// many since the last logged one were not; `None` when it should not be logged.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match s.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                s.skipped += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.skipped))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_once_per_interval_with_the_count_skipped() {
        let e = Every::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(e.hit_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(e.hit_at(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(e.hit_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(e.hit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(e.hit_at(t0 + Duration::from_secs(25)), Some(1));
    }
}
