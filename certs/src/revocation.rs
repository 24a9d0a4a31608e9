//! Certificate revocation for both ends of a peer link: CRL sources, the three modes, live
//! reload, and re-checking peers of established connections.
//!
//! A [`Revocation`] holds the CRLs currently in force and the rustls verifiers built from
//! them. The float's client verifier ([`crate::server_config_with`]) and the bridge's server
//! verifier ([`crate::client_config_with`]) ask it for the current set on every handshake, so
//! a reloaded CRL applies to the next handshake without a restart. Sources:
//!
//! * files (`crls`), PEM (`X509 CRL` blocks) or one DER CRL each, polled every
//!   `crl_reload_interval` (metadata: modification time, size, inode) and re-read when they
//!   change; a file that disappears or stops parsing keeps its last good CRLs (logged once);
//! * optional `http://` URLs (`crl_urls`), fetched by a background thread: a handshake never
//!   waits for a fetch. A failing URL is logged once per episode and retried with backoff;
//!   its last good CRLs stay in force.
//!
//! Modes ([`RevocationMode`]): every certificate of the peer's chain (TLS certificate and
//! node CA) is checked against its issuer's CRL in both checking modes.
//!
//! | | certificate listed | issuer has no CRL | issuer's CRL past `nextUpdate` |
//! |---|---|---|---|
//! | `hard-fail` | refused | refused | refused |
//! | `soft-fail` | refused | accepted | still applied (listed ones refused), warning logged |
//! | `off` | not checked | — | — |
//!
//! Sources are not trusted (a URL is plain HTTP; a revoked member holds genuine old CRLs of
//! its node CA), so they are not merged: per issuer, the CRL in force is the newest one whose
//! signature verifies with the key of a CA of that name — a trust root, or a node CA learned
//! from a verified path (`Revocation::learn_issuers`) — and it is only ever replaced by a
//! newer one (CRL number and `thisUpdate` never go back). A CRL that does not verify, or is
//! older than the one in force, is ignored (logged once per change, counted in
//! `drawbridge_crl_ignored_total`): one bad source refuses nobody and cuts nobody.
//!
//! Whenever the CRLs in force change — a file or URL brings new content, or a CRL crosses its
//! `nextUpdate` — the [`Revocation::subscribe`] generation counter moves. Connections watch it
//! and re-check their peer with an [`EstablishedPeer`] (kept per connection: it verifies the
//! chain again only after such a change, or when a certificate of the chain passes its
//! `notAfter`); a [`PeerRefusal`] means the peer must be disconnected.

use std::cell::RefCell;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, ServerName, SignatureVerificationAlgorithm,
    UnixTime,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::CertError;

/// What to do about certificate revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RevocationMode {
    /// Every certificate of the chain must be covered by a current CRL of its issuer: a
    /// listed certificate, a missing CRL or an expired CRL all refuse the peer.
    HardFail,
    /// Certificates listed on a CRL are refused (an expired CRL still counts); a certificate
    /// whose issuer has no CRL is accepted.
    SoftFail,
    /// No revocation checking.
    #[default]
    Off,
}

impl RevocationMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HardFail => "hard-fail",
            Self::SoftFail => "soft-fail",
            Self::Off => "off",
        }
    }

    /// The default when `revocation` is not configured: `soft-fail` if any CRL source is
    /// configured, `off` otherwise.
    pub fn default_for(has_sources: bool) -> Self {
        if has_sources {
            Self::SoftFail
        } else {
            Self::Off
        }
    }
}

impl fmt::Display for RevocationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RevocationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hard-fail" => Ok(Self::HardFail),
            "soft-fail" => Ok(Self::SoftFail),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "`{other}` is not a revocation mode (hard-fail, soft-fail or off)"
            )),
        }
    }
}

/// Where CRLs come from and how they are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationSettings {
    /// The mode.
    pub mode: RevocationMode,
    /// CRL files (PEM or DER), re-read when they change.
    pub crl_files: Vec<PathBuf>,
    /// `http://` URLs fetched in the background.
    pub crl_urls: Vec<String>,
    /// How often the files are polled (and CRL expiry re-evaluated).
    pub reload_interval: Duration,
    /// How often each URL is fetched after a success.
    pub fetch_interval: Duration,
    /// Deadline of one fetch.
    pub fetch_timeout: Duration,
}

