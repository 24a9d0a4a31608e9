//! One inbound link of a peer connection, as the connection's task ([`crate::connection`])
//! keeps it: what it does with each delivery — convert, route, check the dedup window,
//! publish — and how it settles them: `accepted` only after the broker's confirm, in the
//! order the link received them.
//!
//! # What bounds the work of a link
//!
//! The engine grants the link `link_credit` at attach and tops it up as deliveries are
//! *settled*, never as they arrive: a delivery the float has not settled yet holds one unit
//! of credit. A peer that sends beyond its credit loses its connection (`credit`). So the
//! deliveries a link holds — waiting for their turn, for budget, or for their confirms —
//! are at most `link_credit`, each at most the announced max-message-size; nothing else
//! queues them (there is no incoming queue in the engine, unlike fe2o3's, which took up to
//! 65,535 frames per link before it looked at credit).
//!
//! Within that, the link takes the next held delivery (converts and publishes it) only
//!
//! - while the broker does not refuse publishes (a growing pause, [`Pause`]),
//! - while the bytes of its pending publishes stay below `max_link_bytes_in_flight`
//!   ([`LinkBudget`]; with nothing pending it always takes one, so a bigger message passes
//!   alone),
//! - and when the delivery before it has found room in the connection's
//!   `max_connection_bytes_in_flight` and the float's `max_bytes_in_flight`.
//!
//! A delivery held back keeps its credit, so a link that holds back stops its peer after at
//! most `link_credit` deliveries: the budgets hold the peer back through credit, without a
//! grant the peer could miss (the reason the fe2o3 version kept credit automatic).
//!
//! On shutdown the link takes no more deliveries; what is published is settled once
//! confirmed; what was never published stays unsettled and the peer resends it.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use drawbridge_amqp::{
    connection::{Connection, LinkId},
    performatives::{Error as AmqpError, Outcome},
};
use drawbridge_mapping::{self as mapping, headers, inbound, wire_in};
use drawbridge_runtime::{lograte::Every, text};
use futures::{future::BoxFuture, FutureExt};
use lapin::{
    types::{AMQPValue, LongString, ShortString},
    BasicProperties,
};
use tracing::{debug, info, warn};

use crate::{
    budget::{self, LinkBudget, Permit},
    dedup::{Seen, Ticket},
    publisher::Publisher,
    routing::Routes,
    settle::{Pause, PauseEvent, Settle, Transient},
    Ctx,
};

/// Why the float refuses a link at attach; sent to the peer as the detach error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LinkRefusal {
    /// The peer attached to an address this float does not receive on.
    #[error("unknown address `{address}`; this float receives on `{expected}`")]
    UnknownAddress {
        /// The target address the peer asked for.
        address: String,
        /// `float.address`.
        expected: String,
    },
    /// The peer asked to receive from us (a sending link on our side).
    #[error("this float only receives")]
    NotReceiving,
    /// A link canary attached while the canary queue is not declared on our broker.
    #[error("the canary queue `{0}` is not available on this float's broker")]
    CanaryUnavailable(String),
}

impl LinkRefusal {
    /// The AMQP error condition this refusal goes out as.
    pub(crate) fn condition(&self) -> &'static str {
        match self {
            LinkRefusal::UnknownAddress { .. } | LinkRefusal::CanaryUnavailable(_) => {
                "amqp:not-found"
            }
            LinkRefusal::NotReceiving => "amqp:not-allowed",
        }
    }

    /// The detach error: the condition with this refusal as its description.
    pub(crate) fn to_error(&self) -> AmqpError {
        AmqpError::new(self.condition(), self.to_string())
    }
}

