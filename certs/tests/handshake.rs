//! Real mutual-TLS handshakes over loopback TCP with a generated dev network.

use std::path::Path;
use std::sync::Arc;

use drawbridge_certs::devpki::{generate_network, DevNetwork, NodeFiles};
use drawbridge_certs::{
    client_config, install_crypto_provider, load_crls, load_trust_roots, peer_legal_name,
    server_config, CertError, LegalName, TlsIdentity, TlsPolicy,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ProtocolVersion, ServerConfig};
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

fn client(node: &NodeFiles, expected: &[&str], policy: TlsPolicy) -> Arc<ClientConfig> {
    client_config(
        &identity(node),
        load_trust_roots(&node.root_cert).unwrap(),
        expected.iter().map(|n| name(n)).collect(),
        policy,
    )
    .unwrap()
}

fn server(node: &NodeFiles, policy: TlsPolicy) -> Arc<ServerConfig> {
    server_config(
        &identity(node),
        load_trust_roots(&node.root_cert).unwrap(),
        vec![],
        policy,
    )
    .unwrap()
}

/// What each side saw of one connection attempt.
struct Outcome {
    /// Client: negotiated version, or the error text.
    client: Result<ProtocolVersion, String>,
    /// Server: the client's legal name and the negotiated version, or the error text.
    server: Result<(LegalName, ProtocolVersion), String>,
}

/// Connects `client` to a listener using `server`, under a server name that is NOT in the
/// server certificate (names must be ignored), and exchanges one byte each way.
async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let peer = peer_legal_name(conn.peer_certificates().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let version = conn.protocol_version().unwrap();
        tls.write_all(b"s").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok((peer, version))
    });
    let client_result = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let sni = ServerName::try_from("float.not-in-the-certificate.example").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(sni, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let version = tls.get_ref().1.protocol_version().unwrap();
        // In TLS 1.3 the server verifies our certificate after our handshake "completes":
        // a refusal shows up on the first read.
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"c").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(version)
    }
    .await;
    Outcome {
        client: client_result,
        server: server_task.await.unwrap(),
    }
}

#[tokio::test]
async fn mutual_tls_with_pinned_subject() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (a, b) = (&net.nodes[0], &net.nodes[1]);

    // Bridge A -> float B, B expected (in a list, order-insensitive spelling).
    let out = handshake(
        client(
            a,
            &[BANK_C, "C=FR, L=Paris, O=Bank B"],
            TlsPolicy::default(),
        ),
        server(b, TlsPolicy::default()),
    )
    .await;
    assert_eq!(out.client.unwrap(), ProtocolVersion::TLSv1_3);
    let (peer, version) = out.server.unwrap();
    assert_eq!(peer, name(BANK_A));
    assert_eq!(peer.to_string(), BANK_A);
    assert_eq!(version, ProtocolVersion::TLSv1_3);
}

#[tokio::test]
async fn unexpected_server_subject_is_refused_and_named() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (a, b) = (&net.nodes[0], &net.nodes[1]);

    let out = handshake(
        client(a, &[BANK_C], TlsPolicy::default()),
        server(b, TlsPolicy::default()),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        err.contains(&format!("peer certificate subject `{BANK_B}`"))
            && err.contains("is not one of the expected legal names")
            && err.contains(BANK_C),
        "{err}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn server_from_another_network_is_refused_by_chain() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(&dir.path().join("one"));
    let other = network(&dir.path().join("two"));

    // Same legal name B, but issued under another root: the chain check refuses it.
    let out = handshake(
        client(&net.nodes[0], &[BANK_B], TlsPolicy::default()),
        server(&other.nodes[1], TlsPolicy::default()),
    )
    .await;
    let err = out.client.unwrap_err();
    // Same issuer names, other keys: webpki reports UnknownIssuer or BadSignature.
    assert!(
        err.contains("invalid peer certificate")
            && (err.contains("UnknownIssuer") || err.contains("BadSignature")),
        "{err}"
    );
}

