//! `drawbridge-bridge`: the inside-the-firewall side of Drawbridge.
//!
//! Reads the node's control protocol from the broker, runs one outbound mTLS AMQP 1.0
//! link per peer queue, forwards each queue's messages, and acks the broker only after
//! the peer accepted. See `link` for the delivery rules.
#![forbid(unsafe_code)]

mod args;
pub mod budget;
mod canary;
pub mod config;
mod control;
pub mod dead_letter;
pub mod ha;
pub mod link;
mod members;
mod notify;
pub mod peer;
pub mod rotation;
mod session;
pub mod settle;
mod tunnel;
pub mod view;
mod window;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use drawbridge_certs::{LegalName, Revocation};
use drawbridge_control_protocol::Notification;
use drawbridge_runtime::{
    admin::{self, AdminState},
    broker::{BrokerSession, Setup},
    tls_reload::{TlsMaterial, TlsReload, TlsSource},
    watchdog::{Heartbeat, Service},
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

pub use args::Args;
pub use config::BridgeConfig;

/// Shared state of a running bridge: plain data. What acts on it lives with its users
/// (`link::settings`, `notify::link_status`, `control::request_snapshot`).
pub(crate) struct Ctx {
    cfg: BridgeConfig,
    /// Our certificate chain and key in force (reloaded on SIGHUP and file changes): each
    /// link builds its client configuration from it, again when its generation moves.
    tls: TlsReload<()>,
    /// The node whose control messages are obeyed: `bridge.node_identity`, or the legal name
    /// of our own certificate.
    node_identity: LegalName,
    /// Control messages refused (wrong user, wrong node, outside the prefix, undecodable).
    control_refused: AtomicU64,
    /// The control queue is bound and consumed on the current broker connection.
    control_consuming: AtomicBool,
    /// A snapshot from the node was applied on this broker session since this bridge last
    /// became active (or, for a standby, since the session started): the wanted link set is
    /// the node's, not a guess. Part of `/readyz?converged`.
    snapshot_applied: AtomicBool,
    /// Trust roots, CRLs in force (reloaded in the background) and their change signal:
    /// every link's verifier checks floats against them, and links re-check their float
    /// when they change.
    revocation: Revocation,
    broker: BrokerSession,
    views: Mutex<BTreeMap<String, view::SharedView>>,
    notify: mpsc::Sender<Notification>,
    /// Process-wide budget of bytes sent and not yet settled, in KiB permits (see `budget`).
    bytes_in_flight: Arc<tokio::sync::Semaphore>,
    /// Its size in KiB.
    bytes_total_kib: u32,
    /// Leader election between bridges of this node (see `ha`): links run only while active.
    ha: ha::Ha,
    /// Queues of the links the node wants (kept by a standby too), for `/status`.
    wanted: Mutex<Vec<String>>,
    /// The control loop's proof of life for the systemd watchdog (see `sd_notify`): beaten
    /// on every iteration and idle tick, pushed ahead before each bounded wait.
    heartbeat: Heartbeat,
    /// What `/healthz` asks whether the work loops run (the systemd watchdog's verdict).
    service: Service,
    /// Tunnel mode: each float's tunnel as `/status` shows it, by float address.
    tunnels: Mutex<BTreeMap<String, tunnel::TunnelView>>,
}

impl AdminState for Ctx {
    /// Broker connected and control messages consumed: a control message published once the
    /// bridge is ready is not missed (its control queue is exclusive to this instance and bound
    /// only when the session starts). Besides, the bridge is active, or a standby ready to take
    /// over (contending for the lock, not holding off after a step-down); a bridge stepping
    /// down or without a broker is not ready.
    fn ready(&self) -> bool {
        self.broker.is_connected()
            && self.control_consuming.load(Ordering::Relaxed)
            && match self.ha.current() {
                ha::HaState::Active => true,
                ha::HaState::Standby => !self.ha.holding_off(),
                ha::HaState::SteppingDown | ha::HaState::Disconnected => false,
            }
    }

    /// `?converged`: an active bridge has applied a snapshot of the node since it became
    /// active and runs a link for each wanted queue (and nothing else); a standby is ready to
    /// take over. `?links`: that, and every running link up and, with `canary_interval` set,
    /// its last canary answered within three intervals.
    fn readiness(&self, question: admin::Readiness) -> Result<String, String> {
        if !self.ready() {
            return Err(self.summary());
        }
        let state = self.ha.current();
        if question == admin::Readiness::Serving || state != ha::HaState::Active {
            return Ok(format!("ready: {}", state.as_str()));
        }
        if !self.snapshot_applied.load(Ordering::Relaxed) {
            return Err("active, waiting for the node's snapshot".to_string());
        }
        let views: Vec<view::LinkView> = self
            .views
            .lock()
            .expect("poisoned")
            .values()
            .map(|v| v.lock().expect("poisoned").clone())
            .collect();
        let running: Vec<&str> = views.iter().map(|v| v.queue.as_str()).collect();
        // Hot-hot: the wanted links this instance owns and runs or is to start (the rule of
        // `control::Links::converge`).
        let owners = self.ha.hot.owners();
        let wanted: Vec<String> = self
            .wanted
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|q| owners.may_start(q) || (owners.mine(q) && running.contains(&q.as_str())))
            .cloned()
            .collect();
        if running != wanted.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(format!(
                "active, links not converged: wanted {wanted:?}, running {running:?}"
            ));
        }
        if question == admin::Readiness::Converged {
            return Ok(format!("ready: active, {} links converged", views.len()));
        }
        let now = drawbridge_runtime::daemon::unix_ms();
        let unusable: Vec<String> = views
            .iter()
            .filter_map(|v| {
                v.unusable(now, self.cfg.canary_interval)
                    .map(|why| format!("{}: {why}", v.queue))
            })
            .collect();
        if unusable.is_empty() {
            Ok(format!("ready: active, {} links up", views.len()))
        } else {
            Err(format!("active, links not usable: {}", unusable.join("; ")))
        }
    }

    fn admin_token(&self) -> Option<&drawbridge_runtime::broker::Secret> {
        self.cfg.admin_token.as_ref()
    }

    fn step_down(&self) -> admin::StepDownFuture {
        self.ha.step_down()
    }

    fn live(&self) -> Result<(), String> {
        self.service.live()
    }

    fn summary(&self) -> String {
        if !self.broker.is_connected() {
            "waiting for the broker".to_string()
        } else if !self.control_consuming.load(Ordering::Relaxed) {
            "waiting for the control queue".to_string()
        } else {
            let links = self.views.lock().expect("poisoned").len();
            match self.ha.current() {
                ha::HaState::Active => format!("ready: {links} links"),
                // Says "standby", not the reason: the line must not change at every attempt.
                other => other.as_str().to_string(),
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let links: Vec<view::LinkView> = self
            .views
            .lock()
            .expect("poisoned")
            .values()
            .map(|v| v.lock().expect("poisoned").clone())
            .collect();
        let mut ha = self.ha.status();
        let owners = self.ha.hot.owners();
        if owners.shared() {
            let wanted = self.wanted.lock().expect("poisoned");
            ha["owners"] = wanted
                .iter()
                .map(|q| (q.clone(), owners.owner(q).unwrap_or_default().into()))
                .collect::<serde_json::Map<String, serde_json::Value>>()
                .into();
        }
        serde_json::json!({
            "role": "bridge",
            "id": self.cfg.id,
            "ready": self.ready(),
            "converged": self.readiness(admin::Readiness::Converged).is_ok(),
            "ha_state": self.ha.current().as_str(),
            "ha": ha,
            "tunnels": self.tunnels.lock().expect("poisoned").values().collect::<Vec<_>>(),
            "wanted_links": *self.wanted.lock().expect("poisoned"),
            "broker": self.broker.current().map(|l| l.uri.clone()),
            "node_identity": self.node_identity.to_string(),
            "control_user": self.cfg.node_user,
            "control_refused": self.control_refused.load(Ordering::Relaxed),
            "links": links,
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

/// A started bridge.
#[derive(Debug)]
pub struct RunningBridge {
    /// Admin port, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Completes when the bridge has drained after `shutdown`.
    pub done: JoinHandle<()>,
}

/// Start the bridge. Runs until `shutdown`, then drains links within `drain_grace`.
pub async fn start(
    cfg: BridgeConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<RunningBridge, StartError> {
    start_with_service(cfg, metrics, shutdown, Service::disabled()).await
}

/// [`start`] under a service manager: `READY=1` once ready (broker connected, control
/// queue consumed), `STATUS=` on changes, `STOPPING=1` on `shutdown`, and watchdog pings
/// only while the control loop runs and the broker session supervisor lives.
pub async fn start_with_service(
    cfg: BridgeConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
    service: Service,
) -> Result<RunningBridge, StartError> {
    let source = TlsSource {
        cert: cfg.tls_cert.clone(),
        key: cfg.tls_key.clone(),
        trust_roots: cfg.trust_roots.clone(),
        key_access: cfg.key_access,
        reload_interval: cfg.tls_reload_interval,
    };
    let material = TlsMaterial::load(&source)?;
    let revocation =
        drawbridge_runtime::revocation::start(material.roots.clone(), cfg.revocation.clone())?;
    let node_identity = match &cfg.node_identity {
        Some(n) => n.clone(),
        None => material.legal_name.clone(),
    };
    // Links build their own client configurations (each pins its peers' names); building
    // one here with our own name as the pin proves rustls takes a new key before it is
    // swapped in.
    let own_name = material.legal_name.clone();
    let policy = cfg.tls_policy;
    let tls = TlsReload::new(
        "drawbridge_bridge_tls_reload_total",
        source,
        material,
        revocation.clone(),
        move |identity, revocation| {
            drawbridge_certs::client_config_with(
                identity,
                revocation,
                vec![own_name.clone()],
                policy,
            )
            .map(drop)
        },
    )?;
    tls.spawn(shutdown.clone());
    match &cfg.node_user {
        Some(user) => {
            info!(node_user = %user, node_identity = %node_identity, "control messages are obeyed only from this broker user and node")
        }
        None => error!(
            node_identity = %node_identity,
            "INSECURE: insecure_accept_any_control_user is set: ANY broker user who can publish to the control exchange can create links to floats of its choosing and stop every link; set bridge.node_user"
        ),
    }
    // Each link declares the dead-letter queue itself before it consumes (see
    // `dead_letter`), so the connection setup has nothing to declare.
    let setup: Setup = Arc::new(|_live| Box::pin(async { Ok(()) }));
    let broker_shutdown = CancellationToken::new();
    let broker = BrokerSession::start(
        cfg.broker.clone(),
        &format!("drawbridge-bridge {}", cfg.id),
        setup,
        broker_shutdown.clone(),
    );
    let group = cfg.ha.group.clone().unwrap_or_else(|| node_identity.slug());
    // Hot-hot: the members' fanout takes the lock queue's place in `/status`.
    let lock_queue = match cfg.ha.mode {
        config::HaMode::HotHot => members::exchange_name(&group),
        _ => ha::lock_queue_name(cfg.ha.lock_queue.as_deref(), &group),
    };
    let (ha, ha_requests) = ha::Ha::new(cfg.ha.mode, lock_queue, &cfg.id);
    let supervisor = broker.clone();
    service.watch_task("broker session", move || supervisor.supervisor_running());
    let (tx, rx) = mpsc::channel(1024);
    let bytes_total_kib = u32::try_from(cfg.max_bytes_in_flight / 1024).unwrap_or(u32::MAX);
    let ctx = Arc::new(Ctx {
        bytes_in_flight: Arc::new(tokio::sync::Semaphore::new(bytes_total_kib as usize)),
        bytes_total_kib,
        cfg,
        tls,
        node_identity,
        control_refused: AtomicU64::new(0),
        control_consuming: AtomicBool::new(false),
        snapshot_applied: AtomicBool::new(false),
        revocation,
        broker,
        views: Mutex::new(BTreeMap::new()),
        notify: tx,
        ha,
        wanted: Mutex::new(Vec::new()),
        heartbeat: service.heartbeat("control loop"),
        service: service.clone(),
        tunnels: Mutex::default(),
    });
    let admin_addr =
        admin::serve_if_configured(ctx.cfg.admin_listen, ctx.clone(), metrics, shutdown.clone())
            .await?;
    info!(id = %ctx.cfg.id, admin = ?admin_addr, "bridge starting");
    service.spawn(ctx.clone(), shutdown.clone());
    let notifier = tokio::spawn(control::notifier(ctx.clone(), rx));
    // Tunnel mode: a tunnel to each float, activated while this bridge is the active one.
    tunnel::start(ctx.clone(), shutdown.clone())?;
    if ctx.ha.mode == config::HaMode::HotHot {
        tokio::spawn(members::run(
            ctx.clone(),
            group,
            ha_requests,
            shutdown.clone(),
        ));
    } else if ctx.ha.enabled {
        info!(lock = %ctx.ha.lock_queue, "high availability on: contending for the lock queue");
        tokio::spawn(ha::run(ctx.clone(), ha_requests, shutdown.clone()));
    } else {
        info!("high availability off (bridge.ha = false): this bridge is always active");
    }
    let done = tokio::spawn(async move {
        control::run(ctx.clone(), shutdown).await;
        notifier.abort();
        broker_shutdown.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        info!("bridge stopped");
    });
    Ok(RunningBridge { admin_addr, done })
}
