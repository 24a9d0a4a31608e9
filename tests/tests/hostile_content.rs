//! A hostile member's message content against a running float and bridge (real RabbitMQ,
//! real TLS, genuine member certificates): headers the broker acts on, headers too big for a
//! broker frame, destinations of any length, control characters in what gets logged. Each is
//! refused or neutralised with a reason, the float stays ready, and nothing loops.

use std::time::Duration;

use anyhow::{Context, Result};
use drawbridge_control_protocol::Target;
use drawbridge_testkit::fe2o3_peer as peer;
use drawbridge_testkit::{
    daemon::http_get,
    fixtures::{destination_headers, peer_queue_channel, publish_raw, two_orgs},
    peer_client::{attacker_connects, attacker_sends, attacker_settings},
    stream,
    world::{self, Org, INBOX},
    BANK_B,
};
use fe2o3_amqp::types::{
    messaging::{annotations::OwnedKey, Body, Message, MessageAnnotations},
    primitives::{OrderedMap, SimpleValue, Value},
};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};

/// Two organisations on fresh vhosts of the shared broker; nothing started.
async fn orgs() -> Result<(Org, Org, tempfile::TempDir)> {
    let w = two_orgs().await?;
    Ok((w.a, w.b, w.dir))
}

/// Bank A runs a float (extra `[float]` lines); Bank B is the attacker.
async fn world(extra: &str) -> Result<(Org, Org, tempfile::TempDir)> {
    let (mut a, b, dir) = orgs().await?;
    a.start_float(extra).await?;
    Ok((a, b, dir))
}

