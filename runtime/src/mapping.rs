//! Names and limits of the AMQP 0.9.1 ↔ AMQP 1.0 message mapping.
//!
//! The bridge encodes a 0.9.1 delivery with these names and the float decodes with the same
//! ones, so they live in one place. The full table, with the exceptions and the reasons
//! for them, is in docs/architecture.md, section "Message mapping (AMQP 0.9.1 ↔ AMQP 1.0)".
//!
//! Message-annotation keys start `x-opt-`: AMQP 1.0 lets a receiver that does not know an
//! `x-opt-` annotation ignore it, so a foreign AMQP 1.0 consumer still reads the message.

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

/// Bytes of a content header frame besides its property list: class id (2), weight (2), body
/// size (8), property flags (2), and the frame's own header (7) and end octet (1).
const CONTENT_HEADER_OVERHEAD: usize = 2 + 2 + 8 + 2 + 7 + 1;

/// Room kept below the limit: [`properties_len`] is exact, this is a margin against a
/// miscount, not room for anything added later (what a daemon adds is counted).
const PROPERTIES_SLACK: usize = 16;

/// The largest property list (headers included) a publish may carry on a broker connection
/// whose negotiated `frame_max` is `frame_max`.
///
/// AMQP 0.9.1 carries a message's properties in one content header frame, which cannot be
/// split: RabbitMQ answers a larger one by closing the whole connection (`frame_too_large`),
/// which takes down every link publishing on it, and the message that caused it is
/// released and resent forever. So a daemon checks a message's properties against this
/// before it publishes, and refuses (the float) or dead-letters (the bridge) what does not
/// fit, with the reason.
pub fn max_properties_len(frame_max: u32) -> usize {
    (frame_max as usize).saturating_sub(CONTENT_HEADER_OVERHEAD + PROPERTIES_SLACK)
}

/// The encoded length of `p`'s property list (what [`max_properties_len`] bounds).
pub fn properties_len(p: &lapin::BasicProperties) -> usize {
    let short =
        |s: &Option<lapin::types::ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    short(p.content_type())
        + short(p.content_encoding())
        + p.headers().as_ref().map_or(0, table_len)
        + p.delivery_mode().map_or(0, |_| 1)
        + p.priority().map_or(0, |_| 1)
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

/// Encoded length of a field table (its 4-byte size included).
pub fn table_len(t: &lapin::types::FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_len(v))
        .sum::<usize>()
}

/// Encoded length of a field value, its type octet included. Recursion is bounded: the
/// tables a daemon builds nest at most [`MAX_DEPTH`] levels, and what a broker delivered
/// was decoded by lapin already.
fn value_len(v: &lapin::types::AMQPValue) -> usize {
    use lapin::types::AMQPValue as V;
    1 + match v {
        V::Boolean(_) | V::ShortShortInt(_) | V::ShortShortUInt(_) => 1,
        V::ShortInt(_) | V::ShortUInt(_) => 2,
        V::LongInt(_) | V::LongUInt(_) | V::Float(_) => 4,
        V::LongLongInt(_) | V::Double(_) | V::Timestamp(_) => 8,
        V::DecimalValue(_) => 5,
        V::ShortString(s) => 1 + s.as_str().len(),
        V::LongString(s) => 4 + s.as_bytes().len(),
        V::FieldArray(a) => 4 + a.as_slice().iter().map(value_len).sum::<usize>(),
        V::FieldTable(t) => table_len(t),
        V::ByteArray(b) => 4 + b.as_slice().len(),
        V::Void => 0,
    }
}

#[cfg(test)]
mod tests {
    use lapin::{
        types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
        BasicProperties,
    };

    use super::*;

    #[test]
    fn the_properties_length_counts_every_field_and_nested_header() {
        assert_eq!(properties_len(&BasicProperties::default()), 0);
        let mut inner = FieldTable::default();
        inner.insert(ShortString::from("n"), AMQPValue::LongInt(7));
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("k"),
            AMQPValue::LongString(LongString::from(vec![b'x'; 40_000])),
        );
        headers.insert(
            ShortString::from("arr"),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Boolean(true),
                AMQPValue::FieldTable(inner),
            ])),
        );
        let p = BasicProperties::default()
            .with_message_id(ShortString::from("m-1"))
            .with_delivery_mode(2)
            .with_timestamp(1)
            .with_headers(headers);
        // message id 1+3, delivery mode 1, timestamp 8; headers: 4 + (1+1 + 1+4+40,000)
        // + (1+3 + 1+4 + (1+1) + (1 + 4 + (1+1 + 1+4))).
        let headers = 4 + (2 + 5 + 40_000) + (4 + 5 + 2 + (1 + 4 + (2 + 5)));
        assert_eq!(properties_len(&p), 4 + 1 + 8 + headers);
        assert!(properties_len(&p) > max_properties_len(32 * 1024));
        assert_eq!(max_properties_len(32 * 1024), 32 * 1024 - 22 - 16);
    }
}
