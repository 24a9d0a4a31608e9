//! A complete development PKI in one call, for demos, tests and `drawbridge certs`.
//!
//! Layout under `dir`:
//!
//! ```text
//! root/ca.crt, root/ca.key          network root CA (self-signed)
//! <slug>/node-ca.crt, node-ca.key   per-node intermediate CA (signed by the root, pathlen 0),
//!                                   subject exactly the node's legal name
//! <slug>/tls.crt                    node TLS certificate, PEM chain: leaf then node CA;
//!                                   the leaf's subject is the legal name too
//! <slug>/tls.key                    its private key (PKCS#8 PEM)
//! <slug>/root.crt                   copy of the root, the node's trust store
//! ```
//!
//! Certificates are ECDSA P-256, valid from one day ago for two years, with subject and
//! authority key identifiers so OpenSSL-based peers (Qpid Proton) build the same chains as
//! rustls. Never use these keys outside development: they are written unencrypted.
//!
//! The node CA and the TLS certificate carry the same subject, as in a Corda network: peers
//! accept a TLS certificate for legal name X only if its issuing node CA is named X and is
//! issued by the root ([`crate::binding`]). The node CA key lets its holder sign any subject;
//! certificates it signs for other names are refused by every float and bridge.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::{CertError, LegalName};

/// Where [`generate_network`] put everything.
#[derive(Debug, Clone)]
pub struct DevNetwork {
    /// The network root CA certificate (`dir/root/ca.crt`): every node's trust anchor.
    pub root_cert: PathBuf,
    /// One entry per requested legal name, in the order given.
    pub nodes: Vec<NodeFiles>,
}

/// The files of one node of a [`DevNetwork`].
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// The node's identity (its TLS certificate subject).
    pub legal_name: LegalName,
    /// `dir/<slug>/`, holding the files below.
    pub dir: PathBuf,
    /// PEM chain, leaf then node CA: what the bridge/float presents.
    pub tls_cert: PathBuf,
    /// PKCS#8 PEM private key of the leaf.
    pub tls_key: PathBuf,
    /// Copy of the network root: the trust store to configure.
    pub root_cert: PathBuf,
    /// The node's intermediate CA certificate (also included in `tls_cert`).
    pub node_ca_cert: PathBuf,
}

/// Writes a whole dev network under `dir` (see the module docs); existing files are
/// overwritten with a fresh root and fresh keys. Names must have distinct slugs.
pub fn generate_network(dir: &Path, names: &[LegalName]) -> Result<DevNetwork, CertError> {
    let mut slugs = std::collections::HashSet::new();
    for name in names {
        if !slugs.insert(name.slug()) || name.slug() == "root" {
            return Err(CertError::Generate(format!(
                "legal name `{name}` maps to directory `{}`, which is already taken",
                name.slug()
            )));
        }
    }

    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::days(1);
    let not_after = now + Duration::days(730);

    // Root CA.
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Drawbridge Dev Root CA");
        dn.push(DnType::OrganizationName, "Drawbridge Dev Network");
        dn
    };
    ca_params(
        &mut root_params,
        BasicConstraints::Unconstrained,
        not_before,
        not_after,
    );
    let root_cert = root_params.self_signed(&root_key)?;
    let root_pem = root_cert.pem();
    let root_issuer = Issuer::new(root_params, &root_key);

    let root_dir = dir.join("root");
    create_dir(&root_dir)?;
    let root_cert_path = root_dir.join("ca.crt");
    write_file(&root_cert_path, &root_pem, false)?;
    write_file(&root_dir.join("ca.key"), &root_key.serialize_pem(), true)?;

    let mut nodes = Vec::with_capacity(names.len());
    for name in names {
        // Node CA: subject exactly the legal name. A TLS certificate speaks for a legal name
        // only if its issuing node CA has that same name (see `crate::binding`).
        let node_ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut node_ca_params = CertificateParams::default();
        node_ca_params.distinguished_name = legal_name_dn(name)?;
        ca_params(
            &mut node_ca_params,
            BasicConstraints::Constrained(0),
            not_before,
            not_after,
        );
        let node_ca_cert = node_ca_params.signed_by(&node_ca_key, &root_issuer)?;
        let node_ca_pem = node_ca_cert.pem();
        let node_issuer = Issuer::new(node_ca_params, &node_ca_key);

        // Leaf: subject is exactly the legal name.
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf_cert =
            leaf_params(name, not_before, not_after)?.signed_by(&leaf_key, &node_issuer)?;

        let node_dir = dir.join(name.slug());
        create_dir(&node_dir)?;
        let files = NodeFiles {
            legal_name: name.clone(),
            tls_cert: node_dir.join("tls.crt"),
            tls_key: node_dir.join("tls.key"),
            root_cert: node_dir.join("root.crt"),
            node_ca_cert: node_dir.join("node-ca.crt"),
            dir: node_dir,
        };
        write_file(&files.node_ca_cert, &node_ca_pem, false)?;
        write_file(
            &files.dir.join("node-ca.key"),
            &node_ca_key.serialize_pem(),
            true,
        )?;
        write_file(
            &files.tls_cert,
            &format!("{}{}", leaf_cert.pem(), node_ca_pem),
            false,
        )?;
        write_file(&files.tls_key, &leaf_key.serialize_pem(), true)?;
        write_file(&files.root_cert, &root_pem, false)?;
        nodes.push(files);
    }

    Ok(DevNetwork {
        root_cert: root_cert_path,
        nodes,
    })
}

