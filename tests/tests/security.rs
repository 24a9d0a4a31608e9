//! Identity attacks against the real daemons (real RabbitMQ, real TLS).
//!
//! Every member holds its node CA key beside its files, and a CA can sign any subject. Bank B
//! uses its node CA to issue itself a TLS certificate for Bank C's legal name. A certificate
//! speaks for legal name X only if it is issued by a node CA whose subject is X (see
//! docs/security.md), so:
//!
//! * Bank A's float refuses a client presenting the forgery (otherwise it would stamp
//!   `drawbridge-sender = Bank C` on Bank B's messages);
//! * Bank A's bridge, pinning its link to Bank C, refuses a float presenting the forgery
//!   (otherwise it would deliver Bank C's messages to Bank B).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use drawbridge_certs::devpki::{self, NodeFiles};
use drawbridge_certs::LegalName;
use drawbridge_testkit::{
    proton::{self, SendOptions, TlsFiles},
    rabbit::{shared_node, RabbitNode},
    stream::{self, PublishSpec},
    world::{self, Org, INBOX},
    BANK_A, BANK_B,
};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

/// The identity Bank B forges: not the kit's `BANK_C` (Berlin), kept as this file wrote it.
const BANK_C: &str = "O=Bank C, L=New York, C=US";

struct World {
    node: &'static RabbitNode,
    /// Bank A: the victim's float and bridge, on vhost `vhost_a`.
    a: Org,
    vhost_a: String,
    /// Bank B's genuine files (the attacker's own identity).
    b: NodeFiles,
    /// A vhost for whatever Bank B runs.
    vhost_b: String,
    /// Bank B's forged identity "Bank C": a leaf issued by B's node CA.
    forged_c: NodeFiles,
    dir: tempfile::TempDir,
}

async fn world() -> Result<World> {
    drawbridge_certs::install_crypto_provider();
    let node = shared_node().await;
    let dir = tempfile::tempdir()?;
    let names = [BANK_A.parse()?, BANK_B.parse()?, BANK_C.parse()?];
    let net = devpki::generate_network(&dir.path().join("pki"), &names)?;
    let vhost_a = node.fresh_vhost().await?;
    let vhost_b = node.fresh_vhost().await?;
    let a = Org::new(
        net.nodes[0].clone(),
        vec![node.amqp_uri(&vhost_a)],
        dir.path(),
    );
    let b = net.nodes[1].clone();
    let forged_c = forge(&b, &BANK_C.parse()?, &dir.path().join("forged"))?;
    Ok(World {
        node,
        a,
        vhost_a,
        b,
        vhost_b,
        forged_c,
        dir,
    })
}

/// What a member can do with its own node CA key: issue a TLS certificate (serverAuth +
/// clientAuth) with any subject. Written as the dev PKI writes a node's files: `tls.crt`
/// holds the leaf then the issuing node CA, `tls.key` the leaf's key.
fn forge(issuer: &NodeFiles, claimed: &LegalName, dir: &Path) -> Result<NodeFiles> {
    let ca_pem = std::fs::read_to_string(&issuer.node_ca_cert)?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(issuer.dir.join("node-ca.key"))?)?;
    let ca = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for part in claimed.to_string().split(", ") {
        let (k, v) = part.split_once('=').context("KEY=VALUE")?;
        let t = match k {
            "O" => DnType::OrganizationName,
            "L" => DnType::LocalityName,
            "C" => DnType::CountryName,
            other => bail!("attribute {other} not handled here"),
        };
        dn.push(t, v);
    }
    p.distinguished_name = dn;
    p.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let leaf = p.signed_by(&key, &ca)?;

    std::fs::create_dir_all(dir)?;
    let files = NodeFiles {
        legal_name: claimed.clone(),
        dir: dir.to_owned(),
        tls_cert: dir.join("tls.crt"),
        tls_key: dir.join("tls.key"),
        root_cert: issuer.root_cert.clone(),
        node_ca_cert: issuer.node_ca_cert.clone(),
    };
    std::fs::write(&files.tls_cert, format!("{}{ca_pem}", leaf.pem()))?;
    drawbridge_testkit::rabbit::write_private(&files.tls_key, &key.serialize_pem())?;
    Ok(files)
}

fn tls(files: &NodeFiles) -> TlsFiles {
    TlsFiles {
        cert: files.tls_cert.clone(),
        key: files.tls_key.clone(),
        ca: files.root_cert.clone(),
    }
}

