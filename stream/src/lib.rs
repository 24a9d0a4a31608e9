//! A verifiable message stream: what the demo, the CLI and the tests send and check.
//!
//! Every body is self-verifying: `seq (u64 BE) | sent_at unix nanos (u64 BE) |
//! sha256(filler) (32 bytes) | filler`, where the filler is derived from the sequence
//! number. The message id is `{run}-{seq:08}`. A receiver can therefore tell, without
//! any shared state but the run id and the expected count, which messages were lost,
//! duplicated, corrupted or unexpected, and how long each took end to end.
//!
//! Used by the operator CLI (`drawbridge send` / `receive`), the demo and the test kit.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation, Connection,
};
use sha2::{Digest, Sha256};

/// Header names of the message contract (kept literal here: the testkit checks the
/// contract, it does not import it).
pub const DESTINATION: &str = "drawbridge-destination";
/// Sender header stamped by the float.
pub const SENDER: &str = "drawbridge-sender";
/// Header of a float's window marker in a stream inbox: no peer's message, skipped.
pub const WINDOW_MARKER: &str = "drawbridge-window-marker";

const HEADER_LEN: usize = 8 + 8 + 32;

/// The message id of `seq` in run `run`.
pub fn message_id(run: &str, seq: u64) -> String {
    format!("{run}-{seq:08}")
}

/// A body of `size` bytes (at least the 48-byte header) for `seq`, stamped with the time now.
pub fn make_body(seq: u64, size: usize) -> Vec<u8> {
    make_body_sent_at(seq, size, now_nanos())
}

/// A body like [`make_body`], stamped with `sent_nanos` (ns since the Unix epoch) as its send
/// time: a paced publisher stamps the time the message was *due*, so a publisher that falls
/// behind shows up in the latency instead of hiding it (no coordinated omission).
pub fn make_body_sent_at(seq: u64, size: usize, sent_nanos: u64) -> Vec<u8> {
    let size = size.max(HEADER_LEN);
    let mut filler = vec![0u8; size - HEADER_LEN];
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in filler.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let digest = Sha256::digest(&filler);
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(&sent_nanos.to_be_bytes());
    body.extend_from_slice(&digest);
    body.extend_from_slice(&filler);
    body
}

/// Check a body: its sequence number and send time if intact, `None` if corrupted.
pub fn check_body(body: &[u8]) -> Option<(u64, u64)> {
    if body.len() < HEADER_LEN {
        return None;
    }
    let seq = u64::from_be_bytes(body[0..8].try_into().ok()?);
    let sent = u64::from_be_bytes(body[8..16].try_into().ok()?);
    let digest = Sha256::digest(&body[HEADER_LEN..]);
    (digest.as_slice() == &body[16..48]).then_some((seq, sent))
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What a receiver saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Messages expected.
    pub expected: u64,
    /// Distinct expected messages received intact.
    pub received: u64,
    /// Expected messages never received.
    pub lost: u64,
    /// Extra copies of messages already received.
    pub duplicates: u64,
    /// Bodies that failed their checksum or whose id did not match the body.
    pub corrupted: u64,
    /// Messages of another run, or with a sequence number out of range.
    pub unexpected: u64,
    /// Messages whose `drawbridge-sender` was not the expected one.
    pub wrong_sender: u64,
    /// First copies that arrived after a message published later (FIFO broken): 0 when the
    /// run arrived in the order it was published.
    pub out_of_order: u64,
    /// Median end-to-end latency.
    pub p50: Duration,
    /// 99th percentile end-to-end latency.
    pub p99: Duration,
    /// 99.9th percentile end-to-end latency.
    pub p999: Duration,
    /// First receipt to last receipt.
    pub elapsed: Duration,
    /// Every header name seen on any message of the run (to check what a float let through).
    pub header_keys: std::collections::BTreeSet<String>,
}

impl Report {
    /// Messages per second over the receive window.
    pub fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.received as f64 / self.elapsed.as_secs_f64()
    }

    /// True when every expected message arrived intact.
    pub fn complete(&self) -> bool {
        self.lost == 0 && self.corrupted == 0 && self.wrong_sender == 0
    }
}

