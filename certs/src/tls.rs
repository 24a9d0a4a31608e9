//! Loading identities and trust, and building the rustls configurations of both link ends.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::{
    CipherSuite, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    SupportedCipherSuite, SupportedProtocolVersion,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName,
    SignatureVerificationAlgorithm, UnixTime,
};

use crate::binding::verify_bound_to_node_ca;
use crate::keyfile::{check_secret_file, KeyFileAccess};
use crate::revocation::{PeerRole, Revocation, RevocationMode};
use crate::{CertError, LegalName};

/// Installs aws-lc-rs as the process-wide rustls crypto provider.
///
/// Libraries that build their own rustls configs without naming a provider (AMQP and HTTP
/// clients) need a process default; Drawbridge only ever uses aws-lc-rs. Idempotent: does
/// nothing if a provider is already installed (whichever it is), never panics.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine.
        let _ = aws_lc_rs::default_provider().install_default();
    }
}

/// Which TLS versions a link end accepts.
///
/// TLS 1.3 only by default; TLS 1.2 can be allowed for peers that lack 1.3, and then only
/// with ECDHE key exchange and AEAD ciphers (GCM, ChaCha20-Poly1305).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// TLS 1.3 only.
    #[default]
    Tls13Only,
    /// TLS 1.3 preferred, TLS 1.2 (ECDHE + AEAD suites only) accepted.
    AllowTls12,
}

/// The TLS 1.2 suites we accept: forward-secret key exchange, authenticated encryption.
const TLS12_ECDHE_AEAD_SUITES: &[CipherSuite] = &[
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

impl TlsPolicy {
    fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
        static TLS13_AND_12: &[&SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            Self::Tls13Only => TLS13_ONLY,
            Self::AllowTls12 => TLS13_AND_12,
        }
    }

    /// The aws-lc-rs provider restricted to the suites this policy allows.
    fn provider(self) -> Arc<CryptoProvider> {
        let mut provider = aws_lc_rs::default_provider();
        provider.cipher_suites.retain(|suite| match suite {
            SupportedCipherSuite::Tls13(_) => true,
            SupportedCipherSuite::Tls12(_) => {
                self == Self::AllowTls12 && TLS12_ECDHE_AEAD_SUITES.contains(&suite.suite())
            }
        });
        Arc::new(provider)
    }
}

