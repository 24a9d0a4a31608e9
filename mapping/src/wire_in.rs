//! AMQP 1.0 message bytes → AMQP 0.9.1 publish: [`crate::inbound`]'s conversion, straight
//! from a delivery's payload (the encoded bare message, as the engine hands it over).
//!
//! The float used to run three passes over a payload: the frame guard's scanner
//! (`drawbridge_runtime::frame_guard::Scanner`: nesting, sizes, counts, format codes), fe2o3's
//! serde decoding into a `Message<Body<Value>>` tree, and [`crate::inbound::from_amqp`]. Here
//! it is one pass of [`drawbridge_amqp::value::Values`], which enforces the scanner's limits as
//! it reads (depth on an explicit stack, no recursion), reading the sections as fe2o3 reads
//! them and keeping borrowed pieces of the payload; then the same checks and conversion as
//! `from_amqp`, in the same order, with the same reasons. The body is copied once, from the
//! payload into the publish. Only the conversion of a headers-annotation value recurses, one
//! level per list or map up to [`mapping::MAX_DEPTH`]; deeper values are checked iteratively.
//!
//! "As fe2o3 reads them" is meant to the letter: the result is the one the old path gave for
//! every payload (`tests/wire_in.rs` and the `mapping_wire_in` fuzz target hold it to that).
//! So the reading follows serde_amqp 0.18 / fe2o3-amqp-types 0.18, including where they are
//! lax: sections in any order, repeated (the last one counts) and at most seven read (what
//! follows is only checked); a section named by a bare number or string as well as by a
//! descriptor; fields a list has beyond those of its type read as the next sections; a map
//! that repeats a key keeps the key where it first appeared, with the value it had last.
//! What the old path refused with a closed link (the frame guard's limits; bytes fe2o3 could
//! not decode, such as a string that is not UTF-8 or a count above its cap of 65,536) is an
//! [`Invalid::Malformed`] here: the float rejects that one delivery, with the reason.
//!
//! Everything here is peer input: nothing may panic, and the work is bounded by the payload
//! (maps that repeat keys are looked up through a hash map past a few entries).

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

use std::collections::HashMap;

use drawbridge_amqp::{
    value::{ValueRef, Values},
    DecodeError, Limits,
};
use lapin::{
    types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties,
};

use crate::{
    self as mapping, headers,
    inbound::{IdType, Inbound, Invalid, MAX_DESTINATION_BYTES},
};

/// [`crate::inbound::from_amqp`], from the payload's bytes: validate and convert. Reserved
/// headers ([`headers::reserved`]) are dropped from the peer's; the caller stamps the
/// authenticated sender.
pub fn from_bytes(payload: &[u8], max_size: usize) -> Result<Inbound, Invalid> {
    translate(payload, max_size, None)
}

/// [`from_bytes`], with the authenticated sender stamped as the `drawbridge-sender` header
/// (as [`crate::inbound::from_amqp_stamped`]).
pub fn from_bytes_stamped(
    payload: &[u8],
    max_size: usize,
    sender: &str,
) -> Result<Inbound, Invalid> {
    translate(payload, max_size, Some(sender))
}

fn translate(payload: &[u8], max_size: usize, sender: Option<&str>) -> Result<Inbound, Invalid> {
    let msg = read_message(payload).map_err(|e| Invalid::Malformed(e.to_string()))?;
    convert(msg, max_size, sender)
}

// ---------------------------------------------------------------------------------------------
// Reading: the sections as fe2o3 decodes a `Message<Body<Value>>`, kept as borrowed pieces.

/// serde_amqp's cap on the count of a list32, map32 or array it decodes as a sequence or map.
const MAX_COUNT: u32 = 65_536;

/// What a message is read as: a described value (fe2o3's `DescribedAccess`) of at most this
/// many parts, a section's name and its content taking two.
const MESSAGE_PARTS: u32 = 14;

/// At most this many sections are read; the rest of the payload is only checked.
const MAX_SECTIONS: u32 = 7;

/// A message or correlation id.
#[derive(Debug, Clone, Copy)]
enum Id<'a> {
    Ulong(u64),
    Uuid(&'a [u8; 16]),
    Binary(&'a [u8]),
    String(&'a str),
}

/// The header fields the conversion reads.
#[derive(Debug, Clone, Copy)]
struct Header {
    priority: u8,
    ttl: Option<u32>,
}

/// The properties the conversion reads.
#[derive(Debug, Default)]
struct Properties<'a> {
    message_id: Option<Id<'a>>,
    user_id: Option<&'a [u8]>,
    subject: Option<&'a str>,
    reply_to: Option<&'a str>,
    correlation_id: Option<Id<'a>>,
    content_type: Option<&'a str>,
    content_encoding: Option<&'a str>,
    creation_time: Option<i64>,
}

/// A map key as the conversion sees it: a string, or anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key<'a> {
    Str(&'a str),
    Other,
}

impl<'a> Key<'a> {
    fn str(&self) -> Option<&'a str> {
        match self {
            Key::Str(s) => Some(s),
            Key::Other => None,
        }
    }
}

/// Why one (possibly nested) value of the headers annotation cannot be carried
/// (`inbound`'s `FieldError`).
#[derive(Debug, Clone, Copy)]
enum FieldError {
    Unsupported,
    TooDeep,
    LongKey(usize),
}

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

/// A headers-annotation value converted as it was read.
type Field = Result<AMQPValue, FieldError>;

/// The value of one of the message annotations the conversion looks up.
#[derive(Debug)]
enum Ann<'a> {
    Ubyte(u8),
    Ulong(u64),
    String(&'a str),
    /// A map (the headers annotation): its keys and values in order, repeats included.
    Map(Vec<Key<'a>>, Vec<Field>),
    Other,
}

/// The message annotations the conversion looks up (the last value of each name).
#[derive(Debug, Default)]
struct Annotations<'a> {
    headers: Option<Ann<'a>>,
    priority: Option<Ann<'a>>,
    expiration: Option<Ann<'a>>,
    timestamp: Option<Ann<'a>>,
    app_id: Option<Ann<'a>>,
    cluster_id: Option<Ann<'a>>,
}

