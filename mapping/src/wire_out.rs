//! AMQP 0.9.1 delivery → AMQP 1.0 bare message, written straight as bytes.
//!
//! The same message as [`crate::outbound::message_to_amqp`] (same validations, same
//! [`Undeliverable`] reasons in the same order, same sections, fields, annotations and value
//! types), encoded with drawbridge-amqp's one-pass [`Writer`] into a buffer the caller keeps:
//! no intermediate `Message`, no size pass, no allocation when the buffer has room.
//!
//! Sections, in order: `header`, `message-annotations` (only when there is one),
//! `properties`, `application-properties` (always, possibly empty), one `data`. Lists and
//! maps are begun with 32-bit sizes, back-patched, and narrowed (list0, list8, map8) where
//! fe2o3 (serde_amqp 0.18) would narrow them; strings, symbols and binaries take fe2o3's widths
//! too. So the bytes are the ones the fe2o3 path (`message_to_amqp`, then serde_amqp) writes:
//! `tests/wire_out.rs` checks that for every generated message, and, separately from the
//! bytes, the meaning: fe2o3 decodes them to exactly the message `message_to_amqp` builds, and
//! the float's conversion gives back the promised 0.9.1 message.

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
use crate::outbound::{Undeliverable, MAX_PROPERTIES_BYTES};
use drawbridge_amqp::{codec::Writer, message::section};
use lapin::{
    message::Delivery,
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties,
};

/// Format codes the [`Writer`] has no method for (AMQP 1.0 part 1, 1.6).
mod code {
    pub const DESCRIBED: u8 = 0x00;
    pub const NULL: u8 = 0x40;
    pub const LIST0: u8 = 0x45;
    pub const BYTE: u8 = 0x51;
    pub const SMALLULONG: u8 = 0x53;
    pub const SMALLINT: u8 = 0x54;
    pub const SMALLLONG: u8 = 0x55;
    pub const SHORT: u8 = 0x61;
    pub const INT: u8 = 0x71;
    pub const FLOAT: u8 = 0x72;
    pub const LONG: u8 = 0x81;
    pub const DOUBLE: u8 = 0x82;
    pub const VBIN32: u8 = 0xb0;
    pub const STR32: u8 = 0xb1;
    pub const SYM32: u8 = 0xb3;
    pub const LIST8: u8 = 0xc0;
    pub const MAP8: u8 = 0xc1;
    pub const LIST32: u8 = 0xd0;
    pub const MAP32: u8 = 0xd1;
}

/// AMQP 1.0's `header.priority` when none is given.
const DEFAULT_PRIORITY: u8 = 4;

/// Append the AMQP 1.0 bare message for `d` to `out` ([`encode_message`]).
pub fn encode(d: &Delivery, max_size: usize, out: &mut Vec<u8>) -> Result<(), Undeliverable> {
    encode_message(&d.properties, &d.data, max_size, out)
}

