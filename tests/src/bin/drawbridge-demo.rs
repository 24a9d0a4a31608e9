//! `drawbridge-demo` (run as `drawbridge demo`): two organisations on two private RabbitMQ
//! nodes, each with a float and a bridge as real processes, links created through the control
//! protocol, a verifiable stream each way, and a summary.
//!
//! It lives in the test kit because it starts brokers and daemons the way the tests do; the
//! operator CLI forwards `drawbridge demo` to this binary.
#![forbid(unsafe_code)]

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Parser;
use comfy_table::{presets::UTF8_FULL_CONDENSED, CellAlignment, Table};
use drawbridge_certs::devpki;
use drawbridge_testkit::{
    rabbit::{NodeOptions, RabbitNode},
    stream::{self, progress_bar, PublishSpec, Report, Tally},
    world::{self, Org, INBOX},
    BANK_A, BANK_B,
};
use indicatif::MultiProgress;

/// Demo options.
#[derive(Debug, Parser)]
#[command(
    name = "drawbridge demo",
    version,
    about = "End-to-end demo: two organisations, messages both ways over mTLS AMQP 1.0"
)]
struct DemoArgs {
    /// Messages each way.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Working directory for PKI, configs and daemon logs (kept afterwards).
    #[arg(long, default_value = ".drawbridge/demo")]
    dir: PathBuf,
}

#[tokio::main]
async fn main() {
    let args = DemoArgs::parse();
    drawbridge_certs::install_crypto_provider();
    let code = match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drawbridge demo: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(args: DemoArgs) -> Result<i32> {
    let dir = std::fs::canonicalize(".")?.join(&args.dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cleaning {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    step("starting two private RabbitMQ nodes (organisation A and B)");
    let (na, nb) = tokio::join!(
        RabbitNode::start(NodeOptions::default()),
        RabbitNode::start(NodeOptions::default())
    );
    let (na, nb) = (na.context("broker A")?, nb.context("broker B")?);
    println!(
        "      A: amqp://127.0.0.1:{}   B: amqp://127.0.0.1:{}",
        na.amqp_port(),
        nb.amqp_port()
    );

    step("generating the dev PKI (root CA → node CA → TLS certificate per organisation)");
    let net = devpki::generate_network(&dir.join("pki"), &[BANK_A.parse()?, BANK_B.parse()?])?;
    let mut a = Org::new(net.nodes[0].clone(), vec![na.amqp_uri("/")], &dir);
    let mut b = Org::new(net.nodes[1].clone(), vec![nb.amqp_uri("/")], &dir);

    step("starting floats and bridges as separate processes");
    a.start_float("").await?;
    b.start_float("").await?;
    a.start_bridge("").await?;
    b.start_bridge("").await?;
    println!(
        "      float A :{}  float B :{}  (admin: A float {} bridge {}, B float {} bridge {})",
        a.float_port, b.float_port, a.float_admin, a.bridge_admin, b.float_admin, b.bridge_admin
    );

    step("nodes answer the bridges' snapshot requests with their links (control protocol)");
    // Each node answers its bridge's snapshot requests with the link to the other side.
    let _node_a = a.answer_snapshot_requests(vec![a.link_to(&b)]).await?;
    let _node_b = b.answer_snapshot_requests(vec![b.link_to(&a)]).await?;
    a.wait_link_state(&a.queue_to(&b), "up", Duration::from_secs(30))
        .await?;
    b.wait_link_state(&b.queue_to(&a), "up", Duration::from_secs(30))
        .await?;
    println!("      link A→B up, link B→A up (mTLS, TLS 1.3, peer subjects pinned)");

    step(&format!(
        "sending {} messages A→B and {} B→A ({} bytes each)",
        args.messages, args.messages, args.size
    ));
    let mp = MultiProgress::new();
    let started = std::time::Instant::now();
    let counters: [Counters; 2] = Default::default();
    // Progress bars need a terminal; otherwise (CI, logs) print a line every 2 s.
    let ticker = (!std::io::stderr().is_terminal()).then(|| {
        let c = counters.clone();
        let n = args.messages;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                println!(
                    "      progress: A→B sent {}/{n} received {}/{n} | B→A sent {}/{n} received {}/{n}",
                    c[0].sent.load(Ordering::Relaxed),
                    c[0].received.load(Ordering::Relaxed),
                    c[1].sent.load(Ordering::Relaxed),
                    c[1].received.load(Ordering::Relaxed)
                );
            }
        })
    });
    let (ab, ba) = tokio::join!(
        direction(&a, &b, "a2b", args.messages, args.size, &mp, &counters[0]),
        direction(&b, &a, "b2a", args.messages, args.size, &mp, &counters[1])
    );
    if let Some(t) = ticker {
        t.abort();
    }
    let elapsed = started.elapsed();
    let (ab, ba) = (ab?, ba?);

    println!();
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "link",
        "sent",
        "received",
        "lost",
        "duplicates",
        "msg/s",
        "p50",
        "p99",
    ]);
    for (name, r) in [("A → B", &ab), ("B → A", &ba)] {
        table.add_row(vec![
            name.to_string(),
            r.expected.to_string(),
            r.received.to_string(),
            r.lost.to_string(),
            r.duplicates.to_string(),
            format!("{:.0}", r.rate()),
            fmt_ms(r.p50),
            fmt_ms(r.p99),
        ]);
    }
    for i in 1..8 {
        if let Some(c) = table.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    println!("{table}");
    let total = |f: fn(&Report) -> u64| f(&ab) + f(&ba);
    println!(
        "  both ways: {} messages in {:.2}s = {:.0} msg/s; corrupted {}, unexpected {}, wrong sender {}",
        total(|r| r.received),
        elapsed.as_secs_f64(),
        total(|r| r.received) as f64 / elapsed.as_secs_f64(),
        total(|r| r.corrupted),
        total(|r| r.unexpected),
        total(|r| r.wrong_sender)
    );

    step("stopping everything (SIGTERM: daemons drain and exit)");
    for d in [
        a.bridge.as_mut(),
        b.bridge.as_mut(),
        a.float.as_mut(),
        b.float.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        d.terminate(Duration::from_secs(20)).await?;
    }
    drop((na, nb));
    println!("      logs and configs kept in {}", dir.display());
    let ok = ab.complete() && ba.complete() && total(|r| r.unexpected) == 0;
    println!(
        "RESULT sent={} received={} lost={} duplicates={}",
        total(|r| r.expected),
        total(|r| r.received),
        total(|r| r.lost),
        total(|r| r.duplicates)
    );
    Ok(if ok { 0 } else { 1 })
}

