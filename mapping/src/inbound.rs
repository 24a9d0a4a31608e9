//! AMQP 1.0 transfer → AMQP 0.9.1 publish, with the float's validation.
//!
//! The inverse of the bridge's `convert::to_amqp`: a message the bridge built comes back as
//! the same 0.9.1 properties, headers and body, with two documented exceptions (delivery
//! mode is always 2; `user_id` moves to the `drawbridge-original-user-id` header). The table
//! and the reasons are in docs/architecture.md, "Message mapping (AMQP 0.9.1 ↔ AMQP 1.0)".
//!
//! Everything here is peer input: nothing may panic. Strings that become 0.9.1 short strings
//! are length-checked (lapin's `ShortString::from` panics over 255 bytes), nesting is bounded
//! by [`mapping::MAX_DEPTH`], and whatever does not fit is refused with an [`Invalid`]
//! reason rather than altered.

#[cfg(feature = "fe2o3")]
use crate::headers;
use crate::{self as mapping};
use drawbridge_runtime::text;
#[cfg(feature = "fe2o3")]
use fe2o3_amqp::types::{
    messaging::{annotations::AnnotationKey, Body, Message, MessageAnnotations, MessageId},
    primitives::{SimpleValue, Value},
};
#[cfg(feature = "fe2o3")]
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
#[cfg(feature = "fe2o3")]
use serde_amqp::descriptor::Descriptor;

/// The AMQP 1.0 type of a message id (or correlation id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdType {
    /// `string`: carried as is.
    String,
    /// `ulong`: rendered in decimal.
    Ulong,
    /// `uuid`: rendered `urn:uuid:xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as RabbitMQ does.
    Uuid,
    /// `binary`: rendered as lowercase hex.
    Binary,
}

impl IdType {
    /// Name used in the `drawbridge-message-id-type` header and the dedup key.
    pub fn as_str(self) -> &'static str {
        match self {
            IdType::String => "string",
            IdType::Ulong => "ulong",
            IdType::Uuid => "uuid",
            IdType::Binary => "binary",
        }
    }
}

/// A validated inbound message, ready to publish.
#[derive(Debug)]
pub struct Inbound {
    /// End-to-end id as a 0.9.1 `message_id` (the string rendering for non-string ids).
    pub message_id: String,
    /// The AMQP 1.0 type of the id; with [`Inbound::message_id`] it forms the dedup key.
    pub message_id_type: IdType,
    /// Opaque payload.
    pub body: Vec<u8>,
    /// Legal name the message is for, as the sender wrote it.
    pub destination: String,
    /// Every 0.9.1 property to publish with, headers included; the authenticated
    /// `drawbridge-sender` header too when converted with [`from_amqp_stamped`].
    pub properties: BasicProperties,
    /// How many reserved headers ([`headers::reserved`]) the peer sent and were dropped.
    pub stripped_headers: usize,
    /// Encoded size of [`Inbound::properties`] ([`mapping::properties_len`]): checked against
    /// the broker connection's frame size before publishing, and counted with the body in the
    /// bytes in flight.
    pub properties_len: usize,
}

