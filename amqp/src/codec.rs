//! The AMQP 1.0 type system (part 1 of the specification): one decoder that enforces the
//! limits while it decodes, and the encoder the engine writes frames with.
//!
//! The decoder never builds a tree of values. Performatives are decoded field by field into
//! typed structs ([`crate::performatives`]); every field the engine does not interpret (link
//! and connection `properties`, an error's `info`, a source's `filter`, a rejected
//! disposition's error, message sections) is *validated* by [`Reader::skip`] and kept as the
//! bytes the peer sent ([`Raw`]). Validation walks the value once, with the depth bounded by
//! [`Limits::max_depth`] (the walk recurses, one small stack frame per level, so the bound is
//! what keeps a peer's nesting off the stack), every size checked against what is left of
//! its container before anything is read or allocated, and every list, map and array holding
//! exactly the count of elements its size spans. Nothing a peer sends is decoded twice.

use bytes::{BufMut, Bytes};

/// Why bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The value runs past the end of its frame or container.
    #[error("value truncated")]
    Truncated,
    /// Values nest deeper than the limit.
    #[error("encoded values nest deeper than {0} levels")]
    TooDeep(usize),
    /// A byte that is no AMQP 1.0 format code.
    #[error("invalid AMQP format code 0x{0:02x}")]
    BadConstructor(u8),
    /// A size or count that cannot be right.
    #[error("a value's size or count does not fit its container")]
    BadSize,
    /// A value of another type than the field takes.
    #[error("{field}: expected {expected}, found format code 0x{found:02x}")]
    Type {
        /// The field being decoded.
        field: &'static str,
        /// What it takes.
        expected: &'static str,
        /// The format code found.
        found: u8,
    },
    /// A mandatory field is null or missing.
    #[error("mandatory field {0} is missing")]
    Missing(&'static str),
    /// A string that is not UTF-8.
    #[error("{0}: not UTF-8")]
    Utf8(&'static str),
    /// A string or binary longer than the field allows.
    #[error("{field}: {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A described type the position does not take.
    #[error("unexpected descriptor {0:#x}")]
    Descriptor(u64),
}

/// What a peer's encoded values may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of lists, maps, arrays and described values.
    pub max_depth: usize,
    /// Longest string, symbol or binary in a performative's typed fields (container ids,
    /// link names, addresses, conditions, descriptions). Raw fields are bounded by the frame.
    pub max_string: usize,
}

impl Limits {
    /// What both daemons take: a legitimate message nests a few levels (the bridge refuses
    /// header values deeper than 16), names and addresses are short.
    pub const DEFAULT: Limits = Limits {
        max_depth: 64,
        max_string: 64 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// An encoded value kept as the peer's bytes (constructor included), validated by
/// [`Reader::skip`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Raw(pub Bytes);

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw({} bytes)", self.0.len())
    }
}

pub(crate) mod code {
    pub const DESCRIBED: u8 = 0x00;
    pub const NULL: u8 = 0x40;
    pub const TRUE: u8 = 0x41;
    pub const FALSE: u8 = 0x42;
    pub const UINT0: u8 = 0x43;
    pub const ULONG0: u8 = 0x44;
    pub const LIST0: u8 = 0x45;
    pub const UBYTE: u8 = 0x50;
    pub const SMALLUINT: u8 = 0x52;
    pub const SMALLULONG: u8 = 0x53;
    pub const BOOLEAN: u8 = 0x56;
    pub const USHORT: u8 = 0x60;
    pub const UINT: u8 = 0x70;
    pub const ULONG: u8 = 0x80;
    pub const TIMESTAMP: u8 = 0x83;
    pub const VBIN8: u8 = 0xa0;
    pub const STR8: u8 = 0xa1;
    pub const SYM8: u8 = 0xa3;
    pub const VBIN32: u8 = 0xb0;
    pub const STR32: u8 = 0xb1;
    pub const SYM32: u8 = 0xb3;
    pub const LIST8: u8 = 0xc0;
    pub const MAP8: u8 = 0xc1;
    pub const LIST32: u8 = 0xd0;
    pub const MAP32: u8 = 0xd1;
    pub const ARRAY8: u8 = 0xe0;
    pub const ARRAY32: u8 = 0xf0;
}

