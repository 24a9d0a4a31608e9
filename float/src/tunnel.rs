//! Tunnel mode (`docs/tunnel.md`): the float holds no broker connection and no private key.
//!
//! Bridges dial the float's tunnel listener (mTLS with the tunnel's own CA, only the
//! configured bridge subjects). The [`Hub`] keeps every tunnel that is up and which one is
//! active: the one whose `Activate` carried the highest epoch. Through the active tunnel the
//! float
//! - hands each checked, routed, deduplicated transfer to the bridge ([`Hub::publish`]) and
//!   settles the peer's transfer only on the bridge's `Outcome` (a tunnel that goes takes its
//!   unanswered publishes along: they settle `released`, the peer resends);
//! - has its TLS handshakes signed ([`RemoteKey`]): the organisation's key stays with the
//!   bridge.
//!
//! Without an active tunnel the float serves no peer: handshakes cannot be signed, and the
//! connections that are open are closed (`Hub::active` turns false) so their peers retry,
//! at another float if they have one.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use drawbridge_certs::{
    peer_legal_name,
    pki_types::CertificateDer,
    rustls::{self, SignatureAlgorithm, SignatureScheme},
    LegalName,
};
use drawbridge_control_protocol::tunnel::{proto, Body, TUNNEL_VERSION};
use drawbridge_runtime::tunnel::{within, TunnelCodec};
use futures::{future::BoxFuture, FutureExt, SinkExt, StreamExt};
use tokio::{net::TcpListener, sync::mpsc, sync::oneshot, sync::watch};
use tokio_util::{codec::Framed, sync::CancellationToken};
use tracing::{info, warn};

use crate::settle::{Settle, Transient};

/// How often each side pings; a tunnel silent for [`TUNNEL_SILENCE`] is dropped.
const PING_EVERY: Duration = Duration::from_secs(5);
/// See [`PING_EVERY`].
const TUNNEL_SILENCE: Duration = Duration::from_secs(15);
/// How long a bridge has for the TLS handshake and its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The tunnels and which one is active.
#[derive(Debug)]
pub(crate) struct Hub {
    state: Mutex<State>,
    /// Whether a tunnel is active: peer connections close when it turns false.
    active: watch::Sender<bool>,
    /// The leaf the float presents to peers (sent in its hello: the bridge signs only for
    /// its key).
    certificate: Vec<u8>,
    /// How long a handshake waits for a signature.
    sign_timeout: Duration,
    /// How long a publish waits for its outcome.
    outcome_timeout: Duration,
}

#[derive(Debug, Default)]
struct State {
    next_tunnel: u64,
    tunnels: HashMap<u64, Tunnel>,
    /// The highest epoch seen: a lower `Activate` is refused.
    epoch: u64,
    active: Option<u64>,
    next_seq: u64,
    /// Publishes waiting for their outcome: the tunnel they went on, and their settlement.
    pending: HashMap<u64, (u64, oneshot::Sender<Settle>)>,
    next_sign: u64,
    /// Handshakes waiting for a signature.
    signs: HashMap<u64, std::sync::mpsc::SyncSender<Result<Vec<u8>, String>>>,
    signed: u64,
    sign_failures: u64,
}

/// One bridge's tunnel.
#[derive(Debug)]
struct Tunnel {
    bridge: String,
    bridge_id: String,
    addr: SocketAddr,
    since: Instant,
    /// Frames to send on it.
    tx: mpsc::UnboundedSender<Body>,
}

