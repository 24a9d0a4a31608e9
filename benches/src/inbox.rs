//! `--inbox-types quorum,stream`: the Drawbridge path A → B with B's inbox as a quorum queue
//! against B's inbox as a stream (issue 26), side by side in one run.
//!
//! A stream inbox costs more than a queue: B's float reads every message back into its dedup
//! window (the broker sends each message twice, to the node and to the float, and the float
//! parses it again), writes window markers, and after a start or a reconnect publishes nothing
//! until it has read `dedup.max_age` of the stream back (`float/src/window.rs`). This mode
//! measures those costs:
//!
//! - For each type, `--runs` rounds (the order alternating per round), each on a **fresh
//!   inbox**: B's float is stopped, `drawbridge.inbox` deleted, and the float started again
//!   with `inbox_queue_type` set, so it declares the inbox as that type (checked with
//!   `rabbitmqctl list_queues name type`). A fresh peer queue and link, then a flood of
//!   `--messages` of `--size` bytes, counted at the inbox by a consumer that reads a stream
//!   from its first offset and skips the float's window markers: msg/s, p50/p99, CPU per
//!   message of every process (B's float and beam B above all), lost and duplicates.
//! - For a stream, what the float read back (`window.inboxes[0].read` in its `/status`).
//! - Then B's float is restarted with the inbox still holding the flood: the time from its
//!   start to `/readyz` (a queue inbox: connect and declare; a stream: that plus the window's
//!   rebuild) and the float's own `window.last_rebuild_ms`.
//! - Last, with `stream` among the types and `--inbox-rebuild-messages` > 0: a stream filled
//!   with that many messages through Drawbridge, then `--inbox-rebuild-restarts` restarts of
//!   the float: how the rebuild grows with the stream; then B's broker closes the float's
//!   connection: a reconnect resumes reading where the follower stopped.
//!
//! Prints a table per measurement, a summary per type, `INBOX …` and `INBOX_REBUILD …` lines,
//! and writes `results.json`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drawbridge_control_protocol::{ControlCommand, CreateLink, DeleteLink};
use drawbridge_testkit::{
    daemon::{http_get, Daemon, Kind},
    stream::Tally,
    world::{self, INBOX},
};
use lapin::{
    options::QueueDeleteOptions,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use serde::Serialize;
use serde_json::Value;

use crate::{
    markdown_table, median, ms, output, proc_ticks, settings_lines, spec, Bench, Job, Route, Sample,
};

/// How long a started float gets to be ready (a large stream is read back first).
const READY_WITHIN: Duration = Duration::from_secs(600);
/// How long the float gets to read a flood back after the verifier has it all.
const READ_BACK_WITHIN: Duration = Duration::from_secs(120);

/// B's inbox type (`float.inbox_queue_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum InboxType {
    Classic,
    Quorum,
    Stream,
}

impl InboxType {
    fn as_str(self) -> &'static str {
        match self {
            InboxType::Classic => "classic",
            InboxType::Quorum => "quorum",
            InboxType::Stream => "stream",
        }
    }
}

impl std::fmt::Display for InboxType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The types of round `i`: forwards, then backwards (as [`Route::order`]).
fn order(types: &[InboxType], i: usize) -> Vec<InboxType> {
    let mut order = types.to_vec();
    if i % 2 == 1 {
        order.reverse();
    }
    order
}

/// A start of B's float, until it was ready.
#[derive(Debug, Clone, Serialize)]
struct Start {
    /// Spawn → `/readyz` answers 200, as the bench sees it (polled every 20 ms).
    ready_ms: f64,
    /// The float's own `window.last_rebuild_ms`: its broker connection → the window read
    /// back (a stream inbox; `None` for a queue).
    last_rebuild_ms: Option<u64>,
    /// `window.inboxes[0].read` once ready: what the rebuild read (markers included).
    read: Option<u64>,
    /// Of those, window markers.
    markers: Option<u64>,
    /// CPU seconds of the float from its start to ready.
    float_cpu_s: f64,
    /// CPU seconds of beam B over the same time.
    beam_b_cpu_s: f64,
}

/// What B's float had read back of a stream inbox after a flood.
#[derive(Debug, Clone, Serialize)]
struct ReadBack {
    /// `window.inboxes[0].read`: messages and markers read back since the float started.
    read: u64,
    /// Of those, window markers.
    markers: u64,
    /// `window.inboxes[0].duplicates_stored`: copies of one message read back twice.
    duplicates_stored: u64,
    /// Whether it had read the whole flood back within [`READ_BACK_WITHIN`].
    caught_up: bool,
}

