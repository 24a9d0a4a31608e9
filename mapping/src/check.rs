//! The mapping's promise, as code: what a receiving node must see for a message a sending node
//! published, and a round trip through both directions and the AMQP 1.0 wire encoding, as
//! the daemons do it.
//!
//! The round-trip property test (`tests/round_trip.rs`), the `mapping_round_trip` fuzz target
//! and the end-to-end fidelity test (through brokers and daemons) all hold the mapping to
//! [`expected`], so the documented exceptions are written down once.

use lapin::{
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties,
};

use crate::{headers, inbound, wire_in, wire_out};

/// The daemons' path: the bridge's encoding straight from the 0.9.1 message
/// ([`wire_out::encode_message`]), then the float's one-pass parse of those bytes
/// ([`wire_in::from_bytes`]). `Ok(None)`: the bridge refused the message (it dead-letters it,
/// with a reason); `Err`: something the bridge sent did not come through the float, a broken
/// promise.
pub fn round_trip(
    p: &BasicProperties,
    body: &[u8],
    max_size: usize,
) -> Result<Option<inbound::Inbound>, String> {
    let mut wire = Vec::new();
    if wire_out::encode_message(p, body, max_size, &mut wire).is_err() {
        return Ok(None);
    }
    wire_in::from_bytes(&wire, max_size)
        .map(Some)
        .map_err(|e| format!("the float refused the bridge's message: {e}"))
}

/// The whole promise for one message: the bridge refuses it, or the float gives back
/// [`expected`] properties, the same body and the same message id.
pub fn holds(p: &BasicProperties, body: &[u8], max_size: usize) -> Result<(), String> {
    let Some(got) = round_trip(p, body, max_size)? else {
        return Ok(());
    };
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
        return Err(format!(
            "message id {:?} arrived as {:?}",
            id, got.message_id
        ));
    }
    Ok(())
}

/// What the receiving side must see for `p`: the same, except the documented exceptions
/// (reserved headers dropped, delivery mode 2, `user_id` moved to a header). The sender the
/// float stamps afterwards is not part of it.
pub fn expected(p: &BasicProperties) -> BasicProperties {
    let mut hdrs = FieldTable::default();
    for (k, v) in p.headers().clone().unwrap_or_default().inner() {
        if !headers::reserved(k.as_str()) {
            hdrs.insert(k.clone(), v.clone());
        }
    }
    if let Some(user) = p.user_id() {
        hdrs.insert(
            ShortString::from(headers::ORIGINAL_USER_ID),
            AMQPValue::LongString(LongString::from(user.as_str())),
        );
    }
    let mut e = p.clone().with_delivery_mode(2).with_headers(hdrs);
    // `BasicProperties` has no way to unset a field: rebuild without user_id.
    if p.user_id().is_some() {
        e = without_user_id(&e);
    }
    e
}

fn without_user_id(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($get:ident, $set:ident) => {
            if let Some(v) = p.$get().clone() {
                out = out.$set(v);
            }
        };
    }
    copy!(content_type, with_content_type);
    copy!(content_encoding, with_content_encoding);
    copy!(headers, with_headers);
    copy!(delivery_mode, with_delivery_mode);
    copy!(priority, with_priority);
    copy!(correlation_id, with_correlation_id);
    copy!(reply_to, with_reply_to);
    copy!(expiration, with_expiration);
    copy!(message_id, with_message_id);
    copy!(timestamp, with_timestamp);
    copy!(kind, with_type);
    copy!(app_id, with_app_id);
    copy!(cluster_id, with_cluster_id);
    out
}

/// Field values equal, floats compared bit for bit (NaN == NaN, 0.0 != -0.0).
pub fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (a, b) {
        (AMQPValue::Float(x), AMQPValue::Float(y)) => x.to_bits() == y.to_bits(),
        (AMQPValue::Double(x), AMQPValue::Double(y)) => x.to_bits() == y.to_bits(),
        (AMQPValue::FieldArray(x), AMQPValue::FieldArray(y)) => {
            x.as_slice().len() == y.as_slice().len()
                && x.as_slice()
                    .iter()
                    .zip(y.as_slice())
                    .all(|(a, b)| same_value(a, b))
        }
        (AMQPValue::FieldTable(x), AMQPValue::FieldTable(y)) => same_table(x, y),
        _ => a == b,
    }
}

/// Tables equal, values compared with [`same_value`].
pub fn same_table(x: &FieldTable, y: &FieldTable) -> bool {
    x.inner().len() == y.inner().len()
        && x.inner()
            .iter()
            .zip(y.inner())
            .all(|((ka, va), (kb, vb))| ka == kb && same_value(va, vb))
}

/// Properties equal, headers compared with [`same_table`].
pub fn same_properties(a: &BasicProperties, b: &BasicProperties) -> bool {
    let ha = a.headers().clone().unwrap_or_default();
    let hb = b.headers().clone().unwrap_or_default();
    same_table(&ha, &hb)
        && a.clone().with_headers(FieldTable::default())
            == b.clone().with_headers(FieldTable::default())
}
