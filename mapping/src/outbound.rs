//! AMQP 0.9.1 delivery → AMQP 1.0 message, with the bridge's validation.
//!
//! The mapping is lossless: [`crate::inbound::from_amqp`] turns the result back into the
//! same 0.9.1 properties, headers and body (the few documented exceptions are the float's:
//! delivery mode, user id). The table and the reasons are in docs/architecture.md,
//! "Message mapping (AMQP 0.9.1 ↔ AMQP 1.0)"; the annotation names are in
//! the crate root.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

use crate as mapping;
#[cfg(feature = "fe2o3")]
use fe2o3_amqp::types::{
    messaging::{
        ApplicationProperties, Data, Header, Message, MessageAnnotations, MessageId, Properties,
    },
    primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value},
};
#[cfg(feature = "fe2o3")]
use lapin::{
    message::Delivery,
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
#[cfg(feature = "fe2o3")]
use serde_amqp::{described::Described, descriptor::Descriptor};

/// Why a message can never be forwarded (it goes to the dead-letter queue).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Undeliverable {
    /// No `message_id` property.
    #[error("message has no message_id")]
    NoMessageId,
    /// Body over the configured maximum.
    #[error("message of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Size seen.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// A header value that cannot be carried unchanged. Dropping or rewriting it would change
    /// the message, so it is not forwarded.
    #[error("header `{key}` cannot be carried: {why}")]
    UnsupportedHeader {
        /// Header name (top level).
        key: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A header value nests tables/arrays deeper than [`mapping::MAX_DEPTH`]; the float would
    /// refuse it.
    #[error("header `{0}` nests tables or arrays deeper than {max}", max = mapping::MAX_DEPTH)]
    TooDeep(String),
    /// The 0.9.1 properties (headers included) are larger than a float publishes
    /// ([`mapping::MAX_PROPERTIES_BYTES`], less the room the float needs for its own
    /// headers): the float would refuse the message, or, before it checked, lose its broker
    /// connection over it and have it resent forever.
    #[error("the message's headers and properties take {size} bytes encoded; at most {max} are forwarded")]
    HeadersTooLarge {
        /// Encoded size of the message's properties.
        size: usize,
        /// The bound.
        max: usize,
    },
}

/// Largest encoded 0.9.1 properties of a message the bridge forwards: what a float
/// publishes, less the room it needs for the headers it adds.
pub const MAX_PROPERTIES_BYTES: usize = mapping::MAX_PROPERTIES_BYTES - mapping::FLOAT_STAMP_ROOM;

impl Undeliverable {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Undeliverable::NoMessageId => "no_message_id",
            Undeliverable::TooLarge { .. } => "too_large",
            Undeliverable::UnsupportedHeader { .. } => "unsupported_header",
            Undeliverable::TooDeep(_) => "too_deep",
            Undeliverable::HeadersTooLarge { .. } => "headers_too_large",
        }
    }
}

/// Build the AMQP 1.0 message for `d`.
#[cfg(feature = "fe2o3")]
pub fn to_amqp(d: &Delivery, max_size: usize) -> Result<Message<Data>, Undeliverable> {
    message_to_amqp(&d.properties, &d.data, max_size)
}

