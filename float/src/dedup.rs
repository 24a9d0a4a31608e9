//! The bounded duplicate-suppression window.
//!
//! After a bridge crash or a link failover, transfers the float already published can be
//! sent again. The window remembers `(sender, destination, message-id)` triples of messages
//! whose publish the broker *confirmed*; a later transfer with the same triple is accepted
//! without being published again. A triple is only recorded after the confirm: recording it
//! earlier would turn a failed publish plus its resend into a loss. The destination is the
//! inbox the message went to, so one id sent to two identities this float serves is two
//! messages.
//!
//! The window is shared by every sender but split per sender: each sender has its own
//! window, and when the total reaches the capacity the *largest* window gives up its oldest
//! triple. A sender that sends 100,000 unique ids therefore evicts its own, never another
//! sender's window below that sender's share (capacity / senders with a window).
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

/// A `(destination, message-id)` pair within one sender's window.
/// Shared, not owned: a key is held by the copies in flight, the window's map and its
/// eviction order, and cloning a `String` for each was three allocations per message.
type Key = (Arc<str>, Arc<str>);

/// A `(sender, destination, message-id)` triple.
type Triple = (Arc<str>, Key);

/// What the window knows about a triple when a copy arrives.
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

/// What a message read back from a stream inbox told the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBack {
    /// Not in the window: another publisher's, or this float's before a restart.
    New,
    /// Confirmed to this float and now read back: the one stored copy.
    Known,
    /// Read back before: a second stored copy (a duplicate in the inbox, counted).
    Again,
}

/// The window shared by every link of a float.
#[derive(Debug, Clone)]
pub struct Dedup {
    inner: Arc<Mutex<DedupWindow>>,
}

impl Dedup {
    /// A window of at most `capacity` triples in all, each kept at most `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Dedup {
            inner: Arc::new(Mutex::new(DedupWindow::new(capacity, max_age))),
        }
    }

    /// Classify a copy of `(sender, destination, id)` arriving at `now`.
    pub fn begin(&self, sender: &Arc<str>, destination: &Arc<str>, id: &str, now: Instant) -> Seen {
        let triple: Triple = (sender.clone(), (destination.clone(), Arc::from(id)));
        let mut w = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.contains(&triple, now) {
            return Seen::Confirmed;
        }
        let first = w.begin(&triple);
        let ticket = Ticket {
            triple: Some(triple),
            dedup: self.clone(),
        };
        if first {
            Seen::New(ticket)
        } else {
            Seen::InFlight(ticket)
        }
    }

    /// A triple the inbox stream shows stored — published by this float or by another —
    /// is remembered as confirmed (see `crate::window`).
    pub fn remember(
        &self,
        sender: &str,
        destination: &Arc<str>,
        id: &str,
        now: Instant,
    ) -> ReadBack {
        let triple: Triple = (Arc::from(sender), (destination.clone(), Arc::from(id)));
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(&triple, now, true)
    }

    /// Triples remembered as confirmed.
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

    fn finish(&self, triple: &Triple, confirmed_at: Option<Instant>) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .finish(triple, confirmed_at);
    }
}

/// One copy of a triple being published. Finish it with [`Ticket::confirmed`] once the
/// broker confirmed the publish; dropping it means the publish did not (or may not) succeed.
#[derive(Debug)]
#[must_use = "a ticket is finished when confirmed or dropped"]
pub struct Ticket {
    /// `None` once finished.
    triple: Option<Triple>,
    dedup: Dedup,
}

impl Ticket {
    /// The broker confirmed this copy at `now`: remember the triple.
    pub fn confirmed(mut self, now: Instant) {
        if let Some(triple) = self.triple.take() {
            self.dedup.finish(&triple, Some(now));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(triple) = self.triple.take() {
            self.dedup.finish(&triple, None);
        }
    }
}

/// One sender's confirmed pairs, oldest first.
#[derive(Debug, Default)]
struct SenderWindow {
    /// Pair → time it was first confirmed, and whether it was read back from a stream
    /// inbox (a second read back is a second stored copy).
    seen: HashMap<Key, (Instant, bool)>,
    /// Confirmed pairs in the order they were recorded; exactly the keys of `seen`.
    order: VecDeque<(Key, Instant)>,
}

impl SenderWindow {
    /// Forget pairs older than `max_age`; returns how many.
    fn expire(&mut self, now: Instant, max_age: Duration) -> usize {
        let mut n = 0;
        while let Some((_, t)) = self.order.front() {
            if now.saturating_duration_since(*t) > max_age {
                self.pop_oldest();
                n += 1;
            } else {
                break;
            }
        }
        n
    }

