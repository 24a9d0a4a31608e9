//! Generators shared by the mapping's property tests (`round_trip.rs`, `wire_out.rs`):
//! 0.9.1 properties with every basic property, every header value type, nested tables and
//! arrays, and short strings up to their 255-byte limit.

use lapin::{
    types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties,
};
use proptest::prelude::*;

use drawbridge_mapping::headers;

/// The destination header every generated message carries.
pub const DEST: &str = "O=Bank B, L=Paris, C=FR";

pub fn key() -> impl Strategy<Value = String> {
    // Header keys: short strings (≤ 255 bytes); any text, never one of Drawbridge's own.
    prop_oneof!["[a-zA-Z0-9._-]{0,16}", "\\PC{1,8}", "[a-z]{255}",]
        .prop_filter("reserved", |k| !k.starts_with("drawbridge-"))
}

/// Every field value type lapin has, except `ShortString` (no wire encoding RabbitMQ
/// accepts; the bridge refuses it, see `short_string_header_is_refused_by_the_bridge`).
pub fn field_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        "\\PC{0,12}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        proptest::collection::vec(any::<u8>(), 0..12)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        (0u64..4_000_000_000).prop_map(AMQPValue::Timestamp),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(|b| AMQPValue::ByteArray(b.into())),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            proptest::collection::btree_map(key(), inner, 0..6).prop_map(|m| {
                AMQPValue::FieldTable(
                    m.into_iter()
                        .map(|(k, v)| (ShortString::from(k), v))
                        .collect::<std::collections::BTreeMap<_, _>>()
                        .into(),
                )
            }),
        ]
    })
}

pub fn short_string() -> impl Strategy<Value = ShortString> {
    prop_oneof!["\\PC{0,20}", "[a-z0-9/+.-]{0,40}", "x{255}"].prop_map(ShortString::from)
}

pub fn expiration() -> impl Strategy<Value = ShortString> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        // Forms RabbitMQ also accepts but that `header.ttl` cannot reproduce.
        any::<u32>().prop_map(|n| format!("0{n}")),
        any::<u32>().prop_map(|n| format!("+{n}")),
        Just("-0".to_string()),
    ]
    .prop_map(ShortString::from)
}

pub fn properties() -> impl Strategy<Value = BasicProperties> {
    properties_with(prop_oneof!["\\PC{1,20}", "y{255}"].prop_map(|s| Some(ShortString::from(s))))
}

/// [`properties`] with message ids from `id` (`None`: no message id).
pub fn properties_with(
    id: impl Strategy<Value = Option<ShortString>>,
) -> impl Strategy<Value = BasicProperties> {
    let a = (
        prop::option::of(short_string()),
        prop::option::of(short_string()),
        proptest::collection::btree_map(key(), field_value(), 0..8),
        prop::option::of(any::<u8>()),
        prop::option::of(any::<u8>()),
        prop::option::of(short_string()),
        prop::option::of(short_string()),
    );
    let b = (
        prop::option::of(expiration()),
        id,
        prop::option::of(any::<u64>()),
        prop::option::of(short_string()),
        prop::option::of(short_string()),
        prop::option::of(short_string()),
        prop::option::of(short_string()),
    );
    (a, b).prop_map(
        |((ct, ce, hdrs, dm, prio, corr, reply), (exp, id, ts, kind, user, app, cluster))| {
            let mut t: FieldTable = hdrs
                .into_iter()
                .map(|(k, v)| (ShortString::from(k), v))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into();
            t.insert(
                ShortString::from(headers::DESTINATION),
                AMQPValue::LongString(LongString::from(DEST)),
            );
            let mut p = BasicProperties::default().with_headers(t);
            if let Some(v) = id {
                p = p.with_message_id(v);
            }
            if let Some(v) = ct {
                p = p.with_content_type(v);
            }
            if let Some(v) = ce {
                p = p.with_content_encoding(v);
            }
            if let Some(v) = dm {
                p = p.with_delivery_mode(v);
            }
            if let Some(v) = prio {
                p = p.with_priority(v);
            }
            if let Some(v) = corr {
                p = p.with_correlation_id(v);
            }
            if let Some(v) = reply {
                p = p.with_reply_to(v);
            }
            if let Some(v) = exp {
                p = p.with_expiration(v);
            }
            if let Some(v) = ts {
                p = p.with_timestamp(v);
            }
            if let Some(v) = kind {
                p = p.with_type(v);
            }
            if let Some(v) = user {
                p = p.with_user_id(v);
            }
            if let Some(v) = app {
                p = p.with_app_id(v);
            }
            if let Some(v) = cluster {
                p = p.with_cluster_id(v);
            }
            p
        },
    )
}