/// The width of a fixed-width value's data, `None` for variable-width and compound codes,
/// an error for codes that are no AMQP 1.0 format code.
pub(crate) fn fixed_width(c: u8) -> Result<Option<usize>, DecodeError> {
    Ok(Some(match c {
        0x40..=0x45 => 0,
        0x50..=0x56 => 1,
        0x60 | 0x61 => 2,
        0x70..=0x74 => 4,
        0x80..=0x84 => 8,
        0x94 | 0x98 => 16,
        0xa0 | 0xa1 | 0xa3 | 0xb0 | 0xb1 | 0xb3 | 0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0 => {
            return Ok(None)
        }
        c => return Err(DecodeError::BadConstructor(c)),
    }))
}

/// A cursor over encoded values in one frame.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: Limits,
}

impl<'a> Reader<'a> {
    /// A reader of `buf`.
    pub fn new(buf: &'a [u8], limits: Limits) -> Self {
        Reader {
            buf,
            pos: 0,
            limits,
        }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// The next constructor byte, not consumed.
    pub fn peek(&self) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated)
    }

    /// Skips one value (constructor included), validating it: depth, sizes, counts, format
    /// codes. Returns the skipped bytes.
    pub fn skip(&mut self) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        let c = self.u8()?;
        self.skip_body(c, 0)?;
        Ok(&self.buf[start..self.pos])
    }

    fn skip_body(&mut self, c: u8, depth: usize) -> Result<(), DecodeError> {
        if c == code::DESCRIBED {
            let depth = self.deeper(depth)?;
            let d = self.u8()?;
            self.skip_body(d, depth)?;
            let v = self.u8()?;
            return self.skip_body(v, depth);
        }
        if let Some(w) = fixed_width(c)? {
            self.take(w)?;
            return Ok(());
        }
        match c {
            code::VBIN8 | code::STR8 | code::SYM8 => {
                let n = self.u8()? as usize;
                self.take(n)?;
            }
            code::VBIN32 | code::STR32 | code::SYM32 => {
                let n = self.be(4)? as usize;
                self.take(n)?;
            }
            code::LIST8 | code::MAP8 | code::LIST32 | code::MAP32 => {
                let depth = self.deeper(depth)?;
                let (end, count) = self.compound_header(c)?;
                if matches!(c, code::MAP8 | code::MAP32) && count % 2 != 0 {
                    return Err(DecodeError::BadSize);
                }
                // The elements are read within the container: none may run past its end.
                let outer = self.buf;
                self.buf = &outer[..end];
                for _ in 0..count {
                    if self.pos >= end {
                        return Err(DecodeError::BadSize);
                    }
                    let e = self.u8()?;
                    self.skip_body(e, depth)?;
                }
                self.buf = outer;
                if self.pos != end {
                    return Err(DecodeError::BadSize);
                }
            }
            code::ARRAY8 | code::ARRAY32 => {
                let depth = self.deeper(depth)?;
                let (end, count) = self.compound_header(c)?;
                let outer = self.buf;
                self.buf = &outer[..end];
                if count > 0 {
                    let mut e = self.u8()?;
                    if e == code::DESCRIBED {
                        // The descriptor once, then the elements' bodies under its constructor.
                        let d = self.u8()?;
                        self.skip_body(d, depth)?;
                        e = self.u8()?;
                    }
                    // Zero-width elements take no bytes: a count beyond the size is a lie
                    // that costs nothing to read but would cost a decoder that allocates.
                    if fixed_width(e)? == Some(0) && count as usize > end - self.pos + 1 {
                        return Err(DecodeError::BadSize);
                    }
                    for _ in 0..count {
                        self.skip_body(e, depth)?;
                    }
                }
                self.buf = outer;
                if self.pos != end {
                    return Err(DecodeError::BadSize);
                }
            }
            c => return Err(DecodeError::BadConstructor(c)),
        }
        Ok(())
    }

    fn deeper(&self, depth: usize) -> Result<usize, DecodeError> {
        if depth + 1 > self.limits.max_depth {
            Err(DecodeError::TooDeep(self.limits.max_depth))
        } else {
            Ok(depth + 1)
        }
    }

    /// Reads a list, map or array's size and count (constructor already read); returns the
    /// end offset and the count. The count must fit the size: at least one byte per
    /// element except an array's zero-width elements, which are checked by the caller.
    fn compound_header(&mut self, c: u8) -> Result<(usize, u32), DecodeError> {
        let width = if matches!(c, code::LIST8 | code::MAP8 | code::ARRAY8) {
            1
        } else {
            4
        };
        let size = self.be(width)? as usize;
        if size < width || size > self.remaining() {
            return Err(DecodeError::BadSize);
        }
        let end = self.pos + size;
        let count = self.be(width)? as u32;
        let is_array = matches!(c, code::ARRAY8 | code::ARRAY32);
        if !is_array && count as usize > end - self.pos {
            return Err(DecodeError::BadSize);
        }
        Ok((end, count))
    }

    /// Reads a described type's descriptor (`0x00` then a ulong or a symbol) and returns its
    /// numeric code; symbolic descriptors are mapped by the caller's table, unknown ones are
    /// refused.
    pub fn descriptor(&mut self) -> Result<u64, DecodeError> {
        let c = self.u8()?;
        if c != code::DESCRIBED {
            return Err(DecodeError::Type {
                field: "descriptor",
                expected: "described type",
                found: c,
            });
        }
        let d = self.u8()?;
        match d {
            code::SMALLULONG => Ok(u64::from(self.u8()?)),
            code::ULONG => self.be(8),
            code::ULONG0 => Ok(0),
            code::SYM8 | code::SYM32 => {
                let n = if d == code::SYM8 {
                    self.u8()? as usize
                } else {
                    self.be(4)? as usize
                };
                let name = self.take(n)?;
                symbolic_descriptor(name).ok_or(DecodeError::Descriptor(u64::MAX))
            }
            other => Err(DecodeError::Type {
                field: "descriptor",
                expected: "ulong or symbol",
                found: other,
            }),
        }
    }

    /// Enters a described list (descriptor already read): returns a reader of its fields.
    pub fn fields(&mut self) -> Result<Fields<'a>, DecodeError> {
        let c = self.u8()?;
        match c {
            code::LIST0 => Ok(Fields {
                r: Reader {
                    buf: &self.buf[..self.pos],
                    pos: self.pos,
                    limits: self.limits,
                },
                left: 0,
            }),
            code::LIST8 | code::LIST32 => {
                let (end, count) = self.compound_header(c)?;
                let inner = Reader {
                    buf: &self.buf[..end],
                    pos: self.pos,
                    limits: self.limits,
                };
                self.pos = end;
                Ok(Fields {
                    r: inner,
                    left: count,
                })
            }
            other => Err(DecodeError::Type {
                field: "performative",
                expected: "list",
                found: other,
            }),
        }
    }
}

