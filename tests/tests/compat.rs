//! Mixed versions during a rolling upgrade: a real bridge and a node one protocol release
//! ahead (the rule is in the control-protocol crate docs, *Compatibility*). Same major with
//! additions: obeyed, the additions ignored. A newer major: refused, logged, counted and
//! reported to the node, and the bridge keeps obeying what it understands.

use std::time::Duration;

use anyhow::{ensure, Result};
use drawbridge_control_protocol::{
    proto, ControlCommand, CreateLink, LinkState, Notification, SequencedCommand, PROTOCOL_VERSION,
};
use drawbridge_testkit::{
    fixtures::two_orgs,
    world::{self, Org},
    BANK_A,
};
use prost::Message as _;

/// Bank A (bridge) and Bank B (float), each on its own vhost.
async fn pair() -> Result<(Org, Org, tempfile::TempDir)> {
    let w = two_orgs().await?;
    Ok((w.a, w.b, w.dir))
}

/// Wait until `ok` holds for the bridge's `/status`.
async fn wait_status(org: &Org, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> Result<()> {
    let bridge = org.bridge.as_ref().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = bridge.status().await?;
        if ok(&s) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: {s}\n{}",
            bridge.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A same-major message with fields this bridge does not know creates the link as usual; one
/// with a command this bridge does not know is skipped with one log line, not refused.
#[tokio::test]
async fn a_newer_same_major_node_is_obeyed_and_its_additions_ignored() -> Result<()> {
    let (mut a, mut b, _dir) = pair().await?;
    b.start_float("").await?;
    a.start_bridge("").await?;
    let q = a.queue_to(&b);

    // A command this bridge does not know (body field 6), twice: logged once, never refused.
    let unknown_command = {
        let mut m = proto::ControlMessage {
            version: PROTOCOL_VERSION,
            body: None,
            sequence: 1,
            epoch: 0,
        }
        .encode_to_vec();
        m.extend_from_slice(&[0x32, 0x02, 0x0a, 0x00]); // field 6, length-delimited, 2 bytes
        m
    };
    a.publish_raw_control(&unknown_command).await?;
    a.publish_raw_control(&unknown_command).await?;

    // A create with an extra field number 99 (varint), as a newer node's library writes it.
    let create = SequencedCommand {
        sequence: 2,
        epoch: 0,
        command: ControlCommand::CreateLink(CreateLink {
            node_identity: BANK_A.into(),
            link: a.link_to(&b),
        }),
    };
    a.publish_raw_control(&world::append_varint_field(create.encode(), 99, 7))
        .await?;
    a.wait_link_state(&q, "up", Duration::from_secs(20)).await?;

    let bridge = a.bridge.as_ref().unwrap();
    let log = std::fs::read_to_string(bridge.log_path())?;
    assert_eq!(
        log.matches("ignored: unknown control command (newer node?)")
            .count(),
        1,
        "{}",
        bridge.log_tail(30)
    );
    let s = bridge.status().await?;
    assert_eq!(s["control_refused"], 0, "{s}");
    let metrics = bridge.metrics().await?;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("drawbridge_bridge_control_ignored_total{reason=\"unknown_command\"} 2")),
        "{metrics}"
    );
    assert!(
        !metrics.contains("drawbridge_bridge_control_refused_total"),
        "{metrics}"
    );
    Ok(())
}

/// A node upgraded to a newer major before its bridge: the bridge refuses the message with an
/// error naming both versions and the node, counts it, tells the node on the notify exchange,
/// and obeys the node's next message in the version it understands.
#[tokio::test]
async fn a_newer_major_is_refused_reported_and_the_bridge_keeps_obeying() -> Result<()> {
    let (mut a, mut b, _dir) = pair().await?;
    let (_c, notify, nq) = {
        let (c, ch) = a.channel().await?;
        let q = world::bind_notify_queue(&ch).await?;
        (c, ch, q.as_str().to_string())
    };
    b.start_float("").await?;
    a.start_bridge("").await?;
    let q = a.queue_to(&b);

    let newer = proto::ControlMessage {
        version: PROTOCOL_VERSION + 1,
        ..proto::ControlMessage::from(ControlCommand::CreateLink(CreateLink {
            node_identity: BANK_A.into(),
            link: a.link_to(&b),
        }))
    };
    a.publish_raw_control(&newer.encode_to_vec()).await?;
    wait_status(&a, "refusal not counted", |s| s["control_refused"] == 1).await?;
    let bridge = a.bridge.as_ref().unwrap();
    let s = bridge.status().await?;
    assert!(
        s["links"].as_array().is_some_and(|l| l.is_empty()),
        "a refused message created a link: {s}"
    );
    let found = PROTOCOL_VERSION + 1;
    assert!(
        bridge.log_contains(&format!(
            "protocol version {found} is newer than this bridge understands (1 to {PROTOCOL_VERSION})"
        )) && bridge.log_contains("ERROR")
            && bridge.log_contains(&format!("node={BANK_A}")),
        "{}",
        bridge.log_tail(30)
    );
    let metrics = bridge.metrics().await?;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("drawbridge_bridge_control_refused_total{reason=\"newer_version\"} 1")),
        "{metrics}"
    );

    // The node hears about it on the notify exchange.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let event = loop {
        match notify
            .basic_get(
                nq.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await?
        {
            Some(m) => {
                if let Ok(Notification::LinkStatus(s)) = Notification::decode(&m.delivery.data) {
                    break s;
                }
            }
            None => {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "no refusal event on the notify exchange"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(event.queue, "drawbridge.control", "{event:?}");
    assert_eq!(event.state, LinkState::Down, "{event:?}");
    assert_eq!(event.peer, BANK_A, "{event:?}");
    assert!(
        event.reason.starts_with("refused:") && event.reason.contains(&found.to_string()),
        "{event:?}"
    );

    // The same node, speaking the bridge's version, is obeyed.
    a.create_link_to(&b).await?;
    a.wait_link_state(&q, "up", Duration::from_secs(20)).await?;
    assert_eq!(bridge.status().await?["control_refused"], 1);
    Ok(())
}
