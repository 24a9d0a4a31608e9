//! Leader election between the bridges of one node, through the node's own broker.
//!
//! Several bridges run with the same configuration; exactly one of them runs the peer
//! links. The lock is a classic, exclusive, auto-delete queue with a fixed name
//! (`drawbridge.bridge.lock.<group>`): RabbitMQ lets only one connection declare an
//! exclusive queue (any other gets `405 RESOURCE_LOCKED`) and deletes it when that
//! connection closes, so holding the queue means being active, and a crashed or cut-off
//! holder frees it as soon as the broker notices (at once for a crash, after the heartbeat
//! timeout for a silent partition).
//!
//! - A **standby** declares the queue on a throwaway channel every `ha_retry` (jittered
//!   ±50 %, so standbys do not retry in step); a 405 closes that channel and is the normal
//!   answer, so it is not logged — only changes of state are.
//! - The **active** bridge keeps the declaring channel open and consumes the lock queue.
//!   The consumer is how it notices that it lost the lock while its connection lives on:
//!   the lock queue is deleted (an operator, or the broker when the queue's cluster node
//!   goes down) and RabbitMQ cancels the consumer (`basic.cancel`, the
//!   `consumer_cancel_notify` capability lapin announces), which ends the consumer stream.
//!   That costs nothing while all is well, unlike polling with passive declares.
//! - Losing the broker connection loses the lock with it: the bridge says so, its links
//!   stop at once (they can no longer ack), and it contends again once reconnected.
//! - **The lease** covers a connection that goes silent without closing (a black-holed
//!   network path): the broker frees the lock only after two heartbeat intervals without
//!   hearing from us, but lapin notices the silence only after about as long, so without
//!   more the old bridge could still hold its links up when another one takes over. Every
//!   `ha_lease_check` the active bridge passively declares the lock queue on the lock's
//!   channel (a round trip that also proves the queue is still ours). The lease runs
//!   `2 × ha_lease_check` from the *sending* of the last answered check ([`Lease`]); when it
//!   runs out the bridge reports its connection broken, which stops its links at once, and
//!   goes `disconnected`. With `2 × ha_lease_check ≤ heartbeat` (checked by the config and
//!   enforced on the negotiated heartbeat, [`lease_check_on`]) the lease runs out at least one
//!   heartbeat before the broker can give the lock to another bridge.
//! - **Step-down** (`POST /step-down`): the links drain as on SIGTERM, then the lock queue
//!   is deleted (or, if that fails, the connection is closed, which deletes it too), and
//!   this bridge does not contend for `ha_hold_off`.
//!
//! What follows what is one pure state machine, [`Election`] (events: connected, acquired,
//! not acquired, released, waited; steps: connect, acquire, hold, wait, stop), tested without
//! a broker; [`run`] only performs its steps.
//!
//! The fence stays single-active-consumer on the peer queues: a bridge that still believes
//! it is active (it has not yet noticed a lost lock) cannot receive alongside the new one.
//!
//! The control plane (`control`) follows [`HaState`] through a `watch`: it runs links only
//! while the state is `Active`, and says through `links_running` when they have stopped.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use drawbridge_runtime::{
    admin::{StepDown, StepDownFuture},
    backoff::Backoff,
    broker::Live,
};
use futures::{future::BoxFuture, StreamExt};
use lapin::{
    options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{FieldTable, ShortString},
    Channel, Consumer,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{config::HaMode, control, Ctx};

/// The election state of this bridge (`ha_state` in `/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaState {
    /// No broker connection: neither holding nor contending for the lock.
    Disconnected,
    /// Connected, control messages consumed, no links; contending unless holding off.
    Standby,
    /// Holding the lock: the links run.
    Active,
    /// Draining the links before releasing the lock.
    SteppingDown,
}

impl HaState {
    /// The name shown in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            HaState::Disconnected => "disconnected",
            HaState::Standby => "standby",
            HaState::Active => "active",
            HaState::SteppingDown => "stepping_down",
        }
    }
}

/// A step-down request to the election task, with where to send its outcome.
type Request = oneshot::Sender<StepDown>;

/// The election's shared state (part of `Ctx`).
pub(crate) struct Ha {
    /// `bridge.ha`: off means always active, no lock.
    pub(crate) enabled: bool,
    /// `bridge.ha`: off, hot-warm (this module) or hot-hot (`members`).
    pub(crate) mode: HaMode,
    /// Hot-hot: the members and who owns which queue (in the other modes, this bridge owns
    /// everything).
    pub(crate) hot: crate::members::Shared,
    /// The lock queue's name.
    pub(crate) lock_queue: String,
    /// The state; the control plane runs links only while it is `Active`.
    pub(crate) state: watch::Sender<HaState>,
    /// Set by the control plane: whether its links run. A step-down releases the lock only
    /// once this is false, so the next bridge never waits on our drain for its messages.
    pub(crate) links_running: watch::Sender<bool>,
    /// Why the state is what it is (shown in `/status`).
    reason: Mutex<String>,
    /// End of the hold-off after a step-down (`/status`, `/readyz`).
    hold_off_until: Mutex<Option<Instant>>,
    /// Step-down requests to the election task (`None` receiver side when `ha` is off).
    requests: mpsc::Sender<Request>,
}

