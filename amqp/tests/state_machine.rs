//! The state machines without sockets: frames in, frames and events out. What a hostile
//! peer tries, and what the engine answers.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use drawbridge_amqp::{
    codec::Raw,
    connection::{Config, Connection, Event, LinkId},
    frame::{self, AMQP_HEADER, SASL_HEADER, TYPE_AMQP, TYPE_SASL},
    performatives::{
        write_frame, Attach, Begin, Disposition, Open, Outcome, Performative, Role, Sasl, Terminus,
        Transfer,
    },
};
use proptest::prelude::*;

/// The peer's side of a connection, written by hand.
struct Peer {
    bytes: BytesMut,
}

impl Peer {
    fn new() -> Self {
        Peer {
            bytes: BytesMut::new(),
        }
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }
    fn sasl(&mut self, s: Sasl) -> &mut Self {
        write_frame(&mut self.bytes, TYPE_SASL, 0, |b| s.encode(b));
        self
    }
    fn frame(&mut self, ch: u16, p: Performative) -> &mut Self {
        write_frame(&mut self.bytes, TYPE_AMQP, ch, |b| p.encode(b));
        self
    }
    fn transfer(&mut self, ch: u16, t: Transfer, payload: &[u8]) -> &mut Self {
        write_frame(&mut self.bytes, TYPE_AMQP, ch, |b| {
            Performative::Transfer(t).encode(b);
            bytes::BufMut::put_slice(b, payload);
        });
        self
    }
    /// What a bridge sends a float up to its `open`: SASL with `mechanism`, then AMQP.
    fn bridge_hello(&mut self, mechanism: &'static [u8], idle_ms: u32) -> &mut Self {
        self.raw(&SASL_HEADER)
            .sasl(Sasl::Init {
                mechanism: Bytes::from_static(mechanism),
                initial_response: None,
                hostname: None,
            })
            .raw(&AMQP_HEADER)
            .frame(0, open(idle_ms))
    }

    /// What a float answers a bridge up to its `open`.
    fn float_hello(&mut self, idle_ms: u32) -> &mut Self {
        self.raw(&SASL_HEADER)
            .sasl(Sasl::Mechanisms(vec![Bytes::from_static(b"EXTERNAL")]))
            .sasl(Sasl::Outcome(0))
            .raw(&AMQP_HEADER)
            .frame(0, open(idle_ms))
    }

    fn feed(&mut self, c: &mut Connection) -> Vec<Event> {
        c.handle_input(&mut self.bytes, Instant::now());
        let mut events = Vec::new();
        while let Some(e) = c.poll_event() {
            events.push(e);
        }
        events
    }
}

fn open(idle_ms: u32) -> Performative {
    Performative::Open(Open {
        container_id: "peer".into(),
        max_frame_size: 65_536,
        channel_max: 9,
        idle_timeout_ms: Some(idle_ms),
        ..Open::default()
    })
}

fn begin() -> Performative {
    Performative::Begin(Begin {
        next_outgoing_id: 0,
        incoming_window: 5000,
        outgoing_window: 5000,
        handle_max: 10,
        ..Begin::default()
    })
}

fn attach_sender(handle: u32, rcv_settle_mode: u8) -> Performative {
    Performative::Attach(Attach {
        name: format!("l{handle}"),
        handle,
        role: Role::Sender,
        snd_settle_mode: 2,
        rcv_settle_mode,
        source: Some(Terminus {
            address: Some("q".into()),
        }),
        target: Some(Terminus {
            address: Some("inbox".into()),
        }),
        initial_delivery_count: Some(0),
        max_message_size: None,
        properties: None,
    })
}

fn transfer(handle: u32, id: u32, more: bool) -> Transfer {
    Transfer {
        handle,
        delivery_id: Some(id),
        delivery_tag: Some(Bytes::copy_from_slice(&id.to_be_bytes())),
        message_format: Some(0),
        settled: Some(false),
        more,
        ..Transfer::default()
    }
}

/// Every frame the connection wrote, decoded.
fn written(c: &mut Connection) -> Vec<Performative> {
    let mut out = BytesMut::from(c.transmit());
    let n = out.len();
    c.written(n, Instant::now());
    let mut frames = Vec::new();
    while out.starts_with(b"AMQP") {
        let _ = out.split_to(8);
    }
    while let Some(f) = frame::take_frame(&mut out, u32::MAX).unwrap() {
        if f.frame_type == TYPE_AMQP && !f.body.is_empty() {
            let (p, _) = Performative::decode(&f.body, Default::default()).unwrap();
            frames.push(p);
        }
        while out.starts_with(b"AMQP") {
            let _ = out.split_to(8);
        }
    }
    frames
}

fn config() -> Config {
    Config {
        max_message_size: 10_000,
        ..Config::default()
    }
}

