//! One peer connection: TLS with a required client certificate (within the handshake
//! timeout), the peer's legal name from that certificate, the AMQP 1.0 open, then its
//! sessions and, in each, its links.
//!
//! Identity comes from TLS only: the certificate's subject becomes the sender stamped on
//! every message of every link of the connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use drawbridge_certs::pki_types::CertificateDer;
use drawbridge_certs::{peer_legal_name, CertError, CertInfo, LegalName, PeerRefusal};
use drawbridge_runtime::lograte::Every;
use fe2o3_amqp::{
    acceptor::{
        ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
        ListenerSessionHandle, SessionAcceptor, SupportedReceiverSettleModes,
    },
    connection::OpenError,
    session::BeginError,
    types::definitions::ReceiverSettleMode,
};
use tokio::{net::TcpStream, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    admission::{Refusal, Ticket},
    frame_guard::{FrameGuard, Side},
    link::{self, LinkRefusal},
    sasl::TlsIdentitySasl,
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
    /// The AMQP open (or SASL) failed.
    #[error("AMQP open refused: {0}")]
    Open(#[source] OpenError),
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
            Refused::Open(e) => {
                warn!(peer = %peer, peer_addr = %addr, reason = %e, "AMQP open refused")
            }
            Refused::OpenTimeout(_) => {
                warn!(peer = %peer, peer_addr = %addr, "AMQP open refused: timed out")
            }
        }
    }

    /// Label of `drawbridge_float_connections_refused_total`, for the refusals it counts.
    fn metric_label(&self) -> Option<&'static str> {
        match self {
            Refused::Tls(_) => Some("tls"),
            Refused::TlsTimeout(_) => Some("tls_timeout"),
            Refused::BrokerUnavailable => Some("broker_down"),
            Refused::Limit(refusal) => Some(refusal.label()),
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
    /// The peer closed the connection, or it broke.
    #[error("{0}")]
    Session(#[source] BeginError),
    /// A CRL that changed while the peer was connected revokes its certificate chain.
    #[error("revoked after a CRL change: {0}")]
    Revoked(String),
    /// A certificate of the peer's chain passed its `notAfter` while it was connected.
    #[error("{0}")]
    Expired(String),
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
    // Boxed: the handshake future (TLS, SASL, AMQP open) is ≈ 10 KiB and done once; inline,
    // every connection's task would keep room for it for the connection's whole life.
    let shaken = Box::pin(handshake(tcp, addr, pending.deadline(), &ctx)).await;
    let (mut conn, peer, chain, _slot) = match shaken {
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
    // Ends this connection's sessions and links (they drain as on shutdown).
    let stop = shutdown.child_token();
    // Established peers are re-checked whenever the CRLs change (the first check covers a
    // change between the handshake and subscribing) and when a certificate of the chain
    // reaches its notAfter; the verdict is kept for the connection, not redone per session.
    let mut peer_check = ctx.established_peer(chain);
    let mut crl = ctx.crl_changes();
    let mut crl_open = true;
    let mut sessions = JoinSet::new();
    // Bytes in flight of all this connection's links (`max_connection_bytes_in_flight`).
    let budget = crate::budget::Pool::new(ctx.cfg.max_connection_bytes_in_flight);
    // Announced; the frame guard enforces the count over all sessions of the connection.
    let session_acceptor = SessionAcceptor::builder()
        .handle_max(ctx.peer_limits().max_links.saturating_sub(1))
        .build();
    let end = loop {
        match ctx.recheck_peer(&mut peer_check) {
            Some(PeerRefusal::Revoked(reason)) => break ConnectionEnd::Revoked(reason),
            Some(PeerRefusal::Expired(reason)) => break ConnectionEnd::Expired(reason),
            None => {}
        }
        let expiry = peer_check.until_next_expiry();
        tokio::select! {
            s = session_acceptor.accept(&mut conn) => match s {
                Ok(session) => {
                    sessions.spawn(serve_session(session, sender.clone(), budget.clone(), ctx.clone(), stop.clone()));
                }
                Err(e) => break ConnectionEnd::Session(e),
            },
            changed = crl.changed(), if crl_open => crl_open = changed.is_ok(),
            _ = tokio::time::sleep(expiry.unwrap_or_default()), if expiry.is_some() => {}
            _ = shutdown.cancelled() => break ConnectionEnd::Shutdown,
        }
    };
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
    stop.cancel();
    while sessions.join_next().await.is_some() {}
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
    metrics::gauge!("drawbridge_float_connections").decrement(1.0);
    info!(peer = %sender, peer_addr = %addr, reason = %end, "peer disconnected");
}

/// TLS, the peer's legal name, the broker check and the AMQP open. A refusal comes with the
/// peer's name once it is known.
async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
    ctx: &Ctx,
) -> Result<
    (
        ListenerConnectionHandle,
        LegalName,
        Vec<CertificateDer<'static>>,
        Ticket,
    ),
    (Refused, Option<LegalName>),
> {
    let _ = tcp.set_nodelay(true);
    // The configuration in force now: a reload applies from the next handshake on.
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.tls.current().built.clone());
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
    if !ctx.broker.is_connected() {
        return Err((Refused::BrokerUnavailable, Some(peer)));
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
    let limits = ctx.peer_limits();
    // The limits are announced (a well-behaved peer stays within them) and enforced by the
    // frame guard (a hostile one loses its connection).
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("drawbridge-float-{}", std::process::id()))
        .max_frame_size(MAX_FRAME)
        .session_max(limits.max_sessions)
        .idle_time_out(ctx.cfg.idle_timeout.as_millis() as u32)
        .sasl_acceptor(TlsIdentitySasl)
        .build();
    // Every byte the peer sends is scanned before fe2o3 decodes it (nesting depth, frame
    // size, sessions, links, idle timeout): see `frame_guard`.
    let guarded = FrameGuard::new(
        tls,
        MAX_FRAME,
        limits,
        format!("{} ({addr})", peer.canonical()),
        Side::Float,
    );
    match tokio::time::timeout(timeout, acceptor.accept(guarded)).await {
        Ok(Ok(c)) => Ok((c, peer, chain, slot)),
        Ok(Err(e)) => Err((Refused::Open(e), Some(peer))),
        Err(_) => Err((Refused::OpenTimeout(timeout), Some(peer))),
    }
}

