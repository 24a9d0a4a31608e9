//! `--idle-links N`: what idle links cost. N peer links from A's bridge to B's float (one
//! mTLS connection and one broker consumer each), created with one snapshot; the time until
//! all are up, then the bridge's and the float's CPU (% of one core) and resident memory while
//! nothing moves. An idle link should cost nothing but its memory: anything that ticks per link
//! shows up here multiplied by N.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use drawbridge_bridge::peer::{self, PeerConnection, PeerSettings};
use drawbridge_certs::{TlsIdentity, TlsPolicy};
use drawbridge_control_protocol::{PeerLink, Target, DEFAULT_TARGET_ADDRESS};
use drawbridge_testkit::world::Org;
use futures::StreamExt;
use procfs::process::Process;

use crate::Probes;

/// After 5 s for the start-up to settle (TLS sessions, first heartbeats), each probe's CPU
/// over `seconds` of idling, as % of one core, by probe name (NaN for an unknown name).
async fn idle_cpu(probes: &Probes, seconds: u64) -> impl Fn(&str) -> f64 {
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = probes.sample();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = probes.sample();
    let elapsed = t0.elapsed().as_secs_f64();
    let names = probes.all_names();
    move |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .map_or(f64::NAN, |i| (after[i] - before[i]) / elapsed * 100.0)
    }
}

/// Resident set size of `pid` in MiB.
fn rss_mib(pid: Option<u32>) -> Option<f64> {
    let p = Process::new(i32::try_from(pid?).ok()?).ok()?;
    Some(p.status().ok()?.vmrss? as f64 / 1024.0)
}