/// A server connection with one session and one accepted receiving link of `credit`.
fn server_with_link(credit: u32) -> (Connection, LinkId) {
    let mut c = Connection::server(config());
    let events = Peer::new()
        .bridge_hello(b"EXTERNAL", 30_000)
        .frame(0, begin())
        .frame(0, attach_sender(0, 0))
        .feed(&mut c);
    let link = events
        .iter()
        .find_map(|e| match e {
            Event::AttachRequested { link, .. } => Some(*link),
            _ => None,
        })
        .expect("attach requested");
    c.accept_link(link, credit, None).unwrap();
    let _ = written(&mut c);
    (c, link)
}

/// The violation label the float counts refusals by.
fn violation(events: &[Event]) -> Option<&'static str> {
    events.iter().find_map(|e| match e {
        Event::Closed { violation, .. } => *violation,
        _ => None,
    })
}

fn closed_with(events: &[Event]) -> Option<String> {
    events.iter().find_map(|e| match e {
        Event::Closed {
            error: Some(e),
            by_us: true,
            ..
        } => Some(String::from_utf8_lossy(&e.condition).into_owned()),
        _ => None,
    })
}

#[test]
fn a_delivery_beyond_the_credit_granted_closes_the_connection() {
    let (mut c, _) = server_with_link(2);
    let events = Peer::new()
        .transfer(0, transfer(0, 0, false), b"a")
        .transfer(0, transfer(0, 1, false), b"b")
        .transfer(0, transfer(0, 2, false), b"c")
        .feed(&mut c);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Delivery { .. }))
            .count(),
        2
    );
    assert_eq!(
        closed_with(&events).as_deref(),
        Some("amqp:link:transfer-limit-exceeded")
    );
    assert_eq!(violation(&events), Some("credit"));
    assert!(c.is_closed());
}

#[test]
fn a_delivery_over_the_max_message_size_is_refused_while_it_is_assembled() {
    let (mut c, _) = server_with_link(10);
    let mut p = Peer::new();
    for _ in 0..3 {
        p.transfer(0, transfer(0, 0, true), &[0u8; 4000]);
    }
    let events = p.feed(&mut c);
    assert_eq!(
        closed_with(&events).as_deref(),
        Some("amqp:link:message-size-exceeded")
    );
    assert_eq!(violation(&events), Some("message_size"));
}

#[test]
fn settle_mode_second_is_answered_with_first() {
    let mut c = Connection::server(config());
    let events = Peer::new()
        .bridge_hello(b"ANONYMOUS", 30_000)
        .frame(0, begin())
        .frame(0, attach_sender(0, 1))
        .feed(&mut c);
    let link = events.iter().find_map(|e| match e {
        Event::AttachRequested { link, .. } => Some(*link),
        _ => None,
    });
    c.accept_link(link.unwrap(), 5, None).unwrap();
    let answer = written(&mut c)
        .into_iter()
        .find_map(|p| match p {
            Performative::Attach(a) => Some(a),
            _ => None,
        })
        .unwrap();
    assert_eq!(answer.rcv_settle_mode, 0);
    // And every disposition it sends is settled.
    Peer::new()
        .transfer(0, transfer(0, 0, false), b"x")
        .feed(&mut c);
    c.settle(link.unwrap(), 0, Outcome::Accepted).unwrap();
    let d = written(&mut c)
        .into_iter()
        .find_map(|p| match p {
            Performative::Disposition(d) => Some(d),
            _ => None,
        })
        .unwrap();
    assert!(d.settled);
}

#[test]
fn sessions_and_links_past_the_limits_close_the_connection() {
    let mut c = Connection::server(Config {
        max_sessions: 2,
        max_links_per_session: 2,
        ..config()
    });
    let mut p = Peer::new();
    p.bridge_hello(b"EXTERNAL", 30_000);
    for ch in 0..3 {
        p.frame(ch, begin());
    }
    let events = p.feed(&mut c);
    assert_eq!(
        closed_with(&events).as_deref(),
        Some("amqp:resource-limit-exceeded")
    );
    assert_eq!(violation(&events), Some("max_sessions"));

    let (mut c, _) = server_with_link(1);
    let events = Peer::new()
        .frame(0, attach_sender(1, 0))
        .frame(0, attach_sender(2, 0))
        .feed(&mut c);
    assert!(
        closed_with(&events).is_none(),
        "two links are allowed (default 32)"
    );
}

#[test]
fn an_idle_timeout_below_the_minimum_is_refused() {
    let mut c = Connection::server(config());
    let events = Peer::new().bridge_hello(b"EXTERNAL", 1).feed(&mut c);
    assert_eq!(
        closed_with(&events).as_deref(),
        Some("amqp:resource-limit-exceeded")
    );
    assert_eq!(violation(&events), Some("idle_timeout"));
}

