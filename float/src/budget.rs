//! Bytes in flight: how much message data the float holds for publishes the broker has not
//! confirmed yet, per inbound link and for the whole process.
//!
//! Without a bound a link could hold `link_credit` unconfirmed publishes of up to
//! `max_message_size` each (1000 × 10 MiB by default), and every link at once. Here:
//!
//! - [`LinkBudget`] counts the bytes of one link's pending publishes. While they reach
//!   `float.max_link_bytes_in_flight` the link takes no further delivery (it holds them, each
//!   keeping its unit of credit); a link with nothing pending always takes one, however big, so a message larger
//!   than the budget still gets through, alone. A link's pending bytes therefore stay below
//!   its limit plus one message.
//! - [`Pool`] is a shared budget, a semaphore counted in KiB: one per connection
//!   (`float.max_connection_bytes_in_flight`, shared by the connection's links) and one for
//!   the process (`float.max_bytes_in_flight`). A transfer publishes only once it holds its
//!   share of both (taken in that order, so a connection waiting for the process pool holds
//!   only its own connection's units); links wait in arrival order (the semaphores are fair),
//!   taking no further delivery meanwhile.
//! - A [`Permit`] is both: it lives in the pending publish and gives its bytes back to the
//!   link and the pool when it is dropped — once the transfer's disposition went out, or
//!   when the link ends with it unsettled — so nothing can leak whatever path a transfer
//!   takes.
//!
//! What these budgets do *not* cover is what a link holds before it takes it: deliveries
//! that arrived while the link was paused or over its budget. The engine tops a link's
//! credit up only as deliveries are settled, so there are at most `link_credit` of them per
//! link, each at most the announced max-message-size (checked by the engine while the
//! delivery is assembled). An operator who must bound the float's memory tightly lowers
//! `link_credit` as well.
//!
//! No sockets and no clock: the link drives these types, tests drive them directly.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes per pool permit.
const UNIT: usize = 1024;

/// The process-wide budget of bytes in flight, shared by every inbound link.
#[derive(Debug, Clone)]
pub struct Pool {
    /// One permit per KiB.
    units: Arc<Semaphore>,
    /// Permits the pool was created with.
    capacity: u32,
}

impl Pool {
    /// A pool of `bytes` (rounded up to whole KiB, at least one).
    pub fn new(bytes: usize) -> Self {
        let capacity = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        Pool {
            units: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        }
    }

    /// Bytes currently held by permits (a multiple of 1 KiB).
    pub fn in_flight(&self) -> usize {
        (self.capacity as usize - self.units.available_permits()) * UNIT
    }

    /// Permits a message of `len` bytes needs: whole KiB, at least one (a message costs
    /// more than its body), never more than the pool has (so any message can go, alone).
    fn units_for(&self, len: usize) -> u32 {
        u32::try_from(len.div_ceil(UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(self.capacity)
    }
}

/// One inbound link's share of bytes in flight.
#[derive(Debug)]
pub struct LinkBudget {
    /// `float.max_link_bytes_in_flight`.
    limit: usize,
    /// Bytes held by this link's permits; shared with them so dropping one gives back.
    used: Arc<AtomicUsize>,
    /// The pools every permit also draws from, in the order they are taken (the
    /// connection's, then the process's).
    pools: Vec<Pool>,
}

impl LinkBudget {
    /// A link budget of `limit` bytes drawing from `pool`.
    pub fn new(limit: usize, pool: Pool) -> Self {
        LinkBudget::within(limit, vec![pool])
    }

    /// A link budget of `limit` bytes drawing from each of `pools`, taken in that order.
    pub fn within(limit: usize, pools: Vec<Pool>) -> Self {
        LinkBudget {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
            pools,
        }
    }

    /// Bytes held by this link's pending publishes.
    pub fn in_flight(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Bytes the link may still take before it stops receiving (0 when over).
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.in_flight())
    }

    /// Whether the link may take another transfer: its pending bytes are under its limit.
    pub fn has_room(&self) -> bool {
        self.room() > 0
    }

    /// Take `len` bytes if the pool has them now. The link's own limit is not checked here
    /// (see [`LinkBudget::has_room`]): a transfer already received is always counted.
    pub fn try_take(&self, len: usize) -> Option<Permit> {
        let mut units = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            // On failure what was gathered goes back with `units`.
            units.push(
                pool.units
                    .clone()
                    .try_acquire_many_owned(pool.units_for(len))
                    .ok()?,
            );
        }
        Some(self.permit(len, units))
    }

