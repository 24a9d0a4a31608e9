//! The message path under adversity: brokers that refuse, queues that vanish, properties the
//! bridge's broker user may not assert. Each test feeds the failure into the real daemons
//! (real RabbitMQ, real TLS) and checks that every message ends delivered or dead-lettered
//! with a reason — never dropped, never looping.

use std::time::Duration;

use anyhow::{bail, Result};
use drawbridge_testkit::{
    fixtures::{link_up, publish_raw, two_orgs},
    stream::{self, PublishSpec, Tally},
    world::{self, DEAD_LETTER, INBOX},
    BANK_A, BANK_B,
};
use lapin::{
    message::BasicGetMessage,
    options::{BasicGetOptions, ConfirmSelectOptions, QueueDeleteOptions},
    types::AMQPValue,
    BasicProperties, Channel,
};

/// Publish one message to `queue` with `props` (destination header added), confirmed.
async fn publish_one(
    ch: &Channel,
    queue: &str,
    props: BasicProperties,
    destination: &str,
    body: &[u8],
) -> Result<()> {
    let mut h = props.headers().clone().unwrap_or_default();
    h.insert(
        "drawbridge-destination".into(),
        AMQPValue::LongString(destination.into()),
    );
    let props = props.with_headers(h).with_delivery_mode(2);
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    publish_raw(ch, queue, body, props).await
}

/// Take up to `n` messages from `queue` within `within`.
async fn take(ch: &Channel, queue: &str, n: usize, within: Duration) -> Vec<BasicGetMessage> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(m)) => got.push(m),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    got
}

fn header(m: &BasicGetMessage, key: &str) -> Option<String> {
    stream::header_string(m.delivery.properties.headers().as_ref(), key)
}

/// The node publishes as its own broker user, with `user_id` set (RabbitMQ checks it), and
/// an `expiration`; the message cannot be forwarded (no message id). The bridge, logged in
/// as another user, must dead-letter it without looping (a copied `user_id` is refused by
/// the broker) and without the copy expiring; the next message must still flow.
#[tokio::test]
async fn a_dead_letter_copy_never_asserts_the_node_user_nor_expires() -> Result<()> {
    let mut p = two_orgs().await?;
    let user = format!("node-{}", uuid::Uuid::new_v4().simple());
    p.node.ctl(&["add_user", &user, "secret"]).await?;
    p.node
        .ctl(&["set_permissions", "-p", &p.va, &user, ".*", ".*", ".*"])
        .await?;
    let q = link_up(&mut p.a, &mut p.b, "", "", Duration::from_secs(20)).await?;

    let uri =
        p.a.broker_uri()
            .replacen("guest:guest", &format!("{user}:secret"), 1);
    let node_conn = stream::connect(&uri).await?;
    let node_ch = node_conn.create_channel().await?;
    let bad = BasicProperties::default()
        .with_user_id(user.as_str().into())
        .with_expiration("3000".into());
    publish_one(&node_ch, &q, bad, BANK_B, b"no id").await?;
    let good = BasicProperties::default()
        .with_user_id(user.as_str().into())
        .with_message_id(stream::message_id("ua", 0).into());
    publish_one(&node_ch, &q, good, BANK_B, &stream::make_body(0, 64)).await?;

    // The good message is not stuck behind the bad one.
    let (_cb, chb) = p.b.channel().await?;
    world::declare_queue(&chb, INBOX).await?;
    let mut tally = Tally::new("ua", 1, Some(BANK_A.to_string()));
    stream::consume(&chb, INBOX, &mut tally, Duration::from_secs(20), |_| {}).await?;
    assert!(tally.report().complete(), "{:?}", tally.report());

    // The copy outlives the original's expiration.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_ca, cha) = p.a.channel().await?;
    let got = take(&cha, DEAD_LETTER, 1, Duration::from_secs(5)).await;
    let bridge_log =
        p.a.bridge
            .as_ref()
            .map(|b| b.log_tail(20))
            .unwrap_or_default();
    let [m] = got.as_slice() else {
        bail!(
            "dead-letter queue holds {} messages; bridge log:\n{bridge_log}",
            got.len()
        );
    };
    let props = &m.delivery.properties;
    assert_eq!(props.user_id(), &None);
    assert_eq!(props.expiration(), &None);
    assert_eq!(header(m, "drawbridge-original-user-id"), Some(user.clone()));
    assert_eq!(
        header(m, "drawbridge-original-expiration"),
        Some("3000".into())
    );
    assert_eq!(
        header(m, "drawbridge-reason"),
        Some("message has no message_id".into())
    );
    assert_eq!(m.delivery.data, b"no id");
    let status = p.a.bridge.as_ref().unwrap().status().await?;
    assert_eq!(status["links"][0]["dead_lettered"], 1, "{status}");
    Ok(())
}