#[test]
fn a_frame_over_the_maximum_is_refused_from_its_header() {
    let (mut c, _) = server_with_link(1);
    // A header claiming 1 GiB: refused before a byte of the body is waited for.
    let events = Peer::new().raw(&[0x40, 0, 0, 0, 2, 0, 0, 0]).feed(&mut c);
    assert_eq!(
        closed_with(&events).as_deref(),
        Some("amqp:connection:framing-error")
    );
    assert_eq!(violation(&events), Some("frames"));
}

#[test]
fn a_nested_disposition_from_a_hostile_float_is_refused_and_the_client_closes() {
    let mut c = Connection::client(config());
    let _ = written(&mut c);
    let s = c.begin().unwrap();
    let _ = c.attach_sender(s, "l", "inbox").unwrap();
    let events = Peer::new()
        .float_hello(30_000)
        .frame(
            0,
            Performative::Begin(Begin {
                remote_channel: Some(0),
                next_outgoing_id: 0,
                incoming_window: 100,
                outgoing_window: 100,
                handle_max: 3,
                properties: None,
            }),
        )
        .feed(&mut c);
    assert!(events.iter().any(|e| matches!(e, Event::Opened(_))));
    assert!(events.iter().any(|e| matches!(e, Event::SessionReady(_))));
    // A rejected disposition whose error info nests 10,000 levels (the encoder writes the
    // info as the bytes given; the decoder validates them).
    let mut info = vec![0x40u8];
    for _ in 0..10_000 {
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
        state: Some(Outcome::Rejected(Some(
            drawbridge_amqp::performatives::Error {
                condition: Bytes::from_static(b"amqp:x"),
                description: None,
                info: Some(Raw(Bytes::from(info))),
            },
        ))),
        batchable: false,
    });
    // Bigger than the default 256 KiB frame? 10,000 levels × 9 bytes = 90 KB: within.
    let events = Peer::new().frame(0, d).feed(&mut c);
    assert_eq!(closed_with(&events).as_deref(), Some("amqp:decode-error"));
    assert_eq!(violation(&events), Some("frames"));
    assert!(c.is_closed());
}

#[test]
fn heartbeats_go_out_at_half_the_peers_timeout_and_silence_closes() {
    let mut c = Connection::client(Config {
        idle_timeout: Duration::from_secs(10),
        ..config()
    });
    let t0 = Instant::now();
    let n = c.transmit().len();
    c.written(n, t0);
    let events = Peer::new().float_hello(4_000).feed(&mut c);
    assert!(matches!(events[..], [Event::Opened(_)]));
    let n = c.transmit().len();
    c.written(n, t0);
    let due = c.poll_timeout().unwrap();
    assert!(due <= t0 + Duration::from_secs(2));
    c.handle_timeout(t0 + Duration::from_secs(2));
    assert_eq!(c.transmit(), &[0, 0, 0, 8, 2, 0, 0, 0]);
    c.written(8, t0 + Duration::from_secs(2));
    c.handle_timeout(t0 + Duration::from_secs(11));
    assert!(matches!(
        c.poll_event(),
        Some(Event::Closed {
            by_us: true,
            violation: Some("silent"),
            ..
        })
    ));
}

proptest! {
    /// Whatever bytes a peer sends, in whatever pieces, the server never panics, never
    /// buffers more than a frame, and ends in the same state as when fed all at once.
    #[test]
    fn arbitrary_bytes_never_panic_and_chunking_does_not_matter(
        prefix in prop::bool::ANY,
        data in prop::collection::vec(any::<u8>(), 0..2048),
        cut in 1usize..64,
    ) {
        let mut whole = BytesMut::new();
        if prefix {
            whole.extend_from_slice(&SASL_HEADER);
            write_frame(&mut whole, TYPE_SASL, 0, |b| Sasl::Init { mechanism: Bytes::from_static(b"EXTERNAL"), initial_response: None, hostname: None }.encode(b));
            whole.extend_from_slice(&AMQP_HEADER);
            write_frame(&mut whole, TYPE_AMQP, 0, |b| open(30_000).encode(b));
        }
        whole.extend_from_slice(&data);
        let mut a = Connection::server(config());
        let mut buf = whole.clone();
        a.handle_input(&mut buf, Instant::now());
        let mut b = Connection::server(config());
        let mut pending = BytesMut::new();
        for chunk in whole.chunks(cut) {
            pending.extend_from_slice(chunk);
            b.handle_input(&mut pending, Instant::now());
        }
        prop_assert_eq!(a.is_closed(), b.is_closed());
        prop_assert_eq!(a.transmit().to_vec(), b.transmit().to_vec());
    }
}
