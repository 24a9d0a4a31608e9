//! The local admin HTTP port: `/healthz`, `/readyz`, `/metrics`, `/status`.
//!
//! Liveness means the daemon's work loops run ([`AdminState::live`]: the same heartbeats the
//! systemd watchdog pings from). Readiness is each daemon's
//! [`AdminState::ready`]: for both the float and the bridge it is "connected to its broker"
//! (the float refuses peers without one, so a load balancer routes away). The bridge's
//! readiness says nothing about its links — it is ready before the node's first snapshot
//! arrives and while peers are unreachable; `/status` shows each link's state. With leader
//! election, a standby bridge is ready when it could take over (see the bridge's `ha`).
//!
//! Stricter questions are asked with a query: `/readyz?converged` (the bridge: active with the
//! node's snapshot applied and every wanted link started, or a standby ready to take over)
//! and `/readyz?links` (that, and every link up and, with canaries on, its last probe answered
//! in time). They are for scripts and for operators (a rolling upgrade waits for
//! `?converged`); a service manager uses the plain `/readyz`, which does not depend on the
//! node or on peers, so a bridge whose node or peers are down is not restarted for it. See
//! [`Readiness`].
//!
//! `POST /step-down` asks a daemon that supports it (the bridge, see its `ha` module) to
//! hand over its work. It changes what the daemon does, so unlike the read-only endpoints
//! it needs `Authorization: Bearer <token>`, the token being the content of
//! `admin.token_file`; without a token file the endpoint does not exist (404).

use std::{net::SocketAddr, sync::Arc};

use std::{future::Future, pin::Pin, time::Duration};

use axum::{
    extract::State,
    http::{header::AUTHORIZATION, HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
    Json, Router,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::broker::Secret;

/// What `POST /step-down` did.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDown {
    /// The daemon handed over its work and will not take it back for `hold_off`.
    Done {
        /// How long it stays away from the election.
        hold_off: Duration,
    },
    /// There was nothing to hand over (a standby): 409.
    NotActive(String),
    /// The daemon has no such operation: 404.
    Unsupported,
    /// The hand-over did not complete (the reason is logged too): 500.
    Failed(String),
}

/// The future a [`AdminState::step_down`] returns.
pub type StepDownFuture = Pin<Box<dyn Future<Output = StepDown> + Send>>;

/// Which readiness question `/readyz` asks (its query string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `/readyz`: [`AdminState::ready`].
    Serving,
    /// `/readyz?converged`: doing what it was asked to (the bridge: links converged).
    Converged,
    /// `/readyz?links`: converged and every link usable end to end.
    Links,
}

impl Readiness {
    /// From `/readyz`'s query string (`None`: no query). An unknown question is an error,
    /// not the plain one: a typo must not make a script believe something was checked.
    pub fn from_query(query: Option<&str>) -> Result<Self, String> {
        match query.unwrap_or("").split('=').next().unwrap_or("") {
            "" => Ok(Readiness::Serving),
            "converged" => Ok(Readiness::Converged),
            "links" => Ok(Readiness::Links),
            other => Err(format!(
                "unknown readiness question `{other}` (ask /readyz, /readyz?converged or /readyz?links)"
            )),
        }
    }
}

/// What the daemon exposes to the admin port.
pub trait AdminState: Send + Sync + 'static {
    /// Ready to do work?
    fn ready(&self) -> bool;
    /// The answer to a [`Readiness`] question: `Ok` with a short line saying what holds,
    /// `Err` saying what does not. Default: every question is [`AdminState::ready`] (a
    /// daemon without links to converge).
    fn readiness(&self, question: Readiness) -> Result<String, String> {
        let _ = question;
        if self.ready() {
            Ok("ready".to_string())
        } else {
            Err("not ready".to_string())
        }
    }
    /// Per-component status as JSON (links, connections, counters).
    fn status(&self) -> serde_json::Value;
    /// The bearer token that authorizes state-changing requests (`admin.token_file`);
    /// `None` turns those endpoints off.
    fn admin_token(&self) -> Option<&Secret> {
        None
    }
    /// Hand over the daemon's work (`POST /step-down`); only a daemon with an election has
    /// something to hand over.
    fn step_down(&self) -> StepDownFuture {
        Box::pin(std::future::ready(StepDown::Unsupported))
    }
    /// Alive? `Err` names what is wedged (a work loop silent too long, a vital task ended):
    /// `/healthz` then answers 503, so an external watchdog (`scripts/watchdog.sh`) sees what
    /// systemd's watchdog sees. Default: alive while the admin port answers.
    fn live(&self) -> Result<(), String> {
        Ok(())
    }
    /// One short line for the service manager (`systemctl status`); sent again whenever
    /// it changes, so it must not change with every message.
    fn summary(&self) -> String {
        if self.ready() { "ready" } else { "not ready" }.to_string()
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<dyn AdminState>,
    metrics: Option<PrometheusHandle>,
}

