//! The connection, session and link state machines, without I/O.
//!
//! [`Connection::handle_input`] takes the bytes read from the (TLS) stream, [`Connection::transmit`]
//! hands out the bytes to write, [`Connection::poll_event`] what happened, and
//! [`Connection::poll_timeout`] / [`Connection::handle_timeout`] the heartbeats and the idle
//! deadline. Commands ([`Connection::send`], [`Connection::settle`], [`Connection::attach`],
//! ...) only change state and queue frames; nothing blocks and nothing is spawned.
//!
//! What the engine promises a hostile peer cannot do:
//!
//! - make it buffer more than one frame of the negotiated maximum size, or more than
//!   `max_message_size` of one delivery in assembly (both refused from the headers);
//! - send a delivery beyond the link credit or the session window it was given (the
//!   connection is closed with `amqp:link:transfer-limit-exceeded` /
//!   `amqp:session:window-violation`); there is no queue of incoming transfers to fill;
//! - keep dispositions in an unsettled map: settle mode `second` is answered with `first`,
//!   and a receiver settles every delivery as it decides its outcome;
//! - open more sessions or links than configured, or ask for heartbeats more often than
//!   `min_idle_timeout`;
//! - reach a recursive decoder: see [`crate::codec`].

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};

use crate::{
    codec::{DecodeError, Limits, Raw},
    frame::{self, FrameError, AMQP_HEADER, SASL_HEADER, TYPE_AMQP, TYPE_SASL},
    performatives::{
        write_frame, Attach, Begin, Detach, Disposition, Error, Flow, Open, Outcome, Performative,
        Role, Sasl, Terminus, Transfer,
    },
};

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Opens the TCP connection, sends the first protocol header (the bridge).
    Client,
    /// Accepts it (the float).
    Server,
}

/// A connection's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our container id.
    pub container_id: String,
    /// The host a client means (sent in `sasl-init` and `open`).
    pub hostname: Option<String>,
    /// Largest frame we accept (announced in `open`).
    pub max_frame_size: u32,
    /// Sessions a peer may begin at once (announced as `channel-max` + 1).
    pub max_sessions: u16,
    /// Links a peer may attach per session (announced as `handle-max` + 1).
    pub max_links_per_session: u32,
    /// Our idle timeout: the connection is closed when the peer sent nothing for this long
    /// (half of it is announced in `open`, so that a peer heartbeating at the announced
    /// period still arrives in time).
    pub idle_timeout: Duration,
    /// Shortest idle timeout a peer may ask of us.
    pub min_peer_idle_timeout: Duration,
    /// Transfer frames a session may have in flight towards us.
    pub incoming_window: u32,
    /// Largest delivery we accept (announced on receiving links).
    pub max_message_size: u64,
    /// SASL EXTERNAL before AMQP (the TLS client certificate is the identity).
    pub sasl_external: bool,
    /// What the decoder holds a peer to.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            container_id: "drawbridge".into(),
            hostname: None,
            max_frame_size: 256 * 1024,
            max_sessions: 8,
            max_links_per_session: 32,
            idle_timeout: Duration::from_secs(30),
            min_peer_idle_timeout: Duration::from_secs(1),
            incoming_window: 2048,
            max_message_size: 16 * 1024 * 1024,
            sasl_external: true,
            limits: Limits::DEFAULT,
        }
    }
}

/// A session, by our channel number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u16);

/// A link: its session and our handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId {
    /// The session.
    pub session: SessionId,
    /// Our handle.
    pub handle: u32,
}

/// What happened on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's `open` arrived and ours was sent: sessions may begin.
    Opened(Open),
    /// (Server) the peer began a session; it was answered.
    SessionBegun(SessionId),
    /// (Client) our session was answered.
    SessionReady(SessionId),
    /// (Server) the peer attached a link: answer with [`Connection::accept_link`] or
    /// [`Connection::refuse_link`].
    AttachRequested {
        /// The link.
        link: LinkId,
        /// The peer's role (a peer sender needs our receiver).
        role: Role,
        /// The peer's attach.
        attach: Box<Attach>,
    },
    /// (Client) our link was answered; a sender waits for credit.
    LinkReady {
        /// The link.
        link: LinkId,
        /// The peer's attach.
        attach: Box<Attach>,
    },
    /// A sender got credit (or more session window): it may send this many now.
    Credit {
        /// The link.
        link: LinkId,
        /// Deliveries it may send now.
        credit: u32,
    },
    /// A receiver got a whole delivery.
    Delivery {
        /// The link.
        link: LinkId,
        /// Its delivery id (to settle it with).
        id: u32,
        /// Whether the peer sent it settled (nothing to answer).
        settled: bool,
        /// The encoded bare message, as sent.
        payload: Bytes,
    },
    /// Deliveries `first..=last` of a sender were settled with `outcome`.
    Settled {
        /// The link.
        link: LinkId,
        /// First delivery id.
        first: u32,
        /// Last delivery id.
        last: u32,
        /// The outcome (`None`: settled by the peer without one, taken as released).
        outcome: Option<Outcome>,
    },
    /// The peer detached a link (answered already).
    Detached {
        /// The link.
        link: LinkId,
        /// The peer's error.
        error: Option<Error>,
    },
    /// The peer ended a session (answered already).
    Ended {
        /// The session.
        session: SessionId,
        /// The peer's error.
        error: Option<Error>,
    },
    /// The connection is over: the peer's `close` or our own; nothing more to do but write
    /// what [`Connection::transmit`] still holds and shut the stream.
    Closed {
        /// The error, the peer's or ours.
        error: Option<Error>,
        /// Whether we closed it (a protocol violation of the peer, or [`Connection::close`]).
        by_us: bool,
        /// What the peer violated, when that is why we closed it: `frames` (malformed,
        /// too deep, too big, out of order), `credit`, `message_size`, `max_sessions`,
        /// `max_links`, `idle_timeout` (asked for heartbeats too often) or `silent` (sent
        /// nothing for our idle timeout). The float counts refusals by it.
        violation: Option<&'static str>,
    },
}

