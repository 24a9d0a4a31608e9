//! The control plane: consume the node's control messages, converge the set of running
//! links, and ask for a snapshot until one arrives.
//!
//! The decisions are pure and tested without a broker: [`authorize`] says whether a message
//! may be applied (node user, node identity, queue prefix, sequence order) and [`plan`] says
//! which links to start and stop. This module only executes them.

mod authorize;
mod plan;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use drawbridge_control_protocol::{
    ControlCommand, DecodeError, LinkState, LinkStatus, Notification, PeerLink,
};
use drawbridge_node::topology;
use drawbridge_runtime::{backoff::Backoff, broker::Live, lograte::Every};
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::{FieldTable, ShortString},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub(crate) use authorize::{decide, Policy, Refusal, Sequences, Verdict};
pub(crate) use plan::{plan, Action};

use crate::{
    ha::HaState,
    link,
    notify::snapshot_request,
    view::{self, SharedView},
    Ctx,
};

/// How much longer than `drain_grace` a stopping link may take before it is aborted; also
/// what HA's step-down allows on top of that for the aborted links to be reported stopped.
pub(crate) const STOP_MARGIN: Duration = Duration::from_secs(5);

/// When the control plane aborts a link it asked to stop.
pub(crate) fn stop_deadline(drain_grace: Duration) -> Duration {
    drain_grace + STOP_MARGIN
}

/// A running link.
struct RunningLink {
    /// What it was started with (a changed spec means a restart).
    spec: PeerLink,
    /// Asks the link task to drain and stop.
    stop: CancellationToken,
    /// The link task; aborted if it does not stop within its deadline.
    task: JoinHandle<()>,
}

/// The set of running links, owned by the control task.
///
/// `wanted` is what the node asked for, kept by every bridge (a standby too, so it is
/// warm when it becomes active); `running` follows it only while this bridge is active
/// (see `ha`), and is empty otherwise.
pub(crate) struct Links {
    running: BTreeMap<String, RunningLink>,
    wanted: BTreeMap<String, PeerLink>,
    active: bool,
    ctx: Arc<Ctx>,
}

