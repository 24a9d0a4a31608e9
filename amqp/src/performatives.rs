//! The performatives (part 2 of the specification) and the SASL frames (part 5), as typed
//! structs: decoded from a frame with the limits of [`crate::codec`], encoded in one pass.
//! Fields the engine does not interpret are kept as the peer's validated bytes ([`Raw`]).

use bytes::Bytes;

use crate::codec::{Buf, DecodeError, Fields, Limits, Raw, Reader, Writer};

/// Descriptor codes (AMQP 1.0, the `amqp:*:list` numbers).
pub mod descriptor {
    /// open
    pub const OPEN: u64 = 0x10;
    /// begin
    pub const BEGIN: u64 = 0x11;
    /// attach
    pub const ATTACH: u64 = 0x12;
    /// flow
    pub const FLOW: u64 = 0x13;
    /// transfer
    pub const TRANSFER: u64 = 0x14;
    /// disposition
    pub const DISPOSITION: u64 = 0x15;
    /// detach
    pub const DETACH: u64 = 0x16;
    /// end
    pub const END: u64 = 0x17;
    /// close
    pub const CLOSE: u64 = 0x18;
    /// error
    pub const ERROR: u64 = 0x1d;
    /// received
    pub const RECEIVED: u64 = 0x23;
    /// accepted
    pub const ACCEPTED: u64 = 0x24;
    /// rejected
    pub const REJECTED: u64 = 0x25;
    /// released
    pub const RELEASED: u64 = 0x26;
    /// modified
    pub const MODIFIED: u64 = 0x27;
    /// source
    pub const SOURCE: u64 = 0x28;
    /// target
    pub const TARGET: u64 = 0x29;
    /// sasl-mechanisms
    pub const SASL_MECHANISMS: u64 = 0x40;
    /// sasl-init
    pub const SASL_INIT: u64 = 0x41;
    /// sasl-outcome
    pub const SASL_OUTCOME: u64 = 0x44;
}

/// An AMQP error (condition, description, info).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Error {
    /// e.g. `amqp:not-allowed`.
    pub condition: Bytes,
    /// Free text (cut to [`Limits::max_string`] bytes, see [`Fields::text`]).
    pub description: Option<String>,
    /// The info map, as sent.
    pub info: Option<Raw>,
}

impl Error {
    /// An error with a condition and a description.
    pub fn new(condition: &'static str, description: impl Into<String>) -> Self {
        Error {
            condition: Bytes::from_static(condition.as_bytes()),
            description: Some(description.into()),
            info: None,
        }
    }

    fn decode(mut f: Fields<'_>) -> Result<Self, DecodeError> {
        let e = Error {
            condition: f
                .symbol("error.condition")?
                .ok_or(DecodeError::Missing("error.condition"))?,
            description: f.text("error.description")?,
            info: f.raw()?,
        };
        f.finish()?;
        Ok(e)
    }

    fn decode_field(f: &mut Fields<'_>) -> Result<Option<Self>, DecodeError> {
        match f.described()? {
            None => Ok(None),
            Some((descriptor::ERROR, inner)) => Ok(Some(Error::decode(inner)?)),
            Some((d, _)) => Err(DecodeError::Descriptor(d)),
        }
    }

    fn encode<B: Buf>(&self, w: &mut Writer<'_, B>) {
        let mut m = w.begin_described_list(descriptor::ERROR);
        w.field(&mut m, Some(&self.condition), |w, v| w.symbol(v));
        w.field(&mut m, self.description.as_deref(), |w, v| w.string(v));
        w.field(&mut m, self.info.as_ref(), |w, v| w.raw(&v.0));
        w.end_list(m);
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.condition))?;
        if let Some(d) = &self.description {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// The outcome of a delivery (the delivery states a disposition carries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted.
    Accepted,
    /// Rejected, with the receiver's error.
    Rejected(Option<Error>),
    /// Released.
    Released,
    /// Modified (delivery-failed, undeliverable-here; annotations kept as sent).
    Modified {
        /// delivery-failed
        delivery_failed: bool,
        /// undeliverable-here
        undeliverable_here: bool,
    },
    /// Received (a non-terminal state; only meaningful for resumption, which we do not do).
    Received,
}