impl Hub {
    pub(crate) fn new(
        certificate: Vec<u8>,
        sign_timeout: Duration,
        outcome_timeout: Duration,
    ) -> Self {
        Hub {
            state: Mutex::default(),
            active: watch::Sender::new(false),
            certificate,
            sign_timeout,
            outcome_timeout,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a bridge holds an active tunnel.
    pub(crate) fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    /// Changes of [`Hub::is_active`].
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.active.subscribe()
    }

    /// Hand a checked transfer to the active bridge: its future settles on the bridge's
    /// outcome, `released` if the tunnel goes first or no outcome comes in time. `Err` when
    /// there is no active tunnel.
    pub(crate) fn publish(
        self: &Arc<Self>,
        sender: &str,
        inbox: &str,
        message: Vec<u8>,
        probe: bool,
    ) -> Result<BoxFuture<'static, Settle>, Settle> {
        let (tx, rx) = oneshot::channel();
        let seq = {
            let mut st = self.state();
            let Some(active) = st.active else {
                return Err(Settle::Release(Transient::NoBridge));
            };
            let seq = st.next_seq;
            st.next_seq += 1;
            let sent = st.tunnels.get(&active).is_some_and(|t| {
                t.tx.send(Body::Publish(proto::Publish {
                    seq,
                    sender: sender.to_string(),
                    inbox: inbox.to_string(),
                    message,
                    probe,
                }))
                .is_ok()
            });
            if !sent {
                return Err(Settle::Release(Transient::NoBridge));
            }
            st.pending.insert(seq, (active, tx));
            seq
        };
        let timeout = self.outcome_timeout;
        let hub = self.clone();
        Ok(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(settle)) => settle,
                Ok(Err(_)) => Settle::Release(Transient::NoBridge),
                Err(_) => {
                    // No outcome will be waited for: a late one finds nothing to settle.
                    hub.state().pending.remove(&seq);
                    Settle::Release(Transient::ConfirmTimedOut(timeout))
                }
            }
        }
        .boxed())
    }

    /// Sign `message` with `scheme` through the active bridge, waiting at most the sign
    /// timeout. Blocking: rustls signs inside the handshake (see [`RemoteKey`]).
    fn sign_blocking(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, String> {
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let id = {
            let mut st = self.state();
            let Some(active) = st.active else {
                st.sign_failures += 1;
                return Err("no active bridge to sign the handshake".into());
            };
            let id = st.next_sign;
            st.next_sign += 1;
            let sent = st.tunnels.get(&active).is_some_and(|t| {
                t.tx.send(Body::SignRequest(proto::SignRequest {
                    id,
                    scheme: u32::from(u16::from(scheme)),
                    message: message.to_vec(),
                }))
                .is_ok()
            });
            if !sent {
                st.sign_failures += 1;
                return Err("the active tunnel is gone".into());
            }
            st.signs.insert(id, tx);
            id
        };
        let wait = || rx.recv_timeout(self.sign_timeout);
        // rustls calls the signer from inside the handshake's poll: let the runtime move the
        // other tasks of this worker elsewhere while this one waits (the handshake admission
        // slots bound how many wait at once). On a current-thread runtime nobody else could
        // answer: refuse at once instead of waiting for nothing.
        let answer = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => {
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
            }
            Ok(_) => tokio::task::block_in_place(wait),
            Err(_) => wait(),
        };
        let mut st = self.state();
        st.signs.remove(&id);
        metrics::histogram!("drawbridge_float_sign_seconds").record(started.elapsed());
        match answer {
            Ok(Ok(sig)) => {
                st.signed += 1;
                Ok(sig)
            }
            Ok(Err(e)) => {
                st.sign_failures += 1;
                Err(format!("the bridge refused to sign: {e}"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                st.sign_failures += 1;
                Err(format!(
                    "no signature from the bridge within {:?}",
                    self.sign_timeout
                ))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                st.sign_failures += 1;
                Err("signing over the tunnel needs the multi-threaded runtime".into())
            }
        }
    }

    fn register(
        &self,
        bridge: String,
        bridge_id: String,
        addr: SocketAddr,
    ) -> (u64, mpsc::UnboundedReceiver<Body>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.state();
        let id = st.next_tunnel;
        st.next_tunnel += 1;
        st.tunnels.insert(
            id,
            Tunnel {
                bridge,
                bridge_id,
                addr,
                since: Instant::now(),
                tx,
            },
        );
        (id, rx)
    }

    /// A tunnel went: what it had unanswered settles `released`; if it was the active one,
    /// the float has no bridge until another activates.
    fn unregister(&self, id: u64) {
        let mut st = self.state();
        st.tunnels.remove(&id);
        st.pending.retain(|_, (t, _)| *t != id);
        if st.active == Some(id) {
            st.active = None;
            self.active.send_replace(false);
        }
        metrics::gauge!("drawbridge_float_tunnels").set(st.tunnels.len() as f64);
    }

    /// An `Activate` with `epoch` came on tunnel `id`: it becomes the active one if `epoch`
    /// is the highest seen (the others are told); otherwise it is told which epoch wins.
    fn activate(&self, id: u64, epoch: u64) -> Result<Option<String>, u64> {
        let mut st = self.state();
        if epoch < st.epoch || (epoch == st.epoch && st.active != Some(id)) {
            return Err(st.epoch);
        }
        st.epoch = epoch;
        let before = st.active.replace(id);
        if let Some(old) = before.filter(|old| *old != id) {
            if let Some(t) = st.tunnels.get(&old) {
                // A notice, not a message: it fails only when that tunnel's task is gone,
                // and a gone tunnel is inactive anyway.
                let _ = t.tx.send(Body::Deactivate(proto::Deactivate {
                    epoch,
                    reason: format!("another bridge activated this float with epoch {epoch}"),
                }));
            }
        }
        self.active.send_replace(true);
        metrics::gauge!("drawbridge_float_tunnel_epoch").set(epoch as f64);
        Ok(before
            .filter(|old| *old != id)
            .and_then(|old| st.tunnels.get(&old).map(|t| t.bridge_id.clone())))
    }

    /// A `Deactivate` from the active tunnel's bridge (it lost the HA lock, or stops).
    fn deactivate(&self, id: u64) -> bool {
        let mut st = self.state();
        if st.active == Some(id) {
            st.active = None;
            self.active.send_replace(false);
            return true;
        }
        false
    }

    fn outcome(&self, id: u64, o: proto::Outcome) {
        let mut st = self.state();
        // Only the tunnel a publish went on answers it.
        if st.pending.get(&o.seq).is_some_and(|(t, _)| *t == id) {
            if let Some((_, tx)) = st.pending.remove(&o.seq) {
                let settle = match proto::outcome::Kind::try_from(o.kind) {
                    Ok(proto::outcome::Kind::Accepted) => Settle::Accept,
                    Ok(proto::outcome::Kind::Rejected) => Settle::Reject(o.reason),
                    _ => Settle::Release(Transient::Bridge(o.reason)),
                };
                // Fails only when the transfer's wait is over (outcome timeout, connection
                // gone): it was released or stays unsettled, the peer resends it, and the
                // dedup window knows a copy the broker confirmed. Never a loss.
                let _ = tx.send(settle);
            }
        }
    }

    fn signed(&self, r: proto::SignResponse) {
        let st = self.state();
        if let Some(tx) = st.signs.get(&r.id) {
            let _ = tx.try_send(if r.error.is_empty() {
                Ok(r.signature)
            } else {
                Err(r.error)
            });
        }
    }

    /// For `/status`.
    pub(crate) fn status(&self) -> serde_json::Value {
        let st = self.state();
        let tunnels: Vec<_> = st
            .tunnels
            .iter()
            .map(|(id, t)| {
                serde_json::json!({
                    "bridge": t.bridge,
                    "bridge_id": t.bridge_id,
                    "address": t.addr.to_string(),
                    "active": st.active == Some(*id),
                    "up_seconds": t.since.elapsed().as_secs(),
                })
            })
            .collect();
        serde_json::json!({
            "active": st.active.is_some(),
            "epoch": st.epoch,
            "tunnels": tunnels,
            "publishes_waiting": st.pending.len(),
            "signatures": st.signed,
            "signature_failures": st.sign_failures,
        })
    }
}

/// The float's server key in tunnel mode: its public half is the certificate's; every
/// signature is made by the active bridge.
#[derive(Debug)]
pub(crate) struct RemoteKey {
    hub: Arc<Hub>,
    algorithm: SignatureAlgorithm,
}

impl RemoteKey {
    /// A key for the certificate `leaf`, signing through `hub`.
    pub(crate) fn new(hub: Arc<Hub>, leaf: &CertificateDer<'_>) -> Result<Self, String> {
        let algorithm = key_algorithm(leaf)?;
        Ok(RemoteKey { hub, algorithm })
    }
}

/// The key type of `leaf`'s public key.
fn key_algorithm(leaf: &CertificateDer<'_>) -> Result<SignatureAlgorithm, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let oid = cert.public_key().algorithm.algorithm.to_id_string();
    match oid.as_str() {
        "1.2.840.10045.2.1" => Ok(SignatureAlgorithm::ECDSA),
        "1.2.840.113549.1.1.1" => Ok(SignatureAlgorithm::RSA),
        "1.3.101.112" => Ok(SignatureAlgorithm::ED25519),
        other => Err(format!("unsupported public key algorithm {other}")),
    }
}

impl rustls::sign::SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        let ours: &[SignatureScheme] = match self.algorithm {
            SignatureAlgorithm::ECDSA => &[
                SignatureScheme::ECDSA_NISTP256_SHA256,
                SignatureScheme::ECDSA_NISTP384_SHA384,
            ],
            SignatureAlgorithm::RSA => &[
                SignatureScheme::RSA_PSS_SHA256,
                SignatureScheme::RSA_PSS_SHA384,
                SignatureScheme::RSA_PSS_SHA512,
            ],
            SignatureAlgorithm::ED25519 => &[SignatureScheme::ED25519],
            _ => &[],
        };
        let scheme = ours.iter().find(|s| offered.contains(s))?;
        Some(Box::new(RemoteSigner {
            hub: self.hub.clone(),
            scheme: *scheme,
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }
}

#[derive(Debug)]
struct RemoteSigner {
    hub: Arc<Hub>,
    scheme: SignatureScheme,
}

impl rustls::sign::Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.hub.sign_blocking(self.scheme, message).map_err(|e| {
            warn!(reason = %e, "TLS handshake not signed");
            rustls::Error::General(e)
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Who may hold a tunnel, and how it is secured.
#[derive(Debug, Clone)]
pub(crate) struct TunnelServer {
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) bridges: Vec<LegalName>,
    pub(crate) max_message_size: usize,
    pub(crate) float_id: String,
}

/// Accept bridges' tunnels until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    server: TunnelServer,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = drawbridge_runtime::backoff::Backoff::new(
        Duration::from_millis(50),
        Duration::from_secs(2),
    );
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => { backoff.reset(); v }
                Err(e) => {
                    let d = backoff.next_delay();
                    warn!(error = %e, retry_in = ?d, "tunnel accept failed");
                    tokio::time::sleep(d).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // At most a few tunnels (one per bridge): a flood of connections to the tunnel port
        // is refused before TLS.
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= 16 {
            warn!(%addr, "tunnel connection refused: 16 tunnels or tunnel handshakes already");
            continue;
        }
        let server = server.clone();
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            serve_tunnel(tcp, addr, server, hub, shutdown).await;
        });
    }
    tasks.shutdown().await;
}

