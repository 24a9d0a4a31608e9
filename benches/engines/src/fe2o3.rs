//! Contender (a): fe2o3-amqp 0.18 as the daemons use it today, on the daemons' own code
//! paths.
//!
//! The client is the bridge's (`bridge/src/peer.rs`, `bridge/src/link.rs`):
//!
//! - TCP with `TCP_NODELAY`, tokio-rustls' `TlsConnector` over
//!   [`drawbridge_runtime::coalesce::Coalesce`], the real
//!   [`FrameGuard`](drawbridge_runtime::frame_guard::FrameGuard) with
//!   `PeerLimits::FOR_A_FLOAT` and `Side::Bridge`, SASL EXTERNAL by hand (the bridge's
//!   `sasl_external`, copied: it is private to the bridge), then
//!   `Connection::builder()…open_with_stream` (scheme `amqp`, max frame 256 KiB, idle
//!   timeout 30 s), `Session::begin`, `Sender::attach` to `drawbridge.inbound`;
//! - sending as the bridge's forwarding loop does: a `biased` select whose first arm takes
//!   settled transfers, in order, from a `FuturesOrdered` of boxed futures, and whose second
//!   takes the next message while fewer than `bridge.window` (1000) are in flight; each
//!   message goes out through a boxed `Sender::send_batchable` under the settle timeout, and
//!   its `DeliveryFut` is awaited (under the settle timeout too) inside the boxed in-flight
//!   future, whose outcome is classified as the bridge does (`Accepted` or an error).
//!   `send_batchable` waits for credit when the float's is used up, so what is in flight on
//!   the wire is bounded by the credit (500).
//!
//! The server is the float's (`float/src/listener.rs`, `connection.rs`, `link.rs`,
//! `sasl.rs`):
//!
//! - an accept loop spawning one task per connection (in a `JoinSet`); `TCP_NODELAY`;
//!   tokio-rustls' `TlsAcceptor` straight on the TCP stream (the float has no `Coalesce`);
//!   the real frame guard with `Side::Float` and the float's default limits (8 sessions,
//!   32 links, 1 s shortest idle timeout, max-message-size 10 MiB + 64 KiB, transfers
//!   accepted, credit enforced); fe2o3's `ConnectionAcceptor` with max frame 256 KiB,
//!   `session_max` 8, idle timeout 30 s and the float's `TlsIdentitySasl` (copied: private to
//!   the float);
//! - one task per session (`SessionAcceptor` with `handle_max` 31) and one per link
//!   (`LinkAcceptor` with the max-message-size, receiver settle mode `first` only, `first` as
//!   the fallback); each receiving link sets `CreditMode::Auto(CREDIT)` and grants `CREDIT`;
//! - the float's link loop: a `biased` select whose first arm settles what is done from a
//!   `FuturesOrdered` of boxed futures (up to 256 ready ones at once, consecutive accepts in
//!   one `accept_all`), and whose second receives the next transfer
//!   (`recv::<Body<Value>>`) while fewer than the credit are pending.
//!
//! Where the bench departs from the daemons (no broker, no configuration, no control plane):
//!
//! - the float accepts each transfer at once: its pending future is ready as soon as the
//!   transfer is taken, where the float's completes on the broker's publisher confirm. The
//!   float's validation and mapping (`inbound::from_amqp_stamped`), routing, dedup window,
//!   byte budgets, publish and pause are left out, and so is the bridge's side of the broker
//!   (consumer, conversion with `outbound::to_amqp`, byte budget permits, `multiple=true`
//!   acks, the 50 ms in-flight sampling tick, metrics). Because nothing delays the accepts,
//!   the float's batching of consecutive accepts never finds more than one ready (counted:
//!   every `accept_all` of a bench run carried one delivery), so each transfer gets a
//!   disposition of its own, where a float waiting for confirms batches those that complete
//!   together;
//! - the message is the harness's (a `properties` section with an 8-byte binary message id,
//!   and the `data` section), the same bytes as the other contenders', where the bridge's
//!   conversion adds an (empty) header and application-properties section and a string id;
//! - no link canary; the float's peer-identity, admission, revocation and expiry checks and
//!   its shutdown and drain paths are left out (application state, not the engine's);
//! - every wait is bounded by [`DEADLINE`] (the bridge's connect and settle timeouts are
//!   10 s and 30 s, the float's handshake timeout its own).
//!
//! Heartbeats, as fe2o3 does them on the daemons' 30 s idle timeouts: its client announces
//! half its idle timeout (15 s), its acceptor the whole (30 s), and each side sends an empty
//! frame at the period the other announced — the float every 15 s, the bridge every 30 s.
//!
//! Threads: for [`Contender`], both ends share one current-thread runtime (fe2o3's
//! connection and session engines are tasks of it). For [`IdleLinks::hold`], the clients run
//! on a multi-thread runtime with one worker, tagged as the client's side, so that fe2o3's
//! engine tasks keep running (heartbeats included) while `opened` measures on the calling
//! thread — a current-thread runtime would stand still during `opened`, and the idle CPU
//! figure would mean nothing. [`IdleLinks::serve`] runs a current-thread runtime on the
//! calling thread (already tagged as the server's by the `idle` binary): nothing blocks it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{bail, Context as _};
use drawbridge_runtime::{
    coalesce::Coalesce,
    frame_guard::{FrameGuard, PeerLimits, Side},
};
use fe2o3_amqp::{
    acceptor::{
        sasl_acceptor::SaslServerFrame, ConnectionAcceptor, LinkAcceptor, LinkEndpoint,
        ListenerConnectionHandle, ListenerSessionHandle, SaslAcceptor, SessionAcceptor,
        SupportedReceiverSettleModes,
    },
    connection::ConnectionHandle,
    link::{delivery::DeliveryInfo, receiver::CreditMode, Receiver, SendError},
    session::SessionHandle,
    types::{
        definitions::{AmqpError, Error as AmqpErrorFrame, ReceiverSettleMode},
        messaging::{Body, Data, Message, MessageId, Outcome, Properties},
        primitives::{Array, Binary, Symbol, Value},
        sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
    },
    Connection, Sender, Session,
};
use futures::{future::BoxFuture, stream::FuturesOrdered, FutureExt, StreamExt};
use rustls_pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{tls::Tls, Contender, IdleLinks, CREDIT, DEADLINE};