impl Outcome {
    fn decode_field(f: &mut Fields<'_>) -> Result<Option<Self>, DecodeError> {
        let Some((d, mut inner)) = f.described()? else {
            return Ok(None);
        };
        let o = match d {
            descriptor::ACCEPTED => Outcome::Accepted,
            descriptor::RELEASED => Outcome::Released,
            descriptor::RECEIVED => Outcome::Received,
            descriptor::REJECTED => Outcome::Rejected(Error::decode_field(&mut inner)?),
            descriptor::MODIFIED => Outcome::Modified {
                delivery_failed: inner.boolean("modified.delivery-failed")?.unwrap_or(false),
                undeliverable_here: inner
                    .boolean("modified.undeliverable-here")?
                    .unwrap_or(false),
            },
            other => return Err(DecodeError::Descriptor(other)),
        };
        inner.finish()?;
        Ok(Some(o))
    }

    fn encode<B: Buf>(&self, w: &mut Writer<'_, B>) {
        match self {
            Outcome::Accepted => {
                let m = w.begin_described_list(descriptor::ACCEPTED);
                w.end_list(m);
            }
            Outcome::Released => {
                let m = w.begin_described_list(descriptor::RELEASED);
                w.end_list(m);
            }
            Outcome::Received => {
                let m = w.begin_described_list(descriptor::RECEIVED);
                w.end_list(m);
            }
            Outcome::Rejected(e) => {
                let mut m = w.begin_described_list(descriptor::REJECTED);
                w.field(&mut m, e.as_ref(), |w, e| e.encode(w));
                w.end_list(m);
            }
            Outcome::Modified {
                delivery_failed,
                undeliverable_here,
            } => {
                let mut m = w.begin_described_list(descriptor::MODIFIED);
                w.field(&mut m, Some(*delivery_failed), |w, v| w.boolean(v));
                w.field(&mut m, Some(*undeliverable_here), |w, v| w.boolean(v));
                w.end_list(m);
            }
        }
    }
}

/// A link's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends transfers (`false` on the wire).
    Sender,
    /// Receives them (`true`).
    Receiver,
}

/// A performative and, for a transfer, its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Performative {
    Open(Open),
    Begin(Begin),
    Attach(Attach),
    Flow(Flow),
    Transfer(Transfer),
    Disposition(Disposition),
    Detach(Detach),
    End(Option<Error>),
    Close(Option<Error>),
}

/// open
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Open {
    pub container_id: String,
    pub hostname: Option<String>,
    pub max_frame_size: u32,
    pub channel_max: u16,
    pub idle_timeout_ms: Option<u32>,
    pub properties: Option<Raw>,
}

/// begin
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Begin {
    pub remote_channel: Option<u16>,
    pub next_outgoing_id: u32,
    pub incoming_window: u32,
    pub outgoing_window: u32,
    pub handle_max: u32,
    pub properties: Option<Raw>,
}

/// attach
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Attach {
    pub name: String,
    pub handle: u32,
    pub role: Role,
    /// 0 unsettled, 1 settled, 2 mixed.
    pub snd_settle_mode: u8,
    /// 0 first, 1 second.
    pub rcv_settle_mode: u8,
    /// The source's address (its other fields are not used by Drawbridge).
    pub source: Option<Terminus>,
    /// The target's address.
    pub target: Option<Terminus>,
    pub initial_delivery_count: Option<u32>,
    pub max_message_size: Option<u64>,
    pub properties: Option<Raw>,
}

/// A source or a target: the address, the rest as sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Terminus {
    /// The address.
    pub address: Option<String>,
}

/// flow
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Flow {
    pub next_incoming_id: Option<u32>,
    pub incoming_window: u32,
    pub next_outgoing_id: u32,
    pub outgoing_window: u32,
    pub handle: Option<u32>,
    pub delivery_count: Option<u32>,
    pub link_credit: Option<u32>,
    pub available: Option<u32>,
    pub drain: bool,
    pub echo: bool,
}

