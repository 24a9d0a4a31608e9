//! Hot-hot (`bridge.ha = "hot-hot"`): every bridge instance of a node is active, and the
//! peer queues are shared out among them.
//!
//! - **Who is a member.** Each instance declares a queue of its own,
//!   `drawbridge.bridge.member.<group>.<incarnation>` (auto-delete, consumed by it alone),
//!   binds it to the fanout `drawbridge.bridge.members.<group>` and announces itself there
//!   every `ha_member_interval` (id, incarnation, queue, state, links running). The queue is
//!   also its proof of life: every interval each instance passively declares the queues of the
//!   others, and a member whose queue is gone (404) or has no consumer left is gone. So the
//!   broker is the judge, not a heartbeat: a `kill -9`ed instance's connection closes, its
//!   queue goes with it and the others see it at their next check (about one interval); an
//!   instance cut off without a word stays a member until the broker drops its connection
//!   (two broker heartbeats) — which is also when the broker frees its consumers.
//! - **Who owns a queue.** Rendezvous hashing: the owner of a peer queue is the alive member
//!   with the highest [`score`] of (member id, queue). Every instance computes the same owner
//!   from the same member set, nothing is stored, and a join, leave or crash moves only the
//!   queues whose owner changes (about 1/n of them). Only the owner runs the link.
//! - **The fence** stays single-active-consumer on the peer queue: while two instances briefly
//!   disagree on the member set and both run a queue's link, the broker delivers to one of them
//!   only. A handover is therefore: the old owner drains its in-flight transfers and closes its
//!   channel (the unacked deliveries return to the queue in order); the new owner's consumer
//!   waits behind it meanwhile and gets the queue from exactly there — no gap, and never two
//!   instances forwarding one queue.
//! - **Joining** instances announce themselves `joining` and listen for two intervals (every
//!   member answers a newcomer at once) before they say `alive` and take their queues, so the
//!   queues they will own are not dropped by the others before they can take them.
//! - **Leaving** (SIGTERM, step-down) is announced first: the others take its queues at once
//!   and their consumers wait behind its draining ones.
//! - **Cut off:** an instance that cannot reach its broker stops its links at once (it cannot
//!   ack), and the lease ([`crate::ha::Lease`], a passive declare of its own member queue every
//!   `ha_lease_check`) makes a silent partition a stop within `2 × ha_lease_check`, before the
//!   broker can drop its connection and hand its queues to the others.
//!
//! The table ([`Table`]) and the hash are pure and tested without a broker; [`run`] does the
//! I/O. What the control plane needs is an [`Owners`] snapshot in a `watch`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use drawbridge_node::topology;
use drawbridge_runtime::{admin::StepDown, broker::Live, text};
use futures::{future::BoxFuture, StreamExt};
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    ha::{lease_check_on, passive_declare, reply_code, HaState, Lease},
    Ctx,
};

/// Members beyond this many are not admitted (and said so): a group is a handful of
/// instances, and every member is checked every interval.
pub(crate) const MAX_MEMBERS: usize = 64;
/// An announcement larger than this is ignored unread.
const MAX_ANNOUNCEMENT: usize = 4096;
/// Longest member id accepted (`bridge.id`), in bytes.
const MAX_ID: usize = 128;
/// The announcement format's version.
const VERSION: u32 = 1;
/// The prefix of every member queue (what an announcement may name, and nothing else).
const MEMBER_QUEUE_PREFIX: &str = "drawbridge.bridge.member.";

/// A member's state as it announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum MemberState {
    /// Learning the members; owns nothing yet.
    Joining,
    /// Owns its share of the queues.
    Alive,
    /// Handing its queues over (SIGTERM, step-down); owns nothing.
    Leaving,
}

impl MemberState {
    fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Alive => "alive",
            MemberState::Leaving => "leaving",
        }
    }
}

/// What each member publishes on the members fanout every interval (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Announcement {
    v: u32,
    /// `bridge.id`: the key of the hash.
    id: String,
    /// Random per process start: tells a restarted instance from the one before it.
    incarnation: String,
    /// Its member queue (its proof of life).
    queue: String,
    state: MemberState,
    /// Links it runs.
    links: u32,
}

impl Announcement {
    /// Decode and bound an announcement; `None` for anything malformed (it comes from our own
    /// broker, but a broken or foreign publisher must not reach a panic or grow the table).
    fn decode(body: &[u8]) -> Option<Announcement> {
        if body.len() > MAX_ANNOUNCEMENT {
            return None;
        }
        let a: Announcement = serde_json::from_slice(body).ok()?;
        let ok = a.v == VERSION
            && !a.id.is_empty()
            && a.id.len() <= MAX_ID
            && !a.incarnation.is_empty()
            && a.incarnation.len() <= 64
            && a.incarnation.bytes().all(|b| b.is_ascii_alphanumeric())
            && a.queue.len() <= 255
            && a.queue.starts_with(MEMBER_QUEUE_PREFIX);
        ok.then_some(a)
    }
}

