//! Hot-hot bridges (issue 25): several bridge instances of one organisation, each with its own
//! `bridge.id`, share the peer queues out among themselves (rendezvous hashing over the live
//! members); every instance forwards its own share. Real daemons, real RabbitMQ, real TLS.
//!
//! Each test runs 30 links (30 peer queues of A, all to B's float) and publishes into all of
//! them steadily while an instance dies, joins or is cut off from its broker; every message
//! published must reach B's inbox (duplicates are counted and printed: a crash may redeliver
//! what was in flight).
//!
//! Message `r * 30 + i` of a run goes to queue `i` (round `r`), so the whole stream is one run
//! of the verifiable stream, counted in B's inbox once at the end.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use drawbridge_certs::devpki;
use drawbridge_testkit::{
    daemon::{free_port, Daemon, Kind},
    proxy::{FaultProxy, ProxyMode},
    rabbit::shared_node,
    stream::{self, PublishSpec, Tally},
    world::{self, Org, SnapshotResponder, INBOX},
    BANK_A, BANK_B,
};
use tokio::time::Instant;

/// Links (peer queues) in every test.
const LINKS: usize = 30;

/// Pause between two rounds of publishing (one message to each queue per round).
const ROUND_PAUSE: Duration = Duration::from_millis(150);

/// A's broker (no float: its bridges forward), B's float, 30 peer queues of A to B and a node
/// answering A's snapshot requests with their links.
struct World {
    a: Org,
    b: Org,
    /// A's vhost.
    va: String,
    queues: Vec<String>,
    _responder: SnapshotResponder,
    dir: tempfile::TempDir,
}

async fn world() -> Result<World> {
    drawbridge_certs::install_crypto_provider();
    let node = shared_node().await;
    let dir = tempfile::tempdir()?;
    let names = [BANK_A.parse()?, BANK_B.parse()?];
    let net = devpki::generate_network(&dir.path().join("pki"), &names)?;
    let va = node.fresh_vhost().await?;
    let vb = node.fresh_vhost().await?;
    let a = Org::new(net.nodes[0].clone(), vec![node.amqp_uri(&va)], dir.path());
    let mut b = Org::new(net.nodes[1].clone(), vec![node.amqp_uri(&vb)], dir.path());
    b.start_float("").await?;
    // B's inbox exists before anything is forwarded (the float releases what it cannot route).
    let (_cb, chb) = b.channel().await?;
    world::declare_queue(&chb, INBOX).await?;
    let links = a.links_to(&b, LINKS);
    let queues: Vec<String> = links.iter().map(|l| l.queue.clone()).collect();
    let (_c, ch) = a.channel().await?;
    for q in &queues {
        world::declare_peer_queue(&ch, q, "classic").await?;
    }
    let responder = a.answer_snapshot_requests(links).await?;
    Ok(World {
        a,
        b,
        va,
        queues,
        _responder: responder,
        dir,
    })
}

/// One hot-hot bridge instance of A.
struct Instance {
    id: String,
    d: Daemon,
}

/// Start a hot-hot bridge of A with `bridge.id = id` and the broker table `broker` (`None`:
/// A's URIs), and wait until it is ready.
async fn start_instance(w: &World, id: &str, broker: Option<String>) -> Result<Instance> {
    start_instance_with(w, id, broker, "").await
}

/// [`start_instance`] with `extra` `[bridge]` lines (every instance has the admin token
/// `step-down-token-0123456789`).
async fn start_instance_with(
    w: &World,
    id: &str,
    broker: Option<String>,
    extra: &str,
) -> Result<Instance> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut a = Org::new(w.a.files.clone(), w.a.broker_uris.clone(), w.dir.path());
    a.daemon_broker = broker;
    let default_id = format!("id = \"bridge-{}\"", w.a.files.legal_name.slug());
    // One file per instance: instances started together would otherwise truncate and
    // rewrite one shared file while another daemon reads it (CI saw "is empty").
    let token = w.dir.path().join(format!("admin-{id}.token"));
    drawbridge_testkit::rabbit::write_private(&token, "step-down-token-0123456789\n")?;
    let base = a
        .bridge_config_at(admin, &format!("ha = \"hot-hot\"\n{extra}"))
        .replace(
            "[admin]\n",
            &format!("[admin]\ntoken_file = {:?}\n", token.display().to_string()),
        );
    ensure!(base.contains(&default_id), "no {default_id} in {base}");
    let cfg = base.replacen(&default_id, &format!("id = {id:?}"), 1);
    let d = Daemon::start(Kind::Bridge, &w.a.dir, id, &cfg, admin).await?;
    d.wait_ready(Duration::from_secs(30)).await?;
    Ok(Instance { id: id.into(), d })
}

/// A link as one instance's `/status` shows it.
#[derive(Debug, Clone, PartialEq)]
struct LinkSeen {
    state: String,
    since_unix_ms: u64,
    connects: u64,
}

/// What one instance's `/status` says about the group and its own links.
#[derive(Debug, Clone)]
struct View {
    ha_state: String,
    mode: String,
    /// `ha.members`: (id, state, self).
    members: Vec<(String, String, bool)>,
    /// `ha.owners`.
    owners: BTreeMap<String, String>,
    /// `links`, by queue.
    links: BTreeMap<String, LinkSeen>,
    wanted: BTreeSet<String>,
}