/// Largest frame either side announces (both daemons' `MAX_FRAME`).
const MAX_FRAME: u32 = 256 * 1024;

/// The bridge's default `bridge.window`: broker deliveries in flight on a link.
const WINDOW: usize = 1000;

/// The bridge's default `bridge.settle_timeout`.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Both daemons' default idle timeout.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The float's default `float.address`, the bridge's default target address.
const ADDRESS: &str = "drawbridge.inbound";

/// The float's default `float.max_message_size`, and what it announces on attach (the
/// float's `announced_max_message_size`: the body limit plus 64 KiB for the envelope).
const MAX_BODY: u64 = 10 * 1024 * 1024;
const MAX_MESSAGE_SIZE: u64 = MAX_BODY + 64 * 1024;

/// What the float holds a peer to with its default configuration (`Ctx::peer_limits`).
const FLOAT_LIMITS: PeerLimits = PeerLimits {
    max_sessions: 8,
    max_links: 32,
    min_idle_timeout_ms: 1000,
    max_message_size: MAX_MESSAGE_SIZE,
    accept_transfers: true,
    enforce_credit: true,
};

/// One bridge-side peer connection (the bridge's `PeerConnection`, without the canary).
#[derive(Debug)]
struct PeerConnection {
    conn: ConnectionHandle<()>,
    /// Held: dropping it would end the session.
    _session: SessionHandle<()>,
    sender: Sender,
}

/// fe2o3's client and server on one current-thread runtime.
#[derive(Debug)]
pub struct Fe2o3 {
    /// Dropped before the runtime (fields drop in order): its handles only queue their
    /// close frames (`try_send`), they need no runtime to drop.
    pc: Box<PeerConnection>,
    rt: Runtime,
    next_id: u64,
}

// ---------------------------------------------------------------------------------------
// The float's side.

/// The float's SASL acceptor (`float/src/sasl.rs`): EXTERNAL or ANONYMOUS succeed, the
/// identity being the TLS client certificate.
#[derive(Debug, Clone, Default)]
struct TlsIdentitySasl;