/// Build the AMQP 1.0 message for a 0.9.1 message with properties `p` and body `body`.
///
/// Separate from [`to_amqp`] so tests can convert properties without a broker delivery.
#[cfg(feature = "fe2o3")]
pub fn message_to_amqp(
    p: &BasicProperties,
    body: &[u8],
    max_size: usize,
) -> Result<Message<Data>, Undeliverable> {
    if body.len() > max_size {
        return Err(Undeliverable::TooLarge {
            size: body.len(),
            max: max_size,
        });
    }
    let size = mapping::properties_len(p);
    if size > MAX_PROPERTIES_BYTES {
        return Err(Undeliverable::HeadersTooLarge {
            size,
            max: MAX_PROPERTIES_BYTES,
        });
    }
    let id = p
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .filter(|s| !s.is_empty())
        .ok_or(Undeliverable::NoMessageId)?;

    let mut annotations = OrderedMap::new();
    let (app, rich) = match p.headers() {
        Some(headers) => split_headers(headers)?,
        None => (OrderedMap::new(), OrderedMap::new()),
    };
    if !rich.is_empty() {
        annotations.insert(mapping::ANN_HEADERS.into(), Value::Map(rich));
    }

    // The AMQP 1.0 header has a default priority (4), so an explicit 0.9.1 priority also
    // goes into an annotation; without it "no priority" and "priority 4" would collide.
    let mut header = Header {
        durable: *p.delivery_mode() == Some(2),
        ..Default::default()
    };
    if let Some(prio) = *p.priority() {
        header.priority = prio.into();
        annotations.insert(mapping::ANN_PRIORITY.into(), Value::Ubyte(prio));
    }
    if let Some(exp) = p.expiration() {
        // RabbitMQ has already checked the expiration is an integer in 0..=u32::MAX ms when
        // it was published; only its canonical form fits `ttl` byte for byte.
        match canonical_u32(exp.as_str()) {
            Some(ms) => header.ttl = Some(ms),
            None => {
                annotations.insert(
                    mapping::ANN_EXPIRATION.into(),
                    Value::String(exp.as_str().to_string()),
                );
            }
        }
    }

    let mut props = Properties {
        message_id: Some(MessageId::String(id)),
        content_type: p.content_type().as_ref().map(|s| Symbol::from(s.as_str())),
        content_encoding: p
            .content_encoding()
            .as_ref()
            .map(|s| Symbol::from(s.as_str())),
        correlation_id: p
            .correlation_id()
            .as_ref()
            .map(|s| MessageId::String(s.as_str().to_string())),
        reply_to: p.reply_to().as_ref().map(|s| s.as_str().to_string()),
        subject: p.kind().as_ref().map(|s| s.as_str().to_string()),
        user_id: p
            .user_id()
            .as_ref()
            .map(|s| Binary::from(s.as_str().as_bytes().to_vec())),
        ..Default::default()
    };
    if let Some(secs) = *p.timestamp() {
        match seconds_to_millis(secs) {
            Some(ms) => props.creation_time = Some(Timestamp::from_milliseconds(ms)),
            None => {
                annotations.insert(mapping::ANN_TIMESTAMP.into(), Value::Ulong(secs));
            }
        }
    }
    if let Some(app_id) = p.app_id() {
        annotations.insert(
            mapping::ANN_APP_ID.into(),
            Value::String(app_id.as_str().to_string()),
        );
    }
    if let Some(cluster_id) = p.cluster_id() {
        annotations.insert(
            mapping::ANN_CLUSTER_ID.into(),
            Value::String(cluster_id.as_str().to_string()),
        );
    }

    let builder = Message::builder()
        .header(header)
        .properties(props)
        .application_properties(ApplicationProperties(app));
    let builder = if annotations.is_empty() {
        builder
    } else {
        builder.message_annotations(MessageAnnotations(annotations))
    };
    Ok(builder.data(Binary::from(body.to_vec())).build())
}

/// `s` as a `u32` if `s` is exactly the decimal rendering of that number (no sign, no
/// leading zeros), so that rendering the number again gives `s` back.
#[cfg(feature = "fe2o3")]
fn canonical_u32(s: &str) -> Option<u32> {
    let n: u32 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// 0.9.1 timestamp (seconds) → AMQP 1.0 timestamp (milliseconds), if it fits.
#[cfg(feature = "fe2o3")]
fn seconds_to_millis(secs: u64) -> Option<i64> {
    i64::try_from(secs).ok()?.checked_mul(1000)
}

#[cfg(feature = "fe2o3")]
type AppMap = OrderedMap<String, SimpleValue>;

/// Split 0.9.1 headers into AMQP 1.0 application properties (every value that has an exact
/// simple-type counterpart) and the rest, encoded for the [`mapping::ANN_HEADERS`]
/// annotation.
#[cfg(feature = "fe2o3")]
fn split_headers(
    headers: &FieldTable,
) -> Result<(AppMap, OrderedMap<Value, Value>), Undeliverable> {
    let mut app = OrderedMap::new();
    let mut rich = OrderedMap::new();
    for (k, v) in headers.inner().iter() {
        let key = k.as_str().to_string();
        match field_to_simple(v) {
            Some(simple) => {
                app.insert(key, simple);
            }
            None => {
                let value = field_to_value(v, 0).map_err(|e| e.at(&key))?;
                rich.insert(Value::String(key), value);
            }
        }
    }
    Ok((app, rich))
}

/// The application-property value for a 0.9.1 field value, if one maps back to exactly that
/// field value. `None`: it goes into the headers annotation instead.
#[cfg(feature = "fe2o3")]
fn field_to_simple(v: &AMQPValue) -> Option<SimpleValue> {
    Some(match v {
        AMQPValue::Boolean(b) => SimpleValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => SimpleValue::Byte(*n),
        AMQPValue::ShortShortUInt(n) => SimpleValue::Ubyte(*n),
        AMQPValue::ShortInt(n) => SimpleValue::Short(*n),
        AMQPValue::ShortUInt(n) => SimpleValue::Ushort(*n),
        AMQPValue::LongInt(n) => SimpleValue::Int(*n),
        AMQPValue::LongUInt(n) => SimpleValue::Uint(*n),
        AMQPValue::LongLongInt(n) => SimpleValue::Long(*n),
        AMQPValue::Float(f) => SimpleValue::Float((*f).into()),
        AMQPValue::Double(f) => SimpleValue::Double((*f).into()),
        // 0.9.1 long strings are bytes: valid UTF-8 is a string; anything else is not
        // representable here (a binary would come back as a byte array).
        AMQPValue::LongString(s) => {
            SimpleValue::String(std::str::from_utf8(s.as_bytes()).ok()?.to_string())
        }
        AMQPValue::Timestamp(t) => {
            SimpleValue::Timestamp(Timestamp::from_milliseconds(seconds_to_millis(*t)?))
        }
        AMQPValue::ByteArray(b) => SimpleValue::Binary(Binary::from(b.as_slice().to_vec())),
        AMQPValue::Void => SimpleValue::Null,
        AMQPValue::ShortString(_)
        | AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_) => return None,
    })
}