#[tokio::test]
async fn server_refuses_client_from_another_network() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(&dir.path().join("one"));
    let other = network(&dir.path().join("two"));

    // The intruder trusts our root (to get as far as sending its cert) but its own
    // certificate, with the same legal name A, comes from another root.
    let intruder = client_config(
        &identity(&other.nodes[0]),
        load_trust_roots(&net.root_cert).unwrap(),
        vec![name(BANK_B)],
        TlsPolicy::default(),
    )
    .unwrap();
    let out = handshake(intruder, server(&net.nodes[1], TlsPolicy::default())).await;
    let err = out.server.unwrap_err();
    // Same issuer names, other keys: webpki reports UnknownIssuer or BadSignature.
    assert!(
        err.contains("invalid peer certificate")
            && (err.contains("UnknownIssuer") || err.contains("BadSignature")),
        "{err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn server_refuses_client_without_certificate() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let b = &net.nodes[1];

    let anonymous = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    let out = handshake(Arc::new(anonymous), server(b, TlsPolicy::default())).await;
    let err = out.server.unwrap_err();
    assert!(
        err.contains("NoCertificatesPresented") || err.contains("no certificate"),
        "{err}"
    );
    assert!(out.client.is_err());
}

/// A 1.2-only peer (as an old implementation would be), built straight with rustls.
fn tls12_only_client(node: &NodeFiles) -> Arc<ClientConfig> {
    let id = identity(node);
    Arc::new(
        ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())
            .unwrap(),
    )
}

fn tls12_only_server(node: &NodeFiles) -> Arc<ServerConfig> {
    let id = identity(node);
    let roots = load_trust_roots(&node.root_cert).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots)
        .build()
        .unwrap();
    Arc::new(
        ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.cert_chain.clone(), id.key.clone_key())
            .unwrap(),
    )
}

#[tokio::test]
async fn tls12_only_when_both_sides_allow_it() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (a, b) = (&net.nodes[0], &net.nodes[1]);

    // Both allow 1.2: 1.3 is still chosen.
    let out = handshake(
        client(a, &[BANK_B], TlsPolicy::AllowTls12),
        server(b, TlsPolicy::AllowTls12),
    )
    .await;
    assert_eq!(out.client.unwrap(), ProtocolVersion::TLSv1_3);

    // A 1.2-only client against a float that allows 1.2: 1.2, client still identified.
    let out = handshake(tls12_only_client(a), server(b, TlsPolicy::AllowTls12)).await;
    assert_eq!(out.client.unwrap(), ProtocolVersion::TLSv1_2);
    let (peer, version) = out.server.unwrap();
    assert_eq!((peer, version), (name(BANK_A), ProtocolVersion::TLSv1_2));

    // A bridge that allows 1.2 against a 1.2-only float: 1.2, subject still pinned.
    let out = handshake(
        client(a, &[BANK_B], TlsPolicy::AllowTls12),
        tls12_only_server(b),
    )
    .await;
    assert_eq!(out.client.unwrap(), ProtocolVersion::TLSv1_2);
    let out = handshake(
        client(a, &[BANK_C], TlsPolicy::AllowTls12),
        tls12_only_server(b),
    )
    .await;
    assert!(out
        .client
        .unwrap_err()
        .contains("is not one of the expected"));

    // Tls13Only on either side refuses a 1.2-only peer.
    let out = handshake(tls12_only_client(a), server(b, TlsPolicy::Tls13Only)).await;
    assert!(out.server.is_err() && out.client.is_err());
    let out = handshake(
        client(a, &[BANK_B], TlsPolicy::Tls13Only),
        tls12_only_server(b),
    )
    .await;
    assert!(out.server.is_err() && out.client.is_err());
}

