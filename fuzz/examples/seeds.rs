//! Writes the seed corpora under `fuzz/seeds/<target>/` from Drawbridge's own encoders, so the
//! fuzzers start from well-formed inputs. Run from `fuzz/`: `cargo +nightly run --example seeds`
//! (the certificates in `seeds/legal_name_der/` were made with `openssl req -x509 -outform DER`
//! and an EC P-256 key, subjects in several string encodings and one multi-valued RDN).

use std::{fs, path::Path};

use drawbridge_control_protocol::{
    ControlCommand, CreateLink, DeleteLink, LinkState, LinkStatus, Notification, PeerLink,
    SequencedCommand, Snapshot, SnapshotRequest,
};
use drawbridge_runtime::frame_guard::{Frames, Scanner};
use drawbridge_mapping::outbound::message_to_amqp;
use drawbridge_mapping::{headers, inbound::from_amqp};
use fe2o3_amqp::types::{
    definitions::{Fields, Handle, ReceiverSettleMode, Role, SenderSettleMode},
    messaging::{
        message::__private::{Deserializable, Serializable},
        Body, Message, Properties,
    },
    performatives::{Attach, Begin, Open, Performative, Transfer},
    primitives::{Binary, Value},
};
use lapin::{
    types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties,
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn link(queue: &str) -> PeerLink {
    PeerLink {
        queue: queue.into(),
        targets: vec![
            "float.bank-b.example:5671".parse().unwrap(),
            "[::1]:5671".parse().unwrap(),
        ],
        legal_names: vec![
            "O=Bank B, L=Paris, C=FR".into(),
            "O=Foo\\, Inc, C=US".into(),
        ],
        target_address: "drawbridge".into(),
    }
}

fn control() {
    let node = "O=Bank A, L=London, C=GB".to_string();
    let commands = [
        ControlCommand::Snapshot(Snapshot {
            node_identity: node.clone(),
            inbox_queues: vec!["inbox".into()],
            links: vec![link("to-bank-b"), link("to-bank-c")],
        }),
        ControlCommand::CreateLink(CreateLink {
            node_identity: node.clone(),
            link: link("to-bank-b"),
        }),
        ControlCommand::DeleteLink(DeleteLink {
            node_identity: node,
            queue: "to-bank-b".into(),
        }),
    ];
    for (i, c) in commands.into_iter().enumerate() {
        write("control_decode", &format!("unsequenced-{i}"), &c.encode());
        let s = SequencedCommand {
            sequence: 42 + i as u64,
            epoch: 0x5eed + i as u64,
            command: c,
        };
        write("control_decode", &format!("sequenced-{i}"), &s.encode());
    }
    let notes = [
        Notification::SnapshotRequest(SnapshotRequest {
            bridge_id: "bridge-1".into(),
        }),
        Notification::LinkStatus(LinkStatus {
            bridge_id: "bridge-1".into(),
            queue: "to-bank-b".into(),
            state: LinkState::Down,
            peer: "O=Bank B, L=Paris, C=FR".into(),
            reason: "connection refused".into(),
            timestamp_ms: 1_700_000_000_000,
        }),
    ];
    for (i, n) in notes.into_iter().enumerate() {
        write("control_decode", &format!("notify-{i}"), &n.encode());
    }
}

/// Messages as the bridge sends them (encoded): every property, rich headers.
fn bridge_messages() -> Vec<Vec<u8>> {
    let mut rich = FieldTable::default();
    rich.insert(
        ShortString::from(headers::DESTINATION),
        AMQPValue::LongString(LongString::from("O=Bank B, L=Paris, C=FR")),
    );
    rich.insert("n".into(), AMQPValue::LongLongInt(-5));
    rich.insert("f".into(), AMQPValue::Double(1.5));
    rich.insert(
        "d".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    rich.insert("t".into(), AMQPValue::Timestamp(1_700_000_000));
    rich.insert("b".into(), AMQPValue::ByteArray(vec![0, 1, 2].into()));
    let mut inner = FieldTable::default();
    inner.insert("x".into(), AMQPValue::Boolean(true));
    rich.insert(
        "a".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::FieldTable(inner),
            AMQPValue::Void,
            AMQPValue::ShortShortUInt(7),
        ])),
    );
    let full = BasicProperties::default()
        .with_message_id("id-1".into())
        .with_correlation_id("corr".into())
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_reply_to("replies".into())
        .with_type("order".into())
        .with_user_id("guest".into())
        .with_app_id("app".into())
        .with_cluster_id("cluster".into())
        .with_priority(7)
        .with_expiration("60000".into())
        .with_timestamp(1_700_000_000)
        .with_headers(rich);
    let mut plain = FieldTable::default();
    plain.insert(
        ShortString::from(headers::DESTINATION),
        AMQPValue::LongString(LongString::from("O=Bank B, L=Paris, C=FR")),
    );
    let minimal = BasicProperties::default()
        .with_message_id("m".into())
        .with_headers(plain);
    [(full, &b"{\"amount\": 100}"[..]), (minimal, b"")]
        .into_iter()
        .map(|(p, body)| {
            let m = message_to_amqp(&p, body, 1 << 20).unwrap();
            serde_amqp::to_vec(&Serializable(m)).unwrap()
        })
        .collect()
}

