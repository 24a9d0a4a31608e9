//! A guard between TLS and the AMQP 1.0 engine that bounds how deeply a peer's encoded values
//! nest, before anything decodes them. Both daemons put it on every peer connection: the
//! float on what a peer sends it, the bridge on what a float answers ([`Side`]).
//!
//! fe2o3-amqp decodes every frame and every message with serde, recursively: one stack frame
//! per level of nested lists, maps, arrays and described types, in performatives
//! (`attach.properties`, a disposition's error `info`), message annotations and bodies alike.
//! A peer that sends a body of 20,000 nested lists overflows the worker's stack, and a stack
//! overflow aborts the process: every peer goes down. A float that answered a bridge's
//! transfer with a `rejected` disposition nested as deep did the same to the bridge, on every
//! reconnect while the peer queue held messages. No typed body choice avoids it (annotations
//! are always decoded as generic values), so the guard scans the byte stream itself,
//! iteratively, as it reads it:
//!
//! - [`Scanner`] walks a stream of AMQP 1.0 encoded values with an explicit stack (no
//!   recursion) and refuses nesting deeper than [`MAX_DEPTH`], unknown constructors, sizes that
//!   overrun their container, element counts that disagree with their container's size (the
//!   decoder reads as many elements as the count says, whatever the size: a list of size 1
//!   that claims one element takes the next value in as its child), empty arrays with an
//!   element constructor and arrays of described or compound elements (serde_amqp reads no
//!   constructor for an empty array, and only the first compound element of an array with
//!   the array's constructor: either way it would read the following bytes otherwise than
//!   the scanner did).
//! - [`Frames`] cuts the connection's bytes into protocol headers and frames, refuses frames
//!   bigger than the announced maximum, scans each performative, and scans transfer payloads
//!   per `(channel, handle)`, so that a message split over many frames is scanned as one
//!   stream (and one link cannot hide another's nesting by interleaving).
//! - [`Frames`] also holds the peer to its share of the float ([`PeerLimits`]): at most
//!   `max_sessions` sessions and `max_links` links open at once on the connection, and no
//!   `open` asking for an idle timeout below `min_idle_timeout` (fe2o3 sends an empty frame
//!   every idle-timeout milliseconds the peer asks for: 1 ms would keep a worker busy). The
//!   limits are announced too (`channel-max`, `handle-max`), so only a peer that ignores them
//!   meets the guard.
//! - [`Frames`] holds a peer to the link credit it was given ([`PeerLimits::enforce_credit`],
//!   the float): fe2o3 queues a link's incoming transfers (up to 65,535 frames) before the link
//!   checks its credit, so a peer that ignores credit could fill that queue while the link
//!   waits for broker confirms. The guard reads the float's own `flow` frames on their way out
//!   ([`Frames::outgoing`]) and ends the connection at the first delivery beyond the credit the
//!   float granted, before fe2o3 queues it.
//! - A bridge expects no transfers from a float ([`PeerLimits::accept_transfers`] off): one
//!   ends the connection.
//! - [`FrameGuard`] is the `AsyncRead + AsyncWrite` wrapper: bytes reach fe2o3 only after they
//!   were scanned; a violation ends the connection with `InvalidData` and one log line.
//!
//! A legitimate message nests a few levels (the bridge refuses header values deeper than 16),
//! so the limit of 64 only ever stops a hostile or broken peer.

use std::{
    collections::{HashMap, HashSet},
    io,
    pin::Pin,
    task::{Context, Poll},
};

use fe2o3_amqp::types::{definitions::Role, performatives::Performative};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Deepest nesting of compound or described values accepted anywhere in a frame or message.
pub const MAX_DEPTH: usize = 64;

/// Most `(channel, handle)` pairs with a transfer in progress on one connection.
const MAX_OPEN_DELIVERIES: usize = 4096;

