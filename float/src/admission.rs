//! Who may take a connection slot, and when.
//!
//! A connection costs the float in two phases, and each phase has its own budget:
//!
//! - **Pending**: from TCP accept until the TLS handshake and the AMQP open are done. Anyone
//!   who can reach the port gets here, certificate or not, so this pool is small
//!   (`float.max_pending_handshakes`) and shared out so that a flood cannot lock out the
//!   members:
//!   - one source address may hold only a few slots (`max_pending_handshakes_per_address`),
//!     and so may one address *prefix* (`max_pending_handshakes_per_prefix`, a /24 for IPv4
//!     and a /64 for IPv6 by default): an attacker rarely has one address, but its addresses
//!     are usually neighbours (one host's aliases, one cloud subnet, one IPv6 /64), so four
//!     addresses of a /24 get one share, not four;
//!   - addresses that completed a handshake (a valid member certificate) recently are
//!     *known*: they are not held to the prefix share, they may use the part of the pool
//!     kept for them (`pending_reserved_for_recent`), and they keep the full deadline. A
//!     partner reconnecting after a blip gets in while strangers flood the port, and a
//!     stranger cannot make itself known without a member certificate. The set of known
//!     addresses is bounded (`recent_peers`) and each entry expires (`recent_peer_ttl`);
//!   - once the pool is half full, new handshakes from addresses that are not known get a
//!     shorter deadline (`handshake_timeout_under_pressure`), so slots held by connections
//!     that never speak come back sooner.
//!
//!   Peers that are already connected are not touched at all, because established
//!   connections are counted separately.
//! - **Established**: once the peer proved who it is. `float.max_connections` in all, and per
//!   peer legal name (`float.max_connections_per_peer`) and per source address
//!   (`float.max_connections_per_address`), so one member (or one compromised host) cannot
//!   take every slot from the others.
//!
//! Each admitted phase is a [`Ticket`] that gives its slot back when dropped, whatever path the
//! connection takes. No sockets and no clock here: the listener and the connection drive
//! these types and pass the time in; the tests drive them directly.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// The limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in the handshake phase, all sources together.
    pub pending: usize,
    /// Connections in the handshake phase from one source address.
    pub pending_per_address: usize,
    /// Connections in the handshake phase from one address prefix (see [`Prefixes`]), for
    /// addresses that are not known.
    pub pending_per_prefix: usize,
    /// How addresses are grouped into prefixes.
    pub prefixes: Prefixes,
    /// Handshake slots only known addresses may take: addresses that are not known share
    /// `pending - reserved_for_recent`.
    pub reserved_for_recent: usize,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Handshake deadline of a connection from an address that is not known, admitted while
    /// half the pool or more is taken.
    pub handshake_timeout_under_pressure: Duration,
    /// Known addresses remembered at most (the oldest is forgotten first); 0 remembers none.
    pub recent_capacity: usize,
    /// How long an address stays known after its last completed handshake.
    pub recent_ttl: Duration,
    /// Established connections in all.
    pub connections: usize,
    /// Established connections of one peer legal name.
    pub per_peer: usize,
    /// Established connections from one source address.
    pub per_address: usize,
}

/// Prefix lengths that group source addresses for the per-prefix share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefixes {
    /// Bits of an IPv4 address that name its network (0..=32).
    pub v4: u8,
    /// Bits of an IPv6 address that name its network (0..=128).
    pub v6: u8,
}

