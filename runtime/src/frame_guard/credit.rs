//! The credit a peer was granted by our own `flow` frames, and what it used of it.

use std::collections::HashMap;

use fe2o3_amqp::types::performatives::Performative;

use super::Violation;

/// Link credit as our own frames grant it, and what the peer used of it.
///
/// Channels and handles are each endpoint's own numbers: the peer sends on its channel and
/// handle, our flows name ours. Our `begin` answers the peer's (`remote-channel`), and our
/// `attach` answers the peer's of the same link name, which is how a flow is matched to the
/// peer's link. Only a bound is kept, never a decision fe2o3 makes: the limit only grows
/// (a flow that lowers credit could cross transfers already sent), so a peer is never held to
/// less than the most credit it was ever given.
#[derive(Debug, Default)]
pub(super) struct Credit {
    /// Our channel → the peer's.
    channels: HashMap<u16, u16>,
    /// Our (channel, handle) → the link name's hash.
    ours: HashMap<(u16, u32), u64>,
    /// The peer's (channel, name hash) → its handle.
    by_name: HashMap<(u16, u64), u32>,
    /// The peer's links: (channel, handle) → deliveries sent and the limit granted.
    links: HashMap<(u16, u32), LinkCredit>,
    /// Keys the name hashes (peers choose the names; they get no say in collisions).
    hasher: std::hash::RandomState,
    /// Our outgoing bytes, cut into frames.
    pub(super) out: Outgoing,
}

/// One peer link's use of its credit (serial numbers, RFC 1982 as AMQP's delivery-count).
#[derive(Debug, Clone, Copy)]
struct LinkCredit {
    /// The link name's hash.
    name: u64,
    /// The peer's delivery-count: its initial one plus the deliveries it began since.
    sent: u32,
    /// delivery-count + link-credit of our largest grant; `None` before our first flow.
    limit: Option<u32>,
}

impl Credit {
    fn name_hash(&self, name: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(name)
    }

    /// The peer attached a link (as sender: only a sender's transfers use credit).
    pub(super) fn peer_attach(
        &mut self,
        channel: u16,
        a: &fe2o3_amqp::types::performatives::Attach,
    ) {
        let name = self.name_hash(&a.name);
        let sent = a.initial_delivery_count.unwrap_or(0);
        let key = (channel, a.handle.0);
        if let Some(old) = self.links.insert(
            key,
            LinkCredit {
                name,
                sent,
                limit: None,
            },
        ) {
            self.by_name.remove(&(channel, old.name));
        }
        self.by_name.insert((channel, name), a.handle.0);
    }

    pub(super) fn peer_detach(&mut self, channel: u16, handle: u32) {
        if let Some(old) = self.links.remove(&(channel, handle)) {
            self.by_name.remove(&(channel, old.name));
        }
    }

    pub(super) fn peer_end(&mut self, channel: u16) {
        self.links.retain(|(c, _), _| *c != channel);
        self.by_name.retain(|(c, _), _| *c != channel);
    }

    /// The peer begins a delivery on (channel, handle): within the credit granted?
    pub(super) fn delivery(&mut self, channel: u16, handle: u32) -> Result<(), Violation> {
        // A transfer on a handle that is not attached is fe2o3's to refuse.
        let Some(link) = self.links.get_mut(&(channel, handle)) else {
            return Ok(());
        };
        let limit = link.limit.unwrap_or(link.sent);
        // sent < limit, in serial-number arithmetic.
        if (limit.wrapping_sub(link.sent) as i32) <= 0 {
            return Err(Violation::BeyondCredit);
        }
        link.sent = link.sent.wrapping_add(1);
        Ok(())
    }

