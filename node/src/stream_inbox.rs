//! Reading a *stream* inbox (`float.inbox_queue_type = "stream"`) with the node's own offset:
//! [`StreamInbox`] hands out each peer message with its offset in the stream, skips the
//! float's window markers, and [`StreamInbox::commit`] records how far the node got in an
//! [`OffsetStore`] ([`OffsetFile`] on disk, or the node's own database), so that a restart
//! reads on from there instead of from the start or only what arrives next.
//!
//! Why a node needs it: a stream is a log, not a queue. Acks do not remove anything (they
//! only give the consumer credit to receive more), the broker keeps no position for an AMQP
//! 0.9.1 consumer, and every consumer says where to start (`x-stream-offset`). Where it
//! stopped reading is the node's to remember.
//!
//! What holds end to end:
//!
//! - **Into the stream** (the float's side, see `docs/guarantees.md`, "Exactly once into a
//!   stream inbox"): the float rebuilds its dedup window by reading the stream back, up to
//!   its window marker, so there are no duplicates *in the stream* within the window, across
//!   its own crashes too. Beyond that promise (a resend after the window, two floats
//!   publishing for the inbox at once) a copy can still be stored twice: a node that must
//!   never see one keeps [`crate::dedup::Seen`] as well, keyed by sender and id. The node
//!   publishes nothing into the stream: the float believes what it reads there.
//! - **From the stream to the node**: at least once. A node that crashes after processing a
//!   message and before [`StreamInbox::commit`] reads that message again after the restart.
//!   Exactly-once *in effect* needs the offset written in the same transaction as the
//!   processing's effect: implement [`OffsetStore`] over the node's database, write the
//!   offset with the effect, and a restart resumes exactly after the last effect. With
//!   [`OffsetFile`], make the processing idempotent (or use `Seen`) for the one message that
//!   may be processed twice.
//! - **Nothing read twice across a restart otherwise**: deliveries at or below the committed
//!   offset (RabbitMQ may start from the beginning of the chunk that holds the first offset
//!   asked for) are skipped, not handed out.
//! - **Retention**: the stream drops whole segments past `x-max-age` / `x-max-length-bytes`.
//!   A node that was away longer than that resumes at the oldest offset the stream still
//!   has; what was dropped before it was read is lost to it. Size retention to the longest
//!   outage a node may have (see `docs/stream-inbox.md`). Offsets are increasing but not
//!   contiguous (RabbitMQ's own entries take offsets too, one at the start of each segment):
//!   a gap is no sign of a loss.
//!
//! The pattern:
//!
//! ```no_run
//! # async fn run(channel: lapin::Channel) -> Result<(), Box<dyn std::error::Error>> {
//! use drawbridge_node::stream_inbox::{OffsetFile, StreamInbox};
//! let store = OffsetFile::open("/var/lib/my-node/inbox.offset")?;
//! let mut inbox = StreamInbox::open(&channel, "drawbridge.inbox", store, 100).await?;
//! while let Some(message) = inbox.next().await? {
//!     // process message.data, from message.sender() ...
//!     inbox.commit(message.offset)?;
//! }
//! # Ok(()) }
//! ```

use std::{
    fmt,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    str::FromStr,
};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Consumer,
};

use crate::dedup::{Key, SENDER_HEADER};

/// The consumer argument that says where to start reading a stream, and the header with which
/// RabbitMQ stamps each delivery from a stream with its offset.
pub const STREAM_OFFSET: &str = "x-stream-offset";

/// Header of a float's window marker (`drawbridge_mapping::headers::WINDOW_MARKER`; literal
/// here as the other header names of this crate): an empty message with no sender that the
/// float writes into a stream inbox for its own use. No peer's message: skipped.
pub const WINDOW_MARKER: &str = "drawbridge-window-marker";

