//! The rules of one forwarding session — a peer connection fed from one broker consumer — as a
//! state machine with no I/O, quinn-proto style: the link's task ([`crate::link`]) feeds it
//! [`Event`]s (a delivery, a settlement, the answer to an action, a timer) and performs the
//! [`Action`]s it gives back (send, ack up to, dead-letter, cancel or start the consumer,
//! notes for the view and the log, end). So the rules that make the link lose nothing are
//! tested here without a broker or a peer, including by a property test over arbitrary event
//! orders:
//!
//! - a broker delivery is acked only after the peer accepted it (or after it was confirmed
//!   into the dead-letter queue), in queue order, with `multiple = true` up to the last
//!   contiguous settled delivery;
//! - at the first `released` / `modified` / error / settlement timeout the session ends:
//!   nothing after that point is acked, and the broker requeues every unacked delivery in
//!   order when the link closes the channel;
//! - on any other failure the session first takes the acceptances already on their way (for a
//!   short while), acks that prefix, and gives up the rest;
//! - a lost broker connection ends the session at once: its deliveries are never acked;
//! - a stop drains: no new delivery is taken, what is in flight settles (within the drain
//!   grace), then the session ends.
//!
//! The task performs the actions in order and answers each one that asks for an answer
//! ([`Action::needs_answer`]) before it takes the next event; while an answer is due the session
//! takes no further step of its own.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use crate::{
    budget::{kib, Prefetch},
    dead_letter::{DeadLetterError, Interrupted},
    settle::{classify, AckBatch, Settled, Step},
    window::Window,
};

/// What the session needs of a broker delivery.
pub(crate) trait Delivered {
    /// The broker's delivery tag (increasing within the session's channel).
    fn tag(&self) -> u64;
    /// Body size in bytes (for the prefetch and the byte budget).
    fn size(&self) -> usize;
    /// Whether the broker marked it redelivered.
    fn redelivered(&self) -> bool;
    /// Its message id, if any.
    fn message_id(&self) -> Option<String>;
}

impl Delivered for lapin::message::Delivery {
    fn tag(&self) -> u64 {
        self.delivery_tag
    }
    fn size(&self) -> usize {
        self.data.len()
    }
    fn redelivered(&self) -> bool {
        self.redelivered
    }
    fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|s| s.to_string())
    }
}

/// How a forwarding session ended.
#[derive(Debug)]
pub(crate) enum End {
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
pub(crate) struct SessionStats {
    /// Transfers the peer accepted in this session.
    pub(crate) accepted: u64,
    /// Deliveries acked in this session (accepted or dead-lettered): the queue moved.
    pub(crate) acked: u64,
    /// A transfer was released, modified, failed or not settled in time (the peer takes
    /// the connection but not the messages: the case that must not recycle quickly).
    pub(crate) transfer_failed: bool,
    /// Message id of the session's first delivery, if the broker marked it redelivered.
    pub(crate) first_redelivered: Option<String>,
    /// Whether the session has seen a delivery yet.
    pub(crate) seen_delivery: bool,
}

/// The fixed settings of a session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most deliveries in the window (the link's `window`).
    pub(crate) window: usize,
    /// How long the peer has to settle a transfer, or to grant credit.
    pub(crate) settle_timeout: Duration,
    /// How long a stop may take to settle what is in flight.
    pub(crate) drain_grace: Duration,
    /// How long a broken session waits for acceptances already on their way.
    pub(crate) salvage_wait: Duration,
    /// The process byte budget, in KiB (what one delivery may hold of it is capped by it).
    pub(crate) budget_kib: u32,
    /// Ack at least every this many deliveries.
    pub(crate) ack_batch: u32,
}

/// Why sending a transfer failed (the engine's answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The peer's credit is used up: wait for its next flow.
    NoCredit,
    /// The peer announced a smaller max-message-size: it will never take this message.
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The peer's maximum.
        max: u64,
    },
    /// The link or connection is not open any more.
    NotOpen(String),
}

/// What happened, fed to [`Session::handle`]. `P` is what a transfer holds of the byte budget.
#[derive(Debug)]
pub(crate) enum Event<D, P> {
    /// The consumer delivered `D`; the link encoded it (its bytes are with the link) or found
    /// why it can never be delivered.
    Delivery(D, Result<(), String>),
    /// Room in the byte budget for the delivery waiting for it; `None`: the budget was closed.
    Budget(Option<P>),
    /// Answer to [`Action::Send`]: the engine's delivery id, or why not.
    Sent(Result<u32, SendError>),
    /// The peer granted credit on the link.
    Credit,
    /// The peer settled deliveries `first..=last` (serial numbers) with `settled`.
    Settled {
        /// First delivery id.
        first: u32,
        /// Last delivery id.
        last: u32,
        /// What it means for their broker deliveries.
        settled: Settled,
    },
    /// Answer to [`Action::DeadLetter`].
    DeadLettered(Result<(), Interrupted>),
    /// Answer to [`Action::Ack`].
    Acked(Result<(), String>),
    /// Answer to [`Action::CancelConsumer`].
    ConsumerCancelled(Result<(), Broken>),
    /// Answer to [`Action::StartConsumer`].
    ConsumerStarted(Result<(), Broken>),
    /// The consumer's stream ended (it was cancelled, by us or by the broker).
    ConsumerEnded,
    /// Stop: drain and end (DeleteLink, shutdown).
    Stop,
    /// The session cannot go on (peer lost or closed, revoked, expired, consumer failed):
    /// take what the peer already accepted, then end.
    Failed(Broken),
    /// The broker connection is gone: end at once, acking nothing.
    BrokerLost,
    /// The time [`Session::poll_timeout`] gave has come.
    Timeout,
    /// Periodic: flush a pending ack, sample the in-flight count
    /// ([`Session::wants_tick`]).
    Tick,
}