/// Why a connection's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// Values nest deeper than [`MAX_DEPTH`].
    #[error("encoded values nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A byte that is no AMQP 1.0 format code.
    #[error("invalid AMQP format code 0x{0:02x}")]
    BadConstructor(u8),
    /// A value's size runs past the end of its list, map or array, or a size is too small.
    #[error("a value's size does not fit its container")]
    BadSize,
    /// A list, map or array whose element count is not the number of elements within its
    /// size, or a map with an odd count.
    #[error("a list, map or array's element count does not match its contents")]
    BadCount,
    /// An array whose elements are described types (never sent by Drawbridge or the
    /// performatives).
    #[error("arrays of described types are not accepted")]
    DescribedArray,
    /// An array whose elements are lists, maps or arrays (never sent by Drawbridge or the
    /// performatives; serde_amqp decodes only the first such element correctly).
    #[error("arrays of lists, maps or arrays are not accepted")]
    CompoundArray,
    /// A frame bigger than the maximum announced in `open`.
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Size in the frame header.
        size: u32,
        /// The maximum frame size.
        max: u32,
    },
    /// A frame header that cannot be right (size below 8, data offset below 2 or past the end).
    #[error("malformed frame header")]
    BadFrameHeader,
    /// A performative that does not decode, a payload on anything but a transfer, or a
    /// performative longer than its frame.
    #[error("malformed frame: {0}")]
    BadFrame(&'static str),
    /// Too many transfers in progress at once.
    #[error("more than {MAX_OPEN_DELIVERIES} deliveries in progress on one connection")]
    TooManyDeliveries,
    /// More sessions at once than the connection may have.
    #[error("more than {0} sessions on one connection")]
    TooManySessions(u16),
    /// More links at once than the connection may have.
    #[error("more than {0} links on one connection")]
    TooManyLinks(u32),
    /// A delivery bigger than the link's announced max-message-size. fe2o3 would detach the
    /// link itself, but then waits for the peer's detach without a deadline: a peer that never
    /// answers would park the link for good.
    #[error("a delivery exceeds the max-message-size of {max} bytes")]
    MessageTooLarge {
        /// The announced maximum.
        max: u64,
    },
    /// A delivery on a link with no credit left: the peer ignored the credit it was given.
    #[error("a delivery beyond the link credit granted")]
    BeyondCredit,
    /// A transfer from a peer that sends none (a float, to a bridge).
    #[error("a transfer from a peer that is not expected to send any")]
    UnexpectedTransfer,
    /// An `open` asking for heartbeats more often than we send them.
    #[error("idle timeout of {asked} ms is below the minimum of {min} ms")]
    IdleTimeoutTooShort {
        /// What the peer asked for.
        asked: u32,
        /// `float.min_peer_idle_timeout`.
        min: u32,
    },
}

impl Violation {
    /// The `reason` of `drawbridge_float_connections_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Violation::TooManySessions(_) => "max_sessions",
            Violation::TooManyLinks(_) => "max_links",
            Violation::IdleTimeoutTooShort { .. } => "idle_timeout",
            Violation::MessageTooLarge { .. } => "message_size",
            Violation::BeyondCredit => "credit",
            _ => "frames",
        }
    }
}

/// What one connection may hold of the float (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    /// Sessions open at once.
    pub max_sessions: u16,
    /// Links attached at once, over all sessions.
    pub max_links: u32,
    /// Shortest idle timeout a peer may ask for, in milliseconds (0 = none asked is fine).
    pub min_idle_timeout_ms: u32,
    /// Largest delivery (all its transfer payloads), as announced on attach; 0 = no limit.
    pub max_message_size: u64,
    /// Whether the peer may send transfers at all (a float sends a bridge none).
    pub accept_transfers: bool,
    /// Hold the peer to the credit our own `flow` frames grant (needs [`Frames::outgoing`]
    /// to see them: [`FrameGuard`] does that).
    pub enforce_credit: bool,
}

impl PeerLimits {
    /// What a bridge holds a float to: a float opens no more than the session and the two
    /// links the bridge asked for (a few spare for a float that answers a detach with an
    /// attach), sends no transfers, and may not ask for heartbeats more often than once a
    /// second.
    pub const FOR_A_FLOAT: PeerLimits = PeerLimits {
        max_sessions: 4,
        max_links: 8,
        min_idle_timeout_ms: 1000,
        max_message_size: 0,
        accept_transfers: false,
        enforce_credit: false,
    };
}

impl Default for PeerLimits {
    /// The configuration's defaults.
    fn default() -> Self {
        PeerLimits {
            max_sessions: 8,
            max_links: 32,
            min_idle_timeout_ms: 1000,
            max_message_size: 0,
            accept_transfers: true,
            enforce_credit: false,
        }
    }
}

