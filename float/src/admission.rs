//! Who may take a connection slot, and when.
//!
//! A connection costs the float in two phases, and each phase has its own budget:
//!
//! - **Pending**: from TCP accept until the TLS handshake and the AMQP open are done. Anyone
//!   who can reach the port gets here, certificate or not, so this pool is small
//!   (`float.max_pending_handshakes`) and one source address may hold only a few of its
//!   slots (`float.max_pending_handshakes_per_address`). A host that opens hundreds of TCP
//!   connections and never finishes a handshake (slowloris) fills its own share and is
//!   refused beyond it; other sources still get handshake slots, and peers that are already
//!   connected are not touched at all, because established connections are counted
//!   separately.
//! - **Established**: once the peer proved who it is. `float.max_connections` in all, and per
//!   peer legal name (`float.max_connections_per_peer`) and per source address
//!   (`float.max_connections_per_address`), so one member (or one compromised host) cannot
//!   take every slot from the others.
//!
//! Each admitted phase is a [`Ticket`] that gives its slot back when dropped, whatever path the
//! connection takes. No sockets and no clock here: the listener and the connection drive
//! these types; the tests drive them directly.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// The limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in the handshake phase, all sources together.
    pub pending: usize,
    /// Connections in the handshake phase from one source address.
    pub pending_per_address: usize,
    /// Established connections in all.
    pub connections: usize,
    /// Established connections of one peer legal name.
    pub per_peer: usize,
    /// Established connections from one source address.
    pub per_address: usize,
}

/// Why a connection was refused a slot. The label is the `reason` of
/// `drawbridge_float_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Every handshake slot is taken.
    #[error("too many pending handshakes ({0} at most)")]
    Pending(usize),
    /// This address holds its share of handshake slots.
    #[error("too many pending handshakes from this address ({0} at most)")]
    PendingPerAddress(usize),
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
    connections: usize,
    by_peer: HashMap<Arc<str>, usize>,
    by_address: HashMap<IpAddr, usize>,
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
    Pending(IpAddr),
    Established(IpAddr, Arc<str>),
}

/// A slot, given back on drop.
#[derive(Debug)]
#[must_use = "the slot is given back as soon as the ticket is dropped"]
pub struct Ticket {
    held: Held,
    counts: Arc<Mutex<Counts>>,
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

    /// A handshake slot for a connection from `addr`, if one is free.
    pub fn pending(&self, addr: IpAddr) -> Result<Ticket, Refusal> {
        let mut c = self.lock();
        if c.pending >= self.limits.pending {
            return Err(Refusal::Pending(self.limits.pending));
        }
        let mine = c.pending_by_address.get(&addr).copied().unwrap_or(0);
        if mine >= self.limits.pending_per_address {
            return Err(Refusal::PendingPerAddress(self.limits.pending_per_address));
        }
        c.pending += 1;
        c.pending_by_address.insert(addr, mine + 1);
        Ok(self.ticket(Held::Pending(addr)))
    }

    /// A connection slot for `peer` connecting from `addr`, if its shares allow.
    pub fn establish(&self, addr: IpAddr, peer: &Arc<str>) -> Result<Ticket, Refusal> {
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

    fn ticket(&self, held: Held) -> Ticket {
        Ticket {
            held,
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
            Held::Pending(addr) => {
                c.pending = c.pending.saturating_sub(1);
                release(&mut c.pending_by_address, addr);
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
            connections: 5,
            per_peer: 3,
            per_address: 4,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let a = Admission::new(limits());
        let held: Vec<_> = (0..2).map(|_| a.pending(ip(1)).unwrap()).collect();
        assert_eq!(a.pending(ip(1)).unwrap_err(), Refusal::PendingPerAddress(2));
        let other = a.pending(ip(2)).expect("another source still gets a slot");
        let third = a.pending(ip(3)).unwrap();
        assert_eq!(a.pending(ip(4)).unwrap_err(), Refusal::Pending(4));
        drop(held);
        assert_eq!(a.in_use().0, 2);
        let _again = a.pending(ip(1)).expect("slots come back on drop");
        drop((other, third));
    }

    #[test]
    fn established_connections_do_not_use_handshake_slots() {
        let a = Admission::new(limits());
        let peer: Arc<str> = "O=Bank B, L=Paris, C=FR".into();
        let conns: Vec<_> = (0..3)
            .map(|i| a.establish(ip(10 + i), &peer).unwrap())
            .collect();
        let pending: Vec<_> = (0..2).map(|_| a.pending(ip(1)).unwrap()).collect();
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
}
