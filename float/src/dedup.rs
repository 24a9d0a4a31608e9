//! The bounded duplicate-suppression window.
//!
//! After a bridge crash or a link failover, transfers the float already published can be
//! sent again. The window remembers `(sender, message-id)` pairs of messages whose publish
//! the broker *confirmed*; a later transfer with the same pair is accepted without being
//! published again. A pair is only recorded after the confirm: recording it earlier would
//! turn a failed publish plus its resend into a loss.
//!
//! Pure data structure, no clock of its own: callers pass `now`, so tests control time.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

/// What the window knows about a `(sender, message-id)` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen (or forgotten): publish it.
    New,
    /// A copy is being published right now (not yet confirmed): this one is published too
    /// (suppressing it could lose the message if the first publish fails), and counted as a
    /// duplicate that passed.
    InFlight,
    /// Confirmed within the window: accept without publishing.
    Confirmed,
}

/// Remembers confirmed `(sender, message-id)` pairs, bounded in size and age, and which
/// pairs are being published right now.
#[derive(Debug)]
pub struct DedupWindow {
    /// Pairs being published, with the number of copies in flight.
    inflight: HashMap<(String, String), u32>,
    /// Pair → time it was recorded.
    seen: HashMap<(String, String), Instant>,
    /// Insertion order, for eviction by age and capacity.
    order: VecDeque<((String, String), Instant)>,
    /// Maximum number of pairs kept.
    capacity: usize,
    /// Maximum age of a pair.
    max_age: Duration,
}

impl DedupWindow {
    /// A window of at most `capacity` pairs, each kept at most `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        DedupWindow {
            inflight: HashMap::new(),
            seen: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            max_age,
        }
    }

    /// Classify a pair before publishing it; unless it was `Confirmed`, it is now in flight
    /// and the caller must call [`DedupWindow::finish`] once its publish is settled.
    pub fn begin(&mut self, sender: &str, id: &str, now: Instant) -> Seen {
        if self.contains(sender, id, now) {
            return Seen::Confirmed;
        }
        let n = self
            .inflight
            .entry((sender.to_string(), id.to_string()))
            .or_insert(0);
        *n += 1;
        if *n == 1 {
            Seen::New
        } else {
            Seen::InFlight
        }
    }

    /// A publish begun with [`DedupWindow::begin`] is settled; record it if confirmed.
    pub fn finish(&mut self, sender: &str, id: &str, confirmed: bool, now: Instant) {
        let key = (sender.to_string(), id.to_string());
        if let Some(n) = self.inflight.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.inflight.remove(&key);
            }
        }
        if confirmed {
            self.insert(sender, id, now);
        }
    }

    /// Whether the pair was confirmed within the window.
    pub fn contains(&mut self, sender: &str, id: &str, now: Instant) -> bool {
        self.expire(now);
        self.seen
            .contains_key(&(sender.to_string(), id.to_string()))
    }

    /// Record a confirmed pair.
    pub fn insert(&mut self, sender: &str, id: &str, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        self.expire(now);
        let key = (sender.to_string(), id.to_string());
        if self.seen.insert(key.clone(), now).is_none() {
            self.order.push_back((key, now));
        }
        while self.seen.len() > self.capacity {
            self.pop_oldest();
        }
    }

    /// Number of pairs remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, t)) = self.order.front() {
            if now.saturating_duration_since(*t) > self.max_age {
                self.pop_oldest();
            } else {
                break;
            }
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((key, t)) = self.order.pop_front() {
            // Only remove if the map entry is this one (it is: pairs are inserted once).
            if self.seen.get(&key) == Some(&t) {
                self.seen.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_capacity_and_age() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(2, Duration::from_secs(10));
        w.insert("A", "1", t0);
        assert!(w.contains("A", "1", t0));
        assert!(!w.contains("B", "1", t0), "keyed by sender too");
        w.insert("A", "2", t0);
        w.insert("A", "3", t0);
        assert!(!w.contains("A", "1", t0), "evicted by capacity");
        assert!(w.contains("A", "3", t0));
        assert!(
            !w.contains("A", "3", t0 + Duration::from_secs(11)),
            "expired by age"
        );
        assert!(w.is_empty());
    }

    #[test]
    fn tracks_copies_in_flight() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(10, Duration::from_secs(10));
        assert_eq!(w.begin("A", "1", t0), Seen::New);
        assert_eq!(w.begin("A", "1", t0), Seen::InFlight);
        w.finish("A", "1", false, t0);
        w.finish("A", "1", false, t0);
        assert_eq!(
            w.begin("A", "1", t0),
            Seen::New,
            "a failed publish is forgotten"
        );
        w.finish("A", "1", true, t0);
        assert_eq!(w.begin("A", "1", t0), Seen::Confirmed);
    }

    #[test]
    fn zero_capacity_disables() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(0, Duration::from_secs(10));
        w.insert("A", "1", t0);
        assert!(!w.contains("A", "1", t0));
    }
}
