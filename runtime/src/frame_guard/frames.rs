//! [`Frames`]: a connection's incoming bytes cut into frames, each scanned, the peer held to
//! its limits.

use std::collections::{HashMap, HashSet};

use fe2o3_amqp::types::{definitions::Role, performatives::Performative};

use super::{credit::Credit, scanner::Scanner, PeerLimits, Violation, MAX_OPEN_DELIVERIES};

/// The largest performative buffer kept for the next frame; a larger one (a big `attach`)
/// is freed once scanned.
const SPARE_BYTES: usize = 4096;

/// Frame-level state.
#[derive(Debug)]
enum FrameState {
    /// Eight bytes: a protocol header (`AMQP...`) or a frame header.
    Head { buf: [u8; 8], have: usize },
    /// Extended header bytes to skip, then a body of `body` bytes.
    Extended {
        left: u32,
        body: u32,
        channel: u16,
        sasl: bool,
    },
    /// The performative, scanned and kept for decoding.
    Performative {
        left: u32,
        channel: u16,
        sasl: bool,
        scanner: Scanner,
        bytes: Vec<u8>,
    },
    /// Transfer payload for `(channel, handle)`.
    Payload {
        left: u32,
        key: (u16, u32),
        /// The delivery ends with this frame.
        last: bool,
    },
}

/// Cuts a connection's incoming bytes into frames and scans each (see the module docs).
#[derive(Debug)]
pub struct Frames {
    max_frame: u32,
    limits: PeerLimits,
    state: FrameState,
    deliveries: HashMap<(u16, u32), Scanner>,
    /// A scanner and a performative buffer kept between frames: each frame needs both, and
    /// allocating them anew cost three allocations per transfer.
    spare: Scanner,
    spare_bytes: Vec<u8>,
    /// Channels with a session begun and not ended.
    sessions: HashSet<u16>,
    /// (channel, handle) of links attached and not detached.
    links: HashSet<(u16, u32)>,
    /// The credit our own flows granted, when [`PeerLimits::enforce_credit`] is on.
    credit: Credit,
}

impl Frames {
    /// Frames up to `max_frame` bytes (the size announced in `open`), default limits.
    pub fn new(max_frame: u32) -> Self {
        Frames::with_limits(max_frame, PeerLimits::default())
    }

    /// Frames up to `max_frame` bytes, the peer held to `limits`.
    pub fn with_limits(max_frame: u32, limits: PeerLimits) -> Self {
        Frames {
            max_frame,
            limits,
            state: FrameState::Head {
                buf: [0; 8],
                have: 0,
            },
            deliveries: HashMap::new(),
            spare: Scanner::default(),
            spare_bytes: Vec::new(),
            sessions: HashSet::new(),
            links: HashSet::new(),
            credit: Credit::default(),
        }
    }

    /// Our own outgoing bytes (what the engine writes to the peer), for the credit we grant.
    /// Does nothing unless [`PeerLimits::enforce_credit`] is on.
    pub fn outgoing(&mut self, bytes: &[u8]) {
        if !self.limits.enforce_credit {
            return;
        }
        let Credit { out, .. } = &mut self.credit;
        let mut seen = Vec::new();
        out.feed(bytes, |channel, p| seen.push((channel, p)));
        for (channel, p) in &seen {
            self.credit.ours(*channel, p);
        }
    }