/// An application property value: a primitive, or `None` for a described value (which no
/// header can carry).
type Simple<'a> = Option<ValueRef<'a>>;

/// A map's keys and values, in order, repeats included.
type Entries<'a, V> = (Vec<Key<'a>>, Vec<V>);

/// Application properties up to this many are kept without allocating.
const INLINE: usize = 8;

/// The application properties' keys and values, in order, repeats included: inline for the
/// usual few, else on the heap.
#[derive(Debug)]
// Inline on purpose: one per message, on the stack, instead of two allocations.
#[allow(clippy::large_enum_variant)]
enum AppProperties<'a> {
    Inline {
        keys: [Key<'a>; INLINE],
        values: [Simple<'a>; INLINE],
        len: usize,
    },
    Heap(Entries<'a, Simple<'a>>),
}

impl<'a> AppProperties<'a> {
    fn with_capacity(n: usize) -> Self {
        if n <= INLINE {
            AppProperties::Inline {
                keys: [Key::Other; INLINE],
                values: [None; INLINE],
                len: 0,
            }
        } else {
            AppProperties::Heap((Vec::with_capacity(n), Vec::with_capacity(n)))
        }
    }

    fn push(&mut self, key: Key<'a>, value: Simple<'a>) {
        match self {
            AppProperties::Inline { keys, values, len } => {
                if let (Some(k), Some(v)) = (keys.get_mut(*len), values.get_mut(*len)) {
                    *k = key;
                    *v = value;
                    *len += 1;
                }
            }
            AppProperties::Heap((keys, values)) => {
                keys.push(key);
                values.push(value);
            }
        }
    }

    fn entries(&self) -> (&[Key<'a>], &[Simple<'a>]) {
        match self {
            AppProperties::Inline { keys, values, len } => (
                keys.get(..*len).unwrap_or_default(),
                values.get(..*len).unwrap_or_default(),
            ),
            AppProperties::Heap((keys, values)) => (keys, values),
        }
    }
}

/// An `amqp-value` body as the conversion sees it.
#[derive(Debug)]
enum ValueBody<'a> {
    Binary(&'a [u8]),
    String(&'a str),
    Other,
}

#[derive(Debug)]
enum Body<'a> {
    /// `data` sections: the first, and any more (no allocation for the usual one).
    Data(Option<&'a [u8]>, Vec<&'a [u8]>),
    Sequence,
    Value(ValueBody<'a>),
}

#[derive(Debug, Default)]
struct Message<'a> {
    header: Option<Header>,
    annotations: Option<Annotations<'a>>,
    properties: Option<Properties<'a>>,
    application_properties: Option<AppProperties<'a>>,
    body: Option<Body<'a>>,
}

/// How a section or body kind is named: by a number or by a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ident<'a> {
    Num(u64),
    Name(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Header,
    DeliveryAnnotations,
    MessageAnnotations,
    Properties,
    ApplicationProperties,
    Body,
    Footer,
}

fn unexpected(field: &'static str, expected: &'static str, found: u8) -> DecodeError {
    DecodeError::Type {
        field,
        expected,
        found,
    }
}

/// Whether `c` is an AMQP 1.0 format code (what serde_amqp checks of every byte it peeks).
fn format_code(c: u8) -> Result<u8, DecodeError> {
    match c {
        0x00
        | 0x40..=0x45
        | 0x50..=0x56
        | 0x60
        | 0x61
        | 0x70..=0x74
        | 0x80..=0x84
        | 0x94
        | 0x98
        | 0xa0
        | 0xa1
        | 0xa3
        | 0xb0
        | 0xb1
        | 0xb3
        | 0xc0
        | 0xc1
        | 0xd0
        | 0xd1
        | 0xe0
        | 0xf0 => Ok(c),
        c => Err(DecodeError::BadConstructor(c)),
    }
}

/// The next value, which must be there.
fn next<'a>(t: &mut Values<'a>) -> Result<ValueRef<'a>, DecodeError> {
    t.next_value()?.ok_or(DecodeError::Truncated)
}

/// The next value's constructor, peeked; `None` at the end of the payload.
fn peek(t: &Values<'_>) -> Result<Option<u8>, DecodeError> {
    t.peek().map(format_code).transpose()
}

/// The rest of a value whose first part `v` was read, decoded as serde_amqp decodes a
/// `Value` (checked, not kept). Iterative: no recursion, whatever the nesting.
fn rest_of_value<'a>(t: &mut Values<'a>, v: ValueRef<'a>) -> Result<(), DecodeError> {
    let mut pending: u64 = 0;
    let mut v = v;
    loop {
        match v {
            ValueRef::List { count } | ValueRef::Map { count } | ValueRef::Array { count, .. } => {
                if count > MAX_COUNT {
                    return Err(DecodeError::BadSize);
                }
                pending += u64::from(count);
            }
            ValueRef::Described => {
                descriptor_value(t)?;
                pending += 1;
            }
            _ => {}
        }
        if pending == 0 {
            return Ok(());
        }
        pending -= 1;
        v = next(t)?;
    }
}

/// One whole value, decoded and dropped.
fn value(t: &mut Values<'_>) -> Result<(), DecodeError> {
    let v = next(t)?;
    rest_of_value(t, v)
}

/// A described value's descriptor (its 0x00 read): a ulong or a symbol.
fn descriptor_value<'a>(t: &mut Values<'a>) -> Result<Ident<'a>, DecodeError> {
    let at = t.peek().unwrap_or(0);
    match next(t)? {
        ValueRef::Ulong(n) => Ok(Ident::Num(n)),
        ValueRef::Symbol(s) => Ok(Ident::Name(s)),
        _ => Err(unexpected("descriptor", "ulong or symbol", at)),
    }
}