/// Where a stream consumer starts (`x-stream-offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOffset {
    /// The oldest message the stream still holds.
    First,
    /// The start of the last chunk written (some of the newest messages).
    Last,
    /// Only what is written after the consumer starts.
    Next,
    /// This offset (or the oldest one kept, if it is older than that).
    Offset(u64),
    /// The first chunk written at or after this time (seconds since the Unix epoch).
    Timestamp(u64),
}

impl StreamOffset {
    /// The `x-stream-offset` consumer argument.
    pub fn to_amqp(self) -> AMQPValue {
        match self {
            StreamOffset::First => AMQPValue::LongString("first".into()),
            StreamOffset::Last => AMQPValue::LongString("last".into()),
            StreamOffset::Next => AMQPValue::LongString("next".into()),
            StreamOffset::Offset(o) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
            StreamOffset::Timestamp(t) => AMQPValue::Timestamp(t),
        }
    }
}

impl fmt::Display for StreamOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamOffset::First => f.write_str("first"),
            StreamOffset::Last => f.write_str("last"),
            StreamOffset::Next => f.write_str("next"),
            StreamOffset::Offset(o) => write!(f, "{o}"),
            StreamOffset::Timestamp(t) => write!(f, "timestamp {t}"),
        }
    }
}

impl FromStr for StreamOffset {
    type Err = String;

    /// `first`, `last`, `next` or an offset (a number).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "first" => Ok(StreamOffset::First),
            "last" => Ok(StreamOffset::Last),
            "next" => Ok(StreamOffset::Next),
            n => n
                .parse()
                .map(StreamOffset::Offset)
                .map_err(|_| format!("`{s}` is not `first`, `last`, `next` or an offset")),
        }
    }
}

/// Where a node keeps the offset of the last stream message it processed.
///
/// [`OffsetFile`] keeps it in a file of its own. A node whose effects go to a database keeps
/// it there instead, written in the same transaction as the effect of the message at that
/// offset: then a crash can never separate the two, and reading is exactly-once in effect.
/// Such a store's [`commit`](OffsetStore::commit) has nothing left to make durable (the
/// transaction did it) but must still answer [`last_processed`](OffsetStore::last_processed)
/// with it.
pub trait OffsetStore {
    /// What a failed commit reports.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The offset of the last message processed, `None` if none ever was.
    fn last_processed(&self) -> Option<u64>;

    /// Where to start without a processed offset: by default the oldest message kept.
    fn start_without_offset(&self) -> StreamOffset {
        StreamOffset::First
    }

    /// Record that everything up to and including `offset` is processed, durably, before
    /// returning.
    fn commit(&mut self, offset: u64) -> Result<(), Self::Error>;
}

/// What is wrong with an offset file.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum OffsetFileError {
    /// It could not be read or written.
    #[error("offset file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It does not hold an offset. Never read as "no offset": starting from the stream's
    /// start would process everything again, and from its end would skip what is unread.
    #[error("offset file {} is corrupt ({found}): it must hold one number, the offset of the last message processed; restore it, or remove it to read from {start}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What it holds (escaped, at most 40 bytes).
        found: String,
        /// Where a reader starts once the file is removed.
        start: StreamOffset,
    },
}

/// The offset of the last processed message of a stream inbox, in a file: one line, the
/// offset in decimal (`examples/node-python/node.py` writes the same).
///
/// A commit writes the new offset to `<file>.tmp`, syncs it, renames it over the file and
/// syncs the directory: the file always holds a whole offset, the old one or the new one,
/// whenever a crash comes. A torn `.tmp` left by a crash is ignored and overwritten.
#[derive(Debug)]
pub struct OffsetFile {
    path: PathBuf,
    last: Option<u64>,
    start: StreamOffset,
}

impl OffsetFile {
    /// Open the offset file at `path`; a missing file means nothing was processed yet, and
    /// reading starts at the oldest message the stream keeps (`first`).
    pub fn open(path: impl AsRef<Path>) -> Result<OffsetFile, OffsetFileError> {
        Self::open_or(path, StreamOffset::First)
    }

