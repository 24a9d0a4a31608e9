//! The broker resources Drawbridge uses and the arguments they are declared with.
//!
//! RabbitMQ refuses a redeclare whose arguments differ (`406 PRECONDITION_FAILED`), and
//! the node and the bridge both declare the peer queues ("whichever comes first"), so the
//! arguments live here, in one place, used by the bridge, the node library and the tests.

use std::{fmt, str::FromStr};

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    Channel, ExchangeKind,
};

/// Default name of the dead-letter queue.
pub const DEAD_LETTER_QUEUE: &str = "drawbridge.dead-letter";
/// Default prefix of peer queues.
pub const PEER_QUEUE_PREFIX: &str = "drawbridge.peers.";
/// Default inbox of a float identity.
pub const INBOX: &str = "drawbridge.inbox";
/// Default direct exchange the float publishes to inboxes through (each inbox bound under
/// its own name). Publishing through the default exchange would need write access to
/// `amq.default`, which RabbitMQ cannot limit to some queues: it reaches every queue.
pub const INBOX_EXCHANGE: &str = "drawbridge.inboxes";

/// `x-queue-type` of a queue Drawbridge declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queue (single broker node).
    #[default]
    Classic,
    /// Quorum queue (replicated on a cluster).
    Quorum,
    /// Stream (RabbitMQ ≥ 3.9): an append-only log read by offset. Only for inboxes: a
    /// stream keeps what was read, so it cannot be a peer or dead-letter queue, which the
    /// bridge consumes and acks away (the bridge refuses it there).
    Stream,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            "stream" => Ok(QueueType::Stream),
            other => Err(format!("`{other}` is not `classic`, `quorum` or `stream`")),
        }
    }
}

/// Arguments of every peer queue (`drawbridge.peers.<peer>`).
///
/// - `x-single-active-consumer`: the fence that keeps a zombie bridge from receiving
///   alongside the active one.
/// - `x-dead-letter-exchange` (the default exchange) + `x-dead-letter-routing-key` (the
///   dead-letter queue): whatever the broker itself drops from the queue — a quorum queue's
///   `x-delivery-limit` (20 by default on RabbitMQ 4.x), a TTL or length limit set by policy
///   — becomes a dead-letter with the broker's `x-death` reason instead of a silent loss.
pub fn peer_queue_args(queue_type: QueueType, dead_letter_queue: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-single-active-consumer"),
        AMQPValue::Boolean(true),
    );
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(queue_type.as_str())),
    );
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(dead_letter_queue)),
    );
    args
}

/// The peer queue arguments before dead-lettering was added (fence and type only): a queue
/// declared with these by an older node is still consumed, with a warning.
pub fn fenced_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    for (k, v) in peer_queue_args(queue_type, "").inner() {
        if !k.as_str().starts_with("x-dead-letter-") {
            args.insert(k.clone(), v.clone());
        }
    }
    args
}

/// Arguments of the dead-letter queue and of inboxes: only the queue type.
pub fn plain_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from(queue_type.as_str())),
    );
    args
}

/// How long and how much a stream inbox keeps (`x-max-age`, `x-max-length-bytes`). RabbitMQ
/// drops whole segments past either; a node that reads slower than this loses nothing it has
/// not read only while it stays within it, so size it to the longest outage of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRetention {
    /// `x-max-age`, RabbitMQ's syntax: a number and a unit of `Y M D h m s` (e.g. `7D`).
    pub max_age: String,
    /// `x-max-length-bytes`.
    pub max_bytes: u64,
}

impl Default for StreamRetention {
    fn default() -> Self {
        StreamRetention {
            max_age: "7D".to_string(),
            max_bytes: 20 * 1024 * 1024 * 1024,
        }
    }
}

impl StreamRetention {
    /// `max_age` as a duration, or why it is not RabbitMQ's syntax.
    pub fn max_age_duration(&self) -> Result<std::time::Duration, String> {
        let s = self.max_age.as_str();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("`{s}` is not a number and a unit (Y, M, D, h, m, s)"))?;
        let secs = match unit {
            "Y" => 365 * 86_400,
            "M" => 30 * 86_400,
            "D" => 86_400,
            "h" => 3_600,
            "m" => 60,
            "s" => 1,
            _ => return Err(format!("`{s}`: the unit is one of Y, M, D, h, m, s")),
        };
        if n == 0 {
            return Err(format!("`{s}` keeps nothing"));
        }
        Ok(std::time::Duration::from_secs(n.saturating_mul(secs)))
    }
}