/// The default lock queue name: `drawbridge.bridge.lock.<group>`, within the 255 bytes of
/// an AMQP queue name.
pub(crate) fn lock_queue_name(configured: Option<&str>, group: &str) -> String {
    match configured {
        Some(q) => q.to_string(),
        None => {
            let mut name = format!("drawbridge.bridge.lock.{group}");
            while name.len() > 255 {
                name.pop();
            }
            name
        }
    }
}

/// `mean` ± 50 %, so standbys started together do not retry in step.
fn jittered(mean: Duration) -> Duration {
    mean.mul_f64(rand::random_range(0.5..1.5))
}

/// The active bridge's lease on the lock (no clock inside: the caller passes the times).
///
/// RabbitMQ closes a connection it has not heard from for two heartbeat intervals (between
/// two and three: it samples the socket once per interval), and only then deletes the lock
/// queue. A lease check sent at `s` and answered reached the broker at `s` or later, so the
/// broker cannot free the lock before `s + 2 × heartbeat`. The lease runs `2 × check` from
/// the sending of the last answered check: with `2 × check ≤ heartbeat` ([`lease_fits`]) it
/// runs out at least one heartbeat before the lock can be given to another bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The interval between checks (`bridge.ha_lease_check`, or less: [`lease_check_on`]).
    check: Duration,
    /// When the last answered check (or the declare that took the lock) was sent.
    from: Instant,
}

impl Lease {
    /// A lease taken by a declare sent at `sent`, checked every `check`.
    pub(crate) fn new(check: Duration, sent: Instant) -> Lease {
        Lease { check, from: sent }
    }

    /// A check sent at `sent` was answered. An answer to an older check never shortens it.
    pub(crate) fn answered(&mut self, sent: Instant) {
        self.from = self.from.max(sent);
    }

    /// When the next check is due after one sent at `sent`.
    pub(crate) fn next_check(&self, sent: Instant) -> Instant {
        sent + self.check
    }

    /// When the lease runs out unless a newer check is answered.
    pub(crate) fn expires_at(&self) -> Instant {
        self.from + self.check * 2
    }
}

/// Whether a lease check every `check` is safe with a `heartbeat_secs` AMQP heartbeat
/// (`2 × check ≤ heartbeat`; any with heartbeats off, when only TCP notices a dead peer).
pub(crate) fn lease_fits(check: Duration, heartbeat_secs: u16) -> bool {
    heartbeat_secs == 0 || check * 2 <= Duration::from_secs(heartbeat_secs.into())
}

/// The default `bridge.ha_lease_check`: 2 s, or half the heartbeat if that is shorter.
pub(crate) fn default_lease_check(heartbeat_secs: u16) -> Duration {
    let two = Duration::from_secs(2);
    if heartbeat_secs == 0 {
        two
    } else {
        two.min(Duration::from_secs(heartbeat_secs.into()) / 2)
    }
}

/// The check interval used on a connection whose negotiated heartbeat is `negotiated_secs`:
/// the configured one, or half the heartbeat when the broker (or a `?heartbeat=` in the URI)
/// made it shorter than the configuration was checked against.
pub(crate) fn lease_check_on(configured: Duration, negotiated_secs: u16) -> Duration {
    if lease_fits(configured, negotiated_secs) {
        configured
    } else {
        Duration::from_secs(negotiated_secs.into()) / 2
    }
}

impl Ha {
    /// The shared state and the receiving end of step-down requests (for [`run`]).
    pub(crate) fn new(mode: HaMode, lock_queue: String, id: &str) -> (Ha, mpsc::Receiver<Request>) {
        let enabled = mode != HaMode::Off;
        let (requests, rx) = mpsc::channel(4);
        let initial = if enabled {
            HaState::Disconnected
        } else {
            HaState::Active
        };
        metrics::gauge!("drawbridge_bridge_active").set(if enabled { 0.0 } else { 1.0 });
        let ha = Ha {
            enabled,
            mode,
            hot: crate::members::Shared::new(mode == HaMode::HotHot, id),
            lock_queue,
            state: watch::channel(initial).0,
            links_running: watch::channel(false).0,
            reason: Mutex::new(if enabled {
                "starting".into()
            } else {
                "bridge.ha is off: always active".into()
            }),
            hold_off_until: Mutex::new(None),
            requests,
        };
        (ha, rx)
    }

