//! The local admin HTTP port: `/healthz`, `/readyz`, `/metrics`, `/status`.
//!
//! Liveness means the process runs its event loop; readiness means it can do its job
//! (the float: broker reachable; the bridge: broker reachable and links converged), so a
//! load balancer or watchdog routes away from an instance that cannot work.

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
        .route("/healthz", get(|| async { "ok\n" }))
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
    /// Connecting, writing or reading failed.
    #[error("admin request to {addr}: {source}")]
    Io {
        /// The admin address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer within the deadline.
    #[error("admin request to {0} timed out")]
    Timeout(SocketAddr),
    /// The answer is not an HTTP response.
    #[error("admin port {0} sent something that is not an HTTP response")]
    BadResponse(SocketAddr),
}

/// A minimal HTTP/1.0 GET of `path` on an admin port (the CLI's `status`, test harnesses):
/// returns (status code, body) within 5 s.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<(u16, String), FetchError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let io = |source| FetchError::Io { addr, source };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(io)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(io)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(FetchError::BadResponse(addr))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .map_err(|_| FetchError::Timeout(addr))?
}