    /// One of our own frames (trusted: encoded by fe2o3 for us).
    pub(super) fn ours(&mut self, channel: u16, p: &Performative) {
        match p {
            Performative::Begin(b) => {
                if let Some(remote) = b.remote_channel {
                    self.channels.insert(channel, remote);
                }
            }
            Performative::Attach(a) => {
                let name = self.name_hash(&a.name);
                self.ours.insert((channel, a.handle.0), name);
            }
            Performative::Flow(f) => {
                let (Some(handle), Some(credit)) = (&f.handle, f.link_credit) else {
                    return;
                };
                let Some(&peer_channel) = self.channels.get(&channel) else {
                    return;
                };
                let Some(&name) = self.ours.get(&(channel, handle.0)) else {
                    return;
                };
                let Some(&peer_handle) = self.by_name.get(&(peer_channel, name)) else {
                    return;
                };
                if let Some(link) = self.links.get_mut(&(peer_channel, peer_handle)) {
                    let granted = f.delivery_count.unwrap_or(link.sent).wrapping_add(credit);
                    link.limit = Some(match link.limit {
                        Some(l) if (l.wrapping_sub(granted) as i32) > 0 => l,
                        _ => granted,
                    });
                }
            }
            Performative::Detach(d) => {
                self.ours.remove(&(channel, d.handle.0));
            }
            Performative::End(_) => {
                self.ours.retain(|(c, _), _| *c != channel);
                self.channels.remove(&channel);
            }
            _ => {}
        }
    }
}

/// Our own outgoing bytes cut into frames, so that [`Credit`] sees our flows. Our frames are
/// trusted and small (the float sends no transfers); only begin, attach, flow, detach and end
/// are decoded.
#[derive(Debug, Default)]
pub(super) struct Outgoing {
    head: [u8; 8],
    have: usize,
    /// Body bytes still to come of the current frame, its channel, and whether it is kept.
    left: u32,
    skip_header: u32,
    channel: u16,
    keep: bool,
    body: Vec<u8>,
}

/// Our own frames bigger than this are not decoded (ours never are).
const OUTGOING_KEEP_MAX: u32 = 64 * 1024;

impl Outgoing {
    /// Feed our outgoing bytes; calls `on_frame` with each decodable performative we care
    /// about.
    pub(super) fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u16, Performative)) {
        while !bytes.is_empty() {
            if self.left == 0 && self.skip_header == 0 {
                let take = (8 - self.have).min(bytes.len());
                if let (Some(dst), Some(src)) = (
                    self.head.get_mut(self.have..self.have + take),
                    bytes.get(..take),
                ) {
                    dst.copy_from_slice(src);
                }
                self.have += take;
                bytes = bytes.get(take..).unwrap_or_default();
                if self.have < 8 {
                    return;
                }
                self.have = 0;
                let h = self.head;
                if &h[..4] == b"AMQP" {
                    continue;
                }
                let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let doff = (u32::from(h[4]) * 4).clamp(8, size.max(8));
                self.skip_header = doff - 8;
                self.left = size.saturating_sub(doff);
                self.channel = u16::from_be_bytes([h[6], h[7]]);
                // SASL frames (type 1) carry nothing for the credit.
                self.keep = h[5] == 0 && self.left <= OUTGOING_KEEP_MAX;
                self.body.clear();
                continue;
            }
            if self.skip_header > 0 {
                let take = (self.skip_header as usize).min(bytes.len());
                self.skip_header -= take as u32;
                bytes = bytes.get(take..).unwrap_or_default();
                continue;
            }
            let take = (self.left as usize).min(bytes.len());
            if self.keep {
                self.body
                    .extend_from_slice(bytes.get(..take).unwrap_or_default());
            }
            self.left -= take as u32;
            bytes = bytes.get(take..).unwrap_or_default();
            if self.left == 0 && self.keep {
                // 0x00 0x53 <code>: begin 0x11, attach 0x12, flow 0x13, detach 0x16, end 0x17.
                if let [0x00, 0x53, 0x11..=0x13 | 0x16 | 0x17, ..] = self.body.as_slice() {
                    if let Ok(p) = serde_amqp::from_slice::<Performative>(&self.body) {
                        on_frame(self.channel, p);
                    }
                }
                self.body.clear();
            }
        }
    }
}
