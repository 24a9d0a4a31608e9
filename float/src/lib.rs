//! `drawbridge-float`: the DMZ side of Drawbridge.
//!
//! Terminates inbound mutually-authenticated TLS AMQP 1.0 links from peers, validates each
//! transfer, stamps the authenticated sender (`drawbridge-sender`, from the client
//! certificate, overwriting whatever the peer wrote), publishes it persistent + mandatory
//! into the broker with publisher confirms, and settles the transfer `accepted` only after
//! the broker's confirm. Anything it cannot deliver is `rejected` with a description (the
//! bridge dead-letters it); anything it cannot deliver *yet* is `released` (the bridge
//! resends). It never accepts and then drops.
#![forbid(unsafe_code)]
// Everything here handles peer input: no peer byte may reach a panic.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod admission;
mod args;
pub mod budget;
pub mod config;
mod connection;
pub mod dedup;
mod link;
mod listener;
mod publisher;
mod routing;
pub mod settle;
mod tunnel;
mod window;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use drawbridge_certs::{
    pki_types::CertificateDer, rustls, EstablishedPeer, LegalName, PeerRefusal, PeerRole,
    Revocation,
};
use drawbridge_node::topology::{self, QueueType};
use drawbridge_runtime::{
    admin::{self, AdminState},
    broker::{BrokerSession, Live, Setup},
    tls_reload::{TlsMaterial, TlsReload, TlsSource},
    watchdog::Service,
};
use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use args::Args;
pub use config::FloatConfig;
use dedup::Dedup;
use routing::Identities;

/// Counters shown in `/status`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transfers published, confirmed and accepted.
    pub accepted: AtomicU64,
    /// Transfers rejected (undeliverable).
    pub rejected: AtomicU64,
    /// Transfers released (transient trouble; resent by the peer).
    pub released: AtomicU64,
    /// Duplicates accepted without publishing again.
    pub duplicates_suppressed: AtomicU64,
    /// Duplicates published again because their first copy was not confirmed yet.
    pub duplicates_passed: AtomicU64,
    /// Times an inbound link held back (took no transfer) because its bytes in flight
    /// reached `max_link_bytes_in_flight` or the float's reached `max_bytes_in_flight`.
    pub budget_holds: AtomicU64,
}

/// Shared state of a running float.
pub(crate) struct Ctx {
    /// The configuration it runs with.
    cfg: FloatConfig,
    /// TLS server side, client certificates required.
    tls: PeerTls,
    /// The broker connection every link publishes through (direct mode).
    broker: Option<BrokerSession>,
    /// Tunnel mode: the bridges' tunnels, through which links publish and handshakes are
    /// signed.
    tunnel: Option<Arc<tunnel::Hub>>,
    /// Duplicate suppression, shared by every link.
    dedup: Dedup,
    /// Stream inboxes: the window's rebuild from them, and the gate links wait at.
    window: Option<Arc<window::StreamWindow>>,
    /// Bytes in flight of all links (`max_bytes_in_flight`).
    pool: budget::Pool,
    /// Handshake and connection slots.
    admission: admission::Admission,
    /// The broker channels links publish on.
    channels: publisher::Channels,
    /// Counters for `/status`.
    stats: Stats,
    /// Legal names served and their inboxes.
    identities: Identities,
    /// Open connections, for `/status`.
    connections: Mutex<HashMap<u64, connection::ConnectionInfo>>,
    /// CRLs in force (shared with the TLS acceptor's verifier) and their change signal.
    revocation: Revocation,
    /// What `/healthz` asks whether the accept loop runs (the systemd watchdog's verdict).
    service: Service,
    /// The canary queue is declared (and bound) on the current broker connection: canary
    /// links are served; without it they are refused with the reason.
    canary_ready: Arc<AtomicBool>,
    /// Each peer's rate-limited "transfer rejected" log line, shared by its links: a peer
    /// decides how often it is rejected, not how often the float writes about it. One entry
    /// per member that was ever connected (bounded by the network).
    rejection_logs: Mutex<HashMap<Arc<str>, Arc<drawbridge_runtime::lograte::Every>>>,
}

