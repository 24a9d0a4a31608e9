//! One peer connection: TLS with a required client certificate (within the handshake
//! timeout), the peer's legal name from that certificate, the AMQP 1.0 open, then its
//! sessions and links — all of it one task.
//!
//! Identity comes from TLS only: the certificate's subject becomes the sender stamped on
//! every message of every link of the connection.
//!
//! The AMQP 1.0 side is our engine ([`drawbridge_amqp`]): a state machine the task drives
//! through a [`Driver`] over the TLS stream. The task's one `select!` loop runs the driver's
//! events (attaches, deliveries, detaches, the close), the broker's confirms of the
//! connection's publishes, the waits for room in the bytes-in-flight budgets, the pauses of
//! links whose publishes the broker refuses, CRL changes and certificate expiry, and
//! shutdown. No task or channel sits between a link and the socket: a settlement is bytes
//! appended to the connection's output, written with the rest of the batch in one write.
//!
//! The engine enforces what the frame guard enforced in front of fe2o3 (frame size, nesting
//! depth, sessions, links per session, heartbeat period, credit, message size); a peer that
//! breaks one of those rules loses the connection, and the float counts it in
//! `drawbridge_float_connections_refused_total` by the engine's label. The links over all
//! sessions of a connection are counted here.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use drawbridge_amqp::{
    connection::{Connection, Event, LinkId},
    driver::Driver,
    performatives::{Error as AmqpError, Role},
};
use drawbridge_certs::pki_types::CertificateDer;
use drawbridge_certs::{peer_legal_name, CertError, CertInfo, LegalName, PeerRefusal};
use drawbridge_runtime::{lograte::Every, text};
use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    admission::{Refusal, Ticket},
    link::{self, Confirm, Link, LinkRefusal, Room, Shared},
    Ctx,
};

/// What `/status` shows about one connection.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ConnectionInfo {
    /// The peer's legal name.
    pub peer: String,
    /// Its address.
    pub addr: String,
    /// Serial of the certificate it presented (lowercase hex): which of a peer's
    /// certificates is in use, e.g. after it rotated its own.
    pub cert_serial: String,
    /// When it connected.
    pub since_unix_ms: u64,
}