/// Tallies received messages of one run.
#[derive(Debug)]
pub struct Tally {
    run: String,
    expected: u64,
    sender: Option<String>,
    seen: HashMap<u64, u32>,
    corrupted: u64,
    unexpected: u64,
    wrong_sender: u64,
    out_of_order: u64,
    /// Highest sequence number received so far.
    highest: Option<u64>,
    latencies_us: Vec<u64>,
    first: Option<std::time::Instant>,
    last: Option<std::time::Instant>,
    header_keys: std::collections::BTreeSet<String>,
    markers: u64,
}

impl Tally {
    /// Expect `expected` messages of run `run`; if `sender` is given, each must carry it.
    pub fn new(run: &str, expected: u64, sender: Option<String>) -> Self {
        Tally {
            run: run.to_string(),
            expected,
            sender,
            seen: HashMap::new(),
            corrupted: 0,
            unexpected: 0,
            wrong_sender: 0,
            out_of_order: 0,
            highest: None,
            latencies_us: Vec::new(),
            first: None,
            last: None,
            header_keys: Default::default(),
            markers: 0,
        }
    }

    /// Whether a message with these headers is a float's window marker (counted, not a
    /// message of the run).
    pub fn skip_marker(&mut self, headers: Option<&FieldTable>) -> bool {
        let marker = headers.is_some_and(|h| h.inner().contains_key(WINDOW_MARKER));
        self.markers += u64::from(marker);
        marker
    }

    /// Window markers skipped so far.
    pub fn markers(&self) -> u64 {
        self.markers
    }

    /// Remember the header names of a received message (see [`Report::header_keys`]).
    pub fn note_headers(&mut self, headers: Option<&FieldTable>) {
        for k in headers.into_iter().flat_map(|h| h.inner().keys()) {
            if !self.header_keys.contains(k.as_str()) {
                self.header_keys.insert(k.to_string());
            }
        }
    }

    /// Record one message.
    pub fn record(&mut self, id: Option<&str>, body: &[u8], sender: Option<&str>) {
        let now = std::time::Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        let Some((seq, sent)) = check_body(body) else {
            self.corrupted += 1;
            return;
        };
        if id != Some(message_id(&self.run, seq).as_str()) {
            if id
                .map(|i| i.starts_with(&format!("{}-", self.run)))
                .unwrap_or(false)
            {
                self.corrupted += 1;
            } else {
                self.unexpected += 1;
            }
            return;
        }
        if seq >= self.expected {
            self.unexpected += 1;
            return;
        }
        if let Some(want) = &self.sender {
            if sender != Some(want.as_str()) {
                self.wrong_sender += 1;
            }
        }
        let n = self.seen.entry(seq).or_insert(0);
        *n += 1;
        if *n == 1 {
            if self.highest.is_some_and(|h| seq < h) {
                self.out_of_order += 1;
            }
            self.highest = self.highest.max(Some(seq));
            self.latencies_us
                .push(now_nanos().saturating_sub(sent) / 1000);
        }
    }

    /// Distinct expected messages seen so far.
    pub fn distinct(&self) -> u64 {
        self.seen.len() as u64
    }

    /// The report so far.
    pub fn report(&self) -> Report {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let pct = |p: f64| -> Duration {
            if l.is_empty() {
                return Duration::ZERO;
            }
            let i = ((l.len() as f64 - 1.0) * p).round() as usize;
            Duration::from_micros(l[i])
        };
        let received = self.seen.len() as u64;
        Report {
            expected: self.expected,
            received,
            lost: self.expected.saturating_sub(received),
            duplicates: self.seen.values().map(|n| u64::from(*n - 1)).sum(),
            corrupted: self.corrupted,
            unexpected: self.unexpected,
            wrong_sender: self.wrong_sender,
            out_of_order: self.out_of_order,
            p50: pct(0.50),
            p99: pct(0.99),
            p999: pct(0.999),
            elapsed: match (self.first, self.last) {
                (Some(a), Some(b)) => b - a,
                _ => Duration::ZERO,
            },
            header_keys: self.header_keys.clone(),
        }
    }
}