/// A composite's descriptor, read as serde_amqp reads `Descriptor` (0x00 first, then a ulong
/// or symbol), checked against the type's `name` and `code`.
fn descriptor(t: &mut Values<'_>, name: &'static str, code: u64) -> Result<(), DecodeError> {
    let c = peek(t)?.ok_or(DecodeError::Missing("descriptor"))?;
    if next(t)? != ValueRef::Described {
        return Err(unexpected("section", "described type", c));
    }
    match descriptor_value(t)? {
        Ident::Num(n) if n == code => Ok(()),
        Ident::Name(s) if s == name => Ok(()),
        Ident::Num(n) => Err(DecodeError::Descriptor(n)),
        Ident::Name(_) => Err(unexpected("descriptor", name, 0xa3)),
    }
}

/// A described identifier (at 0x00), peeked without reading it: serde_amqp's
/// `parse_described_identifier`.
fn described_ident(rest: &[u8]) -> Result<Ident<'_>, DecodeError> {
    let byte = |i: usize| rest.get(i).copied().ok_or(DecodeError::Truncated);
    let slice = |from: usize, len: usize| {
        from.checked_add(len)
            .and_then(|to| rest.get(from..to))
            .ok_or(DecodeError::Truncated)
    };
    let name = |from: usize, len: usize| {
        std::str::from_utf8(slice(from, len)?)
            .map(Ident::Name)
            .map_err(|_| DecodeError::Utf8("descriptor"))
    };
    let c = format_code(byte(1)?)?;
    match c {
        0xa3 => name(3, usize::from(byte(2)?)),
        0xb3 => {
            let mut n = [0u8; 4];
            n.copy_from_slice(slice(2, 4)?);
            name(6, u32::from_be_bytes(n) as usize)
        }
        0x44 => Ok(Ident::Num(0)),
        0x53 => Ok(Ident::Num(u64::from(byte(2)?))),
        0x80 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(slice(2, 8)?);
            Ok(Ident::Num(u64::from_be_bytes(n)))
        }
        c => Err(unexpected("descriptor", "ulong or symbol", c)),
    }
}

/// An identifier as serde_amqp's `deserialize_identifier` reads it outside enums of values:
/// a string, symbol, uint or ulong is read; a described value's descriptor is peeked (the
/// value stays for what follows); any other constructor is its own number, not read.
fn ident<'a>(t: &mut Values<'a>) -> Result<Ident<'a>, DecodeError> {
    let c = peek(t)?.ok_or(DecodeError::Truncated)?;
    match c {
        0xa1 | 0xb1 | 0xa3 | 0xb3 | 0x70 | 0x52 | 0x43 | 0x80 | 0x53 | 0x44 => match next(t)? {
            ValueRef::String(s) | ValueRef::Symbol(s) => Ok(Ident::Name(s)),
            ValueRef::Uint(n) => Ok(Ident::Num(u64::from(n))),
            ValueRef::Ulong(n) => Ok(Ident::Num(n)),
            _ => Err(unexpected("identifier", "string, symbol or number", c)),
        },
        0x00 => described_ident(t.rest()),
        c => Ok(Ident::Num(u64::from(c))),
    }
}

fn section(id: Ident<'_>) -> Result<Section, DecodeError> {
    Ok(match id {
        Ident::Num(0x70) | Ident::Name("amqp:header:list") => Section::Header,
        Ident::Num(0x71) | Ident::Name("amqp:delivery-annotations:map") => {
            Section::DeliveryAnnotations
        }
        Ident::Num(0x72) | Ident::Name("amqp:message-annotations:map") => {
            Section::MessageAnnotations
        }
        Ident::Num(0x73) | Ident::Name("amqp:properties:list") => Section::Properties,
        Ident::Num(0x74) | Ident::Name("amqp:application-properties:map") => {
            Section::ApplicationProperties
        }
        Ident::Num(0x75..=0x77)
        | Ident::Name("amqp:data:binary" | "amqp:amqp-sequence:list" | "amqp:amqp-value:*") => {
            Section::Body
        }
        Ident::Num(0x78) | Ident::Name("amqp:footer:map") => Section::Footer,
        Ident::Num(n) => return Err(DecodeError::Descriptor(n)),
        Ident::Name(_) => return Err(unexpected("section", "a section descriptor", 0xa3)),
    })
}

/// One part of a described value being read (fe2o3's `DescribedAccess::next_element`):
/// `None` past its count or at the end of the payload.
fn part<'a, T>(
    t: &mut Values<'a>,
    read: &mut u32,
    of: u32,
    f: impl FnOnce(&mut Values<'a>) -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    if *read >= of || peek(t)?.is_none() {
        return Ok(None);
    }
    let v = f(t)?;
    *read += 1;
    Ok(Some(v))
}

/// The fields of a list-encoded composite (header, properties), read in order: `None` for a
/// field past the list's count, at the end of the payload, or null. Fields beyond those of
/// the type are left unread (fe2o3 reads them as the next sections).
struct ListFields {
    left: u32,
}

impl ListFields {
    /// Reads the descriptor (checked against `name` and `code`) and the list header.
    fn open(t: &mut Values<'_>, name: &'static str, code: u64) -> Result<ListFields, DecodeError> {
        let c = peek(t)?.ok_or(DecodeError::Missing("descriptor"))?;
        if next(t)? != ValueRef::Described {
            return Err(unexpected("section", "described type", c));
        }
        let d = descriptor_value(t)?;
        let left = match next(t)? {
            ValueRef::List { count } => count,
            _ => return Err(unexpected("section", "list", c)),
        };
        match d {
            Ident::Num(n) if n == code => {}
            Ident::Name(s) if s == name => {}
            Ident::Num(n) => return Err(DecodeError::Descriptor(n)),
            Ident::Name(_) => return Err(unexpected("descriptor", name, 0xa3)),
        }
        Ok(ListFields { left })
    }

    fn next<'a>(&mut self, t: &mut Values<'a>) -> Result<Option<ValueRef<'a>>, DecodeError> {
        if self.left == 0 || peek(t)?.is_none() {
            return Ok(None);
        }
        self.left -= 1;
        match next(t)? {
            ValueRef::Null => Ok(None),
            v => Ok(Some(v)),
        }
    }

    /// A field of the type `want` accepts (`None`: wrong type, refused).
    fn typed<'a, T>(
        &mut self,
        t: &mut Values<'a>,
        field: &'static str,
        expected: &'static str,
        want: impl FnOnce(ValueRef<'a>) -> Option<T>,
    ) -> Result<Option<T>, DecodeError> {
        let at = t.peek().unwrap_or(0);
        match self.next(t)? {
            None => Ok(None),
            Some(v) => want(v)
                .map(Some)
                .ok_or_else(|| unexpected(field, expected, at)),
        }
    }
}

