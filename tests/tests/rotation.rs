//! Rotating TLS certificates against the real daemons (real RabbitMQ, real TLS), without a
//! restart of the daemon whose certificate changes:
//!
//! * Bank B's float gets a renewed certificate and a SIGHUP: a new client handshake sees the
//!   new certificate while Bank A's established link keeps delivering (same connection,
//!   nothing lost, nothing duplicated);
//! * a certificate that does not match the key in force is refused (found by polling,
//!   logged once, counted in `/metrics`), and the float keeps serving with the old one;
//! * Bank A's bridge gets a renewed client certificate and a SIGHUP: its next connection to
//!   the float presents it.
//!
//! Renewed certificates come from the nodes' own node CAs (`devpki::issue_tls_cert`), written
//! over the live files as an operator would.

use std::time::Duration;

use anyhow::{Context, Result};
use drawbridge_certs::{client_config, devpki, load_trust_roots, CertInfo, TlsIdentity, TlsPolicy};
use drawbridge_testkit::{
    daemon::Daemon,
    fixtures::{send_and_receive, two_orgs},
    world::Org,
};

/// SIGHUP only: the files are not polled within a test's lifetime, so a reload proves the
/// signal was handled.
const SIGHUP_ONLY: &str = "tls_reload_interval = \"1h\"\n";

struct World {
    a: Org,
    b: Org,
    dir: tempfile::TempDir,
}

async fn world() -> Result<World> {
    let w = two_orgs().await?;
    Ok(World {
        a: w.a,
        b: w.b,
        dir: w.dir,
    })
}

/// Sends `count` messages from `from` to `to` and returns how many reached `to`'s inbox
/// within `idle` of silence; fails on any duplicate or corrupted one.
async fn send(from: &Org, to: &Org, run: &str, count: u64, idle: Duration) -> Result<u64> {
    let r = send_and_receive(from, to, run, count, idle).await?;
    anyhow::ensure!(
        r.duplicates + r.corrupted + r.unexpected == 0,
        "run {run}: {r:?}"
    );
    Ok(r.received)
}

