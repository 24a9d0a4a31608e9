//! AMQP 1.0 transfer → AMQP 0.9.1 publish, with the float's validation.

use drawbridge_runtime::headers;
use fe2o3_amqp::types::{
    messaging::{Body, Message, MessageId},
    primitives::{SimpleValue, Value},
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// A validated inbound message, ready to publish.
#[derive(Debug)]
pub struct Inbound {
    /// End-to-end id (the dedup key, with the sender).
    pub message_id: String,
    /// Opaque payload.
    pub body: Vec<u8>,
    /// Legal name the message is for, as the sender wrote it.
    pub destination: String,
    /// Application headers (sender stamped later).
    pub headers: FieldTable,
    /// AMQP 1.0 `content-type`, carried over.
    pub content_type: Option<String>,
    /// AMQP 1.0 `correlation-id`, carried over.
    pub correlation_id: Option<String>,
}

/// Why a transfer cannot be delivered; sent back as the `rejected` description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// Body larger than `max_message_size`.
    #[error("message of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Size seen.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// No `properties.message-id`.
    #[error("message has no message-id")]
    NoMessageId,
    /// No `drawbridge-destination` application property.
    #[error("message has no drawbridge-destination application property")]
    NoDestination,
    /// The destination is not served by this float.
    #[error("destination `{0}` is not served by this float")]
    UnknownDestination(String),
    /// Body is not `data` sections or a binary/string `amqp-value`.
    #[error("unsupported body: {0}")]
    UnsupportedBody(&'static str),
    /// An application property of a type we cannot carry.
    #[error("application property `{0}` has an unsupported type")]
    UnsupportedProperty(String),
}

impl Invalid {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Invalid::TooLarge { .. } => "too_large",
            Invalid::NoMessageId => "no_message_id",
            Invalid::NoDestination => "no_destination",
            Invalid::UnknownDestination(_) => "unknown_destination",
            Invalid::UnsupportedBody(_) => "unsupported_body",
            Invalid::UnsupportedProperty(_) => "unsupported_property",
        }
    }
}

/// String form of an AMQP 1.0 message id.
pub fn message_id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => hex::encode(u.as_inner()),
        MessageId::Binary(b) => hex::encode(b.as_slice()),
    }
}

/// Validate and convert. `drawbridge-sender` from the peer is dropped here; the caller
/// stamps the authenticated one.
pub fn from_amqp(msg: Message<Body<Value>>, max_size: usize) -> Result<Inbound, Invalid> {
    let body = match msg.body {
        Body::Data(sections) => {
            let size: usize = sections.iter().map(|d| d.0.len()).sum();
            if size > max_size {
                return Err(Invalid::TooLarge {
                    size,
                    max: max_size,
                });
            }
            let mut out = Vec::with_capacity(size);
            for d in sections.iter() {
                out.extend_from_slice(&d.0);
            }
            out
        }
        Body::Value(v) => match v.0 {
            Value::Binary(b) => b.into_vec(),
            Value::String(s) => s.into_bytes(),
            _ => {
                return Err(Invalid::UnsupportedBody(
                    "amqp-value that is not binary or string",
                ))
            }
        },
        Body::Empty => Vec::new(),
        Body::Sequence(_) => return Err(Invalid::UnsupportedBody("amqp-sequence")),
    };
    if body.len() > max_size {
        return Err(Invalid::TooLarge {
            size: body.len(),
            max: max_size,
        });
    }
    let props = msg.properties.unwrap_or_default();
    let message_id = props
        .message_id
        .as_ref()
        .map(message_id_string)
        .filter(|s| !s.is_empty())
        .ok_or(Invalid::NoMessageId)?;
    let mut headers = FieldTable::default();
    let mut destination = None;
    if let Some(app) = msg.application_properties {
        for (k, v) in app.0.into_iter() {
            if k == headers::SENDER {
                continue;
            }
            if k == headers::DESTINATION {
                if let SimpleValue::String(s) = &v {
                    destination = Some(s.clone());
                }
            }
            let value = simple_to_amqp(v).ok_or_else(|| Invalid::UnsupportedProperty(k.clone()))?;
            headers.insert(ShortString::from(k), value);
        }
    }
    let destination = destination.ok_or(Invalid::NoDestination)?;
    Ok(Inbound {
        message_id,
        body,
        destination,
        headers,
        content_type: props.content_type.map(|s| s.0),
        correlation_id: props.correlation_id.as_ref().map(message_id_string),
    })
}

fn simple_to_amqp(v: SimpleValue) -> Option<AMQPValue> {
    Some(match v {
        SimpleValue::Null => AMQPValue::Void,
        SimpleValue::Bool(b) => AMQPValue::Boolean(b),
        SimpleValue::Ubyte(n) => AMQPValue::ShortShortUInt(n),
        SimpleValue::Ushort(n) => AMQPValue::ShortUInt(n),
        SimpleValue::Uint(n) => AMQPValue::LongUInt(n),
        SimpleValue::Ulong(n) => AMQPValue::LongLongInt(i64::try_from(n).ok()?),
        SimpleValue::Byte(n) => AMQPValue::ShortShortInt(n),
        SimpleValue::Short(n) => AMQPValue::ShortInt(n),
        SimpleValue::Int(n) => AMQPValue::LongInt(n),
        SimpleValue::Long(n) => AMQPValue::LongLongInt(n),
        SimpleValue::Float(f) => AMQPValue::Float(f.into_inner()),
        SimpleValue::Double(f) => AMQPValue::Double(f.into_inner()),
        SimpleValue::Timestamp(t) => {
            AMQPValue::Timestamp(u64::try_from(t.milliseconds() / 1000).ok()?)
        }
        SimpleValue::Binary(b) => AMQPValue::ByteArray(b.into_vec().into()),
        SimpleValue::String(s) => AMQPValue::LongString(LongString::from(s)),
        SimpleValue::Symbol(s) => AMQPValue::LongString(LongString::from(s.0)),
        SimpleValue::Char(c) => AMQPValue::LongString(LongString::from(c.to_string())),
        _ => return None,
    })
}