/// Why a connection was refused before any session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Refused {
    /// The TLS handshake failed (no, untrusted or revoked client certificate, ...).
    #[error("TLS handshake refused: {0}")]
    Tls(#[source] std::io::Error),
    /// The TLS handshake did not finish within `handshake_timeout`.
    #[error("TLS handshake refused: timed out after {0:?}")]
    TlsTimeout(Duration),
    /// TLS succeeded without a client certificate.
    #[error("no client certificate")]
    NoClientCertificate,
    /// The client certificate's subject is not a legal name.
    #[error("client certificate subject unreadable: {0}")]
    Subject(#[source] CertError),
    /// Taking transfers we cannot publish would only bounce them; refusing makes the
    /// bridge back off and lets a load balancer pick another float.
    #[error("broker unavailable")]
    BrokerUnavailable,
    /// Tunnel mode: no bridge holds an active tunnel.
    #[error("no active bridge")]
    NoBridge,
    /// The AMQP open (or SASL) failed.
    #[error("AMQP open refused: {0}")]
    Open(String),
    /// The peer broke the engine's rules before its open was through (malformed frames,
    /// heartbeats asked for too often).
    #[error("connection refused: {reason}")]
    Hostile {
        /// The engine's label of the rule (`frames`, `idle_timeout`, ...).
        label: &'static str,
        /// What the peer did.
        reason: String,
    },
    /// The AMQP open did not finish within `handshake_timeout`.
    #[error("AMQP open refused: timed out after {0:?}")]
    OpenTimeout(Duration),
    /// The peer, or its address, holds its share of connections (see `admission`).
    #[error("connection refused: {0}")]
    Limit(Refusal),
}

/// Refusals before the peer is authenticated can be caused by anyone at any rate: each kind
/// is logged at most once a second, with the count of those not logged.
static TLS_REFUSALS: Every = Every::new(Duration::from_secs(1));
static TLS_TIMEOUTS: Every = Every::new(Duration::from_secs(1));
/// A member over its share retries with backoff: once every 10 s is enough to see it.
static LIMIT_REFUSALS: Every = Every::new(Duration::from_secs(10));

impl Refused {
    /// One log line per refusal; the wording is what operators search for (see the
    /// runbooks), so each kind keeps its own message.
    fn log(&self, addr: SocketAddr, peer: Option<&LegalName>) {
        let peer = peer.map(ToString::to_string).unwrap_or_default();
        match self {
            Refused::Tls(e) => {
                if let Some(skipped) = TLS_REFUSALS.hit() {
                    warn!(peer_addr = %addr, reason = %e, similar_refusals_not_logged = skipped, "TLS handshake refused")
                }
            }
            Refused::TlsTimeout(timeout) => {
                if let Some(skipped) = TLS_TIMEOUTS.hit() {
                    warn!(peer_addr = %addr, timeout = ?timeout, similar_refusals_not_logged = skipped, "TLS handshake refused: timed out")
                }
            }
            Refused::Limit(refusal) => {
                if let Some(skipped) = LIMIT_REFUSALS.hit() {
                    warn!(peer = %peer, peer_addr = %addr, reason = %refusal, similar_refusals_not_logged = skipped, "connection refused: over its share")
                }
            }
            Refused::NoClientCertificate => {
                warn!(peer_addr = %addr, "connection refused: no client certificate")
            }
            Refused::Subject(e) => {
                warn!(peer_addr = %addr, reason = %e, "connection refused: client certificate subject unreadable")
            }
            Refused::BrokerUnavailable => {
                warn!(peer = %peer, peer_addr = %addr, "connection refused: broker unavailable")
            }
            Refused::NoBridge => {
                warn!(peer = %peer, peer_addr = %addr, "connection refused: no active bridge holds the tunnel")
            }
            Refused::Open(e) => {
                warn!(peer = %peer, peer_addr = %addr, reason = %e, "AMQP open refused")
            }
            Refused::OpenTimeout(_) => {
                warn!(peer = %peer, peer_addr = %addr, "AMQP open refused: timed out")
            }
            Refused::Hostile { reason, .. } => {
                warn!(peer = %peer, peer_addr = %addr, reason = %text::escape(reason), "connection refused: malformed or hostile AMQP frames")
            }
        }
    }

    /// Label of `drawbridge_float_connections_refused_total`, for the refusals it counts.
    fn metric_label(&self) -> Option<&'static str> {
        match self {
            Refused::Tls(_) => Some("tls"),
            Refused::TlsTimeout(_) => Some("tls_timeout"),
            Refused::BrokerUnavailable => Some("broker_down"),
            Refused::NoBridge => Some("no_bridge"),
            Refused::Limit(refusal) => Some(refusal.label()),
            Refused::Hostile { label, .. } => Some(label),
            Refused::NoClientCertificate
            | Refused::Subject(_)
            | Refused::Open(_)
            | Refused::OpenTimeout(_) => None,
        }
    }
}

/// Why an accepted connection ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConnectionEnd {
    /// The float is shutting down.
    #[error("float shutting down")]
    Shutdown,
    /// The peer closed the connection.
    #[error("closed by the peer{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Closed(Option<AmqpError>),
    /// The peer broke one of the engine's rules (see the module doc).
    #[error("{0}")]
    Hostile(String),
    /// The peer sent nothing for our idle timeout.
    #[error("{0}")]
    Silent(String),
    /// The stream broke, or the peer ended it without a close.
    #[error("{0}")]
    Io(#[source] std::io::Error),
    /// The peer did not answer our close in time.
    #[error("no answer to our close")]
    CloseTimeout,
    /// A CRL that changed while the peer was connected revokes its certificate chain.
    #[error("revoked after a CRL change: {0}")]
    Revoked(String),
    /// A certificate of the peer's chain passed its `notAfter` while it was connected.
    #[error("{0}")]
    Expired(String),
    /// Tunnel mode: the active tunnel went (or was deactivated); the peer retries, at
    /// another float if it has one.
    #[error("no active bridge")]
    NoBridge,
}