/// Why one (possibly nested) field value cannot be encoded.
#[cfg(feature = "fe2o3")]
enum FieldError {
    Unsupported(&'static str),
    TooDeep,
}

#[cfg(feature = "fe2o3")]
impl FieldError {
    fn at(self, key: &str) -> Undeliverable {
        match self {
            FieldError::Unsupported(why) => Undeliverable::UnsupportedHeader {
                key: key.to_string(),
                why,
            },
            FieldError::TooDeep => Undeliverable::TooDeep(key.to_string()),
        }
    }
}

#[cfg(feature = "fe2o3")]
fn described(descriptor: &str, value: Value) -> Value {
    Value::Described(Box::new(Described {
        descriptor: Descriptor::Name(Symbol::from(descriptor)),
        value,
    }))
}

/// Encode any 0.9.1 field value as an AMQP 1.0 value that decodes back to exactly it.
/// `depth` is the number of tables/arrays around `v`.
#[cfg(feature = "fe2o3")]
fn field_to_value(v: &AMQPValue, depth: usize) -> Result<Value, FieldError> {
    Ok(match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::Byte(*n),
        AMQPValue::ShortShortUInt(n) => Value::Ubyte(*n),
        AMQPValue::ShortInt(n) => Value::Short(*n),
        AMQPValue::ShortUInt(n) => Value::Ushort(*n),
        AMQPValue::LongInt(n) => Value::Int(*n),
        AMQPValue::LongUInt(n) => Value::Uint(*n),
        AMQPValue::LongLongInt(n) => Value::Long(*n),
        AMQPValue::Float(f) => Value::Float((*f).into()),
        AMQPValue::Double(f) => Value::Double((*f).into()),
        AMQPValue::DecimalValue(d) => described(
            mapping::DESC_DECIMAL,
            Value::List(vec![Value::Ubyte(d.scale), Value::Uint(d.value)]),
        ),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => Value::String(text.to_string()),
            Err(_) => described(
                mapping::DESC_LONGSTR,
                Value::Binary(s.as_bytes().to_vec().into()),
            ),
        },
        AMQPValue::Timestamp(t) => match seconds_to_millis(*t) {
            Some(ms) => Value::Timestamp(Timestamp::from_milliseconds(ms)),
            None => described(mapping::DESC_TIMESTAMP, Value::Ulong(*t)),
        },
        AMQPValue::ByteArray(b) => Value::Binary(b.as_slice().to_vec().into()),
        AMQPValue::Void => Value::Null,
        AMQPValue::FieldArray(a) => {
            if depth >= mapping::MAX_DEPTH {
                return Err(FieldError::TooDeep);
            }
            Value::List(
                a.as_slice()
                    .iter()
                    .map(|x| field_to_value(x, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
        AMQPValue::FieldTable(t) => {
            if depth >= mapping::MAX_DEPTH {
                return Err(FieldError::TooDeep);
            }
            let mut m = OrderedMap::new();
            for (k, x) in t.inner().iter() {
                m.insert(
                    Value::String(k.as_str().to_string()),
                    field_to_value(x, depth + 1)?,
                );
            }
            Value::Map(m)
        }
        // lapin writes a short-string field value with type tag `_`, which is no 0.9.1 or
        // RabbitMQ type (RabbitMQ refuses such a publish), and lapin never decodes one from
        // the wire: a delivery cannot hold one. Refused rather than silently turned into a
        // long string.
        AMQPValue::ShortString(_) => {
            return Err(FieldError::Unsupported(
                "short-string field values have no wire encoding RabbitMQ accepts",
            ))
        }
    })
}

#[cfg(all(test, feature = "fe2o3"))]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray, LongString, ShortString};

    fn props() -> BasicProperties {
        BasicProperties::default().with_message_id(ShortString::from("m-1"))
    }

    fn ann<'a>(m: &'a Message<Data>, key: &str) -> Option<&'a Value> {
        m.message_annotations.as_ref()?.0.get(
            &fe2o3_amqp::types::messaging::annotations::OwnedKey::from(key),
        )
    }

