//! The background CRL refresh (`SpawnRefresh`) on real mutual-TLS handshakes, both ends:
//! CRL files replaced at runtime and CRLs fetched over HTTP reach the next handshake and the
//! re-check of established peers, and untrusted sources (stale, forged, rolled back) cannot
//! change what is in force. The checks themselves are `drawbridge-certs`' own tests
//! (`certs/tests/revocation.rs`).

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drawbridge_certs::devpki::{generate_network, make_crl, replace_file, CrlSpec};
use drawbridge_certs::{
    load_trust_roots, PeerRole, Revocation, RevocationMode, RevocationSettings,
};
use drawbridge_runtime::revocation::SpawnRefresh as _;

#[path = "../../certs/tests/support/revocation.rs"]
mod support;
use support::*;

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

/// What the switchable server answers (`None`: 503).
type Body = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// Serves whatever `body` holds (503 while it holds nothing) and counts the requests.
fn serve_switchable() -> (String, Body, Arc<std::sync::atomic::AtomicUsize>) {
    let body = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = {
        let (body, served) = (body.clone(), served.clone());
        serve_http(move || {
            served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            body.lock().unwrap().clone()
        })
    };
    (url, body, served)
}

/// Waits until the URL has answered `n` more requests: the fetch thread takes one answer in
/// before it asks again, so after two the first one is in.
async fn fetched_twice(served: &std::sync::atomic::AtomicUsize) {
    let start = served.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(20), async {
        while served.load(std::sync::atomic::Ordering::SeqCst) < start + 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the URL was not fetched twice within 20 s");
}

fn url_settings(mode: RevocationMode, files: &[&Path], url: &str) -> RevocationSettings {
    RevocationSettings {
        mode,
        crl_files: files.iter().map(|p| p.to_path_buf()).collect(),
        crl_urls: vec![url.to_string()],
        fetch_interval: Duration::from_secs(1),
        fetch_timeout: Duration::from_secs(2),
        ..RevocationSettings::default()
    }
}

/// Issue 21 item 4 (shadow). Before: every source was merged and the first CRL of an issuer
/// won, files before URLs, so a stale file kept A accepted although the URL served a newer
/// list revoking it.
#[tokio::test]
async fn a_stale_file_does_not_shadow_a_newer_crl_from_a_url() {
    let net = Net::new();
    let stale = net.node_crl(net.a(), "a-stale.crl", &CrlSpec::current(&[], 1));
    let newer = net.node_crl(
        net.a(),
        "a-newer.crl",
        &CrlSpec::current(&[&net.a().tls_cert], 2),
    );
    let (url, body, served) = serve_switchable();
    *body.lock().unwrap() = Some(std::fs::read(&newer).unwrap());
    let r = Revocation::load(
        load_trust_roots(&net.net.root_cert).unwrap(),
        url_settings(RevocationMode::SoftFail, &[&stale], &url),
    )
    .unwrap();
    r.spawn_refresh().unwrap();
    fetched_twice(&served).await;
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
    assert_refused(bridge_says(&net, net.a(), &r).await, "Revoked");
    let reason = r.is_revoked(&chain(net.a()), PeerRole::Client).unwrap();
    assert!(reason.contains(&url), "{reason}");
}

/// Issue 21 item 4 (poison). Before: a CRL bearing the root's name but signed by another key
/// (anyone can serve one on a plain-HTTP path, or drop one in a file) was taken as the root's
/// CRL; its signature failed the check of every node CA, so everyone was refused and
/// established peers were cut.
#[tokio::test]
async fn a_forged_crl_in_the_roots_name_is_ignored_and_cuts_no_one() {
    let net = Net::new();
    let other_dir = tempfile::tempdir().unwrap();
    // Another dev network: its root has the same name as ours, and another key.
    let other = generate_network(other_dir.path(), &[name(BANK_A)]).unwrap();
    let other_root = other.root_cert.parent().unwrap();
    let forged_pem = make_crl(
        &other.root_cert,
        &other_root.join("ca.key"),
        &CrlSpec::current(&[&net.a().node_ca_cert], 99),
    )
    .unwrap();
    let forged = net.dir.join("forged-root.crl");
    replace_file(&forged, &forged_pem).unwrap();
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[], 1));

    // Served over HTTP, next to a genuine node CA CRL (soft-fail).
    let (url, body, served) = serve_switchable();
    *body.lock().unwrap() = Some(forged_pem.clone().into_bytes());
    let r = Revocation::load(
        load_trust_roots(&net.net.root_cert).unwrap(),
        url_settings(RevocationMode::SoftFail, &[&a_crl], &url),
    )
    .unwrap();
    r.spawn_refresh().unwrap();
    fetched_twice(&served).await;
    float_says(&net, net.a(), &r).await.unwrap();
    bridge_says(&net, net.a(), &r).await.unwrap();
    assert_eq!(r.is_revoked(&chain(net.a()), PeerRole::Client), None);
    assert_eq!(r.is_revoked(&chain(net.b()), PeerRole::Server), None);
    // Ignored, said once and counted once, however often it is fetched again.
    fetched_twice(&served).await;
    assert_eq!(r.ignored_crls(), 1);
    assert!(
        r.describe_crls()
            .iter()
            .any(|l| l.contains(&url) && l.contains("does not verify")),
        "{:?}",
        r.describe_crls()
    );

    // A file listed before the genuine root CRL (hard-fail): the genuine one is in force.
    let root = net.root_crl("root.crl", &CrlSpec::current(&[], 1));
    let r = net.revocation(RevocationMode::HardFail, &[&forged, &root, &a_crl]);
    float_says(&net, net.a(), &r).await.unwrap();
    bridge_says(&net, net.a(), &r).await.unwrap();
    assert_eq!(r.is_revoked(&chain(net.a()), PeerRole::Client), None);
    // And what the genuine root CRL lists is still refused, whatever the forged one says.
    let root = net.root_crl("root2.crl", &CrlSpec::current(&[&net.a().node_ca_cert], 2));
    let r = net.revocation(RevocationMode::HardFail, &[&forged, &root, &a_crl]);
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
}