/// What a command could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The link has no credit or its session no window: wait for [`Event::Credit`].
    #[error("no credit")]
    NoCredit,
    /// No such link or session, or not in a state for this.
    #[error("no such link or session, or not open")]
    NotOpen,
    /// The message exceeds the peer's max-message-size.
    #[error("message of {len} bytes exceeds the peer's maximum of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The peer's max.
        max: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Client: sent the SASL header and waits for it and the mechanisms.
    SaslStart,
    /// Client: got the SASL header, waits for the mechanisms.
    SaslAwaitMechanisms,
    /// Client: sent init, waits for the outcome.
    SaslOutcome,
    /// Server: waits for the peer's SASL header.
    SaslAwaitHeader,
    /// Server: sent mechanisms, waits for init.
    SaslAwaitInit,
    /// Waits for the peer's AMQP header.
    AwaitHeader,
    /// Waits for the peer's open.
    AwaitOpen,
    /// Open.
    Opened,
    /// We sent close; wait for the peer's.
    CloseSent,
    /// Done.
    Closed,
}

#[derive(Debug)]
struct Link {
    handle: u32,
    remote_handle: Option<u32>,
    role: Role,
    name: String,
    /// Sender: deliveries sent (delivery-count). Receiver: deliveries received.
    delivery_count: u32,
    /// Sender: credit the peer gave, left. Receiver: credit we gave, left.
    credit: u32,
    /// Receiver: credit we keep granted (deliveries in flight towards us at most).
    window: u32,
    /// Receiver: deliveries received and not yet settled by the application.
    unsettled: u32,
    /// Receiver: a delivery in assembly (several frames).
    partial: Option<Partial>,
    /// Sender: the peer's max-message-size (0: none).
    peer_max_message_size: u64,
    detached: bool,
    /// Whether the peer has attached.
    remote_attached: bool,
}

#[derive(Debug)]
struct Partial {
    id: u32,
    settled: bool,
    buf: BytesMut,
}

#[derive(Debug)]
struct Session {
    channel: u16,
    remote_channel: Option<u16>,
    links: Vec<Link>,
    /// Transfer ids (one per transfer frame; the session window counts these).
    next_outgoing_id: u32,
    /// Delivery ids (one per delivery, whatever its frames).
    next_delivery_id: u32,
    next_incoming_id: u32,
    /// How many more transfer frames the peer takes (its incoming window, as we track it).
    remote_incoming_window: u32,
    /// How many more transfer frames we take.
    incoming_window: u32,
    /// Sender deliveries not yet settled by the peer, in id order: (delivery id, handle).
    unsettled: VecDeque<(u32, u32)>,
    /// Receiver: a disposition being built from consecutive settles of one outcome.
    pending: Option<(u32, u32, Outcome)>,
    ended: bool,
    remote_begun: bool,
}

impl Session {
    fn link(&mut self, handle: u32) -> Option<&mut Link> {
        self.links.iter_mut().find(|l| l.handle == handle)
    }
    fn link_by_remote(&mut self, remote: u32) -> Option<&mut Link> {
        self.links
            .iter_mut()
            .find(|l| l.remote_handle == Some(remote) && !l.detached)
    }
}

/// Why the engine closes the connection (becomes the `close` error).
#[derive(Debug)]
struct Violation {
    condition: &'static str,
    text: String,
    label: &'static str,
}

impl Violation {
    fn new(condition: &'static str, text: impl Into<String>) -> Self {
        let label = match condition {
            "amqp:link:transfer-limit-exceeded" | "amqp:session:window-violation" => "credit",
            "amqp:link:message-size-exceeded" => "message_size",
            _ => "frames",
        };
        Violation {
            condition,
            text: text.into(),
            label,
        }
    }

    fn label(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }
}

impl From<DecodeError> for Violation {
    fn from(e: DecodeError) -> Self {
        Violation::new("amqp:decode-error", e.to_string())
    }
}

impl From<FrameError> for Violation {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { .. } => {
                Violation::new("amqp:connection:framing-error", e.to_string())
            }
            _ => Violation::new("amqp:connection:framing-error", e.to_string()),
        }
    }
}

/// One AMQP 1.0 connection, sans I/O.
#[derive(Debug)]
pub struct Connection {
    side: Side,
    config: Config,
    state: ConnState,
    /// Bytes to write.
    out: BytesMut,
    events: VecDeque<Event>,
    sessions: Vec<Session>,
    /// The peer's max frame size (what we may send).
    peer_max_frame: u32,
    /// The peer's idle timeout (we send something at least every half of it).
    peer_idle: Option<Duration>,
    last_read: Option<Instant>,
    last_write: Option<Instant>,
    remote_open: Option<Open>,
    /// Frames a client queued before SASL ended.
    early: Vec<(u16, Performative)>,
}

impl Connection {
    /// A client connection: the first bytes to write are queued already.
    pub fn client(config: Config) -> Connection {
        let mut c = Connection::new(Side::Client, config);
        if c.config.sasl_external {
            c.out.extend_from_slice(&SASL_HEADER);
            c.state = ConnState::SaslStart;
        } else {
            c.out.extend_from_slice(&AMQP_HEADER);
            c.send_open();
            c.state = ConnState::AwaitHeader;
        }
        c
    }

    /// A server connection: it waits for the peer's protocol header.
    pub fn server(config: Config) -> Connection {
        let mut c = Connection::new(Side::Server, config);
        c.state = if c.config.sasl_external {
            ConnState::SaslAwaitHeader
        } else {
            ConnState::AwaitHeader
        };
        c
    }

    fn new(side: Side, config: Config) -> Connection {
        Connection {
            side,
            config,
            state: ConnState::AwaitHeader,
            out: BytesMut::with_capacity(4096),
            events: VecDeque::new(),
            sessions: Vec::new(),
            peer_max_frame: frame::MIN_MAX_FRAME_SIZE,
            peer_idle: None,
            last_read: None,
            last_write: None,
            remote_open: None,
            early: Vec::new(),
        }
    }

    /// Whether the connection is over (after [`Event::Closed`]).
    pub fn is_closed(&self) -> bool {
        self.state == ConnState::Closed
    }

    /// The peer's `open`, once it arrived.
    pub fn remote_open(&self) -> Option<&Open> {
        self.remote_open.as_ref()
    }

    /// Bytes to write, if any; the caller writes all of them (or as much as it can, calling
    /// [`Connection::written`] with the count).
    pub fn transmit(&mut self) -> &[u8] {
        self.flush_pending();
        &self.out
    }

