//! [`Scanner`]: walks a stream of AMQP 1.0 encoded values without recursion.

use super::{Violation, MAX_DEPTH};

/// Where an open compound or described value ends.
#[derive(Debug, Clone, Copy)]
enum Open {
    /// A list, map or array ending at this stream offset; arrays give their elements'
    /// constructor, which the elements do not repeat. `left`: elements still to come (the
    /// count says how many; `None` for an array of zero-width elements, which has no bytes
    /// to count).
    Sized {
        end: u64,
        element: Option<u8>,
        left: Option<u64>,
    },
    /// A described value: this many values (descriptor, value) still to come.
    Described { left: u8 },
}

/// What the scanner expects next.
#[derive(Debug, Clone, Copy)]
enum State {
    /// A constructor (or, inside an array of compounds, the implied one).
    Constructor,
    /// This many bytes of primitive data.
    Skip(u64),
    /// The length of variable-width data: `width` bytes, `got` so far.
    VarLen { width: u8, got: u8, acc: u64 },
    /// The size of a compound (constructor `code`), then its count (and, for arrays, the
    /// element constructor).
    Size {
        width: u8,
        got: u8,
        acc: u64,
        code: u8,
    },
    /// The count of a compound ending at `end`.
    Count {
        width: u8,
        got: u8,
        acc: u64,
        end: u64,
        code: u8,
    },
    /// The element constructor of an array of `count` elements ending at `end`.
    Element { end: u64, count: u64 },
}

/// Walks a stream of AMQP 1.0 encoded values incrementally, without recursion.
#[derive(Debug, Clone)]
pub struct Scanner {
    stack: Vec<Open>,
    state: State,
    pub(super) offset: u64,
    /// Values completed at the top level.
    completed: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            stack: Vec::new(),
            state: State::Constructor,
            offset: 0,
            completed: 0,
        }
    }
}

impl Scanner {
    /// A scanner at the start of a value stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scanner at the start of a value stream that keeps this one's stack allocation.
    pub(super) fn recycled(self) -> Self {
        let mut stack = self.stack;
        stack.clear();
        Scanner {
            stack,
            ..Scanner::default()
        }
    }

    /// Whether the scanner is between top-level values.
    pub fn at_boundary(&self) -> bool {
        self.stack.is_empty() && matches!(self.state, State::Constructor)
    }

    /// Top-level values completed so far.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Scan `bytes`, stopping early (and returning how many were consumed) once `stop_after`
    /// top-level values are complete; `None` scans everything.
    pub fn feed(&mut self, bytes: &[u8], stop_after: Option<u64>) -> Result<usize, Violation> {
        let mut i = 0;
        while i < bytes.len() {
            if stop_after.is_some_and(|n| self.completed >= n) {
                break;
            }
            match self.state {
                State::Skip(n) => {
                    let take = n.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.offset += take;
                    if take == n {
                        self.state = State::Constructor;
                        self.finish_value()?;
                    } else {
                        self.state = State::Skip(n - take);
                    }
                }
                _ => {
                    let b = bytes.get(i).copied().ok_or(Violation::BadSize)?;
                    i += 1;
                    self.offset += 1;
                    self.byte(b)?;
                }
            }
        }
        Ok(i)
    }