    /// Take `len` bytes, waiting for the pool. Cancel-safe: dropping the future gives back
    /// whatever it had gathered.
    pub fn take(&self, len: usize) -> impl Future<Output = Permit> + Send + 'static {
        let wanted: Vec<_> = self
            .pools
            .iter()
            .map(|p| (p.units.clone(), p.units_for(len)))
            .collect();
        let used = self.used.clone();
        async move {
            let mut units = Vec::with_capacity(wanted.len());
            for (semaphore, n) in wanted {
                // Not peer input: the pool owns the semaphore and never closes it.
                #[allow(clippy::expect_used)]
                units.push(
                    semaphore
                        .acquire_many_owned(n)
                        .await
                        .expect("the pool's semaphore is never closed"),
                );
            }
            used.fetch_add(len, Ordering::AcqRel);
            Permit {
                len,
                used,
                _units: units,
            }
        }
    }

    fn permit(&self, len: usize, units: Vec<OwnedSemaphorePermit>) -> Permit {
        self.used.fetch_add(len, Ordering::AcqRel);
        Permit {
            len,
            used: self.used.clone(),
            _units: units,
        }
    }
}

/// The bytes of one pending publish, given back to its link and the pool on drop.
#[derive(Debug)]
#[must_use = "the bytes are given back as soon as the permit is dropped"]
pub struct Permit {
    /// Bytes counted against the link.
    len: usize,
    /// The link's counter.
    used: Arc<AtomicUsize>,
    /// The pools' shares, released with the permit.
    _units: Vec<OwnedSemaphorePermit>,
}

impl Permit {
    /// Bytes this permit holds for its link.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes (an empty message still holds one pool unit).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.used.fetch_sub(self.len, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;

    #[test]
    fn permits_count_against_the_link_and_the_pool_until_dropped() {
        let pool = Pool::new(64 * KIB);
        let link = LinkBudget::new(16 * KIB, pool.clone());
        assert!(link.has_room());
        let a = link.try_take(10 * KIB).expect("pool has room");
        assert_eq!((link.in_flight(), pool.in_flight()), (10 * KIB, 10 * KIB));
        assert!(link.has_room());
        let b = link
            .try_take(10 * KIB)
            .expect("a received transfer is always counted");
        assert_eq!(link.in_flight(), 20 * KIB);
        assert!(!link.has_room(), "over the link's limit: stop receiving");
        assert_eq!(link.room(), 0);
        drop(a);
        assert_eq!((link.in_flight(), pool.in_flight()), (10 * KIB, 10 * KIB));
        assert!(link.has_room(), "resumes as confirms come back");
        drop(b);
        assert_eq!((link.in_flight(), pool.in_flight()), (0, 0));
    }

    #[test]
    fn the_pool_is_shared_and_counted_in_whole_kib() {
        let pool = Pool::new(8 * KIB);
        let one = LinkBudget::new(MIB, pool.clone());
        let two = LinkBudget::new(MIB, pool.clone());
        let small = one.try_take(1).expect("room");
        assert_eq!(pool.in_flight(), KIB, "rounded up to one unit");
        let empty = one.try_take(0).expect("room");
        assert!(empty.is_empty());
        assert_eq!(
            pool.in_flight(),
            2 * KIB,
            "an empty message still costs a unit"
        );
        let big = two.try_take(6 * KIB).expect("room");
        assert!(one.try_take(KIB).is_none(), "the pool is full");
        assert!(two.try_take(KIB).is_none());
        assert_eq!((one.in_flight(), two.in_flight()), (1, 6 * KIB));
        drop((small, empty, big));
        assert_eq!(pool.in_flight(), 0);
    }

    #[test]
    fn a_message_bigger_than_the_pool_takes_all_of_it() {
        let pool = Pool::new(4 * KIB);
        let link = LinkBudget::new(KIB, pool.clone());
        let p = link.try_take(MIB).expect("clamped to the pool");
        assert_eq!(p.len(), MIB);
        assert_eq!(pool.in_flight(), 4 * KIB);
        assert!(link.try_take(1).is_none());
        drop(p);
        assert!(link.try_take(1).is_some());
    }

