//! One peer link: a task that keeps an outbound AMQP 1.0 link to the peer's float(s) up and
//! forwards the peer queue's messages over it.
//!
//! The rules that make it lose nothing:
//! - the queue is consumed only while the link is up, with prefetch = window;
//! - a broker delivery is acked only after the peer's disposition is `accepted` (or after
//!   the message was confirmed into the dead-letter queue), in queue order, with
//!   `multiple = true` up to the last contiguous settled delivery;
//! - at the first `released` / `modified` / error / settlement timeout the link is
//!   recycled: nothing after that point is acked, the channel is closed, and the broker
//!   requeues every unacked delivery in order;
//! - deliveries of a lost broker connection are never acked afterwards.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use drawbridge_control_protocol::{LinkState, PeerLink, Target};
use drawbridge_runtime::{backoff::Backoff, broker::Live, headers};
use futures::{future::BoxFuture, stream::FuturesOrdered, FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Confirmation, Consumer,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    convert,
    peer::{self, ConnectFailure, PeerConnection, PeerSettings},
    settle::{classify, AckBatch, Settled},
    Ctx,
};

/// What `/status` shows about a link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkView {
    /// Peer queue.
    pub queue: String,
    /// connecting / up / down / deleted.
    pub state: String,
    /// Target in use (when up) or last tried.
    pub target: String,
    /// Why it is in this state.
    pub reason: String,
    /// Messages accepted by the peer (and acked) since start.
    pub forwarded: u64,
    /// Messages sent to the dead-letter queue since start.
    pub dead_lettered: u64,
    /// Deliveries the broker marked as redelivered (resends after a failure).
    pub redelivered: u64,
    /// Times the link was (re)established.
    pub connects: u64,
    /// Unix ms of the last state change.
    pub since_unix_ms: u64,
}

/// Shared handle on a link's view.
pub type SharedView = Arc<Mutex<LinkView>>;

/// A new view for `queue`.
pub fn new_view(queue: &str) -> SharedView {
    Arc::new(Mutex::new(LinkView {
        queue: queue.to_string(),
        state: LinkState::Connecting.to_string(),
        target: String::new(),
        reason: String::new(),
        forwarded: 0,
        dead_lettered: 0,
        redelivered: 0,
        connects: 0,
        since_unix_ms: drawbridge_runtime::daemon::unix_ms(),
    }))
}

/// How a forwarding session ended.
enum End {
    /// Stopped on request (DeleteLink / shutdown) after settling what was in flight.
    Stopped,
    /// Something failed; reconnect.
    Broken(String),
}

