//! Revocation on real mutual-TLS handshakes, both ends: the float's acceptor
//! (`server_config_with`) judging bridges, and the bridge's connector (`client_config_with`)
//! judging floats, in each mode, with CRLs made by the dev network's CAs.

use std::time::Duration;

use drawbridge_certs::devpki::{CrlSpec, NodeFiles};
use drawbridge_certs::{
    load_trust_roots, PeerRole, Revocation, RevocationMode, RevocationSettings,
};

#[path = "support/revocation.rs"]
mod support;
use support::*;

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

/// Issue 21 items 10 and 13, at the level of the revocation state: an established peer's
/// chain is verified once, again only when the CRLs change, and a certificate passing its
/// notAfter is reported as expired (what both daemons disconnect on).
#[tokio::test]
async fn an_established_peer_is_verified_once_per_change_and_expires_at_not_after() {
    let net = Net::new();
    let a_crl = net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[], 1));
    let r = net.revocation(RevocationMode::SoftFail, &[&a_crl]);
    let mut peer = r.established(chain(net.a()), PeerRole::Client);
    for _ in 0..100 {
        assert_eq!(peer.check(), None);
    }
    assert_eq!(peer.verifications(), 1);
    // A's certificate is revoked: the generation moves, the next check verifies and refuses.
    net.node_crl(net.a(), "a.crl", &CrlSpec::current(&[&net.a().tls_cert], 2));
    assert!(r.reload_now());
    match peer.check() {
        Some(drawbridge_certs::PeerRefusal::Revoked(reason)) => {
            assert!(reason.contains("Bank A"), "{reason}")
        }
        other => panic!("expected a revocation, got {other:?}"),
    }
    assert_eq!(peer.verifications(), 2);

    // A certificate of B's that expires in two seconds (no CRL involved: mode off).
    let short = NodeFiles {
        tls_cert: net.dir.join("b-short.crt"),
        tls_key: net.dir.join("b-short.key"),
        ..net.b().clone()
    };
    let not_after = std::time::SystemTime::now() + Duration::from_secs(2);
    drawbridge_certs::devpki::issue_tls_cert_until(
        &short,
        &short.tls_cert,
        &short.tls_key,
        not_after,
    )
    .unwrap();
    let off = off(&net);
    let mut peer = off.established(identity(&short).cert_chain, PeerRole::Server);
    assert_eq!(peer.check(), None);
    let wait = peer.until_next_expiry().unwrap();
    assert!(wait <= Duration::from_secs(3), "{wait:?}");
    assert_eq!(peer.check(), None, "nothing changed yet");
    assert_eq!(peer.verifications(), 1);
    tokio::time::sleep(wait).await;
    assert!(std::time::SystemTime::now() > not_after);
    match peer.check() {
        Some(drawbridge_certs::PeerRefusal::Expired(reason)) => assert!(
            reason.contains("its TLS certificate") && reason.contains("expired at"),
            "{reason}"
        ),
        other => panic!("expected an expiry, got {other:?}"),
    }
    // Revocation only is what `is_revoked` reports.
    assert_eq!(off.is_revoked(peer.chain(), PeerRole::Server), None);
}