impl Prefixes {
    /// The network `addr` belongs to: `addr` with the host bits cleared. An IPv4-mapped IPv6
    /// address (what a dual-stack socket reports) is grouped as the IPv4 address it is.
    pub fn of(&self, addr: IpAddr) -> IpAddr {
        match addr.to_canonical() {
            IpAddr::V4(a) => {
                let bits = u32::from(self.v4.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let bits = u32::from(self.v6.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        }
    }
}

/// Why a connection was refused a slot. The label is the `reason` of
/// `drawbridge_float_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Every handshake slot this source may use is taken (for an address that is not known,
    /// the pool without its reserved part).
    #[error("too many pending handshakes ({0} at most)")]
    Pending(usize),
    /// This address holds its share of handshake slots.
    #[error("too many pending handshakes from this address ({0} at most)")]
    PendingPerAddress(usize),
    /// This address's prefix holds its share of handshake slots.
    #[error("too many pending handshakes from this address's network ({0} at most)")]
    PendingPerPrefix(usize),
    /// Every connection slot is taken.
    #[error("too many connections ({0} at most)")]
    Connections(usize),
    /// This peer holds its share of connections.
    #[error("too many connections from this peer ({0} at most)")]
    PerPeer(usize),
    /// This address holds its share of connections.
    #[error("too many connections from this address ({0} at most)")]
    PerAddress(usize),
}

impl Refusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Pending(_) => "max_pending_handshakes",
            Refusal::PendingPerAddress(_) => "max_pending_handshakes_per_address",
            Refusal::PendingPerPrefix(_) => "max_pending_handshakes_per_prefix",
            Refusal::Connections(_) => "max_connections",
            Refusal::PerPeer(_) => "max_connections_per_peer",
            Refusal::PerAddress(_) => "max_connections_per_address",
        }
    }
}

/// Slot counts; entries are removed when they reach zero, so the maps hold at most as many
/// keys as there are slots taken.
#[derive(Debug, Default)]
struct Counts {
    pending: usize,
    pending_by_address: HashMap<IpAddr, usize>,
    /// Only handshakes of addresses that were not known count here.
    pending_by_prefix: HashMap<IpAddr, usize>,
    connections: usize,
    by_peer: HashMap<Arc<str>, usize>,
    by_address: HashMap<IpAddr, usize>,
    /// Known addresses: when each last completed a handshake. At most
    /// `Limits::recent_capacity` entries.
    recent: HashMap<IpAddr, Instant>,
}

impl Counts {
    fn is_known(&self, addr: IpAddr, now: Instant, ttl: Duration) -> bool {
        self.recent
            .get(&addr)
            .is_some_and(|seen| now.saturating_duration_since(*seen) < ttl)
    }

    /// Remember `addr` as known from `now`. When the set is full, expired entries go first,
    /// then the one seen longest ago: a full set costs one pass over it per new address, and
    /// only a completed handshake (a member certificate) gets here.
    fn remember(&mut self, addr: IpAddr, now: Instant, limits: &Limits) {
        if limits.recent_capacity == 0 {
            return;
        }
        if !self.recent.contains_key(&addr) && self.recent.len() >= limits.recent_capacity {
            let ttl = limits.recent_ttl;
            self.recent
                .retain(|_, seen| now.saturating_duration_since(*seen) < ttl);
            if self.recent.len() >= limits.recent_capacity {
                let oldest = self
                    .recent
                    .iter()
                    .min_by_key(|(_, seen)| **seen)
                    .map(|(a, _)| *a);
                if let Some(oldest) = oldest {
                    self.recent.remove(&oldest);
                }
            }
        }
        self.recent.insert(addr, now);
    }
}

/// The float's admission state, shared by the listener and every connection.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// What a [`Ticket`] holds.
#[derive(Debug)]
enum Held {
    /// A handshake slot: the address, and its prefix if the slot counts against the prefix.
    Pending(IpAddr, Option<IpAddr>),
    Established(IpAddr, Arc<str>),
}

/// A slot, given back on drop.
#[derive(Debug)]
#[must_use = "the slot is given back as soon as the ticket is dropped"]
pub struct Ticket {
    held: Held,
    deadline: Duration,
    shortened: bool,
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

impl Ticket {
    /// How long the handshake of this connection may take (each of its TLS and AMQP phases).
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// True when the deadline is the short one (the pool was under pressure and the address
    /// was not known).
    pub fn shortened(&self) -> bool {
        self.shortened
    }

