//! `wire_in::from_bytes` gives what the old path gave: the float's frame guard
//! (`frame_guard::Scanner`), fe2o3's decoding into a `Message<Body<Value>>` and
//! `inbound::from_amqp`, for the same payload bytes.
//!
//! - the messages the bridge builds (the generators of `round_trip.rs`, copied), encoded as
//!   the bridge encodes them;
//! - any message fe2o3 can encode: every section, every id type, hostile annotation values,
//!   every body kind;
//! - those bytes damaged (bytes changed, cut, inserted, repeated): anything the frame guard or
//!   fe2o3 refused is `Invalid::Malformed`, anything else the same result;
//! - hand-made payloads for the ways fe2o3 reads sections that no encoder writes (sections out
//!   of order, repeated, named by bare numbers; lists with more fields than their type; maps
//!   repeating keys);
//! - the reader's structural verdict is the frame guard's on any bytes.
//!
//! The `mapping_wire_in` fuzz target holds the same equivalence for inputs a fuzzer builds.

use drawbridge_amqp::{value::Values, Limits};
use drawbridge_mapping::{
    self as mapping,
    check::same_properties,
    headers,
    inbound::{from_amqp, from_amqp_stamped, Inbound, Invalid},
    outbound::message_to_amqp,
    wire_in::{from_bytes, from_bytes_stamped},
};
use drawbridge_runtime::frame_guard::Scanner;

mod support;
use fe2o3_amqp::types::{
    messaging::{
        annotations::OwnedKey,
        message::__private::{Deserializable, Serializable},
        AmqpSequence, AmqpValue, ApplicationProperties, Body, Data, DeliveryAnnotations, Footer,
        Header, Message, MessageAnnotations, MessageId, Properties,
    },
    primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Uuid, Value},
};
use lapin::types::{AMQPValue, DecimalValue, FieldTable};
use proptest::prelude::*;
use serde_amqp::{described::Described, descriptor::Descriptor};
use support::{expiration, key, properties};

const DEST: &str = "O=Bank B, L=Paris, C=FR";
const SENDER: &str = "O=Bank A, L=London, C=GB";
const MAX: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// The two paths

/// The float's old path: the frame guard, fe2o3's decoding, `from_amqp`. What the guard or
/// the decoder refused (the float closed the link) is `Malformed` here.
fn old_path(bytes: &[u8], max: usize, sender: Option<&str>) -> Result<Inbound, Invalid> {
    let mut guard = Scanner::new();
    match guard.feed(bytes, None) {
        Ok(n) if n == bytes.len() && guard.at_boundary() => {}
        Ok(_) => return Err(Invalid::Malformed("guard: not at a boundary".into())),
        Err(e) => return Err(Invalid::Malformed(format!("guard: {e}"))),
    }
    let msg = match serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes) {
        Ok(m) => m.0,
        Err(e) => return Err(Invalid::Malformed(format!("decode: {e}"))),
    };
    match sender {
        Some(s) => from_amqp_stamped(msg, max, s),
        None => from_amqp(msg, max),
    }
}

fn new_path(bytes: &[u8], max: usize, sender: Option<&str>) -> Result<Inbound, Invalid> {
    match sender {
        Some(s) => from_bytes_stamped(bytes, max, s),
        None => from_bytes(bytes, max),
    }
}

/// The same outcome: equal `Inbound`s (properties compared bit for bit), the same refusal,
/// or both malformed (the reasons' texts differ: one is the guard's or serde's).
fn same(old: &Result<Inbound, Invalid>, new: &Result<Inbound, Invalid>) -> Result<(), String> {
    match (old, new) {
        (Ok(a), Ok(b)) => {
            if !same_properties(&a.properties, &b.properties) {
                return Err(format!(
                    "properties differ\nold {:?}\nnew {:?}",
                    a.properties, b.properties
                ));
            }
            let fields = |i: &Inbound| {
                (
                    i.message_id.clone(),
                    i.message_id_type,
                    i.body.clone(),
                    i.destination.clone(),
                    i.stripped_headers,
                    i.properties_len,
                    i.dedup_key(),
                )
            };
            if fields(a) != fields(b) {
                return Err(format!("inbound differs\nold {a:?}\nnew {b:?}"));
            }
            Ok(())
        }
        (Err(Invalid::Malformed(_)), Err(Invalid::Malformed(_))) => Ok(()),
        (Err(a), Err(b)) if a == b => Ok(()),
        _ => Err(format!("old {old:?}\nnew {new:?}")),
    }
}

/// Both paths on `bytes`, plain and stamped; the result (the old path's), for assertions.
/// On a thread with a large stack: serde_amqp's decoding, unoptimized, takes more than a
/// test thread's 2 MiB for values nested to the frame guard's limit.
fn check(bytes: &[u8], max: usize) -> Result<Result<Inbound, Invalid>, String> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn_scoped(s, || {
                for sender in [None, Some(SENDER)] {
                    let old = old_path(bytes, max, sender);
                    let new = new_path(bytes, max, sender);
                    same(&old, &new).map_err(|e| format!("{e}\nbytes {bytes:02x?}"))?;
                }
                Ok(old_path(bytes, max, None))
            })
            .expect("spawn")
            .join()
            .expect("no panic")
    })
}

fn encode(msg: Message<Body<Value>>) -> Vec<u8> {
    serde_amqp::to_vec(&Serializable(msg)).unwrap()
}

// ---------------------------------------------------------------------------------------
// Generators: the bridge's messages (copied from round_trip.rs)

fn map_key() -> impl Strategy<Value = Value> {
    prop_oneof![
        "\\PC{0,300}".prop_map(Value::String),
        any::<u64>().prop_map(Value::Ulong),
        Just(Value::Null),
    ]
}

fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<u8>().prop_map(Value::Ubyte),
        any::<u64>().prop_map(Value::Ulong),
        any::<i64>().prop_map(|t| Value::Timestamp(Timestamp::from_milliseconds(t))),
        "\\PC{0,300}".prop_map(Value::String),
        "[a-z]{0,300}".prop_map(|s| Value::Symbol(Symbol::from(s))),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| Value::Binary(b.into())),
        any::<[u8; 16]>().prop_map(|b| Value::Uuid(b.into())),
        any::<char>().prop_map(Value::Char),
        any::<f64>().prop_map(|f| Value::Double(f.into())),
        any::<i32>().prop_map(Value::Int),
        proptest::collection::vec(any::<i32>(), 0..4)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::Int).collect::<Vec<_>>().into())),
    ];
    leaf.prop_recursive(20, 64, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
            proptest::collection::vec((map_key(), inner.clone()), 0..4)
                .prop_map(|kv| Value::Map(kv.into_iter().collect())),
            (
                prop_oneof![
                    Just(mapping::DESC_DECIMAL),
                    Just(mapping::DESC_LONGSTR),
                    Just(mapping::DESC_TIMESTAMP),
                    Just("other:thing"),
                ],
                inner
            )
                .prop_map(|(d, v)| Value::Described(Box::new(Described {
                    descriptor: Descriptor::Name(Symbol::from(d)),
                    value: v,
                }))),
        ]
    })
}

// ---------------------------------------------------------------------------------------
// Generators: any message fe2o3 encodes

fn any_id() -> impl Strategy<Value = MessageId> {
    prop_oneof![
        any::<u64>().prop_map(MessageId::Ulong),
        any::<[u8; 16]>().prop_map(|b| MessageId::Uuid(Uuid::from(b))),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| MessageId::Binary(b.into())),
        proptest::collection::vec(any::<u8>(), 127..130).prop_map(|b| MessageId::Binary(b.into())),
        "\\PC{0,20}".prop_map(MessageId::String),
        "z{254,257}".prop_map(MessageId::String),
    ]
}

fn any_header() -> impl Strategy<Value = Header> {
    (
        any::<bool>(),
        prop_oneof![Just(4u8), any::<u8>()],
        prop::option::of(any::<u32>()),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(|(durable, priority, ttl, first_acquirer, delivery_count)| {
            Header::builder()
                .durable(durable)
                .priority(priority)
                .ttl(ttl)
                .first_acquirer(first_acquirer)
                .delivery_count(delivery_count)
                .build()
        })
}

fn any_properties() -> impl Strategy<Value = Properties> {
    let text = || prop::option::of(prop_oneof!["\\PC{0,12}", "w{250,260}"]);
    let sym = || prop::option::of("[a-z/+.-]{0,12}".prop_map(Symbol::from));
    let ts = || prop::option::of(any::<i64>().prop_map(Timestamp::from_milliseconds));
    (
        (
            prop::option::of(any_id()),
            prop::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            text(),
            text(),
            text(),
            prop::option::of(any_id()),
            sym(),
        ),
        (
            sym(),
            ts(),
            ts(),
            text(),
            prop::option::of(any::<u32>()),
            text(),
        ),
    )
        .prop_map(
            |(
                (message_id, user_id, to, subject, reply_to, correlation_id, content_type),
                (
                    content_encoding,
                    absolute_expiry_time,
                    creation_time,
                    group_id,
                    group_sequence,
                    reply_to_group_id,
                ),
            )| Properties {
                message_id,
                user_id: user_id.map(Binary::from),
                to,
                subject,
                reply_to,
                correlation_id,
                content_type,
                content_encoding,
                absolute_expiry_time,
                creation_time,
                group_id,
                group_sequence,
                reply_to_group_id,
            },
        )
}

fn simple_value() -> impl Strategy<Value = SimpleValue> {
    prop_oneof![
        Just(SimpleValue::Null),
        any::<bool>().prop_map(SimpleValue::Bool),
        any::<u8>().prop_map(SimpleValue::Ubyte),
        any::<u16>().prop_map(SimpleValue::Ushort),
        any::<u32>().prop_map(SimpleValue::Uint),
        any::<u64>().prop_map(SimpleValue::Ulong),
        any::<i8>().prop_map(SimpleValue::Byte),
        any::<i16>().prop_map(SimpleValue::Short),
        any::<i32>().prop_map(SimpleValue::Int),
        any::<i64>().prop_map(SimpleValue::Long),
        any::<f32>().prop_map(|f| SimpleValue::Float(f.into())),
        any::<f64>().prop_map(|f| SimpleValue::Double(f.into())),
        any::<[u8; 4]>().prop_map(|b| SimpleValue::Decimal32(b.into())),
        any::<char>().prop_map(SimpleValue::Char),
        any::<i64>().prop_map(|t| SimpleValue::Timestamp(Timestamp::from_milliseconds(t))),
        any::<[u8; 16]>().prop_map(|b| SimpleValue::Uuid(b.into())),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| SimpleValue::Binary(b.into())),
        "\\PC{0,16}".prop_map(SimpleValue::String),
        "[a-z]{0,8}".prop_map(|s| SimpleValue::Symbol(Symbol::from(s))),
        Just(SimpleValue::Described(Box::new(Described {
            descriptor: Descriptor::Code(7),
            value: Value::Null,
        }))),
    ]
}

fn app_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9._-]{0,12}",
        1 => Just(headers::TOPIC.to_string()),
        1 => Just("Drawbridge-Sender".to_string()),
        1 => Just("x-death".to_string()),
        1 => Just("cc".to_string()),
        1 => "v{255,257}",
    ]
}

fn any_app_properties() -> impl Strategy<Value = ApplicationProperties> {
    (
        proptest::collection::vec((app_key(), simple_value()), 0..6),
        prop_oneof![
            6 => Just(Some(SimpleValue::String(DEST.into()))),
            1 => Just(None),
            1 => Just(Some(SimpleValue::Int(5))),
            1 => "d{1020,1030}".prop_map(|s| Some(SimpleValue::String(s))),
        ],
    )
        .prop_map(|(entries, dest)| {
            let mut m = OrderedMap::new();
            for (k, v) in entries {
                m.insert(k, v);
            }
            if let Some(d) = dest {
                m.insert(headers::DESTINATION.to_string(), d);
            }
            ApplicationProperties(m)
        })
}

