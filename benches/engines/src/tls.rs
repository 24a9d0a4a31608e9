//! A throw-away PKI (rcgen): a CA, a server certificate for `localhost` / 127.0.0.1 and a
//! client certificate, and the rustls configurations both ends use (aws-lc-rs, mutual TLS,
//! TLS 1.3 as in production).

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{server::WebPkiClientVerifier, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Both ends' TLS configurations.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The client's (bridge's): trusts the CA, presents the client certificate.
    pub client: Arc<ClientConfig>,
    /// The server's (float's): requires a client certificate from the CA.
    pub server: Arc<ServerConfig>,
}

impl Tls {
    /// A fresh PKI and the configurations.
    pub fn new() -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "engine bench CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>,
                    cn: &str|
         -> anyhow::Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &issuer)?;
            Ok((
                cert.der().clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ))
        };
        let (server_cert, server_key) =
            leaf(vec!["localhost".into(), "127.0.0.1".into()], "float")?;
        let (client_cert, client_key) = leaf(Vec::new(), "bridge")?;

        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone())?;
        let roots = Arc::new(roots);

        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server_cert, ca.der().clone()], server_key)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![client_cert, ca.der().clone()], client_key)?;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}
