//! Revocation on real mutual-TLS handshakes, both ends: the float's acceptor
//! (`server_config_with`) judging bridges, and the bridge's connector (`client_config_with`)
//! judging floats, in each mode, with CRLs made by the dev network's CAs.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drawbridge_certs::devpki::{
    generate_network, make_crl, replace_file, CrlSpec, DevNetwork, NodeFiles,
};
use drawbridge_certs::{
    client_config_with, install_crypto_provider, load_trust_roots, server_config_with, LegalName,
    PeerRole, Revocation, RevocationMode, RevocationSettings, TlsIdentity, TlsPolicy,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const BANK_A: &str = "O=Bank A, L=London, C=GB";
const BANK_B: &str = "O=Bank B, L=Paris, C=FR";
const BANK_C: &str = "O=Bank C, L=New York, C=US";

fn name(s: &str) -> LegalName {
    s.parse().unwrap()
}

struct Net {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    net: DevNetwork,
}

impl Net {
    fn new() -> Net {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let net =
            generate_network(dir.path(), &[name(BANK_A), name(BANK_B), name(BANK_C)]).unwrap();
        Net {
            dir: dir.path().to_owned(),
            _dir: dir,
            net,
        }
    }

    fn a(&self) -> &NodeFiles {
        &self.net.nodes[0]
    }
    fn b(&self) -> &NodeFiles {
        &self.net.nodes[1]
    }
    fn c(&self) -> &NodeFiles {
        &self.net.nodes[2]
    }

    /// Writes the CRL of the network root to `file`.
    fn root_crl(&self, file: &str, spec: &CrlSpec) -> PathBuf {
        let root_dir = self.net.root_cert.parent().unwrap();
        let pem = make_crl(&self.net.root_cert, &root_dir.join("ca.key"), spec).unwrap();
        let path = self.dir.join(file);
        replace_file(&path, &pem).unwrap();
        path
    }

    /// Writes the CRL of `node`'s node CA to `file`.
    fn node_crl(&self, node: &NodeFiles, file: &str, spec: &CrlSpec) -> PathBuf {
        let pem = make_crl(&node.node_ca_cert, &node.dir.join("node-ca.key"), spec).unwrap();
        let path = self.dir.join(file);
        replace_file(&path, &pem).unwrap();
        path
    }

    fn revocation(&self, mode: RevocationMode, crls: &[&Path]) -> Revocation {
        Revocation::load(
            load_trust_roots(&self.net.root_cert).unwrap(),
            RevocationSettings {
                mode,
                crl_files: crls.iter().map(|p| p.to_path_buf()).collect(),
                ..RevocationSettings::default()
            },
        )
        .unwrap()
    }
}

fn identity(node: &NodeFiles) -> TlsIdentity {
    TlsIdentity::load(&node.tls_cert, &node.tls_key).unwrap()
}

/// The float's side: `node` accepting bridges, checking them with `revocation`.
fn float(node: &NodeFiles, revocation: &Revocation) -> Arc<ServerConfig> {
    server_config_with(&identity(node), revocation, TlsPolicy::default()).unwrap()
}

/// The bridge's side: `node` connecting to a float it expects to be `expected`.
fn bridge(node: &NodeFiles, revocation: &Revocation, expected: &str) -> Arc<ClientConfig> {
    client_config_with(
        &identity(node),
        revocation,
        vec![name(expected)],
        TlsPolicy::default(),
    )
    .unwrap()
    .0
}

/// No revocation checking on this side (the other side is under test).
fn off(net: &Net) -> Revocation {
    net.revocation(RevocationMode::Off, &[])
}

/// One handshake plus a byte each way; `Ok(())` on both sides or each side's error text.
async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> (Result<(), String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"s").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(())
    });
    let client_result = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let sni = ServerName::try_from("float.example").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(sni, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"c").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    (client_result, server_task.await.unwrap())
}