impl Default for RevocationSettings {
    fn default() -> Self {
        Self {
            mode: RevocationMode::Off,
            crl_files: Vec::new(),
            crl_urls: Vec::new(),
            reload_interval: Duration::from_secs(30),
            fetch_interval: Duration::from_secs(300),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

/// Which side of the handshake the checked peer was (its certificate's extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (the float checks bridges).
    Client,
    /// The peer is a TLS server (the bridge checks floats).
    Server,
}

/// Largest CRL accepted from a URL.
const MAX_FETCHED_CRL_BYTES: u64 = 32 * 1024 * 1024;
/// First retry delay of a failing URL (doubles up to the fetch interval).
const FETCH_RETRY_MIN: Duration = Duration::from_secs(5);

/// One parsed CRL.
#[derive(Clone)]
struct Crl {
    der: CertificateRevocationListDer<'static>,
    /// DER of the issuer name, to match certificates' issuers.
    issuer_raw: Vec<u8>,
    issuer: String,
    /// `nextUpdate` as Unix seconds.
    next_update: Option<i64>,
    /// `thisUpdate` as Unix seconds.
    this_update: i64,
    /// The CRL number, big-endian without leading zeros (empty if the CRL has none).
    number: Vec<u8>,
    /// Raw serial numbers listed.
    revoked: Vec<Vec<u8>>,
    /// File or URL it came from.
    source: String,
}

impl Crl {
    fn label(&self) -> String {
        format!("CRL of `{}` from {}", self.issuer, self.source)
    }

    fn expired_at(&self, now: i64) -> Option<i64> {
        self.next_update.filter(|&t| t < now)
    }

    /// Whether this CRL goes back from `held` in CRL number or in `thisUpdate`: a source
    /// offering it is ignored (a revoked member could serve the list from before its
    /// revocation, genuine and signed).
    fn older_than(&self, held: &Crl) -> bool {
        compare_numbers(&self.number, &held.number) == CmpOrdering::Less
            || self.this_update < held.this_update
    }

    /// Whether this CRL may replace `held`: neither goes back, and one moves forward.
    fn newer_than(&self, held: &Crl) -> bool {
        !self.older_than(held)
            && (compare_numbers(&self.number, &held.number) == CmpOrdering::Greater
                || self.this_update > held.this_update)
    }

    fn version(&self) -> String {
        let number = if self.number.is_empty() {
            "none".to_string()
        } else {
            self.number.iter().map(|b| format!("{b:02x}")).collect()
        };
        format!("number 0x{number}, thisUpdate (unix) {}", self.this_update)
    }
}

/// Orders two big-endian unsigned integers without leading zeros.
fn compare_numbers(a: &[u8], b: &[u8]) -> CmpOrdering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn parse_one(der: CertificateRevocationListDer<'static>, source: &str) -> Result<Crl, String> {
    webpki::BorrowedCertRevocationList::from_der(der.as_ref())
        .map_err(|e| format!("not a usable CRL: {e:?}"))?;
    let (issuer_raw, issuer, next_update, this_update, number, revoked) = {
        let (_, parsed) =
            x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| format!("not a CRL: {e}"))?;
        let number = parsed
            .crl_number()
            .map(|n| {
                let bytes = n.to_bytes_be();
                let zeros = bytes.iter().take_while(|&&b| b == 0).count();
                bytes[zeros..].to_vec()
            })
            .unwrap_or_default();
        (
            parsed.issuer().as_raw().to_vec(),
            parsed.issuer().to_string(),
            parsed.next_update().map(|t| t.timestamp()),
            parsed.last_update().timestamp(),
            number,
            parsed
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect(),
        )
    };
    Ok(Crl {
        der,
        issuer_raw,
        issuer,
        next_update,
        this_update,
        number,
        revoked,
        source: source.to_string(),
    })
}

/// Parses the CRLs in one file or download: PEM `X509 CRL` blocks, or a single DER CRL.
fn parse_crls(bytes: &[u8], source: &str) -> Result<Vec<Crl>, String> {
    let ders = if bytes.first() == Some(&0x30) {
        vec![CertificateRevocationListDer::from(bytes.to_vec())]
    } else {
        let ders = <CertificateRevocationListDer as PemObject>::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        if ders.is_empty() {
            return Err("no `-----BEGIN X509 CRL-----` block found".into());
        }
        ders
    };
    ders.into_iter().map(|d| parse_one(d, source)).collect()
}

/// Identity of a file's current version, as far as polling can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

struct FileSource {
    path: PathBuf,
    stamp: Option<Stamp>,
    crls: Vec<Crl>,
    /// The problem last logged, so each is logged once.
    problem: Option<String>,
}

struct UrlSource {
    url: String,
    crls: Vec<Crl>,
    bytes: Vec<u8>,
    next_due: Instant,
    retry: Duration,
    failing: bool,
}

/// A CA whose key CRLs of its name are checked against.
#[derive(Clone, PartialEq, Eq)]
struct KnownCa {
    /// Its subject, DER with the outer SEQUENCE (as a CRL's issuer is kept).
    subject: Vec<u8>,
    /// Contents of its SubjectPublicKeyInfo, without the outer SEQUENCE (as a trust anchor
    /// holds it).
    spki: Vec<u8>,
}

/// Node CAs learned from verified paths are capped (they are only learned for issuers that
/// have a CRL waiting, so a real network stays far below).
const MAX_LEARNED_CAS: usize = 4096;

struct Sources {
    files: Vec<FileSource>,
    urls: Vec<UrlSource>,
    /// Labels of the CRLs that were past `nextUpdate` at the last check.
    expired: Vec<String>,
    /// Node CAs seen on verified paths (leaf → node CA → trust root) whose name issues a CRL
    /// of a source; with the trust anchors, the keys CRL signatures are checked against.
    learned: Vec<KnownCa>,
    /// Per issuer (DER name), the CRL in force: the newest valid one any source offered. It
    /// is only ever replaced by a newer one, whatever the sources offer later.
    held: BTreeMap<Vec<u8>, Crl>,
    /// Issuers with a CRL that no known key verifies (yet): a handshake presenting a node
    /// CA of that name teaches its key (`Revocation::learn_issuers`).
    wanted: HashSet<Vec<u8>>,
    /// Per (source, issuer), why its CRL is not used, as last logged (logged once each).
    problems: HashMap<(String, Vec<u8>), String>,
    /// CRLs whose issuer's key has not been seen yet (status pages).
    pending: Vec<String>,
}

impl Sources {
    fn all(&self) -> Vec<Crl> {
        self.files
            .iter()
            .flat_map(|f| f.crls.iter())
            .chain(self.urls.iter().flat_map(|u| u.crls.iter()))
            .cloned()
            .collect()
    }

    /// The CRLs in force, one per issuer.
    fn in_force(&self) -> Vec<Crl> {
        self.held.values().cloned().collect()
    }

    fn knows(&self, ca: &KnownCa) -> bool {
        self.learned.contains(ca)
    }

