//! Memory budgets of the bridge, apart from any I/O.
//!
//! A link holds every delivery the broker prefetched for it, including every transfer it sent
//! but the peer has not settled yet (the broker delivery is kept until then, to be acked or
//! returned; the engine writes the transfer once and keeps no copy). With a fixed prefetch
//! of 1,000 and 10 MiB messages that is ~10 GiB per link. So:
//!
//! - **per link**, the prefetch follows the sizes seen ([`Prefetch`]): at most
//!   `budget / largest recent size` deliveries, between 1 and the configured window.
//!   A link starts as if every message had the maximum size and widens once it has seen
//!   smaller ones; a big message narrows it at once;
//! - **per process**, the bytes sent and not yet settled across all links are capped by a
//!   semaphore counted in KiB ([`kib`]); a link waits for room before it sends.
//!
//! Changing the prefetch means restarting the consumer (RabbitMQ applies a prefetch to
//! consumers started after it is set); the link cancels the old consumer, forwards what it
//! had already received, then starts a new one, so nothing is requeued or reordered.

/// Decides a link's consumer prefetch from the sizes it sees.
#[derive(Debug, Clone)]
pub struct Prefetch {
    /// Configured maximum (the window).
    window: u16,
    /// Bytes of message bodies a link may hold.
    budget: u64,
    /// Prefetch in effect.
    current: u16,
    /// Largest body seen in the current period.
    largest: u64,
    /// Deliveries seen in the current period (four prefetches' worth, restarted on a
    /// change), so one big message long ago does not keep the prefetch small.
    seen: u64,
}

impl Prefetch {
    /// A link with at most `window` deliveries and `budget` bytes, whose messages are at
    /// most `max_message_size` (what it assumes before it has seen any).
    pub fn new(window: u16, budget: u64, max_message_size: u64) -> Self {
        let window = window.max(1);
        let mut p = Prefetch {
            window,
            budget,
            current: window,
            largest: 0,
            seen: 0,
        };
        p.current = p.target(max_message_size);
        p
    }

    /// The prefetch in effect.
    pub fn current(&self) -> u16 {
        self.current
    }

    fn target(&self, largest: u64) -> u16 {
        let n = self.budget / largest.max(1);
        n.clamp(1, u64::from(self.window)) as u16
    }

    /// A delivery of `size` bytes arrived. Returns the new prefetch when it should change:
    /// at once when `size` does not fit the budget at the current prefetch; at the end of a
    /// period of four prefetches' worth of deliveries, when everything seen in it would fit
    /// twice as many.
    pub fn observe(&mut self, size: u64) -> Option<u16> {
        self.seen += 1;
        self.largest = self.largest.max(size);
        let fits = self.target(size);
        if fits < self.current {
            return Some(self.set(fits));
        }
        if self.seen >= 4 * u64::from(self.current) {
            let target = self.target(self.largest);
            self.seen = 0;
            self.largest = 0;
            if target >= self.current.saturating_mul(2) {
                return Some(self.set(target));
            }
        }
        None
    }

    fn set(&mut self, to: u16) -> u16 {
        self.current = to;
        self.seen = 0;
        self.largest = 0;
        to
    }
}

/// Permits (KiB, rounded up, at least 1, at most `total`) that a body of `size` bytes takes
/// from a process budget of `total` KiB: a single body bigger than the whole budget takes
/// all of it instead of waiting forever.
pub fn kib(size: usize, total: u32) -> u32 {
    let k = size.div_ceil(1024).max(1);
    u32::try_from(k).unwrap_or(u32::MAX).min(total.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn starts_as_if_every_message_were_the_largest_allowed() {
        let p = Prefetch::new(1000, 64 * MIB, 10 * MIB);
        assert_eq!(p.current(), 6);
        let small = Prefetch::new(1000, 64 * MIB, 1024);
        assert_eq!(small.current(), 1000, "capped by the window");
        assert_eq!(
            Prefetch::new(1000, MIB, 10 * MIB).current(),
            1,
            "at least one"
        );
    }

    #[test]
    fn widens_after_seeing_small_messages_and_narrows_at_once_for_a_big_one() {
        let mut p = Prefetch::new(1000, 64 * MIB, 10 * MIB);
        let mut changes = Vec::new();
        for _ in 0..30 {
            if let Some(n) = p.observe(1024) {
                changes.push(n);
            }
        }
        assert_eq!(changes, vec![1000], "after 4 x 6 small deliveries");
        assert_eq!(
            p.observe(8 * MIB),
            Some(8),
            "one 8 MiB message: at most 8 held"
        );
        assert_eq!(p.observe(1024), None, "not straight back");
        for _ in 0..30 {
            assert_eq!(p.observe(1024), None);
        }
        assert_eq!(p.observe(1024), Some(1000), "after 4 x 8 small deliveries");
        // Mostly small with a few big ones: each big one narrows, a period without one widens.
        let mut p = Prefetch::new(1000, 4 * MIB, 10 * MIB);
        for _ in 0..4 {
            p.observe(MIB);
        }
        assert_eq!(p.current(), 4);
        for _ in 0..16 {
            p.observe(512);
        }
        assert_eq!(
            p.current(),
            1000,
            "a period of small messages after the big ones"
        );
    }

    #[test]
    fn holds_within_budget_whatever_the_sizes() {
        let budget = 64 * MIB;
        let mut p = Prefetch::new(1000, budget, 10 * MIB);
        let sizes = [1024, 5 * MIB, 300, 10 * MIB, 64, 2 * MIB, 7];
        for round in 0..200u64 {
            let size = sizes[(round as usize * 7 + 3) % sizes.len()];
            p.observe(size);
            // Whatever it holds after this delivery fits: the prefetch never exceeds what
            // the largest body seen since the last change allows.
            assert!(
                u64::from(p.current()) * p.largest.max(1) <= budget.max(p.largest),
                "round {round}: {p:?}"
            );
        }
    }

    #[test]
    fn process_budget_permits() {
        assert_eq!(kib(0, 100), 1);
        assert_eq!(kib(1024, 100), 1);
        assert_eq!(kib(1025, 100), 2);
        assert_eq!(kib(10 * 1024 * 1024, 100), 100, "capped by the total");
    }
}