fn ann_value(name: &'static str) -> BoxedStrategy<Value> {
    match name {
        mapping::ANN_HEADERS => prop_oneof![
            4 => proptest::collection::vec(
                (
                    prop_oneof![
                        4 => key().prop_map(Value::String),
                        1 => Just(Value::String("x-death".into())),
                        1 => Just(Value::String("trade".into())),
                        1 => map_key(),
                    ],
                    hostile_value()
                ),
                0..4
            )
            .prop_map(|kv| Value::Map(kv.into_iter().collect())),
            1 => hostile_value(),
        ]
        .boxed(),
        mapping::ANN_PRIORITY => {
            prop_oneof![any::<u8>().prop_map(Value::Ubyte), hostile_value()].boxed()
        }
        mapping::ANN_TIMESTAMP => {
            prop_oneof![any::<u64>().prop_map(Value::Ulong), hostile_value()].boxed()
        }
        mapping::ANN_EXPIRATION => prop_oneof![
            expiration().prop_map(|e| Value::String(e.to_string())),
            "[0-9+-]{0,12}".prop_map(Value::String),
            hostile_value()
        ]
        .boxed(),
        _ => prop_oneof![
            "\\PC{0,12}".prop_map(Value::String),
            "a{250,260}".prop_map(Value::String),
            hostile_value()
        ]
        .boxed(),
    }
}

fn any_message_annotations() -> impl Strategy<Value = MessageAnnotations> {
    let names = [
        mapping::ANN_HEADERS,
        mapping::ANN_PRIORITY,
        mapping::ANN_TIMESTAMP,
        mapping::ANN_EXPIRATION,
        mapping::ANN_APP_ID,
        mapping::ANN_CLUSTER_ID,
    ];
    let known = proptest::sample::subsequence(names.to_vec(), 0..=3).prop_flat_map(|names| {
        names
            .into_iter()
            .map(|n| ann_value(n).prop_map(move |v| (OwnedKey::from(n), v)))
            .collect::<Vec<_>>()
    });
    (known, any_annotations_entries()).prop_map(|(known, more)| {
        let mut m = OrderedMap::new();
        for (k, v) in more.into_iter().chain(known) {
            m.insert(k, v);
        }
        MessageAnnotations(m)
    })
}

fn any_annotations_entries() -> impl Strategy<Value = Vec<(OwnedKey, Value)>> {
    proptest::collection::vec(
        (
            prop_oneof![
                "x-opt-[a-z]{0,6}".prop_map(|s| OwnedKey::from(s.as_str())),
                any::<u64>().prop_map(OwnedKey::from),
            ],
            hostile_value(),
        ),
        0..3,
    )
}

fn any_body() -> impl Strategy<Value = Body<Value>> {
    prop_oneof![
        4 => proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..4)
            .prop_map(|ds| {
                let sections: Vec<Data> = ds.into_iter().map(|d| Data(d.into())).collect();
                Body::Data(sections.into())
            }),
        1 => proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| Body::Value(AmqpValue(Value::Binary(b.into())))),
        1 => "\\PC{0,32}".prop_map(|s| Body::Value(AmqpValue(Value::String(s)))),
        1 => hostile_value().prop_map(|v| Body::Value(AmqpValue(v))),
        1 => proptest::collection::vec(hostile_value(), 0..3)
            .prop_map(|v| Body::Sequence(vec![AmqpSequence(v)].into())),
        1 => Just(Body::Empty),
    ]
}

fn any_message() -> impl Strategy<Value = Message<Body<Value>>> {
    (
        prop::option::of(any_header()),
        prop::option::of(any_annotations_entries()),
        prop::option::of(any_message_annotations()),
        prop::option::weighted(0.9, any_properties()),
        prop::option::weighted(0.9, any_app_properties()),
        any_body(),
        prop::option::of(any_annotations_entries()),
    )
        .prop_map(|(header, da, ma, properties, app, body, footer)| Message {
            header,
            delivery_annotations: da.map(|e| DeliveryAnnotations(e.into_iter().collect())),
            message_annotations: ma,
            properties,
            application_properties: app,
            body,
            footer: footer.map(|e| Footer(e.into_iter().collect())),
        })
}

/// Ways to damage a payload: change, cut, insert, repeat a piece.
#[derive(Debug, Clone)]
enum Damage {
    Set(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Repeat(usize, usize),
    Remove(usize, usize),
}

fn damage() -> impl Strategy<Value = Vec<Damage>> {
    let one = prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Set(i, b)),
        1 => any::<usize>().prop_map(Damage::Cut),
        2 => (any::<usize>(), proptest::collection::vec(interesting_byte(), 1..6))
            .prop_map(|(i, b)| Damage::Insert(i, b)),
        1 => (any::<usize>(), 1usize..24).prop_map(|(i, n)| Damage::Repeat(i, n)),
        1 => (any::<usize>(), 1usize..8).prop_map(|(i, n)| Damage::Remove(i, n)),
    ];
    proptest::collection::vec(one, 1..4)
}

/// Constructors and section codes, and any byte.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        prop::sample::select(vec![
            0x00u8, 0x40, 0x45, 0x53, 0x70, 0x72, 0x73, 0x75, 0xa1, 0xc0, 0xe0
        ]),
        any::<u8>(),
    ]
}

