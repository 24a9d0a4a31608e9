//! Accepting peers: TCP → TLS (client certificate required) → AMQP 1.0 → one task per
//! inbound link, each publishing into the broker with confirms.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use drawbridge_certs::{peer_legal_name, LegalName};
use drawbridge_runtime::{backoff::Backoff, broker::Live, headers};
use fe2o3_amqp::{
    acceptor::{ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SessionAcceptor},
    link::{delivery::DeliveryInfo, receiver::CreditMode, Receiver},
    types::{
        definitions::{AmqpError, Error as AmqpErrorFrame},
        messaging::{Body, Message},
        primitives::Value,
    },
};
use futures::{future::BoxFuture, stream::FuturesOrdered, FutureExt, StreamExt};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, LongString, ShortString},
    Channel,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    convert,
    dedup::Seen,
    frame_guard::FrameGuard,
    sasl::TlsIdentitySasl,
    settle::{self, BrokerAnswer, Pause, PauseEvent, Settle, Transient},
    Ctx,
};

/// Largest frame a peer may send (announced in `open`, enforced by [`FrameGuard`]).
const MAX_FRAME: u32 = 256 * 1024;

/// Accept connections until `shutdown`, then let the connections drain.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let mut conns = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, addr) = match accepted {
            Ok(v) => {
                backoff.reset();
                v
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                let d = backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "accept failed");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                warn!(peer_addr = %addr, max = ctx.cfg.max_connections, "connection refused: too many connections");
                metrics::counter!("drawbridge_float_connections_refused_total", "reason" => "max_connections").increment(1);
                continue;
            }
        };
        next_id += 1;
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let id = next_id;
        conns.spawn(async move {
            serve_connection(tcp, addr, id, ctx.clone(), shutdown).await;
            ctx.connections.lock().expect("poisoned").remove(&id);
            drop(permit);
        });
    }
    drop(listener);
    info!(
        open_connections = conns.len(),
        "listener closed, draining connections"
    );
    let grace = ctx.cfg.drain_grace;
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!(?grace, "drain grace period over; dropping remaining connections (their unsettled transfers will be resent)");
        conns.abort_all();
    }
}

/// What `/status` shows about one connection.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ConnectionInfo {
    pub peer: String,
    pub addr: String,
    pub since_unix_ms: u64,
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    id: u64,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let hs = ctx.cfg.handshake_timeout;
    let tls = match tokio::time::timeout(hs, ctx.tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(peer_addr = %addr, reason = %e, "TLS handshake refused");
            metrics::counter!("drawbridge_float_connections_refused_total", "reason" => "tls")
                .increment(1);
            return;
        }
        Err(_) => {
            warn!(peer_addr = %addr, timeout = ?hs, "TLS handshake refused: timed out");
            metrics::counter!("drawbridge_float_connections_refused_total", "reason" => "tls_timeout").increment(1);
            return;
        }
    };
    let peer = match tls.get_ref().1.peer_certificates().map(peer_legal_name) {
        Some(Ok(name)) => name,
        Some(Err(e)) => {
            warn!(peer_addr = %addr, reason = %e, "connection refused: client certificate subject unreadable");
            return;
        }
        None => {
            warn!(peer_addr = %addr, "connection refused: no client certificate");
            return;
        }
    };
    if !ctx.broker.is_connected() {
        // Taking transfers we cannot publish would only bounce them; refusing makes the
        // bridge back off and lets a load balancer pick another float.
        warn!(peer = %peer, peer_addr = %addr, "connection refused: broker unavailable");
        metrics::counter!("drawbridge_float_connections_refused_total", "reason" => "broker_down")
            .increment(1);
        return;
    }
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("drawbridge-float-{}", std::process::id()))
        .max_frame_size(MAX_FRAME)
        .idle_time_out(ctx.cfg.idle_timeout.as_millis() as u32)
        .sasl_acceptor(TlsIdentitySasl)
        .build();
    // Every byte the peer sends is scanned before fe2o3 decodes it (nesting depth, frame
    // size): see `frame_guard`.
    let guarded = FrameGuard::new(tls, MAX_FRAME, format!("{} ({addr})", peer.canonical()));
    let mut conn = match tokio::time::timeout(hs, acceptor.accept(guarded)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            warn!(peer = %peer, peer_addr = %addr, reason = %e, "AMQP open refused");
            return;
        }
        Err(_) => {
            warn!(peer = %peer, peer_addr = %addr, "AMQP open refused: timed out");
            return;
        }
    };
    // One written form per identity, whatever order the certificate's subject has.
    let sender: Arc<str> = peer.canonical().into();
    info!(peer = %sender, peer_addr = %addr, "peer connected");
    ctx.connections.lock().expect("poisoned").insert(
        id,
        ConnectionInfo {
            peer: sender.to_string(),
            addr: addr.to_string(),
            since_unix_ms: drawbridge_runtime::daemon::unix_ms(),
        },
    );
    metrics::gauge!("drawbridge_float_connections").increment(1.0);
    let mut sessions = JoinSet::new();
    let session_acceptor = SessionAcceptor::new();
    let reason = loop {
        tokio::select! {
            s = session_acceptor.accept(&mut conn) => match s {
                Ok(session) => {
                    sessions.spawn(serve_session(session, sender.clone(), ctx.clone(), shutdown.clone()));
                }
                Err(e) => break format!("{e}"),
            },
            _ = shutdown.cancelled() => break "float shutting down".to_string(),
        }
    };
    while sessions.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
    metrics::gauge!("drawbridge_float_connections").decrement(1.0);
    info!(peer = %sender, peer_addr = %addr, reason = %reason, "peer disconnected");
}