/// Buckets of the histograms whose time comes from a message's AMQP 0-9-1 `timestamp`
/// (whole seconds, the sender's clock): how old a message is when the peer accepts it. One
/// second is their resolution, so they tell queueing (a peer down, a backlog) from normal
/// flow, not the path's milliseconds; the link canary's round trip measures those.
pub const AGE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

/// Buckets of round-trip histograms (the link canary: bridge → float → float's broker and
/// back), from 1 ms to 30 s.
pub const RTT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Install the Prometheus recorder for the `metrics` facade (once per process). Histograms
/// named `*_age_seconds` and `*_rtt_seconds` get [`AGE_BUCKETS`] and [`RTT_BUCKETS`] (the
/// exporter renders other histograms as summaries).
pub fn install_metrics() -> Option<PrometheusHandle> {
    use metrics_exporter_prometheus::Matcher;
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_age_seconds".into()), AGE_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Suffix("_rtt_seconds".into()), RTT_BUCKETS)
        .ok()?
        .install_recorder()
        .ok()
}

/// [`install_metrics`] for `daemon`, with every metric it exports described (`# HELP`),
/// `drawbridge_build_info` set and the process metrics on ([`crate::metrics_catalog`]).
pub fn install_metrics_for(daemon: crate::metrics_catalog::Daemon) -> Option<PrometheusHandle> {
    let handle = install_metrics()?;
    crate::metrics_catalog::describe(daemon);
    Some(handle)
}

/// Serve the admin port on `addr` until `shutdown`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<dyn AdminState>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let shared = Shared { state, metrics };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(render_metrics))
        .route("/step-down", post(step_down))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "admin server stopped");
        }
    });
    Ok(bound)
}