/// Decide about a peer's attach to `address`: the canary queue a link canary's probes go to
/// (`Ok(Some)`), an ordinary inbound link (`Ok(None)`), or the refusal.
pub(crate) fn admit(address: &str, ctx: &Ctx) -> Result<Option<String>, LinkRefusal> {
    // A link canary's probes go to the canary queue (see the bridge's `canary` module).
    if address == ctx.cfg.canary_address && !ctx.cfg.canary_queue.is_empty() {
        let queue = ctx.cfg.canary_queue.clone();
        if !ctx.canary_ready.load(Ordering::Relaxed) {
            return Err(LinkRefusal::CanaryUnavailable(queue));
        }
        return Ok(Some(queue));
    }
    if address != ctx.cfg.address {
        return Err(LinkRefusal::UnknownAddress {
            // Echoed to the peer and logged: cut to a bounded length.
            address: text::truncate(address, inbound::MAX_ECHO).to_string(),
            expected: ctx.cfg.address.clone(),
        });
    }
    Ok(None)
}

/// A transfer that is valid, routed and past the dedup window: ready to publish.
pub(crate) struct Outbound {
    /// Inbox it goes to.
    inbox: Arc<str>,
    /// Opaque payload.
    body: Vec<u8>,
    /// 0.9.1 properties, the authenticated sender stamped.
    properties: BasicProperties,
    /// Their encoded size: checked against the broker's frame size, and counted with the
    /// body in the bytes in flight (a peer's headers take memory too).
    properties_len: usize,
    /// This copy's place in the dedup window; confirmed with the publish, dropped otherwise
    /// (`None`: a canary probe, which bypasses the window).
    ticket: Option<Ticket>,
    /// Tunnel mode: the message as the peer sent it, which goes to the bridge (the bridge
    /// converts it again with the same checks: it trusts the float no more than a peer).
    raw: Option<Bytes>,
}

impl Outbound {
    /// What it counts in the bytes in flight.
    fn len(&self) -> usize {
        self.body.len() + self.properties_len
    }
}

/// What the link decided about a received transfer before publishing.
enum Prepared {
    /// Settle now without publishing (invalid, not served, or a confirmed duplicate).
    Settle(Settle),
    /// Publish it (boxed: it carries the message).
    Publish(Box<Outbound>),
}

/// A transfer whose fate is known, ready for its disposition.
pub(crate) struct Settled {
    /// How it settles.
    settle: Settle,
    /// Whether it was published (only those count as accepted; a confirmed duplicate is
    /// accepted without being counted).
    published: bool,
    /// Its bytes in flight, given back once the disposition is queued.
    permit: Option<Permit>,
}

/// A published delivery's confirm: its link, its place in the link's order, the result.
pub(crate) type Confirm = BoxFuture<'static, (LinkId, u64, Settled)>;

/// A prepared delivery's share of the budgets: its link, and the permit once there is room.
pub(crate) type Room = BoxFuture<'static, (LinkId, Permit)>;

/// A published delivery in the link's order: its delivery id and, once confirmed, how it
/// settles.
struct Slot {
    /// The engine's delivery id (`None`: the peer settled it itself).
    id: Option<u32>,
    /// `None` until its confirm came.
    done: Option<Settled>,
}

/// The peer-independent parts the link's work needs, borrowed from the connection's task.
pub(crate) struct Shared<'a> {
    /// The float.
    pub ctx: &'a Arc<Ctx>,
    /// The peer's legal name, from its certificate.
    pub sender: &'a Arc<str>,
    /// `drawbridge_float_accepted_total` for this peer, registered once: building the
    /// labelled key for each message cost about four allocations.
    pub accepted: &'a metrics::Counter,
    /// The peer's "transfer rejected" log line, at most one per interval for all its links
    /// (a peer decides how often it is rejected).
    pub rejections: &'a Every,
}