    /// The current state.
    pub(crate) fn current(&self) -> HaState {
        *self.state.borrow()
    }

    /// Set (or end) a step-down's hold-off (hot-hot: `members` keeps its own).
    pub(crate) fn hold_off(&self, until: Option<Instant>) {
        *self.hold_off_until.lock().expect("poisoned") = until;
    }

    /// Whether a stepped-down bridge is still staying away from the election.
    pub(crate) fn holding_off(&self) -> bool {
        self.hold_off_until
            .lock()
            .expect("poisoned")
            .is_some_and(|t| t > Instant::now())
    }

    /// The `ha` object of `/status`.
    pub(crate) fn status(&self) -> serde_json::Value {
        let hold_off_left = self
            .hold_off_until
            .lock()
            .expect("poisoned")
            .and_then(|t| t.checked_duration_since(Instant::now()))
            .map(|d| d.as_millis() as u64);
        let mut status = serde_json::json!({
            "enabled": self.enabled,
            "mode": self.mode.as_str(),
            "state": self.current().as_str(),
            "reason": *self.reason.lock().expect("poisoned"),
            "hold_off_ms_left": hold_off_left,
        });
        if self.mode == HaMode::HotHot {
            status["members_exchange"] = self.lock_queue.clone().into();
            status["members"] = serde_json::to_value(&*self.hot.members.lock().expect("poisoned"))
                .unwrap_or_default();
        } else {
            status["lock_queue"] = self.lock_queue.clone().into();
        }
        status
    }

    /// Move to `state` for `reason`; logs one line when either changes.
    pub(crate) fn set(&self, state: HaState, reason: &str) {
        let changed_state = self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
        let mut last = self.reason.lock().expect("poisoned");
        if changed_state || *last != reason {
            if matches!(state, HaState::Active | HaState::SteppingDown)
                || !reason.starts_with("lost")
            {
                info!(
                    ha_state = state.as_str(),
                    ha_mode = self.mode.as_str(),
                    "{reason}"
                );
            } else {
                warn!(
                    ha_state = state.as_str(),
                    ha_mode = self.mode.as_str(),
                    "{reason}"
                );
            }
            *last = reason.to_string();
        }
        metrics::gauge!("drawbridge_bridge_active").set(if state == HaState::Active {
            1.0
        } else {
            0.0
        });
    }

    /// `POST /step-down`: ask the election task; it answers once the lock is released.
    pub(crate) fn step_down(&self) -> StepDownFuture {
        if !self.enabled {
            return Box::pin(std::future::ready(StepDown::NotActive(
                "bridge.ha is off: there is no election to hand over to".into(),
            )));
        }
        let requests = self.requests.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if requests.send(tx).await.is_err() {
                return StepDown::Failed("the election task is not running".into());
            }
            rx.await
                .unwrap_or_else(|_| StepDown::Failed("the election task stopped".into()))
        })
    }
}

/// The lock while we hold it: the channel that declared it and our consumer on it.
struct Lock {
    channel: Channel,
    consumer: Consumer,
    /// When the declare that took it was sent (where the lease starts).
    declared_at: Instant,
}

/// Why an attempt to take the lock did not.
#[derive(Debug)]
enum Attempt {
    /// Another connection holds it (405): the normal answer for a standby.
    Held,
    /// Anything else (permissions, timeouts): retried with backoff.
    Failed(String),
}

/// How holding the lock ended.
#[derive(Debug)]
enum Held {
    /// Our broker connection went away, and the lock with it.
    ConnectionLost,
    /// The lock queue went away while our connection lives on.
    LockLost(String),
    /// No lease check was answered in time: the connection is reported broken (the links
    /// stop at once) before the broker can give the lock to another bridge.
    LeaseExpired(String),
    /// Stepped down on request.
    SteppedDown,
    /// The bridge is stopping: keep the lock until the connection closes after the links
    /// drained (the next bridge takes over then).
    Shutdown,
}

/// How a wait between attempts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Timer,
    Lost,
    Shutdown,
}

/// What happened, as the election's state machine sees it.
#[derive(Debug)]
enum Event {
    /// A broker connection is up.
    Connected,
    /// Shutdown while waiting for a connection.
    ShutdownWhileConnecting,
    /// An attempt to take the lock took it.
    Acquired,
    /// An attempt did not (`lost`: the connection is gone too).
    NotAcquired { attempt: Attempt, lost: bool },
    /// Holding the lock ended.
    Released(Held),
    /// A wait between attempts ended.
    Waited(Wake),
}