/// Serve the admin port if `addr` is configured; `None` when it is disabled.
pub async fn serve_if_configured(
    addr: Option<SocketAddr>,
    state: Arc<dyn AdminState>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, crate::daemon::StartError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    serve(addr, state, metrics, shutdown)
        .await
        .map(Some)
        .map_err(|source| crate::daemon::StartError::Bind { addr, source })
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    match s.state.live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(State(s): State<Shared>, uri: axum::http::Uri) -> impl IntoResponse {
    let question = match Readiness::from_query(uri.query()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match s.state.readiness(question) {
        Ok(line) => (StatusCode::OK, format!("{line}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn status(State(s): State<Shared>) -> impl IntoResponse {
    Json(s.state.status())
}

async fn render_metrics(State(s): State<Shared>) -> impl IntoResponse {
    match s.metrics {
        Some(h) => {
            crate::metrics_catalog::collect_process();
            (StatusCode::OK, h.render())
        }
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".to_string(),
        ),
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>`. Both sides are hashed first and
/// the digests compared in constant time, so neither the token's bytes nor its length leak
/// through the time a refusal takes.
fn authorized(headers: &HeaderMap, token: &Secret) -> bool {
    let Some(given) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let given = Sha256::digest(given.trim().as_bytes());
    let want = Sha256::digest(token.expose().as_bytes());
    given.ct_eq(&want).into()
}

async fn step_down(State(s): State<Shared>, headers: HeaderMap) -> impl IntoResponse {
    let Some(token) = s.state.admin_token() else {
        return (
            StatusCode::NOT_FOUND,
            "step-down is off: no admin.token_file configured\n".to_string(),
        );
    };
    if !authorized(&headers, token) {
        tracing::warn!("admin request refused: missing or wrong bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token\n".to_string(),
        );
    }
    match s.state.step_down().await {
        StepDown::Done { hold_off } => (
            StatusCode::OK,
            format!("stepped down; not contending for {hold_off:?}\n"),
        ),
        StepDown::NotActive(why) => (StatusCode::CONFLICT, format!("not active: {why}\n")),
        StepDown::Unsupported => (
            StatusCode::NOT_FOUND,
            "this daemon has nothing to step down from\n".to_string(),
        ),
        StepDown::Failed(why) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("step-down failed: {why}\n"),
        ),
    }
}

/// Why [`fetch`] got no answer from an admin port.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting, sending or reading the answer failed, or the answer is not HTTP.
    #[error("admin request to {addr}: {source}")]
    Request {
        /// The admin address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: Box<ureq::Error>,
    },
    /// No complete answer within the deadline.
    #[error("admin request to {0} timed out")]
    Timeout(SocketAddr),
    /// The blocking request task could not be run to its end.
    #[error("admin request to {0} was cancelled")]
    Cancelled(SocketAddr),
}

/// The admin address every operator tool takes when none is given (`--admin`,
/// `DRAWBRIDGE_ADMIN`): the bridge's admin port in the example configuration.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9101";

/// An admin port as operators write it, the same everywhere (`drawbridge status`,
/// `drawbridge step-down`, `scripts/watchdog.sh`): `host:port`, a port alone (on
/// 127.0.0.1, where the examples listen), or `http://host:port` (a trailing `/` allowed).
/// The port speaks plain HTTP, so `https://` is refused rather than silently downgraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAddress {
    host: String,
    port: u16,
}

impl std::str::FromStr for AdminAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let form = "expected host:port, a port, or http://host:port";
        let rest = match s.split_once("://") {
            None => s,
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "`{s}`: the admin port speaks plain http, not {scheme} ({form})"
                ))
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!("`{s}`: no path allowed ({form})"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            _ if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => {
                ("127.0.0.1", rest)
            }
            Some((host, port)) if !host.is_empty() => (host, port),
            _ => return Err(format!("`{s}`: {form}")),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{s}`: `{port}` is not a port ({form})"))?;
        Ok(AdminAddress {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for AdminAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl AdminAddress {
    /// `http://host:port`, what [`post_step_down`] takes.
    pub fn base_url(&self) -> String {
        format!("http://{self}")
    }

    /// The first socket address the host resolves to, what [`fetch`] takes.
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        (host, self.port).to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{self}: the host has no address"),
            )
        })
    }
}

/// How long [`fetch`] waits for a complete answer.
pub const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A plain-HTTP GET of `path` on an admin port (the CLI's `status`, test harnesses):
/// returns (status code, body) within [`FETCH_TIMEOUT`]. Any status is an answer, not an
/// error. The request runs on tokio's blocking pool (`ureq` is a blocking client); it never
/// goes through an `HTTP_PROXY` from the environment.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<(u16, String), FetchError> {
    let url = format!("http://{addr}{path}");
    let answer = tokio::task::spawn_blocking(move || get_blocking(&url))
        .await
        .map_err(|_| FetchError::Cancelled(addr))?;
    answer.map_err(|e| match e {
        ureq::Error::Timeout(_) => FetchError::Timeout(addr),
        other => FetchError::Request {
            addr,
            source: Box::new(other),
        },
    })
}

/// How long [`post_step_down`] waits: the daemon answers once its links have drained
/// (`drain_grace`, 10 s by default, plus their stop margin).
pub const STEP_DOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// `POST /step-down` with `Authorization: Bearer <token>` (the CLI's `step-down`, tests):
/// returns (status code, body) within [`STEP_DOWN_TIMEOUT`]. `base` is `http://host:port`
/// or `host:port`.
pub async fn post_step_down(base: &str, token: &Secret) -> Result<(u16, String), String> {
    let base = base.trim_end_matches('/');
    let url = if base.contains("://") {
        format!("{base}/step-down")
    } else {
        format!("http://{base}/step-down")
    };
    let auth = format!("Bearer {}", token.expose());
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(STEP_DOWN_TIMEOUT))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut response = agent
            .post(&url)
            .header("Authorization", &auth)
            .send_empty()?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string()?;
        Ok::<_, ureq::Error>((status, body))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