    /// As [`OffsetFile::open`], with `start` where reading starts while the file is missing
    /// (e.g. [`StreamOffset::Next`] for a node that must not read what came before it).
    pub fn open_or(
        path: impl AsRef<Path>,
        start: StreamOffset,
    ) -> Result<OffsetFile, OffsetFileError> {
        let path = path.as_ref().to_path_buf();
        let last = match fs::read(&path) {
            Ok(bytes) => Some(
                parse_offset(&bytes).ok_or_else(|| OffsetFileError::Corrupt {
                    found: escape(&bytes),
                    path: path.clone(),
                    start,
                })?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(OffsetFileError::Io { path, source }),
        };
        Ok(OffsetFile { path, last, start })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The offset last committed (or read at open).
    pub fn last_processed(&self) -> Option<u64> {
        self.last
    }

    /// Write `offset` as the last processed one (see the type's doc for how). An offset at or
    /// below the one held already changes nothing: going back would only process messages
    /// again; to read again from the start, remove the file while no reader runs.
    pub fn commit(&mut self, offset: u64) -> Result<(), OffsetFileError> {
        if self.last.is_some_and(|last| offset <= last) {
            return Ok(());
        }
        self.write(offset).map_err(|source| OffsetFileError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.last = Some(offset);
        Ok(())
    }

    fn tmp_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        self.path.with_file_name(name)
    }

    fn write(&self, offset: u64) -> io::Result<()> {
        let tmp = self.tmp_path();
        {
            let mut f = File::create(&tmp)?;
            f.write_all(format!("{offset}\n").as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        // The rename is durable once the directory is synced.
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
}

impl OffsetStore for OffsetFile {
    type Error = OffsetFileError;

    fn last_processed(&self) -> Option<u64> {
        self.last
    }

    fn start_without_offset(&self) -> StreamOffset {
        self.start
    }

    fn commit(&mut self, offset: u64) -> Result<(), OffsetFileError> {
        OffsetFile::commit(self, offset)
    }
}

/// One decimal offset and a newline, nothing else (a file without its newline was not
/// written by [`OffsetFile`]).
fn parse_offset(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.strip_suffix(b"\n")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn escape(bytes: &[u8]) -> String {
    let shown = bytes[..bytes.len().min(40)].escape_ascii().to_string();
    if bytes.is_empty() {
        "empty".into()
    } else if bytes.len() > 40 {
        format!("\"{shown}\"…, {} bytes", bytes.len())
    } else {
        format!("\"{shown}\"")
    }
}

/// What went wrong reading a stream inbox.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StreamInboxError {
    /// The broker refused or failed an operation.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The queue is not a stream: the broker refused the consumer's `x-stream-offset` (and
    /// closed the channel), or a delivery came without one. Nothing was acked (on a queue,
    /// an ack would remove the message).
    #[error("{queue} is not a stream (RabbitMQ refuses `x-stream-offset` on it, or its deliveries have none): set float.inbox_queue_type = \"stream\", or read it as a queue")]
    NotAStream {
        /// The queue.
        queue: String,
    },
    /// A commit beyond the last offset handed out would mark unread messages processed.
    #[error("commit of offset {offset}, beyond the last one read ({read:?})")]
    NotYetRead {
        /// The offset given.
        offset: u64,
        /// The last offset handed out.
        read: Option<u64>,
    },
    /// The offset store failed to record a commit.
    #[error("offset store: {0}")]
    Store(Box<dyn std::error::Error + Send + Sync>),
    /// An argument is out of range (e.g. a prefetch of 0, which streams refuse).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// A peer message read from a stream inbox, with its offset.
#[derive(Debug)]
pub struct StreamMessage {
    /// Its offset in the stream: what to [`StreamInbox::commit`] once it is processed.
    pub offset: u64,
    /// Its properties (message id, headers as the float stamped them).
    pub properties: BasicProperties,
    /// Its body.
    pub data: Vec<u8>,
}

impl StreamMessage {
    /// The authenticated sender's legal name (`drawbridge-sender`).
    pub fn sender(&self) -> Option<String> {
        header_text(self.properties.headers().as_ref(), SENDER_HEADER)
    }

    /// Its message id.
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|s| s.as_str())
    }

    /// Its [`Key`] for [`crate::dedup::Seen`] (sender and typed id).
    pub fn key(&self) -> Option<Key> {
        Key::from_properties(&self.properties)
    }
}

/// The offset RabbitMQ stamped on a delivery from a stream (`x-stream-offset`).
pub fn delivery_offset(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(STREAM_OFFSET)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// Whether a message is a float's window marker (it has the [`WINDOW_MARKER`] header).
pub fn is_window_marker(properties: &BasicProperties) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(WINDOW_MARKER))
}

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A consumer of a stream inbox that resumes after the last offset its [`OffsetStore`]
/// holds (see the module doc for what that guarantees).
///
/// Acks only give a stream consumer credit, so they are sent as messages arrive (one
/// `multiple` ack per half `prefetch`), not when they are committed: how far the node got
/// is the store's alone. Deliveries at or below the last offset handed out or committed,
/// and the float's window markers, are skipped (counted); a marker's offset is committed
/// when everything handed out before it is, so a restart does not read it again.
#[derive(Debug)]
pub struct StreamInbox<S> {
    channel: Channel,
    consumer: Consumer,
    consumer_tag: String,
    queue: String,
    store: S,
    start: StreamOffset,
    position: Position,
    ack_every: u64,
    unacked: u64,
    last_tag: u64,
}

/// How far a [`StreamInbox`] got: what it handed out, what is committed, what it skipped.
/// Apart from the consumer so that the rules can be tested without a broker.
#[derive(Debug, Default)]
struct Position {
    /// The offset last recorded by the store.
    committed: Option<u64>,
    /// The offset of the last message handed out.
    read: Option<u64>,
    /// The offset of the last marker seen after `read`.
    marker: Option<u64>,
    markers: u64,
    reread: u64,
}

/// What to do with one delivery.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Hand it out.
    Hand,
    /// Skip it.
    Skip,
    /// Skip it (a marker) and commit its offset: everything handed out before is committed.
    SkipAndCommit(u64),
}

impl Position {
    fn on_delivery(&mut self, offset: u64, marker: bool) -> Step {
        if self.read.max(self.committed).max(self.marker) >= Some(offset) {
            self.reread += 1;
            return Step::Skip;
        }
        if marker {
            self.markers += 1;
            self.marker = Some(offset);
            return if self.committed >= self.read {
                Step::SkipAndCommit(offset)
            } else {
                Step::Skip
            };
        }
        self.read = Some(offset);
        self.marker = None;
        Step::Hand
    }

    /// The offset to record for a commit of `offset`, `None` if nothing is to be recorded.
    fn to_commit(&self, offset: u64) -> Result<Option<u64>, StreamInboxError> {
        if Some(offset) > self.read.max(self.committed) {
            return Err(StreamInboxError::NotYetRead {
                offset,
                read: self.read,
            });
        }
        let through = match self.marker {
            Some(m) if Some(offset) == self.read => m.max(offset),
            _ => offset,
        };
        Ok((Some(through) > self.committed).then_some(through))
    }
}

impl<S: OffsetStore> StreamInbox<S> {
    /// Consume the stream `queue` on `channel` from the offset after `store`'s last processed
    /// one (or from its [`start_without_offset`](OffsetStore::start_without_offset)), with
    /// `prefetch` deliveries in flight at most (streams need one: not 0). Sets the channel's
    /// prefetch (`basic.qos`): give the inbox a channel of its own.
    pub async fn open(
        channel: &Channel,
        queue: &str,
        store: S,
        prefetch: u16,
    ) -> Result<Self, StreamInboxError> {
        if prefetch == 0 {
            return Err(StreamInboxError::Invalid(
                "a stream consumer needs a prefetch above 0".into(),
            ));
        }
        let committed = store.last_processed();
        let start = committed.map_or_else(
            || store.start_without_offset(),
            |o| StreamOffset::Offset(o.saturating_add(1)),
        );
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut args = FieldTable::default();
        args.insert(ShortString::from(STREAM_OFFSET), start.to_amqp());
        let consumer_tag = format!("drawbridge-stream-inbox-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(consumer_tag.as_str()),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|e| {
                // RabbitMQ: "invalid arg 'x-stream-offset' for queue ... of queue type
                // rabbit_classic_queue" (and the channel is closed).
                if e.to_string().contains(STREAM_OFFSET) {
                    StreamInboxError::NotAStream {
                        queue: queue.to_string(),
                    }
                } else {
                    StreamInboxError::Broker(e)
                }
            })?;
        Ok(StreamInbox {
            channel: channel.clone(),
            consumer,
            consumer_tag,
            queue: queue.to_string(),
            store,
            start,
            position: Position {
                committed,
                ..Position::default()
            },
            ack_every: u64::from(prefetch).div_ceil(2),
            unacked: 0,
            last_tag: 0,
        })
    }

    /// The next peer message, `None` once the consumer ended (the broker cancelled it, e.g.
    /// the stream was deleted, or the channel closed). Waits for one: wrap it in a timeout to
    /// stop when the stream is read to its end. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<StreamMessage>, StreamInboxError> {
        loop {
            if self.unacked >= self.ack_every {
                // Counted as sent before the await: if this is cancelled, the next `multiple`
                // ack covers these tags too.
                self.unacked = 0;
                self.channel
                    .basic_ack(self.last_tag, BasicAckOptions { multiple: true })
                    .await?;
            }
            let delivery = match self.consumer.next().await {
                None => return Ok(None),
                Some(d) => d?,
            };
            if let Some(message) = self.take(delivery)? {
                return Ok(Some(message));
            }
        }
    }