impl SaslAcceptor for TlsIdentitySasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("EXTERNAL"), Symbol::from("ANONYMOUS")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.0.as_str() {
            "EXTERNAL" | "ANONYMOUS" => SaslCode::Ok,
            _ => SaslCode::Auth,
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

/// The float's accept loop (`float/src/listener.rs`): one task per connection.
async fn accept_loop(listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((tcp, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        conns.spawn(serve_connection(acceptor.clone(), tcp, addr));
    }
}

/// The float's `serve_connection`: the handshake, then a task per session.
async fn serve_connection(acceptor: TlsAcceptor, tcp: TcpStream, addr: SocketAddr) {
    // Boxed, as the float does: the handshake future is large and done once.
    let Ok(mut conn) = Box::pin(handshake(acceptor, tcp, addr)).await else {
        return;
    };
    let mut sessions = JoinSet::new();
    let session_acceptor = SessionAcceptor::builder()
        .handle_max(FLOAT_LIMITS.max_links.saturating_sub(1))
        .build();
    while let Ok(session) = session_acceptor.accept(&mut conn).await {
        sessions.spawn(serve_session(session));
    }
    while sessions.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
}

/// The float's `handshake`: TLS, the frame guard, the AMQP open (SASL included).
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
) -> anyhow::Result<ListenerConnectionHandle> {
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(DEADLINE, acceptor.accept(tcp))
        .await
        .context("TLS handshake deadline")??;
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("drawbridge-float-{}", std::process::id()))
        .max_frame_size(MAX_FRAME)
        .session_max(FLOAT_LIMITS.max_sessions)
        .idle_time_out(IDLE_TIMEOUT.as_millis() as u32)
        .sasl_acceptor(TlsIdentitySasl)
        .build();
    let guarded = FrameGuard::new(
        tls,
        MAX_FRAME,
        FLOAT_LIMITS,
        format!("bridge ({addr})"),
        Side::Float,
    );
    Ok(tokio::time::timeout(DEADLINE, acceptor.accept(guarded))
        .await
        .context("AMQP open deadline")??)
}

/// The float's `serve_session`: receiving links are served, sending ones refused.
async fn serve_session(mut session: ListenerSessionHandle) {
    let acceptor = LinkAcceptor::builder()
        .max_message_size(MAX_MESSAGE_SIZE)
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .build();
    let mut links = JoinSet::new();
    loop {
        match acceptor.accept(&mut session).await {
            Ok(LinkEndpoint::Receiver(r)) => {
                links.spawn(serve_link(r));
            }
            Ok(LinkEndpoint::Sender(s)) => {
                let refusal = AmqpErrorFrame::new(
                    AmqpError::NotAllowed,
                    "this float only receives".to_string(),
                    None,
                );
                let _ = s.close_with_error(refusal).await;
            }
            Err(_) => break,
        }
    }
    while links.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(2), session.end()).await;
}

/// A transfer whose fate is known (the float's `Settled`, always accepted here).
struct Settled {
    info: DeliveryInfo,
}

