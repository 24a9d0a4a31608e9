//! Text a peer controls, made safe to store and to log.
//!
//! A peer chooses link names, addresses, destinations, message ids and the descriptions of
//! its rejections. Stored as they are (in a header, a cache, a status page) they can be as
//! long as a frame; logged as they are, a `\n` in one forges a second log line in the human
//! format. [`truncate`] bounds what is kept; [`Untrusted`] is how such a string is logged.

use std::{borrow::Cow, fmt};

/// `s` cut to at most `max` bytes (on a character boundary), with a note of how long it was.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes in all)", &s[..end], s.len()))
}

/// Most characters of an untrusted string written to a log line.
pub const LOG_MAX: usize = 256;

/// A peer-controlled string as it goes into a log line: control characters escaped (`\n`,
/// `\r`, `\t`, others as `\u{..}`), so that it cannot start a line of its own, and cut after
/// [`LOG_MAX`] characters.
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (count, c) in self.0.chars().enumerate() {
            if count == LOG_MAX {
                return write!(f, "… ({} bytes in all)", self.0.len());
            }
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{85}') => {
                    write!(f, "\\u{{{:x}}}", c as u32)?
                }
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters_and_says_how_long_it_was() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdef", 3), "abc… (6 bytes in all)");
        // 'é' is two bytes: a cut inside it moves back.
        assert_eq!(truncate("aé", 2), "a… (3 bytes in all)");
        assert!(truncate(&"x".repeat(200_000), 1024).len() < 1100);
    }

    #[test]
    fn an_untrusted_string_cannot_start_a_log_line_of_its_own() {
        let forged = "O=Bank Z\n2026-12-05T00:00:00Z  INFO link up queue=x\r\u{1b}[31m\u{2028}";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\u{1b}'));
        assert!(!shown.contains('\u{2028}'));
        assert!(shown.starts_with("O=Bank Z\\n2026"), "{shown}");
        assert_eq!(
            Untrusted("a\\n").to_string(),
            "a\\\\n",
            "a literal backslash-n stays apart"
        );
        let long = Untrusted(&"y".repeat(10_000)).to_string();
        assert!(long.len() < LOG_MAX + 40, "{}", long.len());
    }
}