fn apply(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        let len = bytes.len().max(1);
        match d {
            Damage::Set(i, b) => {
                if let Some(x) = bytes.get_mut(i % len) {
                    *x = *b;
                }
            }
            Damage::Cut(i) => bytes.truncate(i % len),
            Damage::Insert(i, b) => {
                let at = (i % len).min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
            Damage::Repeat(i, n) => {
                let at = (i % len).min(bytes.len());
                let end = (at + n).min(bytes.len());
                let piece = bytes[at..end].to_vec();
                bytes.splice(end..end, piece);
            }
            Damage::Remove(i, n) => {
                let at = (i % len).min(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------
// Properties

/// `n` cases, or `PROPTEST_CASES` for a longer run.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(n),
    )
}

proptest! {
    #![proptest_config(cases(512))]

    /// Every message the bridge builds, as the bridge encodes it.
    #[test]
    fn the_bridges_messages_convert_as_before(
        p in properties(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let Ok(msg) = message_to_amqp(&p, &body, MAX) else { return Ok(()) };
        let wire = serde_amqp::to_vec(&Serializable(msg)).unwrap();
        let result = check(&wire, MAX).map_err(TestCaseError::fail)?;
        prop_assert!(result.is_ok(), "{result:?}");
        // A body limit below the size: the same refusal.
        if !body.is_empty() {
            check(&wire, body.len() - 1).map_err(TestCaseError::fail).map(drop)?;
        }
    }

    /// Any message fe2o3 encodes: every section, id type, annotation, body kind.
    #[test]
    fn any_message_converts_as_before(
        msg in any_message(),
        max in prop_oneof![Just(MAX), 0usize..80],
    ) {
        check(&encode(msg), max).map_err(TestCaseError::fail).map(drop)?;
    }

    /// The same messages damaged: the same result, or both refused as malformed.
    #[test]
    fn damaged_messages_convert_or_fail_as_before(msg in any_message(), damage in damage()) {
        let bytes = apply(encode(msg), &damage);
        check(&bytes, MAX).map_err(TestCaseError::fail).map(drop)?;
    }

    /// The bridge's messages damaged.
    #[test]
    fn damaged_bridge_messages_convert_or_fail_as_before(
        p in properties(),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        damage in damage(),
    ) {
        let Ok(msg) = message_to_amqp(&p, &body, MAX) else { return Ok(()) };
        let wire = serde_amqp::to_vec(&Serializable(msg)).unwrap();
        check(&apply(wire, &damage), MAX).map_err(TestCaseError::fail).map(drop)?;
    }

    /// The value reader's structural verdict is the frame guard's, on any bytes.
    #[test]
    fn the_reader_accepts_what_the_frame_guard_accepts(
        msg in any_message(),
        damage in damage(),
        random in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let encoded = encode(msg);
        for bytes in [apply(encoded.clone(), &damage), encoded, random] {
            prop_assert_eq!(guard_accepts(&bytes), reader_accepts(&bytes), "{:02x?}", bytes);
        }
    }
}

fn guard_accepts(bytes: &[u8]) -> bool {
    let mut guard = Scanner::new();
    guard.feed(bytes, None).is_ok() && guard.at_boundary()
}

fn reader_accepts(bytes: &[u8]) -> bool {
    Values::new(bytes, Limits::DEFAULT).finish().is_ok()
}

// ---------------------------------------------------------------------------------------
// Generators: payloads no encoder writes, byte by byte (the ways fe2o3 reads them)

/// A list8/map8 of encoded items if they fit, else a list32/map32.
fn compound(small: u8, items: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = items.concat();
    if body.len() < 255 && items.len() < 256 {
        let mut v = vec![small, (body.len() + 1) as u8, items.len() as u8];
        v.extend(body);
        v
    } else {
        let mut v = vec![small + 0x10];
        v.extend(((body.len() + 4) as u32).to_be_bytes());
        v.extend((items.len() as u32).to_be_bytes());
        v.extend(body);
        v
    }
}

fn name_or_code(code: u8, name: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(vec![0x53, code]),
        1 => Just(vec![0x80, 0, 0, 0, 0, 0, 0, 0, code]),
        1 => Just(sym8(name)),
        1 => Just(vec![0x44]),
        1 => Just(sym8("amqp:other:list")),
    ]
}

/// Encoded values of every kind, a few of them refused by fe2o3.
fn raw_value() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        Just(vec![0x40]),
        Just(vec![0x41]),
        (0u8..3).prop_map(|b| vec![0x56, b]),
        any::<u8>().prop_map(|b| vec![0x50, b]),
        any::<u8>().prop_map(|b| vec![0x52, b]),
        Just(vec![0x43]),
        any::<u8>().prop_map(|b| vec![0x53, b]),
        Just(vec![0x44]),
        any::<u64>().prop_map(|n| [vec![0x80], n.to_be_bytes().to_vec()].concat()),
        any::<i8>().prop_map(|b| vec![0x54, b as u8]),
        any::<i64>().prop_map(|t| [vec![0x83], t.to_be_bytes().to_vec()].concat()),
        any::<[u8; 16]>().prop_map(|u| [vec![0x98], u.to_vec()].concat()),
        prop_oneof![Just(0x41u32), Just(0xd800), Just(0x11_0000)].prop_map(|c| [
            vec![0x73],
            c.to_be_bytes().to_vec()
        ]
        .concat()),
        prop_oneof![
            "\\PC{0,6}",
            Just(DEST.to_string()),
            Just("007".to_string()),
            "[0-9]{1,11}"
        ]
        .prop_map(|s| str8(&s)),
        Just(vec![0xa1, 1, 0xff]),
        "[a-z:-]{0,8}".prop_map(|s| sym8(&s)),
        proptest::collection::vec(any::<u8>(), 0..6)
            .prop_map(|b| [vec![0xa0, b.len() as u8], b].concat()),
        Just(vec![0x45]),
        Just(vec![0xe0, 4, 3, 0x54, 1, 2]),
        (1u8..4).prop_map(|n| vec![0xe0, 2, n, 0x40]),
        Just(vec![0xe0, 1, 0]),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| compound(0xc0, &v)),
            proptest::collection::vec((raw_key(), inner.clone()), 0..4).prop_map(|kv| compound(
                0xc1,
                &kv.into_iter().flat_map(|(k, v)| [k, v]).collect::<Vec<_>>()
            )),
            (
                prop_oneof![
                    Just(sym8(mapping::DESC_DECIMAL)),
                    Just(sym8(mapping::DESC_LONGSTR)),
                    Just(sym8(mapping::DESC_TIMESTAMP)),
                    Just(vec![0x53, 0x70]),
                    Just(vec![0x40]),
                ],
                inner
            )
                .prop_map(|(d, v)| [vec![0x00], d, v].concat()),
        ]
    })
}