async fn serve_session(
    mut session: fe2o3_amqp::acceptor::ListenerSessionHandle,
    sender: Arc<str>,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) {
    // Announced on attach and enforced by fe2o3 while a delivery is assembled (the link is
    // detached with `message-size-exceeded`), counting the whole encoded message; a bridge
    // dead-letters what exceeds it instead of sending it.
    let acceptor = LinkAcceptor::builder()
        .max_message_size(announced_max_message_size(ctx.cfg.max_message_size))
        .build();
    let mut links = JoinSet::new();
    loop {
        tokio::select! {
            l = acceptor.accept(&mut session) => match l {
                Ok(LinkEndpoint::Receiver(r)) => {
                    links.spawn(serve_link(r, sender.clone(), ctx.clone(), shutdown.clone()));
                }
                Ok(LinkEndpoint::Sender(s)) => {
                    let err = AmqpErrorFrame::new(AmqpError::NotAllowed, "this float only receives".to_string(), None);
                    let _ = s.close_with_error(err).await;
                }
                Err(e) => {
                    debug!(peer = %sender, reason = %e, "session ended");
                    break;
                }
            },
            _ = shutdown.cancelled() => break,
        }
    }
    while links.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(2), session.end()).await;
}

/// Room for the properties, annotations and headers around a body of the configured maximum.
const ENVELOPE_ALLOWANCE: u64 = 64 * 1024;

/// The link's max-message-size: the body limit plus [`ENVELOPE_ALLOWANCE`].
fn announced_max_message_size(max_body: usize) -> u64 {
    (max_body as u64).saturating_add(ENVELOPE_ALLOWANCE)
}

/// A published transfer waiting for its confirm: its delivery, how it settles, and
/// whether it was published (see `handle`).
type Pending = BoxFuture<'static, (DeliveryInfo, Settle, bool)>;

async fn serve_link(
    mut receiver: Receiver,
    sender: Arc<str>,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) {
    let address = receiver
        .target()
        .as_ref()
        .and_then(|t| t.address.clone())
        .unwrap_or_default();
    if address != ctx.cfg.address {
        warn!(peer = %sender, address = %address, expected = %ctx.cfg.address, "link refused: unknown target address");
        let err = AmqpErrorFrame::new(
            AmqpError::NotFound,
            format!(
                "unknown address `{address}`; this float receives on `{}`",
                ctx.cfg.address
            ),
            None,
        );
        let _ = receiver.close_with_error(err).await;
        return;
    }
    let credit = ctx.cfg.link_credit;
    receiver.set_credit_mode(CreditMode::Auto(credit));
    if let Err(e) = receiver.set_credit(credit).await {
        warn!(peer = %sender, reason = %e, "link failed before it started");
        return;
    }
    info!(peer = %sender, link = %receiver.name(), "inbound link attached");
    let mut state = LinkState {
        channel: None,
        routes: HashMap::new(),
    };
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut draining = false;
    let mut pause = Pause::new(Duration::from_millis(100), Duration::from_secs(5));
    let reason = loop {
        let paused = pause.until(tokio::time::Instant::now());
        tokio::select! {
            biased;
            Some(first) = pending.next(), if !pending.is_empty() => {
                // Settle whatever else is already done in the same go: consecutive accepts
                // become one disposition frame instead of one frame (and await) each.
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match pending.next().now_or_never() {
                        Some(Some(item)) => batch.push(item),
                        _ => break,
                    }
                }
                for (_, settle, _) in &batch {
                    observe(&mut pause, settle, &sender);
                }
                if let Err(e) = settle_batch(&receiver, batch, &sender, &ctx).await {
                    break format!("disposition failed: {e}");
                }
            }
            _ = async { tokio::time::sleep_until(paused.expect("paused")).await }, if paused.is_some() && !draining => {}
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
            }
            d = receiver.recv::<Body<Value>>(), if !draining && paused.is_none() && pending.len() < credit as usize => {
                match d {
                    Ok(delivery) => {
                        let (info, msg) = delivery.into_parts();
                        match handle(msg, &sender, &ctx, &mut state).await {
                            (Handled::Now(settle), key) => {
                                observe(&mut pause, &settle, &sender);
                                if let Err(e) = settle_one(&receiver, info, settle, key, &sender, &ctx).await {
                                    break format!("disposition failed: {e}");
                                }
                            }
                            (Handled::Later(fut), key) => {
                                pending.push_back(fut.map(move |s| (info, s, key)).boxed())
                            }
                        }
                    }
                    Err(e) => break format!("{e}"),
                }
            }
            else => break "drained for shutdown".to_string(),
        }
    };
    // Whatever is still pending was never settled: the peer resends it. Wait for the
    // confirms anyway: a confirmed one is safely in the broker, and its dedup ticket (finished
    // in the confirm future) lets the window suppress the resend.
    if !pending.is_empty() {
        warn!(peer = %sender, unsettled = pending.len(), "link ended with unsettled transfers; the peer will resend them");
        while pending.next().await.is_some() {}
    }
    if draining {
        let _ = tokio::time::timeout(Duration::from_secs(2), receiver.close()).await;
    }
    info!(peer = %sender, reason = %reason, "inbound link closed");
}