impl Links {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        Links {
            running: BTreeMap::new(),
            wanted: BTreeMap::new(),
            active: false,
            ctx,
        }
    }

    /// Follow the election: start the wanted links on becoming active, stop them all (as on
    /// SIGTERM: drained within `drain_grace`) otherwise. Returns true if this bridge just
    /// became active.
    pub(crate) async fn follow(&mut self, ha: HaState) -> bool {
        let active = ha == HaState::Active;
        if active == self.active {
            return false;
        }
        self.active = active;
        if active {
            let owners = self.ctx.ha.hot.owners();
            if owners.shared() {
                let mine = self.wanted.keys().filter(|q| owners.may_start(q)).count();
                info!(
                    links = mine,
                    wanted = self.wanted.len(),
                    members = ?owners_list(&owners),
                    "alive member: starting the wanted links this instance owns"
                );
                // Joining a running group: each of these ran on another member until now.
                if owners.alive().len() > 1 {
                    metrics::counter!("drawbridge_bridge_link_handovers_total", "direction" => "in")
                        .increment(mine as u64);
                }
            } else {
                info!(
                    links = self.wanted.len(),
                    "active: starting the wanted links"
                );
            }
            // Counted above: `converge` must not count these starts again.
            self.converge(&BTreeSet::new()).await;
        } else {
            if !self.running.is_empty() {
                info!(
                    links = self.running.len(),
                    ha_state = ha.as_str(),
                    "not active: stopping links"
                );
            }
            // Bounded by the links' stop deadline: the control loop is busy, not wedged.
            self.ctx
                .heartbeat
                .busy_for(stop_deadline(self.ctx.cfg.drain_grace));
            self.stop_all().await;
            self.ctx.views.lock().expect("poisoned").clear();
            metrics::gauge!("drawbridge_bridge_links_owned").set(0.0);
        }
        self.ctx.ha.links_running.send_replace(active);
        active
    }

    /// Start and stop links until the running set is the wanted one (in hot-hot, the wanted
    /// links this instance owns).
    ///
    /// Handovers are counted here, where they happen, whatever made this call: a change of
    /// members, or a control message handled first when both arrive together (the members'
    /// watch and the control consumer race in one `select!`). A link stopped while still
    /// wanted is handed over (out); a link started that was wanted before the current
    /// command (`known`) is taken over (in); a link the node just asked for is neither.
    async fn converge(&mut self, known: &BTreeSet<String>) {
        let owners = self.ctx.ha.hot.owners();
        // What it owns and runs stays; what it owns and does not run yet starts unless a
        // member about to join will own it (see `Owners::may_start`).
        let wanted: Vec<PeerLink> = self
            .wanted
            .values()
            .filter(|l| {
                owners.may_start(&l.queue)
                    || (owners.mine(&l.queue) && self.running.contains_key(&l.queue))
            })
            .cloned()
            .collect();
        metrics::gauge!("drawbridge_bridge_links_owned").set(wanted.len() as f64);
        if owners.shared() {
            let keep: BTreeSet<&str> = wanted.iter().map(|l| l.queue.as_str()).collect();
            let (out, into) = handovers(&self.running, &self.wanted, &keep, known);
            if out > 0 {
                metrics::counter!("drawbridge_bridge_link_handovers_total", "direction" => "out")
                    .increment(out as u64);
            }
            if into > 0 {
                metrics::counter!("drawbridge_bridge_link_handovers_total", "direction" => "in")
                    .increment(into as u64);
            }
        }
        let actions = plan(&self.specs(), &wanted);
        self.execute(actions).await;
    }

    /// Hot-hot: the members changed. Stop the links this instance no longer owns (each
    /// drains first; the new owner's consumer waits behind it) and start the ones it now
    /// owns. Nothing to do unless active.
    pub(crate) async fn members_changed(&mut self) {
        if !self.active {
            return;
        }
        let owners = self.ctx.ha.hot.owners();
        let (out, into) = {
            let running = &self.running;
            let out = running
                .keys()
                .filter(|q| self.wanted.contains_key(*q) && !owners.mine(q))
                .count();
            let into = self
                .wanted
                .keys()
                .filter(|q| owners.may_start(q) && !running.contains_key(*q))
                .count();
            (out, into)
        };
        if out == 0 && into == 0 {
            return;
        }
        info!(
            handed_over = out,
            taken_over = into,
            members = ?owners_list(&owners),
            "members changed: moving the links whose owner changed"
        );
        let known: BTreeSet<String> = self.wanted.keys().cloned().collect();
        self.converge(&known).await;
    }

    /// Queue → spec of every running link (the input of [`plan`]).
    fn specs(&self) -> BTreeMap<String, PeerLink> {
        self.running
            .iter()
            .map(|(q, r)| (q.clone(), r.spec.clone()))
            .collect()
    }

    /// Record what `command` asks for, and converge to it if active.
    pub(crate) async fn apply(&mut self, command: &ControlCommand) {
        let known: BTreeSet<String> = self.wanted.keys().cloned().collect();
        // Same queue twice in a snapshot: the last one wins, as in `plan`.
        self.wanted = plan::wanted(command, &self.wanted)
            .into_iter()
            .map(|l| (l.queue.clone(), l))
            .collect();
        *self.ctx.wanted.lock().expect("poisoned") = self.wanted.keys().cloned().collect();
        if self.active {
            self.converge(&known).await;
        }
    }

    /// Carry out `actions`: every link that has to stop stops in parallel (each within its
    /// deadline, aborted after it), then the new ones start.
    async fn execute(&mut self, actions: Vec<Action>) {
        let stopping: Vec<(String, RunningLink)> = actions
            .iter()
            .filter(|a| a.stops())
            .filter_map(|a| self.running.remove_entry(a.queue()))
            .collect();
        let deadline = stop_deadline(self.ctx.cfg.drain_grace);
        // Bounded by the deadline: the control loop is busy, not wedged.
        self.ctx.heartbeat.busy_for(deadline);
        futures::future::join_all(
            stopping
                .into_iter()
                .map(|(queue, link)| stop_link(queue, link, deadline)),
        )
        .await;
        for action in actions {
            match action {
                Action::Delete(queue) => {
                    self.ctx.views.lock().expect("poisoned").remove(&queue);
                    if self.wanted.contains_key(&queue) {
                        let owners = self.ctx.ha.hot.owners();
                        info!(queue = %queue, owner = owners.owner(&queue).unwrap_or("<none>"), "link handed over to its new owner");
                    } else {
                        info!(queue = %queue, "link deleted");
                    }
                }
                Action::Replace(spec) => {
                    info!(queue = %spec.queue, "link changed; restarted it");
                    self.start(spec);
                }
                Action::Create(spec) => self.start(spec),
            }
        }
    }

    fn start(&mut self, spec: PeerLink) {
        info!(queue = %spec.queue, targets = ?spec.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(), legal_names = ?spec.legal_names, "link created");
        let view: SharedView = view::new_view(&spec);
        self.ctx
            .views
            .lock()
            .expect("poisoned")
            .insert(spec.queue.clone(), view.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(link::run(
            spec.clone(),
            self.ctx.clone(),
            stop.clone(),
            view,
        ));
        self.running
            .insert(spec.queue.clone(), RunningLink { spec, stop, task });
    }

    /// Stop every link concurrently (shutdown).
    pub(crate) async fn stop_all(&mut self) {
        let deadline = stop_deadline(self.ctx.cfg.drain_grace);
        futures::future::join_all(
            std::mem::take(&mut self.running)
                .into_iter()
                .map(|(queue, link)| stop_link(queue, link, deadline)),
        )
        .await;
    }

    pub(crate) fn len(&self) -> usize {
        self.running.len()
    }
}

