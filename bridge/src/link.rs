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

use drawbridge_amqp::connection::{CommandError, Event as DriverEvent};
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
    budget::Prefetch,
    canary::Canary,
    dead_letter::{copy_properties, DeadLetterer},
    peer::{self, ConnectFailure, PeerConnection, PeerSettings},
    rotation::TargetRotation,
    session::{Action, End, Event, Limits, SendError, Session, SessionStats},
    settle::{classify, HeadEvent, HeadWatch},
    view::{set_state, SharedView},
    Ctx,
};

pub use crate::session::Broken;

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

/// A session's rules, over lapin's deliveries holding shares of the process byte budget.
type Rules = Session<Delivery, OwnedSemaphorePermit>;

impl LinkSession<'_> {
    async fn run(
        &self,
        mut pc: Box<PeerConnection>,
        dead_letters: &mut DeadLetterer,
        stats: &mut SessionStats,
        prefetch: &mut Prefetch,
        probe: bool,
    ) -> End {
        let cfg = &self.ctx.cfg;
        let op = self.ctx.broker.config().op_timeout;
        // Nothing is taken from the peer queue while there is nowhere to put what cannot be
        // delivered.
        if let Err(e) = dead_letters.prepare(self.live).await {
            pc.close().await;
            return End::Broken(e.into());
        }
        let limits = Limits {
            window: usize::from(cfg.window),
            settle_timeout: cfg.settle_timeout,
            drain_grace: cfg.drain_grace,
            salvage_wait: SALVAGE_WAIT,
            budget_kib: self.ctx.bytes_total_kib,
            ack_batch: 64,
        };
        let mut rules: Rules = Session::new(limits, prefetch.clone(), probe);
        let first_prefetch = rules.first_prefetch();
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
        let end = self
            .forward(
                &mut pc,
                &channel,
                consumer,
                dead_letters,
                &mut rules,
                canary,
            )
            .await;
        (*stats, *prefetch) = rules.finish();
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

    /// The session's driver: feeds `rules` what happens (the peer's frames, the consumer's
    /// deliveries, timers, the CRLs, a stop) and performs what it asks, in order, answering
    /// each action that wants an answer before the next event (`session.rs`).
    async fn forward(
        &self,
        pc: &mut PeerConnection,
        channel: &Channel,
        mut consumer: Consumer,
        dead_letters: &mut DeadLetterer,
        rules: &mut Rules,
        mut canary: Option<Box<Canary>>,
    ) -> End {
        let (spec, ctx, view, live, stop) = (self.spec, self.ctx, self.view, self.live, self.stop);
        let cfg = &ctx.cfg;
        let op = ctx.broker.config().op_timeout;
        let settle_timeout = cfg.settle_timeout;
        // Flushes a pending ack and samples the in-flight count. It runs only while there is
        // something to flush or sample (`wants_tick`): an idle link sleeps until a delivery or
        // its peer wakes it (1,000 idle links ticking 20 times a second cost 8.8 % of a core;
        // `drawbridge-bench --idle-links`).
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Registered once per session: the per-message cost is a record, not a lookup.
        let age = Forwarded::register(&spec.queue);
        let in_flight_gauge =
            metrics::gauge!("drawbridge_bridge_link_in_flight", "queue" => spec.queue.clone());
        // The encoded message of the delivery the rules hold between the consumer and the
        // window (at most one), reused from one to the next.
        let mut encoded: Vec<u8> = Vec::new();
        let mut stopping = false;
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
        if let Some(why) = refused(&mut peer_check) {
            rules.handle(tokio::time::Instant::now(), Event::Failed(why));
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
            // What the rules ask, in order; each answer is fed back before anything else.
            while let Some(action) = rules.poll_action() {
                let answer = match action {
                    Action::Send { tag } => {
                        let sent = pc
                            .driver
                            .conn()
                            .send(pc.link, &tag.to_be_bytes(), &encoded)
                            .map_err(|e| match e {
                                CommandError::NoCredit => SendError::NoCredit,
                                CommandError::TooLarge { len, max } => {
                                    SendError::TooLarge { len, max }
                                }
                                e @ CommandError::NotOpen => SendError::NotOpen(e.to_string()),
                            });
                        Some(Event::Sent(sent))
                    }
                    Action::Ack { upto } => Some(Event::Acked(ack(channel, upto, op).await)),
                    Action::DeadLetter { delivery, reason } => {
                        warn!(queue = %spec.queue, message_id = ?delivery.properties.message_id().as_ref().map(|s| s.as_str()), reason = %text::escape(&reason), "message dead-lettered");
                        let props = copy_properties(&delivery.properties, &reason, &spec.queue);
                        // Boxed: a rare path, too large to keep room for in every link's task.
                        let published = Box::pin(dead_letters.publish(
                            live,
                            &delivery.data,
                            props,
                            &spec.queue,
                            stop,
                        ))
                        .await;
                        if published.is_ok() {
                            metrics::counter!("drawbridge_bridge_dead_lettered_total", "queue" => spec.queue.clone()).increment(1);
                            view.lock().expect("poisoned").dead_lettered += 1;
                        }
                        Some(Event::DeadLettered(published))
                    }
                    Action::CancelConsumer => {
                        let cancel = tokio::time::timeout(
                            op,
                            channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
                        )
                        .await;
                        Some(Event::ConsumerCancelled(match cancel {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(Broken::Restart(e)),
                            Err(_) => Err(Broken::ConsumerTimeout("cancelling the consumer")),
                        }))
                    }
                    Action::StartConsumer { prefetch } => {
                        let started =
                            tokio::time::timeout(op, start_consumer(channel, spec, ctx, prefetch))
                                .await;
                        Some(Event::ConsumerStarted(match started {
                            Ok(Ok(c)) => {
                                consumer = c;
                                Ok(())
                            }
                            Ok(Err(e)) => Err(Broken::Restart(e)),
                            Err(_) => Err(Broken::ConsumerTimeout("restarting the consumer")),
                        }))
                    }
                    Action::Forwarded(delivery) => {
                        count_forwarded(view, &delivery, &age);
                        None
                    }
                    Action::Redelivered => {
                        view.lock().expect("poisoned").redelivered += 1;
                        metrics::counter!("drawbridge_bridge_redelivered_total", "queue" => spec.queue.clone()).increment(1);
                        None
                    }
                    Action::PrefetchChanged { prefetch, narrowed } => {
                        debug!(queue = %spec.queue, prefetch, narrowed, "the prefetch follows the message sizes");
                        let mut v = view.lock().expect("poisoned");
                        if narrowed {
                            v.prefetch_narrowed += 1;
                        } else {
                            v.prefetch_widened += 1;
                        }
                        None
                    }
                    Action::ProbeAccepted { prefetch } => {
                        info!(queue = %spec.queue, prefetch, "probe accepted; forwarding with the full window");
                        None
                    }
                    Action::ConsumerRestarted { prefetch } => {
                        view.lock().expect("poisoned").prefetch = prefetch;
                        debug!(queue = %spec.queue, prefetch, "consumer restarted with a new prefetch");
                        None
                    }
                    Action::InFlight(n) => {
                        in_flight_gauge.set(n as f64);
                        view.lock().expect("poisoned").in_flight = n as u32;
                        None
                    }
                    Action::End(end) => return end,
                };
                if let Some(event) = answer {
                    rules.handle(tokio::time::Instant::now(), event);
                }
            }
            // Budget at hand is taken without a wait.
            let need_kib = rules.wants_budget();
            if let Some(need) = need_kib {
                if let Ok(permit) = ctx.bytes_in_flight.clone().try_acquire_many_owned(need) {
                    rules.handle(tokio::time::Instant::now(), Event::Budget(Some(permit)));
                    continue;
                }
            }
            let timeout = rules.poll_timeout();
            let wants_delivery = rules.wants_delivery();
            let event = tokio::select! {
                biased;
                // First, so that what the engine queued leaves at once: its frames are
                // written while it is polled.
                ev = pc.driver.next_event() => match ev {
                    Ok(DriverEvent::Settled { link, first, last, outcome }) if link == pc.link => {
                        Some(Event::Settled { first, last, settled: classify(Some(outcome), settle_timeout) })
                    }
                    Ok(DriverEvent::Credit { link, .. }) if link == pc.link => Some(Event::Credit),
                    Ok(DriverEvent::Detached { link, error }) if link == pc.link => {
                        Some(Event::Failed(Broken::PeerLost(format!("the float detached the link: {}", peer::describe(error.as_ref())))))
                    }
                    Ok(DriverEvent::Settled { link, first, last, outcome }) => {
                        if let Some(c) = canary.as_mut().filter(|c| c.link() == link) {
                            c.on_settled(first, last, outcome);
                        }
                        None
                    }
                    Ok(DriverEvent::Credit { link, .. }) => {
                        if let Some(c) = canary.as_mut().filter(|c| c.link() == link) {
                            c.on_credit(pc.driver.conn());
                        }
                        None
                    }
                    Ok(DriverEvent::Detached { link, error }) => {
                        if let Some(mut c) = canary.take_if(|c| c.link() == link) {
                            c.on_detached(peer::describe(error.as_ref()));
                        }
                        None
                    }
                    Ok(DriverEvent::Ended { error, .. }) => {
                        Some(Event::Failed(Broken::PeerLost(format!("the float ended the session: {}", peer::describe(error.as_ref())))))
                    }
                    Ok(DriverEvent::Closed { error, by_us, violation }) => {
                        if let Some(label) = violation {
                            peer::hostile(&pc.target, label, error.as_ref());
                        }
                        Some(Event::Failed(match (&error, by_us) {
                            (None, false) => Broken::PeerClosed,
                            _ => Broken::PeerLost(peer::describe(error.as_ref())),
                        }))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Event::Failed(Broken::PeerLost(e.to_string()))),
                },
                _ = live.lost() => Some(Event::BrokerLost),
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    Some(Event::Stop)
                }
                _ = async { tokio::time::sleep_until(timeout.expect("set")).await }, if timeout.is_some() => {
                    Some(Event::Timeout)
                }
                permit = async { ctx.bytes_in_flight.clone().acquire_many_owned(need_kib.expect("set")).await }, if need_kib.is_some() => {
                    Some(Event::Budget(permit.ok()))
                }
                d = consumer.next(), if wants_delivery => Some(match d {
                    Some(Ok(delivery)) => {
                        // Encoded straight from the broker delivery into the link's buffer.
                        encoded.clear();
                        let result = wire_out::encode(&delivery, cfg.max_message_size, &mut encoded)
                            .map_err(|u| {
                                metrics::counter!("drawbridge_bridge_undeliverable_total", "reason" => u.label()).increment(1);
                                u.to_string()
                            });
                        Event::Delivery(delivery, result)
                    }
                    Some(Err(e)) => Event::Failed(Broken::Consumer(e)),
                    None => Event::ConsumerEnded,
                }),
                due = async { match canary.as_deref_mut() { Some(c) => c.due().await, None => std::future::pending().await } } => {
                    if let Some(c) = canary.as_mut() {
                        c.on_due(due, pc.driver.conn());
                    }
                    None
                }
                changed = crl_changes.changed(), if crl_open => {
                    crl_open = changed.is_ok();
                    refused(&mut peer_check).map(Event::Failed)
                }
                _ = &mut expiry_timer, if expiry_armed => {
                    let why = refused(&mut peer_check);
                    match next_expiry(&peer_check) {
                        Some(wait) => expiry_timer.as_mut().reset(tokio::time::Instant::now() + wait),
                        None => expiry_armed = false,
                    }
                    why.map(Event::Failed)
                }
                _ = tick.tick(), if rules.wants_tick() => Some(Event::Tick),
            };
            if let Some(event) = event {
                rules.handle(tokio::time::Instant::now(), event);
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

/// Ack every delivery up to `upto` (`multiple = true`), within `op`.
async fn ack(channel: &Channel, upto: u64, op: Duration) -> Result<(), String> {
    match tokio::time::timeout(
        op,
        channel.basic_ack(upto, BasicAckOptions { multiple: true }),
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
        proxy: ctx.cfg.proxy.clone(),
    };
    Ok((settings, verified_chain, own.generation))
}