    /// Chooses, per issuer, the CRL in force: the newest of those whose signature verifies
    /// with the key of a trust anchor or of a learned node CA of that name, never older
    /// than the one held. Sources whose CRL does not verify, or goes back, are ignored
    /// (logged once per change, counted). Returns whether the CRLs in force changed.
    fn select(
        &mut self,
        roots: &RootCertStore,
        algs: &[&dyn SignatureVerificationAlgorithm],
        ignored: &AtomicU64,
    ) -> bool {
        let known: Vec<KnownCa> = roots
            .roots
            .iter()
            .map(|ta| KnownCa {
                subject: der_sequence(ta.subject.as_ref()),
                spki: ta.subject_public_key_info.as_ref().to_vec(),
            })
            .chain(self.learned.iter().cloned())
            .collect();
        let verifies = |crl: &Crl| {
            known
                .iter()
                .filter(|k| k.subject == crl.issuer_raw)
                .any(|k| crl_signed_by(crl.der.as_ref(), &k.spki, algs))
        };
        let before: Vec<CertificateRevocationListDer<'static>> =
            self.held.values().map(|c| c.der.clone()).collect();
        // A held CRL no known key verifies any more (the trust roots were replaced) leaves.
        self.held.retain(|_, crl| verifies(crl));

        let mut by_issuer: BTreeMap<Vec<u8>, Vec<Crl>> = BTreeMap::new();
        for crl in self.all() {
            by_issuer
                .entry(crl.issuer_raw.clone())
                .or_default()
                .push(crl);
        }
        let mut wanted = HashSet::new();
        let mut problems = HashMap::new();
        let mut pending = Vec::new();
        for (issuer, candidates) in by_issuer {
            let has_key = known.iter().any(|k| k.subject == issuer);
            let mut valid = Vec::new();
            for crl in candidates {
                if !has_key {
                    pending.push(crl.label());
                    wanted.insert(issuer.clone());
                } else if verifies(&crl) {
                    valid.push(crl);
                } else {
                    wanted.insert(issuer.clone());
                    problems.insert(
                        (crl.source.clone(), issuer.clone()),
                        ("signature", format!(
                            "its signature does not verify with the key of any CA named `{}` (trust roots, or node CAs seen on a verified path)",
                            crl.issuer
                        )),
                    );
                }
            }
            let newest = valid.iter().max_by(|a, b| {
                compare_numbers(&a.number, &b.number).then(a.this_update.cmp(&b.this_update))
            });
            if let Some(newest) = newest {
                let replace = self
                    .held
                    .get(&issuer)
                    .is_none_or(|held| newest.newer_than(held));
                if replace {
                    self.held.insert(issuer.clone(), newest.clone());
                }
            }
            if let Some(held) = self.held.get(&issuer) {
                for crl in valid.iter().filter(|c| c.older_than(held)) {
                    problems.insert(
                        (crl.source.clone(), issuer.clone()),
                        (
                            "older",
                            format!(
                                "it goes back from the CRL in force ({}; this one: {})",
                                held.version(),
                                crl.version()
                            ),
                        ),
                    );
                }
            }
        }
        for ((source, issuer), (reason, problem)) in &problems {
            let key = (source.clone(), issuer.clone());
            if self.problems.get(&key) != Some(problem) {
                warn!(source = %source, problem = %problem, "CRL ignored; the CRL in force for its issuer (if any) stays");
                ignored.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("drawbridge_crl_ignored_total", "reason" => *reason).increment(1);
            }
        }
        for (source, _) in self.problems.keys().filter(|k| !problems.contains_key(*k)) {
            info!(source = %source, "CRL source no longer ignored");
        }
        self.problems = problems
            .into_iter()
            .map(|(k, (_, problem))| (k, problem))
            .collect();
        if !pending.is_empty() && pending != self.pending {
            debug!(crls = ?pending, "CRLs wait for their issuer's certificate on a verified path (the first handshake of a peer of that CA)");
        }
        self.pending = pending;
        self.wanted = wanted;
        let after: Vec<_> = self.held.values().map(|c| c.der.clone()).collect();
        before != after
    }
}

/// A DER element: its tag, its contents, the whole element, and what follows it.
type DerElement<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// One DER element at the start of `input`. `None` if it does not parse (short input,
/// indefinite or huge length, a high tag number).
fn der_element(input: &[u8]) -> Option<DerElement<'_>> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((tag, &rest[..len], &input[..header + len], &rest[len..]))
}

/// `contents` wrapped in a DER SEQUENCE.
fn der_sequence(contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = vec![0x30];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// Whether the CRL `crl_der` is signed by the key in `spki` (SubjectPublicKeyInfo contents,
/// without the outer SEQUENCE), as rustls-webpki checks it during a handshake: the same
/// algorithms, matched by their DER identifiers.
fn crl_signed_by(
    crl_der: &[u8],
    spki: &[u8],
    algs: &[&dyn SignatureVerificationAlgorithm],
) -> bool {
    let check = || -> Option<bool> {
        let (0x30, crl, _, _) = der_element(crl_der)? else {
            return None;
        };
        let (0x30, _, tbs, rest) = der_element(crl)? else {
            return None;
        };
        let (0x30, signature_alg, _, rest) = der_element(rest)? else {
            return None;
        };
        let (0x03, signature_bits, _, _) = der_element(rest)? else {
            return None;
        };
        let (0, signature) = signature_bits.split_first().map(|(u, s)| (*u, s))? else {
            return None;
        };
        let (0x30, key_alg, _, rest) = der_element(spki)? else {
            return None;
        };
        let (0x03, key_bits, _, _) = der_element(rest)? else {
            return None;
        };
        let (0, key) = key_bits.split_first().map(|(u, s)| (*u, s))? else {
            return None;
        };
        Some(
            algs.iter()
                .filter(|a| {
                    a.signature_alg_id().as_ref() == signature_alg
                        && a.public_key_alg_id().as_ref() == key_alg
                })
                .any(|a| a.verify_signature(key, tbs, signature).is_ok()),
        )
    };
    check().unwrap_or(false)
}

/// The trust roots and CRLs in force and the verifiers built from them.
pub(crate) struct Snapshot {
    mode: RevocationMode,
    /// Kept with the verifiers built from them, so that one handshake checks the chain and
    /// the identity rule against the same roots even while they are being replaced.
    roots: Arc<RootCertStore>,
    crls: Vec<Crl>,
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

impl Snapshot {
    fn build(
        mode: RevocationMode,
        roots: &Arc<RootCertStore>,
        provider: &Arc<CryptoProvider>,
        crls: Vec<Crl>,
    ) -> Result<Self, CertError> {
        let ders: Vec<_> = match mode {
            RevocationMode::Off => Vec::new(),
            _ => crls.iter().map(|c| c.der.clone()).collect(),
        };
        let mut client =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
        let mut server =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone());
        // The whole chain is checked (rustls's default depth) in both checking modes.
        match mode {
            RevocationMode::Off => {}
            RevocationMode::SoftFail => {
                client = client
                    .with_crls(ders.clone())
                    .allow_unknown_revocation_status();
                server = server.with_crls(ders).allow_unknown_revocation_status();
            }
            RevocationMode::HardFail => {
                client = client
                    .with_crls(ders.clone())
                    .enforce_revocation_expiration();
                server = server.with_crls(ders).enforce_revocation_expiration();
            }
        }
        Ok(Self {
            mode,
            roots: roots.clone(),
            crls,
            client: client
                .build()
                .map_err(|e| CertError::Verifier(e.to_string()))?,
            server: server
                .build()
                .map_err(|e| CertError::Verifier(e.to_string()))?,
        })
    }

    /// rustls checks no revocation at all when it holds no CRL; hard-fail must refuse then.
    fn no_crl_refusal(&self) -> Result<(), rustls::Error> {
        if self.mode == RevocationMode::HardFail && self.crls.is_empty() {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownRevocationStatus,
            ))
        } else {
            Ok(())
        }
    }

    /// Chain, validity and revocation of a client certificate (float side).
    pub(crate) fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        self.client
            .verify_client_cert(end_entity, intermediates, now)?;
        self.no_crl_refusal()
    }

    /// Chain, validity and revocation of a server certificate (bridge side); the server name
    /// is not checked (peers are identified by subject).
    pub(crate) fn verify_server(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        // WebPkiServerVerifier checks chain, validity and revocation first and the name last,
        // so a name mismatch means everything else passed.
        match self
            .server
            .verify_server_cert(end_entity, intermediates, server_name, &[], now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        self.no_crl_refusal()
    }

    /// The trust roots these verifiers were built with.
    pub(crate) fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    pub(crate) fn client_verifier(&self) -> &Arc<dyn ClientCertVerifier> {
        &self.client
    }

    pub(crate) fn server_verifier(&self) -> &Arc<WebPkiServerVerifier> {
        &self.server
    }
}