/// The score of `member` for `queue`: the owner is the member with the highest one. A fixed
/// function (FNV-1a, then the splitmix64 finaliser for its avalanche), not `std`'s hasher,
/// whose output may change between Rust releases: instances of different builds must agree.
pub(crate) fn score(member: &str, queue: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(queue.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Who owns which queue, as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owners {
    /// Not hot-hot: this bridge runs every wanted link (when active at all).
    everything: bool,
    /// This instance's id.
    me: String,
    /// The ids of the alive members (this one included while it is alive), sorted, distinct.
    alive: Vec<String>,
    /// Members heard joining lately (see [`Table::owners`]): their queues are not started
    /// here, since they take them in a moment; nor are they taken from who runs them now.
    joining: Vec<String>,
}

impl Owners {
    /// Hot-warm or off: every link is this bridge's.
    pub(crate) fn everything() -> Owners {
        Owners {
            everything: true,
            me: String::new(),
            alive: Vec::new(),
            joining: Vec::new(),
        }
    }

    /// Hot-hot with these alive members.
    pub(crate) fn of(me: &str, alive: Vec<String>) -> Owners {
        Owners::with_joining(me, alive, Vec::new())
    }

    /// Hot-hot with these alive members and these members about to be.
    pub(crate) fn with_joining(
        me: &str,
        mut alive: Vec<String>,
        mut joining: Vec<String>,
    ) -> Owners {
        alive.sort();
        alive.dedup();
        joining.sort();
        joining.dedup();
        joining.retain(|j| alive.binary_search(j).is_err());
        Owners {
            everything: false,
            me: me.to_string(),
            alive,
            joining,
        }
    }

    /// The member that runs `queue` (`None` with no alive member; in hot-warm, this bridge).
    pub(crate) fn owner(&self, queue: &str) -> Option<&str> {
        if self.everything {
            return Some(self.me.as_str());
        }
        highest(self.alive.iter(), queue)
    }

    /// Whether this instance owns `queue`: it keeps running its link.
    pub(crate) fn mine(&self, queue: &str) -> bool {
        self.everything || self.owner(queue) == Some(self.me.as_str())
    }

    /// Whether this instance starts `queue`'s link: it owns it, and no member about to join
    /// would own it. So members that start together do not first take every queue (each
    /// counting only itself) and then hand most of them over: each starts its own share.
    /// (A member joining a running group takes its share from the others only once it is
    /// alive: they keep running it meanwhile, see [`Owners::mine`].)
    pub(crate) fn may_start(&self, queue: &str) -> bool {
        self.everything
            || highest(self.alive.iter().chain(&self.joining), queue) == Some(self.me.as_str())
    }

    /// Whether the queues are shared out (hot-hot).
    pub(crate) fn shared(&self) -> bool {
        !self.everything
    }

    /// The alive members' ids, sorted.
    pub(crate) fn alive(&self) -> &[String] {
        &self.alive
    }
}

/// The member of `members` with the highest score for `queue`.
fn highest<'a>(members: impl Iterator<Item = &'a String>, queue: &str) -> Option<&'a str> {
    members
        .max_by_key(|m| (score(m, queue), m.as_str()))
        .map(String::as_str)
}

/// A member as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MemberView {
    pub(crate) id: String,
    pub(crate) incarnation: String,
    pub(crate) state: &'static str,
    pub(crate) links: u32,
    #[serde(rename = "self")]
    pub(crate) is_self: bool,
    /// Milliseconds since its last announcement (0 for this instance).
    pub(crate) heard_ms_ago: u64,
}

/// One other member, as last heard.
#[derive(Debug, Clone)]
struct Member {
    id: String,
    queue: String,
    state: MemberState,
    links: u32,
    heard: Instant,
    /// When it was first heard `joining` (for how long it counts as about to join).
    joining_since: Instant,
}

/// The membership table of one broker session: the other members by incarnation, and this
/// instance's own state. Pure: the caller does the I/O and passes the time.
#[derive(Debug)]
pub(crate) struct Table {
    me: String,
    incarnation: String,
    /// How long a member heard `joining` counts as about to join (three intervals: it says
    /// `alive` after two).
    joining_grace: Duration,
    state: MemberState,
    others: BTreeMap<String, Member>,
    /// Announcements refused because the table was full (counted, logged once).
    refused_full: u64,
}