/// The float's `serve_link` and `Link::run`, without the broker: each transfer is accepted
/// as soon as it is taken (the float waits for the publisher confirm first).
async fn serve_link(mut receiver: Receiver) {
    let address = receiver
        .target()
        .as_ref()
        .and_then(|t| t.address.clone())
        .unwrap_or_default();
    if address != ADDRESS {
        let refusal = AmqpErrorFrame::new(
            AmqpError::NotFound,
            format!("unknown address; this float receives on `{ADDRESS}`"),
            None,
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(2), receiver.close_with_error(refusal)).await;
        return;
    }
    receiver.set_credit_mode(CreditMode::Auto(CREDIT));
    if receiver.set_credit(CREDIT).await.is_err() {
        return;
    }
    let mut pending: FuturesOrdered<BoxFuture<'static, Settled>> = FuturesOrdered::new();
    loop {
        let may_receive = pending.len() < CREDIT as usize;
        tokio::select! {
            biased;
            Some(first) = pending.next(), if !pending.is_empty() => {
                // Whatever else is already done goes in the same disposition.
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match pending.next().now_or_never() {
                        Some(Some(item)) => batch.push(item),
                        _ => break,
                    }
                }
                let accepts: Vec<DeliveryInfo> = batch.into_iter().map(|s| s.info).collect();
                if receiver.accept_all(accepts).await.is_err() {
                    return;
                }
            }
            d = receiver.recv::<Body<Value>>(), if may_receive => {
                let Ok(delivery) = d else { return };
                let (info, msg) = delivery.into_parts();
                // The float maps and publishes the message here; its confirm completes the
                // pending future. Accepted at once instead.
                drop(msg);
                pending.push_back(async move { Settled { info } }.boxed());
            }
            else => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The bridge's side.

/// The bridge's `peer::connect`: TCP (NODELAY) → TLS over `Coalesce` → frame guard → SASL
/// EXTERNAL → open → session → sender.
async fn connect(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> anyhow::Result<PeerConnection> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let host = "localhost";
    let tls = TlsConnector::from(tls)
        .connect(ServerName::try_from(host)?, Coalesce::new(tcp))
        .await?;
    let mut guarded = FrameGuard::new(
        tls,
        MAX_FRAME,
        PeerLimits::FOR_A_FLOAT,
        addr.to_string(),
        Side::Bridge,
    );
    sasl_external(&mut guarded, host)
        .await
        .map_err(|e| anyhow::anyhow!("SASL: {e}"))?;
    let mut conn = Connection::builder()
        .container_id("drawbridge-bridge-bench")
        .scheme("amqp")
        .hostname(host)
        .max_frame_size(MAX_FRAME)
        .idle_time_out(IDLE_TIMEOUT.as_millis() as u32)
        .open_with_stream(guarded)
        .await?;
    let mut session = match Session::begin(&mut conn).await {
        Ok(s) => s,
        Err(e) => {
            let _ = conn.close().await;
            bail!("session: {e}");
        }
    };
    let sender = match Sender::attach(&mut session, "drawbridge-bench-peer", ADDRESS).await {
        Ok(l) => l,
        Err(e) => {
            let _ = session.end().await;
            let _ = conn.close().await;
            bail!("attach: {e}");
        }
    };
    Ok(PeerConnection {
        conn,
        _session: session,
        sender,
    })
}

/// Largest SASL frame read (the bridge's `MAX_SASL_FRAME`).
const MAX_SASL_FRAME: usize = 512;

/// The bridge's `sasl_external` (`bridge/src/peer.rs`), unchanged.
async fn sasl_external<S>(io: &mut S, host: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
    io.write_all(&SASL_HEADER)
        .await
        .map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    let mut header = [0u8; 8];
    io.read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    if header != SASL_HEADER {
        return Err(format!(
            "the float answered with protocol header {header:02x?}"
        ));
    }
    let mechanisms: fe2o3_amqp::types::sasl::SaslMechanisms =
        serde_amqp::from_slice(&read_sasl_frame(io).await?)
            .map_err(|e| format!("sasl-mechanisms: {e}"))?;
    if !mechanisms
        .sasl_server_mechanisms
        .0
        .iter()
        .any(|m| m.0 == "EXTERNAL")
    {
        return Err("the float does not offer EXTERNAL".into());
    }
    let init = SaslInit {
        mechanism: Symbol::from("EXTERNAL"),
        initial_response: None,
        hostname: Some(host.to_string()),
    };
    let body = serde_amqp::to_vec(&init).map_err(|e| e.to_string())?;
    let mut frame = Vec::with_capacity(8 + body.len());
    frame.extend_from_slice(&(8 + body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&[2, 1, 0, 0]);
    frame.extend_from_slice(&body);
    io.write_all(&frame).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    let outcome: SaslOutcome = serde_amqp::from_slice(&read_sasl_frame(io).await?)
        .map_err(|e| format!("sasl-outcome: {e}"))?;
    match outcome.code {
        SaslCode::Ok => Ok(()),
        code => Err(format!("the float refused EXTERNAL ({code:?})")),
    }
}

/// One SASL frame's body (the bridge's `read_sasl_frame`).
async fn read_sasl_frame<S>(io: &mut S) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 8];
    io.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let doff = usize::from(head[4]) * 4;
    if head[5] != 1 || size > MAX_SASL_FRAME || doff < 8 || doff > size {
        return Err(format!("not a SASL frame: header {head:02x?}"));
    }
    let mut rest = vec![0u8; size - 8];
    io.read_exact(&mut rest).await.map_err(|e| e.to_string())?;
    Ok(rest.split_off(doff - 8))
}

/// The bridge's `settle::classify`, reduced to what a round checks: `Ok` for `accepted`,
/// why not otherwise.
fn classify(outcome: Option<Result<Outcome, SendError>>) -> Result<(), String> {
    match outcome {
        Some(Ok(Outcome::Accepted(_))) => Ok(()),
        Some(Ok(other)) => Err(format!("outcome {other:?}")),
        Some(Err(e)) => Err(format!("transfer failed: {e}")),
        None => Err(format!("peer did not settle within {SETTLE_TIMEOUT:?}")),
    }
}

/// The harness's message: an 8-byte binary message id and the `data` section.
fn message(id: u64, body: &[u8]) -> Message<Data> {
    let props = Properties {
        message_id: Some(MessageId::Binary(Binary::from(id.to_be_bytes().to_vec()))),
        ..Default::default()
    };
    // The body is copied into the message, as the bridge's conversion does.
    Message::builder()
        .properties(props)
        .data(Binary::from(body.to_vec()))
        .build()
}

/// The bridge's forwarding loop (`LinkSession::forward`) with messages always at hand:
/// sends `n` messages and returns once all are accepted.
async fn forward(
    pc: &mut PeerConnection,
    next_id: &mut u64,
    body: &[u8],
    n: usize,
) -> anyhow::Result<()> {
    type InFlight = BoxFuture<'static, Result<(), String>>;
    let mut inflight: FuturesOrdered<InFlight> = FuturesOrdered::new();
    let mut sent = 0usize;
    let mut done = 0usize;
    while done < n {
        tokio::select! {
            biased;
            Some(settled) = inflight.next(), if !inflight.is_empty() => {
                settled.map_err(|e| anyhow::anyhow!("message {done} of the round: {e}"))?;
                done += 1;
            }
            // The bridge's consumer arm: a broker delivery is always ready here.
            _ = std::future::ready(()), if sent < n && inflight.len() < WINDOW => {
                let msg = message(*next_id, body);
                // Boxed, as the bridge does (fe2o3's send future is large).
                let sent_now = Box::pin(tokio::time::timeout(
                    SETTLE_TIMEOUT,
                    pc.sender.send_batchable(msg),
                ))
                .await;
                match sent_now {
                    Ok(Ok(fut)) => inflight.push_back(
                        async move { classify(tokio::time::timeout(SETTLE_TIMEOUT, fut).await.ok()) }
                            .boxed(),
                    ),
                    Ok(Err(e)) => bail!("send failed: {e}"),
                    Err(_) => bail!("peer granted no credit for {SETTLE_TIMEOUT:?}"),
                }
                sent += 1;
                *next_id += 1;
            }
            closed = pc.conn.on_close() => bail!("peer connection ended: {closed:?}"),
        }
    }
    Ok(())
}

impl Contender for Fe2o3 {
    const NAME: &'static str = "fe2o3";

    fn start(tls: &Tls) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let pc = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::spawn(accept_loop(listener, tls.server.clone()));
            tokio::time::timeout(DEADLINE, Box::pin(connect(tls.client.clone(), addr)))
                .await
                .context("connect deadline")?
        })?;
        Ok(Fe2o3 {
            pc: Box::new(pc),
            rt,
            next_id: 0,
        })
    }

    fn round(&mut self, body: &[u8], n: usize) -> anyhow::Result<()> {
        let Fe2o3 { pc, rt, next_id } = self;
        rt.block_on(async { tokio::time::timeout(DEADLINE, forward(pc, next_id, body, n)).await })
            .context("round deadline")?
    }
}

