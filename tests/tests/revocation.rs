//! Revocation at runtime against the real daemons (real RabbitMQ, real TLS, CRL files made by
//! the dev network's CAs and replaced while the daemons run — no restart of the checking
//! side):
//!
//! * Bank B's float (default mode with a CRL configured: soft-fail) refuses Bank A's bridge
//!   once A's node CA's CRL, rewritten at runtime, lists A's TLS certificate;
//! * Bank A's bridge (hard-fail, root CRL + B's node CA CRL) closes its established link to
//!   Bank B's float when B's TLS certificate is revoked at runtime, and does not get it back;
//! * a float re-verifies an established peer's chain once per connection (and per CRL change),
//!   not once per AMQP session the peer begins;
//! * certificates that pass their `notAfter` while connected: the float disconnects the
//!   client, the bridge drops the link and its reconnects fail at the handshake.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use drawbridge_certs::devpki::{self, make_crl, replace_file, CrlSpec, DevNetwork, NodeFiles};
use drawbridge_control_protocol::Target;
use drawbridge_testkit::fe2o3_peer::{self as peer, PeerSettings};
use drawbridge_testkit::{
    daemon::Daemon,
    fixtures::{send_and_receive, two_orgs},
    peer_client::peer_settings,
    world::Org,
    BANK_B,
};

struct World {
    a: Org,
    b: Org,
    net: DevNetwork,
    crl_dir: PathBuf,
    _dir: tempfile::TempDir,
}

async fn world() -> Result<World> {
    let w = two_orgs().await?;
    let crl_dir = w.dir.path().join("crls");
    std::fs::create_dir_all(&crl_dir)?;
    Ok(World {
        a: w.a,
        b: w.b,
        net: w.net,
        crl_dir,
        _dir: w.dir,
    })
}

impl World {
    /// (Re)writes `file` with the CRL of `node`'s node CA, atomically.
    fn node_crl(&self, node: &NodeFiles, file: &str, spec: &CrlSpec) -> Result<PathBuf> {
        let pem = make_crl(&node.node_ca_cert, &node.dir.join("node-ca.key"), spec)?;
        let path = self.crl_dir.join(file);
        replace_file(&path, &pem)?;
        Ok(path)
    }

    /// Writes `file` with the root's CRL.
    fn root_crl(&self, file: &str, spec: &CrlSpec) -> Result<PathBuf> {
        let root_dir = self.net.root_cert.parent().context("root dir")?;
        let pem = make_crl(&self.net.root_cert, &root_dir.join("ca.key"), spec)?;
        let path = self.crl_dir.join(file);
        replace_file(&path, &pem)?;
        Ok(path)
    }
}

fn crl_lines(files: &[&Path]) -> String {
    let list: Vec<String> = files
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    format!(
        "crls = [{}]\ncrl_reload_interval = \"200ms\"\n",
        list.join(", ")
    )
}

/// Sends `count` messages from `from` to `to` (through `from`'s bridge and `to`'s float) and
/// returns how many reached `to`'s inbox within `idle` of silence.
async fn send(from: &Org, to: &Org, run: &str, count: u64, idle: Duration) -> Result<u64> {
    let r = send_and_receive(from, to, run, count, idle).await?;
    assert_eq!(r.duplicates + r.corrupted + r.unexpected, 0, "{r:?}");
    Ok(r.received)
}

