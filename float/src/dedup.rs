//! The bounded duplicate-suppression window.
//!
//! After a bridge crash or a link failover, transfers the float already published can be
//! sent again. The window remembers `(sender, message-id)` pairs of messages whose publish
//! the broker *confirmed*; a later transfer with the same pair is accepted without being
//! published again. A pair is only recorded after the confirm: recording it earlier would
//! turn a failed publish plus its resend into a loss.
//!
//! A copy being published holds a [`Ticket`]. The ticket is finished exactly once — with
//! [`Ticket::confirmed`], or by being dropped (a failed publish, a link that ended, a task
//! aborted at the drain deadline) — so the in-flight count can never leak, whatever path a
//! transfer takes.
//!
//! The window itself is pure data with no clock: callers pass `now`, so tests control time.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A `(sender, message-id)` pair.
/// The id is shared, not owned: a key is held by the copies in flight, the window's map and
/// its eviction order, and cloning a `String` for each was three allocations per message.
type Key = (Arc<str>, Arc<str>);

/// What the window knows about a pair when a copy arrives.
#[derive(Debug)]
pub enum Seen {
    /// Not seen (or forgotten): publish it, holding the ticket until it is settled.
    New(Ticket),
    /// A copy is being published right now (not yet confirmed): this one is published too
    /// (suppressing it could lose the message if the first publish fails), and counted as a
    /// duplicate that passed.
    InFlight(Ticket),
    /// Confirmed within the window: accept without publishing.
    Confirmed,
}

/// The window shared by every link of a float.
#[derive(Debug, Clone)]
pub struct Dedup {
    inner: Arc<Mutex<DedupWindow>>,
}

impl Dedup {
    /// A window of at most `capacity` pairs, each kept at most `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Dedup {
            inner: Arc::new(Mutex::new(DedupWindow::new(capacity, max_age))),
        }
    }

    /// Classify a copy of `(sender, id)` arriving at `now`.
    pub fn begin(&self, sender: &Arc<str>, id: &str, now: Instant) -> Seen {
        let key: Key = (sender.clone(), Arc::from(id));
        let mut w = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.contains(&key, now) {
            return Seen::Confirmed;
        }
        let first = w.begin(&key);
        let ticket = Ticket {
            key: Some(key),
            dedup: self.clone(),
        };
        if first {
            Seen::New(ticket)
        } else {
            Seen::InFlight(ticket)
        }
    }

    /// Pairs remembered as confirmed.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies in flight (tickets alive).
    pub fn in_flight(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .in_flight()
    }

    fn finish(&self, key: &Key, confirmed_at: Option<Instant>) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .finish(key, confirmed_at);
    }
}

/// One copy of a pair being published. Finish it with [`Ticket::confirmed`] once the broker
/// confirmed the publish; dropping it means the publish did not (or may not) succeed.
#[derive(Debug)]
#[must_use = "a ticket is finished when confirmed or dropped"]
pub struct Ticket {
    /// `None` once finished.
    key: Option<Key>,
    dedup: Dedup,
}

impl Ticket {
    /// The broker confirmed this copy at `now`: remember the pair.
    pub fn confirmed(mut self, now: Instant) {
        if let Some(key) = self.key.take() {
            self.dedup.finish(&key, Some(now));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.dedup.finish(&key, None);
        }
    }
}

/// Remembers confirmed pairs, bounded in size and age, and counts the copies in flight.
#[derive(Debug)]
pub struct DedupWindow {
    /// Pairs being published, with the number of copies in flight.
    inflight: HashMap<Key, u32>,
    /// Pair → time it was first confirmed.
    seen: HashMap<Key, Instant>,
    /// Confirmed pairs in the order they were recorded; exactly the keys of `seen`.
    order: VecDeque<(Key, Instant)>,
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

    /// Count one more copy in flight; true if it is the only one.
    fn begin(&mut self, key: &Key) -> bool {
        let n = self.inflight.entry(key.clone()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// One copy is settled; record the pair if it was confirmed.
    fn finish(&mut self, key: &Key, confirmed_at: Option<Instant>) {
        if let Some(n) = self.inflight.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.inflight.remove(key);
            }
        }
        if let Some(now) = confirmed_at {
            self.insert(key, now);
        }
    }

    /// Whether the pair was confirmed within the window.
    fn contains(&mut self, key: &Key, now: Instant) -> bool {
        self.expire(now);
        self.seen.contains_key(key)
    }

    /// Record a confirmed pair. A pair confirmed twice (two copies after a recycle) keeps
    /// its first time: `seen` and `order` always hold the same keys, so eviction is exact.
    fn insert(&mut self, key: &Key, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        self.expire(now);
        if self.seen.contains_key(key) {
            return;
        }
        self.seen.insert(key.clone(), now);
        self.order.push_back((key.clone(), now));
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

    /// Copies in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.values().map(|n| *n as usize).sum()
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
        if let Some((key, _)) = self.order.pop_front() {
            self.seen.remove(&key);
        }
    }