    fn byte(&mut self, b: u8) -> Result<(), Violation> {
        match self.state {
            State::Constructor => {
                let implied = match self.stack.last() {
                    Some(Open::Sized {
                        element: Some(c), ..
                    }) => Some(*c),
                    _ => None,
                };
                match implied {
                    // Inside an array the byte read is already the element's first byte (of
                    // its data, or of its size or length): act on the implied constructor,
                    // then on the byte.
                    Some(c) => match width_of(c) {
                        Some(n) if n > 0 => {
                            self.check_fits(self.offset - 1 + n)?;
                            if n == 1 {
                                self.finish_value()
                            } else {
                                self.state = State::Skip(n - 1);
                                Ok(())
                            }
                        }
                        _ => {
                            self.constructor(c)?;
                            self.byte(b)
                        }
                    },
                    None => self.constructor(b),
                }
            }
            State::VarLen { width, got, acc } => {
                let acc = (acc << 8) | u64::from(b);
                if got + 1 == width {
                    self.check_fits(self.offset + acc)?;
                    self.state = State::Skip(acc);
                    if acc == 0 {
                        self.state = State::Constructor;
                        self.finish_value()?;
                    }
                } else {
                    self.state = State::VarLen {
                        width,
                        got: got + 1,
                        acc,
                    };
                }
                Ok(())
            }
            State::Size {
                width,
                got,
                acc,
                code,
            } => {
                let acc = (acc << 8) | u64::from(b);
                if got + 1 < width {
                    self.state = State::Size {
                        width,
                        got: got + 1,
                        acc,
                        code,
                    };
                    return Ok(());
                }
                // The size counts the count field (and an array's constructor, which an empty
                // array may leave out).
                if acc < u64::from(width) {
                    return Err(Violation::BadSize);
                }
                let end = self.offset + acc;
                self.check_fits(end)?;
                self.state = State::Count {
                    width,
                    got: 0,
                    acc: 0,
                    end,
                    code,
                };
                Ok(())
            }
            State::Count {
                width,
                got,
                acc,
                end,
                code,
            } => {
                let count = (acc << 8) | u64::from(b);
                if got + 1 < width {
                    self.state = State::Count {
                        width,
                        got: got + 1,
                        acc: count,
                        end,
                        code,
                    };
                    return Ok(());
                }
                // A map's count is of keys and values: an odd one makes the decoder read
                // past its end (and, with overflow checks, panic in serde_amqp).
                if matches!(code, 0xc1 | 0xd1) && count % 2 != 0 {
                    return Err(Violation::BadCount);
                }
                if is_array(code) && count > 0 {
                    if self.offset == end {
                        return Err(Violation::BadSize);
                    }
                    self.state = State::Element { end, count };
                    Ok(())
                } else {
                    // An empty array has no element constructor: serde_amqp reads none (and
                    // fe2o3 writes none), so a constructor here would be read as the next
                    // value.
                    if is_array(code) && self.offset != end {
                        return Err(Violation::BadCount);
                    }
                    self.push(Open::Sized {
                        end,
                        element: None,
                        left: Some(count),
                    })?;
                    self.opened()
                }
            }
            State::Element { end, count } => match b {
                0x00 => Err(Violation::DescribedArray),
                // serde_amqp keeps one element constructor for the whole decoder and a list,
                // map or array element clears it: from the second element on it would read
                // each element's size byte as a constructor. Empty lists (0x45) too: they
                // decode, but serde_amqp writes them back as another value than it read
                // (fuzz target float_message, `[0x00, 0x53, 0x77, 0xe0, 2, 2, 0x45]`), and
                // no one sends an array of empty lists.
                0x45 | 0xc0 | 0xc1 | 0xd0 | 0xd1 | 0xe0 | 0xf0 => Err(Violation::CompoundArray),
                _ if width_of(b) == Some(0) => {
                    // Zero-width elements (null, true, false): no bytes at all.
                    if self.offset != end {
                        return Err(Violation::BadCount);
                    }
                    self.push(Open::Sized {
                        end,
                        element: None,
                        left: None,
                    })?;
                    self.opened()
                }
                0xa0 | 0xa1 | 0xa3 | 0xb0 | 0xb1 | 0xb3 => self.array_of(b, end, count),
                _ if width_of(b).is_some() => self.array_of(b, end, count),
                _ => Err(Violation::BadConstructor(b)),
            },
            // `feed` consumes skipped bytes itself; never reached.
            State::Skip(_) => Err(Violation::BadSize),
        }
    }

    fn constructor(&mut self, c: u8) -> Result<(), Violation> {
        match c {
            0x00 => {
                self.push(Open::Described { left: 2 })?;
                Ok(())
            }
            0xa0 | 0xa1 | 0xa3 => {
                self.state = State::VarLen {
                    width: 1,
                    got: 0,
                    acc: 0,
                };
                Ok(())
            }
            0xb0 | 0xb1 | 0xb3 => {
                self.state = State::VarLen {
                    width: 4,
                    got: 0,
                    acc: 0,
                };
                Ok(())
            }
            0xc0 | 0xc1 | 0xe0 => {
                self.state = State::Size {
                    width: 1,
                    got: 0,
                    acc: 0,
                    code: c,
                };
                Ok(())
            }
            0xd0 | 0xd1 | 0xf0 => {
                self.state = State::Size {
                    width: 4,
                    got: 0,
                    acc: 0,
                    code: c,
                };
                Ok(())
            }
            _ => match width_of(c) {
                Some(0) => self.finish_value(),
                Some(n) => {
                    self.check_fits(self.offset + n)?;
                    self.state = State::Skip(n);
                    Ok(())
                }
                None => Err(Violation::BadConstructor(c)),
            },
        }
    }