    /// One delivery: the message to hand out, or `None` if it is skipped.
    fn take(&mut self, d: Delivery) -> Result<Option<StreamMessage>, StreamInboxError> {
        let Some(offset) = delivery_offset(&d.properties) else {
            return Err(StreamInboxError::NotAStream {
                queue: self.queue.clone(),
            });
        };
        self.unacked += 1;
        self.last_tag = d.delivery_tag;
        match self
            .position
            .on_delivery(offset, is_window_marker(&d.properties))
        {
            Step::Hand => Ok(Some(StreamMessage {
                offset,
                properties: d.properties,
                data: d.data,
            })),
            Step::Skip => Ok(None),
            Step::SkipAndCommit(marker) => {
                self.persist(marker)?;
                Ok(None)
            }
        }
    }

    /// Record that the message at `offset`, and everything before it, is processed (through
    /// the store: for [`OffsetFile`], synced to disk before this returns). Commit after the
    /// message's effect is durable; committing every message or every few is the node's
    /// choice (what was not committed is read again after a restart). Committing the last
    /// message read also commits the markers read after it.
    pub fn commit(&mut self, offset: u64) -> Result<(), StreamInboxError> {
        match self.position.to_commit(offset)? {
            Some(through) => self.persist(through),
            None => Ok(()),
        }
    }

