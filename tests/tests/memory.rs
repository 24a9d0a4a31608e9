//! Memory held by the daemons while big messages flow (opt-in measurement, not a bound
//! checked in CI: `cargo test --release -p drawbridge-testkit --test memory -- --ignored
//! --nocapture`). Preloads `DRAWBRIDGE_MEMORY_MESSAGES` (default 1,000) messages of 1 MiB
//! on one link and prints the bridge's and the float's peak RSS (VmHWM) once all arrived.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use drawbridge_certs::devpki;
use drawbridge_testkit::{
    rabbit::{NodeOptions, RabbitNode},
    stream::{self, PublishSpec, Tally},
    world::{self, Org, INBOX},
    BANK_A, BANK_B,
};

fn peak_rss_mib(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::test]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn peak_memory_with_big_messages() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    let n: u64 = std::env::var("DRAWBRIDGE_MEMORY_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (na, nb) = tokio::join!(
        RabbitNode::start(NodeOptions::default()),
        RabbitNode::start(NodeOptions::default())
    );
    let (na, nb) = (na?, nb?);
    let dir = tempfile::tempdir()?;
    let pki =
        devpki::generate_network(&dir.path().join("pki"), &[BANK_A.parse()?, BANK_B.parse()?])?;
    let mut a = Org::new(pki.nodes[0].clone(), vec![na.amqp_uri("/")], dir.path());
    let mut b = Org::new(pki.nodes[1].clone(), vec![nb.amqp_uri("/")], dir.path());
    let (_ca, cha) = a.channel().await?;
    let q = a.queue_to(&b);
    world::declare_peer_queue(&cha, &q, "classic").await?;
    let spec = PublishSpec {
        run: "mem".into(),
        from: 0,
        to: n,
        size: 1024 * 1024,
        destination: BANK_B.into(),
        headers: vec![],
    };
    stream::publish(&cha, &q, &spec, |_| {}).await?;
    b.start_float("").await?;
    a.start_bridge("").await?;
    let t0 = Instant::now();
    a.create_link_to(&b).await?;
    let (_cb, chb) = b.channel().await?;
    world::declare_queue(&chb, INBOX).await?;
    loop {
        if nb.queue_depth("/", INBOX).await.unwrap_or(0) >= n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("not all {n} arrived within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = t0.elapsed();
    let bridge = peak_rss_mib(a.bridge.as_ref().and_then(|d| d.pid()));
    let float = peak_rss_mib(b.float.as_ref().and_then(|d| d.pid()));
    let mut tally = Tally::new("mem", n, Some(BANK_A.to_string()));
    stream::consume(&chb, INBOX, &mut tally, Duration::from_secs(30), |_| {}).await?;
    let r = tally.report();
    println!(
        "MEMORY | {n} x 1 MiB on one link | bridge peak RSS {bridge:.0} MiB | float peak RSS {float:.0} MiB | all arrived in {:.1} s | lost {} | duplicates {} |",
        elapsed.as_secs_f64(),
        r.lost,
        r.duplicates
    );
    assert!(r.complete() && r.corrupted == 0, "{r:?}");
    Ok(())
}
