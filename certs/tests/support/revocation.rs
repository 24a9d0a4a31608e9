//! Helpers shared by the revocation tests of `drawbridge-certs` (tests/revocation.rs) and of
//! `drawbridge-runtime` (tests/crl_refresh.rs, the background refresh, which certs cannot
//! depend on): a dev network in a temporary directory, CRLs made by its CAs, and one mutual-TLS
//! handshake judged by either end. Included by path (`#[path = ...] mod support;`); each
//! includer uses a subset, hence `dead_code` allowed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use drawbridge_certs::devpki::{
    generate_network, make_crl, replace_file, CrlSpec, DevNetwork, NodeFiles,
};
use drawbridge_certs::rustls::{self, pki_types::ServerName, ClientConfig, ServerConfig};
use drawbridge_certs::{
    client_config_with, install_crypto_provider, load_trust_roots, server_config_with, LegalName,
    Revocation, RevocationMode, RevocationSettings, TlsIdentity, TlsPolicy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const BANK_A: &str = "O=Bank A, L=London, C=GB";
pub const BANK_B: &str = "O=Bank B, L=Paris, C=FR";
pub const BANK_C: &str = "O=Bank C, L=New York, C=US";

pub fn name(s: &str) -> LegalName {
    s.parse().unwrap()
}

pub struct Net {
    pub _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub net: DevNetwork,
}

impl Net {
    pub fn new() -> Net {
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

    pub fn a(&self) -> &NodeFiles {
        &self.net.nodes[0]
    }
    pub fn b(&self) -> &NodeFiles {
        &self.net.nodes[1]
    }
    pub fn c(&self) -> &NodeFiles {
        &self.net.nodes[2]
    }

    /// Writes the CRL of the network root to `file`.
    pub fn root_crl(&self, file: &str, spec: &CrlSpec) -> PathBuf {
        let root_dir = self.net.root_cert.parent().unwrap();
        let pem = make_crl(&self.net.root_cert, &root_dir.join("ca.key"), spec).unwrap();
        let path = self.dir.join(file);
        replace_file(&path, &pem).unwrap();
        path
    }

    /// Writes the CRL of `node`'s node CA to `file`.
    pub fn node_crl(&self, node: &NodeFiles, file: &str, spec: &CrlSpec) -> PathBuf {
        let pem = make_crl(&node.node_ca_cert, &node.dir.join("node-ca.key"), spec).unwrap();
        let path = self.dir.join(file);
        replace_file(&path, &pem).unwrap();
        path
    }

    pub fn revocation(&self, mode: RevocationMode, crls: &[&Path]) -> Revocation {
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

pub fn identity(node: &NodeFiles) -> TlsIdentity {
    TlsIdentity::load(&node.tls_cert, &node.tls_key).unwrap()
}

/// The float's side: `node` accepting bridges, checking them with `revocation`.
pub fn float(node: &NodeFiles, revocation: &Revocation) -> Arc<ServerConfig> {
    server_config_with(&identity(node), revocation, TlsPolicy::default()).unwrap()
}

/// The bridge's side: `node` connecting to a float it expects to be `expected`.
pub fn bridge(node: &NodeFiles, revocation: &Revocation, expected: &str) -> Arc<ClientConfig> {
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
pub fn off(net: &Net) -> Revocation {
    net.revocation(RevocationMode::Off, &[])
}

/// One handshake plus a byte each way; `Ok(())` on both sides or each side's error text.
pub async fn handshake(
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
pub async fn float_says(
    net: &Net,
    client: &NodeFiles,
    revocation: &Revocation,
) -> Result<(), String> {
    let (_, server) = handshake(
        bridge(client, &off(net), BANK_B),
        float(net.b(), revocation),
    )
    .await;
    server
}

/// What the bridge (checking with `revocation`) says of float `server`.
pub async fn bridge_says(
    net: &Net,
    server: &NodeFiles,
    revocation: &Revocation,
) -> Result<(), String> {
    let expected = server.legal_name.to_string();
    let (client, _) = handshake(
        bridge(net.a(), revocation, &expected),
        float(server, &off(net)),
    )
    .await;
    client
}

pub fn assert_refused(result: Result<(), String>, needle: &str) {
    let err = result.expect_err("expected a refusal");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

pub fn chain(node: &NodeFiles) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    identity(node).cert_chain
}