fn boolean(v: ValueRef<'_>) -> Option<bool> {
    match v {
        ValueRef::Bool(b) => Some(b),
        _ => None,
    }
}

fn uint(v: ValueRef<'_>) -> Option<u32> {
    match v {
        ValueRef::Uint(n) => Some(n),
        _ => None,
    }
}

fn string(v: ValueRef<'_>) -> Option<&str> {
    match v {
        ValueRef::String(s) => Some(s),
        _ => None,
    }
}

fn symbol(v: ValueRef<'_>) -> Option<&str> {
    match v {
        ValueRef::Symbol(s) => Some(s),
        _ => None,
    }
}

fn binary(v: ValueRef<'_>) -> Option<&[u8]> {
    match v {
        ValueRef::Binary(b) => Some(b),
        _ => None,
    }
}

fn timestamp(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Timestamp(ms) => Some(ms),
        _ => None,
    }
}

fn id(v: ValueRef<'_>) -> Option<Id<'_>> {
    match v {
        ValueRef::Ulong(n) => Some(Id::Ulong(n)),
        ValueRef::Uuid(u) => Some(Id::Uuid(u)),
        ValueRef::Binary(b) => Some(Id::Binary(b)),
        ValueRef::String(s) => Some(Id::String(s)),
        _ => None,
    }
}

fn read_header(t: &mut Values<'_>) -> Result<Header, DecodeError> {
    let mut f = ListFields::open(t, "amqp:header:list", 0x70)?;
    f.typed(t, "header.durable", "boolean", boolean)?;
    let priority = f.typed(t, "header.priority", "ubyte", |v| match v {
        ValueRef::Ubyte(p) => Some(p),
        _ => None,
    })?;
    let ttl = f.typed(t, "header.ttl", "uint", uint)?;
    f.typed(t, "header.first-acquirer", "boolean", boolean)?;
    f.typed(t, "header.delivery-count", "uint", uint)?;
    Ok(Header {
        priority: priority.unwrap_or(4),
        ttl,
    })
}

fn read_properties<'a>(t: &mut Values<'a>) -> Result<Properties<'a>, DecodeError> {
    let mut f = ListFields::open(t, "amqp:properties:list", 0x73)?;
    let id_types = "ulong, uuid, binary or string";
    let message_id = f.typed(t, "properties.message-id", id_types, id)?;
    let user_id = f.typed(t, "properties.user-id", "binary", binary)?;
    f.typed(t, "properties.to", "string", string)?;
    let subject = f.typed(t, "properties.subject", "string", string)?;
    let reply_to = f.typed(t, "properties.reply-to", "string", string)?;
    let correlation_id = f.typed(t, "properties.correlation-id", id_types, id)?;
    let content_type = f.typed(t, "properties.content-type", "symbol", symbol)?;
    let content_encoding = f.typed(t, "properties.content-encoding", "symbol", symbol)?;
    f.typed(t, "properties.absolute-expiry-time", "timestamp", timestamp)?;
    let creation_time = f.typed(t, "properties.creation-time", "timestamp", timestamp)?;
    f.typed(t, "properties.group-id", "string", string)?;
    f.typed(t, "properties.group-sequence", "uint", uint)?;
    f.typed(t, "properties.reply-to-group-id", "string", string)?;
    Ok(Properties {
        message_id,
        user_id,
        subject,
        reply_to,
        correlation_id,
        content_type,
        content_encoding,
        creation_time,
    })
}

/// A map-valued section (annotations, application properties): descriptor, then the map;
/// returns the map's count of keys and values, whose entries follow.
fn open_map(t: &mut Values<'_>, name: &'static str, code: u64) -> Result<u32, DecodeError> {
    descriptor(t, name, code)?;
    let c = peek(t)?.ok_or(DecodeError::Missing("section value"))?;
    match next(t)? {
        ValueRef::Map { count } if count <= MAX_COUNT => Ok(count),
        ValueRef::Map { .. } => Err(DecodeError::BadSize),
        _ => Err(unexpected("section", "map", c)),
    }
}

/// An annotations section (delivery annotations, message annotations, footer): keys are
/// symbols or ulongs; `keep` sees each symbol key's value first, and says whether it read it.
fn read_annotations<'a>(
    t: &mut Values<'a>,
    name: &'static str,
    code: u64,
    mut keep: impl FnMut(&'a str, &mut Values<'a>) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    let count = open_map(t, name, code)?;
    for _ in 0..count / 2 {
        let at = t.peek().unwrap_or(0);
        let key = match next(t)? {
            ValueRef::Symbol(s) => Some(s),
            ValueRef::Ulong(_) => None,
            _ => return Err(unexpected("annotation key", "symbol or ulong", at)),
        };
        let read = match key {
            Some(k) => keep(k, t)?,
            None => false,
        };
        if !read {
            value(t)?;
        }
    }
    Ok(())
}

fn read_message_annotations<'a>(t: &mut Values<'a>) -> Result<Annotations<'a>, DecodeError> {
    let mut a = Annotations::default();
    read_annotations(t, "amqp:message-annotations:map", 0x72, |k, t| {
        let slot = match k {
            mapping::ANN_HEADERS => {
                a.headers = Some(read_rich(t)?);
                return Ok(true);
            }
            mapping::ANN_PRIORITY => &mut a.priority,
            mapping::ANN_EXPIRATION => &mut a.expiration,
            mapping::ANN_TIMESTAMP => &mut a.timestamp,
            mapping::ANN_APP_ID => &mut a.app_id,
            mapping::ANN_CLUSTER_ID => &mut a.cluster_id,
            _ => return Ok(false),
        };
        let v = next(t)?;
        *slot = Some(match v {
            ValueRef::Ubyte(n) => Ann::Ubyte(n),
            ValueRef::Ulong(n) => Ann::Ulong(n),
            ValueRef::String(s) => Ann::String(s),
            v => {
                rest_of_value(t, v)?;
                Ann::Other
            }
        });
        Ok(true)
    })?;
    Ok(a)
}

