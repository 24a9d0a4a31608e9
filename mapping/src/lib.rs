//! The AMQP 0.9.1 ↔ AMQP 1.0 message mapping, in one place for both daemons.
//!
//! The bridge turns a broker delivery into an AMQP 1.0 message ([`outbound`]); the float turns
//! what a peer sent back into a 0.9.1 publish ([`inbound`]); both use the names and limits
//! below and the header contract in [`headers`]. A message the bridge built comes back from the
//! float as it was sent, except the documented exceptions: [`check`] says exactly what the
//! receiving side must see, and the round-trip property test (`tests/round_trip.rs`) and the
//! `mapping_round_trip` fuzz target hold both directions to it. The full table, with the
//! exceptions and the reasons for them, is in docs/architecture.md, section "Message mapping
//! (AMQP 0.9.1 ↔ AMQP 1.0)".
//!
//! Message-annotation keys start `x-opt-`: AMQP 1.0 lets a receiver that does not know an
//! `x-opt-` annotation ignore it, so a foreign AMQP 1.0 consumer still reads the message.
#![forbid(unsafe_code)]

pub mod check;
pub mod headers;
pub mod inbound;
pub mod outbound;
pub mod wire_in;
pub mod wire_out;

/// Message annotation (string): the 0.9.1 `app-id`. AMQP 1.0 has no application-id field;
/// RabbitMQ maps it to `group-id`, which means message grouping in AMQP 1.0, so we don't.
pub const ANN_APP_ID: &str = "x-opt-app-id";
/// Message annotation (string): the 0.9.1 `cluster-id` (deprecated in 0.9.1, no AMQP 1.0
/// equivalent).
pub const ANN_CLUSTER_ID: &str = "x-opt-cluster-id";
/// Message annotation (ubyte): the 0.9.1 `priority`, present only when the 0.9.1 message
/// had one. `header.priority` carries it too, but AMQP 1.0 gives it a default (4), so
/// "no priority" and "priority 4" can only be told apart with this annotation.
pub const ANN_PRIORITY: &str = "x-opt-drawbridge-priority";
/// Message annotation (string): a 0.9.1 `expiration` that is not the canonical decimal
/// form of a `u32` (e.g. `"007"`, `"+5"`), which `header.ttl` cannot reproduce byte for byte.
pub const ANN_EXPIRATION: &str = "x-opt-drawbridge-expiration";
/// Message annotation (ulong, seconds): a 0.9.1 `timestamp` too large to express in
/// milliseconds as an AMQP 1.0 timestamp (an `i64`).
pub const ANN_TIMESTAMP: &str = "x-opt-drawbridge-timestamp";
/// Message annotation (map of string → value): the 0.9.1 headers that AMQP 1.0
/// application properties cannot hold (tables, arrays, decimals, long strings that are not
/// UTF-8, timestamps beyond the millisecond range), each encoded so that it decodes back to
/// exactly the same field value.
pub const ANN_HEADERS: &str = "x-opt-drawbridge-headers";

/// Descriptor of a 0.9.1 decimal: described list `[ubyte scale, uint value]`. AMQP 1.0's
/// decimal32/64/128 are IEEE 754 decimals, a different value space than 0.9.1's
/// (scale, u32) pair.
pub const DESC_DECIMAL: &str = "drawbridge:decimal";
/// Descriptor of a 0.9.1 long string that is not valid UTF-8: described binary. A plain
/// binary is a 0.9.1 byte array (`x`), a different type.
pub const DESC_LONGSTR: &str = "drawbridge:longstr";
/// Descriptor of a 0.9.1 timestamp (seconds) beyond the AMQP 1.0 millisecond range:
/// described ulong.
pub const DESC_TIMESTAMP: &str = "drawbridge:timestamp";

/// Deepest nesting of tables and arrays in one header value that is carried. A peer is
/// hostile: decoding recurses once per level, so the float refuses deeper values instead of
/// risking its stack, and the bridge dead-letters them rather than send what the float
/// would refuse.
pub const MAX_DEPTH: usize = 16;

/// Longest AMQP 0.9.1 short string (message id, content type, header key, ...), in bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// Largest encoded size, in bytes, of the AMQP 0.9.1 properties (headers included) of a
/// message the float publishes. The broker takes a message's properties in one content
/// header frame: a bigger one fails the whole broker connection (`frame_too_large`), not just
/// the publish, so one peer message would stop every peer of the float and, released, be
/// resent forever. Half of the default `broker.frame_max` (32 KiB): room for the float's own
/// headers, and for the bridge's dead-letter headers on the way back.
pub const MAX_PROPERTIES_BYTES: usize = 16 * 1024;

/// Room the bridge leaves below [`MAX_PROPERTIES_BYTES`] for the headers the float adds
/// (`drawbridge-sender`, the id types, the original user id): the bridge dead-letters a
/// node's message whose properties take more than the difference.
pub const FLOAT_STAMP_ROOM: usize = 2 * 1024;

/// Bytes of a content header frame besides the properties: frame type, channel and size
/// (7), class id, weight and body size (12), frame end (1).
pub const CONTENT_HEADER_OVERHEAD: usize = 20;