/// B's broker closed B's float's connection (`rabbitmqctl close_all_connections`): the float
/// reconnects and rebuilds its window from where its follower stopped.
#[derive(Debug, Clone, Serialize)]
struct Reconnect {
    /// The float's `window.last_rebuild_ms` for the new connection: from the old one lost to
    /// the window read back on the new one (the reconnect's backoff included).
    last_rebuild_ms: Option<u64>,
    /// What it read on the new connection (`window.inboxes[0].read` after less before).
    read: u64,
    /// The close command sent → the float's window ready again, as the bench sees it.
    ready_after_ms: f64,
}

/// One measured flood into a fresh inbox of one type.
#[derive(Debug)]
struct Measurement {
    kind: InboxType,
    /// 1-based; 0 for the large stream.
    round: usize,
    sample: Sample,
    /// Window markers the verifying consumer skipped.
    markers_skipped: u64,
    /// A stream: what the float read back.
    read_back: Option<ReadBack>,
    /// The float restarted with the inbox holding the flood.
    restarts: Vec<Start>,
    /// The large stream: a broker reconnect of the float after the restarts.
    reconnect: Option<Reconnect>,
}

impl Measurement {
    /// µs of CPU per delivered message of the probe `name` (0 when not probed).
    fn cpu_us(&self, names: &[&str], name: &str) -> f64 {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| self.sample.cpu.get(i))
            .map_or(0.0, |c| c / self.sample.report.expected.max(1) as f64 * 1e6)
    }

    /// Every probed process (not "other", the rest of the machine: other tenants included).
    fn path_cpu_us(&self, names: &[&str]) -> f64 {
        names
            .iter()
            .filter(|n| **n != "other")
            .map(|n| self.cpu_us(names, n))
            .sum()
    }
}

/// CPU seconds of process `pid` so far (0 when unknown).
fn cpu_s(pid: Option<u32>, tick: f64) -> f64 {
    pid.and_then(|p| proc_ticks(Some(p)))
        .map_or(0.0, |t| t as f64 / tick)
}

/// The pid of probe `name`.
fn probe_pid(bench: &Bench, name: &str) -> Option<u32> {
    let probes = &bench.probes;
    probes
        .names
        .iter()
        .position(|n| *n == name)
        .and_then(|i| probes.pids.get(i).copied().flatten())
}