async fn serve_tunnel(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    server: TunnelServer,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let accepted = tokio::time::timeout(
        HELLO_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(server.tls.clone()).accept(tcp),
    )
    .await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!(%addr, reason = %e, "tunnel refused: TLS handshake failed");
            return;
        }
        Err(_) => {
            warn!(%addr, "tunnel refused: no TLS handshake within {HELLO_TIMEOUT:?}");
            return;
        }
    };
    let bridge = match tls.get_ref().1.peer_certificates().map(peer_legal_name) {
        Some(Ok(name)) => name,
        _ => {
            warn!(%addr, "tunnel refused: no usable client certificate");
            return;
        }
    };
    if !server.bridges.iter().any(|b| b == &bridge) {
        warn!(%addr, bridge = %bridge, "tunnel refused: `{bridge}` is not one of float.tunnel.bridges");
        return;
    }
    let mut framed = Framed::new(tls, TunnelCodec::new(server.max_message_size));
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(Body::BridgeHello(h)))) => h,
        Ok(Some(Ok(_))) => {
            warn!(%addr, bridge = %bridge, "tunnel refused: the first frame is not a hello");
            return;
        }
        Ok(Some(Err(e))) => {
            warn!(%addr, bridge = %bridge, reason = %e, "tunnel refused");
            return;
        }
        Ok(None) | Err(_) => {
            warn!(%addr, bridge = %bridge, "tunnel refused: no hello");
            return;
        }
    };
    if hello.version > TUNNEL_VERSION {
        warn!(%addr, bridge = %bridge, theirs = hello.version, ours = TUNNEL_VERSION, "tunnel refused: the bridge speaks a newer tunnel protocol");
        return;
    }
    let epoch = hub.state().epoch;
    if framed
        .send(Body::FloatHello(proto::FloatHello {
            version: TUNNEL_VERSION,
            float_id: server.float_id.clone(),
            certificate: hub.certificate.clone(),
            epoch,
        }))
        .await
        .is_err()
    {
        return;
    }
    let bridge_id = drawbridge_runtime::text::truncate(&hello.bridge_id, 128).to_string();
    let (id, mut rx) = hub.register(bridge.to_string(), bridge_id.clone(), addr);
    metrics::gauge!("drawbridge_float_tunnels").set(hub.state().tunnels.len() as f64);
    info!(%addr, bridge = %bridge, bridge_id = %bridge_id, "tunnel up");
    let why = run_tunnel(id, &mut framed, &mut rx, &hub, &shutdown).await;
    let was_active = hub.state().active == Some(id);
    hub.unregister(id);
    if was_active {
        warn!(%addr, bridge = %bridge, bridge_id = %bridge_id, reason = %why, "tunnel down: it was the active one; no peer is served until a bridge activates another");
    } else {
        info!(%addr, bridge = %bridge, bridge_id = %bridge_id, reason = %why, "tunnel down");
    }
}