/// Issue 21 item 4 (rollback). Before: a source that went back to an older genuine CRL (one
/// from before the member was revoked, which the revoked member can serve itself) replaced
/// the newer one, and the revoked member was accepted again.
#[tokio::test]
async fn a_revoked_member_cannot_roll_the_crl_back() {
    let net = Net::new();
    let old = net.node_crl(net.a(), "a-old.crl", &CrlSpec::current(&[], 1));
    let new = net.node_crl(
        net.a(),
        "a-new.crl",
        &CrlSpec::current(&[&net.a().tls_cert], 2),
    );
    let (url, body, served) = serve_switchable();
    *body.lock().unwrap() = Some(std::fs::read(&new).unwrap());
    let r = Revocation::load(
        load_trust_roots(&net.net.root_cert).unwrap(),
        url_settings(RevocationMode::SoftFail, &[], &url),
    )
    .unwrap();
    r.spawn_refresh().unwrap();
    fetched_twice(&served).await;
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
    assert!(r.is_revoked(&chain(net.a()), PeerRole::Client).is_some());

    // The URL now serves the older list (genuine, number 1, A not listed).
    *body.lock().unwrap() = Some(std::fs::read(&old).unwrap());
    fetched_twice(&served).await;
    assert_refused(float_says(&net, net.a(), &r).await, "Revoked");
    assert_refused(bridge_says(&net, net.a(), &r).await, "Revoked");
    assert!(r.is_revoked(&chain(net.a()), PeerRole::Client).is_some());
    assert_eq!(r.ignored_crls(), 1);
    assert!(
        r.describe_crls().iter().any(|l| l.contains("goes back")),
        "{:?}",
        r.describe_crls()
    );
    // A newer list (number 3, A no longer listed) is taken.
    let newer = net.node_crl(net.a(), "a-3.crl", &CrlSpec::current(&[], 3));
    *body.lock().unwrap() = Some(std::fs::read(&newer).unwrap());
    fetched_twice(&served).await;
    float_says(&net, net.a(), &r).await.unwrap();
}