/// What the election loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Wait for a broker connection newer than the last one.
    Connect,
    /// Try to take the lock.
    Acquire,
    /// Hold the lock (the links run) until something ends it.
    Hold,
    /// Stand by until `until`; step-down requests are answered "not active" with `why`.
    Wait { until: Instant, why: &'static str },
    /// The bridge is stopping.
    Stop,
}

/// The election without the broker: events in, the next step and the state to announce out.
/// No I/O and no clock (the caller passes `now`), so every path is tested without a broker;
/// [`run`] performs the steps.
#[derive(Debug)]
struct Election {
    /// The mean delay between attempts while another bridge holds the lock.
    retry: Duration,
    /// How long a bridge that stepped down stays out of the election.
    hold_off: Duration,
    /// Attempts that fail for another reason than "held" (no permission, timeouts) back off.
    failures: Backoff,
    /// A step-down's hold-off, while it runs.
    hold_off_until: Option<Instant>,
    /// The state last announced (a hold-off resumed after a reconnect announces `standby`
    /// only if the bridge is not already standing by).
    state: HaState,
}

/// A state change to announce: the state and its reason (one log line when either changes).
type Announce = Option<(HaState, String)>;

const LOST: &str = "disconnected: broker connection lost";
const HELD_ELSEWHERE: &str = "another bridge holds the lock";
const HOLDING_OFF: &str = "stepped down; holding off";

impl Election {
    fn new(retry: Duration, hold_off: Duration, state: HaState) -> Election {
        Election {
            retry,
            hold_off,
            failures: Backoff::new(retry, Duration::from_secs(30)),
            hold_off_until: None,
            state,
        }
    }

    /// The step after `event`, and what to announce.
    fn on(&mut self, event: Event, now: Instant) -> (Announce, Step) {
        let (announce, step) = self.decide(event, now);
        if let Some((state, _)) = &announce {
            self.state = *state;
        }
        (announce, step)
    }

    fn decide(&mut self, event: Event, now: Instant) -> (Announce, Step) {
        let say = |state: HaState, reason: &str| Some((state, reason.to_string()));
        match event {
            Event::Connected => self.contend(now),
            Event::ShutdownWhileConnecting => (None, Step::Stop),
            Event::Acquired => {
                self.failures.reset();
                (say(HaState::Active, "became active"), Step::Hold)
            }
            Event::NotAcquired {
                attempt: Attempt::Held,
                ..
            } => {
                self.failures.reset();
                (
                    say(HaState::Standby, "standing by: lock held by another bridge"),
                    self.wait_retry(now),
                )
            }
            Event::NotAcquired {
                attempt: Attempt::Failed(_),
                lost: true,
            } => (say(HaState::Disconnected, LOST), Step::Connect),
            Event::NotAcquired {
                attempt: Attempt::Failed(reason),
                lost: false,
            } => (
                say(
                    HaState::Standby,
                    &format!("standing by: cannot take the lock: {reason}"),
                ),
                Step::Wait {
                    until: now + self.failures.next_delay(),
                    why: HELD_ELSEWHERE,
                },
            ),
            Event::Released(Held::ConnectionLost) => (
                say(
                    HaState::Disconnected,
                    "lost the lock: broker connection lost",
                ),
                Step::Connect,
            ),
            Event::Released(Held::LockLost(reason)) => (
                say(HaState::Standby, &format!("lost the lock: {reason}")),
                self.wait_retry(now),
            ),
            Event::Released(Held::LeaseExpired(reason)) => (
                say(HaState::Disconnected, &format!("lost the lock: {reason}")),
                Step::Connect,
            ),
            // The step-down announced `standby` itself (with the hold-off in its reason).
            Event::Released(Held::SteppedDown) => {
                self.state = HaState::Standby;
                self.hold_off_until = Some(now + self.hold_off);
                self.contend(now)
            }
            Event::Released(Held::Shutdown) | Event::Waited(Wake::Shutdown) => (None, Step::Stop),
            Event::Waited(Wake::Lost) => (say(HaState::Disconnected, LOST), Step::Connect),
            Event::Waited(Wake::Timer) => self.contend(now),
        }
    }

    /// Contend for the lock, unless a step-down's hold-off still runs.
    fn contend(&mut self, now: Instant) -> (Announce, Step) {
        match self.hold_off_until.filter(|t| *t > now) {
            Some(until) => {
                let announce = (self.state != HaState::Standby).then(|| {
                    (
                        HaState::Standby,
                        "standing by: stepped down; not contending until the hold-off ends"
                            .to_string(),
                    )
                });
                (
                    announce,
                    Step::Wait {
                        until,
                        why: HOLDING_OFF,
                    },
                )
            }
            None => {
                self.hold_off_until = None;
                (None, Step::Acquire)
            }
        }
    }