async fn run_tunnel<S>(
    id: u64,
    framed: &mut Framed<S, TunnelCodec>,
    rx: &mut mpsc::UnboundedReceiver<Body>,
    hub: &Hub,
    shutdown: &CancellationToken,
) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = tokio::time::Instant::now();
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            frame = framed.next() => {
                let body = match frame {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => return e.to_string(),
                    None => return "closed by the bridge".into(),
                };
                heard = tokio::time::Instant::now();
                match body {
                    Body::Activate(a) => match hub.activate(id, a.epoch) {
                        Ok(replaced) => {
                            info!(epoch = a.epoch, replaced = ?replaced, "tunnel activated: serving peers");
                        }
                        Err(highest) => {
                            info!(epoch = a.epoch, highest, "activation refused: an equal or higher epoch holds the float");
                            // A notice; if it cannot be written the tunnel is failing and
                            // its next read or write ends it.
                            let _ = within(framed.send(Body::Deactivate(proto::Deactivate {
                                epoch: highest,
                                reason: format!("epoch {} is not above {highest}", a.epoch),
                            }))).await;
                        }
                    },
                    Body::Deactivate(d) => {
                        if hub.deactivate(id) {
                            info!(reason = %drawbridge_runtime::text::escape(&d.reason), "tunnel deactivated by its bridge: no peer is served until a bridge activates another");
                        }
                    }
                    Body::Outcome(o) => hub.outcome(id, o),
                    Body::SignResponse(r) => hub.signed(r),
                    Body::Ping(p) => {
                        if within(framed.send(Body::Pong(proto::Pong { nonce: p.nonce }))).await.is_err() {
                            return "write failed".into();
                        }
                    }
                    Body::Pong(_) => {}
                    other => {
                        return format!("unexpected frame from the bridge: {}", frame_name(&other));
                    }
                }
            }
            Some(out) = rx.recv() => {
                // Whatever else is queued goes in the same write.
                let mut batch = vec![out];
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(b) => batch.push(b),
                        Err(_) => break,
                    }
                }
                for b in batch {
                    if let Err(e) = within(framed.feed(b)).await {
                        return e.to_string();
                    }
                }
                if let Err(e) = within(framed.flush()).await {
                    return e.to_string();
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > TUNNEL_SILENCE {
                    return format!("nothing from the bridge for {TUNNEL_SILENCE:?}");
                }
                nonce += 1;
                if within(framed.send(Body::Ping(proto::Ping { nonce }))).await.is_err() {
                    return "write failed".into();
                }
            }
            _ = shutdown.cancelled() => {
                // A courtesy: the bridge sees the tunnel close either way.
                let _ = within(framed.send(Body::Deactivate(proto::Deactivate { epoch: 0, reason: "float shutting down".into() }))).await;
                return "float shutting down".into();
            }
        }
    }
}