/// A node TLS certificate: subject exactly the legal name, server and client auth.
fn leaf_params(
    name: &LegalName,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CertError> {
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = legal_name_dn(name)?;
    leaf.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    ];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    Ok(leaf)
}

/// Issues `node` a new TLS certificate from its node CA (`node-ca.crt` + `node-ca.key` in
/// its directory), with a new key: what a renewal before expiry produces. Writes the chain
/// (leaf then node CA) to `cert_out` and the key (mode 0600) to `key_out`, each atomically,
/// so they can be written straight over the live files of a running daemon. The
/// certificate is valid from a day ago for `valid_days` days; a negative count makes one
/// that has already expired (for tests).
pub fn issue_tls_cert(
    node: &NodeFiles,
    cert_out: &Path,
    key_out: &Path,
    valid_days: i64,
) -> Result<(), CertError> {
    let not_after = OffsetDateTime::now_utc() + Duration::days(valid_days);
    issue_tls_cert_until(node, cert_out, key_out, not_after.into())
}

/// [`issue_tls_cert`] with an exact `notAfter` (whole seconds): a certificate that expires a
/// few seconds from now, to test what happens to connections that use it at that moment.
pub fn issue_tls_cert_until(
    node: &NodeFiles,
    cert_out: &Path,
    key_out: &Path,
    not_after: std::time::SystemTime,
) -> Result<(), CertError> {
    let read = |p: &Path| fs::read_to_string(p).map_err(CertError::io(p));
    let ca_pem = read(&node.node_ca_cert)?;
    let ca_key = KeyPair::from_pem(&read(&node.dir.join("node-ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)?;
    let now = OffsetDateTime::now_utc();
    let not_after = OffsetDateTime::from(not_after);
    let not_before = (now - Duration::days(1)).min(not_after - Duration::days(1));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = leaf_params(&node.legal_name, not_before, not_after)?.signed_by(&key, &issuer)?;
    let tmp = key_out.with_extension("tmp-replace");
    write_file(&tmp, &key.serialize_pem(), true)?;
    fs::rename(&tmp, key_out).map_err(CertError::io(key_out))?;
    replace_file(cert_out, &format!("{}{ca_pem}", cert.pem()))
}

/// Settings shared by every CA: basicConstraints CA, keyCertSign + cRLSign, SKI (rcgen's
/// default) and AKI (so OpenSSL matches issuers by key id).
fn ca_params(
    params: &mut CertificateParams,
    constraints: BasicConstraints,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) {
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
}

/// The legal name as a certificate subject, attributes in the order given.
pub(crate) fn legal_name_dn(name: &LegalName) -> Result<DistinguishedName, CertError> {
    let mut dn = DistinguishedName::new();
    for attr in name.attributes() {
        dn.push(dn_type(&attr.oid)?, dn_value(&attr.oid, &attr.value));
    }
    Ok(dn)
}

fn dn_type(oid: &str) -> Result<DnType, CertError> {
    let arcs = oid
        .split('.')
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CertError::Generate(format!("bad attribute OID `{oid}`")))?;
    Ok(DnType::from_oid(&arcs))
}

/// countryName must be a PrintableString (RFC 5280); everything else is UTF8String.
fn dn_value(oid: &str, value: &str) -> DnValue {
    if oid == "2.5.4.6" {
        if let Ok(p) = value.to_owned().try_into() {
            return DnValue::PrintableString(p);
        }
    }
    DnValue::Utf8String(value.to_owned())
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(CertError::io(dir))
}

/// Writes (replacing) a file; private keys are created readable by the owner only.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(CertError::io(path))?;
    file.write_all(contents.as_bytes())
        .map_err(CertError::io(path))?;
    #[cfg(unix)]
    if private {
        // An existing file keeps its old mode on open; tighten it explicitly.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(CertError::io(path))?;
    }
    Ok(())
}

/// What a CA of a dev network says in a CRL: which certificates it revokes and for how long
/// the list is current.
#[derive(Debug, Clone)]
pub struct CrlSpec {
    /// PEM files whose first certificate is revoked (a node's `tls.crt`, a `node-ca.crt`).
    pub revoked: Vec<PathBuf>,
    /// `thisUpdate`.
    pub this_update: OffsetDateTime,
    /// `nextUpdate`: after it the CRL is expired.
    pub next_update: OffsetDateTime,
    /// The CRL number (should grow with each new list).
    pub number: u64,
}

impl CrlSpec {
    /// A list current from an hour ago for a week, revoking `revoked`.
    pub fn current(revoked: &[&Path], number: u64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            revoked: revoked.iter().map(|p| p.to_path_buf()).collect(),
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(7),
            number,
        }
    }

    /// A list that expired an hour ago.
    pub fn expired(revoked: &[&Path], number: u64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            revoked: revoked.iter().map(|p| p.to_path_buf()).collect(),
            this_update: now - Duration::days(8),
            next_update: now - Duration::hours(1),
            number,
        }
    }
}