/// Where an open compound or described value ends.
#[derive(Debug, Clone, Copy)]
enum Open {
    /// A list, map or array ending at this stream offset; arrays give their elements'
    /// constructor, which the elements do not repeat. `left`: elements still to come (the
    /// count says how many; `None` for an array of zero-width elements, which has no bytes
    /// to count).
    Sized {
        end: u64,
        element: Option<u8>,
        left: Option<u64>,
    },
    /// A described value: this many values (descriptor, value) still to come.
    Described { left: u8 },
}

/// What the scanner expects next.
#[derive(Debug, Clone, Copy)]
enum State {
    /// A constructor (or, inside an array of compounds, the implied one).
    Constructor,
    /// This many bytes of primitive data.
    Skip(u64),
    /// The length of variable-width data: `width` bytes, `got` so far.
    VarLen { width: u8, got: u8, acc: u64 },
    /// The size of a compound (constructor `code`), then its count (and, for arrays, the
    /// element constructor).
    Size {
        width: u8,
        got: u8,
        acc: u64,
        code: u8,
    },
    /// The count of a compound ending at `end`.
    Count {
        width: u8,
        got: u8,
        acc: u64,
        end: u64,
        code: u8,
    },
    /// The element constructor of an array of `count` elements ending at `end`.
    Element { end: u64, count: u64 },
}

/// Walks a stream of AMQP 1.0 encoded values incrementally, without recursion.
#[derive(Debug, Clone)]
pub struct Scanner {
    stack: Vec<Open>,
    state: State,
    offset: u64,
    /// Values completed at the top level.
    completed: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            stack: Vec::new(),
            state: State::Constructor,
            offset: 0,
            completed: 0,
        }
    }
}

impl Scanner {
    /// A scanner at the start of a value stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scanner at the start of a value stream that keeps this one's stack allocation.
    fn recycled(self) -> Self {
        let mut stack = self.stack;
        stack.clear();
        Scanner {
            stack,
            ..Scanner::default()
        }
    }

    /// Whether the scanner is between top-level values.
    pub fn at_boundary(&self) -> bool {
        self.stack.is_empty() && matches!(self.state, State::Constructor)
    }

    /// Top-level values completed so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Scan `bytes`, stopping early (and returning how many were consumed) once `stop_after`
    /// top-level values are complete; `None` scans everything.
    pub fn feed(&mut self, bytes: &[u8], stop_after: Option<u64>) -> Result<usize, Violation> {
        let mut i = 0;
        while i < bytes.len() {
            if stop_after.is_some_and(|n| self.completed >= n) {
                break;
            }
            match self.state {
                State::Skip(n) => {
                    let take = n.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.offset += take;
                    if take == n {
                        self.state = State::Constructor;
                        self.finish_value()?;
                    } else {
                        self.state = State::Skip(n - take);
                    }
                }
                _ => {
                    let b = bytes.get(i).copied().ok_or(Violation::BadSize)?;
                    i += 1;
                    self.offset += 1;
                    self.byte(b)?;
                }
            }
        }
        Ok(i)
    }