struct Inner {
    settings: RevocationSettings,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Snapshot>>,
    /// Held while a new snapshot is built from the current one and swapped in (a CRL
    /// reload and a trust-root replacement must not undo each other).
    swap: Mutex<()>,
    sources: Mutex<Sources>,
    generation: watch::Sender<u64>,
    /// CRLs ignored (bad signature, or older than the one in force), once per change.
    ignored: AtomicU64,
}

/// The revocation state of one daemon: current CRLs, mode, reload and the change signal.
///
/// Cheap to clone (shared). The background refresh started by [`Revocation::spawn_refresh`]
/// stops by itself once every clone is dropped.
#[derive(Clone)]
pub struct Revocation {
    inner: Arc<Inner>,
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation")
            .field("mode", &self.inner.settings.mode)
            .field("crls", &self.current().crls.len())
            .field("generation", &self.generation())
            .finish()
    }
}

impl Revocation {
    /// No revocation checking against `roots`.
    pub fn off(roots: Arc<RootCertStore>) -> Result<Self, CertError> {
        Self::new(roots, RevocationSettings::default(), Vec::new(), Vec::new())
    }

    /// A fixed set of CRLs (nothing to reload).
    pub fn from_crls(
        roots: Arc<RootCertStore>,
        mode: RevocationMode,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Self, CertError> {
        let crls = crls
            .into_iter()
            .map(|d| parse_one(d, "memory").map_err(CertError::Verifier))
            .collect::<Result<Vec<_>, _>>()?;
        let settings = RevocationSettings {
            mode,
            ..RevocationSettings::default()
        };
        let file = FileSource {
            path: PathBuf::new(),
            stamp: None,
            crls,
            problem: None,
        };
        Self::new(roots, settings, vec![file], Vec::new())
    }

    /// Reads the configured CRL files now (any unreadable or malformed one is an error) and
    /// builds the verifiers. URLs are not fetched here: call [`Revocation::spawn_refresh`].
    pub fn load(
        roots: Arc<RootCertStore>,
        settings: RevocationSettings,
    ) -> Result<Self, CertError> {
        let mut files = Vec::new();
        for path in &settings.crl_files {
            let st = stamp(path).map_err(CertError::io(path))?;
            let bytes = std::fs::read(path).map_err(CertError::io(path))?;
            let crls = parse_crls(&bytes, &path.display().to_string()).map_err(|reason| {
                CertError::Pem {
                    path: path.clone(),
                    reason,
                }
            })?;
            files.push(FileSource {
                path: path.clone(),
                stamp: Some(st),
                crls,
                problem: None,
            });
        }
        let now = Instant::now();
        let urls = settings
            .crl_urls
            .iter()
            .map(|url| UrlSource {
                url: url.clone(),
                crls: Vec::new(),
                bytes: Vec::new(),
                next_due: now,
                retry: FETCH_RETRY_MIN,
                failing: false,
            })
            .collect();
        Self::new(roots, settings, files, urls)
    }

    fn new(
        roots: Arc<RootCertStore>,
        settings: RevocationSettings,
        files: Vec<FileSource>,
        urls: Vec<UrlSource>,
    ) -> Result<Self, CertError> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let mut sources = Sources {
            files,
            urls,
            expired: Vec::new(),
            learned: Vec::new(),
            held: BTreeMap::new(),
            wanted: HashSet::new(),
            problems: HashMap::new(),
            pending: Vec::new(),
        };
        let ignored = AtomicU64::new(0);
        sources.select(
            &roots,
            provider.signature_verification_algorithms.all,
            &ignored,
        );
        let snapshot = Snapshot::build(settings.mode, &roots, &provider, sources.in_force())?;
        let (generation, _) = watch::channel(0);
        let revocation = Self {
            inner: Arc::new(Inner {
                settings,
                provider,
                current: RwLock::new(Arc::new(snapshot)),
                swap: Mutex::new(()),
                sources: Mutex::new(sources),
                generation,
                ignored,
            }),
        };
        // Note the CRLs already expired at start (and say so), without a generation bump.
        revocation.check_expiry(false);
        Ok(revocation)
    }