/// The peers' TLS configuration.
pub(crate) enum PeerTls {
    /// Direct mode: the configuration in force, taken per accepted connection so that a
    /// reloaded certificate, key or trust roots apply to the next handshake (established
    /// connections keep theirs).
    Reload(TlsReload<Arc<rustls::ServerConfig>>),
    /// Tunnel mode: the certificate chain read at start, its key the bridge's (signing over
    /// the tunnel). Not reloaded: a new certificate takes a restart.
    Remote {
        config: Arc<rustls::ServerConfig>,
        cert: drawbridge_certs::CertInfo,
    },
}

impl PeerTls {
    /// The configuration for the next handshake.
    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        match self {
            PeerTls::Reload(r) => r.current().built.clone(),
            PeerTls::Remote { config, .. } => config.clone(),
        }
    }

    fn status(&self) -> serde_json::Value {
        match self {
            PeerTls::Reload(r) => r.status(),
            PeerTls::Remote { cert, .. } => serde_json::json!({
                "key": "remote (signed by the bridge over the tunnel)",
                "cert_serial": cert.serial,
                "not_after": drawbridge_certs::CertInfo::rfc3339(cert.not_after),
            }),
        }
    }
}

impl Ctx {
    /// Whether links can publish: the broker connected (direct mode) or a tunnel active.
    pub(crate) fn upstream_ready(&self) -> bool {
        match (&self.broker, &self.tunnel) {
            (Some(broker), _) => broker.is_connected(),
            (None, Some(hub)) => hub.is_active(),
            (None, None) => false,
        }
    }

    /// The broker connection's generation, if connected (direct mode).
    pub(crate) fn broker_generation(&self) -> Option<u64> {
        self.broker
            .as_ref()
            .and_then(|b| b.current())
            .map(|l| l.generation)
    }

    /// `peer`'s "transfer rejected" log line: at most one per 10 s.
    pub(crate) fn rejection_log(&self, peer: &Arc<str>) -> Arc<drawbridge_runtime::lograte::Every> {
        let mut logs = self
            .rejection_logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        logs.entry(peer.clone())
            .or_insert_with(|| {
                Arc::new(drawbridge_runtime::lograte::Every::new(
                    std::time::Duration::from_secs(10),
                ))
            })
            .clone()
    }

    /// The AMQP 1.0 engine's settings for a peer connection: the float's limits, announced
    /// to the peer and enforced by the engine (a peer that breaks one loses the connection).
    /// Links are limited per session by the engine and per connection by the connection's
    /// task (`max_links_per_connection` both).
    pub(crate) fn engine_config(&self) -> drawbridge_amqp::connection::Config {
        drawbridge_amqp::connection::Config {
            container_id: format!("drawbridge-float-{}", std::process::id()),
            hostname: None,
            max_frame_size: connection::MAX_FRAME,
            max_sessions: self.cfg.max_sessions_per_connection,
            max_links_per_session: self.cfg.max_links_per_connection,
            idle_timeout: self.cfg.idle_timeout,
            min_peer_idle_timeout: self.cfg.min_peer_idle_timeout,
            max_message_size: connection::announced_max_message_size(self.cfg.max_message_size),
            sasl_external: true,
            ..drawbridge_amqp::connection::Config::default()
        }
    }