    fn wait_retry(&self, now: Instant) -> Step {
        Step::Wait {
            until: now + jittered(self.retry),
            why: HELD_ELSEWHERE,
        }
    }
}

/// Run the election until `shutdown` (only when `bridge.ha` is on): [`Election`] decides,
/// this loop does the waiting, acquiring and holding.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    mut requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let ha = &ctx.ha;
    let mut election = Election::new(ctx.cfg.ha.retry, ctx.cfg.ha.hold_off, ha.current());
    let mut generation = 0;
    let mut live: Option<Arc<Live>> = None;
    let mut lock: Option<Lock> = None;
    let mut step = Step::Connect;
    loop {
        let event = match step {
            Step::Stop => return,
            Step::Connect => {
                tokio::select! {
                    l = ctx.broker.connected(generation, Duration::from_secs(3600)) => match l {
                        Some(l) => {
                            generation = l.generation;
                            live = Some(l);
                            Event::Connected
                        }
                        // No connection within the hour: keep waiting.
                        None => continue,
                    },
                    Some(reply) = requests.recv() => {
                        let _ = reply.send(StepDown::NotActive("not connected to the broker".into()));
                        continue;
                    }
                    _ = shutdown.cancelled() => Event::ShutdownWhileConnecting,
                }
            }
            Step::Acquire => {
                let Some(l) = &live else {
                    step = Step::Connect;
                    continue;
                };
                let op = ctx.broker.config().op_timeout;
                match acquire(l, &ha.lock_queue, op).await {
                    Ok(taken) => {
                        lock = Some(taken);
                        Event::Acquired
                    }
                    Err(attempt) => Event::NotAcquired {
                        attempt,
                        lost: l.is_lost(),
                    },
                }
            }
            Step::Hold => {
                let (Some(l), Some(taken)) = (&live, lock.take()) else {
                    step = Step::Connect;
                    continue;
                };
                Event::Released(hold(&ctx, l, taken, &mut requests, &shutdown).await)
            }
            Step::Wait { until, why } => {
                let Some(l) = &live else {
                    step = Step::Connect;
                    continue;
                };
                Event::Waited(wait(until, l, &mut requests, &shutdown, why).await)
            }
        };
        let (announce, next) = election.on(event, Instant::now());
        if let Some((state, reason)) = announce {
            ha.set(state, &reason);
        }
        // The hold-off is shown in `/status` and keeps `/step-down` answers honest.
        *ha.hold_off_until.lock().expect("poisoned") = election.hold_off_until;
        step = next;
    }
}

/// Wait until `deadline` as a standby: step-down requests are answered "not active".
async fn wait(
    deadline: Instant,
    live: &Live,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
    why: &str,
) -> Wake {
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Wake::Timer,
            _ = live.lost() => return Wake::Lost,
            _ = shutdown.cancelled() => return Wake::Shutdown,
            Some(reply) = requests.recv() => {
                let _ = reply.send(StepDown::NotActive(why.to_string()));
            }
        }
    }
}

/// The AMQP reply code of a broker refusal, if it was one.
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Close a channel we no longer need (best effort, bounded).
async fn close_quietly(ch: &Channel, op: Duration) {
    if ch.status().connected() {
        let _ = tokio::time::timeout(op, ch.close(200, "bye".into())).await;
    }
}

/// One attempt to take the lock, on a channel of its own (a refusal closes it).
async fn acquire(live: &Live, queue: &str, op: Duration) -> Result<Lock, Attempt> {
    let channel = match tokio::time::timeout(op, live.conn.create_channel()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(Attempt::Failed(format!("opening a channel: {e}"))),
        Err(_) => return Err(Attempt::Failed("opening a channel timed out".into())),
    };
    let declared_at = Instant::now();
    let declare = channel.queue_declare(
        ShortString::from(queue),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            durable: false,
            ..Default::default()
        },
        FieldTable::default(),
    );
    match tokio::time::timeout(op, declare).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if reply_code(&e) == Some(405) => return Err(Attempt::Held),
        Ok(Err(e)) => {
            close_quietly(&channel, op).await;
            return Err(Attempt::Failed(format!("declaring the lock queue: {e}")));
        }
        Err(_) => {
            close_quietly(&channel, op).await;
            return Err(Attempt::Failed("declaring the lock queue timed out".into()));
        }
    }
    let consume = channel.basic_consume(
        ShortString::from(queue),
        ShortString::from("drawbridge-bridge-lock"),
        BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    );
    match tokio::time::timeout(op, consume).await {
        Ok(Ok(consumer)) => Ok(Lock {
            channel,
            consumer,
            declared_at,
        }),
        other => {
            // Holding a lock we cannot watch is worse than not holding it. If even the
            // delete fails, our connection still owns the queue and the next attempt
            // declares it again successfully (same connection).
            let _ = tokio::time::timeout(
                op,
                channel.queue_delete(ShortString::from(queue), QueueDeleteOptions::default()),
            )
            .await;
            close_quietly(&channel, op).await;
            let reason = match other {
                Ok(Err(e)) => format!("consuming the lock queue: {e}"),
                _ => "consuming the lock queue timed out".into(),
            };
            Err(Attempt::Failed(reason))
        }
    }
}

