//! The accept loop: one task per connection, admitted first to the small pool of pending
//! handshakes (see `admission`), accept errors (out of file descriptors and the like) backed
//! off instead of spun on, and on shutdown no new connections while the open ones drain
//! within `drain_grace`. It is the float's work loop for the systemd watchdog: it beats on
//! every iteration and on an idle timer, so pings stop only if it is wedged.

use std::{sync::Arc, time::Duration};

use drawbridge_runtime::backoff::Backoff;
use drawbridge_runtime::lograte::Every;
use drawbridge_runtime::watchdog::Heartbeat;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{connection, Ctx};

/// Accept connections until `shutdown`, then let the connections drain.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    heartbeat: Heartbeat,
) {
    // A flood of refusals is one log line per 10 s with its count, never one per connection.
    let refusals = Every::new(Duration::from_secs(10));
    let mut conns = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut next_id = 0u64;
    let mut idle = heartbeat.ticker();
    loop {
        heartbeat.beat();
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = idle.tick() => continue,
        };
        let (tcp, addr) = match accepted {
            Ok(v) => {
                backoff.reset();
                v
            }
            Err(e) => {
                let d = backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "accept failed");
                heartbeat.busy_for(d);
                tokio::time::sleep(d).await;
                continue;
            }
        };
        // Refused before any byte is read: closing the socket is all it costs.
        let pending = match ctx.admission.pending(addr.ip(), std::time::Instant::now()) {
            Ok(t) => {
                if t.shortened() {
                    metrics::counter!("drawbridge_float_handshakes_shortened_total").increment(1);
                }
                t
            }
            Err(refusal) => {
                metrics::counter!("drawbridge_float_connections_refused_total", "reason" => refusal.label()).increment(1);
                if let Some(skipped) = refusals.hit() {
                    warn!(peer_addr = %addr, reason = %refusal, similar_refusals_not_logged = skipped, "connection refused before the handshake");
                }
                continue;
            }
        };
        next_id += 1;
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let id = next_id;
        conns.spawn(async move {
            connection::serve_connection(tcp, addr, id, pending, ctx.clone(), shutdown).await;
            ctx.connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
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
