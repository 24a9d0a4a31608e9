//! The mapping's promise for messages a fuzzer builds: a 0.9.1 message a node publishes is
//! either refused by the bridge (it is dead-lettered with a reason) or comes out of the float
//! as it went in, except the documented exceptions ([`drawbridge_mapping::check::holds`]):
//! through the bridge's encoding (`wire_out`) and the float's one-pass parse (`wire_in`), as
//! the daemons do it. A difference, or something the bridge sent that the float refuses,
//! is a crash.
//!
//! The input drives the choice of every property and header (values of every 0.9.1 field
//! type, nested past the mapping's depth limit, keys and strings up to and past 255 bytes).
#![no_main]

use drawbridge_mapping::{check, headers};
use lapin::{
    types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    },
    BasicProperties,
};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};

const DESTINATION: &str = "O=Bank B, L=Paris, C=FR";
/// The body limit both daemons are given here.
const MAX_SIZE: usize = 1 << 16;
/// Deeper than the mapping carries (16): the bridge must refuse what the float would.
const MAX_GEN_DEPTH: usize = 18;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((p, body)) = message(&mut u) else {
        return;
    };
    if let Err(broken) = check::holds(&p, &body, MAX_SIZE) {
        panic!("the mapping broke its promise: {broken}");
    }
});

fn message(u: &mut Unstructured<'_>) -> Result<(BasicProperties, Vec<u8>)> {
    let mut t: FieldTable = FieldTable::default();
    for _ in 0..u.int_in_range(0..=6)? {
        let k = short(u)?;
        let v = value(u, 0)?;
        t.insert(k, v);
    }
    // Nodes always name the destination (the float refuses a message without one).
    t.insert(
        headers::DESTINATION.into(),
        AMQPValue::LongString(DESTINATION.into()),
    );
    let mut p = BasicProperties::default()
        .with_message_id(short(u)?)
        .with_headers(t);
    macro_rules! maybe {
        ($set:ident, $gen:expr) => {
            if u.arbitrary::<bool>()? {
                p = p.$set($gen);
            }
        };
    }
    maybe!(with_content_type, short(u)?);
    maybe!(with_content_encoding, short(u)?);
    maybe!(with_delivery_mode, u.arbitrary()?);
    maybe!(with_priority, u.arbitrary()?);
    maybe!(with_correlation_id, short(u)?);
    maybe!(with_reply_to, short(u)?);
    maybe!(with_expiration, expiration(u)?);
    maybe!(with_timestamp, u.arbitrary()?);
    maybe!(with_type, short(u)?);
    maybe!(with_user_id, short(u)?);
    maybe!(with_app_id, short(u)?);
    maybe!(with_cluster_id, short(u)?);
    let body: Vec<u8> = u.arbitrary()?;
    Ok((p, body))
}

/// A string of at most 255 bytes (what a 0.9.1 short string holds; lapin panics beyond).
fn short(u: &mut Unstructured<'_>) -> Result<ShortString> {
    let s: String = if u.ratio(1, 16)? {
        "k".repeat(u.int_in_range(250..=255)?)
    } else {
        u.arbitrary()?
    };
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Ok(ShortString::from(&s[..end]))
}

/// Expirations RabbitMQ takes, in forms `header.ttl` reproduces and forms it does not.
fn expiration(u: &mut Unstructured<'_>) -> Result<ShortString> {
    let n: u32 = u.arbitrary()?;
    Ok(ShortString::from(match u.int_in_range(0..=3)? {
        0 => n.to_string(),
        1 => format!("0{n}"),
        2 => format!("+{n}"),
        _ => "-0".to_string(),
    }))
}

fn value(u: &mut Unstructured<'_>, depth: usize) -> Result<AMQPValue> {
    let nest = depth < MAX_GEN_DEPTH;
    Ok(match u.int_in_range(0..=if nest { 19 } else { 17 })? {
        0 => AMQPValue::Boolean(u.arbitrary()?),
        1 => AMQPValue::ShortShortInt(u.arbitrary()?),
        2 => AMQPValue::ShortShortUInt(u.arbitrary()?),
        3 => AMQPValue::ShortInt(u.arbitrary()?),
        4 => AMQPValue::ShortUInt(u.arbitrary()?),
        5 => AMQPValue::LongInt(u.arbitrary()?),
        6 => AMQPValue::LongUInt(u.arbitrary()?),
        7 => AMQPValue::LongLongInt(u.arbitrary()?),
        8 => AMQPValue::Float(u.arbitrary()?),
        9 => AMQPValue::Double(u.arbitrary()?),
        10 => AMQPValue::DecimalValue(DecimalValue {
            scale: u.arbitrary()?,
            value: u.arbitrary()?,
        }),
        11 => AMQPValue::LongString(LongString::from(u.arbitrary::<String>()?)),
        12 => AMQPValue::LongString(LongString::from(u.arbitrary::<Vec<u8>>()?)),
        13 => AMQPValue::Timestamp(u.arbitrary()?),
        14 => AMQPValue::ByteArray(ByteArray::from(u.arbitrary::<Vec<u8>>()?)),
        15 => AMQPValue::Void,
        // The one type no 0.9.1 message can hold (RabbitMQ refuses it): the bridge refuses it.
        16 => AMQPValue::ShortString(short(u)?),
        17 => AMQPValue::Timestamp(u.int_in_range(0..=4_000_000_000)?),
        18 => {
            let mut items = Vec::new();
            for _ in 0..u.int_in_range(0..=4)? {
                items.push(value(u, depth + 1)?);
            }
            AMQPValue::FieldArray(FieldArray::from(items))
        }
        _ => {
            let mut t = FieldTable::default();
            for _ in 0..u.int_in_range(0..=4)? {
                let k = short(u)?;
                let v = value(u, depth + 1)?;
                t.insert(k, v);
            }
            AMQPValue::FieldTable(t)
        }
    })
}
