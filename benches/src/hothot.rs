//! `--hot-hot 1,2,3`: aggregate throughput of hot-hot bridges (issue 25) by instance count.
//! For each count N: N bridges of A with `ha = "hot-hot"` and distinct `bridge.id`s (the same
//! config otherwise, the same broker and group), B's float, and `--hot-hot-links` peer queues
//! of A, each a link to B's float. Once every link is up on exactly one instance (and the
//! instances agree on who owns what, for 2 s), `--messages` are published spread evenly over
//! the queues, concurrently, and counted at B's inbox: aggregate msg/s from the first publish
//! to the last receipt, CPU per message of the forwarders (all N bridges + float B), links per
//! instance, lost and duplicates. Fresh bridges for every measurement; the order of the counts
//! alternates per round, as the paths' do.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use drawbridge_control_protocol::{PeerLink, Target, DEFAULT_TARGET_ADDRESS};
use drawbridge_testkit::{
    daemon::{free_port, Daemon, Kind},
    stream::{PublishSpec, Tally},
    world::{self, Org, INBOX},
};
use lapin::{options::QueueDeleteOptions, types::ShortString};
use serde_json::Value;

use crate::{markdown_table, median, ms, settings_lines, Bench, Job, Probes, Route, Sample};

/// Most hot-hot bridges one measurement starts.
pub(crate) const MAX_INSTANCES: usize = 16;
/// Connections the publisher spreads its channels (one per peer queue) over.
const PUBLISH_CONNECTIONS: usize = 4;
/// How long the assignment of links must hold unchanged before a flood starts.
const STABLE: Duration = Duration::from_secs(2);
/// How long the instances get to agree and bring every link up.
const CONVERGE_WITHIN: Duration = Duration::from_secs(120);
/// The probe name of each bridge (one probe per instance, all with this name).
const BRIDGE: &str = "bridge A";

/// One measured flood with N instances.
struct Measurement {
    instances: usize,
    round: usize,
    sample: Sample,
    /// Up links per instance once converged (in the order the instances were started).
    links: Vec<usize>,
    /// Start of the bridges → every link up on one instance (the start of the stable window).
    converged: Duration,
    /// Queues whose instance differed after the flood from before it.
    moved: usize,
    /// Forwarder CPU (bridges + float B), µs per delivered message.
    forwarder_us: f64,
    /// The bridges alone, µs per delivered message.
    bridges_us: f64,
}

/// The counts of round `i`: forwards, then backwards (as [`Route::order`]).
fn order(counts: &[usize], i: usize) -> Vec<usize> {
    let mut order = counts.to_vec();
    if i % 2 == 1 {
        order.reverse();
    }
    order
}

/// Instance `i`'s config: A's bridge config with `ha = "hot-hot"` and its own `bridge.id`.
fn instance_config(a: &Org, admin: SocketAddr, i: usize, extra: &str) -> Result<String> {
    let id = format!("bridge-{}", a.files.legal_name.slug());
    let lines = format!("ha = \"hot-hot\"\n{extra}");
    let cfg = a.bridge_config_at(admin, &lines);
    let line = format!("id = \"{id}\"\n");
    if !cfg.contains(&line) {
        bail!("the testkit's bridge config no longer sets {line:?}: {cfg}");
    }
    Ok(cfg.replacen(&line, &format!("id = \"{id}-{i}\"\n"), 1))
}