    #[test]
    fn every_basic_property_is_mapped() {
        let p = props()
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
        let m = message_to_amqp(&p, b"body", 1024).unwrap();
        let pr = m.properties.as_ref().unwrap();
        assert_eq!(pr.message_id, Some(MessageId::String("m-1".into())));
        assert_eq!(pr.content_type, Some(Symbol::from("application/json")));
        assert_eq!(pr.content_encoding, Some(Symbol::from("gzip")));
        assert_eq!(pr.correlation_id, Some(MessageId::String("c-1".into())));
        assert_eq!(pr.reply_to.as_deref(), Some("replies"));
        assert_eq!(pr.subject.as_deref(), Some("order.created"));
        assert_eq!(pr.user_id, Some(Binary::from(b"alice".to_vec())));
        assert_eq!(
            pr.creation_time,
            Some(Timestamp::from_milliseconds(1_700_000_000_000))
        );
        let h = m.header.as_ref().unwrap();
        assert!(h.durable);
        assert_eq!(h.priority.0, 7);
        assert_eq!(h.ttl, Some(60_000));
        assert_eq!(ann(&m, mapping::ANN_PRIORITY), Some(&Value::Ubyte(7)));
        assert_eq!(
            ann(&m, mapping::ANN_APP_ID),
            Some(&Value::String("shop".into()))
        );
        assert_eq!(
            ann(&m, mapping::ANN_CLUSTER_ID),
            Some(&Value::String("eu".into()))
        );
        assert_eq!(ann(&m, mapping::ANN_EXPIRATION), None);
        assert_eq!(m.body.0.as_slice(), b"body");
    }

    #[test]
    fn headers_no_float_would_publish_are_undeliverable() {
        let with_blob = |n: usize| {
            let mut t = FieldTable::default();
            t.insert("blob".into(), AMQPValue::LongString("h".repeat(n).into()));
            props().with_headers(t)
        };
        let err = message_to_amqp(&with_blob(20_000), b"", 1024).unwrap_err();
        assert_eq!(err.label(), "headers_too_large");
        assert!(matches!(
            err,
            Undeliverable::HeadersTooLarge {
                max: MAX_PROPERTIES_BYTES,
                ..
            }
        ));
        assert!(message_to_amqp(&with_blob(10_000), b"", 1024).is_ok());
    }

    #[test]
    fn absent_properties_stay_absent() {
        let m = message_to_amqp(&props(), b"", 1024).unwrap();
        assert!(m.message_annotations.is_none());
        let h = m.header.as_ref().unwrap();
        assert!(!h.durable);
        assert_eq!(h.ttl, None);
        let pr = m.properties.as_ref().unwrap();
        assert_eq!(pr.creation_time, None);
        assert_eq!(pr.subject, None);
    }

    #[test]
    fn non_canonical_expiration_and_huge_timestamp_go_to_annotations() {
        let p = props()
            .with_expiration("007".into())
            .with_timestamp(u64::MAX);
        let m = message_to_amqp(&p, b"", 1024).unwrap();
        assert_eq!(m.header.as_ref().unwrap().ttl, None);
        assert_eq!(
            ann(&m, mapping::ANN_EXPIRATION),
            Some(&Value::String("007".into()))
        );
        assert_eq!(
            ann(&m, mapping::ANN_TIMESTAMP),
            Some(&Value::Ulong(u64::MAX))
        );
        assert_eq!(m.properties.as_ref().unwrap().creation_time, None);
    }

