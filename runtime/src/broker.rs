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

use std::{
    fmt,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use drawbridge_certs::{check_secret_file, KeyFileAccess};
use drawbridge_node::ConnectOptions;
use futures::StreamExt;
use lapin::{
    uri::{AMQPScheme, AMQPUri},
    Connection,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{backoff::Backoff, config::ConfigReader};

/// Default `broker.frame_max` of a daemon that only publishes (the float): 32 KiB, a quarter
/// of RabbitMQ's default. It saves 6 MiB of resident buffers per broker connection (see
/// [`BrokerConfig::frame_max`]), and a 1 MiB body is 32 frames instead of 8, which the bench
/// does not tell apart (docs/performance.md). What it publishes is checked against it
/// (`mapping::max_properties_len`).
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Default `broker.frame_max` of a daemon that consumes what others published (the bridge):
/// RabbitMQ's own default, 128 KiB. A message's properties travel in one frame, and lapin
/// refuses a frame over the negotiated `frame_max` by closing the whole connection: with a
/// smaller frame than the broker's, one node message with large headers (which the node's own
/// connection, at the broker's frame size, could publish) closed the bridge's broker
/// connection on every delivery, for ever (found by
/// `e2e::oversize_headers_and_reasons_are_dead_lettered_not_resent_in_a_loop`).
pub const CONSUMER_FRAME_MAX: u32 = 128 * 1024;

/// AMQP 0-9-1's smallest `frame_max` (`FRAME_MIN_SIZE`).
const FRAME_MAX_MIN: u32 = 4096;

/// Largest `broker.frame_max` taken: 64 MiB of buffers per broker connection.
const FRAME_MAX_MAX: u32 = 1024 * 1024;

/// Broker connection settings (`[broker]` in a daemon's config).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// AMQP URIs of the broker or of every cluster node, tried in turn. Never log these
    /// as they are: they may hold a password (use [`redact`]).
    pub uris: Vec<String>,
    /// Deadline for TCP + AMQP connection setup to one URI.
    pub connect_timeout: Duration,
    /// Deadline for every broker RPC, confirm and ack.
    pub op_timeout: Duration,
    /// AMQP heartbeat in seconds (a silent broker is detected after about twice this).
    pub heartbeat: u16,
    /// Largest AMQP 0-9-1 frame asked for (the broker's own limit applies if lower). lapin
    /// allocates its receive and send buffers as 32 frames each when it connects, so this is
    /// what one broker connection holds resident: 64 × `frame_max` (8 MiB at RabbitMQ's
    /// 128 KiB default, 2 MiB at ours). Larger bodies are cut into more frames.
    pub frame_max: u32,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Reconnect delay cap.
    pub reconnect_max: Duration,
    /// The password read from `password_file`; it replaces the URIs' (which have none).
    pub password: Option<Secret>,
    /// TLS settings for `amqps://` URIs (`tls_ca`, `tls_cert`, `tls_key`).
    pub tls: Option<BrokerTls>,
    /// How the daemon authenticates to the broker.
    pub auth: BrokerAuth,
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself (only to hand it to the broker).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the daemon logs in to the broker (`broker.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerAuth {
    /// User name and password (SASL PLAIN): from the URI, the password possibly from
    /// `password_file`.
    #[default]
    Plain,
    /// SASL EXTERNAL: the broker takes the login from the client certificate
    /// (`tls_cert`; RabbitMQ's `rabbitmq_auth_mechanism_ssl` plugin). No password.
    External,
}

/// TLS material for `amqps://` broker connections (`tls_ca`, `tls_cert`, `tls_key`), loaded
/// and checked at configuration time; it lives with the node library's connect code, which
/// the daemons, the CLI and the node library share.
pub use drawbridge_node::BrokerTls;

impl BrokerConfig {
    /// Read `{prefix}.uris`, `{prefix}.connect_timeout`, ... from `r`. Secret files
    /// (`password_file`, `tls_key`) are checked against `access`.
    pub fn read(r: &mut ConfigReader, prefix: &str, access: KeyFileAccess) -> BrokerConfig {
        Self::read_with(r, prefix, access, DEFAULT_FRAME_MAX)
    }

    /// [`BrokerConfig::read`] with another default `frame_max` ([`CONSUMER_FRAME_MAX`] for a
    /// daemon that consumes).
    pub fn read_with(
        r: &mut ConfigReader,
        prefix: &str,
        access: KeyFileAccess,
        default_frame_max: u32,
    ) -> BrokerConfig {
        let key = |k: &str| format!("{prefix}.{k}");
        let uris: Vec<String> = r.required(&key("uris")).unwrap_or_default();
        let mut parsed = Vec::new();
        for u in &uris {
            match u.parse::<AMQPUri>() {
                Ok(p) => parsed.push((u, p)),
                Err(e) => r.invalid(
                    &key("uris"),
                    format!("`{}` is not an AMQP URI: {e}", redact(u)),
                ),
            }
        }
        if uris.is_empty() {
            r.invalid(&key("uris"), "at least one broker URI is needed");
        }
        let tls_uris = parsed
            .iter()
            .filter(|(_, p)| p.scheme == AMQPScheme::AMQPS)
            .count();
        if tls_uris > 0 && tls_uris < parsed.len() {
            r.invalid(
                &key("uris"),
                "mixes amqp:// and amqps:// URIs: use amqps:// for every node, or the password and messages cross the network in clear to the others",
            );
        }

        let auth: BrokerAuth = r.get(&key("auth"), BrokerAuth::Plain);

        // TLS.
        let tls_ca: Option<PathBuf> = r.optional(&key("tls_ca"));
        let tls_cert: Option<PathBuf> = r.optional(&key("tls_cert"));
        let tls_key: Option<PathBuf> = r.optional(&key("tls_key"));
        let client = match (&tls_cert, &tls_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (Some(_), None) => {
                r.invalid(&key("tls_key"), "required when tls_cert is set");
                None
            }
            (None, Some(_)) => {
                r.invalid(&key("tls_cert"), "required when tls_key is set");
                None
            }
            (None, None) => None,
        };
        let tls = match tls_ca {
            None => {
                if tls_uris > 0 {
                    r.invalid(
                        &key("tls_ca"),
                        "required for amqps:// URIs: the PEM CA certificate that issued the broker's certificate (no system roots are trusted)",
                    );
                }
                None
            }
            Some(_) if tls_uris == 0 && !parsed.is_empty() => {
                r.invalid(
                    &key("tls_ca"),
                    format!(
                        "is set, but no URI in {} uses amqps://: the connection would not use TLS",
                        key("uris")
                    ),
                );
                None
            }
            Some(ca) => match BrokerTls::load(&ca, client, access) {
                Ok(t) => Some(t),
                Err((k, e)) => {
                    r.invalid(&key(k), e);
                    None
                }
            },
        };
        if client.is_some() && tls_uris == 0 && !parsed.is_empty() {
            r.invalid(
                &key("tls_cert"),
                "a client certificate needs TLS: use amqps:// URIs (and tls_ca)",
            );
        }

        // Password.
        let password_file: Option<PathBuf> = r.optional(&key("password_file"));
        let password = match &password_file {
            None => None,
            Some(path) => match read_password_file(path, access) {
                Ok(pw) => Some(pw),
                Err(e) => {
                    r.invalid(&key("password_file"), e);
                    None
                }
            },
        };
        if password_file.is_some() {
            for (i, (raw, _)) in parsed.iter().enumerate() {
                if has_password(raw) {
                    r.invalid(
                        &key("password_file"),
                        format!(
                            "conflicts with the password in {}[{i}] (`{}`): keep the password in one place",
                            key("uris"),
                            redact(raw)
                        ),
                    );
                }
            }
        }
        if auth == BrokerAuth::External {
            if client.is_none() {
                r.invalid(
                    &key("auth"),
                    "`external` (SASL EXTERNAL) logs in with the client certificate: set tls_cert and tls_key",
                );
            }
            if password_file.is_some() {
                r.invalid(
                    &key("password_file"),
                    "not used with auth = \"external\": the broker takes the login from the client certificate",
                );
            }
            for (i, (raw, _)) in parsed.iter().enumerate() {
                if has_password(raw) {
                    r.invalid(
                        &key("uris"),
                        format!(
                            "{}[{i}] (`{}`) holds a password, but auth = \"external\" does not send it: remove it",
                            key("uris"),
                            redact(raw)
                        ),
                    );
                }
            }
        }

        let cfg = BrokerConfig {
            uris,
            connect_timeout: r.duration(&key("connect_timeout"), Duration::from_secs(10)),
            op_timeout: r.duration(&key("op_timeout"), Duration::from_secs(15)),
            heartbeat: r.get(&key("heartbeat_secs"), 5u16),
            frame_max: r.get(&key("frame_max"), default_frame_max),
            reconnect_min: r.duration(&key("reconnect_min"), Duration::from_millis(500)),
            // A local broker is cheap to retry; a short cap bounds recovery after an outage.
            reconnect_max: r.duration(&key("reconnect_max"), Duration::from_secs(5)),
            password,
            tls,
            auth,
        };
        r.check(
            &key("reconnect_max"),
            cfg.reconnect_max >= cfg.reconnect_min,
            "must not be smaller than reconnect_min",
        );
        r.check(
            &key("frame_max"),
            (FRAME_MAX_MIN..=FRAME_MAX_MAX).contains(&cfg.frame_max),
            format_args!(
                "must be between {FRAME_MAX_MIN} (AMQP's smallest frame) and {FRAME_MAX_MAX} bytes"
            ),
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
            frame_max: DEFAULT_FRAME_MAX,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(5),
            password: None,
            tls: None,
            auth: BrokerAuth::Plain,
        }
    }
}

use drawbridge_node::uri_has_password as has_password;

/// Read a broker password file: the whole file, without its trailing line break(s).
pub fn read_password_file(path: &Path, access: KeyFileAccess) -> Result<Secret, String> {
    check_secret_file(path, access).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let pw = text.trim_end_matches(['\n', '\r']);
    if pw.is_empty() {
        return Err(format!("`{}` is empty", path.display()));
    }
    if pw.contains(['\n', '\r']) {
        return Err(format!(
            "`{}` holds more than one line: it must hold the password alone",
            path.display()
        ));
    }
    Ok(Secret::new(pw))
}

/// A URI with its password hidden, for logs and configuration errors
/// (`drawbridge_node::redact_uri`).
pub use drawbridge_node::redact_uri as redact;

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
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(cfg.frame_max);
    }
    if let Some(pw) = &cfg.password {
        uri.authority.userinfo.password = pw.expose().to_string();
    }
    if uri.scheme == AMQPScheme::AMQPS && cfg.tls.is_none() {
        return Err("amqps:// needs broker.tls_ca (the CA of the broker's certificate)".into());
    }
    let options = ConnectOptions {
        // Config validation refuses TLS material with amqp:// URIs; a URI without TLS does
        // not get it here either.
        tls: cfg.tls.clone().filter(|_| uri.scheme == AMQPScheme::AMQPS),
        external: cfg.auth == BrokerAuth::External,
        timeout: cfg.connect_timeout,
        connection_name: Some(name.to_string()),
    };
    drawbridge_node::connect::connect_uri(uri, &redact(raw), &options)
        .await
        .map_err(|e| match e {
            drawbridge_node::NodeError::ConnectTimeout { timeout, .. } => {
                format!("no answer within {timeout:?}")
            }
            e => explain_tls_error(e.to_string()),
        })
}

/// Add what to check to a TLS handshake failure.
fn explain_tls_error(e: String) -> String {
    if e.contains("invalid peer certificate") {
        format!(
            "{e} (TLS: the broker's certificate is not issued by broker.tls_ca, has expired, or does not name the URI's host)"
        )
    } else if e.contains("CertificateRequired") || e.contains("certificate required") {
        format!("{e} (TLS: the broker requires a client certificate: set broker.tls_cert and broker.tls_key)")
    } else {
        e
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

#[cfg(test)]
mod config_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn read(toml: &str, access: KeyFileAccess) -> Result<BrokerConfig, Vec<String>> {
        let mut r = ConfigReader::from_toml(toml).unwrap();
        let cfg = BrokerConfig::read(&mut r, "broker", access);
        r.finish().map(|()| cfg).map_err(|e| e.0)
    }

    fn ok(toml: &str) -> BrokerConfig {
        read(toml, KeyFileAccess::OwnerOnly).unwrap()
    }

    fn errors(toml: &str) -> Vec<String> {
        read(toml, KeyFileAccess::OwnerOnly).unwrap_err()
    }

    fn q(p: &Path) -> String {
        format!("{:?}", p.display().to_string())
    }

    fn has(errs: &[String], key: &str, needle: &str) -> bool {
        errs.iter()
            .any(|e| e.starts_with(&format!("{key}:")) && e.contains(needle))
    }

    #[test]
    fn the_password_file_replaces_the_uri_password_without_its_newline() {
        let d = tempfile::tempdir().unwrap();
        for (i, text) in ["s3cr:t@pw\n", "s3cr:t@pw\r\n", "s3cr:t@pw"]
            .iter()
            .enumerate()
        {
            let pw = write(d.path(), &format!("pw{i}"), text, 0o600);
            let cfg = ok(&format!(
                "[broker]\nuris = [\"amqp://node-a@127.0.0.1/%2f\"]\npassword_file = {}\n",
                q(&pw)
            ));
            assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("s3cr:t@pw"));
            let debug = format!("{cfg:?}");
            assert!(!debug.contains("s3cr"), "{debug}");
        }
    }

    #[test]
    fn frame_max_defaults_to_32_kib_and_is_bounded() {
        assert_eq!(ok("[broker]\nuris = [\"amqp://h/%2f\"]\n").frame_max, 32768);
        assert_eq!(
            ok("[broker]\nuris = [\"amqp://h/%2f\"]\nframe_max = 131072\n").frame_max,
            131072
        );
        for bad in ["4095", "2097152", "0"] {
            let errs = errors(&format!(
                "[broker]\nuris = [\"amqp://h/%2f\"]\nframe_max = {bad}\n"
            ));
            assert!(
                has(&errs, "broker.frame_max", "between 4096"),
                "{bad}: {errs:#?}"
            );
        }
    }

    #[test]
    fn a_password_file_and_a_uri_password_conflict() {
        let d = tempfile::tempdir().unwrap();
        let pw = write(d.path(), "pw", "from-file\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://node-a@h1/%2f\", \"amqp://node-a:in-uri@h2/%2f\"]\npassword_file = {}\n",
            q(&pw)
        ));
        assert!(
            has(&errs, "broker.password_file", "broker.uris[1]")
                && has(&errs, "broker.password_file", "amqp://node-a:***@h2/%2f"),
            "{errs:#?}"
        );
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(!errs.iter().any(|e| e.contains("in-uri")), "{errs:#?}");
    }

    #[test]
    fn a_missing_or_empty_password_file_is_reported_by_key() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope");
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\nheartbeat_secs = \"x\"\n",
            q(&missing)
        ));
        assert!(
            has(
                &errs,
                "broker.password_file",
                &missing.display().to_string()
            ),
            "{errs:#?}"
        );
        // Every problem at once.
        assert!(
            errs.iter().any(|e| e.starts_with("broker.heartbeat_secs")),
            "{errs:#?}"
        );
        let empty = write(d.path(), "empty", "\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\n",
            q(&empty)
        ));
        assert!(has(&errs, "broker.password_file", "is empty"), "{errs:#?}");
        let two = write(d.path(), "two", "a\nb\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\n",
            q(&two)
        ));
        assert!(
            has(&errs, "broker.password_file", "more than one line"),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_readable_password_file_is_refused_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let pw = write(d.path(), "pw", "secret\n", 0o644);
        let toml = format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\n",
            q(&pw)
        );
        let errs = errors(&toml);
        assert!(
            has(&errs, "broker.password_file", "mode 0644")
                && has(
                    &errs,
                    "broker.password_file",
                    &format!("chmod 600 {}", pw.display())
                ),
            "{errs:#?}"
        );
        // 0644 stays refused with the override; 0640 passes with it only.
        assert!(read(&toml, KeyFileAccess::GroupReadable).is_err());
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(has(
            &errors(&toml),
            "broker.password_file",
            "allow_group_readable_key"
        ));
        read(&toml, KeyFileAccess::GroupReadable).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        ok(&toml);
    }

    fn pki(dir: &Path) -> drawbridge_certs::devpki::NodeFiles {
        let names = ["O=Bank A, L=London, C=GB".parse().unwrap()];
        drawbridge_certs::devpki::generate_network(dir, &names)
            .unwrap()
            .nodes
            .remove(0)
    }

    #[test]
    fn amqps_needs_tls_ca_and_tls_ca_needs_amqps() {
        let errs = errors("[broker]\nuris = [\"amqps://h/%2f\"]\n");
        assert!(
            has(&errs, "broker.tls_ca", "required for amqps://"),
            "{errs:#?}"
        );
        let d = tempfile::tempdir().unwrap();
        let files = pki(d.path());
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        ));
        assert!(
            has(&errs, "broker.tls_ca", "would not use TLS"),
            "{errs:#?}"
        );
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqps://h1/%2f\", \"amqp://h2/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        ));
        assert!(
            has(&errs, "broker.uris", "mixes amqp:// and amqps://"),
            "{errs:#?}"
        );
        let cfg = ok(&format!(
            "[broker]\nuris = [\"amqps://h1/%2f\", \"amqps://h2/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        ));
        assert!(cfg
            .tls
            .as_ref()
            .is_some_and(|t| !t.has_client_certificate()));
    }

    #[test]
    fn a_bad_ca_file_is_reported_by_key() {
        let d = tempfile::tempdir().unwrap();
        let not_pem = write(d.path(), "ca.pem", "hello\n", 0o644);
        for ca in [not_pem, d.path().join("missing.pem")] {
            let errs = errors(&format!(
                "[broker]\nuris = [\"amqps://h/%2f\"]\ntls_ca = {}\n",
                q(&ca)
            ));
            assert!(
                has(&errs, "broker.tls_ca", &ca.display().to_string()),
                "{errs:#?}"
            );
        }
    }

    #[test]
    fn client_certificate_and_sasl_external() {
        let d = tempfile::tempdir().unwrap();
        let files = pki(d.path());
        let base = format!(
            "[broker]\nuris = [\"amqps://h/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        );
        let client = format!(
            "tls_cert = {}\ntls_key = {}\n",
            q(&files.tls_cert),
            q(&files.tls_key)
        );
        let cfg = ok(&format!("{base}{client}auth = \"external\"\n"));
        assert_eq!(cfg.auth, BrokerAuth::External);
        assert!(cfg
            .tls
            .as_ref()
            .is_some_and(BrokerTls::has_client_certificate));
        assert!(!format!("{cfg:?}").contains("PRIVATE KEY"));

        // External without a certificate; a certificate without its key.
        let errs = errors(&format!("{base}auth = \"external\"\n"));
        assert!(
            has(&errs, "broker.auth", "set tls_cert and tls_key"),
            "{errs:#?}"
        );
        let errs = errors(&format!("{base}tls_cert = {}\n", q(&files.tls_cert)));
        assert!(
            has(&errs, "broker.tls_key", "required when tls_cert"),
            "{errs:#?}"
        );
        let errs = errors(&format!("{base}auth = \"kerberos\"\n"));
        assert!(
            errs.iter().any(|e| e.starts_with("broker.auth")),
            "{errs:#?}"
        );

        // External with a password anywhere.
        let pw = write(d.path(), "pw", "x\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqps://u:p@h/%2f\"]\ntls_ca = {}\n{client}auth = \"external\"\npassword_file = {}\n",
            q(&files.root_cert),
            q(&pw)
        ));
        assert!(has(&errs, "broker.uris", "does not send it"), "{errs:#?}");
        assert!(
            has(&errs, "broker.password_file", "not used with auth"),
            "{errs:#?}"
        );

        // The client key file is checked like every secret file.
        std::fs::set_permissions(&files.tls_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let errs = errors(&format!("{base}{client}"));
        assert!(
            has(&errs, "broker.tls_key", "mode 0644")
                && has(
                    &errs,
                    "broker.tls_key",
                    &files.tls_key.display().to_string()
                ),
            "{errs:#?}"
        );
    }
}