    /// `n` bytes of [`Connection::transmit`] were written at `now`.
    pub fn written(&mut self, n: usize, now: Instant) {
        let _ = self.out.split_to(n);
        if n > 0 {
            self.last_write = Some(now);
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.state, ConnState::Closed) {
            return None;
        }
        let read_deadline = self.last_read.map(|t| t + self.config.idle_timeout);
        // No heartbeat is due while bytes wait to be written (they will do).
        let heartbeat = match (self.peer_idle, self.last_write) {
            (Some(d), Some(t)) if self.out.is_empty() => Some(t + d / 2),
            _ => None,
        };
        match (read_deadline, heartbeat) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Timers: sends a heartbeat when we have been quiet for half the peer's idle timeout;
    /// closes the connection when the peer has been quiet for our idle timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == ConnState::Closed {
            return;
        }
        if let Some(t) = self.last_read {
            if now >= t + self.config.idle_timeout {
                self.violation(
                    Violation::new(
                        "amqp:resource-limit-exceeded",
                        format!("nothing received for {:?}", self.config.idle_timeout),
                    )
                    .label("silent"),
                );
                return;
            }
        }
        if let (Some(d), Some(t)) = (self.peer_idle, self.last_write) {
            if now >= t + d / 2 && self.out.is_empty() {
                // An empty frame.
                self.out.extend_from_slice(&[0, 0, 0, 8, 2, 0, 0, 0]);
                // Counted as written when the driver writes it.
            }
        }
    }

    /// Feeds bytes read from the stream; consumes what forms whole headers and frames.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        while self.handle_one(buf, now) {}
    }

    /// Like [`Connection::handle_input`], but consumes at most one protocol header or frame;
    /// returns whether it did. For callers that act on each frame's events before the next
    /// (a test or a fuzz target comparing two chunkings of one stream).
    pub fn handle_one(&mut self, buf: &mut BytesMut, now: Instant) -> bool {
        if !buf.is_empty() {
            self.last_read = Some(now);
        }
        if self.state == ConnState::Closed {
            return false;
        }
        match self.step(buf) {
            Ok(progress) => progress,
            Err(v) => {
                self.violation(v);
                false
            }
        }
    }

    /// One protocol header or frame off `buf`; `false` when more bytes are needed.
    fn step(&mut self, buf: &mut BytesMut) -> Result<bool, Violation> {
        match self.state {
            ConnState::SaslStart | ConnState::SaslAwaitHeader => {
                if !frame::take_protocol_header(buf, &SASL_HEADER)? {
                    return Ok(false);
                }
                if self.state == ConnState::SaslAwaitHeader {
                    self.out.extend_from_slice(&SASL_HEADER);
                    // ANONYMOUS too: some clients insist on it, and the identity is the TLS
                    // client certificate either way (verified before a byte of AMQP).
                    let m = Sasl::Mechanisms(vec![
                        Bytes::from_static(b"EXTERNAL"),
                        Bytes::from_static(b"ANONYMOUS"),
                    ]);
                    write_frame(&mut self.out, TYPE_SASL, 0, |b| m.encode(b));
                    self.state = ConnState::SaslAwaitInit;
                } else {
                    self.state = ConnState::SaslAwaitMechanisms;
                }
                Ok(true)
            }
            ConnState::AwaitHeader => {
                if !frame::take_protocol_header(buf, &AMQP_HEADER)? {
                    return Ok(false);
                }
                if self.side == Side::Server {
                    self.out.extend_from_slice(&AMQP_HEADER);
                }
                self.state = ConnState::AwaitOpen;
                Ok(true)
            }
            _ => {
                let max = match self.state {
                    ConnState::SaslAwaitMechanisms
                    | ConnState::SaslOutcome
                    | ConnState::SaslAwaitInit => frame::MIN_MAX_FRAME_SIZE,
                    _ => self.config.max_frame_size,
                };
                let Some(f) = frame::take_frame(buf, max)? else {
                    return Ok(false);
                };
                self.frame(f)?;
                Ok(true)
            }
        }
    }
}

impl Connection {
    fn frame(&mut self, f: frame::Frame) -> Result<(), Violation> {
        match self.state {
            ConnState::SaslAwaitMechanisms | ConnState::SaslOutcome | ConnState::SaslAwaitInit => {
                if f.frame_type != TYPE_SASL {
                    return Err(Violation::new("amqp:not-allowed", "expected a SASL frame"));
                }
                let sasl = Sasl::decode(&f.body, self.config.limits)?;
                return self.sasl(sasl);
            }
            _ => {}
        }
        if f.frame_type != TYPE_AMQP {
            return Err(Violation::new(
                "amqp:not-allowed",
                "a SASL frame after SASL",
            ));
        }
        if f.body.is_empty() {
            return Ok(()); // heartbeat
        }
        let (p, used) = Performative::decode(&f.body, self.config.limits)?;
        let payload = f.body.slice(used..);
        if !payload.is_empty() && !matches!(p, Performative::Transfer(_)) {
            return Err(Violation::new(
                "amqp:decode-error",
                "a payload on a frame that is no transfer",
            ));
        }
        match (self.state, p) {
            (ConnState::AwaitOpen, Performative::Open(o)) => self.on_open(o),
            (ConnState::AwaitOpen, _) => Err(Violation::new("amqp:not-allowed", "expected open")),
            (ConnState::Opened, Performative::Open(_)) => {
                Err(Violation::new("amqp:not-allowed", "a second open"))
            }
            (ConnState::Opened | ConnState::CloseSent, Performative::Close(error)) => {
                if self.state == ConnState::Opened {
                    write_frame(&mut self.out, TYPE_AMQP, 0, |b| {
                        Performative::Close(None).encode(b)
                    });
                }
                self.state = ConnState::Closed;
                self.events.push_back(Event::Closed {
                    error,
                    by_us: false,
                    violation: None,
                });
                Ok(())
            }
            (ConnState::CloseSent, _) => Ok(()), // discarded until the peer's close
            (ConnState::Opened, p) => self.on_session_frame(f.channel, p, payload),
            _ => Err(Violation::new("amqp:not-allowed", "unexpected frame")),
        }
    }