    /// A receiver whose `changed()` completes whenever the CRLs in force change (a file
    /// reloaded, a URL fetched, a CRL past its `nextUpdate`). Each established connection
    /// holds one and, on a change, calls [`Ctx::revoked_peer`] with its peer's chain.
    pub(crate) fn crl_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocation.subscribe()
    }

    /// The re-check state of a connected client presenting `chain` (leaf first, as
    /// `tls.get_ref().1.peer_certificates()` gives it), kept for the connection's life.
    pub(crate) fn established_peer(&self, chain: Vec<CertificateDer<'static>>) -> EstablishedPeer {
        self.revocation.established(chain, PeerRole::Client)
    }

    /// Why a connected peer must be disconnected now (revoked, or a certificate of its
    /// chain expired), if it must. Its chain is verified again only when the answer can
    /// have changed (a CRL change, a `notAfter` passed), not per session it begins; each
    /// verification counts in `drawbridge_float_peer_verifications_total`.
    pub(crate) fn recheck_peer(&self, peer: &mut EstablishedPeer) -> Option<PeerRefusal> {
        let before = peer.verifications();
        let verdict = peer.check();
        let ran = peer.verifications().saturating_sub(before);
        if ran > 0 {
            metrics::counter!("drawbridge_float_peer_verifications_total").increment(ran);
        }
        verdict
    }
}

impl AdminState for Ctx {
    fn ready(&self) -> bool {
        self.upstream_ready()
            && self
                .window
                .as_ref()
                .is_none_or(|w| w.ready_on(self.broker_generation()))
    }

    fn live(&self) -> Result<(), String> {
        self.service.live()
    }

    fn summary(&self) -> String {
        match (self.ready(), self.tunnel.is_some()) {
            (true, _) => format!("serving peers on {}", self.cfg.listen),
            (false, false) => format!("broker unreachable: refusing peers on {}", self.cfg.listen),
            (false, true) => format!("no active bridge: refusing peers on {}", self.cfg.listen),
        }
    }

    fn status(&self) -> serde_json::Value {
        let conns: Vec<_> = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        serde_json::json!({
            "role": "float",
            "ready": self.ready(),
            "mode": if self.tunnel.is_some() { "tunnel" } else { "direct" },
            "broker": self.broker.as_ref().and_then(|b| b.current()).map(|l| l.uri.clone()),
            "tunnel": self.tunnel.as_ref().map(|h| h.status()),
            "listen": self.cfg.listen.to_string(),
            "identities": self.identities.iter().map(|(n, q)| serde_json::json!({"legal_name": n.to_string(), "inbox": q})).collect::<Vec<_>>(),
            "connections": conns,
            "pending_handshakes": self.admission.in_use().0,
            "recent_peer_addresses": self.admission.known_addresses(),
            "publish_channels_open": self.channels.open(),
            "accepted": self.stats.accepted.load(Ordering::Relaxed),
            "rejected": self.stats.rejected.load(Ordering::Relaxed),
            "released": self.stats.released.load(Ordering::Relaxed),
            "duplicates_suppressed": self.stats.duplicates_suppressed.load(Ordering::Relaxed),
            "duplicates_passed": self.stats.duplicates_passed.load(Ordering::Relaxed),
            "bytes_in_flight": self.pool.in_flight(),
            "budget_holds": self.stats.budget_holds.load(Ordering::Relaxed),
            "dedup_window": self.dedup.len(),
            "dedup_in_flight": self.dedup.in_flight(),
            "window": match &self.window {
                Some(w) => w.status(self.broker_generation()),
                None => serde_json::json!({"mode": "memory"}),
            },
            "tls": self.tls.status(),
            "revocation": {
                "mode": self.revocation.mode().as_str(),
                "generation": self.revocation.generation(),
                "crls": self.revocation.describe_crls(),
            },
        })
    }
}

pub use drawbridge_runtime::daemon::StartError;

/// A started float.
#[derive(Debug)]
pub struct RunningFloat {
    /// Where peers connect.
    pub listen_addr: SocketAddr,
    /// Where bridges connect (tunnel mode).
    pub tunnel_addr: Option<SocketAddr>,
    /// Admin port, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Completes when the float has drained after `shutdown`.
    pub done: JoinHandle<()>,
}