/// Messages a foreign AMQP 1.0 sender might send (encoded): other body kinds and id types.
fn foreign_messages() -> Vec<Vec<u8>> {
    let props = |id: Value| {
        let mut p = Properties::default();
        p.message_id = match id {
            Value::Ulong(n) => Some(n.into()),
            Value::String(s) => Some(s.into()),
            _ => None,
        };
        p
    };
    let mut app = fe2o3_amqp::types::messaging::ApplicationProperties::default();
    app.0.insert(
        headers::DESTINATION.to_string(),
        fe2o3_amqp::types::primitives::SimpleValue::String("O=Bank B".into()),
    );
    let value = Message::builder()
        .properties(props(Value::Ulong(5)))
        .application_properties(app.clone())
        .value(Value::String("hello".into()))
        .build();
    let list = Message::builder()
        .properties(props(Value::String("seq".into())))
        .application_properties(app)
        .value(Value::List(vec![
            Value::Int(1),
            Value::Map(Default::default()),
        ]))
        .build();
    let binary = Message::builder()
        .value(Value::Binary(Binary::from(vec![1, 2, 3])))
        .build();
    [value, list, binary]
        .into_iter()
        .map(|m| serde_amqp::to_vec(&Serializable(m)).unwrap())
        .collect()
}

fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
    let size = u32::try_from(8 + body.len()).unwrap();
    let mut f = size.to_be_bytes().to_vec();
    f.extend_from_slice(&[2, 0]);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn performative(p: Performative) -> Vec<u8> {
    serde_amqp::to_vec(&p).unwrap()
}

fn transfer(handle: u32, more: bool) -> Performative {
    Performative::Transfer(Transfer {
        handle: Handle(handle),
        delivery_id: Some(0),
        delivery_tag: Some(vec![0u8].into()),
        message_format: Some(0),
        settled: Some(false),
        more,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    })
}

/// A connection's bytes up to a transfer of `message`, split over two frames.
fn connection(message: &[u8]) -> Vec<u8> {
    let mut out = b"AMQP\x00\x01\x00\x00".to_vec();
    out.extend(frame(
        0,
        &performative(Performative::Open(Open {
            container_id: "bank-a".into(),
            hostname: Some("float".into()),
            max_frame_size: (256 * 1024).into(),
            channel_max: 255.into(),
            idle_time_out: Some(30_000),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: Some(Fields::default()),
        })),
    ));
    out.extend(frame(
        0,
        &performative(Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 2048,
            outgoing_window: 2048,
            handle_max: 255.into(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })),
    ));
    out.extend(frame(
        0,
        &performative(Performative::Attach(Attach {
            name: "link".into(),
            handle: Handle(0),
            role: Role::Sender,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: None,
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })),
    ));
    let (a, b) = message.split_at(message.len() / 2);
    let mut first = performative(transfer(0, true));
    first.extend_from_slice(a);
    out.extend(frame(0, &first));
    let mut second = performative(transfer(0, false));
    second.extend_from_slice(b);
    out.extend(frame(0, &second));
    // A heartbeat.
    out.extend(frame(0, &[]));
    out
}

