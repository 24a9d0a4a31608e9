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

/// The protocol version this build writes, and the newest one it accepts.
///
/// Receivers reject envelopes with a newer version (they cannot know what changed) and accept
/// every older one; bump this only when an older receiver would misread a message.
pub const PROTOCOL_VERSION: u32 = 1;

/// AMQP 1.0 target address a link attaches to when the node does not name one.
///
/// This is the address a Drawbridge float listens on; a node sets
/// [`PeerLink::target_address`] to something else to deliver to any other AMQP 1.0 endpoint.
pub const DEFAULT_TARGET_ADDRESS: &str = "drawbridge.inbound";

/// The raw protobuf types generated from `proto/drawbridge/control/v1/control.proto`.
///
/// Exposed for tools and non-Rust-facing code that need the exact wire shape; everything else
/// should use the validated types at the crate root. The file is generated, checked in, and kept
/// in step by `tests/bootstrap.rs`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!("gen/drawbridge.control.v1.rs");
}
