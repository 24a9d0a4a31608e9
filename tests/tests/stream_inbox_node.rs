//! The node's side of a stream inbox (`drawbridge_node::stream_inbox`) on a real RabbitMQ
//! stream filled as the float fills it: a node that reads part, commits, stops and starts
//! again from its offset file reads every peer message exactly once and never a window
//! marker; without the offset file it would read everything again; a queue that is not a
//! stream is refused before anything is acked. And `drawbridge receive --stream-offset`.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, Result};
use drawbridge_node::stream_inbox::{
    OffsetFile, StreamInbox, StreamInboxError, StreamOffset, WINDOW_MARKER,
};
use drawbridge_testkit::{
    daemon::bin_dir,
    node_stream::{declare_stream_inbox, publish_as_float, Entry},
    rabbit::shared_node,
    stream,
    world::{self, INBOX},
    BANK_A, BANK_B, BANK_C,
};

/// Nothing more arrives within this long: the stream is read to its end.
const QUIET: Duration = Duration::from_secs(2);

/// Read from `store` until `n` messages came or the stream is quiet, committing each one
/// after "processing" it; returns `(offset, id, sender)` of each and the inbox.
async fn read(
    ch: &lapin::Channel,
    store: OffsetFile,
    n: usize,
) -> Result<(Vec<(u64, String, String)>, StreamInbox<OffsetFile>)> {
    let mut inbox = StreamInbox::open(ch, INBOX, store, 4).await?;
    let mut got = Vec::new();
    while got.len() < n {
        let Ok(next) = tokio::time::timeout(QUIET, inbox.next()).await else {
            break;
        };
        let m = next?.context("consumer ended")?;
        assert!(!m.data.is_empty(), "a marker was handed out: {m:?}");
        got.push((
            m.offset,
            m.message_id().context("message id")?.to_string(),
            m.sender().context("sender")?,
        ));
        inbox.commit(m.offset)?;
    }
    Ok((got, inbox))
}

fn ids(got: &[(u64, String, String)]) -> Vec<String> {
    got.iter().map(|(_, id, _)| id.clone()).collect()
}

