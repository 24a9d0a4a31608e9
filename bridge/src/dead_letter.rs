//! Dead-lettering: what a link does with a message that can never be delivered.
//!
//! The copy goes to the dead-letter queue with a `drawbridge-reason` header, and the peer
//! delivery is acked only after the broker confirmed the copy. Two rules keep that from
//! turning into a loop or a loss:
//!
//! - the copy drops what would make the broker refuse or drop it: `user_id` (RabbitMQ
//!   refuses a `user_id` other than the publisher's login with `PRECONDITION_FAILED`, and
//!   the bridge's login is rarely the node's) and `expiration` (the copy would vanish from
//!   the dead-letter queue). Both are kept as `drawbridge-original-*` headers;
//! - the copy is published on a channel of its own, so a refused publish closes that
//!   channel only, never the consumer's (which would requeue the peer message and
//!   dead-letter it again, forever). A failed publish is retried with backoff, the dead-letter
//!   queue declared again first, while the link holds the message: the link pauses, in
//!   order, instead of looping.
//!
//! The copy is published through a direct exchange named like the dead-letter queue and
//! bound to it, not through the default exchange: write access to `amq.default` would let
//! the bridge's broker user write into every queue (inboxes included), while this way it
//! needs write access to the dead-letter exchange and queue only (see `deploy/rabbitmq/`).

use std::time::Duration;

use drawbridge_mapping::{self as mapping, headers};
use drawbridge_node::topology::{self, QueueType};
use drawbridge_runtime::{backoff::Backoff, broker::Live, text};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Header keeping a dead-lettered message's original `user_id`.
pub const ORIGINAL_USER_ID: &str = "drawbridge-original-user-id";
/// Header keeping a dead-lettered message's original `expiration`.
pub const ORIGINAL_EXPIRATION: &str = "drawbridge-original-expiration";
/// Header of a dead-letter copy that left the message's own headers out because with them
/// it would not fit one broker frame: the encoded size of the properties it would have had.
pub const HEADERS_DROPPED: &str = "drawbridge-original-headers-dropped";