/// Run the link until `stop` is cancelled.
pub(crate) async fn run(spec: PeerLink, ctx: Arc<Ctx>, stop: CancellationToken, view: SharedView) {
    let cfg = &ctx.cfg;
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    // Targets that failed TLS verification are retried later than ones that refused.
    let mut tls_penalty: HashMap<Target, Instant> = HashMap::new();
    let mut next_target = 0usize;
    let mut last_reason = String::new();
    let settings = match ctx.peer_settings(&spec) {
        Ok(s) => s,
        Err(reason) => {
            set_state(&ctx, &view, &spec, LinkState::Down, "", &reason);
            warn!(queue = %spec.queue, reason = %reason, "link cannot start");
            stop.cancelled().await;
            set_state(&ctx, &view, &spec, LinkState::Deleted, "", "deleted");
            return;
        }
    };
    set_state(&ctx, &view, &spec, LinkState::Connecting, "", "starting");
    while !stop.is_cancelled() {
        // Broker first: there is no point holding a peer connection we cannot feed.
        let live = tokio::select! {
            l = ctx.broker.connected(0, Duration::from_secs(3600)) => l,
            _ = stop.cancelled() => break,
        };
        let Some(live) = live else { continue };

        let now = Instant::now();
        let n = spec.targets.len();
        let mut order: Vec<&Target> = (0..n)
            .map(|i| &spec.targets[(next_target + i) % n])
            .collect();
        order.sort_by_key(|t| {
            tls_penalty
                .get(*t)
                .map(|until| *until > now)
                .unwrap_or(false)
        });
        let mut failures = Vec::new();
        let mut connected = None;
        for target in order {
            let attempt = tokio::select! {
                r = peer::connect(target, &settings) => r,
                _ = stop.cancelled() => break,
            };
            match attempt {
                Ok(pc) => {
                    tls_penalty.remove(target);
                    connected = Some(pc);
                    break;
                }
                Err(f) => {
                    if let ConnectFailure::Tls(_) = f {
                        tls_penalty.insert(
                            target.clone(),
                            now + cfg.reconnect_max.min(Duration::from_secs(30)),
                        );
                    }
                    failures.push(f.reason());
                }
            }
        }
        let Some(pc) = connected else {
            if stop.is_cancelled() {
                break;
            }
            let reason = failures.join("; ");
            let delay = backoff.next_delay();
            if reason != last_reason {
                warn!(queue = %spec.queue, reason = %reason, retry_in = ?delay, "link down: cannot connect");
                set_state(&ctx, &view, &spec, LinkState::Down, "", &reason);
                last_reason = reason;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => continue,
                _ = stop.cancelled() => break,
            }
        };
        backoff.reset();
        next_target = spec
            .targets
            .iter()
            .position(|t| *t == pc.target)
            .unwrap_or(0);
        let target = pc.target.to_string();
        let end = run_connected(pc, &live, &spec, &ctx, &stop, &view, &target).await;
        match end {
            End::Stopped => break,
            End::Broken(reason) => {
                let delay = backoff.next_delay();
                warn!(queue = %spec.queue, target = %target, reason = %reason, retry_in = ?delay, "link down");
                set_state(&ctx, &view, &spec, LinkState::Down, &target, &reason);
                last_reason = reason;
                // The next attempt prefers the next target (failover).
                next_target = (next_target + 1) % n.max(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    set_state(
        &ctx,
        &view,
        &spec,
        LinkState::Deleted,
        "",
        "link deleted or bridge stopping",
    );
    info!(queue = %spec.queue, "link stopped");
}

async fn run_connected(
    mut pc: PeerConnection,
    live: &Arc<Live>,
    spec: &PeerLink,
    ctx: &Arc<Ctx>,
    stop: &CancellationToken,
    view: &SharedView,
    target: &str,
) -> End {
    let op = ctx.broker.config().op_timeout;
    let opened = tokio::time::timeout(op, open_consumer(live, spec, ctx)).await;
    let (channel, consumer) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            pc.close().await;
            return End::Broken(format!("cannot consume `{}`: {e}", spec.queue));
        }
        Err(_) => {
            pc.close().await;
            live.report_broken("opening a consumer timed out");
            return End::Broken("opening the consumer timed out".into());
        }
    };
    view.lock().expect("poisoned").connects += 1;
    set_state(ctx, view, spec, LinkState::Up, target, "connected");
    info!(queue = %spec.queue, target = %target, "link up");
    let end = forward(&mut pc, &channel, consumer, live, spec, ctx, stop, view).await;
    // Closing the channel returns every unacked delivery to the queue, in order.
    let _ = tokio::time::timeout(op, channel.close(200, "link recycled".into())).await;
    pc.close().await;
    end
}

async fn open_consumer(
    live: &Arc<Live>,
    spec: &PeerLink,
    ctx: &Arc<Ctx>,
) -> Result<(Channel, Consumer), lapin::Error> {
    let ch = live.conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(
        ShortString::from(spec.queue.as_str()),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        ctx.peer_queue_args(),
    )
    .await?;
    ch.basic_qos(ctx.cfg.window, BasicQosOptions::default())
        .await?;
    let consumer = ch
        .basic_consume(
            ShortString::from(spec.queue.as_str()),
            ShortString::from(format!("drawbridge-{}", ctx.cfg.id)),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, consumer))
}

type InFlight = BoxFuture<'static, (Delivery, Settled)>;

#[allow(clippy::too_many_arguments)]
async fn forward(
    pc: &mut PeerConnection,
    channel: &Channel,
    mut consumer: Consumer,
    live: &Arc<Live>,
    spec: &PeerLink,
    ctx: &Arc<Ctx>,
    stop: &CancellationToken,
    view: &SharedView,
) -> End {
    let cfg = &ctx.cfg;
    let op = ctx.broker.config().op_timeout;
    let window = cfg.window as usize;
    let mut inflight: FuturesOrdered<InFlight> = FuturesOrdered::new();
    let mut acks = AckBatch::new(64);
    let mut draining = false;
    let mut drain_deadline = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        if draining && inflight.is_empty() {
            return match flush(channel, &mut acks, op).await {
                Ok(()) => End::Stopped,
                Err(e) => End::Broken(e),
            };
        }
        tokio::select! {
            biased;
            Some((delivery, settled)) = inflight.next(), if !inflight.is_empty() => {
                let tag = delivery.delivery_tag;
                match settled {
                    Settled::Accepted => {
                        view.lock().expect("poisoned").forwarded += 1;
                        metrics::counter!("drawbridge_bridge_forwarded_total").increment(1);
                    }
                    Settled::DeadLetter(reason) => {
                        if let Err(e) = dead_letter(channel, &delivery, &reason, spec, ctx).await {
                            let _ = flush(channel, &mut acks, op).await;
                            return End::Broken(format!("dead-lettering failed: {e}"));
                        }
                        view.lock().expect("poisoned").dead_lettered += 1;
                    }
                    Settled::Retry(reason) => {
                        // Ack the settled prefix, nothing after it.
                        if let Err(e) = flush(channel, &mut acks, op).await {
                            return End::Broken(e);
                        }
                        return End::Broken(reason);
                    }
                }
                if acks.settled(tag, inflight.is_empty()) {
                    if let Err(e) = flush(channel, &mut acks, op).await {
                        return End::Broken(e);
                    }
                }
            }
            _ = stop.cancelled(), if !draining => {
                draining = true;
                drain_deadline = Some(tokio::time::Instant::now() + cfg.drain_grace);
                // Stop new deliveries; those already prefetched but not sent are requeued
                // when the channel closes.
                let _ = tokio::time::timeout(op, channel.basic_cancel(consumer.tag(), BasicCancelOptions::default())).await;
            }
            _ = async { tokio::time::sleep_until(drain_deadline.expect("set")).await }, if drain_deadline.is_some() => {
                let _ = flush(channel, &mut acks, op).await;
                return End::Broken("drain grace period over; unsettled transfers will be resent".into());
            }
            d = consumer.next(), if !draining && inflight.len() < window => {
                let delivery = match d {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        let _ = flush(channel, &mut acks, op).await;
                        return End::Broken(format!("consumer failed: {e}"));
                    }
                    None => {
                        let _ = flush(channel, &mut acks, op).await;
                        return End::Broken("consumer cancelled by the broker".into());
                    }
                };
                if delivery.redelivered {
                    view.lock().expect("poisoned").redelivered += 1;
                    metrics::counter!("drawbridge_bridge_redelivered_total").increment(1);
                }
                match convert::to_amqp(&delivery, cfg.max_message_size) {
                    Err(u) => {
                        metrics::counter!("drawbridge_bridge_undeliverable_total", "reason" => u.label()).increment(1);
                        let reason = u.to_string();
                        inflight.push_back(async move { (delivery, Settled::DeadLetter(reason)) }.boxed());
                    }
                    Ok(msg) => {
                        let sent = tokio::time::timeout(cfg.settle_timeout, pc.sender.send_batchable(msg)).await;
                        let fut = match sent {
                            Ok(Ok(fut)) => fut,
                            Ok(Err(e)) => {
                                let _ = flush(channel, &mut acks, op).await;
                                return End::Broken(format!("send failed: {e}"));
                            }
                            Err(_) => {
                                let _ = flush(channel, &mut acks, op).await;
                                return End::Broken(format!("peer granted no credit for {:?}", cfg.settle_timeout));
                            }
                        };
                        let timeout = cfg.settle_timeout;
                        inflight.push_back(async move {
                            let settled = classify(tokio::time::timeout(timeout, fut).await.ok(), timeout);
                            (delivery, settled)
                        }.boxed());
                    }
                }
            }
            closed = pc.conn.on_close() => {
                let _ = flush(channel, &mut acks, op).await;
                let why = match closed {
                    Ok(()) => "peer closed the connection".to_string(),
                    Err(e) => format!("peer connection lost: {e}"),
                };
                return End::Broken(why);
            }
            _ = live.lost() => {
                // Never ack deliveries of a dead connection.
                return End::Broken("broker connection lost".into());
            }
            _ = tick.tick() => {
                if acks.is_pending() {
                    if let Err(e) = flush(channel, &mut acks, op).await {
                        return End::Broken(e);
                    }
                }
            }
        }
    }
}