impl Inbound {
    /// Duplicate-suppression key: the id's type and its rendering, so that the ulong 5 and
    /// the string "5" (or a uuid and the binary of its bytes) are different messages.
    pub fn dedup_key(&self) -> String {
        // Sized once: `format!` grows its buffer as it goes (two allocations per message).
        let kind = self.message_id_type.as_str();
        let mut key = String::with_capacity(kind.len() + 1 + self.message_id.len());
        key.push_str(kind);
        key.push(':');
        key.push_str(&self.message_id);
        key
    }
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
    /// The destination is not served by this float (the destination as written, cut to
    /// [`MAX_ECHO`] bytes: it goes back to the peer and into logs).
    #[error("destination `{0}` is not served by this float")]
    UnknownDestination(String),
    /// A `drawbridge-destination` longer than any legal name this float serves could be.
    #[error("drawbridge-destination is {len} bytes; at most {max} are taken", max = MAX_DESTINATION_BYTES)]
    DestinationTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The 0.9.1 properties (headers included) would not fit one broker frame.
    #[error("the message's headers and properties take {size} bytes encoded; at most {max} fit")]
    HeadersTooLarge {
        /// Encoded size of the properties the float would publish.
        size: usize,
        /// The bound: [`mapping::MAX_PROPERTIES_BYTES`], or less when the broker's negotiated
        /// frame size is smaller.
        max: usize,
    },
    /// Body is not `data` sections or a binary/string `amqp-value`.
    #[error("unsupported body: {0}")]
    UnsupportedBody(&'static str),
    /// An application property of a type we cannot carry.
    #[error("application property `{0}` has an unsupported type")]
    UnsupportedProperty(String),
    /// A string that must become an AMQP 0.9.1 short string is too long.
    #[error("{field} is {len} bytes; AMQP 0.9.1 allows at most 255")]
    TooLong {
        /// Which field (for a header key: "header key" and its first characters).
        field: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A header value nests tables/arrays deeper than [`mapping::MAX_DEPTH`].
    #[error("header `{0}` nests tables or arrays deeper than {max}", max = mapping::MAX_DEPTH)]
    TooDeep(String),
    /// A property, annotation or header value that is malformed or contradicts another.
    #[error("{field}: {why}")]
    BadField {
        /// Which field.
        field: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The payload is no AMQP 1.0 message: its encoding breaks the limits (nesting, sizes,
    /// counts, format codes) or it does not decode as message sections
    /// ([`crate::wire_in::from_bytes`]; fe2o3's receiver ended the link for these instead).
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl Invalid {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Invalid::TooLarge { .. } => "too_large",
            Invalid::NoMessageId => "no_message_id",
            Invalid::NoDestination => "no_destination",
            Invalid::UnknownDestination(_) => "unknown_destination",
            Invalid::DestinationTooLong { .. } => "destination_too_long",
            Invalid::HeadersTooLarge { .. } => "headers_too_large",
            Invalid::UnsupportedBody(_) => "unsupported_body",
            Invalid::UnsupportedProperty(_) => "unsupported_property",
            Invalid::TooLong { .. } => "too_long",
            Invalid::TooDeep(_) => "too_deep",
            Invalid::BadField { .. } => "bad_field",
            Invalid::Malformed(_) => "malformed",
        }
    }
}

/// Longest `drawbridge-destination` taken, in bytes. A legal name is a handful of short
/// attributes; a longer destination is refused by its length, without parsing it.
pub const MAX_DESTINATION_BYTES: usize = 1024;

/// Longest piece of a peer's own text echoed back in a rejection description, in bytes.
pub const MAX_ECHO: usize = 256;

impl Invalid {
    /// [`Invalid::UnknownDestination`] for `destination` as the peer wrote it, cut to
    /// [`MAX_ECHO`] bytes.
    pub fn unknown_destination(destination: &str) -> Invalid {
        let shown = text::truncate(destination, MAX_ECHO);
        Invalid::UnknownDestination(if shown.len() < destination.len() {
            format!("{shown}…")
        } else {
            shown.to_string()
        })
    }
}

#[cfg(feature = "fe2o3")]
fn bad(field: impl Into<String>, why: &'static str) -> Invalid {
    Invalid::BadField {
        field: field.into(),
        why,
    }
}

/// `s` as a 0.9.1 short string, refused (never a panic) when over 255 bytes.
#[cfg(feature = "fe2o3")]
fn short(field: &str, s: String) -> Result<ShortString, Invalid> {
    let len = s.len();
    ShortString::try_new(s).map_err(|_| Invalid::TooLong {
        field: field.to_string(),
        len,
    })
}

/// A header key as a short string; the error names the key by its first characters.
#[cfg(feature = "fe2o3")]
fn short_key(k: String) -> Result<ShortString, Invalid> {
    if k.len() > mapping::MAX_SHORT_STRING {
        let preview: String = k.chars().take(32).collect();
        return Err(Invalid::TooLong {
            field: format!("header key `{preview}…`"),
            len: k.len(),
        });
    }
    short("header key", k)
}

/// String rendering and type of an AMQP 1.0 message id. The type must travel with the
/// rendering: ulong 5 and string "5" render the same.
#[cfg(feature = "fe2o3")]
pub fn render_id(id: &MessageId) -> (String, IdType) {
    match id {
        MessageId::String(s) => (s.clone(), IdType::String),
        MessageId::Ulong(n) => (n.to_string(), IdType::Ulong),
        MessageId::Uuid(u) => {
            let h = hex::encode(u.as_inner());
            (
                format!(
                    "urn:uuid:{}-{}-{}-{}-{}",
                    &h[0..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..32]
                ),
                IdType::Uuid,
            )
        }
        MessageId::Binary(b) => (hex::encode(b.as_slice()), IdType::Binary),
    }
}

/// Validate and convert. Reserved headers ([`headers::reserved`]: `drawbridge-*` but
/// destination and topic, `x-*`, any case) are dropped from the peer's; the caller stamps the
/// authenticated sender.
#[cfg(feature = "fe2o3")]
pub fn from_amqp(msg: Message<Body<Value>>, max_size: usize) -> Result<Inbound, Invalid> {
    translate(msg, max_size, None)
}

/// [`from_amqp`], with the authenticated sender stamped as the `drawbridge-sender` header.
///
/// What the float's links call: stamping here, while the header table is still being built,
/// spares a copy of the whole table per message (it lives inside the finished properties).
#[cfg(feature = "fe2o3")]
pub fn from_amqp_stamped(
    msg: Message<Body<Value>>,
    max_size: usize,
    sender: &str,
) -> Result<Inbound, Invalid> {
    translate(msg, max_size, Some(sender))
}

#[cfg(feature = "fe2o3")]
fn translate(
    msg: Message<Body<Value>>,
    max_size: usize,
    sender: Option<&str>,
) -> Result<Inbound, Invalid> {
    let body = match msg.body {
        Body::Data(sections) => {
            let size: usize = sections.iter().map(|d| d.0.len()).sum();
            if size > max_size {
                return Err(Invalid::TooLarge {
                    size,
                    max: max_size,
                });
            }
            let mut sections = sections.into_inner();
            if sections.len() == 1 {
                // The usual case (one `Data` section, as the bridge sends): the decoded
                // bytes are the body, not copied.
                sections.pop().map(|d| d.0.into_vec()).unwrap_or_default()
            } else {
                let mut out = Vec::with_capacity(size);
                for d in sections.iter() {
                    out.extend_from_slice(&d.0);
                }
                out
            }
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
    let annotations = msg.message_annotations.unwrap_or_default();
    let header = msg.header;

    let (message_id, message_id_type) = props
        .message_id
        .as_ref()
        .map(render_id)
        .filter(|(s, _)| !s.is_empty())
        .ok_or(Invalid::NoMessageId)?;
    let mut out = BasicProperties::default()
        // Drawbridge never stores a message transiently (DESIGN.md): always persistent.
        .with_delivery_mode(2)
        .with_message_id(short("message-id", message_id.clone())?);

    let mut hdrs = FieldTable::default();
    let mut destination = None;
    let mut stripped_headers = 0;
    if let Some(app) = msg.application_properties {
        for (k, v) in app.0.into_iter() {
            if headers::reserved(&k) {
                stripped_headers += 1;
                continue;
            }
            if k == headers::DESTINATION {
                if let SimpleValue::String(s) = &v {
                    if s.len() > MAX_DESTINATION_BYTES {
                        return Err(Invalid::DestinationTooLong { len: s.len() });
                    }
                    destination = Some(s.clone());
                }
            }
            // The key first: an unsupported value's error names it, so it must be short.
            let key = short_key(k)?;
            let value = simple_to_field(v)
                .ok_or_else(|| Invalid::UnsupportedProperty(key.as_str().to_string()))?;
            hdrs.insert(key, value);
        }
    }
    if let Some(rich) = annotation(&annotations, mapping::ANN_HEADERS) {
        let Value::Map(rich) = rich else {
            return Err(bad(mapping::ANN_HEADERS, "not a map"));
        };
        for (k, v) in rich.iter() {
            let Value::String(k) = k else {
                return Err(bad(mapping::ANN_HEADERS, "a key is not a string"));
            };
            if headers::reserved(k) {
                stripped_headers += 1;
                continue;
            }
            let key = short_key(k.clone())?;
            if hdrs.inner().contains_key(k.as_str()) {
                return Err(bad(
                    format!("header `{k}`"),
                    "in both application properties and the headers annotation",
                ));
            }
            let value = value_to_field(v, 0).map_err(|e| e.at(k))?;
            hdrs.insert(key, value);
        }
    }
    let destination = destination.ok_or(Invalid::NoDestination)?;

    if let Some(id) = &props.correlation_id {
        let (rendered, kind) = render_id(id);
        out = out.with_correlation_id(short("correlation-id", rendered)?);
        if kind != IdType::String {
            hdrs.insert(
                ShortString::from(headers::CORRELATION_ID_TYPE),
                AMQPValue::LongString(LongString::from(kind.as_str())),
            );
        }
    }
    if message_id_type != IdType::String {
        hdrs.insert(
            ShortString::from(headers::MESSAGE_ID_TYPE),
            AMQPValue::LongString(LongString::from(message_id_type.as_str())),
        );
    }
    if let Some(user) = props.user_id {
        // The receiving broker refuses a user_id other than the float's own login.
        hdrs.insert(
            ShortString::from(headers::ORIGINAL_USER_ID),
            AMQPValue::LongString(LongString::from(user.into_vec())),
        );
    }
    if let Some(ct) = props.content_type {
        out = out.with_content_type(short("content-type", ct.0)?);
    }
    if let Some(ce) = props.content_encoding {
        out = out.with_content_encoding(short("content-encoding", ce.0)?);
    }
    if let Some(r) = props.reply_to {
        out = out.with_reply_to(short("reply-to", r)?);
    }
    if let Some(s) = props.subject {
        out = out.with_type(short("subject", s)?);
    }
    match (
        annotation(&annotations, mapping::ANN_TIMESTAMP),
        props.creation_time,
    ) {
        (Some(_), Some(_)) => {
            return Err(bad(
                mapping::ANN_TIMESTAMP,
                "given together with creation-time",
            ))
        }
        (Some(Value::Ulong(secs)), None) => out = out.with_timestamp(*secs),
        (Some(_), None) => return Err(bad(mapping::ANN_TIMESTAMP, "not a ulong")),
        (None, Some(t)) => {
            out = out.with_timestamp(
                millis_to_seconds(t.milliseconds())
                    .ok_or_else(|| bad("creation-time", "before 1970"))?,
            )
        }
        (None, None) => {}
    }
    if let Some(p) = priority(&annotations, header.as_ref())? {
        out = out.with_priority(p);
    }
    if let Some(e) = expiration(&annotations, header.as_ref())? {
        out = out.with_expiration(e);
    }
    for (name, field) in [
        (mapping::ANN_APP_ID, "app-id"),
        (mapping::ANN_CLUSTER_ID, "cluster-id"),
    ] {
        let value = match annotation(&annotations, name) {
            None => continue,
            Some(Value::String(s)) => short(field, s.clone())?,
            Some(_) => return Err(bad(name, "not a string")),
        };
        out = if field == "app-id" {
            out.with_app_id(value)
        } else {
            out.with_cluster_id(value)
        };
    }

    if let Some(sender) = sender {
        // The peer's own `drawbridge-sender`, if it sent one, was stripped above (reserved).
        hdrs.insert(
            ShortString::from(headers::SENDER),
            AMQPValue::LongString(LongString::from(sender)),
        );
    }

    let properties = out.with_headers(hdrs);
    let properties_len = mapping::properties_len(&properties);
    if properties_len > mapping::MAX_PROPERTIES_BYTES {
        return Err(Invalid::HeadersTooLarge {
            size: properties_len,
            max: mapping::MAX_PROPERTIES_BYTES,
        });
    }
    Ok(Inbound {
        message_id,
        message_id_type,
        body,
        destination,
        properties,
        stripped_headers,
        properties_len,
    })
}

/// Looked up by `&str`, not by a built `OwnedKey`: a message is looked up for six
/// annotations, and building the key allocated each time.
#[cfg(feature = "fe2o3")]
fn annotation<'a>(a: &'a MessageAnnotations, name: &str) -> Option<&'a Value> {
    a.0.get(&name as &dyn AnnotationKey)
}

/// AMQP 1.0 milliseconds → 0.9.1 seconds. Sub-second precision (only a foreign AMQP 1.0
/// sender has it) is cut off; negative times do not exist in 0.9.1.
#[cfg(feature = "fe2o3")]
fn millis_to_seconds(ms: i64) -> Option<u64> {
    u64::try_from(ms.div_euclid(1000)).ok()
}

/// The 0.9.1 priority: the annotation if present (it must agree with the header), else a
/// header priority other than AMQP 1.0's default 4 (a foreign sender that set one).
#[cfg(feature = "fe2o3")]
fn priority(
    a: &MessageAnnotations,
    header: Option<&fe2o3_amqp::types::messaging::Header>,
) -> Result<Option<u8>, Invalid> {
    match annotation(a, mapping::ANN_PRIORITY) {
        Some(Value::Ubyte(p)) => {
            if header.is_some_and(|h| h.priority.0 != *p) {
                return Err(bad(mapping::ANN_PRIORITY, "disagrees with header.priority"));
            }
            Ok(Some(*p))
        }
        Some(_) => Err(bad(mapping::ANN_PRIORITY, "not a ubyte")),
        None => Ok(header.map(|h| h.priority.0).filter(|p| *p != 4)),
    }
}

/// The 0.9.1 expiration: `header.ttl` in decimal, or the exact string of the expiration
/// annotation. Either way the receiving broker must accept it: it closes the channel on a
/// publish whose expiration is not an integer in 0..=u32::MAX, which would turn this message
/// into an endless release-and-resend loop.
#[cfg(feature = "fe2o3")]
fn expiration(
    a: &MessageAnnotations,
    header: Option<&fe2o3_amqp::types::messaging::Header>,
) -> Result<Option<ShortString>, Invalid> {
    let ttl = header.and_then(|h| h.ttl);
    match (annotation(a, mapping::ANN_EXPIRATION), ttl) {
        (Some(_), Some(_)) => Err(bad(mapping::ANN_EXPIRATION, "given together with ttl")),
        (Some(Value::String(s)), None) => {
            if !expiration_is_valid(s) {
                return Err(bad(
                    mapping::ANN_EXPIRATION,
                    "not an integer number of milliseconds in 0..=4294967295",
                ));
            }
            Ok(Some(short("expiration", s.clone())?))
        }
        (Some(_), None) => Err(bad(mapping::ANN_EXPIRATION, "not a string")),
        (None, Some(ms)) => Ok(Some(ShortString::from(ms.to_string()))),
        (None, None) => Ok(None),
    }
}

/// What RabbitMQ accepts as an expiration: an optionally signed decimal integer whose value
/// is in 0..=u32::MAX (leading zeros allowed).
#[cfg(feature = "fe2o3")]
fn expiration_is_valid(s: &str) -> bool {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        return true;
    }
    !negative && trimmed.parse::<u32>().is_ok()
}

/// A 0.9.1 field value for an application property. The bridge's mapping is exact for every
/// type it sends; the rest are what a foreign AMQP 1.0 sender may use.
#[cfg(feature = "fe2o3")]
fn simple_to_field(v: SimpleValue) -> Option<AMQPValue> {
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
        SimpleValue::Timestamp(t) => AMQPValue::Timestamp(millis_to_seconds(t.milliseconds())?),
        SimpleValue::Binary(b) => AMQPValue::ByteArray(b.into_vec().into()),
        SimpleValue::String(s) => AMQPValue::LongString(LongString::from(s)),
        SimpleValue::Symbol(s) => AMQPValue::LongString(LongString::from(s.0)),
        SimpleValue::Char(c) => AMQPValue::LongString(LongString::from(c.to_string())),
        _ => return None,
    })
}