/// Map keys, repeating often.
fn raw_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop_oneof![Just("a"), Just("b"), Just("x-a"), Just("CC"), Just(headers::TOPIC)]
            .prop_map(str8),
        1 => Just(str8(headers::DESTINATION)),
        1 => Just(str32(&"k".repeat(256))),
        1 => Just(sym8("a")),
        1 => Just(vec![0x40]),
    ]
}

fn raw_field() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(vec![0x40]),
        2 => prop_oneof!["[a-z0-9]{0,6}", Just(String::new())].prop_map(|s| str8(&s)),
        1 => raw_value(),
        1 => raw_section(),
    ]
}

/// A section's content after its descriptor.
fn raw_section() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        (
            name_or_code(0x70, "amqp:header:list"),
            typed_fields(header_fields())
        )
            .prop_map(|(d, f)| [vec![0x00], d, compound(0xc0, &f)].concat()),
        (
            name_or_code(0x73, "amqp:properties:list"),
            typed_fields(properties_fields())
        )
            .prop_map(|(d, f)| [vec![0x00], d, compound(0xc0, &f)].concat()),
        (
            name_or_code(0x74, "amqp:application-properties:map"),
            proptest::collection::vec((raw_key(), raw_value()), 0..5)
        )
            .prop_map(|(d, kv)| {
                let mut items: Vec<Vec<u8>> = kv.into_iter().flat_map(|(k, v)| [k, v]).collect();
                items.push(str8(headers::DESTINATION));
                items.push(str8(DEST));
                [vec![0x00], d, compound(0xc1, &items)].concat()
            }),
        (
            name_or_code(0x72, "amqp:message-annotations:map"),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just(sym8(mapping::ANN_HEADERS)),
                        Just(sym8(mapping::ANN_PRIORITY)),
                        Just(sym8(mapping::ANN_EXPIRATION)),
                        Just(sym8(mapping::ANN_TIMESTAMP)),
                        Just(sym8(mapping::ANN_APP_ID)),
                        Just(vec![0x53, 1]),
                        Just(str8("x-opt-k")),
                    ],
                    raw_value()
                ),
                0..4
            )
        )
            .prop_map(|(d, kv)| {
                let items: Vec<Vec<u8>> = kv.into_iter().flat_map(|(k, v)| [k, v]).collect();
                [vec![0x00], d, compound(0xc1, &items)].concat()
            }),
        (
            name_or_code(0x75, "amqp:data:binary"),
            proptest::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(d, b)| [vec![0x00], d, vec![0xa0, b.len() as u8], b].concat()),
        (name_or_code(0x77, "amqp:amqp-value:*"), raw_value()).prop_map(|(d, v)| [
            vec![0x00],
            d,
            v
        ]
        .concat()),
        (
            name_or_code(0x76, "amqp:amqp-sequence:list"),
            proptest::collection::vec(raw_value(), 0..3)
        )
            .prop_map(|(d, v)| [vec![0x00], d, compound(0xc0, &v)].concat()),
        (
            name_or_code(0x78, "amqp:footer:map"),
            proptest::collection::vec((raw_key(), raw_value()), 0..3)
        )
            .prop_map(|(d, kv)| {
                let items: Vec<Vec<u8>> = kv.into_iter().flat_map(|(k, v)| [k, v]).collect();
                [vec![0x00], d, compound(0xc1, &items)].concat()
            }),
    ]
    .boxed()
}

/// A composite's fields: a prefix of `fields` (each null or of its type, now and then of
/// another), and, after all of them, extra ones (fe2o3 reads those as sections).
fn typed_fields(fields: Vec<BoxedStrategy<Vec<u8>>>) -> impl Strategy<Value = Vec<Vec<u8>>> {
    let n = fields.len();
    (
        fields,
        0..=n,
        proptest::collection::vec(raw_field_leaf(), 0..3),
    )
        .prop_map(move |(mut f, take, extra)| {
            f.truncate(take);
            if take == n {
                f.extend(extra);
            }
            f
        })
}

/// One field: null, a value of its type, or (rarely) anything.
fn typed(of: BoxedStrategy<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![3 => Just(vec![0x40]), 6 => of, 1 => raw_value()].boxed()
}

fn header_fields() -> Vec<BoxedStrategy<Vec<u8>>> {
    let boolean = || prop_oneof![Just(vec![0x41]), Just(vec![0x42]), Just(vec![0x56, 0])].boxed();
    let uint = || {
        prop_oneof![
            Just(vec![0x43]),
            any::<u8>().prop_map(|b| vec![0x52, b]),
            any::<u32>().prop_map(|n| [vec![0x70], n.to_be_bytes().to_vec()].concat()),
        ]
        .boxed()
    };
    vec![
        typed(boolean()),
        typed(any::<u8>().prop_map(|b| vec![0x50, b]).boxed()),
        typed(uint()),
        typed(boolean()),
        typed(uint()),
    ]
}

fn properties_fields() -> Vec<BoxedStrategy<Vec<u8>>> {
    let id = || {
        prop_oneof![
            "[a-z0-9]{0,8}".prop_map(|s| str8(&s)),
            any::<u8>().prop_map(|b| vec![0x53, b]),
            any::<[u8; 16]>().prop_map(|u| [vec![0x98], u.to_vec()].concat()),
            proptest::collection::vec(any::<u8>(), 0..4).prop_map(|b| [
                vec![0xa0, b.len() as u8],
                b
            ]
            .concat()),
        ]
        .boxed()
    };
    let text = || "[a-z0-9/]{0,8}".prop_map(|s| str8(&s)).boxed();
    let symbol = || "[a-z/]{0,8}".prop_map(|s| sym8(&s)).boxed();
    let ts = || {
        prop_oneof![any::<i64>(), 0i64..4_000_000_000_000]
            .prop_map(|t| [vec![0x83], t.to_be_bytes().to_vec()].concat())
            .boxed()
    };
    vec![
        typed(id()),
        typed(
            proptest::collection::vec(any::<u8>(), 0..4)
                .prop_map(|b| [vec![0xa0, b.len() as u8], b].concat())
                .boxed(),
        ),
        typed(text()),
        typed(text()),
        typed(text()),
        typed(id()),
        typed(symbol()),
        typed(symbol()),
        typed(ts()),
        typed(ts()),
        typed(text()),
        typed(any::<u8>().prop_map(|b| vec![0x52, b]).boxed()),
        typed(text()),
    ]
}