    /// The mode in force.
    pub fn mode(&self) -> RevocationMode {
        self.inner.settings.mode
    }

    /// The trust roots the verifiers use now.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current().roots.clone()
    }

    /// Replaces the trust roots (a reloaded `trust_roots` file), keeping the CRLs in force:
    /// the next handshake verifies against `roots`. The CRL generation does not move, so
    /// established connections are not re-checked against the new roots (rotating roots
    /// must not cut the peers that are already authenticated). On error the previous roots
    /// stay in force.
    pub fn replace_roots(&self, roots: Arc<RootCertStore>) -> Result<(), CertError> {
        {
            let _swap = self.inner.swap.lock().expect("poisoned");
            let crls = self.current().crls.clone();
            let snapshot =
                Snapshot::build(self.inner.settings.mode, &roots, &self.inner.provider, crls)?;
            *self.inner.current.write().expect("poisoned") = Arc::new(snapshot);
        }
        // CRL signatures are checked against the trust anchors: choose again with the new
        // ones (a re-check this may cause judges revocation only, never the new roots).
        self.rebuild("trust roots replaced", false);
        Ok(())
    }

    /// How many CRLs are in force.
    pub fn crl_count(&self) -> usize {
        self.current().crls.len()
    }

    /// How many times a source's CRL was ignored (its signature does not verify, or it is
    /// older than the CRL in force for its issuer); counted once per change of a source.
    pub fn ignored_crls(&self) -> u64 {
        self.inner.ignored.load(Ordering::Relaxed)
    }

    /// One line per CRL in force: issuer, source, `nextUpdate` and whether it has expired;
    /// then one per CRL a source offers that is not in force, and why (for status pages).
    pub fn describe_crls(&self) -> Vec<String> {
        let now = unix_now();
        let mut lines: Vec<String> = self
            .current()
            .crls
            .iter()
            .map(|c| {
                let next = c
                    .next_update
                    .map_or_else(|| "none".to_string(), |t| t.to_string());
                let expired = if c.expired_at(now).is_some() {
                    " (expired)"
                } else {
                    ""
                };
                format!(
                    "{}; {}; nextUpdate (unix) {next}{expired}",
                    c.label(),
                    c.version()
                )
            })
            .collect();
        let sources = self.inner.sources.lock().expect("poisoned");
        lines.extend(
            sources
                .pending
                .iter()
                .map(|l| format!("{l}: not in force until a peer of its CA connects (its issuer's key is learned from a verified path)")),
        );
        let mut ignored: Vec<String> = sources
            .problems
            .iter()
            .map(|((source, _), problem)| format!("CRL from {source}: ignored: {problem}"))
            .collect();
        ignored.sort();
        lines.extend(ignored);
        lines
    }

    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.inner.current.read().expect("poisoned").clone()
    }

    /// The CRL generation: moves whenever the CRLs in force change (new content, or a CRL
    /// crossing its `nextUpdate`).
    pub fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    /// A receiver of the CRL generation: `changed()` completes after the CRLs in force
    /// changed; then re-check established peers with [`Revocation::is_revoked`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Would a peer presenting `chain` (leaf first, as `peer_certificates()` gives it) be
    /// refused now for revocation reasons? `Some(reason)` if so; `None` if it passes, or if
    /// it fails for another reason (an established connection is re-checked for
    /// revocation only). Always `None` in mode `off`.
    pub fn is_revoked(&self, chain: &[CertificateDer<'_>], role: PeerRole) -> Option<String> {
        if self.mode() == RevocationMode::Off {
            return None;
        }
        match self.verdict(chain, role) {
            Some(PeerRefusal::Revoked(reason)) => Some(reason),
            _ => None,
        }
    }

    /// The state of an established connection's peer presenting `chain` (leaf first): ask
    /// it with [`EstablishedPeer::check`] whenever something may have changed.
    pub fn established(
        &self,
        chain: Vec<CertificateDer<'static>>,
        role: PeerRole,
    ) -> EstablishedPeer {
        let mut expiries: Vec<i64> = chain
            .iter()
            .filter_map(|c| crate::CertInfo::of(c).ok())
            .map(|i| i.not_after)
            .collect();
        expiries.sort_unstable();
        expiries.dedup();
        EstablishedPeer {
            revocation: self.clone(),
            chain,
            role,
            checked: None,
            expiries,
            verifications: 0,
        }
    }

    /// Verifies `chain` now, with the CRLs in force: why an established peer presenting it
    /// must be disconnected, if it must. Other failures (e.g. a chain to trust roots that
    /// were replaced since its handshake) do not disconnect an authenticated peer.
    fn verdict(&self, chain: &[CertificateDer<'_>], role: PeerRole) -> Option<PeerRefusal> {
        let (end_entity, intermediates) = chain.split_first()?;
        let now = UnixTime::now();
        self.learn_issuers(end_entity, intermediates, role, now);
        let snapshot = self.current();
        let result = match role {
            PeerRole::Client => snapshot.verify_client(end_entity, intermediates, now),
            PeerRole::Server => {
                let name = ServerName::try_from("peer.invalid").expect("literal");
                snapshot.verify_server(end_entity, intermediates, &name, now)
            }
        };
        match result {
            Ok(()) => None,
            Err(e) if is_expiry_error(&e) => Some(PeerRefusal::Expired(describe_expiry(chain))),
            Err(e) if self.mode() != RevocationMode::Off && is_revocation_error(&e) => {
                Some(PeerRefusal::Revoked(describe_refusal(&snapshot, chain, &e)))
            }
            Err(_) => None,
        }
    }

    /// Learns the key of the node CA on a verified path of `chain` if a CRL of its name is
    /// waiting to be checked (its signature can only be checked with its issuer's key, and
    /// node CAs are not trust roots: the first handshake of one of its peers shows it).
    /// Only a CA directly under a trust root, on a path rustls-webpki verified, is learned;
    /// a CA the peer merely sent along is not. Called before every verification; costs
    /// nothing while no CRL is waiting.
    pub(crate) fn learn_issuers(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: PeerRole,
        now: UnixTime,
    ) {
        use x509_parser::prelude::{FromDer, X509Certificate};
        if self.mode() == RevocationMode::Off {
            return;
        }
        {
            let sources = self.inner.sources.lock().expect("poisoned");
            if sources.wanted.is_empty() {
                return;
            }
            let any_wanted = intermediates.iter().any(|der| {
                X509Certificate::from_der(der.as_ref()).is_ok_and(|(_, cert)| {
                    sources.wanted.contains(cert.subject().as_raw())
                        && !sources.knows(&KnownCa {
                            subject: cert.subject().as_raw().to_vec(),
                            spki: der_element(cert.public_key().raw)
                                .map(|(_, contents, _, _)| contents.to_vec())
                                .unwrap_or_default(),
                        })
                })
            });
            if !any_wanted {
                return;
            }
        }
        let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) else {
            return;
        };
        let snapshot = self.current();
        let found = RefCell::new(Vec::new());
        let hook = |path: &webpki::VerifiedPath<'_>| {
            let mut cas = path.intermediate_certificates();
            match (cas.next(), cas.next()) {
                (Some(ca), None) => {
                    let spki = ca.subject_public_key_info();
                    if let Some((_, contents, _, _)) = der_element(spki.as_ref()) {
                        found.borrow_mut().push(KnownCa {
                            subject: der_sequence(ca.subject()),
                            spki: contents.to_vec(),
                        });
                    }
                    Ok(())
                }
                _ => Err(webpki::Error::UnknownIssuer),
            }
        };
        let usage = match role {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            PeerRole::Server => webpki::KeyUsage::server_auth(),
        };
        let _ = cert.verify_for_usage(
            self.inner.provider.signature_verification_algorithms.all,
            &snapshot.roots.roots,
            intermediates,
            now,
            usage,
            None,
            Some(&hook),
        );
        let learned = {
            let mut sources = self.inner.sources.lock().expect("poisoned");
            let mut learned = false;
            for ca in found.into_inner() {
                if sources.wanted.contains(&ca.subject)
                    && !sources.knows(&ca)
                    && sources.learned.len() < MAX_LEARNED_CAS
                {
                    sources.learned.push(ca);
                    learned = true;
                }
            }
            learned
        };
        if learned {
            debug!("learned a node CA's key from a verified path; checking the CRLs of its name");
            self.rebuild("a waiting CRL's issuer was seen on a verified path", false);
        }
    }

    /// Poll the files once: re-read those that changed, re-evaluate CRL expiry. Returns
    /// whether the generation moved. The background refresh calls this every
    /// `reload_interval`; tests may call it directly.
    pub fn reload_now(&self) -> bool {
        let changed = self.poll_files();
        let rebuilt = changed && self.rebuild("file", true);
        let expiry = self.check_expiry(!rebuilt);
        rebuilt || expiry
    }

    /// Start the background refresh: a thread polling the files (and CRL expiry) every
    /// `reload_interval`, and one fetching the URLs. Does nothing in mode `off`. The threads
    /// end once every clone of this `Revocation` is dropped.
    pub fn spawn_refresh(&self) -> std::io::Result<()> {
        if self.mode() == RevocationMode::Off {
            return Ok(());
        }
        let weak = Arc::downgrade(&self.inner);
        let interval = self
            .inner
            .settings
            .reload_interval
            .max(Duration::from_millis(10));
        std::thread::Builder::new()
            .name("crl-reload".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(inner) = weak.upgrade() else { return };
                Revocation { inner }.reload_now();
            })?;
        if !self.inner.settings.crl_urls.is_empty() {
            let weak = Arc::downgrade(&self.inner);
            let timeout = self.inner.settings.fetch_timeout;
            std::thread::Builder::new()
                .name("crl-fetch".into())
                .spawn(move || fetch_loop(weak, timeout))?;
        }
        Ok(())
    }

    /// Re-reads changed files; true if any file's CRLs changed.
    fn poll_files(&self) -> bool {
        let mut sources = self.inner.sources.lock().expect("poisoned");
        let mut changed = false;
        for file in sources
            .files
            .iter_mut()
            .filter(|f| !f.path.as_os_str().is_empty())
        {
            let problem = match stamp(&file.path) {
                Err(e) => Some(format!("cannot access it: {e}")),
                Ok(st) if Some(&st) == file.stamp.as_ref() => None,
                Ok(st) => match std::fs::read(&file.path) {
                    Err(e) => Some(format!("cannot read it: {e}")),
                    Ok(bytes) => match parse_crls(&bytes, &file.path.display().to_string()) {
                        Err(e) => {
                            // Retry the same version only if it changes again.
                            file.stamp = Some(st);
                            Some(e)
                        }
                        Ok(crls) => {
                            file.stamp = Some(st);
                            let same = crls.len() == file.crls.len()
                                && crls.iter().zip(&file.crls).all(|(a, b)| a.der == b.der);
                            if !same {
                                info!(file = %file.path.display(), crls = crls.len(), "CRL file changed; reloaded");
                                file.crls = crls;
                                changed = true;
                            }
                            None
                        }
                    },
                },
            };
            match problem {
                Some(p) => {
                    if file.problem.as_ref() != Some(&p) {
                        warn!(file = %file.path.display(), problem = %p, "CRL file unusable; keeping its last good CRLs");
                        file.problem = Some(p);
                    }
                }
                None => {
                    if file.problem.take().is_some() {
                        info!(file = %file.path.display(), "CRL file usable again");
                    }
                }
            }
        }
        changed
    }

    /// Builds new verifiers from the sources and moves the generation; false (and logged)
    /// if they cannot be built, the previous ones staying in force.
    ///
    /// The CRLs in force are chosen again from the sources (`Sources::select`). The
    /// generation moves if they changed, or if `sources_changed` and a CRL waits for its
    /// issuer's key: re-checking established peers then teaches it.
    fn rebuild(&self, cause: &str, sources_changed: bool) -> bool {
        let _swap = self.inner.swap.lock().expect("poisoned");
        let roots = self.current().roots.clone();
        let (crls, changed, waiting) = {
            let mut sources = self.inner.sources.lock().expect("poisoned");
            let changed = sources.select(
                &roots,
                self.inner.provider.signature_verification_algorithms.all,
                &self.inner.ignored,
            );
            (sources.in_force(), changed, !sources.pending.is_empty())
        };
        if !changed {
            if sources_changed && waiting {
                self.inner.generation.send_modify(|g| *g += 1);
                return true;
            }
            return false;
        }
        let count = crls.len();
        match Snapshot::build(self.inner.settings.mode, &roots, &self.inner.provider, crls) {
            Ok(snapshot) => {
                *self.inner.current.write().expect("poisoned") = Arc::new(snapshot);
                self.inner.generation.send_modify(|g| *g += 1);
                info!(crls = count, cause, generation = self.generation(), "CRLs in force changed; new handshakes use them, established peers are re-checked");
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot build verifiers from the new CRLs; the previous ones stay in force");
                false
            }
        }
    }

    /// Logs CRLs that crossed `nextUpdate` (or were renewed) since the last check; moves
    /// the generation if `bump` and the set changed.
    fn check_expiry(&self, bump: bool) -> bool {
        let now = unix_now();
        let expired: Vec<String> = self
            .current()
            .crls
            .iter()
            .filter(|c| c.expired_at(now).is_some())
            .map(Crl::label)
            .collect();
        let mut sources = self.inner.sources.lock().expect("poisoned");
        if expired == sources.expired {
            return false;
        }
        for label in expired.iter().filter(|l| !sources.expired.contains(l)) {
            match self.mode() {
                RevocationMode::HardFail => {
                    warn!(crl = %label, "CRL past its nextUpdate: hard-fail refuses every certificate it covers until a newer one is loaded")
                }
                _ => {
                    warn!(crl = %label, "CRL past its nextUpdate: still applied (soft-fail); load a newer one")
                }
            }
        }
        sources.expired = expired;
        drop(sources);
        if bump {
            self.inner.generation.send_modify(|g| *g += 1);
        }
        bump
    }

    /// URLs due for a fetch now, and when the next one is due.
    fn due_urls(&self) -> (Vec<String>, Option<Instant>) {
        let sources = self.inner.sources.lock().expect("poisoned");
        let now = Instant::now();
        let due = sources
            .urls
            .iter()
            .filter(|u| u.next_due <= now)
            .map(|u| u.url.clone())
            .collect();
        let next = sources.urls.iter().map(|u| u.next_due).min();
        (due, next)
    }

    /// Records the outcome of one fetch.
    fn fetched(&self, url: &str, result: Result<Vec<u8>, String>) {
        let fetch_interval = self.inner.settings.fetch_interval;
        let mut changed = false;
        {
            let mut sources = self.inner.sources.lock().expect("poisoned");
            let Some(source) = sources.urls.iter_mut().find(|u| u.url == url) else {
                return;
            };
            let result = result.and_then(|bytes| parse_crls(&bytes, url).map(|c| (bytes, c)));
            match result {
                Ok((bytes, crls)) => {
                    if source.failing {
                        info!(url, "CRL fetch works again");
                    }
                    source.failing = false;
                    source.retry = FETCH_RETRY_MIN;
                    source.next_due = Instant::now() + fetch_interval;
                    if bytes != source.bytes {
                        debug!(url, crls = crls.len(), "fetched a new CRL");
                        source.bytes = bytes;
                        source.crls = crls;
                        changed = true;
                    }
                }
                Err(e) => {
                    let retry = source.retry;
                    if !source.failing {
                        warn!(url, error = %e, retry_in = ?retry, "cannot fetch CRL; its last good copy (if any) stays in force, retrying with backoff");
                    } else {
                        debug!(url, error = %e, retry_in = ?retry, "CRL fetch still failing");
                    }
                    source.failing = true;
                    source.next_due = Instant::now() + retry;
                    source.retry = (retry * 2).min(fetch_interval.max(FETCH_RETRY_MIN));
                }
            }
        }
        if changed {
            let rebuilt = self.rebuild("url", true);
            self.check_expiry(!rebuilt);
        }
    }
}