fn read_application_properties<'a>(t: &mut Values<'a>) -> Result<AppProperties<'a>, DecodeError> {
    let count = open_map(t, "amqp:application-properties:map", 0x74)?;
    let mut out = AppProperties::with_capacity((count / 2) as usize);
    for _ in 0..count / 2 {
        let at = t.peek().unwrap_or(0);
        let ValueRef::String(k) = next(t)? else {
            return Err(unexpected("application property key", "string", at));
        };
        let at = t.peek().unwrap_or(0);
        let v = match next(t)? {
            ValueRef::List { .. } | ValueRef::Map { .. } | ValueRef::Array { .. } => {
                return Err(unexpected("application property value", "simple type", at))
            }
            ValueRef::Described => {
                rest_of_value(t, ValueRef::Described)?;
                None
            }
            v => Some(v),
        };
        out.push(Key::Str(k), v);
    }
    Ok(out)
}

/// The value of the headers annotation: a map's entries, converted as they are read.
fn read_rich<'a>(t: &mut Values<'a>) -> Result<Ann<'a>, DecodeError> {
    match next(t)? {
        ValueRef::Map { count } => {
            if count > MAX_COUNT {
                return Err(DecodeError::BadSize);
            }
            let (keys, values) = map_entries(t, count, 0)?;
            Ok(Ann::Map(keys, values))
        }
        v => {
            rest_of_value(t, v)?;
            Ok(Ann::Other)
        }
    }
}

/// A map's entries (`count` keys and values), each value converted at `depth`.
fn map_entries<'a>(
    t: &mut Values<'a>,
    count: u32,
    depth: usize,
) -> Result<Entries<'a, Field>, DecodeError> {
    let mut keys = Vec::with_capacity((count / 2) as usize);
    let mut values = Vec::with_capacity((count / 2) as usize);
    for _ in 0..count / 2 {
        let key = match next(t)? {
            ValueRef::String(s) => Key::Str(s),
            k => {
                rest_of_value(t, k)?;
                Key::Other
            }
        };
        let v = next(t)?;
        keys.push(key);
        values.push(field(t, v, depth)?);
    }
    Ok((keys, values))
}

/// A value of the headers annotation (first part `v` read), decoded into the 0.9.1 field
/// value the bridge encoded (`inbound`'s `value_to_field`): `depth` lists or maps are around
/// it, and deeper than [`mapping::MAX_DEPTH`] is refused. Recursion is bounded by that depth:
/// deeper values are only checked ([`rest_of_value`]).
fn field<'a>(t: &mut Values<'a>, v: ValueRef<'a>, depth: usize) -> Result<Field, DecodeError> {
    Ok(Ok(match v {
        ValueRef::Null => AMQPValue::Void,
        ValueRef::Bool(b) => AMQPValue::Boolean(b),
        ValueRef::Ubyte(n) => AMQPValue::ShortShortUInt(n),
        ValueRef::Ushort(n) => AMQPValue::ShortUInt(n),
        ValueRef::Uint(n) => AMQPValue::LongUInt(n),
        ValueRef::Ulong(n) => match i64::try_from(n) {
            Ok(n) => AMQPValue::LongLongInt(n),
            Err(_) => return Ok(Err(FieldError::Unsupported)),
        },
        ValueRef::Byte(n) => AMQPValue::ShortShortInt(n),
        ValueRef::Short(n) => AMQPValue::ShortInt(n),
        ValueRef::Int(n) => AMQPValue::LongInt(n),
        ValueRef::Long(n) => AMQPValue::LongLongInt(n),
        ValueRef::Float(f) => AMQPValue::Float(f),
        ValueRef::Double(f) => AMQPValue::Double(f),
        ValueRef::Timestamp(ms) => match millis_to_seconds(ms) {
            Some(s) => AMQPValue::Timestamp(s),
            None => return Ok(Err(FieldError::Unsupported)),
        },
        ValueRef::Binary(b) => AMQPValue::ByteArray(b.to_vec().into()),
        ValueRef::String(s) | ValueRef::Symbol(s) => AMQPValue::LongString(LongString::from(s)),
        ValueRef::Char(c) => AMQPValue::LongString(LongString::from(c.to_string())),
        ValueRef::Decimal32(_)
        | ValueRef::Decimal64(_)
        | ValueRef::Decimal128(_)
        | ValueRef::Uuid(_)
        | ValueRef::Array { .. } => {
            rest_of_value(t, v)?;
            return Ok(Err(FieldError::Unsupported));
        }
        ValueRef::List { count } => {
            if count > MAX_COUNT {
                return Err(DecodeError::BadSize);
            }
            if depth >= mapping::MAX_DEPTH {
                rest_of_value(t, v)?;
                return Ok(Err(FieldError::TooDeep));
            }
            let mut items = Vec::with_capacity(count.min(1024) as usize);
            let mut failed = None;
            for _ in 0..count {
                let x = next(t)?;
                if failed.is_some() {
                    rest_of_value(t, x)?;
                    continue;
                }
                match field(t, x, depth + 1)? {
                    Ok(a) => items.push(a),
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                return Ok(Err(e));
            }
            AMQPValue::FieldArray(FieldArray::from(items))
        }
        ValueRef::Map { count } => {
            if count > MAX_COUNT {
                return Err(DecodeError::BadSize);
            }
            if depth >= mapping::MAX_DEPTH {
                rest_of_value(t, v)?;
                return Ok(Err(FieldError::TooDeep));
            }
            let (keys, values) = map_entries(t, count, depth + 1)?;
            match table(&keys, values) {
                Ok(table) => AMQPValue::FieldTable(table),
                Err(e) => return Ok(Err(e)),
            }
        }
        ValueRef::Described => {
            let d = descriptor_value(t)?;
            let x = next(t)?;
            let name = match d {
                Ident::Name(name) => name,
                Ident::Num(_) => "",
            };
            match (name, x) {
                (mapping::DESC_DECIMAL, ValueRef::List { count: 2 }) => {
                    let scale = next(t)?;
                    rest_of_value(t, scale)?;
                    let value = next(t)?;
                    rest_of_value(t, value)?;
                    match (scale, value) {
                        (ValueRef::Ubyte(scale), ValueRef::Uint(value)) => {
                            AMQPValue::DecimalValue(DecimalValue { scale, value })
                        }
                        _ => return Ok(Err(FieldError::Unsupported)),
                    }
                }
                (mapping::DESC_LONGSTR, ValueRef::Binary(b)) => {
                    AMQPValue::LongString(LongString::from(b.to_vec()))
                }
                (mapping::DESC_TIMESTAMP, ValueRef::Ulong(secs)) => AMQPValue::Timestamp(secs),
                _ => {
                    rest_of_value(t, x)?;
                    return Ok(Err(FieldError::Unsupported));
                }
            }
        }
    }))
}

