//! `drawbridge-bench`: one process, three private RabbitMQ nodes (A and C with the Shovel
//! plugin, B plain with a TLS listener besides), and the same N persistent messages moved
//! six ways, side by side:
//!
//! 1. **raw broker** — publish to a durable queue on B with confirms, consume on B (the
//!    ceiling of one broker hop);
//! 2. **Shovel** — a dynamic shovel on A (`ack-mode: on-confirm`, prefetch 1000) moves
//!    them from a queue on A to a queue on B;
//! 3. **Shovel on C** — the same shovel run on C, so beam C's CPU is its forwarding cost;
//! 4. **Shovel on C over TLS** — the same, publishing to B's TLS listener with a client
//!    certificate, so it pays for encryption on one hop as Drawbridge does;
//! 5. **Drawbridge** — A's bridge → B's float (real processes, mTLS AMQP 1.0) moves them
//!    from A's peer queue to B's inbox;
//! 6. **Drawbridge, tunnel mode** — A's bridge → a second float of B in tunnel mode (no
//!    broker, no key: docs/tunnel.md) → over the tunnel → B's own bridge, which publishes
//!    into B's inbox: what the extra hop costs.
//!
//! `--routes` picks some of them (by short name); the tunnel float and B's bridge are
//! started only when `drawbridge-tunnel` is measured.
//!
//! Instead of the paths, `--idle-links`, `--float-connections`, `--failovers` (`failover`)
//! `--hot-hot` (`hothot`: aggregate throughput of 1, 2, 3… hot-hot bridges sharing many
//! links) and `--inbox-types` (`inbox`: the Drawbridge path into a quorum inbox against a
//! stream inbox, and the stream window's rebuild after a float restart) measure one thing
//! each.
//!
//! Publisher and consumer run concurrently, so each figure is the throughput of the path
//! (first publish → last message consumed), not of a preloaded queue. The order of the
//! paths alternates per run; the machine is shared and noisy, so read the ratios, not the
//! absolute numbers. CPU time of every process involved is sampled from `/proc` (with
//! `procfs`) at the start and at the last message to show where the time goes. Tables are
//! printed as Markdown (with `comfy-table`), ready to paste into `docs/benchmarks.md`.
//!
//! Exit status: 0 when no message was lost anywhere, 1 otherwise.

#![forbid(unsafe_code)]

mod failover;
mod hothot;
mod inbox;
mod output;
mod scale;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use comfy_table::{presets::ASCII_MARKDOWN, CellAlignment, Table};
use drawbridge_certs::devpki;
use drawbridge_control_protocol::{ControlCommand, CreateLink, DeleteLink, Target};
use drawbridge_testkit::{
    daemon::{free_ports, Daemon, Kind},
    rabbit::{BrokerPki, NodeOptions, RabbitNode},
    stream::{self, PublishSpec, Report, Tally},
    world::{self, Org, INBOX},
};
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions},
    types::{FieldTable, ShortString},
    Channel, Connection, Consumer,
};
use procfs::{process::Process, CpuInfo, Current as _, CurrentSI as _, KernelStats, LoadAverage};

/// Benchmark options.
#[derive(Debug, Parser)]
#[command(
    name = "drawbridge-bench",
    about = "raw broker vs RabbitMQ Shovel vs Drawbridge, side by side in one run"
)]
struct Args {
    /// Messages per path and run.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Measured runs (the order of the paths alternates per run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Unmeasured warm-up messages per path before the runs (0: none).
    #[arg(long, default_value_t = 2_000)]
    warmup: u64,
    /// Working directory for PKI, daemon configs and logs (kept afterwards).
    #[arg(long, default_value = ".drawbridge/bench")]
    dir: PathBuf,
    /// Offered rates (msg/s) for the latency runs: each path gets `rate × --rate-seconds`
    /// messages of `--size` bytes, published on a fixed schedule (open loop), and reports
    /// p50 / p99 / p99.9 from the time each message was due. Empty (`--rates ''`): none.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<f64>,
    /// Seconds of traffic per offered rate and path.
    #[arg(long, default_value_t = 10)]
    rate_seconds: u64,
    /// Body sizes (bytes) for the size runs: one flood per size and path, of
    /// `--size-budget / size` messages (at least 200, at most `--messages`). Empty: none.
    #[arg(long, value_delimiter = ',', default_value = "128,1024,65536,1048576")]
    sizes: Vec<usize>,
    /// Bytes per size run and path (see `--sizes`).
    #[arg(long, default_value_t = 256 << 20)]
    size_budget: u64,
    /// Only the flood of `--size` bytes (no latency runs, no size runs).
    #[arg(long)]
    quick: bool,
    /// The paths to measure, by short name (comma-separated), in every experiment; they run
    /// in this list's order on even rounds and reversed on odd ones. The tunnel float and
    /// B's bridge are started only for `drawbridge-tunnel`.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values_t = Route::ALL
    )]
    routes: Vec<Route>,
    /// Where results.json, throughput.svg and latency.svg are written (not cleaned).
    #[arg(long, default_value = "target/drawbridge-bench")]
    results: PathBuf,
    /// Instead of the throughput paths: open this many idle peer links from A's bridge to
    /// B's float and report the time until all are up, then the bridge's and the float's
    /// CPU and RSS while the links idle (issue 9's scale figures).
    #[arg(long, default_value_t = 0)]
    idle_links: usize,
    /// Instead of the throughput paths: this process opens this many idle mTLS AMQP 1.0 peer
    /// connections (session + sending link each) to B's float and reports the time until all
    /// are open and the float's CPU and RSS while they idle (`--idle-seconds`). Needs an open
    /// file limit above this (`ulimit -n`); the bench raises its soft limit itself.
    #[arg(long, default_value_t = 0)]
    float_connections: usize,
    /// Extra `[float]` setting for this run, `key = value` in TOML (repeatable), e.g.
    /// `--float-set 'max_pending_handshakes_per_address = 1000'`: for tuning experiments.
    #[arg(long = "float-set", value_name = "KEY = VALUE")]
    float_set: Vec<String>,
    /// The same for the bridge's `[bridge]` table.
    #[arg(long = "bridge-set", value_name = "KEY = VALUE")]
    bridge_set: Vec<String>,
    /// How long the idle links are measured.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// Instead of the throughput paths: two hot-warm bridges of A and a steady stream;
    /// kill -9 the active bridge this many times and report how long the standby takes to
    /// be active and to forward (median), and lost / duplicates over the whole stream.
    #[arg(long, default_value_t = 0)]
    failovers: usize,
    /// Instead of the throughput paths: for each instance count (comma-separated, e.g.
    /// `1,2,3`) start that many hot-hot bridges of A (`ha = "hot-hot"`, distinct `bridge.id`s,
    /// the same config otherwise), give them `--hot-hot-links` peer links to B's float, wait
    /// until every link is up on exactly one instance, then flood `--messages` of `--size`
    /// bytes spread evenly over the links: aggregate msg/s, the forwarders' CPU per message
    /// (all bridges + float B), links per instance, lost and duplicates. `--runs` rounds, the
    /// order of the counts alternating per round; fresh bridges for every measurement.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_instances,
        conflicts_with_all = ["idle_links", "float_connections", "failovers"]
    )]
    hot_hot: Vec<usize>,
    /// Peer links (peer queues, all to B's float) shared by the hot-hot bridges of
    /// `--hot-hot`.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=2000))]
    hot_hot_links: u32,
    /// Instead of the throughput paths: the Drawbridge path A → B with B's inbox declared as
    /// each of these queue types in turn (comma-separated: `classic`, `quorum`, `stream`), e.g.
    /// `quorum,stream`. Per measurement the inbox is deleted and B's float restarted with
    /// `inbox_queue_type` set, so it declares the new type; then a flood of `--messages` of
    /// `--size` bytes (msg/s, p50/p99, CPU per message of B's float and broker, lost and
    /// duplicates), what the float read back (a stream), and the time a float restart takes
    /// until ready with the inbox holding the flood (`window.last_rebuild_ms` for a stream).
    /// `--runs` rounds, the order alternating per round.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        conflicts_with_all = ["idle_links", "float_connections", "failovers", "hot_hot"]
    )]
    inbox_types: Vec<inbox::InboxType>,
    /// With `--inbox-types` including `stream`: afterwards, a stream inbox filled with this
    /// many messages of `--size` bytes through Drawbridge, then B's float restarted
    /// `--inbox-rebuild-restarts` times: how the window's rebuild grows with the stream. 0:
    /// none.
    #[arg(long, default_value_t = 200_000)]
    inbox_rebuild_messages: u64,
    /// Float restarts on the large stream of `--inbox-rebuild-messages`.
    #[arg(long, default_value_t = 3)]
    inbox_rebuild_restarts: usize,
}