/// What hearing an announcement changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Heard {
    /// A member not known before (answer it at once, so a newcomer learns us quickly).
    New,
    /// A known member changed state.
    Changed,
    /// Nothing that moves a queue.
    Same,
    /// Our own announcement, or one refused.
    Ignored,
}

impl Table {
    pub(crate) fn new(me: &str, incarnation: &str, interval: Duration) -> Table {
        Table {
            me: me.to_string(),
            incarnation: incarnation.to_string(),
            joining_grace: interval * 3,
            state: MemberState::Joining,
            others: BTreeMap::new(),
            refused_full: 0,
        }
    }

    fn heard(&mut self, a: Announcement, now: Instant) -> Heard {
        if a.incarnation == self.incarnation {
            return Heard::Ignored;
        }
        let full = self.others.len() + 1 >= MAX_MEMBERS;
        match self.others.get_mut(&a.incarnation) {
            Some(m) => {
                m.heard = now;
                m.links = a.links;
                if m.state == a.state {
                    Heard::Same
                } else {
                    if a.state == MemberState::Joining {
                        m.joining_since = now;
                    }
                    m.state = a.state;
                    Heard::Changed
                }
            }
            None if full => {
                self.refused_full += 1;
                Heard::Ignored
            }
            None => {
                self.others.insert(
                    a.incarnation.clone(),
                    Member {
                        id: a.id,
                        queue: a.queue,
                        state: a.state,
                        links: a.links,
                        heard: now,
                        joining_since: now,
                    },
                );
                Heard::New
            }
        }
    }

    /// The member of `incarnation` is gone (its queue is); whether it was known.
    fn gone(&mut self, incarnation: &str) -> bool {
        self.others.remove(incarnation).is_some()
    }

    /// The ownership this table gives at `now`: the alive members own the queues; members
    /// heard joining within the grace are about to (a joining member that never says `alive`
    /// stops counting after it, so its share is not left unstarted).
    pub(crate) fn owners(&self, now: Instant) -> Owners {
        let mut alive: Vec<String> = self
            .others
            .values()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.id.clone())
            .collect();
        if self.state == MemberState::Alive {
            alive.push(self.me.clone());
        }
        let joining = self
            .others
            .values()
            .filter(|m| {
                m.state == MemberState::Joining
                    && now.saturating_duration_since(m.joining_since) < self.joining_grace
            })
            .map(|m| m.id.clone())
            .collect();
        Owners::with_joining(&self.me, alive, joining)
    }

    /// Other members that share our id (a configuration error: they own the same queues, and
    /// only single-active-consumer keeps them from forwarding one queue twice).
    fn namesakes(&self) -> impl Iterator<Item = &str> + '_ {
        self.others
            .iter()
            .filter(|(_, m)| m.id == self.me)
            .map(|(inc, _)| inc.as_str())
    }

    fn views(&self, links: u32, now: Instant) -> Vec<MemberView> {
        let mut v: Vec<MemberView> = self
            .others
            .iter()
            .map(|(inc, m)| MemberView {
                id: m.id.clone(),
                incarnation: inc.clone(),
                state: m.state.as_str(),
                links: m.links,
                is_self: false,
                heard_ms_ago: now.saturating_duration_since(m.heard).as_millis() as u64,
            })
            .collect();
        v.push(MemberView {
            id: self.me.clone(),
            incarnation: self.incarnation.clone(),
            state: self.state.as_str(),
            links,
            is_self: true,
            heard_ms_ago: 0,
        });
        v.sort_by(|a, b| (&a.id, &a.incarnation).cmp(&(&b.id, &b.incarnation)));
        v
    }
}

/// The hot-hot state shared with `/status` and the control plane (part of `ha::Ha`).
pub(crate) struct Shared {
    /// Who owns what; the control plane converges on every change.
    pub(crate) owners: tokio::sync::watch::Sender<Arc<Owners>>,
    /// The members as last seen (`/status`).
    pub(crate) members: Mutex<Vec<MemberView>>,
}