async fn wait_log(d: &Daemon, needles: &[&str], within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let tail = d.log_tail(400);
        if tail.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no log line with {needles:?} within {within:?}:\n{}",
            d.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_float_disconnects_and_refuses_a_client_revoked_at_runtime() -> Result<()> {
    let mut w = world().await?;
    // B's float trusts A's node CA's CRL, which revokes nothing yet. No `revocation` key: a
    // configured CRL means soft-fail.
    let a_node = w.a.files.clone();
    let crl = w.node_crl(&a_node, "a.crl", &CrlSpec::current(&[], 1))?;
    w.b.start_float(&crl_lines(&[&crl])).await?;
    w.a.start_bridge("").await?;
    let _responder =
        w.a.answer_snapshot_requests(vec![w.a.link_to(&w.b)])
            .await?;
    let queue = w.a.queue_to(&w.b);
    w.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;
    assert_eq!(
        send(&w.a, &w.b, "before", 20, Duration::from_secs(20)).await?,
        20
    );
    let float = w.b.float.as_ref().context("float")?;
    let status = float.status().await?;
    assert_eq!(status["revocation"]["mode"], "soft-fail", "{status}");

    // A's node CA revokes A's TLS certificate: the file is replaced, the float is not
    // restarted.
    w.node_crl(&a_node, "a.crl", &CrlSpec::current(&[&a_node.tls_cert], 2))?;
    wait_log(
        float,
        &["CRL file changed; reloaded"],
        Duration::from_secs(10),
    )
    .await?;

    // The established connection is re-checked and dropped, without a restart of anything;
    // the bridge's reconnects are then refused at the handshake.
    wait_log(
        float,
        &["peer disconnected: revoked after a CRL change"],
        Duration::from_secs(30),
    )
    .await?;
    wait_log(
        float,
        &["TLS handshake refused", "Revoked"],
        Duration::from_secs(30),
    )
    .await?;
    let link =
        w.a.wait_link_state(&queue, "down", Duration::from_secs(30))
            .await?;
    // Nothing gets through any more.
    assert_eq!(
        send(&w.a, &w.b, "after", 5, Duration::from_secs(4)).await?,
        0,
        "a revoked client delivered; link: {link}"
    );
    Ok(())
}

#[tokio::test]
async fn the_bridge_disconnects_a_float_revoked_at_runtime() -> Result<()> {
    let mut w = world().await?;
    // A's bridge, in hard-fail: the root's CRL covers the node CAs, B's node CA's CRL covers
    // B's TLS certificate; neither revokes anything yet.
    let b_node = w.b.files.clone();
    let root = w.root_crl("root.crl", &CrlSpec::current(&[], 1))?;
    let b_crl = w.node_crl(&b_node, "b.crl", &CrlSpec::current(&[], 1))?;
    w.b.start_float("").await?;
    w.a.start_bridge(&format!(
        "revocation = \"hard-fail\"\n{}",
        crl_lines(&[&root, &b_crl])
    ))
    .await?;
    let _responder =
        w.a.answer_snapshot_requests(vec![w.a.link_to(&w.b)])
            .await?;
    let queue = w.a.queue_to(&w.b);
    w.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;
    assert_eq!(
        send(&w.a, &w.b, "before", 20, Duration::from_secs(20)).await?,
        20
    );

    // B's node CA revokes B's TLS certificate while the link is up.
    w.node_crl(&b_node, "b.crl", &CrlSpec::current(&[&b_node.tls_cert], 2))?;
    let bridge = w.a.bridge.as_ref().context("bridge")?;
    wait_log(
        bridge,
        &["disconnected after a CRL change", BANK_B, "revoked"],
        Duration::from_secs(15),
    )
    .await?;
    w.a.wait_link_state(&queue, "down", Duration::from_secs(10))
        .await?;
    // Reconnecting is refused by the bridge's own verifier, and the link stays down.
    wait_log(
        bridge,
        &["link down: cannot connect", "Revoked"],
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        send(&w.a, &w.b, "after", 5, Duration::from_secs(4)).await?,
        0,
        "messages reached a revoked float"
    );
    let status = bridge.status().await?;
    let link = status["links"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["queue"] == queue.as_str()))
        .cloned()
        .context("link in status")?;
    assert_eq!(link["state"], "down", "{link}");
    assert_eq!(status["revocation"]["mode"], "hard-fail", "{status}");
    Ok(())
}

/// How `from` connects to `to`'s float as a bridge would, presenting `cert` + `key`.
fn client_settings(from: &Org, to: &Org, cert: &Path, key: &Path) -> Result<PeerSettings> {
    peer_settings(from, to, cert, key, "revocation-test", "revocation-test")
}

/// The value of the unlabelled metric `name` (0 when absent).
async fn metric(d: &Daemon, name: &str) -> Result<f64> {
    let text = d.metrics().await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0))
}

/// Issue 21 item 10. Before: the float's connection loop re-verified the peer's whole chain
/// (signatures, validity, every CRL) each time the peer began a session, so a peer churning
/// sessions made the float verify its chain once per session (31 times here). Now the verdict
/// is kept per connection and recomputed only when the CRLs change (or a certificate of the
/// chain reaches its notAfter).
#[tokio::test]
async fn session_churn_verifies_the_chain_once_per_connection() -> Result<()> {
    let mut w = world().await?;
    let a_node = w.a.files.clone();
    let crl = w.node_crl(&a_node, "a.crl", &CrlSpec::current(&[], 1))?;
    w.b.start_float(&crl_lines(&[&crl])).await?;
    let settings = client_settings(&w.a, &w.b, &a_node.tls_cert, &a_node.tls_key)?;
    let target = Target::new("127.0.0.1", w.b.float_port);
    let mut pc = peer::connect(&target, &settings)
        .await
        .map_err(|e| anyhow::anyhow!("connect: {e:?}"))?;
    const CHURN: usize = 30;
    for i in 0..CHURN {
        let mut session = fe2o3_amqp::Session::begin(&mut pc.conn)
            .await
            .with_context(|| format!("session {i}"))?;
        session.end().await.with_context(|| format!("end {i}"))?;
    }
    // One more round trip, so the float has seen every begin.
    let mut session = fe2o3_amqp::Session::begin(&mut pc.conn).await?;
    session.end().await?;
    let float = w.b.float.as_ref().context("float")?;
    let verifications = metric(float, "drawbridge_float_peer_verifications_total").await?;
    pc.close().await;
    assert_eq!(
        verifications,
        1.0,
        "chain verifications of one connection after {} sessions",
        CHURN + 2
    );
    Ok(())
}

