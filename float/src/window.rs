//! The dedup window rebuilt from a *stream* inbox (`float.inbox_queue_type = "stream"`).
//!
//! With a queue inbox the window only knows what this float's broker confirmed since it
//! started: a float that restarts, takes over from another, or lost its broker connection
//! with publishes unconfirmed lets a resend of a stored message through as a duplicate. A
//! stream keeps what was read, so the float reads its inboxes back instead: what the stream
//! holds is the truth, whoever published it and whether or not a confirm came.
//!
//! # How
//!
//! - **A follower per inbox.** On every broker connection the float consumes each stream
//!   inbox from where it stopped (from `dedup.max_age` ago at start) and adds the
//!   `(sender, inbox, message id)` of every message it reads to the window. It reads
//!   everything, its own publishes included (they are in the window already, on confirm).
//! - **Rounds and markers.** A stream over AMQP 0.9.1 does not say where its end is. So the
//!   float *writes* one: a round publishes an empty marker message (header
//!   `drawbridge-window-marker` = `<instance>:<round>`) into each stream inbox, with a
//!   confirm, and is complete when the follower has read every marker back. Everything
//!   stored before the marker has been read by then.
//! - **The gate.** A link publishes nothing until a round has completed that (a) started
//!   after the link attached and (b) ran on the broker connection the link publishes on.
//!   (a) covers a link taken over from another float (its publishes are in the stream before
//!   our marker); (b) covers a start and every reconnect (publishes whose confirm was lost
//!   with the old connection are in the stream or nowhere). Until then the link holds its
//!   deliveries within its credit; nothing is settled, nothing is lost.
//! - **Markers are rare.** One round serves every link that attached before it started, and
//!   rounds after the first on a connection are at least [`MIN_ROUND_SPACING`] apart: a peer
//!   that attaches links in a loop causes at most a few markers a second, not one per link.
//!
//! What this does not cover (said in docs/guarantees.md): two floats publishing for the same
//! inbox *at the same time* (each reads the other's writes only at its next round), a resend
//! later than the window's age or beyond its capacity, and a publish still travelling inside
//! the broker from a connection that died when the round's marker overtook it.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use drawbridge_mapping::headers;
use drawbridge_runtime::{
    backoff::Backoff,
    broker::{BrokerSession, Live},
};
use futures::{stream::SelectAll, StreamExt};
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation,
};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dedup::{Dedup, ReadBack};

/// Rounds after the first on a connection start at least this far apart.
pub(crate) const MIN_ROUND_SPACING: Duration = Duration::from_millis(500);
/// Bytes a follower may have delivered and not acked, counting each message at the largest
/// size a peer may send: its prefetch is this divided by `max_message_size`, within
/// [`PREFETCH_MIN`, `PREFETCH_MAX`] (a stream consumer must have one).
const READ_BUDGET: u64 = 256 * 1024 * 1024;
const PREFETCH_MIN: u16 = 16;
const PREFETCH_MAX: u16 = 2000;
/// A round whose markers are not all read back within this is given up: the follower's
/// channel is closed and opened again (its connection may be half dead).
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// The last round completed, and on which broker connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Gate {
    /// `Live::generation` of the connection the round ran on (0: none yet).
    pub(crate) generation: u64,
    /// The round.
    pub(crate) round: u64,
}

/// One stream inbox as the follower sees it.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct InboxView {
    /// The inbox.
    inbox: String,
    /// The offset the follower reads next (`None`: from `max_age` ago).
    next_offset: Option<i64>,
    /// Messages read from it since start.
    read: u64,
    /// Of those, (sender, id) pairs the window did not hold yet.
    added: u64,
    /// Markers read (ours and other floats').
    markers: u64,
    /// The highest offset read: what is read again below it (a read back started over) is
    /// not a second stored copy.
    read_up_to: Option<i64>,
    /// (sender, id) pairs read back a second time within the window: copies stored twice
    /// (two publishers at once, or a resend while its first copy was in flight).
    duplicates_stored: u64,
}

/// What `/status` shows.
#[derive(Debug, Default)]
struct View {
    inboxes: Vec<InboxView>,
    rebuilds: u64,
    markers_published: u64,
    last_rebuild: Option<Duration>,
    rebuilding_since: Option<Instant>,
    last_error: Option<String>,
}