/// Why one (possibly nested) annotation value cannot be decoded.
#[cfg(feature = "fe2o3")]
enum FieldError {
    Unsupported,
    TooDeep,
    LongKey(usize),
}

#[cfg(feature = "fe2o3")]
impl FieldError {
    fn at(self, key: &str) -> Invalid {
        match self {
            FieldError::Unsupported => Invalid::UnsupportedProperty(key.to_string()),
            FieldError::TooDeep => Invalid::TooDeep(key.to_string()),
            FieldError::LongKey(len) => Invalid::TooLong {
                field: format!("a table key inside header `{key}`"),
                len,
            },
        }
    }
}

/// Decode a value of the headers annotation into the 0.9.1 field value the bridge encoded.
/// `depth` is the number of lists/maps around `v`; deeper than [`mapping::MAX_DEPTH`] is
/// refused.
#[cfg(feature = "fe2o3")]
fn value_to_field(v: &Value, depth: usize) -> Result<AMQPValue, FieldError> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Ubyte(n) => AMQPValue::ShortShortUInt(*n),
        Value::Ushort(n) => AMQPValue::ShortUInt(*n),
        Value::Uint(n) => AMQPValue::LongUInt(*n),
        Value::Ulong(n) => {
            AMQPValue::LongLongInt(i64::try_from(*n).map_err(|_| FieldError::Unsupported)?)
        }
        Value::Byte(n) => AMQPValue::ShortShortInt(*n),
        Value::Short(n) => AMQPValue::ShortInt(*n),
        Value::Int(n) => AMQPValue::LongInt(*n),
        Value::Long(n) => AMQPValue::LongLongInt(*n),
        Value::Float(f) => AMQPValue::Float(f.into_inner()),
        Value::Double(f) => AMQPValue::Double(f.into_inner()),
        Value::Timestamp(t) => AMQPValue::Timestamp(
            millis_to_seconds(t.milliseconds()).ok_or(FieldError::Unsupported)?,
        ),
        Value::Binary(b) => AMQPValue::ByteArray(b.to_vec().into()),
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Symbol(s) => AMQPValue::LongString(LongString::from(s.0.as_str())),
        Value::Char(c) => AMQPValue::LongString(LongString::from(c.to_string())),
        Value::List(items) => {
            if depth >= mapping::MAX_DEPTH {
                return Err(FieldError::TooDeep);
            }
            AMQPValue::FieldArray(FieldArray::from(
                items
                    .iter()
                    .map(|x| value_to_field(x, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?,
            ))
        }
        Value::Map(m) => {
            if depth >= mapping::MAX_DEPTH {
                return Err(FieldError::TooDeep);
            }
            let mut t = FieldTable::default();
            for (k, x) in m.iter() {
                let Value::String(k) = k else {
                    return Err(FieldError::Unsupported);
                };
                let key =
                    ShortString::try_new(k.as_str()).map_err(|_| FieldError::LongKey(k.len()))?;
                t.insert(key, value_to_field(x, depth + 1)?);
            }
            AMQPValue::FieldTable(t)
        }
        Value::Described(d) => {
            let Descriptor::Name(name) = &d.descriptor else {
                return Err(FieldError::Unsupported);
            };
            match (name.0.as_str(), &d.value) {
                (mapping::DESC_DECIMAL, Value::List(parts)) => match parts.as_slice() {
                    [Value::Ubyte(scale), Value::Uint(value)] => {
                        AMQPValue::DecimalValue(DecimalValue {
                            scale: *scale,
                            value: *value,
                        })
                    }
                    _ => return Err(FieldError::Unsupported),
                },
                (mapping::DESC_LONGSTR, Value::Binary(b)) => {
                    AMQPValue::LongString(LongString::from(b.to_vec()))
                }
                (mapping::DESC_TIMESTAMP, Value::Ulong(secs)) => AMQPValue::Timestamp(*secs),
                _ => return Err(FieldError::Unsupported),
            }
        }
        Value::Decimal32(_)
        | Value::Decimal64(_)
        | Value::Decimal128(_)
        | Value::Uuid(_)
        | Value::Array(_) => return Err(FieldError::Unsupported),
    })
}