/// One instance count of `--hot-hot`: 1 to 16 bridges.
fn parse_instances(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=hothot::MAX_INSTANCES).contains(&n) => Ok(n),
        Ok(n) => Err(format!(
            "{n} instances: between 1 and {} hot-hot bridges",
            hothot::MAX_INSTANCES
        )),
        Err(e) => Err(format!("`{s}` is not an instance count: {e}")),
    }
}

const ORG_A: &str = "O=Bench A, L=London, C=GB";
const ORG_B: &str = "O=Bench B, L=Paris, C=FR";
/// Give up on a run when nothing arrives for this long (the rest counts as lost).
const IDLE: Duration = Duration::from_secs(60);
/// Publisher prefetch of the shovel; the bridge's window and the float's credit default
/// to 1000 as well, and the verifying consumer uses prefetch 1000.
const PREFETCH: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Route {
    Raw,
    Shovel,
    /// The same shovel, run on a third node C (consuming from A, publishing to B), so beam
    /// C's CPU is the Shovel's own forwarding cost, the counterpart of bridge + float.
    #[value(name = "shovel-c")]
    ShovelC,
    /// The Shovel on C publishing to B over TLS (amqps with a client certificate, the peer
    /// verified), so it pays for encryption on one hop as Drawbridge does on its peer link.
    #[value(name = "shovel-tls")]
    ShovelTls,
    Drawbridge,
    /// A's bridge → a second float of B in tunnel mode → over the tunnel → B's bridge →
    /// B's inbox: the extra hop of tunnel mode.
    #[value(name = "drawbridge-tunnel")]
    DrawbridgeTunnel,
}

impl Route {
    const ALL: [Route; 6] = [
        Route::Raw,
        Route::Shovel,
        Route::ShovelC,
        Route::ShovelTls,
        Route::Drawbridge,
        Route::DrawbridgeTunnel,
    ];

    /// The paths of `routes` in the order of round `i`: forwards, then backwards, so that
    /// no path always runs first (on a fresh broker) or last.
    fn order(routes: &[Route], i: usize) -> Vec<Route> {
        let mut order = routes.to_vec();
        if i % 2 == 1 {
            order.reverse();
        }
        order
    }

    fn name(self) -> &'static str {
        match self {
            Route::Raw => "raw broker (B→B)",
            Route::Shovel => "RabbitMQ Shovel on A (A→B)",
            Route::ShovelC => "RabbitMQ Shovel on C (A→C→B)",
            Route::ShovelTls => "RabbitMQ Shovel on C, TLS to B (A→C⇒B)",
            Route::Drawbridge => "Drawbridge (A→B)",
            Route::DrawbridgeTunnel => "Drawbridge, tunnel mode (A→B float⇒B bridge→B)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Route::Raw => "raw",
            Route::Shovel => "shovel",
            Route::ShovelC => "shovel-c",
            Route::ShovelTls => "shovel-tls",
            Route::Drawbridge => "drawbridge",
            Route::DrawbridgeTunnel => "drawbridge-tunnel",
        }
    }
}

/// The short name, as `--routes` takes it.
impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short())
    }
}

/// One transfer to measure: a path, how many messages of what size, and at what offered
/// rate (`None`: a flood, as fast as the path goes).
#[derive(Debug, Clone, Copy)]
struct Job {
    route: Route,
    n: u64,
    size: usize,
    rate: Option<f64>,
}

/// One measured transfer.
#[derive(Debug, Clone)]
struct Sample {
    route: Route,
    /// Body size in bytes.
    size: usize,
    /// Offered rate (msg/s) of a latency run; `None` for a flood.
    rate: Option<f64>,
    report: Report,
    /// First publish → last expected message consumed.
    e2e: Duration,
    /// CPU seconds per probe over `e2e` (same order as `Probes::names`).
    cpu: Vec<f64>,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.report.received as f64 / self.e2e.as_secs_f64().max(1e-9)
    }
}

/// CPU time of the processes on the path, from `/proc/<pid>/stat`, plus the rest of the
/// machine (`/proc/stat` busy time minus those processes).
#[derive(Debug)]
struct Probes {
    names: Vec<&'static str>,
    pids: Vec<Option<u32>>,
    tick: f64,
}

impl Probes {
    /// CPU seconds per probe, then "other" last.
    fn sample(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .pids
            .iter()
            .map(|p| proc_ticks(*p).unwrap_or(0) as f64 / self.tick)
            .collect();
        let ours: f64 = v.iter().sum();
        v.push(system_busy_ticks().unwrap_or(0) as f64 / self.tick - ours);
        v
    }

    fn all_names(&self) -> Vec<&'static str> {
        let mut n = self.names.clone();
        n.push("other");
        n
    }
}

/// utime + stime of a process (`None`: this process), in clock ticks.
fn proc_ticks(pid: Option<u32>) -> Option<u64> {
    let process = match pid {
        Some(p) => Process::new(i32::try_from(p).ok()?),
        None => Process::myself(),
    };
    let stat = process.ok()?.stat().ok()?;
    Some(stat.utime + stat.stime)
}

/// Busy ticks of the whole machine (every state of the `cpu` line but idle and iowait).
fn system_busy_ticks() -> Option<u64> {
    let t = KernelStats::current().ok()?.total;
    Some(
        t.user
            + t.nice
            + t.system
            + t.irq.unwrap_or(0)
            + t.softirq.unwrap_or(0)
            + t.steal.unwrap_or(0),
    )
}

/// `--float-set` / `--bridge-set` values as config lines. TOML refuses a key twice, so a key
/// the bench sets itself (the connection limits of `--idle-links` and `--float-connections`)
/// cannot be set again: the daemon then fails to start and says which key.
fn settings_lines(settings: &[String]) -> String {
    settings.iter().map(|l| format!("{l}\n")).collect()
}

/// Raise the soft limit of open files to at least `need` (up to the hard limit); the daemons
/// started afterwards inherit it.
fn raise_open_files(need: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        if hard < need {
            bail!("{need} open files needed, the hard limit is {hard} (raise it: ulimit -Hn)");
        }
        setrlimit(Resource::RLIMIT_NOFILE, need, hard)?;
    }
    Ok(())
}