impl Shared {
    pub(crate) fn new(hot_hot: bool, me: &str) -> Shared {
        let owners = if hot_hot {
            Owners::of(me, Vec::new())
        } else {
            Owners::everything()
        };
        Shared {
            owners: tokio::sync::watch::channel(Arc::new(owners)).0,
            members: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn owners(&self) -> Arc<Owners> {
        self.owners.borrow().clone()
    }
}

/// The members fanout of `group`.
pub(crate) fn exchange_name(group: &str) -> String {
    let mut name = format!("drawbridge.bridge.members.{group}");
    truncate(&mut name, 255);
    name
}

/// This incarnation's member queue, within the 255 bytes of a queue name (the incarnation,
/// at the end, is what makes it unique).
fn queue_name(group: &str, incarnation: &str) -> String {
    let mut prefix = format!("{MEMBER_QUEUE_PREFIX}{group}");
    truncate(&mut prefix, 255 - 1 - incarnation.len());
    format!("{prefix}.{incarnation}")
}

fn truncate(s: &mut String, max: usize) {
    while s.len() > max {
        s.pop();
    }
}

/// A step-down request (as in `ha`).
type Request = tokio::sync::oneshot::Sender<StepDown>;

/// How a session ended.
enum End {
    /// The broker connection is gone.
    Lost,
    /// The bridge is stopping.
    Shutdown,
    /// Out of the group on a live connection (why): join again after a backoff.
    Retry(String),
}

/// Run the membership until `shutdown` (only in hot-hot): one session per broker connection.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    group: String,
    mut requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let incarnation = format!("{:032x}", rand::random::<u128>());
    let exchange = exchange_name(&group);
    let queue = queue_name(&group, &incarnation);
    info!(id = %ctx.cfg.id, %exchange, "hot-hot: sharing the peer queues with the other members of the group");
    let mut generation = 0;
    // After a step-down: not a member until then.
    let mut hold_off_until: Option<Instant> = None;
    // Joining again on the same connection after a refusal or a lost member queue.
    let mut retry =
        drawbridge_runtime::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut last_retry = String::new();
    loop {
        let live = tokio::select! {
            l = ctx.broker.connected(generation, Duration::from_secs(3600)) => l,
            Some(reply) = requests.recv() => {
                let _ = reply.send(StepDown::NotActive("not connected to the broker".into()));
                continue;
            }
            _ = shutdown.cancelled() => return,
        };
        let Some(live) = live else { continue };
        generation = live.generation;
        let session = Session {
            ctx: &ctx,
            live: &live,
            exchange: &exchange,
            queue: &queue,
            table: Table::new(&ctx.cfg.id, &incarnation, ctx.cfg.ha.member_interval),
        };
        let started = Instant::now();
        match session
            .run(&mut requests, &shutdown, &mut hold_off_until)
            .await
        {
            End::Shutdown => return,
            End::Retry(reason) => {
                publish_owners(&ctx, Owners::of(&ctx.cfg.id, Vec::new()));
                if started.elapsed() > Duration::from_secs(30) {
                    retry.reset();
                }
                let delay = retry.next_delay();
                // One line per reason, not one per attempt.
                if reason != last_retry {
                    warn!(reason = %reason, retry_in = ?delay, "hot-hot: out of the group; joining again");
                    last_retry = reason.clone();
                }
                // Standby stops this instance's links: the others take them meanwhile.
                ctx.ha
                    .set(HaState::Standby, &format!("out of the group: {reason}"));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = live.lost() => {}
                    _ = shutdown.cancelled() => return,
                }
                // The same connection again, if it lives.
                generation = generation.saturating_sub(1);
            }
            End::Lost => {
                publish_owners(&ctx, Owners::of(&ctx.cfg.id, Vec::new()));
                // A lease that ran out has said why already.
                if ctx.ha.current() != HaState::Disconnected {
                    ctx.ha.set(
                        HaState::Disconnected,
                        "disconnected: broker connection lost",
                    );
                }
            }
        }
    }
}

fn publish_owners(ctx: &Ctx, owners: Owners) {
    let alive = owners.alive.len();
    let changed = ctx.ha.hot.owners.send_if_modified(|o| {
        if **o == owners {
            false
        } else {
            *o = Arc::new(owners);
            true
        }
    });
    if changed {
        metrics::gauge!("drawbridge_bridge_members").set(alive as f64);
    }
}

struct Session<'a> {
    ctx: &'a Arc<Ctx>,
    live: &'a Arc<Live>,
    exchange: &'a str,
    queue: &'a str,
    table: Table,
}

/// A check of another member's queue: its incarnation and whether it is still there.
type Check = BoxFuture<'static, Vec<(String, Presence)>>;

/// What a passive declare of a member queue said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// There, consumed: the member lives.
    There,
    /// Gone (404), or there without its consumer (its owner declared it and died before
    /// consuming; it expires on its own).
    Gone,
    /// No answer (our own connection's trouble): judge nothing.
    Unknown,
}

