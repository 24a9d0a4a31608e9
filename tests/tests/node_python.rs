//! The Python node example (`examples/node-python/node.py`, pika + the generated
//! `control_pb2.py`) drives a real bridge: its sequenced, `user_id`-stamped control messages are
//! obeyed (the bridge enforces `node_user` and `node_identity`), and its peer messages reach the
//! peer's inbox with the authenticated sender.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use drawbridge_testkit::{
    fixtures::two_orgs,
    rabbit::encode_vhost,
    stream::header_string,
    world::{self, INBOX},
    BANK_A, BANK_B,
};
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};

const PYTHON: &str = "/usr/bin/python3";

fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/node-python")
}

fn python_deps_available() -> bool {
    std::process::Command::new(PYTHON)
        .args(["-c", "import pika, google.protobuf"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn python_node_drives_the_bridge_and_its_messages_arrive() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    assert!(
        python_deps_available(),
        "python3-pika / python3-protobuf are missing: run scripts/install-deps.sh"
    );
    let w = two_orgs().await?;
    let (node, va, mut a, mut b) = (w.node, w.va, w.a, w.b);

    // The node logs in as its own broker user; the bridge accepts control messages only with
    // that user_id and that node identity.
    let user = format!("node-{}", &va[2..12]);
    node.ctl(&["add_user", &user, "node-secret"]).await?;
    node.ctl(&["set_permissions", "-p", &va, &user, ".*", ".*", ".*"])
        .await?;
    let node_uri = format!(
        "amqp://{user}:node-secret@127.0.0.1:{}/{}",
        node.amqp_port(),
        encode_vhost(&va)
    );

    b.start_float("").await?;
    a.start_bridge(&format!(
        "node_user = {user:?}\nnode_identity = {BANK_A:?}\nsnapshot_retry_max = \"2s\""
    ))
    .await?;
    let (_cb, inbox_ch) = b.channel().await?;
    world::declare_queue(&inbox_ch, INBOX).await?;

    let queue = a.queue_to(&b);
    let count = 25;
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(PYTHON)
            .arg(example_dir().join("node.py"))
            .args([
                "--broker",
                &node_uri,
                "--identity",
                BANK_A,
                "--queue",
                &queue,
            ])
            .args(["--target", &format!("127.0.0.1:{}", b.float_port)])
            .args(["--legal-name", BANK_B, "--destination", BANK_B])
            .args([
                "--count",
                &count.to_string(),
                "--run",
                "py",
                "--answer",
                "1",
            ])
            .args(["--timeout", "60"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("node.py did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node.py failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).with_context(|| format!("node.py printed {stdout}"))?;
    assert_eq!(report["snapshots_answered"], 1, "{report}");
    let sequences: Vec<u64> = report["sequences"]
        .as_array()
        .context("sequences")?
        .iter()
        .filter_map(|s| s.as_u64())
        .collect();
    assert_eq!(sequences.len(), 2, "a create and a snapshot: {report}");
    assert!(sequences[0] < sequences[1], "{report}");

    // The bridge obeyed: the link runs, the snapshot was applied (not refused, not stale).
    a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;
    let bridge = a.bridge.as_ref().context("bridge")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !bridge.log_contains("snapshot received") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "snapshot not applied:\n{}",
            bridge.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for bad in [
        "control message refused",
        "stale control message",
        "unsequenced",
    ] {
        assert!(
            !bridge.log_contains(bad),
            "bridge log has `{bad}`:\n{}",
            bridge.log_tail(40)
        );
    }

    // The messages reached the peer's inbox, in order, with the authenticated sender.
    let mut consumer = inbox_ch
        .basic_consume(
            INBOX.into(),
            "python-node-check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for i in 0..count {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .with_context(|| format!("message {i} did not arrive"))?
            .context("consumer ended")??;
        let id = d.properties.message_id().as_ref().map(|s| s.to_string());
        assert_eq!(id.as_deref(), Some(format!("py-{i:08}").as_str()));
        assert_eq!(d.data, format!("py message {i}").into_bytes());
        let headers = d.properties.headers().as_ref();
        assert_eq!(
            header_string(headers, "drawbridge-sender").as_deref(),
            Some(BANK_A)
        );
        assert_eq!(
            header_string(headers, "drawbridge-destination").as_deref(),
            Some(BANK_B)
        );
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}
