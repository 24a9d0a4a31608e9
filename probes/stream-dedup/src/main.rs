//! Issue 26's "stronger variant", measured before it is built: RabbitMQ stream publisher
//! deduplication over the stream protocol (a named producer, a publishing id per message,
//! the broker dropping repeats atomically with the write) against what the float does, AMQP
//! 0.9.1 publishes with confirms into a stream.
//!
//! Two parts, both against one private node (`run.sh` starts it):
//! 1. **Throughput** into a fresh stream each: AMQP 0.9.1 with confirms; the stream protocol
//!    without deduplication; the stream protocol with a named producer and publishing ids.
//!    Every stream is read back to check it holds exactly the messages sent.
//! 2. **What the broker's deduplication does** with the publishing patterns the bridge and
//!    float produce: a resend that arrives after a later id was stored (a publish nacked, or
//!    its link dropped, while the next ones went through), two floats publishing for one
//!    producer name at once (a link moving between floats), and a producer restarted.
//!
//! Not part of the product (its own workspace): nothing here ships, and its dependency
//! (`rabbitmq-stream-client`) stays out of the product's lockfile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use rabbitmq_stream_client::types::{Message, OffsetSpecification};
use rabbitmq_stream_client::Environment;
use tokio::sync::Semaphore;

struct Args {
    amqp_uri: String,
    stream_port: u16,
    messages: u64,
    size: usize,
    window: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        amqp_uri: String::new(),
        stream_port: 0,
        messages: 100_000,
        size: 1024,
        window: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--amqp-uri" => a.amqp_uri = v,
            "--stream-port" => a.stream_port = v.parse()?,
            "--messages" => a.messages = v.parse()?,
            "--size" => a.size = v.parse()?,
            "--window" => a.window = v.parse()?,
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.amqp_uri.is_empty() || a.stream_port == 0 {
        bail!("usage: stream-dedup-probe --amqp-uri URI --stream-port PORT [--messages N] [--size BYTES] [--window N]");
    }
    Ok(a)
}

async fn env(a: &Args) -> Result<Environment> {
    Environment::builder()
        .host("127.0.0.1")
        .port(a.stream_port)
        .build()
        .await
        .context("stream protocol connection")
}

/// A fresh stream named `name` (deleted first if a run left it).
async fn fresh(e: &Environment, name: &str) -> Result<()> {
    let _ = e.delete_stream(name).await;
    e.stream_creator()
        .create(name)
        .await
        .context("create stream")?;
    Ok(())
}

fn body(i: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size.max(8)];
    b[..8].copy_from_slice(&i.to_be_bytes());
    b
}