/// Serve one TCP connection until the peer leaves or the float shuts down.
pub(crate) async fn serve_connection(
    tcp: TcpStream,
    addr: SocketAddr,
    id: u64,
    pending: Ticket,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) {
    // Boxed: the handshake future (TLS, SASL, AMQP open) is large and done once; inline,
    // every connection's task would keep room for it for the connection's whole life.
    let shaken = Box::pin(handshake(tcp, addr, pending.deadline(), &ctx)).await;
    let (mut driver, peer, chain, _slot) = match shaken {
        Ok(v) => {
            // The handshake slot goes back to the pool (the connection holds its own), and
            // the address is recently good: it gets priority if it has to reconnect.
            pending.completed(std::time::Instant::now());
            v
        }
        Err((e, peer)) => {
            e.log(addr, peer.as_ref());
            if let Some(label) = e.metric_label() {
                metrics::counter!("drawbridge_float_connections_refused_total", "reason" => label)
                    .increment(1);
            }
            return;
        }
    };
    // One written form per identity, whatever order the certificate's subject has.
    let sender: Arc<str> = peer.canonical().into();
    let cert_serial = chain
        .first()
        .and_then(|c| CertInfo::of(c).ok())
        .map(|i| i.serial)
        .unwrap_or_default();
    info!(peer = %sender, peer_addr = %addr, cert_serial = %cert_serial, "peer connected");
    ctx.connections
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            id,
            ConnectionInfo {
                peer: sender.to_string(),
                addr: addr.to_string(),
                cert_serial,
                since_unix_ms: drawbridge_runtime::daemon::unix_ms(),
            },
        );
    metrics::gauge!("drawbridge_float_connections").increment(1.0);
    let mut served = Served {
        accepted: metrics::counter!("drawbridge_float_accepted_total", "peer" => sender.to_string()),
        rejections: ctx.rejection_log(&sender),
        // Bytes in flight of all this connection's links (`max_connection_bytes_in_flight`).
        budget: crate::budget::Pool::new(ctx.cfg.max_connection_bytes_in_flight),
        links: HashMap::new(),
        confirms: FuturesUnordered::new(),
        rooms: FuturesUnordered::new(),
        draining: false,
        stopping: None,
        addr,
        sender: sender.clone(),
        ctx: ctx.clone(),
    };
    let end = served.run(&mut driver, chain, &shutdown).await;
    match &end {
        ConnectionEnd::Revoked(reason) => {
            warn!(peer = %sender, peer_addr = %addr, reason = %reason, "peer disconnected: revoked after a CRL change");
            metrics::counter!("drawbridge_float_connections_revoked_total").increment(1);
        }
        ConnectionEnd::Expired(reason) => {
            warn!(peer = %sender, peer_addr = %addr, reason = %reason, "peer disconnected: certificate expired");
            metrics::counter!("drawbridge_float_connections_expired_total").increment(1);
        }
        _ => {}
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, driver.finish()).await;
    served.finish().await;
    metrics::gauge!("drawbridge_float_connections").decrement(1.0);
    info!(peer = %sender, peer_addr = %addr, reason = %end, "peer disconnected");
}

/// Events taken in one go before the links take their deliveries (bounds the time the
/// connection's other work waits; what it holds is bounded by credit either way).
const EVENT_BATCH: usize = 1024;

/// How long a peer has to answer our close (and to take its last bytes).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The AMQP 1.0 side of a peer connection.
type PeerDriver = Driver<TlsStream<TcpStream>>;