fn raw_field_leaf() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(vec![0x40]),
        2 => prop_oneof!["[a-z0-9]{0,6}", Just(String::new())].prop_map(|s| str8(&s)),
        2 => raw_value(),
        1 => Just(props_with_id("inner")),
        1 => Just(data(b"inner")),
    ]
}

/// A payload of sections, some named by bare numbers or strings, in any order.
fn raw_message() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        8 => raw_section(),
        1 => prop_oneof![
            (0x70u8..0x79).prop_map(|c| vec![0x53, c]),
            (0x70u8..0x79).prop_map(|c| vec![0x52, c]),
            Just(str8("amqp:properties:list")),
            Just(sym8("amqp:data:binary")),
            Just(vec![0x71, 0, 0, 0, 0]),
        ],
        1 => Just(props_with_id("m")),
        1 => raw_field(),
    ];
    proptest::collection::vec(piece, 0..10).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(cases(2048))]

    /// Payloads no encoder writes: read as fe2o3 reads them, or refused where it refused them.
    #[test]
    fn payloads_no_encoder_writes_convert_as_before(bytes in raw_message()) {
        check(&bytes, MAX).map_err(TestCaseError::fail).map(drop)?;
    }
}

// ---------------------------------------------------------------------------------------
// Hand-made payloads: how fe2o3 reads what no encoder writes

/// A described section: 0x00, smallulong `code`, then `value`.
fn sec(code: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x00, 0x53, code];
    v.extend_from_slice(value);
    v
}

