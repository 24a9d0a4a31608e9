//! The bridge's direct encoder (`wire_out::encode_message`) held to the fe2o3 path
//! (`outbound::message_to_amqp`, then serde_amqp's encoding), for every generated 0.9.1
//! message, refused ones included:
//!
//! - it refuses exactly what `message_to_amqp` refuses, with the same reason, and then leaves
//!   the caller's buffer as it was;
//! - otherwise it appends exactly the bytes fe2o3 writes for that message;
//! - and, independently of the bytes being the same, their meaning is: drawbridge-amqp's own
//!   decoder and the float's frame guard take them, fe2o3 decodes them to exactly the message
//!   `message_to_amqp` built, and the float's conversion gives back what
//!   `check::expected` promises, as from the fe2o3 path's bytes.
//!
//! The generators are `round_trip.rs`'s (`support/`), plus the inputs that are refused.

use drawbridge_amqp::codec::{Limits, Reader};
use drawbridge_mapping::{
    self as mapping,
    check::{expected, round_trip, same_properties},
    headers,
    inbound::from_amqp,
    outbound::{message_to_amqp, to_amqp, Undeliverable, MAX_PROPERTIES_BYTES},
    wire_out::{encode, encode_message},
};
use drawbridge_runtime::frame_guard::Scanner;
use fe2o3_amqp::types::{
    messaging::{
        message::__private::{Deserializable, Serializable},
        Body, Data, Message,
    },
    primitives::Value,
};
use lapin::{
    message::Delivery,
    types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties,
};
use proptest::prelude::*;

#[path = "support/mod.rs"]
mod support;

use support::{key, properties, properties_with, DEST};

/// What the caller's buffer holds before: the encoder appends after it.
const PREFIX: &[u8] = b"kept";

/// Body limit of the inputs that are not about it.
const MAX: usize = 1 << 20;

/// The fe2o3 path's message as the float's receiver decodes it (one `Data` section).
fn as_received(m: Message<Data>) -> Message<Body<Value>> {
    Message {
        header: m.header,
        delivery_annotations: m.delivery_annotations,
        message_annotations: m.message_annotations,
        properties: m.properties,
        application_properties: m.application_properties,
        body: Body::Data(vec![m.body].into()),
        footer: m.footer,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Both encoders on one input, and everything this file promises about them.
fn equivalent(p: &BasicProperties, body: &[u8], max: usize) -> Result<(), String> {
    let theirs = message_to_amqp(p, body, max);
    let mut out = PREFIX.to_vec();
    let ours = encode_message(p, body, max, &mut out);
    let msg = match (theirs, ours) {
        (Err(a), Err(b)) if a == b => {
            if out != PREFIX {
                return Err(format!("refused ({b}) but the buffer changed"));
            }
            return Ok(());
        }
        (Err(a), Err(b)) => return Err(format!("fe2o3 path: {a:?}\nours:       {b:?}")),
        (Err(a), Ok(())) => return Err(format!("fe2o3 path refused ({a:?}), we did not")),
        (Ok(_), Err(b)) => return Err(format!("we refused ({b:?}), the fe2o3 path did not")),
        (Ok(msg), Ok(())) => msg,
    };
    let Some(bytes) = out.strip_prefix(PREFIX) else {
        return Err("the buffer's earlier bytes changed".into());
    };

    // The same bytes.
    let wire = serde_amqp::to_vec(&Serializable(msg.clone())).map_err(|e| e.to_string())?;
    if bytes != wire.as_slice() {
        let at = bytes.iter().zip(&wire).take_while(|(a, b)| a == b).count();
        return Err(format!(
            "bytes differ at offset {at}\nfe2o3 {}\nours  {}",
            hex(&wire),
            hex(bytes)
        ));
    }

    // The same meaning, checked on our bytes alone. The engine's decoder validates each
    // section (depth, sizes, counts).
    let mut r = Reader::new(bytes, Limits::DEFAULT);
    let mut sections = 0;
    while r.remaining() > 0 {
        r.skip()
            .map_err(|e| format!("drawbridge-amqp refuses section {sections}: {e}"))?;
        sections += 1;
    }
    // The float's frame guard takes them, ending between values.
    let mut guard = Scanner::new();
    guard
        .feed(bytes, None)
        .map_err(|e| format!("the float's guard refuses them: {e}"))?;
    if !guard.at_boundary() {
        return Err("the float's guard did not end between values".into());
    }
    // fe2o3 decodes them to exactly the message `message_to_amqp` built (floats bit for bit:
    // re-encoded, they are the fe2o3 path's bytes).
    let back = serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes)
        .map_err(|e| format!("fe2o3 cannot decode them: {e}"))?
        .0;
    if back != as_received(msg) {
        return Err(format!("decoded to another message: {back:?}"));
    }
    let again = serde_amqp::to_vec(&Serializable(back.clone())).map_err(|e| e.to_string())?;
    if again != wire {
        return Err("the decoded message re-encodes to other bytes".into());
    }
    // The float gives back the promise (`check::holds`, on our bytes), and what it gives for
    // the fe2o3 path's bytes.
    let got = from_amqp(back, max).map_err(|e| format!("the float refuses them: {e}"))?;
    let want = expected(p);
    if !same_properties(&got.properties, &want) {
        return Err(format!(
            "sent     {p:?}\nexpected {want:?}\nreceived {:?}",
            got.properties
        ));
    }
    if got.body != body {
        return Err("the body changed".into());
    }
    let id = p.message_id().as_ref().map(|s| s.as_str());
    if Some(got.message_id.as_str()) != id {
        return Err(format!("message id {id:?} arrived as {:?}", got.message_id));
    }
    let Ok(Some(fe)) = round_trip(p, body, max) else {
        return Err("the fe2o3 path's round trip failed".into());
    };
    if !same_properties(&got.properties, &fe.properties)
        || got.message_id_type != fe.message_id_type
        || got.destination != fe.destination
        || got.stripped_headers != fe.stripped_headers
        || got.properties_len != fe.properties_len
    {
        return Err(format!(
            "the float's result differs: {got:?}\nfe2o3 path: {fe:?}"
        ));
    }
    Ok(())
}

fn check(p: &BasicProperties, body: &[u8], max: usize) {
    if let Err(e) = equivalent(p, body, max) {
        panic!("{e}\nfor {p:?}, body of {} bytes, max {max}", body.len());
    }
}

// ---------------------------------------------------------------------------------------
// Generators of inputs the bridge refuses (or almost)

/// `levels` arrays or tables around `leaf`.
fn nest(levels: usize, tables: bool, leaf: AMQPValue) -> AMQPValue {
    let mut v = leaf;
    for _ in 0..levels {
        v = if tables {
            let mut t = FieldTable::default();
            t.insert("k".into(), v);
            AMQPValue::FieldTable(t)
        } else {
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, v]))
        };
    }
    v
}