/// The first 8 bytes of every message stored in `stream`, in stream order (reads until the
/// stream has been quiet for a second).
async fn read_all(e: &Environment, stream: &str) -> Result<Vec<u64>> {
    let mut c = e
        .consumer()
        .offset(OffsetSpecification::First)
        .build(stream)
        .await
        .context("consumer")?;
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), c.next()).await {
            Ok(Some(d)) => {
                let d = d.context("delivery")?;
                let data = d.message().data().unwrap_or_default();
                let mut id = [0u8; 8];
                id.copy_from_slice(&data[..8]);
                out.push(u64::from_be_bytes(id));
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = c.handle().close().await;
    Ok(out)
}

async fn amqp091(a: &Args, stream: &str) -> Result<Duration> {
    let conn = Connection::connect(&a.amqp_uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    ch.queue_declare(
        ShortString::from(stream),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..a.messages {
        let c = ch
            .basic_publish(
                ShortString::from(""),
                ShortString::from(stream),
                BasicPublishOptions::default(),
                &body(i, a.size),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push(c);
        while pending.len() >= a.window {
            confirmed(pending.next().await)?;
        }
    }
    while !pending.is_empty() {
        confirmed(pending.next().await)?;
    }
    let took = started.elapsed();
    conn.close(200, "done".into()).await?;
    Ok(took)
}

fn confirmed(c: Option<lapin::Result<Confirmation>>) -> Result<()> {
    match c {
        Some(Ok(Confirmation::Ack(None))) => Ok(()),
        other => bail!("not confirmed: {other:?}"),
    }
}

/// Publishes `a.messages` with at most `a.window` unconfirmed; `named`: with a producer name
/// and publishing id = message number + 1.
async fn stream_protocol(a: &Args, e: &Environment, stream: &str, named: bool) -> Result<Duration> {
    let window = Arc::new(Semaphore::new(a.window));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // `Producer<Dedup>` and `Producer<NoDedup>` are different types (`send` takes `&mut self`
    // on one, `&self` on the other): one loop, written once, for both.
    macro_rules! publish_all {
        ($p:expr, $id:expr) => {{
            let started = Instant::now();
            for i in 0..a.messages {
                window.acquire().await?.forget();
                let mut m = Message::builder().body(body(i, a.size));
                if let Some(id) = $id(i) {
                    m = m.publising_id(id);
                }
                let (failed, w) = (failed.clone(), window.clone());
                $p.send(m.build(), move |r| {
                    let (failed, w) = (failed.clone(), w.clone());
                    async move {
                        if !r.map(|s| s.confirmed()).unwrap_or(false) {
                            failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        // 0.4.2 takes an `Fn` callback: the permit is given back by hand.
                        w.add_permits(1);
                    }
                })
                .await?;
            }
            let _ = window.acquire_many(a.window as u32).await?;
            let took = started.elapsed();
            $p.close().await?;
            took
        }};
    }
    let took = if named {
        let mut p = e.producer().name("probe").build(stream).await?;
        publish_all!(p, |i: u64| Some(i + 1))
    } else {
        let p = e.producer().build(stream).await?;
        publish_all!(p, |_: u64| None::<u64>)
    };
    check_failed(&failed)?;
    Ok(took)
}

fn check_failed(f: &std::sync::atomic::AtomicU64) -> Result<()> {
    let n = f.load(std::sync::atomic::Ordering::Relaxed);
    if n > 0 {
        bail!("{n} publishes not confirmed");
    }
    Ok(())
}

/// One message with publishing id `id` through a named producer; whether it was confirmed.
async fn send_one(
    p: &mut rabbitmq_stream_client::Producer<rabbitmq_stream_client::Dedup>,
    id: u64,
) -> Result<bool> {
    let s = p
        .send_with_confirm(
            Message::builder()
                .body(body(id, 16))
                .publising_id(id)
                .build(),
        )
        .await?;
    Ok(s.confirmed())
}

async fn semantics(a: &Args, e: &Environment) -> Result<()> {
    println!("\nWhat the broker's deduplication does (publishing id = message number):");

    // 1. A resend after a later id was stored: 1..=10 without 5 (its publish failed, or its
    //    link dropped before the float published it, while 6..=10 went through), then 5.
    let s = "probe-resend";
    fresh(e, s).await?;
    let mut p = e.producer().name("float-x").build(s).await?;
    for id in (1..=10).filter(|i| *i != 5) {
        send_one(&mut p, id).await?;
    }
    let five = send_one(&mut p, 5).await?;
    p.close().await?;
    let stored = read_all(e, s).await?;
    println!(
        "  resend after a later id: 1..=10 without 5, then 5 → 5 {}; stream holds {:?}{}",
        if five { "CONFIRMED" } else { "not confirmed" },
        stored,
        if stored.contains(&5) {
            ""
        } else {
            "  ← 5 was confirmed and is not stored: a loss the publisher cannot see"
        }
    );

    // 2. Two floats publishing for one producer name at once (a link moving to another float
    //    while the first still has publishes in flight).
    let s = "probe-two-floats";
    fresh(e, s).await?;
    let e2 = env(a).await?;
    let p1 = e.producer().name("sender-queue").build(s).await;
    let p2 = e2.producer().name("sender-queue").build(s).await;
    match (p1, p2) {
        (Ok(mut p1), Ok(mut p2)) => {
            let mut outcome = Vec::new();
            for (id, which) in [(1, 1), (2, 1), (3, 2), (2, 2), (4, 1), (6, 2), (5, 1)] {
                let ok = if which == 1 {
                    send_one(&mut p1, id).await?
                } else {
                    send_one(&mut p2, id).await?
                };
                outcome.push(format!("float{which}:{id}{}", if ok { "✓" } else { "✗" }));
            }
            p1.close().await?;
            p2.close().await?;
            let stored = read_all(e, s).await?;
            println!(
                "  two producers named alike on two connections: both accepted; sent {} → stream holds {stored:?}",
                outcome.join(" ")
            );
        }
        (r1, r2) => println!(
            "  two producers named alike on two connections: first {}, second {}",
            r1.map(|_| "accepted".to_string())
                .unwrap_or_else(|e| format!("refused: {e}")),
            r2.map(|_| "accepted".to_string())
                .unwrap_or_else(|e| format!("refused: {e}"))
        ),
    }

    // 3. A producer restarted: what the broker remembers of a name.
    let s = "probe-restart";
    fresh(e, s).await?;
    let mut p = e.producer().name("float-y").build(s).await?;
    for id in [1, 2, 3, 7] {
        send_one(&mut p, id).await?;
    }
    p.close().await?;
    let mut p = e.producer().name("float-y").build(s).await?;
    let mut again = Vec::new();
    for id in [3, 4, 8] {
        again.push(format!(
            "{id}{}",
            if send_one(&mut p, id).await? {
                "✓"
            } else {
                "✗"
            }
        ));
    }
    p.close().await?;
    let stored = read_all(e, s).await?;
    println!(
        "  restart: 1,2,3,7 stored, new connection sends {} → stream holds {stored:?} (the broker keeps only the highest id per name)",
        again.join(" ")
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let e = env(&a).await?;
    println!(
        "{} messages of {} bytes, {} unconfirmed at most, one publisher, into a fresh stream each:",
        a.messages, a.size, a.window
    );
    let mut base = None;
    for (label, mode) in [
        ("AMQP 0.9.1 with confirms (the float today)", 0),
        ("stream protocol, no deduplication", 1),
        ("stream protocol, named producer + publishing ids", 2),
    ] {
        let s = format!("probe-throughput-{mode}");
        let _ = e.delete_stream(&s).await;
        if mode > 0 {
            fresh(&e, &s).await?;
        }
        let took = match mode {
            0 => amqp091(&a, &s).await?,
            1 => stream_protocol(&a, &e, &s, false).await?,
            _ => stream_protocol(&a, &e, &s, true).await?,
        };
        let stored = read_all(&e, &s).await?;
        let distinct: std::collections::BTreeSet<u64> = stored.iter().copied().collect();
        if stored.len() as u64 != a.messages || distinct.len() as u64 != a.messages {
            bail!(
                "{label}: {} stored, {} distinct, {} sent",
                stored.len(),
                distinct.len(),
                a.messages
            );
        }
        let rate = a.messages as f64 / took.as_secs_f64();
        let ratio = base.map_or(1.0, |b: f64| rate / b);
        base.get_or_insert(rate);
        println!(
            "  {label:<52} {rate:>9.0} msg/s  ×{ratio:.2}  ({:.1} µs/msg, all {} read back once)",
            took.as_secs_f64() * 1e6 / a.messages as f64,
            a.messages
        );
        let _ = e.delete_stream(&s).await;
    }
    semantics(&a, &e).await?;
    Ok(())
}