/// transfer (its payload travels beside it, in [`Frame::payload`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Transfer {
    pub handle: u32,
    pub delivery_id: Option<u32>,
    pub delivery_tag: Option<Bytes>,
    pub message_format: Option<u32>,
    pub settled: Option<bool>,
    pub more: bool,
    pub rcv_settle_mode: Option<u8>,
    pub aborted: bool,
    pub batchable: bool,
}

/// disposition
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Disposition {
    pub role: Role,
    pub first: u32,
    pub last: Option<u32>,
    pub settled: bool,
    pub state: Option<Outcome>,
    pub batchable: bool,
}

/// detach
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Detach {
    pub handle: u32,
    pub closed: bool,
    pub error: Option<Error>,
}

/// Longest delivery tag (the specification's limit).
pub const MAX_DELIVERY_TAG: usize = 32;

fn terminus(f: &mut Fields<'_>, want: u64) -> Result<Option<Terminus>, DecodeError> {
    match f.described()? {
        None => Ok(None),
        Some((d, mut inner)) if d == want => {
            let address = inner.string("terminus.address")?;
            inner.finish()?;
            Ok(Some(Terminus { address }))
        }
        Some((d, _)) => Err(DecodeError::Descriptor(d)),
    }
}

impl Performative {
    /// Decodes one performative (the frame body up to the payload): returns it and how many
    /// bytes it took (a transfer's payload follows).
    pub fn decode(body: &[u8], limits: Limits) -> Result<(Performative, usize), DecodeError> {
        let mut r = Reader::new(body, limits);
        let d = r.descriptor()?;
        let mut f = r.fields()?;
        let p = match d {
            descriptor::OPEN => Performative::Open(Open {
                container_id: f
                    .string("open.container-id")?
                    .ok_or(DecodeError::Missing("open.container-id"))?,
                hostname: f.string("open.hostname")?,
                max_frame_size: f.uint("open.max-frame-size")?.unwrap_or(u32::MAX),
                channel_max: f.ushort("open.channel-max")?.unwrap_or(u16::MAX),
                idle_timeout_ms: f.uint("open.idle-time-out")?,
                properties: {
                    // outgoing-locales, incoming-locales, offered- and desired-capabilities.
                    for _ in 0..4 {
                        f.skip()?;
                    }
                    f.raw()?
                },
            }),
            descriptor::BEGIN => Performative::Begin(Begin {
                remote_channel: f.ushort("begin.remote-channel")?,
                next_outgoing_id: f
                    .uint("begin.next-outgoing-id")?
                    .ok_or(DecodeError::Missing("begin.next-outgoing-id"))?,
                incoming_window: f
                    .uint("begin.incoming-window")?
                    .ok_or(DecodeError::Missing("begin.incoming-window"))?,
                outgoing_window: f
                    .uint("begin.outgoing-window")?
                    .ok_or(DecodeError::Missing("begin.outgoing-window"))?,
                handle_max: f.uint("begin.handle-max")?.unwrap_or(u32::MAX),
                properties: {
                    f.skip()?;
                    f.skip()?;
                    f.raw()?
                },
            }),
            descriptor::ATTACH => Performative::Attach(Attach {
                name: f
                    .string("attach.name")?
                    .ok_or(DecodeError::Missing("attach.name"))?,
                handle: f
                    .uint("attach.handle")?
                    .ok_or(DecodeError::Missing("attach.handle"))?,
                role: match f
                    .boolean("attach.role")?
                    .ok_or(DecodeError::Missing("attach.role"))?
                {
                    false => Role::Sender,
                    true => Role::Receiver,
                },
                snd_settle_mode: f.ubyte("attach.snd-settle-mode")?.unwrap_or(2),
                rcv_settle_mode: f.ubyte("attach.rcv-settle-mode")?.unwrap_or(0),
                source: terminus(&mut f, descriptor::SOURCE)?,
                target: terminus(&mut f, descriptor::TARGET)?,
                initial_delivery_count: {
                    f.skip()?; // unsettled
                    f.skip()?; // incomplete-unsettled
                    f.uint("attach.initial-delivery-count")?
                },
                max_message_size: f.ulong("attach.max-message-size")?,
                properties: {
                    f.skip()?;
                    f.skip()?;
                    f.raw()?
                },
            }),
            descriptor::FLOW => Performative::Flow(Flow {
                next_incoming_id: f.uint("flow.next-incoming-id")?,
                incoming_window: f
                    .uint("flow.incoming-window")?
                    .ok_or(DecodeError::Missing("flow.incoming-window"))?,
                next_outgoing_id: f
                    .uint("flow.next-outgoing-id")?
                    .ok_or(DecodeError::Missing("flow.next-outgoing-id"))?,
                outgoing_window: f
                    .uint("flow.outgoing-window")?
                    .ok_or(DecodeError::Missing("flow.outgoing-window"))?,
                handle: f.uint("flow.handle")?,
                delivery_count: f.uint("flow.delivery-count")?,
                link_credit: f.uint("flow.link-credit")?,
                available: f.uint("flow.available")?,
                drain: f.boolean("flow.drain")?.unwrap_or(false),
                echo: f.boolean("flow.echo")?.unwrap_or(false),
            }),
            descriptor::TRANSFER => Performative::Transfer(Transfer {
                handle: f
                    .uint("transfer.handle")?
                    .ok_or(DecodeError::Missing("transfer.handle"))?,
                delivery_id: f.uint("transfer.delivery-id")?,
                delivery_tag: match f.binary("transfer.delivery-tag")? {
                    Some(t) if t.len() > MAX_DELIVERY_TAG => {
                        return Err(DecodeError::TooLong {
                            field: "transfer.delivery-tag",
                            len: t.len(),
                            max: MAX_DELIVERY_TAG,
                        })
                    }
                    t => t.map(Bytes::copy_from_slice),
                },
                message_format: f.uint("transfer.message-format")?,
                settled: f.boolean("transfer.settled")?,
                more: f.boolean("transfer.more")?.unwrap_or(false),
                rcv_settle_mode: f.ubyte("transfer.rcv-settle-mode")?,
                aborted: {
                    f.skip()?; // state
                    f.skip()?; // resume
                    f.boolean("transfer.aborted")?.unwrap_or(false)
                },
                batchable: f.boolean("transfer.batchable")?.unwrap_or(false),
            }),
            descriptor::DISPOSITION => Performative::Disposition(Disposition {
                role: match f
                    .boolean("disposition.role")?
                    .ok_or(DecodeError::Missing("disposition.role"))?
                {
                    false => Role::Sender,
                    true => Role::Receiver,
                },
                first: f
                    .uint("disposition.first")?
                    .ok_or(DecodeError::Missing("disposition.first"))?,
                last: f.uint("disposition.last")?,
                settled: f.boolean("disposition.settled")?.unwrap_or(false),
                state: Outcome::decode_field(&mut f)?,
                batchable: f.boolean("disposition.batchable")?.unwrap_or(false),
            }),
            descriptor::DETACH => Performative::Detach(Detach {
                handle: f
                    .uint("detach.handle")?
                    .ok_or(DecodeError::Missing("detach.handle"))?,
                closed: f.boolean("detach.closed")?.unwrap_or(false),
                error: Error::decode_field(&mut f)?,
            }),
            descriptor::END => Performative::End(Error::decode_field(&mut f)?),
            descriptor::CLOSE => Performative::Close(Error::decode_field(&mut f)?),
            other => return Err(DecodeError::Descriptor(other)),
        };
        f.finish()?;
        Ok((p, r.position()))
    }