/// A certificate of `node` valid until `secs` seconds from now, written over its live files.
fn expire_in(node: &NodeFiles, secs: u64) -> Result<()> {
    let not_after = std::time::SystemTime::now() + Duration::from_secs(secs);
    devpki::issue_tls_cert_until(node, &node.tls_cert, &node.tls_key, not_after)?;
    Ok(())
}

/// Issue 21 item 13 (float). Before: a client whose certificate passed its notAfter while
/// connected stayed connected (only revocation was re-checked). Now the float disconnects it
/// at notAfter, and its reconnect fails at the handshake.
#[tokio::test]
async fn the_float_disconnects_a_client_whose_certificate_expires() -> Result<()> {
    let mut w = world().await?;
    w.b.start_float("").await?;
    let a_node = w.a.files.clone();
    // A short-lived certificate for A, beside its regular files.
    let short = NodeFiles {
        tls_cert: w.crl_dir.join("a-short.crt"),
        tls_key: w.crl_dir.join("a-short.key"),
        ..a_node.clone()
    };
    let not_after = std::time::SystemTime::now() + Duration::from_secs(6);
    devpki::issue_tls_cert_until(&short, &short.tls_cert, &short.tls_key, not_after)?;
    let settings = client_settings(&w.a, &w.b, &short.tls_cert, &short.tls_key)?;
    let target = Target::new("127.0.0.1", w.b.float_port);
    let mut pc = peer::connect(&target, &settings)
        .await
        .map_err(|e| anyhow::anyhow!("connect: {e:?}"))?;
    let closed = tokio::time::timeout(Duration::from_secs(25), pc.conn.on_close()).await;
    anyhow::ensure!(
        closed.is_ok(),
        "the float kept a client whose certificate expired"
    );
    anyhow::ensure!(
        std::time::SystemTime::now() >= not_after,
        "closed before notAfter: {closed:?}"
    );
    let float = w.b.float.as_ref().context("float")?;
    wait_log(
        float,
        &["peer disconnected: certificate expired", "Bank A"],
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(
        metric(float, "drawbridge_float_connections_expired_total").await?,
        1.0
    );
    // Reconnecting with it fails at the handshake.
    let again = peer::connect(&target, &settings).await;
    anyhow::ensure!(again.is_err(), "an expired certificate connected again");
    wait_log(
        float,
        &["TLS handshake refused", "xpired"],
        Duration::from_secs(10),
    )
    .await?;
    Ok(())
}

/// Issue 21 item 13 (bridge). Before: the bridge kept forwarding over a connection whose
/// float certificate had passed its notAfter. Now it drops the link at notAfter; reconnecting
/// fails at the handshake, with the reason logged, and the link stays down.
#[tokio::test]
async fn the_bridge_drops_a_link_whose_float_certificate_expires() -> Result<()> {
    let mut w = world().await?;
    let b_node = w.b.files.clone();
    let lifetime = 30;
    let not_after = std::time::SystemTime::now() + Duration::from_secs(lifetime);
    expire_in(&b_node, lifetime)?;
    w.b.start_float("").await?;
    w.a.start_bridge("").await?;
    let _responder =
        w.a.answer_snapshot_requests(vec![w.a.link_to(&w.b)])
            .await?;
    let queue = w.a.queue_to(&w.b);
    w.a.wait_link_state(&queue, "up", Duration::from_secs(25))
        .await?;
    anyhow::ensure!(
        std::time::SystemTime::now() < not_after,
        "the link came up too late for this test"
    );
    let bridge = w.a.bridge.as_ref().context("bridge")?;
    wait_log(
        bridge,
        &["disconnected", BANK_B, "expired"],
        Duration::from_secs(lifetime + 15),
    )
    .await?;
    anyhow::ensure!(std::time::SystemTime::now() >= not_after);
    w.a.wait_link_state(&queue, "down", Duration::from_secs(10))
        .await?;
    wait_log(
        bridge,
        &["link down: cannot connect", "xpired"],
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        send(&w.a, &w.b, "after", 3, Duration::from_secs(4)).await?,
        0,
        "messages reached a float whose certificate expired"
    );
    Ok(())
}
