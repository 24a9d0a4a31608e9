//! A stream inbox (`float.inbox_queue_type = "stream"`): the float rebuilds its dedup window
//! from the stream, so a resend of a message the broker stored is recognised after the float
//! restarts (docs/guarantees.md, "Exactly once into a stream inbox").

use std::time::Duration;

use anyhow::{ensure, Result};
use drawbridge_control_protocol::Target;
use drawbridge_testkit::{
    daemon::{Daemon, Kind},
    fe2o3_peer::{self, PeerConnection},
    fixtures::{link_up, send, two_orgs, TwoOrgs},
    peer_client::{attacker_sends, peer_settings},
    stream::{self, Report, Tally},
    world::{self, Org, INBOX},
};
use fe2o3_amqp::types::{
    messaging::{AmqpValue, Body},
    primitives::Value,
};
use lapin::types::{AMQPValue, LongString};

const FAST_BRIDGE: &str = "reconnect_max = \"2s\"\nidle_timeout = \"5s\"\nsettle_timeout = \"10s\"\nconnect_timeout = \"3s\"";
const STREAM_FLOAT: &str = "idle_timeout = \"5s\"\ninbox_queue_type = \"stream\"";

/// Read B's stream inbox from its first offset: the report, and the window markers skipped.
pub async fn read_stream(at: &Org, run: &str, n: u64, sender: &str) -> Result<(Report, u64)> {
    let (_c, ch) = at.channel().await?;
    let mut tally = Tally::new(run, n, Some(sender.to_string()));
    stream::consume_from(
        &ch,
        INBOX,
        Some(AMQPValue::LongString(LongString::from("first"))),
        &mut tally,
        Duration::from_secs(30),
        |_| {},
    )
    .await?;
    Ok((tally.report(), tally.markers()))
}