/// Connect to a broker (tests and tools; the daemons use their supervised session).
pub async fn connect(uri: &str) -> Result<Connection> {
    drawbridge_node::connect(uri)
        .await
        .with_context(|| format!("connecting to {}", drawbridge_node::redact_uri(uri)))
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    /// Run id (message id prefix).
    pub run: String,
    /// First sequence number.
    pub from: u64,
    /// One past the last sequence number.
    pub to: u64,
    /// Body size in bytes.
    pub size: usize,
    /// `drawbridge-destination` header value.
    pub destination: String,
    /// Extra headers on every message.
    pub headers: Vec<(String, String)>,
}

/// Publish `spec` to `queue` (default exchange) as persistent messages with publisher
/// confirms, keeping up to 512 confirms in flight. `progress` is called with the
/// number confirmed so far.
pub async fn publish(
    channel: &Channel,
    queue: &str,
    spec: &PublishSpec,
    progress: impl FnMut(u64),
) -> Result<()> {
    publish_paced(channel, queue, spec, None, progress).await
}

/// Like [`publish`], at an offered `rate` (messages per second) when one is given: message
/// `i` is due `i / rate` after the start and is sent then (open loop: the schedule does not
/// wait for the path), stamped with the time it was due. `None` publishes as fast as the
/// confirm window allows.
pub async fn publish_paced(
    channel: &Channel,
    queue: &str,
    spec: &PublishSpec,
    rate: Option<f64>,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("confirm_select")?;
    let mut pending = futures::stream::FuturesOrdered::new();
    let mut done = 0u64;
    let start = tokio::time::Instant::now();
    let start_nanos = now_nanos();
    for seq in spec.from..spec.to {
        let sent_nanos = match rate {
            Some(rate) if rate > 0.0 => {
                let due = Duration::from_secs_f64((seq - spec.from) as f64 / rate);
                tokio::time::sleep_until(start + due).await;
                start_nanos + due.as_nanos() as u64
            }
            _ => now_nanos(),
        };
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(DESTINATION),
            AMQPValue::LongString(LongString::from(spec.destination.clone())),
        );
        for (k, v) in &spec.headers {
            headers.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(v.clone())),
            );
        }
        // The send time in whole seconds (AMQP 0-9-1's `timestamp`), as a node sets it: the
        // bridge's `drawbridge_bridge_delivery_age_seconds` is measured from it.
        let sent_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_timestamp(sent_at)
            .with_message_id(ShortString::from(message_id(&spec.run, seq)))
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &make_body_sent_at(seq, spec.size, sent_nanos),
                props,
            )
            .await
            .context("publish")?;
        pending.push_back(confirm);
        while pending.len() >= 512 {
            check_confirm(pending.next().await)?;
            done += 1;
            if done.is_multiple_of(256) {
                progress(done);
            }
        }
    }
    while !pending.is_empty() {
        check_confirm(pending.next().await)?;
        done += 1;
    }
    progress(done);
    Ok(())
}

fn check_confirm(c: Option<lapin::Result<Confirmation>>) -> Result<()> {
    match c {
        Some(Ok(Confirmation::Ack(None))) => Ok(()),
        Some(Ok(other)) => bail!("publish not accepted by the broker: {other:?}"),
        Some(Err(e)) => bail!("publish failed: {e}"),
        None => bail!("confirm stream ended"),
    }
}

/// Consume `queue` until `tally` has every expected message or nothing arrives for
/// `idle`. Acks what it reads (multiple, every 100 messages). `progress` gets the
/// distinct count.
pub async fn consume(
    channel: &Channel,
    queue: &str,
    tally: &mut Tally,
    idle: Duration,
    progress: impl FnMut(u64),
) -> Result<()> {
    consume_from(channel, queue, None, tally, idle, progress).await
}