/// An operator deletes the dead-letter queue while the bridge runs; the next undeliverable
/// message must land in a declared-again dead-letter queue, not loop on redelivery.
#[tokio::test]
async fn a_deleted_dead_letter_queue_is_declared_again() -> Result<()> {
    let mut p = two_orgs().await?;
    let q = link_up(&mut p.a, &mut p.b, "", "", Duration::from_secs(20)).await?;
    let (_ca, cha) = p.a.channel().await?;
    cha.queue_delete(DEAD_LETTER.into(), QueueDeleteOptions::default())
        .await?;
    publish_one(&cha, &q, BasicProperties::default(), BANK_B, b"no id").await?;
    let good = BasicProperties::default().with_message_id(stream::message_id("dd", 0).into());
    publish_one(&cha, &q, good, BANK_B, &stream::make_body(0, 64)).await?;

    let (_cb, chb) = p.b.channel().await?;
    world::declare_queue(&chb, INBOX).await?;
    let mut tally = Tally::new("dd", 1, Some(BANK_A.to_string()));
    stream::consume(&chb, INBOX, &mut tally, Duration::from_secs(20), |_| {}).await?;
    assert!(tally.report().complete(), "{:?}", tally.report());
    let got = take(&cha, DEAD_LETTER, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "the dead-letter copy");
    assert_eq!(
        header(&got[0], "drawbridge-reason"),
        Some("message has no message_id".into())
    );
    let status = p.a.bridge.as_ref().unwrap().status().await?;
    assert_eq!(
        status["links"][0]["redelivered"], 0,
        "no redelivery loop: {status}"
    );
    Ok(())
}

