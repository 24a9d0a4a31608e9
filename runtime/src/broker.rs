//! The supervised RabbitMQ session both daemons use.
//!
//! lapin's own recovery is not used: it was measured to hang with confirms in flight when the
//! broker restarts (see `docs/architecture.md`). Instead one supervisor task per daemon owns the
//! connection: it walks the URI list with backoff + jitter, runs the daemon's topology setup,
//! publishes the live connection through a `watch`, and tears it down when lapin reports an
//! error, the connection stops being connected, or any user reports it broken (for example
//! after a confirm timed out). Users never reuse anything from a dead connection: each
//! [`Live`] has a generation and a `lost` token, and deliveries of a lost connection are
//! simply never acked (the broker requeues them).

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use futures::StreamExt;
use lapin::{uri::AMQPUri, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{backoff::Backoff, config::ConfigReader};

/// Broker connection settings (`[broker]` in a daemon's config).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// AMQP URIs of the broker or of every cluster node, tried in turn.
    pub uris: Vec<String>,
    /// Deadline for TCP + AMQP connection setup to one URI.
    pub connect_timeout: Duration,
    /// Deadline for every broker RPC, confirm and ack.
    pub op_timeout: Duration,
    /// AMQP heartbeat in seconds (a silent broker is detected after about twice this).
    pub heartbeat: u16,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Reconnect delay cap.
    pub reconnect_max: Duration,
}

impl BrokerConfig {
    /// Read `{prefix}.uris`, `{prefix}.connect_timeout`, ... from `r`.
    pub fn read(r: &mut ConfigReader, prefix: &str) -> BrokerConfig {
        let key = |k: &str| format!("{prefix}.{k}");
        let uris: Vec<String> = r.required(&key("uris")).unwrap_or_default();
        for u in &uris {
            if let Err(e) = u.parse::<AMQPUri>() {
                r.invalid(
                    &key("uris"),
                    format!("`{}` is not an AMQP URI: {e}", redact(u)),
                );
            }
        }
        if uris.is_empty() {
            r.invalid(&key("uris"), "at least one broker URI is needed");
        }
        let cfg = BrokerConfig {
            uris,
            connect_timeout: r.duration(&key("connect_timeout"), Duration::from_secs(10)),
            op_timeout: r.duration(&key("op_timeout"), Duration::from_secs(15)),
            heartbeat: r.get(&key("heartbeat_secs"), 5u16),
            reconnect_min: r.duration(&key("reconnect_min"), Duration::from_millis(500)),
            // A local broker is cheap to retry; a short cap bounds recovery after an outage.
            reconnect_max: r.duration(&key("reconnect_max"), Duration::from_secs(5)),
        };
        r.check(
            &key("reconnect_max"),
            cfg.reconnect_max >= cfg.reconnect_min,
            "must not be smaller than reconnect_min",
        );
        cfg
    }

    /// Settings for tests and tools: the given URIs, defaults otherwise.
    pub fn with_uris(uris: Vec<String>) -> BrokerConfig {
        BrokerConfig {
            uris,
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(15),
            heartbeat: 5,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// A URI with its password hidden, for logs and configuration errors.
///
/// The URI is parsed (as lapin parses it, with the `url` crate), so a password holding `@`
/// or `:` is hidden whole. A string without an authority part that might hold credentials
/// (it has an `@`) is not shown at all.
pub fn redact(uri: &str) -> String {
    const HIDDEN: &str = "(URI not shown: it may hold a password)";
    match url::Url::parse(uri) {
        Ok(mut u) if u.has_host() => {
            if u.password().is_some() && u.set_password(Some("***")).is_err() {
                return HIDDEN.into();
            }
            u.to_string()
        }
        // No authority (`amqp:user:pw@host`) or not a URI at all: show it only if it cannot
        // hold credentials.
        _ if uri.contains('@') => HIDDEN.into(),
        _ => uri.to_string(),
    }
}

/// Connect to the first URI of `cfg.uris` (starting at `start`) that answers.
/// Returns the connection and the index of the URI that worked.
pub async fn connect_any(
    cfg: &BrokerConfig,
    start: usize,
    name: &str,
) -> Result<(Connection, usize), String> {
    let mut errors = Vec::new();
    for i in 0..cfg.uris.len() {
        let idx = (start + i) % cfg.uris.len();
        let raw = &cfg.uris[idx];
        match connect_one(cfg, raw, name).await {
            Ok(c) => return Ok((c, idx)),
            Err(e) => errors.push(format!("{}: {e}", redact(raw))),
        }
    }
    Err(errors.join("; "))
}

async fn connect_one(cfg: &BrokerConfig, raw: &str, name: &str) -> Result<Connection, String> {
    let mut uri: AMQPUri = raw.parse()?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(cfg.heartbeat);
    }
    uri.query.connection_timeout = Some(cfg.connect_timeout.as_millis() as u64);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(cfg.connect_timeout, Connection::connect_uri(uri, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", cfg.connect_timeout)),
    }
}

/// One live broker connection.
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
        tokio::spawn(supervise(
            cfg.clone(),
            name.to_string(),
            setup,
            tx,
            shutdown,
        ));
        BrokerSession { state: rx, cfg }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }

    #[test]
    fn redacts_passwords_with_at_and_colon() {
        // An unescaped `@` in the password: the last `@` ends the userinfo.
        let r = redact("amqp://user:p@ss@broker:5672/%2f");
        assert_eq!(r, "amqp://user:***@broker:5672/%2f");
        // `:` in the password: the first `:` ends the user name.
        let r = redact("amqp://user:pa:ss:word@broker/vh");
        assert_eq!(r, "amqp://user:***@broker/vh");
        // Percent-encoded specials stay hidden too.
        let r = redact("amqp://user:p%40ss%3Aw@broker/vh");
        assert_eq!(r, "amqp://user:***@broker/vh");
        for r in [
            redact("amqp://user:p@ss@broker:5672/%2f"),
            redact("amqp://user:pa:ss:word@broker/vh"),
        ] {
            assert!(!r.contains("ss"), "{r}");
        }
    }

    #[test]
    fn keeps_uris_without_password() {
        assert_eq!(redact("amqp://guest@broker/%2f"), "amqp://guest@broker/%2f");
        assert_eq!(
            redact("amqps://broker.example:5671/%2f?heartbeat=5"),
            "amqps://broker.example:5671/%2f?heartbeat=5"
        );
    }

    #[test]
    fn redacts_amqps() {
        assert_eq!(
            redact("amqps://node:s3cr%23t@broker.example:5671/prod?heartbeat=10"),
            "amqps://node:***@broker.example:5671/prod?heartbeat=10"
        );
    }

    #[test]
    fn never_shows_an_unparseable_uri_with_credentials() {
        for bad in ["amqp://user:secret@[broken", "amqp:user:secret@host"] {
            let r = redact(bad);
            assert!(!r.contains("secret"), "{r}");
        }
        assert_eq!(redact("not a uri"), "not a uri");
    }
}