/// The state of one inbound link.
pub(crate) struct Link {
    /// The engine's id of the link.
    id: LinkId,
    /// Its name, for the log lines.
    pub(crate) name: String,
    /// Its broker channel.
    publisher: Publisher,
    /// Destination → inbox cache.
    routes: Routes,
    /// Its bytes in flight.
    budget: LinkBudget,
    /// Backoff while the broker refuses publishes.
    pause: Pause,
    /// Deliveries received and not taken yet (paused, or over the budget), in order. At most
    /// the link's credit: each holds its unit until settled.
    held: VecDeque<(Option<u32>, Bytes)>,
    /// A prepared delivery waiting for room in the budgets (the connection's task polls its
    /// [`Room`]); nothing else is taken meanwhile.
    waiting: Option<(Option<u32>, Outbound)>,
    /// Published deliveries in receive order, waiting for their confirms; settled from the
    /// front as the confirms come, so they are settled in the order received.
    inflight: VecDeque<Slot>,
    /// Order number of `inflight`'s front.
    front: u64,
    /// Whether the link is holding back for lack of budget (one count per episode).
    held_back: bool,
    /// A link canary's: the canary queue its probes go to (not an inbox).
    canary: Option<String>,
    /// The waiting delivery waited for its broker channel to open: it does not wait twice.
    opened: bool,
    /// Stream inboxes: the window round this link waits for before it publishes (asked at
    /// attach, so that what another float published for its peer is read back first; see
    /// `crate::window`). 0 without a stream window, and for a canary.
    needed: u64,
}

impl Link {
    pub(crate) fn new(
        id: LinkId,
        name: String,
        connection_pool: budget::Pool,
        ctx: &Ctx,
        canary: Option<String>,
    ) -> Self {
        Link {
            id,
            name,
            budget: LinkBudget::within(
                ctx.cfg.max_link_bytes_in_flight,
                vec![connection_pool, ctx.pool.clone()],
            ),
            pause: Pause::new(Duration::from_millis(100), Duration::from_secs(5)),
            publisher: ctx.channels.publisher(),
            routes: Routes::default(),
            held: VecDeque::new(),
            waiting: None,
            inflight: VecDeque::new(),
            front: 0,
            held_back: false,
            needed: match (&ctx.window, &canary) {
                (Some(w), None) => w.request(),
                _ => 0,
            },
            canary,
            opened: false,
        }
    }

    /// Stream inboxes: whether the window is not rebuilt yet for this link on the current
    /// broker connection. Without a connection it does not hold: the publish is released as
    /// without a window.
    fn gated(&self, ctx: &Ctx) -> bool {
        match (&ctx.window, ctx.broker_generation()) {
            (Some(w), Some(generation)) => !w.is_open(self.needed, generation),
            _ => false,
        }
    }

    /// Whether it is a link canary's.
    pub(crate) fn is_canary(&self) -> bool {
        self.canary.is_some()
    }

    /// Published deliveries not settled yet.
    pub(crate) fn unsettled(&self) -> usize {
        self.inflight.len()
    }

    /// A delivery arrived: held until the link takes it ([`Link::pump`]). `id` is its
    /// delivery id, `None` when the peer sent it settled (it gets no disposition).
    pub(crate) fn hold(&mut self, id: Option<u32>, payload: Bytes) {
        self.held.push_back((id, payload));
    }

    /// Until when the link is paused, if it holds deliveries it would take but for the pause.
    pub(crate) fn paused_until(&self) -> Option<tokio::time::Instant> {
        if self.held.is_empty() || self.waiting.is_some() {
            return None;
        }
        self.pause.until(tokio::time::Instant::now())
    }

    /// Shutdown: take nothing more. What was not published stays unsettled (the peer resends
    /// it; a dedup ticket is dropped with it).
    pub(crate) fn drain(&mut self) {
        self.held.clear();
        self.waiting = None;
        self.opened = false;
    }

