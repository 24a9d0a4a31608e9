//! The identity rule, over real loopback handshakes: a TLS certificate speaks for legal name X
//! only if it is issued by a node CA whose subject is X, and that node CA is issued by a trust
//! root. Each forged chain below is what a member (Bank B) can make with the node CA key that
//! sits beside its own files; both the float (client verifier) and the bridge (server verifier)
//! must refuse it, naming the claimed name and the issuing CA.

use std::path::Path;
use std::sync::Arc;

use drawbridge_certs::devpki::{generate_network, DevNetwork, NodeFiles};
use drawbridge_certs::{
    client_config, install_crypto_provider, load_trust_roots, peer_legal_name, server_config,
    LegalName, TlsIdentity, TlsPolicy,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
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

fn network(dir: &Path) -> DevNetwork {
    generate_network(dir, &[name(BANK_A), name(BANK_B), name(BANK_C)]).unwrap()
}

fn identity(node: &NodeFiles) -> TlsIdentity {
    TlsIdentity::load(&node.tls_cert, &node.tls_key).unwrap()
}

fn pem(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// The node CA of `node` as an rcgen issuer (its key sits beside the node's files).
fn node_ca(node: &NodeFiles) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = KeyPair::from_pem(&pem(&node.dir.join("node-ca.key"))).unwrap();
    let cert_pem = pem(&node.node_ca_cert);
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    (der, Issuer::from_ca_cert_pem(&cert_pem, key).unwrap())
}

/// The network root as an rcgen issuer.
fn root(net: &DevNetwork) -> Issuer<'static, KeyPair> {
    let dir = net.root_cert.parent().unwrap();
    let key = KeyPair::from_pem(&pem(&dir.join("ca.key"))).unwrap();
    Issuer::from_ca_cert_pem(&pem(&net.root_cert), key).unwrap()
}

fn dn(attrs: &[(DnType, DnValue)]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (t, v) in attrs {
        dn.push(t.clone(), v.clone());
    }
    dn
}

/// `O=.., L=.., C=..` as a DN, UTF8String values (C as PrintableString, as the dev PKI does).
fn dn_of(legal_name: &str) -> DistinguishedName {
    let mut attrs = Vec::new();
    for part in legal_name.split(',') {
        let (k, v) = part.trim().split_once('=').unwrap();
        let t = match k {
            "O" => DnType::OrganizationName,
            "L" => DnType::LocalityName,
            "C" => DnType::CountryName,
            "CN" => DnType::CommonName,
            other => panic!("{other}"),
        };
        let v = if k == "C" {
            DnValue::PrintableString(v.try_into().unwrap())
        } else {
            DnValue::Utf8String(v.into())
        };
        attrs.push((t, v));
    }
    dn(&attrs)
}

/// A TLS leaf (serverAuth + clientAuth) for `subject`, signed by `issuer`; returns it and its key.
fn leaf(
    subject: DistinguishedName,
    issuer: &Issuer<'_, KeyPair>,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = subject;
    p.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.der().clone(), key)
}

/// A CA certificate for `subject` (path length `constraint`), signed by `issuer`.
fn ca(
    subject: DistinguishedName,
    constraint: BasicConstraints,
    issuer: &Issuer<'_, KeyPair>,
) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = subject;
    p.is_ca = IsCa::Ca(constraint);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.der().clone(), Issuer::new(p, key))
}

fn forged_identity(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> TlsIdentity {
    TlsIdentity {
        cert_chain: chain,
        key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        ))),
    }
}

/// A bridge presenting `id`, pinning the float to `expected`, trusting `net`'s root.
fn bridge(net: &DevNetwork, id: &TlsIdentity, expected: &str) -> Arc<ClientConfig> {
    client_config(
        id,
        load_trust_roots(&net.root_cert).unwrap(),
        vec![name(expected)],
        TlsPolicy::default(),
    )
    .unwrap()
}

/// A float presenting `id`, trusting `net`'s root.
fn float(net: &DevNetwork, id: &TlsIdentity) -> Arc<ServerConfig> {
    server_config(
        id,
        load_trust_roots(&net.root_cert).unwrap(),
        vec![],
        TlsPolicy::default(),
    )
    .unwrap()
}

struct Outcome {
    /// Client side: Ok, or the error text.
    client: Result<(), String>,
    /// Server side: the client's legal name (what the float would stamp), or the error text.
    server: Result<LegalName, String>,
}