#[tokio::test]
async fn revoked_client_is_refused() {
    use rcgen::{
        CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevokedCertParams,
        SerialNumber,
    };
    use x509_parser::prelude::{FromDer, X509Certificate};

    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (a, b, c) = (&net.nodes[0], &net.nodes[1], &net.nodes[2]);

    // A's node CA revokes A's TLS certificate.
    let leaf = identity(a).cert_chain[0].clone();
    let (_, parsed) = X509Certificate::from_der(leaf.as_ref()).unwrap();
    let serial = parsed.raw_serial().to_vec();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(a.dir.join("node-ca.key")).unwrap()).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&std::fs::read_to_string(&a.node_ca_cert).unwrap(), &ca_key)
            .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(7),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now - time::Duration::minutes(5),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    let crl_path = dir.path().join("a.crl");
    std::fs::write(&crl_path, crl.pem().unwrap()).unwrap();
    // `server_config` with CRLs is hard-fail over the whole chain: the root's CRL (listing
    // nothing) covers the node CAs.
    let root_crl = drawbridge_certs::devpki::make_crl(
        &net.root_cert,
        &net.root_cert.parent().unwrap().join("ca.key"),
        &drawbridge_certs::devpki::CrlSpec::current(&[], 1),
    )
    .unwrap();
    let root_crl_path = dir.path().join("root.crl");
    std::fs::write(&root_crl_path, root_crl).unwrap();
    let crls = load_crls(&[crl_path, root_crl_path]).unwrap();
    assert_eq!(crls.len(), 2);

    let float = server_config(
        &identity(b),
        load_trust_roots(&b.root_cert).unwrap(),
        crls,
        TlsPolicy::default(),
    )
    .unwrap();
    let out = handshake(client(a, &[BANK_B], TlsPolicy::default()), float.clone()).await;
    let err = out.server.unwrap_err();
    assert!(err.contains("Revoked") || err.contains("revoked"), "{err}");

    // C's issuer has no CRL: hard fail (unknown revocation status).
    let out = handshake(client(c, &[BANK_B], TlsPolicy::default()), float).await;
    let err = out.server.unwrap_err();
    assert!(err.contains("UnknownRevocationStatus"), "{err}");
}

#[test]
fn loading_errors_name_the_file() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let (a, b) = (&net.nodes[0], &net.nodes[1]);

    let missing = dir.path().join("nope.pem");
    let err = TlsIdentity::load(&missing, &a.tls_key).unwrap_err();
    assert!(matches!(err, CertError::Io { .. }));
    assert!(err.to_string().contains("nope.pem"), "{err}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = load_trust_roots(&empty).unwrap_err();
    assert!(matches!(err, CertError::NoCertificates { .. }), "{err}");
    assert!(err.to_string().contains("empty.pem"), "{err}");

    // A private (0600) file that holds a certificate, not a key.
    let cert_as_key = dir.path().join("cert-as-key.pem");
    std::fs::copy(&a.tls_cert, &cert_as_key).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&cert_as_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let err = TlsIdentity::load(&a.tls_cert, &cert_as_key).unwrap_err();
    assert!(matches!(err, CertError::NoPrivateKey { .. }), "{err}");

    // The certificate file itself (0644) as the key: refused for its mode before it is read.
    let err = TlsIdentity::load(&a.tls_cert, &a.tls_cert).unwrap_err();
    assert!(matches!(err, CertError::SecretFileExposed(_)), "{err}");

    let err = TlsIdentity::load(&a.tls_cert, &b.tls_key).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");

    let err = load_crls(&[empty]).unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");

    let err = client_config(
        &identity(a),
        load_trust_roots(&a.root_cert).unwrap(),
        vec![],
        TlsPolicy::default(),
    )
    .unwrap_err();
    assert!(matches!(err, CertError::Verifier(_)), "{err}");
}

#[test]
fn identity_debug_hides_the_key_and_shows_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path());
    let id = identity(&net.nodes[0]);
    let debug = format!("{id:?}");
    assert!(
        debug.contains(BANK_A) && debug.contains("redacted"),
        "{debug}"
    );
    assert!(!debug.contains("PRIVATE"), "{debug}");
    assert_eq!(id.legal_name().unwrap(), name(BANK_A));
    assert_eq!(id.cert_chain.len(), 2);
}

/// Only for the "client presents no certificate" and "1.2-only peer" cases, where the
/// client's own view of the server is not what is being tested.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
