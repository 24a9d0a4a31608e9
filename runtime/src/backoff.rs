//! Exponential backoff with jitter and a cap, for every retry loop in the daemons.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Retry delays: `min`, doubling up to `max`, each with random jitter; never gives up.
///
/// Wraps `backon` so every loop in the daemons shares one policy and can `reset()` after a
/// success (a link that was up for a while starts again from `min`).
#[derive(Debug)]
pub struct Backoff {
    /// Builder kept so `reset` can start a fresh sequence.
    builder: ExponentialBuilder,
    /// The current sequence of delays.
    current: ExponentialBackoff,
    /// Cap, returned once the sequence would exceed it.
    max: Duration,
}

impl Backoff {
    /// A backoff from `min` to `max` (factor 2, full jitter on top of each delay).
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            current: builder.build(),
            builder,
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // backon's jitter adds up to one delay on top; keep the cap a cap.
        self.current.next().unwrap_or(self.max).min(self.max)
    }

    /// Start again from the minimum delay (call after a success).
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[11] >= Duration::from_secs(1), "{delays:?}");
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(250));
    }
}
