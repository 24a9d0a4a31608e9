//! Revocation at runtime against the real daemons (real RabbitMQ, real TLS, CRL files made by
//! the dev network's CAs and replaced while the daemons run — no restart of the checking
//! side):
//!
//! * Bank B's float (default mode with a CRL configured: soft-fail) refuses Bank A's bridge
//!   once A's node CA's CRL, rewritten at runtime, lists A's TLS certificate;
//! * Bank A's bridge (hard-fail, root CRL + B's node CA CRL) closes its established link to
//!   Bank B's float when B's TLS certificate is revoked at runtime, and does not get it back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use drawbridge_certs::devpki::{self, make_crl, replace_file, CrlSpec, DevNetwork, NodeFiles};
use drawbridge_testkit::{
    daemon::Daemon,
    rabbit::shared_node,
    stream::{self, PublishSpec, Tally},
    world::{self, Org, INBOX},
};

const BANK_A: &str = "O=Bank A, L=London, C=GB";
const BANK_B: &str = "O=Bank B, L=Paris, C=FR";

struct World {
    a: Org,
    b: Org,
    net: DevNetwork,
    crl_dir: PathBuf,
    _dir: tempfile::TempDir,
}

async fn world() -> Result<World> {
    drawbridge_certs::install_crypto_provider();
    let node = shared_node().await;
    let dir = tempfile::tempdir()?;
    let net =
        devpki::generate_network(&dir.path().join("pki"), &[BANK_A.parse()?, BANK_B.parse()?])?;
    let va = node.fresh_vhost().await?;
    let vb = node.fresh_vhost().await?;
    let a = Org::new(net.nodes[0].clone(), vec![node.amqp_uri(&va)], dir.path());
    let b = Org::new(net.nodes[1].clone(), vec![node.amqp_uri(&vb)], dir.path());
    let crl_dir = dir.path().join("crls");
    std::fs::create_dir_all(&crl_dir)?;
    Ok(World {
        a,
        b,
        net,
        crl_dir,
        _dir: dir,
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
    let (_c, ch) = from.channel().await?;
    let spec = PublishSpec {
        run: run.into(),
        from: 0,
        to: count,
        size: 256,
        destination: to.legal_name.clone(),
        headers: vec![],
    };
    stream::publish(&ch, &from.queue_to(to), &spec, |_| {}).await?;
    let (_c, ch) = to.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    let mut tally = Tally::new(run, count, Some(from.legal_name.clone()));
    stream::consume(&ch, INBOX, &mut tally, idle, |_| {}).await?;
    let r = tally.report();
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