fn beam_pid(node: &RabbitNode) -> Option<u32> {
    std::fs::read_to_string(node.dir().join("beam.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let mut args = Args::parse();
    // Each path once, in the order given.
    let mut routes = Vec::new();
    for r in std::mem::take(&mut args.routes) {
        if !routes.contains(&r) {
            routes.push(r);
        }
    }
    args.routes = routes;
    // Each instance count once, too.
    let mut counts = Vec::new();
    for n in std::mem::take(&mut args.hot_hot) {
        if !counts.contains(&n) {
            counts.push(n);
        }
    }
    args.hot_hot = counts;
    // And each inbox type once.
    let mut types = Vec::new();
    for t in std::mem::take(&mut args.inbox_types) {
        if !types.contains(&t) {
            types.push(t);
        }
    }
    args.inbox_types = types;
    drawbridge_certs::install_crypto_provider();
    run(args).await
}

/// Everything that lives for the whole benchmark.
struct Bench {
    na: RabbitNode,
    nb: RabbitNode,
    /// The third node, for the Shovels of `Route::ShovelC` and `Route::ShovelTls`.
    nc: RabbitNode,
    /// TLS options of `Route::ShovelTls`'s destination URI (CA, client certificate and key,
    /// `verify_peer`).
    shovel_tls_query: String,
    a: Org,
    b: Org,
    /// B's tunnel-mode float of `Route::DrawbridgeTunnel` (B's bridge, which dials it, is
    /// `b.bridge`); `None` when that path is not measured.
    tunnel: Option<TunnelFloat>,
    probes: Probes,
    args: Args,
}

/// A second float of B, in tunnel mode: no broker, no private key; B's bridge dials its
/// tunnel port, publishes into B's inbox what it hands over and signs its handshakes.
struct TunnelFloat {
    float: Daemon,
    /// Its peers' port, the target of A's links on `Route::DrawbridgeTunnel`.
    port: u16,
}

/// Start B's tunnel-mode float (its own peer, tunnel and admin ports; the tunnel's own dev
/// PKI under `dir/tunnel-pki`) and B's bridge dialling its tunnel; answer the bridge's
/// snapshot request and wait until the float shows its tunnel active. The configs are those
/// of `tests/tests/tunnel.rs`.
async fn start_tunnel(dir: &Path, b: &mut Org) -> Result<TunnelFloat> {
    let net = devpki::generate_network(&dir.join("tunnel-pki"), &[b.legal_name.parse()?])?;
    let t = net.nodes[0].clone();
    let [port, tunnel_port, admin_port] = free_ports::<3>()?;
    let peers = SocketAddr::from(([127, 0, 0, 1], port));
    let tunnel = SocketAddr::from(([127, 0, 0, 1], tunnel_port));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let cfg = format!(
        "[float]\nmode = \"tunnel\"\nlisten = \"{peers}\"\ntls_cert = {cert:?}\ntrust_roots = {root:?}\n\n[float.tunnel]\nlisten = \"{tunnel}\"\ntls_cert = {tcert:?}\ntls_key = {tkey:?}\ntrust_roots = {troot:?}\nbridges = [{name:?}]\n\n[admin]\nlisten = \"{admin}\"\n",
        cert = b.files.tls_cert.display().to_string(),
        root = b.files.root_cert.display().to_string(),
        tcert = t.tls_cert.display().to_string(),
        tkey = t.tls_key.display().to_string(),
        troot = t.root_cert.display().to_string(),
        name = b.legal_name,
    );
    let float = Daemon::start(Kind::Float, &b.dir, "float-tunnel", &cfg, admin)
        .await
        .context("B's tunnel-mode float")?;
    let bridge_lines = format!(
        "tunnel.floats = [\"{tunnel}\"]\ntunnel.tls_cert = {tcert:?}\ntunnel.tls_key = {tkey:?}\ntunnel.trust_roots = {troot:?}\n",
        tcert = t.tls_cert.display().to_string(),
        tkey = t.tls_key.display().to_string(),
        troot = t.root_cert.display().to_string(),
    );
    b.start_bridge(&bridge_lines)
        .await
        .context("B's bridge (tunnel)")?;
    // Like A's, B's bridge asks for a snapshot at start; it has no links of its own.
    b.snapshot(vec![]).await?;
    let within = Duration::from_secs(30);
    let deadline = Instant::now() + within;
    loop {
        let s = float.status().await.ok();
        if s.as_ref().is_some_and(|s| s["tunnel"]["active"] == true) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the tunnel float not active within {within:?}: {s:?}\nfloat log:\n{}",
                float.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(TunnelFloat { float, port })
}

async fn run(args: Args) -> Result<ExitCode> {
    let cmdline: Vec<String> = std::env::args().collect();
    let cpu_model = CpuInfo::current()
        .ok()
        .and_then(|c| c.model_name(0).map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let load = LoadAverage::current()
        .map(|l| format!("{:.2} {:.2} {:.2}", l.one, l.five, l.fifteen))
        .unwrap_or_else(|_| "?".into());
    let mut meta = output::Meta {
        command: cmdline.join(" "),
        date: sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        commit: sh("git", &["rev-parse", "HEAD"]),
        describe: sh("git", &["describe", "--always", "--dirty", "--abbrev=12"]),
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu: cpu_model,
        kernel: sh("uname", &["-r"]),
        loadavg: load,
        memory_kib: procfs::Meminfo::current().map_or(0, |m| m.mem_total / 1024),
        rabbitmq: String::new(),
    };
    println!("# drawbridge-bench");
    println!("command : {}", meta.command);
    println!("date    : {}", meta.date);
    println!("git     : {}", meta.describe);
    println!(
        "machine : nproc {} ({}), kernel {}, loadavg {}",
        meta.nproc, meta.cpu, meta.kernel, meta.loadavg
    );

    if args.float_connections > 0 {
        raise_open_files(args.float_connections as u64 + 1024)?;
    }
    let dir = std::env::current_dir()?.join(&args.dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cleaning {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;

    let shovel = || NodeOptions {
        plugins: vec!["rabbitmq_shovel".into()],
        ..Default::default()
    };
    // B also listens for TLS, for the Shovel over TLS (`shovel-tls`); Drawbridge's float
    // and the other paths use its plain listener, as they do on A.
    let broker_pki = BrokerPki::generate(&dir.join("broker-pki"))?;
    let (client_cert, client_key) = broker_pki.client_cert("shovel")?;
    let shovel_tls_query = format!(
        "cacertfile={}&certfile={}&keyfile={}&verify=verify_peer&server_name_indication=localhost",
        broker_pki.ca_cert.display(),
        client_cert.display(),
        client_key.display()
    );
    let (na, nb, nc) = tokio::join!(
        RabbitNode::start(shovel()),
        RabbitNode::start(NodeOptions {
            tls: Some(broker_pki.listener(true)),
            ..Default::default()
        }),
        RabbitNode::start(shovel())
    );
    let (na, nb, nc) = (
        na.context("broker A")?,
        nb.context("broker B")?,
        nc.context("broker C")?,
    );
    let version = nb.ctl(&["version"]).await.unwrap_or_default();
    let otp = nb
        .ctl(&["eval", "erlang:system_info(otp_release)."])
        .await
        .unwrap_or_default();
    meta.rabbitmq = format!(
        "{} (Erlang/OTP {})",
        version.trim(),
        otp.trim().trim_matches('"')
    );
    println!(
        "rabbitmq: {} (Erlang/OTP {}), node A :{} (rabbitmq_shovel), node B :{}, node C :{} (rabbitmq_shovel)",
        version.trim(),
        otp.trim().trim_matches('"'),
        na.amqp_port(),
        nb.amqp_port(),
        nc.amqp_port()
    );
    println!(
        "workload: {} persistent messages of {} bytes per path and run, {} runs, {} warm-up; \
         publisher confirms 512 in flight, consumer prefetch {PREFETCH}, acks every 100",
        args.messages, args.size, args.runs, args.warmup
    );

    let net = devpki::generate_network(&dir.join("pki"), &[ORG_A.parse()?, ORG_B.parse()?])?;
    let mut a = Org::new(net.nodes[0].clone(), vec![na.amqp_uri("/")], &dir);
    let mut b = Org::new(net.nodes[1].clone(), vec![nb.amqp_uri("/")], &dir);
    // Room for every idle link's connection (one per link, all from one peer and address).
    // Hot-hot: every link may briefly have two connections while it moves between instances.
    let hot_hot_room = if args.hot_hot.is_empty() {
        0
    } else {
        2 * args.hot_hot_links as usize
    };
    let float_extra = if args.idle_links > 0 || args.float_connections > 0 || hot_hot_room > 0 {
        let room = args.idle_links + args.float_connections + hot_hot_room + 16;
        format!(
            "max_connections = {room}\nmax_connections_per_peer = {room}\nmax_connections_per_address = {room}\n"
        )
    } else {
        String::new()
    };
    let float_extra = float_extra + &settings_lines(&args.float_set);
    // `--inbox-types` starts B's float per measurement, with the inbox type to measure.
    let inbox_types = !args.inbox_types.is_empty();
    if !inbox_types {
        b.start_float(&float_extra).await?;
    }
    // Hot-hot starts its own bridges of A, per measurement.
    let hot_hot = !args.hot_hot.is_empty();
    if !hot_hot {
        a.start_bridge(&settings_lines(&args.bridge_set)).await?;
        // The bridge asks for a snapshot at start; answer it (links come per run).
        a.snapshot(vec![]).await?;
    }
    // Tunnel mode only when its path is measured: the other modes (idle links, float
    // connections, failovers, hot-hot, inbox types) run as before.
    let throughput = args.failovers == 0
        && args.idle_links == 0
        && args.float_connections == 0
        && !hot_hot
        && !inbox_types;
    let tunnel = if throughput && args.routes.contains(&Route::DrawbridgeTunnel) {
        Some(start_tunnel(&dir, &mut b).await?)
    } else {
        None
    };

    let mut probes = Probes {
        names: vec!["beam A", "beam B", "beam C", "bridge A", "float B", "bench"],
        pids: vec![
            beam_pid(&na),
            beam_pid(&nb),
            beam_pid(&nc),
            a.bridge.as_ref().and_then(|d| d.pid()),
            b.float.as_ref().and_then(|d| d.pid()),
            None,
        ],
        tick: procfs::ticks_per_second() as f64,
    };
    if hot_hot {
        // Its bridges are added per measurement (see `hothot`).
        if let Some(i) = probes.names.iter().position(|n| *n == "bridge A") {
            probes.names.remove(i);
            probes.pids.remove(i);
        }
    }
    if let Some(t) = &tunnel {
        probes.names.extend(["bridge B", "float B (tunnel)"]);
        probes
            .pids
            .extend([b.bridge.as_ref().and_then(|d| d.pid()), t.float.pid()]);
    }
    if probes
        .names
        .iter()
        .zip(&probes.pids)
        // With `--inbox-types` B's float is started (and its pid set) per measurement.
        .any(|(name, pid)| {
            *name != "bench" && !(inbox_types && *name == "float B") && pid.is_none()
        })
    {
        println!("warning: some pids unknown, CPU figures incomplete: {probes:?}");
    }
    println!("logs    : {}", dir.display());
    println!();

    let mut bench = Bench {
        na,
        nb,
        nc,
        shovel_tls_query,
        a,
        b,
        tunnel,
        probes,
        args,
    };
    if bench.args.failovers > 0 {
        let ok = failover::failovers(&mut bench.a, &bench.b, bench.args.failovers).await;
        if let Some(f) = bench.b.float.as_mut() {
            let _ = f.terminate(Duration::from_secs(30)).await;
        }
        return Ok(if ok? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if hot_hot {
        let ok = hothot::hot_hot(&bench).await;
        if let Some(f) = bench.b.float.as_mut() {
            let _ = f.terminate(Duration::from_secs(30)).await;
        }
        return Ok(if ok? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if inbox_types {
        let ok = inbox::inbox_types(&bench, &meta).await;
        if let Some(d) = bench.a.bridge.as_mut() {
            let _ = d.terminate(Duration::from_secs(30)).await;
        }
        return Ok(if ok? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if bench.args.float_connections > 0 || bench.args.idle_links > 0 {
        let result = if bench.args.float_connections > 0 {
            scale::float_connections(
                &bench.a,
                &bench.b,
                &bench.probes,
                bench.args.float_connections,
                bench.args.idle_seconds,
            )
            .await
        } else {
            scale::idle_links(
                &bench.a,
                &mut bench.b,
                &bench.probes,
                bench.args.idle_links,
                bench.args.idle_seconds,
            )
            .await
        };
        for d in [bench.a.bridge.as_mut(), bench.b.float.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = d.terminate(Duration::from_secs(60)).await;
        }
        result?;
        return Ok(ExitCode::SUCCESS);
    }
    let result = measure_all(&bench).await;

    for d in [
        bench.a.bridge.as_mut(),
        bench.b.float.as_mut(),
        bench.b.bridge.as_mut(),
        bench.tunnel.as_mut().map(|t| &mut t.float),
    ]
    .into_iter()
    .flatten()
    {
        let _ = d.terminate(Duration::from_secs(20)).await;
    }
    drop((bench.na, bench.nb, bench.nc));
    let results = result?;
    let lost: u64 = results.all().map(|s| s.report.lost).sum();
    let bad: u64 = results
        .all()
        .map(|s| s.report.corrupted + s.report.unexpected + s.report.wrong_sender)
        .sum();
    let written = output::write(&meta, &bench.args, &bench.probes.all_names(), &results)
        .with_context(|| format!("writing results to {}", bench.args.results.display()))?;
    for path in written {
        println!("wrote   : {}", path.display());
    }
    println!(
        "RESULT lost={lost} corrupted/unexpected/wrong-sender={bad} duplicates={}",
        results.all().map(|s| s.report.duplicates).sum::<u64>()
    );
    if let Some(r) = results.ratios {
        println!("{}", output::ratio_line(&r));
    }
    Ok(if lost == 0 && bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Every sample of a benchmark, by experiment.
#[derive(Debug, Default)]
struct Results {
    /// The floods of `--size` bytes, `--runs` per path: throughput, CPU, the RATIO line.
    flood: Vec<Sample>,
    /// Latency at the offered rates of `--rates`.
    rates: Vec<Sample>,
    /// One flood per size of `--sizes`.
    sizes: Vec<Sample>,
    /// The headline ratios (of the flood).
    ratios: Option<Ratios>,
}

impl Results {
    fn all(&self) -> impl Iterator<Item = &Sample> {
        self.flood.iter().chain(&self.rates).chain(&self.sizes)
    }
}

async fn measure_all(bench: &Bench) -> Result<Results> {
    let mut results = Results {
        flood: measure_flood(bench).await?,
        ..Default::default()
    };
    results.ratios = Some(summary(bench, &results.flood));
    if !bench.args.quick {
        results.rates = measure_rates(bench).await?;
        results.sizes = measure_sizes(bench).await?;
    }
    Ok(results)
}

/// Latency at fixed offered rates: each path in turn (alternating order per rate).
async fn measure_rates(bench: &Bench) -> Result<Vec<Sample>> {
    let args = &bench.args;
    let mut samples = Vec::new();
    if args.rates.is_empty() {
        return Ok(samples);
    }
    println!(
        "## latency at offered rates ({} B, {} s per rate and path, open loop: latency from the time each message was due)",
        args.size, args.rate_seconds
    );
    println!();
    let mut table = markdown_table(
        [
            "offered msg/s",
            "path",
            "achieved msg/s",
            "p50",
            "p99",
            "p99.9",
            "lost",
            "dups",
        ]
        .map(String::from),
        2..8,
    );
    for (i, &rate) in args.rates.iter().enumerate() {
        let order = Route::order(&args.routes, i);
        for route in order {
            let job = Job {
                route,
                n: ((rate * args.rate_seconds as f64) as u64).max(1),
                size: args.size,
                rate: Some(rate),
            };
            let s = measure(bench, job, &format!("rate{i}")).await?;
            println!(
                "rate {rate:.0} msg/s {}: p50 {} p99 {} p99.9 {}",
                route.short(),
                ms(s.report.p50),
                ms(s.report.p99),
                ms(s.report.p999)
            );
            table.add_row(vec![
                format!("{rate:.0}"),
                route.short().to_string(),
                format!("{:.0}", s.rate()),
                ms(s.report.p50),
                ms(s.report.p99),
                ms(s.report.p999),
                s.report.lost.to_string(),
                s.report.duplicates.to_string(),
            ]);
            samples.push(s);
        }
    }
    println!();
    println!("{table}");
    println!();
    Ok(samples)
}

/// One flood per body size and path: msg/s and MB/s.
async fn measure_sizes(bench: &Bench) -> Result<Vec<Sample>> {
    let args = &bench.args;
    let mut samples = Vec::new();
    if args.sizes.is_empty() {
        return Ok(samples);
    }
    println!(
        "## sizes (a flood of {} MiB per size and path, at least 200 and at most {} messages)",
        args.size_budget >> 20,
        args.messages
    );
    println!();
    let names = bench.probes.all_names();
    let at = |name: &str| names.iter().position(|n| *n == name);
    let (bridge, float, beam_c) = (at("bridge A"), at("float B"), at("beam C"));
    let (bridge_b, tunnel_float) = (at("bridge B"), at("float B (tunnel)"));
    let mut table = markdown_table(
        [
            "size",
            "path",
            "messages",
            "msg/s",
            "MB/s",
            "p99",
            "lost",
            "dups",
            "forwarder CPU µs/msg",
        ]
        .map(String::from),
        2..9,
    );
    for (i, &size) in args.sizes.iter().enumerate() {
        let n = messages_for_size(size, args.size_budget, args.messages);
        let order = Route::order(&args.routes, i);
        for route in order {
            let job = Job {
                route,
                n,
                size,
                rate: None,
            };
            let s = measure(bench, job, &format!("size{i}")).await?;
            println!(
                "size {size} B {}: {:.0} msg/s, {:.1} MB/s",
                route.short(),
                s.rate(),
                s.rate() * size as f64 / 1e6
            );
            let per_msg = |i: Option<usize>| i.map_or(0.0, |i| s.cpu[i]) / n as f64 * 1e6;
            let forwarder = match route {
                Route::Drawbridge => format!("{:.0}", per_msg(bridge) + per_msg(float)),
                Route::DrawbridgeTunnel => format!(
                    "{:.0}",
                    per_msg(bridge) + per_msg(tunnel_float) + per_msg(bridge_b)
                ),
                Route::ShovelC | Route::ShovelTls => format!("{:.0}", per_msg(beam_c)),
                _ => String::new(),
            };
            table.add_row(vec![
                bytes(size),
                route.short().to_string(),
                n.to_string(),
                format!("{:.0}", s.rate()),
                format!("{:.1}", s.rate() * size as f64 / 1e6),
                ms(s.report.p99),
                s.report.lost.to_string(),
                s.report.duplicates.to_string(),
                forwarder,
            ]);
            samples.push(s);
        }
    }
    println!();
    println!("{table}");
    println!();
    Ok(samples)
}

/// Messages of `size` bytes in a size run: `budget` bytes, at least 200, at most `max`.
fn messages_for_size(size: usize, budget: u64, max: u64) -> u64 {
    (budget / size.max(1) as u64).clamp(200.min(max), max.max(1))
}

/// `1024` → "1 KiB", `1048576` → "1 MiB", `128` → "128 B".
fn bytes(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// The floods of `--size` bytes: `--runs` per path, the order alternating per run.
async fn measure_flood(bench: &Bench) -> Result<Vec<Sample>> {
    let args = &bench.args;
    if args.warmup > 0 {
        print!("warm-up ({} messages each):", args.warmup);
        for &route in &args.routes {
            let job = Job {
                route,
                n: args.warmup,
                size: args.size,
                rate: None,
            };
            let s = measure(bench, job, "warmup").await?;
            print!("  {} {:.0} msg/s", route.short(), s.rate());
        }
        println!();
        println!();
    }
    let mut table = markdown_table(
        [
            "run".to_string(),
            "path".into(),
            "msg/s".into(),
            "elapsed".into(),
            "p50".into(),
            "p99".into(),
            "lost".into(),
            "dups".into(),
            format!("CPU s: {}", bench.probes.all_names().join(" / ")),
        ],
        2..8,
    );
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let order = Route::order(&args.routes, run);
        for route in order {
            let tag = format!("r{}", run + 1);
            let job = Job {
                route,
                n: args.messages,
                size: args.size,
                rate: None,
            };
            let s = measure(bench, job, &tag).await?;
            // Progress while the runs go on; the table follows when all are done.
            println!(
                "run {}/{} {}: {:.0} msg/s",
                run + 1,
                args.runs,
                route.short(),
                s.rate()
            );
            table.add_row(vec![
                (run + 1).to_string(),
                route.short().to_string(),
                format!("{:.0}", s.rate()),
                format!("{:.2} s", s.e2e.as_secs_f64()),
                ms(s.report.p50),
                ms(s.report.p99),
                s.report.lost.to_string(),
                s.report.duplicates.to_string(),
                s.cpu
                    .iter()
                    .map(|c| format!("{c:.1}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
            ]);
            samples.push(s);
        }
    }
    println!();
    println!("{table}");
    Ok(samples)
}

/// The headline figures of the flood (medians over runs).
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Ratios {
    /// Drawbridge's msg/s over the faster of the two Shovels' (the harder bar).
    drawbridge_shovel: f64,
    /// Which Shovel that was (`shovel` on A or `shovel-c`).
    shovel_path: &'static str,
    drawbridge_raw: f64,
    /// Bridge A + float B CPU per message over beam C's CPU per message (the Shovel on C).
    forwarder_cpu_shovel_cpu: f64,
    /// Bridge A + float B, µs of CPU per message.
    forwarder_cpu_us: f64,
    /// Beam C while the Shovel on C forwards, µs of CPU per message.
    shovel_cpu_us: f64,
    /// Drawbridge's msg/s over the Shovel's over TLS (`shovel-tls`).
    drawbridge_shovel_tls: f64,
    /// Beam C while the Shovel on C forwards to B over TLS, µs of CPU per message.
    shovel_tls_cpu_us: f64,
    /// Bridge A + float B CPU per message over beam C's with TLS: both pay for encryption.
    forwarder_cpu_shovel_tls_cpu: f64,
    /// Drawbridge in tunnel mode's msg/s over Drawbridge's (direct mode): what the extra hop
    /// costs in throughput. `None` (null) when `drawbridge-tunnel` was not measured.
    drawbridge_tunnel_drawbridge: Option<f64>,
    /// Bridge A + B's tunnel-mode float + bridge B, µs of CPU per message (tunnel mode).
    tunnel_forwarder_cpu_us: Option<f64>,
    /// That over bridge A + float B's (`forwarder_cpu_us`): what the extra hop costs in CPU.
    tunnel_forwarder_cpu_forwarder_cpu: Option<f64>,
}

/// Print the flood's summary tables and return its headline ratios.
fn summary(bench: &Bench, samples: &[Sample]) -> Ratios {
    let n = bench.args.messages as f64;
    let of = |r: Route| samples.iter().filter(move |s| s.route == r);
    let med_rate = |r: Route| median(of(r).map(Sample::rate).collect());
    println!();
    println!(
        "## median of {} runs ({} × {} B per path and run)",
        bench.args.runs, bench.args.messages, bench.args.size
    );
    println!();
    let mut table = markdown_table(
        [
            "path",
            "msg/s",
            "MB/s",
            "p50",
            "p99",
            "lost",
            "dups",
            "runs (msg/s)",
        ]
        .map(String::from),
        1..7,
    );
    for &r in &bench.args.routes {
        let rate = med_rate(r);
        table.add_row(vec![
            r.name().to_string(),
            format!("{rate:.0}"),
            format!("{:.1}", rate * bench.args.size as f64 / 1e6),
            ms(Duration::from_secs_f64(median(
                of(r).map(|s| s.report.p50.as_secs_f64()).collect(),
            ))),
            ms(Duration::from_secs_f64(median(
                of(r).map(|s| s.report.p99.as_secs_f64()).collect(),
            ))),
            of(r).map(|s| s.report.lost).sum::<u64>().to_string(),
            of(r).map(|s| s.report.duplicates).sum::<u64>().to_string(),
            of(r)
                .map(|s| format!("{:.0}", s.rate()))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    println!("{table}");
    // Ratios: of the medians, and the median of the per-run ratios (paired within a run,
    // so less exposed to the machine getting slower or faster between runs).
    let paired = |x: Route, y: Route| -> f64 {
        let xs: Vec<f64> = of(x).map(Sample::rate).collect();
        let ys: Vec<f64> = of(y).map(Sample::rate).collect();
        median(xs.iter().zip(&ys).map(|(a, b)| a / b).collect())
    };
    println!();
    for (x, y) in [
        (Route::Drawbridge, Route::Raw),
        (Route::Drawbridge, Route::Shovel),
        (Route::Drawbridge, Route::ShovelC),
        (Route::Drawbridge, Route::ShovelTls),
        (Route::Shovel, Route::Raw),
        (Route::ShovelC, Route::Raw),
        (Route::ShovelTls, Route::ShovelC),
        (Route::DrawbridgeTunnel, Route::Drawbridge),
        (Route::DrawbridgeTunnel, Route::Raw),
    ] {
        if !bench.args.routes.contains(&x) || !bench.args.routes.contains(&y) {
            continue;
        }
        println!(
            "ratio {}/{}: {:.2} (of medians), {:.2} (median of per-run ratios)",
            x.short(),
            y.short(),
            med_rate(x) / med_rate(y),
            paired(x, y)
        );
    }
    println!();
    println!("## CPU per message (median over runs, µs of CPU per message delivered)");
    println!();
    let names = bench.probes.all_names();
    let mut table = markdown_table(
        std::iter::once("path".to_string())
            .chain(names.iter().map(|n| n.to_string()))
            .chain(std::iter::once("total".to_string())),
        1..names.len() + 2,
    );
    for &r in &bench.args.routes {
        let per = (0..names.len())
            .map(|i| median(of(r).map(|s| s.cpu[i] / n * 1e6).collect()))
            .map(|v| format!("{v:.0}"));
        let total = median(of(r).map(|s| s.cpu.iter().sum::<f64>() / n * 1e6).collect());
        table.add_row(
            std::iter::once(r.short().to_string())
                .chain(per)
                .chain(std::iter::once(format!("{total:.0}")))
                .collect::<Vec<_>>(),
        );
    }
    println!("{table}");
    println!();
    let at = |name: &str| names.iter().position(|x| *x == name);
    let cpu_us = |r: Route, who: &[Option<usize>]| {
        median(
            of(r)
                .map(|s| who.iter().flatten().map(|&i| s.cpu[i]).sum::<f64>() / n * 1e6)
                .collect(),
        )
    };
    let forwarder_cpu_us = cpu_us(Route::Drawbridge, &[at("bridge A"), at("float B")]);
    let shovel_cpu_us = cpu_us(Route::ShovelC, &[at("beam C")]);
    let shovel_tls_cpu_us = cpu_us(Route::ShovelTls, &[at("beam C")]);
    let tunnel = bench.args.routes.contains(&Route::DrawbridgeTunnel)
        && bench.args.routes.contains(&Route::Drawbridge);
    let tunnel_forwarder_cpu_us = cpu_us(
        Route::DrawbridgeTunnel,
        &[at("bridge A"), at("float B (tunnel)"), at("bridge B")],
    );
    let drawbridge_tunnel_drawbridge =
        med_rate(Route::DrawbridgeTunnel) / med_rate(Route::Drawbridge);
    let shovel = if med_rate(Route::ShovelC) > med_rate(Route::Shovel) {
        Route::ShovelC
    } else {
        Route::Shovel
    };
    let ratios = Ratios {
        drawbridge_shovel: med_rate(Route::Drawbridge) / med_rate(shovel),
        shovel_path: shovel.short(),
        drawbridge_raw: med_rate(Route::Drawbridge) / med_rate(Route::Raw),
        forwarder_cpu_shovel_cpu: forwarder_cpu_us / shovel_cpu_us,
        forwarder_cpu_us,
        shovel_cpu_us,
        drawbridge_shovel_tls: med_rate(Route::Drawbridge) / med_rate(Route::ShovelTls),
        shovel_tls_cpu_us,
        forwarder_cpu_shovel_tls_cpu: forwarder_cpu_us / shovel_tls_cpu_us,
        drawbridge_tunnel_drawbridge: tunnel.then_some(drawbridge_tunnel_drawbridge),
        tunnel_forwarder_cpu_us: tunnel.then_some(tunnel_forwarder_cpu_us),
        tunnel_forwarder_cpu_forwarder_cpu: tunnel
            .then_some(tunnel_forwarder_cpu_us / forwarder_cpu_us),
    };
    println!(
        "forwarder CPU per message: bridge A + float B {forwarder_cpu_us:.1} µs, the Shovel on C (beam C) {shovel_cpu_us:.1} µs: {:.2}",
        ratios.forwarder_cpu_shovel_cpu
    );
    println!(
        "with TLS on one hop each: bridge A + float B {forwarder_cpu_us:.1} µs, the Shovel on C over TLS {shovel_tls_cpu_us:.1} µs: {:.2}; throughput drawbridge/shovel-tls {:.2}",
        ratios.forwarder_cpu_shovel_tls_cpu, ratios.drawbridge_shovel_tls
    );
    println!(
        "throughput ratio against the faster Shovel ({}): {:.2}",
        shovel.short(),
        ratios.drawbridge_shovel
    );
    if let (Some(cpu), Some(rate)) = (
        ratios.tunnel_forwarder_cpu_forwarder_cpu,
        ratios.drawbridge_tunnel_drawbridge,
    ) {
        println!(
            "tunnel mode, the extra hop: bridge A + float B (tunnel) + bridge B {tunnel_forwarder_cpu_us:.1} µs, bridge A + float B {forwarder_cpu_us:.1} µs: {cpu:.2}; throughput drawbridge-tunnel/drawbridge {rate:.2}"
        );
    }
    println!();
    ratios
}

/// A Markdown table with `header`; the columns in `numeric` are right-aligned.
fn markdown_table(
    header: impl IntoIterator<Item = String>,
    numeric: std::ops::Range<usize>,
) -> Table {
    let mut table = Table::new();
    table.load_style(ASCII_MARKDOWN).set_header(header);
    for i in numeric {
        if let Some(c) = table.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Connection + channel on `uri`.
async fn channel(uri: &str) -> Result<(Connection, Channel)> {
    let c = stream::connect(uri).await?;
    let ch = c.create_channel().await?;
    Ok((c, ch))
}

fn spec(run: &str, n: u64, size: usize, destination: &str) -> PublishSpec {
    PublishSpec {
        run: run.to_string(),
        from: 0,
        to: n,
        size,
        destination: destination.to_string(),
        headers: vec![],
    }
}

async fn measure(bench: &Bench, job: Job, tag: &str) -> Result<Sample> {
    let Job { route, n, size, .. } = job;
    let run = format!("{}-{tag}", route.short());
    let (na, nb, nc, a, b) = (&bench.na, &bench.nb, &bench.nc, &bench.a, &bench.b);
    match route {
        Route::Raw => {
            let vhost = format!("bench-{tag}-raw");
            nb.create_vhost(&vhost).await?;
            let q = "bench.raw";
            let (c1, pub_ch) = channel(&nb.amqp_uri(&vhost)).await?;
            let (c2, recv_ch) = channel(&nb.amqp_uri(&vhost)).await?;
            world::declare_queue(&pub_ch, q).await?;
            let tally = Tally::new(&run, n, None);
            let s = timed(
                job,
                &bench.probes,
                (&pub_ch, q),
                (&recv_ch, q),
                &spec(&run, n, size, &b.legal_name),
                tally,
            )
            .await;
            close(c1, c2).await;
            nb.ctl(&["delete_vhost", &vhost]).await?;
            s
        }
        Route::Shovel | Route::ShovelC | Route::ShovelTls => {
            // The shovel runs on A (where it usually runs: the source broker) or on C.
            let on_c = route != Route::Shovel;
            let host = if on_c { nc } else { na };
            let vhost = format!("bench-{tag}-{}", route.short());
            na.create_vhost(&vhost).await?;
            nb.create_vhost(&vhost).await?;
            if on_c {
                nc.create_vhost(&vhost).await?;
            }
            let (src, dst) = ("bench.src", "bench.dst");
            let (c1, pub_ch) = channel(&na.amqp_uri(&vhost)).await?;
            let (c2, recv_ch) = channel(&nb.amqp_uri(&vhost)).await?;
            // Same arguments as a Drawbridge peer queue.
            world::declare_peer_queue(&pub_ch, src, "classic").await?;
            world::declare_queue(&recv_ch, dst).await?;
            let dest_uri = if route == Route::ShovelTls {
                format!(
                    "{}?{}",
                    nb.amqps_uri("guest:guest", &vhost),
                    bench.shovel_tls_query
                )
            } else {
                nb.amqp_uri(&vhost)
            };
            let def = serde_json::json!({
                "src-protocol": "amqp091",
                "src-uri": na.amqp_uri(&vhost),
                "src-queue": src,
                "src-prefetch-count": PREFETCH,
                "dest-protocol": "amqp091",
                "dest-uri": dest_uri,
                "dest-queue": dst,
                "ack-mode": "on-confirm",
                "reconnect-delay": 1,
            })
            .to_string();
            host.ctl(&["set_parameter", "-p", &vhost, "shovel", "bench", &def])
                .await?;
            wait_consumers(na, &vhost, src, 1, Duration::from_secs(30)).await?;
            let tally = Tally::new(&run, n, None);
            let s = timed(
                job,
                &bench.probes,
                (&pub_ch, src),
                (&recv_ch, dst),
                &spec(&run, n, size, &b.legal_name),
                tally,
            )
            .await;
            host.ctl(&["clear_parameter", "-p", &vhost, "shovel", "bench"])
                .await?;
            close(c1, c2).await;
            na.ctl(&["delete_vhost", &vhost]).await?;
            nb.ctl(&["delete_vhost", &vhost]).await?;
            if on_c {
                nc.ctl(&["delete_vhost", &vhost]).await?;
            }
            s
        }
        Route::Drawbridge | Route::DrawbridgeTunnel => {
            // A fresh peer queue (and link) per run; B's inbox is shared and must be empty.
            // The tunnel path differs only in the link's target: B's tunnel-mode float, whose
            // bridge publishes into the same inbox.
            let queue = match route {
                Route::DrawbridgeTunnel => format!("drawbridge.peers.bench-tunnel-{tag}"),
                _ => format!("{}bench-{tag}", "drawbridge.peers."),
            };
            let (c1, pub_ch) = channel(a.broker_uri()).await?;
            let (c2, recv_ch) = channel(b.broker_uri()).await?;
            world::declare_peer_queue(&pub_ch, &queue, "classic").await?;
            world::declare_queue(&recv_ch, INBOX).await?;
            let depth = nb.queue_depth("/", INBOX).await?;
            if depth != 0 {
                bail!("{INBOX} on B holds {depth} messages before run {run}");
            }
            let mut link = a.link_to(b);
            link.queue = queue.clone();
            if route == Route::DrawbridgeTunnel {
                let tunnel = bench
                    .tunnel
                    .as_ref()
                    .context("the tunnel float was not started")?;
                link.targets = vec![Target::new("127.0.0.1", tunnel.port)];
            }
            a.control(&ControlCommand::CreateLink(CreateLink {
                node_identity: a.legal_name.clone(),
                link,
            }))
            .await?;
            a.wait_link_state(&queue, "up", Duration::from_secs(30))
                .await?;
            let tally = Tally::new(&run, n, Some(a.legal_name.clone()));
            let s = timed(
                job,
                &bench.probes,
                (&pub_ch, &queue),
                (&recv_ch, INBOX),
                &spec(&run, n, size, &b.legal_name),
                tally,
            )
            .await;
            a.control(&ControlCommand::DeleteLink(DeleteLink {
                node_identity: a.legal_name.clone(),
                queue: queue.clone(),
            }))
            .await?;
            wait_link_gone(a, &queue, Duration::from_secs(20)).await?;
            pub_ch
                .queue_delete(
                    ShortString::from(queue.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await?;
            close(c1, c2).await;
            s
        }
    }
}

async fn close(c1: Connection, c2: Connection) {
    let _ = c1.close(200, ShortString::from("bench done")).await;
    let _ = c2.close(200, ShortString::from("bench done")).await;
}

/// Publish `spec` to `publish.1` and consume `consume.1` concurrently; time from the
/// first publish to the last expected message consumed.
async fn timed(
    job: Job,
    probes: &Probes,
    publish: (&Channel, &str),
    consume: (&Channel, &str),
    spec: &PublishSpec,
    tally: Tally,
) -> Result<Sample> {
    timed_spread(job, probes, &[(publish.0, publish.1, spec)], consume, tally).await
}

/// [`timed`] with several publishers at once, each publishing its `PublishSpec` (one run,
/// disjoint sequence ranges) to its queue on its own channel; `n` is the sum of their ranges.
async fn timed_spread(
    job: Job,
    probes: &Probes,
    publishers: &[(&Channel, &str, &PublishSpec)],
    consume: (&Channel, &str),
    tally: Tally,
) -> Result<Sample> {
    timed_from(
        job,
        probes,
        publishers,
        consume,
        FieldTable::default(),
        tally,
    )
    .await
    .map(|(s, _)| s)
}

/// [`timed_spread`] with `consume_args` for the verifying consumer's `basic.consume` (a
/// stream's `x-stream-offset`); returns the tally too (for the window markers it skipped).
async fn timed_from(
    job: Job,
    probes: &Probes,
    publishers: &[(&Channel, &str, &PublishSpec)],
    consume: (&Channel, &str),
    consume_args: FieldTable,
    mut tally: Tally,
) -> Result<(Sample, Tally)> {
    let n: u64 = publishers.iter().map(|(_, _, s)| s.to - s.from).sum();
    let run = publishers.first().map_or("", |(_, _, s)| s.run.as_str());
    let (recv_ch, recv_q) = consume;
    recv_ch
        .basic_qos(PREFETCH as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = recv_ch
        .basic_consume(
            ShortString::from(recv_q),
            ShortString::from(format!("drawbridge-bench-{run}")),
            BasicConsumeOptions::default(),
            consume_args,
        )
        .await
        .with_context(|| format!("consuming {recv_q}"))?;
    let cpu0 = probes.sample();
    let start = Instant::now();
    let publish = futures::future::join_all(publishers.iter().map(|&(ch, q, spec)| async move {
        stream::publish_paced(ch, q, spec, job.rate, |_| {})
            .await
            .with_context(|| format!("publishing to {q}"))
    }));
    let (sent, got) = tokio::join!(
        publish,
        consume_all(recv_ch, &mut consumer, &mut tally, n, probes)
    );
    for s in sent {
        s?;
    }
    let (end, cpu1) = got?;
    let sample = Sample {
        route: job.route,
        size: job.size,
        rate: job.rate,
        report: tally.report(),
        e2e: end.saturating_duration_since(start),
        cpu: cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).collect(),
    };
    Ok((sample, tally))
}

/// Like `stream::consume` (prefetch set by the caller, multiple-ack every 100, a short
/// drain for late duplicates, a float's window markers in a stream inbox skipped), but it
/// also returns the instant the last expected message arrived and the CPU sample taken then,
/// which the end-to-end figures need.
async fn consume_all(
    ch: &Channel,
    consumer: &mut Consumer,
    tally: &mut Tally,
    n: u64,
    probes: &Probes,
) -> Result<(Instant, Vec<f64>)> {
    let mut unacked = 0u32;
    let mut last_tag = 0;
    let mut last_seen = Instant::now();
    let mut done = None;
    while tally.distinct() < n {
        let d = match tokio::time::timeout(IDLE, consumer.next()).await {
            Err(_) => break,
            Ok(None) => bail!("consumer cancelled"),
            Ok(Some(Err(e))) => bail!("consuming: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        // A marker is acked with the rest (on a stream the acks are the consumer's credit).
        if !tally.skip_marker(d.properties.headers().as_ref()) {
            record(tally, &d);
        }
        last_seen = Instant::now();
        if tally.distinct() >= n {
            done = Some((last_seen, probes.sample()));
        }
        last_tag = d.delivery_tag;
        unacked += 1;
        if unacked >= 100 {
            ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await?;
            unacked = 0;
        }
    }
    if unacked > 0 {
        ch.basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await?;
    }
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        if !tally.skip_marker(d.properties.headers().as_ref()) {
            record(tally, &d);
        }
        ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await?;
    }
    Ok(done.unwrap_or_else(|| (last_seen, probes.sample())))
}

fn record(tally: &mut Tally, d: &lapin::message::Delivery) {
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string());
    let sender = stream::header_string(d.properties.headers().as_ref(), stream::SENDER);
    tally.record(id.as_deref(), &d.data, sender.as_deref());
}

/// Wait until `queue` in `vhost` has `want` consumers (the shovel attached).
async fn wait_consumers(
    node: &RabbitNode,
    vhost: &str,
    queue: &str,
    want: u64,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = node
            .ctl(&[
                "list_queues",
                "-p",
                vhost,
                "--quiet",
                "--no-table-headers",
                "name",
                "consumers",
            ])
            .await?;
        let got = out
            .lines()
            .filter_map(|l| l.rsplit_once('\t'))
            .find(|(name, _)| *name == queue)
            .and_then(|(_, c)| c.trim().parse::<u64>().ok());
        if got == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let status = node.ctl(&["shovel_status"]).await.unwrap_or_default();
            bail!("{queue} has {got:?} consumers, want {want}; shovel_status:\n{status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_link_gone(org: &Org, queue: &str, within: Duration) -> Result<()> {
    let bridge = org.bridge.as_ref().context("bridge not started")?;
    let deadline = Instant::now() + within;
    loop {
        let s = bridge.status().await?;
        let present = s["links"]
            .as_array()
            .is_some_and(|ls| ls.iter().any(|l| l["queue"] == queue));
        if !present {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("link {queue} not deleted within {within:?}: {s}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_markdown() {
        let mut t = markdown_table(["path", "msg/s"].map(String::from), 1..2);
        t.add_row(vec!["raw".to_string(), "12345".to_string()]);
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("| path"), "{text}");
        assert!(lines[1].starts_with("|-"), "{text}");
        assert!(lines[2].starts_with("| raw"), "{text}");
        assert!(lines[2].ends_with("12345 |"), "right-aligned: {text}");
    }

    #[test]
    fn routes_are_chosen_by_their_short_names_and_alternate() {
        use clap::ValueEnum as _;
        for r in Route::ALL {
            let value = r.to_possible_value().expect("a value");
            assert_eq!(value.get_name(), r.short());
            assert_eq!(Route::from_str(r.short(), false), Ok(r));
        }
        let all = Args::try_parse_from(["drawbridge-bench"]).expect("defaults");
        assert_eq!(all.routes, Route::ALL.to_vec());
        let some = Args::try_parse_from([
            "drawbridge-bench",
            "--routes",
            "drawbridge,drawbridge-tunnel",
        ])
        .expect("--routes");
        assert_eq!(
            some.routes,
            vec![Route::Drawbridge, Route::DrawbridgeTunnel]
        );
        assert!(Args::try_parse_from(["drawbridge-bench", "--routes", "tunnel"]).is_err());
        assert_eq!(Route::order(&Route::ALL, 0), Route::ALL.to_vec());
        let back = Route::order(&Route::ALL, 1);
        assert_eq!(back.len(), 6);
        assert_eq!(back[0], Route::DrawbridgeTunnel);
        assert_eq!(back[5], Route::Raw);
        assert_eq!(Route::order(&Route::ALL, 2), Route::ALL.to_vec());
    }

    #[test]
    fn hot_hot_takes_instance_counts_and_a_link_count() {
        let none = Args::try_parse_from(["drawbridge-bench"]).expect("defaults");
        assert!(none.hot_hot.is_empty());
        assert_eq!(none.hot_hot_links, 30);
        let some = Args::try_parse_from([
            "drawbridge-bench",
            "--hot-hot",
            "1,2,3",
            "--hot-hot-links",
            "12",
            "--messages",
            "30000",
        ])
        .expect("--hot-hot");
        assert_eq!(some.hot_hot, vec![1, 2, 3]);
        assert_eq!(some.hot_hot_links, 12);
        assert_eq!(some.messages, 30_000);
        let one = Args::try_parse_from(["drawbridge-bench", "--hot-hot", "2"]).expect("one count");
        assert_eq!(one.hot_hot, vec![2]);
        assert_eq!(one.hot_hot_links, 30);
        for bad in [
            &["--hot-hot", "0"][..],
            &["--hot-hot", "1,x"],
            &["--hot-hot", "17"],
            &["--hot-hot", "1,2", "--hot-hot-links", "0"],
            &["--hot-hot", "1", "--idle-links", "10"],
            &["--hot-hot", "1", "--failovers", "2"],
            &["--hot-hot", "1", "--float-connections", "10"],
        ] {
            let argv = std::iter::once("drawbridge-bench").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_ratio_line_keeps_its_fields_and_adds_the_tunnels() {
        let mut r = Ratios {
            drawbridge_shovel: 1.5,
            shovel_path: "shovel-c",
            drawbridge_raw: 0.5,
            forwarder_cpu_shovel_cpu: 0.25,
            forwarder_cpu_us: 10.0,
            shovel_cpu_us: 40.0,
            drawbridge_shovel_tls: 2.0,
            shovel_tls_cpu_us: 50.0,
            forwarder_cpu_shovel_tls_cpu: 0.2,
            drawbridge_tunnel_drawbridge: None,
            tunnel_forwarder_cpu_us: None,
            tunnel_forwarder_cpu_forwarder_cpu: None,
        };
        let without =
            "RATIO drawbridge/shovel=1.50 drawbridge/raw=0.50 forwarder_cpu/shovel_cpu=0.25";
        assert_eq!(output::ratio_line(&r), without);
        r.drawbridge_tunnel_drawbridge = Some(0.75);
        r.tunnel_forwarder_cpu_us = Some(18.0);
        r.tunnel_forwarder_cpu_forwarder_cpu = Some(1.8);
        assert_eq!(
            output::ratio_line(&r),
            format!("{without} drawbridge-tunnel/drawbridge=0.75 tunnel_forwarder_cpu/forwarder_cpu=1.80")
        );
    }

    #[test]
    fn cpu_time_is_sampled() {
        let mine = proc_ticks(None).expect("this process");
        let by_pid = proc_ticks(Some(std::process::id())).expect("this process by pid");
        assert!(by_pid >= mine);
        assert!(system_busy_ticks().expect("/proc/stat") >= mine);
        assert!(procfs::ticks_per_second() > 0);
    }
}