#[cfg(all(test, feature = "fe2o3"))]
mod tests {
    use super::*;
    use fe2o3_amqp::types::{
        messaging::{annotations::OwnedKey, ApplicationProperties, Data, Header, Properties},
        primitives::{Binary, OrderedMap, Symbol, Timestamp, Uuid},
    };
    use serde_amqp::described::Described;

    const DEST: &str = "O=Bank B,L=London,C=GB";

    fn app(extra: &[(&str, SimpleValue)]) -> ApplicationProperties {
        let mut m = OrderedMap::new();
        m.insert(
            headers::DESTINATION.to_string(),
            SimpleValue::String(DEST.into()),
        );
        for (k, v) in extra {
            m.insert(k.to_string(), v.clone());
        }
        ApplicationProperties(m)
    }

    fn msg(
        props: Properties,
        header: Option<Header>,
        anns: &[(&str, Value)],
        app: ApplicationProperties,
    ) -> Message<Body<Value>> {
        let mut a = OrderedMap::new();
        for (k, v) in anns {
            a.insert(OwnedKey::from(*k), v.clone());
        }
        Message {
            header,
            delivery_annotations: None,
            message_annotations: (!a.is_empty()).then_some(MessageAnnotations(a)),
            properties: Some(props),
            application_properties: Some(app),
            body: Body::Data(vec![Data(Binary::from(b"hi".to_vec()))].into()),
            footer: None,
        }
    }