/// The `amqp:...:list` names of the descriptors the engine knows.
fn symbolic_descriptor(name: &[u8]) -> Option<u64> {
    const NAMES: &[(&[u8], u64)] = &[
        (b"amqp:open:list", 0x10),
        (b"amqp:begin:list", 0x11),
        (b"amqp:attach:list", 0x12),
        (b"amqp:flow:list", 0x13),
        (b"amqp:transfer:list", 0x14),
        (b"amqp:disposition:list", 0x15),
        (b"amqp:detach:list", 0x16),
        (b"amqp:end:list", 0x17),
        (b"amqp:close:list", 0x18),
        (b"amqp:error:list", 0x1d),
        (b"amqp:received:list", 0x23),
        (b"amqp:accepted:list", 0x24),
        (b"amqp:rejected:list", 0x25),
        (b"amqp:released:list", 0x26),
        (b"amqp:modified:list", 0x27),
        (b"amqp:source:list", 0x28),
        (b"amqp:target:list", 0x29),
        (b"amqp:sasl-mechanisms:list", 0x40),
        (b"amqp:sasl-init:list", 0x41),
        (b"amqp:sasl-challenge:list", 0x42),
        (b"amqp:sasl-response:list", 0x43),
        (b"amqp:sasl-outcome:list", 0x44),
    ];
    NAMES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// The fields of a described list, read in order; fields past the count read as null.
#[derive(Debug)]
pub struct Fields<'a> {
    r: Reader<'a>,
    left: u32,
}