async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_legal_name(tls.get_ref().1.peer_certificates().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        tls.write_all(b"s").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(peer)
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
    Outcome {
        client: client_result,
        server: server_task.await.unwrap(),
    }
}

/// The refusal names the claimed legal name and says why.
fn assert_refused(err: &str, claimed: &str, mentions: &[&str]) {
    assert!(
        err.contains(&format!("`{claimed}`")) && err.contains("node CA"),
        "refusal should name the claimed legal name and the node CA rule: {err}"
    );
    for m in mentions {
        assert!(err.contains(m), "refusal should mention `{m}`: {err}");
    }
}

/// The float refuses a client whose chain is [leaf "Bank A" signed by Bank B's node CA,
/// Bank B's node CA]: without the rule it would stamp `drawbridge-sender = Bank A`.
#[tokio::test]
async fn float_refuses_a_leaf_for_a_issued_by_bs_node_ca() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (b_ca, b_issuer) = node_ca(&net.nodes[1]);
    let (forged, key) = leaf(dn_of(BANK_A), &b_issuer);
    let mallory = forged_identity(vec![forged, b_ca], &key);

    let out = handshake(
        bridge(&net, &mallory, BANK_C),
        float(&net, &identity(&net.nodes[2])),
    )
    .await;
    let err = out
        .server
        .expect_err("the float accepted Bank B's forgery and would stamp it as Bank A");
    assert_refused(&err, BANK_A, &[BANK_B]);
    assert!(out.client.is_err());
}

/// The bridge, pinning the float to Bank C, refuses a float whose chain is [leaf "Bank C"
/// signed by Bank B's node CA, Bank B's node CA]: without the rule it would deliver Bank C's
/// messages to Bank B.
#[tokio::test]
async fn bridge_refuses_a_leaf_for_c_issued_by_bs_node_ca() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (b_ca, b_issuer) = node_ca(&net.nodes[1]);
    let (forged, key) = leaf(dn_of(BANK_C), &b_issuer);
    let mallory = forged_identity(vec![forged, b_ca], &key);

    let out = handshake(
        bridge(&net, &identity(&net.nodes[0]), BANK_C),
        float(&net, &mallory),
    )
    .await;
    let err = out
        .client
        .expect_err("the bridge accepted Bank B's forgery as Bank C's float");
    assert_refused(&err, BANK_C, &[BANK_B]);
}

/// A decoy: the forged leaf (issued by B's node CA) travels with Bank A's genuine node CA,
/// whose subject is the claimed name but which did not sign the leaf. The CA compared is the
/// one that signed the leaf on the verified path, not any certificate the peer sent.
#[tokio::test]
async fn a_decoy_ca_with_the_claimed_name_that_did_not_sign_the_leaf_is_ignored() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (a_ca, _) = node_ca(&net.nodes[0]);
    let (b_ca, b_issuer) = node_ca(&net.nodes[1]);
    let (forged, key) = leaf(dn_of(BANK_A), &b_issuer);

    for chain in [
        vec![forged.clone(), a_ca.clone(), b_ca.clone()],
        vec![forged.clone(), b_ca.clone(), a_ca.clone()],
    ] {
        let mallory = forged_identity(chain, &key);
        let out = handshake(
            bridge(&net, &mallory, BANK_C),
            float(&net, &identity(&net.nodes[2])),
        )
        .await;
        assert_refused(&out.server.unwrap_err(), BANK_A, &[BANK_B]);
    }

    // A leaf that names Bank A's node CA as its issuer but is signed with B's key: the
    // signature check ties it to no CA at all.
    let a_dn = dn_of(BANK_A);
    let b_key = KeyPair::from_pem(&pem(&net.nodes[1].dir.join("node-ca.key"))).unwrap();
    let mut lying_params = CertificateParams::default();
    lying_params.distinguished_name = a_dn.clone();
    let lying_issuer = Issuer::new(lying_params, b_key);
    let (forged, key) = leaf(a_dn, &lying_issuer);
    let mallory = forged_identity(vec![forged, a_ca, b_ca], &key);
    let out = handshake(
        bridge(&net, &mallory, BANK_C),
        float(&net, &identity(&net.nodes[2])),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

/// In a network whose node CAs are not path-length constrained, Bank B's node CA can issue a
/// sub-CA named "Bank A" and a leaf under it: the leaf's issuer then has the claimed name.
/// The node CA must be issued by a trust root, so this is refused on both sides.
#[tokio::test]
async fn a_sub_ca_with_the_claimed_name_under_another_members_ca_is_refused() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let root = root(&net);
    // Bank B's node CA as an unconstrained network would issue it.
    let (b_ca, b_issuer) = ca(dn_of(BANK_B), BasicConstraints::Unconstrained, &root);
    let (sub_ca, sub_issuer) = ca(dn_of(BANK_A), BasicConstraints::Constrained(0), &b_issuer);
    let (forged, key) = leaf(dn_of(BANK_A), &sub_issuer);
    let mallory = forged_identity(vec![forged, sub_ca, b_ca], &key);

    let out = handshake(
        bridge(&net, &mallory, BANK_C),
        float(&net, &identity(&net.nodes[2])),
    )
    .await;
    assert_refused(&out.server.unwrap_err(), BANK_A, &["trust root"]);

    let out = handshake(
        bridge(&net, &identity(&net.nodes[2]), BANK_A),
        float(&net, &mallory),
    )
    .await;
    assert_refused(&out.client.unwrap_err(), BANK_A, &["trust root"]);
}