/// Feed a settlement to the link's pause; one log line per refusal episode.
fn observe(pause: &mut Pause, settle: &Settle, sender: &str) {
    match pause.observe(settle, tokio::time::Instant::now()) {
        Some(PauseEvent::Paused(reason)) => {
            warn!(peer = %sender, reason = %reason, "inbound link paused: the broker refuses publishes; transfers are released and resent")
        }
        Some(PauseEvent::Resumed) => {
            info!(peer = %sender, "inbound link resumed: the broker accepts publishes again")
        }
        None => {}
    }
}

/// Per-link state: its own broker channel and a cache of destination → inbox.
struct LinkState {
    /// Confirm-mode channel on the current broker connection.
    channel: Option<(Arc<Live>, Channel)>,
    /// `drawbridge-destination` as written → inbox (None: not served).
    routes: HashMap<String, Option<String>>,
}

enum Handled {
    Now(Settle),
    Later(BoxFuture<'static, Settle>),
}

/// Validate and publish one transfer. Also returns whether it was published (not rejected
/// before publishing, nor a confirmed duplicate): only those count as accepted.
///
/// The dedup ticket of a published copy lives in the confirm future: recorded as
/// confirmed the moment the broker confirms, dropped (forgotten) on any other outcome.
async fn handle(
    msg: Message<Body<Value>>,
    sender: &Arc<str>,
    ctx: &Arc<Ctx>,
    state: &mut LinkState,
) -> (Handled, bool) {
    let inbound = match convert::from_amqp(msg, ctx.cfg.max_message_size) {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!("drawbridge_float_rejected_total", "reason" => e.label())
                .increment(1);
            return (Handled::Now(Settle::Reject(e.to_string())), false);
        }
    };
    if inbound.stripped_headers > 0 {
        metrics::counter!("drawbridge_float_reserved_headers_stripped_total")
            .increment(inbound.stripped_headers as u64);
    }
    let inbox = state
        .routes
        .entry(inbound.destination.clone())
        .or_insert_with(|| ctx.route(&inbound.destination))
        .clone();
    let Some(inbox) = inbox else {
        metrics::counter!("drawbridge_float_rejected_total", "reason" => "unknown_destination")
            .increment(1);
        return (
            Handled::Now(Settle::Reject(
                convert::Invalid::UnknownDestination(inbound.destination).to_string(),
            )),
            false,
        );
    };
    let id = inbound.dedup_key();
    let ticket = match ctx.dedup.begin(sender, &id, Instant::now()) {
        Seen::Confirmed => {
            ctx.stats
                .duplicates_suppressed
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("drawbridge_float_duplicates_suppressed_total").increment(1);
            return (Handled::Now(Settle::Accept), false);
        }
        Seen::InFlight(ticket) => {
            ctx.stats.duplicates_passed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("drawbridge_float_duplicates_passed_total").increment(1);
            ticket
        }
        Seen::New(ticket) => ticket,
    };
    let key = true;
    let Some((live, channel)) = channel(state, ctx).await else {
        return (
            Handled::Now(Settle::Release(Transient::BrokerUnavailable)),
            key,
        );
    };
    let mut hdrs = inbound.properties.headers().clone().unwrap_or_default();
    hdrs.insert(
        ShortString::from(headers::SENDER),
        AMQPValue::LongString(LongString::from(sender.to_string())),
    );
    let props = inbound.properties.with_headers(hdrs);
    let op = ctx.broker.config().op_timeout;
    let publish = tokio::time::timeout(
        op,
        channel.basic_publish(
            ShortString::from(""),
            ShortString::from(inbox.as_str()),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &inbound.body,
            props,
        ),
    )
    .await;
    let confirm = match publish {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            state.channel = None;
            return (
                Handled::Now(Settle::Release(Transient::PublishFailed(e.to_string()))),
                key,
            );
        }
        Err(_) => {
            state.channel = None;
            live.report_broken("publish timed out");
            return (
                Handled::Now(Settle::Release(Transient::ConfirmTimedOut(op))),
                key,
            );
        }
    };
    (
        Handled::Later(
            async move {
                let answer = tokio::time::timeout(op, confirm).await.ok();
                if answer.is_none() {
                    live.report_broken("publisher confirm timed out");
                }
                let settle = settle::confirmed(BrokerAnswer::from_confirm(answer), &inbox, op);
                if settle == Settle::Accept {
                    ticket.confirmed(Instant::now());
                }
                settle
            }
            .boxed(),
        ),
        key,
    )
}