/// Append the AMQP 1.0 bare message for a 0.9.1 message with properties `p` and body `body`
/// to `out`: the encoding of what [`crate::outbound::message_to_amqp`] returns, with the same
/// errors in the same order. On an error `out` is left as it was.
///
/// `out` is appended to, never cleared, so a link can reuse one buffer: with room for the
/// message, encoding allocates nothing.
pub fn encode_message(
    p: &BasicProperties,
    body: &[u8],
    max_size: usize,
    out: &mut Vec<u8>,
) -> Result<(), Undeliverable> {
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
        .map(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .ok_or(Undeliverable::NoMessageId)?;

    let start = out.len();
    // The only refusals left are the headers' (found while they are written, first one in
    // table order, as `message_to_amqp` finds them).
    if let Err(e) = write_message(p, id, body, out) {
        out.truncate(start);
        return Err(e);
    }
    Ok(())
}

fn write_message(
    p: &BasicProperties,
    id: &str,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Undeliverable> {
    let ttl = p
        .expiration()
        .as_ref()
        .and_then(|e| canonical_u32(e.as_str()));
    let creation_time = p.timestamp().and_then(seconds_to_millis);

    // header: durable, priority, ttl (first-acquirer, delivery-count: defaults). A field at
    // its default (durable false, priority 4) is null, as fe2o3 writes it.
    let list = out.len() + 4;
    {
        let mut w = Writer::new(out);
        let mut m = w.begin_described_list(section::HEADER);
        let durable = *p.delivery_mode() == Some(2);
        w.field(&mut m, durable.then_some(true), |w, v| w.boolean(v));
        let priority = p.priority().filter(|&prio| prio != DEFAULT_PRIORITY);
        w.field(&mut m, priority, |w, v| w.ubyte(v));
        w.field(&mut m, ttl, |w, v| w.uint(v));
        w.end_list(m);
    }
    narrow_written(out, list);

    // message-annotations, in `message_to_amqp`'s order; left out when empty.
    let section_start = out.len();
    described_start(out, section::MESSAGE_ANNOTATIONS);
    let anns = compound_begin(out, code::MAP32);
    let mut entries = 0u32;
    if let Some(headers) = p.headers() {
        if write_rich_headers(headers, out)? {
            entries += 1;
        }
    }
    if let Some(prio) = *p.priority() {
        symbol(&mut Writer::new(out), mapping::ANN_PRIORITY.as_bytes());
        Writer::new(out).ubyte(prio);
        entries += 1;
    }
    if let (Some(exp), None) = (p.expiration(), ttl) {
        symbol(&mut Writer::new(out), mapping::ANN_EXPIRATION.as_bytes());
        string(&mut Writer::new(out), exp.as_str());
        entries += 1;
    }
    if let (Some(secs), None) = (*p.timestamp(), creation_time) {
        symbol(&mut Writer::new(out), mapping::ANN_TIMESTAMP.as_bytes());
        Writer::new(out).ulong_value(secs);
        entries += 1;
    }
    if let Some(app_id) = p.app_id() {
        symbol(&mut Writer::new(out), mapping::ANN_APP_ID.as_bytes());
        string(&mut Writer::new(out), app_id.as_str());
        entries += 1;
    }
    if let Some(cluster_id) = p.cluster_id() {
        symbol(&mut Writer::new(out), mapping::ANN_CLUSTER_ID.as_bytes());
        string(&mut Writer::new(out), cluster_id.as_str());
        entries += 1;
    }
    if entries == 0 {
        out.truncate(section_start);
    } else {
        compound_end(out, anns, 2 * entries);
    }

    // properties: message-id, user-id, to, subject, reply-to, correlation-id, content-type,
    // content-encoding, absolute-expiry-time, creation-time (the rest: null, dropped).
    let list = out.len() + 4;
    {
        let mut w = Writer::new(out);
        let mut m = w.begin_described_list(section::PROPERTIES);
        w.field(&mut m, Some(id), string);
        w.field(&mut m, str_of(p.user_id()), |w, v| binary(w, v.as_bytes()));
        w.field(&mut m, None::<&str>, string);
        w.field(&mut m, str_of(p.kind()), string);
        w.field(&mut m, str_of(p.reply_to()), string);
        w.field(&mut m, str_of(p.correlation_id()), string);
        w.field(&mut m, str_of(p.content_type()), |w, v| {
            symbol(w, v.as_bytes())
        });
        w.field(&mut m, str_of(p.content_encoding()), |w, v| {
            symbol(w, v.as_bytes())
        });
        w.field(&mut m, None::<i64>, |w, v| w.timestamp(v));
        w.field(&mut m, creation_time, |w, v| w.timestamp(v));
        w.end_list(m);
    }
    narrow_written(out, list);

    // application-properties: every header with a simple-type counterpart (always present,
    // possibly empty, as `message_to_amqp` sets it).
    described_start(out, section::APPLICATION_PROPERTIES);
    let app = compound_begin(out, code::MAP32);
    let mut count = 0u32;
    if let Some(headers) = p.headers() {
        for (k, v) in headers.inner() {
            if is_simple(v) {
                string(&mut Writer::new(out), k.as_str());
                // Simple values nest nothing: nothing to refuse.
                let _infallible = write_value(v, 0, out);
                count += 2;
            }
        }
    }
    compound_end(out, app, count);

    // data (`drawbridge_amqp::message::data_section`, but for the 255-byte width rule).
    let mut w = Writer::new(out);
    w.raw(&[code::DESCRIBED, code::SMALLULONG, section::DATA as u8]);
    binary(&mut w, body);
    Ok(())
}

/// Writes the [`mapping::ANN_HEADERS`] annotation (key and map) if any header has no
/// application-property form; `Ok(true)` if it was written.
fn write_rich_headers(headers: &FieldTable, out: &mut Vec<u8>) -> Result<bool, Undeliverable> {
    let entry_start = out.len();
    symbol(&mut Writer::new(out), mapping::ANN_HEADERS.as_bytes());
    let map = compound_begin(out, code::MAP32);
    let mut count = 0u32;
    for (k, v) in headers.inner() {
        if is_simple(v) {
            continue;
        }
        let key = k.as_str();
        string(&mut Writer::new(out), key);
        write_value(v, 0, out).map_err(|e| e.at(key))?;
        count += 2;
    }
    if count == 0 {
        out.truncate(entry_start);
        return Ok(false);
    }
    compound_end(out, map, count);
    Ok(true)
}

/// Whether a header value goes into the application properties (`outbound::field_to_simple`
/// has a value for it: one that maps back to exactly it); otherwise into the headers
/// annotation.
fn is_simple(v: &AMQPValue) -> bool {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).is_ok(),
        AMQPValue::Timestamp(t) => seconds_to_millis(*t).is_some(),
        AMQPValue::ShortString(_)
        | AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_) => false,
        AMQPValue::Boolean(_)
        | AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_)
        | AMQPValue::Float(_)
        | AMQPValue::Double(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => true,
    }
}

