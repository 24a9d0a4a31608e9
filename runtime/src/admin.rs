//! The local admin HTTP port: `/healthz`, `/readyz`, `/metrics`, `/status`.
//!
//! Liveness means the daemon's work loops run ([`AdminState::live`]: the same heartbeats the
//! systemd watchdog pings from). Readiness is each daemon's
//! [`AdminState::ready`]: for both the float and the bridge it is "connected to its broker"
//! (the float refuses peers without one, so a load balancer routes away). The bridge's
//! readiness says nothing about its links — it is ready before the node's first snapshot
//! arrives and while peers are unreachable; `/status` shows each link's state.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// What the daemon exposes to the admin port.
pub trait AdminState: Send + Sync + 'static {
    /// Ready to do work?
    fn ready(&self) -> bool;
    /// Per-component status as JSON (links, connections, counters).
    fn status(&self) -> serde_json::Value;
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

/// Install the Prometheus recorder for the `metrics` facade (once per process).
pub fn install_metrics() -> Option<PrometheusHandle> {
    PrometheusBuilder::new().install_recorder().ok()
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

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if s.state.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn status(State(s): State<Shared>) -> impl IntoResponse {
    Json(s.state.status())
}

async fn render_metrics(State(s): State<Shared>) -> impl IntoResponse {
    match s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".to_string(),
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
