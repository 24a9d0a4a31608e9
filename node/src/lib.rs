//! What a Drawbridge node does on its own broker, as a library: publish control messages
//! (sequenced, with `user_id` set to the node's broker login), answer the bridge's snapshot
//! requests, and declare peer queues with the arguments the bridge expects. Reading the
//! inbox: [`dedup::Seen`] drops the duplicates a queue inbox may hold, and
//! [`stream_inbox::StreamInbox`] reads a stream inbox from where the node stopped.
//!
//! The message types are `drawbridge-control-protocol`'s; this crate adds the broker side
//! (lapin). The operator CLI, the test kit and the demo use it, and it is the reference for
//! nodes written in other languages (see `examples/node-python/`).
//!
//! Ordering: every control message carries a sequence from one [`SequenceSource`] per node
//! identity. Take a snapshot's sequence *before* reading the link set it describes, and a
//! create's or delete's *after* changing the link set; then whichever arrives last, the
//! bridge ends up with the newer state (it ignores messages older than what it applied).
#![forbid(unsafe_code)]

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub mod connect;
pub mod dedup;
pub mod stream_inbox;
pub mod topology;

pub use connect::{connect_with, BrokerTls, ConnectOptions};
use drawbridge_control_protocol::{ControlCommand, Notification, SequencedCommand, Snapshot};
use futures::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
    uri::AMQPUri,
    BasicProperties, Channel, Connection,
};
use topology::QueueType;

/// Default fanout exchange nodes publish control messages to.
pub const CONTROL_EXCHANGE: &str = "drawbridge.control";
/// Default fanout exchange bridges publish snapshot requests and link status to.
pub const NOTIFY_EXCHANGE: &str = "drawbridge.notify";
/// Content type of control and notify messages.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// How long [`connect`] waits for a broker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What went wrong talking to the broker as a node.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The broker refused or failed an operation.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker did not answer a connection attempt in time.
    #[error("connecting to {uri} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The URI tried, its password hidden ([`redact_uri`]).
        uri: String,
        /// [`CONNECT_TIMEOUT`].
        timeout: Duration,
    },
    /// A broker URI does not parse.
    #[error("invalid broker URI: {0}")]
    Uri(String),
    /// The broker answered a publish with something other than a plain ack.
    #[error("control message not accepted by the broker: {0}")]
    NotConfirmed(String),
    /// None of the broker URIs could be reached.
    #[error("no broker URI could be reached ({0})")]
    NoBroker(String),
    /// The snapshot responder did not get going in time.
    #[error("the snapshot responder did not start within {0:?}")]
    ResponderTimeout(Duration),
    /// An argument is out of range (e.g. a queue type that is not `classic` / `quorum`).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An `amqps://` URI without a CA to verify the broker's certificate with: no system
    /// roots are trusted, so the handshake could only fail.
    #[error("amqps:// needs the CA certificate that issued the broker's certificate (no system roots are trusted)")]
    TlsCaMissing,
    /// TLS material given for an `amqp://` URI: the connection would not use it.
    #[error("a broker CA or client certificate is set, but the URI is amqp://: the connection would not use TLS (use amqps://)")]
    TlsWithoutAmqps,
}

/// Connect to one broker URI, within [`CONNECT_TIMEOUT`], without TLS material (so
/// `amqp://` only; see [`connect_with`] for `amqps://`).
pub async fn connect(uri: &str) -> Result<Connection, NodeError> {
    connect_with(uri, &ConnectOptions::default()).await
}

/// Connect to the first of `uris` that answers (a cluster's nodes, in turn).
pub async fn connect_any(uris: &[String]) -> Result<Connection, NodeError> {
    connect_any_with(uris, &ConnectOptions::default()).await
}

/// [`connect_any`] with TLS or other [`ConnectOptions`].
pub async fn connect_any_with(
    uris: &[String],
    options: &ConnectOptions,
) -> Result<Connection, NodeError> {
    connect::connect_first(uris, 0, |uri| async move {
        connect_with(&uri, options).await.map_err(|e| match e {
            // It names the URI already.
            NodeError::ConnectTimeout { timeout, .. } => format!("no answer within {timeout:?}"),
            e => e.to_string(),
        })
    })
    .await
    .map(|(c, _)| c)
    .map_err(NodeError::NoBroker)
}