/// A nested map's entries as the table fe2o3's `OrderedMap` (an `IndexMap`) gives: a
/// repeated key where it first appeared, with its last value; the first key that is not a
/// string, key too long or value refused, in that order, refuses the whole.
fn table(keys: &[Key<'_>], mut values: Vec<Field>) -> Result<FieldTable, FieldError> {
    let mut t = FieldTable::default();
    for_kept(keys, |first, last| {
        let Some(k) = keys.get(first).and_then(Key::str) else {
            return Err(FieldError::Unsupported);
        };
        let key = ShortString::try_new(k).map_err(|_| FieldError::LongKey(k.len()))?;
        t.insert(key, take_field(&mut values, last)?);
        Ok(())
    })?;
    Ok(t)
}

/// The value at `i`, moved out (each kept entry's value is taken once).
fn take_field(values: &mut [Field], i: usize) -> Field {
    values
        .get_mut(i)
        .map(|v| std::mem::replace(v, Ok(AMQPValue::Void)))
        .unwrap_or(Err(FieldError::Unsupported))
}

/// Calls `f(first, last)` for each entry an `IndexMap` keeps of a map with these keys, in
/// order: a string key at its first position, with the index of its last value; any other
/// key at its own position (the caller refuses it). Quadratic for a few keys, hashed past.
fn for_kept<E>(
    keys: &[Key<'_>],
    mut f: impl FnMut(usize, usize) -> Result<(), E>,
) -> Result<(), E> {
    const SMALL: usize = 16;
    if keys.len() <= SMALL {
        for (i, k) in keys.iter().enumerate() {
            let Key::Str(s) = k else {
                f(i, i)?;
                continue;
            };
            let same = |k: &Key<'_>| *k == Key::Str(s);
            if keys.iter().take(i).any(same) {
                continue;
            }
            let last = keys.iter().rposition(same).unwrap_or(i);
            f(i, last)?;
        }
        return Ok(());
    }
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        if let Key::Str(s) = k {
            last.insert(s, i);
        }
    }
    let mut done: HashMap<&str, ()> = HashMap::with_capacity(last.len());
    for (i, k) in keys.iter().enumerate() {
        match k {
            Key::Str(s) => {
                if done.insert(s, ()).is_none() {
                    f(i, last.get(s).copied().unwrap_or(i))?;
                }
            }
            Key::Other => f(i, i)?,
        }
    }
    Ok(())
}

/// A batch of body sections of one kind (fe2o3's `TransparentVec`): sections while each is
/// described the same way as the first; `each` reads one.
fn read_batch<'a>(
    t: &mut Values<'a>,
    mut each: impl FnMut(&mut Values<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut first: Option<Ident<'a>> = None;
    while let Some(c) = peek(t)? {
        if c != 0x00 {
            if first.is_some() {
                break;
            }
            // The first is read as a section, and is none.
            return Err(unexpected("body section", "described type", c));
        }
        let d = described_ident(t.rest())?;
        match first {
            Some(f) if f != d => break,
            Some(_) => {}
            None => first = Some(d),
        }
        each(t)?;
    }
    Ok(())
}

/// A body section's single value (after its descriptor): it must be there.
fn body_value<'a>(t: &mut Values<'a>) -> Result<ValueRef<'a>, DecodeError> {
    peek(t)?.ok_or(DecodeError::Missing("body section value"))?;
    next(t)
}

fn read_body<'a>(t: &mut Values<'a>) -> Result<Body<'a>, DecodeError> {
    match ident(t)? {
        Ident::Num(0x75) | Ident::Name("amqp:data:binary") => {
            let mut first = None;
            let mut more = Vec::new();
            read_batch(t, |t| {
                descriptor(t, "amqp:data:binary", 0x75)?;
                let at = t.peek().unwrap_or(0);
                let ValueRef::Binary(b) = body_value(t)? else {
                    return Err(unexpected("data", "binary", at));
                };
                if first.is_none() {
                    first = Some(b);
                } else {
                    more.push(b);
                }
                Ok(())
            })?;
            Ok(Body::Data(first, more))
        }
        Ident::Num(0x76) | Ident::Name("amqp:amqp-sequence:list") => {
            read_batch(t, |t| {
                descriptor(t, "amqp:amqp-sequence:list", 0x76)?;
                let at = t.peek().unwrap_or(0);
                match body_value(t)? {
                    v @ (ValueRef::List { .. } | ValueRef::Array { .. }) => rest_of_value(t, v),
                    _ => Err(unexpected("amqp-sequence", "list", at)),
                }
            })?;
            Ok(Body::Sequence)
        }
        Ident::Num(0x77) | Ident::Name("amqp:amqp-value:*") => {
            descriptor(t, "amqp:amqp-value:*", 0x77)?;
            Ok(Body::Value(match body_value(t)? {
                ValueRef::Binary(b) => ValueBody::Binary(b),
                ValueRef::String(s) => ValueBody::String(s),
                v => {
                    rest_of_value(t, v)?;
                    ValueBody::Other
                }
            }))
        }
        Ident::Num(n) => Err(DecodeError::Descriptor(n)),
        Ident::Name(_) => Err(unexpected("body", "a body section descriptor", 0xa3)),
    }
}