fn frame_name(b: &Body) -> &'static str {
    match b {
        Body::BridgeHello(_) => "bridge_hello",
        Body::FloatHello(_) => "float_hello",
        Body::Activate(_) => "activate",
        Body::Deactivate(_) => "deactivate",
        Body::Publish(_) => "publish",
        Body::Outcome(_) => "outcome",
        Body::SignRequest(_) => "sign_request",
        Body::SignResponse(_) => "sign_response",
        Body::Ping(_) => "ping",
        Body::Pong(_) => "pong",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(outcome_timeout: Duration) -> Arc<Hub> {
        Arc::new(Hub::new(
            Vec::new(),
            Duration::from_millis(50),
            outcome_timeout,
        ))
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 4000))
    }

    fn publishes(rx: &mut mpsc::UnboundedReceiver<Body>) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Ok(b) = rx.try_recv() {
            if let Body::Publish(p) = b {
                seqs.push(p.seq);
            }
        }
        seqs
    }

    #[tokio::test]
    async fn the_highest_epoch_holds_the_float_and_the_other_tunnel_is_told() {
        let hub = hub(Duration::from_secs(5));
        assert!(matches!(
            hub.publish("O=A, L=L, C=GB", "inbox", vec![1], false),
            Err(Settle::Release(Transient::NoBridge))
        ));
        let (one, mut rx1) = hub.register("b".into(), "bridge-1".into(), addr());
        let (two, mut rx2) = hub.register("b".into(), "bridge-2".into(), addr());
        assert!(hub.activate(one, 100).is_ok());
        assert!(hub.is_active());
        // A lower or equal epoch from the other tunnel is refused with the one in force.
        assert_eq!(hub.activate(two, 99).err(), Some(100));
        assert_eq!(hub.activate(two, 100).err(), Some(100));
        // The same tunnel may repeat its activation.
        assert!(hub.activate(one, 100).is_ok());
        // A higher one wins, and the old active tunnel hears of it.
        assert_eq!(
            hub.activate(two, 101).ok().flatten(),
            Some("bridge-1".into())
        );
        let told = std::iter::from_fn(|| rx1.try_recv().ok())
            .any(|b| matches!(b, Body::Deactivate(d) if d.epoch == 101));
        assert!(told);
        // Publishes go to the active tunnel only.
        let _settled = hub
            .publish("O=A, L=L, C=GB", "inbox", vec![1], false)
            .unwrap();
        assert_eq!(publishes(&mut rx2).len(), 1);
        assert!(publishes(&mut rx1).is_empty());
        // Its bridge deactivates it: no tunnel is active, peers are closed.
        let mut watch = hub.subscribe();
        assert!(hub.deactivate(two));
        assert!(!*watch.borrow_and_update());
    }

    #[tokio::test]
    async fn only_the_tunnel_a_publish_went_on_settles_it_and_a_lost_tunnel_releases_it() {
        let hub = hub(Duration::from_secs(5));
        let (one, mut rx1) = hub.register("b".into(), "bridge-1".into(), addr());
        let (two, _rx2) = hub.register("b".into(), "bridge-2".into(), addr());
        hub.activate(one, 1).unwrap();
        let first = hub
            .publish("O=A, L=L, C=GB", "inbox", vec![1], false)
            .unwrap();
        let second = hub
            .publish("O=A, L=L, C=GB", "inbox", vec![2], false)
            .unwrap();
        let seqs = publishes(&mut rx1);
        let outcome = |seq, kind: proto::outcome::Kind| proto::Outcome {
            seq,
            kind: kind as i32,
            reason: "why".into(),
        };
        // Another tunnel's answer is ignored; the right one settles.
        hub.outcome(two, outcome(seqs[0], proto::outcome::Kind::Accepted));
        hub.outcome(one, outcome(seqs[0], proto::outcome::Kind::Rejected));
        assert_eq!(first.await, Settle::Reject("why".into()));
        // The tunnel goes before the second is answered: released, the float inactive.
        hub.unregister(one);
        assert_eq!(second.await, Settle::Release(Transient::NoBridge));
        assert!(!hub.is_active());
        assert!(hub.state().pending.is_empty());
    }

    #[tokio::test]
    async fn a_publish_with_no_outcome_in_time_is_released_and_forgotten() {
        let hub = hub(Duration::from_millis(20));
        let (one, _rx) = hub.register("b".into(), "bridge-1".into(), addr());
        hub.activate(one, 1).unwrap();
        let settled = hub
            .publish("O=A, L=L, C=GB", "inbox", vec![1], false)
            .unwrap();
        assert!(matches!(
            settled.await,
            Settle::Release(Transient::ConfirmTimedOut(_))
        ));
        assert!(hub.state().pending.is_empty(), "no entry left behind");
    }

    #[test]
    fn signing_without_an_active_tunnel_fails_at_once() {
        let hub = hub(Duration::from_secs(5));
        let started = Instant::now();
        let err = hub
            .sign_blocking(SignatureScheme::ECDSA_NISTP256_SHA256, b"x")
            .unwrap_err();
        assert!(err.contains("no active bridge"), "{err}");
        assert!(started.elapsed() < Duration::from_millis(40));
    }
}