    /// Take held deliveries while the link may (see the module doc): each is settled at
    /// once, published (its confirm joins `confirms`), or parked until the budgets have room
    /// (its wait joins `rooms`).
    pub(crate) fn pump(
        &mut self,
        conn: &mut Connection,
        sh: &Shared<'_>,
        confirms: &mut Vec<Confirm>,
        rooms: &mut Vec<Room>,
    ) {
        loop {
            let paused = self.pause.until(tokio::time::Instant::now()).is_some();
            self.note_budget(sh);
            if paused || self.waiting.is_some() || !self.budget.has_room() {
                return;
            }
            // Checked before the window classifies anything: an incomplete window would
            // take a stored message for a new one.
            if self.canary.is_none() && self.gated(sh.ctx) {
                return;
            }
            let Some((id, payload)) = self.held.pop_front() else {
                return;
            };
            let mut prepared = match &self.canary {
                Some(queue) => prepare_probe(&payload, queue, sh.sender),
                None => prepare(&payload, sh.sender, sh.ctx, &mut self.routes),
            };
            if let (Prepared::Publish(o), Some(_)) = (&mut prepared, &sh.ctx.tunnel) {
                if o.ticket.is_some() {
                    o.raw = Some(payload.clone());
                }
            }
            drop(payload);
            let outbound = match prepared {
                Prepared::Settle(settle) => {
                    observe(&mut self.pause, &settle, sh.sender);
                    let done = Settled {
                        settle,
                        published: false,
                        permit: None,
                    };
                    settle_one(conn, self.id, id, done, sh);
                    continue;
                }
                Prepared::Publish(o) => *o,
            };
            let len = outbound.len();
            match self.budget.try_take(len) {
                Some(permit) => {
                    if let Some(c) = self.publish(conn, id, outbound, permit, sh, rooms) {
                        confirms.push(c);
                    }
                }
                None => {
                    let link = self.id;
                    rooms.push(self.budget.take(len).map(move |p| (link, p)).boxed());
                    self.waiting = Some((id, outbound));
                }
            }
        }
    }

    /// The budgets have room for the waiting delivery, or its broker channel was being
    /// opened: publish it. `None` when it is gone (drained): the permit is given back; or when
    /// it waits again (its new [`Room`] joins `rooms`).
    pub(crate) fn room(
        &mut self,
        permit: Permit,
        conn: &mut Connection,
        sh: &Shared<'_>,
        rooms: &mut Vec<Room>,
    ) -> Option<Confirm> {
        let (id, outbound) = self.waiting.take()?;
        self.publish(conn, id, outbound, permit, sh, rooms)
    }

    /// Count and log the start of each episode of holding back for lack of budget.
    fn note_budget(&mut self, sh: &Shared<'_>) {
        let short = !self.budget.has_room() || self.waiting.is_some();
        if short && !self.held_back {
            sh.ctx.stats.budget_holds.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("drawbridge_float_budget_holds_total").increment(1);
            debug!(
                peer = %sh.sender,
                link_bytes = self.budget.in_flight(),
                float_bytes = sh.ctx.pool.in_flight(),
                "inbound link holding back: bytes in flight at the budget"
            );
        }
        self.held_back = short;
    }

    /// Publish a delivery holding its bytes: returns its confirm, or settles it at once when
    /// the publish failed before one.
    ///
    /// Its broker channel not open, it waits (once) for it to open, in a [`Room`] the
    /// connection's task polls with the rest; the task itself never waits for the broker.
    fn publish(
        &mut self,
        conn: &mut Connection,
        id: Option<u32>,
        outbound: Outbound,
        permit: Permit,
        sh: &Shared<'_>,
        rooms: &mut Vec<Room>,
    ) -> Option<Confirm> {
        if let Some(hub) = &sh.ctx.tunnel {
            let Outbound {
                inbox,
                body,
                ticket,
                raw,
                ..
            } = outbound;
            let (message, probe) = match raw {
                Some(raw) => (raw.to_vec(), false),
                None => (body, true),
            };
            let published = hub.publish(sh.sender, &inbox, message, probe);
            return self.published(conn, id, published, ticket, permit, sh);
        }
        let channel = self.publisher.channel_now();
        let Some(broker) = &sh.ctx.broker else {
            // Neither a tunnel nor a broker: not a configuration the float starts with.
            let unavailable = Err(Settle::Release(Transient::BrokerUnavailable));
            return self.published(conn, id, unavailable, outbound.ticket, permit, sh);
        };
        if channel.is_none() && !std::mem::take(&mut self.opened) {
            self.opened = true;
            let link = self.id;
            rooms.push(
                self.publisher
                    .opening(broker)
                    .map(move |()| (link, permit))
                    .boxed(),
            );
            self.waiting = Some((id, outbound));
            return None;
        }
        self.opened = false;
        // The connection changed since the window classified it (a reconnect between the
        // gate and here, or its channel opened on the new one): released, and resent.
        if let (Some(w), Some((live, _)), true) =
            (&sh.ctx.window, &channel, outbound.ticket.is_some())
        {
            if !w.is_open(self.needed, live.generation) {
                let unavailable = Err(Settle::Release(Transient::BrokerUnavailable));
                return self.published(conn, id, unavailable, outbound.ticket, permit, sh);
            }
        }
        let Outbound {
            inbox,
            body,
            properties,
            properties_len,
            ticket,
            raw: _,
        } = outbound;
        let published = match channel {
            Some(channel) => self.publisher.publish(
                channel,
                broker.config().op_timeout,
                &sh.ctx.cfg.inbox_exchange,
                inbox,
                body,
                properties,
                properties_len,
            ),
            // It was opened for this delivery, and is gone again or could not be.
            None => Err(Settle::Release(Transient::BrokerUnavailable)),
        };
        self.published(conn, id, published, ticket, permit, sh)
    }