/// What the float (checking with `revocation`) says of bridge `client`.
async fn float_says(net: &Net, client: &NodeFiles, revocation: &Revocation) -> Result<(), String> {
    let (_, server) = handshake(
        bridge(client, &off(net), BANK_B),
        float(net.b(), revocation),
    )
    .await;
    server
}

/// What the bridge (checking with `revocation`) says of float `server`.
async fn bridge_says(net: &Net, server: &NodeFiles, revocation: &Revocation) -> Result<(), String> {
    let expected = server.legal_name.to_string();
    let (client, _) = handshake(
        bridge(net.a(), revocation, &expected),
        float(server, &off(net)),
    )
    .await;
    client
}

fn assert_refused(result: Result<(), String>, needle: &str) {
    let err = result.expect_err("expected a refusal");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

fn chain(node: &NodeFiles) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    identity(node).cert_chain
}

#[tokio::test]
async fn soft_fail_refuses_listed_and_accepts_unknown_on_both_sides() {
    let net = Net::new();
    // B's node CA revokes B's TLS certificate; C's node CA publishes nothing.
    let b_crl = net.node_crl(net.b(), "b.crl", &CrlSpec::current(&[&net.b().tls_cert], 1));
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[&net.a().tls_cert], 1));
    let r = net.revocation(RevocationMode::SoftFail, &[&a_crl, &b_crl]);

    // Float side: bridge A revoked, bridge C (no CRL from its issuer) accepted.
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
    float_says(&net, net.c(), &r).await.unwrap();
    // Bridge side: float B revoked, float C accepted.
    assert_refused(bridge_says(&net, net.b(), &r).await, "Revoked");
    bridge_says(&net, net.c(), &r).await.unwrap();

    assert!(r
        .is_revoked(&chain(net.a()), PeerRole::Client)
        .unwrap()
        .contains("revoked"));
    assert!(r.is_revoked(&chain(net.b()), PeerRole::Server).is_some());
    assert_eq!(r.is_revoked(&chain(net.c()), PeerRole::Client), None);
}

#[tokio::test]
async fn hard_fail_refuses_a_chain_without_a_crl_on_both_sides() {
    let net = Net::new();
    // The root's CRL (covering the node CAs) and A's node CA's CRL revoke nothing; C's node
    // CA has none.
    let root = net.root_crl("root.crl", &CrlSpec::current(&[], 1));
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[], 1));
    let r = net.revocation(RevocationMode::HardFail, &[&root, &a_crl]);

    float_says(&net, net.a(), &r).await.unwrap();
    assert_refused(
        float_says(&net, net.c(), &r).await,
        "UnknownRevocationStatus",
    );
    bridge_says(&net, net.a(), &r).await.unwrap();
    assert_refused(
        bridge_says(&net, net.c(), &r).await,
        "UnknownRevocationStatus",
    );
    assert!(r
        .is_revoked(&chain(net.c()), PeerRole::Server)
        .unwrap()
        .contains("status unknown"));

    // Without the root's CRL, even A's node CA is of unknown status.
    let r = net.revocation(RevocationMode::HardFail, &[&a_crl]);
    assert_refused(
        float_says(&net, net.a(), &r).await,
        "UnknownRevocationStatus",
    );
    assert_refused(
        bridge_says(&net, net.a(), &r).await,
        "UnknownRevocationStatus",
    );

    // A listed certificate, of course.
    let a_crl = net.node_crl(
        net.a(),
        "a2.crl",
        &CrlSpec::current(&[&net.a().tls_cert], 2),
    );
    let r = net.revocation(RevocationMode::HardFail, &[&root, &a_crl]);
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
    assert_refused(bridge_says(&net, net.a(), &r).await, "Revoked");
}

#[tokio::test]
async fn off_checks_nothing_on_both_sides() {
    let net = Net::new();
    let root = net.root_crl("root.crl", &CrlSpec::current(&[&net.a().node_ca_cert], 1));
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[&net.a().tls_cert], 1));
    let r = net.revocation(RevocationMode::Off, &[&root, &a_crl]);
    float_says(&net, net.a(), &r).await.unwrap();
    bridge_says(&net, net.a(), &r).await.unwrap();
    assert_eq!(r.is_revoked(&chain(net.a()), PeerRole::Client), None);
}