impl<'a> Fields<'a> {
    /// The next field's constructor, or `None` when it is null or past the count (the field
    /// is then consumed).
    fn next_code(&mut self) -> Result<Option<u8>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let c = self.r.u8()?;
        Ok(if c == code::NULL { None } else { Some(c) })
    }

    /// Validates every field left and that the list holds exactly its count.
    pub fn finish(mut self) -> Result<(), DecodeError> {
        while self.left > 0 {
            self.left -= 1;
            self.r.skip()?;
        }
        if self.r.remaining() != 0 {
            return Err(DecodeError::BadSize);
        }
        Ok(())
    }

    /// A `uint` field (also `milliseconds`, `sequence-no`, `handle`, `delivery-number`).
    pub fn uint(&mut self, field: &'static str) -> Result<Option<u32>, DecodeError> {
        match self.next_code()? {
            None => Ok(None),
            Some(code::UINT0) => Ok(Some(0)),
            Some(code::SMALLUINT) => Ok(Some(u32::from(self.r.u8()?))),
            Some(code::UINT) => Ok(Some(self.r.be(4)? as u32)),
            Some(found) => Err(DecodeError::Type {
                field,
                expected: "uint",
                found,
            }),
        }
    }

    /// A `ushort` field.
    pub fn ushort(&mut self, field: &'static str) -> Result<Option<u16>, DecodeError> {
        match self.next_code()? {
            None => Ok(None),
            Some(code::USHORT) => Ok(Some(self.r.be(2)? as u16)),
            Some(found) => Err(DecodeError::Type {
                field,
                expected: "ushort",
                found,
            }),
        }
    }

    /// A `ubyte` field.
    pub fn ubyte(&mut self, field: &'static str) -> Result<Option<u8>, DecodeError> {
        match self.next_code()? {
            None => Ok(None),
            Some(code::UBYTE) => Ok(Some(self.r.u8()?)),
            Some(found) => Err(DecodeError::Type {
                field,
                expected: "ubyte",
                found,
            }),
        }
    }

    /// A `ulong` field.
    pub fn ulong(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.next_code()? {
            None => Ok(None),
            Some(code::ULONG0) => Ok(Some(0)),
            Some(code::SMALLULONG) => Ok(Some(u64::from(self.r.u8()?))),
            Some(code::ULONG) => Ok(Some(self.r.be(8)?)),
            Some(found) => Err(DecodeError::Type {
                field,
                expected: "ulong",
                found,
            }),
        }
    }

    /// A `boolean` field.
    pub fn boolean(&mut self, field: &'static str) -> Result<Option<bool>, DecodeError> {
        match self.next_code()? {
            None => Ok(None),
            Some(code::TRUE) => Ok(Some(true)),
            Some(code::FALSE) => Ok(Some(false)),
            Some(code::BOOLEAN) => match self.r.u8()? {
                0 => Ok(Some(false)),
                1 => Ok(Some(true)),
                _ => Err(DecodeError::BadSize),
            },
            Some(found) => Err(DecodeError::Type {
                field,
                expected: "boolean",
                found,
            }),
        }
    }

    fn variable(
        &mut self,
        field: &'static str,
        codes: (u8, u8),
        expected: &'static str,
    ) -> Result<Option<&'a [u8]>, DecodeError> {
        self.variable_within(field, codes, expected, self.r.limits.max_string)
    }

    fn variable_within(
        &mut self,
        field: &'static str,
        codes: (u8, u8),
        expected: &'static str,
        max: usize,
    ) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.next_code()? {
            None => Ok(None),
            Some(c) if c == codes.0 || c == codes.1 => {
                let n = if c == codes.0 {
                    self.r.u8()? as usize
                } else {
                    self.r.be(4)? as usize
                };
                if n > max {
                    return Err(DecodeError::TooLong { field, len: n, max });
                }
                Ok(Some(self.r.take(n)?))
            }
            Some(found) => Err(DecodeError::Type {
                field,
                expected,
                found,
            }),
        }
    }

    /// A `string` field.
    pub fn string(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        self.variable(field, (code::STR8, code::STR32), "string")?
            .map(|b| {
                std::str::from_utf8(b)
                    .map(str::to_owned)
                    .map_err(|_| DecodeError::Utf8(field))
            })
            .transpose()
    }

    /// A `string` field of free text, e.g. an error's description: any length the frame
    /// holds (the frame size bounds it), kept to [`Limits::max_string`] bytes, cut on a
    /// character boundary and marked with `…`. A peer's long explanation costs it its
    /// tail, not the connection: refusing it would make a float that rejects with 200 KB of
    /// text recycle the link for ever.
    pub fn text(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        let max = self.r.limits.max_string;
        let Some(b) =
            self.variable_within(field, (code::STR8, code::STR32), "string", usize::MAX)?
        else {
            return Ok(None);
        };
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::Utf8(field))?;
        if s.len() <= max {
            return Ok(Some(s.to_owned()));
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Ok(Some(format!("{}…", &s[..end])))
    }

    /// A `symbol` field (ASCII; kept as bytes).
    pub fn symbol(&mut self, field: &'static str) -> Result<Option<Bytes>, DecodeError> {
        Ok(self
            .variable(field, (code::SYM8, code::SYM32), "symbol")?
            .map(Bytes::copy_from_slice))
    }

    /// A `binary` field.
    pub fn binary(&mut self, field: &'static str) -> Result<Option<&'a [u8]>, DecodeError> {
        self.variable(field, (code::VBIN8, code::VBIN32), "binary")
    }

    /// Any field, validated and kept as bytes (`None` when null).
    pub fn raw(&mut self) -> Result<Option<Raw>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        if self.r.peek()? == code::NULL {
            self.r.u8()?;
            return Ok(None);
        }
        Ok(Some(Raw(Bytes::copy_from_slice(self.r.skip()?))))
    }

    /// A described field (e.g. a delivery state, a source, an error): its descriptor code and a
    /// reader of its list of fields; `None` when null.
    pub fn described(&mut self) -> Result<Option<(u64, Fields<'a>)>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        if self.r.peek()? == code::NULL {
            self.r.u8()?;
            return Ok(None);
        }
        let d = self.r.descriptor()?;
        let f = self.r.fields()?;
        Ok(Some((d, f)))
    }

    /// Skips a field, validating it.
    pub fn skip(&mut self) -> Result<(), DecodeError> {
        if self.left > 0 {
            self.left -= 1;
            self.r.skip()?;
        }
        Ok(())
    }
}