fn offset_in(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[tokio::test]
async fn a_node_reads_each_message_once_across_a_restart_and_skips_markers() -> Result<()> {
    assert_eq!(WINDOW_MARKER, drawbridge_mapping::headers::WINDOW_MARKER);
    let node = shared_node().await;
    let vhost = node.fresh_vhost().await?;
    let uri = node.amqp_uri(&vhost);
    let dir = tempfile::tempdir()?;
    let offsets = dir.path().join("inbox.offset");

    // 10 messages, a marker, 10 more, from two senders: what a float writes.
    let conn = drawbridge_node::connect(&uri).await?;
    let ch = conn.create_channel().await?;
    declare_stream_inbox(&ch, INBOX).await?;
    let mut entries: Vec<Entry> = (0..10)
        .map(|i| Entry::message("s", i, if i % 2 == 0 { BANK_A } else { BANK_C }, BANK_B))
        .collect();
    entries.push(Entry::Marker("float-1:1".into()));
    entries.extend((10..20).map(|i| Entry::message("s", i, BANK_A, BANK_B)));
    publish_as_float(&ch, INBOX, &entries).await?;
    let all: Vec<String> = (0..20).map(|i| format!("s-{i:08}")).collect();

    // First run: 7 messages, committed one by one, then the node stops (its consumer is not
    // cancelled, its connection goes).
    let c1 = drawbridge_node::connect(&uri).await?;
    let ch1 = c1.create_channel().await?;
    let (first, inbox) = read(&ch1, OffsetFile::open(&offsets)?, 7).await?;
    assert_eq!(ids(&first), all[..7], "{first:?}");
    assert_eq!(inbox.start(), StreamOffset::First);
    assert_eq!(first[0].2, BANK_A);
    assert_eq!(first[1].2, BANK_C);
    let last_first = first.last().context("none read")?.0;
    assert_eq!(offset_in(&offsets)?, format!("{last_first}\n"));
    drop(inbox);
    c1.close(200, "node stops".into()).await?;

    // Second run, from the offset file: the other 13 and nothing else; the marker skipped.
    let c2 = drawbridge_node::connect(&uri).await?;
    let ch2 = c2.create_channel().await?;
    let (second, inbox) = read(&ch2, OffsetFile::open(&offsets)?, usize::MAX).await?;
    assert_eq!(inbox.start(), StreamOffset::Offset(last_first + 1));
    assert_eq!(ids(&second), all[7..], "{second:?}");
    assert_eq!(inbox.markers_skipped(), 1);
    assert!(second[0].0 > last_first);
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for id in ids(&first).into_iter().chain(ids(&second)) {
        *seen.entry(id).or_default() += 1;
    }
    assert!(
        seen.len() == 20 && seen.values().all(|n| *n == 1),
        "each message exactly once: {seen:?}"
    );
    // The offsets handed out are increasing and leave one gap: the marker's.
    let offsets_read: Vec<u64> = first.iter().chain(&second).map(|(o, ..)| *o).collect();
    assert!(
        offsets_read.windows(2).all(|w| w[0] < w[1]),
        "{offsets_read:?}"
    );
    assert_eq!(offsets_read[19] - offsets_read[0], 20, "{offsets_read:?}");
    let last = offsets_read[19];

    // A float's marker at the end of what a node read is committed with the last message:
    // a restart does not read it again.
    publish_as_float(&ch, INBOX, &[Entry::Marker("float-1:2".into())]).await?;
    let mut inbox = inbox;
    assert!(
        tokio::time::timeout(QUIET, inbox.next()).await.is_err(),
        "only a marker came"
    );
    assert_eq!(inbox.markers_skipped(), 2);
    assert_eq!(offset_in(&offsets)?, format!("{}\n", last + 1));
    inbox.close().await?;

    // Third run: only what is new (two more messages), none of the old ones, no marker.
    let more: Vec<Entry> = (20..22)
        .map(|i| Entry::message("s", i, BANK_A, BANK_B))
        .collect();
    publish_as_float(&ch, INBOX, &more).await?;
    let (third, inbox) = read(&ch2, OffsetFile::open(&offsets)?, usize::MAX).await?;
    assert_eq!(ids(&third), ["s-00000020", "s-00000021"], "{third:?}");
    assert_eq!(inbox.markers_skipped(), 0);
    assert_eq!(inbox.start(), StreamOffset::Offset(last + 2));
    inbox.close().await?;

    // The failure the offset file prevents: a node that lost it (or never had one) reads
    // every message again from the start, the markers still skipped.
    let (again, inbox) = read(&ch2, OffsetFile::open(dir.path().join("lost"))?, 100).await?;
    assert_eq!(ids(&again).len(), 22, "{again:?}");
    assert_eq!(ids(&again)[..20], all[..]);
    assert_eq!(inbox.markers_skipped(), 2);
    inbox.close().await?;

    // And one that starts with `next` reads only what comes after it.
    let store = OffsetFile::open_or(dir.path().join("from-next"), StreamOffset::Next)?;
    let mut inbox = StreamInbox::open(&ch2, INBOX, store, 10).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_as_float(&ch, INBOX, &[Entry::message("s", 22, BANK_A, BANK_B)]).await?;
    let m = tokio::time::timeout(Duration::from_secs(10), inbox.next())
        .await
        .context("the new message did not come")??
        .context("consumer ended")?;
    assert_eq!(m.message_id(), Some("s-00000022"));
    assert_eq!(m.offset, last + 4);
    Ok(())
}

#[tokio::test]
async fn a_queue_that_is_not_a_stream_is_refused_and_keeps_its_messages() -> Result<()> {
    let node = shared_node().await;
    let vhost = node.fresh_vhost().await?;
    let conn = drawbridge_node::connect(&node.amqp_uri(&vhost)).await?;
    let ch = conn.create_channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    drawbridge_node::topology::bind_to_direct(
        &ch,
        drawbridge_node::topology::INBOX_EXCHANGE,
        INBOX,
    )
    .await?;
    publish_as_float(&ch, INBOX, &[Entry::message("q", 0, BANK_A, BANK_B)]).await?;
    let dir = tempfile::tempdir()?;
    let reader = conn.create_channel().await?;
    let e = StreamInbox::open(&reader, INBOX, OffsetFile::open(dir.path().join("o"))?, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(e, StreamInboxError::NotAStream { ref queue } if queue == INBOX),
        "{e:?}"
    );
    assert!(e.to_string().contains("is not a stream"), "{e}");
    assert!(!dir.path().join("o").exists(), "nothing committed");
    // Nothing was taken: the message is still there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.queue_depth(&vhost, INBOX).await? != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message was lost"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// `drawbridge receive --stream-offset` reads a stream inbox from where it is told, the
/// markers skipped and counted.
#[tokio::test]
async fn drawbridge_receive_reads_a_stream_inbox_from_the_offset_given() -> Result<()> {
    let node = shared_node().await;
    let vhost = node.fresh_vhost().await?;
    let uri = node.amqp_uri(&vhost);
    let conn = drawbridge_node::connect(&uri).await?;
    let ch = conn.create_channel().await?;
    declare_stream_inbox(&ch, INBOX).await?;
    // Verifiable bodies (`drawbridge send`'s), 5 before a marker and 5 after it: offsets 0-4,
    // the marker at 5, then 6-10.
    let message = |seq: u64| Entry::Message {
        sender: BANK_A.into(),
        destination: BANK_B.into(),
        id: stream::message_id("cli", seq),
        body: stream::make_body(seq, 64),
    };
    let mut entries: Vec<Entry> = (0..5).map(message).collect();
    entries.push(Entry::Marker("float-1:1".into()));
    entries.extend((5..10).map(message));
    publish_as_float(&ch, INBOX, &entries).await?;

    let receive = |offset: &'static str, idle: &'static str| {
        let uri = uri.clone();
        async move {
            let out = tokio::process::Command::new(bin_dir().join("drawbridge"))
                .args([
                    "receive", "--broker", &uri, "--queue", INBOX, "--expect", "10",
                ])
                .args(["--run", "cli", "--sender", BANK_A, "--idle", idle])
                .args(["--stream-offset", offset])
                .kill_on_drop(true)
                .output()
                .await
                .context("running drawbridge (cargo build --bins first)")?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::Ok((out.status.code(), text))
        }
    };
    let (code, out) = receive("first", "10s").await?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("received=10 lost=0 duplicates=0 corrupted=0 unexpected=0 wrong_sender=0")
            && out.contains("markers=1"),
        "{out}"
    );
    // From the first message after the marker: half the run, and no marker.
    let (code, out) = receive("6", "2s").await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("received=5 lost=5 duplicates=0") && out.contains("markers=0"),
        "{out}"
    );
    // Only what comes next: nothing.
    let (code, out) = receive("next", "2s").await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("received=0 lost=10"), "{out}");
    Ok(())
}