/// Why one (possibly nested) field value cannot be encoded.
enum FieldError {
    Unsupported(&'static str),
    TooDeep,
}

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

/// Encodes a 0.9.1 field value as the AMQP 1.0 value `outbound::field_to_value` (or, for a
/// simple value, `field_to_simple`) builds, which decodes back to exactly it. `depth` is the
/// number of tables/arrays around `v`.
fn write_value(v: &AMQPValue, depth: usize, out: &mut Vec<u8>) -> Result<(), FieldError> {
    let mut w = Writer::new(out);
    match v {
        AMQPValue::Boolean(b) => w.boolean(*b),
        AMQPValue::ShortShortInt(n) => fixed(&mut w, code::BYTE, &n.to_be_bytes()),
        AMQPValue::ShortShortUInt(n) => w.ubyte(*n),
        AMQPValue::ShortInt(n) => fixed(&mut w, code::SHORT, &n.to_be_bytes()),
        AMQPValue::ShortUInt(n) => w.ushort(*n),
        AMQPValue::LongInt(n) => match i8::try_from(*n) {
            Ok(small) => fixed(&mut w, code::SMALLINT, &small.to_be_bytes()),
            Err(_) => fixed(&mut w, code::INT, &n.to_be_bytes()),
        },
        AMQPValue::LongUInt(n) => w.uint(*n),
        AMQPValue::LongLongInt(n) => match i8::try_from(*n) {
            Ok(small) => fixed(&mut w, code::SMALLLONG, &small.to_be_bytes()),
            Err(_) => fixed(&mut w, code::LONG, &n.to_be_bytes()),
        },
        // Bit for bit, NaN payloads included.
        AMQPValue::Float(f) => fixed(&mut w, code::FLOAT, &f.to_bits().to_be_bytes()),
        AMQPValue::Double(f) => fixed(&mut w, code::DOUBLE, &f.to_bits().to_be_bytes()),
        AMQPValue::DecimalValue(d) => {
            described_symbol(&mut w, mapping::DESC_DECIMAL);
            let list = out.len() + 1;
            let mut w = Writer::new(out);
            let mut m = w.begin_list();
            w.field(&mut m, Some(d.scale), |w, v| w.ubyte(v));
            w.field(&mut m, Some(d.value), |w, v| w.uint(v));
            w.end_list(m);
            narrow_written(out, list);
        }
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => string(&mut w, text),
            Err(_) => {
                described_symbol(&mut w, mapping::DESC_LONGSTR);
                binary(&mut w, s.as_bytes());
            }
        },
        AMQPValue::Timestamp(t) => match seconds_to_millis(*t) {
            Some(ms) => w.timestamp(ms),
            None => {
                described_symbol(&mut w, mapping::DESC_TIMESTAMP);
                w.ulong_value(*t);
            }
        },
        AMQPValue::ByteArray(b) => binary(&mut w, b.as_slice()),
        AMQPValue::Void => w.raw(&[code::NULL]),
        AMQPValue::FieldArray(a) => {
            if depth >= mapping::MAX_DEPTH {
                return Err(FieldError::TooDeep);
            }
            // Not `Writer::begin_list`: its lists drop trailing nulls, which are elements here.
            let list = compound_begin(out, code::LIST32);
            let mut count = 0u32;
            for x in a.as_slice() {
                write_value(x, depth + 1, out)?;
                count += 1;
            }
            compound_end(out, list, count);
        }
        AMQPValue::FieldTable(t) => {
            if depth >= mapping::MAX_DEPTH {
                return Err(FieldError::TooDeep);
            }
            let map = compound_begin(out, code::MAP32);
            let mut count = 0u32;
            for (k, x) in t.inner() {
                string(&mut Writer::new(out), k.as_str());
                write_value(x, depth + 1, out)?;
                count += 2;
            }
            compound_end(out, map, count);
        }
        // As `outbound::field_to_value`: lapin writes a short-string field value with a type
        // tag RabbitMQ refuses, and never decodes one; refused rather than rewritten.
        AMQPValue::ShortString(_) => {
            return Err(FieldError::Unsupported(
                "short-string field values have no wire encoding RabbitMQ accepts",
            ))
        }
    }
    Ok(())
}