    fn byte(&mut self, b: u8) -> Result<(), Violation> {
        match self.state {
            State::Constructor => {
                let implied = match self.stack.last() {
                    Some(Open::Sized {
                        element: Some(c), ..
                    }) => Some(*c),
                    _ => None,
                };
                match implied {
                    // Inside an array the byte read is already the element's first byte (of
                    // its data, or of its size or length): act on the implied constructor,
                    // then on the byte.
                    Some(c) => match width_of(c) {
                        Some(n) if n > 0 => {
                            self.check_fits(self.offset - 1 + n)?;
                            if n == 1 {
                                self.finish_value()
                            } else {
                                self.state = State::Skip(n - 1);
                                Ok(())
                            }
                        }
                        _ => {
                            self.constructor(c)?;
                            self.byte(b)
                        }
                    },
                    None => self.constructor(b),
                }
            }
            State::VarLen { width, got, acc } => {
                let acc = (acc << 8) | u64::from(b);
                if got + 1 == width {
                    self.check_fits(self.offset + acc)?;
                    self.state = State::Skip(acc);
                    if acc == 0 {
                        self.state = State::Constructor;
                        self.finish_value()?;
                    }
                } else {
                    self.state = State::VarLen {
                        width,
                        got: got + 1,
                        acc,
                    };
                }
                Ok(())
            }
            State::Size {
                width,
                got,
                acc,
                code,
            } => {
                let acc = (acc << 8) | u64::from(b);
                if got + 1 < width {
                    self.state = State::Size {
                        width,
                        got: got + 1,
                        acc,
                        code,
                    };
                    return Ok(());
                }
                // The size counts the count field (and an array's constructor, which an empty
                // array may leave out).
                if acc < u64::from(width) {
                    return Err(Violation::BadSize);
                }
                let end = self.offset + acc;
                self.check_fits(end)?;
                self.state = State::Count {
                    width,
                    got: 0,
                    acc: 0,
                    end,
                    code,
                };
                Ok(())
            }
            State::Count {
                width,
                got,
                acc,
                end,
                code,
            } => {
                let count = (acc << 8) | u64::from(b);
                if got + 1 < width {
                    self.state = State::Count {
                        width,
                        got: got + 1,
                        acc: count,
                        end,
                        code,
                    };
                    return Ok(());
                }
                // A map's count is of keys and values: an odd one makes the decoder read
                // past its end (and, with overflow checks, panic in serde_amqp).
                if matches!(code, 0xc1 | 0xd1) && count % 2 != 0 {
                    return Err(Violation::BadCount);
                }
                if is_array(code) && count > 0 {
                    if self.offset == end {
                        return Err(Violation::BadSize);
                    }
                    self.state = State::Element { end, count };
                    Ok(())
                } else {
                    // An empty array has no element constructor: serde_amqp reads none (and
                    // fe2o3 writes none), so a constructor here would be read as the next
                    // value.
                    if is_array(code) && self.offset != end {
                        return Err(Violation::BadCount);
                    }
                    self.push(Open::Sized {
                        end,
                        element: None,
                        left: Some(count),
                    })?;
                    self.opened()
                }
            }
            State::Element { end, count } => match b {
                0x00 => Err(Violation::DescribedArray),
                // serde_amqp keeps one element constructor for the whole decoder and a list,
                // map or array element clears it: from the second element on it would read
                // each element's size byte as a constructor.
                0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0 => Err(Violation::CompoundArray),
                _ if width_of(b) == Some(0) => {
                    // Zero-width elements (null, true, false, empty list): no bytes at all.
                    if self.offset != end {
                        return Err(Violation::BadCount);
                    }
                    self.push(Open::Sized {
                        end,
                        element: None,
                        left: None,
                    })?;
                    self.opened()
                }
                0xa0 | 0xa1 | 0xa3 | 0xb0 | 0xb1 | 0xb3 => self.array_of(b, end, count),
                _ if width_of(b).is_some() => self.array_of(b, end, count),
                _ => Err(Violation::BadConstructor(b)),
            },
            // `feed` consumes skipped bytes itself; never reached.
            State::Skip(_) => Err(Violation::BadSize),
        }
    }

    fn constructor(&mut self, c: u8) -> Result<(), Violation> {
        match c {
            0x00 => {
                self.push(Open::Described { left: 2 })?;
                Ok(())
            }
            0xa0 | 0xa1 | 0xa3 => {
                self.state = State::VarLen {
                    width: 1,
                    got: 0,
                    acc: 0,
                };
                Ok(())
            }
            0xb0 | 0xb1 | 0xb3 => {
                self.state = State::VarLen {
                    width: 4,
                    got: 0,
                    acc: 0,
                };
                Ok(())
            }
            0xc0 | 0xc1 | 0xe0 => {
                self.state = State::Size {
                    width: 1,
                    got: 0,
                    acc: 0,
                    code: c,
                };
                Ok(())
            }
            0xd0 | 0xd1 | 0xf0 => {
                self.state = State::Size {
                    width: 4,
                    got: 0,
                    acc: 0,
                    code: c,
                };
                Ok(())
            }
            _ => match width_of(c) {
                Some(0) => self.finish_value(),
                Some(n) => {
                    self.check_fits(self.offset + n)?;
                    self.state = State::Skip(n);
                    Ok(())
                }
                None => Err(Violation::BadConstructor(c)),
            },
        }
    }

    /// An array of `count` elements with constructor `element`, ending at `end`: each element
    /// is walked (and counted), so that the count agrees with the size.
    fn array_of(&mut self, element: u8, end: u64, count: u64) -> Result<(), Violation> {
        self.push(Open::Sized {
            end,
            element: Some(element),
            left: Some(count),
        })?;
        self.opened()
    }