    /// Encodes the performative (not the frame header).
    pub fn encode<B: Buf>(&self, buf: &mut B) {
        let mut w = Writer::new(buf);
        match self {
            Performative::Open(o) => {
                let mut m = w.begin_described_list(descriptor::OPEN);
                w.field(&mut m, Some(o.container_id.as_str()), |w, v| w.string(v));
                w.field(&mut m, o.hostname.as_deref(), |w, v| w.string(v));
                w.field(&mut m, Some(o.max_frame_size), |w, v| w.uint(v));
                w.field(&mut m, Some(o.channel_max), |w, v| w.ushort(v));
                w.field(&mut m, o.idle_timeout_ms, |w, v| w.uint(v));
                for _ in 0..4 {
                    w.field(&mut m, None::<()>, |_, _| {});
                }
                w.field(&mut m, o.properties.as_ref(), |w, v| w.raw(&v.0));
                w.end_list(m);
            }
            Performative::Begin(b) => {
                let mut m = w.begin_described_list(descriptor::BEGIN);
                w.field(&mut m, b.remote_channel, |w, v| w.ushort(v));
                w.field(&mut m, Some(b.next_outgoing_id), |w, v| w.uint(v));
                w.field(&mut m, Some(b.incoming_window), |w, v| w.uint(v));
                w.field(&mut m, Some(b.outgoing_window), |w, v| w.uint(v));
                w.field(&mut m, Some(b.handle_max), |w, v| w.uint(v));
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, b.properties.as_ref(), |w, v| w.raw(&v.0));
                w.end_list(m);
            }
            Performative::Attach(a) => {
                let mut m = w.begin_described_list(descriptor::ATTACH);
                w.field(&mut m, Some(a.name.as_str()), |w, v| w.string(v));
                w.field(&mut m, Some(a.handle), |w, v| w.uint(v));
                w.field(&mut m, Some(a.role == Role::Receiver), |w, v| w.boolean(v));
                w.field(&mut m, Some(a.snd_settle_mode), |w, v| w.ubyte(v));
                w.field(&mut m, Some(a.rcv_settle_mode), |w, v| w.ubyte(v));
                for (t, d) in [
                    (&a.source, descriptor::SOURCE),
                    (&a.target, descriptor::TARGET),
                ] {
                    w.field(&mut m, t.as_ref(), |w, t| {
                        let mut tm = w.begin_described_list(d);
                        w.field(&mut tm, t.address.as_deref(), |w, v| w.string(v));
                        w.end_list(tm);
                    });
                }
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, a.initial_delivery_count, |w, v| w.uint(v));
                w.field(&mut m, a.max_message_size, |w, v| w.ulong_value(v));
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, a.properties.as_ref(), |w, v| w.raw(&v.0));
                w.end_list(m);
            }
            Performative::Flow(fl) => {
                let mut m = w.begin_described_list(descriptor::FLOW);
                w.field(&mut m, fl.next_incoming_id, |w, v| w.uint(v));
                w.field(&mut m, Some(fl.incoming_window), |w, v| w.uint(v));
                w.field(&mut m, Some(fl.next_outgoing_id), |w, v| w.uint(v));
                w.field(&mut m, Some(fl.outgoing_window), |w, v| w.uint(v));
                w.field(&mut m, fl.handle, |w, v| w.uint(v));
                w.field(&mut m, fl.delivery_count, |w, v| w.uint(v));
                w.field(&mut m, fl.link_credit, |w, v| w.uint(v));
                w.field(&mut m, fl.available, |w, v| w.uint(v));
                w.field(&mut m, fl.drain.then_some(true), |w, v| w.boolean(v));
                w.field(&mut m, fl.echo.then_some(true), |w, v| w.boolean(v));
                w.end_list(m);
            }
            Performative::Transfer(t) => {
                let mut m = w.begin_described_list(descriptor::TRANSFER);
                w.field(&mut m, Some(t.handle), |w, v| w.uint(v));
                w.field(&mut m, t.delivery_id, |w, v| w.uint(v));
                w.field(&mut m, t.delivery_tag.as_ref(), |w, v| w.binary(v));
                w.field(&mut m, t.message_format, |w, v| w.uint(v));
                w.field(&mut m, t.settled, |w, v| w.boolean(v));
                w.field(&mut m, t.more.then_some(true), |w, v| w.boolean(v));
                w.field(&mut m, t.rcv_settle_mode, |w, v| w.ubyte(v));
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, None::<()>, |_, _| {});
                w.field(&mut m, t.aborted.then_some(true), |w, v| w.boolean(v));
                w.field(&mut m, t.batchable.then_some(true), |w, v| w.boolean(v));
                w.end_list(m);
            }
            Performative::Disposition(d) => {
                let mut m = w.begin_described_list(descriptor::DISPOSITION);
                w.field(&mut m, Some(d.role == Role::Receiver), |w, v| w.boolean(v));
                w.field(&mut m, Some(d.first), |w, v| w.uint(v));
                w.field(&mut m, d.last, |w, v| w.uint(v));
                w.field(&mut m, Some(d.settled), |w, v| w.boolean(v));
                w.field(&mut m, d.state.as_ref(), |w, v| v.encode(w));
                w.field(&mut m, d.batchable.then_some(true), |w, v| w.boolean(v));
                w.end_list(m);
            }
            Performative::Detach(d) => {
                let mut m = w.begin_described_list(descriptor::DETACH);
                w.field(&mut m, Some(d.handle), |w, v| w.uint(v));
                w.field(&mut m, Some(d.closed), |w, v| w.boolean(v));
                w.field(&mut m, d.error.as_ref(), |w, v| v.encode(w));
                w.end_list(m);
            }
            Performative::End(e) | Performative::Close(e) => {
                let d = if matches!(self, Performative::End(_)) {
                    descriptor::END
                } else {
                    descriptor::CLOSE
                };
                let mut m = w.begin_described_list(d);
                w.field(&mut m, e.as_ref(), |w, v| v.encode(w));
                w.end_list(m);
            }
        }
    }
}