/// B's inbox is full (`max-length` with `overflow = reject-publish`, set by policy): the
/// float's publishes are nacked. That is a passing condition: the messages must wait and
/// arrive once the node drains its inbox — none dead-lettered.
#[tokio::test]
async fn a_full_inbox_makes_messages_wait_not_dead_letter() -> Result<()> {
    let mut p = two_orgs().await?;
    p.node
        .ctl(&[
            "set_policy",
            "-p",
            &p.vb,
            "inbox-full",
            "^drawbridge\\.inbox$",
            r#"{"max-length": 40, "overflow": "reject-publish"}"#,
            "--apply-to",
            "queues",
        ])
        .await?;
    let n = 200;
    let (_ca, cha) = p.a.channel().await?;
    let q = p.a.queue_to(&p.b);
    world::declare_peer_queue(&cha, &q, "classic").await?;
    let spec = PublishSpec {
        run: "full".into(),
        from: 0,
        to: n,
        size: 256,
        destination: BANK_B.into(),
        headers: vec![],
    };
    stream::publish(&cha, &q, &spec, |_| {}).await?;
    p.b.start_float("").await?;
    p.a.start_bridge("reconnect_max = \"2s\"").await?;
    p.a.create_link_to(&p.b).await?;

    // Let the inbox fill and the refusals happen.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let depth = p.node.queue_depth(&p.vb, INBOX).await.unwrap_or(0);
        if depth >= 40 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("inbox never filled: depth {depth}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let float = p.b.float.as_ref().unwrap().status().await?;
    assert!(
        float["released"].as_u64().unwrap_or(0) > 0,
        "the float must have been refused: {float}"
    );
    assert_eq!(
        p.node.queue_depth(&p.va, DEAD_LETTER).await.unwrap_or(0),
        0,
        "nothing dead-lettered while the inbox is full"
    );

    // The node drains its inbox: everything arrives.
    let (_cb, chb) = p.b.channel().await?;
    let mut tally = Tally::new("full", n, Some(BANK_A.to_string()));
    stream::consume(&chb, INBOX, &mut tally, Duration::from_secs(30), |_| {}).await?;
    let r = tally.report();
    assert!(r.complete() && r.unexpected == 0, "{r:?}");
    assert_eq!(
        p.node.queue_depth(&p.va, DEAD_LETTER).await.unwrap_or(0),
        0,
        "nothing dead-lettered"
    );
    let status = p.a.bridge.as_ref().unwrap().status().await?;
    assert_eq!(status["links"][0]["dead_lettered"], 0, "{status}");
    Ok(())
}

/// A peer queue an older node declared with the fence but without the dead-letter pair is
/// still consumed (with a warning and a status flag); one without the single-active-consumer
/// fence is refused with a reason that names it.
#[tokio::test]
async fn older_peer_queue_arguments_keep_the_fence_strict() -> Result<()> {
    use drawbridge_node::topology::{fenced_queue_args, plain_queue_args, QueueType};
    use lapin::options::QueueDeclareOptions;
    let mut p = two_orgs().await?;
    let (_ca, cha) = p.a.channel().await?;
    let q = p.a.queue_to(&p.b);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    cha.queue_declare(
        q.as_str().into(),
        durable,
        fenced_queue_args(QueueType::Classic),
    )
    .await?;
    let spec = PublishSpec {
        run: "legacy".into(),
        from: 0,
        to: 20,
        size: 128,
        destination: BANK_B.into(),
        headers: vec![],
    };
    stream::publish(&cha, &q, &spec, |_| {}).await?;
    p.b.start_float("").await?;
    p.a.start_bridge("").await?;
    p.a.create_link_to(&p.b).await?;
    let (_cb, chb) = p.b.channel().await?;
    world::declare_queue(&chb, INBOX).await?;
    let mut tally = Tally::new("legacy", 20, Some(BANK_A.to_string()));
    stream::consume(&chb, INBOX, &mut tally, Duration::from_secs(20), |_| {}).await?;
    assert!(tally.report().complete(), "{:?}", tally.report());
    let bridge = p.a.bridge.as_ref().unwrap();
    let status = bridge.status().await?;
    assert_eq!(status["links"][0]["legacy_queue_args"], true, "{status}");
    assert!(bridge.log_contains("declared without dead-letter arguments"));

    // No fence: refused, and the reason says why.
    let unfenced = format!("{q}-unfenced");
    cha.queue_declare(
        unfenced.as_str().into(),
        durable,
        plain_queue_args(QueueType::Classic),
    )
    .await?;
    let mut link = p.a.link_to(&p.b);
    link.queue = unfenced.clone();
    p.a.control(&drawbridge_control_protocol::ControlCommand::CreateLink(
        drawbridge_control_protocol::CreateLink {
            node_identity: p.a.legal_name.clone(),
            link,
        },
    ))
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = bridge.status().await?;
        let reason = status["links"]
            .as_array()
            .and_then(|l| l.iter().find(|v| v["queue"] == unfenced.as_str()))
            .map(|v| v["reason"].to_string())
            .unwrap_or_default();
        if reason.contains("x-single-active-consumer") {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the unfenced queue was not refused with a reason naming the fence: {status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Big messages narrow a link's prefetch to its byte budget, small ones widen it again, and
/// everything arrives. (What the link holds is bounded by `max_link_bytes`, not by
/// `window` × message size.)
#[tokio::test]
async fn the_prefetch_follows_message_sizes_within_the_link_budget() -> Result<()> {
    let mut p = two_orgs().await?;
    let (_ca, cha) = p.a.channel().await?;
    let q = p.a.queue_to(&p.b);
    world::declare_peer_queue(&cha, &q, "classic").await?;
    let small = PublishSpec {
        run: "sizes".into(),
        from: 0,
        to: 100,
        size: 512,
        destination: BANK_B.into(),
        headers: vec![],
    };
    stream::publish(&cha, &q, &small, |_| {}).await?;
    let big = PublishSpec {
        from: 100,
        to: 140,
        size: 1024 * 1024,
        ..small.clone()
    };
    stream::publish(&cha, &q, &big, |_| {}).await?;
    let small_again = PublishSpec {
        from: 140,
        to: 240,
        ..small.clone()
    };
    stream::publish(&cha, &q, &small_again, |_| {}).await?;
    p.b.start_float("").await?;
    p.a.start_bridge("max_link_bytes = 4194304").await?;
    p.a.create_link_to(&p.b).await?;
    let (_cb, chb) = p.b.channel().await?;
    world::declare_queue(&chb, INBOX).await?;
    let mut tally = Tally::new("sizes", 240, Some(BANK_A.to_string()));
    stream::consume(&chb, INBOX, &mut tally, Duration::from_secs(20), |_| {}).await?;
    let r = tally.report();
    assert!(
        r.complete() && r.duplicates == 0 && r.corrupted == 0,
        "{r:?}"
    );
    let status = p.a.bridge.as_ref().unwrap().status().await?;
    let link = &status["links"][0];
    // Starts at 1 (as if every message were 10 MiB), widens for the small ones, narrows to
    // 4 for the 1 MiB ones, widens again.
    assert!(
        link["prefetch_widened"].as_u64() >= Some(2)
            && link["prefetch_narrowed"].as_u64() >= Some(1),
        "{status}"
    );
    assert_eq!(link["prefetch"], 1000, "{status}");
    Ok(())
}

/// A daemon's `[broker]` lines reaching `vhost` through the fault proxy `proxy`, with
/// `op_timeout` and a heartbeat too slow to notice a black hole within a test.
fn broker_through(
    proxy: &drawbridge_testkit::proxy::FaultProxy,
    vhost: &str,
    op_timeout: &str,
) -> String {
    format!(
        "uris = [\"amqp://guest:guest@{}/{}\"]\nop_timeout = \"{op_timeout}\"\nheartbeat_secs = 60\nconnect_timeout = \"2s\"",
        proxy.addr(),
        drawbridge_testkit::rabbit::encode_vhost(vhost)
    )
}

/// A consumer channel whose close never completes holds the link's unacked deliveries on a
/// connection nobody reads from again; only a new connection frees them. The close has a
/// deadline, and missing it reports the broker connection broken (issue: the link said "up"
/// and forwarded nothing). Here the bridge's broker path goes silent (no FIN, no RST; the
/// heartbeat is too slow to notice within the test) just as the link recycles because its float
/// was killed: the close stalls, the connection is reported broken and rebuilt once the path is
/// back, and everything arrives.
#[tokio::test]
async fn a_stalled_channel_close_reports_the_broker_connection_broken() -> Result<()> {
    use drawbridge_testkit::proxy::{FaultProxy, ProxyMode};
    let mut p = two_orgs().await?;
    let proxy = FaultProxy::start(p.node.amqp_addr()).await?;
    p.a.daemon_broker = Some(broker_through(&proxy, &p.va, "2s"));
    let q = link_up(
        &mut p.a,
        &mut p.b,
        "",
        "reconnect_min = \"200ms\"\nreconnect_max = \"1s\"",
        Duration::from_secs(20),
    )
    .await?;
    let (_ca, ch_a) = p.a.channel().await?;
    let spec = |from, to| PublishSpec {
        run: "stall".into(),
        from,
        to,
        size: 256,
        destination: BANK_B.into(),
        headers: vec![],
    };
    stream::publish(&ch_a, &q, &spec(0, 20), |_| {}).await?;

    // The broker path goes silent, then the link's float dies: the link recycles and closes
    // its consumer channel over the silent path.
    proxy.set_mode(ProxyMode::BlackHole);
    p.b.float.as_mut().expect("float").kill9().await?;
    let bridge = p.a.bridge.as_ref().expect("bridge");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !bridge.log_contains("closing a peer queue's consumer channel timed out") {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "a stalled channel close was not reported:\n{}",
                bridge.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bridge.log_contains("broker connection reported broken"));

    // Path and float back: a new connection, and everything arrives (the float was killed, so
    // a copy it confirmed but had not settled may come twice: at least once, as documented).
    // The silent connections die (as a partition's do once the broker's heartbeat gives up
    // on them), which frees the peer queue's single-active-consumer slot.
    proxy.set_mode(ProxyMode::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_mode(ProxyMode::Pass);
    p.b.float.as_mut().expect("float").restart().await?;
    stream::publish(&ch_a, &q, &spec(20, 40), |_| {}).await?;
    let (_cb, ch_b) = p.b.channel().await?;
    world::declare_queue(&ch_b, INBOX).await?;
    let mut tally = Tally::new("stall", 40, Some(BANK_A.to_string()));
    stream::consume(&ch_b, INBOX, &mut tally, Duration::from_secs(40), |_| {}).await?;
    let r = tally.report();
    let status = p.a.bridge.as_ref().expect("bridge").status().await?;
    assert!(
        r.complete() && r.corrupted == 0,
        "{r:?}\nstatus: {status}\nbridge:\n{}\nfloat:\n{}",
        p.a.bridge.as_ref().expect("bridge").log_tail(40),
        p.b.float.as_ref().expect("float").log_tail(10)
    );
    Ok(())
}

/// A publish whose broker channel must first be opened no longer holds up the peer's
/// connection. The float's connection task used to wait for the channel inline (up to the
/// broker operation timeout): meanwhile it read and wrote nothing, sent no heartbeat, and a
/// bridge with a short idle timeout gave the connection up. Here the float's broker path goes
/// silent before the first publish opens its channel: the open waits (15 s op timeout) while
/// the bridge, which asks for a frame every second or so (idle timeout 2 s), keeps its link
/// up; once the path is back the message arrives.
#[tokio::test]
async fn a_channel_that_takes_its_time_to_open_stalls_no_peer_connection() -> Result<()> {
    use drawbridge_testkit::proxy::{FaultProxy, ProxyMode};
    let mut p = two_orgs().await?;
    let proxy = FaultProxy::start(p.node.amqp_addr()).await?;
    p.b.daemon_broker = Some(broker_through(&proxy, &p.vb, "15s"));
    let q = link_up(
        &mut p.a,
        &mut p.b,
        "",
        "idle_timeout = \"2s\"\ncanary_interval = \"0s\"",
        Duration::from_secs(20),
    )
    .await?;
    let (_cb, ch_b) = p.b.channel().await?;
    world::declare_queue(&ch_b, INBOX).await?;

    // No publish yet: the float's publishing channels are not open. The path goes silent, and
    // a message comes.
    proxy.set_mode(ProxyMode::BlackHole);
    let (_ca, ch_a) = p.a.channel().await?;
    let spec = PublishSpec {
        run: "slow-open".into(),
        from: 0,
        to: 1,
        size: 256,
        destination: BANK_B.into(),
        headers: vec![],
    };
    stream::publish(&ch_a, &q, &spec, |_| {}).await?;
    let float = p.b.float.as_ref().expect("float");
    let bridge = p.a.bridge.as_ref().expect("bridge");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bridge.status().await?["links"][0]["in_flight"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the bridge never sent the transfer:\n{}\nfloat:\n{}",
                bridge.log_tail(30),
                float.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several idle timeouts of the bridge while the channel waits to open.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = bridge.status().await?;
    let link = &status["links"][0];
    assert_eq!(
        link["state"],
        "up",
        "{status}\nbridge:\n{}",
        bridge.log_tail(30)
    );
    assert_eq!(
        link["connects"],
        1,
        "the link never went down: {status}\nbridge:\n{}",
        bridge.log_tail(30)
    );

    // The path comes back (the silent connection dies): the message arrives, once.
    proxy.set_mode(ProxyMode::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_mode(ProxyMode::Pass);
    let mut tally = Tally::new("slow-open", 1, Some(BANK_A.to_string()));
    stream::consume(&ch_b, INBOX, &mut tally, Duration::from_secs(40), |_| {}).await?;
    let r = tally.report();
    assert!(
        r.complete() && r.corrupted == 0 && r.duplicates == 0,
        "{r:?}"
    );
    Ok(())
}