/// Start the float: load TLS material, connect to the broker, listen. Runs until
/// `shutdown` is cancelled, then stops accepting and drains within `drain_grace`.
pub async fn start(
    cfg: FloatConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<RunningFloat, StartError> {
    start_with_service(cfg, metrics, shutdown, Service::disabled()).await
}

/// [`start`] under a service manager: `READY=1` once listening with the broker connected,
/// `STATUS=` on changes, `STOPPING=1` on `shutdown`, and watchdog pings only while the
/// accept loop runs and the broker session supervisor lives (see `sd_notify`).
pub async fn start_with_service(
    cfg: FloatConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
    service: Service,
) -> Result<RunningFloat, StartError> {
    let (tls, revocation, own_name, hub) = match &cfg.tunnel {
        None => {
            let source = TlsSource {
                cert: cfg.tls_cert.clone(),
                key: cfg.tls_key.clone(),
                trust_roots: cfg.trust_roots.clone(),
                key_access: cfg.key_access,
                reload_interval: cfg.tls_reload_interval,
            };
            let material = TlsMaterial::load(&source)?;
            // The acceptor's verifier asks `revocation` for the roots and CRLs in force at
            // each handshake: a reloaded CRL file (or a fetched URL) or trust-roots file
            // applies to the next connection, no restart.
            let revocation = drawbridge_runtime::revocation::start(
                material.roots.clone(),
                cfg.revocation.clone(),
            )?;
            let own_name = material.legal_name.clone();
            let policy = cfg.tls_policy;
            let tls = TlsReload::new(
                "drawbridge_float_tls_reload_total",
                source,
                material,
                revocation.clone(),
                move |identity, revocation| {
                    drawbridge_certs::server_config_with(identity, revocation, policy)
                },
            )?;
            // SIGHUP and file changes reload the TLS material; stops with the float.
            tls.spawn(shutdown.clone());
            (PeerTls::Reload(tls), revocation, own_name, None)
        }
        Some(t) => {
            // No key: the chain alone, its signatures made by the active bridge.
            let chain = drawbridge_certs::load_cert_chain(&cfg.tls_cert)?;
            let leaf = chain.first().cloned().ok_or_else(|| {
                drawbridge_certs::CertError::NoCertificates {
                    path: cfg.tls_cert.clone(),
                }
            })?;
            let roots = drawbridge_certs::load_trust_roots(&cfg.trust_roots)?;
            let revocation = drawbridge_runtime::revocation::start(roots, cfg.revocation.clone())?;
            let own_name = drawbridge_certs::peer_legal_name(&chain)?;
            let cert = drawbridge_certs::CertInfo::of(&leaf)?;
            let hub = Arc::new(tunnel::Hub::new(
                leaf.to_vec(),
                t.sign_timeout,
                t.outcome_timeout,
            ));
            let key = tunnel::RemoteKey::new(hub.clone(), &leaf)
                .map_err(|e| StartError::Tls(drawbridge_certs::CertError::Verifier(e)))?;
            let config =
                drawbridge_certs::server_config_remote_key(chain, Arc::new(key), &revocation)?;
            (
                PeerTls::Remote { config, cert },
                revocation,
                own_name,
                Some(hub),
            )
        }
    };
    let identities: Vec<(LegalName, String)> = if cfg.identities.is_empty() {
        vec![(own_name.clone(), cfg.default_inbox.clone())]
    } else {
        cfg.identities
            .iter()
            .map(|i| (i.legal_name.clone(), i.inbox.clone()))
            .collect()
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let listen_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;

    let inboxes: Vec<String> = identities.iter().map(|(_, q)| q.clone()).collect();
    let queue_type = cfg.inbox_queue_type;
    let retention = cfg.stream_retention.clone();
    let declare = cfg.declare_inboxes;
    let exchange = cfg.inbox_exchange.clone();
    let canary_queue = cfg.canary_queue.clone();
    let canary_ready = Arc::new(AtomicBool::new(false));
    let canary_flag = canary_ready.clone();
    let window = (queue_type == QueueType::Stream && cfg.broker.is_some())
        .then(|| window::StreamWindow::new(inboxes.clone(), cfg.max_message_size));
    let setup: Setup = Arc::new(move |live: Arc<Live>| {
        let inboxes = inboxes.clone();
        let retention = retention.clone();
        let exchange = exchange.clone();
        let canary_queue = canary_queue.clone();
        let canary_flag = canary_flag.clone();
        Box::pin(async move {
            if !canary_queue.is_empty() {
                canary_flag.store(
                    declare_canary_queue(&live, &canary_queue, &exchange).await,
                    Ordering::Relaxed,
                );
            }
            if !declare && exchange.is_empty() {
                return Ok(());
            }
            let ch = live
                .conn
                .create_channel()
                .await
                .map_err(|e| e.to_string())?;
            for q in &inboxes {
                if declare {
                    ch.queue_declare(
                        ShortString::from(q.as_str()),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        topology::inbox_args(queue_type, &retention),
                    )
                    .await
                    .map_err(|e| format!("declaring inbox `{q}`: {e}"))?;
                }
                // Bound on every connect: the binding is what routes to the inbox, also
                // when the node declares the inboxes itself.
                if !exchange.is_empty() {
                    topology::bind_to_direct(&ch, &exchange, q)
                        .await
                        .map_err(|e| format!("binding inbox `{q}` to `{exchange}`: {e}"))?;
                }
            }
            let _ = ch.close(200, "setup done".into()).await;
            Ok(())
        })
    });
    let broker_shutdown = CancellationToken::new();
    let broker = cfg.broker.clone().map(|broker_cfg| {
        BrokerSession::start(
            broker_cfg,
            "drawbridge-float",
            setup,
            broker_shutdown.clone(),
        )
    });
    if let Some(broker) = &broker {
        let supervisor = broker.clone();
        service.watch_task("broker session", move || supervisor.supervisor_running());
    }
    // Tunnel mode: the bridges' listener, apart from the peers'. It outlives the peers'
    // connections on shutdown, so that what they have in flight can still be answered.
    let tunnel_shutdown = CancellationToken::new();
    let tunnel_addr = match (&cfg.tunnel, &hub) {
        (Some(t), Some(hub)) => {
            let identity =
                drawbridge_certs::TlsIdentity::load_with(&t.tls_cert, &t.tls_key, cfg.key_access)?;
            let roots = drawbridge_certs::load_trust_roots(&t.trust_roots)?;
            let tls = drawbridge_certs::server_config_with(
                &identity,
                &drawbridge_certs::Revocation::off(roots)?,
                drawbridge_certs::TlsPolicy::Tls13Only,
            )?;
            let listener = tokio::net::TcpListener::bind(t.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: t.listen,
                    source,
                })?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                addr: t.listen,
                source,
            })?;
            let server = tunnel::TunnelServer {
                tls,
                bridges: t.bridges.clone(),
                max_message_size: usize::try_from(connection::announced_max_message_size(
                    cfg.max_message_size,
                ))
                .unwrap_or(usize::MAX),
                float_id: format!("{}:{}", own_name, listen_addr),
            };
            info!(tunnel_listen = %addr, bridges = ?t.bridges.iter().map(ToString::to_string).collect::<Vec<_>>(), "tunnel listener up: waiting for a bridge to activate this float");
            tokio::spawn(tunnel::serve(
                listener,
                server,
                hub.clone(),
                tunnel_shutdown.clone(),
            ));
            Some(addr)
        }
        _ => None,
    };
    let heartbeat = service.heartbeat("accept loop");
    let ctx = Arc::new(Ctx {
        dedup: Dedup::new(cfg.dedup_capacity, cfg.dedup_max_age),
        window: window.clone(),
        pool: budget::Pool::new(cfg.max_bytes_in_flight),
        admission: admission::Admission::new(admission::Limits {
            pending: cfg.max_pending_handshakes,
            pending_per_address: cfg.max_pending_handshakes_per_address,
            pending_per_prefix: cfg.max_pending_handshakes_per_prefix,
            prefixes: admission::Prefixes {
                v4: cfg.pending_prefix_ipv4,
                v6: cfg.pending_prefix_ipv6,
            },
            reserved_for_recent: cfg.pending_reserved_for_recent,
            handshake_timeout: cfg.handshake_timeout,
            handshake_timeout_under_pressure: cfg.handshake_timeout_under_pressure,
            recent_capacity: cfg.recent_peers,
            recent_ttl: cfg.recent_peer_ttl,
            connections: cfg.max_connections,
            per_peer: cfg.max_connections_per_peer,
            per_address: cfg.max_connections_per_address,
        }),
        channels: publisher::Channels::new(cfg.publish_channels),
        tls,
        broker,
        tunnel: hub,
        stats: Stats::default(),
        identities: Identities::new(identities),
        connections: Mutex::new(HashMap::new()),
        revocation,
        service: service.clone(),
        canary_ready,
        rejection_logs: Mutex::default(),
        cfg,
    });
    let admin_addr =
        admin::serve_if_configured(ctx.cfg.admin_listen, ctx.clone(), metrics, shutdown.clone())
            .await?;
    info!(listen = %listen_addr, admin = ?admin_addr, identities = ?ctx.identities.iter().map(|(n, q)| format!("{n} -> {q}")).collect::<Vec<_>>(), "float listening");
    if let (Some(w), Some(broker)) = (&window, &ctx.broker) {
        tokio::spawn(w.clone().run(
            broker.clone(),
            ctx.dedup.clone(),
            ctx.cfg.inbox_exchange.clone(),
            ctx.cfg.dedup_max_age,
            broker_shutdown.clone(),
        ));
    }
    service.spawn(ctx.clone(), shutdown.clone());
    let done = tokio::spawn(async move {
        listener::serve(listener, ctx.clone(), shutdown, heartbeat).await;
        // Links are settled; now the broker connection (or the tunnels) can close.
        broker_shutdown.cancel();
        tunnel_shutdown.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        info!("float stopped");
    });
    Ok(RunningFloat {
        listen_addr,
        tunnel_addr,
        admin_addr,
        done,
    })
}