/// A node's own TLS credentials: certificate chain (leaf first) and private key.
///
/// Cheap to clone (the key is shared); its `Debug` never prints the key.
#[derive(Clone)]
pub struct TlsIdentity {
    /// Leaf certificate first, then intermediates (node CA); sent to the peer as is.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = self
            .legal_name()
            .map_or_else(|e| format!("<{e}>"), |n| n.to_string());
        f.debug_struct("TlsIdentity")
            .field("subject", &subject)
            .field("chain_len", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// PEM certificates from `pem`; `path` names the source in errors.
fn parse_certs(
    pem: &mut dyn std::io::BufRead,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_reader_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A PEM certificate chain alone (leaf first), for a float in tunnel mode, which presents a
/// chain whose key it does not hold.
pub fn load_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = std::fs::read(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_certs(&mut pem.as_slice(), path)
}

impl TlsIdentity {
    /// Loads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
    /// SEC1), checking that the key belongs to the leaf. The key file must be readable by its
    /// owner only ([`KeyFileAccess::OwnerOnly`]); see [`TlsIdentity::load_with`].
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Self, CertError> {
        Self::load_with(cert_pem, key_pem, KeyFileAccess::OwnerOnly)
    }

    /// [`TlsIdentity::load`], refusing a key file accessible beyond what `access` allows
    /// (see [`check_secret_file`]).
    pub fn load_with(
        cert_pem: &Path,
        key_pem: &Path,
        access: KeyFileAccess,
    ) -> Result<Self, CertError> {
        check_secret_file(key_pem, access)?;
        let cert_bytes = std::fs::read(cert_pem).map_err(CertError::io(cert_pem))?;
        let key_bytes = std::fs::read(key_pem).map_err(CertError::io(key_pem))?;
        Self::from_pem(&cert_bytes, cert_pem, &key_bytes, key_pem)
    }

    /// [`TlsIdentity::load`] from file contents already read (`cert_path` and `key_path`
    /// name them in errors; the key file's permissions are the caller's to check). A
    /// reload reads each file once, so that what is checked is what is compared later.
    pub fn from_pem(
        cert_bytes: &[u8],
        cert_pem: &Path,
        key_bytes: &[u8],
        key_pem: &Path,
    ) -> Result<Self, CertError> {
        let cert_chain = parse_certs(&mut &*cert_bytes, cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_bytes).map_err(|e| match e {
            pem::Error::NoItemsFound => CertError::NoPrivateKey {
                path: key_pem.to_owned(),
            },
            e => CertError::Pem {
                path: key_pem.to_owned(),
                reason: e.to_string(),
            },
        })?;
        let identity = Self {
            cert_chain,
            key: Arc::new(key),
        };
        // Before the key check, so that a garbled certificate is blamed on its own file.
        identity.leaf_info().map_err(|e| CertError::Pem {
            path: cert_pem.to_owned(),
            reason: format!("not a usable certificate chain: {e}"),
        })?;
        identity.check_key_matches().map_err(|e| CertError::Pem {
            path: key_pem.to_owned(),
            reason: format!(
                "private key does not belong to the first certificate of `{}`: {e}",
                cert_pem.display()
            ),
        })?;
        Ok(identity)
    }

    /// The subject of our own leaf certificate: who we are to peers.
    pub fn legal_name(&self) -> Result<LegalName, CertError> {
        peer_legal_name(&self.cert_chain)
    }

    /// Serial number and validity period of our leaf certificate, after checking that every
    /// certificate of the chain parses as X.509 (a garbled intermediate would only show up
    /// as peers' handshake failures otherwise).
    pub fn leaf_info(&self) -> Result<CertInfo, CertError> {
        let mut infos = self.cert_chain.iter().enumerate().map(|(i, der)| {
            CertInfo::of(der)
                .map_err(|e| CertError::X509(format!("certificate {} of the chain: {e}", i + 1)))
        });
        let leaf = infos
            .next()
            .ok_or_else(|| CertError::X509("empty certificate chain".into()))??;
        for info in infos {
            info?;
        }
        Ok(leaf)
    }

    fn check_key_matches(&self) -> Result<(), rustls::Error> {
        let signing_key = aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(self.key.clone_key())?;
        rustls::sign::CertifiedKey::new(self.cert_chain.clone(), signing_key).keys_match()
    }
}

/// What status pages and logs say about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex of its DER bytes (as `openssl x509 -serial` prints it,
    /// modulo case).
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    /// Serial and validity of a DER certificate (e.g. the first of a peer's chain).
    pub fn of(der: &CertificateDer<'_>) -> Result<Self, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| CertError::X509(e.to_string()))?;
        let validity = cert.validity();
        Ok(Self {
            serial: hex_serial(cert.raw_serial()),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// `unix` seconds as RFC 3339 (UTC), for logs and status pages.
    pub fn rfc3339(unix: i64) -> String {
        time::OffsetDateTime::from_unix_timestamp(unix)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| format!("@{unix}"))
    }

    /// Why the certificate cannot be used at `now` (Unix seconds), if it cannot.
    pub fn outside_validity(&self, now: i64) -> Option<String> {
        if now > self.not_after {
            Some(format!(
                "the certificate expired at {}",
                Self::rfc3339(self.not_after)
            ))
        } else if now < self.not_before {
            Some(format!(
                "the certificate is not valid before {}",
                Self::rfc3339(self.not_before)
            ))
        } else {
            None
        }
    }
}

fn hex_serial(raw: &[u8]) -> String {
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads the network trust anchors (root CAs) from a PEM file; at least one is required.
pub fn load_trust_roots(path: &Path) -> Result<Arc<RootCertStore>, CertError> {
    let bytes = std::fs::read(path).map_err(CertError::io(path))?;
    trust_roots_from_pem(&bytes, path)
}

/// [`load_trust_roots`] from file contents already read; `path` names them in errors.
pub fn trust_roots_from_pem(pem: &[u8], path: &Path) -> Result<Arc<RootCertStore>, CertError> {
    let mut store = RootCertStore::empty();
    for cert in parse_certs(&mut &*pem, path)? {
        store.add(cert).map_err(|e| CertError::Pem {
            path: path.to_owned(),
            reason: format!("not a usable trust anchor: {e}"),
        })?;
    }
    Ok(Arc::new(store))
}

/// Loads certificate revocation lists, each file PEM (`X509 CRL` blocks) or a single DER CRL.
pub fn load_crls(
    paths: &[PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let mut all = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(CertError::io(path))?;
        if bytes.first() == Some(&0x30) {
            // DER: an ASN.1 SEQUENCE.
            all.push(CertificateRevocationListDer::from(bytes));
            continue;
        }
        let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if crls.is_empty() {
            return Err(CertError::Pem {
                path: path.clone(),
                reason: "no `-----BEGIN X509 CRL-----` block found".into(),
            });
        }
        all.extend(crls);
    }
    Ok(all)
}

/// Subject of the end-entity certificate a peer presented (the first of its chain).
///
/// On the float: `peer_legal_name(conn.peer_certificates().unwrap_or_default())` gives the
/// authenticated sender. That is only an identity because the handshake's verifier (see
/// [`server_config`]) already checked that the certificate is bound to a node CA of that
/// legal name; this function itself checks nothing.
pub fn peer_legal_name(chain: &[CertificateDer<'_>]) -> Result<LegalName, CertError> {
    let leaf = chain
        .first()
        .ok_or_else(|| CertError::X509("the peer presented no certificate".into()))?;
    LegalName::from_der_cert(leaf)
}

/// The chain the bridge's verifier last accepted for a link: read it after a successful
/// connect to re-check the peer later ([`Revocation::is_revoked`]).
///
/// One per client configuration ([`client_config_with`]); a link connects one target at a
/// time, so after a successful connect it holds that connection's chain (resumption is off:
/// every connection is fully verified).
#[derive(Debug, Clone, Default)]
pub struct VerifiedPeerChain(Arc<Mutex<Option<Vec<CertificateDer<'static>>>>>);

impl VerifiedPeerChain {
    /// The chain (leaf first) of the last peer that passed verification, if any.
    pub fn latest(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.0.lock().expect("poisoned").clone()
    }

    fn record(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) {
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.0.lock().expect("poisoned") = Some(chain);
    }
}

/// Bridge-side verifier: chain to the roots as usual with the current CRLs (see
/// [`Revocation`]), ignore the host name, check that the subject is bound to its node CA
/// (see [`crate::binding`]), then pin the subject to one of the expected legal names.
#[derive(Debug)]
struct PinnedSubjectVerifier {
    revocation: Revocation,
    sig_algs: &'static [&'static dyn SignatureVerificationAlgorithm],
    expected: Vec<LegalName>,
    verified: VerifiedPeerChain,
}

impl PinnedSubjectVerifier {
    fn new(
        revocation: Revocation,
        expected: Vec<LegalName>,
        provider: &Arc<CryptoProvider>,
    ) -> Self {
        Self {
            revocation,
            sig_algs: provider.signature_verification_algorithms.all,
            expected,
            verified: VerifiedPeerChain::default(),
        }
    }

    fn expected_list(&self) -> String {
        self.expected
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl ServerCertVerifier for PinnedSubjectVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Chain, validity and revocation (current CRLs, per the mode) first; then who the
        // certificate speaks for, if anyone: the subject, bound to its node CA; then the pin.
        // One snapshot for both checks: the same roots even if they are being replaced.
        // First, a CRL waiting for this chain's node CA learns its key (see `Revocation`).
        self.revocation
            .learn_issuers(end_entity, intermediates, PeerRole::Server, now);
        let snapshot = self.revocation.current();
        snapshot.verify_server(end_entity, intermediates, server_name, now)?;
        let subject = verify_bound_to_node_ca(
            end_entity,
            intermediates,
            snapshot.roots(),
            self.sig_algs,
            webpki::KeyUsage::server_auth(),
            now,
        )?;
        if self.expected.contains(&subject) {
            self.verified.record(end_entity, intermediates);
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "peer certificate subject `{subject}` is not one of the expected legal names [{}]",
                self.expected_list()
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.revocation
            .current()
            .server_verifier()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.revocation
            .current()
            .server_verifier()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.revocation
            .current()
            .server_verifier()
            .supported_verify_schemes()
    }
}

/// TLS client configuration for the bridge's side of a peer link, without revocation
/// checking: [`client_config_with`] with [`Revocation::off`].
pub fn client_config(
    identity: &TlsIdentity,
    roots: Arc<RootCertStore>,
    expected: Vec<LegalName>,
    policy: TlsPolicy,
) -> Result<Arc<rustls::ClientConfig>, CertError> {
    client_config_with(identity, &Revocation::off(roots)?, expected, policy).map(|(c, _)| c)
}

/// TLS client configuration for the bridge's side of a peer link.
///
/// The float's certificate must chain to the roots of `revocation` (validity period checked)
/// and pass its revocation check (the CRLs in force at the handshake, per its mode; a
/// refusal is `rustls::Error::InvalidCertificate(Revoked | UnknownRevocationStatus |
/// ExpiredRevocationList..)`), but the server *name* is ignored: peers are identified by
/// certificate subject. The subject must be bound to its node CA (issued by a node CA with
/// the same legal name, itself issued by a trust root; see [`crate::binding`]), else the
/// handshake fails with `rustls::Error::InvalidCertificate(CertificateError::Other(..))`
/// holding an [`IdentityRefused`](crate::IdentityRefused) that names the claimed name and the
/// issuer. Then the subject must equal one of `expected` (set comparison, see [`LegalName`]);
/// a mismatch fails the handshake with `rustls::Error::General("peer certificate subject `…`
/// is not one of the expected legal names […]")`. We present `identity` as client
/// certificate. Session resumption is off, so every connection is fully verified (links are
/// long-lived; resumption buys nothing).
///
/// Also returns where the chain of the last accepted peer is kept, for re-checks when the
/// CRLs change. Any `ServerName` can be passed when connecting (the target host is a good
/// choice).
pub fn client_config_with(
    identity: &TlsIdentity,
    revocation: &Revocation,
    expected: Vec<LegalName>,
    policy: TlsPolicy,
) -> Result<(Arc<rustls::ClientConfig>, VerifiedPeerChain), CertError> {
    if expected.is_empty() {
        return Err(CertError::Verifier(
            "no expected peer legal names: every peer would be refused".into(),
        ));
    }
    let provider = policy.provider();
    let verifier = Arc::new(PinnedSubjectVerifier::new(
        revocation.clone(),
        expected,
        &provider,
    ));
    let verified = verifier.verified.clone();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(policy.versions())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.resumption = Resumption::disabled();
    Ok((Arc::new(config), verified))
}

/// Float-side verifier: rustls's client verifier with the current CRLs (chain, validity,
/// revocation; see [`Revocation`]), then the identity rule (see [`crate::binding`]), so that
/// the subject the float stamps as sender is one the certificate speaks for.
#[derive(Debug)]
struct NodeCaBoundClientVerifier {
    revocation: Revocation,
    root_hints: Vec<DistinguishedName>,
    sig_algs: &'static [&'static dyn SignatureVerificationAlgorithm],
}

impl NodeCaBoundClientVerifier {
    fn new(revocation: Revocation, provider: &Arc<CryptoProvider>) -> Self {
        Self {
            root_hints: revocation.roots().subjects(),
            revocation,
            sig_algs: provider.signature_verification_algorithms.all,
        }
    }
}

impl ClientCertVerifier for NodeCaBoundClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.revocation
            .learn_issuers(end_entity, intermediates, PeerRole::Client, now);
        let snapshot = self.revocation.current();
        snapshot.verify_client(end_entity, intermediates, now)?;
        verify_bound_to_node_ca(
            end_entity,
            intermediates,
            snapshot.roots(),
            self.sig_algs,
            webpki::KeyUsage::client_auth(),
            now,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.revocation
            .current()
            .client_verifier()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.revocation
            .current()
            .client_verifier()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.revocation
            .current()
            .client_verifier()
            .supported_verify_schemes()
    }
}

/// TLS server configuration for the float with a fixed CRL set: `crls` empty means no
/// revocation checking, otherwise hard-fail over the whole chain (see
/// [`RevocationMode::HardFail`]). Daemons use [`server_config_with`], which reloads.
pub fn server_config(
    identity: &TlsIdentity,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    policy: TlsPolicy,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let mode = if crls.is_empty() {
        RevocationMode::Off
    } else {
        RevocationMode::HardFail
    };
    server_config_with(identity, &Revocation::from_crls(roots, mode, crls)?, policy)
}

/// TLS server configuration for the float.
///
/// A client certificate is **required** and must chain to the roots of `revocation`; every
/// certificate of its chain is checked against the CRLs in force at the handshake, per the
/// mode (see [`Revocation`]; a reload applies to the next handshake). Its subject must be
/// bound to its node CA (issued by a node CA with the same legal name, itself issued by a
/// trust root; see [`crate::binding`]), else the handshake fails with
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))` holding an
/// [`IdentityRefused`](crate::IdentityRefused). Session resumption is off so that every
/// connection re-checks the client certificate. Established connections are re-checked by
/// the caller when the CRLs change ([`Revocation::subscribe`], [`Revocation::is_revoked`]).
pub fn server_config_with(
    identity: &TlsIdentity,
    revocation: &Revocation,
    policy: TlsPolicy,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let provider = policy.provider();
    let verifier = Arc::new(NodeCaBoundClientVerifier::new(
        revocation.clone(),
        &provider,
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(policy.versions())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    // Our suite order (strongest first), not the client's: with TLS 1.2 allowed, a client
    // preferring a weaker suite does not get it (testssl.sh flags a missing server order).
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// TLS server configuration for a float in tunnel mode, which holds no private key: the
/// certificate chain is presented as in [`server_config_with`] (the same client verifier,
/// identity rule and no resumption), and every handshake signature is made by `key` — in
/// tunnel mode a key whose signer asks the bridge over the tunnel.
///
/// TLS 1.3 only, whatever the float's policy: in TLS 1.3 what a server signs is the
/// CertificateVerify content, which starts with a fixed context string, so the bridge can
/// refuse to sign anything else (a TLS 1.2 server signs key-exchange parameters it cannot
/// tell from other data).
pub fn server_config_remote_key(
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn rustls::sign::SigningKey>,
    revocation: &Revocation,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let policy = TlsPolicy::Tls13Only;
    let provider = policy.provider();
    let verifier = Arc::new(NodeCaBoundClientVerifier::new(
        revocation.clone(),
        &provider,
    ));
    let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, key));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(policy.versions())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedCert(certified)));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// One certificate and key for every handshake.
#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The content a TLS 1.3 server signs in its CertificateVerify starts with this (RFC 8446,
/// 4.4.3): 64 spaces, the context string and a zero byte. A bridge signing for a float checks
/// it, so the float can have nothing else signed with the organisation's key.
pub fn is_tls13_server_certificate_verify(message: &[u8]) -> bool {
    const CONTEXT: &[u8] = b"TLS 1.3, server CertificateVerify\0";
    message.len() > 64 + CONTEXT.len()
        && message.iter().take(64).all(|&b| b == b' ')
        && message.get(64..64 + CONTEXT.len()) == Some(CONTEXT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_suites() {
        let only13 = TlsPolicy::Tls13Only.provider();
        assert!(only13
            .cipher_suites
            .iter()
            .all(|s| matches!(s, SupportedCipherSuite::Tls13(_))));
        let with12 = TlsPolicy::AllowTls12.provider();
        let tls12: Vec<_> = with12
            .cipher_suites
            .iter()
            .filter(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
            .collect();
        assert!(!tls12.is_empty());
        for s in tls12 {
            let name = format!("{:?}", s.suite());
            assert!(name.contains("ECDHE"), "{name}");
            assert!(name.contains("GCM") || name.contains("CHACHA20"), "{name}");
        }
    }

    #[test]
    fn install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }

    /// The identity rule on both verifiers, called directly with in-memory chains.
    mod identity_rule {
        use super::*;
        use crate::binding::IdentityRefused;
        use crate::devpki::legal_name_dn;
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
        };
        use rustls::{CertificateError, OtherError};

        const BANK_A: &str = "O=Bank A, L=London, C=GB";
        const BANK_B: &str = "O=Bank B, L=Paris, C=FR";

        fn name(s: &str) -> LegalName {
            s.parse().unwrap()
        }

        struct Ca {
            der: CertificateDer<'static>,
            issuer: Issuer<'static, KeyPair>,
        }

        fn ca(subject: &str, constraint: BasicConstraints, parent: Option<&Ca>) -> Ca {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = legal_name_dn(&name(subject)).unwrap();
            p.is_ca = IsCa::Ca(constraint);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = match parent {
                Some(parent) => p.signed_by(&key, &parent.issuer).unwrap(),
                None => p.self_signed(&key).unwrap(),
            };
            Ca {
                der: cert.der().clone(),
                issuer: Issuer::new(p, key),
            }
        }

        fn leaf(subject: &str, issuer: &Ca) -> CertificateDer<'static> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::new(vec!["localhost".into()]).unwrap();
            p.distinguished_name = legal_name_dn(&name(subject)).unwrap();
            p.is_ca = IsCa::ExplicitNoCa;
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.signed_by(&key, &issuer.issuer).unwrap().der().clone()
        }

        /// Root, and node CAs for Bank A and Bank B issued by it (path length 0).
        struct Net {
            root: Ca,
            a: Ca,
            b: Ca,
        }

        fn net() -> Net {
            let root = ca(
                "CN=Test Root, O=Test Network",
                BasicConstraints::Unconstrained,
                None,
            );
            let a = ca(BANK_A, BasicConstraints::Constrained(0), Some(&root));
            let b = ca(BANK_B, BasicConstraints::Constrained(0), Some(&root));
            Net { root, a, b }
        }

        fn roots(net: &Net) -> Arc<RootCertStore> {
            let mut store = RootCertStore::empty();
            store.add(net.root.der.clone()).unwrap();
            Arc::new(store)
        }

        /// What the bridge (pinning `pin`) and the float say of a peer presenting `chain`.
        fn verify(
            net: &Net,
            chain: &[CertificateDer<'static>],
            pin: &str,
        ) -> (Result<(), rustls::Error>, Result<(), rustls::Error>) {
            let provider = TlsPolicy::default().provider();
            let off = Revocation::off(roots(net)).unwrap();
            let bridge = PinnedSubjectVerifier::new(off.clone(), vec![name(pin)], &provider);
            let float = NodeCaBoundClientVerifier::new(off, &provider);
            let now = UnixTime::now();
            let sni = ServerName::try_from("float.example").unwrap();
            (
                bridge
                    .verify_server_cert(&chain[0], &chain[1..], &sni, &[], now)
                    .map(drop),
                float
                    .verify_client_cert(&chain[0], &chain[1..], now)
                    .map(drop),
            )
        }

        fn refusal(result: &Result<(), rustls::Error>) -> IdentityRefused {
            match result {
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e)))) => e
                    .downcast_ref::<IdentityRefused>()
                    .unwrap_or_else(|| panic!("not an IdentityRefused: {e:?}"))
                    .clone(),
                other => panic!("expected an identity refusal, got {other:?}"),
            }
        }

        #[test]
        fn a_leaf_bound_to_its_node_ca_passes_both() {
            let net = net();
            let chain = [leaf(BANK_A, &net.a), net.a.der.clone()];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            bridge.unwrap();
            float.unwrap();
            // Extra certificates, in any order, change nothing.
            let chain = [
                leaf(BANK_A, &net.a),
                net.b.der.clone(),
                net.root.der.clone(),
                net.a.der.clone(),
            ];
            let (bridge, float) = verify(&net, &chain, "C=GB, L=London, O=Bank A");
            bridge.unwrap();
            float.unwrap();
        }

        #[test]
        fn a_leaf_for_a_issued_by_bs_node_ca_is_refused_by_both() {
            let net = net();
            let chain = [leaf(BANK_A, &net.b), net.b.der.clone()];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            for result in [&bridge, &float] {
                let refused = refusal(result);
                assert_eq!(refused.claimed, name(BANK_A));
                assert_eq!(
                    refused.reasons,
                    vec![format!("is issued by node CA `{BANK_B}`")]
                );
                let text = result.as_ref().unwrap_err().to_string();
                assert!(
                    text.contains(&format!("certificate for `{BANK_A}` refused"))
                        && text.contains(&format!("node CA `{BANK_B}`")),
                    "{text}"
                );
            }
        }

        #[test]
        fn a_decoy_ca_named_a_that_did_not_sign_the_leaf_is_not_compared() {
            let net = net();
            for chain in [
                [leaf(BANK_A, &net.b), net.a.der.clone(), net.b.der.clone()],
                [leaf(BANK_A, &net.b), net.b.der.clone(), net.a.der.clone()],
            ] {
                let (bridge, float) = verify(&net, &chain, BANK_A);
                for result in [&bridge, &float] {
                    assert_eq!(
                        refusal(result).reasons,
                        vec![format!("is issued by node CA `{BANK_B}`")]
                    );
                }
            }
        }

        #[test]
        fn node_ca_and_leaf_compare_as_legal_names() {
            let net = net();
            let a_reordered = ca(
                "C=GB, O=Bank A, L=London",
                BasicConstraints::Constrained(0),
                Some(&net.root),
            );
            let chain = [leaf(BANK_A, &a_reordered), a_reordered.der.clone()];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            bridge.unwrap();
            float.unwrap();
            // But a node CA with one more attribute is another name.
            let a_ou = ca(
                "O=Bank A, OU=Treasury, L=London, C=GB",
                BasicConstraints::Constrained(0),
                Some(&net.root),
            );
            let chain = [leaf(BANK_A, &a_ou), a_ou.der.clone()];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            refusal(&bridge);
            refusal(&float);
        }

        #[test]
        fn the_node_ca_must_be_issued_by_a_trust_root() {
            let net = net();
            // B's node CA, if unconstrained, can issue a sub-CA named A.
            let b_open = ca(BANK_B, BasicConstraints::Unconstrained, Some(&net.root));
            let fake_a = ca(BANK_A, BasicConstraints::Constrained(0), Some(&b_open));
            let chain = [
                leaf(BANK_A, &fake_a),
                fake_a.der.clone(),
                b_open.der.clone(),
            ];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            for result in [&bridge, &float] {
                let reasons = refusal(result).reasons;
                assert_eq!(reasons.len(), 1, "{reasons:?}");
                assert!(
                    reasons[0].contains("not issued by a trust root"),
                    "{reasons:?}"
                );
            }
            // A leaf issued by the root itself has no node CA.
            let chain = [leaf(BANK_A, &net.root)];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            for result in [&bridge, &float] {
                assert_eq!(
                    refusal(result).reasons,
                    vec!["is issued directly by a trust root, with no node CA".to_string()]
                );
            }
        }

        #[test]
        fn the_bridge_still_pins_after_the_rule() {
            let net = net();
            let chain = [leaf(BANK_B, &net.b), net.b.der.clone()];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            float.unwrap();
            let text = bridge.unwrap_err().to_string();
            assert!(
                text.contains("is not one of the expected legal names"),
                "{text}"
            );
        }

        #[test]
        fn chain_errors_come_first() {
            // Another network's chain: webpki's own error, not the identity rule's.
            let net = net();
            let other = self::net();
            let chain = [leaf(BANK_A, &other.a), other.a.der.clone()];
            let (bridge, float) = verify(&net, &chain, BANK_A);
            for result in [bridge, float] {
                let text = result.unwrap_err().to_string();
                assert!(
                    text.contains("UnknownIssuer") || text.contains("BadSignature"),
                    "{text}"
                );
            }
        }
    }
}
