//! The Python node example (`examples/node-python/node.py`, pika + the generated
//! `control_pb2.py`) drives a real bridge: its sequenced, `user_id`-stamped control messages are
//! obeyed (the bridge enforces `node_user` and `node_identity`), and its peer messages reach the
//! peer's inbox with the authenticated sender. Its stream mode (`--receive-stream`) reads a
//! stream inbox from the offset in its offset file, each message once across runs.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use drawbridge_testkit::{
    fixtures::two_orgs,
    node_stream::{declare_stream_inbox, publish_as_float, Entry},
    rabbit::{encode_vhost, shared_node},
    stream::header_string,
    world::{self, INBOX},
    BANK_A, BANK_B, BANK_C,
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

/// Run `node.py --receive-stream` on `uri`'s inbox with `offsets` and `extra` arguments;
/// its exit code, its JSON line (if it printed one) and its stderr.
async fn python_stream_read(
    uri: &str,
    offsets: &std::path::Path,
    extra: &[&str],
) -> Result<(Option<i32>, serde_json::Value, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(PYTHON)
            .arg(example_dir().join("node.py"))
            .args(["--broker", uri, "--receive-stream", INBOX, "--offset-file"])
            .arg(offsets)
            .args(["--prefetch", "3"])
            .args(extra)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("node.py did not finish")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    // It stops without rejecting anything (a stream closes the connection on basic.reject).
    assert!(!stderr.contains("closing:"), "{stderr}");
    Ok((out.status.code(), report, stderr))
}

/// The message ids in a `--receive-stream` report.
fn read_ids(report: &serde_json::Value) -> Vec<String> {
    report["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// node.py's stream mode keeps its offset in a file: a second run reads only what is new,
/// each message once; the float's window markers are skipped; without the file it reads
/// everything again; a corrupt file stops it.
#[tokio::test]
async fn python_node_reads_a_stream_inbox_once_across_runs() -> Result<()> {
    assert!(
        python_deps_available(),
        "python3-pika / python3-protobuf are missing: run scripts/install-deps.sh"
    );
    let node = shared_node().await;
    let vhost = node.fresh_vhost().await?;
    let uri = node.amqp_uri(&vhost);
    let conn = drawbridge_node::connect(&uri).await?;
    let ch = conn.create_channel().await?;
    declare_stream_inbox(&ch, INBOX).await?;
    // 6 messages, a marker, 4 messages, a marker: offsets 0-5, 6, 7-10, 11.
    let mut entries: Vec<Entry> = (0..6)
        .map(|i| Entry::message("py", i, if i < 3 { BANK_A } else { BANK_C }, BANK_B))
        .collect();
    entries.push(Entry::Marker("float-1:1".into()));
    entries.extend((6..10).map(|i| Entry::message("py", i, BANK_A, BANK_B)));
    entries.push(Entry::Marker("float-1:2".into()));
    publish_as_float(&ch, INBOX, &entries).await?;
    let id = |i: u64| format!("py-{i:08}");
    let dir = tempfile::tempdir()?;
    let offsets = dir.path().join("inbox.offset");

    // First run: 4 messages from the start.
    let (code, r, err) =
        python_stream_read(&uri, &offsets, &["--expect", "4", "--timeout", "30"]).await?;
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(read_ids(&r), (0..4).map(id).collect::<Vec<_>>(), "{r}");
    assert_eq!(
        (&r["start"], &r["first_offset"]),
        (&"first".into(), &0.into())
    );
    assert_eq!(r["last_offset"], 3, "{r}");
    assert_eq!(r["senders"][BANK_A], 3, "{r}");
    assert_eq!(r["senders"][BANK_C], 1, "{r}");
    assert_eq!(std::fs::read_to_string(&offsets)?, "3\n");

    // Second run, same file: the 6 others, from offset 4, the marker between them skipped.
    let (code, r, err) =
        python_stream_read(&uri, &offsets, &["--expect", "6", "--timeout", "30"]).await?;
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(read_ids(&r), (4..10).map(id).collect::<Vec<_>>(), "{r}");
    assert_eq!((&r["start"], &r["first_offset"]), (&4.into(), &4.into()));
    assert_eq!(
        (&r["last_offset"], &r["markers_skipped"]),
        (&10.into(), &1.into())
    );

    // Third: nothing new but the trailing marker, skipped and committed.
    let (code, r, err) =
        python_stream_read(&uri, &offsets, &["--expect", "0", "--timeout", "3"]).await?;
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(
        (&r["read"], &r["markers_skipped"]),
        (&0.into(), &1.into()),
        "{r}"
    );
    assert_eq!(std::fs::read_to_string(&offsets)?, "11\n");

    // Fourth, after two more messages: only those.
    publish_as_float(
        &ch,
        INBOX,
        &[
            Entry::message("py", 10, BANK_A, BANK_B),
            Entry::message("py", 11, BANK_A, BANK_B),
        ],
    )
    .await?;
    let (code, r, err) =
        python_stream_read(&uri, &offsets, &["--expect", "0", "--timeout", "3"]).await?;
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(read_ids(&r), [id(10), id(11)], "{r}");
    assert_eq!(
        (&r["start"], &r["markers_skipped"]),
        (&12.into(), &0.into())
    );

    // Without the offset file: everything again (what the file prevents).
    let fresh = dir.path().join("fresh.offset");
    let (code, r, err) =
        python_stream_read(&uri, &fresh, &["--expect", "0", "--timeout", "3"]).await?;
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(read_ids(&r), (0..12).map(id).collect::<Vec<_>>(), "{r}");
    assert_eq!(r["markers_skipped"], 2, "{r}");

    // A corrupt file stops the node, naming the file; it does not start over.
    std::fs::write(&offsets, "11\n12")?;
    let (code, r, err) =
        python_stream_read(&uri, &offsets, &["--expect", "0", "--timeout", "3"]).await?;
    assert_ne!(code, Some(0), "{r}\n{err}");
    assert!(
        err.contains("is corrupt") && err.contains(&offsets.display().to_string()),
        "{err}"
    );
    assert_eq!(r, serde_json::Value::Null, "read nothing: {r}");
    Ok(())
}