async fn flush(channel: &Channel, acks: &mut AckBatch, op: Duration) -> Result<(), String> {
    let Some(tag) = acks.take() else {
        return Ok(());
    };
    match tokio::time::timeout(
        op,
        channel.basic_ack(tag, BasicAckOptions { multiple: true }),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("ack failed: {e}")),
        Err(_) => Err(format!("ack timed out after {op:?}")),
    }
}

/// Publish `d` to the dead-letter queue with `reason`, waiting for the confirm.
async fn dead_letter(
    channel: &Channel,
    d: &Delivery,
    reason: &str,
    spec: &PeerLink,
    ctx: &Ctx,
) -> Result<(), String> {
    warn!(queue = %spec.queue, message_id = ?d.properties.message_id().as_ref().map(|s| s.as_str()), reason = %reason, "message dead-lettered");
    metrics::counter!("drawbridge_bridge_dead_lettered_total").increment(1);
    let mut hdrs = d.properties.headers().clone().unwrap_or_default();
    hdrs.insert(
        ShortString::from(headers::REASON),
        AMQPValue::LongString(LongString::from(reason.to_string())),
    );
    hdrs.insert(
        ShortString::from(headers::ORIGIN_QUEUE),
        AMQPValue::LongString(LongString::from(spec.queue.clone())),
    );
    let props: BasicProperties = d
        .properties
        .clone()
        .with_headers(hdrs)
        .with_delivery_mode(2);
    let op = ctx.broker.config().op_timeout;
    let confirm = tokio::time::timeout(op, async {
        channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(ctx.cfg.dead_letter_queue.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.data,
                props,
            )
            .await?
            .await
    })
    .await;
    match confirm {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(other)) => Err(format!("dead-letter queue refused the message: {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("dead-letter publish not confirmed within {op:?}")),
    }
}

fn set_state(
    ctx: &Ctx,
    view: &SharedView,
    spec: &PeerLink,
    state: LinkState,
    target: &str,
    reason: &str,
) {
    {
        let mut v = view.lock().expect("poisoned");
        v.state = state.to_string();
        v.target = target.to_string();
        v.reason = reason.to_string();
        v.since_unix_ms = drawbridge_runtime::daemon::unix_ms();
    }
    ctx.notify_link(spec, state, target, reason);
}

/// Peer settings for a link, or why it cannot be built.
pub(crate) fn settings(ctx: &Ctx, spec: &PeerLink) -> Result<PeerSettings, String> {
    let mut names = Vec::new();
    for n in &spec.legal_names {
        names.push(
            n.parse::<drawbridge_certs::LegalName>()
                .map_err(|e| format!("legal name `{n}`: {e}"))?,
        );
    }
    let tls = drawbridge_certs::client_config(
        &ctx.identity,
        ctx.roots.clone(),
        names,
        ctx.cfg.tls_policy,
    )
    .map_err(|e| format!("TLS config: {e}"))?;
    Ok(PeerSettings {
        tls,
        connect_timeout: ctx.cfg.connect_timeout,
        idle_timeout: ctx.cfg.idle_timeout,
        container_id: format!("drawbridge-bridge-{}", ctx.cfg.id),
        link_name: format!("drawbridge-{}-{}", ctx.cfg.id, spec.queue),
        address: spec.target_address.clone(),
    })
}