/// Writes AMQP 1.0 values. Lists are written with 32-bit sizes and back-patched, so a frame
/// is encoded in one pass without a size pass over its fields.
#[derive(Debug)]
pub struct Writer<'b, B: BufMut + AsMut<[u8]> + ?Sized> {
    buf: &'b mut B,
}

/// A list being written: where its size and count go.
#[derive(Debug, Clone, Copy)]
#[must_use = "a list must be ended"]
pub struct ListMark {
    at: usize,
    count: u32,
    /// Length of the buffer after the last non-null field (trailing nulls are dropped).
    last_set: usize,
    last_count: u32,
}

/// A growable buffer the writer can back-patch.
pub trait Buf: BufMut + AsMut<[u8]> {
    /// Bytes written.
    fn len_written(&self) -> usize;
    /// Cut back to `len`.
    fn truncate_to(&mut self, len: usize);
}

impl Buf for Vec<u8> {
    fn len_written(&self) -> usize {
        self.len()
    }
    fn truncate_to(&mut self, len: usize) {
        self.truncate(len)
    }
}

impl Buf for bytes::BytesMut {
    fn len_written(&self) -> usize {
        self.len()
    }
    fn truncate_to(&mut self, len: usize) {
        self.truncate(len)
    }
}

impl<'b, B: Buf> Writer<'b, B> {
    /// A writer appending to `buf`.
    pub fn new(buf: &'b mut B) -> Self {
        Writer { buf }
    }

    /// Starts a described list with a small-ulong descriptor.
    pub fn begin_described_list(&mut self, descriptor: u64) -> ListMark {
        self.buf.put_u8(code::DESCRIBED);
        self.ulong_value(descriptor);
        self.begin_list()
    }

    /// Starts a list (list32, patched by [`Writer::end_list`]).
    pub fn begin_list(&mut self) -> ListMark {
        self.buf.put_u8(code::LIST32);
        let at = self.buf.len_written();
        self.buf.put_u32(0);
        self.buf.put_u32(0);
        ListMark {
            at,
            count: 0,
            last_set: at + 8,
            last_count: 0,
        }
    }