/// The payload's sections, read as fe2o3 reads a `Message<Body<Value>>`, then the rest of
/// the payload checked to its end.
fn read_message(payload: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut t = Values::new(payload, Limits::DEFAULT);
    let mut m = Message::default();
    let mut parts = 0;
    let mut sections = 0;
    while sections < MAX_SECTIONS {
        let Some(s) = part(&mut t, &mut parts, MESSAGE_PARTS, |t| section(ident(t)?))? else {
            break;
        };
        match s {
            Section::Header => m.header = part(&mut t, &mut parts, MESSAGE_PARTS, read_header)?,
            Section::DeliveryAnnotations => {
                part(&mut t, &mut parts, MESSAGE_PARTS, |t| {
                    read_annotations(t, "amqp:delivery-annotations:map", 0x71, |_, _| Ok(false))
                })?;
            }
            Section::MessageAnnotations => {
                m.annotations = part(&mut t, &mut parts, MESSAGE_PARTS, read_message_annotations)?
            }
            Section::Properties => {
                m.properties = part(&mut t, &mut parts, MESSAGE_PARTS, read_properties)?
            }
            Section::ApplicationProperties => {
                m.application_properties = part(
                    &mut t,
                    &mut parts,
                    MESSAGE_PARTS,
                    read_application_properties,
                )?
            }
            Section::Body => m.body = part(&mut t, &mut parts, MESSAGE_PARTS, read_body)?,
            Section::Footer => {
                part(&mut t, &mut parts, MESSAGE_PARTS, |t| {
                    read_annotations(t, "amqp:footer:map", 0x78, |_, _| Ok(false))
                })?;
            }
        }
        sections += 1;
    }
    t.finish()?;
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Converting: `inbound::translate`, step for step, on the borrowed pieces.

fn bad(field: impl Into<String>, why: &'static str) -> Invalid {
    Invalid::BadField {
        field: field.into(),
        why,
    }
}

/// `s` as a 0.9.1 short string, refused (never a panic) when over 255 bytes.
fn short(field: &str, s: String) -> Result<ShortString, Invalid> {
    let len = s.len();
    ShortString::try_new(s).map_err(|_| Invalid::TooLong {
        field: field.to_string(),
        len,
    })
}

/// A header key as a short string; the error names the key by its first characters.
fn short_key(k: &str) -> Result<ShortString, Invalid> {
    if k.len() > mapping::MAX_SHORT_STRING {
        let preview: String = k.chars().take(32).collect();
        return Err(Invalid::TooLong {
            field: format!("header key `{preview}…`"),
            len: k.len(),
        });
    }
    short("header key", k.to_string())
}

/// String rendering and type of a message id ([`crate::inbound::render_id`]).
fn render_id(id: &Id<'_>) -> (String, IdType) {
    match *id {
        Id::String(s) => (s.to_string(), IdType::String),
        Id::Ulong(n) => (n.to_string(), IdType::Ulong),
        Id::Uuid(u) => {
            let [a0, a1, a2, a3, b0, b1, c0, c1, d0, d1, e @ ..] = *u;
            (
                format!(
                    "urn:uuid:{}-{}-{}-{}-{}",
                    hex::encode([a0, a1, a2, a3]),
                    hex::encode([b0, b1]),
                    hex::encode([c0, c1]),
                    hex::encode([d0, d1]),
                    hex::encode(e)
                ),
                IdType::Uuid,
            )
        }
        Id::Binary(b) => (hex::encode(b), IdType::Binary),
    }
}

/// AMQP 1.0 milliseconds → 0.9.1 seconds (sub-second precision cut off, none before 1970).
fn millis_to_seconds(ms: i64) -> Option<u64> {
    u64::try_from(ms.div_euclid(1000)).ok()
}

/// What RabbitMQ accepts as an expiration: an optionally signed decimal integer whose value
/// is in 0..=u32::MAX (leading zeros allowed).
fn expiration_is_valid(s: &str) -> bool {
    let digits = s
        .strip_prefix('+')
        .map(|d| (false, d))
        .or_else(|| s.strip_prefix('-').map(|d| (true, d)))
        .unwrap_or((false, s));
    let (negative, digits) = digits;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        return true;
    }
    !negative && trimmed.parse::<u32>().is_ok()
}

/// A 0.9.1 field value for an application property (`inbound`'s `simple_to_field`).
fn simple_to_field(v: Simple<'_>) -> Option<AMQPValue> {
    Some(match v? {
        ValueRef::Null => AMQPValue::Void,
        ValueRef::Bool(b) => AMQPValue::Boolean(b),
        ValueRef::Ubyte(n) => AMQPValue::ShortShortUInt(n),
        ValueRef::Ushort(n) => AMQPValue::ShortUInt(n),
        ValueRef::Uint(n) => AMQPValue::LongUInt(n),
        ValueRef::Ulong(n) => AMQPValue::LongLongInt(i64::try_from(n).ok()?),
        ValueRef::Byte(n) => AMQPValue::ShortShortInt(n),
        ValueRef::Short(n) => AMQPValue::ShortInt(n),
        ValueRef::Int(n) => AMQPValue::LongInt(n),
        ValueRef::Long(n) => AMQPValue::LongLongInt(n),
        ValueRef::Float(f) => AMQPValue::Float(f),
        ValueRef::Double(f) => AMQPValue::Double(f),
        ValueRef::Timestamp(ms) => AMQPValue::Timestamp(millis_to_seconds(ms)?),
        ValueRef::Binary(b) => AMQPValue::ByteArray(b.to_vec().into()),
        ValueRef::String(s) | ValueRef::Symbol(s) => AMQPValue::LongString(LongString::from(s)),
        ValueRef::Char(c) => AMQPValue::LongString(LongString::from(c.to_string())),
        _ => return None,
    })
}

