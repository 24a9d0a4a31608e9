//! The accept loop: one task per connection, at most `max_connections` at once, accept
//! errors (out of file descriptors and the like) backed off instead of spun on, and on
//! shutdown no new connections while the open ones drain within `drain_grace`.

use std::{sync::Arc, time::Duration};

use drawbridge_runtime::backoff::Backoff;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{connection, Ctx};

/// Accept connections until `shutdown`, then let the connections drain.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let mut conns = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (tcp, addr) = match accepted {
            Ok(v) => {
                backoff.reset();
                v
            }
            Err(e) => {
                let d = backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "accept failed");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(peer_addr = %addr, max = ctx.cfg.max_connections, "connection refused: too many connections");
            metrics::counter!("drawbridge_float_connections_refused_total", "reason" => "max_connections").increment(1);
            continue;
        };
        next_id += 1;
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let id = next_id;
        conns.spawn(async move {
            connection::serve_connection(tcp, addr, id, ctx.clone(), shutdown).await;
            ctx.connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
            drop(permit);
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