    /// The handshake completed (the peer showed a valid member certificate and opened the
    /// connection): its address is known from `now` on, and the slot goes back.
    pub fn completed(self, now: Instant) {
        let addr = match &self.held {
            Held::Pending(addr, _) | Held::Established(addr, _) => *addr,
        };
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remember(addr, now, &self.limits);
    }
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            counts: Arc::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A handshake slot for a connection from `addr` arriving at `now`, if one is free.
    pub fn pending(&self, addr: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let l = &self.limits;
        let addr = addr.to_canonical();
        let mut c = self.lock();
        let known = c.is_known(addr, now, l.recent_ttl);
        let pool = if known {
            l.pending
        } else {
            l.pending.saturating_sub(l.reserved_for_recent)
        };
        if c.pending >= pool {
            return Err(Refusal::Pending(pool));
        }
        let mine = c.pending_by_address.get(&addr).copied().unwrap_or(0);
        if mine >= l.pending_per_address {
            return Err(Refusal::PendingPerAddress(l.pending_per_address));
        }
        let prefix = (!known).then(|| l.prefixes.of(addr));
        if let Some(prefix) = prefix {
            let ours = c.pending_by_prefix.get(&prefix).copied().unwrap_or(0);
            if ours >= l.pending_per_prefix {
                return Err(Refusal::PendingPerPrefix(l.pending_per_prefix));
            }
            c.pending_by_prefix.insert(prefix, ours + 1);
        }
        let shortened = !known && c.pending.saturating_mul(2) >= l.pending;
        c.pending += 1;
        c.pending_by_address.insert(addr, mine + 1);
        let mut t = self.ticket(Held::Pending(addr, prefix));
        if shortened {
            t.deadline = l.handshake_timeout_under_pressure.min(l.handshake_timeout);
            t.shortened = true;
        }
        Ok(t)
    }

    /// A connection slot for `peer` connecting from `addr`, if its shares allow.
    pub fn establish(&self, addr: IpAddr, peer: &Arc<str>) -> Result<Ticket, Refusal> {
        let addr = addr.to_canonical();
        let mut c = self.lock();
        if c.connections >= self.limits.connections {
            return Err(Refusal::Connections(self.limits.connections));
        }
        let by_peer = c.by_peer.get(peer).copied().unwrap_or(0);
        if by_peer >= self.limits.per_peer {
            return Err(Refusal::PerPeer(self.limits.per_peer));
        }
        let by_address = c.by_address.get(&addr).copied().unwrap_or(0);
        if by_address >= self.limits.per_address {
            return Err(Refusal::PerAddress(self.limits.per_address));
        }
        c.connections += 1;
        c.by_peer.insert(peer.clone(), by_peer + 1);
        c.by_address.insert(addr, by_address + 1);
        Ok(self.ticket(Held::Established(addr, peer.clone())))
    }

    /// (pending handshakes, established connections) right now.
    pub fn in_use(&self) -> (usize, usize) {
        let c = self.lock();
        (c.pending, c.connections)
    }

    /// Addresses remembered as known (some may have expired and not been dropped yet).
    pub fn known_addresses(&self) -> usize {
        self.lock().recent.len()
    }