    /// Scan the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Violation> {
        while !bytes.is_empty() {
            let used = self.step(bytes)?;
            bytes = bytes.get(used..).unwrap_or_default();
        }
        Ok(())
    }

    /// Consume a prefix of `bytes` (at least one byte); returns its length.
    fn step(&mut self, bytes: &[u8]) -> Result<usize, Violation> {
        match &mut self.state {
            FrameState::Head { buf, have } => {
                let take = (8 - *have).min(bytes.len());
                if let (Some(dst), Some(src)) =
                    (buf.get_mut(*have..*have + take), bytes.get(..take))
                {
                    dst.copy_from_slice(src);
                }
                *have += take;
                if *have == 8 {
                    let head = *buf;
                    self.header(head)?;
                }
                Ok(take)
            }
            FrameState::Extended {
                left,
                body,
                channel,
                sasl,
            } => {
                let take = (*left as usize).min(bytes.len());
                *left -= take as u32;
                if *left == 0 {
                    let (body, channel, sasl) = (*body, *channel, *sasl);
                    self.start_body(body, channel, sasl);
                }
                Ok(take)
            }
            FrameState::Performative {
                left,
                channel,
                sasl,
                scanner,
                bytes: kept,
            } => {
                let window = bytes
                    .get(..(*left as usize).min(bytes.len()))
                    .unwrap_or_default();
                let used = scanner.feed(window, Some(1))?;
                kept.extend_from_slice(window.get(..used).unwrap_or_default());
                *left -= used as u32;
                if scanner.completed() == 1 {
                    let (left, channel, sasl) = (*left, *channel, *sasl);
                    let mut kept = std::mem::take(kept);
                    self.spare = std::mem::take(scanner).recycled();
                    self.performative(&kept, left, channel, sasl)?;
                    kept.clear();
                    if kept.capacity() <= SPARE_BYTES {
                        self.spare_bytes = kept;
                    }
                } else if *left == 0 {
                    return Err(Violation::BadFrame("performative longer than its frame"));
                }
                Ok(used)
            }
            FrameState::Payload { left, key, last } => {
                let take = (*left as usize).min(bytes.len());
                let spare = &mut self.spare;
                let scanner = self
                    .deliveries
                    .entry(*key)
                    .or_insert_with(|| std::mem::take(spare).recycled());
                let max = self.limits.max_message_size;
                let size = scanner.offset.saturating_add(take as u64);
                if max > 0 && size > max {
                    return Err(Violation::MessageTooLarge { max });
                }
                scanner.feed(bytes.get(..take).unwrap_or_default(), None)?;
                *left -= take as u32;
                if *left == 0 {
                    if *last {
                        // A whole message is a sequence of whole sections.
                        if let Some(done) = self.deliveries.remove(key) {
                            if !done.at_boundary() {
                                return Err(Violation::BadFrame("message ends inside a value"));
                            }
                            self.spare = done.recycled();
                        }
                    }
                    self.state = FrameState::Head {
                        buf: [0; 8],
                        have: 0,
                    };
                }
                Ok(take)
            }
        }
    }

    fn header(&mut self, head: [u8; 8]) -> Result<(), Violation> {
        let fresh = FrameState::Head {
            buf: [0; 8],
            have: 0,
        };
        if &head[..4] == b"AMQP" {
            // A protocol header (AMQP, then after SASL AMQP again): no frame follows it.
            self.state = fresh;
            return Ok(());
        }
        let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let doff = u32::from(head[4]) * 4;
        let sasl = head[5] == 1;
        let channel = u16::from_be_bytes([head[6], head[7]]);
        if size > self.max_frame {
            return Err(Violation::FrameTooLarge {
                size,
                max: self.max_frame,
            });
        }
        if size < 8 || doff < 8 || doff > size {
            return Err(Violation::BadFrameHeader);
        }
        let body = size - doff;
        if doff > 8 {
            self.state = FrameState::Extended {
                left: doff - 8,
                body,
                channel,
                sasl,
            };
        } else {
            self.start_body(body, channel, sasl);
        }
        Ok(())
    }

    fn start_body(&mut self, body: u32, channel: u16, sasl: bool) {
        self.state = if body == 0 {
            // An empty frame: a heartbeat.
            FrameState::Head {
                buf: [0; 8],
                have: 0,
            }
        } else {
            FrameState::Performative {
                left: body,
                channel,
                sasl,
                scanner: std::mem::take(&mut self.spare),
                bytes: std::mem::take(&mut self.spare_bytes),
            }
        };
    }

    /// A performative was scanned (so decoding it recurses at most [`MAX_DEPTH`] levels).
    fn performative(
        &mut self,
        bytes: &[u8],
        left: u32,
        channel: u16,
        sasl: bool,
    ) -> Result<(), Violation> {
        let head = FrameState::Head {
            buf: [0; 8],
            have: 0,
        };
        if sasl {
            if left > 0 {
                return Err(Violation::BadFrame("bytes after a SASL frame's body"));
            }
            self.state = head;
            return Ok(());
        }
        let p: Performative = serde_amqp::from_slice(bytes)
            .map_err(|_| Violation::BadFrame("performative does not decode"))?;
        match p {
            Performative::Transfer(t) => {
                if !self.limits.accept_transfers {
                    return Err(Violation::UnexpectedTransfer);
                }
                let key = (channel, t.handle.0);
                if t.aborted {
                    self.deliveries.remove(&key);
                }
                // A delivery begins with a transfer on a link that has none in progress.
                if self.limits.enforce_credit && !self.deliveries.contains_key(&key) {
                    self.credit.delivery(channel, t.handle.0)?;
                }
                if !self.deliveries.contains_key(&key)
                    && self.deliveries.len() >= MAX_OPEN_DELIVERIES
                {
                    return Err(Violation::TooManyDeliveries);
                }
                let last = !t.more || t.aborted;
                if left == 0 {
                    if last {
                        self.deliveries.remove(&key);
                    } else {
                        // An empty first frame still begins the delivery: its next frames
                        // continue it (and use no more credit).
                        let spare = &mut self.spare;
                        self.deliveries
                            .entry(key)
                            .or_insert_with(|| std::mem::take(spare).recycled());
                    }
                    self.state = head;
                } else {
                    let spare = &mut self.spare;
                    self.deliveries
                        .entry(key)
                        .or_insert_with(|| std::mem::take(spare).recycled());
                    self.state = FrameState::Payload { left, key, last };
                }
                return Ok(());
            }
            Performative::Detach(d) => {
                self.deliveries.remove(&(channel, d.handle.0));
                self.links.remove(&(channel, d.handle.0));
                self.credit.peer_detach(channel, d.handle.0);
            }
            Performative::End(_) => {
                self.deliveries.retain(|(c, _), _| *c != channel);
                self.links.retain(|(c, _)| *c != channel);
                self.sessions.remove(&channel);
                self.credit.peer_end(channel);
            }
            Performative::Open(o) => {
                let min = self.limits.min_idle_timeout_ms;
                if let Some(asked) = o.idle_time_out {
                    // 0 means "no idle timeout": the peer asks for no heartbeats at all.
                    if asked != 0 && asked < min {
                        return Err(Violation::IdleTimeoutTooShort { asked, min });
                    }
                }
            }
            Performative::Begin(_)
                if self.sessions.insert(channel)
                    && self.sessions.len() > usize::from(self.limits.max_sessions) =>
            {
                return Err(Violation::TooManySessions(self.limits.max_sessions));
            }
            Performative::Attach(a) => {
                if self.links.insert((channel, a.handle.0))
                    && self.links.len() > self.limits.max_links as usize
                {
                    return Err(Violation::TooManyLinks(self.limits.max_links));
                }
                // role false = sender: its transfers use our credit.
                if self.limits.enforce_credit && a.role == Role::Sender {
                    self.credit.peer_attach(channel, &a);
                }
            }
            _ => {}
        }
        if left > 0 {
            return Err(Violation::BadFrame(
                "payload on a frame that is no transfer",
            ));
        }
        self.state = head;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::{
        definitions::{Handle, SequenceNo},
        performatives::{Attach, Detach, Transfer},
    };
    use serde_amqp::to_vec;

    use super::super::testutil::{a_message, nested_lists};
    use super::*;

    fn frame(channel: u16, performative: &Performative, payload: &[u8]) -> Vec<u8> {
        let body = to_vec(performative).unwrap();
        let size = 8 + body.len() + payload.len();
        let mut f = (size as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0]);
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&body);
        f.extend_from_slice(payload);
        f
    }

    fn transfer(handle: u32, more: bool) -> Performative {
        Performative::Transfer(Transfer {
            handle: Handle(handle),
            delivery_id: Some(1 as SequenceNo),
            delivery_tag: Some(vec![1].into()),
            message_format: Some(0),
            settled: None,
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        })
    }

    fn feed_all(frames: &[Vec<u8>], piece: usize) -> Result<(), Violation> {
        let mut f = Frames::new(256 * 1024);
        let mut stream = b"AMQP\x00\x01\x00\x00".to_vec();
        for fr in frames {
            stream.extend_from_slice(fr);
        }
        for chunk in stream.chunks(piece) {
            f.feed(chunk)?;
        }
        Ok(())
    }

    #[test]
    fn a_message_split_over_frames_is_scanned_as_one_stream() {
        let msg = a_message();
        let (a, b) = msg.split_at(msg.len() / 2);
        let ok = [
            frame(0, &transfer(0, true), a),
            frame(0, &transfer(0, false), b),
        ];
        for piece in [1, 5, 4096] {
            assert_eq!(feed_all(&ok, piece), Ok(()));
        }
        let deep = nested_lists(1000);
        let (a, b) = deep.split_at(deep.len() / 2);
        let bad = [
            frame(0, &transfer(0, true), a),
            frame(0, &transfer(0, false), b),
        ];
        assert_eq!(feed_all(&bad, 4096), Err(Violation::TooDeep));
    }

    #[test]
    fn another_link_cannot_hide_nesting_by_interleaving() {
        // Link 0 sends 40 levels in each of two frames; link 1's frames in between would
        // "close" them if both were scanned as one stream.
        let deep = nested_lists(80);
        let (a, b) = deep.split_at(40 * 9);
        let closer = vec![0x40; 8];
        let frames = [
            frame(0, &transfer(0, true), a),
            frame(0, &transfer(1, true), &closer),
            frame(0, &transfer(0, false), b),
        ];
        assert_eq!(feed_all(&frames, 4096), Err(Violation::TooDeep));
    }

    #[test]
    fn frame_headers_and_performatives_are_checked() {
        let mut big = frame(0, &transfer(0, false), &[0x40]);
        big[..4].copy_from_slice(&(1u32 << 20).to_be_bytes());
        assert!(matches!(
            feed_all(&[big], 4096),
            Err(Violation::FrameTooLarge { .. })
        ));
        let mut tiny = frame(0, &transfer(0, false), &[]);
        tiny[4] = 1;
        assert_eq!(feed_all(&[tiny], 4096), Err(Violation::BadFrameHeader));
        // A payload on an attach.
        let attach = Performative::Attach(Attach {
            name: "l".into(),
            handle: Handle(0),
            role: fe2o3_amqp::types::definitions::Role::Sender,
            snd_settle_mode: Default::default(),
            rcv_settle_mode: Default::default(),
            source: None,
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        assert!(matches!(
            feed_all(&[frame(0, &attach, &[0x40])], 4096),
            Err(Violation::BadFrame(_))
        ));
        assert_eq!(feed_all(&[frame(0, &attach, &[])], 4096), Ok(()));
        // Heartbeats (empty frames) and a detach that forgets the link's state.
        let heartbeat = vec![0, 0, 0, 8, 2, 0, 0, 0];
        let detach = Performative::Detach(Detach {
            handle: Handle(0),
            closed: true,
            error: None,
        });
        let half = nested_lists(40);
        let frames = [
            heartbeat,
            frame(0, &transfer(0, true), &half[..100]),
            frame(0, &detach, &[]),
            frame(0, &transfer(0, false), &a_message()),
        ];
        assert_eq!(feed_all(&frames, 3), Ok(()));
    }
    fn feed_limited(frames: &[Vec<u8>], limits: PeerLimits) -> Result<(), Violation> {
        let mut f = Frames::with_limits(256 * 1024, limits);
        f.feed(b"AMQP\x00\x01\x00\x00")?;
        for fr in frames {
            f.feed(fr)?;
        }
        Ok(())
    }

    fn begin() -> Performative {
        Performative::Begin(fe2o3_amqp::types::performatives::Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: Handle(u32::MAX),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn end() -> Performative {
        Performative::End(fe2o3_amqp::types::performatives::End { error: None })
    }

    fn attach(handle: u32) -> Performative {
        Performative::Attach(Attach {
            name: format!("l{handle}"),
            handle: Handle(handle),
            role: fe2o3_amqp::types::definitions::Role::Sender,
            snd_settle_mode: Default::default(),
            rcv_settle_mode: Default::default(),
            source: None,
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn open(idle: Option<u32>) -> Performative {
        Performative::Open(fe2o3_amqp::types::performatives::Open {
            container_id: "peer".into(),
            hostname: None,
            max_frame_size: Default::default(),
            channel_max: Default::default(),
            idle_time_out: idle,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    const LIMITS: PeerLimits = PeerLimits {
        max_sessions: 2,
        max_links: 3,
        min_idle_timeout_ms: 1000,
        max_message_size: 1000,
        accept_transfers: true,
        enforce_credit: false,
    };

    #[test]
    fn a_delivery_over_the_message_size_is_refused_whatever_its_frames() {
        let open = frame(0, &begin(), &[]);
        let whole = frame(0, &transfer(0, false), &[0x40; 1000]);
        assert_eq!(feed_limited(&[open.clone(), whole], LIMITS), Ok(()));
        let mut split = vec![open.clone()];
        for _ in 0..9 {
            split.push(frame(0, &transfer(0, true), &[0x40; 100]));
        }
        split.push(frame(0, &transfer(0, false), &[0x40; 100]));
        assert_eq!(feed_limited(&split, LIMITS), Ok(()), "exactly the maximum");
        let mut over = split.clone();
        over.pop();
        over.push(frame(0, &transfer(0, true), &[0x40; 101]));
        assert_eq!(
            feed_limited(&over, LIMITS),
            Err(Violation::MessageTooLarge { max: 1000 })
        );
        // Each delivery counts on its own.
        let mut two = vec![open];
        for _ in 0..2 {
            two.push(frame(0, &transfer(0, true), &[0x40; 600]));
            two.push(frame(0, &transfer(0, false), &[0x40; 400]));
        }
        assert_eq!(feed_limited(&two, LIMITS), Ok(()));
    }

    #[test]
    fn sessions_are_counted_while_open() {
        let two = [frame(0, &begin(), &[]), frame(1, &begin(), &[])];
        assert_eq!(feed_limited(&two, LIMITS), Ok(()));
        let three = [two[0].clone(), two[1].clone(), frame(2, &begin(), &[])];
        assert_eq!(
            feed_limited(&three, LIMITS),
            Err(Violation::TooManySessions(2))
        );
        // Ending one makes room for another, without limit over time.
        let mut churn = two.to_vec();
        for _ in 0..100 {
            churn.push(frame(1, &end(), &[]));
            churn.push(frame(1, &begin(), &[]));
        }
        assert_eq!(feed_limited(&churn, LIMITS), Ok(()));
    }

    #[test]
    fn links_are_counted_over_all_sessions() {
        let mut frames = vec![frame(0, &begin(), &[]), frame(1, &begin(), &[])];
        frames.extend([frame(0, &attach(0), &[]), frame(0, &attach(1), &[])]);
        frames.push(frame(1, &attach(0), &[]));
        assert_eq!(feed_limited(&frames, LIMITS), Ok(()));
        let mut over = frames.clone();
        over.push(frame(1, &attach(1), &[]));
        assert_eq!(feed_limited(&over, LIMITS), Err(Violation::TooManyLinks(3)));
        // A detach frees a handle; an end frees its session's links.
        let detach = Performative::Detach(Detach {
            handle: Handle(1),
            closed: true,
            error: None,
        });
        let mut freed = frames.clone();
        freed.push(frame(0, &detach, &[]));
        freed.push(frame(1, &attach(1), &[]));
        freed.push(frame(0, &end(), &[]));
        freed.push(frame(2, &begin(), &[]));
        freed.push(frame(2, &attach(0), &[]));
        assert_eq!(feed_limited(&freed, LIMITS), Ok(()));
        freed.push(frame(2, &attach(1), &[]));
        assert_eq!(
            feed_limited(&freed, LIMITS),
            Err(Violation::TooManyLinks(3))
        );
    }

    #[test]
    fn an_idle_timeout_below_the_floor_is_refused() {
        for (idle, ok) in [
            (None, true),
            (Some(0), true),
            (Some(1000), true),
            (Some(1), false),
            (Some(999), false),
        ] {
            let r = feed_limited(&[frame(0, &open(idle), &[])], LIMITS);
            assert_eq!(r.is_ok(), ok, "{idle:?}: {r:?}");
        }
    }

    /// A transfer beginning delivery `id` on `handle` (single frame).
    fn delivery(handle: u32, id: u32) -> Performative {
        Performative::Transfer(Transfer {
            handle: Handle(handle),
            delivery_id: Some(id),
            delivery_tag: Some(id.to_be_bytes().to_vec().into()),
            message_format: Some(0),
            settled: None,
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        })
    }

    /// Our flow on our (channel, handle): delivery-count `count`, `credit`.
    fn flow(handle: u32, count: u32, credit: u32) -> Performative {
        Performative::Flow(fe2o3_amqp::types::performatives::Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(Handle(handle)),
            delivery_count: Some(count),
            link_credit: Some(credit),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        })
    }

    /// Our answers: begin on our channel 3 for the peer's 0, attach of `l0` as our handle 9.
    fn our_answers() -> Vec<u8> {
        let mut b = match begin() {
            Performative::Begin(b) => b,
            _ => unreachable!(),
        };
        b.remote_channel = Some(0);
        let mut a = match attach(0) {
            Performative::Attach(a) => a,
            _ => unreachable!(),
        };
        a.handle = Handle(9);
        a.role = fe2o3_amqp::types::definitions::Role::Receiver;
        let mut out = b"AMQP\x00\x01\x00\x00".to_vec();
        out.extend(frame(3, &Performative::Begin(b), &[]));
        out.extend(frame(3, &Performative::Attach(a), &[]));
        out
    }

    const CREDIT: PeerLimits = PeerLimits {
        enforce_credit: true,
        ..LIMITS
    };

    /// A peer's link, our answers fed in `piece`-byte writes, a flow granting `credit`.
    fn credited(credit: u32, piece: usize) -> Frames {
        let mut f = Frames::with_limits(256 * 1024, CREDIT);
        f.feed(b"AMQP\x00\x01\x00\x00").unwrap();
        f.feed(&frame(0, &begin(), &[])).unwrap();
        f.feed(&frame(0, &attach(0), &[])).unwrap();
        let mut ours = our_answers();
        ours.extend(frame(3, &flow(9, 0, credit), &[]));
        for chunk in ours.chunks(piece) {
            f.outgoing(chunk);
        }
        f
    }

    #[test]
    fn a_peer_is_held_to_the_credit_our_flows_granted() {
        for piece in [1, 7, 4096] {
            let mut f = credited(2, piece);
            assert_eq!(f.feed(&frame(0, &delivery(0, 0), &[0x40])), Ok(()));
            assert_eq!(f.feed(&frame(0, &delivery(0, 1), &[0x40])), Ok(()));
            assert_eq!(
                f.feed(&frame(0, &delivery(0, 2), &[0x40])),
                Err(Violation::BeyondCredit),
                "writes of {piece} bytes"
            );
        }
        // A new grant (delivery-count 2, credit 1) allows one more.
        let mut f = credited(2, 4096);
        f.feed(&frame(0, &delivery(0, 0), &[0x40])).unwrap();
        f.feed(&frame(0, &delivery(0, 1), &[0x40])).unwrap();
        f.outgoing(&frame(3, &flow(9, 2, 1), &[]));
        assert_eq!(f.feed(&frame(0, &delivery(0, 2), &[0x40])), Ok(()));
        assert_eq!(
            f.feed(&frame(0, &delivery(0, 3), &[0x40])),
            Err(Violation::BeyondCredit)
        );
    }

    #[test]
    fn a_lower_grant_never_takes_back_credit_already_given() {
        // Transfers the peer sent before it saw a lower grant are within what it was given.
        let mut f = credited(3, 4096);
        f.feed(&frame(0, &delivery(0, 0), &[0x40])).unwrap();
        f.outgoing(&frame(3, &flow(9, 1, 0), &[]));
        assert_eq!(f.feed(&frame(0, &delivery(0, 1), &[0x40])), Ok(()));
        assert_eq!(f.feed(&frame(0, &delivery(0, 2), &[0x40])), Ok(()));
        assert_eq!(
            f.feed(&frame(0, &delivery(0, 3), &[0x40])),
            Err(Violation::BeyondCredit)
        );
    }

    #[test]
    fn a_multi_frame_delivery_uses_one_credit_and_none_is_given_before_a_flow() {
        let mut f = credited(1, 4096);
        f.feed(&frame(0, &transfer(0, true), &[0x40])).unwrap();
        f.feed(&frame(0, &transfer(0, true), &[0x40])).unwrap();
        assert_eq!(f.feed(&frame(0, &transfer(0, false), &[0x40])), Ok(()));
        assert_eq!(
            f.feed(&frame(0, &delivery(0, 1), &[0x40])),
            Err(Violation::BeyondCredit)
        );
        // An empty first frame begins the delivery too.
        let mut f = credited(1, 4096);
        f.feed(&frame(0, &transfer(0, true), &[])).unwrap();
        f.feed(&frame(0, &transfer(0, true), &[0x40])).unwrap();
        assert_eq!(f.feed(&frame(0, &transfer(0, false), &[0x40])), Ok(()));
        // No flow yet: no credit.
        let mut f = Frames::with_limits(256 * 1024, CREDIT);
        f.feed(b"AMQP\x00\x01\x00\x00").unwrap();
        f.feed(&frame(0, &begin(), &[])).unwrap();
        f.feed(&frame(0, &attach(0), &[])).unwrap();
        f.outgoing(&our_answers());
        assert_eq!(
            f.feed(&frame(0, &delivery(0, 0), &[0x40])),
            Err(Violation::BeyondCredit)
        );
    }

    #[test]
    fn a_reattached_link_starts_from_its_new_attach() {
        let mut f = credited(1, 4096);
        f.feed(&frame(0, &delivery(0, 0), &[0x40])).unwrap();
        let detach = Performative::Detach(Detach {
            handle: Handle(0),
            closed: true,
            error: None,
        });
        f.feed(&frame(0, &detach, &[])).unwrap();
        f.outgoing(&frame(3, &detach_ours(), &[]));
        f.feed(&frame(0, &attach(0), &[])).unwrap();
        let mut a = match attach(0) {
            Performative::Attach(a) => a,
            _ => unreachable!(),
        };
        a.handle = Handle(9);
        a.role = fe2o3_amqp::types::definitions::Role::Receiver;
        f.outgoing(&frame(3, &Performative::Attach(a), &[]));
        f.outgoing(&frame(3, &flow(9, 0, 1), &[]));
        assert_eq!(f.feed(&frame(0, &delivery(0, 0), &[0x40])), Ok(()));
    }

    fn detach_ours() -> Performative {
        Performative::Detach(Detach {
            handle: Handle(9),
            closed: true,
            error: None,
        })
    }

    #[test]
    fn a_bridge_refuses_any_transfer_from_a_float() {
        let mut f = Frames::with_limits(256 * 1024, PeerLimits::FOR_A_FLOAT);
        f.feed(b"AMQP\x00\x01\x00\x00").unwrap();
        f.feed(&frame(0, &begin(), &[])).unwrap();
        assert_eq!(
            f.feed(&frame(0, &delivery(0, 0), &[0x40])),
            Err(Violation::UnexpectedTransfer)
        );
    }
}