/// Arguments of an inbox of `queue_type`: the type, and for a stream its retention.
pub fn inbox_args(queue_type: QueueType, retention: &StreamRetention) -> FieldTable {
    let mut args = plain_queue_args(queue_type);
    if queue_type == QueueType::Stream {
        args.insert(
            ShortString::from("x-max-age"),
            AMQPValue::LongString(LongString::from(retention.max_age.as_str())),
        );
        args.insert(
            ShortString::from("x-max-length-bytes"),
            AMQPValue::LongLongInt(i64::try_from(retention.max_bytes).unwrap_or(i64::MAX)),
        );
    }
    args
}

/// Declare a durable fanout exchange (`drawbridge.control`, `drawbridge.notify`).
pub async fn declare_fanout(ch: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        ShortString::from(exchange),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Declare the durable direct exchange `exchange` and bind `queue` to it with the queue's
/// own name as routing key, so a publish to `exchange` with routing key `queue` lands in
/// `queue`, as it would through the default exchange. Dead letters and inbox messages go
/// this way: a broker user can then be allowed to write to these queues and no others.
pub async fn bind_to_direct(ch: &Channel, exchange: &str, queue: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        ShortString::from(exchange),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        ShortString::from(queue),
        ShortString::from(exchange),
        ShortString::from(queue),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// The name of a new exclusive queue bound to `exchange`: `<exchange>.<random>`.
///
/// Named after its exchange rather than server-named (`amq.gen-…`) so that broker
/// permissions can tell one party's queues from another's: the bridge's control queues
/// (`drawbridge.control.…`) and a node's notify queues (`drawbridge.notify.…`) match
/// different patterns. Falls back to a server-named queue for an exchange name so long that
/// the result would not fit in an AMQP short string.
pub fn exclusive_queue_name(exchange: &str) -> String {
    let name = format!("{exchange}.{}", uuid::Uuid::new_v4().simple());
    if name.len() > 255 {
        String::new()
    } else {
        name
    }
}

/// Declare the fanout `exchange` and bind a new exclusive queue to it (named by
/// [`exclusive_queue_name`]): how each bridge instance hears every control message, and a
/// node every notification. Returns the queue's name.
pub async fn bind_exclusive_queue(
    ch: &Channel,
    exchange: &str,
) -> Result<ShortString, lapin::Error> {
    declare_fanout(ch, exchange).await?;
    let q = ch
        .queue_declare(
            ShortString::from(exclusive_queue_name(exchange)),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        ShortString::from(exchange),
        ShortString::from(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(q.name().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_queues_are_fenced_and_dead_letter_what_the_broker_drops() {
        let args = peer_queue_args(QueueType::Quorum, "dlq");
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-single-active-consumer"),
            Some(AMQPValue::Boolean(true))
        );
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("".into()))
        );
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("dlq".into()))
        );
    }

    #[test]
    fn the_older_arguments_keep_the_fence_without_dead_lettering() {
        let args = fenced_queue_args(QueueType::Classic);
        assert_eq!(
            args.inner().get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        assert!(args.inner().get("x-queue-type").is_some());
        assert_eq!(args.inner().len(), 2);
    }

    #[test]
    fn exclusive_queues_are_named_after_their_exchange() {
        let a = exclusive_queue_name("drawbridge.control");
        let b = exclusive_queue_name("drawbridge.control");
        assert!(a.starts_with("drawbridge.control.") && a.len() > 30, "{a}");
        assert_ne!(a, b);
        assert_eq!(exclusive_queue_name(&"x".repeat(230)), "");
    }

    #[test]
    fn queue_types_parse_and_print() {
        assert_eq!("quorum".parse::<QueueType>(), Ok(QueueType::Quorum));
        assert_eq!(QueueType::Classic.to_string(), "classic");
        assert!("lazy".parse::<QueueType>().is_err());
    }
}