/// An optional short string's text.
fn str_of(s: &Option<ShortString>) -> Option<&str> {
    s.as_ref().map(ShortString::as_str)
}

/// A fixed-width value: its format code, then its big-endian bytes.
fn fixed(w: &mut Writer<'_, Vec<u8>>, code: u8, bytes: &[u8]) {
    w.raw(&[code]);
    w.raw(bytes);
}

/// A variable-width value of exactly 255 bytes, in its 32-bit form: fe2o3 (serde_amqp 0.18)
/// takes the 8-bit forms up to 254 bytes only, [`Writer`] up to 255 (both valid). Written
/// as fe2o3 does, so that the bytes are the same as the fe2o3 path's.
fn wide_255(w: &mut Writer<'_, Vec<u8>>, code32: u8, b: &[u8]) -> bool {
    if b.len() != 255 {
        return false;
    }
    w.raw(&[code32, 0, 0, 0, 255]);
    w.raw(b);
    true
}

/// A `string` (str8 up to 254 bytes).
fn string(w: &mut Writer<'_, Vec<u8>>, s: &str) {
    if !wide_255(w, code::STR32, s.as_bytes()) {
        w.string(s);
    }
}

/// A `symbol` (sym8 up to 254 bytes).
fn symbol(w: &mut Writer<'_, Vec<u8>>, s: &[u8]) {
    if !wide_255(w, code::SYM32, s) {
        w.symbol(s);
    }
}

/// A `binary` (vbin8 up to 254 bytes).
fn binary(w: &mut Writer<'_, Vec<u8>>, b: &[u8]) {
    if !wide_255(w, code::VBIN32, b) {
        w.binary(b);
    }
}

/// The constructor of a described value with a small-ulong descriptor (a section); the
/// value follows.
fn described_start(out: &mut Vec<u8>, descriptor: u64) {
    let mut w = Writer::new(out);
    w.raw(&[code::DESCRIBED]);
    w.ulong_value(descriptor);
}

/// The constructor of a described value with a symbolic descriptor; the value follows.
fn described_symbol(w: &mut Writer<'_, Vec<u8>>, descriptor: &str) {
    w.raw(&[code::DESCRIBED]);
    symbol(w, descriptor.as_bytes());
}

