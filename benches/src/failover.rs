//! `--failovers N`: hot-warm bridge failover, measured. Two bridges of A (the same
//! configuration; one active, one standby, see `bridge/src/ha.rs`) and a steady stream from
//! A's node to B's inbox. N times: kill -9 the active bridge and time, from the kill, until
//! the standby reports itself active and until its link has forwarded a message (the peer
//! accepted it); then the killed bridge is started again and becomes the standby. At the end
//! the whole stream is verified at B's inbox: lost, duplicates.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drawbridge_testkit::{
    daemon::Daemon,
    stream::{self, PublishSpec, Tally},
    world::{self, Org, INBOX},
};

/// Messages per second of the stream while bridges are killed.
const RATE: u64 = 500;

/// What one kill -9 cost.
struct Round {
    active_after: Duration,
    forwarding_after: Duration,
}

/// The index of the active bridge, once exactly one is active.
async fn active_one(bridges: &[Daemon; 2], within: Duration) -> Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut active = Vec::new();
        for (i, b) in bridges.iter().enumerate() {
            if let Ok(s) = b.status().await {
                if s["ha_state"] == "active" {
                    active.push(i);
                }
            }
        }
        if let [i] = active[..] {
            return Ok(i);
        }
        if Instant::now() > deadline {
            bail!("no single active bridge within {within:?} (active: {active:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages `bridge`'s link on `queue` has forwarded (0 when it has no such link).
async fn forwarded(bridge: &Daemon, queue: &str) -> u64 {
    let Ok(s) = bridge.status().await else {
        return 0;
    };
    s["links"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["queue"] == queue))
        .and_then(|l| l["forwarded"].as_u64())
        .unwrap_or(0)
}

pub(crate) async fn failovers(a: &mut Org, b: &Org, rounds: usize) -> Result<bool> {
    let q = a.queue_to(b);
    {
        let (_c, ch) = a.channel().await?;
        world::declare_peer_queue(&ch, &q, "classic").await?;
    }
    let _responder = a.answer_snapshot_requests(vec![a.link_to(b)]).await?;
    a.snapshot(vec![a.link_to(b)]).await?;
    let first = a.bridge.take().context("bridge started")?;
    let second = a.start_extra_bridge("bridge-2", "").await?;
    let mut bridges = [first, second];

    // Enough stream for every round (about 5 s each) and some on either side.
    let n = RATE * (10 + 6 * rounds as u64);
    println!(
        "## {rounds} × kill -9 of the active bridge, {n} messages at {RATE} msg/s from A to B"
    );
    println!();
    let rx = {
        let uris = b.broker_uris.clone();
        let sender = a.legal_name.clone();
        tokio::spawn(async move {
            let conn = drawbridge_testkit::node::connect_any(&uris).await?;
            let ch = conn.create_channel().await?;
            world::declare_queue(&ch, INBOX).await?;
            let mut tally = Tally::new("failover", n, Some(sender));
            stream::consume(&ch, INBOX, &mut tally, Duration::from_secs(60), |_| {}).await?;
            anyhow::Ok(tally.report())
        })
    };
    let tx = {
        let (uris, q, destination) = (a.broker_uris.clone(), q.clone(), b.legal_name.clone());
        tokio::spawn(async move {
            let conn = drawbridge_testkit::node::connect_any(&uris).await?;
            let ch = conn.create_channel().await?;
            let chunk = RATE / 20;
            let mut at = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while at < n {
                tick.tick().await;
                let end = (at + chunk).min(n);
                let spec = PublishSpec {
                    run: "failover".into(),
                    from: at,
                    to: end,
                    size: 1024,
                    destination: destination.clone(),
                    headers: vec![],
                };
                stream::publish(&ch, &q, &spec, |_| {}).await?;
                at = end;
            }
            anyhow::Ok(())
        })
    };

    let mut results = Vec::new();
    for round in 1..=rounds {
        let i = active_one(&bridges, Duration::from_secs(30)).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while forwarded(&bridges[i], &q).await == 0 {
            if Instant::now() > deadline {
                bail!("round {round}: the active bridge forwards nothing");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let other = 1 - i;
        bridges[i].kill9().await?;
        let killed = Instant::now();
        let mut active_after = None;
        let forwarding_after = loop {
            if active_after.is_none() {
                if let Ok(s) = bridges[other].status().await {
                    if s["ha_state"] == "active" {
                        active_after = Some(killed.elapsed());
                    }
                }
            }
            if forwarded(&bridges[other], &q).await > 0 {
                break killed.elapsed();
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: the standby did not forward within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let r = Round {
            active_after: active_after.unwrap_or(forwarding_after),
            forwarding_after,
        };
        println!(
            "round {round}: kill -9 → standby active after {} ms, forwarding after {} ms",
            r.active_after.as_millis(),
            r.forwarding_after.as_millis()
        );
        results.push(r);
        // The killed one comes back as the standby.
        bridges[i].restart().await?;
        bridges[i].wait_ready(Duration::from_secs(30)).await?;
    }
    tx.await??;
    let report = rx.await??;
    for b in &mut bridges {
        let _ = b.terminate(Duration::from_secs(30)).await;
    }

    let median = |mut v: Vec<u128>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let active = median(results.iter().map(|r| r.active_after.as_millis()).collect());
    let forwarding = median(
        results
            .iter()
            .map(|r| r.forwarding_after.as_millis())
            .collect(),
    );
    println!();
    println!("| rounds | standby active (median) | standby forwarding (median) | all rounds, forwarding (ms) | messages | lost | duplicates |");
    println!("|---:|---:|---:|---|---:|---:|---:|");
    println!(
        "| {rounds} | {active} ms | {forwarding} ms | {} | {n} | {} | {} |",
        results
            .iter()
            .map(|r| r.forwarding_after.as_millis().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        report.lost,
        report.duplicates
    );
    println!();
    println!(
        "FAILOVER rounds={rounds} median_active_ms={active} median_forwarding_ms={forwarding} lost={} duplicates={} corrupted={}",
        report.lost, report.duplicates, report.corrupted
    );
    Ok(report.lost == 0 && report.corrupted == 0 && report.unexpected == 0)
}