/// A URI with its password hidden, for logs and error messages. Every message that names a
/// broker URI goes through this.
///
/// The URI is parsed (as lapin parses it, with the `url` crate), so a password holding `@`
/// or `:` is hidden whole. A string without an authority part that might hold credentials
/// (it has an `@`) is not shown at all.
pub fn redact_uri(uri: &str) -> String {
    const HIDDEN: &str = "(URI not shown: it may hold a password)";
    match url::Url::parse(uri) {
        Ok(mut u) if u.has_host() => {
            if u.password().is_some() && u.set_password(Some("***")).is_err() {
                return HIDDEN.into();
            }
            u.to_string()
        }
        // No authority (`amqp:user:pw@host`) or not a URI at all: show it only if it cannot
        // hold credentials.
        _ if uri.contains('@') => HIDDEN.into(),
        _ => uri.to_string(),
    }
}

/// Whether a broker URI's authority holds a password (even an empty one: `user:@host`).
/// lapin fills in `guest` for a missing one, so its parsed URI cannot tell.
pub fn uri_has_password(uri: &str) -> bool {
    url::Url::parse(uri).is_ok_and(|u| u.password().is_some())
}

/// The login name in a broker URI (`guest` when the URI names none, as lapin does): the
/// `user_id` RabbitMQ accepts on this connection's publishes.
pub fn broker_login(uri: &str) -> Result<String, NodeError> {
    let parsed: AMQPUri = uri.parse().map_err(NodeError::Uri)?;
    Ok(parsed.authority.userinfo.username)
}

/// Sequence numbers for one node identity's control messages: strictly increasing, also
/// across restarts, because each is at least the wall clock in milliseconds.
///
/// `next()` returns `max(last + 1, now_ms)`. A node restarted within the same millisecond
/// count still moves forward as long as its clock does not step back by more than it was down.
///
/// Each source also has an [`epoch`](SequenceSource::epoch), a random id sent with every
/// message: a bridge restarts its ordering for the node at an epoch it has not seen. So if the
/// numbers ever went wrong (the clock was far ahead when a message went out, a persisted
/// counter was corrupt), a new source (a restarted node) is obeyed again at once instead of
/// being ignored until its numbers catch up. Bridges that predate epochs ignore it and rely on
/// the numbers alone, which is why they still follow the wall clock.
#[derive(Debug)]
pub struct SequenceSource {
    /// The last number handed out.
    last: AtomicU64,
    /// This source's epoch (non-zero).
    epoch: u64,
}

impl Default for SequenceSource {
    fn default() -> Self {
        Self::starting_after(0)
    }
}

impl SequenceSource {
    /// A source seeded from the wall clock, with a new epoch.
    pub fn new() -> Self {
        Self::default()
    }

    /// A source whose next number is above `last` (e.g. persisted by the node), with a new
    /// epoch.
    pub fn starting_after(last: u64) -> Self {
        SequenceSource {
            last: AtomicU64::new(last),
            epoch: new_epoch(),
        }
    }

    /// This source's epoch: random, non-zero, sent with each of its numbers.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next sequence number.
    pub fn next(&self) -> u64 {
        self.next_at(unix_ms())
    }