/// `edit` that sets the `x-opt-drawbridge-headers` annotation to `entries`.
fn rich_headers(entries: Vec<(&'static str, Value)>) -> impl FnOnce(&mut Message<Body<Value>>) {
    move |m| {
        let mut rich = OrderedMap::new();
        for (k, v) in entries {
            rich.insert(Value::String(k.into()), v);
        }
        let mut anns = OrderedMap::new();
        anns.insert(
            OwnedKey::from(drawbridge_mapping::ANN_HEADERS),
            Value::Map(rich),
        );
        m.message_annotations = Some(MessageAnnotations(anns));
    }
}

fn strings(items: &[&str]) -> Value {
    Value::List(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// The sum of the float's metric samples whose line starts with `prefix` (a name, or a
/// name and its first labels): 0 when there is none.
async fn metric(a: &Org, prefix: &str) -> Result<f64> {
    let metrics = a.float.as_ref().context("float")?.metrics().await?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Declare `queue` and bind it to `exchange` with its own name as the routing key (`""`: no
/// binding, the default exchange routes by name).
async fn side_queue(ch: &lapin::Channel, queue: &str, exchange: &str) -> Result<()> {
    world::declare_queue(ch, queue).await?;
    if !exchange.is_empty() {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            queue.into(),
            QueueBindOptions::default(),
            Default::default(),
        )
        .await?;
    }
    Ok(())
}

async fn depth(ch: &lapin::Channel, queue: &str) -> Result<u32> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Item 1. Before: a `CC` header in the headers annotation made RabbitMQ copy the message
/// to the named queue too (sender-selected distribution), on the inbox exchange or, with
/// `inbox_exchange = ""`, to any queue of the vhost. Now `CC` and `BCC` are reserved in
/// either place a peer writes headers: stripped and counted, the message lands in the inbox
/// only.
#[tokio::test]
async fn cc_and_bcc_headers_copy_a_message_nowhere_but_the_inbox() -> Result<()> {
    let (a, b, _dir) = world("").await?;
    let (_conn, ch) = a.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    for q in ["side-cc", "side-bcc", "side-app-cc"] {
        side_queue(&ch, q, drawbridge_node::topology::INBOX_EXCHANGE).await?;
    }
    let before = metric(&a, "drawbridge_float_reserved_headers_stripped_total").await?;
    let mut c = attacker_connects(&b, &a, "hostile").await?;
    let r = attacker_sends(
        &mut c,
        &a,
        "cc-1",
        rich_headers(vec![
            ("CC", strings(&["side-cc"])),
            ("BCC", strings(&["side-bcc"])),
            ("legs", strings(&["kept"])),
        ]),
    )
    .await?;
    assert!(r.contains("Accepted"), "{r}");
    // Application properties cannot hold the array RabbitMQ wants, but are stripped too
    // (any case).
    let r = attacker_sends(&mut c, &a, "cc-2", |m| {
        if let Some(app) = m.application_properties.as_mut() {
            app.0
                .insert("cc".into(), SimpleValue::String("side-app-cc".into()));
        }
    })
    .await?;
    assert!(r.contains("Accepted"), "{r}");
    for q in ["side-cc", "side-bcc", "side-app-cc"] {
        assert_eq!(depth(&ch, q).await?, 0, "a copy landed in {q}");
    }
    let got = ch
        .basic_get(INBOX.into(), BasicGetOptions { no_ack: true })
        .await?
        .context("cc-1 is not in the inbox")?;
    let headers = got
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(headers.inner().contains_key("legs"));
    assert!(!headers.inner().contains_key("CC"));
    assert!(!headers.inner().contains_key("BCC"));
    let after = metric(&a, "drawbridge_float_reserved_headers_stripped_total").await?;
    assert_eq!(after - before, 3.0);

    // With `inbox_exchange = ""` the default exchange routes by queue name: any queue of the
    // vhost (a peer queue, another inbox) could be named.
    let (float2, port2) = a
        .start_extra_float("float-default-exchange", "inbox_exchange = \"\"")
        .await?;
    side_queue(&ch, "drawbridge.peers.victim", "").await?;
    let target = Target::new("127.0.0.1", port2);
    let mut c2 = peer::connect(&target, &attacker_settings(&b, &a, "hostile")?)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let r = attacker_sends(
        &mut c2,
        &a,
        "cc-3",
        rich_headers(vec![("CC", strings(&["drawbridge.peers.victim"]))]),
    )
    .await?;
    assert!(r.contains("Accepted"), "{r}");
    assert_eq!(depth(&ch, "drawbridge.peers.victim").await?, 0);
    drop(float2);
    Ok(())
}

/// Item 2, the float. Before: one message with a 40 KB application property made the float's
/// broker connection fail (`frame_too_large`), `/readyz` went 503 and the transfer was
/// released, so a conforming bridge resent it forever. Now headers that do not fit one broker
/// frame are rejected with a reason (a 1.5 MiB one too), the float stays ready, and the next
/// message is accepted.
#[tokio::test]
async fn headers_too_big_for_a_broker_frame_are_rejected_and_the_float_stays_ready() -> Result<()> {
    let (a, b, _dir) = world("").await?;
    let mut c = attacker_connects(&b, &a, "hostile").await?;
    for (id, size) in [("big-40k", 40_000), ("big-1m5", 1_536 * 1024)] {
        let r = attacker_sends(&mut c, &a, id, move |m| {
            if let Some(app) = m.application_properties.as_mut() {
                app.0
                    .insert("blob".into(), SimpleValue::String("h".repeat(size)));
            }
        })
        .await?;
        assert!(
            r.contains("Rejected") && r.contains("headers and properties"),
            "{id}: {r}"
        );
        let (code, body) = http_get(a.float_admin, "/readyz").await?;
        assert_eq!(code, 200, "{id}: /readyz: {body}");
    }
    // Just under the bound passes.
    let r = attacker_sends(&mut c, &a, "fits", |m| {
        if let Some(app) = m.application_properties.as_mut() {
            app.0
                .insert("blob".into(), SimpleValue::String("h".repeat(8_000)));
        }
    })
    .await?;
    assert!(r.contains("Accepted"), "{r}");
    let r = attacker_sends(&mut c, &a, "after", |_| {}).await?;
    assert!(r.contains("Accepted"), "{r}");
    let float = a.float.as_ref().context("float")?;
    let log = std::fs::read_to_string(float.log_path())?;
    assert!(!log.contains("frame_too_large"), "{}", float.log_tail(20));
    assert!(
        !log.contains("broker connection lost"),
        "{}",
        float.log_tail(20)
    );
    let rejected = metric(
        &a,
        "drawbridge_float_rejected_total{reason=\"headers_too_large\"",
    )
    .await?;
    assert_eq!(rejected, 2.0, "{}", float.metrics().await?);
    Ok(())
}

/// Item 2, the bridge. Before: a node's own message whose headers the float's broker cannot
/// take in one frame broke the float's broker connection, was released and resent forever.
/// Now the bridge dead-letters what can never fit (reason: the headers' size), the float
/// rejects what does not fit its broker's negotiated frame (reason copied into
/// `drawbridge-reason`), and the messages after them arrive.
#[tokio::test]
async fn a_nodes_message_with_oversize_headers_is_dead_lettered_not_resent() -> Result<()> {
    use lapin::{options::*, types::*, BasicProperties};
    let (mut a, mut b, _dir) = orgs().await?;
    // B's float talks to its broker in 8 KiB frames.
    b.daemon_broker = Some(format!("uris = [{:?}]\nframe_max = 8192", b.broker_uris[0]));
    b.start_float("").await?;
    a.start_bridge("").await?;
    let (_c, ch, q) = peer_queue_channel(&a, &b).await?;
    let publish = |id: String, blob: usize| {
        let mut h = destination_headers(BANK_B);
        if blob > 0 {
            h.insert(
                "blob".into(),
                AMQPValue::LongString("h".repeat(blob).into()),
            );
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_headers(h);
        let ch = ch.clone();
        let q = q.clone();
        async move { publish_raw(&ch, &q, &stream::make_body(0, 64), props).await }
    };
    // 20 KB: beyond what the bridge forwards at all. 10 KB: fits the bridge's bound, not
    // B's 8 KiB broker frames.
    publish("too-big-anywhere".into(), 20_000).await?;
    publish("too-big-for-b".into(), 10_000).await?;
    for i in 0..3 {
        publish(format!("fine-{i}"), 0).await?;
    }
    a.create_link_to(&b).await?;

    let (_c2, ch2) = a.channel().await?;
    world::declare_queue(&ch2, world::DEAD_LETTER).await?;
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reasons.len() < 2 && tokio::time::Instant::now() < deadline {
        match ch2
            .basic_get(world::DEAD_LETTER.into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(m)) => reasons.push((
                m.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                stream::header_string(
                    m.delivery.properties.headers().as_ref(),
                    "drawbridge-reason",
                )
                .unwrap_or_default(),
            )),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let bridge = a.bridge.as_ref().context("bridge")?;
    let float = b.float.as_ref().context("float")?;
    assert_eq!(
        reasons.len(),
        2,
        "dead letters: {reasons:?}\nbridge:\n{}\nfloat:\n{}",
        bridge.log_tail(20),
        float.log_tail(20)
    );
    // The bridge refuses what no float would publish, without sending it.
    assert!(
        reasons.iter().any(|(id, r)| id == "too-big-anywhere"
            && r.contains("headers and properties")
            && !r.contains("rejected by peer")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(id, r)| id == "too-big-for-b"
            && r.contains("rejected by peer")
            && r.contains("headers and properties")),
        "{reasons:?}"
    );
    let (_c3, ch3) = b.channel().await?;
    world::declare_queue(&ch3, INBOX).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut got = 0;
    while got < 3 && tokio::time::Instant::now() < deadline {
        match ch3
            .basic_get(INBOX.into(), BasicGetOptions { no_ack: true })
            .await?
        {
            Some(_) => got += 1,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(got, 3, "the messages after them did not arrive");
    assert!(!std::fs::read_to_string(float.log_path())?.contains("frame_too_large"));
    // Each was dead-lettered once, not resent in a loop.
    let bridge_log = std::fs::read_to_string(bridge.log_path())?;
    assert_eq!(
        bridge_log.matches("message dead-lettered").count(),
        2,
        "{}",
        bridge.log_tail(20)
    );
    Ok(())
}

/// Item 5. Before: a 64 KiB destination came back whole in the rejection's description and in
/// the float's log, once per transfer. Now it is refused by its length with a short
/// description, and a burst of rejections writes a bounded number of log lines.
#[tokio::test]
async fn long_destinations_are_refused_short_and_rejections_do_not_flood_the_log() -> Result<()> {
    let (a, b, _dir) = world("").await?;
    let mut c = attacker_connects(&b, &a, "hostile").await?;
    let long = format!("O={},L=Nowhere,C=XX", "z".repeat(64 * 1024));
    let dest = long.clone();
    let r = attacker_sends(&mut c, &a, "long-dest", move |m| {
        if let Some(app) = m.application_properties.as_mut() {
            app.0
                .insert("drawbridge-destination".into(), SimpleValue::String(dest));
        }
    })
    .await?;
    assert!(
        r.contains("Rejected") && r.contains("drawbridge-destination is"),
        "{r}"
    );
    assert!(r.len() < 2048, "the description echoes {} bytes", r.len());
    // Many unknown (short) destinations in a row.
    for i in 0..50 {
        let dest = format!("O=Made Up {i},L=Nowhere,C=XX");
        let r = attacker_sends(&mut c, &a, &format!("unknown-{i}"), move |m| {
            if let Some(app) = m.application_properties.as_mut() {
                app.0
                    .insert("drawbridge-destination".into(), SimpleValue::String(dest));
            }
        })
        .await?;
        assert!(r.contains("Rejected") && r.contains("not served"), "{r}");
    }
    let float = a.float.as_ref().context("float")?;
    let log = std::fs::read_to_string(float.log_path())?;
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    let lines = log
        .lines()
        .filter(|l| l.contains("transfer rejected"))
        .count();
    assert!(lines <= 5, "{lines} rejection lines for 51 rejections");
    let r = attacker_sends(&mut c, &a, "fine", |_| {}).await?;
    assert!(r.contains("Accepted"), "{r}");
    Ok(())
}

/// Item 11. Before: a `\n` in a link name or a destination started a new line in the float's
/// human log, so a peer could write lines that look like the float's own. Now control
/// characters in peer strings are escaped.
#[tokio::test]
async fn newlines_in_peer_strings_do_not_forge_log_lines() -> Result<()> {
    let (a, b, _dir) = world("").await?;
    let forged = "2030-01-01T00:00:00.000000Z ERROR FORGED";
    let mut c = attacker_connects(&b, &a, &format!("hostile\n{forged} link")).await?;
    let dest = format!("O=X\n{forged} destination,L=Y,C=ZZ");
    let r = attacker_sends(&mut c, &a, "forge", move |m| {
        if let Some(app) = m.application_properties.as_mut() {
            app.0
                .insert("drawbridge-destination".into(), SimpleValue::String(dest));
        }
    })
    .await?;
    assert!(r.contains("Rejected"), "{r}");
    // A link to an unknown address, whose refusal logs the address.
    let mut settings = attacker_settings(&b, &a, "hostile")?;
    settings.address = format!("nowhere\r\n{forged} address");
    let target = Target::new("127.0.0.1", a.float_port);
    let _ = peer::connect(&target, &settings).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let float = a.float.as_ref().context("float")?;
    let log = std::fs::read_to_string(float.log_path())?;
    assert!(
        log.contains("FORGED"),
        "the peer strings were not logged at all:\n{log}"
    );
    let forged_lines: Vec<&str> = log
        .split(['\n', '\r'])
        .filter(|l| l.starts_with(forged))
        .collect();
    assert!(forged_lines.is_empty(), "forged lines: {forged_lines:?}");
    Ok(())
}

/// Item 2, the bridge's own broker. A node's message whose headers nearly fill a broker
/// frame is dead-lettered by the bridge (too big to forward); the dead-letter copy adds
/// `drawbridge-reason` and `drawbridge-origin-queue`, which must not push the copy past the
/// bridge's broker frame (that would fail the bridge's broker connection and redeliver the
/// message to be dead-lettered again, forever).
#[tokio::test]
async fn a_dead_letter_copy_never_outgrows_the_bridges_broker_frame() -> Result<()> {
    use lapin::{options::*, types::*, BasicProperties};
    let (mut a, mut b, _dir) = orgs().await?;
    b.start_float("").await?;
    a.start_bridge("").await?;
    let (_c, ch, q) = peer_queue_channel(&a, &b).await?;
    let mut h = destination_headers(BANK_B);
    // 128 KiB frames (the bridge's default, RabbitMQ's) hold 131,052 bytes of properties:
    // this message fits one as delivered, its dead-letter copy with a full reason would not.
    h.insert(
        "blob".into(),
        AMQPValue::LongString("h".repeat(130_800).into()),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id("nearly-a-frame".into())
        .with_headers(h);
    publish_raw(&ch, &q, b"x", props).await?;
    a.create_link_to(&b).await?;
    let (_c2, ch2) = a.channel().await?;
    world::declare_queue(&ch2, world::DEAD_LETTER).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut got = None;
    while got.is_none() && tokio::time::Instant::now() < deadline {
        match ch2
            .basic_get(world::DEAD_LETTER.into(), BasicGetOptions { no_ack: true })
            .await?
        {
            Some(m) => got = Some(m),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let bridge = a.bridge.as_ref().context("bridge")?;
    let m = got.with_context(|| format!("nothing dead-lettered:\n{}", bridge.log_tail(30)))?;
    let reason = stream::header_string(
        m.delivery.properties.headers().as_ref(),
        "drawbridge-reason",
    )
    .unwrap_or_default();
    assert!(!reason.is_empty(), "a reason, cut to the room there is");
    // What the bridge added gave way; the node's own header is whole.
    let headers = m.delivery.properties.headers().clone().unwrap_or_default();
    assert!(!headers
        .inner()
        .contains_key("drawbridge-original-headers-dropped"));
    assert!(
        matches!(headers.inner().get("blob"), Some(AMQPValue::LongString(b)) if b.as_bytes().len() == 130_800)
    );
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("nearly-a-frame")
    );
    let log = std::fs::read_to_string(bridge.log_path())?;
    assert!(!log.contains("frame_too_large"), "{}", bridge.log_tail(30));
    assert_eq!(
        log.matches("message dead-lettered").count(),
        1,
        "{}",
        bridge.log_tail(30)
    );
    Ok(())
}