/// TLS, the peer's legal name, the broker check and the AMQP open. A refusal comes with the
/// peer's name once it is known.
async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
    ctx: &Ctx,
) -> Result<
    (PeerDriver, LegalName, Vec<CertificateDer<'static>>, Ticket),
    (Refused, Option<LegalName>),
> {
    let _ = tcp.set_nodelay(true);
    // The configuration in force now: a reload applies from the next handshake on.
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.tls.server_config());
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err((Refused::Tls(e), None)),
        Err(_) => return Err((Refused::TlsTimeout(timeout), None)),
    };
    let peer = match tls.get_ref().1.peer_certificates().map(peer_legal_name) {
        Some(Ok(name)) => name,
        Some(Err(e)) => return Err((Refused::Subject(e), None)),
        None => return Err((Refused::NoClientCertificate, None)),
    };
    if !ctx.upstream_ready() {
        let refused = if ctx.tunnel.is_some() {
            Refused::NoBridge
        } else {
            Refused::BrokerUnavailable
        };
        return Err((refused, Some(peer)));
    }
    let slot = match ctx
        .admission
        .establish(addr.ip(), &Arc::from(peer.canonical()))
    {
        Ok(t) => t,
        Err(refusal) => return Err((Refused::Limit(refusal), Some(peer))),
    };
    // Kept for re-checking revocation while the peer stays connected.
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    // SASL EXTERNAL (or ANONYMOUS) succeeds at once: the identity is the certificate TLS
    // verified. The limits are announced and enforced by the engine.
    let mut driver = Driver::new(tls, Connection::server(ctx.engine_config()));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = match tokio::time::timeout_at(deadline, driver.next_event()).await {
            Err(_) => return Err((Refused::OpenTimeout(timeout), Some(peer))),
            Ok(Err(e)) => return Err((Refused::Open(e.to_string()), Some(peer))),
            Ok(Ok(event)) => event,
        };
        match event {
            Event::Opened(_) => return Ok((driver, peer, chain, slot)),
            Event::Closed {
                error, violation, ..
            } => {
                // Our close (or our SASL outcome) goes out before the stream is shut.
                let _ = tokio::time::timeout(CLOSE_GRACE, driver.finish()).await;
                let reason = error.map(|e| e.to_string()).unwrap_or_default();
                let refused = match violation.filter(|v| *v != "sasl") {
                    Some(label) => Refused::Hostile {
                        label,
                        reason: describe(ctx, label, reason),
                    },
                    None => Refused::Open(reason),
                };
                return Err((refused, Some(peer)));
            }
            _ => {}
        }
    }
}