    #[test]
    fn a_connection_pool_bounds_its_links_together_and_leaves_others_room() {
        let process = Pool::new(64 * KIB);
        let conn_a = Pool::new(8 * KIB);
        let conn_b = Pool::new(8 * KIB);
        let a1 = LinkBudget::within(MIB, vec![conn_a.clone(), process.clone()]);
        let a2 = LinkBudget::within(MIB, vec![conn_a.clone(), process.clone()]);
        let b1 = LinkBudget::within(MIB, vec![conn_b.clone(), process.clone()]);
        let x = a1.try_take(5 * KIB).expect("room");
        let y = a2.try_take(3 * KIB).expect("room");
        assert!(a2.try_take(KIB).is_none(), "connection A is at its limit");
        assert_eq!(
            process.in_flight(),
            8 * KIB,
            "a refused take gives back what it took"
        );
        let z = b1.try_take(8 * KIB).expect("connection B has its own room");
        assert_eq!(process.in_flight(), 16 * KIB);
        drop((x, y, z));
        assert_eq!(
            (conn_a.in_flight(), conn_b.in_flight(), process.in_flight()),
            (0, 0, 0)
        );
        // A message bigger than the connection's pool still passes, alone.
        let big = a1.try_take(MIB).expect("clamped to the pool");
        assert!(a2.try_take(1).is_none());
        drop(big);
    }

    #[tokio::test]
    async fn waiting_for_the_pool_resumes_when_bytes_come_back() {
        let pool = Pool::new(4 * KIB);
        let one = LinkBudget::new(MIB, pool.clone());
        let two = LinkBudget::new(MIB, pool.clone());
        let held = one.try_take(3 * KIB).expect("room");
        let mut waiting = Box::pin(two.take(2 * KIB));
        assert!((&mut waiting).now_or_never().is_none(), "only 1 KiB free");
        assert_eq!(two.in_flight(), 0, "nothing counted while waiting");
        drop(held);
        let p = waiting.await;
        assert_eq!((two.in_flight(), pool.in_flight()), (2 * KIB, 2 * KIB));
        drop(p);
        assert_eq!(pool.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_back_what_it_gathered() {
        let pool = Pool::new(4 * KIB);
        let link = LinkBudget::new(MIB, pool.clone());
        let other = LinkBudget::new(MIB, pool.clone());
        let held = link.try_take(3 * KIB).expect("room");
        let mut waiting = Box::pin(other.take(4 * KIB));
        assert!((&mut waiting).now_or_never().is_none(), "queued for 4 KiB");
        drop(held);
        assert!(
            link.try_take(KIB).is_none(),
            "what comes back goes to the queued waiter first"
        );
        drop(waiting);
        assert_eq!(
            (link.in_flight(), other.in_flight(), pool.in_flight()),
            (0, 0, 0)
        );
        assert!(
            link.try_take(4 * KIB).is_some(),
            "the waiter's gathered share is back"
        );
    }

    #[test]
    fn a_link_with_nothing_pending_always_has_room() {
        let pool = Pool::new(MIB);
        let link = LinkBudget::new(KIB, pool.clone());
        assert!(link.has_room());
        let big = link.try_take(100 * KIB).expect("pool has room");
        assert!(!link.has_room(), "one message over the limit: hold");
        drop(big);
        assert!(link.has_room(), "alone again: the next one may come");
        assert_eq!(link.room(), KIB);
    }

    proptest::proptest! {
        /// Whatever order transfers are counted and given back in, each link's count is the
        /// sum of its live permits, the pool's is their whole KiB (never more than the pool),
        /// a link holds back exactly while its count reaches its limit, and when every permit
        /// is gone both are zero again.
        #[test]
        fn accounting_matches_the_live_permits(
            ops in proptest::collection::vec((0usize..3, 0usize..40_000, proptest::bool::ANY), 1..200)
        ) {
            const POOL: usize = 64 * KIB;
            const LIMIT: usize = 16 * KIB;
            let pool = Pool::new(POOL);
            let links: Vec<LinkBudget> =
                (0..3).map(|_| LinkBudget::new(LIMIT, pool.clone())).collect();
            let mut live: Vec<(usize, Permit)> = Vec::new();
            for (link, len, give_back) in ops {
                if give_back && !live.is_empty() {
                    drop(live.remove(len % live.len()));
                } else if let Some(p) = links[link].try_take(len) {
                    proptest::prop_assert_eq!(p.len(), len);
                    live.push((link, p));
                }
                for (i, l) in links.iter().enumerate() {
                    let sum: usize = live.iter().filter(|(j, _)| *j == i).map(|(_, p)| p.len()).sum();
                    proptest::prop_assert_eq!(l.in_flight(), sum);
                    proptest::prop_assert_eq!(l.has_room(), sum < LIMIT);
                }
                let units: usize = live
                    .iter()
                    .map(|(_, p)| pool.units_for(p.len()) as usize * UNIT)
                    .sum();
                proptest::prop_assert_eq!(pool.in_flight(), units);
                proptest::prop_assert!(pool.in_flight() <= POOL);
            }
            live.clear();
            proptest::prop_assert_eq!(pool.in_flight(), 0);
            for l in &links {
                proptest::prop_assert_eq!(l.in_flight(), 0);
            }
        }
    }
}