/// Header values at and around the limits: short strings (refused), nesting around
/// `MAX_DEPTH` (with a short string or not at the bottom), blobs around the properties limit.
fn edgy_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        Just(AMQPValue::Void),
        "[a-z]{0,4}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
    ];
    prop_oneof![
        "[a-z]{0,4}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        (
            mapping::MAX_DEPTH - 2..=mapping::MAX_DEPTH + 2,
            any::<bool>(),
            leaf
        )
            .prop_map(|(levels, tables, leaf)| nest(levels, tables, leaf)),
        prop_oneof![0usize..300, 13_500usize..14_600]
            .prop_map(|n| AMQPValue::LongString(LongString::from("h".repeat(n)))),
    ]
}

/// Any input: generated properties (sometimes without a usable message id), up to two edgy
/// headers, a body near or over the limit.
fn any_input() -> impl Strategy<Value = (BasicProperties, Vec<u8>, usize)> {
    let id = prop_oneof![
        6 => prop_oneof!["\\PC{1,20}", "y{255}"].prop_map(|s| Some(ShortString::from(s))),
        1 => Just(None),
        1 => Just(Some(ShortString::from(""))),
    ];
    (
        properties_with(id),
        proptest::collection::vec((key(), edgy_value()), 0..3),
        proptest::collection::vec(any::<u8>(), 0..300),
        prop_oneof![Just(None), (-2i64..=2).prop_map(Some)],
    )
        .prop_map(|(p, edgy, body, delta)| {
            let mut t = p.headers().clone().unwrap_or_default();
            for (k, v) in edgy {
                t.insert(ShortString::from(k), v);
            }
            let max = match delta {
                None => MAX,
                Some(d) => usize::try_from(body.len() as i64 + d).unwrap_or(0),
            };
            (p.with_headers(t), body, max)
        })
}