    /// Ends a list: drops trailing null fields, writes size and count.
    pub fn end_list(&mut self, mark: ListMark) {
        self.buf.truncate_to(mark.last_set);
        let size = (mark.last_set - mark.at - 4) as u32;
        let s = self.buf.as_mut();
        s[mark.at..mark.at + 4].copy_from_slice(&size.to_be_bytes());
        s[mark.at + 4..mark.at + 8].copy_from_slice(&mark.last_count.to_be_bytes());
    }

    /// Writes one field of `mark`'s list with `f`, or null when `value` is `None`.
    pub fn field<T>(
        &mut self,
        mark: &mut ListMark,
        value: Option<T>,
        f: impl FnOnce(&mut Self, T),
    ) {
        mark.count += 1;
        match value {
            None => self.buf.put_u8(code::NULL),
            Some(v) => {
                f(self, v);
                mark.last_set = self.buf.len_written();
                mark.last_count = mark.count;
            }
        }
    }

    /// A `uint`.
    pub fn uint(&mut self, v: u32) {
        if v == 0 {
            self.buf.put_u8(code::UINT0);
        } else if v < 256 {
            self.buf.put_u8(code::SMALLUINT);
            self.buf.put_u8(v as u8);
        } else {
            self.buf.put_u8(code::UINT);
            self.buf.put_u32(v);
        }
    }

    /// A `ulong` value.
    pub fn ulong_value(&mut self, v: u64) {
        if v == 0 {
            self.buf.put_u8(code::ULONG0);
        } else if v < 256 {
            self.buf.put_u8(code::SMALLULONG);
            self.buf.put_u8(v as u8);
        } else {
            self.buf.put_u8(code::ULONG);
            self.buf.put_u64(v);
        }
    }

    /// A `ushort`.
    pub fn ushort(&mut self, v: u16) {
        self.buf.put_u8(code::USHORT);
        self.buf.put_u16(v);
    }

    /// A `ubyte`.
    pub fn ubyte(&mut self, v: u8) {
        self.buf.put_u8(code::UBYTE);
        self.buf.put_u8(v);
    }

    /// A `boolean`.
    pub fn boolean(&mut self, v: bool) {
        self.buf.put_u8(if v { code::TRUE } else { code::FALSE });
    }

    fn variable(&mut self, small: u8, large: u8, b: &[u8]) {
        if b.len() < 256 {
            self.buf.put_u8(small);
            self.buf.put_u8(b.len() as u8);
        } else {
            self.buf.put_u8(large);
            self.buf.put_u32(b.len() as u32);
        }
        self.buf.put_slice(b);
    }

    /// A `string`.
    pub fn string(&mut self, s: &str) {
        self.variable(code::STR8, code::STR32, s.as_bytes());
    }

    /// A `symbol`.
    pub fn symbol(&mut self, s: &[u8]) {
        self.variable(code::SYM8, code::SYM32, s);
    }

    /// A `binary`.
    pub fn binary(&mut self, b: &[u8]) {
        self.variable(code::VBIN8, code::VBIN32, b);
    }

    /// A `timestamp`.
    pub fn timestamp(&mut self, ms: i64) {
        self.buf.put_u8(code::TIMESTAMP);
        self.buf.put_i64(ms);
    }

    /// Bytes of an already-encoded value, as they are.
    pub fn raw(&mut self, raw: &[u8]) {
        self.buf.put_slice(raw);
    }

