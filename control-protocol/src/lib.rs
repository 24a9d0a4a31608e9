//! The Drawbridge control protocol: the messages a node and its bridge exchange over the broker.
//!
//! A node publishes [`ControlCommand`]s (a full [`Snapshot`] of the links it wants, or one
//! [`CreateLink`] / [`DeleteLink`]) to the `drawbridge.control` exchange; the bridge answers
//! with [`Notification`]s ([`SnapshotRequest`], [`LinkStatus`]) on `drawbridge.notify`.
//!
//! On the wire every message is a protobuf envelope (`ControlMessage` / `NotifyMessage`, see
//! `proto/drawbridge/control/v1/control.proto`) carrying a `version`. This crate turns those
//! envelopes into validated plain-Rust types, so the bridge never acts on a half-formed
//! command, and a node written in Rust can use it as its client library. It deliberately
//! depends on nothing TLS-related: legal names are only checked for shape here and parsed
//! properly by `drawbridge-certs` on the bridge side.
//!
//! # Compatibility
//!
//! Nodes and bridges are upgraded one at a time, so each side must cope with a peer one
//! release ahead or behind. The rule:
//!
//! - **The envelope `version` is the major version** ([`PROTOCOL_VERSION`]). It is field 1, a
//!   varint, in every major, so any receiver can read it even when the rest no longer parses.
//! - **Additive changes keep the major**: a new optional field, a new enum value or a new body
//!   (command or notification) variant. Protobuf ignores fields it does not know and defaults
//!   fields that are absent, so an older receiver reads a newer message with the meaning it
//!   knows, and a newer receiver reads an older one with defaults. Field numbers are never
//!   renumbered or reused, and a field's meaning never changes.
//! - **A body this build does not know is "not for me"**: protobuf turns a new oneof member
//!   into an unknown field, leaving the body unset. Decoding then fails with
//!   [`DecodeError::UnknownBody`] (an unset body *and* an envelope field outside this schema),
//!   which a receiver logs once and skips; it is not malformed and stops nothing. An unset
//!   body with nothing unknown is still [`DecodeError::Missing`]. Likewise a node skips a
//!   [`LinkStatus`] whose state it does not know (it decodes as [`DecodeError::Invalid`]).
//! - **A breaking change bumps the major.** A receiver accepts every major up to its own
//!   (older senders are understood) and refuses a newer one with
//!   [`DecodeError::UnsupportedVersion`]. The bridge logs the refusal naming both versions and
//!   the sender ([`ControlCommand::sender_identity`]), counts it
//!   (`drawbridge_bridge_control_refused_total{reason="newer_version"}`) and tells the node
//!   with a [`LinkStatus`] about the control exchange itself (`queue` = the control exchange,
//!   [`LinkState::Down`], `reason` starting with `refused:`), so a node upgraded before its
//!   bridges finds out instead of being silently ignored.
//!
//! ```
//! use drawbridge_control_protocol::{ControlCommand, DeleteLink};
//!
//! let cmd = ControlCommand::DeleteLink(DeleteLink {
//!     node_identity: "O=Bank A, L=London, C=GB".into(),
//!     queue: "drawbridge.peers.bank-b".into(),
//! });
//! let bytes = cmd.encode();
//! assert_eq!(ControlCommand::decode(&bytes).unwrap(), cmd);
//! ```
#![forbid(unsafe_code)]

mod envelope;
mod error;
mod target;
mod types;
mod validate;

pub use envelope::{ControlCommand, Notification, SequencedCommand};
pub use error::DecodeError;
pub use target::{Target, TargetParseError};
pub use types::{
    CreateLink, DeleteLink, LinkState, LinkStatus, PeerLink, Snapshot, SnapshotRequest,
};
pub use validate::MAX_QUEUE_NAME_LEN;

/// The protocol major version this build writes, and the newest one it accepts.
///
/// Receivers reject envelopes with a newer major (they cannot know what changed) and accept
/// every older one; bump this only for a breaking change, one an older receiver would misread.
/// Additive changes (new optional fields, enum values, body variants) keep it: see the crate
/// docs, *Compatibility*.
pub const PROTOCOL_VERSION: u32 = 1;

/// AMQP 1.0 target address a link attaches to when the node does not name one.
///
/// This is the address a Drawbridge float listens on; a node sets
/// [`PeerLink::target_address`] to something else to deliver to any other AMQP 1.0 endpoint.
pub const DEFAULT_TARGET_ADDRESS: &str = "drawbridge.inbound";

/// AMQP 1.0 target address of link canaries: a float publishes what arrives there to a
/// transient queue of its own broker (never to an inbox) and accepts it after the confirm,
/// so a bridge's probe proves the whole path to the float's broker works.
pub const CANARY_ADDRESS: &str = "drawbridge.canary";

/// The raw protobuf types generated from `proto/drawbridge/control/v1/control.proto`.
///
/// Exposed for tools and non-Rust-facing code that need the exact wire shape; everything else
/// should use the validated types at the crate root. The file is generated, checked in, and kept
/// in step by `tests/bootstrap.rs`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!("gen/drawbridge.control.v1.rs");
}

pub mod tunnel;