    /// A publish was handed over (its confirm) or settled at once: the confirm joins the
    /// link's order, or the delivery is settled now.
    fn published(
        &mut self,
        conn: &mut Connection,
        id: Option<u32>,
        published: Result<crate::publisher::Confirm, Settle>,
        ticket: Option<Ticket>,
        permit: Permit,
        sh: &Shared<'_>,
    ) -> Option<Confirm> {
        match published {
            Ok(confirm) => {
                let seq = self.front + self.inflight.len() as u64;
                self.inflight.push_back(Slot { id, done: None });
                let link = self.id;
                Some(
                    confirm
                        .map(move |settle| {
                            let probe = ticket.is_none();
                            if let (Settle::Accept, Some(ticket)) = (&settle, ticket) {
                                ticket.confirmed(Instant::now());
                            }
                            let done = Settled {
                                settle,
                                // A probe is not a message: not counted as accepted.
                                published: !probe,
                                permit: Some(permit),
                            };
                            (link, seq, done)
                        })
                        .boxed(),
                )
            }
            Err(settle) => {
                if let Settle::Reject(_) = settle {
                    // Headers that fit the float's bound but not this broker's frames.
                    metrics::counter!("drawbridge_float_rejected_total", "reason" => "headers_too_large", "peer" => sh.sender.to_string())
                        .increment(1);
                }
                observe(&mut self.pause, &settle, sh.sender);
                let done = Settled {
                    published: matches!(settle, Settle::Release(_)),
                    settle,
                    permit: Some(permit),
                };
                settle_one(conn, self.id, id, done, sh);
                None
            }
        }
    }

    /// The confirm of the delivery at order number `seq` came: settle it and every one
    /// after it already confirmed (consecutive accepts leave as one ranged disposition).
    pub(crate) fn confirmed(
        &mut self,
        seq: u64,
        done: Settled,
        conn: &mut Connection,
        sh: &Shared<'_>,
    ) {
        let Some(slot) = seq
            .checked_sub(self.front)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.inflight.get_mut(i))
        else {
            return;
        };
        slot.done = Some(done);
        while self.inflight.front().is_some_and(|s| s.done.is_some()) {
            let Some(Slot {
                id,
                done: Some(done),
            }) = self.inflight.pop_front()
            else {
                break;
            };
            self.front += 1;
            observe(&mut self.pause, &done.settle, sh.sender);
            settle_one(conn, self.id, id, done, sh);
        }
    }
}

/// Feed a settlement to the link's pause; one log line per refusal episode.
fn observe(pause: &mut Pause, settle: &Settle, sender: &str) {
    match pause.observe(settle, tokio::time::Instant::now()) {
        Some(PauseEvent::Paused(reason)) => {
            warn!(peer = %sender, reason = %reason, "inbound link paused: the broker refuses publishes; transfers are released and resent")
        }
        Some(PauseEvent::Resumed) => {
            info!(peer = %sender, "inbound link resumed: the broker accepts publishes again")
        }
        None => {}
    }
}