impl Session<'_> {
    async fn run(
        mut self,
        requests: &mut mpsc::Receiver<Request>,
        shutdown: &CancellationToken,
        hold_off_until: &mut Option<Instant>,
    ) -> End {
        let ctx = self.ctx;
        let op = ctx.broker.config().op_timeout;
        let interval = ctx.cfg.ha.member_interval;
        ctx.ha
            .set(HaState::Standby, "joining: learning the other members");
        let setup = tokio::time::timeout(op, self.setup()).await;
        let (channel, mut consumer) = match setup {
            Ok(Ok(v)) => v,
            Ok(Err(_)) if self.live.is_lost() => return End::Lost,
            // A refusal (permissions, a queue of that name declared otherwise): retried on
            // this connection with backoff; the links of other daemons' need not suffer.
            Ok(Err(e)) => return End::Retry(format!("cannot join the members: {e}")),
            Err(_) => {
                self.live
                    .report_broken("joining the hot-hot members timed out");
                return End::Lost;
            }
        };
        // The lease: a passive declare of our own queue every check (see `ha::Lease`).
        let every = lease_check_on(
            ctx.cfg.ha.lease_check,
            self.live.conn.configuration().heartbeat(),
        );
        let joined_at = Instant::now();
        let mut lease = Lease::new(every, joined_at);
        let mut next_lease = lease.next_check(joined_at);
        let mut lease_check: Option<(Instant, BoxFuture<'static, Result<u32, lapin::Error>>)> =
            None;
        let mut settle_at = Some(joined_at + interval * 2);
        if let Some(until) = hold_off_until.filter(|t| *t > joined_at) {
            self.table.state = MemberState::Leaving;
            settle_at = Some(until);
        }
        self.announce(&channel).await;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check: Option<Check> = None;
        let mut namesakes_logged = std::collections::HashSet::new();
        let mut full_logged = false;
        loop {
            tokio::select! {
                _ = self.live.lost() => return End::Lost,
                d = consumer.next() => match d {
                    Some(Ok(d)) => {
                        let Some(a) = Announcement::decode(&d.data) else {
                            metrics::counter!("drawbridge_bridge_member_announcements_refused_total").increment(1);
                            continue;
                        };
                        let id = a.id.clone();
                        let state = a.state;
                        match self.table.heard(a, Instant::now()) {
                            Heard::New => {
                                info!(member = %text::escape(&id), state = state.as_str(), "hot-hot: member joined the group");
                                self.announce(&channel).await;
                                self.changed();
                            }
                            Heard::Changed => {
                                info!(member = %text::escape(&id), state = state.as_str(), "hot-hot: member changed state");
                                self.changed();
                            }
                            Heard::Same => self.show(),
                            Heard::Ignored => {}
                        }
                        for inc in self.table.namesakes() {
                            if namesakes_logged.insert(inc.to_string()) {
                                error!(id = %ctx.cfg.id, other_incarnation = %inc, "hot-hot: another instance has the same bridge.id; both own the same queues (single-active-consumer keeps one of them idle on each): give every instance its own bridge.id");
                            }
                        }
                        if self.table.refused_full > 0 && !full_logged {
                            full_logged = true;
                            error!(max = MAX_MEMBERS, "hot-hot: more members than admitted; the others are ignored");
                        }
                    }
                    _ if self.live.is_lost() => return End::Lost,
                    // The others see our queue gone and take our queues: stop ours (the
                    // caller goes standby) and join again.
                    _ => return End::Retry("our member queue's consumer ended (queue deleted?)".into()),
                },
                _ = tick.tick() => {
                    self.announce(&channel).await;
                    // A joining member's grace may have run out.
                    publish_owners(ctx, self.table.owners(Instant::now()));
                    if check.is_none() {
                        check = Some(self.check_members());
                    }
                }
                results = async { check.as_mut().expect("guarded").await }, if check.is_some() => {
                    check = None;
                    let mut any = false;
                    for (inc, presence) in results {
                        if presence == Presence::Gone {
                            if let Some(m) = self.table.others.get(&inc) {
                                info!(member = %text::escape(&m.id), "hot-hot: member gone (its member queue is gone); taking over its share");
                            }
                            any |= self.table.gone(&inc);
                        }
                    }
                    if any {
                        self.changed();
                    }
                }
                _ = sleep_until_opt(settle_at) => {
                    settle_at = None;
                    *hold_off_until = None;
                    ctx.ha.hold_off(None);
                    self.table.state = MemberState::Alive;
                    self.announce(&channel).await;
                    // Owners first, then the state: the control plane starts what it owns.
                    self.changed();
                    ctx.ha.set(HaState::Active, "member: running the links this instance owns");
                }
                _ = tokio::time::sleep_until(next_lease), if lease_check.is_none() => {
                    lease_check = Some((Instant::now(), passive_declare(&channel, self.queue)));
                }
                answer = async { lease_check.as_mut().expect("guarded").1.as_mut().await }, if lease_check.is_some() => {
                    let (sent, _) = lease_check.take().expect("guarded");
                    match answer {
                        Ok(_) => {
                            lease.answered(sent);
                            next_lease = lease.next_check(sent);
                        }
                        Err(_) if self.live.is_lost() => return End::Lost,
                        Err(e) => return End::Retry(format!("our member queue is gone: {e}")),
                    }
                }
                _ = tokio::time::sleep_until(lease.expires_at()) => {
                    ctx.ha.set(HaState::Disconnected, &format!(
                        "lease expired: no check of our member queue answered within {:?} (broker unreachable?); links stopped before the broker can hand them to the other members",
                        every * 2
                    ));
                    self.live.report_broken("hot-hot member lease expired");
                    return End::Lost;
                }
                Some(reply) = requests.recv() => {
                    if self.table.state != MemberState::Alive {
                        let _ = reply.send(StepDown::NotActive("not an alive member (joining or holding off)".into()));
                        continue;
                    }
                    let outcome = self.step_down(&channel).await;
                    let until = Instant::now() + ctx.cfg.ha.hold_off;
                    *hold_off_until = Some(until);
                    ctx.ha.hold_off(Some(until));
                    settle_at = Some(until);
                    let _ = reply.send(outcome);
                }
                _ = shutdown.cancelled() => {
                    // Announced so that the others take our queues at once; our consumers
                    // stay until the links have drained and the connection closes.
                    self.table.state = MemberState::Leaving;
                    self.announce(&channel).await;
                    return End::Shutdown;
                }
            }
        }
    }

    /// Declare the members fanout and our member queue, bind and consume it.
    async fn setup(&self) -> Result<(Channel, lapin::Consumer), lapin::Error> {
        let ch = self.live.conn.create_channel().await?;
        topology::declare_fanout(&ch, self.exchange).await?;
        let mut args = FieldTable::default();
        // Announcements are worth nothing after a few intervals; a stalled consumer must not
        // pile them up.
        args.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongUInt(10_000),
        );
        args.insert(ShortString::from("x-max-length"), AMQPValue::LongUInt(1000));
        // Declared and never consumed (we died in between): it goes away on its own.
        args.insert(ShortString::from("x-expires"), AMQPValue::LongUInt(60_000));
        // Durable: RabbitMQ 4 deprecates transient non-exclusive queues. Auto-delete: gone
        // with our consumer, which is what the others check.
        ch.queue_declare(
            ShortString::from(self.queue),
            QueueDeclareOptions {
                auto_delete: true,
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        ch.queue_bind(
            ShortString::from(self.queue),
            ShortString::from(self.exchange),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consumer = ch
            .basic_consume(
                ShortString::from(self.queue),
                ShortString::from(format!("drawbridge-member-{}", self.ctx.cfg.id)),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok((ch, consumer))
    }

    /// Publish our announcement (best effort, bounded: the next interval repeats it).
    async fn announce(&self, channel: &Channel) {
        let a = Announcement {
            v: VERSION,
            id: self.ctx.cfg.id.clone(),
            incarnation: self.table.incarnation.clone(),
            queue: self.queue.to_string(),
            state: self.table.state,
            links: self.running_links(),
        };
        let body = serde_json::to_vec(&a).expect("serialisable");
        let op = self.ctx.broker.config().op_timeout;
        let published = tokio::time::timeout(
            op,
            channel.basic_publish(
                ShortString::from(self.exchange),
                ShortString::from(""),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type(ShortString::from("application/json")),
            ),
        )
        .await;
        if !matches!(published, Ok(Ok(_))) {
            tracing::debug!("hot-hot: announcement not published");
        }
        self.show();
    }

    fn running_links(&self) -> u32 {
        u32::try_from(self.ctx.views.lock().expect("poisoned").len()).unwrap_or(u32::MAX)
    }

    /// The member table changed: publish the ownership and show it.
    fn changed(&self) {
        publish_owners(self.ctx, self.table.owners(Instant::now()));
        self.show();
    }

    fn show(&self) {
        *self.ctx.ha.hot.members.lock().expect("poisoned") =
            self.table.views(self.running_links(), Instant::now());
    }

    /// Check every other member's queue, one after the other on a channel of our own (a 404
    /// closes it; the next check opens another).
    fn check_members(&self) -> Check {
        let members: Vec<(String, String)> = self
            .table
            .others
            .iter()
            .map(|(inc, m)| (inc.clone(), m.queue.clone()))
            .collect();
        let live = self.live.clone();
        let op = self.ctx.broker.config().op_timeout;
        Box::pin(async move {
            let mut out = Vec::with_capacity(members.len());
            let mut channel: Option<Channel> = None;
            for (inc, queue) in members {
                if channel.as_ref().is_none_or(|c| !c.status().connected()) {
                    channel = match tokio::time::timeout(op, live.conn.create_channel()).await {
                        Ok(Ok(c)) => Some(c),
                        _ => None,
                    };
                }
                let Some(ch) = &channel else {
                    out.push((inc, Presence::Unknown));
                    continue;
                };
                let presence = match tokio::time::timeout(op, passive_declare(ch, &queue)).await {
                    Ok(Ok(consumers)) if consumers > 0 => Presence::There,
                    Ok(Ok(_)) => Presence::Gone,
                    Ok(Err(e)) if reply_code(&e) == Some(404) => Presence::Gone,
                    _ => Presence::Unknown,
                };
                out.push((inc, presence));
            }
            if let Some(ch) = channel.filter(|c| c.status().connected()) {
                let _ = tokio::time::timeout(op, ch.close(200, "bye".into())).await;
            }
            out
        })
    }

    /// Leave (announced), let the links drain, and stay out for `ha_hold_off`.
    async fn step_down(&mut self, channel: &Channel) -> StepDown {
        let ctx = self.ctx;
        ctx.ha.set(
            HaState::SteppingDown,
            "stepping down: handing this instance's links to the other members",
        );
        self.table.state = MemberState::Leaving;
        self.announce(channel).await;
        self.changed();
        crate::ha::wait_links_stopped(ctx, "stepping down anyway").await;
        let hold_off = ctx.cfg.ha.hold_off;
        ctx.ha.set(
            HaState::Standby,
            &format!("stepped down: links handed over; rejoining after {hold_off:?}"),
        );
        StepDown::Done { hold_off }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("drawbridge.peers.bank-{i}"))
            .collect()
    }

    fn share(owners: &Owners, qs: &[String]) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for q in qs {
            *by.entry(owners.owner(q).unwrap().to_string()).or_default() += 1;
        }
        by
    }

    #[test]
    fn the_score_is_fixed_across_builds() {
        // Instances of different builds must agree: these values are part of the protocol.
        assert_eq!(
            score("bridge-1", "drawbridge.peers.b"),
            0x9ee4_04de_dcc4_472c
        );
        assert_ne!(
            score("bridge-1", "drawbridge.peers.b"),
            score("bridge-2", "drawbridge.peers.b")
        );
        // The separator: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    #[test]
    fn queues_are_spread_over_the_members() {
        let qs = queues(3000);
        let owners = Owners::of("a", vec!["a".into(), "b".into(), "c".into()]);
        let by = share(&owners, &qs);
        assert_eq!(by.len(), 3);
        for (m, n) in &by {
            assert!((850..=1150).contains(n), "{m}: {n} of 3000: {by:?}");
        }
    }

    #[test]
    fn a_join_moves_only_the_queues_the_newcomer_owns_and_a_crash_only_the_dead_ones() {
        let qs = queues(3000);
        let two = Owners::of("a", vec!["a".into(), "b".into()]);
        let three = Owners::of("a", vec!["a".into(), "b".into(), "c".into()]);
        let mut moved = 0;
        for q in &qs {
            let (before, after) = (two.owner(q).unwrap(), three.owner(q).unwrap());
            if before != after {
                assert_eq!(after, "c", "{q} moved between old members");
                moved += 1;
            }
        }
        assert!((850..=1150).contains(&moved), "{moved} of 3000 moved");
        // "b" dies: only its queues move.
        let without_b = Owners::of("a", vec!["a".into(), "c".into()]);
        for q in &qs {
            if three.owner(q) != Some("b") {
                assert_eq!(three.owner(q), without_b.owner(q), "{q}");
            }
        }
    }

    #[test]
    fn every_instance_computes_the_same_owner_from_the_same_members() {
        let qs = queues(200);
        let a = Owners::of("a", vec!["c".into(), "a".into(), "b".into()]);
        let b = Owners::of("b", vec!["a".into(), "b".into(), "c".into(), "b".into()]);
        for q in &qs {
            assert_eq!(a.owner(q), b.owner(q));
            assert!(!(a.mine(q) && b.mine(q)));
        }
        // No member alive: nobody owns anything.
        let none = Owners::of("a", vec![]);
        assert_eq!(none.owner("q"), None);
        assert!(!none.mine("q"));
        assert!(Owners::everything().mine("q"));
    }

    fn ann(id: &str, inc: &str, state: MemberState) -> Announcement {
        Announcement {
            v: VERSION,
            id: id.into(),
            incarnation: inc.into(),
            queue: format!("{MEMBER_QUEUE_PREFIX}g.{inc}"),
            state,
            links: 0,
        }
    }

    #[test]
    fn only_alive_members_own_queues_and_a_joining_one_owns_nothing_yet() {
        let now = Instant::now();
        let mut t = Table::new("a", "ia", Duration::from_secs(1));
        assert!(
            t.owners(now).alive.is_empty(),
            "joining: not even ourselves"
        );
        assert_eq!(
            t.heard(ann("b", "ib", MemberState::Joining), now),
            Heard::New
        );
        assert_eq!(
            t.heard(ann("a", "ia", MemberState::Alive), now),
            Heard::Ignored
        );
        t.state = MemberState::Alive;
        assert_eq!(t.owners(now).alive, ["a"]);
        assert_eq!(
            t.heard(ann("b", "ib", MemberState::Joining), now),
            Heard::Same
        );
        assert_eq!(
            t.heard(ann("b", "ib", MemberState::Alive), now),
            Heard::Changed
        );
        assert_eq!(t.owners(now).alive, ["a", "b"]);
        // Leaving: its queues are taken at once, though its queue still exists.
        assert_eq!(
            t.heard(ann("b", "ib", MemberState::Leaving), now),
            Heard::Changed
        );
        assert_eq!(t.owners(now).alive, ["a"]);
        // A restarted "b" is a new incarnation; the old one goes when its queue does.
        assert_eq!(
            t.heard(ann("b", "ib2", MemberState::Alive), now),
            Heard::New
        );
        assert_eq!(t.owners(now).alive, ["a", "b"]);
        assert!(t.gone("ib"));
        assert!(!t.gone("ib"));
        assert_eq!(t.owners(now).alive, ["a", "b"]);
        // A namesake of ours is reported.
        t.heard(ann("a", "ia2", MemberState::Alive), now);
        assert_eq!(t.namesakes().collect::<Vec<_>>(), ["ia2"]);
    }

    #[test]
    fn members_starting_together_each_start_their_own_share_only() {
        let qs = queues(300);
        let now = Instant::now();
        let mut t = Table::new("a", "ia", Duration::from_secs(1));
        t.heard(ann("b", "ib", MemberState::Joining), now);
        t.state = MemberState::Alive;
        let o = t.owners(now);
        let both = Owners::of("a", vec!["a".into(), "b".into()]);
        for q in &qs {
            // "a" owns everything until "b" is alive (it runs what it already runs) ...
            assert!(o.mine(q));
            // ... but starts only what stays its own once "b" is.
            assert_eq!(o.may_start(q), both.mine(q), "{q}");
        }
        assert!(qs.iter().any(|q| !o.may_start(q)));
        // A joining member that never says alive counts for three intervals only.
        let later = t.owners(now + Duration::from_secs(3));
        assert!(qs.iter().all(|q| later.may_start(q)));
        // A leaving one counts not at all; an alive one as alive.
        t.heard(ann("b", "ib", MemberState::Leaving), now);
        assert!(qs.iter().all(|q| t.owners(now).may_start(q)));
        t.heard(ann("b", "ib", MemberState::Alive), now);
        assert_eq!(t.owners(now), both);
    }

    #[test]
    fn the_table_is_bounded_and_announcements_are_checked() {
        let now = Instant::now();
        let mut t = Table::new("a", "ia", Duration::from_secs(1));
        for i in 0..200 {
            t.heard(
                ann(&format!("m{i}"), &format!("i{i}"), MemberState::Alive),
                now,
            );
        }
        assert_eq!(t.others.len(), MAX_MEMBERS - 1);
        assert!(t.refused_full > 0);
        let good = serde_json::to_vec(&ann("b", "ib", MemberState::Alive)).unwrap();
        assert!(Announcement::decode(&good).is_some());
        let mut bad = ann("b", "ib", MemberState::Alive);
        bad.queue = "drawbridge.peers.b".into();
        assert!(Announcement::decode(&serde_json::to_vec(&bad).unwrap()).is_none());
        let mut odd = ann("b", "ib", MemberState::Alive);
        odd.incarnation = "i\u{1b}[2J".into();
        assert!(Announcement::decode(&serde_json::to_vec(&odd).unwrap()).is_none());
        let mut long = ann("b", "ib", MemberState::Alive);
        long.id = "x".repeat(MAX_ID + 1);
        assert!(Announcement::decode(&serde_json::to_vec(&long).unwrap()).is_none());
        assert!(Announcement::decode(&vec![b' '; MAX_ANNOUNCEMENT + 1]).is_none());
        assert!(Announcement::decode(b"{\"v\":1}").is_none());
        assert!(Announcement::decode(&[0xff; 16]).is_none());
    }

    #[test]
    fn names_fit_in_255_bytes() {
        let inc = format!("{:032x}", rand::random::<u128>());
        let q = queue_name(&"g".repeat(300), &inc);
        assert!(q.len() <= 255 && q.ends_with(&inc) && q.starts_with(MEMBER_QUEUE_PREFIX));
        assert_eq!(exchange_name(&"g".repeat(300)).len(), 255);
        assert_eq!(
            queue_name("bank-a", "i1"),
            "drawbridge.bridge.member.bank-a.i1"
        );
    }
}