/// Wait until B's float has accepted at least `n` transfers.
async fn accepted_at_least(at: &Org, n: u64, within: Duration) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(f) = &at.float {
            if let Ok(s) = f.status().await {
                let a = s["accepted"].as_u64().unwrap_or_default();
                if a >= n {
                    return Ok(a);
                }
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "B's float never accepted {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kill -9 of the float mid-stream: the bridge resends what it had in flight, much of which
/// the broker had stored. The restarted float reads the stream back before it publishes, so
/// none of it is stored twice. (With a queue inbox this scenario stores ~1,000 twice: fault
/// scenario b.)
#[tokio::test]
async fn a_restarted_float_reads_the_stream_back_and_stores_no_resend_twice() -> Result<()> {
    let mut p = two_orgs().await?;
    link_up(
        &mut p.a,
        &mut p.b,
        STREAM_FLOAT,
        FAST_BRIDGE,
        Duration::from_secs(30),
    )
    .await?;
    let n = 20_000;
    send(&p.a, &p.b, "s-kill", n).await?;
    let before = accepted_at_least(&p.b, 3_000, Duration::from_secs(60)).await?;
    let float = p.b.float.as_mut().expect("B's float");
    float.kill9().await?;
    float.restart().await?;
    let (report, markers) = read_stream(&p.b, "s-kill", n, &p.a.legal_name).await?;
    eprintln!("stream inbox, float killed after {before} accepted: {report:?}, markers {markers}");
    ensure!(
        report.lost == 0 && report.corrupted == 0 && report.wrong_sender == 0,
        "{report:?}"
    );
    // The node can have read every message before the float finished its read back: when
    // the float had accepted everything before the kill, nothing waits for its window (CI saw
    // 17,868 of 20,003 entries read back, still rebuilding, on a loaded machine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = p.b.float.as_ref().expect("B's float").status().await?;
        if status["window"]["state"] == "ready" {
            break status;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the restarted float's window not ready within 60 s: {:#}",
            status["window"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("window after the restart: {:#}", status["window"]);
    let read = status["window"]["inboxes"][0]["read"]
        .as_u64()
        .unwrap_or_default();
    ensure!(
        read >= before,
        "the restarted float read {read} back, {before} were accepted before"
    );
    let suppressed = status["duplicates_suppressed"].as_u64().unwrap_or_default();
    // Let late resends land, then read the whole stream once more: every message once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (again, _) = read_stream(&p.b, "s-kill", n, &p.a.legal_name).await?;
    eprintln!("second read: {again:?}; resends recognised from the stream: {suppressed}");
    ensure!(again.lost == 0 && again.duplicates == 0, "{again:?}");
    ensure!(markers >= 2, "a marker per start at least: {markers}");
    Ok(())
}

/// A connection of A's node straight to the float on `port` (A's own certificate), with one
/// link `link`.
async fn a_connects(p: &TwoOrgs, port: u16, link: &str) -> Result<PeerConnection> {
    let settings = peer_settings(
        &p.a,
        &p.b,
        &p.a.files.tls_cert,
        &p.a.files.tls_key,
        "bank-a-node",
        link,
    )?;
    fe2o3_peer::connect(&Target::new("127.0.0.1", port), &settings)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Messages `0..n` of run `run` on `c`, one at a time; every one must be accepted.
async fn send_on(c: &mut PeerConnection, p: &TwoOrgs, run: &str, n: u64) -> Result<()> {
    for seq in 0..n {
        let body = stream::make_body(seq, 256);
        let outcome = attacker_sends(c, &p.b, &stream::message_id(run, seq), |m| {
            m.body = Body::Value(AmqpValue(Value::Binary(body.into())));
        })
        .await?;
        ensure!(outcome.contains("Accepted"), "{run}-{seq}: {outcome}");
    }
    Ok(())
}

/// The condition the promise excludes: two floats publishing for one inbox at the same time
/// (one sender's resend reaching the second while the first's copy is not read back yet).
/// What is documented: nothing is lost; a copy can be stored twice, and every copy stored
/// twice within the window is counted by each float reading the stream
/// (`window.inboxes[].duplicates_stored`), so the count matches what a reader finds. Once
/// both have read the stream back, the same messages again are all recognised.
#[tokio::test]
async fn two_floats_publishing_for_one_inbox_at_once_count_every_copy_stored_twice() -> Result<()> {
    let mut p = two_orgs().await?;
    p.b.start_float(STREAM_FLOAT).await?;
    let (float2, port2) = p.b.start_extra_float("float-2", STREAM_FLOAT).await?;
    let mut c1 = a_connects(&p, p.b.float_port, "to-float-1").await?;
    let mut c2 = a_connects(&p, port2, "to-float-2").await?;
    let n = 300;
    // The same messages through both floats at once.
    let (r1, r2) = tokio::join!(
        send_on(&mut c1, &p, "two", n),
        send_on(&mut c2, &p, "two", n)
    );
    r1?;
    r2?;
    let (report, _) = read_stream(&p.b, "two", n, &p.a.legal_name).await?;
    eprintln!("two floats at once: {report:?}");
    ensure!(report.lost == 0 && report.corrupted == 0, "{report:?}");
    let stored_twice = report.duplicates;
    let floats = [p.b.float.as_ref().expect("float 1"), &float2];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let counted = loop {
        let mut counted = Vec::new();
        for f in floats {
            let s = f.status().await?;
            counted.push(
                s["window"]["inboxes"][0]["duplicates_stored"]
                    .as_u64()
                    .unwrap_or_default(),
            );
        }
        if counted.iter().all(|c| *c == stored_twice) || tokio::time::Instant::now() > deadline {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("copies stored twice: {stored_twice} found by the reader, counted by the floats {counted:?}");
    ensure!(
        counted.iter().all(|c| *c == stored_twice),
        "each float counts every copy stored twice: reader {stored_twice}, floats {counted:?}"
    );
    // Everything is read back now: the same messages again, through float 2 on a new link,
    // are all recognised and nothing more is stored.
    let before = float2.status().await?["duplicates_suppressed"]
        .as_u64()
        .unwrap_or_default();
    let mut c3 = a_connects(&p, port2, "again").await?;
    send_on(&mut c3, &p, "two", n).await?;
    let after = float2.status().await?["duplicates_suppressed"]
        .as_u64()
        .unwrap_or_default();
    ensure!(after - before == n, "{} of {n} recognised", after - before);
    let (again, _) = read_stream(&p.b, "two", n, &p.a.legal_name).await?;
    ensure!(
        again.lost == 0 && again.duplicates == stored_twice,
        "nothing more stored: {again:?}"
    );
    Ok(())
}

/// An inbox the node declared as a classic queue while the float is told it is a stream: the
/// float says so, takes no message from it (the one it saw goes back), is not ready, and
/// puts no marker into it.
#[tokio::test]
async fn an_inbox_that_is_not_a_stream_is_reported_and_not_consumed() -> Result<()> {
    let p = two_orgs().await?;
    {
        let (_c, ch) = p.b.channel().await?;
        world::declare_queue(&ch, INBOX).await?;
        let spec = stream::PublishSpec {
            run: "node".into(),
            from: 0,
            to: 3,
            size: 64,
            destination: p.b.legal_name.clone(),
            headers: vec![],
        };
        stream::publish(&ch, INBOX, &spec, |_| {}).await?;
    }
    let cfg =
        p.b.float_config(&format!("{STREAM_FLOAT}\ndeclare_inboxes = false"));
    let float = Daemon::start(Kind::Float, p.dir.path(), "float", &cfg, p.b.float_admin).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = float.status().await.unwrap_or_default();
        if s["window"]["last_error"].as_str().is_some() {
            break s;
        }
        ensure!(tokio::time::Instant::now() < deadline, "no error: {s:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let error = status["window"]["last_error"].as_str().unwrap_or_default();
    ensure!(error.contains("is not a stream"), "{error}");
    ensure!(status["ready"] == false, "not ready: {status:#}");
    // Later still: it stopped, the queue holds the node's three messages and no marker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let depth = p.node.queue_depth(&p.vb, INBOX).await?;
    ensure!(
        depth == 3,
        "the inbox holds {depth}, not the 3 the node put there"
    );
    ensure!(
        float.log_contains("stream window: stopped"),
        "{}",
        float.log_tail(20)
    );
    Ok(())
}