    fn persist(&mut self, offset: u64) -> Result<(), StreamInboxError> {
        self.store
            .commit(offset)
            .map_err(|e| StreamInboxError::Store(Box::new(e)))?;
        self.position.committed = Some(offset);
        Ok(())
    }

    /// Where this consumer started (`x-stream-offset`).
    pub fn start(&self) -> StreamOffset {
        self.start
    }

    /// The offset last committed (or held by the store at open).
    pub fn committed(&self) -> Option<u64> {
        self.position.committed
    }

    /// Window markers skipped.
    pub fn markers_skipped(&self) -> u64 {
        self.position.markers
    }

    /// Deliveries skipped because they were at or below an offset already read or committed
    /// (the broker starts a consumer at the beginning of a chunk).
    pub fn rereads_skipped(&self) -> u64 {
        self.position.reread
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Cancel the consumer and hand back the store.
    pub async fn close(self) -> Result<S, StreamInboxError> {
        if self.unacked > 0 {
            self.channel
                .basic_ack(self.last_tag, BasicAckOptions { multiple: true })
                .await?;
        }
        self.channel
            .basic_cancel(
                ShortString::from(self.consumer_tag.as_str()),
                BasicCancelOptions::default(),
            )
            .await?;
        Ok(self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    #[test]
    fn a_missing_file_starts_where_the_caller_says() {
        let dir = tempfile::tempdir().unwrap();
        let f = OffsetFile::open(dir.path().join("inbox.offset")).unwrap();
        assert_eq!(f.last_processed(), None);
        assert_eq!(f.start_without_offset(), StreamOffset::First);
        let f = OffsetFile::open_or(dir.path().join("inbox.offset"), StreamOffset::Next).unwrap();
        assert_eq!(f.start_without_offset(), StreamOffset::Next);
        assert!(
            !dir.path().join("inbox.offset").exists(),
            "open writes nothing"
        );
    }

    #[test]
    fn offsets_survive_a_reopen_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.offset");
        let mut f = OffsetFile::open(&path).unwrap();
        f.commit(0).unwrap();
        f.commit(41).unwrap();
        f.commit(7).unwrap();
        assert_eq!(f.last_processed(), Some(41));
        drop(f);
        assert_eq!(fs::read_to_string(&path).unwrap(), "41\n");
        let mut f = OffsetFile::open(&path).unwrap();
        assert_eq!(f.last_processed(), Some(41));
        f.commit(u64::MAX).unwrap();
        assert_eq!(
            OffsetFile::open(&path).unwrap().last_processed(),
            Some(u64::MAX)
        );
        assert!(!f.tmp_path().exists(), "the temporary file was renamed");
    }

    #[test]
    fn a_corrupt_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.offset");
        for bad in [
            &b""[..],
            b"12",
            b"12\n13\n",
            b"-1\n",
            b"x\n",
            b" 12\n",
            &[0xff, b'\n'],
        ] {
            fs::write(&path, bad).unwrap();
            let e = OffsetFile::open(&path).unwrap_err();
            assert!(
                matches!(e, OffsetFileError::Corrupt { .. }),
                "{bad:?}: {e:?}"
            );
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("read from first"), "{text}");
        }
        fs::write(&path, vec![b'7'; 100]).unwrap();
        let e = OffsetFile::open_or(&path, StreamOffset::Next)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("100 bytes") && e.contains("read from next"),
            "{e}"
        );
    }

    #[test]
    fn a_torn_temporary_file_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.offset");
        let mut f = OffsetFile::open(&path).unwrap();
        f.commit(5).unwrap();
        let tmp = f.tmp_path();
        drop(f);
        // A crash while writing the next offset leaves a torn temporary file.
        fs::write(&tmp, b"12").unwrap();
        let mut f = OffsetFile::open(&path).unwrap();
        assert_eq!(f.last_processed(), Some(5));
        f.commit(6).unwrap();
        assert!(!tmp.exists());
        assert_eq!(OffsetFile::open(&path).unwrap().last_processed(), Some(6));
    }

    #[test]
    fn an_unreadable_file_is_an_io_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let e = OffsetFile::open(dir.path()).unwrap_err();
        assert!(matches!(e, OffsetFileError::Io { .. }), "{e:?}");
    }

    #[test]
    fn stream_offsets_parse_and_become_consumer_arguments() {
        assert_eq!("first".parse(), Ok(StreamOffset::First));
        assert_eq!("last".parse(), Ok(StreamOffset::Last));
        assert_eq!("next".parse(), Ok(StreamOffset::Next));
        assert_eq!("42".parse(), Ok(StreamOffset::Offset(42)));
        assert!("-1".parse::<StreamOffset>().is_err());
        assert!("First".parse::<StreamOffset>().is_err());
        assert_eq!(
            StreamOffset::Offset(42).to_amqp(),
            AMQPValue::LongLongInt(42)
        );
        assert_eq!(
            StreamOffset::First.to_amqp(),
            AMQPValue::LongString(LongString::from("first"))
        );
        assert_eq!(
            StreamOffset::Timestamp(9).to_amqp(),
            AMQPValue::Timestamp(9)
        );
    }

    #[test]
    fn messages_are_handed_out_once_and_markers_skipped() {
        // Resumed after offset 4: the broker starts at its chunk, from 3.
        let mut p = Position {
            committed: Some(4),
            ..Position::default()
        };
        assert_eq!(p.on_delivery(3, false), Step::Skip);
        assert_eq!(p.on_delivery(4, false), Step::Skip);
        assert_eq!(p.reread, 2);
        assert_eq!(p.on_delivery(5, false), Step::Hand);
        assert_eq!(p.on_delivery(5, false), Step::Skip, "never twice");
        // A marker after an uncommitted message waits for that commit ...
        assert_eq!(p.on_delivery(6, true), Step::Skip);
        assert_eq!(p.markers, 1);
        assert_eq!(p.to_commit(5).unwrap(), Some(6), "... which covers it");
        p.committed = Some(6);
        // ... one after committed messages is committed at once.
        assert_eq!(p.on_delivery(7, true), Step::SkipAndCommit(7));
        p.committed = Some(7);
        assert_eq!(p.on_delivery(8, false), Step::Hand);
        assert_eq!(p.on_delivery(9, false), Step::Hand);
        assert_eq!(p.on_delivery(10, true), Step::Skip);
        // Committing an earlier message does not skip the later one, nor the marker.
        assert_eq!(p.to_commit(8).unwrap(), Some(8));
        p.committed = Some(8);
        assert_eq!(p.to_commit(8).unwrap(), None, "already");
        assert_eq!(p.to_commit(2).unwrap(), None, "never back");
        assert!(matches!(
            p.to_commit(11),
            Err(StreamInboxError::NotYetRead {
                offset: 11,
                read: Some(9)
            })
        ));
        assert_eq!(p.to_commit(9).unwrap(), Some(10));
    }

    #[test]
    fn a_fresh_reader_commits_a_leading_marker_and_refuses_unread_commits() {
        let mut p = Position::default();
        assert!(p.to_commit(0).is_err(), "nothing read yet");
        assert_eq!(p.on_delivery(0, true), Step::SkipAndCommit(0));
        p.committed = Some(0);
        assert_eq!(p.on_delivery(1, false), Step::Hand);
        assert_eq!(p.to_commit(1).unwrap(), Some(1));
    }

    #[test]
    fn offsets_and_markers_come_from_the_headers() {
        let with = |k: &str, v: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(ShortString::from(k), v);
            BasicProperties::default().with_headers(h)
        };
        assert_eq!(
            delivery_offset(&with(STREAM_OFFSET, AMQPValue::LongLongInt(7))),
            Some(7)
        );
        assert_eq!(
            delivery_offset(&with(STREAM_OFFSET, AMQPValue::LongLongInt(-1))),
            None
        );
        assert_eq!(delivery_offset(&BasicProperties::default()), None);
        assert!(is_window_marker(&with(
            WINDOW_MARKER,
            AMQPValue::LongString("a:1".into())
        )));
        assert!(!is_window_marker(&with(
            SENDER_HEADER,
            AMQPValue::LongString("O=A".into())
        )));
    }
}