/// The queues each instance runs (state "up"), if the instances agree on a complete,
/// disjoint assignment of `queues`; else why not. `statuses` are the instances' `/status`.
fn assignment(statuses: &[Value], queues: &BTreeSet<String>) -> Result<Vec<Vec<String>>, String> {
    let n = statuses.len();
    let mut runs = Vec::with_capacity(n);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut owners: Option<&serde_json::Map<String, Value>> = None;
    for (i, s) in statuses.iter().enumerate() {
        if s["ha_state"] != "active" {
            return Err(format!("instance {} is {}", i + 1, s["ha_state"]));
        }
        if let Some(members) = s["ha"]["members"].as_array() {
            let alive = members.iter().filter(|m| m["state"] == "alive").count();
            if members.len() != n || alive != n {
                return Err(format!(
                    "instance {} sees {} members, {alive} alive (want {n})",
                    i + 1,
                    members.len()
                ));
            }
        }
        if let Some(o) = s["ha"]["owners"].as_object() {
            match owners {
                None => owners = Some(o),
                Some(first) if first != o => {
                    return Err(format!("instance {} disagrees on the owners", i + 1))
                }
                Some(_) => {}
            }
        }
        let up: Vec<String> = s["links"].as_array().map_or_else(Vec::new, |ls| {
            ls.iter()
                .filter(|l| l["state"] == "up")
                .filter_map(|l| l["queue"].as_str().map(str::to_string))
                .collect()
        });
        // The instance's own id, where its members list says which one is itself.
        let me = s["ha"]["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["self"] == true))
            .and_then(|m| m["id"].as_str());
        for q in &up {
            if !queues.contains(q) {
                return Err(format!("instance {} runs an unknown link {q}", i + 1));
            }
            if let Some(j) = seen.insert(q.clone(), i) {
                return Err(format!("{q} is up on instances {} and {}", j + 1, i + 1));
            }
            if let (Some(me), Some(o)) = (me, owners) {
                if o.get(q.as_str()).and_then(Value::as_str) != Some(me) {
                    return Err(format!("{q} is up on {me}, its owner is {}", o[q.as_str()]));
                }
            }
        }
        runs.push(up);
    }
    if seen.len() != queues.len() {
        return Err(format!("{} of {} links up", seen.len(), queues.len()));
    }
    Ok(runs)
}

/// `/status` of every bridge (an unanswered one is `null`).
async fn statuses(bridges: &[Daemon]) -> Vec<Value> {
    let all = futures::future::join_all(bridges.iter().map(Daemon::status)).await;
    all.into_iter().map(|s| s.unwrap_or(Value::Null)).collect()
}

/// Wait until the bridges run every queue, each on one instance, and the assignment has held
/// for [`STABLE`]; returns when it started holding (from `start`) and the assignment.
async fn converge(
    bridges: &[Daemon],
    queues: &BTreeSet<String>,
    start: Instant,
) -> Result<(Duration, Vec<Vec<String>>)> {
    let mut stable: Option<(Instant, Vec<Vec<String>>)> = None;
    let mut last_print = Instant::now();
    loop {
        let now = Instant::now();
        match assignment(&statuses(bridges).await, queues) {
            Ok(a) => match &stable {
                Some((since, held)) if *held == a => {
                    if since.elapsed() >= STABLE {
                        return Ok((since.saturating_duration_since(start), a));
                    }
                }
                _ => stable = Some((now, a)),
            },
            Err(why) => {
                stable = None;
                if start.elapsed() > CONVERGE_WITHIN {
                    let logs: Vec<String> = bridges
                        .iter()
                        .enumerate()
                        .map(|(i, b)| format!("instance {}:\n{}", i + 1, b.log_tail(15)))
                        .collect();
                    bail!(
                        "the hot-hot bridges did not converge within {CONVERGE_WITHIN:?}: {why}\n{}",
                        logs.join("\n")
                    );
                }
                if last_print.elapsed() > Duration::from_secs(5) {
                    println!(
                        "  not converged after {:.1} s: {why}",
                        start.elapsed().as_secs_f64()
                    );
                    last_print = Instant::now();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `n` messages of `size` bytes spread evenly over `queues` (a publisher per queue, all at
/// once) into B's inbox, timed and counted as the other floods are.
async fn flood(
    bench: &Bench,
    probes: &Probes,
    queues: &[String],
    n: u64,
    tag: &str,
) -> Result<Sample> {
    let (a, b) = (&bench.a, &bench.b);
    let run = format!("hothot-{tag}");
    let depth = bench.nb.queue_depth("/", INBOX).await?;
    if depth != 0 {
        bail!("{INBOX} on B holds {depth} messages before run {run}");
    }
    let mut conns = Vec::new();
    for _ in 0..PUBLISH_CONNECTIONS.min(queues.len()) {
        conns.push(drawbridge_testkit::stream::connect(a.broker_uri()).await?);
    }
    let mut channels = Vec::with_capacity(queues.len());
    for i in 0..queues.len() {
        channels.push(conns[i % conns.len()].create_channel().await?);
    }
    let l = queues.len() as u64;
    let specs: Vec<PublishSpec> = (0..l)
        .map(|i| PublishSpec {
            run: run.clone(),
            from: n * i / l,
            to: n * (i + 1) / l,
            size: bench.args.size,
            destination: b.legal_name.clone(),
            headers: vec![],
        })
        .collect();
    let publishers: Vec<_> = channels
        .iter()
        .zip(queues)
        .zip(&specs)
        .map(|((ch, q), spec)| (ch, q.as_str(), spec))
        .collect();
    let (recv_conn, recv_ch) = crate::channel(b.broker_uri()).await?;
    world::declare_queue(&recv_ch, INBOX).await?;
    let job = Job {
        route: Route::Drawbridge,
        n,
        size: bench.args.size,
        rate: None,
    };
    let tally = Tally::new(&run, n, Some(a.legal_name.clone()));
    let s = crate::timed_spread(job, probes, &publishers, (&recv_ch, INBOX), tally).await;
    for c in conns.into_iter().chain([recv_conn]) {
        let _ = c.close(200, ShortString::from("bench done")).await;
    }
    s
}

/// One measurement: start `count` bridges, wait for the links to spread, warm up, flood,
/// stop the bridges.
async fn measure(
    bench: &Bench,
    count: usize,
    round: usize,
    queues: &[String],
) -> Result<Measurement> {
    let a = &bench.a;
    let extra = settings_lines(&bench.args.bridge_set);
    let start = Instant::now();
    let starting = (1..=count).map(|i| {
        let extra = extra.clone();
        async move {
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let cfg = instance_config(a, admin, i, &extra)?;
            let name = format!("bridge-hh-r{round}-n{count}-{i}");
            Daemon::start(Kind::Bridge, &a.dir, &name, &cfg, admin)
                .await
                .with_context(|| format!("hot-hot bridge {i} of {count}"))
        }
    });
    let mut bridges = Vec::with_capacity(count);
    let mut failed = None;
    for d in futures::future::join_all(starting).await {
        match d {
            Ok(d) => bridges.push(d),
            Err(e) => failed = Some(e),
        }
    }
    let result = match failed {
        Some(e) => Err(e),
        None => measure_with(bench, &bridges, count, round, queues, start).await,
    };
    for (i, d) in bridges.iter_mut().enumerate() {
        match d.terminate(Duration::from_secs(30)).await {
            Ok(Some(0)) | Ok(None) => {}
            Ok(Some(code)) => println!("  note: bridge {} of {count} exited with {code}", i + 1),
            Err(e) => println!("  note: bridge {} of {count}: {e:#}", i + 1),
        }
    }
    result
}

async fn measure_with(
    bench: &Bench,
    bridges: &[Daemon],
    count: usize,
    round: usize,
    queues: &[String],
    start: Instant,
) -> Result<Measurement> {
    let set: BTreeSet<String> = queues.iter().cloned().collect();
    let (converged, before) = converge(bridges, &set, start).await?;
    let mut probes = Probes {
        names: bench.probes.names.clone(),
        pids: bench.probes.pids.clone(),
        tick: bench.probes.tick,
    };
    for b in bridges {
        probes.names.push(BRIDGE);
        probes.pids.push(b.pid());
    }
    if bench.args.warmup > 0 {
        flood(
            bench,
            &probes,
            queues,
            bench.args.warmup,
            &format!("r{round}-n{count}-warmup"),
        )
        .await?;
    }
    let sample = flood(
        bench,
        &probes,
        queues,
        bench.args.messages,
        &format!("r{round}-n{count}"),
    )
    .await?;
    let after = assignment(&statuses(bridges).await, &set).unwrap_or_default();
    let owner = |assignment: &[Vec<String>]| -> BTreeMap<String, usize> {
        assignment
            .iter()
            .enumerate()
            .flat_map(|(i, qs)| qs.iter().map(move |q| (q.clone(), i)))
            .collect()
    };
    let (was, now) = (owner(&before), owner(&after));
    let moved = queues.iter().filter(|q| was.get(*q) != now.get(*q)).count();
    let names = probes.all_names();
    let per_msg = |who: &dyn Fn(&str) -> bool| {
        names
            .iter()
            .zip(&sample.cpu)
            .filter(|(name, _)| who(name))
            .map(|(_, c)| c)
            .sum::<f64>()
            / sample.report.received.max(1) as f64
            * 1e6
    };
    Ok(Measurement {
        instances: count,
        round,
        links: before.iter().map(Vec::len).collect(),
        converged,
        moved,
        forwarder_us: per_msg(&|n| n == BRIDGE || n == "float B"),
        bridges_us: per_msg(&|n| n == BRIDGE),
        sample,
    })
}

/// `--hot-hot`: every count, `--runs` rounds; prints the tables and the `HOTHOT` lines.
/// True when nothing was lost, corrupted or unexpected.
pub(crate) async fn hot_hot(bench: &Bench) -> Result<bool> {
    let args = &bench.args;
    let (a, b) = (&bench.a, &bench.b);
    let l = args.hot_hot_links as usize;
    let queues: Vec<String> = (0..l).map(|i| format!("drawbridge.peers.hh-{i}")).collect();
    let links: Vec<PeerLink> = queues
        .iter()
        .map(|q| PeerLink {
            queue: q.clone(),
            targets: vec![Target::new("127.0.0.1", b.float_port)],
            legal_names: vec![b.legal_name.clone()],
            target_address: DEFAULT_TARGET_ADDRESS.to_string(),
        })
        .collect();
    {
        let (_c, ch) = a.channel().await?;
        for q in &queues {
            world::declare_peer_queue(&ch, q, "classic").await?;
        }
    }
    // Every bridge asks for a snapshot when it starts; the node's answer names all L links.
    let _responder = a.answer_snapshot_requests(links).await?;
    println!(
        "## hot-hot: aggregate throughput by instance count ({l} links, {} × {} B spread evenly over them, {} rounds)",
        args.messages, args.size, args.runs
    );
    println!();
    let mut all = Vec::new();
    for round in 1..=args.runs {
        for count in order(&args.hot_hot, round - 1) {
            let m = measure(bench, count, round, &queues).await?;
            println!(
                "round {round}/{} {count} instance(s): {:.0} msg/s, links {:?}, converged after {:.1} s, forwarder CPU {:.0} µs/msg, lost {} dups {}{}",
                args.runs,
                m.sample.rate(),
                m.links,
                m.converged.as_secs_f64(),
                m.forwarder_us,
                m.sample.report.lost,
                m.sample.report.duplicates,
                if m.moved > 0 {
                    format!(", {} links moved during the flood", m.moved)
                } else {
                    String::new()
                }
            );
            all.push(m);
        }
    }
    {
        let (_c, ch) = a.channel().await?;
        for q in &queues {
            let _ = ch
                .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
                .await;
        }
    }
    print_tables(bench, &all);
    Ok(all.iter().all(|m| {
        let r = &m.sample.report;
        r.lost == 0 && r.corrupted == 0 && r.unexpected == 0 && r.wrong_sender == 0
    }))
}

fn print_tables(bench: &Bench, all: &[Measurement]) {
    let args = &bench.args;
    println!();
    let names: Vec<&str> = bench
        .probes
        .names
        .iter()
        .copied()
        .chain(["bridges", "other"])
        .collect();
    let mut runs = markdown_table(
        [
            "round".to_string(),
            "instances".into(),
            "msg/s".into(),
            "elapsed".into(),
            "p50".into(),
            "p99".into(),
            "links per instance".into(),
            "converged".into(),
            "lost".into(),
            "dups".into(),
            format!("CPU s: {}", names.join(" / ")),
        ],
        2..10,
    );
    for m in all {
        // The fixed probes, then the bridges summed, then "other" (last in the sample).
        let fixed = bench.probes.names.len();
        let cpu = &m.sample.cpu;
        let bridges: f64 = cpu[fixed..cpu.len() - 1].iter().sum();
        let shown: Vec<String> = cpu[..fixed]
            .iter()
            .chain([&bridges, &cpu[cpu.len() - 1]])
            .map(|c| format!("{c:.1}"))
            .collect();
        runs.add_row(vec![
            m.round.to_string(),
            m.instances.to_string(),
            format!("{:.0}", m.sample.rate()),
            format!("{:.2} s", m.sample.e2e.as_secs_f64()),
            ms(m.sample.report.p50),
            ms(m.sample.report.p99),
            m.links
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{:.1} s", m.converged.as_secs_f64()),
            m.sample.report.lost.to_string(),
            m.sample.report.duplicates.to_string(),
            shown.join(" / "),
        ]);
    }
    println!("{runs}");
    println!();
    println!(
        "## median of {} rounds ({} links, {} × {} B)",
        args.runs, args.hot_hot_links, args.messages, args.size
    );
    println!();
    let counts = &args.hot_hot;
    let of = |n: usize| all.iter().filter(move |m| m.instances == n);
    let rate = |n: usize| median(of(n).map(|m| m.sample.rate()).collect());
    // The ratio is to 1 instance, or to the smallest count measured.
    let base = counts.iter().copied().min().unwrap_or(1);
    let mut table = markdown_table(
        [
            "instances".to_string(),
            "msg/s".into(),
            format!("× {base} instance{}", if base == 1 { "" } else { "s" }),
            "forwarder CPU µs/msg".into(),
            "bridges µs/msg".into(),
            "links per instance (min/max)".into(),
            "converged".into(),
            "lost".into(),
            "dups".into(),
            "rounds (msg/s)".into(),
        ],
        0..9,
    );
    for &n in counts {
        let (lo, hi) = of(n)
            .flat_map(|m| m.links.iter().copied())
            .fold((usize::MAX, 0), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let fwd = median(of(n).map(|m| m.forwarder_us).collect());
        let bridges = median(of(n).map(|m| m.bridges_us).collect());
        let conv = median(of(n).map(|m| m.converged.as_secs_f64()).collect());
        let lost: u64 = of(n).map(|m| m.sample.report.lost).sum();
        let dups: u64 = of(n).map(|m| m.sample.report.duplicates).sum();
        let ratio = rate(n) / rate(base);
        table.add_row(vec![
            n.to_string(),
            format!("{:.0}", rate(n)),
            format!("{ratio:.2}"),
            format!("{fwd:.0}"),
            format!("{bridges:.0}"),
            format!("{lo}/{hi}"),
            format!("{conv:.1} s"),
            lost.to_string(),
            dups.to_string(),
            of(n)
                .map(|m| format!("{:.0}", m.sample.rate()))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
        println!(
            "HOTHOT instances={n} links={} msg_per_s={:.0} ratio={ratio:.2} forwarder_cpu_us={fwd:.1} bridges_cpu_us={bridges:.1} links_min={lo} links_max={hi} converged_s={conv:.1} lost={lost} duplicates={dups}",
            args.hot_hot_links,
            rate(n)
        );
    }
    println!();
    println!("{table}");
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queues(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("q{i}")).collect()
    }

    fn status(id: &str, members: &[&str], owners: &Value, up: &[&str]) -> Value {
        json!({
            "ha_state": "active",
            "ha": {
                "mode": "hot-hot",
                "members": members.iter().map(|m| json!({
                    "id": m, "links": 0, "self": *m == id, "state": "alive"
                })).collect::<Vec<_>>(),
                "owners": owners,
            },
            "links": up.iter().map(|q| json!({"queue": q, "state": "up"})).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn an_assignment_needs_every_link_up_once_where_the_owners_say() {
        let owners = json!({"q0": "x", "q1": "y", "q2": "x"});
        let ms = ["x", "y"];
        let ok = assignment(
            &[
                status("x", &ms, &owners, &["q0", "q2"]),
                status("y", &ms, &owners, &["q1"]),
            ],
            &queues(3),
        );
        assert_eq!(
            ok,
            Ok(vec![vec!["q0".into(), "q2".into()], vec!["q1".into()]])
        );
        // q1 not up yet.
        let missing = assignment(
            &[
                status("x", &ms, &owners, &["q0", "q2"]),
                status("y", &ms, &owners, &[]),
            ],
            &queues(3),
        );
        assert_eq!(missing, Err("2 of 3 links up".into()));
        // Up on both (the old owner has not let go).
        assert!(assignment(
            &[
                status("x", &ms, &owners, &["q0", "q1", "q2"]),
                status("y", &ms, &owners, &["q1"]),
            ],
            &queues(3),
        )
        .is_err());
        // Up where the owners do not put it.
        assert!(assignment(
            &[
                status("x", &ms, &owners, &["q0"]),
                status("y", &ms, &owners, &["q1", "q2"]),
            ],
            &queues(3),
        )
        .is_err());
        // A member short (the other has not joined yet).
        assert!(assignment(
            &[
                status(
                    "x",
                    &["x"],
                    &json!({"q0": "x", "q1": "x", "q2": "x"}),
                    &["q0", "q1", "q2"]
                ),
                status("y", &ms, &owners, &[]),
            ],
            &queues(3),
        )
        .is_err());
        // A joining instance.
        let mut standby = status("y", &ms, &owners, &["q1"]);
        standby["ha_state"] = json!("standby");
        assert!(assignment(
            &[status("x", &ms, &owners, &["q0", "q2"]), standby],
            &queues(3),
        )
        .is_err());
    }

    #[test]
    fn rounds_alternate_the_counts() {
        assert_eq!(order(&[1, 2, 3], 0), vec![1, 2, 3]);
        assert_eq!(order(&[1, 2, 3], 1), vec![3, 2, 1]);
        assert_eq!(order(&[1, 2, 3], 2), vec![1, 2, 3]);
    }
}