/// Why an established peer must be disconnected now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRefusal {
    /// A CRL in force refuses its chain (the reason names the certificate and the CRL).
    Revoked(String),
    /// A certificate of its chain is past its `notAfter` (the reason names it).
    Expired(String),
}

impl fmt::Display for PeerRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Revoked(reason) | Self::Expired(reason) => f.write_str(reason),
        }
    }
}

/// Longest wait of [`EstablishedPeer::until_next_expiry`]: a far `notAfter` is approached in
/// steps, so that a changed wall clock cannot make the wait much too long.
const MAX_EXPIRY_WAIT: Duration = Duration::from_secs(3600);

/// The verdict on one established connection's peer, kept for the connection's life.
///
/// Verifying a chain (signatures, validity, every CRL) is the expensive part of a
/// handshake; a connection needs it again only when its answer can change: when the CRLs
/// in force change (the [`Revocation::generation`] moves) or when a certificate of the
/// chain reaches its `notAfter`. [`EstablishedPeer::check`] verifies then and only then, so
/// a peer that begins and ends sessions at any rate costs one verification per connection.
#[derive(Debug)]
pub struct EstablishedPeer {
    revocation: Revocation,
    chain: Vec<CertificateDer<'static>>,
    role: PeerRole,
    /// The CRL generation of the last verification.
    checked: Option<u64>,
    /// `notAfter` (Unix seconds) of the chain's certificates not passed at the last
    /// verification, earliest first.
    expiries: Vec<i64>,
    verifications: u64,
}

