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
//! CRL signatures are verified by rustls-webpki against the issuing CA on the verified path:
//! a CRL that does not verify fails the handshakes of that issuer's certificates.
//!
//! Whenever the CRLs in force change — a file or URL brings new content, or a CRL crosses its
//! `nextUpdate` — the [`Revocation::subscribe`] generation counter moves. Connections watch it
//! and call [`Revocation::is_revoked`] with their peer's chain; a `Some(reason)` means the
//! peer would now be refused and must be disconnected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
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
}

fn parse_one(der: CertificateRevocationListDer<'static>, source: &str) -> Result<Crl, String> {
    webpki::BorrowedCertRevocationList::from_der(der.as_ref())
        .map_err(|e| format!("not a usable CRL: {e:?}"))?;
    let (issuer_raw, issuer, next_update, revoked) = {
        let (_, parsed) =
            x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| format!("not a CRL: {e}"))?;
        (
            parsed.issuer().as_raw().to_vec(),
            parsed.issuer().to_string(),
            parsed.next_update().map(|t| t.timestamp()),
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

struct Sources {
    files: Vec<FileSource>,
    urls: Vec<UrlSource>,
    /// Labels of the CRLs that were past `nextUpdate` at the last check.
    expired: Vec<String>,
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
        let sources = Sources {
            files,
            urls,
            expired: Vec::new(),
        };
        let snapshot = Snapshot::build(settings.mode, &roots, &provider, sources.all())?;
        let (generation, _) = watch::channel(0);
        let revocation = Self {
            inner: Arc::new(Inner {
                settings,
                provider,
                current: RwLock::new(Arc::new(snapshot)),
                swap: Mutex::new(()),
                sources: Mutex::new(sources),
                generation,
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
        let _swap = self.inner.swap.lock().expect("poisoned");
        let crls = self.current().crls.clone();
        let snapshot =
            Snapshot::build(self.inner.settings.mode, &roots, &self.inner.provider, crls)?;
        *self.inner.current.write().expect("poisoned") = Arc::new(snapshot);
        Ok(())
    }

    /// How many CRLs are in force.
    pub fn crl_count(&self) -> usize {
        self.current().crls.len()
    }

    /// One line per CRL in force: issuer, source, `nextUpdate` and whether it has expired
    /// (for status pages).
    pub fn describe_crls(&self) -> Vec<String> {
        let now = unix_now();
        self.current()
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
                format!("{}; nextUpdate (unix) {next}{expired}", c.label())
            })
            .collect()
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
        let (end_entity, intermediates) = chain.split_first()?;
        let snapshot = self.current();
        let now = UnixTime::now();
        let result = match role {
            PeerRole::Client => snapshot.verify_client(end_entity, intermediates, now),
            PeerRole::Server => {
                let name = ServerName::try_from("peer.invalid").expect("literal");
                snapshot.verify_server(end_entity, intermediates, &name, now)
            }
        };
        match result {
            Ok(()) => None,
            Err(e) if is_revocation_error(&e) => Some(describe_refusal(&snapshot, chain, &e)),
            Err(_) => None,
        }
    }

    /// Poll the files once: re-read those that changed, re-evaluate CRL expiry. Returns
    /// whether the generation moved. The background refresh calls this every
    /// `reload_interval`; tests may call it directly.
    pub fn reload_now(&self) -> bool {
        let changed = self.poll_files();
        let rebuilt = changed && self.rebuild("file");
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
    fn rebuild(&self, cause: &str) -> bool {
        let _swap = self.inner.swap.lock().expect("poisoned");
        let crls = self.inner.sources.lock().expect("poisoned").all();
        let count = crls.len();
        match Snapshot::build(
            self.inner.settings.mode,
            &self.current().roots,
            &self.inner.provider,
            crls,
        ) {
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
            let rebuilt = self.rebuild("url");
            self.check_expiry(!rebuilt);
        }
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
    fn garbage_is_not_a_crl() {
        assert!(parse_crls(b"hello", "x").is_err());
        assert!(parse_crls(&[0x30, 0x03, 0x02, 0x01, 0x01], "x").is_err());
    }
}
