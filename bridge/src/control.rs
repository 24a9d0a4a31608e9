//! The control plane: consume the node's control messages, converge the set of running
//! links, and ask for a snapshot until one arrives.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use drawbridge_control_protocol::{ControlCommand, Notification, PeerLink, SnapshotRequest};
use drawbridge_runtime::{backoff::Backoff, broker::Live};
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
    ExchangeKind,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    link::{self, SharedView},
    Ctx,
};

/// A running link.
struct RunningLink {
    spec: PeerLink,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The set of running links, owned by the control task.
pub(crate) struct Links {
    running: BTreeMap<String, RunningLink>,
    ctx: Arc<Ctx>,
}

impl Links {
    pub(crate) fn new(ctx: Arc<Ctx>) -> Self {
        Links {
            running: BTreeMap::new(),
            ctx,
        }
    }

    /// Start `spec`, or restart it if it changed; no-op if it runs as specified.
    pub(crate) async fn create(&mut self, spec: PeerLink) {
        if let Some(r) = self.running.get(&spec.queue) {
            if r.spec == spec {
                return;
            }
            info!(queue = %spec.queue, "link changed; restarting it");
            self.delete(&spec.queue.clone()).await;
        }
        info!(queue = %spec.queue, targets = ?spec.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(), legal_names = ?spec.legal_names, "link created");
        let view: SharedView = link::new_view(&spec.queue);
        self.ctx
            .views
            .lock()
            .expect("poisoned")
            .insert(spec.queue.clone(), view.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(link::run(
            spec.clone(),
            self.ctx.clone(),
            stop.clone(),
            view,
        ));
        self.running
            .insert(spec.queue.clone(), RunningLink { spec, stop, task });
    }

    /// Stop the link on `queue` (settling what is in flight); no-op if none.
    pub(crate) async fn delete(&mut self, queue: &str) {
        let Some(r) = self.running.remove(queue) else {
            return;
        };
        r.stop.cancel();
        let grace = self.ctx.cfg.drain_grace + Duration::from_secs(5);
        if tokio::time::timeout(grace, r.task).await.is_err() {
            warn!(queue, "link did not stop within the grace period");
        }
        self.ctx.views.lock().expect("poisoned").remove(queue);
        info!(queue, "link deleted");
    }

    /// Converge to exactly `links`.
    pub(crate) async fn converge(&mut self, links: Vec<PeerLink>) {
        let wanted: BTreeMap<String, PeerLink> =
            links.into_iter().map(|l| (l.queue.clone(), l)).collect();
        let stale: Vec<String> = self
            .running
            .keys()
            .filter(|q| !wanted.contains_key(*q))
            .cloned()
            .collect();
        for q in stale {
            self.delete(&q).await;
        }
        for (_, spec) in wanted {
            self.create(spec).await;
        }
    }

    /// Stop every link concurrently (shutdown).
    pub(crate) async fn stop_all(&mut self) {
        for r in self.running.values() {
            r.stop.cancel();
        }
        let grace = self.ctx.cfg.drain_grace + Duration::from_secs(5);
        let tasks: Vec<_> = std::mem::take(&mut self.running)
            .into_values()
            .map(|r| r.task)
            .collect();
        let _ = tokio::time::timeout(grace, futures::future::join_all(tasks)).await;
    }

    pub(crate) fn len(&self) -> usize {
        self.running.len()
    }
}

/// Run the control plane until `shutdown`, then stop all links.
pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut links = Links::new(ctx.clone());
    let mut generation = 0;
    // Retries of the control channel on a healthy connection (a channel-level error).
    let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    while !shutdown.is_cancelled() {
        let live = tokio::select! {
            l = ctx.broker.connected(generation, Duration::from_secs(3600)) => l,
            _ = shutdown.cancelled() => break,
        };
        let Some(live) = live else { continue };
        generation = live.generation;
        let started = tokio::time::Instant::now();
        match control_session(&ctx, &live, &mut links, &shutdown).await {
            Ok(()) => {}
            // The supervisor has logged the lost connection; the next one gets a new session.
            Err(e) if live.is_lost() => {
                tracing::debug!(reason = %e, "control session ended with its broker connection")
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    retry.reset();
                }
                let delay = retry.next_delay();
                warn!(reason = %e, retry_in = ?delay, "control channel lost; re-establishing it");
                // Same connection again: ask for any connection from this generation on.
                generation = generation.saturating_sub(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    info!(links = links.len(), "stopping links");
    links.stop_all().await;
}

async fn control_session(
    ctx: &Arc<Ctx>,
    live: &Arc<Live>,
    links: &mut Links,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let op = ctx.broker.config().op_timeout;
    let cfg = &ctx.cfg;
    let setup = async {
        let ch = live.conn.create_channel().await?;
        for ex in [&cfg.control_exchange, &cfg.notify_exchange] {
            ch.exchange_declare(
                ShortString::from(ex.as_str()),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        }
        // One exclusive queue per bridge instance: every instance (standbys too) sees
        // every control message.
        let q = ch
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            ShortString::from(cfg.control_exchange.as_str()),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                ShortString::from(format!("drawbridge-control-{}", cfg.id)),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((ch, consumer))
    };
    let (_ch, mut consumer) = tokio::time::timeout(op, setup)
        .await
        .map_err(|_| "control setup timed out".to_string())?
        .map_err(|e| format!("control setup: {e}"))?;

    let mut have_snapshot = false;
    let mut retry = Backoff::new(cfg.snapshot_retry_min, cfg.snapshot_retry_max);
    ctx.request_snapshot();
    let mut next_request = tokio::time::Instant::now() + retry.next_delay();
    loop {
        tokio::select! {
            d = consumer.next() => match d {
                Some(Ok(delivery)) => {
                    if handle(ctx, &delivery, links).await {
                        if !have_snapshot {
                            info!("snapshot received");
                        }
                        have_snapshot = true;
                    }
                    // Every control message is acked, valid or not: a bad one must not
                    // loop forever.
                    tokio::time::timeout(op, delivery.acker.ack(BasicAckOptions::default()))
                        .await
                        .map_err(|_| "control ack timed out".to_string())?
                        .map_err(|e| format!("control ack: {e}"))?;
                }
                Some(Err(e)) => return Err(format!("control consumer: {e}")),
                None => return Err("control consumer cancelled".into()),
            },
            _ = tokio::time::sleep_until(next_request), if !have_snapshot => {
                info!("no snapshot yet; asking again");
                ctx.request_snapshot();
                next_request = tokio::time::Instant::now() + retry.next_delay();
            }
            _ = live.lost() => return Err("broker connection lost".into()),
            // The control channel goes with the connection; closing it here as well
            // only races lapin's own close.
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Apply one control message. Returns true if it was a valid snapshot.
async fn handle(ctx: &Arc<Ctx>, d: &Delivery, links: &mut Links) -> bool {
    let refuse = |reason: String| {
        warn!(reason = %reason, "control message refused");
        metrics::counter!("drawbridge_bridge_control_refused_total").increment(1);
        false
    };
    if let Some(user) = &ctx.cfg.node_user {
        let got = d
            .properties
            .user_id()
            .as_ref()
            .map(|s| s.as_str().to_string());
        if got.as_deref() != Some(user.as_str()) {
            return refuse(format!(
                "user_id {:?} is not the configured node user `{user}`",
                got
            ));
        }
    }
    let cmd = match ControlCommand::decode(&d.data) {
        Ok(c) => c,
        Err(e) => return refuse(format!("cannot decode: {e}")),
    };
    let prefix = &ctx.cfg.queue_prefix;
    let outside = |q: &str| !q.starts_with(prefix.as_str());
    match cmd {
        ControlCommand::Snapshot(s) => {
            if let Some(l) = s.links.iter().find(|l| outside(&l.queue)) {
                return refuse(format!(
                    "snapshot names queue `{}` outside the prefix `{prefix}`",
                    l.queue
                ));
            }
            info!(node = %s.node_identity, links = s.links.len(), "applying snapshot");
            links.converge(s.links).await;
            true
        }
        ControlCommand::CreateLink(c) => {
            if outside(&c.link.queue) {
                return refuse(format!(
                    "queue `{}` is outside the prefix `{prefix}`",
                    c.link.queue
                ));
            }
            links.create(c.link).await;
            false
        }
        ControlCommand::DeleteLink(dl) => {
            if outside(&dl.queue) {
                return refuse(format!(
                    "queue `{}` is outside the prefix `{prefix}`",
                    dl.queue
                ));
            }
            links.delete(&dl.queue).await;
            false
        }
    }
}

/// Publishes notifications (snapshot requests, link status) to the notify exchange.
/// Best effort: status events are informational, and snapshot requests are repeated.
pub(crate) async fn notifier(ctx: Arc<Ctx>, mut rx: tokio::sync::mpsc::Receiver<Notification>) {
    let mut channel: Option<(u64, lapin::Channel)> = None;
    while let Some(n) = rx.recv().await {
        let Some(live) = ctx.broker.current() else {
            continue;
        };
        let op = ctx.broker.config().op_timeout;
        if channel
            .as_ref()
            .map(|(g, c)| *g != live.generation || !c.status().connected())
            .unwrap_or(true)
        {
            channel = match tokio::time::timeout(op, live.conn.create_channel()).await {
                Ok(Ok(c)) => Some((live.generation, c)),
                _ => None,
            };
        }
        let Some((_, ch)) = &channel else { continue };
        let body = n.encode();
        let r = tokio::time::timeout(
            op,
            ch.basic_publish(
                ShortString::from(ctx.cfg.notify_exchange.as_str()),
                ShortString::from(""),
                Default::default(),
                &body,
                lapin::BasicProperties::default()
                    .with_content_type(ShortString::from("application/x-protobuf")),
            ),
        )
        .await;
        if !matches!(r, Ok(Ok(_))) {
            tracing::debug!("notification not published");
            channel = None;
        }
    }
}

/// A snapshot request for this bridge.
pub(crate) fn snapshot_request(ctx: &Ctx) -> Notification {
    Notification::SnapshotRequest(SnapshotRequest {
        bridge_id: ctx.cfg.id.clone(),
    })
}