/// Convert (validate, stamp the authenticated sender), route and check the dedup window.
fn prepare(payload: &[u8], sender: &Arc<str>, ctx: &Ctx, routes: &mut Routes) -> Prepared {
    let inbound = match wire_in::from_bytes_stamped(payload, ctx.cfg.max_message_size, sender) {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!("drawbridge_float_rejected_total", "reason" => e.label(), "peer" => sender.to_string())
                .increment(1);
            return Prepared::Settle(Settle::Reject(e.to_string()));
        }
    };
    if inbound.stripped_headers > 0 {
        metrics::counter!("drawbridge_float_reserved_headers_stripped_total")
            .increment(inbound.stripped_headers as u64);
    }
    let Some(inbox) = routes.inbox(&ctx.identities, &inbound.destination) else {
        metrics::counter!("drawbridge_float_rejected_total", "reason" => "unknown_destination", "peer" => sender.to_string())
            .increment(1);
        return Prepared::Settle(Settle::Reject(
            inbound::Invalid::unknown_destination(&inbound.destination).to_string(),
        ));
    };
    let ticket = match ctx
        .dedup
        .begin(sender, &inbox, &inbound.dedup_key(), Instant::now())
    {
        Seen::Confirmed => {
            ctx.stats
                .duplicates_suppressed
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("drawbridge_float_duplicates_suppressed_total").increment(1);
            return Prepared::Settle(Settle::Accept);
        }
        Seen::InFlight(ticket) => {
            ctx.stats.duplicates_passed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("drawbridge_float_duplicates_passed_total").increment(1);
            ticket
        }
        Seen::New(ticket) => ticket,
    };
    Prepared::Publish(Box::new(Outbound {
        inbox,
        properties: inbound.properties,
        properties_len: inbound.properties_len,
        body: inbound.body,
        ticket: Some(ticket),
        raw: None,
    }))
}

/// Probes are small: anything bigger on a canary link is not a probe.
const MAX_PROBE_SIZE: usize = 1024;