fn get_blocking(url: &str) -> Result<(u16, String), ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let mut response = agent.get(url).call()?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string()?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    impl AdminState for Fixed {
        fn ready(&self) -> bool {
            self.0
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({ "ready": self.0 })
        }
    }

    #[tokio::test]
    async fn fetch_reads_status_and_body() {
        let stop = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Fixed(false)),
            None,
            stop.clone(),
        )
        .await
        .unwrap();
        assert_eq!(fetch(addr, "/healthz").await.unwrap(), (200, "ok\n".into()));
        assert_eq!(fetch(addr, "/readyz").await.unwrap().0, 503);
        let (code, body) = fetch(addr, "/status").await.unwrap();
        assert_eq!(code, 200);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({ "ready": false })
        );
        assert_eq!(fetch(addr, "/metrics").await.unwrap().0, 404);
        stop.cancel();
    }

    /// A daemon whose work loop is wedged.
    struct Wedged;

    impl AdminState for Wedged {
        fn ready(&self) -> bool {
            true
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn live(&self) -> Result<(), String> {
            Err("control loop has not run for 20s".into())
        }
    }

    #[tokio::test]
    async fn healthz_says_why_a_wedged_daemon_is_not_alive() {
        let stop = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Wedged),
            None,
            stop.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            fetch(addr, "/healthz").await.unwrap(),
            (503, "control loop has not run for 20s\n".into())
        );
        stop.cancel();
    }

    /// A daemon with a token whose step-down always succeeds.
    struct WithToken(Option<Secret>);

    impl AdminState for WithToken {
        fn ready(&self) -> bool {
            true
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn admin_token(&self) -> Option<&Secret> {
            self.0.as_ref()
        }
        fn step_down(&self) -> StepDownFuture {
            Box::pin(std::future::ready(StepDown::Done {
                hold_off: Duration::from_secs(30),
            }))
        }
    }

    #[tokio::test]
    async fn step_down_needs_the_bearer_token_and_a_token_file() {
        let stop = CancellationToken::new();
        let token = Secret::new("s3cret");
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(WithToken(Some(token.clone()))),
            None,
            stop.clone(),
        )
        .await
        .unwrap();
        let base = addr.to_string();
        assert_eq!(post_step_down(&base, &token).await.unwrap().0, 200);
        let wrong = post_step_down(&base, &Secret::new("s3cre")).await.unwrap();
        assert_eq!(wrong.0, 401, "{wrong:?}");
        // No Authorization header at all.
        assert_eq!(
            post_step_down(&base, &Secret::new("")).await.unwrap().0,
            401
        );
        let off = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(WithToken(None)),
            None,
            stop.clone(),
        )
        .await
        .unwrap();
        let r = post_step_down(&format!("http://{off}"), &token)
            .await
            .unwrap();
        assert_eq!(r.0, 404, "{r:?}");
        stop.cancel();
    }

    #[test]
    fn admin_addresses_take_the_same_forms_everywhere() {
        for (given, want) in [
            ("127.0.0.1:9101", "127.0.0.1:9101"),
            ("9102", "127.0.0.1:9102"),
            ("http://127.0.0.1:9101", "127.0.0.1:9101"),
            ("http://localhost:9101/", "localhost:9101"),
            ("[::1]:9101", "[::1]:9101"),
            (DEFAULT_ADMIN, "127.0.0.1:9101"),
        ] {
            let a: AdminAddress = given.parse().unwrap_or_else(|e| panic!("{given}: {e}"));
            assert_eq!(a.to_string(), want, "{given}");
            assert_eq!(a.base_url(), format!("http://{want}"));
        }
        assert_eq!(
            "[::1]:9101"
                .parse::<AdminAddress>()
                .unwrap()
                .resolve()
                .unwrap(),
            "[::1]:9101".parse::<SocketAddr>().unwrap()
        );
        for bad in [
            "",
            "https://127.0.0.1:9101",
            "host",
            "host:0",
            "host:99999",
            "http://h:1/status",
            ":9101",
        ] {
            assert!(bad.parse::<AdminAddress>().is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn fetch_from_a_closed_port_is_an_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = fetch(port, "/healthz").await.unwrap_err();
        assert!(matches!(err, FetchError::Request { .. }), "{err:?}");
    }
}
