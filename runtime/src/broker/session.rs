//! The supervisor that owns the broker connection and publishes it as a [`Live`].

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use lapin::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;

use super::{config::BrokerConfig, connect::connect_any, redact};

#[derive(Debug)]
pub struct Live {
    /// The connection; open channels on it as needed.
    pub conn: Connection,
    /// Increases with every reconnect, so users can tell an old connection from a new one.
    pub generation: u64,
    /// The broker URI in use (password redacted).
    pub uri: String,
    /// Cancelled when this connection is lost or reported broken.
    lost: CancellationToken,
}

impl Live {
    /// Resolves when this connection is gone; its channels and deliveries are dead then.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Whether the connection is known to be gone.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled() || !self.conn.status().connected()
    }

    /// Report the connection broken (for example a confirm or ack timed out): the
    /// supervisor closes it and reconnects.
    pub fn report_broken(&self, reason: &str) {
        if !self.lost.is_cancelled() {
            warn!(uri = %self.uri, generation = self.generation, reason, "broker connection reported broken");
            self.lost.cancel();
        }
    }
}

/// Boxed future returned by a topology setup callback.
pub type SetupFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Daemon-specific setup run on every new connection (declare exchanges and queues).
pub type Setup = Arc<dyn Fn(Arc<Live>) -> SetupFuture + Send + Sync>;

/// Handle to the supervised broker session.
#[derive(Debug, Clone)]
pub struct BrokerSession {
    /// The current live connection, `None` while (re)connecting.
    state: watch::Receiver<Option<Arc<Live>>>,
    /// Settings, for users that need the op timeout.
    cfg: Arc<BrokerConfig>,
    /// True while the supervisor task runs (cleared when it ends, by return or panic): the
    /// systemd watchdog stops pinging if it ends before shutdown.
    running: Arc<AtomicBool>,
}

/// Clears the supervisor's running flag when dropped, so a panic clears it too.
struct RunningFlag(Arc<AtomicBool>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl BrokerSession {
    /// Start the supervisor. It runs until `shutdown` is cancelled, then closes the
    /// connection cleanly.
    pub fn start(
        cfg: BrokerConfig,
        name: &str,
        setup: Setup,
        shutdown: CancellationToken,
    ) -> BrokerSession {
        let (tx, rx) = watch::channel(None);
        let cfg = Arc::new(cfg);
        let running = Arc::new(AtomicBool::new(true));
        let flag = RunningFlag(running.clone());
        let supervisor = supervise(cfg.clone(), name.to_string(), setup, tx, shutdown);
        tokio::spawn(async move {
            let _flag = flag;
            supervisor.await
        });
        BrokerSession {
            state: rx,
            cfg,
            running,
        }
    }

    /// Whether the supervisor task still runs (it ends only on shutdown, or by a bug).
    pub fn supervisor_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// The settings in use.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// The current connection, if connected.
    pub fn current(&self) -> Option<Arc<Live>> {
        self.state.borrow().clone().filter(|l| !l.is_lost())
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    /// Wait for a connection newer than `after_generation` (pass 0 for any), up to `wait`.
    pub async fn connected(&self, after_generation: u64, wait: Duration) -> Option<Arc<Live>> {
        let mut rx = self.state.clone();
        let fut = async {
            loop {
                if let Some(live) = rx.borrow_and_update().clone() {
                    if live.generation > after_generation && !live.is_lost() {
                        return Some(live);
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(wait, fut).await.ok().flatten()
    }

    /// A receiver that changes whenever the connection comes or goes.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Live>>> {
        self.state.clone()
    }
}

async fn supervise(
    cfg: Arc<BrokerConfig>,
    name: String,
    setup: Setup,
    tx: watch::Sender<Option<Arc<Live>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let mut generation = 0u64;
    let mut next_uri = 0usize;
    let mut last_error = String::new();
    while !shutdown.is_cancelled() {
        let attempt = tokio::select! {
            r = connect_any(&cfg, next_uri, &name) => r,
            _ = shutdown.cancelled() => break,
        };
        let (conn, idx) = match attempt {
            Ok(v) => v,
            Err(e) => {
                let delay = backoff.next_delay();
                // One line per change of reason, not one per attempt.
                if e != last_error {
                    warn!(error = %e, retry_in = ?delay, "broker unreachable");
                    last_error = e;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        generation += 1;
        let live = Arc::new(Live {
            conn,
            generation,
            uri: redact(&cfg.uris[idx]),
            lost: CancellationToken::new(),
        });
        let mut events = live.conn.events_listener();
        let outcome = tokio::select! {
            r = tokio::time::timeout(cfg.op_timeout, setup(live.clone())) => r,
            _ = shutdown.cancelled() => {
                close(&live, &cfg).await;
                break;
            }
        };
        if let Some(reason) = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!(
                "topology setup timed out after {:?}",
                cfg.op_timeout
            )),
        } {
            let delay = backoff.next_delay();
            warn!(uri = %live.uri, error = %reason, retry_in = ?delay, "broker setup failed");
            close(&live, &cfg).await;
            next_uri = idx + 1;
            tokio::select! {
                _ = tokio::time::sleep(delay) => continue,
                _ = shutdown.cancelled() => break,
            }
        }
        info!(uri = %live.uri, generation, "broker connected");
        last_error.clear();
        backoff.reset();
        tx.send_replace(Some(live.clone()));
        // 1 while connected (set up and usable); the scrape job tells bridge from float.
        metrics::gauge!("drawbridge_broker_connected").set(1.0);
        metrics::counter!("drawbridge_broker_connects_total").increment(1);

        // Watch for the end of this connection.
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                _ = live.lost.cancelled() => break Some("reported broken by a user".to_string()),
                ev = events.next() => match ev {
                    // lapin reports channel-level errors (a 404 on one channel) here too;
                    // those are the channel owner's business, not a reason to drop the
                    // connection every other user shares.
                    Some(lapin::Event::Error(e)) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if !live.conn.status().connected() {
                            break Some(e.to_string());
                        }
                        tracing::debug!(error = %e, "channel-level error on a healthy connection");
                    }
                    Some(_) => {}
                    None => break Some("event stream ended".to_string()),
                },
                _ = poll.tick() => {
                    if !live.conn.status().connected() {
                        break Some("connection no longer connected".to_string());
                    }
                }
            }
        };
        live.lost.cancel();
        tx.send_replace(None);
        metrics::gauge!("drawbridge_broker_connected").set(0.0);
        close(&live, &cfg).await;
        match reason {
            None => break,
            Some(reason) => {
                warn!(uri = %live.uri, generation, reason = %reason, "broker connection lost; reconnecting");
                // Prefer the next node of a cluster: the one that failed may be the one down.
                next_uri = idx + 1;
                let delay = backoff.next_delay().min(Duration::from_millis(200));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    tx.send_replace(None);
}

async fn close(live: &Live, cfg: &BrokerConfig) {
    if live.conn.status().connected() {
        let _ = tokio::time::timeout(
            cfg.op_timeout.min(Duration::from_secs(5)),
            live.conn.close(200, "drawbridge closing".into()),
        )
        .await;
    }
}
