//! The systemd notification protocol against the real daemons: each is started as systemd
//! would start it (`NOTIFY_SOCKET` naming a datagram socket the test binds,
//! `WATCHDOG_USEC=2000000`), and the test reads what arrives:
//!
//! * `READY=1` once the daemon is ready (`/readyz` answers 200 by then), with a `STATUS=`;
//! * `WATCHDOG=1` every second or so while it runs;
//! * `STOPPING=1` on SIGTERM;
//! * a float whose broker is unreachable is not ready, yet its accept loop runs: it pings
//!   with `EXTEND_TIMEOUT_USEC=` (so systemd's start timeout does not kill it) and never
//!   says `READY=1`.
//!
//! The "ping only while the work loop runs" decision is unit-tested in
//! `runtime/src/sd_notify.rs` (a wedged loop stops the pings).

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use drawbridge_certs::devpki;
use drawbridge_testkit::{
    daemon::{free_port, http_get, Daemon, Kind},
    rabbit::shared_node,
    world::Org,
    BANK_A,
};
use tokio::{net::UnixDatagram, sync::mpsc, time::Instant};

/// A bound notify socket and the messages read from it.
struct Notify {
    path: PathBuf,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Notify {
    fn bind(dir: &std::path::Path) -> Result<Notify> {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                let msg = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned();
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        Ok(Notify { path, rx })
    }

    fn env(&self) -> [(&'static str, String); 2] {
        [
            ("NOTIFY_SOCKET", self.path.display().to_string()),
            ("WATCHDOG_USEC", "2000000".to_string()),
        ]
    }

    /// The next message containing `needle` within `within`; the others seen on the way.
    async fn wait_for(&mut self, needle: &str, within: Duration) -> Result<(String, Vec<String>)> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if m.lines().any(|l| l == needle) => return Ok((m, seen)),
                Ok(Some(m)) => seen.push(m),
                Ok(None) => bail!("notify socket closed; seen {seen:?}"),
                Err(_) => bail!("no {needle} within {within:?}; seen {seen:?}"),
            }
        }
    }

    /// Every message arriving within `d`.
    async fn collect(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut seen = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            seen.push(m);
        }
        seen
    }
}

fn pings(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

async fn org(dir: &std::path::Path, broker_uri: String) -> Result<Org> {
    drawbridge_certs::install_crypto_provider();
    let net = devpki::generate_network(&dir.join("pki"), &[BANK_A.parse()?])?;
    Ok(Org::new(net.nodes[0].clone(), vec![broker_uri], dir))
}

/// Start `kind` under the fake systemd and check READY, pings and STOPPING.
async fn ready_pings_stopping(kind: Kind) -> Result<()> {
    let node = shared_node().await;
    let dir = tempfile::tempdir()?;
    let vhost = node.fresh_vhost().await?;
    let org = org(dir.path(), node.amqp_uri(&vhost)).await?;
    let mut notify = Notify::bind(dir.path())?;
    let env = notify.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (config, admin, name) = match kind {
        Kind::Float => (org.float_config(""), org.float_admin, "float"),
        Kind::Bridge => (org.bridge_config(""), org.bridge_admin, "bridge"),
    };
    let mut daemon = Daemon::start_with_env(kind, &org.dir, name, &config, admin, &env).await?;

    let (ready, _) = notify
        .wait_for("READY=1", Duration::from_secs(60))
        .await
        .map_err(|e| e.context(daemon.log_tail(30)))?;
    assert!(ready.contains("STATUS="), "{ready}");
    // Ready only when /readyz says so (sent after the daemon's own readiness).
    let (code, _) = http_get(admin, "/readyz").await?;
    assert_eq!(code, 200, "READY=1 before /readyz was ready");

    // Pings every second (half of WATCHDOG_USEC); 6 s leaves room for a loaded machine.
    let msgs = notify.collect(Duration::from_secs(6)).await;
    assert!(
        pings(&msgs) >= 3,
        "pings: {msgs:?}\n{}",
        daemon.log_tail(30)
    );
    assert!(
        !msgs.iter().any(|m| m.contains("EXTEND_TIMEOUT_USEC")),
        "no start-timeout extension once ready: {msgs:?}"
    );
    assert!(
        !daemon.log_contains("not pinging"),
        "{}",
        daemon.log_tail(30)
    );

    let code = daemon.terminate(Duration::from_secs(60)).await?;
    assert_eq!(code, Some(0));
    notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .await?;
    Ok(())
}

#[tokio::test]
async fn float_notifies_ready_watchdog_and_stopping() -> Result<()> {
    ready_pings_stopping(Kind::Float).await
}

#[tokio::test]
async fn bridge_notifies_ready_watchdog_and_stopping() -> Result<()> {
    ready_pings_stopping(Kind::Bridge).await
}

#[tokio::test]
async fn a_float_without_its_broker_pings_with_start_extensions_but_is_not_ready() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Nothing listens there: the broker session keeps retrying.
    let broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let org = org(dir.path(), broker).await?;
    let mut notify = Notify::bind(dir.path())?;
    let env = notify.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start_with_env(
        Kind::Float,
        &org.dir,
        "float",
        &org.float_config(""),
        org.float_admin,
        &env,
    )
    .await?;
    let msgs = notify.collect(Duration::from_secs(6)).await;
    assert!(
        pings(&msgs) >= 3,
        "pings: {msgs:?}\n{}",
        daemon.log_tail(30)
    );
    assert!(
        msgs.iter()
            .filter(|m| m.contains("WATCHDOG=1"))
            .all(|m| m.contains("EXTEND_TIMEOUT_USEC=2000000")),
        "{msgs:?}"
    );
    assert!(!msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    daemon.terminate(Duration::from_secs(60)).await?;
    notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .await?;
    Ok(())
}