/// Take everything in `queue` (waiting up to `within` for at least `n`).
async fn drain(org: &Org, queue: &str, n: usize, within: Duration) -> Result<Vec<String>> {
    let (_c, ch) = org.channel().await?;
    world::declare_queue(&ch, queue).await?;
    let mut senders = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match ch
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await?
        {
            Some(m) => senders.push(
                stream::header_string(
                    m.delivery.properties.headers().as_ref(),
                    "drawbridge-sender",
                )
                .unwrap_or_default(),
            ),
            None if senders.len() >= n || tokio::time::Instant::now() > deadline => {
                return Ok(senders)
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Bank B sends to Bank A's float with Proton, first as itself (accepted, stamped Bank B),
/// then with the forged Bank C certificate: refused at the TLS handshake, logged with both
/// names, nothing published.
#[tokio::test]
async fn float_refuses_a_client_whose_name_was_issued_by_another_members_node_ca() -> Result<()> {
    let mut w = world().await?;
    assert!(
        proton::available(),
        "python3-qpid-proton is missing: run scripts/install-deps.sh"
    );
    w.a.start_float("").await?;
    let url = format!("amqps://127.0.0.1:{}", w.a.float_port);

    let genuine = proton::send(&SendOptions::new(url.clone(), tls(&w.b), 3, BANK_A)).await?;
    assert_eq!(genuine.accepted, 3, "{genuine:?}");

    let mut forged = SendOptions::new(url, tls(&w.forged_c), 3, BANK_A);
    forged.id_prefix = Some("forged-".into());
    forged.timeout_secs = 10;
    let refused = proton::send(&forged).await;
    let float = w.a.float.as_ref().context("float")?;
    assert!(
        refused.is_err(),
        "the float accepted Bank B's certificate for Bank C: {refused:?}\nfloat log:\n{}",
        float.log_tail(20)
    );

    // The float says why, naming the claimed name and the CA that issued it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(float.log_path())?;
        let refusal = log
            .lines()
            .find(|l| l.contains("TLS handshake refused") && l.contains(BANK_C))
            .map(str::to_owned);
        match refusal {
            Some(line) => break line,
            None if tokio::time::Instant::now() > deadline => {
                bail!("no refusal naming {BANK_C} in the float log:\n{log}")
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    eprintln!("float log: {log}");
    assert!(
        log.contains(BANK_B) && log.contains("node CA"),
        "the refusal should name the issuing node CA: {log}"
    );

    // Only Bank B's genuine messages reached Bank A's inbox, stamped Bank B.
    let senders = drain(&w.a, INBOX, 3, Duration::from_secs(10)).await?;
    assert_eq!(senders, vec![BANK_B.to_string(); 3]);
    Ok(())
}

/// Bank A's node asks its bridge for a link to Bank C; the target is a float Bank B runs with
/// the forged Bank C certificate. The bridge must refuse the handshake (link down, reason
/// naming both names), deliver nothing, and keep the messages in the peer queue.
#[tokio::test]
async fn bridge_refuses_a_float_whose_name_was_issued_by_another_members_node_ca() -> Result<()> {
    let mut w = world().await?;
    let mut mallory = Org::new(
        w.forged_c.clone(),
        vec![w.node.amqp_uri(&w.vhost_b)],
        &w.dir.path().join("mallory"),
    );
    mallory.start_float("").await?;
    w.a.start_bridge("").await?;

    // A link pinned to Bank C whose target is Bank B's float.
    let link = w.a.link_to(&mallory);
    assert_eq!(link.legal_names, vec![BANK_C.to_string()]);
    w.a.create_link_to(&mallory).await?;
    let (_c, ch) = w.a.channel().await?;
    world::declare_peer_queue(&ch, &link.queue, "classic").await?;
    let spec = PublishSpec {
        run: "sec".into(),
        from: 0,
        to: 3,
        size: 100,
        destination: BANK_C.into(),
        headers: vec![],
    };
    stream::publish(&ch, &link.queue, &spec, |_| {}).await?;

    // The link is down with the reason in /status, the notify event and the log.
    let bridge = w.a.bridge.as_ref().context("bridge")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let reason = loop {
        let status = bridge.status().await?;
        let l = status["links"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["queue"] == link.queue.as_str()))
            .cloned()
            .unwrap_or_default();
        if l["state"] == "up" {
            bail!(
                "the bridge accepted Bank B's float as Bank C: {l}\nlog:\n{}",
                bridge.log_tail(20)
            );
        }
        let reason = l["reason"].as_str().unwrap_or_default().to_string();
        if l["state"] == "down" && reason.contains("node CA") {
            break reason;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "link not refused within 30 s: {l}\nlog:\n{}",
                bridge.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("bridge link reason: {reason}");
    assert!(
        reason.contains(BANK_C) && reason.contains(BANK_B),
        "the refusal should name the claimed name and the issuing node CA: {reason}"
    );
    assert!(
        bridge.log_contains("link down: cannot connect") && bridge.log_contains(BANK_B),
        "the bridge log should carry the reason:\n{}",
        bridge.log_tail(20)
    );

    // Nothing left Bank A: the messages wait in the peer queue, Bank B's inbox is empty.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.node.queue_depth(&w.vhost_a, &link.queue).await?, 3);
    let delivered = drain(&mallory, INBOX, 0, Duration::ZERO).await?;
    assert!(
        delivered.is_empty(),
        "Bank B received {} message(s)",
        delivered.len()
    );
    Ok(())
}
