//! Reading encoded values one at a time, for the callers that interpret what the engine keeps
//! as bytes (a delivery's message sections, [`crate::codec::Raw`] fields).
//!
//! [`Values`] is a pull reader over a buffer of encoded values: each [`Values::next_value`]
//! returns the next value's constructor and, for a primitive, its data ([`ValueRef`], borrowed
//! from the buffer); a list, map, array or described value is announced by its header and its
//! parts follow as the next values (in an array, under the array's one element constructor).
//! The caller reads as many as it wants and groups them as it likes; the reader keeps track of
//! which containers are open and enforces, as it reads, the limits of
//! [`crate::codec::Reader::skip`]: nesting no deeper than [`Limits::max_depth`] (on an explicit
//! stack, so no recursion at all), every size within what is left of its container before
//! anything is read, and every list, map and array holding exactly the count of elements its
//! size spans. What the caller does not read typed it skips ([`Values::skip`],
//! [`Values::finish`]) with the same checks.
//!
//! Where the two differ, the rules are those of the frame guard the float has always put in
//! front of its decoder (`drawbridge_runtime::frame_guard::Scanner`), so that a message is
//! accepted here exactly when it was accepted there:
//! - arrays of lists, maps, arrays or described values are refused: no one sends them, and
//!   the AMQP 1.0 decoders Drawbridge has interoperated with read them otherwise than they are
//!   written;
//! - an empty array has no element constructor;
//! - an array of zero-width elements (null, true, false, uint0, ulong0) has no bytes after its
//!   constructor, and [`Values::skip`] takes any count for it (nothing is read per element;
//!   `Reader::skip` takes one). [`Values::next_value`], which returns the elements one by one,
//!   takes at most one per byte of the array's size: a count beyond it is a lie that would
//!   cost the reader, not the peer.
//!
//! Typed data is checked when [`Values::next_value`] returns it: strings and symbols are
//! UTF-8, a `char` is a Unicode scalar value, a `boolean` octet is 0 or 1. Skipped values are
//! checked for structure only.

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

use crate::codec::{code, fixed_width, DecodeError, Limits};

/// The deepest nesting a [`Values`] reader tracks, whatever [`Limits::max_depth`] says: its
/// stack is inline (no allocation per message).
pub const MAX_STACK: usize = 64;