/// A node away for longer than the stream keeps messages resumes at the oldest one kept:
/// what retention dropped before it was read is lost to it, nothing is read twice, and the
/// offsets have gaps that are no loss (RabbitMQ's entry at the start of each segment).
#[tokio::test]
async fn a_node_away_longer_than_retention_resumes_at_the_oldest_message_kept() -> Result<()> {
    let node = shared_node().await;
    let vhost = node.fresh_vhost().await?;
    let conn = drawbridge_node::connect(&node.amqp_uri(&vhost)).await?;
    let ch = conn.create_channel().await?;
    // Tiny segments (RabbitMQ applies retention to whole segments when one is full), and
    // a few of them kept.
    let mut args = drawbridge_node::topology::inbox_args(
        drawbridge_node::topology::QueueType::Stream,
        &drawbridge_node::topology::StreamRetention {
            max_age: "1D".into(),
            max_bytes: 20_000,
        },
    );
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        lapin::types::AMQPValue::LongLongInt(4_000),
    );
    ch.queue_declare(
        INBOX.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    drawbridge_node::topology::bind_to_direct(
        &ch,
        drawbridge_node::topology::INBOX_EXCHANGE,
        INBOX,
    )
    .await?;
    let batch = |from: u64, n: u64| {
        (from..from + n)
            .map(|i| Entry::Message {
                sender: BANK_A.into(),
                destination: BANK_B.into(),
                id: format!("r-{i:08}"),
                body: vec![b'x'; 500],
            })
            .collect::<Vec<_>>()
    };
    publish_as_float(&ch, INBOX, &batch(0, 2)).await?;
    let dir = tempfile::tempdir()?;
    let offsets = dir.path().join("inbox.offset");
    let reader = conn.create_channel().await?;
    let (got, inbox) = read(&reader, OffsetFile::open(&offsets)?, 2).await?;
    assert_eq!(ids(&got), ["r-00000000", "r-00000001"]);
    inbox.close().await?;

    // While the node is away, far more than the stream keeps arrives: 100 x 500 bytes.
    for round in 0..10 {
        publish_as_float(&ch, INBOX, &batch(2 + round * 10, 10)).await?;
    }
    let (got, inbox) = read(&reader, OffsetFile::open(&offsets)?, usize::MAX).await?;
    // It asked for offset 2; the broker started at the oldest it still had.
    assert_eq!(inbox.start(), StreamOffset::Offset(2));
    let id_of = |g: &(u64, String, String)| -> u64 { g.1["r-".len()..].parse().unwrap() };
    let first = id_of(got.first().context("nothing read")?);
    assert!(first > 2, "the oldest messages should be gone: {got:?}");
    let read: Vec<u64> = got.iter().map(id_of).collect();
    assert_eq!(
        read,
        (first..102).collect::<Vec<_>>(),
        "the rest, once each"
    );
    let offsets_read: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert!(offsets_read.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert!(
        offsets_read[offsets_read.len() - 1] - offsets_read[0] >= offsets_read.len() as u64 - 1,
        "{got:?}"
    );
    assert_eq!(
        offset_in(&offsets)?,
        format!("{}\n", offsets_read[offsets_read.len() - 1])
    );
    Ok(())
}