/// The link's confirm-mode channel, reopened on a new broker connection when needed.
async fn channel(state: &mut LinkState, ctx: &Arc<Ctx>) -> Option<(Arc<Live>, Channel)> {
    if let Some((live, ch)) = &state.channel {
        if !live.is_lost() && ch.status().connected() {
            return Some((live.clone(), ch.clone()));
        }
    }
    state.channel = None;
    let live = ctx.broker.current()?;
    let op = ctx.broker.config().op_timeout;
    let opened = tokio::time::timeout(op, async {
        let ch = live.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, lapin::Error>(ch)
    })
    .await;
    match opened {
        Ok(Ok(ch)) => {
            state.channel = Some((live.clone(), ch.clone()));
            Some((live, ch))
        }
        Ok(Err(e)) => {
            warn!(reason = %e, "cannot open a broker channel");
            None
        }
        Err(_) => {
            live.report_broken("channel open timed out");
            None
        }
    }
}

/// Settle `batch` in order: runs of accepts with one `accept_all`, the rest one by one.
async fn settle_batch(
    receiver: &Receiver,
    batch: Vec<(DeliveryInfo, Settle, bool)>,
    sender: &str,
    ctx: &Ctx,
) -> Result<(), fe2o3_amqp::link::DispositionError> {
    let mut accepts = Vec::new();
    for (info, settle, key) in batch {
        match settle {
            Settle::Accept => {
                record_accept(key, ctx);
                accepts.push(info);
            }
            other => {
                if !accepts.is_empty() {
                    receiver.accept_all(std::mem::take(&mut accepts)).await?;
                }
                settle_one(receiver, info, other, key, sender, ctx).await?;
            }
        }
    }
    if !accepts.is_empty() {
        receiver.accept_all(accepts).await?;
    }
    Ok(())
}

/// Counters for an accepted transfer that was published (not a suppressed duplicate).
fn record_accept(published: bool, ctx: &Ctx) {
    if published {
        ctx.stats.accepted.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("drawbridge_float_accepted_total").increment(1);
    }
}

async fn settle_one(
    receiver: &Receiver,
    info: DeliveryInfo,
    settle: Settle,
    published: bool,
    sender: &str,
    ctx: &Ctx,
) -> Result<(), fe2o3_amqp::link::DispositionError> {
    match settle {
        Settle::Accept => {
            record_accept(published, ctx);
            receiver.accept(info).await
        }
        Settle::Reject(why) => {
            warn!(peer = %sender, reason = %why, "transfer rejected");
            ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let err = AmqpErrorFrame::new(AmqpError::PreconditionFailed, why, None);
            receiver.reject(info, err).await
        }
        Settle::Release(why) => {
            debug!(peer = %sender, reason = %why, "transfer released");
            ctx.stats.released.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("drawbridge_float_released_total", "reason" => why.label())
                .increment(1);
            receiver.release(info).await
        }
    }
}

/// Resolve a destination legal name to an inbox.
pub(crate) fn resolve(identities: &[(LegalName, String)], destination: &str) -> Option<String> {
    let name: LegalName = destination.parse().ok()?;
    identities
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, inbox)| inbox.clone())
}