/// A PEM CRL signed by the CA in `ca_cert` (PEM, first certificate) with the key in `ca_key`
/// (in a dev network: `root/ca.crt` + `root/ca.key`, or a node's `node-ca.crt` +
/// `node-ca.key`).
pub fn make_crl(ca_cert: &Path, ca_key: &Path, spec: &CrlSpec) -> Result<String, CertError> {
    use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
    use x509_parser::prelude::{FromDer, X509Certificate};

    let read = |p: &Path| fs::read_to_string(p).map_err(CertError::io(p));
    let key = KeyPair::from_pem(&read(ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert)?, &key)?;
    let mut revoked_certs = Vec::new();
    for path in &spec.revoked {
        let der = CertificateDer::from_pem_slice(read(path)?.as_bytes()).map_err(|e| match e {
            pem::Error::NoItemsFound => CertError::NoCertificates { path: path.clone() },
            e => CertError::Pem {
                path: path.clone(),
                reason: e.to_string(),
            },
        })?;
        let (_, cert) =
            X509Certificate::from_der(der.as_ref()).map_err(|e| CertError::X509(e.to_string()))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(cert.raw_serial()),
            revocation_time: spec.this_update,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let crl = CertificateRevocationListParams {
        this_update: spec.this_update,
        next_update: spec.next_update,
        crl_number: SerialNumber::from(spec.number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    Ok(crl.pem()?)
}

/// Replaces `path` with `contents` atomically (write beside it, then rename), as an operator
/// or a CRL publisher should: a reader never sees half a file.
pub fn replace_file(path: &Path, contents: &str) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp-replace");
    write_file(&tmp, contents, false)?;
    fs::rename(&tmp, path).map_err(CertError::io(path))
}