    #[test]
    fn simple_headers_become_typed_application_properties() {
        let mut t = FieldTable::default();
        t.insert("b".into(), AMQPValue::ShortShortInt(-1));
        t.insert("B".into(), AMQPValue::ShortShortUInt(1));
        t.insert("s".into(), AMQPValue::LongString(LongString::from("text")));
        t.insert("x".into(), AMQPValue::ByteArray(vec![0xff, 0].into()));
        t.insert("T".into(), AMQPValue::Timestamp(2));
        t.insert("V".into(), AMQPValue::Void);
        let m = message_to_amqp(&props().with_headers(t), b"", 1024).unwrap();
        let app = &m.application_properties.as_ref().unwrap().0;
        assert_eq!(app.get("b"), Some(&SimpleValue::Byte(-1)));
        assert_eq!(app.get("B"), Some(&SimpleValue::Ubyte(1)));
        assert_eq!(app.get("s"), Some(&SimpleValue::String("text".into())));
        assert_eq!(
            app.get("x"),
            Some(&SimpleValue::Binary(Binary::from(vec![0xff, 0])))
        );
        assert_eq!(
            app.get("T"),
            Some(&SimpleValue::Timestamp(Timestamp::from_milliseconds(2000)))
        );
        assert_eq!(app.get("V"), Some(&SimpleValue::Null));
        assert!(m.message_annotations.is_none());
    }

    #[test]
    fn complex_headers_go_to_the_headers_annotation() {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongInt(5));
        let mut t = FieldTable::default();
        t.insert("tbl".into(), AMQPValue::FieldTable(inner));
        t.insert(
            "arr".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
        );
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 314,
            }),
        );
        t.insert(
            "raw".into(),
            AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
        );
        let m = message_to_amqp(&props().with_headers(t), b"", 1024).unwrap();
        assert!(m.application_properties.as_ref().unwrap().0.is_empty());
        let Some(Value::Map(rich)) = ann(&m, mapping::ANN_HEADERS) else {
            panic!("no headers annotation");
        };
        let mut expected_tbl = OrderedMap::new();
        expected_tbl.insert(Value::String("n".into()), Value::Int(5));
        assert_eq!(
            rich.get(&Value::String("tbl".into())),
            Some(&Value::Map(expected_tbl))
        );
        assert_eq!(
            rich.get(&Value::String("arr".into())),
            Some(&Value::List(vec![Value::Bool(true)]))
        );
        assert_eq!(
            rich.get(&Value::String("dec".into())),
            Some(&described(
                mapping::DESC_DECIMAL,
                Value::List(vec![Value::Ubyte(2), Value::Uint(314)])
            ))
        );
        assert_eq!(
            rich.get(&Value::String("raw".into())),
            Some(&described(
                mapping::DESC_LONGSTR,
                Value::Binary(vec![0xff, 0xfe].into())
            ))
        );
    }

    fn nested(levels: usize) -> AMQPValue {
        let mut v = AMQPValue::Void;
        for _ in 0..levels {
            v = AMQPValue::FieldArray(FieldArray::from(vec![v]));
        }
        v
    }

    #[test]
    fn nesting_is_bounded() {
        let mut t = FieldTable::default();
        t.insert("ok".into(), nested(mapping::MAX_DEPTH));
        assert!(message_to_amqp(&props().with_headers(t), b"", 1024).is_ok());
        let mut t = FieldTable::default();
        t.insert("deep".into(), nested(mapping::MAX_DEPTH + 1));
        assert_eq!(
            message_to_amqp(&props().with_headers(t), b"", 1024).unwrap_err(),
            Undeliverable::TooDeep("deep".into())
        );
    }

    #[test]
    fn short_string_values_are_refused_not_rewritten() {
        let mut t = FieldTable::default();
        t.insert("k".into(), AMQPValue::ShortString(ShortString::from("v")));
        let err = message_to_amqp(&props().with_headers(t), b"", 1024).unwrap_err();
        assert_eq!(err.label(), "unsupported_header");
    }

    #[test]
    fn missing_or_empty_message_id_and_oversize_are_refused() {
        assert_eq!(
            message_to_amqp(&BasicProperties::default(), b"", 1024).unwrap_err(),
            Undeliverable::NoMessageId
        );
        assert_eq!(
            message_to_amqp(
                &BasicProperties::default().with_message_id("".into()),
                b"",
                1024
            )
            .unwrap_err(),
            Undeliverable::NoMessageId
        );
        assert_eq!(
            message_to_amqp(&props(), b"12345", 4).unwrap_err(),
            Undeliverable::TooLarge { size: 5, max: 4 }
        );
    }
}