#[tokio::test]
async fn a_revoked_node_ca_is_refused_though_its_leaf_is_not_listed() {
    let net = Net::new();
    // The root revokes A's node CA. A's node CA's own CRL lists nothing.
    let root = net.root_crl("root.crl", &CrlSpec::current(&[&net.a().node_ca_cert], 1));
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[], 1));
    for mode in [RevocationMode::SoftFail, RevocationMode::HardFail] {
        let r = net.revocation(mode, &[&root, &a_crl]);
        assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
        assert_refused(bridge_says(&net, net.a(), &r).await, "Revoked");
        let reason = r.is_revoked(&chain(net.a()), PeerRole::Client).unwrap();
        assert!(
            reason.contains("a CA certificate of its chain") && reason.contains("Bank A"),
            "{reason}"
        );
        // B, whose node CA is not listed, passes.
        if mode == RevocationMode::SoftFail {
            float_says(&net, net.b(), &r).await.unwrap();
        }
    }
}

#[tokio::test]
async fn an_expired_crl_per_mode() {
    let net = Net::new();
    let root = net.root_crl("root.crl", &CrlSpec::current(&[], 1));
    // A's node CA's CRL lists nothing but is past its nextUpdate.
    let stale = net.node_crl(net.a(), "a-stale.crl", &CrlSpec::expired(&[], 1));
    // hard-fail: an expired CRL is as good as none.
    let r = net.revocation(RevocationMode::HardFail, &[&root, &stale]);
    assert_refused(
        float_says(&net, net.a(), &r).await,
        "revocation list expired",
    );
    assert_refused(
        bridge_says(&net, net.a(), &r).await,
        "revocation list expired",
    );
    assert!(r
        .is_revoked(&chain(net.a()), PeerRole::Client)
        .unwrap()
        .contains("nextUpdate"));
    assert!(r.describe_crls().iter().any(|l| l.contains("(expired)")));
    // soft-fail: it is still applied, but its expiry alone refuses nobody...
    let r = net.revocation(RevocationMode::SoftFail, &[&root, &stale]);
    float_says(&net, net.a(), &r).await.unwrap();
    bridge_says(&net, net.a(), &r).await.unwrap();
    // ...and what it lists stays revoked.
    let stale_listing = net.node_crl(
        net.a(),
        "a-stale-listing.crl",
        &CrlSpec::expired(&[&net.a().tls_cert], 1),
    );
    let r = net.revocation(RevocationMode::SoftFail, &[&root, &stale_listing]);
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
    assert_refused(bridge_says(&net, net.a(), &r).await, "Revoked");
    // off: nothing.
    let r = net.revocation(RevocationMode::Off, &[&root, &stale_listing]);
    float_says(&net, net.a(), &r).await.unwrap();
}