    /// An array of `count` elements with constructor `element`, ending at `end`: each element
    /// is walked (and counted), so that the count agrees with the size.
    fn array_of(&mut self, element: u8, end: u64, count: u64) -> Result<(), Violation> {
        self.push(Open::Sized {
            end,
            element: Some(element),
            left: Some(count),
        })?;
        self.opened()
    }

    /// A list, map or array was just pushed: close it at once if it is empty.
    fn opened(&mut self) -> Result<(), Violation> {
        self.state = State::Constructor;
        if let Some(Open::Sized { end, left, .. }) = self.stack.last() {
            if self.offset == *end {
                if left.is_some_and(|l| l != 0) {
                    return Err(Violation::BadCount);
                }
                self.stack.pop();
                return self.finish_value();
            }
        }
        Ok(())
    }

    fn push(&mut self, open: Open) -> Result<(), Violation> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Violation::TooDeep);
        }
        self.stack.push(open);
        Ok(())
    }

    /// A new compound ending at `end` must end within every container it is in.
    fn check_fits(&self, end: u64) -> Result<(), Violation> {
        for open in self.stack.iter().rev() {
            if let Open::Sized { end: outer, .. } = open {
                return if end <= *outer {
                    Ok(())
                } else {
                    Err(Violation::BadSize)
                };
            }
        }
        Ok(())
    }

    /// A value just ended at `self.offset`: close every container it completes.
    fn finish_value(&mut self) -> Result<(), Violation> {
        loop {
            match self.stack.last_mut() {
                None => {
                    self.completed += 1;
                    return Ok(());
                }
                Some(Open::Described { left }) => {
                    *left -= 1;
                    if *left > 0 {
                        return Ok(());
                    }
                    self.stack.pop();
                }
                Some(Open::Sized { end, left, .. }) => {
                    // One more element of this container.
                    if let Some(l) = left {
                        *l = l.checked_sub(1).ok_or(Violation::BadCount)?;
                    }
                    if self.offset < *end {
                        return Ok(());
                    }
                    if self.offset > *end {
                        return Err(Violation::BadSize);
                    }
                    if left.is_some_and(|l| l != 0) {
                        return Err(Violation::BadCount);
                    }
                    self.stack.pop();
                }
            }
        }
    }
}

/// Whether `code` is an array constructor.
fn is_array(code: u8) -> bool {
    matches!(code, 0xe0 | 0xf0)
}