/// One value as [`Values::next_value`] reads it: a primitive with its data, or the header of a
/// compound or described value whose parts are the next values read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// `null` (0x40).
    Null,
    /// `boolean` (0x41, 0x42, 0x56).
    Bool(bool),
    /// `ubyte` (0x50).
    Ubyte(u8),
    /// `ushort` (0x60).
    Ushort(u16),
    /// `uint` (0x70, 0x52, 0x43).
    Uint(u32),
    /// `ulong` (0x80, 0x53, 0x44).
    Ulong(u64),
    /// `byte` (0x51).
    Byte(i8),
    /// `short` (0x61).
    Short(i16),
    /// `int` (0x71, 0x54).
    Int(i32),
    /// `long` (0x81, 0x55).
    Long(i64),
    /// `float` (0x72), bit for bit.
    Float(f32),
    /// `double` (0x82), bit for bit.
    Double(f64),
    /// `decimal32` (0x74), as encoded.
    Decimal32(&'a [u8; 4]),
    /// `decimal64` (0x84), as encoded.
    Decimal64(&'a [u8; 8]),
    /// `decimal128` (0x94), as encoded.
    Decimal128(&'a [u8; 16]),
    /// `char` (0x73).
    Char(char),
    /// `timestamp` (0x83): milliseconds since the Unix epoch.
    Timestamp(i64),
    /// `uuid` (0x98).
    Uuid(&'a [u8; 16]),
    /// `binary` (0xa0, 0xb0).
    Binary(&'a [u8]),
    /// `string` (0xa1, 0xb1).
    String(&'a str),
    /// `symbol` (0xa3, 0xb3): UTF-8 checked (AMQP says ASCII).
    Symbol(&'a str),
    /// A list (0x45, 0xc0, 0xd0) of `count` elements, the next values read.
    List {
        /// Elements.
        count: u32,
    },
    /// A map (0xc1, 0xd1) of `count` keys and values (an even number), alternating.
    Map {
        /// Keys and values.
        count: u32,
    },
    /// An array (0xe0, 0xf0) of `count` elements, all under constructor `element` (0 when
    /// empty).
    Array {
        /// Elements.
        count: u32,
        /// Their constructor.
        element: u8,
    },
    /// A described value (0x00): its descriptor, then the value, are the next two values.
    Described,
}

impl ValueRef<'_> {
    /// How many values that follow belong to this one (elements, or descriptor and value).
    pub fn parts(&self) -> u64 {
        match *self {
            ValueRef::List { count } | ValueRef::Map { count } | ValueRef::Array { count, .. } => {
                u64::from(count)
            }
            ValueRef::Described => 2,
            _ => 0,
        }
    }
}

/// A container being read.
#[derive(Debug, Clone, Copy)]
enum Open {
    /// A list, map or array ending at buffer offset `end`, with `left` elements to come; an
    /// array's elements are under constructor `element` (0 for lists and maps).
    Sized { end: usize, element: u8, left: u32 },
    /// A described value: `left` of its two parts to come.
    Described { left: u8 },
}

/// A pull reader of encoded values (module documentation).
#[derive(Clone)]
pub struct Values<'a> {
    buf: &'a [u8],
    pos: usize,
    stack: [Open; MAX_STACK],
    depth: usize,
    max_depth: usize,
    /// Where the innermost open list, map or array ends (the buffer's end at the top level).
    limit: usize,
}

impl std::fmt::Debug for Values<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Values")
            .field("len", &self.buf.len())
            .field("pos", &self.pos)
            .field("depth", &self.depth)
            .finish()
    }
}

/// A fixed-width value's data (exactly `N` bytes, as its constructor's width says).
fn data<const N: usize>(d: &[u8]) -> [u8; N] {
    <[u8; N]>::try_from(d).unwrap_or([0; N])
}

/// A fixed-width value's data, borrowed.
fn bytes<const N: usize>(d: &[u8]) -> Result<&[u8; N], DecodeError> {
    <&[u8; N]>::try_from(d).map_err(|_| DecodeError::Truncated)
}

/// Whether `c` is an array's element constructor that this reader takes (module
/// documentation): a primitive one.
fn primitive(c: u8) -> Result<(), DecodeError> {
    match c {
        code::DESCRIBED
        | code::LIST0
        | code::LIST8
        | code::MAP8
        | code::LIST32
        | code::MAP32
        | code::ARRAY8
        | code::ARRAY32 => Err(DecodeError::Type {
            field: "array element",
            expected: "a primitive constructor",
            found: c,
        }),
        c => fixed_width(c).map(|_| ()),
    }
}

impl<'a> Values<'a> {
    /// A reader of the values in `buf`, nesting at most `limits.max_depth` (and at most
    /// [`MAX_STACK`]) levels deep.
    pub fn new(buf: &'a [u8], limits: Limits) -> Self {
        Values {
            buf,
            pos: 0,
            stack: [Open::Described { left: 0 }; MAX_STACK],
            depth: 0,
            max_depth: limits.max_depth.min(MAX_STACK),
            limit: buf.len(),
        }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Containers open (lists, maps, arrays, described values being read).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The bytes not read yet (within and after every open container).
    pub fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Whether every value has been read: the buffer is consumed and no container is open.
    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len() && self.depth == 0
    }

    fn top(&self) -> Option<&Open> {
        self.depth.checked_sub(1).and_then(|i| self.stack.get(i))
    }

    /// The array element constructor the next value is under, if it is an array's element.
    fn implied(&self) -> Option<u8> {
        match self.top() {
            Some(Open::Sized { element, .. }) if *element != 0 => Some(*element),
            _ => None,
        }
    }

    /// The next value's constructor, not consumed: an array's element constructor for its
    /// elements, else the next byte. `None` at the end of the buffer.
    pub fn peek(&self) -> Option<u8> {
        self.implied().or_else(|| self.buf.get(self.pos).copied())
    }

    /// Where the innermost open list, map or array ends (the buffer's end at the top level).
    fn limit(&self) -> usize {
        self.limit
    }

    /// Closes the innermost container.
    fn pop(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        self.limit = self
            .stack
            .get(..self.depth)
            .unwrap_or_default()
            .iter()
            .rev()
            .find_map(|o| match o {
                Open::Sized { end, .. } => Some(*end),
                Open::Described { .. } => None,
            })
            .unwrap_or(self.buf.len());
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::BadSize)?;
        if end > self.limit() {
            return Err(if end > self.buf.len() {
                DecodeError::Truncated
            } else {
                DecodeError::BadSize
            });
        }
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn push(&mut self, open: Open) -> Result<(), DecodeError> {
        if self.depth >= self.max_depth {
            return Err(DecodeError::TooDeep(self.max_depth));
        }
        let slot = self
            .stack
            .get_mut(self.depth)
            .ok_or(DecodeError::TooDeep(self.max_depth))?;
        *slot = open;
        self.depth += 1;
        if let Open::Sized { end, .. } = open {
            self.limit = end;
        }
        Ok(())
    }

    /// A value just ended: count it in its container, and close every container it completes.
    fn complete(&mut self) -> Result<(), DecodeError> {
        loop {
            let pos = self.pos;
            let Some(i) = self.depth.checked_sub(1) else {
                return Ok(());
            };
            let Some(top) = self.stack.get_mut(i) else {
                return Ok(());
            };
            match top {
                Open::Described { left } => {
                    *left = left.saturating_sub(1);
                    if *left > 0 {
                        return Ok(());
                    }
                }
                Open::Sized { end, left, element } => {
                    *left = left.checked_sub(1).ok_or(DecodeError::BadSize)?;
                    if *left > 0 {
                        // More elements to come: bytes for them, unless they take none.
                        let zero_width = *element != 0 && fixed_width(*element)? == Some(0);
                        return if pos < *end || zero_width {
                            Ok(())
                        } else {
                            Err(DecodeError::BadSize)
                        };
                    }
                    // The count's last element: it must end the container.
                    if pos != *end {
                        return Err(DecodeError::BadSize);
                    }
                }
            }
            self.pop();
        }
    }

    /// The next value: a primitive with its data, or a header whose parts are the next
    /// values. `None` when the buffer is consumed and no container is open.
    pub fn next_value(&mut self) -> Result<Option<ValueRef<'a>>, DecodeError> {
        self.read(true)
    }

    /// Skips one value whole (its parts included), checking its structure only.
    pub fn skip(&mut self) -> Result<(), DecodeError> {
        let outer = self.depth;
        if self.read(false)?.is_none() {
            return Err(DecodeError::Truncated);
        }
        while self.depth > outer {
            if !self.close_zero_width()? {
                self.read(false)?;
            }
        }
        Ok(())
    }

    /// Skips everything left, checking its structure: `Ok` only if the buffer ends between
    /// top-level values.
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        loop {
            if self.close_zero_width()? {
                continue;
            }
            if self.pos >= self.buf.len() {
                return if self.depth == 0 {
                    Ok(())
                } else {
                    Err(DecodeError::Truncated)
                };
            }
            self.read(false)?;
        }
    }

    /// If the innermost container is an array of zero-width elements, closes it whole (its
    /// elements have no bytes to read).
    fn close_zero_width(&mut self) -> Result<bool, DecodeError> {
        match self.top() {
            Some(Open::Sized { element, .. })
                if *element != 0 && fixed_width(*element)? == Some(0) =>
            {
                self.pop();
                self.complete()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Reads one value's constructor and data (a compound's header), with the typed checks
    /// when `typed`.
    fn read(&mut self, typed: bool) -> Result<Option<ValueRef<'a>>, DecodeError> {
        let c = match self.implied() {
            Some(c) => c,
            None => {
                if self.pos >= self.buf.len() {
                    return if self.depth == 0 {
                        Ok(None)
                    } else {
                        Err(DecodeError::Truncated)
                    };
                }
                if self.pos >= self.limit() {
                    return Err(DecodeError::BadSize);
                }
                self.u8()?
            }
        };
        let v = match c {
            code::DESCRIBED => {
                self.push(Open::Described { left: 2 })?;
                return Ok(Some(ValueRef::Described));
            }
            code::VBIN8 | code::STR8 | code::SYM8 | code::VBIN32 | code::STR32 | code::SYM32 => {
                let n = if matches!(c, code::VBIN8 | code::STR8 | code::SYM8) {
                    usize::from(self.u8()?)
                } else {
                    self.u32()? as usize
                };
                let data = self.take(n)?;
                match c {
                    code::VBIN8 | code::VBIN32 => ValueRef::Binary(data),
                    _ if !typed => ValueRef::Binary(data),
                    code::STR8 | code::STR32 => ValueRef::String(
                        std::str::from_utf8(data).map_err(|_| DecodeError::Utf8("string"))?,
                    ),
                    _ => ValueRef::Symbol(
                        std::str::from_utf8(data).map_err(|_| DecodeError::Utf8("symbol"))?,
                    ),
                }
            }
            code::LIST8
            | code::MAP8
            | code::LIST32
            | code::MAP32
            | code::ARRAY8
            | code::ARRAY32 => return self.compound(c, typed).map(Some),
            c => self.fixed(c, typed)?,
        };
        self.complete()?;
        Ok(Some(v))
    }

    #[inline(always)]
    fn fixed(&mut self, c: u8, typed: bool) -> Result<ValueRef<'a>, DecodeError> {
        let w = fixed_width(c)?.ok_or(DecodeError::BadConstructor(c))?;
        let d = self.take(w)?;
        let b0 = d.first().copied().unwrap_or(0);
        Ok(match c {
            code::NULL => ValueRef::Null,
            code::TRUE => ValueRef::Bool(true),
            code::FALSE => ValueRef::Bool(false),
            code::UINT0 => ValueRef::Uint(0),
            code::ULONG0 => ValueRef::Ulong(0),
            // Zero-width: no level of nesting (as for the frame guard and `Reader::skip`).
            code::LIST0 => ValueRef::List { count: 0 },
            code::UBYTE => ValueRef::Ubyte(b0),
            0x51 => ValueRef::Byte(i8::from_be_bytes([b0])),
            code::SMALLUINT => ValueRef::Uint(u32::from(b0)),
            code::SMALLULONG => ValueRef::Ulong(u64::from(b0)),
            0x54 => ValueRef::Int(i32::from(i8::from_be_bytes([b0]))),
            0x55 => ValueRef::Long(i64::from(i8::from_be_bytes([b0]))),
            code::BOOLEAN => match b0 {
                0 => ValueRef::Bool(false),
                1 => ValueRef::Bool(true),
                _ if typed => {
                    return Err(DecodeError::Type {
                        field: "boolean",
                        expected: "octet 0x00 or 0x01",
                        found: c,
                    })
                }
                _ => ValueRef::Bool(true),
            },
            code::USHORT => ValueRef::Ushort(u16::from_be_bytes(data(d))),
            0x61 => ValueRef::Short(i16::from_be_bytes(data(d))),
            code::UINT => ValueRef::Uint(u32::from_be_bytes(data(d))),
            0x71 => ValueRef::Int(i32::from_be_bytes(data(d))),
            0x72 => ValueRef::Float(f32::from_be_bytes(data(d))),
            0x73 => match char::from_u32(u32::from_be_bytes(data(d))) {
                Some(ch) => ValueRef::Char(ch),
                None if typed => {
                    return Err(DecodeError::Type {
                        field: "char",
                        expected: "a Unicode scalar value",
                        found: c,
                    })
                }
                None => ValueRef::Char(char::REPLACEMENT_CHARACTER),
            },
            0x74 => ValueRef::Decimal32(bytes(d)?),
            code::ULONG => ValueRef::Ulong(u64::from_be_bytes(data(d))),
            0x81 => ValueRef::Long(i64::from_be_bytes(data(d))),
            0x82 => ValueRef::Double(f64::from_be_bytes(data(d))),
            code::TIMESTAMP => ValueRef::Timestamp(i64::from_be_bytes(data(d))),
            0x84 => ValueRef::Decimal64(bytes(d)?),
            0x94 => ValueRef::Decimal128(bytes(d)?),
            0x98 => ValueRef::Uuid(bytes(d)?),
            c => return Err(DecodeError::BadConstructor(c)),
        })
    }

    /// A list, map or array header (constructor `c` read).
    fn compound(&mut self, c: u8, typed: bool) -> Result<ValueRef<'a>, DecodeError> {
        let wide = matches!(c, code::LIST32 | code::MAP32 | code::ARRAY32);
        let width = if wide { 4 } else { 1 };
        let size = if wide {
            self.u32()? as usize
        } else {
            usize::from(self.u8()?)
        };
        // The size counts the count field (and an array's element constructor).
        if size < width {
            return Err(DecodeError::BadSize);
        }
        let end = self.pos.checked_add(size).ok_or(DecodeError::BadSize)?;
        if end > self.limit() {
            return Err(if end > self.buf.len() {
                DecodeError::Truncated
            } else {
                DecodeError::BadSize
            });
        }
        let count = if wide {
            self.u32()?
        } else {
            u32::from(self.u8()?)
        };
        let is_array = matches!(c, code::ARRAY8 | code::ARRAY32);
        if matches!(c, code::MAP8 | code::MAP32) && count % 2 != 0 {
            return Err(DecodeError::BadSize);
        }
        if is_array && count > 0 {
            if self.pos == end {
                return Err(DecodeError::BadSize);
            }
            let e = self.u8()?;
            primitive(e)?;
            if fixed_width(e)? == Some(0) {
                // No bytes per element: none may follow.
                if self.pos != end {
                    return Err(DecodeError::BadSize);
                }
                if typed && count as usize > size {
                    return Err(DecodeError::BadSize);
                }
                if !typed {
                    // Skipped whole: open and close at once (the depth still counts).
                    self.push(Open::Sized {
                        end,
                        element: 0,
                        left: 0,
                    })?;
                    self.pop();
                    self.complete()?;
                    return Ok(ValueRef::Array { count, element: e });
                }
            }
            self.push(Open::Sized {
                end,
                element: e,
                left: count,
            })?;
            if self.pos == end && fixed_width(e)? != Some(0) {
                return Err(DecodeError::BadSize);
            }
            return Ok(ValueRef::Array { count, element: e });
        }
        self.push(Open::Sized {
            end,
            element: 0,
            left: count,
        })?;
        let v = match c {
            code::LIST8 | code::LIST32 => ValueRef::List { count },
            code::MAP8 | code::MAP32 => ValueRef::Map { count },
            _ => ValueRef::Array { count, element: 0 },
        };
        if count == 0 {
            // Empty: nothing may follow within it (an empty array has no constructor).
            if self.pos != end {
                return Err(DecodeError::BadSize);
            }
            self.pop();
            self.complete()?;
        } else if self.pos == end {
            return Err(DecodeError::BadSize);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(bytes: &[u8]) -> Result<Vec<ValueRef<'_>>, DecodeError> {
        let mut v = Values::new(bytes, Limits::DEFAULT);
        let mut out = Vec::new();
        while let Some(x) = v.next_value()? {
            out.push(x);
        }
        assert!(v.at_end());
        Ok(out)
    }

    fn skipped(bytes: &[u8]) -> Result<(), DecodeError> {
        Values::new(bytes, Limits::DEFAULT).finish()
    }

    fn nested_lists(levels: usize) -> Vec<u8> {
        let mut v = vec![code::NULL];
        for _ in 0..levels {
            let mut outer = vec![code::LIST32];
            outer.extend_from_slice(&((v.len() + 4) as u32).to_be_bytes());
            outer.extend_from_slice(&1u32.to_be_bytes());
            outer.extend_from_slice(&v);
            v = outer;
        }
        v
    }

    #[test]
    fn primitives_and_headers_in_order() {
        let bytes = [
            0x00, 0x53, 0x70, // described, descriptor smallulong 0x70
            0xc0, 0x09, 0x03, // list8 of 3
            0x41, 0x50, 0x09, 0x70, 0, 0, 0xea, 0x60, // true, ubyte 9, uint 60000
            0xa1, 2, b'h', b'i', // "hi"
        ];
        assert_eq!(
            all(&bytes).unwrap(),
            [
                ValueRef::Described,
                ValueRef::Ulong(0x70),
                ValueRef::List { count: 3 },
                ValueRef::Bool(true),
                ValueRef::Ubyte(9),
                ValueRef::Uint(60_000),
                ValueRef::String("hi"),
            ]
        );
        assert_eq!(skipped(&bytes), Ok(()));
    }

    #[test]
    fn array_elements_come_under_the_array_constructor() {
        let syms = [0xe0, 7, 2, 0xa3, 2, b'a', b'b', 1, b'c', 0x40];
        assert_eq!(
            all(&syms).unwrap(),
            [
                ValueRef::Array {
                    count: 2,
                    element: 0xa3
                },
                ValueRef::Symbol("ab"),
                ValueRef::Symbol("c"),
                ValueRef::Null,
            ]
        );
        let mut v = Values::new(&syms, Limits::DEFAULT);
        v.next_value().unwrap();
        assert_eq!(v.peek(), Some(0xa3));
        // Two nulls in an array8 of size 2: no bytes per element.
        assert_eq!(
            all(&[0xe0, 2, 2, 0x40]).unwrap(),
            [
                ValueRef::Array {
                    count: 2,
                    element: 0x40
                },
                ValueRef::Null,
                ValueRef::Null
            ]
        );
    }

    #[test]
    fn zero_width_arrays_are_skipped_whole_but_read_only_as_counted() {
        let lie = [0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40];
        assert_eq!(skipped(&lie), Ok(()));
        assert_eq!(all(&lie), Err(DecodeError::BadSize));
        // A byte after zero-width elements is refused either way.
        assert!(skipped(&[0xe0, 3, 5, 0x40, 0x40]).is_err());
    }

    #[test]
    fn nesting_past_the_limit_is_refused_either_way() {
        assert!(all(&nested_lists(MAX_STACK)).is_ok());
        assert_eq!(skipped(&nested_lists(MAX_STACK)), Ok(()));
        assert_eq!(
            all(&nested_lists(MAX_STACK + 1)),
            Err(DecodeError::TooDeep(64))
        );
        assert_eq!(
            skipped(&nested_lists(100_000)),
            Err(DecodeError::TooDeep(64))
        );
        let mut described = [0x00, 0x53, 0x70].repeat(MAX_STACK + 1);
        described.push(0x40);
        assert_eq!(skipped(&described), Err(DecodeError::TooDeep(64)));
        // An empty list at the limit still opens a level.
        let mut v = nested_lists(MAX_STACK);
        let at = v.iter().rposition(|b| *b == code::NULL).unwrap();
        v.splice(at..=at, [0xc0, 1, 0]);
        assert!(skipped(&v).is_err());
    }

    #[test]
    fn sizes_and_counts_must_agree() {
        // Flat to a reader of sizes, 100 levels to one of counts.
        let mut flat = [0xc0, 1, 1].repeat(100);
        flat.push(0x40);
        assert!(skipped(&flat).is_err());
        for bad in [
            &[0xc0, 3, 1, 0x40, 0x40][..],
            &[0xc0, 2, 2, 0x40],
            &[0xc0, 1, 1, 0x40],
            &[0xc1, 3, 1, 0x40, 0x40],
            &[0xc0, 3, 1, 0xc0, 5, 1],
            &[0xc0, 3, 1, 0xa1, 9, b'x'],
            &[0xc0, 0],
            &[0x30],
            &[0xe0, 5, 2, 0x54, 1, 2, 3],
            &[0xe0, 5, 2, 0x60, 0, 1, 2],
            &[0xe0, 1, 1],
            &[0xe0, 2, 0, 0x54],
            &[0xb0, 0xff, 0xff, 0xff, 0xff],
            &[0xc0, 3, 1, 0x00, 0xa0, 5, 1, 2, 3, 4, 5, 0x40],
        ] {
            assert!(skipped(bad).is_err(), "{bad:x?}");
            assert!(all(bad).is_err(), "{bad:x?}");
        }
        assert_eq!(skipped(&[0xc0, 3, 2, 0x40, 0x40]), Ok(()));
        assert_eq!(skipped(&[0xe0, 1, 0]), Ok(()));
        assert_eq!(skipped(&[0xc1, 1, 0]), Ok(()));
    }

    #[test]
    fn arrays_of_compounds_or_described_are_refused() {
        for bad in [
            &[0xe0, 8, 2, 0xc0, 2, 1, 0x45, 2, 1, 0x45][..],
            &[0xe0, 7, 1, 0xe0, 4, 2, 0x54, 1, 2],
            &[0x00, 0x53, 0x77, 0xe0, 2, 2, 0x45],
            &[0xe0, 4, 1, 0x00, 0x53, 0x70],
        ] {
            assert!(skipped(bad).is_err(), "{bad:x?}");
            assert!(all(bad).is_err(), "{bad:x?}");
        }
    }

    #[test]
    fn typed_data_is_checked_when_read() {
        for bad in [
            &[0xa1, 1, 0xff][..],
            &[0xa3, 1, 0xff],
            &[0x73, 0, 0, 0xd8, 0],
            &[0x56, 2],
        ] {
            assert!(all(bad).is_err(), "{bad:x?}");
            assert_eq!(skipped(bad), Ok(()), "{bad:x?}");
        }
        assert_eq!(all(&[0x73, 0, 0, 0, 0x41]).unwrap(), [ValueRef::Char('A')]);
    }

    #[test]
    fn skip_takes_one_value_and_its_parts() {
        let bytes = [0xc0, 3, 2, 0x41, 0x45, 0x52, 7];
        let mut v = Values::new(&bytes, Limits::DEFAULT);
        assert_eq!(v.next_value().unwrap(), Some(ValueRef::List { count: 2 }));
        v.skip().unwrap();
        assert_eq!(v.depth(), 1);
        v.skip().unwrap();
        assert_eq!(v.depth(), 0);
        assert_eq!(v.next_value().unwrap(), Some(ValueRef::Uint(7)));
        assert_eq!(v.next_value().unwrap(), None);
    }
}