impl View {
    fn of(s: &serde_json::Value) -> View {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
        let members = s["ha"]["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            text(&m["id"]),
                            text(&m["state"]),
                            m["self"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let owners = s["ha"]["owners"]
            .as_object()
            .map(|o| o.iter().map(|(q, id)| (q.clone(), text(id))).collect())
            .unwrap_or_default();
        let links = s["links"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .map(|l| {
                        (
                            text(&l["queue"]),
                            LinkSeen {
                                state: text(&l["state"]),
                                since_unix_ms: l["since_unix_ms"].as_u64().unwrap_or(0),
                                connects: l["connects"].as_u64().unwrap_or(0),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let wanted = s["wanted_links"]
            .as_array()
            .map(|ws| ws.iter().map(text).collect())
            .unwrap_or_default();
        View {
            ha_state: text(&s["ha_state"]),
            mode: text(&s["ha"]["mode"]),
            members,
            owners,
            links,
            wanted,
        }
    }

    /// Queues whose link is up here.
    fn up(&self) -> BTreeSet<String> {
        self.links
            .iter()
            .filter(|(_, l)| l.state == "up")
            .map(|(q, _)| q.clone())
            .collect()
    }

    /// One line for a failure message.
    fn summary(&self) -> String {
        let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
        for l in self.links.values() {
            *by_state.entry(l.state.as_str()).or_default() += 1;
        }
        let owned: BTreeMap<&str, usize> =
            self.owners.values().fold(BTreeMap::new(), |mut m, id| {
                *m.entry(id.as_str()).or_default() += 1;
                m
            });
        format!(
            "ha_state {} mode {} members {:?} owners per id {owned:?} links {by_state:?} wanted {}",
            self.ha_state,
            self.mode,
            self.members,
            self.wanted.len()
        )
    }
}

async fn views(instances: &[&Instance]) -> Result<Vec<View>> {
    let mut out = Vec::new();
    for i in instances {
        let s =
            i.d.status()
                .await
                .with_context(|| format!("{}: /status", i.id))?;
        out.push(View::of(&s));
    }
    Ok(out)
}

/// Who runs what once the group agrees.
#[derive(Debug, Clone)]
struct Layout {
    /// Queue → index (in the instances given) of the instance that owns and runs it.
    owner: BTreeMap<String, usize>,
    /// Queue → its link on its owner.
    link: BTreeMap<String, LinkSeen>,
}

impl Layout {
    fn owned_by(&self, k: usize) -> BTreeSet<String> {
        self.owner
            .iter()
            .filter(|(_, o)| **o == k)
            .map(|(q, _)| q.clone())
            .collect()
    }
}

/// The layout if `views` (of `instances`, in order) show a settled group: every instance
/// active, a member list of exactly these instances (all alive, itself marked), every wanted
/// queue, the same owner for each queue everywhere, and each instance running exactly the
/// queues it owns, all up. `Err`: why not (yet).
fn settled_layout(
    instances: &[&Instance],
    views: &[View],
    queues: &[String],
) -> Result<Layout, String> {
    let ids: BTreeSet<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    let wanted: BTreeSet<String> = queues.iter().cloned().collect();
    let first = &views[0].owners;
    for (k, (i, v)) in instances.iter().zip(views).enumerate() {
        if v.ha_state != "active" {
            return Err(format!("{} is {}", i.id, v.ha_state));
        }
        if v.mode != "hot-hot" {
            return Err(format!("{} runs ha mode {}", i.id, v.mode));
        }
        let members: BTreeSet<&str> = v.members.iter().map(|m| m.0.as_str()).collect();
        if members != ids || v.members.iter().any(|m| m.1 != "alive") {
            return Err(format!("{} sees members {:?}", i.id, v.members));
        }
        let selves: Vec<&str> = v
            .members
            .iter()
            .filter(|m| m.2)
            .map(|m| m.0.as_str())
            .collect();
        if selves != [i.id.as_str()] {
            return Err(format!("{} marks {selves:?} as itself", i.id));
        }
        if v.wanted != wanted {
            return Err(format!("{} wants {} queues", i.id, v.wanted.len()));
        }
        let owned: BTreeSet<&String> = v.owners.keys().collect();
        if owned != wanted.iter().collect() {
            return Err(format!("{} has owners for {} queues", i.id, owned.len()));
        }
        if &v.owners != first {
            return Err(format!(
                "{} and {} disagree on the owners",
                instances[0].id, i.id
            ));
        }
        let mine: BTreeSet<String> = v
            .owners
            .iter()
            .filter(|(_, o)| **o == i.id)
            .map(|(q, _)| q.clone())
            .collect();
        let listed: BTreeSet<String> = v.links.keys().cloned().collect();
        if listed != mine || v.up() != mine {
            return Err(format!(
                "{} (#{k}) owns {} queues, lists {} links, {} up",
                i.id,
                mine.len(),
                listed.len(),
                v.up().len()
            ));
        }
    }
    let mut layout = Layout {
        owner: BTreeMap::new(),
        link: BTreeMap::new(),
    };
    for q in queues {
        let id = &first[q];
        let k = instances
            .iter()
            .position(|i| &i.id == id)
            .ok_or_else(|| format!("{q} owned by {id}, not one of the instances"))?;
        layout.owner.insert(q.clone(), k);
        layout.link.insert(q.clone(), views[k].links[q].clone());
    }
    Ok(layout)
}

/// Wait until `instances` form a settled group (see [`settled_layout`]); its layout.
async fn settled(instances: &[&Instance], queues: &[String], within: Duration) -> Result<Layout> {
    let deadline = Instant::now() + within;
    loop {
        let vs = views(instances).await?;
        match settled_layout(instances, &vs, queues) {
            Ok(layout) => return Ok(layout),
            Err(why) if Instant::now() > deadline => {
                let detail: Vec<String> = instances
                    .iter()
                    .zip(&vs)
                    .map(|(i, v)| format!("{}: {}\n{}", i.id, v.summary(), i.d.log_tail(25)))
                    .collect();
                bail!(
                    "not settled within {within:?}: {why}\n{}",
                    detail.join("\n----\n")
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Wait until every queue of `w` has forwarded at least one message (on whichever of
/// `instances`), then until the group is settled; its layout. With the stream already
/// flowing, so the layout taken is of links past their first transfer: the float opens its
/// publishing channels on first use, and 30 links sending their first transfers together
/// can see some released ("broker unavailable") and reconnect once — not what these tests
/// are about.
async fn flowing(w: &World, instances: &[&Instance], within: Duration) -> Result<Layout> {
    let deadline = Instant::now() + within;
    loop {
        let mut total: BTreeMap<String, u64> = BTreeMap::new();
        for i in instances {
            for (q, n) in forwarded(i).await? {
                *total.entry(q).or_default() += n;
            }
        }
        let idle: Vec<&String> = w
            .queues
            .iter()
            .filter(|q| total.get(*q).copied().unwrap_or(0) == 0)
            .collect();
        if idle.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let vs = views(instances).await?;
            let detail: Vec<String> = instances
                .iter()
                .zip(&vs)
                .map(|(i, v)| format!("{}: {}\n{}", i.id, v.summary(), i.d.log_tail(25)))
                .collect();
            bail!(
                "queues that forwarded nothing within {within:?}: {idle:?}\n{}",
                detail.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settled(
        instances,
        &w.queues,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await
}

/// Once settled, the group stays so for `polls` polls 100 ms apart, each queue up on one
/// instance only and on the same one throughout; and the broker lists exactly one consumer
/// on every peer queue.
async fn stays_settled(
    w: &World,
    instances: &[&Instance],
    layout: &Layout,
    polls: usize,
) -> Result<()> {
    for _ in 0..polls {
        let vs = views(instances).await?;
        for q in &w.queues {
            let on: Vec<&str> = instances
                .iter()
                .zip(&vs)
                .filter(|(_, v)| v.links.contains_key(q))
                .map(|(i, _)| i.id.as_str())
                .collect();
            ensure!(
                on == [instances[layout.owner[q]].id.as_str()],
                "{q} runs on {on:?}, owner {}",
                instances[layout.owner[q]].id
            );
        }
        let now = settled_layout(instances, &vs, &w.queues).map_err(anyhow::Error::msg)?;
        ensure!(
            now.owner == layout.owner,
            "the owners changed while settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let consumers = shared_node().await.consumers(&w.va).await?;
    for q in &w.queues {
        ensure!(
            consumers.get(q) == Some(&1),
            "{q}: {:?} consumers on the broker, want 1",
            consumers.get(q)
        );
    }
    Ok(())
}

/// `drawbridge_bridge_forwarded_total` of an instance, by queue (a counter: it keeps what a
/// link forwarded after the link moved away).
async fn forwarded(i: &Instance) -> Result<BTreeMap<String, u64>> {
    let m =
        i.d.metrics()
            .await
            .with_context(|| format!("{}: /metrics", i.id))?;
    Ok(m.lines()
        .filter_map(|l| l.strip_prefix("drawbridge_bridge_forwarded_total{queue=\""))
        .filter_map(|rest| rest.split_once("\"} "))
        .filter_map(|(q, v)| Some((q.to_string(), v.trim().parse::<f64>().ok()? as u64)))
        .collect())
}

/// The value of the series `series` (name and labels, as exported) in an instance's
/// `/metrics`; 0 if not exported (yet).
async fn metric(i: &Instance, series: &str) -> Result<u64> {
    let m =
        i.d.metrics()
            .await
            .with_context(|| format!("{}: /metrics", i.id))?;
    let prefix = format!("{series} ");
    Ok(m.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}

/// Every instance of a settled group counts `instances.len()` members and owns what
/// `layout` gives it (`drawbridge_bridge_members`, `drawbridge_bridge_links_owned`).
async fn gauges_agree(instances: &[&Instance], layout: &Layout) -> Result<()> {
    for (k, i) in instances.iter().enumerate() {
        let members = metric(i, "drawbridge_bridge_members").await?;
        let owned = metric(i, "drawbridge_bridge_links_owned").await?;
        ensure!(
            members == instances.len() as u64 && owned == layout.owned_by(k).len() as u64,
            "{}: drawbridge_bridge_members {members}, drawbridge_bridge_links_owned {owned}; want {} and {}",
            i.id,
            instances.len(),
            layout.owned_by(k).len()
        );
    }
    Ok(())
}

const HANDOVERS_IN: &str = "drawbridge_bridge_link_handovers_total{direction=\"in\"}";
const HANDOVERS_OUT: &str = "drawbridge_bridge_link_handovers_total{direction=\"out\"}";

/// `drawbridge status --admin` of `i` (what an operator reads): each member with its state,
/// this instance marked, and every queue on a line of its own naming where it runs (its own
/// links in the links table, the others' in the "RUNS ON" table). `None` if the CLI is not
/// built.
async fn cli_shows(instances: &[&Instance], k: usize, layout: &Layout) -> Result<String> {
    // Built by `cargo build --workspace --bins` (scripts/test.sh); missing is a failure.
    let cli = drawbridge_testkit::daemon::bin_dir().join("drawbridge");
    let out = tokio::process::Command::new(&cli)
        .args(["status", "--admin", &instances[k].d.admin().to_string()])
        .output()
        .await?;
    ensure!(out.status.success(), "drawbridge status: {out:?}");
    let table = String::from_utf8(out.stdout)?;
    for (j, m) in instances.iter().enumerate() {
        let me = if j == k { ", this instance" } else { "" };
        let line = format!(
            "  member    {}: alive, {} links{me}\n",
            m.id,
            layout.owned_by(j).len()
        );
        ensure!(table.contains(&line), "no {line:?} in\n{table}");
    }
    let lines: Vec<&str> = table.lines().collect();
    let runs_on = lines
        .iter()
        .position(|l| l.contains("RUNS ON"))
        .with_context(|| format!("no RUNS ON table in\n{table}"))?;
    for (q, owner) in &layout.owner {
        let row = |l: &&&str| {
            l.strip_prefix(q.as_str())
                .is_some_and(|r| r.starts_with(' '))
        };
        if *owner == k {
            ensure!(
                lines[..runs_on].iter().any(|l| row(&l) && l.contains("up")),
                "{q} not in the links table as up:\n{table}"
            );
        } else {
            ensure!(
                lines[runs_on..]
                    .iter()
                    .any(|l| row(&l) && l.trim_end().ends_with(instances[*owner].id.as_str())),
                "{q} not shown running on {}:\n{table}",
                instances[*owner].id
            );
        }
    }
    Ok(table)
}

fn spec(run: &str, seq: u64) -> PublishSpec {
    PublishSpec {
        run: run.into(),
        from: seq,
        to: seq + 1,
        size: 256,
        destination: BANK_B.into(),
        headers: vec![],
    }
}

/// Publish round after round until `stop` is set, a round being one message to each queue
/// (message `r * queues.len() + i` of `run` to queue `i`), [`ROUND_PAUSE`] apart; returns how
/// many were published (every one confirmed by the broker).
fn publish_rounds(
    w: &World,
    run: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64>> {
    let uris = w.a.broker_uris.clone();
    let queues = w.queues.clone();
    let run = run.to_string();
    tokio::spawn(async move {
        let conn = drawbridge_testkit::node::connect_any(&uris).await?;
        let ch = conn.create_channel().await?;
        let n = queues.len() as u64;
        let mut round = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let sends = queues.iter().enumerate().map(|(i, q)| {
                let spec = spec(&run, round * n + i as u64);
                let ch = &ch;
                async move { stream::publish(ch, q, &spec, |_| {}).await }
            });
            futures::future::try_join_all(sends).await?;
            round += 1;
            tokio::time::sleep(ROUND_PAUSE).await;
        }
        Ok(round * n)
    })
}

/// Count what reached B's inbox of `run` (`n` messages, each from A).
async fn receive(w: &World, run: &str, n: u64) -> Result<stream::Report> {
    let (_c, ch) = w.b.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    let mut tally = Tally::new(run, n, Some(BANK_A.to_string()));
    stream::consume(&ch, INBOX, &mut tally, Duration::from_secs(60), |_| {}).await?;
    Ok(tally.report())
}

/// Stop the publisher, count B's inbox and require every message published (duplicates are
/// allowed and printed).
async fn nothing_lost(
    w: &World,
    run: &str,
    stop: &AtomicBool,
    tx: tokio::task::JoinHandle<Result<u64>>,
    logs: &[&Instance],
) -> Result<stream::Report> {
    stop.store(true, Ordering::SeqCst);
    let n = tx.await??;
    let r = receive(w, run, n).await?;
    let float = w.b.float.as_ref().context("float")?.status().await?;
    println!(
        "{run}: {n} published, {} received, {} lost, {} duplicates ({} suppressed by the float), {} corrupted",
        r.received, r.lost, r.duplicates, float["duplicates_suppressed"], r.corrupted
    );
    let tails: Vec<String> = logs
        .iter()
        .map(|i| format!("{}:\n{}", i.id, i.d.log_tail(30)))
        .collect();
    ensure!(
        r.complete() && r.lost == 0 && r.unexpected == 0 && r.corrupted == 0,
        "{run}: {r:?}\n{}",
        tails.join("\n----\n")
    );
    // B's broker was never in trouble: the float released nothing for want of a publishing
    // channel, also not while many links sent their first transfers together (a channel
    // another link was opening once counted as unavailable).
    let metrics = w.b.float.as_ref().context("float")?.metrics().await?;
    let unavailable: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("drawbridge_float_released_total{")
                && l.contains("reason=\"broker_unavailable\"")
        })
        .collect();
    ensure!(
        unavailable.is_empty(),
        "{run}: the float released transfers as broker_unavailable: {unavailable:?}"
    );
    Ok(r)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// The queues of `stayed` whose link (state, since, connects) on its owner (of
/// `instances`, as `after` places them) is not what it was, each with what its owner's log
/// says about it.
fn restarted(
    instances: &[&Instance],
    before: &Layout,
    after: &Layout,
    stayed: &BTreeSet<String>,
) -> Vec<String> {
    stayed
        .iter()
        .filter(|q| before.link[*q] != after.link[*q])
        .map(|q| {
            let owner = instances[after.owner[q]];
            let log = std::fs::read_to_string(owner.d.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(q.as_str())).collect();
            format!(
                "{q} on {}: {:?} → {:?}; its log:\n{}",
                owner.id,
                before.link[q],
                after.link[q],
                lines[lines.len().saturating_sub(8)..].join("\n")
            )
        })
        .collect()
}

/// 3 instances share 30 links; kill -9 one mid-stream → its links run on the other two
/// within seconds, the others' links stay where they were (not restarted), each survivor
/// runs exactly the links it owns, no queue runs on two instances, and every message
/// published arrives at B.
#[tokio::test]
async fn kill_9_of_one_of_three_moves_its_links_to_the_others_and_nothing_is_lost() -> Result<()> {
    let w = world().await?;
    let i1 = start_instance(&w, "hh-1", None).await?;
    let i2 = start_instance(&w, "hh-2", None).await?;
    let mut i3 = start_instance(&w, "hh-3", None).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let tx = publish_rounds(&w, "kill9", stop.clone());
    let before = flowing(&w, &[&i1, &i2, &i3], Duration::from_secs(60)).await?;
    let doomed = before.owned_by(2);
    println!(
        "KILL9 layout: hh-1 {}, hh-2 {}, hh-3 {} links",
        before.owned_by(0).len(),
        before.owned_by(1).len(),
        doomed.len()
    );
    ensure!(!doomed.is_empty(), "hh-3 owns no link to lose");

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let baseline = [forwarded(&i1).await?, forwarded(&i2).await?];
    let in_before = metric(&i1, HANDOVERS_IN).await? + metric(&i2, HANDOVERS_IN).await?;
    i3.d.kill9().await?;
    let killed = Instant::now();

    // The killed instance's links: when all are up on a survivor, and when each has
    // forwarded something there.
    let survivors = [&i1, &i2];
    let deadline = killed + Duration::from_secs(30);
    let (mut all_up, mut all_forwarding) = (None, None);
    while all_up.is_none() || all_forwarding.is_none() {
        let vs = views(&survivors).await?;
        let polled = killed.elapsed();
        if all_up.is_none() && doomed.iter().all(|q| vs.iter().any(|v| v.up().contains(q))) {
            all_up = Some(polled);
        }
        let fs = [forwarded(&i1).await?, forwarded(&i2).await?];
        let moved_on = |q: &String| {
            (0..2).any(|k| fs[k].get(q).unwrap_or(&0) > baseline[k].get(q).unwrap_or(&0))
        };
        if all_forwarding.is_none() && doomed.iter().all(moved_on) {
            all_forwarding = Some(killed.elapsed());
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = doomed.iter().filter(|q| !moved_on(q)).collect();
            bail!(
                "30 s after kill -9: all up {all_up:?}, forwarding {all_forwarding:?}; not forwarding yet: {missing:?}\nhh-1: {}\nhh-2: {}\n{}\n----\n{}",
                vs[0].summary(),
                vs[1].summary(),
                i1.d.log_tail(30),
                i2.d.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = settled(&survivors, &w.queues, Duration::from_secs(30)).await?;
    let settled_in = killed.elapsed();
    println!(
        "KILL9 kill -9 of hh-3 ({} links) → all its links up on the others after {:?}, all forwarding after {:?}, group settled after {settled_in:?}",
        doomed.len(),
        all_up.unwrap_or_default(),
        all_forwarding.unwrap_or_default()
    );
    // Only the dead instance's queues moved, and the others' links were left alone.
    let stayed: BTreeSet<String> = w
        .queues
        .iter()
        .filter(|q| !doomed.contains(*q))
        .cloned()
        .collect();
    for q in &stayed {
        ensure!(
            after.owner[q] == before.owner[q],
            "{q} moved from {} to {} though its owner lives",
            survivors[before.owner[q]].id,
            survivors[after.owner[q]].id
        );
    }
    let restarts = restarted(&survivors, &before, &after, &stayed);
    ensure!(
        restarts.is_empty(),
        "links of the survivors restarted:\n{}",
        restarts.join("\n")
    );
    let took: Vec<usize> = (0..2)
        .map(|k| doomed.iter().filter(|q| after.owner[*q] == k).count())
        .collect();
    println!(
        "KILL9 hh-3's links went to hh-1: {}, hh-2: {}",
        took[0], took[1]
    );
    stays_settled(&w, &survivors, &after, 20).await?;
    gauges_agree(&survivors, &after).await?;
    let into = metric(&i1, HANDOVERS_IN).await? + metric(&i2, HANDOVERS_IN).await? - in_before;
    ensure!(
        into == doomed.len() as u64,
        "{into} handovers in counted by the survivors; {} links moved",
        doomed.len()
    );

    tokio::time::sleep(Duration::from_millis(1000)).await;
    nothing_lost(&w, "kill9", &stop, tx, &survivors).await?;
    Ok(())
}

/// 2 instances share 30 links; a third joins mid-stream → about a third of the links move
/// to it (all to it, none between the two), the links that stay are not restarted, and
/// every message published arrives at B.
#[tokio::test]
async fn a_joining_instance_takes_about_a_third_and_the_others_links_do_not_restart() -> Result<()>
{
    let w = world().await?;
    let i1 = start_instance(&w, "hh-1", None).await?;
    let i2 = start_instance(&w, "hh-2", None).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let tx = publish_rounds(&w, "join", stop.clone());
    let before = flowing(&w, &[&i1, &i2], Duration::from_secs(60)).await?;
    println!(
        "JOIN layout before: hh-1 {}, hh-2 {} links",
        before.owned_by(0).len(),
        before.owned_by(1).len()
    );

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    let out_before = metric(&i1, HANDOVERS_OUT).await? + metric(&i2, HANDOVERS_OUT).await?;
    let i3 = start_instance(&w, "hh-3", None).await?;
    let ready_in = started.elapsed();
    let all = [&i1, &i2, &i3];
    let after = settled(&all, &w.queues, Duration::from_secs(60)).await?;
    let settled_in = started.elapsed();
    let moved: BTreeSet<String> = w
        .queues
        .iter()
        .filter(|q| after.owner[*q] != before.owner[*q])
        .cloned()
        .collect();
    println!(
        "JOIN hh-3 started → ready after {ready_in:?}, group settled after {settled_in:?}; {} of {LINKS} links moved to it (hh-1 keeps {}, hh-2 keeps {})",
        moved.len(),
        after.owned_by(0).len(),
        after.owned_by(1).len()
    );
    for q in &moved {
        ensure!(
            after.owner[q] == 2,
            "{q} moved from {} to {}, not to the new instance",
            all[before.owner[q]].id,
            all[after.owner[q]].id
        );
    }
    ensure!(
        (4..=18).contains(&moved.len()),
        "{} of {LINKS} links moved to the new instance, not about a third",
        moved.len()
    );
    let stayed: BTreeSet<String> = w
        .queues
        .iter()
        .filter(|q| !moved.contains(*q))
        .cloned()
        .collect();
    let restarts = restarted(&all, &before, &after, &stayed);
    ensure!(
        restarts.is_empty(),
        "links that kept their owner restarted:\n{}",
        restarts.join("\n")
    );
    stays_settled(&w, &all, &after, 20).await?;
    gauges_agree(&all, &after).await?;
    let table = cli_shows(&all, 2, &after).await?;
    println!("JOIN drawbridge status of hh-3:\n{table}");
    // The handovers are counted on both sides: out of the two old members, into the new one.
    let out = metric(&i1, HANDOVERS_OUT).await? + metric(&i2, HANDOVERS_OUT).await? - out_before;
    let into = metric(&i3, HANDOVERS_IN).await?;
    println!("JOIN handovers counted: {out} out of hh-1 and hh-2, {into} into hh-3");
    ensure!(
        out == moved.len() as u64 && into == moved.len() as u64,
        "{out} handovers out counted by hh-1 and hh-2, {into} into hh-3; {} links moved",
        moved.len()
    );

    tokio::time::sleep(Duration::from_millis(1000)).await;
    nothing_lost(&w, "join", &stop, tx, &all).await?;
    Ok(())
}

/// 3 instances share 30 links; one of them (connected to the broker through a proxy) is
/// black-holed mid-stream → its links move to the other two, and for each of its queues it
/// stops forwarding before another instance forwards anything of that queue; nothing is
/// lost; once the path heals it rejoins and takes its links back.
///
/// Observed from outside on one clock: the instances' `/status` and `/metrics` are polled in
/// turn (the partitioned one first, it still serves its admin port); its stop on a queue is
/// the first poll that no longer shows the link up (late by up to a poll, which only makes
/// the test stricter), another's start the first poll whose forwarded count of the queue
/// passed what it was at the cut.
#[tokio::test]
async fn a_black_holed_instance_stops_each_link_before_another_forwards_it() -> Result<()> {
    let w = world().await?;
    let node = shared_node().await;
    let proxy = FaultProxy::start(node.amqp_addr()).await?;
    let direct = node.amqp_uri(&w.va);
    let via_proxy = direct.replace(
        &format!(":{}/", node.amqp_port()),
        &format!(":{}/", proxy.addr().port()),
    );
    ensure!(via_proxy != direct, "{via_proxy}");
    let cut_off = start_instance(
        &w,
        "hh-p",
        Some(format!(
            "uris = [{via_proxy:?}]\nconnect_timeout = \"3s\"\nop_timeout = \"5s\""
        )),
    )
    .await?;
    let o1 = start_instance(&w, "hh-q", None).await?;
    let o2 = start_instance(&w, "hh-r", None).await?;
    let all = [&cut_off, &o1, &o2];
    let stop = Arc::new(AtomicBool::new(false));
    let tx = publish_rounds(&w, "blackhole", stop.clone());
    let before = flowing(&w, &all, Duration::from_secs(60)).await?;
    let its = before.owned_by(0);
    println!(
        "BLACKHOLE layout: hh-p {}, hh-q {}, hh-r {} links",
        its.len(),
        before.owned_by(1).len(),
        before.owned_by(2).len()
    );
    ensure!(!its.is_empty(), "hh-p owns no link to lose");

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let others = [&o1, &o2];
    let baseline = [forwarded(&o1).await?, forwarded(&o2).await?];
    let cut = unix_ms();
    proxy.set_mode(ProxyMode::BlackHole);

    // Per queue of hh-p: when hh-p was first seen not running it (and its forwarded count
    // then), and when another was first seen forwarding it (and which).
    let mut stopped: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut started: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    let mut overlaps = Vec::new();
    let mut first_state_change = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stopped.len() < its.len() || started.len() < its.len() {
        let sp = View::of(&cut_off.d.status().await.context("hh-p: /status")?);
        let p_polled = unix_ms();
        if sp.ha_state != "active" && first_state_change.is_none() {
            first_state_change = Some((p_polled, sp.ha_state.clone()));
        }
        let up = sp.up();
        let newly: Vec<&String> = its
            .iter()
            .filter(|q| !up.contains(*q) && !stopped.contains_key(*q))
            .collect();
        if !newly.is_empty() {
            let fp = forwarded(&cut_off).await?;
            for q in newly {
                stopped.insert(q.clone(), (p_polled, fp.get(q).copied().unwrap_or(0)));
            }
        }
        for (k, o) in others.iter().enumerate() {
            let fs = forwarded(o).await?;
            let polled = unix_ms();
            for q in &its {
                let now = fs.get(q).copied().unwrap_or(0);
                if now > baseline[k].get(q).copied().unwrap_or(0) && !started.contains_key(q) {
                    started.insert(q.clone(), (polled, k));
                    if up.contains(q) {
                        overlaps.push(format!(
                            "{q}: up on hh-p at {} ms while {} had forwarded it by {} ms",
                            p_polled as i64 - cut as i64,
                            o.id,
                            polled as i64 - cut as i64
                        ));
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "60 s after the black hole: {} of {} of hh-p's queues seen stopped there, {} forwarded elsewhere\nhh-p: {}\n{}\n----\n{}\n----\n{}",
                stopped.len(),
                its.len(),
                started.len(),
                sp.summary(),
                cut_off.d.log_tail(30),
                o1.d.log_tail(30),
                o2.d.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ms = |t: u64| t as i64 - cut as i64;
    let last_stop = stopped.values().map(|(t, _)| *t).max().unwrap_or(cut);
    let first_start = started.values().map(|(t, _)| *t).min().unwrap_or(cut);
    let tightest = its
        .iter()
        .map(|q| started[q].0 as i64 - stopped[q].0 as i64)
        .min()
        .unwrap_or(0);
    println!(
        "BLACKHOLE at 0 ms: hh-p left active at {:?}, its {} links seen stopped by {} ms; the first forwarded elsewhere at {} ms, the last at {} ms; tightest per-queue gap {tightest} ms",
        first_state_change.as_ref().map(|(t, s)| (ms(*t), s.clone())),
        its.len(),
        ms(last_stop),
        ms(first_start),
        ms(started.values().map(|(t, _)| *t).max().unwrap_or(cut)),
    );
    let logs = || {
        format!(
            "{}\n----\n{}\n----\n{}",
            cut_off.d.log_tail(40),
            o1.d.log_tail(30),
            o2.d.log_tail(30)
        )
    };
    ensure!(overlaps.is_empty(), "two at once: {overlaps:?}\n{}", logs());
    for q in &its {
        let (stop_at, _) = stopped[q];
        let (start_at, k) = started[q];
        ensure!(
            stop_at < start_at,
            "{q}: hh-p still ran it at {} ms when {} had forwarded it by {} ms\n{}",
            ms(stop_at),
            others[k].id,
            ms(start_at),
            logs()
        );
    }
    // The guarantee, however fast the others are: RabbitMQ drops hh-p's connection (and its
    // consumers, so single-active-consumer hands the queue on) no sooner than two heartbeats
    // (5 s, the default) after it last heard from it, which was before the cut.
    ensure!(
        ms(last_stop) < 2 * 5_000,
        "hh-p stopped its last link {} ms after the cut: not before the broker could hand its queues on\n{}",
        ms(last_stop),
        logs()
    );
    // The other two settle with hh-p's queues shared out between them.
    let survivors = settled(&others, &w.queues, Duration::from_secs(30)).await?;
    println!(
        "BLACKHOLE hh-p's links went to hh-q: {}, hh-r: {}",
        its.iter().filter(|q| survivors.owner[*q] == 0).count(),
        its.iter().filter(|q| survivors.owner[*q] == 1).count()
    );
    // hh-p forwarded nothing after it stopped.
    let fp = forwarded(&cut_off).await?;
    for q in &its {
        ensure!(
            fp.get(q).copied().unwrap_or(0) == stopped[q].1,
            "{q}: hh-p forwarded {} by the end, {} when it stopped",
            fp.get(q).copied().unwrap_or(0),
            stopped[q].1
        );
    }

    // The path heals: hh-p rejoins and takes its own queues back.
    proxy.set_mode(ProxyMode::Pass);
    let healed = Instant::now();
    let again = settled(&all, &w.queues, Duration::from_secs(60)).await?;
    println!(
        "BLACKHOLE healed → group of 3 settled again after {:?}",
        healed.elapsed()
    );
    ensure!(
        again.owned_by(0) == its,
        "hh-p came back with other queues: {:?} (had {its:?})",
        again.owned_by(0)
    );
    stays_settled(&w, &all, &again, 10).await?;

    tokio::time::sleep(Duration::from_millis(1000)).await;
    nothing_lost(&w, "blackhole", &stop, tx, &all).await?;
    Ok(())
}

/// Three instances started at the same moment (a group restarted together, after an
/// upgrade): each starts only its own share. Counting only the members already alive, each
/// would first start every link and then hand two thirds of them over (90 links started for
/// 30, beyond the float's 32 handshakes in progress per address).
#[tokio::test]
async fn instances_started_together_each_start_only_their_own_share() -> Result<()> {
    let w = world().await?;
    let (i1, i2, i3) = tokio::try_join!(
        start_instance(&w, "hh-1", None),
        start_instance(&w, "hh-2", None),
        start_instance(&w, "hh-3", None)
    )?;
    let all = [&i1, &i2, &i3];
    let layout = settled(&all, &w.queues, Duration::from_secs(60)).await?;
    stays_settled(&w, &all, &layout, 10).await?;
    let mut out = 0;
    let mut into = 0;
    for i in all {
        out += metric(i, HANDOVERS_OUT).await?;
        into += metric(i, HANDOVERS_IN).await?;
    }
    println!(
        "TOGETHER layout: hh-1 {}, hh-2 {}, hh-3 {} links; handovers out {out}, in {into}",
        layout.owned_by(0).len(),
        layout.owned_by(1).len(),
        layout.owned_by(2).len()
    );
    ensure!(
        out == 0,
        "{out} links were started on one instance and handed over to another"
    );
    Ok(())
}

/// A fickle broker: an instance's member queue is deleted under it (an operator, a policy).
/// The others see it gone and take its links; it notices (its consumer is cancelled), stops
/// its links, joins again on the same connection and gets exactly its share back. Nothing is
/// lost, and the broker connection is not dropped for it.
#[tokio::test]
async fn a_member_whose_queue_is_deleted_steps_out_and_joins_again() -> Result<()> {
    let w = world().await?;
    let i1 = start_instance(&w, "hh-1", None).await?;
    let i2 = start_instance(&w, "hh-2", None).await?;
    let all = [&i1, &i2];
    let stop = Arc::new(AtomicBool::new(false));
    let tx = publish_rounds(&w, "deleted", stop.clone());
    let before = flowing(&w, &all, Duration::from_secs(60)).await?;
    ensure!(
        !before.owned_by(0).is_empty(),
        "hh-1 owns no link: nothing to observe"
    );
    let s1 = i1.d.status().await?;
    let incarnation = s1["ha"]["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["self"] == true))
        .and_then(|m| m["incarnation"].as_str())
        .context("hh-1's incarnation")?
        .to_string();
    let group = w.a.files.legal_name.slug();
    let queue = format!("drawbridge.bridge.member.{group}.{incarnation}");
    let (_c, ch) = w.a.channel().await?;
    ch.queue_delete(
        queue.as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .with_context(|| format!("deleting {queue}"))?;
    let deleted = Instant::now();

    // hh-1 steps out (its links stop, hh-2 runs all 30), then joins again.
    let deadline = deleted + Duration::from_secs(30);
    let mut out_seen = None;
    loop {
        let vs = views(&all).await?;
        if out_seen.is_none() && vs[0].ha_state != "active" && vs[0].links.is_empty() {
            out_seen = Some(deleted.elapsed());
        }
        if out_seen.is_some() && vs[0].ha_state == "active" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "hh-1 did not step out and back within 30 s: {}\n{}",
            vs[0].summary(),
            i1.d.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = settled(&all, &w.queues, Duration::from_secs(30)).await?;
    println!(
        "DELETED member queue: hh-1 out after {:?}, back with {} links (had {})",
        out_seen.unwrap_or_default(),
        after.owned_by(0).len(),
        before.owned_by(0).len()
    );
    ensure!(
        after.owned_by(0) == before.owned_by(0),
        "hh-1 did not get exactly its share back"
    );
    // It stayed on its broker connection (a member queue is not worth the links' channels).
    let log = std::fs::read_to_string(i1.d.log_path()).unwrap_or_default();
    ensure!(
        !log.contains("broker connection reported broken"),
        "hh-1 dropped its broker connection:\n{}",
        i1.d.log_tail(30)
    );
    ensure!(
        log.contains("out of the group: our member queue"),
        "hh-1 did not say why it stepped out:\n{}",
        i1.d.log_tail(30)
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    nothing_lost(&w, "deleted", &stop, tx, &all).await?;
    Ok(())
}

/// `POST /step-down` on a hot-hot member: it announces leaving, its links drain and move to
/// the other member, it stays out for `ha_hold_off`, then joins again and gets exactly its
/// share back. Nothing is lost.
#[tokio::test]
async fn a_stepped_down_member_hands_its_links_over_and_comes_back_after_its_hold_off() -> Result<()>
{
    let w = world().await?;
    let extra = "ha_hold_off = \"4s\"";
    let i1 = start_instance_with(&w, "hh-1", None, extra).await?;
    let i2 = start_instance_with(&w, "hh-2", None, extra).await?;
    let all = [&i1, &i2];
    let stop = Arc::new(AtomicBool::new(false));
    let tx = publish_rounds(&w, "stepdown", stop.clone());
    let before = flowing(&w, &all, Duration::from_secs(60)).await?;
    ensure!(!before.owned_by(0).is_empty(), "hh-1 owns no link");
    let token = drawbridge_runtime::broker::Secret::new("step-down-token-0123456789");
    let asked = Instant::now();
    let (code, body) = drawbridge_runtime::admin::post_step_down(&i1.d.admin().to_string(), &token)
        .await
        .map_err(|e| anyhow::anyhow!("step-down: {e}"))?;
    let answered = asked.elapsed();
    ensure!(code == 200, "step-down answered {code}: {body}");
    // Answered once its links have drained: it runs none, hh-2 runs all 30.
    let vs = views(&all).await?;
    ensure!(
        vs[0].links.is_empty(),
        "hh-1 still runs links after its step-down: {}",
        vs[0].summary()
    );
    // hh-2 sees hh-1 leaving and runs every link, all up.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = &views(&[&i2]).await?[0];
        let leaving = v.members.iter().any(|m| m.0 == "hh-1" && m.1 == "leaving");
        let up = v.links.values().filter(|l| l.state == "up").count();
        if leaving && up == w.queues.len() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "hh-2 did not take all the links within 15 s: {}",
            v.summary()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second step-down while holding off is refused (not an alive member).
    let (again, _) = drawbridge_runtime::admin::post_step_down(&i1.d.admin().to_string(), &token)
        .await
        .map_err(|e| anyhow::anyhow!("step-down: {e}"))?;
    ensure!(again == 409, "a second step-down answered {again}");
    // Back after the hold-off, with the same share.
    let after = settled(&all, &w.queues, Duration::from_secs(30)).await?;
    println!(
        "STEPDOWN answered after {answered:?}; hh-2 ran all {} links; hh-1 back after {:?} with {} links (had {})",
        w.queues.len(),
        asked.elapsed(),
        after.owned_by(0).len(),
        before.owned_by(0).len()
    );
    ensure!(
        after.owned_by(0) == before.owned_by(0),
        "hh-1 came back with another share"
    );
    ensure!(
        asked.elapsed() >= Duration::from_secs(4),
        "hh-1 came back before its hold-off"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    nothing_lost(&w, "stepdown", &stop, tx, &all).await?;
    Ok(())
}