/// Whether properties of `properties_len` bytes ([`properties_len`]) fit one content header
/// frame on a connection whose negotiated `frame_max` is `frame_max` (0: no limit).
pub fn fits_frame(properties_len: usize, frame_max: u32) -> bool {
    frame_max == 0 || properties_len + CONTENT_HEADER_OVERHEAD <= frame_max as usize
}

/// The encoded size of `p` in a content header frame (property flags included), computed
/// without encoding: it is checked for every message.
pub fn properties_len(p: &lapin::BasicProperties) -> usize {
    let short =
        |s: &Option<lapin::types::ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    let byte = |b: &Option<u8>| usize::from(b.is_some());
    2 + short(p.content_type())
        + short(p.content_encoding())
        + p.headers().as_ref().map_or(0, table_len)
        + byte(p.delivery_mode())
        + byte(p.priority())
        + short(p.correlation_id())
        + short(p.reply_to())
        + short(p.expiration())
        + short(p.message_id())
        + p.timestamp().map_or(0, |_| 8)
        + short(p.kind())
        + short(p.user_id())
        + short(p.app_id())
        + short(p.cluster_id())
}

/// Encoded size of a field table: its length prefix, then each key and typed value.
fn table_len(t: &lapin::types::FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_len(v))
        .sum::<usize>()
}

/// Encoded size of a typed field value (type octet included). Recursion is bounded by the
/// nesting of values already decoded (or built) by the caller.
fn value_len(v: &lapin::types::AMQPValue) -> usize {
    use lapin::types::AMQPValue as V;
    1 + match v {
        V::Void => 0,
        V::Boolean(_) | V::ShortShortInt(_) | V::ShortShortUInt(_) => 1,
        V::ShortInt(_) | V::ShortUInt(_) => 2,
        V::LongInt(_) | V::LongUInt(_) | V::Float(_) => 4,
        V::LongLongInt(_) | V::Double(_) | V::Timestamp(_) => 8,
        V::DecimalValue(_) => 5,
        V::ShortString(s) => 1 + s.as_str().len(),
        V::LongString(s) => 4 + s.as_bytes().len(),
        V::ByteArray(b) => 4 + b.len(),
        V::FieldArray(a) => 4 + a.as_slice().iter().map(value_len).sum::<usize>(),
        V::FieldTable(t) => table_len(t),
    }
}

#[cfg(test)]
mod tests {
    use cookie_factory::{gen, sequence::tuple};
    use lapin::{
        protocol::basic::gen_properties,
        types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString},
        BasicProperties,
    };

    use super::*;

    fn encoded(p: &BasicProperties) -> usize {
        let (buf, _) = gen(tuple((gen_properties(p),)), Vec::new()).unwrap();
        buf.len()
    }

    #[test]
    fn properties_len_is_the_encoded_size() {
        assert_eq!(properties_len(&BasicProperties::default()), 2);
        assert_eq!(encoded(&BasicProperties::default()), 2);
        let mut inner = FieldTable::default();
        inner.insert("k".into(), AMQPValue::Void);
        let mut h = FieldTable::default();
        for (k, v) in [
            ("void", AMQPValue::Void),
            ("b", AMQPValue::Boolean(true)),
            ("i8", AMQPValue::ShortShortInt(-1)),
            ("u8", AMQPValue::ShortShortUInt(1)),
            ("i16", AMQPValue::ShortInt(-1)),
            ("u16", AMQPValue::ShortUInt(1)),
            ("i32", AMQPValue::LongInt(-1)),
            ("u32", AMQPValue::LongUInt(1)),
            ("i64", AMQPValue::LongLongInt(-1)),
            ("f", AMQPValue::Float(1.5)),
            ("d", AMQPValue::Double(1.5)),
            (
                "dec",
                AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 3 }),
            ),
            ("ss", AMQPValue::ShortString("short".into())),
            ("ls", AMQPValue::LongString(LongString::from("é long"))),
            ("ts", AMQPValue::Timestamp(7)),
            (
                "bytes",
                AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
            ),
            (
                "arr",
                AMQPValue::FieldArray(FieldArray::from(vec![
                    AMQPValue::LongInt(1),
                    AMQPValue::FieldTable(inner.clone()),
                ])),
            ),
            ("tbl", AMQPValue::FieldTable(inner)),
        ] {
            h.insert(k.into(), v);
        }
        let p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(h)
            .with_delivery_mode(2)
            .with_priority(5)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("60000".into())
            .with_message_id("m-1".into())
            .with_timestamp(1)
            .with_type("t".into())
            .with_user_id("u".into())
            .with_app_id("a".into())
            .with_cluster_id("cl".into());
        assert_eq!(properties_len(&p), encoded(&p));
    }

    #[test]
    fn the_content_header_frame_fits_or_not() {
        assert!(fits_frame(32_768 - CONTENT_HEADER_OVERHEAD, 32_768));
        assert!(!fits_frame(32_768 - CONTENT_HEADER_OVERHEAD + 1, 32_768));
        assert!(fits_frame(usize::MAX / 2, 0));
        assert!(fits_frame(
            MAX_PROPERTIES_BYTES,
            drawbridge_runtime::broker::DEFAULT_FRAME_MAX
        ));
    }
}
