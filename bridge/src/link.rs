//! One peer link: a task that keeps an outbound AMQP 1.0 link to the peer's float(s) up and
//! forwards the peer queue's messages over it.
//!
//! The rules that make it lose nothing:
//! - the queue is consumed only while the link is up, with prefetch = window;
//! - a broker delivery is acked only after the peer's disposition is `accepted` (or after
//!   the message was confirmed into the dead-letter queue), in queue order, with
//!   `multiple = true` up to the last contiguous settled delivery;
//! - at the first `released` / `modified` / error / settlement timeout the link is
//!   recycled: nothing after that point is acked, the channel is closed, and the broker
//!   requeues every unacked delivery in order;
//! - deliveries of a lost broker connection are never acked afterwards;
//! - the reconnect backoff starts again only after the peer accepted something, so a peer
//!   that takes the connection but not the messages is retried less and less often (each
//!   recycle returns the window to the queue, which counts against a quorum queue's
//!   delivery limit).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use drawbridge_amqp::connection::{CommandError, Event};
use drawbridge_certs::{pki_types::CertificateDer, PeerRefusal, PeerRole};
use drawbridge_control_protocol::{LinkState, PeerLink};
use drawbridge_node::topology;
use drawbridge_runtime::{broker::Live, text};
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
    Channel, Consumer,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use drawbridge_mapping::wire_out;

use crate::{
    budget::{kib, Prefetch},
    canary::Canary,
    dead_letter::{copy_properties, DeadLetterError, DeadLetterer, Interrupted},
    peer::{self, ConnectFailure, PeerConnection, PeerSettings},
    rotation::TargetRotation,
    settle::{classify, AckBatch, HeadEvent, HeadWatch, Settled, Step},
    view::{set_state, SharedView},
    window::Window,
    Ctx,
};

/// How a forwarding session ended.
enum End {
    /// Stopped on request (DeleteLink / shutdown) after settling what was in flight.
    Stopped,
    /// Something failed; reconnect.
    Broken(Broken),
}