/// `copy` (from [`copy_properties`]) if its properties fit one content header frame of a
/// connection whose `frame_max` is `frame_max`; otherwise the copy with only the headers the
/// copy itself adds, and [`HEADERS_DROPPED`]. The copy's headers are the message's plus the
/// reason and origin: for a message whose headers nearly filled a frame, the copy would not
/// fit, and publishing it would fail the bridge's whole broker connection (`frame_too_large`)
/// and redeliver the message, to be dead-lettered again, forever. The body and the other
/// properties are kept.
pub fn fit_frame(copy: BasicProperties, frame_max: u32) -> BasicProperties {
    let len = mapping::properties_len(&copy);
    if mapping::fits_frame(len, frame_max) {
        return copy;
    }
    let own = [
        headers::REASON,
        headers::ORIGIN_QUEUE,
        ORIGINAL_USER_ID,
        ORIGINAL_EXPIRATION,
    ];
    let mut kept = FieldTable::default();
    if let Some(h) = copy.headers() {
        for (k, v) in h.inner() {
            if own.contains(&k.as_str()) {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    kept.insert(
        ShortString::from(HEADERS_DROPPED),
        AMQPValue::LongLongInt(i64::try_from(len).unwrap_or(i64::MAX)),
    );
    copy.with_headers(kept)
}

/// Why one attempt to dead-letter failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Opening the channel or declaring the queue failed.
    #[error("dead-letter queue `{queue}` unavailable: {source}")]
    Queue {
        /// The dead-letter queue.
        queue: String,
        /// Cause.
        source: lapin::Error,
    },
    /// The publish failed or the broker nacked or returned it.
    #[error("dead-letter publish refused: {0}")]
    Refused(String),
    /// No answer within the broker operation timeout.
    #[error("dead-letter {what} timed out after {after:?}")]
    TimedOut {
        /// What was waited for.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
}

/// Why [`DeadLetterer::publish`] gave up without publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// The link is stopping.
    Stopped,
    /// The broker connection is gone (its deliveries can no longer be acked anyway).
    BrokerLost,
}

/// Longest `drawbridge-reason` kept, in bytes. A reason can quote what a float said (a
/// rejection's description, as long as a frame); the header is for an operator to read.
pub const MAX_REASON: usize = 1024;

/// `s` in at most `max` bytes: cut on a character boundary, with a note of how long it was.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let note = format!("… ({} bytes in all)", s.len());
    format!(
        "{}{note}",
        text::truncate(s, max.saturating_sub(note.len()))
    )
}

/// The properties of the dead-letter copy of a message with properties `p` (the reason cut
/// to [`MAX_REASON`]).
pub fn copy_properties(p: &BasicProperties, reason: &str, origin_queue: &str) -> BasicProperties {
    let mut hdrs = p.headers().clone().unwrap_or_default();
    hdrs.insert(
        ShortString::from(headers::REASON),
        AMQPValue::LongString(LongString::from(cut(reason, MAX_REASON).as_str())),
    );
    hdrs.insert(
        ShortString::from(headers::ORIGIN_QUEUE),
        AMQPValue::LongString(LongString::from(origin_queue)),
    );
    if let Some(u) = p.user_id() {
        hdrs.insert(
            ShortString::from(ORIGINAL_USER_ID),
            AMQPValue::LongString(LongString::from(u.as_str())),
        );
    }
    if let Some(e) = p.expiration() {
        hdrs.insert(
            ShortString::from(ORIGINAL_EXPIRATION),
            AMQPValue::LongString(LongString::from(e.as_str())),
        );
    }
    // Rebuilt field by field: lapin has no way to unset a property.
    let mut out = BasicProperties::default()
        .with_headers(hdrs)
        .with_delivery_mode(2);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// `props` fitted into one frame of at most `max` bytes of properties.
///
/// A message delivered near the broker's frame size leaves no room for the headers a
/// dead-letter copy adds, and a publish that does not fit would close the bridge's whole
/// broker connection (the message would come back for ever). So what we added gives way, in
/// this order, until the copy fits: the reason is cut to the room there is; then it becomes a
/// short note and the origin queue goes; then the kept `user_id` and `expiration`; then the
/// reason itself. The node's own headers and the body are never touched, and the full reason
/// is in the bridge's log line. `None` if even the node's headers alone do not fit.
pub fn fit(props: BasicProperties, max: usize) -> Option<BasicProperties> {
    let len = mapping::properties_len(&props);
    if len <= max {
        return Some(props);
    }
    let mut hdrs = props.headers().clone().unwrap_or_default();
    let with = |hdrs: &lapin::types::FieldTable| {
        let p = props.clone().with_headers(hdrs.clone());
        (mapping::properties_len(&p) <= max).then_some(p)
    };
    if let Some(AMQPValue::LongString(r)) = hdrs.inner().get(headers::REASON) {
        let reason = String::from_utf8_lossy(r.as_bytes()).into_owned();
        if let Some(room) = reason.len().checked_sub(len - max) {
            hdrs.insert(
                ShortString::from(headers::REASON),
                AMQPValue::LongString(LongString::from(cut(&reason, room).as_str())),
            );
            if let Some(p) = with(&hdrs) {
                return Some(p);
            }
        }
    }
    hdrs.insert(
        ShortString::from(headers::REASON),
        AMQPValue::LongString(LongString::from(NO_ROOM_FOR_REASON)),
    );
    // FieldTable has no `remove`: rebuilt without the keys.
    let without = |hdrs: &lapin::types::FieldTable, keys: &[&str]| {
        let kept: std::collections::BTreeMap<_, _> = hdrs
            .inner()
            .iter()
            .filter(|(k, _)| !keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        lapin::types::FieldTable::from(kept)
    };
    let hdrs = without(&hdrs, &[headers::ORIGIN_QUEUE]);
    if let Some(p) = with(&hdrs) {
        return Some(p);
    }
    let hdrs = without(&hdrs, &[ORIGINAL_USER_ID, ORIGINAL_EXPIRATION]);
    if let Some(p) = with(&hdrs) {
        return Some(p);
    }
    with(&without(&hdrs, &[headers::REASON]))
}

/// The reason of a dead-letter copy whose headers leave no room for the real one.
pub const NO_ROOM_FOR_REASON: &str = "no room for the reason in a broker frame: see the bridge log";

/// A link's publisher into the dead-letter queue.
#[derive(Debug)]
pub struct DeadLetterer {
    /// Dead-letter queue name.
    queue: String,
    /// Its `x-queue-type`.
    queue_type: QueueType,
    /// Confirm-mode channel of its own (see the module docs), opened lazily.
    channel: Option<Channel>,
    /// Broker operation timeout.
    op: Duration,
    /// Delay between failed attempts.
    backoff: Backoff,
}

impl DeadLetterer {
    /// A dead-letterer into `queue`.
    pub fn new(queue: &str, queue_type: QueueType, op: Duration) -> Self {
        DeadLetterer {
            queue: queue.to_string(),
            queue_type,
            channel: None,
            op,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        }
    }

    /// Open the channel, declare the dead-letter queue and bind it to its exchange; a link
    /// calls this before it consumes, so nothing is taken from a peer queue while there is
    /// nowhere to put what cannot be delivered.
    pub async fn prepare(&mut self, live: &Live) -> Result<(), DeadLetterError> {
        self.channel = None;
        let queue = self.queue.clone();
        let args = topology::plain_queue_args(self.queue_type);
        let opened = tokio::time::timeout(self.op, async {
            let ch = live.conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            ch.queue_declare(
                ShortString::from(queue.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
            topology::bind_to_direct(&ch, &queue, &queue).await?;
            Ok::<_, lapin::Error>(ch)
        })
        .await;
        match opened {
            Ok(Ok(ch)) => {
                self.channel = Some(ch);
                Ok(())
            }
            Ok(Err(source)) => Err(DeadLetterError::Queue { queue, source }),
            Err(_) => Err(DeadLetterError::TimedOut {
                what: "queue declare",
                after: self.op,
            }),
        }
    }

    /// One publish of `body` with `props`, awaiting the confirm.
    async fn publish_once(
        &mut self,
        live: &Live,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), DeadLetterError> {
        let ch = match &self.channel {
            Some(ch) if ch.status().connected() => ch.clone(),
            _ => {
                self.prepare(live).await?;
                self.channel.clone().expect("prepared")
            }
        };
        let op = self.op;
        let confirm = tokio::time::timeout(op, async {
            ch.basic_publish(
                ShortString::from(self.queue.as_str()),
                ShortString::from(self.queue.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?
            .await
        })
        .await;
        let result = match confirm {
            Ok(Ok(Confirmation::Ack(None))) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(DeadLetterError::Refused(format!(
                "unroutable: no queue `{}`",
                self.queue
            ))),
            Ok(Ok(other)) => Err(DeadLetterError::Refused(format!("{other:?}"))),
            Ok(Err(e)) => Err(DeadLetterError::Refused(e.to_string())),
            Err(_) => Err(DeadLetterError::TimedOut {
                what: "publish confirm",
                after: op,
            }),
        };
        // Start from a fresh channel (and a fresh declare) next time.
        self.channel = None;
        result
    }

    /// Dead-letter a message: publish its copy, retrying with backoff until the broker
    /// confirmed it. Returns early only when the link stops or the broker connection is
    /// lost; the peer message is then left unacked (it is redelivered later, never lost).
    pub async fn publish(
        &mut self,
        live: &Live,
        body: &[u8],
        props: BasicProperties,
        link: &str,
        stop: &CancellationToken,
    ) -> Result<(), Interrupted> {
        // The copy must fit one frame of this connection: what we added gives way first
        // ([`fit`]); only if the message's own headers alone do not fit are they left out
        // ([`fit_frame`]), so that the body still reaches the dead-letter queue.
        let frame_max = live.conn.configuration().frame_max();
        let max = match frame_max {
            0 => usize::MAX,
            f => (f as usize).saturating_sub(mapping::CONTENT_HEADER_OVERHEAD),
        };
        let props = match fit(props.clone(), max) {
            Some(p) => p,
            None => {
                warn!(queue = %link, dead_letter_queue = %self.queue, "the dead-letter copy leaves the message's headers out: with them it would not fit a broker frame");
                fit_frame(props, frame_max)
            }
        };
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            match self.publish_once(live, body, props.clone()).await {
                Ok(()) => {
                    if let Some(t) = failing_since {
                        info!(queue = %link, dead_letter_queue = %self.queue, failing_for = ?t.elapsed(), "dead-lettering works again");
                    }
                    self.backoff.reset();
                    return Ok(());
                }
                Err(e) => {
                    metrics::counter!("drawbridge_bridge_dead_letter_failures_total").increment(1);
                    let delay = self.backoff.next_delay();
                    if failing_since.is_none() {
                        // One line per episode, not per attempt.
                        warn!(queue = %link, dead_letter_queue = %self.queue, reason = %e, retry_in = ?delay, "dead-lettering failed; the link holds the message and retries");
                        failing_since = Some(tokio::time::Instant::now());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return Err(Interrupted::Stopped),
                        _ = live.lost() => return Err(Interrupted::BrokerLost),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(p: &BasicProperties, k: &str) -> Option<AMQPValue> {
        p.headers().as_ref().and_then(|h| h.inner().get(k).cloned())
    }

    #[test]
    fn the_copy_keeps_the_message_but_not_what_the_broker_would_refuse_or_expire() {
        let mut h = lapin::types::FieldTable::default();
        h.insert("app".into(), AMQPValue::LongInt(7));
        let p = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_user_id("node-a".into())
            .with_expiration("3000".into())
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_priority(4)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_timestamp(1_700_000_000)
            .with_type("t".into())
            .with_app_id("a".into())
            .with_cluster_id("cl".into())
            .with_delivery_mode(1)
            .with_headers(h);
        let c = copy_properties(&p, "too big", "drawbridge.peers.b");
        assert_eq!(c.user_id(), &None, "a user_id the bridge may not assert");
        assert_eq!(c.expiration(), &None, "the copy must not expire");
        assert_eq!(
            header(&c, ORIGINAL_USER_ID),
            Some(AMQPValue::LongString("node-a".into()))
        );
        assert_eq!(
            header(&c, ORIGINAL_EXPIRATION),
            Some(AMQPValue::LongString("3000".into()))
        );
        assert_eq!(
            header(&c, headers::REASON),
            Some(AMQPValue::LongString("too big".into()))
        );
        assert_eq!(
            header(&c, headers::ORIGIN_QUEUE),
            Some(AMQPValue::LongString("drawbridge.peers.b".into()))
        );
        assert_eq!(header(&c, "app"), Some(AMQPValue::LongInt(7)));
        assert_eq!(c.delivery_mode(), &Some(2), "persistent");
        assert_eq!(c.message_id(), p.message_id());
        assert_eq!(c.content_type(), p.content_type());
        assert_eq!(c.content_encoding(), p.content_encoding());
        assert_eq!(c.priority(), p.priority());
        assert_eq!(c.correlation_id(), p.correlation_id());
        assert_eq!(c.reply_to(), p.reply_to());
        assert_eq!(c.timestamp(), p.timestamp());
        assert_eq!(c.kind(), p.kind());
        assert_eq!(c.app_id(), p.app_id());
        assert_eq!(c.cluster_id(), p.cluster_id());
    }

    #[test]
    fn a_copy_too_big_for_a_frame_leaves_the_messages_headers_out() {
        let mut h = lapin::types::FieldTable::default();
        h.insert(
            "blob".into(),
            AMQPValue::LongString("h".repeat(32_700).into()),
        );
        let p = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_user_id("node-a".into())
            .with_headers(h);
        let copy = copy_properties(&p, "too big", "drawbridge.peers.b");
        assert!(!mapping::fits_frame(mapping::properties_len(&copy), 32_768));
        let fitted = fit_frame(copy.clone(), 32_768);
        assert!(mapping::fits_frame(
            mapping::properties_len(&fitted),
            32_768
        ));
        assert_eq!(header(&fitted, "blob"), None);
        assert_eq!(
            header(&fitted, headers::REASON),
            Some(AMQPValue::LongString("too big".into()))
        );
        assert!(header(&fitted, headers::ORIGIN_QUEUE).is_some());
        assert!(header(&fitted, ORIGINAL_USER_ID).is_some());
        assert!(matches!(
            header(&fitted, HEADERS_DROPPED),
            Some(AMQPValue::LongLongInt(n)) if n as usize == mapping::properties_len(&copy)
        ));
        assert_eq!(fitted.message_id(), copy.message_id());
        // A copy that fits is left alone.
        assert_eq!(fit_frame(copy.clone(), 65_536), copy);
    }

    #[test]
    fn a_message_without_user_id_or_expiration_gets_no_original_headers() {
        let c = copy_properties(&BasicProperties::default(), "r", "q");
        assert_eq!(header(&c, ORIGINAL_USER_ID), None);
        assert_eq!(header(&c, ORIGINAL_EXPIRATION), None);
    }

    #[test]
    fn a_long_reason_is_cut_and_a_copy_near_the_frame_size_is_fitted() {
        let huge = "r".repeat(200_000);
        let c = copy_properties(&BasicProperties::default(), &huge, "q");
        let Some(AMQPValue::LongString(r)) = header(&c, headers::REASON) else {
            panic!("no reason")
        };
        assert!(
            r.as_bytes().len() < MAX_REASON + 64,
            "{}",
            r.as_bytes().len()
        );

        // An original whose headers take nearly the whole frame: the reason shrinks to fit.
        let max = 32 * 1024 - mapping::CONTENT_HEADER_OVERHEAD;
        let mut h = lapin::types::FieldTable::default();
        h.insert(
            "blob".into(),
            AMQPValue::LongString(vec![b'x'; max - 600].into()),
        );
        let p = BasicProperties::default().with_headers(h);
        let c = copy_properties(&p, &"why ".repeat(200), "drawbridge.peers.b");
        assert!(mapping::properties_len(&c) > max);
        let fitted = fit(c, max).expect("fits once the reason is cut");
        assert!(mapping::properties_len(&fitted) <= max);
        let Some(AMQPValue::LongString(r)) = header(&fitted, headers::REASON) else {
            panic!("no reason")
        };
        assert!(String::from_utf8_lossy(r.as_bytes()).starts_with("why why"));

        // No room for the reason: a note instead, then the additions go; the node's own
        // headers stay whole.
        for blob in [max - 100, max - 60, max - 20] {
            let mut h = lapin::types::FieldTable::default();
            h.insert(
                "blob".into(),
                AMQPValue::LongString(vec![b'x'; blob].into()),
            );
            let p = BasicProperties::default()
                .with_user_id("node".into())
                .with_headers(h.clone());
            let fitted = fit(copy_properties(&p, &"why ".repeat(50), "q"), max).expect("fits");
            assert!(mapping::properties_len(&fitted) <= max, "{blob}");
            assert_eq!(
                header(&fitted, "blob"),
                h.inner().get("blob").cloned(),
                "the node's header is whole"
            );
        }
        // The node's headers alone do not fit: nothing to publish (the caller retries with
        // backoff and never kills the connection).
        let mut h = lapin::types::FieldTable::default();
        h.insert("blob".into(), AMQPValue::LongString(vec![b'x'; max].into()));
        let p = BasicProperties::default().with_headers(h);
        assert!(fit(copy_properties(&p, "why", "q"), max).is_none());
    }
}
