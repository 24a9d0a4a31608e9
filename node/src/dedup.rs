//! An idempotent consumer for a node's inbox: remembers which messages it has processed, keyed
//! by authenticated sender and typed message id, bounded in size, and kept on disk so that a
//! restart does not forget.
//!
//! Why a node needs it: Drawbridge delivers at least once. The float suppresses duplicates it
//! can see (its own dedup window), but some it cannot: a float that dies after its broker
//! confirmed a publish and before the bridge saw the `accepted` makes the bridge resend the
//! message, and the float that takes it cannot know its dead sibling published it (see
//! `docs/guarantees.md`). Those copies reach the inbox; this is the tool that drops them.
//!
//! The pattern, per inbox delivery:
//!
//! 1. `let key = Key::from_properties(&delivery.properties)` (sender and id as the float stamped
//!    them);
//! 2. if [`Seen::contains`] it: ack and skip;
//! 3. otherwise process it, then [`Seen::record`] (written and synced to disk), then ack.
//!
//! A crash between processing and recording processes the message again on redelivery: make
//! the processing itself idempotent, or record it in the same transaction as the processing's
//! effect if you need exactly-once. A crash between recording and the ack is covered: the
//! redelivered copy is found and skipped.
//!
//! On disk: an append-only journal, one line per key (`hex(sender) hex(type:id)`), replayed at
//! [`Seen::open`]; a torn last line (a crash mid-write) is cut off. The journal is rewritten
//! with the keys still remembered once it holds twice as many lines as `capacity`, through a
//! temporary file and a rename, so a crash during the rewrite leaves the old journal in place.

use std::{
    collections::{HashSet, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use lapin::{types::AMQPValue, BasicProperties};

/// Header with the legal name the float authenticated (from the peer's certificate).
pub const SENDER_HEADER: &str = "drawbridge-sender";
/// Header with the AMQP 1.0 type of the message id (`string`, `ulong`, `uuid`, `binary`).
pub const ID_TYPE_HEADER: &str = "drawbridge-message-id-type";

/// What identifies one message end to end: who sent it and its typed id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The authenticated sender's legal name.
    pub sender: String,
    /// `type:id`, so that `ulong:5` and `string:5` are different messages.
    pub id: String,
}

impl Key {
    /// A key from its parts.
    pub fn new(sender: impl Into<String>, id_type: &str, id: &str) -> Self {
        Key {
            sender: sender.into(),
            id: format!("{id_type}:{id}"),
        }
    }

    /// The key of an inbox message, from the properties the float set; `None` without a
    /// sender or a message id (not a message that came through Drawbridge).
    pub fn from_properties(p: &BasicProperties) -> Option<Key> {
        let headers = p.headers().as_ref()?;
        let text = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
            _ => None,
        };
        let sender = text(SENDER_HEADER)?;
        let id_type = text(ID_TYPE_HEADER).unwrap_or_else(|| "string".into());
        let id = p.message_id().as_ref()?;
        Some(Key::new(sender, &id_type, id.as_str()))
    }

    fn to_line(&self) -> String {
        format!(
            "{} {}\n",
            hex(self.sender.as_bytes()),
            hex(self.id.as_bytes())
        )
    }

    fn from_line(line: &str) -> Option<Key> {
        let (sender, id) = line.split_once(' ')?;
        Some(Key {
            sender: String::from_utf8(unhex(sender)?).ok()?,
            id: String::from_utf8(unhex(id)?).ok()?,
        })
    }
}

/// The processed-message window of one inbox consumer.
#[derive(Debug)]
pub struct Seen {
    path: PathBuf,
    capacity: usize,
    keys: HashSet<Key>,
    order: VecDeque<Key>,
    journal: File,
    journal_lines: usize,
}