    /// A list, map or array was just pushed: close it at once if it is empty.
    fn opened(&mut self) -> Result<(), Violation> {
        self.state = State::Constructor;
        if let Some(Open::Sized { end, left, .. }) = self.stack.last() {
            if self.offset == *end {
                if left.is_some_and(|l| l != 0) {
                    return Err(Violation::BadCount);
                }
                self.stack.pop();
                return self.finish_value();
            }
        }
        Ok(())
    }

    fn push(&mut self, open: Open) -> Result<(), Violation> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Violation::TooDeep);
        }
        self.stack.push(open);
        Ok(())
    }

    /// A new compound ending at `end` must end within every container it is in.
    fn check_fits(&self, end: u64) -> Result<(), Violation> {
        for open in self.stack.iter().rev() {
            if let Open::Sized { end: outer, .. } = open {
                return if end <= *outer {
                    Ok(())
                } else {
                    Err(Violation::BadSize)
                };
            }
        }
        Ok(())
    }

    /// A value just ended at `self.offset`: close every container it completes.
    fn finish_value(&mut self) -> Result<(), Violation> {
        loop {
            match self.stack.last_mut() {
                None => {
                    self.completed += 1;
                    return Ok(());
                }
                Some(Open::Described { left }) => {
                    *left -= 1;
                    if *left > 0 {
                        return Ok(());
                    }
                    self.stack.pop();
                }
                Some(Open::Sized { end, left, .. }) => {
                    // One more element of this container.
                    if let Some(l) = left {
                        *l = l.checked_sub(1).ok_or(Violation::BadCount)?;
                    }
                    if self.offset < *end {
                        return Ok(());
                    }
                    if self.offset > *end {
                        return Err(Violation::BadSize);
                    }
                    if left.is_some_and(|l| l != 0) {
                        return Err(Violation::BadCount);
                    }
                    self.stack.pop();
                }
            }
        }
    }
}

/// Whether `code` is an array constructor.
fn is_array(code: u8) -> bool {
    matches!(code, 0xe0 | 0xf0)
}

/// Bytes of data after a fixed-width constructor; `None` for anything else.
fn width_of(c: u8) -> Option<u64> {
    match c {
        0x40..=0x45 => Some(0),
        0x50..=0x56 => Some(1),
        0x60 | 0x61 => Some(2),
        0x70..=0x74 => Some(4),
        0x80..=0x84 => Some(8),
        0x94 | 0x98 => Some(16),
        _ => None,
    }
}

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