    fn with_id(id: MessageId) -> Properties {
        Properties {
            message_id: Some(id),
            ..Default::default()
        }
    }

    fn simple(id: MessageId) -> Result<Inbound, Invalid> {
        from_amqp(msg(with_id(id), None, &[], app(&[])), 1024)
    }

    fn header<'a>(i: &'a Inbound, k: &str) -> Option<&'a AMQPValue> {
        i.properties.headers().as_ref()?.inner().get(k)
    }

    fn ls(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn string_id_is_carried_as_is_and_always_persistent() {
        let i = simple(MessageId::String("5".into())).unwrap();
        assert_eq!(i.message_id, "5");
        assert_eq!(i.dedup_key(), "string:5");
        assert_eq!(i.properties.message_id().as_ref().unwrap().as_str(), "5");
        assert_eq!(*i.properties.delivery_mode(), Some(2));
        assert_eq!(header(&i, headers::MESSAGE_ID_TYPE), None);
        assert_eq!(header(&i, headers::DESTINATION), Some(&ls(DEST)));
        assert_eq!(i.destination, DEST);
        assert_eq!(i.body, b"hi");
    }

    #[test]
    fn non_string_ids_keep_their_type() {
        let n = simple(MessageId::Ulong(5)).unwrap();
        assert_eq!(n.message_id, "5");
        assert_eq!(header(&n, headers::MESSAGE_ID_TYPE), Some(&ls("ulong")));
        let s = simple(MessageId::String("5".into())).unwrap();
        assert_ne!(n.dedup_key(), s.dedup_key());

        let bytes: [u8; 16] = *b"\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef";
        let u = simple(MessageId::Uuid(Uuid::from(bytes))).unwrap();
        assert_eq!(
            u.message_id,
            "urn:uuid:01234567-89ab-cdef-0123-456789abcdef"
        );
        assert_eq!(header(&u, headers::MESSAGE_ID_TYPE), Some(&ls("uuid")));
        let b = simple(MessageId::Binary(Binary::from(bytes.to_vec()))).unwrap();
        assert_eq!(b.message_id, "0123456789abcdef0123456789abcdef");
        assert_eq!(header(&b, headers::MESSAGE_ID_TYPE), Some(&ls("binary")));
        assert_ne!(u.dedup_key(), b.dedup_key());
        let s = simple(MessageId::String(b.message_id.clone())).unwrap();
        assert_ne!(s.dedup_key(), b.dedup_key());
    }

    #[test]
    fn correlation_id_keeps_its_type() {
        let p = Properties {
            correlation_id: Some(MessageId::Ulong(9)),
            ..with_id(MessageId::String("m".into()))
        };
        let i = from_amqp(msg(p, None, &[], app(&[])), 1024).unwrap();
        assert_eq!(
            i.properties.correlation_id().as_ref().unwrap().as_str(),
            "9"
        );
        assert_eq!(header(&i, headers::CORRELATION_ID_TYPE), Some(&ls("ulong")));
    }

    #[test]
    fn over_long_strings_are_refused_not_a_panic() {
        let long = "x".repeat(256);
        let err = simple(MessageId::String(long.clone())).unwrap_err();
        assert_eq!(err.label(), "too_long");
        // 128 bytes render as 256 hex digits.
        let err = simple(MessageId::Binary(Binary::from(vec![0u8; 128]))).unwrap_err();
        assert_eq!(err.label(), "too_long");
        let id = with_id(MessageId::String("m".into()));
        for p in [
            Properties {
                correlation_id: Some(MessageId::String(long.clone())),
                ..id.clone()
            },
            Properties {
                content_type: Some(Symbol::from(long.as_str())),
                ..id.clone()
            },
            Properties {
                content_encoding: Some(Symbol::from(long.as_str())),
                ..id.clone()
            },
            Properties {
                reply_to: Some(long.clone()),
                ..id.clone()
            },
            Properties {
                subject: Some(long.clone()),
                ..id.clone()
            },
        ] {
            let err = from_amqp(msg(p, None, &[], app(&[])), 1024).unwrap_err();
            assert_eq!(err.label(), "too_long", "{err}");
        }
        for ann in [mapping::ANN_APP_ID, mapping::ANN_CLUSTER_ID] {
            let err = from_amqp(
                msg(
                    id.clone(),
                    None,
                    &[(ann, Value::String(long.clone()))],
                    app(&[]),
                ),
                1024,
            )
            .unwrap_err();
            assert_eq!(err.label(), "too_long");
        }
        let err = from_amqp(
            msg(
                id.clone(),
                None,
                &[],
                app(&[(long.as_str(), SimpleValue::Bool(true))]),
            ),
            1024,
        )
        .unwrap_err();
        assert_eq!(err.label(), "too_long");
        let mut inner = OrderedMap::new();
        inner.insert(Value::String(long.clone()), Value::Null);
        let mut rich = OrderedMap::new();
        rich.insert(Value::String("t".into()), Value::Map(inner));
        let err = from_amqp(
            msg(
                id,
                None,
                &[(mapping::ANN_HEADERS, Value::Map(rich))],
                app(&[]),
            ),
            1024,
        )
        .unwrap_err();
        assert_eq!(err.label(), "too_long");
    }

    fn rich(entries: &[(&str, Value)]) -> Value {
        let mut m = OrderedMap::new();
        for (k, v) in entries {
            m.insert(Value::String(k.to_string()), v.clone());
        }
        Value::Map(m)
    }

    fn with_rich(entries: &[(&str, Value)]) -> Result<Inbound, Invalid> {
        from_amqp(
            msg(
                with_id(MessageId::String("m".into())),
                None,
                &[(mapping::ANN_HEADERS, rich(entries))],
                app(&[]),
            ),
            1024,
        )
    }

    fn described(name: &str, value: Value) -> Value {
        Value::Described(Box::new(Described {
            descriptor: Descriptor::Name(Symbol::from(name)),
            value,
        }))
    }

    #[test]
    fn headers_annotation_decodes_to_exact_field_values() {
        let i = with_rich(&[
            (
                "dec",
                described(
                    mapping::DESC_DECIMAL,
                    Value::List(vec![Value::Ubyte(2), Value::Uint(314)]),
                ),
            ),
            (
                "raw",
                described(mapping::DESC_LONGSTR, Value::Binary(vec![0xff].into())),
            ),
            (
                "ts",
                described(mapping::DESC_TIMESTAMP, Value::Ulong(u64::MAX)),
            ),
            (
                "arr",
                Value::List(vec![Value::Int(1), rich(&[("k", Value::Null)])]),
            ),
        ])
        .unwrap();
        assert_eq!(
            header(&i, "dec"),
            Some(&AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 314
            }))
        );
        assert_eq!(
            header(&i, "raw"),
            Some(&AMQPValue::LongString(LongString::from(vec![0xff])))
        );
        assert_eq!(header(&i, "ts"), Some(&AMQPValue::Timestamp(u64::MAX)));
        let mut t = FieldTable::default();
        t.insert("k".into(), AMQPValue::Void);
        assert_eq!(
            header(&i, "arr"),
            Some(&AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::FieldTable(t)
            ])))
        );
    }

    #[test]
    fn malformed_described_values_are_refused() {
        for v in [
            described(mapping::DESC_DECIMAL, Value::List(vec![Value::Ubyte(2)])),
            described(mapping::DESC_LONGSTR, Value::String("x".into())),
            described("someone:else", Value::Null),
            Value::Uuid(Uuid::from([0u8; 16])),
        ] {
            let err = with_rich(&[("h", v)]).unwrap_err();
            assert_eq!(err, Invalid::UnsupportedProperty("h".into()));
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |levels: usize| {
            let mut v = Value::Null;
            for _ in 0..levels {
                v = Value::List(vec![v]);
            }
            v
        };
        assert!(with_rich(&[("ok", nested(mapping::MAX_DEPTH))]).is_ok());
        assert_eq!(
            with_rich(&[("deep", nested(mapping::MAX_DEPTH + 1))]).unwrap_err(),
            Invalid::TooDeep("deep".into())
        );
    }

    #[test]
    fn a_header_in_both_places_is_refused() {
        let err = from_amqp(
            msg(
                with_id(MessageId::String("m".into())),
                None,
                &[(mapping::ANN_HEADERS, rich(&[("k", Value::List(vec![]))]))],
                app(&[("k", SimpleValue::Int(1))]),
            ),
            1024,
        )
        .unwrap_err();
        assert_eq!(err.label(), "bad_field");
    }

    #[test]
    fn headers_only_the_float_sets_are_dropped_from_the_peer() {
        let p = Properties {
            user_id: Some(Binary::from(b"alice".to_vec())),
            ..with_id(MessageId::String("m".into()))
        };
        let spoofed = [
            (headers::SENDER, SimpleValue::String("O=Evil".into())),
            (
                headers::MESSAGE_ID_TYPE,
                SimpleValue::String("ulong".into()),
            ),
            (
                headers::CORRELATION_ID_TYPE,
                SimpleValue::String("uuid".into()),
            ),
            (
                headers::ORIGINAL_USER_ID,
                SimpleValue::String("root".into()),
            ),
        ];
        let i = from_amqp(msg(p, None, &[], app(&spoofed)), 1024).unwrap();
        assert_eq!(header(&i, headers::SENDER), None);
        assert_eq!(header(&i, headers::MESSAGE_ID_TYPE), None);
        assert_eq!(header(&i, headers::CORRELATION_ID_TYPE), None);
        assert_eq!(header(&i, headers::ORIGINAL_USER_ID), Some(&ls("alice")));
        assert_eq!(*i.properties.user_id(), None);
        assert_eq!(i.stripped_headers, spoofed.len());
    }

    #[test]
    fn reserved_headers_in_any_case_and_either_place_are_dropped() {
        let app_spoofed = [
            ("Drawbridge-Sender", SimpleValue::String("O=Evil".into())),
            (headers::REASON, SimpleValue::String("looks dead".into())),
            ("DRAWBRIDGE-ORIGIN-QUEUE", SimpleValue::String("q".into())),
            (
                "X-First-Death-Reason",
                SimpleValue::String("expired".into()),
            ),
            (headers::TOPIC, SimpleValue::String("trades".into())),
            ("trade-id", SimpleValue::Int(7)),
        ];
        let rich_spoofed = rich(&[
            ("x-death", Value::List(vec![])),
            ("drawbridge-sender", Value::List(vec![])),
            ("legs", Value::List(vec![Value::Int(1)])),
        ]);
        let i = from_amqp(
            msg(
                with_id(MessageId::String("m".into())),
                None,
                &[(mapping::ANN_HEADERS, rich_spoofed)],
                app(&app_spoofed),
            ),
            1024,
        )
        .unwrap();
        let mut kept: Vec<&str> = i
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            [headers::DESTINATION, headers::TOPIC, "legs", "trade-id"]
        );
        assert_eq!(i.stripped_headers, 6);
    }

    #[test]
    fn broker_routing_headers_are_dropped_from_either_place() {
        let i = from_amqp(
            msg(
                with_id(MessageId::String("m".into())),
                None,
                &[(
                    mapping::ANN_HEADERS,
                    rich(&[
                        ("CC", Value::List(vec![Value::String("side".into())])),
                        ("BCC", Value::List(vec![Value::String("side".into())])),
                    ]),
                )],
                app(&[("cc", SimpleValue::String("side".into()))]),
            ),
            1024,
        )
        .unwrap();
        let h = i.properties.headers().as_ref().unwrap().inner();
        assert!(!h.keys().any(|k| k.as_str().eq_ignore_ascii_case("cc")));
        assert!(!h.keys().any(|k| k.as_str().eq_ignore_ascii_case("bcc")));
        assert_eq!(i.stripped_headers, 3);
    }

    #[test]
    fn headers_beyond_a_broker_frame_are_refused_with_their_size() {
        for size in [40_000, 1_536 * 1024] {
            let m = msg(
                with_id(MessageId::String("m".into())),
                None,
                &[],
                app(&[("blob", SimpleValue::String("h".repeat(size)))]),
            );
            let err = from_amqp(m, 1024).unwrap_err();
            assert_eq!(err.label(), "headers_too_large", "{err}");
            assert!(err.to_string().contains("headers and properties"), "{err}");
        }
        let ok = from_amqp_stamped(
            msg(
                with_id(MessageId::String("m".into())),
                None,
                &[],
                app(&[("blob", SimpleValue::String("h".repeat(8_000)))]),
            ),
            1024,
            DEST,
        )
        .unwrap();
        assert_eq!(ok.properties_len, mapping::properties_len(&ok.properties));
        assert!(ok.properties_len > 8_000);
    }

    #[test]
    fn destinations_and_keys_are_bounded_before_they_are_echoed() {
        let long = "z".repeat(64 * 1024);
        let m = msg(
            with_id(MessageId::String("m".into())),
            None,
            &[],
            app(&[(headers::DESTINATION, SimpleValue::String(long.clone()))]),
        );
        let err = from_amqp(m, 1024).unwrap_err();
        assert_eq!(err, Invalid::DestinationTooLong { len: long.len() });
        let echoed = Invalid::unknown_destination(&"é".repeat(1000)).to_string();
        assert!(echoed.len() < MAX_ECHO + 64, "{}", echoed.len());
        // An unsupported value under a long key is refused for the key's length.
        let m = msg(
            with_id(MessageId::String("m".into())),
            None,
            &[],
            app(&[(long.as_str(), SimpleValue::Uuid(Uuid::from([0u8; 16])))]),
        );
        let err = from_amqp(m, 1024).unwrap_err();
        assert_eq!(err.label(), "too_long");
        assert!(err.to_string().len() < 256, "{err}");
    }

    #[test]
    fn priority_absent_default_and_explicit() {
        let id = with_id(MessageId::String("m".into()));
        let prio = |h: Option<Header>, anns: &[(&str, Value)]| {
            from_amqp(msg(id.clone(), h, anns, app(&[])), 1024).map(|i| *i.properties.priority())
        };
        let h = |p: u8| Some(Header::builder().priority(p).build());
        assert_eq!(prio(None, &[]), Ok(None));
        assert_eq!(prio(h(4), &[]), Ok(None));
        assert_eq!(prio(h(9), &[]), Ok(Some(9)));
        assert_eq!(
            prio(h(4), &[(mapping::ANN_PRIORITY, Value::Ubyte(4))]),
            Ok(Some(4))
        );
        assert_eq!(
            prio(h(5), &[(mapping::ANN_PRIORITY, Value::Ubyte(4))])
                .unwrap_err()
                .label(),
            "bad_field"
        );
    }

    #[test]
    fn expiration_from_ttl_or_annotation_and_validated() {
        let id = with_id(MessageId::String("m".into()));
        let exp = |h: Option<Header>, anns: &[(&str, Value)]| {
            from_amqp(msg(id.clone(), h, anns, app(&[])), 1024).map(|i| {
                i.properties
                    .expiration()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
            })
        };
        let ttl = Some(Header::builder().ttl(60_000).build());
        assert_eq!(exp(ttl.clone(), &[]), Ok(Some("60000".into())));
        let ann = |s: &str| [(mapping::ANN_EXPIRATION, Value::String(s.into()))];
        assert_eq!(exp(None, &ann("007")), Ok(Some("007".into())));
        assert_eq!(exp(None, &ann("+5")), Ok(Some("+5".into())));
        assert_eq!(exp(None, &ann("-0")), Ok(Some("-0".into())));
        for invalid in ["", "-5", "5s", "4294967296", "+"] {
            assert_eq!(exp(None, &ann(invalid)).unwrap_err().label(), "bad_field");
        }
        assert_eq!(exp(ttl, &ann("5")).unwrap_err().label(), "bad_field");
    }

    #[test]
    fn timestamps_seconds_and_milliseconds() {
        let ts = |p: Properties, anns: &[(&str, Value)]| {
            from_amqp(msg(p, None, anns, app(&[])), 1024).map(|i| *i.properties.timestamp())
        };
        let id = with_id(MessageId::String("m".into()));
        let at = |ms: i64| Properties {
            creation_time: Some(Timestamp::from_milliseconds(ms)),
            ..id.clone()
        };
        assert_eq!(ts(at(1_700_000_000_999), &[]), Ok(Some(1_700_000_000)));
        assert_eq!(ts(at(-1), &[]).unwrap_err().label(), "bad_field");
        assert_eq!(
            ts(
                id.clone(),
                &[(mapping::ANN_TIMESTAMP, Value::Ulong(u64::MAX))]
            ),
            Ok(Some(u64::MAX))
        );
        assert_eq!(
            ts(at(0), &[(mapping::ANN_TIMESTAMP, Value::Ulong(1))])
                .unwrap_err()
                .label(),
            "bad_field"
        );
    }

    #[test]
    fn missing_destination_and_id_are_refused() {
        let m = msg(
            with_id(MessageId::String("m".into())),
            None,
            &[],
            ApplicationProperties(OrderedMap::new()),
        );
        assert_eq!(from_amqp(m, 1024).unwrap_err(), Invalid::NoDestination);
        assert_eq!(
            simple(MessageId::String(String::new())).unwrap_err(),
            Invalid::NoMessageId
        );
    }
}