fn float() {
    let messages: Vec<Vec<u8>> = bridge_messages()
        .into_iter()
        .chain(foreign_messages())
        .collect();
    for (i, m) in messages.iter().enumerate() {
        // Each passes the frame guard and decodes; the bridge's also pass `from_amqp`.
        let mut scanner = Scanner::new();
        assert_eq!(scanner.feed(m, None), Ok(m.len()));
        assert!(scanner.at_boundary());
        let back: Deserializable<Message<Body<Value>>> = serde_amqp::from_slice(m).unwrap();
        let converted = from_amqp(back.0, 1 << 20);
        assert!(i >= 2 || converted.is_ok(), "message-{i}: {converted:?}");
        write("float_message", &format!("message-{i}"), m);
    }
    for (i, m) in messages.iter().take(3).enumerate() {
        // The first byte seeds the chunking.
        let mut input = vec![i as u8 * 37 + 5];
        input.extend(connection(m));
        Frames::new(256 * 1024).feed(&input[1..]).unwrap();
        write("float_frames", &format!("connection-{i}"), &input);
    }
}

/// What a float answers a bridge: SASL, open, begin, attach, flow, dispositions (accepted,
/// rejected with an error and its info), detach, end, close.
fn bridge() {
    use drawbridge_runtime::frame_guard::PeerLimits;
    use fe2o3_amqp::types::{
        definitions::{self, AmqpError},
        messaging::{Accepted, Rejected},
        performatives::{Close, Detach, Disposition, End, Flow},
        primitives::{OrderedMap, Symbol},
        sasl::{SaslCode, SaslMechanisms, SaslOutcome},
    };
    let sasl = |body: Vec<u8>| {
        let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 1, 0, 0]);
        f.extend(body);
        f
    };
    let mut info = OrderedMap::new();
    info.insert(
        Symbol::from("x-reason"),
        Value::List(vec![Value::String("nested".into()), Value::Int(1)]),
    );
    let error = definitions::Error::new(
        AmqpError::NotAllowed,
        Some("refused".to_string()),
        Some(info),
    );
    let mut out = b"AMQP\x03\x01\x00\x00".to_vec();
    out.extend(sasl(
        serde_amqp::to_vec(&SaslMechanisms {
            sasl_server_mechanisms: vec![Symbol::from("EXTERNAL"), Symbol::from("ANONYMOUS")]
                .into(),
        })
        .unwrap(),
    ));
    out.extend(sasl(
        serde_amqp::to_vec(&SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
        .unwrap(),
    ));
    out.extend_from_slice(b"AMQP\x00\x01\x00\x00");
    let answers = [
        Performative::Open(Open {
            container_id: "drawbridge-float".into(),
            hostname: None,
            max_frame_size: (256 * 1024).into(),
            channel_max: 7.into(),
            idle_time_out: Some(60_000),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        Performative::Begin(Begin {
            remote_channel: Some(0),
            next_outgoing_id: 0,
            incoming_window: 2048,
            outgoing_window: 2048,
            handle_max: 31.into(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        Performative::Attach(Attach {
            name: "link".into(),
            handle: Handle(0),
            role: Role::Receiver,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: None,
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: Some(1 << 20),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 2048,
            next_outgoing_id: 0,
            outgoing_window: 2048,
            handle: Some(Handle(0)),
            delivery_count: Some(0),
            link_credit: Some(1000),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        }),
        Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: 0,
            last: Some(3),
            settled: true,
            state: Some(Accepted {}.into()),
            batchable: false,
        }),
        Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: 4,
            last: None,
            settled: true,
            state: Some(
                Rejected {
                    error: Some(error.clone()),
                }
                .into(),
            ),
            batchable: false,
        }),
        Performative::Detach(Detach {
            handle: Handle(0),
            closed: true,
            error: Some(error.clone()),
        }),
        Performative::End(End {
            error: Some(error.clone()),
        }),
        Performative::Close(Close { error: Some(error) }),
    ];
    for p in answers {
        out.extend(frame(0, &performative(p)));
    }
    // A heartbeat.
    out.extend(frame(0, &[]));
    for i in 0..3u8 {
        let mut input = vec![i * 41 + 3];
        input.extend_from_slice(&out);
        Frames::with_limits(256 * 1024, PeerLimits::FOR_A_FLOAT)
            .feed(&input[1..])
            .unwrap();
        write("bridge_frames", &format!("float-answers-{i}"), &input);
    }
}

fn legal_names() {
    for (i, n) in [
        "O=Bank A, L=London, C=GB",
        "C=GB, L=London, O=Bank A",
        "CN=node, OU=Payments, O=Foo\\, Inc, L=New York, ST=NY, C=US",
        "2.5.4.97=VATGB-123, O=Bank A, C=GB, SERIALNUMBER=42, DC=example, UID=u1",
        "o = Bank\\\\A , street=1 Main St",
        "O=Bänk Ä, L=Zürich, C=CH",
    ]
    .iter()
    .enumerate()
    {
        write("legal_name", &format!("name-{i}"), n.as_bytes());
    }
}

/// Seeds for the engine's targets, written with its own encoder: performative bodies for
/// `amqp_decode`, whole conversations for `amqp_connection` (a peer of each side).
fn amqp() {
    use bytes::{Bytes, BytesMut};
    use drawbridge_amqp::{
        frame::{AMQP_HEADER, SASL_HEADER, TYPE_AMQP, TYPE_SASL},
        message::write_data_message,
        performatives as p,
    };
    let error = Some(p::Error::new("amqp:not-allowed", "no"));
    let frames = vec![
        p::Performative::Open(p::Open {
            container_id: "bridge".into(),
            hostname: Some("float".into()),
            max_frame_size: 4096,
            channel_max: 3,
            idle_timeout_ms: Some(15_000),
            properties: None,
        }),
        p::Performative::Begin(p::Begin {
            remote_channel: Some(0),
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: 7,
            properties: None,
        }),
        p::Performative::Attach(p::Attach {
            name: "l".into(),
            handle: 0,
            role: p::Role::Sender,
            snd_settle_mode: 0,
            rcv_settle_mode: 0,
            source: Some(p::Terminus {
                address: Some("q".into()),
            }),
            target: Some(p::Terminus {
                address: Some("drawbridge.inbox".into()),
            }),
            initial_delivery_count: Some(0),
            max_message_size: Some(65_536),
            properties: None,
        }),
        p::Performative::Attach(p::Attach {
            name: "l".into(),
            handle: 0,
            role: p::Role::Receiver,
            snd_settle_mode: 0,
            rcv_settle_mode: 0,
            source: Some(p::Terminus::default()),
            target: Some(p::Terminus::default()),
            initial_delivery_count: None,
            max_message_size: Some(65_536),
            properties: None,
        }),
        p::Performative::Flow(p::Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(0),
            delivery_count: Some(0),
            link_credit: Some(8),
            available: None,
            drain: false,
            echo: false,
        }),
        p::Performative::Transfer(p::Transfer {
            handle: 0,
            delivery_id: Some(0),
            delivery_tag: Some(Bytes::from_static(b"t0")),
            message_format: Some(0),
            settled: Some(false),
            more: false,
            ..p::Transfer::default()
        }),
        p::Performative::Disposition(p::Disposition {
            role: p::Role::Receiver,
            first: 0,
            last: Some(3),
            settled: true,
            state: Some(p::Outcome::Accepted),
            batchable: false,
        }),
        p::Performative::Disposition(p::Disposition {
            role: p::Role::Receiver,
            first: 4,
            last: None,
            settled: true,
            state: Some(p::Outcome::Rejected(error.clone())),
            batchable: false,
        }),
        p::Performative::Detach(p::Detach {
            handle: 0,
            closed: true,
            error: error.clone(),
        }),
        p::Performative::End(None),
        p::Performative::Close(error),
    ];
    for (i, f) in frames.iter().enumerate() {
        let mut b = Vec::new();
        f.encode(&mut b);
        write("amqp_decode", &format!("performative-{i}"), &b);
    }
    let frame = |out: &mut BytesMut, ch: u16, f: &p::Performative, payload: &[u8]| {
        p::write_frame(out, TYPE_AMQP, ch, |b| {
            f.encode(b);
            b.extend_from_slice(payload);
        });
    };
    let mut body = Vec::new();
    write_data_message(&mut body, b"id-1", b"hello");
    // A bridge talking to the float (server side; first byte: chunking seed, bit 7 clear).
    let mut s = BytesMut::from(&[0x11u8][..]);
    s.extend_from_slice(&SASL_HEADER);
    p::write_frame(&mut s, TYPE_SASL, 0, |b| {
        p::Sasl::Init {
            mechanism: Bytes::from_static(b"EXTERNAL"),
            initial_response: None,
            hostname: None,
        }
        .encode(b)
    });
    s.extend_from_slice(&AMQP_HEADER);
    frame(&mut s, 0, &frames[0], &[]);
    frame(
        &mut s,
        0,
        &p::Performative::Begin(p::Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: 7,
            properties: None,
        }),
        &[],
    );
    frame(&mut s, 0, &frames[2], &[]);
    for i in 0..3u32 {
        let t = p::Performative::Transfer(p::Transfer {
            handle: 0,
            delivery_id: Some(i),
            delivery_tag: Some(Bytes::from(i.to_be_bytes().to_vec())),
            message_format: Some(0),
            settled: Some(false),
            more: false,
            ..p::Transfer::default()
        });
        frame(&mut s, 0, &t, &body);
    }
    frame(&mut s, 0, &frames[8], &[]);
    frame(&mut s, 0, &frames[9], &[]);
    frame(&mut s, 0, &p::Performative::Close(None), &[]);
    write("amqp_connection", "bridge-to-float", &s);
    // A float answering a bridge (client side; bit 7 set).
    let mut c = BytesMut::from(&[0x93u8][..]);
    c.extend_from_slice(&SASL_HEADER);
    p::write_frame(&mut c, TYPE_SASL, 0, |b| {
        p::Sasl::Mechanisms(vec![
            Bytes::from_static(b"EXTERNAL"),
            Bytes::from_static(b"ANONYMOUS"),
        ])
        .encode(b)
    });
    p::write_frame(&mut c, TYPE_SASL, 0, |b| p::Sasl::Outcome(0).encode(b));
    c.extend_from_slice(&AMQP_HEADER);
    frame(&mut c, 0, &frames[0], &[]);
    frame(&mut c, 0, &frames[1], &[]);
    let answer = p::Performative::Attach(p::Attach {
        name: "fuzz".into(),
        ..match &frames[3] {
            p::Performative::Attach(a) => a.clone(),
            _ => unreachable!(),
        }
    });
    frame(&mut c, 0, &answer, &[]);
    frame(&mut c, 0, &frames[4], &[]);
    frame(&mut c, 0, &frames[6], &[]);
    frame(&mut c, 0, &frames[7], &[]);
    frame(&mut c, 0, &frames[8], &[]);
    frame(&mut c, 0, &p::Performative::Close(None), &[]);
    write("amqp_connection", "float-to-bridge", &c);
}

fn main() {
    amqp();
    control();
    float();
    bridge();
    legal_names();
    eprintln!("seeds written under fuzz/seeds/");
}