/// What the link does for the session, in order.
#[derive(Debug)]
pub(crate) enum Action<D> {
    /// Send the delivery with this tag (the one given last, its bytes with the link); answer
    /// [`Event::Sent`].
    Send {
        /// Its broker delivery tag.
        tag: u64,
    },
    /// Ack every delivery up to `tag` (`multiple = true`); answer [`Event::Acked`].
    Ack {
        /// Highest delivery tag settled.
        upto: u64,
    },
    /// Publish `delivery` to the dead-letter queue with `reason`; answer
    /// [`Event::DeadLettered`].
    DeadLetter {
        /// The broker delivery.
        delivery: D,
        /// Why it can never be delivered.
        reason: String,
    },
    /// Cancel the consumer; answer [`Event::ConsumerCancelled`].
    CancelConsumer,
    /// Start a new consumer with `prefetch` on the session's channel; answer
    /// [`Event::ConsumerStarted`].
    StartConsumer {
        /// The consumer's prefetch.
        prefetch: u16,
    },
    /// The peer accepted `D` (its ack is recorded): count it.
    Forwarded(D),
    /// A delivery came marked redelivered: count it.
    Redelivered,
    /// The prefetch follows the message sizes to `prefetch` (the consumer restarts with it).
    PrefetchChanged {
        /// The new prefetch.
        prefetch: u16,
        /// Narrowed (a large message) or widened.
        narrowed: bool,
    },
    /// The probe (a prefetch of one after failed transfers) was accepted: the full window
    /// comes back.
    ProbeAccepted {
        /// The prefetch the consumer restarts with.
        prefetch: u16,
    },
    /// The consumer restarted with `prefetch`.
    ConsumerRestarted {
        /// Its prefetch.
        prefetch: u16,
    },
    /// Deliveries in the window changed to this many (sampled at ticks).
    InFlight(usize),
    /// The session is over.
    End(End),
}

impl<D> Action<D> {
    /// Whether the link must answer this action before it feeds the next event.
    pub(crate) fn needs_answer(&self) -> bool {
        matches!(
            self,
            Action::Send { .. }
                | Action::Ack { .. }
                | Action::DeadLetter { .. }
                | Action::CancelConsumer
                | Action::StartConsumer { .. }
        )
    }
}

/// The delivery between the consumer and the window.
#[derive(Debug)]
struct Pending<D, P> {
    delivery: D,
    /// KiB of the byte budget it needs.
    need: u32,
    /// Its share of the budget, once granted.
    permit: Option<P>,
    /// Handed to the link to send; the answer is due.
    sending: bool,
}

/// What an outstanding action's answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Send,
    Ack,
    DeadLetter { tag: u64 },
    Cancel { drain: bool },
    Start { prefetch: u16 },
}

/// How an ack that fails while the session ends changes its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnAckError {
    /// The end becomes `Broken::Ack`.
    Replace,
    /// The end becomes `Broken::Then`.
    Then,
    /// Kept as it is.
    Ignore,
}

#[derive(Debug)]
enum Phase {
    Forwarding,
    /// Broken: taking the acceptances already on their way until `until`.
    Salvaging {
        reason: Broken,
        until: Instant,
    },
    /// Waiting for the last answers (the final ack), then ending.
    Ending {
        end: End,
        on_ack_error: OnAckError,
    },
    Ended,
}

/// One forwarding session's state (see the module doc).
#[derive(Debug)]
pub(crate) struct Session<D, P> {
    limits: Limits,
    window: Window<D, P>,
    acks: AckBatch,
    actions: VecDeque<Action<D>>,
    /// Answers due, in the order of their actions.
    due: VecDeque<Due>,
    pending: Option<Pending<D, P>>,
    /// The peer's credit ran out at this instant: it has the settle timeout to grant more.
    credit_deadline: Option<Instant>,
    draining: bool,
    drain_deadline: Option<Instant>,
    /// A prefetch of one after failed transfers, until one is accepted.
    probe: bool,
    prefetch: Prefetch,
    /// Prefetch the consumer was started with.
    consumer_prefetch: u16,
    /// The consumer was cancelled to restart with a new prefetch; its last deliveries still
    /// arrive.
    switching: bool,
    stats: SessionStats,
    in_flight_seen: usize,
    phase: Phase,
}

impl<D: Delivered, P> Session<D, P> {
    /// A session whose consumer was started with `consumer_prefetch` (1 when `probe`).
    pub(crate) fn new(limits: Limits, prefetch: Prefetch, probe: bool) -> Self {
        let consumer_prefetch = if probe { 1 } else { prefetch.current() };
        Session {
            limits,
            window: Window::new(),
            acks: AckBatch::new(limits.ack_batch),
            actions: VecDeque::new(),
            due: VecDeque::new(),
            pending: None,
            credit_deadline: None,
            draining: false,
            drain_deadline: None,
            probe,
            prefetch,
            consumer_prefetch,
            switching: false,
            stats: SessionStats::default(),
            in_flight_seen: 0,
            phase: Phase::Forwarding,
        }
    }

    /// The prefetch a session starts with (1 while probing).
    pub(crate) fn first_prefetch(&self) -> u16 {
        self.consumer_prefetch
    }

    /// What the session achieved, and the prefetch it learned (for the next session).
    pub(crate) fn finish(self) -> (SessionStats, Prefetch) {
        (self.stats, self.prefetch)
    }