#[tokio::test]
async fn a_reloaded_crl_applies_to_the_next_handshake_and_signals_established_peers() {
    let net = Net::new();
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[], 1));
    let r = Revocation::load(
        load_trust_roots(&net.net.root_cert).unwrap(),
        RevocationSettings {
            mode: RevocationMode::SoftFail,
            crl_files: vec![a_crl.clone()],
            reload_interval: Duration::from_millis(100),
            ..RevocationSettings::default()
        },
    )
    .unwrap();
    r.spawn_refresh().unwrap();
    // One float config and one bridge config for the whole test: no rebuild, no restart.
    let float_cfg = float(net.b(), &r);
    let bridge_cfg = bridge(net.b(), &r, BANK_A);
    let a_bridge = bridge(net.a(), &off(&net), BANK_B);
    let a_float = float(net.a(), &off(&net));
    handshake(a_bridge.clone(), float_cfg.clone())
        .await
        .1
        .unwrap();
    handshake(bridge_cfg.clone(), a_float.clone())
        .await
        .0
        .unwrap();
    let mut changes = r.subscribe();
    let before = r.generation();
    assert!(!r.reload_now(), "nothing changed yet");

    // A's node CA now revokes A's certificate; the background poll picks it up.
    net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[&net.a().tls_cert], 2));
    tokio::time::timeout(Duration::from_secs(10), changes.changed())
        .await
        .expect("no CRL change signalled")
        .unwrap();
    assert!(r.generation() > before);
    // An established connection re-checks its peer's chain...
    let reason = r.is_revoked(&chain(net.a()), PeerRole::Client).unwrap();
    assert!(
        reason.contains("its TLS certificate") && reason.contains("Bank A"),
        "{reason}"
    );
    // ...and new handshakes on the same configs are refused.
    assert_refused(
        handshake(a_bridge.clone(), float_cfg.clone()).await.1,
        "Revoked",
    );
    assert_refused(
        handshake(bridge_cfg.clone(), a_float.clone()).await.0,
        "Revoked",
    );

    // A broken file keeps the last good CRLs in force.
    replace_file(&a_crl, "not a CRL").unwrap();
    assert!(!r.reload_now());
    assert!(r.is_revoked(&chain(net.a()), PeerRole::Client).is_some());

    // Un-revoking (a new list without it) lets A in again.
    net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[], 3));
    assert!(r.reload_now() || r.generation() > before + 1);
    assert_eq!(r.is_revoked(&chain(net.a()), PeerRole::Client), None);
    handshake(a_bridge, float_cfg).await.1.unwrap();
}

/// Serves `body()` to every HTTP request on a loopback port, from a thread.
fn serve_http(body: impl Fn() -> Option<Vec<u8>> + Send + 'static) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let response = match body() {
                Some(b) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        b.len()
                    )
                    .into_bytes();
                    r.extend(b);
                    r
                }
                None => {
                    b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                }
            };
            let _ = s.write_all(&response);
        }
    });
    format!("http://{addr}/node-ca.crl")
}

#[tokio::test]
async fn crls_fetched_over_http_in_the_background() {
    let net = Net::new();
    let root = net.root_crl("root.crl", &CrlSpec::current(&[], 1));
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[&net.a().tls_cert], 1));
    let served = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
    let url = {
        let served = served.clone();
        serve_http(move || served.lock().unwrap().clone())
    };
    let r = Revocation::load(
        load_trust_roots(&net.net.root_cert).unwrap(),
        RevocationSettings {
            mode: RevocationMode::HardFail,
            crl_files: vec![root],
            crl_urls: vec![url],
            fetch_interval: Duration::from_secs(1),
            fetch_timeout: Duration::from_secs(2),
            ..RevocationSettings::default()
        },
    )
    .unwrap();
    r.spawn_refresh().unwrap();
    // The URL fails for now (503): handshakes do not wait for it; in hard-fail, A (whose
    // node CA's CRL is the one behind the URL) is of unknown status, so refused.
    let started = std::time::Instant::now();
    assert_refused(
        float_says(&net, net.a(), &r).await,
        "UnknownRevocationStatus",
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The URL starts serving: after the retry, A's revocation is known.
    let mut changes = r.subscribe();
    *served.lock().unwrap() = Some(std::fs::read(&a_crl).unwrap());
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .expect("the fetched CRL never arrived")
        .unwrap();
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
    assert!(r.is_revoked(&chain(net.a()), PeerRole::Client).is_some());
    // The URL breaks again: its last good CRL stays in force.
    *served.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(r.is_revoked(&chain(net.a()), PeerRole::Client).is_some());
}

#[test]
fn a_bad_crl_file_is_a_load_error_naming_it() {
    let net = Net::new();
    let bad = net.dir.join("bad.crl");
    std::fs::write(
        &bad,
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let err = Revocation::load(
        load_trust_roots(&net.net.root_cert).unwrap(),
        RevocationSettings {
            mode: RevocationMode::SoftFail,
            crl_files: vec![bad],
            ..RevocationSettings::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("bad.crl"), "{err}");
}