/// SASL frames the engine exchanges (EXTERNAL only: the TLS client certificate is the
/// identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sasl {
    /// The server's mechanisms.
    Mechanisms(Vec<Bytes>),
    /// The client's choice.
    Init {
        /// The mechanism.
        mechanism: Bytes,
        /// Initial response (EXTERNAL: empty or the authorization identity).
        initial_response: Option<Bytes>,
        /// The host the client meant.
        hostname: Option<String>,
    },
    /// The outcome: 0 ok, 1 auth, 2 sys, 3 sys-perm, 4 sys-temp.
    Outcome(u8),
}

impl Sasl {
    /// Decodes a SASL frame body.
    pub fn decode(body: &[u8], limits: Limits) -> Result<Sasl, DecodeError> {
        let mut r = Reader::new(body, limits);
        let d = r.descriptor()?;
        let mut f = r.fields()?;
        let s = match d {
            descriptor::SASL_MECHANISMS => {
                // `symbol multiple`: one symbol or an array of symbols.
                let raw = f
                    .raw()?
                    .ok_or(DecodeError::Missing("sasl-server-mechanisms"))?;
                Sasl::Mechanisms(symbols(&raw.0, limits)?)
            }
            descriptor::SASL_INIT => Sasl::Init {
                mechanism: f
                    .symbol("sasl-init.mechanism")?
                    .ok_or(DecodeError::Missing("sasl-init.mechanism"))?,
                initial_response: f
                    .binary("sasl-init.initial-response")?
                    .map(Bytes::copy_from_slice),
                hostname: f.string("sasl-init.hostname")?,
            },
            descriptor::SASL_OUTCOME => {
                let code = f
                    .ubyte("sasl-outcome.code")?
                    .ok_or(DecodeError::Missing("sasl-outcome.code"))?;
                f.skip()?;
                Sasl::Outcome(code)
            }
            other => return Err(DecodeError::Descriptor(other)),
        };
        f.finish()?;
        Ok(s)
    }