/// Link credit as our own frames grant it, and what the peer used of it.
///
/// Channels and handles are each endpoint's own numbers: the peer sends on its channel and
/// handle, our flows name ours. Our `begin` answers the peer's (`remote-channel`), and our
/// `attach` answers the peer's of the same link name, which is how a flow is matched to the
/// peer's link. Only a bound is kept, never a decision fe2o3 makes: the limit only grows
/// (a flow that lowers credit could cross transfers already sent), so a peer is never held to
/// less than the most credit it was ever given.
#[derive(Debug, Default)]
struct Credit {
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
    out: Outgoing,
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
    fn peer_attach(&mut self, channel: u16, a: &fe2o3_amqp::types::performatives::Attach) {
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

    fn peer_detach(&mut self, channel: u16, handle: u32) {
        if let Some(old) = self.links.remove(&(channel, handle)) {
            self.by_name.remove(&(channel, old.name));
        }
    }

    fn peer_end(&mut self, channel: u16) {
        self.links.retain(|(c, _), _| *c != channel);
        self.by_name.retain(|(c, _), _| *c != channel);
    }

    /// The peer begins a delivery on (channel, handle): within the credit granted?
    fn delivery(&mut self, channel: u16, handle: u32) -> Result<(), Violation> {
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
    fn ours(&mut self, channel: u16, p: &Performative) {
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
struct Outgoing {
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
    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u16, Performative)) {
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

/// Which end of a peer link a [`FrameGuard`] protects: names its metric and its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The float, guarding what a peer (a bridge, or anyone with a member certificate) sends.
    Float,
    /// The bridge, guarding what a float answers.
    Bridge,
}

impl Side {
    fn refused(self, peer: &str, v: &Violation) {
        match self {
            Side::Float => {
                tracing::warn!(peer = %peer, reason = %v, "connection refused: malformed or hostile AMQP frames");
                metrics::counter!("drawbridge_float_connections_refused_total", "reason" => v.label())
                    .increment(1);
            }
            Side::Bridge => {
                tracing::warn!(target_addr = %peer, reason = %v, "float connection closed: malformed or hostile AMQP frames");
                metrics::counter!("drawbridge_bridge_peer_frames_refused_total", "reason" => v.label())
                    .increment(1);
            }
        }
    }
}

/// The stream fe2o3 reads from: scans every byte before handing it on (see the module
/// docs). Writes pass through untouched (read, with [`PeerLimits::enforce_credit`], for the
/// credit they grant).
#[derive(Debug)]
pub struct FrameGuard<S> {
    inner: S,
    frames: Frames,
    refused: Option<Violation>,
    /// Who is on the other end, for the log line.
    peer: String,
    side: Side,
}

impl<S> FrameGuard<S> {
    /// Guard `inner`, whose peer (`peer`, for the log line) may send frames of up to
    /// `max_frame` bytes and is held to `limits`.
    pub fn new(inner: S, max_frame: u32, limits: PeerLimits, peer: String, side: Side) -> Self {
        FrameGuard {
            inner,
            frames: Frames::with_limits(max_frame, limits),
            refused: None,
            peer,
            side,
        }
    }

    /// Why the guard refused the stream, if it did.
    pub fn refused(&self) -> Option<&Violation> {
        self.refused.as_ref()
    }

    /// The guarded stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(v) = &this.refused {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, v.clone())));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = buf.filled().get(before..).unwrap_or_default();
                if let Err(v) = this.frames.feed(fresh) {
                    // Nothing of this read reaches the decoder.
                    buf.set_filled(before);
                    this.side.refused(&this.peer, &v);
                    this.refused = Some(v.clone());
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, v)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.frames.outgoing(buf.get(..n).unwrap_or_default());
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let take = n.min(b.len());
                this.frames.outgoing(b.get(..take).unwrap_or_default());
                n -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::{
        definitions::{Handle, SequenceNo},
        messaging::{annotations::OwnedKey, Body, Message, MessageAnnotations, Properties},
        performatives::{Attach, Detach, Transfer},
        primitives::{Array, OrderedMap, Symbol, Value},
    };
    use serde_amqp::to_vec;

    use super::*;

    /// `depth` lists nested in each other, built iteratively (list32, one element each,
    /// around an empty list8).
    fn nested_lists(depth: usize) -> Vec<u8> {
        let mut inner = vec![0xc0, 1, 0];
        for _ in 0..depth.saturating_sub(1) {
            let mut next = vec![0xd0];
            next.extend_from_slice(&(inner.len() as u32 + 4).to_be_bytes());
            next.extend_from_slice(&1u32.to_be_bytes());
            next.extend_from_slice(&inner);
            inner = next;
        }
        inner
    }

    fn scan(bytes: &[u8]) -> Result<u64, Violation> {
        let mut s = Scanner::new();
        s.feed(bytes, None)?;
        assert!(s.at_boundary(), "stopped inside a value");
        Ok(s.completed())
    }

    /// The same result whatever the stream is cut into.
    fn scan_in_pieces(bytes: &[u8], piece: usize) -> Result<u64, Violation> {
        let mut s = Scanner::new();
        for chunk in bytes.chunks(piece) {
            s.feed(chunk, None)?;
        }
        Ok(s.completed())
    }

    fn a_message() -> Vec<u8> {
        let mut nested = Value::Int(1);
        for _ in 0..20 {
            nested = Value::List(vec![nested, Value::String("x".into())]);
        }
        let mut map = OrderedMap::new();
        map.insert(Value::String("k".into()), nested);
        map.insert(
            Value::Symbol(Symbol::from("arr")),
            Value::Array(Array::from(vec![Value::Int(1), Value::Int(2)])),
        );
        let mut ann = OrderedMap::new();
        ann.insert(OwnedKey::from("x-opt-h"), Value::Map(map));
        let m = Message::builder()
            .properties(Properties {
                message_id: Some(fe2o3_amqp::types::messaging::MessageId::String(
                    "m-1".into(),
                )),
                ..Default::default()
            })
            .message_annotations(MessageAnnotations(ann))
            .body(Body::<Value>::Value(
                fe2o3_amqp::types::messaging::AmqpValue(Value::Binary(vec![7; 300].into())),
            ))
            .build();
        to_vec(&fe2o3_amqp::types::messaging::message::__private::Serializable(m)).unwrap()
    }

    #[test]
    fn a_real_message_scans_whole_and_in_any_pieces() {
        let bytes = a_message();
        let sections = scan(&bytes).unwrap();
        assert_eq!(sections, 3, "properties, annotations, body");
        for piece in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(
                scan_in_pieces(&bytes, piece),
                Ok(sections),
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        assert_eq!(scan(&nested_lists(MAX_DEPTH)), Ok(1));
        assert_eq!(scan(&nested_lists(MAX_DEPTH + 1)), Err(Violation::TooDeep));
        // What aborted the process: 20,000 levels. Refused at level 65, with a tiny stack.
        let deep = nested_lists(20_000);
        assert_eq!(scan(&deep), Err(Violation::TooDeep));
        assert_eq!(scan_in_pieces(&deep, 5), Err(Violation::TooDeep));
        // Described values count as a level too.
        let mut described = [0x00, 0x53, 0x70].repeat(MAX_DEPTH + 1);
        described.push(0x40);
        assert_eq!(scan(&described), Err(Violation::TooDeep));
    }

    // Found by fuzzing (fuzz/, target float_message, the re-scan of the decoded message):
    // serde_amqp decodes arrays of compounds and empty arrays with a constructor otherwise
    // than they are written, so the bytes after them are read out of step with the scanner.
    #[test]
    fn arrays_of_compounds_and_described_arrays_are_refused() {
        // array8 of two list8 elements, each holding one list0.
        let arr = [0xe0, 8, 2, 0xc0, 2, 1, 0x45, 2, 1, 0x45];
        assert_eq!(scan(&arr), Err(Violation::CompoundArray));
        // array8 of arrays of ints.
        let arr2 = [0xe0, 7, 1, 0xe0, 4, 2, 0x54, 1, 2];
        assert_eq!(scan(&arr2), Err(Violation::CompoundArray));
        // An empty array: without a constructor (as fe2o3 writes it) it passes, with one it
        // is refused (serde_amqp would read the constructor as the next value).
        assert_eq!(scan(&[0xe0, 1, 0]), Ok(1));
        assert_eq!(to_vec(&Array::<i32>::from(vec![])).unwrap(), [0xe0, 1, 0]);
        assert_eq!(scan(&[0xe0, 2, 0, 0x54]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xe0, 2, 0, 0xc0]), Err(Violation::BadCount));
        // A non-empty array needs its constructor.
        assert_eq!(scan(&[0xe0, 1, 1]), Err(Violation::BadSize));
        // array of symbols, walked symbol by symbol.
        let syms = to_vec(&Array::from(vec![Symbol::from("a"), Symbol::from("bc")])).unwrap();
        assert_eq!(scan(&syms), Ok(1));
        assert_eq!(
            scan(&[0xe0, 4, 1, 0x00, 0x53, 0x70]),
            Err(Violation::DescribedArray)
        );
    }

    #[test]
    fn sizes_must_fit_and_constructors_must_exist() {
        // list8 claiming 5 bytes inside a list8 of 3.
        assert_eq!(scan(&[0xc0, 3, 1, 0xc0, 5, 1]), Err(Violation::BadSize));
        // A string running past its list.
        assert_eq!(scan(&[0xc0, 3, 1, 0xa1, 9, b'x']), Err(Violation::BadSize));
        assert_eq!(scan(&[0xc0, 0]), Err(Violation::BadSize));
        assert_eq!(scan(&[0x30]), Err(Violation::BadConstructor(0x30)));
    }

    // Found by fuzzing (fuzz/, target float_message): serde_amqp reads as many elements as a
    // list's count says and ignores its size, so a list that is small by its size but claims
    // an element takes the next value in as its child. A run of such lists, flat to a scanner
    // that trusted the size, decodes as deep nesting: past the depth limit, and with enough of
    // them (3 bytes a level) past the end of a worker's stack.
    #[test]
    fn a_count_that_disagrees_with_the_size_is_refused() {
        let mut flat_to_sizes = Vec::new();
        for _ in 0..100 {
            flat_to_sizes.extend_from_slice(&[0xc0, 1, 1]);
        }
        flat_to_sizes.push(0x40);
        let deep: Value = serde_amqp::from_slice(&flat_to_sizes).unwrap();
        let mut depth = 0;
        let mut v = &deep;
        while let Value::List(items) = v {
            depth += 1;
            v = &items[0];
        }
        assert_eq!(depth, 100, "the decoder nests them");
        assert_eq!(scan(&flat_to_sizes), Err(Violation::BadCount));
        assert_eq!(scan_in_pieces(&flat_to_sizes, 1), Err(Violation::BadCount));

        // More elements than the count, and fewer.
        assert_eq!(scan(&[0xc0, 3, 1, 0x40, 0x40]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc0, 2, 2, 0x40]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc0, 1, 1, 0x40]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc0, 3, 2, 0x40, 0x40]), Ok(1));
        // The same in a list32 and in a map.
        assert_eq!(
            scan(&[0xd0, 0, 0, 0, 5, 0, 0, 0, 2, 0x40]),
            Err(Violation::BadCount)
        );
        assert_eq!(scan(&[0xc1, 1, 2]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc1, 3, 2, 0x40, 0x40]), Ok(1));
    }

    // Found by fuzzing (fuzz/, target float_message): a map whose count is odd makes
    // serde_amqp subtract past zero (a panic where overflow checks are on, reading past the
    // map's end where they are off).
    #[test]
    fn a_map_with_an_odd_count_is_refused() {
        assert_eq!(
            scan(&[0xc1, 4, 3, 0x40, 0x40, 0x40]),
            Err(Violation::BadCount)
        );
        assert_eq!(
            scan(&[0xd1, 0, 0, 0, 7, 0, 0, 0, 3, 0x40, 0x40, 0x40]),
            Err(Violation::BadCount)
        );
        assert_eq!(scan(&[0xc1, 1, 0]), Ok(1));
    }

    #[test]
    fn arrays_of_primitives_are_walked_element_by_element() {
        // Three smallints.
        assert_eq!(scan(&[0xe0, 5, 3, 0x54, 1, 2, 3]), Ok(1));
        assert_eq!(scan(&[0xe0, 5, 2, 0x54, 1, 2, 3]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xe0, 5, 4, 0x54, 1, 2, 3]), Err(Violation::BadCount));
        // An element running past the array (two-byte ushorts, three bytes).
        assert_eq!(scan(&[0xe0, 5, 2, 0x60, 0, 1, 2]), Err(Violation::BadSize));
        // Two str8 elements, each with its own length.
        let strs = [0xe0, 7, 2, 0xa1, 2, b'a', b'b', 1, b'c'];
        assert_eq!(scan(&strs), Ok(1));
        assert_eq!(scan_in_pieces(&strs, 1), Ok(1));
        let mut three = strs;
        three[2] = 3;
        assert_eq!(scan(&three), Err(Violation::BadCount));
        // Zero-width elements have no bytes: none may follow.
        assert_eq!(scan(&[0xe0, 2, 5, 0x40]), Ok(1));
        assert_eq!(scan(&[0xe0, 3, 5, 0x40, 0x40]), Err(Violation::BadCount));
        // Whatever serde_amqp encodes passes.
        let ints = to_vec(&Array::from(vec![1i32, -2, 300_000])).unwrap();
        assert_eq!(scan(&ints), Ok(1));
        let longs = to_vec(&Array::from(vec![1u64 << 40, 7])).unwrap();
        assert_eq!(scan(&longs), Ok(1));
        for encoded in [
            to_vec(&Array::from(vec![true, false, true])).unwrap(),
            to_vec(&Array::from(vec![
                "a".to_string(),
                "bc".into(),
                String::new(),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![
                Symbol::from("x"),
                Symbol::from("y".repeat(300)),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![
                serde_amqp::primitives::Binary::from(vec![1u8, 2]),
                serde_amqp::primitives::Binary::from(vec![]),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![
                serde_amqp::primitives::Timestamp::from_milliseconds(5),
                serde_amqp::primitives::Timestamp::from_milliseconds(-1),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![1.5f64, -0.0])).unwrap(),
            to_vec(&Array::from(vec!['a', 'é'])).unwrap(),
            to_vec(&Value::Array(Array::from(vec![
                Value::Ubyte(1),
                Value::Ubyte(2),
            ])))
            .unwrap(),
        ] {
            assert_eq!(scan(&encoded), Ok(1), "{encoded:x?}");
        }
    }

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
