//! A link's window: the broker deliveries it has taken, in queue order, each sent to the peer
//! and waiting for its disposition, settled and waiting for those before it, or settled here
//! without a transfer (it cannot be delivered). Apart from any I/O, so its rules are tested
//! without a broker or a peer:
//!
//! - what comes out ([`Window::pop_settled`]) comes out in the order it went in, once, whatever
//!   order the peer settles in (its dispositions may cover ranges, and ranges may cross the
//!   wrap of the delivery ids);
//! - what a transfer holds (its share of the byte budget) is given back when the peer settles
//!   it, not when the transfers before it are settled too;
//! - the oldest unsettled transfer has a deadline ([`Window::next_deadline`]); when it passes,
//!   the transfer counts as settled with the caller's verdict (the link recycles when it
//!   reaches the head).

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::settle::Settled;

/// The window of one forwarding session. `T` is what the link keeps of a delivery (its broker
/// delivery), `H` what a transfer holds until the peer settles it (its budget permit).
#[derive(Debug)]
pub(crate) struct Window<T, H> {
    q: VecDeque<Entry<T, H>>,
}

#[derive(Debug)]
struct Entry<T, H> {
    item: T,
    /// The engine's delivery id; `None`: settled here, never sent.
    id: Option<u32>,
    hold: Option<H>,
    settled: Option<Settled>,
    deadline: Instant,
}

impl<T, H> Window<T, H> {
    /// An empty window.
    pub(crate) fn new() -> Self {
        Window { q: VecDeque::new() }
    }

    /// Deliveries in the window.
    pub(crate) fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether the window is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// `item` was sent as delivery `id`, holding `hold` until the peer settles it by
    /// `deadline`.
    pub(crate) fn sent(&mut self, item: T, id: u32, hold: H, deadline: Instant) {
        self.q.push_back(Entry {
            item,
            id: Some(id),
            hold: Some(hold),
            settled: None,
            deadline,
        });
    }

    /// `item` was settled here without a transfer; it leaves in its turn.
    pub(crate) fn settled_here(&mut self, item: T, settled: Settled) {
        self.q.push_back(Entry {
            item,
            id: None,
            hold: None,
            settled: Some(settled),
            deadline: Instant::now(),
        });
    }

    /// The peer settled deliveries `first..=last` (serial numbers: the range may wrap) with
    /// `settled`. Deliveries already settled keep their first outcome. Returns how many were
    /// settled now.
    pub(crate) fn settle(&mut self, first: u32, last: u32, settled: &Settled) -> usize {
        let span = last.wrapping_sub(first);
        let mut n = 0;
        for e in self.q.iter_mut() {
            let Some(id) = e.id else { continue };
            if e.settled.is_none() && id.wrapping_sub(first) <= span {
                e.settled = Some(settled.clone());
                e.hold = None;
                n += 1;
            }
        }
        n
    }