    fn sasl(&mut self, sasl: Sasl) -> Result<(), Violation> {
        match (self.state, sasl) {
            (ConnState::SaslAwaitMechanisms, Sasl::Mechanisms(m)) => {
                if !m.iter().any(|m| m.as_ref() == b"EXTERNAL") {
                    return Err(Violation::new(
                        "amqp:not-implemented",
                        "the peer does not offer SASL EXTERNAL",
                    ));
                }
                let init = Sasl::Init {
                    mechanism: Bytes::from_static(b"EXTERNAL"),
                    initial_response: Some(Bytes::new()),
                    hostname: self.config.hostname.clone(),
                };
                write_frame(&mut self.out, TYPE_SASL, 0, |b| init.encode(b));
                self.state = ConnState::SaslOutcome;
                Ok(())
            }
            (ConnState::SaslOutcome, Sasl::Outcome(0)) => {
                self.out.extend_from_slice(&AMQP_HEADER);
                self.send_open();
                self.state = ConnState::AwaitHeader;
                // What was asked before SASL ended (begin, attach) follows the open at once:
                // anything written later (a transfer) must not overtake it.
                for (ch, f) in std::mem::take(&mut self.early) {
                    write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
                }
                Ok(())
            }
            (ConnState::SaslOutcome, Sasl::Outcome(code)) => {
                self.state = ConnState::Closed;
                self.events.push_back(Event::Closed {
                    error: Some(Error::new(
                        "amqp:unauthorized-access",
                        format!("SASL outcome {code}"),
                    )),
                    by_us: false,
                    violation: None,
                });
                Ok(())
            }
            (ConnState::SaslAwaitInit, Sasl::Init { mechanism, .. }) => {
                let ok = matches!(mechanism.as_ref(), b"EXTERNAL" | b"ANONYMOUS");
                write_frame(&mut self.out, TYPE_SASL, 0, |b| {
                    Sasl::Outcome(if ok { 0 } else { 1 }).encode(b)
                });
                if !ok {
                    self.state = ConnState::Closed;
                    self.events.push_back(Event::Closed {
                        error: Some(Error::new(
                            "amqp:unauthorized-access",
                            "only SASL EXTERNAL or ANONYMOUS",
                        )),
                        by_us: true,
                        violation: Some("sasl"),
                    });
                    return Ok(());
                }
                self.state = ConnState::AwaitHeader;
                Ok(())
            }
            _ => Err(Violation::new("amqp:not-allowed", "unexpected SASL frame")),
        }
    }

    fn send_open(&mut self) {
        let open = Performative::Open(Open {
            container_id: self.config.container_id.clone(),
            hostname: self.config.hostname.clone(),
            max_frame_size: self.config.max_frame_size,
            channel_max: self.config.max_sessions.saturating_sub(1),
            // Half of what we wait, as Qpid Proton does: some peers send heartbeats at the
            // period we announce, not within it, and one a little late must not be cut off.
            idle_timeout_ms: Some(
                (self.config.idle_timeout / 2)
                    .as_millis()
                    .min(u128::from(u32::MAX)) as u32,
            ),
            properties: None,
        });
        write_frame(&mut self.out, TYPE_AMQP, 0, |b| open.encode(b));
    }

    fn on_open(&mut self, o: Open) -> Result<(), Violation> {
        if o.max_frame_size < frame::MIN_MAX_FRAME_SIZE {
            return Err(Violation::new(
                "amqp:invalid-field",
                format!("max-frame-size {} is below 512", o.max_frame_size),
            ));
        }
        if let Some(ms) = o.idle_timeout_ms.filter(|ms| *ms > 0) {
            let asked = Duration::from_millis(u64::from(ms));
            if asked < self.config.min_peer_idle_timeout {
                return Err(Violation::new(
                    "amqp:resource-limit-exceeded",
                    format!(
                        "idle timeout of {ms} ms is below the minimum of {} ms",
                        self.config.min_peer_idle_timeout.as_millis()
                    ),
                )
                .label("idle_timeout"));
            }
            self.peer_idle = Some(asked);
        }
        // Never more than we take ourselves: a frame we send must fit the peer's buffer, and
        // we need no bigger ones.
        self.peer_max_frame = o.max_frame_size.min(self.config.max_frame_size);
        if self.side == Side::Server {
            self.send_open();
        }
        self.remote_open = Some(o.clone());
        self.state = ConnState::Opened;
        self.events.push_back(Event::Opened(o));
        Ok(())
    }

    fn session_by_remote(&mut self, channel: u16) -> Result<usize, Violation> {
        self.sessions
            .iter()
            .position(|s| s.remote_channel == Some(channel) && !s.ended)
            .ok_or_else(|| {
                Violation::new(
                    "amqp:connection:framing-error",
                    format!("no session on channel {channel}"),
                )
            })
    }

    fn on_session_frame(
        &mut self,
        channel: u16,
        p: Performative,
        payload: Bytes,
    ) -> Result<(), Violation> {
        match p {
            Performative::Begin(b) => self.on_begin(channel, b),
            Performative::End(error) => {
                let i = self.session_by_remote(channel)?;
                let s = &mut self.sessions[i];
                let id = SessionId(s.channel);
                let ch = s.channel;
                let answered = s.ended;
                s.ended = true;
                if !answered {
                    write_frame(&mut self.out, TYPE_AMQP, ch, |b| {
                        Performative::End(None).encode(b)
                    });
                }
                self.sessions.retain(|s| s.channel != ch);
                self.events.push_back(Event::Ended { session: id, error });
                Ok(())
            }
            Performative::Attach(a) => self.on_attach(channel, a),
            Performative::Flow(fl) => self.on_flow(channel, fl),
            Performative::Transfer(t) => self.on_transfer(channel, t, payload),
            Performative::Disposition(d) => self.on_disposition(channel, d),
            Performative::Detach(d) => self.on_detach(channel, d),
            Performative::Open(_) | Performative::Close(_) => unreachable!("handled by frame()"),
        }
    }