    /// Encodes a SASL frame body.
    pub fn encode<B: Buf>(&self, buf: &mut B) {
        let mut w = Writer::new(buf);
        match self {
            Sasl::Mechanisms(m) => {
                let mut l = w.begin_described_list(descriptor::SASL_MECHANISMS);
                let syms: Vec<&[u8]> = m.iter().map(|s| s.as_ref()).collect();
                w.field(&mut l, Some(()), |w, _| w.symbol_array(&syms));
                w.end_list(l);
            }
            Sasl::Init {
                mechanism,
                initial_response,
                hostname,
            } => {
                let mut l = w.begin_described_list(descriptor::SASL_INIT);
                w.field(&mut l, Some(mechanism), |w, v| w.symbol(v));
                w.field(&mut l, initial_response.as_ref(), |w, v| w.binary(v));
                w.field(&mut l, hostname.as_deref(), |w, v| w.string(v));
                w.end_list(l);
            }
            Sasl::Outcome(code) => {
                let mut l = w.begin_described_list(descriptor::SASL_OUTCOME);
                w.field(&mut l, Some(*code), |w, v| w.ubyte(v));
                w.end_list(l);
            }
        }
    }
}

/// The symbols of a `symbol multiple` value (one symbol or an array of them).
fn symbols(raw: &[u8], limits: Limits) -> Result<Vec<Bytes>, DecodeError> {
    let mut r = Reader::new(raw, limits);
    let c = r.peek()?;
    if matches!(c, 0xa3 | 0xb3) {
        let v = r.skip()?;
        let skip = if c == 0xa3 { 2 } else { 5 };
        return Ok(vec![Bytes::copy_from_slice(&v[skip..])]);
    }
    // An array: walk its elements by hand (validated already by `raw`).
    let wide = match raw.first() {
        Some(0xe0) => false,
        Some(0xf0) => true,
        _ => {
            return Err(DecodeError::Type {
                field: "sasl-server-mechanisms",
                expected: "symbol or array of symbols",
                found: c,
            })
        }
    };
    let (count, mut at) = if wide {
        (
            u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) as usize,
            9,
        )
    } else {
        (raw[2] as usize, 3)
    };
    if count == 0 {
        return Ok(Vec::new());
    }
    let elem = raw[at];
    at += 1;
    let mut out = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let n = match elem {
            0xa3 => {
                let n = raw[at] as usize;
                at += 1;
                n
            }
            0xb3 => {
                let n =
                    u32::from_be_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]) as usize;
                at += 4;
                n
            }
            found => {
                return Err(DecodeError::Type {
                    field: "sasl-server-mechanisms",
                    expected: "symbol",
                    found,
                })
            }
        };
        out.push(Bytes::copy_from_slice(&raw[at..at + n]));
        at += n;
    }
    Ok(out)
}