/// Largest frame a peer may send (announced in `open`, enforced by [`FrameGuard`]).
const MAX_FRAME: u32 = 256 * 1024;

/// Room for the properties, annotations and headers around a body of the configured maximum.
const ENVELOPE_ALLOWANCE: u64 = 64 * 1024;

/// The link's max-message-size: the body limit plus [`ENVELOPE_ALLOWANCE`].
pub(crate) fn announced_max_message_size(max_body: usize) -> u64 {
    (max_body as u64).saturating_add(ENVELOPE_ALLOWANCE)
}

/// Accept the links of one session: receiving links are served, sending ones refused.
async fn serve_session(
    mut session: ListenerSessionHandle,
    sender: Arc<str>,
    budget: crate::budget::Pool,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) {
    // Announced on attach and enforced by fe2o3 while a delivery is assembled (the link is
    // detached with `message-size-exceeded`), counting the whole encoded message; a bridge
    // dead-letters what exceeds it instead of sending it.
    //
    // Settle mode `first` only: the float settles each delivery in the disposition that
    // carries its outcome. A sender asking for `rcv-settle-mode = second` is answered with
    // `first` (the receiver's choice, AMQP 1.0 2.7.3), so no disposition waits in fe2o3's
    // unsettled map for a settlement a hostile peer would never send; a transfer that asks
    // for `second` on such a link ends the link (`IllegalRcvSettleModeInTransfer`).
    let acceptor = LinkAcceptor::builder()
        .max_message_size(announced_max_message_size(ctx.cfg.max_message_size))
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .build();
    let mut links = JoinSet::new();
    loop {
        tokio::select! {
            l = acceptor.accept(&mut session) => match l {
                Ok(LinkEndpoint::Receiver(r)) => {
                    links.spawn(link::serve_link(r, sender.clone(), budget.clone(), ctx.clone(), shutdown.clone()));
                }
                Ok(LinkEndpoint::Sender(s)) => {
                    let _ = s.close_with_error(LinkRefusal::NotReceiving.to_error()).await;
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