/// The alive members, for a log line.
fn owners_list(owners: &crate::members::Owners) -> Vec<String> {
    owners.alive().to_vec()
}

/// Ask one link to drain and stop; abort its task if it has not stopped within `deadline`
/// (its unacked messages go back to the queue when its channel closes).
async fn stop_link(queue: String, mut link: RunningLink, deadline: Duration) {
    link.stop.cancel();
    if tokio::time::timeout(deadline, &mut link.task)
        .await
        .is_err()
    {
        warn!(queue = %queue, ?deadline, "link did not stop within its deadline; aborting it");
        metrics::counter!("drawbridge_bridge_link_stop_aborted_total").increment(1);
        link.task.abort();
        let _ = link.task.await;
    }
}

/// How many links a converge hands over (`out`: running, still wanted by the node, no
/// longer to run here) and takes over (`into`: to run here, not running, and wanted before
/// the current command, so another member ran it or was to).
fn handovers<R, W>(
    running: &BTreeMap<String, R>,
    wanted: &BTreeMap<String, W>,
    keep: &BTreeSet<&str>,
    known: &BTreeSet<String>,
) -> (usize, usize) {
    let out = running
        .keys()
        .filter(|q| wanted.contains_key(*q) && !keep.contains(q.as_str()))
        .count();
    let into = keep
        .iter()
        .filter(|q| !running.contains_key(**q) && known.contains(**q))
        .count();
    (out, into)
}

#[cfg(test)]
mod tests {
    use drawbridge_control_protocol::{
        CreateLink, PeerLink, SequencedCommand, Snapshot, Target, DEFAULT_TARGET_ADDRESS,
    };

    use super::authorize::authorize;
    use super::*;

    const NODE: &str = "O=Bank A, L=London, C=GB";

