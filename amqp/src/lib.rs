//! Drawbridge's AMQP 1.0 engine.
//!
//! Built in the style of quinn-proto: no I/O, no clock, no tasks. Bytes and timer events go
//! in, bytes and events come out; a thin driver (the daemons' own, on tokio) moves them
//! between the state machine and a TLS stream. Why our own and not fe2o3 or ntex-amqp:
//! `docs/architecture.md`, "The AMQP 1.0 engine".
//!
//! - [`codec`]: one decoder that enforces the limits (depth, sizes, counts, string lengths)
//!   while it decodes, and the one-pass encoder.
//! - [`performatives`]: the frames as typed structs.
//! - [`value`]: a pull reader of encoded values under the same limits, for the callers that
//!   interpret message sections.
//! - [`frame`]: cutting a byte stream into frames, bounded by the negotiated maximum.
//! - [`connection`]: the connection, session and link state machines.
//! - [`driver`]: moves bytes between a [`connection::Connection`] and a tokio stream, in the
//!   task that owns it (no engine tasks, no channels: a transfer crosses no task).

pub mod codec;
pub mod connection;
#[cfg(feature = "tokio")]
pub mod driver;
pub mod frame;
pub mod message;
pub mod performatives;
pub mod value;

pub use codec::{DecodeError, Limits};