    /// Internal consistency, for tests.
    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.seen.len(), self.order.len(), "seen and order agree");
        assert!(self.seen.len() <= self.capacity, "capacity is exact");
        for (k, t) in &self.order {
            assert_eq!(self.seen.get(k), Some(t));
        }
        assert!(self.inflight.values().all(|n| *n > 0));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn a() -> Arc<str> {
        Arc::from("A")
    }

    #[test]
    fn remembers_within_capacity_and_age() {
        let t0 = Instant::now();
        let d = Dedup::new(2, Duration::from_secs(10));
        let sender = a();
        for id in ["1", "2", "3"] {
            match d.begin(&sender, id, t0) {
                Seen::New(t) => t.confirmed(t0),
                other => panic!("{other:?}"),
            }
        }
        assert!(
            matches!(d.begin(&sender, "1", t0), Seen::New(_)),
            "evicted by capacity"
        );
        assert!(matches!(d.begin(&sender, "3", t0), Seen::Confirmed));
        assert!(
            matches!(d.begin(&Arc::from("B"), "3", t0), Seen::New(_)),
            "keyed by sender too"
        );
        assert!(
            matches!(
                d.begin(&sender, "3", t0 + Duration::from_secs(11)),
                Seen::New(_)
            ),
            "expired by age"
        );
        assert!(d.is_empty());
        assert_eq!(d.in_flight(), 0, "dropped tickets are finished");
    }

    #[test]
    fn tracks_copies_in_flight_and_a_dropped_ticket_is_a_failed_publish() {
        let t0 = Instant::now();
        let d = Dedup::new(10, Duration::from_secs(10));
        let s = a();
        let first = d.begin(&s, "1", t0);
        let second = d.begin(&s, "1", t0);
        assert!(matches!(first, Seen::New(_)));
        assert!(matches!(second, Seen::InFlight(_)));
        assert_eq!(d.in_flight(), 2);
        drop(first);
        drop(second);
        assert_eq!(d.in_flight(), 0);
        let Seen::New(t) = d.begin(&s, "1", t0) else {
            panic!("a failed publish is forgotten")
        };
        t.confirmed(t0);
        assert!(matches!(d.begin(&s, "1", t0), Seen::Confirmed));
    }

    #[test]
    fn two_confirmed_copies_leave_one_entry_that_is_evicted() {
        let t0 = Instant::now();
        let d = Dedup::new(10, Duration::from_secs(10));
        let s = a();
        let (Seen::New(x), Seen::InFlight(y)) = (d.begin(&s, "1", t0), d.begin(&s, "1", t0)) else {
            panic!()
        };
        x.confirmed(t0);
        y.confirmed(t0 + Duration::from_secs(5));
        assert_eq!(d.len(), 1);
        d.inner.lock().unwrap().check();
        assert!(matches!(
            d.begin(&s, "1", t0 + Duration::from_secs(11)),
            Seen::New(_)
        ));
        assert!(d.is_empty(), "the entry was evicted, not leaked");
    }

    #[test]
    fn zero_capacity_disables() {
        let t0 = Instant::now();
        let d = Dedup::new(0, Duration::from_secs(10));
        let s = a();
        if let Seen::New(t) = d.begin(&s, "1", t0) {
            t.confirmed(t0);
        }
        assert!(matches!(d.begin(&s, "1", t0), Seen::New(_)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A copy of (sender, id) arrives.
        Begin(u8, u8),
        /// The oldest live ticket is confirmed.
        Confirm,
        /// The oldest live ticket is dropped (failed publish / aborted task).
        Drop,
        /// Time passes.
        Wait(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, 0u8..20).prop_map(|(s, i)| Op::Begin(s, i)),
            2 => Just(Op::Confirm),
            1 => Just(Op::Drop),
            1 => (0u8..30).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #[test]
        fn capacity_and_in_flight_accounting_stay_exact(
            capacity in 0usize..8,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let d = Dedup::new(capacity, Duration::from_secs(20));
            let senders: Vec<Arc<str>> = ["A", "B", "C"].iter().map(|s| Arc::from(*s)).collect();
            let mut live: VecDeque<Ticket> = VecDeque::new();
            for op in ops {
                match op {
                    Op::Begin(s, i) => match d.begin(&senders[s as usize], &i.to_string(), now) {
                        Seen::New(t) | Seen::InFlight(t) => live.push_back(t),
                        Seen::Confirmed => {}
                    },
                    Op::Confirm => {
                        if let Some(t) = live.pop_front() {
                            t.confirmed(now);
                        }
                    }
                    Op::Drop => {
                        live.pop_front();
                    }
                    Op::Wait(s) => now += Duration::from_secs(u64::from(s)),
                }
                let w = d.inner.lock().unwrap();
                w.check();
                prop_assert_eq!(w.in_flight(), live.len());
            }
            live.clear();
            prop_assert_eq!(d.in_flight(), 0);
        }
    }
}