    /// The control loop without I/O: authorize, then plan against the running set.
    fn run(messages: &[SequencedCommand]) -> BTreeMap<String, PeerLink> {
        let policy = Policy {
            queue_prefix: "drawbridge.peers.".into(),
            node_user: None,
            node_identity: NODE.parse().unwrap(),
        };
        let mut applied = Sequences::default();
        let mut running = BTreeMap::new();
        for msg in messages {
            if authorize(msg, None, &policy, &applied).is_err() {
                continue;
            }
            applied.record(msg);
            for action in plan(&running, &plan::wanted(&msg.command, &running)) {
                match action {
                    Action::Delete(q) => {
                        running.remove(&q);
                    }
                    Action::Create(l) | Action::Replace(l) => {
                        running.insert(l.queue.clone(), l);
                    }
                }
            }
        }
        running
    }

    fn link(queue: &str) -> PeerLink {
        PeerLink {
            queue: queue.into(),
            targets: vec![Target::new("127.0.0.1", 5671)],
            legal_names: vec!["O=Bank B, L=Paris, C=FR".into()],
            target_address: DEFAULT_TARGET_ADDRESS.into(),
        }
    }

    fn snapshot(sequence: u64, queues: &[&str]) -> SequencedCommand {
        SequencedCommand {
            sequence,
            epoch: 0,
            command: ControlCommand::Snapshot(Snapshot {
                node_identity: NODE.into(),
                inbox_queues: vec![],
                links: queues.iter().map(|q| link(q)).collect(),
            }),
        }
    }

    fn create(sequence: u64, queue: &str) -> SequencedCommand {
        SequencedCommand {
            sequence,
            epoch: 0,
            command: ControlCommand::CreateLink(CreateLink {
                node_identity: NODE.into(),
                link: link(queue),
            }),
        }
    }

    fn set(queues: &[&str]) -> BTreeSet<String> {
        queues.iter().map(|q| q.to_string()).collect()
    }

    fn map(queues: &[&str]) -> BTreeMap<String, ()> {
        queues.iter().map(|q| (q.to_string(), ())).collect()
    }