/// Declare the canary queue `queue` (transient, classic, at most 100 probes of at most a
/// minute, so it never grows) and bind it to `exchange`, on a channel of its own: a refusal
/// (e.g. broker permissions from before the canary) closes only that channel. Returns
/// whether probes can be published; a refusal is logged with the reason and the float
/// serves peers all the same.
async fn declare_canary_queue(live: &Live, queue: &str, exchange: &str) -> bool {
    let declared = async {
        let ch = live.conn.create_channel().await?;
        let mut args = FieldTable::default();
        for (k, v) in [
            (
                "x-queue-type",
                AMQPValue::LongString(LongString::from("classic")),
            ),
            ("x-max-length", AMQPValue::LongInt(100)),
            (
                "x-overflow",
                AMQPValue::LongString(LongString::from("drop-head")),
            ),
            ("x-message-ttl", AMQPValue::LongInt(60_000)),
        ] {
            args.insert(ShortString::from(k), v);
        }
        ch.queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: false,
                ..Default::default()
            },
            args,
        )
        .await?;
        if !exchange.is_empty() {
            topology::bind_to_direct(&ch, exchange, queue).await?;
        }
        let _ = ch.close(200, "canary queue ready".into()).await;
        Ok::<_, lapin::Error>(())
    };
    // The whole setup runs under `broker.op_timeout` (see `BrokerSession`).
    match declared.await {
        Ok(()) => true,
        Err(e) => {
            warn!(queue = %queue, reason = %e, "cannot declare the canary queue; link canaries are refused (set float.canary_queue = \"\" to turn them off, or grant the float configure and write on it)");
            false
        }
    }
}
