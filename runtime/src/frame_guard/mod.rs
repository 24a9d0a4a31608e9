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
//!
//! A legitimate message nests a few levels (the bridge refuses header values deeper than 16),
//! so the limit of 64 only ever stops a hostile or broken peer.

mod credit;
mod frames;
mod scanner;
mod stream;
#[cfg(test)]
mod testutil;

pub use frames::Frames;
pub use scanner::Scanner;
pub use stream::{FrameGuard, Side};

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