pub(crate) async fn idle_links(
    a: &Org,
    b: &mut Org,
    probes: &Probes,
    n: usize,
    seconds: u64,
) -> Result<()> {
    let bridge = a.bridge.as_ref().expect("bridge started");
    let (bridge_pid, float_pid) = (bridge.pid(), b.float.as_ref().and_then(|f| f.pid()));
    let (rss_bridge_0, rss_float_0) = (rss_mib(bridge_pid), rss_mib(float_pid));
    let links: Vec<PeerLink> = (0..n)
        .map(|i| PeerLink {
            queue: format!("drawbridge.peers.idle-{i}"),
            targets: vec![Target::new("127.0.0.1", b.float_port)],
            legal_names: vec![b.legal_name.clone()],
            target_address: DEFAULT_TARGET_ADDRESS.to_string(),
        })
        .collect();
    println!("## {n} idle links, A's bridge → B's float");
    println!();
    let start = Instant::now();
    a.snapshot(links).await?;
    let mut last_print = Instant::now();
    let all_up = loop {
        let status = bridge.status().await?;
        let up = status["links"]
            .as_array()
            .map_or(0, |ls| ls.iter().filter(|l| l["state"] == "up").count());
        if up == n {
            break start.elapsed();
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            println!(
                "  {up}/{n} links up after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("only {up} of {n} links up after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("  all {n} up after {:.2} s", all_up.as_secs_f64());
    let pct = idle_cpu(probes, seconds).await;
    let (rss_bridge, rss_float) = (rss_mib(bridge_pid), rss_mib(float_pid));
    let fmt = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.1}"));
    println!();
    println!("| process | idle CPU (% of a core, {seconds} s) | RSS before links (MiB) | RSS with {n} links (MiB) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| bridge A | {:.2} | {} | {} |",
        pct("bridge A"),
        fmt(rss_bridge_0),
        fmt(rss_bridge)
    );
    println!(
        "| float B | {:.2} | {} | {} |",
        pct("float B"),
        fmt(rss_float_0),
        fmt(rss_float)
    );
    println!("| beam A | {:.2} | | |", pct("beam A"));
    println!("| beam B | {:.2} | | |", pct("beam B"));
    println!();
    println!(
        "SCALE links={n} all_up_s={:.2} bridge_idle_cpu_pct={:.2} bridge_rss_mib={} float_idle_cpu_pct={:.2} float_rss_mib={}",
        all_up.as_secs_f64(),
        pct("bridge A"),
        fmt(rss_bridge),
        pct("float B"),
        fmt(rss_float)
    );
    reconnect_storm(a, b, n).await
}

/// After the idle measurement: kill -9 the float, start it again, and time how the `n` links
/// come back (each link reconnects on its own back-off with jitter, so they should arrive
/// spread out, not all in the same instant).
async fn reconnect_storm(a: &Org, b: &mut Org, n: usize) -> Result<()> {
    let bridge = a.bridge.as_ref().expect("bridge started");
    let float = b.float.as_mut().expect("float started");
    println!();
    println!("## reconnect storm: kill -9 of the float with {n} links, then started again");
    println!();
    float.kill9().await?;
    // Wait until the bridge has noticed (most links down), so "up" below means "up again".
    let noticed = Instant::now();
    loop {
        let up = links_up(&bridge.status().await?).len();
        if up < n / 10 + 1 || noticed.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    float.restart().await?;
    let restarted = start.elapsed();
    let mut first_up: std::collections::HashMap<String, Duration> = Default::default();
    let mut last_print = Instant::now();
    while first_up.len() < n {
        let status = bridge.status().await?;
        let at = start.elapsed();
        for q in links_up(&status) {
            first_up.entry(q).or_insert(at);
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            println!(
                "  {}/{n} links up again after {:.1} s",
                first_up.len(),
                at.as_secs_f64()
            );
            last_print = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {} of {n} links up again after 10 minutes",
                first_up.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut times: Vec<f64> = first_up.values().map(Duration::as_secs_f64).collect();
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!();
    println!(
        "| float restarted after | first link up | 10 % | 50 % | 90 % | all up | spread p10–p90 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
        restarted.as_secs_f64(),
        at(0.0),
        at(0.1),
        at(0.5),
        at(0.9),
        at(1.0),
        at(0.9) - at(0.1)
    );
    println!();
    println!(
        "STORM links={n} all_up_again_s={:.2} p50_s={:.2} spread_p10_p90_s={:.2}",
        at(1.0),
        at(0.5),
        at(0.9) - at(0.1)
    );
    Ok(())
}

/// Queues of the links a bridge's `/status` shows up.
fn links_up(status: &serde_json::Value) -> Vec<String> {
    status["links"].as_array().map_or_else(Vec::new, |ls| {
        ls.iter()
            .filter(|l| l["state"] == "up")
            .filter_map(|l| l["queue"].as_str().map(str::to_string))
            .collect()
    })
}

/// How many connections are in the TLS handshake or AMQP open at once: below the float's
/// `max_pending_handshakes_per_address` (32), since every connection comes from 127.0.0.1.
const OPENING_AT_ONCE: usize = 24;

/// `--float-connections N`: this process opens N idle mTLS AMQP 1.0 peer connections (one
/// session and one sending link each, as a bridge's link does) to B's float with A's
/// certificate, and reports the time until all are open, then the float's CPU and RSS while
/// they idle. A bridge stops at 2047 links per broker connection (one channel each); this
/// measures what a float pays for an inbound connection, whoever holds it.
pub(crate) async fn float_connections(
    a: &Org,
    b: &Org,
    probes: &Probes,
    n: usize,
    seconds: u64,
) -> Result<()> {
    let float_pid = b.float.as_ref().and_then(|f| f.pid());
    let rss_float_0 = rss_mib(float_pid);
    let rss_self_0 = rss_mib(Some(std::process::id()));
    let identity = TlsIdentity::load(&a.files.tls_cert, &a.files.tls_key)?;
    let roots = drawbridge_certs::load_trust_roots(&a.files.root_cert)?;
    let tls = drawbridge_certs::client_config(
        &identity,
        roots,
        vec![b.legal_name.parse()?],
        TlsPolicy::Tls13Only,
    )?;
    let settings = PeerSettings {
        tls,
        connect_timeout: Duration::from_secs(30),
        // A bridge's default `idle_timeout`: the float sends each connection an empty frame
        // every 15 s, and gets one as often (it announces 30 s too).
        idle_timeout: Duration::from_secs(30),
        container_id: "drawbridge-bench-load".into(),
        link_name: "load".into(),
        address: DEFAULT_TARGET_ADDRESS.into(),
        canary_address: None,
        proxy: None,
    };
    let target = Target::new("127.0.0.1", b.float_port);
    println!("## {n} idle inbound connections on B's float (from this process, A's certificate)");
    println!();
    let start = Instant::now();
    let mut opened = futures::stream::iter(0..n)
        .map(|i| {
            let (target, mut settings) = (target.clone(), settings.clone());
            settings.link_name = format!("load-{i}");
            async move {
                // A refused connection (a limit, a busy host) is tried again, as a bridge would.
                let mut backoff = Duration::from_millis(100);
                for _ in 0..8 {
                    match peer::connect(&target, &settings).await {
                        Ok(c) => return Ok(c),
                        Err(e) => {
                            note_refusal(i, &e.reason());
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                bail!("connection {i} could not be opened 8 times in a row")
            }
        })
        .buffer_unordered(OPENING_AT_ONCE);
    let mut conns = Vec::with_capacity(n);
    let mut last_print = Instant::now();
    while let Some(c) = opened.next().await {
        conns.push(c?);
        if last_print.elapsed() > Duration::from_secs(2) {
            println!(
                "  {}/{n} open after {:.1} s",
                conns.len(),
                start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
    }
    drop(opened);
    let all_open = start.elapsed();
    println!("  all {n} open after {:.2} s", all_open.as_secs_f64());
    let pct = idle_cpu(probes, seconds).await;
    let (rss_float, rss_self) = (rss_mib(float_pid), rss_mib(Some(std::process::id())));
    let fmt = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.1}"));
    let per_conn_kib = match (rss_float_0, rss_float) {
        (Some(x), Some(y)) => format!("{:.1}", (y - x) * 1024.0 / n as f64),
        _ => "?".into(),
    };
    println!();
    println!("| process | idle CPU (% of a core, {seconds} s) | RSS before (MiB) | RSS with {n} connections (MiB) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| float B | {:.2} | {} | {} |",
        pct("float B"),
        fmt(rss_float_0),
        fmt(rss_float)
    );
    println!(
        "| load generator (bench) | {:.2} | {} | {} |",
        pct("bench"),
        fmt(rss_self_0),
        fmt(rss_self)
    );
    println!();
    let closing = Instant::now();
    futures::stream::iter(conns)
        .for_each_concurrent(64, PeerConnection::close)
        .await;
    println!(
        "  all {n} closed in {:.2} s",
        closing.elapsed().as_secs_f64()
    );
    println!(
        "SCALE float_connections={n} all_open_s={:.2} float_idle_cpu_pct={:.2} float_rss_mib={} float_rss_per_connection_kib={per_conn_kib}",
        all_open.as_secs_f64(),
        pct("float B"),
        fmt(rss_float),
    );
    Ok(())
}

/// The first refusal of a connection is worth a line (a limit the run should raise); the
/// retries of the same connection are not.
fn note_refusal(i: usize, reason: &str) {
    static SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
        println!("  connection {i} refused, retrying: {reason}");
    }
}
