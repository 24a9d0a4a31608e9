//! The generated dev network: layout, certificate contents, and OpenSSL's view of the chains.

use std::path::Path;
use std::process::Command;

use drawbridge_certs::devpki::generate_network;
use drawbridge_certs::{LegalName, TlsIdentity};
use x509_parser::prelude::{FromDer, X509Certificate};

fn names() -> Vec<LegalName> {
    [
        "O=Bank A, L=London, C=GB",
        "O=Bank B, L=Paris, C=FR",
        "CN=Gateway, O=Bank C, L=New York, C=US",
    ]
    .iter()
    .map(|n| n.parse().unwrap())
    .collect()
}

#[test]
fn layout_and_certificate_contents() {
    let dir = tempfile::tempdir().unwrap();
    let net = generate_network(dir.path(), &names()).unwrap();
    assert_eq!(net.root_cert, dir.path().join("root/ca.crt"));
    assert!(dir.path().join("root/ca.key").is_file());
    assert_eq!(net.nodes.len(), 3);
    assert_eq!(net.nodes[0].dir, dir.path().join("bank-a-london-gb"));

    for (node, name) in net.nodes.iter().zip(names()) {
        assert_eq!(node.legal_name, name);
        for f in [
            &node.tls_cert,
            &node.tls_key,
            &node.root_cert,
            &node.node_ca_cert,
        ] {
            assert!(f.is_file(), "{}", f.display());
        }
        assert!(node.dir.join("node-ca.key").is_file());
        assert_eq!(
            std::fs::read(&node.root_cert).unwrap(),
            std::fs::read(&net.root_cert).unwrap()
        );
        let key_pem = std::fs::read_to_string(&node.tls_key).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&node.tls_key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }

        let id = TlsIdentity::load(&node.tls_cert, &node.tls_key).unwrap();
        assert_eq!(id.cert_chain.len(), 2, "leaf then node CA");
        // Subject exactly the legal name, in the order given.
        let subject = id.legal_name().unwrap();
        assert_eq!(subject, name);
        assert_eq!(subject.to_string(), name.to_string());

        let (_, leaf) = X509Certificate::from_der(id.cert_chain[0].as_ref()).unwrap();
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(leaf.key_usage().unwrap().unwrap().value.digital_signature());
        let san = leaf.subject_alternative_name().unwrap().unwrap().value;
        let sans = format!("{:?}", san.general_names);
        assert!(sans.contains("localhost") && sans.contains("127"), "{sans}");
        assert!(
            leaf.validity().not_before.timestamp()
                < time::OffsetDateTime::now_utc().unix_timestamp() - 3600
        );

        let (_, ca) = X509Certificate::from_der(id.cert_chain[1].as_ref()).unwrap();
        let bc = ca.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint == Some(0));
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(leaf.issuer(), ca.subject());
        // The node CA carries the node's legal name: that is what binds the name to it.
        assert_eq!(LegalName::from_der_cert(&id.cert_chain[1]).unwrap(), name);
    }
}

#[test]
fn regenerating_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate_network(dir.path(), &names()).unwrap();
    let before = std::fs::read(&first.nodes[0].tls_cert).unwrap();
    let second = generate_network(dir.path(), &names()).unwrap();
    assert_ne!(before, std::fs::read(&second.nodes[0].tls_cert).unwrap());
    TlsIdentity::load(&second.nodes[0].tls_cert, &second.nodes[0].tls_key).unwrap();
}

#[test]
fn clashing_slugs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clash: Vec<LegalName> = vec![
        "O=Bank A, C=GB".parse().unwrap(),
        "O=Bank-A, C=GB".parse().unwrap(),
    ];
    let err = generate_network(dir.path(), &clash).unwrap_err();
    assert!(err.to_string().contains("bank-a-gb"), "{err}");
}

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn openssl_verify(root: &Path, untrusted: &Path, leaf: &Path, purpose: &str) {
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(root)
        .arg("-untrusted")
        .arg(untrusted)
        .arg(leaf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(": OK"),
        "openssl verify ({purpose}) failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn openssl_accepts_the_chains() {
    if !openssl_available() {
        eprintln!("NOTE: `openssl` not found on PATH; skipping the OpenSSL chain check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = generate_network(dir.path(), &names()).unwrap();
    for node in &net.nodes {
        // tls.crt holds leaf then node CA; give OpenSSL the leaf alone.
        let pem = std::fs::read_to_string(&node.tls_cert).unwrap();
        let end = "-----END CERTIFICATE-----";
        let leaf_pem = &pem[..pem.find(end).unwrap() + end.len()];
        let leaf = node.dir.join("leaf.pem");
        std::fs::write(&leaf, format!("{leaf_pem}\n")).unwrap();
        for purpose in ["sslclient", "sslserver"] {
            openssl_verify(&node.root_cert, &node.node_ca_cert, &leaf, purpose);
        }
        // The node CA alone against the root, too.
        openssl_verify(
            &node.root_cert,
            &node.node_ca_cert,
            &node.node_ca_cert,
            "any",
        );

        // And the subject OpenSSL reads is the legal name.
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"])
            .arg(&leaf)
            .output()
            .unwrap();
        let subject = String::from_utf8_lossy(&out.stdout);
        let subject = subject.trim().trim_start_matches("subject=");
        // RFC 2253 prints the attributes in reverse order, without spaces.
        let parsed: LegalName = subject.parse().unwrap();
        assert_eq!(parsed, node.legal_name, "{subject}");
    }
}