    /// The CI failure of stop 33: a control snapshot handled before the members' change
    /// moved links that no count saw. Counted in `converge` now, whichever call it is.
    #[test]
    fn handovers_are_counted_whatever_made_the_links_move() {
        let running = map(&["a", "b", "c"]);
        // Members changed (or a snapshot naming the same links arrived first): b and c now
        // belong to another member, d to this one.
        let wanted = map(&["a", "b", "c", "d"]);
        let keep = BTreeSet::from(["a", "d"]);
        let known = set(&["a", "b", "c", "d"]);
        assert_eq!(handovers(&running, &wanted, &keep, &known), (2, 1));
        // The node deletes c and creates e in the same snapshot: neither is a handover.
        let wanted = map(&["a", "b", "d", "e"]);
        let keep = BTreeSet::from(["a", "d", "e"]);
        assert_eq!(handovers(&running, &wanted, &keep, &known), (1, 1));
        // Nothing moved: nothing counted (so a second call after the first did the work
        // counts nothing again).
        let running = map(&["a", "d"]);
        let keep = BTreeSet::from(["a", "d"]);
        assert_eq!(handovers(&running, &wanted, &keep, &known), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_that_does_not_stop_is_aborted_at_its_deadline() {
        let (alive, dropped) = tokio::sync::oneshot::channel::<()>();
        let stuck = RunningLink {
            spec: link("drawbridge.peers.b"),
            stop: CancellationToken::new(),
            // Ignores its stop token, as a link wedged in a broker call would.
            task: tokio::spawn(async move {
                let _alive = alive;
                std::future::pending::<()>().await
            }),
        };
        let polite = RunningLink {
            spec: link("drawbridge.peers.c"),
            stop: CancellationToken::new(),
            task: tokio::spawn(std::future::ready(())),
        };
        let started = tokio::time::Instant::now();
        let deadline = Duration::from_secs(15);
        futures::future::join(
            stop_link("drawbridge.peers.b".into(), stuck, deadline),
            stop_link("drawbridge.peers.c".into(), polite, deadline),
        )
        .await;
        assert_eq!(started.elapsed(), deadline, "stops run in parallel");
        assert!(dropped.await.is_err(), "the stuck task was aborted");
    }

    #[test]
    fn a_stale_snapshot_after_a_create_keeps_the_link() {
        let running = run(&[create(2, "drawbridge.peers.b"), snapshot(1, &[])]);
        assert_eq!(running.keys().collect::<Vec<_>>(), ["drawbridge.peers.b"]);
    }

    #[test]
    fn a_newer_snapshot_replaces_the_state() {
        let running = run(&[
            create(2, "drawbridge.peers.b"),
            snapshot(3, &["drawbridge.peers.c"]),
        ]);
        assert_eq!(running.keys().collect::<Vec<_>>(), ["drawbridge.peers.c"]);
    }

    #[test]
    fn unsequenced_messages_apply_in_arrival_order() {
        let running = run(&[create(0, "drawbridge.peers.b"), snapshot(0, &[])]);
        assert!(running.is_empty());
        // ... and after sequenced ones too, without moving the mark.
        let running = run(&[
            create(5, "drawbridge.peers.b"),
            create(0, "drawbridge.peers.c"),
            snapshot(4, &[]),
        ]);
        assert_eq!(
            running.keys().collect::<Vec<_>>(),
            ["drawbridge.peers.b", "drawbridge.peers.c"]
        );
    }
}

/// Why a control session ended (the caller decides whether to reconnect or retry).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// Declaring, binding or consuming did not finish within the broker's op timeout.
    #[error("control setup timed out")]
    SetupTimeout,
    /// The broker refused or failed a setup step.
    #[error("control setup: {0}")]
    Setup(#[source] lapin::Error),
    /// Acking a control message did not finish within the broker's op timeout.
    #[error("control ack timed out")]
    AckTimeout,
    /// The broker failed the ack.
    #[error("control ack: {0}")]
    Ack(#[source] lapin::Error),
    /// The consumer failed.
    #[error("control consumer: {0}")]
    Consumer(#[source] lapin::Error),
    /// The broker cancelled the consumer (e.g. the queue was deleted).
    #[error("control consumer cancelled")]
    Cancelled,
    /// The broker connection went away.
    #[error("broker connection lost")]
    ConnectionLost,
}

/// State of the control plane that outlives broker sessions.
struct ControlState {
    links: Links,
    policy: Policy,
    /// Highest sequence applied per node identity.
    applied: Sequences,
    /// Rate limit of the "newer protocol version" error: a node upgraded before its bridge
    /// keeps sending, and one line per interval (with the count) says it all.
    newer_version_log: Every,
    /// Unknown body field numbers already logged, so each new command a newer node sends is
    /// logged once; bounded by [`MAX_UNKNOWN_LOGGED`].
    unknown_logged: HashSet<u32>,
}

/// How many distinct unknown control commands are logged (a newer node adds a few; anything
/// beyond this is noise from a broken sender and only counted).
const MAX_UNKNOWN_LOGGED: usize = 16;

/// Run the control plane until `shutdown`, then stop all links.
pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut state = ControlState {
        links: Links::new(ctx.clone()),
        policy: Policy {
            queue_prefix: ctx.cfg.queue_prefix.clone(),
            node_user: ctx.cfg.node_user.clone(),
            node_identity: ctx.node_identity.clone(),
        },
        applied: Sequences::default(),
        newer_version_log: Every::new(Duration::from_secs(10)),
        unknown_logged: HashSet::new(),
    };
    let mut generation = 0;
    // Retries of the control channel on a healthy connection (a channel-level error).
    let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut ha = ctx.ha.state.subscribe();
    let now = *ha.borrow_and_update();
    state.links.follow(now).await;
    // Hot-hot: who owns which queue (never changes in the other modes). Followed between
    // control sessions too: a member may join while the control channel is re-established.
    let mut owners = ctx.ha.hot.owners.subscribe();
    owners.borrow_and_update();
    // The control loop is the bridge's work loop for the systemd watchdog: it beats while
    // it waits for a connection too, so waiting for the broker is not mistaken for a hang.
    let mut idle = ctx.heartbeat.ticker();
    while !shutdown.is_cancelled() {
        ctx.heartbeat.beat();
        let wait = ctx.broker.connected(generation, Duration::from_secs(3600));
        tokio::pin!(wait);
        let live = loop {
            tokio::select! {
                l = &mut wait => break Some(l),
                // Without a broker connection the election says `disconnected`: stop the links.
                Ok(()) = ha.changed() => {
                    let now = *ha.borrow_and_update();
                    state.links.follow(now).await;
                    ctx.heartbeat.beat();
                }
                Ok(()) = owners.changed() => {
                    owners.borrow_and_update();
                    state.links.members_changed().await;
                    ctx.heartbeat.beat();
                }
                _ = shutdown.cancelled() => break None,
                _ = idle.tick() => ctx.heartbeat.beat(),
            }
        };
        let Some(live) = live else { break };
        let Some(live) = live else { continue };
        generation = live.generation;
        let started = tokio::time::Instant::now();
        let session =
            control_session(&ctx, &live, &mut state, &mut ha, &mut owners, &shutdown).await;
        // Not ready again until the next session consumes control messages.
        ctx.control_consuming
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match session {
            Ok(()) => {}
            // The supervisor has logged the lost connection; the next one gets a new session.
            Err(e) if live.is_lost() => {
                tracing::debug!(reason = %e, "control session ended with its broker connection")
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    retry.reset();
                }
                let delay = retry.next_delay();
                warn!(reason = %e, retry_in = ?delay, "control channel lost; re-establishing it");
                // Same connection again: ask for any connection from this generation on.
                generation = generation.saturating_sub(1);
                ctx.heartbeat.busy_for(delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    info!(links = state.links.len(), "stopping links");
    state.links.stop_all().await;
}

async fn control_session(
    ctx: &Arc<Ctx>,
    live: &Arc<Live>,
    state: &mut ControlState,
    ha: &mut tokio::sync::watch::Receiver<HaState>,
    owners: &mut tokio::sync::watch::Receiver<Arc<crate::members::Owners>>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let op = ctx.broker.config().op_timeout;
    let cfg = &ctx.cfg;
    let setup = async {
        let ch = live.conn.create_channel().await?;
        topology::declare_fanout(&ch, &cfg.notify_exchange).await?;
        // One exclusive queue per bridge instance: every instance (standbys too) sees
        // every control message.
        let q = topology::bind_exclusive_queue(&ch, &cfg.control_exchange).await?;
        let consumer = ch
            .basic_consume(
                q,
                ShortString::from(format!("drawbridge-control-{}", cfg.id)),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((ch, consumer))
    };
    ctx.heartbeat.busy_for(op);
    let (_ch, mut consumer) = tokio::time::timeout(op, setup)
        .await
        .map_err(|_| SessionError::SetupTimeout)?
        .map_err(SessionError::Setup)?;
    // Ready (`/readyz`): a control message published from now on reaches this bridge.
    ctx.control_consuming
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let mut have_snapshot = false;
    ctx.snapshot_applied.store(false, Ordering::Relaxed);
    let mut retry = Backoff::new(cfg.snapshot_retry_min, cfg.snapshot_retry_max);
    request_snapshot(ctx);
    let mut next_request = tokio::time::Instant::now() + retry.next_delay();
    let mut idle = ctx.heartbeat.ticker();
    loop {
        ctx.heartbeat.beat();
        tokio::select! {
            d = consumer.next() => match d {
                Some(Ok(delivery)) => {
                    if handle(&delivery, state).await {
                        if !have_snapshot {
                            info!("snapshot received");
                        }
                        have_snapshot = true;
                        ctx.snapshot_applied.store(true, Ordering::Relaxed);
                    }
                    // Every control message is acked, valid or not: a bad one must not
                    // loop forever.
                    ctx.heartbeat.busy_for(op);
                    tokio::time::timeout(op, delivery.acker.ack(BasicAckOptions::default()))
                        .await
                        .map_err(|_| SessionError::AckTimeout)?
                        .map_err(SessionError::Ack)?;
                }
                Some(Err(e)) => return Err(SessionError::Consumer(e)),
                None => return Err(SessionError::Cancelled),
            },
            Ok(()) = owners.changed() => {
                owners.borrow_and_update();
                state.links.members_changed().await;
            }
            Ok(()) = ha.changed() => {
                let now = *ha.borrow_and_update();
                if state.links.follow(now).await {
                    // A standby's wanted set may be behind (it missed messages while
                    // disconnected): ask again, as on start.
                    have_snapshot = false;
                    ctx.snapshot_applied.store(false, Ordering::Relaxed);
                    retry.reset();
                    request_snapshot(ctx);
                    next_request = tokio::time::Instant::now() + retry.next_delay();
                }
            }
            _ = tokio::time::sleep_until(next_request), if !have_snapshot => {
                info!("no snapshot yet; asking again");
                request_snapshot(ctx);
                next_request = tokio::time::Instant::now() + retry.next_delay();
            }
            _ = live.lost() => return Err(SessionError::ConnectionLost),
            // Idle is not wedged: the loop top beats.
            _ = idle.tick() => {}
            // The control channel goes with the connection; closing it here as well
            // only races lapin's own close.
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Apply one control message if [`authorize`] lets it through. Returns true if it was a
/// snapshot that was applied.
async fn handle(d: &Delivery, state: &mut ControlState) -> bool {
    let user_id = d.properties.user_id().as_ref().map(|s| s.as_str());
    let msg = match decide(&d.data, user_id, &state.policy, &state.applied) {
        Verdict::Apply(msg) => msg,
        // A newer node's new command (same major): not for this bridge, and not an error.
        Verdict::UnknownCommand { field } => {
            if state.unknown_logged.len() < MAX_UNKNOWN_LOGGED && state.unknown_logged.insert(field)
            {
                warn!(
                    field,
                    user_id = %user_id.unwrap_or("<none>"),
                    "ignored: unknown control command (newer node?)"
                );
            }
            metrics::counter!("drawbridge_bridge_control_ignored_total", "reason" => "unknown_command")
                .increment(1);
            return false;
        }
        Verdict::Refused(refusal) if refusal.is_stale() => {
            warn!(reason = %refusal, "stale control message ignored");
            metrics::counter!("drawbridge_bridge_control_stale_total").increment(1);
            return false;
        }
        // Only from the node user (`decide` checks it first): anyone else gets no reply.
        Verdict::Refused(Refusal::Decode(DecodeError::UnsupportedVersion { found, supported })) => {
            let node = ControlCommand::sender_identity(&d.data);
            if let Some(skipped) = state.newer_version_log.hit() {
                error!(
                    found,
                    supported,
                    node = %node.as_deref().unwrap_or("<unreadable>"),
                    user_id = %user_id.unwrap_or("<none>"),
                    skipped,
                    "control message refused: protocol version {found} is newer than this bridge understands (1 to {supported}); upgrade the bridge"
                );
            }
            notify_refused_version(&state.links.ctx, node, found, supported);
            count_refusal(state, "newer_version");
            return false;
        }
        Verdict::Refused(refusal) => {
            warn!(user_id = %user_id.unwrap_or("<none>"), reason = %refusal, "control message refused");
            count_refusal(state, refusal.label());
            return false;
        }
    };
    if !msg.is_sequenced() {
        warn!(
            node = %msg.command.node_identity(),
            kind = msg.command.kind(),
            "unsequenced control message (sender predates sequence numbers); applying it in arrival order"
        );
        metrics::counter!("drawbridge_bridge_control_unsequenced_total").increment(1);
    }
    if state.applied.record(&msg) {
        info!(
            node = %msg.command.node_identity(),
            epoch = msg.epoch,
            sequence = msg.sequence,
            "control order restarted: a new epoch of the node (restarted?); its sequence is the new mark"
        );
    }
    let is_snapshot = matches!(msg.command, ControlCommand::Snapshot(_));
    info!(
        node = %msg.command.node_identity(),
        kind = msg.command.kind(),
        sequence = msg.sequence,
        epoch = msg.epoch,
        "applying control message"
    );
    state.links.apply(&msg.command).await;
    is_snapshot
}

/// Count a refused control message in the metrics (by `reason`) and in `/status`.
fn count_refusal(state: &ControlState, reason: &'static str) {
    metrics::counter!("drawbridge_bridge_control_refused_total", "reason" => reason).increment(1);
    state
        .links
        .ctx
        .control_refused
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Tell the node its control message was refused for a newer protocol version, so a node
/// upgraded before its bridges learns why it is not obeyed. There is no link to name, so the
/// event is about the control exchange itself (see `LinkStatus::queue`); the peer is the
/// sending node's identity when it could be read.
fn notify_refused_version(ctx: &Ctx, node: Option<String>, found: u32, supported: u32) {
    let n = Notification::LinkStatus(LinkStatus {
        bridge_id: ctx.cfg.id.clone(),
        queue: ctx.cfg.control_exchange.clone(),
        state: LinkState::Down,
        peer: node.unwrap_or_default(),
        reason: format!(
            "refused: control protocol version {found} is newer than this bridge understands (1 to {supported}); upgrade the bridge"
        ),
        timestamp_ms: drawbridge_runtime::daemon::unix_ms(),
    });
    if ctx.notify.try_send(n).is_err() {
        metrics::counter!("drawbridge_bridge_notifications_dropped_total").increment(1);
    }
}

/// Publishes notifications (snapshot requests, link status) to the notify exchange.
/// Best effort: status events are informational, and snapshot requests are repeated.
pub(crate) async fn notifier(ctx: Arc<Ctx>, mut rx: tokio::sync::mpsc::Receiver<Notification>) {
    let mut channel: Option<(u64, lapin::Channel)> = None;
    while let Some(n) = rx.recv().await {
        let Some(live) = ctx.broker.current() else {
            continue;
        };
        let op = ctx.broker.config().op_timeout;
        if channel
            .as_ref()
            .map(|(g, c)| *g != live.generation || !c.status().connected())
            .unwrap_or(true)
        {
            channel = match tokio::time::timeout(op, live.conn.create_channel()).await {
                Ok(Ok(c)) => Some((live.generation, c)),
                _ => None,
            };
        }
        let Some((_, ch)) = &channel else { continue };
        let body = n.encode();
        let r = tokio::time::timeout(
            op,
            ch.basic_publish(
                ShortString::from(ctx.cfg.notify_exchange.as_str()),
                ShortString::from(""),
                Default::default(),
                &body,
                lapin::BasicProperties::default()
                    .with_content_type(ShortString::from("application/x-protobuf")),
            ),
        )
        .await;
        if !matches!(r, Ok(Ok(_))) {
            tracing::debug!("notification not published");
            channel = None;
        }
    }
}

/// Ask the node for a snapshot (repeated with backoff until one arrives).
fn request_snapshot(ctx: &Ctx) {
    let _ = ctx.notify.try_send(snapshot_request(ctx));
}