/// Writes a frame (header and body) into `out`, with `body` writing the performative and any
/// payload. Returns the frame's size.
pub fn write_frame<B: Buf>(
    out: &mut B,
    frame_type: u8,
    channel: u16,
    body: impl FnOnce(&mut B),
) -> usize {
    let start = out.len_written();
    out.put_u32(0);
    out.put_u8(2);
    out.put_u8(frame_type);
    out.put_u16(channel);
    body(out);
    let size = out.len_written() - start;
    out.as_mut()[start..start + 4].copy_from_slice(&(size as u32).to_be_bytes());
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rejection's description longer than `max_string` (a float's 200 KB explanation)
    /// is cut on a character boundary, not refused: refusing it would close the connection
    /// and bring the same rejection back at every reconnect.
    #[test]
    fn a_long_error_description_is_cut_not_refused() {
        let d = Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: 0,
            last: None,
            settled: true,
            state: Some(Outcome::Rejected(Some(Error::new(
                "amqp:precondition-failed",
                "é".repeat(100_000),
            )))),
            batchable: false,
        });
        let mut buf = Vec::new();
        d.encode(&mut buf);
        let (back, _) = Performative::decode(&buf, Limits::DEFAULT).unwrap();
        let Performative::Disposition(Disposition {
            state: Some(Outcome::Rejected(Some(e))),
            ..
        }) = back
        else {
            panic!("{back:?}")
        };
        let text = e.description.unwrap();
        let kept = text.strip_suffix('…').unwrap();
        assert_eq!(kept, "é".repeat(Limits::DEFAULT.max_string / 2));
    }

    fn round_trip(p: Performative) {
        let mut buf = Vec::new();
        p.encode(&mut buf);
        let (back, used) = Performative::decode(&buf, Limits::DEFAULT).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(back, p);
    }

    #[test]
    fn performatives_read_back_what_was_written() {
        round_trip(Performative::Open(Open {
            container_id: "bridge-1".into(),
            hostname: Some("float.example".into()),
            max_frame_size: 262_144,
            channel_max: 7,
            idle_timeout_ms: Some(30_000),
            properties: None,
        }));
        round_trip(Performative::Begin(Begin {
            remote_channel: Some(0),
            next_outgoing_id: 1,
            incoming_window: 2048,
            outgoing_window: 2048,
            handle_max: 31,
            properties: None,
        }));
        round_trip(Performative::Attach(Attach {
            name: "link".into(),
            handle: 3,
            role: Role::Sender,
            snd_settle_mode: 0,
            rcv_settle_mode: 0,
            source: Some(Terminus {
                address: Some("q".into()),
            }),
            target: Some(Terminus {
                address: Some("drawbridge.inbox".into()),
            }),
            initial_delivery_count: Some(0),
            max_message_size: Some(1 << 24),
            properties: None,
        }));
        round_trip(Performative::Flow(Flow {
            next_incoming_id: Some(5),
            incoming_window: 100,
            next_outgoing_id: 9,
            outgoing_window: 100,
            handle: Some(3),
            delivery_count: Some(4),
            link_credit: Some(500),
            available: None,
            drain: false,
            echo: true,
        }));
        round_trip(Performative::Transfer(Transfer {
            handle: 3,
            delivery_id: Some(70_000),
            delivery_tag: Some(Bytes::from_static(b"\0\0\0\x01")),
            message_format: Some(0),
            settled: Some(false),
            more: true,
            ..Transfer::default()
        }));
        round_trip(Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: 10,
            last: Some(20),
            settled: true,
            state: Some(Outcome::Rejected(Some(Error::new(
                "amqp:not-allowed",
                "no",
            )))),
            batchable: false,
        }));
        round_trip(Performative::Detach(Detach {
            handle: 3,
            closed: true,
            error: Some(Error::new("amqp:link:detach-forced", "bye")),
        }));
        round_trip(Performative::Close(None));
        round_trip(Performative::End(Some(Error::new(
            "amqp:internal-error",
            "x",
        ))));
    }

    #[test]
    fn an_error_info_nested_past_the_limit_is_refused() {
        // A rejected disposition whose error info nests 27,000 levels (the hostile float).
        let mut info = vec![0x40u8];
        for _ in 0..27_000 {
            let mut outer = vec![0xd0];
            outer.extend_from_slice(&((info.len() + 4) as u32).to_be_bytes());
            outer.extend_from_slice(&1u32.to_be_bytes());
            outer.extend_from_slice(&info);
            info = outer;
        }
        let d = Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: 0,
            last: None,
            settled: true,
            state: Some(Outcome::Rejected(Some(Error {
                condition: Bytes::from_static(b"amqp:x"),
                description: None,
                info: Some(Raw(Bytes::from(info))),
            }))),
            batchable: false,
        });
        let mut buf = Vec::new();
        d.encode(&mut buf);
        assert!(matches!(
            Performative::decode(&buf, Limits::DEFAULT),
            Err(DecodeError::TooDeep(64))
        ));
    }

    #[test]
    fn sasl_frames_read_back() {
        for s in [
            Sasl::Mechanisms(vec![Bytes::from_static(b"EXTERNAL")]),
            // An empty array is written without an element constructor.
            Sasl::Mechanisms(Vec::new()),
            Sasl::Init {
                mechanism: Bytes::from_static(b"EXTERNAL"),
                initial_response: Some(Bytes::new()),
                hostname: Some("h".into()),
            },
            Sasl::Outcome(0),
        ] {
            let mut buf = Vec::new();
            s.encode(&mut buf);
            assert_eq!(Sasl::decode(&buf, Limits::DEFAULT).unwrap(), s);
        }
    }
}