    fn on_begin(&mut self, channel: u16, b: Begin) -> Result<(), Violation> {
        match b.remote_channel {
            // The answer to ours.
            Some(ours) if self.side == Side::Client => {
                let s = self
                    .sessions
                    .iter_mut()
                    .find(|s| s.channel == ours && !s.remote_begun)
                    .ok_or_else(|| {
                        Violation::new(
                            "amqp:not-allowed",
                            format!("begin answers no session of ours ({ours})"),
                        )
                    })?;
                s.remote_channel = Some(channel);
                s.remote_begun = true;
                s.remote_incoming_window = b.incoming_window;
                s.next_incoming_id = b.next_outgoing_id;
                let id = SessionId(s.channel);
                self.events.push_back(Event::SessionReady(id));
                Ok(())
            }
            Some(_) => Err(Violation::new(
                "amqp:not-allowed",
                "a begin answering nothing",
            )),
            None => {
                if self.side == Side::Client {
                    return Err(Violation::new(
                        "amqp:not-allowed",
                        "a float begins no sessions",
                    ));
                }
                if self
                    .sessions
                    .iter()
                    .any(|s| s.remote_channel == Some(channel))
                {
                    return Err(Violation::new(
                        "amqp:connection:framing-error",
                        format!("channel {channel} in use"),
                    ));
                }
                if self.sessions.len() >= usize::from(self.config.max_sessions) {
                    return Err(Violation::new(
                        "amqp:resource-limit-exceeded",
                        format!(
                            "more than {} sessions on one connection",
                            self.config.max_sessions
                        ),
                    )
                    .label("max_sessions"));
                }
                let ours = (0..self.config.max_sessions)
                    .find(|c| !self.sessions.iter().any(|s| s.channel == *c))
                    .expect("fewer sessions than max_sessions");
                let mut s = self.new_session(ours);
                s.remote_channel = Some(channel);
                s.remote_begun = true;
                s.remote_incoming_window = b.incoming_window;
                s.next_incoming_id = b.next_outgoing_id;
                let answer = Performative::Begin(Begin {
                    remote_channel: Some(channel),
                    next_outgoing_id: s.next_outgoing_id,
                    incoming_window: s.incoming_window,
                    outgoing_window: u32::MAX,
                    handle_max: self.config.max_links_per_session.saturating_sub(1),
                    properties: None,
                });
                write_frame(&mut self.out, TYPE_AMQP, ours, |b| answer.encode(b));
                self.sessions.push(s);
                self.events.push_back(Event::SessionBegun(SessionId(ours)));
                Ok(())
            }
        }
    }

    fn new_session(&self, channel: u16) -> Session {
        Session {
            channel,
            remote_channel: None,
            links: Vec::new(),
            next_outgoing_id: 0,
            next_delivery_id: 0,
            next_incoming_id: 0,
            remote_incoming_window: 0,
            incoming_window: self.config.incoming_window,
            unsettled: VecDeque::new(),
            pending: None,
            ended: false,
            remote_begun: false,
        }
    }

    fn on_attach(&mut self, channel: u16, a: Attach) -> Result<(), Violation> {
        let i = self.session_by_remote(channel)?;
        let max_links = self.config.max_links_per_session;
        let side = self.side;
        let s = &mut self.sessions[i];
        if s.links
            .iter()
            .any(|l| l.remote_handle == Some(a.handle) && !l.detached)
        {
            return Err(Violation::new(
                "amqp:session:handle-in-use",
                format!("handle {} in use", a.handle),
            ));
        }
        let session = SessionId(s.channel);
        if side == Side::Client {
            // The answer to one of our attaches, by name.
            let l = s
                .links
                .iter_mut()
                .find(|l| l.name == a.name && !l.remote_attached && !l.detached)
                .ok_or_else(|| {
                    Violation::new("amqp:not-allowed", "an attach answering none of ours")
                })?;
            l.remote_handle = Some(a.handle);
            l.remote_attached = true;
            l.peer_max_message_size = a.max_message_size.unwrap_or(0);
            let link = LinkId {
                session,
                handle: l.handle,
            };
            // A peer that answers without a target (or source) refuses the link; its detach
            // follows.
            self.events.push_back(Event::LinkReady {
                link,
                attach: Box::new(a),
            });
            return Ok(());
        }
        if s.links.iter().filter(|l| !l.detached).count() as u32 >= max_links {
            return Err(Violation::new(
                "amqp:resource-limit-exceeded",
                format!("more than {max_links} links on one session"),
            )
            .label("max_links"));
        }
        let handle = (0..max_links)
            .find(|h| !s.links.iter().any(|l| l.handle == *h))
            .ok_or_else(|| {
                Violation::new("amqp:resource-limit-exceeded", "no handle free").label("max_links")
            })?;
        let role = a.role;
        s.links.push(Link {
            handle,
            remote_handle: Some(a.handle),
            role: match role {
                Role::Sender => Role::Receiver,
                Role::Receiver => Role::Sender,
            },
            name: a.name.clone(),
            delivery_count: a.initial_delivery_count.unwrap_or(0),
            credit: 0,
            window: 0,
            unsettled: 0,
            partial: None,
            peer_max_message_size: a.max_message_size.unwrap_or(0),
            detached: false,
            remote_attached: true,
        });
        self.events.push_back(Event::AttachRequested {
            link: LinkId { session, handle },
            role,
            attach: Box::new(a),
        });
        Ok(())
    }

    fn on_flow(&mut self, channel: u16, fl: Flow) -> Result<(), Violation> {
        let i = self.session_by_remote(channel)?;
        let s = &mut self.sessions[i];
        // The peer's incoming window, as of our next outgoing id.
        let next_in = fl.next_incoming_id.unwrap_or(0);
        s.remote_incoming_window = next_in
            .wrapping_add(fl.incoming_window)
            .wrapping_sub(s.next_outgoing_id);
        if s.remote_incoming_window > fl.incoming_window {
            // next-incoming-id ahead of what we sent: a lie; take no window from it.
            s.remote_incoming_window = 0;
        }
        let session = SessionId(s.channel);
        let window = s.remote_incoming_window;
        let Some(h) = fl.handle else {
            // Session-level flow: senders may have room again.
            let links: Vec<(u32, u32)> = s
                .links
                .iter()
                .filter(|l| l.role == Role::Sender && !l.detached && l.credit > 0)
                .map(|l| (l.handle, l.credit.min(window)))
                .collect();
            for (handle, credit) in links {
                if credit > 0 {
                    self.events.push_back(Event::Credit {
                        link: LinkId { session, handle },
                        credit,
                    });
                }
            }
            return Ok(());
        };
        let l = s.link_by_remote(h).ok_or_else(|| {
            Violation::new(
                "amqp:session:unattached-handle",
                format!("flow for handle {h}"),
            )
        })?;
        match l.role {
            Role::Sender => {
                let count = fl.delivery_count.unwrap_or(l.delivery_count);
                let credit = fl.link_credit.unwrap_or(0);
                // credit = delivery-count(rcv) + link-credit(rcv) - delivery-count(snd)
                l.credit = count.wrapping_add(credit).wrapping_sub(l.delivery_count);
                if l.credit > credit {
                    l.credit = 0;
                }
                let link = LinkId {
                    session,
                    handle: l.handle,
                };
                let c = l.credit.min(window);
                if c > 0 {
                    self.events.push_back(Event::Credit { link, credit: c });
                }
                if fl.echo {
                    // Answer with our link state.
                    let f = self.link_flow(i, link.handle);
                    write_frame(&mut self.out, TYPE_AMQP, self.sessions[i].channel, |b| {
                        f.encode(b)
                    });
                }
            }
            Role::Receiver => {
                // A sender's flow: drain or its state; we answer echo and otherwise ignore.
                if fl.echo {
                    let handle = l.handle;
                    let f = self.link_flow(i, handle);
                    write_frame(&mut self.out, TYPE_AMQP, self.sessions[i].channel, |b| {
                        f.encode(b)
                    });
                }
            }
        }
        Ok(())
    }