impl IdleLinks for Fe2o3 {
    const NAME: &'static str = "fe2o3";

    fn serve(tls: &Tls, ready: std::sync::mpsc::Sender<u16>) -> anyhow::Result<()> {
        // The calling thread is the server's (tagged by the caller), and every task of this
        // runtime runs on it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            ready.send(listener.local_addr()?.port())?;
            accept_loop(listener, tls.server.clone()).await;
            Ok(())
        })
    }

    fn hold(tls: &Tls, port: u16, n: usize, opened: &mut dyn FnMut()) -> anyhow::Result<()> {
        // One worker thread, tagged as the client's side, drives the connections (fe2o3's
        // engines and heartbeats) while `opened` measures on this thread; each connection is
        // held by a task of its own, as each link is in the bridge.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_start(|| crate::alloc_slot::tag(crate::alloc_slot::Slot::Client))
            .enable_all()
            .build()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (up_tx, mut up_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(n.max(1));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for _ in 0..n {
            let tls = tls.client.clone();
            let up = up_tx.clone();
            let mut stop = stop_rx.clone();
            rt.spawn(async move {
                let connected = tokio::time::timeout(DEADLINE, Box::pin(connect(tls, addr))).await;
                let mut pc = match connected {
                    Ok(Ok(pc)) => Box::new(pc),
                    Ok(Err(e)) => {
                        let _ = up.send(Err(e)).await;
                        return;
                    }
                    Err(_) => {
                        let _ = up.send(Err(anyhow::anyhow!("connect deadline"))).await;
                        return;
                    }
                };
                let _ = up.send(Ok(())).await;
                drop(up);
                // The bridge's idle link waits on its peer connection (and the broker).
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    closed = pc.conn.on_close() => {
                        eprintln!("fe2o3: idle connection ended: {closed:?}");
                    }
                }
            });
        }
        drop(up_tx);
        rt.block_on(async {
            for _ in 0..n {
                up_rx.recv().await.context("connections")??;
            }
            anyhow::Ok(())
        })?;
        opened();
        let _ = stop_tx.send(true);
        rt.shutdown_timeout(Duration::from_secs(5));
        Ok(())
    }
}