/// Start B's float with `inbox_queue_type = kind` (and `--float-set`) and wait until it is
/// ready; how long that took and what its window read.
async fn start_float(bench: &Bench, kind: InboxType) -> Result<(Daemon, Start)> {
    let b = &bench.b;
    let extra = format!(
        "inbox_queue_type = \"{kind}\"\n{}",
        settings_lines(&bench.args.float_set)
    );
    let cfg = b.float_config(&extra);
    let tick = bench.probes.tick;
    let beam_b = probe_pid(bench, "beam B");
    let beam0 = cpu_s(beam_b, tick);
    let t0 = Instant::now();
    let d = Daemon::start(
        Kind::Float,
        &b.dir,
        &format!("float-{kind}"),
        &cfg,
        b.float_admin,
    )
    .await
    .with_context(|| format!("B's float with a {kind} inbox"))?;
    loop {
        if let Ok((200, _)) = http_get(b.float_admin, "/readyz").await {
            break;
        }
        if t0.elapsed() > READY_WITHIN {
            let s = d.status().await.ok();
            bail!(
                "B's float ({kind} inbox) not ready within {READY_WITHIN:?}: {s:?}\nlog:\n{}",
                d.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = t0.elapsed();
    let float_cpu_s = cpu_s(d.pid(), tick);
    let beam_b_cpu_s = cpu_s(beam_b, tick) - beam0;
    let status = d.status().await.unwrap_or(Value::Null);
    let window = &status["window"];
    let inbox = &window["inboxes"][0];
    Ok((
        d,
        Start {
            ready_ms: ready.as_secs_f64() * 1e3,
            last_rebuild_ms: window["last_rebuild_ms"].as_u64(),
            read: inbox["read"].as_u64(),
            markers: inbox["markers"].as_u64(),
            float_cpu_s,
            beam_b_cpu_s,
        },
    ))
}

/// Stop B's float (if running).
async fn stop_float(float: &mut Option<Daemon>) -> Result<()> {
    if let Some(mut d) = float.take() {
        match d.terminate(Duration::from_secs(30)).await {
            Ok(Some(0) | None) => {}
            Ok(Some(code)) => println!("  note: B's float exited with {code}"),
            Err(e) => println!("  note: B's float: {e:#}"),
        }
    }
    Ok(())
}

/// The type of B's inbox on the broker (`rabbitmqctl list_queues name type`), `None` when it
/// does not exist.
async fn inbox_type_on_broker(bench: &Bench) -> Result<Option<String>> {
    let out = bench
        .nb
        .ctl(&[
            "list_queues",
            "-p",
            &bench.b.vhost(),
            "--quiet",
            "--no-table-headers",
            "name",
            "type",
        ])
        .await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| name.trim() == INBOX)
        .map(|(_, t)| t.trim().to_string()))
}

/// Stop B's float, delete its inbox, start it again with `kind`: a fresh inbox of that type.
async fn fresh_inbox(bench: &Bench, float: &mut Option<Daemon>, kind: InboxType) -> Result<()> {
    stop_float(float).await?;
    if inbox_type_on_broker(bench).await?.is_some() {
        let (c, ch) = crate::channel(bench.b.broker_uri()).await?;
        ch.queue_delete(ShortString::from(INBOX), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("deleting {INBOX} on B"))?;
        let _ = c.close(200, ShortString::from("bench done")).await;
    }
    let (d, _) = start_float(bench, kind).await?;
    *float = Some(d);
    match inbox_type_on_broker(bench).await? {
        Some(t) if t == kind.as_str() => Ok(()),
        other => bail!("{INBOX} on B is {other:?} after the float declared it, want {kind}"),
    }
}

/// `window.inboxes[0]` of the float's `/status`: (read, markers, duplicates_stored).
async fn window_read(float: &Daemon) -> Option<(u64, u64, u64)> {
    let s = float.status().await.ok()?;
    let i = &s["window"]["inboxes"][0];
    Some((
        i["read"].as_u64()?,
        i["markers"].as_u64()?,
        i["duplicates_stored"].as_u64()?,
    ))
}

/// Wait until the float has read `n` messages (besides markers) back from its stream inbox.
async fn wait_read_back(float: &Daemon, n: u64) -> Option<ReadBack> {
    let deadline = Instant::now() + READ_BACK_WITHIN;
    loop {
        let got = window_read(float).await;
        if let Some((read, markers, duplicates_stored)) = got {
            let caught_up = read.saturating_sub(markers) >= n;
            if caught_up || Instant::now() > deadline {
                return Some(ReadBack {
                    read,
                    markers,
                    duplicates_stored,
                    caught_up,
                });
            }
        } else if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One flood of `n` into a fresh inbox of `kind`, then `restarts` restarts of B's float with
/// the inbox holding it.
async fn measure(
    bench: &Bench,
    float: &mut Option<Daemon>,
    kind: InboxType,
    round: usize,
    n: u64,
    tag: &str,
    restarts: usize,
) -> Result<Measurement> {
    let (a, b) = (&bench.a, &bench.b);
    fresh_inbox(bench, float, kind).await?;
    let f = float.as_ref().context("B's float")?;
    let mut probes = crate::Probes {
        names: bench.probes.names.clone(),
        pids: bench.probes.pids.clone(),
        tick: bench.probes.tick,
    };
    if let Some(i) = probes.names.iter().position(|n| *n == "float B") {
        probes.pids[i] = f.pid();
    }
    let run = format!("inbox-{tag}");
    let queue = format!("drawbridge.peers.bench-inbox-{tag}");
    let (c1, pub_ch) = crate::channel(a.broker_uri()).await?;
    let (c2, recv_ch) = crate::channel(b.broker_uri()).await?;
    world::declare_peer_queue(&pub_ch, &queue, "classic").await?;
    let mut link = a.link_to(b);
    link.queue = queue.clone();
    a.control(&ControlCommand::CreateLink(CreateLink {
        node_identity: a.legal_name.clone(),
        link,
    }))
    .await?;
    a.wait_link_state(&queue, "up", Duration::from_secs(60))
        .await?;
    // A stream is read from its start (the float's markers are skipped); a queue as usual.
    let mut args = FieldTable::default();
    if kind == InboxType::Stream {
        args.insert(
            ShortString::from("x-stream-offset"),
            AMQPValue::LongString(LongString::from("first")),
        );
    }
    let job = Job {
        route: Route::Drawbridge,
        n,
        size: bench.args.size,
        rate: None,
    };
    let spec = spec(&run, n, bench.args.size, &b.legal_name);
    let tally = Tally::new(&run, n, Some(a.legal_name.clone()));
    let timed = crate::timed_from(
        job,
        &probes,
        &[(&pub_ch, queue.as_str(), &spec)],
        (&recv_ch, INBOX),
        args,
        tally,
    )
    .await;
    a.control(&ControlCommand::DeleteLink(DeleteLink {
        node_identity: a.legal_name.clone(),
        queue: queue.clone(),
    }))
    .await?;
    crate::wait_link_gone(a, &queue, Duration::from_secs(30)).await?;
    pub_ch
        .queue_delete(
            ShortString::from(queue.as_str()),
            QueueDeleteOptions::default(),
        )
        .await?;
    crate::close(c1, c2).await;
    let (sample, tally) = timed?;
    let read_back = if kind == InboxType::Stream {
        wait_read_back(f, n).await
    } else {
        None
    };
    let mut starts = Vec::new();
    for _ in 0..restarts {
        stop_float(float).await?;
        let (d, start) = start_float(bench, kind).await?;
        *float = Some(d);
        starts.push(start);
    }
    Ok(Measurement {
        kind,
        round,
        sample,
        markers_skipped: tally.markers(),
        read_back,
        restarts: starts,
        reconnect: None,
    })
}

/// Have B's broker close every connection (B's float's, the bench has none open on B now) and
/// wait until the float's window is ready again on a new connection.
async fn reconnect(bench: &Bench, float: &Daemon) -> Result<Reconnect> {
    let before = float.status().await?;
    let rebuilds = before["window"]["rebuilds"].as_u64().unwrap_or(0);
    let read0 = before["window"]["inboxes"][0]["read"].as_u64().unwrap_or(0);
    let t0 = Instant::now();
    bench.nb.close_all_connections().await?;
    loop {
        let s = float.status().await.unwrap_or(Value::Null);
        let w = &s["window"];
        if w["rebuilds"].as_u64().unwrap_or(0) > rebuilds && w["state"] == "ready" {
            return Ok(Reconnect {
                last_rebuild_ms: w["last_rebuild_ms"].as_u64(),
                read: w["inboxes"][0]["read"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(read0),
                ready_after_ms: t0.elapsed().as_secs_f64() * 1e3,
            });
        }
        if t0.elapsed() > READY_WITHIN {
            bail!(
                "B's float's window not ready again within {READY_WITHIN:?} after its broker connection was closed: {w}\nlog:\n{}",
                float.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "—".to_string(), |v| v.to_string())
}

/// One line of progress per measurement.
fn progress(m: &Measurement, of: usize) {
    let r = &m.sample.report;
    let mut line = format!(
        "round {}/{of} {}: {:.0} msg/s, p50 {} p99 {}, lost {} dups {}",
        m.round,
        m.kind,
        m.sample.rate(),
        ms(r.p50),
        ms(r.p99),
        r.lost,
        r.duplicates
    );
    if let Some(rb) = &m.read_back {
        line.push_str(&format!(
            ", the float read back {} ({} markers){}",
            rb.read,
            rb.markers,
            if rb.caught_up { "" } else { " — NOT ALL" }
        ));
    }
    for s in &m.restarts {
        line.push_str(&format!(
            "; restart → ready {:.0} ms (rebuild {} ms, read {})",
            s.ready_ms,
            opt(s.last_rebuild_ms),
            opt(s.read)
        ));
    }
    println!("{line}");
}

/// Per type, the medians.
#[derive(Debug, Serialize)]
struct Summary {
    inbox_type: InboxType,
    rounds: usize,
    msg_per_s: f64,
    /// msg/s over the first type's (of the medians).
    ratio: f64,
    /// Median of the per-round ratios to the first type (paired within a round).
    ratio_paired: f64,
    p50_ms: f64,
    p99_ms: f64,
    float_b_cpu_us: f64,
    beam_b_cpu_us: f64,
    bridge_a_cpu_us: f64,
    beam_a_cpu_us: f64,
    /// Every process of the path (brokers, bridge, float, the bench), not "other".
    path_cpu_us: f64,
    /// The rest of the machine (kernel work not charged to a process, other tenants).
    other_cpu_us: f64,
    lost: u64,
    duplicates: u64,
    corrupted: u64,
    /// A stream: what the float read back after the flood (markers included).
    float_read_back: Option<f64>,
    /// The float's restart with the inbox holding the flood: start → ready.
    restart_ready_ms: Option<f64>,
    /// Its `window.last_rebuild_ms` (a stream).
    last_rebuild_ms: Option<f64>,
}

fn summarize(bench: &Bench, all: &[Measurement]) -> Vec<Summary> {
    let names = bench.probes.all_names();
    let types = &bench.args.inbox_types;
    let base = types.first().copied().unwrap_or(InboxType::Quorum);
    let of = |t: InboxType| all.iter().filter(move |m| m.kind == t);
    let rate = |t: InboxType| median(of(t).map(|m| m.sample.rate()).collect());
    let med_opt = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    types
        .iter()
        .map(|&t| {
            let paired = median(
                of(t)
                    .filter_map(|m| {
                        all.iter()
                            .find(|x| x.kind == base && x.round == m.round)
                            .map(|x| m.sample.rate() / x.sample.rate())
                    })
                    .collect(),
            );
            Summary {
                inbox_type: t,
                rounds: of(t).count(),
                msg_per_s: rate(t),
                ratio: rate(t) / rate(base),
                ratio_paired: paired,
                p50_ms: median(
                    of(t)
                        .map(|m| m.sample.report.p50.as_secs_f64() * 1e3)
                        .collect(),
                ),
                p99_ms: median(
                    of(t)
                        .map(|m| m.sample.report.p99.as_secs_f64() * 1e3)
                        .collect(),
                ),
                float_b_cpu_us: median(of(t).map(|m| m.cpu_us(&names, "float B")).collect()),
                beam_b_cpu_us: median(of(t).map(|m| m.cpu_us(&names, "beam B")).collect()),
                bridge_a_cpu_us: median(of(t).map(|m| m.cpu_us(&names, "bridge A")).collect()),
                beam_a_cpu_us: median(of(t).map(|m| m.cpu_us(&names, "beam A")).collect()),
                path_cpu_us: median(of(t).map(|m| m.path_cpu_us(&names)).collect()),
                other_cpu_us: median(of(t).map(|m| m.cpu_us(&names, "other")).collect()),
                lost: of(t).map(|m| m.sample.report.lost).sum(),
                duplicates: of(t).map(|m| m.sample.report.duplicates).sum(),
                corrupted: of(t)
                    .map(|m| {
                        let r = &m.sample.report;
                        r.corrupted + r.unexpected + r.wrong_sender
                    })
                    .sum(),
                float_read_back: med_opt(
                    of(t)
                        .filter_map(|m| m.read_back.as_ref().map(|r| r.read as f64))
                        .collect(),
                ),
                restart_ready_ms: med_opt(
                    of(t)
                        .flat_map(|m| m.restarts.iter().map(|s| s.ready_ms))
                        .collect(),
                ),
                last_rebuild_ms: med_opt(
                    of(t)
                        .flat_map(|m| m.restarts.iter().filter_map(|s| s.last_rebuild_ms))
                        .map(|v| v as f64)
                        .collect(),
                ),
            }
        })
        .collect()
}

fn print_tables(bench: &Bench, all: &[Measurement], summary: &[Summary]) {
    let args = &bench.args;
    let names = bench.probes.all_names();
    println!();
    let mut runs = markdown_table(
        [
            "round".to_string(),
            "inbox".into(),
            "msg/s".into(),
            "elapsed".into(),
            "p50".into(),
            "p99".into(),
            "lost".into(),
            "dups".into(),
            "float read back".into(),
            "restart → ready".into(),
            "rebuild (float)".into(),
            format!("CPU s: {}", names.join(" / ")),
        ],
        2..11,
    );
    for m in all {
        let r = &m.sample.report;
        let restart = m.restarts.first();
        runs.add_row(vec![
            if m.round == 0 {
                "large".to_string()
            } else {
                m.round.to_string()
            },
            m.kind.to_string(),
            format!("{:.0}", m.sample.rate()),
            format!("{:.2} s", m.sample.e2e.as_secs_f64()),
            ms(r.p50),
            ms(r.p99),
            r.lost.to_string(),
            r.duplicates.to_string(),
            opt(m.read_back.as_ref().map(|r| r.read)),
            opt(restart.map(|s| format!("{:.0} ms", s.ready_ms))),
            opt(restart
                .and_then(|s| s.last_rebuild_ms)
                .map(|v| format!("{v} ms"))),
            m.sample
                .cpu
                .iter()
                .map(|c| format!("{c:.1}"))
                .collect::<Vec<_>>()
                .join(" / "),
        ]);
    }
    println!("{runs}");
    println!();
    let base = args
        .inbox_types
        .first()
        .copied()
        .unwrap_or(InboxType::Quorum);
    println!(
        "## inbox types: median of {} rounds ({} × {} B through Drawbridge A → B)",
        args.runs, args.messages, args.size
    );
    println!();
    let mut table = markdown_table(
        [
            "inbox".to_string(),
            "msg/s".into(),
            format!("× {base}"),
            "p50".into(),
            "p99".into(),
            "float B µs/msg".into(),
            "beam B µs/msg".into(),
            "bridge A µs/msg".into(),
            "beam A µs/msg".into(),
            "all processes µs/msg".into(),
            "other µs/msg".into(),
            "lost".into(),
            "dups".into(),
            "float read back".into(),
            "restart → ready".into(),
            "rebuild (float)".into(),
            "rounds (msg/s)".into(),
        ],
        1..16,
    );
    for s in summary {
        table.add_row(vec![
            s.inbox_type.to_string(),
            format!("{:.0}", s.msg_per_s),
            format!("{:.2}", s.ratio),
            format!("{:.1} ms", s.p50_ms),
            format!("{:.1} ms", s.p99_ms),
            format!("{:.0}", s.float_b_cpu_us),
            format!("{:.0}", s.beam_b_cpu_us),
            format!("{:.0}", s.bridge_a_cpu_us),
            format!("{:.0}", s.beam_a_cpu_us),
            format!("{:.0}", s.path_cpu_us),
            format!("{:.0}", s.other_cpu_us),
            s.lost.to_string(),
            s.duplicates.to_string(),
            opt(s.float_read_back.map(|v| format!("{v:.0}"))),
            opt(s.restart_ready_ms.map(|v| format!("{v:.0} ms"))),
            opt(s.last_rebuild_ms.map(|v| format!("{v:.0} ms"))),
            all.iter()
                .filter(|m| m.kind == s.inbox_type && m.round > 0)
                .map(|m| format!("{:.0}", m.sample.rate()))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    println!("{table}");
    println!();
    for s in summary {
        if s.inbox_type != base {
            println!(
                "ratio {}/{base}: {:.2} (of medians), {:.2} (median of per-round ratios)",
                s.inbox_type, s.ratio, s.ratio_paired
            );
        }
    }
    for s in summary {
        println!(
            "INBOX type={} msg_per_s={:.0} ratio={:.2} ratio_paired={:.2} p50_ms={:.1} p99_ms={:.1} float_cpu_us={:.1} beam_b_cpu_us={:.1} path_cpu_us={:.1} other_cpu_us={:.1} lost={} duplicates={} read_back={} restart_ready_ms={} rebuild_ms={}",
            s.inbox_type,
            s.msg_per_s,
            s.ratio,
            s.ratio_paired,
            s.p50_ms,
            s.p99_ms,
            s.float_b_cpu_us,
            s.beam_b_cpu_us,
            s.path_cpu_us,
            s.other_cpu_us,
            s.lost,
            s.duplicates,
            opt(s.float_read_back.map(|v| format!("{v:.0}"))),
            opt(s.restart_ready_ms.map(|v| format!("{v:.0}"))),
            opt(s.last_rebuild_ms.map(|v| format!("{v:.0}"))),
        );
    }
    println!();
}

/// The large stream: its flood and every restart.
fn print_large(bench: &Bench, m: &Measurement) {
    let names = bench.probes.all_names();
    println!(
        "## the window's rebuild with a large stream ({} × {} B, {} restart(s) of B's float)",
        m.sample.report.expected,
        bench.args.size,
        m.restarts.len()
    );
    println!();
    let r = &m.sample.report;
    println!(
        "flood into the stream: {:.0} msg/s, p50 {} p99 {}, float B {:.0} µs/msg, beam B {:.0} µs/msg, lost {} dups {}; the float read back {}",
        m.sample.rate(),
        ms(r.p50),
        ms(r.p99),
        m.cpu_us(&names, "float B"),
        m.cpu_us(&names, "beam B"),
        r.lost,
        r.duplicates,
        opt(m.read_back.as_ref().map(|r| r.read)),
    );
    println!();
    let mut table = markdown_table(
        [
            "restart",
            "start → ready",
            "rebuild (float)",
            "read back",
            "msg/s read back",
            "float CPU s",
            "beam B CPU s",
        ]
        .map(String::from),
        1..7,
    );
    for (i, s) in m.restarts.iter().enumerate() {
        let per_s = match (s.read, s.last_rebuild_ms) {
            (Some(read), Some(ms)) if ms > 0 => format!("{:.0}", read as f64 / ms as f64 * 1e3),
            _ => "—".into(),
        };
        table.add_row(vec![
            (i + 1).to_string(),
            format!("{:.0} ms", s.ready_ms),
            opt(s.last_rebuild_ms.map(|v| format!("{v} ms"))),
            opt(s.read),
            per_s,
            format!("{:.2}", s.float_cpu_s),
            format!("{:.2}", s.beam_b_cpu_s),
        ]);
    }
    println!("{table}");
    println!();
    if let Some(rc) = &m.reconnect {
        println!(
            "broker reconnect (B closed the float's connection): window ready again {:.0} ms after the close command was sent; the float's rebuild {} ms (connection lost → read back, the reconnect's backoff included), {} read on the new connection",
            rc.ready_after_ms,
            opt(rc.last_rebuild_ms),
            rc.read
        );
        println!(
            "INBOX_RECONNECT messages={} rebuild_ms={} read={} ready_after_ms={:.0}",
            m.sample.report.expected,
            opt(rc.last_rebuild_ms),
            rc.read,
            rc.ready_after_ms
        );
        println!();
    }
    let rebuild = median(
        m.restarts
            .iter()
            .filter_map(|s| s.last_rebuild_ms)
            .map(|v| v as f64)
            .collect(),
    );
    let ready = median(m.restarts.iter().map(|s| s.ready_ms).collect());
    let read = median(
        m.restarts
            .iter()
            .filter_map(|s| s.read)
            .map(|v| v as f64)
            .collect(),
    );
    println!(
        "INBOX_REBUILD messages={} size={} rebuild_ms={rebuild:.0} ready_ms={ready:.0} read={read:.0} flood_msg_per_s={:.0} lost={} duplicates={}",
        r.expected,
        bench.args.size,
        m.sample.rate(),
        r.lost,
        r.duplicates
    );
    println!();
}

#[derive(Debug, Serialize)]
struct MeasurementJson<'a> {
    inbox_type: InboxType,
    /// 0: the large stream of `--inbox-rebuild-messages`.
    round: usize,
    #[serde(flatten)]
    sample: output::SampleJson<'a>,
    markers_skipped: u64,
    float_read_back: Option<ReadBack>,
    restarts: Vec<Start>,
    reconnect: Option<Reconnect>,
}

#[derive(Debug, Serialize)]
struct ArgsJson<'a> {
    messages: u64,
    size: usize,
    runs: usize,
    warmup: u64,
    inbox_types: &'a [InboxType],
    inbox_rebuild_messages: u64,
    inbox_rebuild_restarts: usize,
    float_set: &'a [String],
}

#[derive(Debug, Serialize)]
struct Document<'a> {
    meta: &'a output::Meta,
    args: ArgsJson<'a>,
    summary: &'a [Summary],
    measurements: Vec<MeasurementJson<'a>>,
    large_stream: Option<MeasurementJson<'a>>,
}

fn measurement_json<'a>(
    m: &Measurement,
    experiment: &'static str,
    names: &[&'a str],
) -> MeasurementJson<'a> {
    MeasurementJson {
        inbox_type: m.kind,
        round: m.round,
        sample: output::sample_json(&m.sample, experiment, names),
        markers_skipped: m.markers_skipped,
        float_read_back: m.read_back.clone(),
        restarts: m.restarts.clone(),
        reconnect: m.reconnect.clone(),
    }
}

fn write_results(
    bench: &Bench,
    meta: &output::Meta,
    all: &[Measurement],
    summary: &[Summary],
    large: Option<&Measurement>,
) -> Result<std::path::PathBuf> {
    let args = &bench.args;
    let names = bench.probes.all_names();
    let doc = Document {
        meta,
        args: ArgsJson {
            messages: args.messages,
            size: args.size,
            runs: args.runs,
            warmup: args.warmup,
            inbox_types: &args.inbox_types,
            inbox_rebuild_messages: args.inbox_rebuild_messages,
            inbox_rebuild_restarts: args.inbox_rebuild_restarts,
            float_set: &args.float_set,
        },
        summary,
        measurements: all
            .iter()
            .map(|m| measurement_json(m, "inbox-flood", &names))
            .collect(),
        large_stream: large.map(|m| measurement_json(m, "inbox-large-stream", &names)),
    };
    std::fs::create_dir_all(&args.results)
        .with_context(|| format!("creating {}", args.results.display()))?;
    let path = args.results.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    Ok(path)
}

/// `--inbox-types`: every type, `--runs` rounds, then the large stream; prints the tables,
/// the `INBOX` lines and writes results.json. True when nothing was lost, corrupted or
/// unexpected anywhere and no stream inbox got a duplicate (its promise is exactly once).
pub(crate) async fn inbox_types(bench: &Bench, meta: &output::Meta) -> Result<bool> {
    let mut float = None;
    let result = run(bench, meta, &mut float).await;
    let _ = stop_float(&mut float).await;
    result
}

async fn run(bench: &Bench, meta: &output::Meta, float: &mut Option<Daemon>) -> Result<bool> {
    let args = &bench.args;
    let types = &args.inbox_types;
    println!(
        "## inbox types {}: Drawbridge A → B, {} × {} B per flood, {} rounds; a fresh inbox and B's float restarted per measurement",
        types
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        args.messages,
        args.size,
        args.runs
    );
    println!();
    if args.warmup > 0 {
        print!("warm-up ({} messages each):", args.warmup);
        for &t in types {
            let m = measure(bench, float, t, 0, args.warmup, &format!("warmup-{t}"), 0).await?;
            print!("  {t} {:.0} msg/s", m.sample.rate());
        }
        println!();
    }
    let mut all = Vec::new();
    for round in 1..=args.runs {
        for t in order(types, round - 1) {
            let m = measure(
                bench,
                float,
                t,
                round,
                args.messages,
                &format!("r{round}-{t}"),
                1,
            )
            .await?;
            progress(&m, args.runs);
            all.push(m);
        }
    }
    let summary = summarize(bench, &all);
    print_tables(bench, &all, &summary);
    let large = if types.contains(&InboxType::Stream) && args.inbox_rebuild_messages > 0 {
        println!(
            "large stream: {} messages through Drawbridge, then {} restart(s) of B's float…",
            args.inbox_rebuild_messages, args.inbox_rebuild_restarts
        );
        let mut m = measure(
            bench,
            float,
            InboxType::Stream,
            0,
            args.inbox_rebuild_messages,
            "large-stream",
            args.inbox_rebuild_restarts,
        )
        .await?;
        let f = float.as_ref().context("B's float")?;
        m.reconnect = Some(reconnect(bench, f).await?);
        print_large(bench, &m);
        Some(m)
    } else {
        None
    };
    let path = write_results(bench, meta, &all, &summary, large.as_ref())?;
    println!("wrote   : {}", path.display());
    let every = all.iter().chain(large.as_ref());
    let mut ok = true;
    for m in every {
        let r = &m.sample.report;
        if r.lost + r.corrupted + r.unexpected + r.wrong_sender > 0
            || (m.kind == InboxType::Stream && r.duplicates > 0)
        {
            ok = false;
        }
    }
    let lost: u64 = all
        .iter()
        .chain(large.as_ref())
        .map(|m| m.sample.report.lost)
        .sum();
    let dups: u64 = all
        .iter()
        .chain(large.as_ref())
        .map(|m| m.sample.report.duplicates)
        .sum();
    println!("RESULT lost={lost} duplicates={dups} ok={ok}");
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn inbox_types_are_parsed_and_alternate() {
        let none = crate::Args::try_parse_from(["drawbridge-bench"]).expect("defaults");
        assert!(none.inbox_types.is_empty());
        assert_eq!(none.inbox_rebuild_messages, 200_000);
        let some = crate::Args::try_parse_from([
            "drawbridge-bench",
            "--inbox-types",
            "quorum,stream",
            "--inbox-rebuild-messages",
            "0",
        ])
        .expect("--inbox-types");
        assert_eq!(some.inbox_types, vec![InboxType::Quorum, InboxType::Stream]);
        assert_eq!(some.inbox_rebuild_messages, 0);
        for bad in [
            &["--inbox-types", "lazy"][..],
            &["--inbox-types", "stream", "--hot-hot", "1"],
            &["--inbox-types", "stream", "--failovers", "1"],
            &["--inbox-types", "stream", "--idle-links", "10"],
        ] {
            let argv = std::iter::once("drawbridge-bench").chain(bad.iter().copied());
            assert!(
                crate::Args::try_parse_from(argv).is_err(),
                "{bad:?} accepted"
            );
        }
        let both = [InboxType::Quorum, InboxType::Stream];
        assert_eq!(order(&both, 0), both.to_vec());
        assert_eq!(order(&both, 1), vec![InboxType::Stream, InboxType::Quorum]);
        assert_eq!(InboxType::Stream.to_string(), "stream");
    }
}