    /// An array of symbols (`symbol multiple` fields with several values).
    pub fn symbol_array(&mut self, syms: &[&[u8]]) {
        if syms.is_empty() {
            // No element constructor in an empty array: the decoder (like serde_amqp) reads
            // none, and refuses the byte it would leave over (the fuzzer's find).
            self.buf.put_slice(&[code::ARRAY8, 1, 0]);
            return;
        }
        self.buf.put_u8(code::ARRAY32);
        let at = self.buf.len_written();
        self.buf.put_u32(0);
        self.buf.put_u32(syms.len() as u32);
        self.buf.put_u8(code::SYM32);
        for s in syms {
            self.buf.put_u32(s.len() as u32);
            self.buf.put_slice(s);
        }
        let size = (self.buf.len_written() - at - 4) as u32;
        self.buf.as_mut()[at..at + 4].copy_from_slice(&size.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(bytes: &[u8]) -> Result<usize, DecodeError> {
        let mut r = Reader::new(bytes, Limits::DEFAULT);
        r.skip().map(|s| s.len())
    }

    #[test]
    fn nesting_past_the_limit_is_refused_without_recursing_past_it() {
        // 100,000 nested list8s of size 1 claiming one element: flat to a size-only
        // scanner, 100,000 levels to a decoder that trusts counts.
        let mut deep = Vec::new();
        for _ in 0..100_000 {
            deep.extend_from_slice(&[code::LIST8, 1, 1]);
        }
        deep.push(code::NULL);
        assert!(matches!(
            skip(&deep),
            Err(DecodeError::BadSize | DecodeError::TooDeep(_))
        ));

        // Honestly sized nesting, 65 levels.
        let mut v = vec![code::NULL];
        for _ in 0..65 {
            let mut outer = vec![code::LIST32];
            outer.extend_from_slice(&((v.len() + 4) as u32).to_be_bytes());
            outer.extend_from_slice(&1u32.to_be_bytes());
            outer.extend_from_slice(&v);
            v = outer;
        }
        assert_eq!(skip(&v), Err(DecodeError::TooDeep(64)));
    }

    #[test]
    fn counts_must_match_sizes() {
        // A list8 of size 2 claiming 5 elements.
        assert_eq!(skip(&[code::LIST8, 2, 5, 0x40]), Err(DecodeError::BadSize));
        // Size says 3 bytes, only one null inside with count 1 and a stray byte.
        assert_eq!(
            skip(&[code::LIST8, 3, 1, 0x40, 0x40]),
            Err(DecodeError::BadSize)
        );
        // A map with an odd count.
        assert_eq!(skip(&[code::MAP8, 2, 1, 0x40]), Err(DecodeError::BadSize));
        // An array of a billion nulls in four bytes.
        assert_eq!(
            skip(&[code::ARRAY32, 0, 0, 0, 5, 0x40, 0, 0, 0, 0x40]),
            Err(DecodeError::BadSize)
        );
    }

    #[test]
    fn an_element_cannot_run_past_its_container() {
        // A list8 of size 3 (count 1) whose element is a described value whose descriptor
        // is a vbin8 reaching past the list (the fuzzer's first find).
        assert!(skip(&[code::LIST8, 3, 1, 0x00, 0xa0, 5, 1, 2, 3, 4, 5, 0x40]).is_err());
        // An array whose descriptor runs past it.
        assert!(skip(&[
            code::ARRAY8,
            3,
            1,
            0x00,
            0xa0,
            9,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0x40
        ])
        .is_err());
    }

    #[test]
    fn sizes_past_the_end_are_refused_before_reading() {
        assert_eq!(
            skip(&[code::VBIN32, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            skip(&[code::LIST32, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]),
            Err(DecodeError::BadSize)
        );
        assert_eq!(skip(&[0x13]), Err(DecodeError::BadConstructor(0x13)));
    }

    #[test]
    fn written_lists_drop_trailing_nulls_and_read_back() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        let mut m = w.begin_described_list(0x10);
        w.field(&mut m, Some("container"), |w, v| w.string(v));
        w.field(&mut m, None::<&str>, |w, v| w.string(v));
        w.field(&mut m, Some(512u32), |w, v| w.uint(v));
        w.field(&mut m, None::<u16>, |w, v| w.ushort(v));
        w.end_list(m);
        let mut r = Reader::new(&buf, Limits::DEFAULT);
        assert_eq!(r.descriptor().unwrap(), 0x10);
        let mut f = r.fields().unwrap();
        assert_eq!(f.string("id").unwrap().as_deref(), Some("container"));
        assert_eq!(f.string("host").unwrap(), None);
        assert_eq!(f.uint("max").unwrap(), Some(512));
        assert_eq!(f.ushort("channel-max").unwrap(), None);
        f.finish().unwrap();
        assert_eq!(r.remaining(), 0);
        // The whole value also validates as one.
        assert_eq!(skip(&buf).unwrap(), buf.len());
    }
}