/// Starts a list32 or map32 (`constructor`) with size and count zero, to be ended by
/// [`compound_end`]; returns where its size goes.
fn compound_begin(out: &mut Vec<u8>, constructor: u8) -> usize {
    Writer::new(out).raw(&[constructor, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.len() - 8
}

/// Ends the list or map whose size field is at `at` (its constructor just before), holding
/// `count` elements: in the narrowest form fe2o3 writes (list0 when empty; list8 or map8
/// when the elements take at most 254 bytes, moving them 6 bytes down; else the 32-bit form).
fn compound_end(out: &mut Vec<u8>, at: usize, count: u32) {
    let Some(ctor) = at.checked_sub(1) else {
        return;
    };
    let elements = out.len().saturating_sub(at + 8);
    let narrow = match out.get(ctor) {
        Some(&code::LIST32) if elements == 0 => {
            out.truncate(ctor);
            out.push(code::LIST0);
            return;
        }
        Some(&code::LIST32) => code::LIST8,
        Some(&code::MAP32) => code::MAP8,
        _ => return,
    };
    if let (Ok(size), Ok(count8)) = (u8::try_from(elements + 1), u8::try_from(count)) {
        put(out, ctor, &[narrow, size, count8]);
        out.copy_within(at + 8.., at + 2);
        out.truncate(out.len() - 6);
        return;
    }
    let size = (elements + 4) as u32;
    put(
        out,
        at,
        &((u64::from(size) << 32) | u64::from(count)).to_be_bytes(),
    );
}

/// [`compound_end`] for a list [`Writer::end_list`] has ended (its size and count written):
/// `at` is where its size is.
fn narrow_written(out: &mut Vec<u8>, at: usize) {
    let count = out
        .get(at + 4..at + 8)
        .and_then(|c| <[u8; 4]>::try_from(c).ok())
        .map_or(0, u32::from_be_bytes);
    compound_end(out, at, count);
}

/// Overwrites the bytes at `at` (always within `out`).
fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(s) = out.get_mut(at..at + bytes.len()) {
        s.copy_from_slice(bytes);
    }
}

/// `s` as a `u32` if `s` is exactly the decimal rendering of that number (no sign, no
/// leading zeros): `outbound`'s test, without rendering the number.
fn canonical_u32(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    let digits = !b.is_empty() && b.iter().all(u8::is_ascii_digit);
    let leading_zero = b.len() > 1 && b.first() == Some(&b'0');
    if !digits || leading_zero {
        return None;
    }
    s.parse().ok()
}

/// 0.9.1 timestamp (seconds) → AMQP 1.0 timestamp (milliseconds), if it fits.
fn seconds_to_millis(secs: u64) -> Option<i64> {
    i64::try_from(secs).ok()?.checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_u32_is_the_rendering_test() {
        let rendered = |s: &str| s.parse::<u32>().ok().filter(|n| n.to_string() == s);
        for s in [
            "",
            "0",
            "00",
            "007",
            "7",
            "+5",
            "-0",
            "-1",
            " 1",
            "1 ",
            "4294967295",
            "4294967296",
            "99999999999",
            "10",
            "0x10",
            "١",
        ] {
            assert_eq!(canonical_u32(s), rendered(s), "{s:?}");
        }
    }

    fn compound(constructor: u8, elements: &[u8], count: u32) -> Vec<u8> {
        let mut out = vec![0xaa];
        let at = compound_begin(&mut out, constructor);
        Writer::new(&mut out).raw(elements);
        compound_end(&mut out, at, count);
        out
    }

    #[test]
    fn compounds_take_the_narrowest_form_fe2o3_takes() {
        assert_eq!(compound(code::LIST32, &[], 0), [0xaa, 0x45]);
        assert_eq!(compound(code::MAP32, &[], 0), [0xaa, 0xc1, 1, 0]);
        assert_eq!(
            compound(code::LIST32, &[0x40, 0x40], 2),
            [0xaa, 0xc0, 3, 2, 0x40, 0x40]
        );
        // 254 bytes of elements: the last 8-bit size (255); 255 bytes: 32-bit.
        let nulls = [0x40; 255];
        let l8 = compound(code::MAP32, &nulls[..254], 254);
        assert_eq!(l8[..4], [0xaa, 0xc1, 255, 254]);
        assert_eq!(l8.len(), 4 + 254);
        let l32 = compound(code::LIST32, &nulls, 255);
        assert_eq!(l32[..10], [0xaa, 0xd0, 0, 0, 1, 3, 0, 0, 0, 255]);
        assert_eq!(l32.len(), 10 + 255);
    }

    #[test]
    fn variable_width_values_of_255_bytes_are_wide() {
        let mut out = Vec::new();
        string(&mut Writer::new(&mut out), &"a".repeat(254));
        assert_eq!(out[..2], [0xa1, 254]);
        out.clear();
        string(&mut Writer::new(&mut out), &"a".repeat(255));
        assert_eq!(out[..5], [0xb1, 0, 0, 0, 255]);
        assert_eq!(out.len(), 5 + 255);
        out.clear();
        binary(&mut Writer::new(&mut out), &[7; 255]);
        assert_eq!(out[..5], [0xb0, 0, 0, 0, 255]);
        out.clear();
        symbol(&mut Writer::new(&mut out), &[b's'; 256]);
        assert_eq!(out[..5], [0xb3, 0, 0, 1, 0]);
    }
}