impl EstablishedPeer {
    /// Why the peer must be disconnected now, if it must: verifies the chain if this is the
    /// first check, the CRLs changed since the last one, or a certificate of the chain
    /// passed its `notAfter`; otherwise answers from the last verification (which passed).
    pub fn check(&mut self) -> Option<PeerRefusal> {
        // Read before verifying: a change that lands meanwhile is verified next time.
        let generation = self.revocation.generation();
        let now = unix_now();
        let expiry_due = self.expiries.first().is_some_and(|&t| now > t);
        if self.checked == Some(generation) && !expiry_due {
            return None;
        }
        self.expiries.retain(|&t| t >= now);
        self.verifications += 1;
        // Learning a node CA's key here may bring a CRL into force and move the generation:
        // this verification uses it already, so it counts as checked.
        if let Some((end_entity, intermediates)) = self.chain.split_first() {
            self.revocation
                .learn_issuers(end_entity, intermediates, self.role, UnixTime::now());
        }
        self.checked = Some(self.revocation.generation().max(generation));
        self.revocation.verdict(&self.chain, self.role)
    }

    /// How long until a certificate of the chain passes its `notAfter` (then call
    /// [`EstablishedPeer::check`]); at most an hour, `None` if none is left.
    pub fn until_next_expiry(&self) -> Option<Duration> {
        let not_after = u64::try_from(*self.expiries.first()?).unwrap_or(0);
        // Strictly after notAfter (whole seconds), when the verifier calls it expired.
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.saturating_add(1));
        Some(
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(MAX_EXPIRY_WAIT),
        )
    }

    /// How many times the chain was verified (the first check included).
    pub fn verifications(&self) -> u64 {
        self.verifications
    }

    /// The peer's chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