async fn wait_log(d: &Daemon, needles: &[&str], within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if count_log(d, needles) > 0 {
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

fn count_log(d: &Daemon, needles: &[&str]) -> usize {
    std::fs::read_to_string(d.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Copies `from` over `to` atomically, keeping `from`'s mode (a key stays 0600), as an
/// operator installing a file should.
fn install(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let tmp = to.with_extension("installing");
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// Serial of `who`'s live certificate file.
fn file_serial(who: &Org) -> Result<String> {
    let identity = TlsIdentity::load(&who.files.tls_cert, &who.files.tls_key)?;
    Ok(identity.leaf_info()?.serial)
}

/// The serial of the certificate `float_of`'s float presents to a new TLS client (a new
/// bridge connection, as `client`'s bridge would make it: same identity, roots and pin).
async fn serial_seen_by_a_new_client(client: &Org, float_of: &Org) -> Result<String> {
    let identity = TlsIdentity::load(&client.files.tls_cert, &client.files.tls_key)?;
    let roots = load_trust_roots(&client.files.root_cert)?;
    let config = client_config(
        &identity,
        roots,
        vec![float_of.files.legal_name.clone()],
        TlsPolicy::default(),
    )?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", float_of.float_port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the float presented no certificate")?;
    Ok(CertInfo::of(leaf)?.serial)
}

/// The link's view in the bridge's `/status`.
async fn link_view(org: &Org, queue: &str) -> Result<serde_json::Value> {
    let status = org.bridge.as_ref().context("bridge")?.status().await?;
    status["links"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["queue"] == queue))
        .cloned()
        .context("link not in status")
}

/// The float's open connections from `/status`.
async fn float_connections(org: &Org) -> Result<Vec<serde_json::Value>> {
    let status = org.float.as_ref().context("float")?.status().await?;
    Ok(status["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Starts B's float and A's bridge with a link A → B, up and delivering.
async fn linked(w: &mut World, float_extra: &str, bridge_extra: &str) -> Result<String> {
    w.b.start_float(float_extra).await?;
    w.a.start_bridge(bridge_extra).await?;
    let queue = w.a.queue_to(&w.b);
    Ok(queue)
}

#[tokio::test]
async fn the_float_takes_a_renewed_certificate_on_sighup_and_keeps_its_links() -> Result<()> {
    let mut w = world().await?;
    let queue = linked(&mut w, SIGHUP_ONLY, "").await?;
    let _responder =
        w.a.answer_snapshot_requests(vec![w.a.link_to(&w.b)])
            .await?;
    w.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;
    assert_eq!(
        send(&w.a, &w.b, "before", 20, Duration::from_secs(20)).await?,
        20
    );
    let old = file_serial(&w.b)?;
    assert_eq!(serial_seen_by_a_new_client(&w.a, &w.b).await?, old);
    let float = w.b.float.as_ref().context("float")?;
    let before = float.status().await?;
    assert_eq!(before["tls"]["serial"], old.as_str(), "{before}");
    let connects = link_view(&w.a, &queue).await?["connects"].clone();
    let conns = float_connections(&w.b).await?;
    assert_eq!(conns.len(), 1, "{conns:?}");

    // B's node CA renews B's certificate (30 days instead of two years), written over the
    // live files; then SIGHUP.
    devpki::issue_tls_cert(&w.b.files, &w.b.files.tls_cert, &w.b.files.tls_key, 30)?;
    let new = file_serial(&w.b)?;
    assert_ne!(new, old);
    float.hangup()?;
    wait_log(
        float,
        &["TLS certificate, key and trust roots reloaded", &new],
        Duration::from_secs(10),
    )
    .await?;

    // A new connection gets the new certificate; /status says so.
    assert_eq!(serial_seen_by_a_new_client(&w.a, &w.b).await?, new);
    let after = float.status().await?;
    assert_eq!(after["tls"]["serial"], new.as_str(), "{after}");
    assert_ne!(after["tls"]["not_after"], before["tls"]["not_after"]);
    assert_eq!(after["tls"]["last_reload_result"], "ok", "{after}");
    assert!(
        after["tls"]["last_reload_unix_ms"].as_u64().is_some(),
        "{after}"
    );
    let metrics = float.metrics().await?;
    assert!(
        metrics.contains("drawbridge_float_tls_reload_total{result=\"ok\"} 1"),
        "{metrics}"
    );

    // The established link was not touched: same connection, and it keeps delivering.
    assert_eq!(
        send(&w.a, &w.b, "after", 20, Duration::from_secs(20)).await?,
        20
    );
    let view = link_view(&w.a, &queue).await?;
    assert_eq!(view["state"], "up", "{view}");
    assert_eq!(view["connects"], connects, "the link reconnected: {view}");
    let conns_after = float_connections(&w.b).await?;
    assert_eq!(
        conns_after
            .iter()
            .map(|c| &c["since_unix_ms"])
            .collect::<Vec<_>>(),
        conns
            .iter()
            .map(|c| &c["since_unix_ms"])
            .collect::<Vec<_>>(),
        "the float's connection changed"
    );
    Ok(())
}

#[tokio::test]
async fn the_float_refuses_a_certificate_that_does_not_match_its_key() -> Result<()> {
    let mut w = world().await?;
    // Polled every 200ms: the bad file is found without a signal, and must be logged and
    // counted once however many polls see it.
    let queue = linked(&mut w, "tls_reload_interval = \"200ms\"\n", "").await?;
    let _responder =
        w.a.answer_snapshot_requests(vec![w.a.link_to(&w.b)])
            .await?;
    w.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;
    let old = file_serial(&w.b)?;

    // A renewed certificate is copied in, but its key is not.
    let elsewhere = w.dir.path().join("renewed-b");
    std::fs::create_dir_all(&elsewhere)?;
    let (cert, key) = (elsewhere.join("tls.crt"), elsewhere.join("tls.key"));
    devpki::issue_tls_cert(&w.b.files, &cert, &key, 30)?;
    install(&cert, &w.b.files.tls_cert)?;
    let float = w.b.float.as_ref().context("float")?;
    let refused = ["TLS reload refused", "does not belong"];
    wait_log(float, &refused, Duration::from_secs(10)).await?;
    // Many more polls see the same bad file: no more lines, no more counts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count_log(float, &refused), 1, "{}", float.log_tail(20));
    let metrics = float.metrics().await?;
    assert!(
        metrics.contains("drawbridge_float_tls_reload_total{result=\"refused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("drawbridge_float_tls_reload_total{result=\"ok\"} 0"),
        "{metrics}"
    );
    let status = float.status().await?;
    assert_eq!(status["tls"]["serial"], old.as_str(), "{status}");
    assert_eq!(status["tls"]["last_reload_result"], "refused", "{status}");
    let reason = status["tls"]["last_refusal"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("does not belong"), "{status}");

    // The float keeps serving with the old certificate: new handshakes and the link.
    assert_eq!(serial_seen_by_a_new_client(&w.a, &w.b).await?, old);
    assert_eq!(
        send(&w.a, &w.b, "meanwhile", 20, Duration::from_secs(20)).await?,
        20
    );

    // A SIGHUP retries (and says so again); once the key arrives the pair is taken.
    float.hangup()?;
    wait_log(float, &["SIGHUP received"], Duration::from_secs(10)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count_log(float, &refused) < 2 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "SIGHUP not retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    install(&key, &w.b.files.tls_key)?;
    let new = file_serial(&w.b)?;
    wait_log(
        float,
        &["TLS certificate, key and trust roots reloaded", &new],
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(serial_seen_by_a_new_client(&w.a, &w.b).await?, new);
    Ok(())
}

#[tokio::test]
async fn the_bridge_presents_its_renewed_certificate_on_its_next_connection() -> Result<()> {
    let mut w = world().await?;
    let queue = linked(&mut w, "", SIGHUP_ONLY).await?;
    let _responder =
        w.a.answer_snapshot_requests(vec![w.a.link_to(&w.b)])
            .await?;
    w.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;
    assert_eq!(
        send(&w.a, &w.b, "before", 10, Duration::from_secs(20)).await?,
        10
    );
    let old = file_serial(&w.a)?;
    let conns = float_connections(&w.b).await?;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["cert_serial"], old.as_str(), "{conns:?}");

    devpki::issue_tls_cert(&w.a.files, &w.a.files.tls_cert, &w.a.files.tls_key, 30)?;
    let new = file_serial(&w.a)?;
    let bridge = w.a.bridge.as_ref().context("bridge")?;
    bridge.hangup()?;
    wait_log(
        bridge,
        &["TLS certificate, key and trust roots reloaded", &new],
        Duration::from_secs(10),
    )
    .await?;
    let status = bridge.status().await?;
    assert_eq!(status["tls"]["serial"], new.as_str(), "{status}");
    assert!(
        bridge
            .metrics()
            .await?
            .contains("drawbridge_bridge_tls_reload_total{result=\"ok\"} 1"),
        "no ok reload in the bridge's metrics"
    );
    // The established connection keeps the certificate it authenticated with.
    let conns = float_connections(&w.b).await?;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["cert_serial"], old.as_str(), "{conns:?}");

    // The float restarts: the link's next connection presents the new certificate.
    let float = w.b.float.as_mut().context("float")?;
    float.terminate(Duration::from_secs(20)).await?;
    float.restart().await?;
    float.wait_ready(Duration::from_secs(30)).await?;
    w.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let conns = loop {
        let conns = float_connections(&w.b).await?;
        if !conns.is_empty() || tokio::time::Instant::now() > deadline {
            break conns;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["cert_serial"], new.as_str(), "{conns:?}");
    let float = w.b.float.as_ref().context("float")?;
    wait_log(
        float,
        &["peer connected", &format!("cert_serial={new}")],
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(
        send(&w.a, &w.b, "after", 10, Duration::from_secs(20)).await?,
        10
    );
    Ok(())
}