fn convert(msg: Message<'_>, max_size: usize, sender: Option<&str>) -> Result<Inbound, Invalid> {
    let body = match msg.body {
        Some(Body::Data(first, more)) => {
            let size: usize =
                first.map_or(0, <[u8]>::len) + more.iter().map(|d| d.len()).sum::<usize>();
            if size > max_size {
                return Err(Invalid::TooLarge {
                    size,
                    max: max_size,
                });
            }
            let mut out = Vec::with_capacity(size);
            out.extend_from_slice(first.unwrap_or_default());
            for d in &more {
                out.extend_from_slice(d);
            }
            out
        }
        Some(Body::Value(v)) => {
            let bytes = match v {
                ValueBody::Binary(b) => b,
                ValueBody::String(s) => s.as_bytes(),
                ValueBody::Other => {
                    return Err(Invalid::UnsupportedBody(
                        "amqp-value that is not binary or string",
                    ))
                }
            };
            if bytes.len() > max_size {
                return Err(Invalid::TooLarge {
                    size: bytes.len(),
                    max: max_size,
                });
            }
            bytes.to_vec()
        }
        None => Vec::new(),
        Some(Body::Sequence) => return Err(Invalid::UnsupportedBody("amqp-sequence")),
    };
    let props = msg.properties.unwrap_or_default();
    let mut annotations = msg.annotations.unwrap_or_default();
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
        let (keys, values) = app.entries();
        for_kept(keys, |first, last| {
            let (Some(Key::Str(k)), Some(v)) = (keys.get(first), values.get(last)) else {
                return Ok(());
            };
            if headers::reserved(k) {
                stripped_headers += 1;
                return Ok(());
            }
            if *k == headers::DESTINATION {
                if let Some(ValueRef::String(s)) = v {
                    if s.len() > MAX_DESTINATION_BYTES {
                        return Err(Invalid::DestinationTooLong { len: s.len() });
                    }
                    destination = Some(s.to_string());
                }
            }
            // The key first: an unsupported value's error names it, so it must be short.
            let key = short_key(k)?;
            let value = simple_to_field(*v)
                .ok_or_else(|| Invalid::UnsupportedProperty(key.as_str().to_string()))?;
            hdrs.insert(key, value);
            Ok(())
        })?;
    }
    if let Some(rich) = annotations.headers.take() {
        let Ann::Map(keys, mut values) = rich else {
            return Err(bad(mapping::ANN_HEADERS, "not a map"));
        };
        for_kept(&keys, |first, last| {
            let Some(Key::Str(k)) = keys.get(first).copied() else {
                return Err(bad(mapping::ANN_HEADERS, "a key is not a string"));
            };
            if headers::reserved(k) {
                stripped_headers += 1;
                return Ok(());
            }
            let key = short_key(k)?;
            if hdrs.inner().contains_key(k) {
                return Err(bad(
                    format!("header `{k}`"),
                    "in both application properties and the headers annotation",
                ));
            }
            let value = take_field(&mut values, last).map_err(|e| e.at(k))?;
            hdrs.insert(key, value);
            Ok(())
        })?;
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
            AMQPValue::LongString(LongString::from(user.to_vec())),
        );
    }
    if let Some(ct) = props.content_type {
        out = out.with_content_type(short("content-type", ct.to_string())?);
    }
    if let Some(ce) = props.content_encoding {
        out = out.with_content_encoding(short("content-encoding", ce.to_string())?);
    }
    if let Some(r) = props.reply_to {
        out = out.with_reply_to(short("reply-to", r.to_string())?);
    }
    if let Some(s) = props.subject {
        out = out.with_type(short("subject", s.to_string())?);
    }
    match (&annotations.timestamp, props.creation_time) {
        (Some(_), Some(_)) => {
            return Err(bad(
                mapping::ANN_TIMESTAMP,
                "given together with creation-time",
            ))
        }
        (Some(Ann::Ulong(secs)), None) => out = out.with_timestamp(*secs),
        (Some(_), None) => return Err(bad(mapping::ANN_TIMESTAMP, "not a ulong")),
        (None, Some(ms)) => {
            out = out.with_timestamp(
                millis_to_seconds(ms).ok_or_else(|| bad("creation-time", "before 1970"))?,
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
    for (ann, name, field) in [
        (&annotations.app_id, mapping::ANN_APP_ID, "app-id"),
        (
            &annotations.cluster_id,
            mapping::ANN_CLUSTER_ID,
            "cluster-id",
        ),
    ] {
        let value = match ann {
            None => continue,
            Some(Ann::String(s)) => short(field, s.to_string())?,
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

/// The 0.9.1 priority: the annotation if present (it must agree with the header), else a
/// header priority other than AMQP 1.0's default 4.
fn priority(a: &Annotations<'_>, header: Option<&Header>) -> Result<Option<u8>, Invalid> {
    match &a.priority {
        Some(Ann::Ubyte(p)) => {
            if header.is_some_and(|h| h.priority != *p) {
                return Err(bad(mapping::ANN_PRIORITY, "disagrees with header.priority"));
            }
            Ok(Some(*p))
        }
        Some(_) => Err(bad(mapping::ANN_PRIORITY, "not a ubyte")),
        None => Ok(header.map(|h| h.priority).filter(|p| *p != 4)),
    }
}

/// The 0.9.1 expiration: `header.ttl` in decimal, or the exact string of the expiration
/// annotation, which the receiving broker must accept.
fn expiration(
    a: &Annotations<'_>,
    header: Option<&Header>,
) -> Result<Option<ShortString>, Invalid> {
    let ttl = header.and_then(|h| h.ttl);
    match (&a.expiration, ttl) {
        (Some(_), Some(_)) => Err(bad(mapping::ANN_EXPIRATION, "given together with ttl")),
        (Some(Ann::String(s)), None) => {
            if !expiration_is_valid(s) {
                return Err(bad(
                    mapping::ANN_EXPIRATION,
                    "not an integer number of milliseconds in 0..=4294967295",
                ));
            }
            Ok(Some(short("expiration", s.to_string())?))
        }
        (Some(_), None) => Err(bad(mapping::ANN_EXPIRATION, "not a string")),
        (None, Some(ms)) => Ok(Some(ShortString::from(ms.to_string()))),
        (None, None) => Ok(None),
    }
}