fn fetch_loop(weak: Weak<Inner>, timeout: Duration) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .proxy(None)
        .build()
        .into();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (due, next) = Revocation { inner }.due_urls();
        for url in due {
            let result = fetch(&agent, &url);
            let Some(inner) = weak.upgrade() else { return };
            Revocation { inner }.fetched(&url, result);
        }
        let wait = next
            .map(|n| n.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        std::thread::sleep(wait);
    }
}

fn fetch(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, String> {
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_FETCHED_CRL_BYTES)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn is_revocation_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::Revoked
                | CertificateError::UnknownRevocationStatus
                | CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. }
        ) | rustls::Error::InvalidCertRevocationList(_)
    )
}

fn is_expiry_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )
    )
}

/// An operator's explanation of an expiry: which certificate of the chain, and when.
fn describe_expiry(chain: &[CertificateDer<'_>]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let now = unix_now();
    for (i, der) in chain.iter().enumerate() {
        let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
            continue;
        };
        let not_after = cert.validity().not_after.timestamp();
        if not_after < now {
            let what = if i == 0 {
                "its TLS certificate"
            } else {
                "a CA certificate of its chain"
            };
            return format!(
                "certificate expired: {what} `{}` (serial {}) expired at {}",
                cert.subject(),
                cert.raw_serial_as_string(),
                crate::CertInfo::rfc3339(not_after)
            );
        }
    }
    "certificate expired: a certificate of its chain is past its notAfter".into()
}

/// An operator's explanation of a revocation refusal: which certificate, and which CRL.
fn describe_refusal(
    snapshot: &Snapshot,
    chain: &[CertificateDer<'_>],
    e: &rustls::Error,
) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    if matches!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    ) {
        for (i, der) in chain.iter().enumerate() {
            let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
                continue;
            };
            let listed = snapshot.crls.iter().find(|c| {
                c.issuer_raw == cert.issuer().as_raw()
                    && c.revoked.iter().any(|s| s == cert.raw_serial())
            });
            if let Some(crl) = listed {
                let what = if i == 0 {
                    "its TLS certificate"
                } else {
                    "a CA certificate of its chain"
                };
                return format!(
                    "revoked: {what} `{}` (serial {}) is listed on the {}",
                    cert.subject(),
                    cert.raw_serial_as_string(),
                    crl.label()
                );
            }
        }
        return "revoked: a certificate of its chain is listed on its issuer's CRL".into();
    }
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownRevocationStatus) => {
            "revocation status unknown: a certificate of its chain has no CRL from its issuer (hard-fail)".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. },
        ) => "the CRL of an issuer in its chain is past its nextUpdate (hard-fail)".into(),
        other => format!("revocation check failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            RevocationMode::HardFail,
            RevocationMode::SoftFail,
            RevocationMode::Off,
        ] {
            assert_eq!(mode.as_str().parse::<RevocationMode>().unwrap(), mode);
        }
        assert!("hard".parse::<RevocationMode>().is_err());
        assert_eq!(RevocationMode::default_for(true), RevocationMode::SoftFail);
        assert_eq!(RevocationMode::default_for(false), RevocationMode::Off);
    }

    #[test]
    fn der_helpers_and_crl_order() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let contents = vec![7u8; len];
            let wrapped = der_sequence(&contents);
            let (tag, inner, whole, rest) = der_element(&wrapped).unwrap();
            assert_eq!(
                (tag, inner, whole, rest.len()),
                (0x30, &contents[..], &wrapped[..], 0)
            );
        }
        // Truncated or garbage input never parses (nor panics), and verifies nothing.
        assert!(der_element(&[0x30, 0x82, 0x01]).is_none());
        assert!(der_element(&[0x30, 0x05, 1, 2]).is_none());
        assert!(der_element(&[0x1f, 0x00]).is_none());
        let algs = aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all;
        assert!(!crl_signed_by(&[], &[], algs));
        assert!(!crl_signed_by(&der_sequence(&[0x30, 0x00]), &[], algs));
        assert_eq!(compare_numbers(&[2], &[1]), CmpOrdering::Greater);
        assert_eq!(compare_numbers(&[1, 0], &[0xff]), CmpOrdering::Greater);
        assert_eq!(compare_numbers(&[], &[1]), CmpOrdering::Less);
    }

    #[test]
    fn garbage_is_not_a_crl() {
        assert!(parse_crls(b"hello", "x").is_err());
        assert!(parse_crls(&[0x30, 0x03, 0x02, 0x01, 0x01], "x").is_err());
    }
}