/// The window's rebuild from the stream inboxes, shared by the links (the gate) and the
/// follower task.
#[derive(Debug)]
pub(crate) struct StreamWindow {
    inboxes: Vec<Arc<str>>,
    /// Each follower's prefetch (see [`READ_BUDGET`]); acked every half of it.
    prefetch: u16,
    /// An inbox is not a stream: the follower stopped for good (a restart after fixing it).
    stopped: std::sync::atomic::AtomicBool,
    /// Tells this float's markers from another's (random per start).
    instance: String,
    /// Highest round asked for.
    requested: AtomicU64,
    asked: Notify,
    gate: watch::Sender<Gate>,
    view: Mutex<View>,
}

impl StreamWindow {
    /// A window rebuilt from `inboxes` (streams) holding messages of at most
    /// `max_message_size` bytes.
    pub(crate) fn new(inboxes: Vec<String>, max_message_size: usize) -> Arc<Self> {
        let prefetch = (READ_BUDGET / (max_message_size.max(1) as u64))
            .clamp(u64::from(PREFETCH_MIN), u64::from(PREFETCH_MAX));
        let view = View {
            inboxes: inboxes
                .iter()
                .map(|i| InboxView {
                    inbox: i.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        Arc::new(StreamWindow {
            inboxes: inboxes.into_iter().map(Arc::from).collect(),
            prefetch: u16::try_from(prefetch).unwrap_or(PREFETCH_MIN),
            stopped: std::sync::atomic::AtomicBool::new(false),
            instance: format!("{:016x}", instance_id()),
            requested: AtomicU64::new(0),
            asked: Notify::new(),
            gate: watch::Sender::new(Gate::default()),
            view: Mutex::new(view),
        })
    }

    /// Ask for a round; returns it. A link asks at attach and publishes once it completed.
    pub(crate) fn request(&self) -> u64 {
        let round = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.asked.notify_one();
        round
    }

    /// Whether a link that needs round `needed` may publish on connection `generation`.
    pub(crate) fn is_open(&self, needed: u64, generation: u64) -> bool {
        let g = *self.gate.borrow();
        g.generation == generation && g.round >= needed
    }

    /// Changes when a round completes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Gate> {
        self.gate.subscribe()
    }

    /// Whether the window is complete on `generation` (for readiness).
    pub(crate) fn ready_on(&self, generation: Option<u64>) -> bool {
        generation.is_some_and(|g| self.gate.borrow().generation == g)
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `/status`'s `window`.
    pub(crate) fn status(&self, generation: Option<u64>) -> serde_json::Value {
        let gate = *self.gate.borrow();
        let v = self.view();
        let state = if self.ready_on(generation) {
            "ready"
        } else {
            "rebuilding"
        };
        serde_json::json!({
            "mode": "stream",
            "state": state,
            "round": gate.round,
            "rounds_requested": self.requested.load(Ordering::Relaxed),
            "rebuilds": v.rebuilds,
            "last_rebuild_ms": v.last_rebuild.map(|d| d.as_millis() as u64),
            "rebuilding_for_ms": v.rebuilding_since.map(|t| t.elapsed().as_millis() as u64),
            "markers_published": v.markers_published,
            "last_error": v.last_error,
            "inboxes": v.inboxes,
        })
    }

    /// Follow the stream inboxes on every broker connection until `shutdown`.
    pub(crate) async fn run(
        self: Arc<Self>,
        broker: BrokerSession,
        dedup: Dedup,
        exchange: String,
        max_age: Duration,
        shutdown: CancellationToken,
    ) {
        let mut next: Vec<Option<i64>> = vec![None; self.inboxes.len()];
        // Wait for a connection newer than this one.
        let mut after = 0;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut failed_on = None;
        loop {
            let live = tokio::select! {
                live = broker.connected(after, Duration::from_secs(3600)) => live,
                _ = shutdown.cancelled() => return,
            };
            let Some(live) = live else { continue };
            // Retried on the same connection after a failure; a new one starts afresh.
            if failed_on != Some(live.generation) {
                backoff.reset();
            }
            {
                let mut v = self.view();
                v.rebuilds += 1;
                v.rebuilding_since.get_or_insert_with(Instant::now);
            }
            metrics::counter!("drawbridge_float_window_rebuilds_total").increment(1);
            metrics::gauge!("drawbridge_float_window_ready").set(0.0);
            let follower = Follower {
                window: &self,
                dedup: &dedup,
                exchange: &exchange,
                live: &live,
                op: broker.config().op_timeout,
                max_age,
            };
            let ended = tokio::select! {
                r = follower.follow(&mut next) => r,
                _ = shutdown.cancelled() => return,
            };
            metrics::gauge!("drawbridge_float_window_ready").set(0.0);
            self.view().rebuilding_since = Some(Instant::now());
            // The connection is gone: the next one rebuilds.
            after = live.generation;
            let Err(stop) = ended else { continue };
            if live.is_lost() {
                // An error on a connection that was going anyway (an ack or a publish that
                // met the reset): the next connection goes on from where this one stopped.
                continue;
            }
            let (reason, reread) = match stop {
                Stop::Retry(r) => (r, false),
                Stop::Reread(r) => (r, true),
            };
            if self.stopped.load(Ordering::SeqCst) {
                tracing::error!(reason = %reason, "stream window: stopped; links publish nothing until the inbox is a stream and the float restarted");
                self.view().last_error = Some(reason);
                shutdown.cancelled().await;
                return;
            }
            {
                let mut v = self.view();
                // One line per episode, not per retry.
                if v.last_error.is_none() {
                    warn!(reason = %reason, "stream window: cannot read the inbox stream back; links publish nothing until it is (retrying with backoff)");
                }
                v.last_error = Some(reason);
            }
            if reread {
                // Read the window's age again: where it stopped may be gone (a stream deleted
                // and declared again starts its offsets at 0).
                next.iter_mut().for_each(|n| *n = None);
            }
            failed_on = Some(live.generation);
            // Try again on this connection after a pause, unless it is lost meanwhile.
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => after = live.generation.saturating_sub(1),
                _ = live.lost() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Why following stopped before its connection ended.
#[derive(Debug)]
enum Stop {
    /// Try again on this connection after a pause, from where it stopped.
    Retry(String),
    /// Try again reading the window's age back: where it stopped may not exist any more (a
    /// round never read back, the consumer cancelled: the stream deleted and declared again).
    Reread(String),
}

impl From<String> for Stop {
    fn from(reason: String) -> Self {
        Stop::Retry(reason)
    }
}

/// A random id for this float's markers (std's hasher keys are random per process).
fn instance_id() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((std::process::id(), SystemTime::now()))
}

/// One connection's worth of following.
struct Follower<'a> {
    window: &'a StreamWindow,
    dedup: &'a Dedup,
    exchange: &'a str,
    live: &'a Arc<Live>,
    op: Duration,
    max_age: Duration,
}

/// A round whose markers are published, being read back.
struct Round {
    round: u64,
    /// Per inbox: its marker read back.
    seen: Vec<bool>,
    started: Instant,
}

impl Follower<'_> {
    /// Follow until the connection is lost (`Ok`) or something fails (`Err`, with why).
    async fn follow(&self, next: &mut [Option<i64>]) -> Result<(), Stop> {
        let ch = self.open().await?;
        let result = self.follow_on(&ch, next).await;
        let ch2 = ch.clone();
        tokio::spawn(async move {
            // Best effort: a failed close means the connection is going anyway.
            let _ =
                tokio::time::timeout(Duration::from_secs(2), ch2.close(200, "window".into())).await;
        });
        result
    }

    async fn open(&self) -> Result<Channel, String> {
        let opened = tokio::time::timeout(self.op, async {
            let ch = self.live.conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            ch.basic_qos(self.window.prefetch, BasicQosOptions::default())
                .await?;
            Ok::<_, lapin::Error>(ch)
        })
        .await;
        match opened {
            Ok(Ok(ch)) => Ok(ch),
            Ok(Err(e)) => Err(format!("opening the window channel: {e}")),
            Err(_) => {
                self.live.report_broken("window channel open timed out");
                Err("opening the window channel timed out".into())
            }
        }
    }

    async fn follow_on(&self, ch: &Channel, next: &mut [Option<i64>]) -> Result<(), Stop> {
        let w = self.window;
        let mut consumers = SelectAll::new();
        for ((i, inbox), next) in w.inboxes.iter().enumerate().zip(next.iter()) {
            let from = match *next {
                Some(offset) => AMQPValue::LongLongInt(offset),
                None => AMQPValue::Timestamp(
                    SystemTime::now()
                        .checked_sub(self.max_age)
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs()),
                ),
            };
            let mut args = FieldTable::default();
            args.insert(ShortString::from("x-stream-offset"), from);
            let consumer = tokio::time::timeout(
                self.op,
                ch.basic_consume(
                    ShortString::from(&**inbox),
                    ShortString::from(format!("drawbridge-float-window-{}-{i}", w.instance)),
                    BasicConsumeOptions::default(),
                    args,
                ),
            )
            .await
            .map_err(|_| format!("consuming inbox `{inbox}` timed out"))?
            .map_err(|e| {
                // RabbitMQ refuses the offset argument on a queue of another type
                // (PRECONDITION_FAILED "invalid arg 'x-stream-offset'"): nothing was taken.
                if e.to_string().contains("x-stream-offset") {
                    w.stopped.store(true, Ordering::SeqCst);
                    format!("inbox `{inbox}` is not a stream (the broker refuses a stream offset on it): {e}")
                } else {
                    format!("consuming inbox `{inbox}`: {e}")
                }
            })?;
            consumers.push(consumer.map(move |d| (i, d)));
        }
        // This connection's first round: whatever was requested before, and at least one.
        let mut round: Option<Round> = None;
        let mut last_round: Option<Instant> = None;
        let mut unacked = 0u64;
        loop {
            let requested = w.requested.load(Ordering::SeqCst);
            let done = {
                let g = *w.gate.borrow();
                if g.generation == self.live.generation {
                    g.round
                } else {
                    0
                }
            };
            let due = last_round.map(|t| t + MIN_ROUND_SPACING);
            if round.is_none()
                && (requested > done || done == 0)
                && due.is_none_or(|d| Instant::now() >= d)
            {
                let target = if done == 0 { w.request() } else { requested };
                self.publish_markers(ch, target).await?;
                last_round = Some(Instant::now());
                round = Some(Round {
                    round: target,
                    seen: vec![false; w.inboxes.len()],
                    started: Instant::now(),
                });
            }
            let spacing = (round.is_none() && requested > done)
                .then_some(due)
                .flatten()
                .map(tokio::time::Instant::from_std);
            let stall = round
                .as_ref()
                .map(|r| tokio::time::Instant::from_std(r.started + ROUND_TIMEOUT));
            tokio::select! {
                _ = self.live.lost() => return Ok(()),
                _ = w.asked.notified() => {}
                _ = tokio::time::sleep_until(spacing.unwrap_or_else(tokio::time::Instant::now)), if spacing.is_some() => {}
                _ = tokio::time::sleep_until(stall.unwrap_or_else(tokio::time::Instant::now)), if stall.is_some() => {
                    return Err(Stop::Reread(format!("the round's markers were not read back within {}s", ROUND_TIMEOUT.as_secs())));
                }
                d = consumers.next() => {
                    let (i, d) = match d {
                        Some((i, Ok(d))) => (i, d),
                        Some((i, Err(e))) => {
                            if self.live.is_lost() {
                                return Ok(());
                            }
                            let inbox = w.inboxes.get(i).map_or("?", |i| &**i);
                            return Err(format!("reading inbox `{inbox}`: {e}").into());
                        }
                        None => return Err(Stop::Reread("the inbox consumers were cancelled".into())),
                    };
                    let marker = self.read(i, &d, next)?;
                    if let (Some(m), Some(r)) = (marker, round.as_mut()) {
                        if let (true, Some(seen)) = (m == r.round, r.seen.get_mut(i)) {
                            *seen = true;
                        }
                    }
                    let last_tag = d.delivery_tag;
                    unacked += 1;
                    let complete = round.as_ref().is_some_and(|r| r.seen.iter().all(|s| *s));
                    if unacked >= u64::from(w.prefetch / 2).max(1) || complete {
                        ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                            .await
                            .map_err(|e| format!("acking the inbox stream: {e}"))?;
                        unacked = 0;
                    }
                    if complete {
                        if let Some(r) = round.take() {
                            self.complete(r);
                        }
                    }
                }
            }
        }
    }

    /// One message read back: its triple joins the window. `Some(round)` for our marker.
    fn read(
        &self,
        i: usize,
        d: &Delivery,
        next: &mut [Option<i64>],
    ) -> Result<Option<u64>, String> {
        let w = self.window;
        let (Some(inbox), Some(next)) = (w.inboxes.get(i), next.get_mut(i)) else {
            return Ok(None);
        };
        let headers = d.properties.headers().as_ref();
        let offset = headers
            .and_then(|h| h.inner().get("x-stream-offset"))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => Some(*n),
                AMQPValue::LongInt(n) => Some(i64::from(*n)),
                AMQPValue::LongUInt(n) => Some(i64::from(*n)),
                _ => None,
            });
        let Some(offset) = offset else {
            // Not a stream: consuming it takes messages from the node. The delivery is not
            // acked, so it goes back when the channel closes, and the follower stops for good
            // (retrying would take more, and put markers into a queue).
            w.stopped.store(true, Ordering::SeqCst);
            return Err(format!(
                "inbox `{inbox}` is not a stream (a delivery without `x-stream-offset`); \
                 float.inbox_queue_type = \"stream\" needs the inboxes declared as streams"
            ));
        };
        *next = Some(offset.saturating_add(1));
        let text = |k: &str| match headers.and_then(|h| h.inner().get(k)) {
            Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
            _ => None,
        };
        let mut marker = None;
        let mut read_back = None;
        let is_marker = text(headers::WINDOW_MARKER);
        if let Some(m) = is_marker {
            marker = m
                .strip_prefix(&w.instance)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.parse().ok());
        } else if let (Some(sender), Some(id)) = (text(headers::SENDER), d.properties.message_id())
        {
            let kind = text(headers::MESSAGE_ID_TYPE).unwrap_or("string");
            let key = format!("{kind}:{}", id.as_str());
            read_back = Some(self.dedup.remember(sender, inbox, &key, Instant::now()));
        }
        metrics::counter!("drawbridge_float_window_stream_read_total").increment(1);
        let mut v = w.view();
        if let Some(view) = v.inboxes.get_mut(i) {
            let first_read = view.read_up_to.is_none_or(|h| offset > h);
            view.read_up_to = view.read_up_to.max(Some(offset));
            if !first_read && read_back == Some(ReadBack::Again) {
                read_back = Some(ReadBack::Known);
            }
            if read_back == Some(ReadBack::Again) {
                metrics::counter!("drawbridge_float_window_duplicates_stored_total").increment(1);
            }
            view.next_offset = *next;
            view.read += 1;
            view.added += u64::from(read_back == Some(ReadBack::New));
            view.duplicates_stored += u64::from(read_back == Some(ReadBack::Again));
            view.markers += u64::from(is_marker.is_some());
        }
        Ok(marker)
    }

    /// Publish round `round`'s marker into every inbox and wait for the confirms.
    async fn publish_markers(&self, ch: &Channel, round: u64) -> Result<(), String> {
        let w = self.window;
        let value = format!("{}:{round}", w.instance);
        for inbox in &w.inboxes {
            let mut h = FieldTable::default();
            h.insert(
                ShortString::from(headers::WINDOW_MARKER),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(format!(
                    "drawbridge-window-marker-{value}"
                )))
                .with_app_id(ShortString::from("drawbridge-float"))
                .with_headers(h);
            let confirm = tokio::time::timeout(self.op, async {
                ch.basic_publish(
                    ShortString::from(self.exchange),
                    ShortString::from(&**inbox),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &[],
                    props,
                )
                .await?
                .await
            })
            .await;
            match confirm {
                Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => {}
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    return Err(format!(
                    "the marker for inbox `{inbox}` was unroutable (is the inbox bound to `{}`?)",
                    self.exchange
                ))
                }
                Ok(Ok(Confirmation::Nack(_))) => {
                    return Err(format!("the broker refused the marker for inbox `{inbox}`"))
                }
                Ok(Err(e)) => {
                    return Err(format!("publishing the marker for inbox `{inbox}`: {e}"))
                }
                Err(_) => {
                    self.live.report_broken("window marker confirm timed out");
                    return Err(format!(
                        "the marker for inbox `{inbox}` was not confirmed in time"
                    ));
                }
            }
        }
        w.view().markers_published += w.inboxes.len() as u64;
        metrics::counter!("drawbridge_float_window_markers_total")
            .increment(w.inboxes.len() as u64);
        Ok(())
    }

    /// A round's markers are all read back: the links waiting for it may publish.
    fn complete(&self, r: Round) {
        let w = self.window;
        let first = w.gate.borrow().generation != self.live.generation;
        w.gate.send_replace(Gate {
            generation: self.live.generation,
            round: r.round,
        });
        metrics::gauge!("drawbridge_float_window_ready").set(1.0);
        if first {
            let mut v = w.view();
            let took = v.rebuilding_since.take().map(|t| t.elapsed());
            v.last_rebuild = took;
            if let Some(was) = v.last_error.take() {
                info!(was = %was, "stream window: the inbox stream is read back again");
            }
            let read: BTreeMap<&str, u64> = v
                .inboxes
                .iter()
                .map(|i| (i.inbox.as_str(), i.read))
                .collect();
            let took_ms = took.map_or(0, |d| d.as_millis() as u64);
            metrics::gauge!("drawbridge_float_window_last_rebuild_seconds")
                .set(took.map_or(0.0, |d| d.as_secs_f64()));
            info!(generation = self.live.generation, took_ms, read = ?read, window = self.dedup.len(), "stream window rebuilt from the inboxes: links may publish");
        }
    }
}