/// A passive declare of `queue` (the lock queue on the lock's channel; in hot-hot, a member
/// queue): answered only while the broker hears us, and only while the queue exists (404 when
/// gone; for the exclusive lock, 405 when another connection's). Its consumer count.
pub(crate) fn passive_declare(
    channel: &Channel,
    queue: &str,
) -> BoxFuture<'static, Result<u32, lapin::Error>> {
    let channel = channel.clone();
    let queue = ShortString::from(queue);
    Box::pin(async move {
        channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.consumer_count())
    })
}

/// Hold the lock until the connection or the queue goes, the lease runs out, a step-down, or
/// shutdown.
async fn hold(
    ctx: &Ctx,
    live: &Live,
    mut lock: Lock,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
) -> Held {
    let configured = ctx.cfg.ha.lease_check;
    let negotiated = live.conn.configuration().heartbeat();
    let every = lease_check_on(configured, negotiated);
    if every != configured {
        warn!(
            heartbeat_secs = negotiated,
            configured = ?configured,
            using = ?every,
            "the negotiated broker heartbeat is shorter than bridge.ha_lease_check allows; checking the lease more often"
        );
    }
    let mut lease = Lease::new(every, lock.declared_at);
    let mut next_check = lease.next_check(lock.declared_at);
    // The check in flight and when it was sent.
    let mut check: Option<(Instant, BoxFuture<'static, Result<u32, lapin::Error>>)> = None;
    loop {
        tokio::select! {
            _ = live.lost() => return Held::ConnectionLost,
            d = lock.consumer.next() => match d {
                // Someone published to the lock queue: no meaning, nothing to ack.
                Some(Ok(_)) => continue,
                _ if live.is_lost() => return Held::ConnectionLost,
                Some(Err(e)) => return Held::LockLost(format!("the lock queue's consumer failed: {e}")),
                None => return Held::LockLost(
                    "the broker cancelled our consumer on the lock queue (queue deleted, or its cluster node went down)".into(),
                ),
            },
            _ = tokio::time::sleep_until(next_check), if check.is_none() => {
                check = Some((Instant::now(), passive_declare(&lock.channel, &ctx.ha.lock_queue)));
            }
            answer = async { check.as_mut().expect("guarded").1.as_mut().await }, if check.is_some() => {
                let (sent, _) = check.take().expect("guarded");
                match answer {
                    Ok(_) => {
                        lease.answered(sent);
                        next_check = lease.next_check(sent);
                    }
                    Err(_) if live.is_lost() => return Held::ConnectionLost,
                    Err(e) => return Held::LockLost(format!("the lease check failed: {e}")),
                }
            }
            _ = tokio::time::sleep_until(lease.expires_at()) => {
                let reason = format!(
                    "lease expired: no lease check answered within {:?} (broker unreachable?); links stopped before the broker can give the lock to another bridge",
                    every * 2
                );
                // The links stop at once on a lost connection; the supervisor reconnects.
                live.report_broken("bridge lock lease expired");
                return Held::LeaseExpired(reason);
            }
            Some(reply) = requests.recv() => {
                let outcome = step_down(ctx, live, lock).await;
                let _ = reply.send(outcome);
                return Held::SteppedDown;
            }
            _ = shutdown.cancelled() => return Held::Shutdown,
        }
    }
}

/// Wait until the control plane says the links have stopped (a step-down); if they have not
/// by their stop deadline, say so and go on (`then`: what is done anyway).
pub(crate) async fn wait_links_stopped(ctx: &Ctx, then: &str) {
    let mut running = ctx.ha.links_running.subscribe();
    // The control plane aborts a link that has not stopped by its stop deadline; one more
    // margin for the aborted links to be reported stopped.
    let deadline = control::stop_deadline(ctx.cfg.drain_grace) + control::STOP_MARGIN;
    if tokio::time::timeout(deadline, running.wait_for(|r| !*r))
        .await
        .is_err()
    {
        warn!(
            ?deadline,
            "links did not stop in time; {then} (single-active-consumer still fences them)"
        );
    }
}

/// Drain the links, then release the lock.
async fn step_down(ctx: &Ctx, live: &Live, lock: Lock) -> StepDown {
    let ha = &ctx.ha;
    let hold_off = ctx.cfg.ha.hold_off;
    ha.set(HaState::SteppingDown, "stepping down: draining links");
    wait_links_stopped(ctx, "releasing the lock anyway").await;
    let op = ctx.broker.config().op_timeout;
    let released = tokio::time::timeout(
        op,
        lock.channel.queue_delete(
            ShortString::from(ha.lock_queue.as_str()),
            QueueDeleteOptions::default(),
        ),
    )
    .await;
    if !matches!(released, Ok(Ok(_))) && !live.is_lost() {
        // Closing the connection deletes an exclusive queue for certain.
        live.report_broken("could not delete the bridge lock queue on step-down");
    }
    close_quietly(&lock.channel, op).await;
    ha.set(
        HaState::Standby,
        &format!("stepped down: lock released; not contending for {hold_off:?}"),
    );
    StepDown::Done { hold_off }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_queue_is_named_after_the_group_within_255_bytes() {
        assert_eq!(
            lock_queue_name(None, "bank-a-london-gb"),
            "drawbridge.bridge.lock.bank-a-london-gb"
        );
        assert_eq!(lock_queue_name(Some("my.lock"), "x"), "my.lock");
        assert_eq!(lock_queue_name(None, &"x".repeat(400)).len(), 255);
    }

    #[test]
    fn retries_are_jittered_around_the_mean() {
        let mean = Duration::from_millis(500);
        let delays: Vec<_> = (0..200).map(|_| jittered(mean)).collect();
        assert!(delays.iter().all(|d| *d >= mean / 2 && *d <= mean * 3 / 2));
        assert!(delays.iter().any(|d| *d != delays[0]), "not all the same");
    }

    #[test]
    fn the_lease_runs_twice_the_check_from_the_last_answered_check_sent() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut lease = Lease::new(2 * s, t0);
        assert_eq!(lease.next_check(t0), t0 + 2 * s);
        assert_eq!(lease.expires_at(), t0 + 4 * s);
        // A check sent at t0 + 2 s answered late, at t0 + 3.5 s: the lease runs from its
        // sending, not from its answer.
        lease.answered(t0 + 2 * s);
        assert_eq!(lease.expires_at(), t0 + 6 * s);
        // An answer to an older check never shortens it.
        lease.answered(t0 + s);
        assert_eq!(lease.expires_at(), t0 + 6 * s);
    }

    #[test]
    fn a_lease_that_fits_the_heartbeat_runs_out_a_heartbeat_before_the_broker_frees_the_lock() {
        for heartbeat in [1u16, 2, 5, 10, 60] {
            let check = default_lease_check(heartbeat);
            assert!(lease_fits(check, heartbeat), "{heartbeat}");
            let hb = Duration::from_secs(heartbeat.into());
            // Black hole right after a check was sent at t0 (the worst case: the broker heard
            // us last at t0). RabbitMQ closes the connection 2–3 heartbeats later.
            let t0 = Instant::now();
            let lease = Lease::new(check, t0);
            let broker_frees_at_the_earliest = t0 + 2 * hb;
            assert!(lease.expires_at() + hb <= broker_frees_at_the_earliest);
        }
        assert_eq!(default_lease_check(5), Duration::from_secs(2));
        assert_eq!(default_lease_check(3), Duration::from_millis(1500));
        assert_eq!(default_lease_check(0), Duration::from_secs(2));
        assert!(lease_fits(Duration::from_millis(2500), 5));
        assert!(!lease_fits(Duration::from_millis(2501), 5));
        assert!(lease_fits(Duration::from_secs(60), 0), "heartbeats off");
    }

    #[test]
    fn a_shorter_negotiated_heartbeat_shortens_the_check() {
        let two = Duration::from_secs(2);
        assert_eq!(lease_check_on(two, 5), two);
        assert_eq!(lease_check_on(two, 0), two);
        assert_eq!(lease_check_on(two, 2), Duration::from_secs(1));
        assert_eq!(lease_check_on(two, 1), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_bridge_without_ha_is_active_and_refuses_to_step_down() {
        let (ha, _rx) = Ha::new(HaMode::Off, "q".into(), "b");
        assert_eq!(ha.current(), HaState::Active);
        assert!(matches!(ha.step_down().await, StepDown::NotActive(_)));
    }

    fn election() -> (Election, Instant) {
        (
            Election::new(
                Duration::from_secs(2),
                Duration::from_secs(60),
                HaState::Disconnected,
            ),
            Instant::now(),
        )
    }

    fn state(a: &Announce) -> Option<HaState> {
        a.as_ref().map(|(s, _)| *s)
    }

    #[test]
    fn a_standby_retries_jittered_until_it_takes_the_lock() {
        let (mut e, now) = election();
        assert_eq!(e.on(Event::Connected, now), (None, Step::Acquire));
        let held = Event::NotAcquired {
            attempt: Attempt::Held,
            lost: false,
        };
        let (a, step) = e.on(held, now);
        assert_eq!(state(&a), Some(HaState::Standby));
        let Step::Wait { until, why } = step else {
            panic!("{step:?}")
        };
        assert!(until >= now + Duration::from_secs(1) && until <= now + Duration::from_secs(3));
        assert_eq!(why, HELD_ELSEWHERE);
        assert_eq!(e.on(Event::Waited(Wake::Timer), now), (None, Step::Acquire));
        let (a, step) = e.on(Event::Acquired, now);
        assert_eq!(a, Some((HaState::Active, "became active".into())));
        assert_eq!(step, Step::Hold);
    }

    #[test]
    fn failed_attempts_back_off_and_a_lost_connection_reconnects() {
        let (mut e, now) = election();
        let failed = |lost| Event::NotAcquired {
            attempt: Attempt::Failed("ACCESS_REFUSED".into()),
            lost,
        };
        // 2, 4, 8, 16 s, each with up to as much jitter on top, capped at 30 s.
        let mut last = Duration::ZERO;
        for _ in 0..4 {
            let (a, step) = e.on(failed(false), now);
            assert!(a.is_some_and(|(s, r)| s == HaState::Standby && r.contains("ACCESS_REFUSED")));
            let Step::Wait { until, .. } = step else {
                panic!("{step:?}")
            };
            last = until - now;
        }
        assert!(last >= Duration::from_secs(16) && last <= Duration::from_secs(30));
        let (a, step) = e.on(failed(true), now);
        assert_eq!(state(&a), Some(HaState::Disconnected));
        assert_eq!(step, Step::Connect);
        // Taking the lock resets the backoff.
        e.on(Event::Acquired, now);
        let (_, step) = e.on(failed(false), now);
        assert!(matches!(step, Step::Wait { until, .. } if until - now <= Duration::from_secs(4)));
    }

    #[test]
    fn how_holding_ends_decides_what_follows() {
        let (mut e, now) = election();
        e.on(Event::Acquired, now);
        let (a, step) = e.on(Event::Released(Held::ConnectionLost), now);
        assert_eq!(state(&a), Some(HaState::Disconnected));
        assert_eq!(step, Step::Connect);
        let (a, step) = e.on(Event::Released(Held::LockLost("deleted".into())), now);
        assert_eq!(a, Some((HaState::Standby, "lost the lock: deleted".into())));
        assert!(matches!(step, Step::Wait { why, .. } if why == HELD_ELSEWHERE));
        let (a, step) = e.on(Event::Released(Held::LeaseExpired("silent".into())), now);
        assert_eq!(state(&a), Some(HaState::Disconnected));
        assert_eq!(step, Step::Connect);
        assert_eq!(
            e.on(Event::Released(Held::Shutdown), now),
            (None, Step::Stop)
        );
        assert_eq!(e.on(Event::Waited(Wake::Shutdown), now), (None, Step::Stop));
        assert_eq!(
            e.on(Event::ShutdownWhileConnecting, now),
            (None, Step::Stop)
        );
        let (a, step) = e.on(Event::Waited(Wake::Lost), now);
        assert_eq!(state(&a), Some(HaState::Disconnected));
        assert_eq!(step, Step::Connect);
    }

    #[test]
    fn a_step_down_holds_off_across_reconnects_then_contends_again() {
        let (mut e, now) = election();
        e.on(Event::Acquired, now);
        // The step-down announced `standby` itself: nothing more to say.
        let (a, step) = e.on(Event::Released(Held::SteppedDown), now);
        assert_eq!(a, None);
        let until = now + Duration::from_secs(60);
        assert_eq!(
            step,
            Step::Wait {
                until,
                why: HOLDING_OFF
            }
        );
        assert_eq!(e.hold_off_until, Some(until));
        // The connection drops during the hold-off and comes back: still holding off.
        e.on(Event::Waited(Wake::Lost), now);
        let (a, step) = e.on(Event::Connected, now + Duration::from_secs(5));
        assert_eq!(state(&a), Some(HaState::Standby));
        assert_eq!(
            step,
            Step::Wait {
                until,
                why: HOLDING_OFF
            }
        );
        // Once it ends, contend.
        assert_eq!(
            e.on(Event::Waited(Wake::Timer), until),
            (None, Step::Acquire)
        );
        assert_eq!(e.hold_off_until, None);
    }
}
