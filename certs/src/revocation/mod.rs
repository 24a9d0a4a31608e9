//! Certificate revocation for both ends of a peer link: CRL sources, the three modes, live
//! reload, and re-checking peers of established connections.
//!
//! A [`Revocation`] holds the CRLs currently in force and the rustls verifiers built from
//! them. The float's client verifier ([`crate::server_config_with`]) and the bridge's server
//! verifier ([`crate::client_config_with`]) ask it for the current set on every handshake, so
//! a reloaded CRL applies to the next handshake without a restart. Sources:
//!
//! * files (`crls`), PEM (`X509 CRL` blocks) or one DER CRL each, polled every
//!   `crl_reload_interval` (metadata: [`crate::FileStamp`]) and re-read when they
//!   change; a file that disappears or stops parsing keeps its last good CRLs (logged once);
//! * optional `http://` URLs (`crl_urls`), fetched by a background thread: a handshake never
//!   waits for a fetch. A failing URL is logged once per episode and retried with backoff;
//!   its last good CRLs stay in force.
//!
//! This crate does no waiting of its own: the polling and fetching threads are the
//! runtime's (`drawbridge_runtime::revocation`), which call [`Revocation::reload_now`],
//! [`Revocation::fetches_due`] and [`Revocation::apply_fetched`] and hold a
//! [`WeakRevocation`] so that they end with the daemon's last clone.
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

mod crl;
mod mode;
mod peer;
mod refresh;
mod snapshot;
mod sources;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Instant, SystemTime};

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::RootCertStore;
use rustls_pki_types::CertificateRevocationListDer;
use tokio::sync::watch;
use tracing::{info, warn};

pub use mode::{PeerRole, RevocationMode, RevocationSettings};
pub use peer::{EstablishedPeer, PeerRefusal};
pub use refresh::FetchesDue;
pub(crate) use snapshot::Snapshot;

use crate::{CertError, FileStamp};
use crl::{parse_crls, parse_one};
use sources::{FileSource, Sources, UrlSource, FETCH_RETRY_MIN};

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
/// Cheap to clone (shared). A background refresh holds a [`WeakRevocation`] instead, so it
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

/// A [`Revocation`] that does not keep it alive: what a refresh loop holds between rounds.
#[derive(Clone)]
pub struct WeakRevocation {
    inner: Weak<Inner>,
}

impl WeakRevocation {
    /// The revocation state, unless every [`Revocation`] clone has been dropped.
    pub fn upgrade(&self) -> Option<Revocation> {
        self.inner.upgrade().map(|inner| Revocation { inner })
    }
}

impl fmt::Debug for WeakRevocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakRevocation")
            .field("alive", &(self.inner.strong_count() > 0))
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
    /// builds the verifiers. URLs are not fetched here: the runtime's fetch loop does it
    /// (see [`Revocation::fetches_due`]).
    pub fn load(
        roots: Arc<RootCertStore>,
        settings: RevocationSettings,
    ) -> Result<Self, CertError> {
        let mut files = Vec::new();
        for path in &settings.crl_files {
            let st = FileStamp::of(path).map_err(CertError::io(path))?;
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

    /// The settings it was created with (the refresh loops read their intervals here).
    pub fn settings(&self) -> &RevocationSettings {
        &self.inner.settings
    }

    /// A handle that does not keep this state alive (see [`WeakRevocation`]).
    pub fn downgrade(&self) -> WeakRevocation {
        WeakRevocation {
            inner: Arc::downgrade(&self.inner),
        }
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
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
