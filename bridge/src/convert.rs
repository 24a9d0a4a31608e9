//! AMQP 0.9.1 delivery → AMQP 1.0 message, with the bridge's validation.

use fe2o3_amqp::types::{
    messaging::{ApplicationProperties, Data, Message, MessageId, Properties},
    primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp},
};
use lapin::{message::Delivery, types::AMQPValue};

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
    /// A header that AMQP 1.0 application properties cannot carry (nested tables, arrays,
    /// decimals). Dropping it would change the message, so it is not forwarded.
    #[error("header `{0}` has a type that cannot be carried (table, array or decimal)")]
    UnsupportedHeader(String),
}

impl Undeliverable {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Undeliverable::NoMessageId => "no_message_id",
            Undeliverable::TooLarge { .. } => "too_large",
            Undeliverable::UnsupportedHeader(_) => "unsupported_header",
        }
    }
}

/// Build the AMQP 1.0 message for `d`.
pub fn to_amqp(d: &Delivery, max_size: usize) -> Result<Message<Data>, Undeliverable> {
    if d.data.len() > max_size {
        return Err(Undeliverable::TooLarge {
            size: d.data.len(),
            max: max_size,
        });
    }
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .filter(|s| !s.is_empty())
        .ok_or(Undeliverable::NoMessageId)?;
    let mut app = OrderedMap::new();
    if let Some(headers) = d.properties.headers() {
        for (k, v) in headers.inner().iter() {
            let key = k.as_str().to_string();
            let value =
                amqp_to_simple(v).ok_or_else(|| Undeliverable::UnsupportedHeader(key.clone()))?;
            app.insert(key, value);
        }
    }
    let props = Properties {
        message_id: Some(MessageId::String(id)),
        content_type: d
            .properties
            .content_type()
            .as_ref()
            .map(|s| Symbol::from(s.as_str())),
        correlation_id: d
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| MessageId::String(s.as_str().to_string())),
        ..Default::default()
    };
    Ok(Message::builder()
        .properties(props)
        .application_properties(ApplicationProperties(app))
        .data(Binary::from(d.data.clone()))
        .build())
}

fn amqp_to_simple(v: &AMQPValue) -> Option<SimpleValue> {
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
        AMQPValue::ShortString(s) => SimpleValue::String(s.as_str().to_string()),
        // 0.9.1 long strings are bytes: carry valid UTF-8 as a string, anything else unchanged
        // as binary rather than lossily.
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => SimpleValue::String(text.to_string()),
            Err(_) => SimpleValue::Binary(Binary::from(s.as_bytes().to_vec())),
        },
        AMQPValue::Timestamp(t) => SimpleValue::Timestamp(Timestamp::from_milliseconds(
            (*t as i64).saturating_mul(1000),
        )),
        AMQPValue::ByteArray(b) => SimpleValue::Binary(Binary::from(b.as_slice().to_vec())),
        AMQPValue::Void => SimpleValue::Null,
        AMQPValue::DecimalValue(_) | AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => {
            return None
        }
    })
}