/// Bytes of data after a fixed-width constructor; `None` for anything else.
fn width_of(c: u8) -> Option<u64> {
    match c {
        0x40..=0x45 => Some(0),
        0x50..=0x56 => Some(1),
        0x60 | 0x61 => Some(2),
        0x70..=0x74 => Some(4),
        0x80..=0x84 => Some(8),
        0x94 | 0x98 => Some(16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::primitives::{Array, Symbol, Value};
    use serde_amqp::to_vec;

    use super::super::testutil::{a_message, nested_lists};
    use super::*;

    fn scan(bytes: &[u8]) -> Result<u64, Violation> {
        let mut s = Scanner::new();
        s.feed(bytes, None)?;
        assert!(s.at_boundary(), "stopped inside a value");
        Ok(s.completed())
    }

    /// The same result whatever the stream is cut into.
    fn scan_in_pieces(bytes: &[u8], piece: usize) -> Result<u64, Violation> {
        let mut s = Scanner::new();
        for chunk in bytes.chunks(piece) {
            s.feed(chunk, None)?;
        }
        Ok(s.completed())
    }

    #[test]
    fn a_real_message_scans_whole_and_in_any_pieces() {
        let bytes = a_message();
        let sections = scan(&bytes).unwrap();
        assert_eq!(sections, 3, "properties, annotations, body");
        for piece in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(
                scan_in_pieces(&bytes, piece),
                Ok(sections),
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        assert_eq!(scan(&nested_lists(MAX_DEPTH)), Ok(1));
        assert_eq!(scan(&nested_lists(MAX_DEPTH + 1)), Err(Violation::TooDeep));
        // What aborted the process: 20,000 levels. Refused at level 65, with a tiny stack.
        let deep = nested_lists(20_000);
        assert_eq!(scan(&deep), Err(Violation::TooDeep));
        assert_eq!(scan_in_pieces(&deep, 5), Err(Violation::TooDeep));
        // Described values count as a level too.
        let mut described = [0x00, 0x53, 0x70].repeat(MAX_DEPTH + 1);
        described.push(0x40);
        assert_eq!(scan(&described), Err(Violation::TooDeep));
    }

    // Found by fuzzing (fuzz/, target float_message, the re-scan of the decoded message):
    // serde_amqp decodes arrays of compounds and empty arrays with a constructor otherwise
    // than they are written, so the bytes after them are read out of step with the scanner.
    #[test]
    fn arrays_of_compounds_and_described_arrays_are_refused() {
        // array8 of two list8 elements, each holding one list0.
        let arr = [0xe0, 8, 2, 0xc0, 2, 1, 0x45, 2, 1, 0x45];
        assert_eq!(scan(&arr), Err(Violation::CompoundArray));
        // array8 of arrays of ints.
        let arr2 = [0xe0, 7, 1, 0xe0, 4, 2, 0x54, 1, 2];
        assert_eq!(scan(&arr2), Err(Violation::CompoundArray));
        // An array of two empty lists, as an amqp-value body (found by fuzzing).
        let empties = [0x00, 0x53, 0x77, 0xe0, 2, 2, 0x45];
        assert_eq!(scan(&empties), Err(Violation::CompoundArray));
        // An empty array: without a constructor (as fe2o3 writes it) it passes, with one it
        // is refused (serde_amqp would read the constructor as the next value).
        assert_eq!(scan(&[0xe0, 1, 0]), Ok(1));
        assert_eq!(to_vec(&Array::<i32>::from(vec![])).unwrap(), [0xe0, 1, 0]);
        assert_eq!(scan(&[0xe0, 2, 0, 0x54]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xe0, 2, 0, 0xc0]), Err(Violation::BadCount));
        // A non-empty array needs its constructor.
        assert_eq!(scan(&[0xe0, 1, 1]), Err(Violation::BadSize));
        // array of symbols, walked symbol by symbol.
        let syms = to_vec(&Array::from(vec![Symbol::from("a"), Symbol::from("bc")])).unwrap();
        assert_eq!(scan(&syms), Ok(1));
        assert_eq!(
            scan(&[0xe0, 4, 1, 0x00, 0x53, 0x70]),
            Err(Violation::DescribedArray)
        );
    }

    #[test]
    fn sizes_must_fit_and_constructors_must_exist() {
        // list8 claiming 5 bytes inside a list8 of 3.
        assert_eq!(scan(&[0xc0, 3, 1, 0xc0, 5, 1]), Err(Violation::BadSize));
        // A string running past its list.
        assert_eq!(scan(&[0xc0, 3, 1, 0xa1, 9, b'x']), Err(Violation::BadSize));
        assert_eq!(scan(&[0xc0, 0]), Err(Violation::BadSize));
        assert_eq!(scan(&[0x30]), Err(Violation::BadConstructor(0x30)));
    }

    // Found by fuzzing (fuzz/, target float_message): serde_amqp reads as many elements as a
    // list's count says and ignores its size, so a list that is small by its size but claims
    // an element takes the next value in as its child. A run of such lists, flat to a scanner
    // that trusted the size, decodes as deep nesting: past the depth limit, and with enough of
    // them (3 bytes a level) past the end of a worker's stack.
    #[test]
    fn a_count_that_disagrees_with_the_size_is_refused() {
        let mut flat_to_sizes = Vec::new();
        for _ in 0..100 {
            flat_to_sizes.extend_from_slice(&[0xc0, 1, 1]);
        }
        flat_to_sizes.push(0x40);
        let deep: Value = serde_amqp::from_slice(&flat_to_sizes).unwrap();
        let mut depth = 0;
        let mut v = &deep;
        while let Value::List(items) = v {
            depth += 1;
            v = &items[0];
        }
        assert_eq!(depth, 100, "the decoder nests them");
        assert_eq!(scan(&flat_to_sizes), Err(Violation::BadCount));
        assert_eq!(scan_in_pieces(&flat_to_sizes, 1), Err(Violation::BadCount));

        // More elements than the count, and fewer.
        assert_eq!(scan(&[0xc0, 3, 1, 0x40, 0x40]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc0, 2, 2, 0x40]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc0, 1, 1, 0x40]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc0, 3, 2, 0x40, 0x40]), Ok(1));
        // The same in a list32 and in a map.
        assert_eq!(
            scan(&[0xd0, 0, 0, 0, 5, 0, 0, 0, 2, 0x40]),
            Err(Violation::BadCount)
        );
        assert_eq!(scan(&[0xc1, 1, 2]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xc1, 3, 2, 0x40, 0x40]), Ok(1));
    }

    // Found by fuzzing (fuzz/, target float_message): a map whose count is odd makes
    // serde_amqp subtract past zero (a panic where overflow checks are on, reading past the
    // map's end where they are off).
    #[test]
    fn a_map_with_an_odd_count_is_refused() {
        assert_eq!(
            scan(&[0xc1, 4, 3, 0x40, 0x40, 0x40]),
            Err(Violation::BadCount)
        );
        assert_eq!(
            scan(&[0xd1, 0, 0, 0, 7, 0, 0, 0, 3, 0x40, 0x40, 0x40]),
            Err(Violation::BadCount)
        );
        assert_eq!(scan(&[0xc1, 1, 0]), Ok(1));
    }

    #[test]
    fn arrays_of_primitives_are_walked_element_by_element() {
        // Three smallints.
        assert_eq!(scan(&[0xe0, 5, 3, 0x54, 1, 2, 3]), Ok(1));
        assert_eq!(scan(&[0xe0, 5, 2, 0x54, 1, 2, 3]), Err(Violation::BadCount));
        assert_eq!(scan(&[0xe0, 5, 4, 0x54, 1, 2, 3]), Err(Violation::BadCount));
        // An element running past the array (two-byte ushorts, three bytes).
        assert_eq!(scan(&[0xe0, 5, 2, 0x60, 0, 1, 2]), Err(Violation::BadSize));
        // Two str8 elements, each with its own length.
        let strs = [0xe0, 7, 2, 0xa1, 2, b'a', b'b', 1, b'c'];
        assert_eq!(scan(&strs), Ok(1));
        assert_eq!(scan_in_pieces(&strs, 1), Ok(1));
        let mut three = strs;
        three[2] = 3;
        assert_eq!(scan(&three), Err(Violation::BadCount));
        // Zero-width elements have no bytes: none may follow.
        assert_eq!(scan(&[0xe0, 2, 5, 0x40]), Ok(1));
        assert_eq!(scan(&[0xe0, 3, 5, 0x40, 0x40]), Err(Violation::BadCount));
        // Whatever serde_amqp encodes passes.
        let ints = to_vec(&Array::from(vec![1i32, -2, 300_000])).unwrap();
        assert_eq!(scan(&ints), Ok(1));
        let longs = to_vec(&Array::from(vec![1u64 << 40, 7])).unwrap();
        assert_eq!(scan(&longs), Ok(1));
        for encoded in [
            to_vec(&Array::from(vec![true, false, true])).unwrap(),
            to_vec(&Array::from(vec![
                "a".to_string(),
                "bc".into(),
                String::new(),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![
                Symbol::from("x"),
                Symbol::from("y".repeat(300)),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![
                serde_amqp::primitives::Binary::from(vec![1u8, 2]),
                serde_amqp::primitives::Binary::from(vec![]),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![
                serde_amqp::primitives::Timestamp::from_milliseconds(5),
                serde_amqp::primitives::Timestamp::from_milliseconds(-1),
            ]))
            .unwrap(),
            to_vec(&Array::from(vec![1.5f64, -0.0])).unwrap(),
            to_vec(&Array::from(vec!['a', 'é'])).unwrap(),
            to_vec(&Value::Array(Array::from(vec![
                Value::Ubyte(1),
                Value::Ubyte(2),
            ])))
            .unwrap(),
        ] {
            assert_eq!(scan(&encoded), Ok(1), "{encoded:x?}");
        }
    }
}