    fn ticket(&self, held: Held) -> Ticket {
        Ticket {
            held,
            deadline: self.limits.handshake_timeout,
            shortened: false,
            limits: self.limits,
            counts: self.counts.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Take one from `key`'s count, removing the entry at zero.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match &self.held {
            Held::Pending(addr, prefix) => {
                c.pending = c.pending.saturating_sub(1);
                release(&mut c.pending_by_address, addr);
                if let Some(prefix) = prefix {
                    release(&mut c.pending_by_prefix, prefix);
                }
            }
            Held::Established(addr, peer) => {
                c.connections = c.connections.saturating_sub(1);
                release(&mut c.by_peer, peer);
                release(&mut c.by_address, addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            pending: 4,
            pending_per_address: 2,
            pending_per_prefix: 4,
            prefixes: Prefixes { v4: 32, v6: 128 },
            reserved_for_recent: 0,
            handshake_timeout: Duration::from_secs(10),
            handshake_timeout_under_pressure: Duration::from_secs(2),
            recent_capacity: 8,
            recent_ttl: Duration::from_secs(3600),
            connections: 5,
            per_peer: 3,
            per_address: 4,
        }
    }

    /// The defaults of the configuration, scaled down: a pool of 8, 2 per address, 4 per
    /// /24 or /64, 2 kept for known addresses.
    fn fair() -> Limits {
        Limits {
            pending: 8,
            pending_per_address: 2,
            pending_per_prefix: 4,
            prefixes: Prefixes { v4: 24, v6: 64 },
            reserved_for_recent: 2,
            recent_capacity: 3,
            ..limits()
        }
    }

    fn at(s: u64) -> Instant {
        // Any fixed origin will do; the tests move time by adding to it.
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now) + Duration::from_secs(s)
    }

    fn net(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::from([a, b, c, d])
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let a = Admission::new(limits());
        let held: Vec<_> = (0..2).map(|_| a.pending(ip(1), at(0)).unwrap()).collect();
        assert_eq!(
            a.pending(ip(1), at(0)).unwrap_err(),
            Refusal::PendingPerAddress(2)
        );
        let other = a
            .pending(ip(2), at(0))
            .expect("another source still gets a slot");
        let third = a.pending(ip(3), at(0)).unwrap();
        assert_eq!(a.pending(ip(4), at(0)).unwrap_err(), Refusal::Pending(4));
        drop(held);
        assert_eq!(a.in_use().0, 2);
        let _again = a.pending(ip(1), at(0)).expect("slots come back on drop");
        drop((other, third));
    }

    #[test]
    fn established_connections_do_not_use_handshake_slots() {
        let a = Admission::new(limits());
        let peer: Arc<str> = "O=Bank B, L=Paris, C=FR".into();
        let conns: Vec<_> = (0..3)
            .map(|i| a.establish(ip(10 + i), &peer).unwrap())
            .collect();
        let pending: Vec<_> = (0..2).map(|_| a.pending(ip(1), at(0)).unwrap()).collect();
        assert_eq!(a.in_use(), (2, 3));
        drop((conns, pending));
        assert_eq!(a.in_use(), (0, 0));
    }

    #[test]
    fn shares_per_peer_and_per_address_and_in_all() {
        let a = Admission::new(limits());
        let b: Arc<str> = "O=Bank B, L=Paris, C=FR".into();
        let c: Arc<str> = "O=Bank C, L=Rome, C=IT".into();
        let b_conns: Vec<_> = (0..3).map(|i| a.establish(ip(i), &b).unwrap()).collect();
        assert_eq!(a.establish(ip(9), &b).unwrap_err(), Refusal::PerPeer(3));
        let c1 = a.establish(ip(0), &c).unwrap();
        let c2 = a.establish(ip(1), &c).unwrap();
        assert_eq!(a.establish(ip(2), &c).unwrap_err(), Refusal::Connections(5));
        drop(b_conns);
        let c3 = a.establish(ip(0), &c).unwrap();
        let c4 = a.establish(ip(0), &c);
        assert_eq!(c4.unwrap_err(), Refusal::PerPeer(3));
        drop((c1, c2, c3));
        let same: Vec<_> = (0..4)
            .map(|i| {
                let p: Arc<str> = format!("O=Bank {i}, L=X, C=GB").into();
                a.establish(ip(7), &p).unwrap()
            })
            .collect();
        let p: Arc<str> = "O=Bank Z, L=X, C=GB".into();
        assert_eq!(a.establish(ip(7), &p).unwrap_err(), Refusal::PerAddress(4));
        drop(same);
        let c = a.counts.lock().unwrap();
        assert!(c.by_peer.is_empty() && c.by_address.is_empty() && c.pending_by_address.is_empty());
    }

    #[test]
    fn prefixes_group_v4_by_24_and_v6_by_64() {
        let p = Prefixes { v4: 24, v6: 64 };
        assert_eq!(p.of(net(127, 0, 0, 5)), net(127, 0, 0, 0));
        assert_eq!(p.of(net(10, 1, 2, 3)), p.of(net(10, 1, 2, 250)));
        assert_ne!(p.of(net(10, 1, 2, 3)), p.of(net(10, 1, 3, 3)));
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(p.of(v6("2001:db8:1:2:aaaa::1")), v6("2001:db8:1:2::"));
        assert_ne!(p.of(v6("2001:db8:1:2::1")), p.of(v6("2001:db8:1:3::1")));
        // A dual-stack socket reports IPv4 peers as mapped IPv6: grouped as IPv4, by /24.
        assert_eq!(p.of(v6("::ffff:10.1.2.3")), net(10, 1, 2, 0));
        let edges = Prefixes { v4: 0, v6: 128 };
        assert_eq!(edges.of(net(10, 1, 2, 3)), net(0, 0, 0, 0));
        assert_eq!(edges.of(v6("2001:db8::7")), v6("2001:db8::7"));
        assert_eq!(
            Prefixes { v4: 32, v6: 0 }.of(net(10, 1, 2, 3)),
            net(10, 1, 2, 3)
        );
    }

    /// The finding: four addresses, 32 slots each, held the whole pool. Now four addresses
    /// of one /24 share one prefix share, and other networks still get slots.
    #[test]
    fn neighbouring_addresses_share_one_prefix_share() {
        let a = Admission::new(fair());
        let mut flood = Vec::new();
        for last in 2..=5 {
            while let Ok(t) = a.pending(net(127, 0, 0, last), at(0)) {
                flood.push(t);
            }
        }
        assert_eq!(flood.len(), 4, "the /24 holds its share, not 4 × 2");
        assert_eq!(
            a.pending(net(127, 0, 0, 6), at(0)).unwrap_err(),
            Refusal::PendingPerPrefix(4)
        );
        let other = a.pending(net(10, 0, 0, 1), at(0)).expect("another /24");
        let mapped = "::ffff:127.0.0.9".parse().unwrap();
        assert_eq!(
            a.pending(mapped, at(0)).unwrap_err(),
            Refusal::PendingPerPrefix(4),
            "a mapped IPv4 address is the same network"
        );
        drop(flood);
        drop(other);
        let c = a.lock();
        assert!(c.pending_by_prefix.is_empty() && c.pending_by_address.is_empty());
    }

    /// A partner whose handshake completed before gets in when strangers hold every slot
    /// they may use, from its own /24 or from everywhere.
    #[test]
    fn a_known_address_gets_the_reserved_share_and_no_prefix_share() {
        let a = Admission::new(Limits {
            pending: 10,
            reserved_for_recent: 4,
            ..fair()
        });
        let partner = net(127, 0, 0, 1);
        a.pending(partner, at(0)).unwrap().completed(at(0));
        assert_eq!(a.known_addresses(), 1);
        // Strangers: the partner's /24 takes its share, another network the rest of what
        // strangers may use (10 - 4 reserved).
        let mut flood = Vec::new();
        for net3 in [0u8, 1, 2, 3] {
            for last in 2..=5 {
                if let Ok(t) = a.pending(net(127, 0, net3, last), at(1)) {
                    flood.push(t);
                }
            }
        }
        assert_eq!(flood.len(), 6);
        assert_eq!(
            a.pending(net(192, 168, 0, 1), at(1)).unwrap_err(),
            Refusal::Pending(6)
        );
        // The partner: in its flooded /24, with the stranger pool full.
        let back = a
            .pending(partner, at(1))
            .expect("the known partner gets in");
        let second = a.pending(partner, at(1)).expect("twice");
        assert_eq!(
            a.pending(partner, at(1)).unwrap_err(),
            Refusal::PendingPerAddress(2),
            "still held to its per-address share"
        );
        assert_eq!(a.in_use().0, 8);
        drop((back, second, flood));
        assert_eq!(a.in_use().0, 0);
    }

    #[test]
    fn known_addresses_expire_and_are_bounded() {
        // One slot for strangers, one more for known addresses; 3 known at most, 60 s each.
        let a = Admission::new(Limits {
            pending: 2,
            reserved_for_recent: 1,
            recent_ttl: Duration::from_secs(60),
            ..fair()
        });
        for n3 in 1..=3 {
            a.pending(net(10, 0, n3, 1), at(0))
                .unwrap()
                .completed(at(n3.into()));
        }
        // A fourth pushes out the one seen longest ago (10.0.1.1, at 1 s).
        a.pending(net(10, 0, 4, 1), at(10))
            .unwrap()
            .completed(at(10));
        assert_eq!(a.known_addresses(), 3);
        let stranger = a.pending(net(172, 16, 0, 1), at(11)).unwrap();
        assert_eq!(
            a.pending(net(172, 16, 0, 2), at(11)).unwrap_err(),
            Refusal::Pending(1),
            "strangers share the pool without its reserved slot"
        );
        assert_eq!(
            a.pending(net(10, 0, 1, 1), at(11)).unwrap_err(),
            Refusal::Pending(1),
            "forgotten when the set was full"
        );
        drop(a.pending(net(10, 0, 2, 1), at(11)).expect("still known"));
        // With the set full, expired entries (10.0.2.1 and 10.0.3.1 at 65 s) go before a
        // live one (10.0.4.1).
        drop(stranger);
        a.pending(net(10, 0, 5, 1), at(65))
            .unwrap()
            .completed(at(65));
        assert_eq!(a.known_addresses(), 2);
        let stranger = a.pending(net(172, 16, 0, 1), at(66)).unwrap();
        // Known for `recent_ttl` after the last completed handshake, no longer.
        drop(a.pending(net(10, 0, 4, 1), at(69)).expect("59 s after"));
        assert_eq!(
            a.pending(net(10, 0, 4, 1), at(70)).unwrap_err(),
            Refusal::Pending(1)
        );
        drop(stranger);
    }

    #[test]
    fn under_pressure_strangers_get_the_short_deadline() {
        let a = Admission::new(fair());
        let partner = net(10, 9, 9, 9);
        a.pending(partner, at(0)).unwrap().completed(at(0));
        let mut held = Vec::new();
        for (i, n3) in (0..4u8).enumerate() {
            let t = a.pending(net(10, 0, n3, 1), at(1)).unwrap();
            // 0..3 taken before: below half the pool of 8.
            assert_eq!(t.deadline(), Duration::from_secs(10), "slot {i}");
            assert!(!t.shortened());
            held.push(t);
        }
        let t = a.pending(net(10, 0, 9, 1), at(1)).unwrap();
        assert_eq!(t.deadline(), Duration::from_secs(2), "half full: short");
        assert!(t.shortened());
        held.push(t);
        let p = a.pending(partner, at(1)).unwrap();
        assert_eq!(
            p.deadline(),
            Duration::from_secs(10),
            "known: full deadline"
        );
        drop((held, p));
        let t = a.pending(net(10, 0, 9, 1), at(1)).unwrap();
        assert_eq!(t.deadline(), Duration::from_secs(10), "pressure gone");
    }

    #[test]
    fn recent_capacity_zero_remembers_no_one() {
        let a = Admission::new(Limits {
            recent_capacity: 0,
            ..fair()
        });
        a.pending(ip(1), at(0)).unwrap().completed(at(0));
        assert_eq!(a.known_addresses(), 0);
    }
}