impl Seen {
    /// Open (or create) the journal at `path`, remembering the last `capacity` keys.
    pub fn open(path: impl AsRef<Path>, capacity: usize) -> io::Result<Seen> {
        let path = path.as_ref().to_path_buf();
        let capacity = capacity.max(1);
        let mut seen = Seen {
            journal: OpenOptions::new().create(true).append(true).open(&path)?,
            path,
            capacity,
            keys: HashSet::new(),
            order: VecDeque::new(),
            journal_lines: 0,
        };
        // A torn last line (a crash mid-write) is cut off, so the next record starts a line of
        // its own instead of being glued to the torn bytes and lost at the next open.
        let len = fs::metadata(&seen.path)?.len();
        let whole = {
            let bytes = fs::read(&seen.path)?;
            bytes
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i as u64 + 1)
        };
        if whole < len {
            OpenOptions::new()
                .write(true)
                .open(&seen.path)?
                .set_len(whole)?;
        }
        let file = File::open(&seen.path)?;
        for line in BufReader::new(file).split(b'\n') {
            let line = line?;
            seen.journal_lines += 1;
            // A torn or foreign line is skipped, not fatal: the rest of the window still counts.
            if let Some(key) = std::str::from_utf8(&line).ok().and_then(Key::from_line) {
                seen.remember(key);
            }
        }
        Ok(seen)
    }

    /// Whether `key` was recorded (and is still within the window).
    pub fn contains(&self, key: &Key) -> bool {
        self.keys.contains(key)
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Record `key` as processed: appended to the journal and synced before this returns, so
    /// an ack sent afterwards never outlives the record. Recording a key twice is harmless.
    pub fn record(&mut self, key: Key) -> io::Result<()> {
        if self.keys.contains(&key) {
            return Ok(());
        }
        self.journal.write_all(key.to_line().as_bytes())?;
        self.journal.sync_data()?;
        self.journal_lines += 1;
        self.remember(key);
        if self.journal_lines >= 2 * self.capacity {
            self.compact()?;
        }
        Ok(())
    }

    fn remember(&mut self, key: Key) {
        if self.keys.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }

    /// Rewrite the journal with the remembered keys only.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.path.with_extension("compacting");
        {
            let mut f = File::create(&tmp)?;
            for key in &self.order {
                f.write_all(key.to_line().as_bytes())?;
            }
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            // The rename is durable once the directory is synced.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.journal = OpenOptions::new().append(true).open(&self.path)?;
        self.journal_lines = self.order.len();
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldTable, LongString, ShortString};

    fn key(i: usize) -> Key {
        Key::new("O=Bank B, L=Paris, C=FR", "string", &format!("m-{i}"))
    }

    #[test]
    fn remembers_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.journal");
        let mut s = Seen::open(&path, 100).unwrap();
        assert!(!s.contains(&key(1)));
        s.record(key(1)).unwrap();
        s.record(key(1)).unwrap();
        s.record(key(2)).unwrap();
        drop(s);
        let s = Seen::open(&path, 100).unwrap();
        assert!(s.contains(&key(1)) && s.contains(&key(2)) && !s.contains(&key(3)));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_window_is_bounded_and_the_journal_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.journal");
        let mut s = Seen::open(&path, 10).unwrap();
        for i in 0..95 {
            s.record(key(i)).unwrap();
        }
        assert_eq!(s.len(), 10);
        assert!(!s.contains(&key(84)) && s.contains(&key(85)) && s.contains(&key(94)));
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 20, "journal not compacted: {lines} lines");
        drop(s);
        let s = Seen::open(&path, 10).unwrap();
        assert!(!s.contains(&key(84)) && s.contains(&key(85)) && s.contains(&key(94)));
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.journal");
        let mut s = Seen::open(&path, 10).unwrap();
        s.record(key(1)).unwrap();
        drop(s);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"4f3d42616e6b20 6d2d").unwrap(); // cut mid-key, odd hex
        drop(f);
        let mut s = Seen::open(&path, 10).unwrap();
        assert!(s.contains(&key(1)));
        assert_eq!(s.len(), 1);
        s.record(key(2)).unwrap();
        drop(s);
        let s = Seen::open(&path, 10).unwrap();
        assert!(s.contains(&key(1)) && s.contains(&key(2)), "{s:?}");
    }

    #[test]
    fn keys_come_from_the_floats_headers_and_keep_the_id_type() {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from(SENDER_HEADER),
            AMQPValue::LongString(LongString::from("O=Bank B, L=Paris, C=FR")),
        );
        h.insert(
            ShortString::from(ID_TYPE_HEADER),
            AMQPValue::LongString(LongString::from("ulong")),
        );
        let p = BasicProperties::default()
            .with_headers(h.clone())
            .with_message_id(ShortString::from("5"));
        let k = Key::from_properties(&p).unwrap();
        assert_eq!(k, Key::new("O=Bank B, L=Paris, C=FR", "ulong", "5"));
        assert_ne!(k, Key::new("O=Bank B, L=Paris, C=FR", "string", "5"));
        assert!(Key::from_properties(&BasicProperties::default().with_headers(h)).is_none());
        assert!(
            Key::from_properties(&BasicProperties::default().with_message_id("5".into())).is_none()
        );
    }
}