// ---------------------------------------------------------------------------------------
// Property tests

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every message the round-trip test sends (all accepted).
    #[test]
    fn same_bytes_and_meaning_as_the_fe2o3_path(
        p in properties(),
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        prop_assert!(message_to_amqp(&p, &body, MAX).is_ok());
        if let Err(e) = equivalent(&p, &body, MAX) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// Inputs around every refusal: the same answer, the same reason.
    #[test]
    fn same_refusals_as_the_fe2o3_path((p, body, max) in any_input()) {
        if let Err(e) = equivalent(&p, &body, max) {
            return Err(TestCaseError::fail(e));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Unit cases worth naming

fn props() -> BasicProperties {
    let mut t = FieldTable::default();
    t.insert(
        headers::DESTINATION.into(),
        AMQPValue::LongString(DEST.into()),
    );
    BasicProperties::default()
        .with_message_id("m-1".into())
        .with_headers(t)
}

fn with_header(p: BasicProperties, k: &str, v: AMQPValue) -> BasicProperties {
    let mut t = p.headers().clone().unwrap_or_default();
    t.insert(ShortString::from(k), v);
    p.with_headers(t)
}

fn ours(p: &BasicProperties, body: &[u8], max: usize) -> Result<Vec<u8>, Undeliverable> {
    let mut out = Vec::new();
    encode_message(p, body, max, &mut out).map(|()| out)
}

#[test]
fn bodies_empty_small_at_the_width_boundary_and_large() {
    for n in [0, 1, 254, 255, 256, 64 * 1024] {
        check(&props(), &vec![0xa5; n], MAX);
    }
    // The minimal message, byte for byte: header (all defaults: list0), properties
    // (message id), empty application properties, empty data.
    assert_eq!(
        ours(
            &BasicProperties::default().with_message_id("m".into()),
            b"",
            0
        )
        .unwrap(),
        [
            0x00, 0x53, 0x70, 0x45, // header
            0x00, 0x53, 0x73, 0xc0, 0x04, 0x01, 0xa1, 0x01, b'm', // properties
            0x00, 0x53, 0x74, 0xc1, 0x01, 0x00, // application-properties
            0x00, 0x53, 0x75, 0xa0, 0x00, // data
        ]
    );
}

#[test]
fn strings_at_the_255_byte_limit() {
    let s255 = |c: char| ShortString::from(c.to_string().repeat(255));
    let p = props()
        .with_message_id(s255('i'))
        .with_content_type(s255('t'))
        .with_content_encoding(s255('e'))
        .with_correlation_id(s255('c'))
        .with_reply_to(s255('r'))
        .with_type(s255('k'))
        .with_user_id(s255('u'))
        .with_app_id(s255('a'))
        .with_cluster_id(s255('l'))
        .with_expiration(ShortString::from("0".repeat(254) + "7"));
    check(&p, b"body", MAX);
    // Multi-byte characters: 255 bytes, fewer characters.
    let p = props().with_message_id(ShortString::from("é".repeat(127) + "x"));
    check(&p, b"", MAX);
    // Keys and long strings around the widths, in the application properties and (not UTF-8,
    // nested) in the headers annotation.
    let mut p = props();
    for (key_len, n) in [(253, 254), (254, 255), (255, 256)] {
        p = with_header(
            p,
            &"k".repeat(key_len),
            AMQPValue::LongString(LongString::from("v".repeat(n))),
        );
        p = with_header(
            p,
            &format!("raw{n}"),
            AMQPValue::LongString(LongString::from(vec![0xff; n])),
        );
        p = with_header(
            p,
            &format!("bytes{n}"),
            AMQPValue::ByteArray(ByteArray::from(vec![1; n])),
        );
    }
    check(&p, b"", MAX);
}

/// One header of every type, as an application property where it has one, and all of them
/// again inside an array and a table (the headers annotation).
#[test]
fn every_header_type() {
    let values = vec![
        AMQPValue::Boolean(true),
        AMQPValue::Boolean(false),
        AMQPValue::ShortShortInt(-128),
        AMQPValue::ShortShortUInt(255),
        AMQPValue::ShortInt(-32768),
        AMQPValue::ShortUInt(65535),
        AMQPValue::LongInt(-128),
        AMQPValue::LongInt(127),
        AMQPValue::LongInt(-129),
        AMQPValue::LongInt(i32::MAX),
        AMQPValue::LongUInt(0),
        AMQPValue::LongUInt(255),
        AMQPValue::LongUInt(256),
        AMQPValue::LongLongInt(-128),
        AMQPValue::LongLongInt(128),
        AMQPValue::LongLongInt(i64::MIN),
        AMQPValue::Float(f32::from_bits(0x7fc0_0001)),
        AMQPValue::Float(-0.0),
        AMQPValue::Double(f64::from_bits(0x7ff8_0000_0000_0001)),
        AMQPValue::Double(1.5),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 314,
        }),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 255,
            value: u32::MAX,
        }),
        AMQPValue::LongString(LongString::from("text")),
        AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
        AMQPValue::Timestamp(0),
        AMQPValue::Timestamp(1_767_225_600),
        AMQPValue::Timestamp(i64::MAX as u64 / 1000),
        AMQPValue::Timestamp(i64::MAX as u64 / 1000 + 1),
        AMQPValue::Timestamp(u64::MAX),
        AMQPValue::ByteArray(ByteArray::from(vec![0, 1, 2])),
        AMQPValue::Void,
        AMQPValue::FieldArray(FieldArray::from(vec![])),
        AMQPValue::FieldTable(FieldTable::default()),
    ];
    let mut p = props();
    for (i, v) in values.iter().enumerate() {
        p = with_header(p, &format!("h{i:02}"), v.clone());
    }
    let table: FieldTable = values
        .iter()
        .enumerate()
        .map(|(i, v)| (ShortString::from(format!("t{i:02}")), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    p = with_header(p, "array", AMQPValue::FieldArray(FieldArray::from(values)));
    p = with_header(p, "table", AMQPValue::FieldTable(table));
    check(&p, b"{}", MAX);
    // Each alone too: small compounds (8-bit widths) around each.
    for v in [
        AMQPValue::Void,
        AMQPValue::Float(f32::NAN),
        AMQPValue::DecimalValue(DecimalValue { scale: 0, value: 0 }),
        AMQPValue::Timestamp(u64::MAX),
        AMQPValue::LongString(LongString::from(vec![0x80])),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
    ] {
        check(&with_header(props(), "only", v), b"", MAX);
    }
}

#[test]
fn every_basic_property_and_its_edge_values() {
    let full = props()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("c-1".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_timestamp(1_700_000_000)
        .with_type("order.created".into())
        .with_user_id("alice".into())
        .with_app_id("shop".into())
        .with_cluster_id("eu".into());
    check(&full, b"body", MAX);
    for p in [
        props().with_priority(4),
        props().with_priority(0),
        props().with_delivery_mode(1),
        props().with_expiration("0".into()),
        props().with_expiration("4294967295".into()),
        props().with_expiration("007".into()),
        props().with_expiration("00".into()),
        props().with_expiration("01".into()),
        props().with_expiration("10".into()),
        props().with_expiration("+5".into()),
        props().with_timestamp(0),
        props().with_timestamp(i64::MAX as u64 / 1000),
        props().with_timestamp(i64::MAX as u64 / 1000 + 1),
        props().with_timestamp(u64::MAX),
        props().with_content_type("".into()),
        props().with_content_type("tëxt/plain".into()),
        props().with_user_id("".into()),
    ] {
        check(&p, b"x", MAX);
    }
    // Expirations RabbitMQ never delivers (the float refuses them): still the same bytes.
    for p in [
        props().with_expiration("4294967296".into()),
        props().with_expiration("".into()),
        props().with_expiration("-1".into()),
    ] {
        let wire = serde_amqp::to_vec(&Serializable(message_to_amqp(&p, b"", MAX).unwrap()));
        assert_eq!(ours(&p, b"", MAX).unwrap(), wire.unwrap());
    }
}

#[test]
fn compounds_past_the_8_bit_widths() {
    // Application properties, the headers annotation, a nested array and a nested table each
    // over 254 bytes (32-bit sizes), one just under.
    let mut p = props();
    for i in 0..40 {
        p = with_header(p, &format!("app-{i:02}"), AMQPValue::LongInt(i));
    }
    let list = (0..60).map(AMQPValue::LongLongInt).collect::<Vec<_>>();
    p = with_header(p, "list", AMQPValue::FieldArray(FieldArray::from(list)));
    let table: FieldTable = (0..30)
        .map(|i| (ShortString::from(format!("key-{i:02}")), AMQPValue::Void))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    p = with_header(p, "table", AMQPValue::FieldTable(table));
    // 254 bytes of elements exactly: 127 two-byte ubytes.
    let under = (0..127).map(AMQPValue::ShortShortUInt).collect::<Vec<_>>();
    p = with_header(p, "under", AMQPValue::FieldArray(FieldArray::from(under)));
    check(&p, b"", MAX);
    let just = (0..127).map(AMQPValue::ShortShortUInt).collect::<Vec<_>>();
    check(
        &with_header(
            props(),
            "just",
            AMQPValue::FieldArray(FieldArray::from(just)),
        ),
        b"",
        MAX,
    );
}

#[test]
fn deep_nesting_is_refused_as_the_fe2o3_path_refuses_it() {
    for tables in [false, true] {
        let ok = with_header(
            props(),
            "deep",
            nest(mapping::MAX_DEPTH, tables, AMQPValue::Void),
        );
        check(&ok, b"", MAX);
        assert!(ours(&ok, b"", MAX).is_ok());
        let deep = with_header(
            props(),
            "deep",
            nest(mapping::MAX_DEPTH + 1, tables, AMQPValue::Void),
        );
        check(&deep, b"", MAX);
        assert_eq!(
            ours(&deep, b"", MAX),
            Err(Undeliverable::TooDeep("deep".into()))
        );
    }
    // A short string below the limit: unsupported, not too deep.
    let bottom = with_header(
        props(),
        "s",
        nest(
            mapping::MAX_DEPTH,
            false,
            AMQPValue::ShortString("v".into()),
        ),
    );
    check(&bottom, b"", MAX);
    assert_eq!(
        ours(&bottom, b"", MAX).unwrap_err().label(),
        "unsupported_header"
    );
}

#[test]
fn refusals_come_in_the_fe2o3_paths_order() {
    let short = AMQPValue::ShortString("v".into());
    let deep = nest(mapping::MAX_DEPTH + 1, false, AMQPValue::Void);
    let blob = AMQPValue::LongString(LongString::from("h".repeat(MAX_PROPERTIES_BYTES)));
    let no_id = BasicProperties::default().with_headers(props().headers().clone().unwrap());
    let cases = [
        // The first bad header in key order decides.
        with_header(with_header(props(), "a", deep.clone()), "b", short.clone()),
        with_header(with_header(props(), "a", short.clone()), "b", deep.clone()),
        // Headers before the message id, the properties' size before both.
        with_header(no_id.clone(), "a", short.clone()),
        with_header(with_header(no_id.clone(), "a", short), "b", blob.clone()),
        no_id.clone().with_message_id("".into()),
    ];
    for p in &cases {
        check(p, b"", MAX);
        assert!(ours(p, b"", MAX).is_err());
    }
    // The body's size before everything.
    let p = with_header(no_id, "b", blob);
    check(&p, b"12345", 4);
    assert_eq!(
        ours(&p, b"12345", 4),
        Err(Undeliverable::TooLarge { size: 5, max: 4 })
    );
    check(&props(), b"1234", 4);
}

#[test]
fn a_refusal_leaves_the_buffer_as_it_was() {
    let p = with_header(props(), "a", AMQPValue::ShortString("v".into()));
    // The bad header comes after a good annotation entry was written.
    let p = with_header(p, "0", AMQPValue::FieldArray(FieldArray::from(vec![])));
    let mut out = b"earlier message".to_vec();
    assert!(encode_message(&p, b"body", MAX, &mut out).is_err());
    assert_eq!(out, b"earlier message");
}

#[test]
fn a_reused_buffer_is_appended_to_without_growing() {
    let mut out = Vec::with_capacity(64 * 1024 + 1024);
    let body = vec![7u8; 64 * 1024];
    encode_message(&props(), &body, MAX, &mut out).unwrap();
    let first = out.clone();
    let (ptr, cap) = (out.as_ptr(), out.capacity());
    out.clear();
    encode_message(&props(), &body, MAX, &mut out).unwrap();
    assert_eq!(out, first);
    assert_eq!((out.as_ptr(), out.capacity()), (ptr, cap));
    // Appended, not cleared: two messages back to back.
    encode_message(&props(), b"second", MAX, &mut out).unwrap();
    assert_eq!(&out[..first.len()], first.as_slice());
    assert_eq!(&out[first.len()..], ours(&props(), b"second", MAX).unwrap());
}

#[test]
fn encode_takes_a_delivery_as_to_amqp_does() {
    let mut d = Delivery::mock(
        1,
        ShortString::from(""),
        ShortString::from("drawbridge.peers.bank-b"),
        false,
        b"payload".to_vec(),
    );
    d.properties = props().with_priority(9).with_app_id("shop".into());
    let mut out = Vec::new();
    encode(&d, MAX, &mut out).unwrap();
    let wire = serde_amqp::to_vec(&Serializable(to_amqp(&d, MAX).unwrap())).unwrap();
    assert_eq!(out, wire);
    assert_eq!(
        encode(&d, 3, &mut out),
        Err(Undeliverable::TooLarge { size: 7, max: 3 })
    );
}