/// Live counts of one direction, for the non-terminal progress lines.
#[derive(Debug, Default, Clone)]
struct Counters {
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

async fn direction(
    from: &Org,
    to: &Org,
    run: &str,
    n: u64,
    size: usize,
    mp: &MultiProgress,
    counters: &Counters,
) -> Result<Report> {
    let label = format!("{}→{}", short(&from.legal_name), short(&to.legal_name));
    let sent_bar = mp.add(progress_bar(n, "sent"));
    sent_bar.set_prefix(label.clone());
    let recv_bar = mp.add(progress_bar(n, "received"));
    recv_bar.set_prefix(label);
    let (_c1, send_ch) = from.channel().await?;
    let (_c2, recv_ch) = to.channel().await?;
    let queue = from.queue_to(to);
    world::declare_peer_queue(&send_ch, &queue, "classic").await?;
    world::declare_queue(&recv_ch, INBOX).await?;
    let spec = PublishSpec {
        run: run.to_string(),
        from: 0,
        to: n,
        size,
        destination: to.legal_name.clone(),
        headers: vec![],
    };
    let mut tally = Tally::new(run, n, Some(from.legal_name.clone()));
    let (sent, received) = tokio::join!(
        stream::publish(&send_ch, &queue, &spec, |k| {
            sent_bar.set_position(k);
            counters.sent.store(k, Ordering::Relaxed);
        }),
        stream::consume(&recv_ch, INBOX, &mut tally, Duration::from_secs(60), |k| {
            recv_bar.set_position(k);
            counters.received.store(k, Ordering::Relaxed);
        })
    );
    sent?;
    received?;
    sent_bar.finish();
    recv_bar.finish();
    Ok(tally.report())
}

fn short(name: &str) -> String {
    name.split(',')
        .next()
        .unwrap_or(name)
        .trim_start_matches("O=")
        .to_string()
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn step(s: &str) {
    println!("==> {s}");
}
