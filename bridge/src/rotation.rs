//! Which float target a link tries next, and how long it waits — apart from any I/O, with
//! time passed in, so failover order and penalties are unit-tested.
//!
//! - Targets are tried in turn from the one after the last that failed (failover), and a
//!   link that connected keeps its target as the first choice.
//! - A target whose TLS verification failed (wrong CA, wrong legal name, expired) is a
//!   configuration problem, not a network blip: it goes to the back of the order for a
//!   while (`penalty`), so a healthy target is tried first.
//! - Delays between attempts grow with jitter up to a cap; the caller resets them once the
//!   peer has accepted something (see `link`).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use drawbridge_control_protocol::Target;
use drawbridge_runtime::backoff::Backoff;

/// Failover order, TLS-failure penalties and backoff of one link.
#[derive(Debug)]
pub struct TargetRotation {
    /// The link's targets, in the order the control message gave.
    targets: Vec<Target>,
    /// Index of the first target to try.
    next: usize,
    /// Targets that failed TLS verification, until when they go last.
    tls_penalty: HashMap<Target, Instant>,
    /// How long a TLS failure puts a target last.
    penalty: Duration,
    /// Delay before the next round.
    backoff: Backoff,
}

impl TargetRotation {
    /// Rotation over `targets`, backing off from `min` to `max`; a TLS failure puts a
    /// target last for `min(max, 30 s)`.
    pub fn new(targets: Vec<Target>, min: Duration, max: Duration) -> Self {
        TargetRotation {
            targets,
            next: 0,
            tls_penalty: HashMap::new(),
            penalty: max.min(Duration::from_secs(30)),
            backoff: Backoff::new(min, max),
        }
    }

    /// The targets to try at `now`, in order: from the next one round, penalised ones last.
    pub fn order(&self, now: Instant) -> Vec<Target> {
        let n = self.targets.len();
        let mut order: Vec<Target> = (0..n)
            .map(|i| self.targets[(self.next + i) % n].clone())
            .collect();
        // Stable: the rotation order holds within each group.
        order.sort_by_key(|t| self.tls_penalty.get(t).is_some_and(|until| *until > now));
        order
    }

    /// An attempt at `target` failed at `now`; `tls` if its certificate was refused.
    pub fn failed(&mut self, target: &Target, tls: bool, now: Instant) {
        if tls {
            self.tls_penalty.insert(target.clone(), now + self.penalty);
        }
    }

    /// Connected to `target`: it is the first choice from now on, and forgiven.
    pub fn connected(&mut self, target: &Target) {
        self.tls_penalty.remove(target);
        if let Some(i) = self.targets.iter().position(|t| t == target) {
            self.next = i;
        }
    }

    /// The session on the current target broke: prefer the next target.
    pub fn broke(&mut self) {
        self.next = (self.next + 1) % self.targets.len().max(1);
    }

    /// Delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.backoff.next_delay()
    }

    /// The peer accepted: start the delays from the minimum again.
    pub fn reset_backoff(&mut self) {
        self.backoff.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(port: u16) -> Target {
        Target::new("127.0.0.1", port)
    }

    fn rotation() -> TargetRotation {
        TargetRotation::new(
            vec![t(1), t(2), t(3)],
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn tries_in_turn_and_fails_over_to_the_next_target() {
        let now = Instant::now();
        let mut r = rotation();
        assert_eq!(r.order(now), vec![t(1), t(2), t(3)]);
        r.connected(&t(2));
        assert_eq!(r.order(now), vec![t(2), t(3), t(1)], "keeps what worked");
        r.broke();
        assert_eq!(r.order(now), vec![t(3), t(1), t(2)], "then the next one");
    }

    #[test]
    fn a_tls_failure_goes_last_for_a_while_and_is_forgiven_on_connect() {
        let now = Instant::now();
        let mut r = rotation();
        r.failed(&t(1), true, now);
        r.failed(&t(2), false, now);
        assert_eq!(r.order(now), vec![t(2), t(3), t(1)]);
        assert_eq!(
            r.order(now + Duration::from_secs(31)),
            vec![t(1), t(2), t(3)],
            "the penalty ends"
        );
        r.failed(&t(1), true, now);
        r.connected(&t(1));
        assert_eq!(r.order(now), vec![t(1), t(2), t(3)], "forgiven");
    }

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut r = rotation();
        let delays: Vec<Duration> = (0..10).map(|_| r.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(60)));
        assert!(delays[9] >= Duration::from_secs(30), "{delays:?}");
        r.reset_backoff();
        assert!(r.next_delay() < Duration::from_secs(3));
    }

    #[test]
    fn no_targets_is_not_a_panic() {
        let mut r = TargetRotation::new(vec![], Duration::from_secs(1), Duration::from_secs(2));
        assert!(r.order(Instant::now()).is_empty());
        r.broke();
    }
}