/// Why a forwarding session broke. The text is what the log, `/status` and the
/// `LinkStatus` event show, so each says what an operator should look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Broken {
    /// The peer released, modified or failed a transfer, or did not settle it in time.
    #[error("{0}")]
    Transfer(String),
    /// The dead-letter queue could not be prepared, so nothing is consumed.
    #[error(transparent)]
    DeadLetterQueue(#[from] DeadLetterError),
    /// Declaring or consuming the peer queue failed (e.g. other queue arguments).
    #[error("cannot consume `{queue}`: {source}")]
    Consume {
        /// Peer queue.
        queue: String,
        /// Broker error.
        source: lapin::Error,
    },
    /// A consumer operation did not finish within the broker operation timeout.
    #[error("{0} timed out")]
    ConsumerTimeout(&'static str),
    /// Restarting the consumer with a new prefetch failed.
    #[error("cannot restart the consumer: {0}")]
    Restart(lapin::Error),
    /// The broker ended the consumer (queue deleted, node down).
    #[error("consumer cancelled by the broker")]
    ConsumerCancelled,
    /// The consumer reported an error.
    #[error("consumer failed: {0}")]
    Consumer(lapin::Error),
    /// An ack failed or timed out; the session cannot go on.
    #[error("{0}")]
    Ack(String),
    /// Sending a transfer failed.
    #[error("send failed: {0}")]
    Send(String),
    /// The peer gave no credit for the settle timeout.
    #[error("peer granted no credit for {0:?}")]
    NoCredit(Duration),
    /// The peer closed the connection cleanly.
    #[error("peer closed the connection")]
    PeerClosed,
    /// The peer connection failed.
    #[error("peer connection lost: {0}")]
    PeerLost(String),
    /// The CRLs changed and the float's certificate chain is now refused.
    #[error("float `{peer}` disconnected after a CRL change: {reason}")]
    Revoked {
        /// The float's legal name.
        peer: String,
        /// Why its chain is refused now.
        reason: String,
    },
    /// A certificate of the float's chain passed its `notAfter` while the link was up.
    #[error("float `{peer}` disconnected: {reason}")]
    Expired {
        /// The float's legal name.
        peer: String,
        /// Which certificate expired, and when.
        reason: String,
    },
    /// Our broker connection is gone.
    #[error("broker connection lost{0}")]
    BrokerLost(&'static str),
    /// SIGTERM / DeleteLink drain took longer than `drain_grace`.
    #[error("drain grace period over; unsettled transfers will be resent")]
    DrainGrace,
    /// The process byte budget was closed (shutting down).
    #[error("the byte budget was closed")]
    BudgetClosed,
    /// A failure, then acking the settled prefix failed too.
    #[error("{first}; then {then}")]
    Then {
        /// What broke the session.
        first: Box<Broken>,
        /// Why the final ack failed as well.
        then: String,
    },
}

/// What one forwarding session achieved; decides the next backoff and feeds the head watch.
#[derive(Debug, Default)]
struct SessionStats {
    /// Transfers the peer accepted in this session.
    accepted: u64,
    /// Deliveries acked in this session (accepted or dead-lettered): the queue moved.
    acked: u64,
    /// A transfer was released, modified, failed or not settled in time (the peer takes
    /// the connection but not the messages: the case that must not recycle quickly).
    transfer_failed: bool,
    /// Message id of the session's first delivery, if the broker marked it redelivered.
    first_redelivered: Option<String>,
    /// Whether the session has seen a delivery yet.
    seen_delivery: bool,
}

/// Run the link until `stop` is cancelled.
pub(crate) async fn run(spec: PeerLink, ctx: Arc<Ctx>, stop: CancellationToken, view: SharedView) {
    let cfg = &ctx.cfg;
    let mut rotation =
        TargetRotation::new(spec.targets.clone(), cfg.reconnect_min, cfg.reconnect_max);
    let mut head = HeadWatch::new(HEAD_RETURNS_REPORTED);
    let mut dead_letters = DeadLetterer::new(
        &cfg.dead_letter_queue,
        cfg.dead_letter_queue_type,
        ctx.broker.config().op_timeout,
    );
    let mut last_reason = String::new();
    // After a session in which the peer took the connection but not the messages, the next
    // one probes with a prefetch of 1: only the head message goes back to the queue if it
    // fails again, instead of the whole window (each return counts against a quorum
    // queue's delivery limit).
    let mut probe = false;
    // The consumer prefetch follows the message sizes (see `budget`); what it learned
    // carries over from one session to the next.
    let mut prefetch = Prefetch::new(cfg.window, cfg.max_link_bytes, cfg.max_message_size as u64);
    // `verified_chain` holds the float chain the link's TLS verifier last accepted.
    let (mut settings, mut verified_chain, mut tls_generation) = match settings(&ctx, &spec) {
        Ok(s) => s,
        Err(reason) => {
            set_state(&ctx, &view, &spec, LinkState::Down, "", &reason);
            warn!(queue = %spec.queue, reason = %reason, "link cannot start");
            stop.cancelled().await;
            set_state(&ctx, &view, &spec, LinkState::Deleted, "", "deleted");
            return;
        }
    };
    set_state(&ctx, &view, &spec, LinkState::Connecting, "", "starting");
    while !stop.is_cancelled() {
        // Broker first: there is no point holding a peer connection we cannot feed.
        let live = tokio::select! {
            l = ctx.broker.connected(0, Duration::from_secs(3600)) => l,
            _ = stop.cancelled() => break,
        };
        let Some(live) = live else { continue };
        // Our certificate or key was reloaded: new connections present the new one (the
        // roots are the revocation state's, already shared with the verifier).
        if ctx.tls.current().generation != tls_generation {
            match self::settings(&ctx, &spec) {
                Ok((s, v, g)) => {
                    info!(queue = %spec.queue, "new TLS certificate: the link's next connections present it");
                    (settings, verified_chain, tls_generation) = (s, v, g);
                }
                Err(reason) => {
                    warn!(queue = %spec.queue, reason = %reason, "cannot use the reloaded TLS certificate; the link keeps the previous one");
                    tls_generation = ctx.tls.current().generation;
                }
            }
        }

        let mut failures = Vec::new();
        let mut connected = None;
        for target in rotation.order(Instant::now()) {
            // Boxed: the connect future is large (≈ 10 KiB) and lives only while connecting;
            // inline, every link's task would keep room for it while the link idles.
            let attempt = tokio::select! {
                r = Box::pin(peer::connect(&target, &settings)) => r,
                _ = stop.cancelled() => break,
            };
            match attempt {
                // Boxed: the connection handle is ≈ 1.4 KiB and moves from here into the
                // session; inline, each link's task would keep room for every copy.
                Ok(pc) => {
                    connected = Some(Box::new(pc));
                    break;
                }
                Err(f) => {
                    rotation.failed(&target, matches!(f, ConnectFailure::Tls(_)), Instant::now());
                    failures.push(f.reason());
                }
            }
        }
        let Some(pc) = connected else {
            if stop.is_cancelled() {
                break;
            }
            let reason = failures.join("; ");
            let delay = rotation.next_delay();
            if reason != last_reason {
                warn!(queue = %spec.queue, reason = %text::escape(&reason), retry_in = ?delay, "link down: cannot connect");
                set_state(&ctx, &view, &spec, LinkState::Down, "", &reason);
                last_reason = reason;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => continue,
                _ = stop.cancelled() => break,
            }
        };
        rotation.connected(&pc.target);
        let target = pc.target.to_string();
        let peer_chain = verified_chain.latest();
        let mut stats = SessionStats::default();
        let up_since = Instant::now();
        let session = LinkSession {
            live: &live,
            spec: &spec,
            ctx: &ctx,
            stop: &stop,
            view: &view,
            target: &target,
            peer_chain: peer_chain.as_deref(),
        };
        let end = {
            let run = session.run(pc, &mut dead_letters, &mut stats, &mut prefetch, probe);
            tokio::pin!(run);
            tokio::select! {
                end = &mut run => end,
                // A lost connection (one the HA lease gave up on included) ends the session
                // at once: a call into a silent broker (an ack, a channel close) would wait
                // out op_timeout with the link still up. The session gets a moment to close
                // the peer connection cleanly; nothing of it can be acked any more anyway.
                _ = live.lost() => match tokio::time::timeout(LOST_GRACE, &mut run).await {
                    Ok(end) => end,
                    Err(_) => {
                        // Dropped mid-way: what the session resets on its way out.
                        view.lock().expect("poisoned").in_flight = 0;
                        metrics::gauge!("drawbridge_bridge_link_in_flight", "queue" => spec.queue.clone())
                            .set(0.0);
                        End::Broken(Broken::BrokerLost(""))
                    }
                },
            }
        };
        if stats.acked > 0 {
            probe = false;
        }
        match end {
            End::Stopped => break,
            End::Broken(reason) => {
                let reason = reason.to_string();
                // The backoff starts again only after the peer accepted something (or the
                // link stayed up a while with no transfer failing, e.g. an idle link whose
                // peer restarted): a float that takes the connection but not the messages
                // must not make the link recycle — and return its window to the queue —
                // every second.
                let healthy = stats.accepted > 0
                    || (!stats.transfer_failed && up_since.elapsed() >= cfg.reconnect_max);
                if healthy {
                    rotation.reset_backoff();
                }
                if stats.transfer_failed && stats.acked == 0 {
                    probe = true;
                }
                match head.session_ended(stats.first_redelivered.as_deref(), stats.acked > 0) {
                    Some(HeadEvent::Stuck { id, returns }) => {
                        warn!(queue = %spec.queue, message_id = %id, returns, "the message at the head of the queue keeps coming back unsettled; a delivery limit on the queue will dead-letter it");
                    }
                    Some(HeadEvent::Cleared { id }) => {
                        info!(queue = %spec.queue, message_id = %id, "the head of the queue moves again");
                    }
                    None => {}
                }
                {
                    let mut v = view.lock().expect("poisoned");
                    v.head_returns = head.returns();
                    v.stuck_message_id = head.stuck_id().map(str::to_string);
                }
                metrics::gauge!("drawbridge_bridge_link_head_returns", "queue" => spec.queue.clone())
                    .set(f64::from(head.returns()));
                let delay = rotation.next_delay();
                warn!(queue = %spec.queue, target = %target, reason = %text::escape(&reason), retry_in = ?delay, "link down");
                set_state(&ctx, &view, &spec, LinkState::Down, &target, &reason);
                last_reason = reason;
                // The next attempt prefers the next target (failover).
                rotation.broke();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    set_state(
        &ctx,
        &view,
        &spec,
        LinkState::Deleted,
        "",
        "link deleted or bridge stopping",
    );
    info!(queue = %spec.queue, "link stopped");
}

/// How long a session whose broker connection was lost may take to end on its own before it
/// is dropped (see `run`).
const LOST_GRACE: Duration = Duration::from_millis(300);

/// Sessions in a row that start with the same redelivered head and accept nothing before
/// the link reports it.
const HEAD_RETURNS_REPORTED: u32 = 3;

/// How long a broken session waits for settlements already on their way before it acks the
/// settled prefix and gives up the rest (they are requeued and resent).
const SALVAGE_WAIT: Duration = Duration::from_millis(500);

/// The consumer of a session and the prefetch it was started with.
struct Consuming {
    consumer: Consumer,
    /// Prefetch the consumer was started with.
    prefetch: u16,
    /// Cancelled, its last deliveries still arriving; a new consumer follows.
    switching: bool,
}

/// One forwarding session: a peer connection fed from one broker connection.
struct LinkSession<'a> {
    live: &'a Arc<Live>,
    spec: &'a PeerLink,
    ctx: &'a Arc<Ctx>,
    stop: &'a CancellationToken,
    view: &'a SharedView,
    target: &'a str,
    /// The float's chain as verified at the handshake, re-checked when the CRLs change.
    peer_chain: Option<&'a [CertificateDer<'static>]>,
}

impl LinkSession<'_> {
    async fn run(
        &self,
        mut pc: Box<PeerConnection>,
        dead_letters: &mut DeadLetterer,
        stats: &mut SessionStats,
        prefetch: &mut Prefetch,
        probe: bool,
    ) -> End {
        let op = self.ctx.broker.config().op_timeout;
        // Nothing is taken from the peer queue while there is nowhere to put what cannot be
        // delivered.
        if let Err(e) = dead_letters.prepare(self.live).await {
            pc.close().await;
            return End::Broken(e.into());
        }
        let first_prefetch = if probe { 1 } else { prefetch.current() };
        let opened = tokio::time::timeout(
            op,
            open_consumer(self.live, self.spec, self.ctx, self.view, first_prefetch),
        )
        .await;
        let (channel, consumer) = match opened {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                pc.close().await;
                return End::Broken(Broken::Consume {
                    queue: self.spec.queue.clone(),
                    source: e,
                });
            }
            Err(_) => {
                pc.close().await;
                self.live.report_broken("opening a consumer timed out");
                return End::Broken(Broken::ConsumerTimeout("opening the consumer"));
            }
        };
        {
            let mut v = self.view.lock().expect("poisoned");
            v.connects += 1;
            v.prefetch = first_prefetch;
        }
        metrics::counter!("drawbridge_bridge_link_connects_total", "queue" => self.spec.queue.clone())
            .increment(1);
        set_state(
            self.ctx,
            self.view,
            self.spec,
            LinkState::Up,
            self.target,
            "connected",
        );
        if probe {
            info!(queue = %self.spec.queue, target = %self.target, "link up, probing with one message after transfers failed");
        } else {
            info!(queue = %self.spec.queue, target = %self.target, prefetch = first_prefetch, "link up");
        }
        // Runs in this task, on this connection; ends with the session.
        let canary = self.start_canary(&mut pc);
        let consuming = Consuming {
            consumer,
            prefetch: first_prefetch,
            switching: false,
        };
        let end = self
            .forward(
                &mut pc,
                &channel,
                consuming,
                dead_letters,
                stats,
                prefetch,
                probe,
                canary,
            )
            .await;
        // Closing the channel returns every unacked delivery to the queue, in order. A close
        // that does not complete leaves them held by a channel nobody reads: only closing
        // the whole connection frees them, so report it broken.
        match tokio::time::timeout(op, channel.close(200, "link recycled".into())).await {
            Ok(_) => {}
            Err(_) => self
                .live
                .report_broken("closing a peer queue's consumer channel timed out"),
        }
        pc.close().await;
        {
            let mut v = self.view.lock().expect("poisoned");
            v.in_flight = 0;
        }
        metrics::gauge!("drawbridge_bridge_link_in_flight", "queue" => self.spec.queue.clone())
            .set(0.0);
        end
    }

    /// Start the link canary on the session's canary link, if there is one; a float that
    /// refused the canary link is reported (once per reason), and the link forwards anyway.
    fn start_canary(&self, pc: &mut PeerConnection) -> Option<Box<Canary>> {
        let interval = self.ctx.cfg.canary_interval?;
        match pc.canary.take()? {
            Ok(link) => Some(Box::new(Canary::new(
                link,
                self.spec.queue.clone(),
                interval,
                self.ctx.cfg.settle_timeout,
                self.view.clone(),
            ))),
            Err(reason) => {
                let mut v = self.view.lock().expect("poisoned");
                if v.canary_error.as_deref() != Some(reason.as_str()) {
                    warn!(queue = %self.spec.queue, target = %self.target, reason = %text::escape(&reason), "link canary unavailable; the link forwards without it");
                    v.canary_error = Some(reason);
                }
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        pc: &mut PeerConnection,
        channel: &Channel,
        mut consuming: Consuming,
        dead_letters: &mut DeadLetterer,
        stats: &mut SessionStats,
        prefetch: &mut Prefetch,
        mut probe: bool,
        mut canary: Option<Box<Canary>>,
    ) -> End {
        let (spec, ctx, view, live, stop) = (self.spec, self.ctx, self.view, self.live, self.stop);
        let cfg = &ctx.cfg;
        let op = ctx.broker.config().op_timeout;
        let window = cfg.window as usize;
        let settle_timeout = cfg.settle_timeout;
        // The deliveries in flight, in queue order; bounded by the window (the consumer's
        // prefetch), each settled by the peer's disposition or here (`window.rs`).
        let mut inflight: Window<Delivery, OwnedSemaphorePermit> = Window::new();
        let mut acks = AckBatch::new(64);
        let mut draining = false;
        let mut drain_deadline = None;
        // Flushes a pending ack batch and samples the in-flight count. It runs only while there
        // is something to flush or sample (see its arm below): an idle link sleeps until a
        // delivery or its peer wakes it (1,000 idle links ticking 20 times a second cost
        // 8.8 % of a core; `drawbridge-bench --idle-links`).
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Registered once per session: the per-message cost is a record, not a lookup.
        let age = Forwarded::register(&spec.queue);
        let in_flight_gauge =
            metrics::gauge!("drawbridge_bridge_link_in_flight", "queue" => spec.queue.clone());
        let mut in_flight_seen = 0usize;
        // A converted delivery waiting for room in the process-wide byte budget, or (with its
        // share) for the peer's credit. Boxed: rarely waiting, and inline every link's task
        // would keep room for it.
        let mut waiting: Option<Box<(Delivery, Vec<u8>)>> = None;
        let mut waiting_credit: Option<Box<(Delivery, Vec<u8>, OwnedSemaphorePermit)>> = None;
        // The peer's credit ran out at this instant: it has `settle_timeout` to grant more.
        let mut credit_deadline: Option<tokio::time::Instant> = None;
        // The encoded message of the delivery being sent, reused from one to the next.
        let mut encoded: Vec<u8> = Vec::new();
        let budget_kib = ctx.bytes_total_kib;
        // The CRLs may change while the link is up: the float is re-checked each time (and
        // once now, for a change between its handshake and this point); so it is when a
        // certificate of its chain reaches its notAfter. The verdict is kept in between.
        let mut crl_changes = ctx.revocation.subscribe();
        let mut crl_open = true;
        let mut peer_check = self
            .peer_chain
            .map(|chain| ctx.revocation.established(chain.to_vec(), PeerRole::Server));
        let refused = |peer_check: &mut Option<drawbridge_certs::EstablishedPeer>| {
            let check = peer_check.as_mut()?;
            let refusal = check.check()?;
            let peer = drawbridge_certs::peer_legal_name(check.chain())
                .map_or_else(|_| self.target.to_string(), |n| n.to_string());
            Some(match refusal {
                PeerRefusal::Revoked(reason) => Broken::Revoked { peer, reason },
                PeerRefusal::Expired(reason) => Broken::Expired { peer, reason },
            })
        };
        // Every way out of the loop below except a lost broker connection goes through
        // `broken`: first ack what the peer has already accepted (its settlements may be
        // on their way, e.g. in the stream not read yet), then give up the rest. Without it,
        // a peer that settles and then closes makes the link resend messages the peer
        // already has.
        macro_rules! broken {
            ($reason:expr) => {{
                let reason: Broken = $reason;
                // Boxed: expanded at every way out, and each expansion's room would be kept
                // in every link's task.
                let flushed = Box::pin(async {
                    salvage(
                        &mut inflight,
                        pc,
                        &mut acks,
                        stats,
                        view,
                        &age,
                        SALVAGE_WAIT,
                    )
                    .await;
                    flush(channel, &mut acks, op).await
                })
                .await;
                return match flushed {
                    Ok(()) => End::Broken(reason),
                    Err(e) => End::Broken(Broken::Then {
                        first: Box::new(reason),
                        then: e,
                    }),
                };
            }};
        }
        // Start moving to the prefetch `prefetch.current()` (or out of a probe): cancel the
        // consumer; what it already received still arrives and is forwarded, and when its
        // stream ends a new consumer starts (see the `None` arm below).
        macro_rules! resize {
            () => {{
                if !consuming.switching && consuming.prefetch != prefetch.current() {
                    let cancel = tokio::time::timeout(
                        op,
                        channel
                            .basic_cancel(consuming.consumer.tag(), BasicCancelOptions::default()),
                    )
                    .await;
                    match cancel {
                        Ok(Ok(())) => consuming.switching = true,
                        Ok(Err(e)) => broken!(Broken::Restart(e)),
                        Err(_) => broken!(Broken::ConsumerTimeout("cancelling the consumer")),
                    }
                }
            }};
        }
        // Send one encoded delivery holding its share of the process budget; the share is
        // given back when the peer settles it. Without credit it waits for the peer's next
        // grant (the consumer is not read meanwhile).
        macro_rules! send {
            ($delivery:expr, $bytes:expr, $permit:expr) => {{
                let (delivery, bytes, permit): (Delivery, &[u8], OwnedSemaphorePermit) =
                    ($delivery, $bytes, $permit);
                let tag = delivery.delivery_tag.to_be_bytes();
                match pc.driver.conn().send(pc.link, &tag, bytes) {
                    Ok(id) => {
                        credit_deadline = None;
                        inflight.sent(delivery, id, permit, tokio::time::Instant::now() + settle_timeout);
                    }
                    Err(CommandError::NoCredit) => {
                        credit_deadline.get_or_insert_with(|| tokio::time::Instant::now() + settle_timeout);
                        waiting_credit = Some(Box::new((delivery, bytes.to_vec(), permit)));
                    }
                    // The float announced a smaller max-message-size on attach: it will never
                    // take this message, so it is dead-lettered in its turn (no transfer was
                    // sent), never resent in a loop.
                    Err(CommandError::TooLarge { len, max }) => {
                        let reason = format!(
                            "the peer accepts messages of at most {max} bytes (encoded); this one is {len} bytes"
                        );
                        inflight.settled_here(delivery, Settled::DeadLetter(reason));
                    }
                    Err(e @ CommandError::NotOpen) => broken!(Broken::Send(e.to_string())),
                }
            }};
        }
        if let Some(why) = refused(&mut peer_check) {
            broken!(why);
        }
        // Fires when a certificate of the float's chain reaches its notAfter (or after an
        // hour, to look again). Boxed: a timer is ≈ 100 bytes every link's task would keep.
        let next_expiry = |c: &Option<drawbridge_certs::EstablishedPeer>| {
            c.as_ref().and_then(|c| c.until_next_expiry())
        };
        let mut expiry_armed = next_expiry(&peer_check).is_some();
        let mut expiry_timer = Box::pin(tokio::time::sleep(
            next_expiry(&peer_check).unwrap_or(Duration::from_secs(3600)),
        ));
        loop {
            // The head of the window settled: its broker delivery is acked, dead-lettered or
            // the link recycles, in queue order.
            if let Some((delivery, settled)) = inflight.pop_settled() {
                let tag = delivery.delivery_tag;
                match acks.outcome(tag, &settled, inflight.is_empty()) {
                    Step::Ack { flush_now } => {
                        stats.accepted += 1;
                        stats.acked += 1;
                        count_forwarded(view, &delivery, &age);
                        if flush_now {
                            if let Err(e) = flush(channel, &mut acks, op).await {
                                return End::Broken(Broken::Ack(e));
                            }
                        }
                        if std::mem::take(&mut probe) {
                            info!(queue = %spec.queue, prefetch = prefetch.current(), "probe accepted; forwarding with the full window");
                            resize!();
                        }
                    }
                    Step::DeadLetter(reason) => {
                        warn!(queue = %spec.queue, message_id = ?delivery.properties.message_id().as_ref().map(|s| s.as_str()), reason = %text::escape(&reason), "message dead-lettered");
                        let props = copy_properties(&delivery.properties, &reason, &spec.queue);
                        // Boxed: a rare path, too large to keep room for in every link's task.
                        match Box::pin(dead_letters.publish(
                            live,
                            &delivery.data,
                            props,
                            &spec.queue,
                            stop,
                        ))
                        .await
                        {
                            Ok(()) => {
                                metrics::counter!("drawbridge_bridge_dead_lettered_total", "queue" => spec.queue.clone()).increment(1);
                                view.lock().expect("poisoned").dead_lettered += 1;
                                stats.acked += 1;
                                if acks.settled(tag, inflight.is_empty()) {
                                    if let Err(e) = flush(channel, &mut acks, op).await {
                                        return End::Broken(Broken::Ack(e));
                                    }
                                }
                                if std::mem::take(&mut probe) {
                                    resize!();
                                }
                            }
                            Err(Interrupted::Stopped) => {
                                let _ = flush(channel, &mut acks, op).await;
                                return End::Stopped;
                            }
                            Err(Interrupted::BrokerLost) => {
                                return End::Broken(Broken::BrokerLost(" while dead-lettering"));
                            }
                        }
                    }
                    Step::Recycle(reason) => {
                        stats.transfer_failed = true;
                        // Ack the settled prefix, nothing after it.
                        if let Err(e) = flush(channel, &mut acks, op).await {
                            return End::Broken(Broken::Ack(e));
                        }
                        return End::Broken(Broken::Transfer(reason));
                    }
                }
                continue;
            }
            if draining && inflight.is_empty() && waiting.is_none() && waiting_credit.is_none() {
                return match flush(channel, &mut acks, op).await {
                    Ok(()) => End::Stopped,
                    Err(e) => End::Broken(Broken::Ack(e)),
                };
            }
            let need_kib = waiting
                .as_ref()
                .map(|w| kib(w.0.data.len(), budget_kib))
                .unwrap_or(0);
            // The oldest transfer the peer has not settled yet has until its deadline.
            let settle_deadline = inflight.next_deadline();
            tokio::select! {
                biased;
                // First, so that what the engine queued leaves at once: its frames are
                // written while it is polled.
                ev = pc.driver.next_event() => match ev {
                    Ok(Event::Settled { link, first, last, outcome }) if link == pc.link => {
                        inflight.settle(first, last, &classify(Some(outcome), settle_timeout));
                    }
                    Ok(Event::Credit { link, .. }) if link == pc.link => {
                        if let Some(w) = waiting_credit.take() {
                            let (delivery, bytes, permit) = *w;
                            send!(delivery, &bytes, permit);
                        }
                    }
                    Ok(Event::Detached { link, error }) if link == pc.link => {
                        broken!(Broken::PeerLost(format!("the float detached the link: {}", peer::describe(error.as_ref()))));
                    }
                    Ok(Event::Settled { link, first, last, outcome }) => {
                        if let Some(c) = canary.as_mut().filter(|c| c.link() == link) {
                            c.on_settled(first, last, outcome);
                        }
                    }
                    Ok(Event::Credit { link, .. }) => {
                        if let Some(c) = canary.as_mut().filter(|c| c.link() == link) {
                            c.on_credit(pc.driver.conn());
                        }
                    }
                    Ok(Event::Detached { link, error }) => {
                        if let Some(mut c) = canary.take_if(|c| c.link() == link) {
                            c.on_detached(peer::describe(error.as_ref()));
                        }
                    }
                    Ok(Event::Ended { error, .. }) => {
                        broken!(Broken::PeerLost(format!("the float ended the session: {}", peer::describe(error.as_ref()))));
                    }
                    Ok(Event::Closed { error, by_us, violation }) => {
                        if let Some(label) = violation {
                            peer::hostile(&pc.target, label, error.as_ref());
                        }
                        let why = match (&error, by_us) {
                            (None, false) => Broken::PeerClosed,
                            _ => Broken::PeerLost(peer::describe(error.as_ref())),
                        };
                        broken!(why);
                    }
                    Ok(_) => {}
                    Err(e) => broken!(Broken::PeerLost(e.to_string())),
                },
                _ = stop.cancelled(), if !draining => {
                    draining = true;
                    drain_deadline = Some(tokio::time::Instant::now() + cfg.drain_grace);
                    // Stop new deliveries; those already prefetched but not sent are requeued
                    // when the channel closes.
                    if !consuming.switching {
                        let _ = tokio::time::timeout(op, channel.basic_cancel(consuming.consumer.tag(), BasicCancelOptions::default())).await;
                    }
                }
                _ = async { tokio::time::sleep_until(drain_deadline.expect("set")).await }, if drain_deadline.is_some() => {
                    broken!(Broken::DrainGrace);
                }
                _ = async { tokio::time::sleep_until(settle_deadline.expect("set")).await }, if settle_deadline.is_some() => {
                    // The oldest unsettled transfer timed out: it recycles the link when it
                    // reaches the head of the window.
                    inflight.expire_oldest(classify(None, settle_timeout));
                }
                _ = async { tokio::time::sleep_until(credit_deadline.expect("set")).await }, if credit_deadline.is_some() && waiting_credit.is_some() => {
                    stats.transfer_failed = true;
                    broken!(Broken::NoCredit(settle_timeout));
                }
                permit = async { ctx.bytes_in_flight.clone().acquire_many_owned(need_kib).await }, if waiting.is_some() => {
                    let Ok(permit) = permit else {
                        broken!(Broken::BudgetClosed);
                    };
                    let (delivery, bytes) = *waiting.take().expect("waiting");
                    send!(delivery, &bytes, permit);
                    encoded = bytes;
                }
                d = consuming.consumer.next(), if !draining && waiting.is_none() && waiting_credit.is_none() && inflight.len() < window => {
                    let delivery = match d {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => broken!(Broken::Consumer(e)),
                        None if consuming.switching => {
                            // The old consumer delivered all it had: start the new one.
                            let want = if probe { 1 } else { prefetch.current() };
                            let started = tokio::time::timeout(op, start_consumer(channel, spec, ctx, want)).await;
                            consuming = match started {
                                Ok(Ok(consumer)) => Consuming { consumer, prefetch: want, switching: false },
                                Ok(Err(e)) => broken!(Broken::Restart(e)),
                                Err(_) => broken!(Broken::ConsumerTimeout("restarting the consumer")),
                            };
                            view.lock().expect("poisoned").prefetch = want;
                            debug!(queue = %spec.queue, prefetch = want, "consumer restarted with a new prefetch");
                            continue;
                        }
                        None => broken!(Broken::ConsumerCancelled),
                    };
                    if !stats.seen_delivery {
                        stats.seen_delivery = true;
                        if delivery.redelivered {
                            stats.first_redelivered = delivery.properties.message_id().as_ref().map(|s| s.to_string());
                        }
                    }
                    if delivery.redelivered {
                        view.lock().expect("poisoned").redelivered += 1;
                        metrics::counter!("drawbridge_bridge_redelivered_total", "queue" => spec.queue.clone()).increment(1);
                    }
                    let before = prefetch.current();
                    if let (false, Some(after)) = (probe, prefetch.observe(delivery.data.len() as u64)) {
                        {
                            let mut v = view.lock().expect("poisoned");
                            if after < before {
                                v.prefetch_narrowed += 1;
                            } else {
                                v.prefetch_widened += 1;
                            }
                        }
                        resize!();
                    }
                    // Encoded straight from the broker delivery into the link's buffer.
                    encoded.clear();
                    match wire_out::encode(&delivery, cfg.max_message_size, &mut encoded) {
                        Err(u) => {
                            metrics::counter!("drawbridge_bridge_undeliverable_total", "reason" => u.label()).increment(1);
                            let reason = u.to_string();
                            inflight.settled_here(delivery, Settled::DeadLetter(reason));
                        }
                        Ok(()) => {
                            let need = kib(delivery.data.len(), budget_kib);
                            match ctx.bytes_in_flight.clone().try_acquire_many_owned(need) {
                                Ok(permit) => send!(delivery, &encoded, permit),
                                Err(_) => waiting = Some(Box::new((delivery, std::mem::take(&mut encoded)))),
                            }
                        }
                    }
                }
                due = async { match canary.as_deref_mut() { Some(c) => c.due().await, None => std::future::pending().await } } => {
                    if let Some(c) = canary.as_mut() {
                        c.on_due(due, pc.driver.conn());
                    }
                }
                changed = crl_changes.changed(), if crl_open => {
                    crl_open = changed.is_ok();
                    if let Some(why) = refused(&mut peer_check) {
                        broken!(why);
                    }
                }
                _ = &mut expiry_timer, if expiry_armed => {
                    if let Some(why) = refused(&mut peer_check) {
                        broken!(why);
                    }
                    match next_expiry(&peer_check) {
                        Some(wait) => expiry_timer.as_mut().reset(tokio::time::Instant::now() + wait),
                        None => expiry_armed = false,
                    }
                }
                _ = live.lost() => {
                    // Never ack deliveries of a dead connection.
                    return End::Broken(Broken::BrokerLost(""));
                }
                _ = tick.tick(), if acks.is_pending() || !inflight.is_empty() || in_flight_seen != 0 => {
                    if inflight.len() != in_flight_seen {
                        in_flight_seen = inflight.len();
                        in_flight_gauge.set(in_flight_seen as f64);
                        view.lock().expect("poisoned").in_flight = in_flight_seen as u32;
                    }
                    if acks.is_pending() {
                        if let Err(e) = flush(channel, &mut acks, op).await {
                            return End::Broken(Broken::Ack(e));
                        }
                    }
                }
            }
        }
    }
}

/// One message accepted by the peer and acked. Labelled by peer queue (bounded by the links
/// the node creates), so an operator can alert per link; the timestamp gauge gives the age of
/// the last acceptance (`time() - drawbridge_bridge_link_last_accepted_timestamp_seconds`).
/// A message with a `timestamp` (whole seconds, the node's clock) adds its age to
/// `drawbridge_bridge_delivery_age_seconds`:
/// end to end up to the float's broker, since the peer accepts only after its confirm.
fn count_forwarded(view: &SharedView, delivery: &Delivery, metrics: &Forwarded) {
    let now = drawbridge_runtime::daemon::unix_ms() as f64 / 1000.0;
    if let Some(sent) = *delivery.properties.timestamp() {
        // A sender clock ahead of ours would give a negative age.
        metrics.age.record((now - sent as f64).max(0.0));
    }
    view.lock().expect("poisoned").forwarded += 1;
    metrics.total.increment(1);
    metrics.last_accepted.set(now);
}

/// A session's per-message metrics, registered once when it starts: a `counter!` with a
/// label builds its key (label strings included) and looks it up on every call, which
/// was about 10 allocations per message (`valgrind --tool=dhat` on the bridge).
struct Forwarded {
    age: metrics::Histogram,
    total: metrics::Counter,
    last_accepted: metrics::Gauge,
}

impl Forwarded {
    fn register(queue: &str) -> Self {
        Forwarded {
            age: metrics::histogram!("drawbridge_bridge_delivery_age_seconds", "queue" => queue.to_string()),
            total: metrics::counter!("drawbridge_bridge_forwarded_total", "queue" => queue.to_string()),
            last_accepted: metrics::gauge!("drawbridge_bridge_link_last_accepted_timestamp_seconds", "queue" => queue.to_string()),
        }
    }
}

/// Take, in queue order, the acceptances that arrive within `wait` (the peer's dispositions
/// still in the stream); stop at the first transfer that is not accepted. What is taken is
/// recorded in `acks`.
async fn salvage(
    inflight: &mut Window<Delivery, OwnedSemaphorePermit>,
    pc: &mut PeerConnection,
    acks: &mut AckBatch,
    stats: &mut SessionStats,
    view: &SharedView,
    age: &Forwarded,
    wait: Duration,
) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        while let Some(delivery) = inflight.pop_accepted() {
            acks.settled(delivery.delivery_tag, false);
            stats.accepted += 1;
            stats.acked += 1;
            count_forwarded(view, &delivery, age);
        }
        if !inflight.head_waits() {
            return;
        }
        match tokio::time::timeout_at(deadline, pc.driver.next_event()).await {
            Ok(Ok(Event::Settled {
                link,
                first,
                last,
                outcome,
            })) if link == pc.link => {
                inflight.settle(first, last, &classify(Some(outcome), wait));
            }
            Ok(Ok(Event::Closed { .. })) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
    }
}

async fn open_consumer(
    live: &Arc<Live>,
    spec: &PeerLink,
    ctx: &Arc<Ctx>,
    view: &SharedView,
    prefetch: u16,
) -> Result<(Channel, Consumer), lapin::Error> {
    let mut ch = live.conn.create_channel().await?;
    let declared = ch
        .queue_declare(
            ShortString::from(spec.queue.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            // The node declares peer queues identically (both take them from `drawbridge-node`).
            topology::peer_queue_args(ctx.cfg.peer_queue_type, &ctx.cfg.dead_letter_queue),
        )
        .await;
    match declared {
        Ok(_) => {}
        Err(e) if lacks_dead_letter_args(&e) => {
            // Declared earlier (by an older node or bridge) without the dead-letter pair: the
            // 406 closed the channel. Consume the queue as it is rather than stop forwarding,
            // and say once what that leaves open.
            let first =
                !std::mem::replace(&mut view.lock().expect("poisoned").legacy_queue_args, true);
            if first {
                warn!(queue = %spec.queue, dead_letter_queue = %ctx.cfg.dead_letter_queue, "peer queue was declared without dead-letter arguments: what the broker drops from it (a quorum delivery limit, a TTL or length policy) is lost, not dead-lettered; add a policy with dead-letter-exchange \"\" and dead-letter-routing-key, or redeclare the queue");
            }
            // Declaring it with the older arguments checks that the fence (single active
            // consumer) and the queue type are there all the same.
            ch = live.conn.create_channel().await?;
            ch.queue_declare(
                ShortString::from(spec.queue.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                topology::fenced_queue_args(ctx.cfg.peer_queue_type),
            )
            .await?;
        }
        Err(e) => return Err(e),
    }
    let consumer = start_consumer(&ch, spec, ctx, prefetch).await?;
    Ok((ch, consumer))
}

/// Whether a declare failed on the dead-letter arguments (RabbitMQ names the first
/// inequivalent argument it checks, and it checks them before the others).
fn lacks_dead_letter_args(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("PRECONDITION_FAILED") && text.contains("inequivalent arg 'x-dead-letter-")
}

/// Set the prefetch (`window`, or 1 while probing) and consume the peer queue.
async fn start_consumer(
    ch: &Channel,
    spec: &PeerLink,
    ctx: &Ctx,
    prefetch: u16,
) -> Result<Consumer, lapin::Error> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    ch.basic_consume(
        ShortString::from(spec.queue.as_str()),
        ShortString::from(consumer_tag(ctx)),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

fn consumer_tag(ctx: &Ctx) -> String {
    format!("drawbridge-{}", ctx.cfg.id)
}

async fn flush(channel: &Channel, acks: &mut AckBatch, op: Duration) -> Result<(), String> {
    let Some(tag) = acks.take() else {
        return Ok(());
    };
    match tokio::time::timeout(
        op,
        channel.basic_ack(tag, BasicAckOptions { multiple: true }),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("ack failed: {e}")),
        Err(_) => Err(format!("ack timed out after {op:?}")),
    }
}

/// Peer settings for a link, where its verifier keeps the chain of the float it last
/// accepted, and the generation of our TLS material they were built from; or why they
/// cannot be built.
pub(crate) fn settings(
    ctx: &Ctx,
    spec: &PeerLink,
) -> Result<(PeerSettings, drawbridge_certs::VerifiedPeerChain, u64), String> {
    let mut names = Vec::new();
    for n in &spec.legal_names {
        names.push(
            n.parse::<drawbridge_certs::LegalName>()
                .map_err(|e| format!("legal name `{n}`: {e}"))?,
        );
    }
    let own = ctx.tls.current();
    let (tls, verified_chain) = drawbridge_certs::client_config_with(
        &own.identity,
        &ctx.revocation,
        names,
        ctx.cfg.tls_policy,
    )
    .map_err(|e| format!("TLS config: {e}"))?;
    let settings = PeerSettings {
        tls,
        connect_timeout: ctx.cfg.connect_timeout,
        idle_timeout: ctx.cfg.idle_timeout,
        container_id: format!("drawbridge-bridge-{}", ctx.cfg.id),
        link_name: format!("drawbridge-{}-{}", ctx.cfg.id, spec.queue),
        address: spec.target_address.clone(),
        canary_address: ctx
            .cfg
            .canary_interval
            .map(|_| ctx.cfg.canary_address.clone()),
    };
    Ok((settings, verified_chain, own.generation))
}