    fn pop_oldest(&mut self) {
        if let Some((key, _)) = self.order.pop_front() {
            self.seen.remove(&key);
        }
    }
}

/// Remembers confirmed triples, bounded in size (in all, shared fairly among senders) and
/// age, and counts the copies in flight.
#[derive(Debug)]
pub struct DedupWindow {
    /// Triples being published, with the number of copies in flight.
    inflight: HashMap<Triple, u32>,
    /// Each sender's window; a sender with no confirmed pair has none.
    senders: HashMap<Arc<str>, SenderWindow>,
    /// Pairs in all windows.
    len: usize,
    /// Maximum number of triples kept in all.
    capacity: usize,
    /// Maximum age of a triple.
    max_age: Duration,
}

impl DedupWindow {
    /// A window of at most `capacity` triples, each kept at most `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        DedupWindow {
            inflight: HashMap::new(),
            senders: HashMap::new(),
            len: 0,
            capacity,
            max_age,
        }
    }

    /// Count one more copy in flight; true if it is the only one.
    fn begin(&mut self, triple: &Triple) -> bool {
        let n = self.inflight.entry(triple.clone()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// One copy is settled; record the triple if it was confirmed.
    fn finish(&mut self, triple: &Triple, confirmed_at: Option<Instant>) {
        if let Some(n) = self.inflight.get_mut(triple) {
            *n -= 1;
            if *n == 0 {
                self.inflight.remove(triple);
            }
        }
        if let Some(now) = confirmed_at {
            self.insert(triple, now);
        }
    }

    /// Whether the triple was confirmed within the window.
    fn contains(&mut self, (sender, key): &Triple, now: Instant) -> bool {
        let Some(w) = self.senders.get_mut(sender) else {
            return false;
        };
        self.len -= w.expire(now, self.max_age);
        let found = w.seen.contains_key(key);
        if w.order.is_empty() {
            self.senders.remove(sender);
        }
        found
    }

    /// Record a confirmed triple. A triple confirmed twice (two copies after a recycle)
    /// keeps its first time: `seen` and `order` always hold the same keys, so eviction is
    /// exact.
    fn insert(&mut self, triple: &Triple, now: Instant) -> ReadBack {
        self.record(triple, now, false)
    }

    /// Record a triple confirmed (`read_back` false) or read back from a stream inbox.
    fn record(&mut self, (sender, key): &Triple, now: Instant, read_back: bool) -> ReadBack {
        if self.capacity == 0 {
            return ReadBack::New;
        }
        let max_age = self.max_age;
        let w = self.senders.entry(sender.clone()).or_default();
        self.len -= w.expire(now, max_age);
        if let Some((_, read)) = w.seen.get_mut(key) {
            return match (read_back, *read) {
                (true, true) => ReadBack::Again,
                (true, false) => {
                    *read = true;
                    ReadBack::Known
                }
                (false, _) => ReadBack::Known,
            };
        }
        w.seen.insert(key.clone(), (now, read_back));
        w.order.push_back((key.clone(), now));
        self.len += 1;
        if self.len > self.capacity {
            // Under pressure: first what has expired anywhere, then the largest window
            // (the inserting sender's on a tie) gives up its oldest.
            for w in self.senders.values_mut() {
                self.len -= w.expire(now, max_age);
            }
            while self.len > self.capacity {
                self.evict_from_largest(sender);
            }
            self.senders.retain(|_, w| !w.order.is_empty());
        }
        ReadBack::New
    }

    /// Drop the oldest pair of the sender holding the most (`prefer` on a tie).
    fn evict_from_largest(&mut self, prefer: &Arc<str>) {
        let preferred = self.senders.get(prefer).map_or(0, |w| w.order.len());
        let victim = self
            .senders
            .iter()
            .filter(|(_, w)| w.order.len() > preferred)
            .max_by_key(|(_, w)| w.order.len())
            .map(|(s, _)| s.clone())
            .unwrap_or_else(|| prefer.clone());
        if let Some(w) = self.senders.get_mut(&victim) {
            if !w.order.is_empty() {
                w.pop_oldest();
                self.len -= 1;
                return;
            }
        }
        // Not reachable while `len` counts the windows exactly; never loop on it.
        self.len = self.senders.values().map(|w| w.order.len()).sum();
    }

    /// Number of triples remembered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.values().map(|n| *n as usize).sum()
    }

    /// Internal consistency, for tests.
    #[cfg(test)]
    fn check(&self) {
        let mut total = 0;
        for w in self.senders.values() {
            assert_eq!(w.seen.len(), w.order.len(), "seen and order agree");
            for (k, t) in &w.order {
                assert_eq!(w.seen.get(k).map(|(at, _)| at), Some(t));
            }
            total += w.order.len();
        }
        assert_eq!(total, self.len, "len counts every window");
        assert!(self.len <= self.capacity, "capacity is exact");
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

    fn dest() -> Arc<str> {
        Arc::from("drawbridge.inbox")
    }

    #[test]
    fn remembers_within_capacity_and_age() {
        let t0 = Instant::now();
        let d = Dedup::new(2, Duration::from_secs(10));
        let sender = a();
        for id in ["1", "2", "3"] {
            match d.begin(&sender, &dest(), id, t0) {
                Seen::New(t) => t.confirmed(t0),
                other => panic!("{other:?}"),
            }
        }
        assert!(
            matches!(d.begin(&sender, &dest(), "1", t0), Seen::New(_)),
            "evicted by capacity"
        );
        assert!(matches!(
            d.begin(&sender, &dest(), "3", t0),
            Seen::Confirmed
        ));
        assert!(
            matches!(d.begin(&Arc::from("B"), &dest(), "3", t0), Seen::New(_)),
            "keyed by sender too"
        );
        assert!(
            matches!(
                d.begin(&sender, &dest(), "3", t0 + Duration::from_secs(11)),
                Seen::New(_)
            ),
            "expired by age"
        );
        assert!(d.is_empty());
        assert_eq!(d.in_flight(), 0, "dropped tickets are finished");
    }

    /// A stream inbox read back: another publisher's copy is recognised, this float's own
    /// confirmed copy read back once is the one stored copy, a second read back is a copy
    /// stored twice — in whichever order confirm and read back come.
    #[test]
    fn reading_a_stream_back_recognises_stored_copies_and_counts_a_second_one() {
        let t0 = Instant::now();
        let d = Dedup::new(10, Duration::from_secs(10));
        let s = a();
        assert_eq!(d.remember("A", &dest(), "x", t0), ReadBack::New);
        assert!(matches!(d.begin(&s, &dest(), "x", t0), Seen::Confirmed));
        assert_eq!(d.remember("A", &dest(), "x", t0), ReadBack::Again);
        let Seen::New(t) = d.begin(&s, &dest(), "y", t0) else {
            panic!("new")
        };
        t.confirmed(t0);
        assert_eq!(d.remember("A", &dest(), "y", t0), ReadBack::Known);
        assert_eq!(d.remember("A", &dest(), "y", t0), ReadBack::Again);
        // Read back before its confirm came: the confirm changes nothing.
        let Seen::New(t) = d.begin(&s, &dest(), "z", t0) else {
            panic!("new")
        };
        assert_eq!(d.remember("A", &dest(), "z", t0), ReadBack::New);
        t.confirmed(t0);
        assert_eq!(d.remember("A", &dest(), "z", t0), ReadBack::Again);
        assert_eq!(d.len(), 3);
        d.inner.lock().unwrap().check();
    }

    #[test]
    fn tracks_copies_in_flight_and_a_dropped_ticket_is_a_failed_publish() {
        let t0 = Instant::now();
        let d = Dedup::new(10, Duration::from_secs(10));
        let s = a();
        let first = d.begin(&s, &dest(), "1", t0);
        let second = d.begin(&s, &dest(), "1", t0);
        assert!(matches!(first, Seen::New(_)));
        assert!(matches!(second, Seen::InFlight(_)));
        assert_eq!(d.in_flight(), 2);
        drop(first);
        drop(second);
        assert_eq!(d.in_flight(), 0);
        let Seen::New(t) = d.begin(&s, &dest(), "1", t0) else {
            panic!("a failed publish is forgotten")
        };
        t.confirmed(t0);
        assert!(matches!(d.begin(&s, &dest(), "1", t0), Seen::Confirmed));
    }

    #[test]
    fn two_confirmed_copies_leave_one_entry_that_is_evicted() {
        let t0 = Instant::now();
        let d = Dedup::new(10, Duration::from_secs(10));
        let s = a();
        let (Seen::New(x), Seen::InFlight(y)) =
            (d.begin(&s, &dest(), "1", t0), d.begin(&s, &dest(), "1", t0))
        else {
            panic!()
        };
        x.confirmed(t0);
        y.confirmed(t0 + Duration::from_secs(5));
        assert_eq!(d.len(), 1);
        d.inner.lock().unwrap().check();
        assert!(matches!(
            d.begin(&s, &dest(), "1", t0 + Duration::from_secs(11)),
            Seen::New(_)
        ));
        assert!(d.is_empty(), "the entry was evicted, not leaked");
    }

    /// Before: one window for all senders, oldest first: B's 100,000 ids evicted every id
    /// A had confirmed, so A's resends after a failover were published twice.
    #[test]
    fn one_senders_flood_does_not_evict_another_senders_window() {
        let t0 = Instant::now();
        let d = Dedup::new(1000, Duration::from_secs(600));
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("A"), Arc::from("B"), Arc::from("C"));
        for i in 0..10 {
            let Seen::New(t) = d.begin(&a, &dest(), &format!("a-{i}"), t0) else {
                panic!()
            };
            t.confirmed(t0);
        }
        for i in 0..600 {
            let Seen::New(t) = d.begin(&c, &dest(), &format!("c-{i}"), t0) else {
                panic!()
            };
            t.confirmed(t0);
        }
        for i in 0..100_000 {
            if let Seen::New(t) = d.begin(&b, &dest(), &format!("b-{i}"), t0) {
                t.confirmed(t0);
            }
        }
        d.inner.lock().unwrap().check();
        assert_eq!(d.len(), 1000);
        let kept = |s: &Arc<str>, p: &str, n: usize| {
            (0..n)
                .filter(|i| {
                    matches!(
                        d.begin(s, &dest(), &format!("{p}-{i}"), t0),
                        Seen::Confirmed
                    )
                })
                .count()
        };
        assert_eq!(kept(&a, "a", 10), 10, "A's window was evicted by B's flood");
        // C held more than its share (1000 / 3): it keeps its share, B the rest.
        let c_kept = kept(&c, "c", 600);
        assert!((333..600).contains(&c_kept), "{c_kept}");
        let w = d.inner.lock().unwrap();
        assert_eq!(w.senders[&b].order.len(), 1000 - 10 - c_kept);
        assert_eq!(c_kept, w.senders[&c].order.len());
        assert_eq!(
            c_kept,
            w.senders[&b].order.len(),
            "B and C share what A leaves"
        );
    }

    #[test]
    fn the_destination_is_part_of_the_key() {
        let t0 = Instant::now();
        let d = Dedup::new(10, Duration::from_secs(10));
        let s = a();
        let (x, y): (Arc<str>, Arc<str>) = (Arc::from("inbox.x"), Arc::from("inbox.y"));
        let Seen::New(t) = d.begin(&s, &x, "1", t0) else {
            panic!()
        };
        t.confirmed(t0);
        assert!(matches!(d.begin(&s, &x, "1", t0), Seen::Confirmed));
        assert!(
            matches!(d.begin(&s, &y, "1", t0), Seen::New(_)),
            "the same id to another identity is another message"
        );
    }

    #[test]
    fn zero_capacity_disables() {
        let t0 = Instant::now();
        let d = Dedup::new(0, Duration::from_secs(10));
        let s = a();
        if let Seen::New(t) = d.begin(&s, &dest(), "1", t0) {
            t.confirmed(t0);
        }
        assert!(matches!(d.begin(&s, &dest(), "1", t0), Seen::New(_)));
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
                    Op::Begin(s, i) => match d.begin(&senders[s as usize], &dest(), &i.to_string(), now) {
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