/// A leaf signed by the root itself has no node CA: it speaks for nobody.
#[tokio::test]
async fn a_leaf_issued_directly_by_the_root_is_refused() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (direct, key) = leaf(dn_of(BANK_A), &root(&net));
    let direct = forged_identity(vec![direct], &key);

    let out = handshake(
        bridge(&net, &direct, BANK_C),
        float(&net, &identity(&net.nodes[2])),
    )
    .await;
    assert_refused(&out.server.unwrap_err(), BANK_A, &["no node CA"]);

    let out = handshake(
        bridge(&net, &identity(&net.nodes[2]), BANK_A),
        float(&net, &direct),
    )
    .await;
    assert_refused(&out.client.unwrap_err(), BANK_A, &["no node CA"]);
}

/// The node CA's subject and the leaf's subject are compared as legal names: attribute order
/// and string encoding (PrintableString vs UTF8String) do not matter.
#[tokio::test]
async fn node_ca_and_leaf_subjects_compare_as_legal_names() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let root = root(&net);
    let reversed = dn(&[
        (
            DnType::CountryName,
            DnValue::PrintableString("GB".try_into().unwrap()),
        ),
        (
            DnType::LocalityName,
            DnValue::PrintableString("London".try_into().unwrap()),
        ),
        (
            DnType::OrganizationName,
            DnValue::PrintableString("Bank A".try_into().unwrap()),
        ),
    ]);
    let (a_ca, a_issuer) = ca(reversed, BasicConstraints::Constrained(0), &root);
    let (a_leaf, key) = leaf(dn_of(BANK_A), &a_issuer);
    let a = forged_identity(vec![a_leaf, a_ca], &key);

    // As a client of Bank C's float: accepted and identified as Bank A.
    let out = handshake(
        bridge(&net, &a, BANK_C),
        float(&net, &identity(&net.nodes[2])),
    )
    .await;
    assert_eq!(out.server.unwrap(), name(BANK_A));
    out.client.unwrap();

    // As a float pinned by Bank C's bridge (pin spelt in yet another order).
    let out = handshake(
        bridge(&net, &identity(&net.nodes[2]), "C=GB, O=Bank A, L=London"),
        float(&net, &a),
    )
    .await;
    out.client.unwrap();
    assert_eq!(out.server.unwrap(), name(BANK_C));
}

/// The dev PKI's own chains pass both ways, and the node CA's subject is the legal name.
#[tokio::test]
async fn dev_pki_chains_pass_both_ways() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    for (i, j) in [(0, 1), (1, 0), (2, 0)] {
        let (x, y) = (&net.nodes[i], &net.nodes[j]);
        let out = handshake(
            bridge(&net, &identity(x), &y.legal_name.to_string()),
            float(&net, &identity(y)),
        )
        .await;
        out.client.unwrap();
        assert_eq!(out.server.unwrap(), x.legal_name);
        let (ca_der, _) = node_ca(x);
        assert_eq!(LegalName::from_der_cert(&ca_der).unwrap(), x.legal_name);
    }
}