fn str8(s: &str) -> Vec<u8> {
    let mut v = vec![0xa1, s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

fn sym8(s: &str) -> Vec<u8> {
    let mut v = vec![0xa3, s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

/// A list8 or map8 of already-encoded elements.
fn compound8(code: u8, items: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = items.concat();
    let mut v = vec![code, (body.len() + 1) as u8, items.len() as u8];
    v.extend_from_slice(&body);
    v
}

/// A map32 of already-encoded keys and values.
fn map32(items: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = items.concat();
    let mut v = vec![0xd1];
    v.extend(((body.len() + 4) as u32).to_be_bytes());
    v.extend((items.len() as u32).to_be_bytes());
    v.extend(body);
    v
}

fn str32(s: &str) -> Vec<u8> {
    let mut v = vec![0xb1];
    v.extend((s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

fn list(items: &[Vec<u8>]) -> Vec<u8> {
    compound8(0xc0, items)
}

fn map(items: &[Vec<u8>]) -> Vec<u8> {
    compound8(0xc1, items)
}

fn props_with_id(id: &str) -> Vec<u8> {
    sec(0x73, &list(&[str8(id)]))
}

fn app(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let items: Vec<Vec<u8>> = entries
        .iter()
        .flat_map(|(k, v)| [str8(k), v.clone()])
        .collect();
    sec(0x74, &map(&items))
}

fn dest() -> (&'static str, Vec<u8>) {
    (headers::DESTINATION, str8(DEST))
}

fn data(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x00, 0x53, 0x75, 0xa0, body.len() as u8];
    v.extend_from_slice(body);
    v
}

fn ma(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let items: Vec<Vec<u8>> = entries
        .iter()
        .flat_map(|(k, v)| [sym8(k), v.clone()])
        .collect();
    sec(0x72, &map(&items))
}

fn ok(bytes: &[u8]) -> Inbound {
    match check(bytes, MAX) {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => panic!("refused: {e}"),
        Err(e) => panic!("{e}"),
    }
}

fn refused(bytes: &[u8]) -> Invalid {
    match check(bytes, MAX) {
        Ok(Ok(i)) => panic!("accepted: {i:?}"),
        Ok(Err(e)) => e,
        Err(e) => panic!("{e}"),
    }
}

fn header_value<'a>(i: &'a Inbound, k: &str) -> Option<&'a AMQPValue> {
    i.properties.headers().as_ref()?.inner().get(k)
}

#[test]
fn the_usual_message_and_sections_in_any_order() {
    let m = [props_with_id("m"), app(&[dest()]), data(b"hi")].concat();
    let i = ok(&m);
    assert_eq!(i.body, b"hi");
    assert_eq!(i.message_id, "m");
    // Out of order, as fe2o3 takes them.
    let i = ok(&[data(b"hi"), app(&[dest()]), props_with_id("m")].concat());
    assert_eq!(i.body, b"hi");
    // Empty: no message id.
    assert_eq!(refused(&[]), Invalid::NoMessageId);
}

#[test]
fn a_repeated_section_counts_last_and_seven_are_read() {
    let i = ok(&[
        props_with_id("first"),
        app(&[dest()]),
        props_with_id("second"),
        data(b"x"),
    ]
    .concat());
    assert_eq!(i.message_id, "second");
    // Seven sections read; an eighth is only checked.
    let mut m = vec![props_with_id("m"), app(&[dest()]), data(b"body")];
    for _ in 0..4 {
        m.push(sec(0x78, &map(&[])));
    }
    m.push(props_with_id("eighth"));
    let i = ok(&m.concat());
    assert_eq!(i.message_id, "m");
    // The eighth is still checked: the frame guard's limits hold for it.
    m.pop();
    m.push(vec![0xc0, 5, 1, 0x40]);
    assert_eq!(refused(&m.concat()).label(), "malformed");
}

#[test]
fn sections_named_by_bare_numbers_or_strings() {
    // A smallulong 0x73 names the section that follows.
    let m = [
        vec![0x53, 0x73],
        props_with_id("m"),
        app(&[dest()]),
        data(b"b"),
    ]
    .concat();
    assert_eq!(ok(&m).message_id, "m");
    // A string name.
    let m = [
        str8("amqp:properties:list"),
        props_with_id("m"),
        app(&[dest()]),
        data(b"b"),
    ]
    .concat();
    assert_eq!(ok(&m).message_id, "m");
    // A name and nothing after it: the section is absent.
    let m = [app(&[dest()]), vec![0x53, 0x73]].concat();
    assert_eq!(refused(&m), Invalid::NoMessageId);
    // An unknown name.
    assert_eq!(
        refused(&[vec![0x53, 0x79], data(b"")].concat()).label(),
        "malformed"
    );
    // A body named twice over: the body's own name first.
    let m = [
        props_with_id("m"),
        app(&[dest()]),
        vec![0x53, 0x75, 0x53, 0x75],
        data(b"z"),
    ]
    .concat();
    assert_eq!(ok(&m).body, b"z");
}

#[test]
fn fields_beyond_a_lists_type_are_read_as_sections() {
    // A header with a sixth field that is a properties section.
    let header = sec(
        0x70,
        &list(&[
            vec![0x41],
            vec![0x50, 7],
            vec![0x40],
            vec![0x40],
            vec![0x43],
            props_with_id("inside"),
        ]),
    );
    let i = ok(&[header, app(&[dest()]), data(b"")].concat());
    assert_eq!(i.message_id, "inside");
    assert_eq!(*i.properties.priority(), Some(7));
}

#[test]
fn data_sections_batch_while_described_alike() {
    let m = [props_with_id("m"), app(&[dest()]), data(b"ab"), data(b"cd")].concat();
    assert_eq!(ok(&m).body, b"abcd");
    // A data section with a symbolic descriptor starts a new body, which replaces the first.
    let named = [
        vec![0x00],
        sym8("amqp:data:binary"),
        vec![0xa0, 2],
        b"ef".to_vec(),
    ]
    .concat();
    let m = [props_with_id("m"), app(&[dest()]), data(b"ab"), named].concat();
    assert_eq!(ok(&m).body, b"ef");
    // Over the limit, counted over the batch.
    let m = [
        props_with_id("m"),
        app(&[dest()]),
        data(&[1; 10]),
        data(&[2; 10]),
    ]
    .concat();
    assert_eq!(
        check(&m, 15).unwrap().unwrap_err(),
        Invalid::TooLarge { size: 20, max: 15 }
    );
}

#[test]
fn repeated_keys_keep_their_first_place_and_last_value() {
    // Application properties: the first value refused, the last taken.
    let m = [
        props_with_id("m"),
        app(&[
            ("k", vec![0x00, 0x53, 0x01, 0x40]),
            dest(),
            ("k", vec![0x54, 3]),
        ]),
        data(b""),
    ]
    .concat();
    let i = ok(&m);
    assert_eq!(header_value(&i, "k"), Some(&AMQPValue::LongInt(3)));
    // Where a repeated key stands decides which refusal comes first: its first place.
    let described = vec![0x00, 0x53, 0x01, 0x40];
    let m = [
        props_with_id("m"),
        app(&[
            ("a", vec![0x54, 1]),
            dest(),
            ("b", described.clone()),
            ("a", described.clone()),
        ]),
        data(b""),
    ]
    .concat();
    assert_eq!(refused(&m), Invalid::UnsupportedProperty("a".into()));
    // A reserved key repeated is stripped once.
    let m = [
        props_with_id("m"),
        app(&[("x-a", vec![0x40]), dest(), ("x-a", vec![0x40])]),
        data(b""),
    ]
    .concat();
    assert_eq!(ok(&m).stripped_headers, 1);
    // The headers annotation: a refused value replaced, a key that is no string after it.
    let rich = |items: &[Vec<u8>]| ma(&[(mapping::ANN_HEADERS, map(items))]);
    let m = [
        props_with_id("m"),
        rich(&[
            str8("h"),
            vec![0x98; 17],
            vec![0x40],
            vec![0x41],
            str8("h"),
            vec![0x54, 1],
        ]),
        app(&[dest()]),
        data(b""),
    ]
    .concat();
    assert_eq!(
        refused(&m),
        Invalid::BadField {
            field: mapping::ANN_HEADERS.into(),
            why: "a key is not a string"
        }
    );
    let m = [
        props_with_id("m"),
        rich(&[
            str8("h"),
            vec![0x98; 17],
            str8("g"),
            vec![0x41],
            str8("h"),
            vec![0x54, 1],
        ]),
        app(&[dest()]),
        data(b""),
    ]
    .concat();
    let i = ok(&m);
    assert_eq!(header_value(&i, "h"), Some(&AMQPValue::LongInt(1)));
    // Nested: the same.
    let inner = map(&[str8("a"), vec![0x98; 17], str8("a"), vec![0x40]]);
    let m = [
        props_with_id("m"),
        rich(&[str8("t"), inner]),
        app(&[dest()]),
        data(b""),
    ]
    .concat();
    let i = ok(&m);
    let mut t = FieldTable::default();
    t.insert("a".into(), AMQPValue::Void);
    assert_eq!(header_value(&i, "t"), Some(&AMQPValue::FieldTable(t)));
    // Nested, where a repeated key stands decides which refusal comes first: a key too
    // long after the first place of a key whose last value is refused.
    let long = "k".repeat(256);
    let inner = map32(&[
        str8("a"),
        vec![0x40],
        str32(&long),
        vec![0x40],
        str8("a"),
        vec![0x98; 17],
    ]);
    let m = [
        props_with_id("m"),
        sec(
            0x72,
            &map32(&[sym8(mapping::ANN_HEADERS), map32(&[str8("t"), inner])]),
        ),
        app(&[dest()]),
        data(b""),
    ]
    .concat();
    assert_eq!(refused(&m), Invalid::UnsupportedProperty("t".into()));
    // A repeated annotation: the last counts.
    let m = [
        props_with_id("m"),
        ma(&[
            (mapping::ANN_PRIORITY, vec![0x40]),
            (mapping::ANN_PRIORITY, vec![0x50, 2]),
        ]),
        app(&[dest()]),
        data(b""),
    ]
    .concat();
    assert_eq!(*ok(&m).properties.priority(), Some(2));
}

#[test]
fn what_fe2o3_could_not_decode_is_malformed() {
    let base = |extra: Vec<u8>| [props_with_id("m"), app(&[dest()]), data(b""), extra].concat();
    for bad in [
        // A string that is not UTF-8, in a footer.
        sec(0x78, &map(&[sym8("k"), vec![0xa1, 1, 0xff]])),
        // A char that is no Unicode scalar value.
        sec(0x71, &map(&[sym8("k"), vec![0x73, 0, 0, 0xd8, 0]])),
        // A boolean octet of 2.
        sec(0x70, &list(&[vec![0x56, 2]])),
        // A header field of the wrong type.
        sec(0x70, &list(&[vec![0x40], vec![0x52, 5]])),
        // An annotation key that is a string.
        sec(0x72, &map(&[str8("k"), vec![0x40]])),
        // A list of application properties.
        sec(0x74, &list(&[])),
        // An application property that is a list.
        app(&[("l", list(&[]))]),
        // Two nulls claimed in an array of size 1... (3 elements in size 2).
        sec(0x78, &map(&[sym8("k"), vec![0xe0, 2, 3, 0x40]])),
    ] {
        let e = refused(&base(bad.clone()));
        assert_eq!(e.label(), "malformed", "{bad:02x?}: {e}");
    }
    // The frame guard's refusals.
    for bad in [
        vec![0xc0, 1, 1, 0x40],
        vec![0xe0, 4, 1, 0x00, 0x53, 0x70],
        [0x00, 0x53, 0x70].repeat(65),
        vec![0x30],
    ] {
        assert_eq!(refused(&base(bad)).label(), "malformed");
    }
}

#[test]
fn counts_above_fe2o3s_cap_are_malformed() {
    let nulls = |n: u32| {
        let mut v = vec![0xd0];
        v.extend((n + 4).to_be_bytes());
        v.extend(n.to_be_bytes());
        v.extend(std::iter::repeat_n(0x40, n as usize));
        v
    };
    let m = |n: u32| {
        [
            props_with_id("m"),
            app(&[dest()]),
            data(b""),
            sec(0x78, &map32(&[sym8("k"), nulls(n)])),
        ]
        .concat()
    };
    ok(&m(65_536));
    assert_eq!(refused(&m(65_537)).label(), "malformed");
}

#[test]
fn headers_annotation_values_convert_as_before() {
    let described = |name: &str, v: Vec<u8>| [vec![0x00], sym8(name), v].concat();
    let rich = ma(&[(
        mapping::ANN_HEADERS,
        map(&[
            str8("dec"),
            described(mapping::DESC_DECIMAL, list(&[vec![0x50, 2], vec![0x52, 7]])),
            str8("raw"),
            described(mapping::DESC_LONGSTR, vec![0xa0, 1, 0xff]),
            str8("ts"),
            described(mapping::DESC_TIMESTAMP, vec![0x53, 9]),
            str8("arr"),
            list(&[vec![0x54, 1], map(&[str8("k"), vec![0x40]])]),
        ]),
    )]);
    let i = ok(&[props_with_id("m"), rich, app(&[dest()]), data(b"")].concat());
    assert_eq!(
        header_value(&i, "dec"),
        Some(&AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 7
        }))
    );
    assert_eq!(header_value(&i, "ts"), Some(&AMQPValue::Timestamp(9)));
    // Too deep, and a decimal of the wrong shape.
    let mut deep = vec![0x40];
    for _ in 0..=mapping::MAX_DEPTH {
        deep = list(&[deep]);
    }
    let e = refused(
        &[
            props_with_id("m"),
            ma(&[(mapping::ANN_HEADERS, map(&[str8("d"), deep]))]),
            app(&[dest()]),
            data(b""),
        ]
        .concat(),
    );
    assert_eq!(e, Invalid::TooDeep("d".into()));
    let e = refused(
        &[
            props_with_id("m"),
            ma(&[(
                mapping::ANN_HEADERS,
                map(&[
                    str8("d"),
                    described(mapping::DESC_DECIMAL, list(&[vec![0x50, 2]])),
                ]),
            )]),
            app(&[dest()]),
            data(b""),
        ]
        .concat(),
    );
    assert_eq!(e, Invalid::UnsupportedProperty("d".into()));
}

#[test]
fn foreign_ids_bodies_and_headers_as_before() {
    let id = |v: Vec<u8>| {
        sec(
            0x73,
            &list(&[
                v,
                vec![0x40],
                vec![0x40],
                vec![0x40],
                vec![0x40],
                vec![0x53, 9],
            ]),
        )
    };
    let m = |p: Vec<u8>, body: Vec<u8>| [p, app(&[dest()]), body].concat();
    let i = ok(&m(id(vec![0x53, 5]), data(b"")));
    assert_eq!(i.dedup_key(), "ulong:5");
    let mut uuid = vec![0x98];
    uuid.extend(0u8..16);
    assert_eq!(
        ok(&m(id(uuid), data(b""))).message_id,
        "urn:uuid:00010203-0405-0607-0809-0a0b0c0d0e0f"
    );
    assert_eq!(
        ok(&m(id(vec![0xa0, 2, 0xab, 0xcd]), data(b""))).message_id,
        "abcd"
    );
    assert_eq!(
        refused(&m(id(vec![0xa0, 0]), data(b""))),
        Invalid::NoMessageId
    );
    // amqp-value bodies.
    let value = |v: Vec<u8>| sec(0x77, &v);
    assert_eq!(
        ok(&m(props_with_id("m"), value(str8("text")))).body,
        b"text"
    );
    assert_eq!(
        refused(&m(props_with_id("m"), value(vec![0x40]))),
        Invalid::UnsupportedBody("amqp-value that is not binary or string")
    );
    assert_eq!(
        refused(&m(props_with_id("m"), sec(0x76, &list(&[vec![0x40]])))),
        Invalid::UnsupportedBody("amqp-sequence")
    );
    // A header: priority and ttl.
    let header = sec(0x70, &list(&[vec![0x40], vec![0x50, 9], vec![0x52, 200]]));
    let i = ok(&[header, props_with_id("m"), app(&[dest()]), data(b"")].concat());
    assert_eq!(*i.properties.priority(), Some(9));
    assert_eq!(
        i.properties.expiration().as_ref().map(|s| s.as_str()),
        Some("200")
    );
}
