//! Peer-controlled text on its way into a log line or back to the peer.
//!
//! A peer chooses addresses, link and container names, message ids, destinations and the
//! descriptions of its dispositions. Written as they are, a `\n` in one starts what looks like
//! a new line of the daemon's own log (log forging), a megabyte-long one is echoed and logged
//! whole per message. [`escape`] makes a string safe for one log line (control characters
//! escaped, length bounded); [`truncate`] bounds a string at a character boundary.

use std::fmt;

/// Longest peer string written into a log line, in bytes of the original (the rest is cut
/// off and its length noted).
pub const LOG_MAX: usize = 512;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// `s` for one log line: see [`Escaped`].
pub fn escape(s: &str) -> Escaped<'_> {
    Escaped(s)
}

/// A peer string displayed for a log line: control characters (`\n`, `\r`, escape
/// sequences, ...) and the Unicode line separators and bidirectional overrides are written
/// as `\n`, `\u{202e}` and so on, and only the first [`LOG_MAX`] bytes are shown, followed by
/// `…(N bytes)`. Use it as a tracing field (`address = %escape(&address)`) wherever a peer
/// string is logged.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(&'a str);

/// Characters that are not control characters to Rust but end or reorder a line on screen.
fn reorders_or_breaks(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = truncate(self.0, LOG_MAX);
        for c in shown.chars() {
            if c.is_control() || reorders_or_breaks(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        if shown.len() < self.0.len() {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_a_character_boundary() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abc", 2), "ab");
        // "é" is two bytes: cutting inside it keeps the character out.
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("aé", 3), "aé");
        assert_eq!(truncate("€", 0), "");
    }

    #[test]
    fn control_characters_and_line_breaks_are_escaped() {
        let s = escape("a\nb\r\x1b[31mc\u{2028}d\u{202e}e\tf").to_string();
        assert_eq!(s, "a\\nb\\r\\u{1b}[31mc\\u{2028}d\\u{202e}e\\tf");
        assert!(!s.contains('\n'));
        assert_eq!(
            escape("O=Bank B, L=Paris, C=FR").to_string(),
            "O=Bank B, L=Paris, C=FR"
        );
        assert_eq!(escape("Zürich").to_string(), "Zürich");
    }

    #[test]
    fn long_strings_are_cut_with_their_length_noted() {
        let long = "x".repeat(100_000);
        let s = escape(&long).to_string();
        assert!(s.len() < LOG_MAX + 32, "{}", s.len());
        assert!(s.ends_with("…(100000 bytes)"), "{s}");
    }
}