/// As [`consume`]; `offset`, when given, is the `x-stream-offset` a *stream* inbox is read
/// from (`"first"`, a number, a timestamp). A stream keeps what is read: the acks only give
/// the consumer credit. The float's window markers ([`WINDOW_MARKER`]) are skipped (counted
/// in [`Tally::markers`]).
pub async fn consume_from(
    channel: &Channel,
    queue: &str,
    offset: Option<AMQPValue>,
    tally: &mut Tally,
    idle: Duration,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    if let Some(offset) = offset {
        args.insert(ShortString::from("x-stream-offset"), offset);
    }
    let mut consumer = channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(format!("drawbridge-verify-{}", uuid::Uuid::new_v4())),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .with_context(|| format!("consuming {queue}"))?;
    let mut unacked = 0u32;
    let mut last_tag = 0;
    while tally.distinct() < tally.expected {
        let next = tokio::time::timeout(idle, consumer.next()).await;
        let d = match next {
            Err(_) => break,
            Ok(None) => bail!("consumer of {queue} cancelled"),
            Ok(Some(Err(e))) => bail!("consuming {queue}: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        if tally.skip_marker(d.properties.headers().as_ref()) {
            channel
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await?;
            continue;
        }
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string());
        let sender = header_string(d.properties.headers().as_ref(), SENDER);
        tally.record(id.as_deref(), &d.data, sender.as_deref());
        tally.note_headers(d.properties.headers().as_ref());
        last_tag = d.delivery_tag;
        unacked += 1;
        if unacked >= 100 {
            channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await?;
            unacked = 0;
            progress(tally.distinct());
        }
    }
    if unacked > 0 {
        channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await?;
    }
    // Catch late duplicates: drain briefly after the last expected message.
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        if tally.skip_marker(d.properties.headers().as_ref()) {
            channel
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await?;
            continue;
        }
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string());
        let sender = header_string(d.properties.headers().as_ref(), SENDER);
        tally.record(id.as_deref(), &d.data, sender.as_deref());
        channel
            .basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await?;
    }
    progress(tally.distinct());
    Ok(())
}

/// A progress bar for `len` items labelled `what` (draws only when stderr is a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{prefix:>12}} [{{bar:40}}] {{pos}}/{{len}} {what} ({{per_sec}})"
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// A string header's value.
pub fn header_string(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_verify_and_detect_corruption() {
        let mut b = make_body(42, 1024);
        assert_eq!(b.len(), 1024);
        assert_eq!(check_body(&b).map(|(s, _)| s), Some(42));
        b[500] ^= 1;
        assert_eq!(check_body(&b), None);
    }

    #[test]
    fn latency_runs_from_the_stamped_due_time_and_has_a_p999() {
        // Due one second ago: a paced publisher that fell behind by a second shows it.
        let due = now_nanos() - 1_000_000_000;
        let b = make_body_sent_at(7, 256, due);
        assert_eq!(check_body(&b), Some((7, due)));
        let mut t = Tally::new("r", 1000, None);
        for seq in 0..1000 {
            // The two slowest of 1,000 are the 99.9th percentile, not the 99th.
            let body = if seq >= 998 {
                make_body_sent_at(seq, 64, due)
            } else {
                make_body(seq, 64)
            };
            t.record(Some(&message_id("r", seq)), &body, None);
        }
        let r = t.report();
        assert!(r.p999 >= Duration::from_millis(900), "{r:?}");
        assert!(r.p99 < Duration::from_millis(900), "{r:?}");
    }

    #[test]
    fn tally_counts_what_arrives_out_of_order_but_not_duplicates() {
        let mut t = Tally::new("r", 4, None);
        for seq in [0, 2, 1, 2, 3] {
            t.record(Some(&message_id("r", seq)), &make_body(seq, 64), None);
        }
        let r = t.report();
        assert_eq!(
            (r.received, r.duplicates, r.out_of_order),
            (4, 1, 1),
            "{r:?}"
        );
    }

    #[test]
    fn tally_counts_lost_duplicates_and_unexpected() {
        let mut t = Tally::new("r", 3, Some("S".into()));
        t.record(Some("r-00000000"), &make_body(0, 64), Some("S"));
        t.record(Some("r-00000000"), &make_body(0, 64), Some("S"));
        t.record(Some("x-00000001"), &make_body(1, 64), Some("S"));
        t.record(Some("r-00000002"), &make_body(2, 64), Some("forged"));
        let r = t.report();
        assert_eq!(
            (
                r.received,
                r.lost,
                r.duplicates,
                r.unexpected,
                r.wrong_sender
            ),
            (2, 1, 1, 1, 1)
        );
        assert!(!r.complete());
    }
}