/// A link canary's probe: one data section of at most [`MAX_PROBE_SIZE`] bytes, published
/// as it is (transient, stamped with the sender) to the canary queue; nothing of it reaches
/// an inbox or the dedup window.
fn prepare_probe(payload: &[u8], queue: &str, sender: &Arc<str>) -> Prepared {
    let body = match probe_body(payload) {
        Some(body) => body,
        None => {
            return Prepared::Settle(Settle::Reject(
                "a canary probe is one data section".to_string(),
            ))
        }
    };
    if body.len() > MAX_PROBE_SIZE {
        return Prepared::Settle(Settle::Reject(format!(
            "a canary probe is at most {MAX_PROBE_SIZE} bytes; this one is {}",
            body.len()
        )));
    }
    metrics::counter!("drawbridge_float_canary_probes_total", "peer" => sender.to_string())
        .increment(1);
    let mut hdrs = lapin::types::FieldTable::default();
    hdrs.insert(
        ShortString::from(headers::SENDER),
        AMQPValue::LongString(LongString::from(sender.to_string())),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(1)
        .with_headers(hdrs);
    Prepared::Publish(Box::new(Outbound {
        inbox: Arc::from(queue),
        properties_len: mapping::properties_len(&properties),
        properties,
        body: body.to_vec(),
        ticket: None,
        raw: None,
    }))
}

/// The body of a probe: the payload's one data section (any other sections, such as the
/// properties the bridge's canary writes, are only checked). `None` for anything else: no
/// data section, several, an `amqp-value` or `amqp-sequence` body, or malformed bytes.
fn probe_body(payload: &[u8]) -> Option<&[u8]> {
    use drawbridge_amqp::{codec::Reader, message::section, Limits};
    let mut r = Reader::new(payload, Limits::DEFAULT);
    let mut body = None;
    while r.remaining() > 0 {
        let descriptor = r.descriptor().ok()?;
        let value = r.skip().ok()?;
        if descriptor != section::DATA {
            // amqp-sequence, amqp-value: not a data body.
            if descriptor == 0x76 || descriptor == 0x77 {
                return None;
            }
            continue;
        }
        if body.is_some() {
            return None;
        }
        body = Some(match value.first()? {
            0xa0 => value.get(2..)?,
            0xb0 => value.get(5..)?,
            _ => return None,
        });
    }
    body
}

/// Counters for an accepted transfer that was published (not a suppressed duplicate);
/// `accepted` is the peer's counter, labelled by the authenticated sender (bounded by the
/// network's members).
fn record_accept(published: bool, ctx: &Ctx, accepted: &metrics::Counter) {
    if published {
        ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
        accepted.increment(1);
    }
}

/// Settle one delivery; its bytes in flight are given back afterwards. A rejection is
/// logged through the peer's `rejections` (one line per interval; every one is counted in
/// `drawbridge_float_rejected_total`). The engine joins consecutive settlements with one
/// outcome into one disposition and tops the link's credit up.
fn settle_one(
    conn: &mut Connection,
    link: LinkId,
    id: Option<u32>,
    done: Settled,
    sh: &Shared<'_>,
) {
    let Settled {
        settle,
        published,
        permit,
    } = done;
    let outcome = match settle {
        Settle::Accept => {
            record_accept(published, sh.ctx, sh.accepted);
            Outcome::Accepted
        }
        Settle::Reject(why) => {
            if let Some(skipped) = sh.rejections.hit() {
                warn!(peer = %sh.sender, reason = %text::escape(&why), similar_rejections_not_logged = skipped, "transfer rejected");
            }
            sh.ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
            Outcome::Rejected(Some(AmqpError::new("amqp:precondition-failed", why)))
        }
        Settle::Release(why) => {
            debug!(peer = %sh.sender, reason = %why, "transfer released");
            sh.ctx.stats.released.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("drawbridge_float_released_total", "reason" => why.label(), "peer" => sh.sender.to_string())
                .increment(1);
            Outcome::Released
        }
    };
    // Only fails when the link or its session is gone: nothing left to settle then.
    if let Some(id) = id {
        let _ = conn.settle(link, id, outcome);
    }
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_amqp_conditions() {
        let unknown = LinkRefusal::UnknownAddress {
            address: "elsewhere".into(),
            expected: "drawbridge.inbound".into(),
        };
        assert_eq!(unknown.condition(), "amqp:not-found");
        assert_eq!(
            unknown.to_error().description.as_deref(),
            Some("unknown address `elsewhere`; this float receives on `drawbridge.inbound`")
        );
        assert_eq!(LinkRefusal::NotReceiving.condition(), "amqp:not-allowed");
    }

    #[test]
    fn a_probe_is_exactly_one_data_section() {
        use drawbridge_amqp::message::write_data_message;
        assert_eq!(
            probe_body(&[0x00, 0x53, 0x75, 0xa0, 2, 7, 8]),
            Some(&[7u8, 8][..])
        );
        assert_eq!(
            probe_body(&[0x00, 0x53, 0x75, 0xb0, 0, 0, 0, 1, 9]),
            Some(&[9u8][..])
        );
        assert_eq!(probe_body(&[0x00, 0x53, 0x75, 0xa0, 2, 7]), None, "short");
        assert_eq!(
            probe_body(&[0x00, 0x53, 0x75, 0xa0, 1, 7, 0x00, 0x53, 0x75, 0xa0, 0]),
            None,
            "two data sections"
        );
        assert_eq!(probe_body(&[0x00, 0x53, 0x77, 0x40]), None, "amqp-value");
        assert_eq!(probe_body(&[]), None, "no body");
        let mut with_properties = Vec::new();
        write_data_message(&mut with_properties, b"id", b"probe");
        assert_eq!(probe_body(&with_properties), Some(&b"probe"[..]));
    }
}