    fn next_at(&self, now_ms: u64) -> u64 {
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = last.saturating_add(1).max(now_ms);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

/// A random non-zero 64-bit epoch (from a v4 UUID's random bits).
fn new_epoch() -> u64 {
    let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
    (hi ^ lo).max(1)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One node's identity on its broker: who it is, what it logs in as, where control messages
/// go, and its sequence source. Cheap to clone (the sequence source is shared).
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's identity (its legal name), written into every control message.
    pub identity: String,
    /// Broker login, sent as `user_id` (RabbitMQ checks it against the connection's login,
    /// so the bridge can trust it).
    pub user: String,
    /// Control exchange (default [`CONTROL_EXCHANGE`]).
    pub control_exchange: String,
    /// Notify exchange (default [`NOTIFY_EXCHANGE`]).
    pub notify_exchange: String,
    /// Where sequence numbers come from; share one per node identity.
    pub sequence: Arc<SequenceSource>,
    /// How [`Node::answer_snapshot_requests`] connects (TLS for `amqps://` brokers).
    pub connect: ConnectOptions,
}

impl Node {
    /// A node named `identity` that logs in as `user`, with the default exchanges and a
    /// wall-clock-seeded sequence source.
    pub fn new(identity: impl Into<String>, user: impl Into<String>) -> Self {
        Node {
            identity: identity.into(),
            user: user.into(),
            control_exchange: CONTROL_EXCHANGE.into(),
            notify_exchange: NOTIFY_EXCHANGE.into(),
            sequence: Arc::new(SequenceSource::new()),
            connect: ConnectOptions::default(),
        }
    }

    /// The same node, connecting with `options` (e.g. TLS material for `amqps://`).
    pub fn with_connect_options(mut self, options: ConnectOptions) -> Self {
        self.connect = options;
        self
    }

    /// A node named `identity` that logs in with the credentials of `uri`.
    pub fn for_uri(identity: impl Into<String>, uri: &str) -> Result<Self, NodeError> {
        Ok(Self::new(identity, broker_login(uri)?))
    }

    /// Publish `command` with the next sequence number; returns that number.
    ///
    /// Take care to call this *after* changing the state `command` describes (for a create or
    /// delete); for snapshots use [`Node::publish_snapshot`], which orders it the other way.
    pub async fn publish(&self, ch: &Channel, command: ControlCommand) -> Result<u64, NodeError> {
        let msg = SequencedCommand {
            sequence: self.sequence.next(),
            epoch: self.sequence.epoch(),
            command,
        };
        self.publish_sequenced(ch, &msg).await?;
        Ok(msg.sequence)
    }

    /// Take the next sequence number, *then* call `links` for the current link set, and
    /// publish that snapshot; returns the sequence number.
    pub async fn publish_snapshot(
        &self,
        ch: &Channel,
        snapshot: impl FnOnce() -> Snapshot,
    ) -> Result<u64, NodeError> {
        let sequence = self.sequence.next();
        let msg = SequencedCommand {
            sequence,
            epoch: self.sequence.epoch(),
            command: ControlCommand::Snapshot(snapshot()),
        };
        self.publish_sequenced(ch, &msg).await?;
        Ok(sequence)
    }

    /// Publish `msg` as it is (its own sequence, 0 for unsequenced) to the control exchange,
    /// declaring the exchange first, with `user_id` set to [`Node::user`]. Waits for the
    /// publisher confirm if the channel is in confirm mode.
    pub async fn publish_sequenced(
        &self,
        ch: &Channel,
        msg: &SequencedCommand,
    ) -> Result<(), NodeError> {
        topology::declare_fanout(ch, &self.control_exchange).await?;
        let confirmation = ch
            .basic_publish(
                ShortString::from(self.control_exchange.as_str()),
                ShortString::from(""),
                BasicPublishOptions::default(),
                &msg.encode(),
                BasicProperties::default()
                    .with_content_type(ShortString::from(CONTENT_TYPE))
                    .with_user_id(ShortString::from(self.user.as_str())),
            )
            .await?
            .await?;
        match confirmation {
            lapin::Confirmation::Nack(_) => {
                Err(NodeError::NotConfirmed(format!("{:?}", confirmation)))
            }
            _ => Ok(()),
        }
    }

    /// Answer every `SnapshotRequest` on the notify exchange with a fresh snapshot from
    /// `snapshot` (sequenced as [`Node::publish_snapshot`] does), reconnecting across `uris`
    /// if the broker goes away. Sends one snapshot as soon as it listens, for a bridge that is
    /// already waiting. Returns once listening; stops when the responder is dropped.
    pub async fn answer_snapshot_requests<F>(
        &self,
        uris: Vec<String>,
        snapshot: F,
    ) -> Result<SnapshotResponder, NodeError>
    where
        F: Fn() -> Snapshot + Send + Sync + 'static,
    {
        let answered = Arc::new(AtomicU64::new(0));
        let count = answered.clone();
        let node = self.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                let session = async {
                    let conn = connect_any_with(&uris, &node.connect).await?;
                    let ch = conn.create_channel().await?;
                    let q = bind_notify_queue(&ch, &node.notify_exchange).await?;
                    let mut consumer = ch
                        .basic_consume(
                            q,
                            ShortString::from("drawbridge-node-snapshot-responder"),
                            BasicConsumeOptions {
                                no_ack: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await?;
                    node.publish_snapshot(&ch, &snapshot).await?;
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                    while let Some(d) = consumer.next().await {
                        let d = d?;
                        if let Ok(Notification::SnapshotRequest(r)) = Notification::decode(&d.data)
                        {
                            let seq = node.publish_snapshot(&ch, &snapshot).await?;
                            tracing::debug!(bridge = %r.bridge_id, sequence = seq, "answered a snapshot request");
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok::<_, NodeError>(())
                };
                if let Err(e) = session.await {
                    tracing::debug!(error = %e, "snapshot responder session ended; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let startup = Duration::from_secs(30);
        if tokio::time::timeout(startup, ready_rx).await.is_err() {
            task.abort();
            return Err(NodeError::ResponderTimeout(startup));
        }
        Ok(SnapshotResponder { task, answered })
    }
}

/// A running snapshot responder (see [`Node::answer_snapshot_requests`]); stops when dropped.
#[derive(Debug)]
pub struct SnapshotResponder {
    task: tokio::task::JoinHandle<()>,
    answered: Arc<AtomicU64>,
}

impl SnapshotResponder {
    /// How many snapshot requests were answered.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for SnapshotResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Queue arguments of a peer queue (see [`topology::peer_queue_args`]) with the default
/// dead-letter queue. Whoever declares first wins and the broker refuses a redeclare with
/// other arguments, so the node and the bridge both use these.
pub fn peer_queue_args(queue_type: QueueType) -> FieldTable {
    topology::peer_queue_args(queue_type, topology::DEAD_LETTER_QUEUE)
}

/// Declare a durable peer queue with [`peer_queue_args`] (`queue_type`: `classic` or `quorum`,
/// as the bridge's `peer_queue_type`).
pub async fn declare_peer_queue(
    ch: &Channel,
    queue: &str,
    queue_type: &str,
) -> Result<(), NodeError> {
    let queue_type: QueueType = queue_type.parse().map_err(NodeError::Invalid)?;
    ch.queue_declare(
        ShortString::from(queue),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        peer_queue_args(queue_type),
    )
    .await?;
    Ok(())
}

/// Declare the notify fanout exchange and bind a new exclusive queue to it (how a node hears
/// snapshot requests and link status events); returns the queue's name.
pub async fn bind_notify_queue(ch: &Channel, exchange: &str) -> Result<ShortString, NodeError> {
    Ok(topology::bind_exclusive_queue(ch, exchange).await?)
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, LongString};

    use super::*;

    #[test]
    fn sequences_increase_and_follow_the_clock() {
        let s = SequenceSource::starting_after(0);
        assert_eq!(s.next_at(1_000), 1_000);
        // Several in the same millisecond, or with the clock stepping back, still increase.
        assert_eq!(s.next_at(1_000), 1_001);
        assert_eq!(s.next_at(900), 1_002);
        assert_eq!(s.next_at(5_000), 5_000);
        // A restart (new source) later in time starts above the old one's numbers.
        let restarted = SequenceSource::new();
        assert!(restarted.next() > 1_700_000_000_000);
        let persisted = SequenceSource::starting_after(u64::MAX - 1);
        assert_eq!(persisted.next_at(1), u64::MAX);
    }

    #[test]
    fn every_source_has_its_own_non_zero_epoch() {
        let epochs: std::collections::HashSet<u64> =
            (0..100).map(|_| SequenceSource::new().epoch()).collect();
        assert_eq!(epochs.len(), 100);
        assert!(!epochs.contains(&0));
        let s = SequenceSource::new();
        s.next();
        assert_eq!(s.epoch(), s.epoch(), "fixed for the source's life");
    }

    #[test]
    fn login_comes_from_the_uri() {
        assert_eq!(
            broker_login("amqp://node-a:secret@127.0.0.1:5672/%2f").unwrap(),
            "node-a"
        );
        assert_eq!(broker_login("amqp://127.0.0.1:5672").unwrap(), "guest");
        assert!(broker_login("http://x").is_err());
    }

    #[test]
    fn peer_queue_arguments_match_the_bridge_contract() {
        let args = peer_queue_args(QueueType::Quorum);
        let inner = args.inner();
        assert_eq!(
            inner.get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        assert_eq!(
            inner.get("x-queue-type"),
            Some(&AMQPValue::LongString(LongString::from("quorum")))
        );
        assert_eq!(
            inner.get("x-dead-letter-routing-key"),
            Some(&AMQPValue::LongString(LongString::from(
                topology::DEAD_LETTER_QUEUE
            )))
        );
    }
}