/// The next change of the hub's "a tunnel is active" (`None`: direct mode, or the hub is
/// gone; never completes then).
async fn bridge_lost(rx: &mut Option<tokio::sync::watch::Receiver<bool>>) -> Option<bool> {
    match rx {
        Some(r) => match r.changed().await {
            Ok(()) => Some(*r.borrow_and_update()),
            Err(_) => {
                *rx = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

/// Largest frame a peer may send (announced in `open`, enforced by the engine).
pub(crate) const MAX_FRAME: u32 = 256 * 1024;

/// Room for the properties, annotations and headers around a body of the configured maximum.
const ENVELOPE_ALLOWANCE: u64 = 64 * 1024;

/// The link's max-message-size: the body limit plus [`ENVELOPE_ALLOWANCE`].
pub(crate) fn announced_max_message_size(max_body: usize) -> u64 {
    (max_body as u64).saturating_add(ENVELOPE_ALLOWANCE)
}

/// What the log says a peer did when it broke the rule `label`: the engine's words, except
/// where the float's limit differs from the engine's (links are counted per connection
/// here) or says more (the announced size).
fn describe(ctx: &Ctx, label: &str, engine: String) -> String {
    match label {
        "max_links" => format!(
            "more than {} links on one connection",
            ctx.cfg.max_links_per_connection
        ),
        "message_size" => format!(
            "a delivery exceeds the max-message-size of {} bytes",
            announced_max_message_size(ctx.cfg.max_message_size)
        ),
        _ => engine,
    }
}

/// The state of one established connection: its links and what is in flight for them.
struct Served {
    /// The float.
    ctx: Arc<Ctx>,
    /// The peer's legal name, from its certificate: the sender stamped on every message.
    sender: Arc<str>,
    /// The peer's address, for the log lines.
    addr: SocketAddr,
    /// The attached inbound links.
    links: HashMap<LinkId, Link>,
    /// Bytes in flight of all this connection's links (`max_connection_bytes_in_flight`).
    budget: crate::budget::Pool,
    /// The broker's confirms of the links' publishes, whichever comes first; each link puts
    /// its own back in order.
    confirms: FuturesUnordered<Confirm>,
    /// Links' prepared deliveries waiting for room in the budgets (at most one per link).
    rooms: FuturesUnordered<Room>,
    /// Shutting down (or the peer revoked): no deliveries taken, the connection closes once
    /// the confirms are in.
    draining: bool,
    /// Why we are ending the connection, once we are: it is closed once the confirms are in.
    stopping: Option<ConnectionEnd>,
    /// `drawbridge_float_accepted_total` for this peer, registered once.
    accepted: metrics::Counter,
    /// The peer's "transfer rejected" log line, shared by its links and connections.
    rejections: Arc<Every>,
}

/// The parts of a [`Served`] every link's work borrows (a macro: the borrows stay apart from
/// those of its links and futures).
macro_rules! shared {
    ($s:expr) => {
        Shared {
            ctx: &$s.ctx,
            sender: &$s.sender,
            accepted: &$s.accepted,
            rejections: &$s.rejections,
        }
    };
}

/// Resolves when a window round completes; never without a stream window.
async fn window_round(rx: &mut Option<tokio::sync::watch::Receiver<crate::window::Gate>>) {
    if let Some(rx) = rx {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    // The sender lives as long as the float's context: an error is not expected, and never
    // resolves (instead of waking the task in a loop).
    std::future::pending().await
}

/// What one `select!` round of [`Served::run`] got.
enum Step {
    Event(std::io::Result<Event>),
    Confirmed(LinkId, u64, link::Settled),
    Room(LinkId, crate::budget::Permit),
    Wake,
    Stop(ConnectionEnd),
    CloseTimeout,
}

impl Served {
    /// Drive the connection until it is closed; what ended it.
    async fn run(
        &mut self,
        driver: &mut PeerDriver,
        chain: Vec<CertificateDer<'static>>,
        shutdown: &CancellationToken,
    ) -> ConnectionEnd {
        // Established peers are re-checked whenever the CRLs change (the first check covers a
        // change between the handshake and subscribing) and when a certificate of the chain
        // reaches its notAfter; the verdict is kept for the connection.
        let mut peer_check = self.ctx.established_peer(chain);
        let mut crl = self.ctx.crl_changes();
        let mut crl_open = true;
        // Tunnel mode: the connection ends when no tunnel is active any more.
        let mut bridge = self.ctx.tunnel.as_ref().map(|h| h.subscribe());
        // Stream inboxes: links held at the window's gate take their deliveries once a round
        // completes.
        let mut window = self.ctx.window.as_ref().map(|w| w.subscribe());
        // Our close is sent: the peer has until then to answer it.
        let mut close_by: Option<tokio::time::Instant> = None;
        loop {
            if self.stopping.is_none() {
                match self.ctx.recheck_peer(&mut peer_check) {
                    Some(PeerRefusal::Revoked(reason)) => self.stop(ConnectionEnd::Revoked(reason)),
                    Some(PeerRefusal::Expired(reason)) => self.stop(ConnectionEnd::Expired(reason)),
                    None => {}
                }
            }
            if self.stopping.is_some() && close_by.is_none() && self.confirms.is_empty() {
                // A peer told why retries elsewhere at once; a shutdown closes plainly.
                let forced = matches!(self.stopping, Some(ConnectionEnd::NoBridge)).then(|| {
                    AmqpError::new(
                        "amqp:connection:forced",
                        "no active bridge behind this float",
                    )
                });
                driver.conn().close(forced);
                close_by = Some(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            let stopping = self.stopping.is_some();
            let expiry = peer_check.until_next_expiry();
            let wake = self.links.values().filter_map(Link::paused_until).min();
            let step = tokio::select! {
                e = driver.next_event() => Step::Event(e),
                Some((link, seq, done)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    Step::Confirmed(link, seq, done)
                }
                Some((link, permit)) = self.rooms.next(), if !self.rooms.is_empty() => {
                    Step::Room(link, permit)
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => Step::Wake,
                () = window_round(&mut window) => Step::Wake,
                changed = crl.changed(), if crl_open => {
                    crl_open = changed.is_ok();
                    Step::Wake
                }
                _ = tokio::time::sleep(expiry.unwrap_or_default()), if expiry.is_some() && !stopping => Step::Wake,
                _ = shutdown.cancelled(), if !stopping => Step::Stop(ConnectionEnd::Shutdown),
                Some(active) = bridge_lost(&mut bridge), if !stopping => {
                    if active { Step::Wake } else { Step::Stop(ConnectionEnd::NoBridge) }
                }
                _ = tokio::time::sleep_until(close_by.unwrap_or_else(tokio::time::Instant::now)), if close_by.is_some() => Step::CloseTimeout,
            };
            match step {
                Step::Event(Err(e)) => return self.stopping.take().unwrap_or(ConnectionEnd::Io(e)),
                Step::Event(Ok(event)) => {
                    if let Some(end) = self.event(event, driver.conn()) {
                        return self.stopping.take().unwrap_or(end);
                    }
                    // Read on while the peer's bytes are there (`next_event` is cancel-safe):
                    // its deliveries are held within the credit granted, and taken together
                    // (their publishes pipelined) once the batch is read. A peer that sends
                    // beyond its credit meets the engine's check here, not a full socket.
                    for _ in 0..EVENT_BATCH {
                        match driver.next_event().now_or_never() {
                            None => break,
                            Some(Err(e)) => {
                                return self.stopping.take().unwrap_or(ConnectionEnd::Io(e))
                            }
                            Some(Ok(event)) => {
                                if let Some(end) = self.event(event, driver.conn()) {
                                    return self.stopping.take().unwrap_or(end);
                                }
                            }
                        }
                    }
                }
                Step::Confirmed(link, seq, done) => {
                    let sh = shared!(self);
                    if let Some(l) = self.links.get_mut(&link) {
                        l.confirmed(seq, done, driver.conn(), &sh);
                    }
                    // Whatever else is confirmed already, in the same go: one write.
                    while let Some(Some((link, seq, done))) = self.confirms.next().now_or_never() {
                        if let Some(l) = self.links.get_mut(&link) {
                            l.confirmed(seq, done, driver.conn(), &sh);
                        }
                    }
                }
                Step::Room(link, permit) => {
                    let sh = shared!(self);
                    let mut rooms = Vec::new();
                    if let Some(l) = self.links.get_mut(&link) {
                        if let Some(c) = l.room(permit, driver.conn(), &sh, &mut rooms) {
                            self.confirms.push(c);
                        }
                    }
                    self.rooms.extend(rooms);
                }
                Step::Wake => {}
                Step::Stop(end) => self.stop(end),
                Step::CloseTimeout => {
                    return self.stopping.take().unwrap_or(ConnectionEnd::CloseTimeout)
                }
            }
            if !self.draining {
                self.pump(driver.conn());
            }
        }
    }

    /// Let every link take what it holds, as far as it may.
    fn pump(&mut self, conn: &mut Connection) {
        let mut confirms = Vec::new();
        let mut rooms = Vec::new();
        let sh = shared!(self);
        for l in self.links.values_mut() {
            l.pump(conn, &sh, &mut confirms, &mut rooms);
        }
        self.confirms.extend(confirms);
        self.rooms.extend(rooms);
    }

    /// End the connection for `why` (the first reason counts): take no more deliveries, and
    /// close once the confirms are in.
    fn stop(&mut self, why: ConnectionEnd) {
        if self.stopping.is_none() {
            self.stopping = Some(why);
        }
        self.drain();
    }

    /// Take no more deliveries.
    fn drain(&mut self) {
        self.draining = true;
        for l in self.links.values_mut() {
            l.drain();
        }
    }

    /// One event of the engine; `Some` when the connection is over.
    fn event(&mut self, event: Event, conn: &mut Connection) -> Option<ConnectionEnd> {
        match event {
            Event::AttachRequested { link, role, attach } => {
                if role == Role::Receiver {
                    // The peer asked to receive from us: it is given a detach.
                    let _ = conn.refuse_link(link, LinkRefusal::NotReceiving.to_error());
                    return None;
                }
                let max = self.ctx.cfg.max_links_per_connection;
                if self.links.len() >= max as usize {
                    let reason = describe(&self.ctx, "max_links", String::new());
                    self.hostile("max_links", &reason);
                    conn.close(Some(AmqpError::new(
                        "amqp:resource-limit-exceeded",
                        reason.clone(),
                    )));
                    self.stop(ConnectionEnd::Hostile(reason));
                    return None;
                }
                let address = attach
                    .target
                    .as_ref()
                    .and_then(|t| t.address.clone())
                    .unwrap_or_default();
                let canary = match link::admit(&address, &self.ctx) {
                    Ok(canary) => canary,
                    Err(refusal) => {
                        warn!(peer = %self.sender, address = %text::escape(&address), reason = %text::escape(&refusal.to_string()), "link refused");
                        let _ = conn.refuse_link(link, refusal.to_error());
                        return None;
                    }
                };
                if conn
                    .accept_link(link, self.ctx.cfg.link_credit, None)
                    .is_err()
                {
                    return None;
                }
                if canary.is_some() {
                    debug!(peer = %self.sender, link = %text::escape(&attach.name), "link canary attached");
                } else {
                    info!(peer = %self.sender, link = %text::escape(&attach.name), "inbound link attached");
                }
                let l = Link::new(link, attach.name, self.budget.clone(), &self.ctx, canary);
                self.links.insert(link, l);
            }
            Event::Delivery {
                link,
                id,
                settled,
                payload,
            } => {
                if settled {
                    // Sent settled (at most once): the float has no disposition to hold it
                    // by, so the engine's credit would come back before the float took it,
                    // and what a peer sends this way could pile up while the link waits for
                    // its broker. Drawbridge's promise needs unsettled transfers; a peer that
                    // sends otherwise loses the connection (it resends nothing it settled).
                    let reason = "a transfer sent settled (at most once): the float takes unsettled transfers only".to_string();
                    self.hostile("presettled", &reason);
                    conn.close(Some(AmqpError::new("amqp:not-implemented", reason.clone())));
                    self.stop(ConnectionEnd::Hostile(reason));
                    return None;
                }
                if !self.draining {
                    if let Some(l) = self.links.get_mut(&link) {
                        l.hold(Some(id), payload);
                    }
                }
            }
            Event::Detached { link, error } => {
                if let Some(l) = self.links.remove(&link) {
                    let reason = match &error {
                        Some(e) => format!("detached by the peer: {e}"),
                        None => "detached by the peer".to_string(),
                    };
                    self.link_closed(&l, &reason);
                }
            }
            Event::Ended { session, .. } => {
                let gone: Vec<LinkId> = self
                    .links
                    .keys()
                    .filter(|l| l.session == session)
                    .copied()
                    .collect();
                for id in gone {
                    if let Some(l) = self.links.remove(&id) {
                        self.link_closed(&l, "session ended by the peer");
                    }
                }
                debug!(peer = %self.sender, "session ended");
            }
            Event::Closed {
                error,
                by_us,
                violation,
            } => {
                if violation == Some("silent") {
                    // Nothing received for our idle timeout: a peer gone (a partition, a
                    // crash), not a hostile one.
                    let reason = error
                        .and_then(|e| e.description)
                        .unwrap_or_else(|| "idle timeout".to_string());
                    return Some(ConnectionEnd::Silent(reason));
                }
                if let Some(label) = violation {
                    let reason = describe(
                        &self.ctx,
                        label,
                        error
                            .as_ref()
                            .and_then(|e| e.description.clone())
                            .unwrap_or_default(),
                    );
                    self.hostile(label, &reason);
                    return Some(ConnectionEnd::Hostile(reason));
                }
                if by_us {
                    return Some(ConnectionEnd::Shutdown);
                }
                return Some(ConnectionEnd::Closed(error));
            }
            Event::Opened(_)
            | Event::SessionBegun(_)
            | Event::SessionReady(_)
            | Event::LinkReady { .. }
            | Event::Credit { .. }
            | Event::Settled { .. } => {}
        }
        None
    }

    /// The peer broke the engine's (or the float's) rule `label`: logged and counted.
    fn hostile(&self, label: &'static str, reason: &str) {
        warn!(peer = %self.sender, peer_addr = %self.addr, reason = %text::escape(reason), "connection refused: malformed or hostile AMQP frames");
        metrics::counter!("drawbridge_float_connections_refused_total", "reason" => label)
            .increment(1);
    }

    /// A link is gone: what it published and has not settled, the peer resends.
    fn link_closed(&self, l: &Link, reason: &str) {
        if l.unsettled() > 0 {
            warn!(peer = %self.sender, unsettled = l.unsettled(), "link ended with unsettled transfers; the peer will resend them");
        }
        if l.is_canary() {
            debug!(peer = %self.sender, link = %text::escape(&l.name), reason = %reason, "link canary closed");
        } else {
            info!(peer = %self.sender, link = %text::escape(&l.name), reason = %text::escape(reason), "inbound link closed");
        }
    }

    /// After the connection: what is still in flight was never settled, so the peer resends
    /// it. Wait for the confirms anyway: a confirmed one is safely in the broker, and its
    /// dedup ticket lets the window suppress the resend.
    async fn finish(mut self) {
        for (_, l) in self.links.drain() {
            if l.unsettled() > 0 {
                warn!(peer = %self.sender, unsettled = l.unsettled(), "link ended with unsettled transfers; the peer will resend them");
            }
        }
        self.rooms.clear();
        while self.confirms.next().await.is_some() {}
    }
}