    /// When the oldest transfer not settled yet runs out of time.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.q
            .iter()
            .find(|e| e.settled.is_none())
            .map(|e| e.deadline)
    }

    /// The oldest transfer not settled yet ran out of time: it counts as settled with
    /// `settled`.
    pub(crate) fn expire_oldest(&mut self, settled: Settled) {
        if let Some(e) = self.q.iter_mut().find(|e| e.settled.is_none()) {
            e.settled = Some(settled);
            e.hold = None;
        }
    }

    /// The head of the window, if it is settled.
    pub(crate) fn pop_settled(&mut self) -> Option<(T, Settled)> {
        self.q.front()?.settled.as_ref()?;
        let e = self.q.pop_front()?;
        Some((e.item, e.settled?))
    }

    /// The head of the window, if the peer accepted it.
    pub(crate) fn pop_accepted(&mut self) -> Option<T> {
        if self.q.front()?.settled != Some(Settled::Accepted) {
            return None;
        }
        self.q.pop_front().map(|e| e.item)
    }

    /// Whether the head of the window waits for the peer.
    pub(crate) fn head_waits(&self) -> bool {
        self.q.front().is_some_and(|e| e.settled.is_none())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::Duration,
    };

    use proptest::prelude::*;

    use super::*;

    /// A hold that counts how many are alive.
    struct Hold(Arc<AtomicUsize>);

    impl Hold {
        fn new(alive: &Arc<AtomicUsize>) -> Self {
            alive.fetch_add(1, Ordering::SeqCst);
            Hold(alive.clone())
        }
    }

    impl Drop for Hold {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn settlements_out_of_order_leave_in_queue_order_and_give_holds_back_at_once() {
        let alive = Arc::new(AtomicUsize::new(0));
        let mut w = Window::new();
        for (tag, id) in [(1u64, 10u32), (2, 11), (3, 12)] {
            w.sent(tag, id, Hold::new(&alive), later());
        }
        w.settled_here(4, Settled::DeadLetter("too big".into()));
        assert_eq!(w.settle(11, 12, &Settled::Accepted), 2);
        assert_eq!(
            alive.load(Ordering::SeqCst),
            1,
            "held only by the unsettled one"
        );
        assert!(w.pop_settled().is_none(), "the head still waits");
        assert!(w.head_waits());
        assert_eq!(w.settle(10, 10, &Settled::Retry("released".into())), 1);
        assert_eq!(alive.load(Ordering::SeqCst), 0);
        assert_eq!(
            w.pop_settled(),
            Some((1, Settled::Retry("released".into())))
        );
        assert_eq!(w.pop_settled(), Some((2, Settled::Accepted)));
        assert_eq!(w.pop_settled(), Some((3, Settled::Accepted)));
        assert_eq!(
            w.pop_settled(),
            Some((4, Settled::DeadLetter("too big".into())))
        );
        assert!(w.is_empty());
    }

    #[test]
    fn a_range_across_the_wrap_of_delivery_ids_settles_what_it_covers() {
        let mut w = Window::new();
        for (tag, id) in [(1u64, u32::MAX - 1), (2, u32::MAX), (3, 0), (4, 1)] {
            w.sent(tag, id, (), later());
        }
        assert_eq!(w.settle(u32::MAX, 0, &Settled::Accepted), 2);
        assert_eq!(w.settle(u32::MAX, 0, &Settled::Retry("again".into())), 0);
        assert!(w.pop_settled().is_none());
        w.settle(u32::MAX - 1, u32::MAX - 1, &Settled::Accepted);
        assert_eq!(w.pop_accepted(), Some(1));
        assert_eq!(w.pop_accepted(), Some(2));
        assert_eq!(w.pop_accepted(), Some(3));
        assert_eq!(w.pop_accepted(), None, "4 waits");
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn the_oldest_unsettled_transfer_expires_first() {
        let soon = Instant::now() + Duration::from_millis(5);
        let mut w = Window::new();
        w.sent(1u64, 0, (), soon);
        w.sent(2, 1, (), later());
        assert_eq!(w.next_deadline(), Some(soon));
        w.settle(0, 0, &Settled::Accepted);
        assert!(w.next_deadline() > Some(soon), "the next unsettled one's");
        w.expire_oldest(Settled::Retry("not settled in time".into()));
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.pop_accepted(), Some(1));
        assert_eq!(w.pop_accepted(), None, "a retry is not accepted");
        assert_eq!(
            w.pop_settled(),
            Some((2, Settled::Retry("not settled in time".into())))
        );
    }

    proptest! {
        /// Whatever the order and the grouping of the peer's dispositions, every delivery
        /// leaves once, in the order it went in, and nothing is held afterwards.
        #[test]
        fn any_settlement_order_keeps_queue_order(
            n in 1usize..60,
            start in any::<u32>(),
            here in proptest::collection::vec(any::<bool>(), 60),
            cuts in proptest::collection::vec(1usize..6, 60),
            seed in any::<u64>(),
        ) {
            let alive = Arc::new(AtomicUsize::new(0));
            let mut w = Window::new();
            let mut ids = Vec::new();
            let mut id = start;
            for (tag, &settled_here) in here.iter().enumerate().take(n) {
                if settled_here {
                    w.settled_here(tag, Settled::DeadLetter("x".into()));
                } else {
                    w.sent(tag, id, Hold::new(&alive), later());
                    ids.push(id);
                    id = id.wrapping_add(1);
                }
            }
            // Consecutive runs of ids, settled in a shuffled order.
            let mut ranges = Vec::new();
            let mut i = 0;
            let mut c = 0;
            while i < ids.len() {
                let len = cuts[c % cuts.len()].min(ids.len() - i);
                ranges.push((ids[i], ids[i + len - 1]));
                i += len;
                c += 1;
            }
            let mut state = seed | 1;
            for k in (1..ranges.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ranges.swap(k, (state % (k as u64 + 1)) as usize);
            }
            let mut out = Vec::new();
            for (first, last) in ranges {
                w.settle(first, last, &Settled::Accepted);
                while let Some((tag, _)) = w.pop_settled() {
                    out.push(tag);
                }
            }
            while let Some((tag, _)) = w.pop_settled() {
                out.push(tag);
            }
            prop_assert_eq!(out, (0..n).collect::<Vec<_>>());
            prop_assert!(w.is_empty());
            prop_assert_eq!(alive.load(Ordering::SeqCst), 0);
        }
    }
}