    fn link_flow(&self, i: usize, handle: u32) -> Performative {
        let s = &self.sessions[i];
        let l = s
            .links
            .iter()
            .find(|l| l.handle == handle)
            .expect("link exists");
        Performative::Flow(Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: s.incoming_window,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: u32::MAX,
            handle: Some(handle),
            delivery_count: Some(l.delivery_count),
            link_credit: Some(l.credit),
            available: None,
            drain: false,
            echo: false,
        })
    }

    fn on_transfer(&mut self, channel: u16, t: Transfer, payload: Bytes) -> Result<(), Violation> {
        let i = self.session_by_remote(channel)?;
        let max_message = self.config.max_message_size;
        let s = &mut self.sessions[i];
        if s.incoming_window == 0 {
            return Err(Violation::new(
                "amqp:session:window-violation",
                "a transfer beyond the session window",
            ));
        }
        s.incoming_window -= 1;
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        let session = SessionId(s.channel);
        let l = s.link_by_remote(t.handle).ok_or_else(|| {
            Violation::new(
                "amqp:session:unattached-handle",
                format!("transfer on handle {}", t.handle),
            )
        })?;
        if l.role != Role::Receiver {
            return Err(Violation::new(
                "amqp:not-allowed",
                "a transfer to a sending link",
            ));
        }
        let link = LinkId {
            session,
            handle: l.handle,
        };
        if t.aborted {
            l.partial = None;
            return Ok(());
        }
        let mut partial = match l.partial.take() {
            Some(p) => {
                if t.delivery_id.is_some_and(|id| id != p.id) {
                    return Err(Violation::new(
                        "amqp:not-allowed",
                        "a new delivery before the last one ended",
                    ));
                }
                p
            }
            None => {
                let id = t.delivery_id.ok_or(Violation::new(
                    "amqp:invalid-field",
                    "the first transfer of a delivery needs a delivery-id",
                ))?;
                if l.credit == 0 {
                    return Err(Violation::new(
                        "amqp:link:transfer-limit-exceeded",
                        "a delivery beyond the link credit granted",
                    ));
                }
                l.credit -= 1;
                l.delivery_count = l.delivery_count.wrapping_add(1);
                if t.settled != Some(true) {
                    l.unsettled += 1;
                }
                Partial {
                    id,
                    settled: t.settled == Some(true),
                    buf: BytesMut::new(),
                }
            }
        };
        if !t.more && partial.buf.is_empty() {
            // The whole delivery in one frame: no copy.
            if payload.len() as u64 > max_message {
                return Err(Violation::new(
                    "amqp:link:message-size-exceeded",
                    format!("a delivery exceeds {max_message} bytes"),
                ));
            }
            self.events.push_back(Event::Delivery {
                link,
                id: partial.id,
                settled: partial.settled,
                payload,
            });
        } else {
            if (partial.buf.len() + payload.len()) as u64 > max_message {
                return Err(Violation::new(
                    "amqp:link:message-size-exceeded",
                    format!("a delivery exceeds {max_message} bytes"),
                ));
            }
            partial.buf.extend_from_slice(&payload);
            if t.more {
                l.partial = Some(partial);
            } else {
                let payload = partial.buf.freeze();
                self.events.push_back(Event::Delivery {
                    link,
                    id: partial.id,
                    settled: partial.settled,
                    payload,
                });
            }
        }
        // Session window: top it up when half is used.
        let s = &mut self.sessions[i];
        if s.incoming_window <= self.config.incoming_window / 2 {
            s.incoming_window = self.config.incoming_window;
            let f = Performative::Flow(Flow {
                next_incoming_id: Some(s.next_incoming_id),
                incoming_window: s.incoming_window,
                next_outgoing_id: s.next_outgoing_id,
                outgoing_window: u32::MAX,
                ..Flow::default()
            });
            let ch = s.channel;
            write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        }
        Ok(())
    }

    fn on_disposition(&mut self, channel: u16, d: Disposition) -> Result<(), Violation> {
        let i = self.session_by_remote(channel)?;
        if d.role != Role::Receiver {
            // A sender settling deliveries we received: we settle first, nothing to do.
            return Ok(());
        }
        let s = &mut self.sessions[i];
        let session = SessionId(s.channel);
        let last = d.last.unwrap_or(d.first);
        if last.wrapping_sub(d.first) > u32::MAX / 2 {
            return Err(Violation::new(
                "amqp:invalid-field",
                "disposition range backwards",
            ));
        }
        if !d.settled {
            // Settle mode first only: an unsettled disposition carries a state we do not
            // keep; wait for the settled one.
            return Ok(());
        }
        let in_range = |id: u32| id.wrapping_sub(d.first) <= last.wrapping_sub(d.first);
        // Walk the unsettled deliveries in the range (they are in id order), grouping runs of
        // one link into one event.
        let mut run: Option<(u32, u32, u32)> = None; // (handle, first, last)
        let mut emitted = Vec::new();
        s.unsettled.retain(|&(id, handle)| {
            if !in_range(id) {
                return true;
            }
            match &mut run {
                Some((h, _, l)) if *h == handle && l.wrapping_add(1) == id => *l = id,
                _ => {
                    if let Some(r) = run.take() {
                        emitted.push(r);
                    }
                    run = Some((handle, id, id));
                }
            }
            false
        });
        if let Some(r) = run {
            emitted.push(r);
        }
        for (handle, first, last) in emitted {
            self.events.push_back(Event::Settled {
                link: LinkId { session, handle },
                first,
                last,
                outcome: d.state.clone(),
            });
        }
        Ok(())
    }

    fn on_detach(&mut self, channel: u16, d: Detach) -> Result<(), Violation> {
        let i = self.session_by_remote(channel)?;
        let s = &mut self.sessions[i];
        let session = SessionId(s.channel);
        let ch = s.channel;
        let Some(l) = s.link_by_remote(d.handle) else {
            // Our detach crossed with theirs and the link is gone: nothing to answer.
            return Ok(());
        };
        let handle = l.handle;
        let answered = l.detached;
        l.detached = true;
        if !answered {
            let f = Performative::Detach(Detach {
                handle,
                closed: true,
                error: None,
            });
            write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        }
        // Deliveries of the link that were never settled are the application's to resend.
        s.links.retain(|l| l.handle != handle);
        let dropped: Vec<u32> = s
            .unsettled
            .iter()
            .filter(|(_, h)| *h == handle)
            .map(|(id, _)| *id)
            .collect();
        s.unsettled.retain(|(_, h)| *h != handle);
        let _ = dropped;
        self.events.push_back(Event::Detached {
            link: LinkId { session, handle },
            error: d.error,
        });
        Ok(())
    }

    fn violation(&mut self, v: Violation) {
        let error = Error::new(v.condition, v.text);
        self.close_with(Some(error.clone()));
        self.state = ConnState::Closed;
        self.events.push_back(Event::Closed {
            error: Some(error),
            by_us: true,
            violation: Some(v.label),
        });
    }

    fn close_with(&mut self, error: Option<Error>) {
        if matches!(self.state, ConnState::Opened | ConnState::AwaitOpen) {
            let f = Performative::Close(error);
            write_frame(&mut self.out, TYPE_AMQP, 0, |b| f.encode(b));
        }
    }

    // ---------------------------------------------------------------------------------
    // Commands

    /// Begins a session (client).
    pub fn begin(&mut self) -> Result<SessionId, CommandError> {
        if self.state != ConnState::Opened
            && self.state != ConnState::AwaitHeader
            && self.state != ConnState::AwaitOpen
            && !matches!(
                self.state,
                ConnState::SaslStart | ConnState::SaslAwaitMechanisms | ConnState::SaslOutcome
            )
        {
            return Err(CommandError::NotOpen);
        }
        let ch = (0..self.config.max_sessions)
            .find(|c| !self.sessions.iter().any(|s| s.channel == *c))
            .ok_or(CommandError::NotOpen)?;
        let s = self.new_session(ch);
        let f = Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: s.next_outgoing_id,
            incoming_window: s.incoming_window,
            outgoing_window: u32::MAX,
            handle_max: self.config.max_links_per_session.saturating_sub(1),
            properties: None,
        });
        self.sessions.push(s);
        self.queue_when_open(ch, f);
        Ok(SessionId(ch))
    }

    /// Frames a client writes before the peer's open arrived wait until it did (pipelined
    /// open is allowed by the specification, but SASL must finish first).
    fn queue_when_open(&mut self, ch: u16, f: Performative) {
        if matches!(
            self.state,
            ConnState::Opened | ConnState::AwaitHeader | ConnState::AwaitOpen
        ) {
            write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        } else {
            self.early.push((ch, f));
        }
    }

    /// Attaches a sending link (client): `target` is the peer's address.
    pub fn attach_sender(
        &mut self,
        session: SessionId,
        name: &str,
        target: &str,
    ) -> Result<LinkId, CommandError> {
        let max_links = self.config.max_links_per_session;
        let s = self
            .sessions
            .iter_mut()
            .find(|s| s.channel == session.0 && !s.ended)
            .ok_or(CommandError::NotOpen)?;
        let handle = (0..max_links)
            .find(|h| !s.links.iter().any(|l| l.handle == *h))
            .ok_or(CommandError::NotOpen)?;
        s.links.push(Link {
            handle,
            remote_handle: None,
            role: Role::Sender,
            name: name.to_owned(),
            delivery_count: 0,
            credit: 0,
            window: 0,
            unsettled: 0,
            partial: None,
            peer_max_message_size: 0,
            detached: false,
            remote_attached: false,
        });
        let f = Performative::Attach(Attach {
            name: name.to_owned(),
            handle,
            role: Role::Sender,
            snd_settle_mode: 0,
            rcv_settle_mode: 0,
            source: Some(Terminus {
                address: Some(name.to_owned()),
            }),
            target: Some(Terminus {
                address: Some(target.to_owned()),
            }),
            initial_delivery_count: Some(0),
            max_message_size: None,
            properties: None,
        });
        self.queue_when_open(session.0, f);
        Ok(LinkId { session, handle })
    }

    /// Accepts a peer's attach (server): answers with our attach and, for our receiving
    /// link, grants `credit` (kept granted as deliveries are settled).
    pub fn accept_link(
        &mut self,
        link: LinkId,
        credit: u32,
        properties: Option<Raw>,
    ) -> Result<(), CommandError> {
        let max_message = self.config.max_message_size;
        let i = self.session_index(link.session)?;
        let ch = self.sessions[i].channel;
        let l = self.sessions[i]
            .link(link.handle)
            .ok_or(CommandError::NotOpen)?;
        let role = l.role;
        let name = l.name.clone();
        let f = Performative::Attach(Attach {
            name,
            handle: link.handle,
            role,
            snd_settle_mode: 0,
            // Settle mode first, whatever the peer asked: we keep no unsettled map.
            rcv_settle_mode: 0,
            source: Some(Terminus::default()),
            target: Some(Terminus::default()),
            initial_delivery_count: (role == Role::Sender).then_some(0),
            max_message_size: (role == Role::Receiver).then_some(max_message),
            properties,
        });
        write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        if role == Role::Receiver {
            let l = self.sessions[i].link(link.handle).expect("link exists");
            l.window = credit;
            l.credit = credit;
            let f = self.link_flow(i, link.handle);
            write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        }
        Ok(())
    }

    /// Refuses a peer's attach (server): answers with an attach without terminus, then a
    /// detach with `error` (part 2.6.3).
    pub fn refuse_link(&mut self, link: LinkId, error: Error) -> Result<(), CommandError> {
        let i = self.session_index(link.session)?;
        let ch = self.sessions[i].channel;
        let l = self.sessions[i]
            .link(link.handle)
            .ok_or(CommandError::NotOpen)?;
        let (role, name) = (l.role, l.name.clone());
        l.detached = true;
        let a = Performative::Attach(Attach {
            name,
            handle: link.handle,
            role,
            snd_settle_mode: 0,
            rcv_settle_mode: 0,
            source: None,
            target: None,
            initial_delivery_count: None,
            max_message_size: None,
            properties: None,
        });
        write_frame(&mut self.out, TYPE_AMQP, ch, |b| a.encode(b));
        let d = Performative::Detach(Detach {
            handle: link.handle,
            closed: true,
            error: Some(error),
        });
        write_frame(&mut self.out, TYPE_AMQP, ch, |b| d.encode(b));
        Ok(())
    }

    fn session_index(&self, s: SessionId) -> Result<usize, CommandError> {
        self.sessions
            .iter()
            .position(|x| x.channel == s.0 && !x.ended)
            .ok_or(CommandError::NotOpen)
    }

    /// Sends one delivery (an encoded bare message) unsettled on a sending link; returns its
    /// delivery id. Split into frames of the peer's maximum size.
    pub fn send(&mut self, link: LinkId, tag: &[u8], payload: &[u8]) -> Result<u32, CommandError> {
        let peer_max_frame = self.peer_max_frame as usize;
        let i = self.session_index(link.session)?;
        let s = &mut self.sessions[i];
        let ch = s.channel;
        let window = s.remote_incoming_window;
        let next_id = s.next_delivery_id;
        let l = s
            .links
            .iter_mut()
            .find(|l| l.handle == link.handle && !l.detached && l.remote_attached)
            .ok_or(CommandError::NotOpen)?;
        if l.role != Role::Sender {
            return Err(CommandError::NotOpen);
        }
        if l.peer_max_message_size > 0 && payload.len() as u64 > l.peer_max_message_size {
            return Err(CommandError::TooLarge {
                len: payload.len(),
                max: l.peer_max_message_size,
            });
        }
        // Frames this delivery takes: the performative's overhead is at most 64 bytes here
        // (delivery tags are at most 32).
        let room = peer_max_frame.saturating_sub(8 + 64).max(1);
        let frames = payload.len().div_ceil(room).max(1) as u32;
        if l.credit == 0 || window < frames {
            return Err(CommandError::NoCredit);
        }
        l.credit -= 1;
        l.delivery_count = l.delivery_count.wrapping_add(1);
        let id = next_id;
        let mut chunks = payload.chunks(room).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let more = chunks.peek().is_some();
            let t = Transfer {
                handle: link.handle,
                delivery_id: first.then_some(id),
                delivery_tag: first.then(|| Bytes::copy_from_slice(tag)),
                message_format: first.then_some(0),
                settled: first.then_some(false),
                more,
                ..Transfer::default()
            };
            write_frame(&mut self.out, TYPE_AMQP, ch, |b| {
                Performative::Transfer(t).encode(b);
                bytes::BufMut::put_slice(b, chunk);
            });
            first = false;
            if !more {
                break;
            }
        }
        let s = &mut self.sessions[i];
        s.next_outgoing_id = s.next_outgoing_id.wrapping_add(frames);
        s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
        s.remote_incoming_window -= frames;
        s.unsettled.push_back((id, link.handle));
        Ok(id)
    }

    /// Settles a received delivery with `outcome` (settle mode first: the disposition is
    /// settled). Consecutive settles with one outcome leave as one ranged disposition; the
    /// link's credit is topped up as deliveries are settled.
    pub fn settle(&mut self, link: LinkId, id: u32, outcome: Outcome) -> Result<(), CommandError> {
        let i = self.session_index(link.session)?;
        let s = &mut self.sessions[i];
        let l = s
            .links
            .iter_mut()
            .find(|l| l.handle == link.handle)
            .ok_or(CommandError::NotOpen)?;
        l.unsettled = l.unsettled.saturating_sub(1);
        match &mut s.pending {
            Some((_, last, o)) if last.wrapping_add(1) == id && *o == outcome => *last = id,
            _ => {
                self.flush_disposition(i);
                self.sessions[i].pending = Some((id, id, outcome));
            }
        }
        // Credit back to the window once half of it is used.
        let ch = self.sessions[i].channel;
        let l = self.sessions[i].link(link.handle).expect("link exists");
        let target = l.window.saturating_sub(l.unsettled);
        if target >= l.credit + l.window.div_ceil(2) {
            l.credit = target;
            self.flush_disposition(i);
            let f = self.link_flow(i, link.handle);
            write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        }
        Ok(())
    }

    fn flush_disposition(&mut self, i: usize) {
        let s = &mut self.sessions[i];
        if let Some((first, last, outcome)) = s.pending.take() {
            let ch = s.channel;
            let f = Performative::Disposition(Disposition {
                role: Role::Receiver,
                first,
                last: (last != first).then_some(last),
                settled: true,
                state: Some(outcome),
                batchable: false,
            });
            write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        }
    }

    fn flush_pending(&mut self) {
        for i in 0..self.sessions.len() {
            self.flush_disposition(i);
        }
    }

    /// Detaches a link (closing it) with an optional error.
    pub fn detach(&mut self, link: LinkId, error: Option<Error>) -> Result<(), CommandError> {
        let i = self.session_index(link.session)?;
        // Outcomes already decided leave before the detach.
        self.flush_disposition(i);
        let ch = self.sessions[i].channel;
        let l = self.sessions[i]
            .link(link.handle)
            .ok_or(CommandError::NotOpen)?;
        if l.detached {
            return Ok(());
        }
        l.detached = true;
        let f = Performative::Detach(Detach {
            handle: link.handle,
            closed: true,
            error,
        });
        write_frame(&mut self.out, TYPE_AMQP, ch, |b| f.encode(b));
        Ok(())
    }

    /// Closes the connection with an optional error; [`Event::Closed`] follows the peer's
    /// close.
    pub fn close(&mut self, error: Option<Error>) {
        if matches!(self.state, ConnState::Closed | ConnState::CloseSent) {
            return;
        }
        if matches!(self.state, ConnState::Opened | ConnState::AwaitOpen) {
            self.flush_pending();
            self.close_with(error);
            self.state = ConnState::CloseSent;
        } else {
            self.state = ConnState::Closed;
            self.events.push_back(Event::Closed {
                error,
                by_us: true,
                violation: None,
            });
        }
    }
}