    /// The next action for the link, if any.
    pub(crate) fn poll_action(&mut self) -> Option<Action<D>> {
        self.actions.pop_front()
    }

    /// Whether the session takes a delivery from the consumer now.
    pub(crate) fn wants_delivery(&self) -> bool {
        matches!(self.phase, Phase::Forwarding)
            && !self.draining
            && self.pending.is_none()
            && self.due.is_empty()
            && self.window.len() < self.limits.window
    }

    /// KiB of the byte budget the waiting delivery needs, if one waits for it.
    pub(crate) fn wants_budget(&self) -> Option<u32> {
        match (&self.phase, &self.pending) {
            (Phase::Forwarding, Some(p)) if p.permit.is_none() => Some(p.need),
            _ => None,
        }
    }

    /// Whether the periodic [`Event::Tick`] has work: an ack to flush or a count to sample.
    pub(crate) fn wants_tick(&self) -> bool {
        matches!(self.phase, Phase::Forwarding)
            && (self.acks.is_pending() || !self.window.is_empty() || self.in_flight_seen != 0)
    }

    /// When to feed [`Event::Timeout`] next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Forwarding => [
                self.drain_deadline,
                self.window.next_deadline(),
                self.credit_deadline
                    .filter(|_| self.pending.as_ref().is_some_and(|p| p.permit.is_some())),
            ]
            .into_iter()
            .flatten()
            .min(),
            Phase::Salvaging { until, .. } => Some(*until),
            Phase::Ending { .. } | Phase::Ended => None,
        }
    }

    /// Whether the session is over (its [`Action::End`] was given).
    pub(crate) fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    /// Feed one event at `now`.
    pub(crate) fn handle(&mut self, now: Instant, event: Event<D, P>) {
        if self.is_ended() {
            return;
        }
        match event {
            Event::Delivery(delivery, encoded) => self.delivery(delivery, encoded),
            Event::Budget(Some(permit)) => {
                if let Some(p) = self.pending.as_mut().filter(|p| p.permit.is_none()) {
                    p.permit = Some(permit);
                    self.send();
                }
            }
            Event::Budget(None) => self.broken(now, Broken::BudgetClosed),
            Event::Sent(result) => self.sent(now, result),
            Event::Credit => {
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.permit.is_some() && !p.sending)
                {
                    self.send();
                }
            }
            Event::Settled {
                first,
                last,
                settled,
            } => {
                self.window.settle(first, last, &settled);
            }
            Event::DeadLettered(result) => self.dead_lettered(result),
            Event::Acked(result) => self.acked(result),
            Event::ConsumerCancelled(result) => {
                let drain = matches!(self.answered(), Some(Due::Cancel { drain: true }));
                match result {
                    // Its last deliveries still arrive; a new consumer starts when they end.
                    Ok(()) if !drain => self.switching = true,
                    Ok(()) => {}
                    // A drain's cancel failing changes nothing: the channel closes at the end.
                    Err(_) if drain => {}
                    Err(b) => self.broken(now, b),
                }
            }
            Event::ConsumerStarted(result) => {
                let Some(Due::Start { prefetch }) = self.answered() else {
                    return;
                };
                match result {
                    Ok(()) => {
                        self.consumer_prefetch = prefetch;
                        self.switching = false;
                        self.actions
                            .push_back(Action::ConsumerRestarted { prefetch });
                    }
                    Err(b) => self.broken(now, b),
                }
            }
            Event::ConsumerEnded => {
                if self.switching && matches!(self.phase, Phase::Forwarding) {
                    // The old consumer delivered all it had: start the new one.
                    let prefetch = self.wanted_prefetch();
                    self.ask(Action::StartConsumer { prefetch }, Due::Start { prefetch });
                } else {
                    self.broken(now, Broken::ConsumerCancelled);
                }
            }
            Event::Stop => {
                if !self.draining {
                    self.draining = true;
                    self.drain_deadline = Some(now + self.limits.drain_grace);
                    // No new deliveries; those prefetched but not sent are requeued when the
                    // channel closes.
                    if !self.switching && matches!(self.phase, Phase::Forwarding) {
                        self.ask(Action::CancelConsumer, Due::Cancel { drain: true });
                    }
                }
            }
            Event::Failed(why) => match self.phase {
                Phase::Forwarding => self.broken(now, why),
                // The peer is gone: no more acceptances can come.
                Phase::Salvaging { .. } => self.end_salvage(),
                Phase::Ending { .. } | Phase::Ended => {}
            },
            Event::BrokerLost => self.end_now(End::Broken(Broken::BrokerLost(""))),
            Event::Timeout => self.timeout(now),
            Event::Tick => {
                if matches!(self.phase, Phase::Forwarding) {
                    if self.window.len() != self.in_flight_seen {
                        self.in_flight_seen = self.window.len();
                        self.actions
                            .push_back(Action::InFlight(self.in_flight_seen));
                    }
                    if self.due.is_empty() {
                        self.flush();
                    }
                }
            }
        }
        self.advance(now);
    }

    fn delivery(&mut self, delivery: D, encoded: Result<(), String>) {
        if !self.stats.seen_delivery {
            self.stats.seen_delivery = true;
            if delivery.redelivered() {
                self.stats.first_redelivered = delivery.message_id();
            }
        }
        if delivery.redelivered() {
            self.actions.push_back(Action::Redelivered);
        }
        let before = self.prefetch.current();
        if !self.probe {
            if let Some(after) = self.prefetch.observe(delivery.size() as u64) {
                self.actions.push_back(Action::PrefetchChanged {
                    prefetch: after,
                    narrowed: after < before,
                });
                self.resize();
            }
        }
        match encoded {
            Err(reason) => self
                .window
                .settled_here(delivery, Settled::DeadLetter(reason)),
            Ok(()) => {
                let need = kib(delivery.size(), self.limits.budget_kib);
                self.pending = Some(Pending {
                    delivery,
                    need,
                    permit: None,
                    sending: false,
                });
            }
        }
    }

    fn send(&mut self) {
        if let Some(p) = self.pending.as_mut() {
            p.sending = true;
            let tag = p.delivery.tag();
            self.ask(Action::Send { tag }, Due::Send);
        }
    }

    fn sent(&mut self, now: Instant, result: Result<u32, SendError>) {
        if self.answered() != Some(Due::Send) {
            return;
        }
        let Some(mut p) = self.pending.take() else {
            return;
        };
        p.sending = false;
        match result {
            Ok(id) => {
                self.credit_deadline = None;
                if let Some(permit) = p.permit {
                    self.window
                        .sent(p.delivery, id, permit, now + self.limits.settle_timeout);
                }
            }
            Err(SendError::NoCredit) => {
                self.credit_deadline
                    .get_or_insert(now + self.limits.settle_timeout);
                self.pending = Some(p);
            }
            // No transfer was sent: it is dead-lettered in its turn, never resent in a loop.
            Err(SendError::TooLarge { len, max }) => {
                let reason = format!(
                    "the peer accepts messages of at most {max} bytes (encoded); this one is {len} bytes"
                );
                self.window
                    .settled_here(p.delivery, Settled::DeadLetter(reason));
            }
            Err(SendError::NotOpen(e)) => self.broken(now, Broken::Send(e)),
        }
    }

    fn dead_lettered(&mut self, result: Result<(), Interrupted>) {
        let Some(Due::DeadLetter { tag }) = self.answered() else {
            return;
        };
        match result {
            Ok(()) => {
                self.stats.acked += 1;
                if self.acks.settled(tag, self.window.is_empty()) {
                    self.flush();
                }
                if std::mem::take(&mut self.probe) {
                    self.resize();
                }
            }
            Err(Interrupted::Stopped) => {
                self.flush();
                self.phase = Phase::Ending {
                    end: End::Stopped,
                    on_ack_error: OnAckError::Ignore,
                };
            }
            Err(Interrupted::BrokerLost) => {
                self.end_now(End::Broken(Broken::BrokerLost(" while dead-lettering")))
            }
        }
    }

    fn acked(&mut self, result: Result<(), String>) {
        if self.answered() != Some(Due::Ack) {
            return;
        }
        let Err(e) = result else { return };
        let phase = std::mem::replace(&mut self.phase, Phase::Ended);
        let end = match phase {
            Phase::Ending {
                end,
                on_ack_error: OnAckError::Ignore,
            } => end,
            Phase::Ending {
                end: End::Broken(first),
                on_ack_error: OnAckError::Then,
            } => End::Broken(Broken::Then {
                first: Box::new(first),
                then: e,
            }),
            _ => End::Broken(Broken::Ack(e)),
        };
        self.end_now(end);
    }

    /// Take the steps the session can take on its own: settle the head of the window, end.
    fn advance(&mut self, now: Instant) {
        loop {
            if !self.due.is_empty() {
                return;
            }
            match &self.phase {
                Phase::Ended => return,
                Phase::Ending { .. } => {
                    let Phase::Ending { end, .. } =
                        std::mem::replace(&mut self.phase, Phase::Ended)
                    else {
                        unreachable!("matched above")
                    };
                    self.actions.push_back(Action::End(end));
                    return;
                }
                Phase::Salvaging { until, .. } => {
                    while let Some(delivery) = self.window.pop_accepted() {
                        self.acks.settled(delivery.tag(), false);
                        self.stats.accepted += 1;
                        self.stats.acked += 1;
                        self.actions.push_back(Action::Forwarded(delivery));
                    }
                    if !self.window.head_waits() || now >= *until {
                        self.end_salvage();
                        continue;
                    }
                    return;
                }
                Phase::Forwarding => {}
            }
            if let Some((delivery, settled)) = self.window.pop_settled() {
                let tag = delivery.tag();
                match self.acks.outcome(tag, &settled, self.window.is_empty()) {
                    Step::Ack { flush_now } => {
                        self.stats.accepted += 1;
                        self.stats.acked += 1;
                        self.actions.push_back(Action::Forwarded(delivery));
                        if flush_now {
                            self.flush();
                        }
                        if std::mem::take(&mut self.probe) {
                            self.actions.push_back(Action::ProbeAccepted {
                                prefetch: self.prefetch.current(),
                            });
                            self.resize();
                        }
                    }
                    Step::DeadLetter(reason) => {
                        self.ask(
                            Action::DeadLetter { delivery, reason },
                            Due::DeadLetter { tag },
                        );
                    }
                    Step::Recycle(reason) => {
                        self.stats.transfer_failed = true;
                        // Ack the settled prefix, nothing after it.
                        self.flush();
                        self.phase = Phase::Ending {
                            end: End::Broken(Broken::Transfer(reason)),
                            on_ack_error: OnAckError::Replace,
                        };
                    }
                }
                continue;
            }
            if self.draining && self.window.is_empty() && self.pending.is_none() {
                self.flush();
                self.phase = Phase::Ending {
                    end: End::Stopped,
                    on_ack_error: OnAckError::Replace,
                };
                continue;
            }
            return;
        }
    }

    fn timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Forwarding => {
                if self.drain_deadline.is_some_and(|d| d <= now) {
                    return self.broken(now, Broken::DrainGrace);
                }
                // The oldest unsettled transfers timed out: each recycles the link when it
                // reaches the head of the window.
                while self.window.next_deadline().is_some_and(|d| d <= now) {
                    self.window
                        .expire_oldest(classify(None, self.limits.settle_timeout));
                }
                let waits_credit = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.permit.is_some() && !p.sending);
                if waits_credit && self.credit_deadline.is_some_and(|d| d <= now) {
                    self.stats.transfer_failed = true;
                    self.broken(now, Broken::NoCredit(self.limits.settle_timeout));
                }
            }
            Phase::Salvaging { until, .. } if until <= now => self.end_salvage(),
            _ => {}
        }
    }

    /// Every way out but a lost broker connection or a failed transfer: take the acceptances
    /// already on their way (the peer may have settled and then closed), ack that prefix, and
    /// give up the rest. Without it, a peer that settles and then closes makes the link resend
    /// what the peer already has.
    fn broken(&mut self, now: Instant, reason: Broken) {
        if !matches!(self.phase, Phase::Forwarding) {
            return;
        }
        // What waited for budget or credit was never sent: it is requeued with the channel.
        self.pending = None;
        self.phase = Phase::Salvaging {
            reason,
            until: now + self.limits.salvage_wait,
        };
    }

    fn end_salvage(&mut self) {
        let Phase::Salvaging { reason, .. } = std::mem::replace(&mut self.phase, Phase::Ended)
        else {
            return;
        };
        self.flush();
        self.phase = Phase::Ending {
            end: End::Broken(reason),
            on_ack_error: OnAckError::Then,
        };
    }

    /// End at once, with nothing more acked; outstanding actions are dropped (their
    /// deliveries are requeued with the channel).
    fn end_now(&mut self, end: End) {
        self.actions.retain(|a| !a.needs_answer());
        self.due.clear();
        self.pending = None;
        self.phase = Phase::Ended;
        self.actions.push_back(Action::End(end));
    }

    /// Send the pending ack, if any.
    fn flush(&mut self) {
        if let Some(upto) = self.acks.take() {
            self.ask(Action::Ack { upto }, Due::Ack);
        }
    }

    /// Start moving to the prefetch wanted now (or out of a probe): cancel the consumer; what
    /// it already received still arrives, and when its stream ends a new consumer starts.
    fn resize(&mut self) {
        if !self.switching
            && !self.draining
            && self.consumer_prefetch != self.wanted_prefetch()
            && !self.due.iter().any(|d| matches!(d, Due::Cancel { .. }))
        {
            self.ask(Action::CancelConsumer, Due::Cancel { drain: false });
        }
    }

    fn wanted_prefetch(&self) -> u16 {
        if self.probe {
            1
        } else {
            self.prefetch.current()
        }
    }

    fn ask(&mut self, action: Action<D>, due: Due) {
        self.actions.push_back(action);
        self.due.push_back(due);
    }

    /// The answer for the oldest outstanding action came.
    fn answered(&mut self) -> Option<Due> {
        self.due.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug)]
    struct D {
        tag: u64,
        size: usize,
        redelivered: bool,
    }

    impl Delivered for D {
        fn tag(&self) -> u64 {
            self.tag
        }
        fn size(&self) -> usize {
            self.size
        }
        fn redelivered(&self) -> bool {
            self.redelivered
        }
        fn message_id(&self) -> Option<String> {
            Some(format!("m{}", self.tag))
        }
    }

    const SETTLE: Duration = Duration::from_secs(30);
    const DRAIN: Duration = Duration::from_secs(5);
    const SALVAGE: Duration = Duration::from_millis(500);

    fn limits(window: usize) -> Limits {
        Limits {
            window,
            settle_timeout: SETTLE,
            drain_grace: DRAIN,
            salvage_wait: SALVAGE,
            budget_kib: 1024,
            ack_batch: 64,
        }
    }

    /// A link that performs the session's actions against a pretend peer and broker and
    /// records what they did.
    struct Link {
        s: Session<D, ()>,
        now: Instant,
        next_tag: u64,
        next_id: u32,
        /// Delivery id → tag, for what was sent.
        sent: BTreeMap<u32, u64>,
        credit: u32,
        /// Highest tag acked.
        acked: Option<u64>,
        acks: Vec<u64>,
        forwarded: Vec<u64>,
        dead_lettered: Vec<u64>,
        cancels: u32,
        starts: Vec<u16>,
        fail_acks: bool,
        fail_dead_letters: Option<Interrupted>,
        end: Option<End>,
        after_end: usize,
    }

    impl Link {
        fn new(window: usize, probe: bool) -> Self {
            let prefetch = Prefetch::new(window as u16, 1 << 40, 1024);
            Link {
                s: Session::new(limits(window), prefetch, probe),
                now: Instant::now(),
                next_tag: 1,
                next_id: u32::MAX - 2,
                sent: BTreeMap::new(),
                credit: u32::MAX,
                acked: None,
                acks: Vec::new(),
                forwarded: Vec::new(),
                dead_lettered: Vec::new(),
                cancels: 0,
                starts: Vec::new(),
                fail_acks: false,
                fail_dead_letters: None,
                end: None,
                after_end: 0,
            }
        }

        fn feed(&mut self, event: Event<D, ()>) {
            self.s.handle(self.now, event);
            self.perform();
        }

        fn perform(&mut self) {
            while let Some(action) = self.s.poll_action() {
                if self.end.is_some() {
                    self.after_end += 1;
                }
                let answer = match action {
                    Action::Send { tag } => Some(Event::Sent(if self.credit == 0 {
                        Err(SendError::NoCredit)
                    } else {
                        self.credit -= 1;
                        let id = self.next_id;
                        self.next_id = self.next_id.wrapping_add(1);
                        self.sent.insert(id, tag);
                        Ok(id)
                    })),
                    Action::Ack { upto } => {
                        assert!(self.acked.is_none_or(|a| upto > a), "acks go forward");
                        self.acked = Some(upto);
                        self.acks.push(upto);
                        Some(Event::Acked(if self.fail_acks {
                            Err("ack failed".into())
                        } else {
                            Ok(())
                        }))
                    }
                    Action::DeadLetter { delivery, .. } => {
                        let r = match self.fail_dead_letters {
                            Some(Interrupted::Stopped) => Err(Interrupted::Stopped),
                            Some(Interrupted::BrokerLost) => Err(Interrupted::BrokerLost),
                            None => {
                                self.dead_lettered.push(delivery.tag);
                                Ok(())
                            }
                        };
                        Some(Event::DeadLettered(r))
                    }
                    Action::CancelConsumer => {
                        self.cancels += 1;
                        Some(Event::ConsumerCancelled(Ok(())))
                    }
                    Action::StartConsumer { prefetch } => {
                        self.starts.push(prefetch);
                        Some(Event::ConsumerStarted(Ok(())))
                    }
                    Action::Forwarded(d) => {
                        self.forwarded.push(d.tag);
                        None
                    }
                    Action::End(end) => {
                        assert!(self.end.is_none(), "one end");
                        self.end = Some(end);
                        None
                    }
                    _ => None,
                };
                if let Some(event) = answer {
                    self.s.handle(self.now, event);
                }
            }
        }

        /// The consumer delivers the next message (`size` bytes), encoded or not.
        fn deliver_sized(&mut self, size: usize, encoded: Result<(), String>) -> u64 {
            assert!(self.s.wants_delivery(), "the session takes a delivery");
            let tag = self.next_tag;
            self.next_tag += 1;
            let d = D {
                tag,
                size,
                redelivered: false,
            };
            self.feed(Event::Delivery(d, encoded));
            if self.s.wants_budget().is_some() {
                self.feed(Event::Budget(Some(())));
            }
            tag
        }

        fn deliver(&mut self) -> u64 {
            self.deliver_sized(100, Ok(()))
        }

        fn id_of(&self, tag: u64) -> u32 {
            *self.sent.iter().find(|(_, t)| **t == tag).expect("sent").0
        }

        fn settle(&mut self, tag: u64, settled: Settled) {
            let id = self.id_of(tag);
            self.feed(Event::Settled {
                first: id,
                last: id,
                settled,
            });
        }

        fn later(&mut self, by: Duration) {
            self.now += by;
            if self.s.poll_timeout().is_some_and(|t| t <= self.now) {
                self.feed(Event::Timeout);
            }
        }

        fn ended(&self) -> String {
            match &self.end {
                Some(End::Stopped) => "stopped".into(),
                Some(End::Broken(b)) => b.to_string(),
                None => "running".into(),
            }
        }
    }

    fn released() -> Settled {
        Settled::Retry("peer released a transfer".into())
    }

    #[test]
    fn acceptances_are_acked_in_queue_order_up_to_the_contiguous_prefix() {
        let mut l = Link::new(8, false);
        let tags: Vec<u64> = (0..4).map(|_| l.deliver()).collect();
        l.settle(tags[1], Settled::Accepted);
        l.settle(tags[2], Settled::Accepted);
        l.feed(Event::Tick);
        assert_eq!(l.acked, None, "the head is not settled: nothing is acked");
        l.settle(tags[0], Settled::Accepted);
        l.feed(Event::Tick);
        assert_eq!(l.acked, Some(tags[2]));
        assert_eq!(l.forwarded, tags[..3]);
        l.settle(tags[3], Settled::Accepted);
        assert_eq!(
            l.acked,
            Some(tags[3]),
            "nothing else in flight: acked at once"
        );
        assert!(l.end.is_none());
    }

    #[test]
    fn a_release_acks_the_settled_prefix_and_nothing_after_it() {
        let mut l = Link::new(8, false);
        let tags: Vec<u64> = (0..4).map(|_| l.deliver()).collect();
        l.settle(tags[0], Settled::Accepted);
        l.settle(tags[2], Settled::Accepted);
        l.settle(tags[1], released());
        assert_eq!(l.acked, Some(tags[0]));
        assert_eq!(l.ended(), "peer released a transfer");
        let (stats, _) = l.s.finish();
        assert!(stats.transfer_failed);
        assert_eq!(stats.accepted, 1);
    }

    #[test]
    fn a_rejection_is_acked_only_once_its_copy_is_in_the_dead_letter_queue() {
        let mut l = Link::new(8, false);
        let a = l.deliver();
        let b = l.deliver();
        l.settle(a, Settled::DeadLetter("rejected by peer: no".into()));
        assert_eq!(l.dead_lettered, [a]);
        assert_eq!(l.acked, None, "b is in flight: batched");
        l.settle(b, Settled::Accepted);
        assert_eq!(l.acked, Some(b));

        // A dead-letter publish the broker connection does not survive: nothing is acked.
        let mut l = Link::new(8, false);
        let a = l.deliver();
        l.fail_dead_letters = Some(Interrupted::BrokerLost);
        l.settle(a, Settled::DeadLetter("rejected by peer: no".into()));
        assert_eq!(l.acked, None);
        assert_eq!(l.ended(), "broker connection lost while dead-lettering");
    }

    #[test]
    fn what_cannot_be_encoded_or_is_too_large_for_the_peer_is_dead_lettered_in_its_turn() {
        let mut l = Link::new(8, false);
        let a = l.deliver();
        let b = l.deliver_sized(10, Err("too large".into()));
        assert!(l.dead_lettered.is_empty(), "waits for a before it");
        l.credit = 1;
        let c = l.deliver();
        l.s.handle(
            l.now,
            Event::Settled {
                first: 0,
                last: 0,
                settled: Settled::Accepted,
            },
        );
        l.perform();
        l.settle(a, Settled::Accepted);
        assert_eq!(l.dead_lettered, [b]);
        l.settle(c, Settled::Accepted);
        assert_eq!(l.acked, Some(c));

        // The float's max-message-size: no transfer, a dead letter.
        let mut l = Link::new(8, false);
        let tag = l.next_tag;
        l.next_tag += 1;
        l.feed(Event::Delivery(
            D {
                tag,
                size: 100,
                redelivered: false,
            },
            Ok(()),
        ));
        l.s.handle(l.now, Event::Budget(Some(())));
        let Some(Action::Send { .. }) = l.s.poll_action() else {
            panic!("send")
        };
        l.feed(Event::Sent(Err(SendError::TooLarge { len: 100, max: 50 })));
        assert_eq!(l.dead_lettered, [tag]);
        assert_eq!(l.acked, Some(tag));
    }

    #[test]
    fn a_lost_broker_ends_the_session_at_once_with_nothing_acked() {
        let mut l = Link::new(8, false);
        let a = l.deliver();
        let b = l.deliver();
        l.settle(a, Settled::Accepted);
        assert_eq!(l.acked, None, "batched while b is in flight");
        l.feed(Event::BrokerLost);
        assert_eq!(l.acked, None, "never ack deliveries of a dead connection");
        assert_eq!(l.ended(), "broker connection lost");
        l.settle(b, Settled::Accepted);
        assert_eq!(l.after_end, 0);
    }

    #[test]
    fn a_broken_peer_leaves_its_acceptances_acked_within_the_salvage_wait() {
        let mut l = Link::new(8, false);
        let tags: Vec<u64> = (0..3).map(|_| l.deliver()).collect();
        l.settle(tags[0], Settled::Accepted);
        l.feed(Event::Failed(Broken::PeerClosed));
        assert!(l.end.is_none(), "waits for settlements on their way");
        assert!(!l.s.wants_delivery());
        l.settle(tags[1], Settled::Accepted);
        l.later(SALVAGE);
        assert_eq!(l.acked, Some(tags[1]));
        assert_eq!(l.ended(), "peer closed the connection");

        // The peer gone for good: the salvage ends at once.
        let mut l = Link::new(8, false);
        let a = l.deliver();
        l.deliver();
        l.settle(a, Settled::Accepted);
        l.feed(Event::Failed(Broken::PeerClosed));
        l.feed(Event::Failed(Broken::PeerLost("reset".into())));
        assert_eq!(l.acked, Some(a));
        assert_eq!(l.ended(), "peer closed the connection");

        // The final ack fails too: both reasons.
        let mut l = Link::new(8, false);
        let a = l.deliver();
        l.deliver();
        l.settle(a, Settled::Accepted);
        l.fail_acks = true;
        l.feed(Event::Failed(Broken::PeerClosed));
        l.later(SALVAGE);
        assert_eq!(l.ended(), "peer closed the connection; then ack failed");
    }

    #[test]
    fn a_stop_drains_what_is_in_flight_then_ends() {
        let mut l = Link::new(8, false);
        let a = l.deliver();
        l.feed(Event::Stop);
        assert_eq!(l.cancels, 1, "no new deliveries");
        assert!(!l.s.wants_delivery());
        assert!(l.end.is_none());
        l.settle(a, Settled::Accepted);
        assert_eq!(l.acked, Some(a));
        assert_eq!(l.ended(), "stopped");

        // The drain grace runs out: what is unsettled is requeued.
        let mut l = Link::new(8, false);
        let a = l.deliver();
        l.deliver();
        l.settle(a, Settled::Accepted);
        l.feed(Event::Stop);
        l.later(DRAIN);
        assert!(l.end.is_none(), "b's settlement may be on its way");
        l.later(SALVAGE);
        assert_eq!(l.acked, Some(a));
        assert_eq!(
            l.ended(),
            "drain grace period over; unsettled transfers will be resent"
        );
    }

    #[test]
    fn a_transfer_not_settled_in_time_recycles_the_link() {
        let mut l = Link::new(8, false);
        let a = l.deliver();
        l.later(SETTLE - Duration::from_millis(1));
        assert!(l.end.is_none());
        l.later(Duration::from_millis(1));
        assert_eq!(l.acked, None);
        assert_eq!(l.ended(), "peer did not settle within 30s");
        let _ = a;
    }

    #[test]
    fn a_send_without_credit_waits_for_the_next_grant_up_to_the_settle_timeout() {
        let mut l = Link::new(8, false);
        l.credit = 0;
        l.deliver();
        assert!(!l.s.wants_delivery(), "holds the delivery");
        assert!(l.sent.is_empty());
        l.credit = 1;
        l.feed(Event::Credit);
        assert_eq!(l.sent.len(), 1, "sent with the grant");
        assert!(l.s.wants_delivery());
        l.deliver();
        assert_eq!(l.sent.len(), 1);
        l.later(SETTLE);
        assert_eq!(l.ended(), format!("peer granted no credit for {SETTLE:?}"));
        assert!(l.s.finish().0.transfer_failed);
    }

    #[test]
    fn the_window_bounds_what_is_taken() {
        let mut l = Link::new(2, false);
        l.deliver();
        l.deliver();
        assert!(!l.s.wants_delivery());
        l.deliver_window_check();
    }

    impl Link {
        fn deliver_window_check(&mut self) {
            let tag = *self.sent.values().next().expect("sent");
            self.settle(tag, Settled::Accepted);
            assert!(self.s.wants_delivery());
        }
    }

    #[test]
    fn a_probe_is_one_message_and_its_acceptance_restores_the_window() {
        let mut l = Link::new(8, true);
        assert_eq!(l.s.first_prefetch(), 1);
        let a = l.deliver();
        l.settle(a, Settled::Accepted);
        assert_eq!(l.cancels, 1, "the probe's consumer is cancelled");
        assert!(l.starts.is_empty(), "until its last deliveries are in");
        l.feed(Event::ConsumerEnded);
        assert_eq!(l.starts, [8]);
        assert!(l.end.is_none());
        // A consumer the broker ends is not a switch.
        l.feed(Event::ConsumerEnded);
        l.later(SALVAGE);
        assert_eq!(l.ended(), "consumer cancelled by the broker");
    }

    #[test]
    fn a_failed_ack_ends_the_session() {
        let mut l = Link::new(8, false);
        l.fail_acks = true;
        let a = l.deliver();
        l.settle(a, Settled::Accepted);
        assert_eq!(l.ended(), "ack failed");
    }

    #[derive(Debug, Clone)]
    enum Step {
        Deliver,
        /// Settle the n-th unsettled transfer with outcome k.
        Settle(usize, u8),
        Later,
        Tick,
        Credit(u8),
        Stop,
        PeerFails,
        BrokerLost,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Deliver),
            4 => (0usize..8, 0u8..4).prop_map(|(n, k)| Step::Settle(n, k)),
            1 => Just(Step::Later),
            1 => Just(Step::Tick),
            1 => (0u8..3).prop_map(Step::Credit),
            1 => Just(Step::Stop),
            1 => Just(Step::PeerFails),
            1 => Just(Step::BrokerLost),
        ]
    }

    proptest! {
        /// Whatever happens in whatever order: an ack never covers a delivery the peer did
        /// not accept (or that is not in the dead-letter queue); nothing is acked after the
        /// broker connection is lost; each delivery is counted forwarded or dead-lettered
        /// at most once; the session ends once, and does end.
        #[test]
        fn nothing_is_acked_that_was_not_accepted_or_dead_lettered(
            steps in proptest::collection::vec(step(), 1..80),
            window in 1usize..6,
            credit in 0u32..10,
        ) {
            let mut l = Link::new(window, false);
            l.credit = credit;
            // What the peer said of each tag.
            let mut said: BTreeMap<u64, Settled> = BTreeMap::new();
            let mut broker_lost_at: Option<usize> = None;
            for s in steps {
                if l.end.is_some() {
                    break;
                }
                match s {
                    Step::Deliver if l.s.wants_delivery() => {
                        l.deliver();
                    }
                    Step::Deliver => {}
                    Step::Settle(n, k) => {
                        let open: Vec<(u32, u64)> = l
                            .sent
                            .iter()
                            .filter(|(_, t)| !said.contains_key(t))
                            .map(|(i, t)| (*i, *t))
                            .collect();
                        if let Some((id, tag)) = open.get(n % open.len().max(1)).copied() {
                            let settled = match k {
                                0 | 1 => Settled::Accepted,
                                2 => Settled::DeadLetter("rejected by peer: x".into()),
                                _ => released(),
                            };
                            said.insert(tag, settled.clone());
                            l.feed(Event::Settled { first: id, last: id, settled });
                        }
                    }
                    Step::Later => l.later(SETTLE),
                    Step::Tick => l.feed(Event::Tick),
                    Step::Credit(n) => {
                        l.credit += u32::from(n);
                        l.feed(Event::Credit);
                    }
                    Step::Stop => l.feed(Event::Stop),
                    Step::PeerFails => l.feed(Event::Failed(Broken::PeerClosed)),
                    Step::BrokerLost => {
                        broker_lost_at.get_or_insert(l.acks.len());
                        l.feed(Event::BrokerLost);
                    }
                }
            }
            // Time runs on: every session ends.
            for _ in 0..4 {
                if l.end.is_some() {
                    break;
                }
                l.feed(Event::Stop);
                l.later(SETTLE + DRAIN);
            }
            prop_assert!(l.end.is_some(), "the session ended");
            prop_assert_eq!(l.after_end, 0);
            if let Some(n) = broker_lost_at {
                prop_assert_eq!(l.acks.len(), n, "no ack after the broker was lost");
            }
            let dead: BTreeSet<u64> = l.dead_lettered.iter().copied().collect();
            prop_assert_eq!(dead.len(), l.dead_lettered.len(), "dead-lettered once");
            let forwarded: BTreeSet<u64> = l.forwarded.iter().copied().collect();
            prop_assert_eq!(forwarded.len(), l.forwarded.len(), "counted once");
            for t in &forwarded {
                prop_assert_eq!(said.get(t), Some(&Settled::Accepted));
            }
            if let Some(upto) = l.acked {
                for tag in 1..=upto {
                    let ok = dead.contains(&tag) || said.get(&tag) == Some(&Settled::Accepted);
                    prop_assert!(ok, "tag {} acked (up to {}) but {:?}", tag, upto, said.get(&tag));
                }
            }
        }
    }
}
