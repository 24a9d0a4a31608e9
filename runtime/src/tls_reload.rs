//! Rotating a daemon's own TLS certificate, private key and trust roots without a restart.
//!
//! Certificates expire and roots are renewed; restarting a float drops every peer's link and
//! restarting a bridge recycles every queue's window. So both daemons re-read `tls_cert`,
//! `tls_key` and `trust_roots`:
//!
//! * on **SIGHUP**, at once (always re-read and re-validated, changed or not);
//! * when the files **change**: their metadata (modification and change time, size, inode,
//!   mode: [`FileStamp`]) is polled every `tls_reload_interval` (default 30 s); a change is acted on once
//!   the metadata has stayed the same for one more interval, so writing the certificate and
//!   then the key is not caught half done. Contents are compared by SHA-256: a `touch`
//!   reloads nothing.
//!
//! New material is checked exactly as at start — key file permissions
//! ([`KeyFileAccess`]), the chain parses, the key belongs to the certificate, the trust
//! roots parse — and further: the certificate must be within its validity period and must
//! be for the **same legal name** as the one in force (a daemon never changes identity
//! without a restart; that is refused with an ERROR naming both names). Only then is it
//! swapped in, as one unit: new handshakes use it, established connections keep the TLS
//! session they have (they are not re-checked against new roots either).
//!
//! A refused change leaves everything in force, is logged once (one line naming the file
//! and the reason) and counted in `drawbridge_<daemon>_tls_reload_total{result="refused"}`;
//! the same bad contents are not retried or logged again until a file changes (a SIGHUP
//! always retries). A success is logged at INFO with the new certificate's serial and
//! `not_after`, and counted with `result="ok"`.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use drawbridge_certs::{
    check_secret_file, rustls::RootCertStore, trust_roots_from_pem, CertError, CertInfo, FileStamp,
    KeyFileAccess, LegalName, Revocation, TlsIdentity,
};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::ConfigReader;

/// Default of `<daemon>.tls_reload_interval`.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// Reads `<section>.tls_reload_interval` (at least 100 ms).
pub fn read_interval(r: &mut ConfigReader, section: &str) -> Duration {
    let key = format!("{section}.tls_reload_interval");
    let interval = r.duration(&key, DEFAULT_RELOAD_INTERVAL);
    r.check(
        &key,
        interval >= Duration::from_millis(100),
        "must be at least 100ms",
    );
    interval
}

/// Where a daemon's TLS material comes from, and how it is checked and watched.
#[derive(Debug, Clone)]
pub struct TlsSource {
    /// PEM chain presented to peers, leaf first (`tls_cert`).
    pub cert: PathBuf,
    /// Its PEM private key (`tls_key`).
    pub key: PathBuf,
    /// PEM network root(s) peers must chain to (`trust_roots`).
    pub trust_roots: PathBuf,
    /// Who besides the owner may read the key file.
    pub key_access: KeyFileAccess,
    /// How often the files' metadata is polled (`tls_reload_interval`).
    pub reload_interval: Duration,
}

/// Certificate chain, key and trust roots read and checked together.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// Our certificate chain and key.
    pub identity: TlsIdentity,
    /// The trust roots.
    pub roots: Arc<RootCertStore>,
    /// The leaf's legal name (the daemon's identity).
    pub legal_name: LegalName,
    /// The leaf's serial and validity.
    pub cert: CertInfo,
    /// What was read, to tell a real change from a `touch`.
    fingerprint: Fingerprint,
}

impl TlsMaterial {
    /// Loads the material at start: the same checks as before reloading existed (no
    /// validity-period check: an expired certificate is the peers' to refuse, and a daemon
    /// that starts can at least report it in `/status`).
    pub fn load(source: &TlsSource) -> Result<Self, CertError> {
        check_secret_file(&source.key, source.key_access)?;
        let contents = Contents::read(source);
        let fingerprint = contents.fingerprint(source);
        let read = |r: &Result<Vec<u8>, std::io::Error>, path: &Path| match r {
            Ok(b) => Ok(b.clone()),
            Err(e) => Err(CertError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(e.kind(), e.to_string()),
            }),
        };
        let cert_bytes = read(&contents.cert, &source.cert)?;
        let key_bytes = read(&contents.key, &source.key)?;
        let roots_bytes = read(&contents.roots, &source.trust_roots)?;
        let identity = TlsIdentity::from_pem(&cert_bytes, &source.cert, &key_bytes, &source.key)?;
        let roots = trust_roots_from_pem(&roots_bytes, &source.trust_roots)?;
        let legal_name = identity.legal_name()?;
        let cert = identity.leaf_info()?;
        Ok(Self {
            identity,
            roots,
            legal_name,
            cert,
            fingerprint,
        })
    }
}

/// Why new material was not taken: the file at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    file: PathBuf,
    reason: String,
    /// The new certificate is for another legal name: (in force, new).
    identity_change: Option<Box<(LegalName, LegalName)>>,
}

impl Refusal {
    fn new(file: &Path, reason: impl ToString) -> Self {
        Self {
            file: file.to_owned(),
            reason: reason.to_string(),
            identity_change: None,
        }
    }

    fn log(&self) {
        let file = self.file.display();
        match self.identity_change.as_deref() {
            Some((in_force, new)) => error!(
                %file,
                in_force = %in_force,
                new = %new,
                "TLS reload refused: the new certificate is for legal name `{new}` but this daemon is `{in_force}`; a daemon never changes its identity without a restart. The certificate, key and trust roots in force stay"
            ),
            None => warn!(
                %file,
                reason = %self.reason,
                "TLS reload refused; the certificate, key and trust roots in force stay"
            ),
        }
    }
}

/// SHA-256 of each file (`None`: unreadable) and the key file's mode: what was read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    cert: Option<[u8; 32]>,
    key: Option<[u8; 32]>,
    roots: Option<[u8; 32]>,
    key_mode: Option<u32>,
}

/// The three files' contents, each read once.
struct Contents {
    cert: Result<Vec<u8>, std::io::Error>,
    key: Result<Vec<u8>, std::io::Error>,
    roots: Result<Vec<u8>, std::io::Error>,
}

impl Contents {
    fn read(source: &TlsSource) -> Self {
        Self {
            cert: std::fs::read(&source.cert),
            key: std::fs::read(&source.key),
            roots: std::fs::read(&source.trust_roots),
        }
    }

    fn fingerprint(&self, source: &TlsSource) -> Fingerprint {
        let digest =
            |r: &Result<Vec<u8>, std::io::Error>| r.as_ref().ok().map(|b| Sha256::digest(b).into());
        Fingerprint {
            cert: digest(&self.cert),
            key: digest(&self.key),
            roots: digest(&self.roots),
            key_mode: file_mode(&source.key),
        }
    }

    /// Everything a reload checks, in the order an operator would look: key permissions,
    /// each file readable, the chain and key, the legal name, the validity period, the roots.
    fn check(
        &self,
        source: &TlsSource,
        in_force: &LegalName,
        now: i64,
    ) -> Result<TlsMaterial, Refusal> {
        let fingerprint = self.fingerprint(source);
        check_secret_file(&source.key, source.key_access)
            .map_err(|e| Refusal::new(&source.key, e))?;
        let bytes = |r: &Result<Vec<u8>, std::io::Error>, path: &Path| match r {
            Ok(b) => Ok(b.clone()),
            Err(e) => Err(Refusal::new(path, format!("cannot read it: {e}"))),
        };
        let cert_bytes = bytes(&self.cert, &source.cert)?;
        let key_bytes = bytes(&self.key, &source.key)?;
        let roots_bytes = bytes(&self.roots, &source.trust_roots)?;
        let identity = TlsIdentity::from_pem(&cert_bytes, &source.cert, &key_bytes, &source.key)
            .map_err(|e| {
                let file = match &e {
                    CertError::NoPrivateKey { path } | CertError::Pem { path, .. } => path.clone(),
                    _ => source.cert.clone(),
                };
                Refusal::new(&file, e)
            })?;
        let cert = identity
            .leaf_info()
            .map_err(|e| Refusal::new(&source.cert, e))?;
        let legal_name = identity
            .legal_name()
            .map_err(|e| Refusal::new(&source.cert, e))?;
        if &legal_name != in_force {
            return Err(Refusal {
                identity_change: Some(Box::new((in_force.clone(), legal_name.clone()))),
                ..Refusal::new(
                    &source.cert,
                    format!(
                        "the certificate is for `{legal_name}`, not for this daemon's legal name `{in_force}`"
                    ),
                )
            });
        }
        if let Some(reason) = cert.outside_validity(now) {
            return Err(Refusal::new(&source.cert, reason));
        }
        let roots = trust_roots_from_pem(&roots_bytes, &source.trust_roots)
            .map_err(|e| Refusal::new(&source.trust_roots, e))?;
        Ok(TlsMaterial {
            identity,
            roots,
            legal_name,
            cert,
            fingerprint,
        })
    }
}

#[cfg(unix)]
fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn file_mode(_path: &Path) -> Option<u32> {
    None
}

/// The three files' stamps (`None`: cannot be read; that is a state too).
type Stamps = [Option<FileStamp>; 3];

fn stamps(source: &TlsSource) -> Stamps {
    [&source.cert, &source.key, &source.trust_roots].map(|p| FileStamp::of(p).ok())
}

/// What the material in force was built into, and about it.
#[derive(Debug)]
pub struct InForce<T> {
    /// Our certificate chain and key.
    pub identity: TlsIdentity,
    /// What the daemon built from it (the float's `ServerConfig`).
    pub built: T,
    /// The leaf's serial and validity.
    pub cert: CertInfo,
    /// Moves with every successful reload: a bridge link rebuilds its client configuration
    /// when it differs from the one it built with.
    pub generation: u64,
}

/// Polling state and counters.
#[derive(Debug)]
struct WatchState {
    /// What the material in force was read from.
    in_force: Fingerprint,
    /// Metadata at the last poll.
    seen: Stamps,
    /// The metadata changed at the last poll; act once it stays the same for a poll.
    settling: bool,
    /// Contents last refused: not retried (nor logged) until they change.
    refused: Option<Fingerprint>,
    /// The trust roots in force, to restore if building the new configuration fails.
    roots: Arc<RootCertStore>,
    /// Unix ms when the material in force was loaded (start or reload).
    loaded_unix_ms: u64,
    /// Unix ms and result of the last reload attempt.
    last_attempt: Option<(u64, &'static str)>,
    /// The last refusal: file and reason.
    last_refusal: Option<Refusal>,
    reloads_ok: u64,
    reloads_refused: u64,
}

type Build<T> = dyn Fn(&TlsIdentity, &Revocation) -> Result<T, CertError> + Send + Sync;

struct Inner<T> {
    /// `drawbridge_<daemon>_tls_reload_total`.
    metric: &'static str,
    source: TlsSource,
    /// The daemon's identity, fixed for the life of the process.
    legal_name: LegalName,
    /// Holds the trust roots the verifiers use (see [`Revocation::replace_roots`]).
    revocation: Revocation,
    build: Box<Build<T>>,
    current: RwLock<Arc<InForce<T>>>,
    state: Mutex<WatchState>,
}

/// A daemon's TLS material in force, reloaded on SIGHUP and on file changes.
///
/// Cheap to clone. `T` is what the daemon builds from a new identity (and the revocation
/// state holding the new roots) before it is swapped in: the float's
/// `Arc<rustls::ServerConfig>`; `()` for the bridge, which builds one client configuration
/// per link (building one in `build` still proves rustls takes the key).
pub struct TlsReload<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for TlsReload<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> std::fmt::Debug for TlsReload<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReload")
            .field("legal_name", &self.inner.legal_name.to_string())
            .field("generation", &self.current().generation)
            .finish()
    }
}

impl<T> TlsReload<T> {
    /// The material in force now; take it once per handshake.
    pub fn current(&self) -> Arc<InForce<T>> {
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The daemon's legal name (that of the certificate at start; reloads keep it).
    pub fn legal_name(&self) -> &LegalName {
        &self.inner.legal_name
    }
}

impl<T: Send + Sync + 'static> TlsReload<T> {
    /// Takes `material` (loaded at start with [`TlsMaterial::load`], its roots already in
    /// `revocation`) into force, building it with `build`. Registers both series of
    /// `metric` at zero so dashboards see them before the first reload.
    pub fn new(
        metric: &'static str,
        source: TlsSource,
        material: TlsMaterial,
        revocation: Revocation,
        build: impl Fn(&TlsIdentity, &Revocation) -> Result<T, CertError> + Send + Sync + 'static,
    ) -> Result<Self, CertError> {
        let built = build(&material.identity, &revocation)?;
        for result in ["ok", "refused"] {
            metrics::counter!(metric, "result" => result).increment(0);
        }
        let state = WatchState {
            in_force: material.fingerprint,
            seen: stamps(&source),
            settling: false,
            refused: None,
            roots: material.roots,
            loaded_unix_ms: crate::daemon::unix_ms(),
            last_attempt: None,
            last_refusal: None,
            reloads_ok: 0,
            reloads_refused: 0,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                metric,
                source,
                legal_name: material.legal_name,
                revocation,
                build: Box::new(build),
                current: RwLock::new(Arc::new(InForce {
                    identity: material.identity,
                    built,
                    cert: material.cert,
                    generation: 0,
                })),
                state: Mutex::new(state),
            }),
        })
    }

    /// Watch for SIGHUP and poll the files every `reload_interval` until `shutdown`.
    pub fn spawn(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.watch(shutdown).await })
    }

    async fn watch(self, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot watch SIGHUP; TLS files are reloaded only when they change");
                None
            }
        };
        let mut tick = tokio::time::interval(self.inner.source.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.poll_now();
                }
                Some(()) = hup => {
                    info!("SIGHUP received: reloading the TLS certificate, key and trust roots");
                    self.reload_now();
                }
            }
        }
    }

    /// One poll: if the files' metadata changed and then stayed the same for a poll, and
    /// their contents differ from those in force and from the last refused, reload. Returns
    /// whether a reload was attempted. The watcher calls this every `reload_interval`.
    pub fn poll_now(&self) -> bool {
        let mut state = self.lock_state();
        let now = stamps(&self.inner.source);
        if now != state.seen {
            state.seen = now;
            state.settling = true;
            return false;
        }
        if !std::mem::take(&mut state.settling) {
            return false;
        }
        let contents = Contents::read(&self.inner.source);
        let fingerprint = contents.fingerprint(&self.inner.source);
        if fingerprint == state.in_force || Some(&fingerprint) == state.refused.as_ref() {
            return false;
        }
        self.reload(&mut state, &contents, "files changed");
        true
    }

    /// Re-read and re-validate now, whatever changed (SIGHUP). Returns whether the new
    /// material was taken.
    pub fn reload_now(&self) -> bool {
        let mut state = self.lock_state();
        state.seen = stamps(&self.inner.source);
        state.settling = false;
        let contents = Contents::read(&self.inner.source);
        self.reload(&mut state, &contents, "SIGHUP")
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn reload(&self, state: &mut WatchState, contents: &Contents, cause: &str) -> bool {
        let now_ms = crate::daemon::unix_ms();
        match self.try_swap(state, contents, now_ms) {
            Ok(()) => {
                state.refused = None;
                state.last_attempt = Some((now_ms, "ok"));
                state.loaded_unix_ms = now_ms;
                state.reloads_ok += 1;
                metrics::counter!(self.inner.metric, "result" => "ok").increment(1);
                let current = self.current();
                info!(
                    cause,
                    serial = %current.cert.serial,
                    not_after = %CertInfo::rfc3339(current.cert.not_after),
                    generation = current.generation,
                    "TLS certificate, key and trust roots reloaded; new handshakes use them, established connections keep theirs"
                );
                true
            }
            Err(refusal) => {
                refusal.log();
                state.refused = Some(contents.fingerprint(&self.inner.source));
                state.last_attempt = Some((now_ms, "refused"));
                state.last_refusal = Some(refusal);
                state.reloads_refused += 1;
                metrics::counter!(self.inner.metric, "result" => "refused").increment(1);
                false
            }
        }
    }

    /// Checks, then swaps roots and identity in; on any error nothing has changed.
    fn try_swap(
        &self,
        state: &mut WatchState,
        contents: &Contents,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let source = &self.inner.source;
        let now = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let material = contents.check(source, &self.inner.legal_name, now)?;
        let revocation = &self.inner.revocation;
        let roots_changed = material.fingerprint.roots != state.in_force.roots;
        if roots_changed {
            revocation
                .replace_roots(material.roots.clone())
                .map_err(|e| Refusal::new(&source.trust_roots, e))?;
        }
        let built = match (self.inner.build)(&material.identity, revocation) {
            Ok(b) => b,
            Err(e) => {
                if roots_changed {
                    // Built from the roots in force once already: cannot fail now.
                    let _ = revocation.replace_roots(state.roots.clone());
                }
                return Err(Refusal::new(&source.cert, e));
            }
        };
        let mut current = self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let generation = current.generation + 1;
        *current = Arc::new(InForce {
            identity: material.identity,
            built,
            cert: material.cert,
            generation,
        });
        drop(current);
        state.in_force = material.fingerprint;
        state.roots = material.roots;
        Ok(())
    }

    /// The `tls` object of `/status`: the certificate in force and the reloads.
    pub fn status(&self) -> serde_json::Value {
        let current = self.current();
        let state = self.lock_state();
        let cert = &current.cert;
        serde_json::json!({
            "legal_name": self.inner.legal_name.to_string(),
            "serial": cert.serial,
            "not_before": CertInfo::rfc3339(cert.not_before),
            "not_after": CertInfo::rfc3339(cert.not_after),
            "not_after_unix": cert.not_after,
            "trust_roots": state.roots.len(),
            "loaded_unix_ms": state.loaded_unix_ms,
            "generation": current.generation,
            "reload_interval_ms": u64::try_from(self.inner.source.reload_interval.as_millis()).unwrap_or(u64::MAX),
            "last_reload_unix_ms": state.last_attempt.map(|(t, _)| t),
            "last_reload_result": state.last_attempt.map(|(_, r)| r),
            "last_refusal": state.last_refusal.as_ref().map(|r| serde_json::json!({
                "file": r.file.display().to_string(),
                "reason": r.reason,
            })),
            "reloads_ok": state.reloads_ok,
            "reloads_refused": state.reloads_refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drawbridge_certs::devpki;

    const BANK_A: &str = "O=Bank A, L=London, C=GB";
    const BANK_B: &str = "O=Bank B, L=Paris, C=FR";

    struct Fixture {
        _dir: tempfile::TempDir,
        net: devpki::DevNetwork,
        source: TlsSource,
        reload: TlsReload<String>,
    }

    /// Bank A's files copied to a directory of their own (the live files), watched.
    fn fixture() -> Fixture {
        drawbridge_certs::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let net = devpki::generate_network(
            &dir.path().join("pki"),
            &[BANK_A.parse().unwrap(), BANK_B.parse().unwrap()],
        )
        .unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir_all(&live).unwrap();
        let a = &net.nodes[0];
        let source = TlsSource {
            cert: live.join("tls.crt"),
            key: live.join("tls.key"),
            trust_roots: live.join("root.crt"),
            key_access: KeyFileAccess::OwnerOnly,
            reload_interval: Duration::from_millis(100),
        };
        copy(&a.tls_cert, &source.cert);
        copy(&a.tls_key, &source.key);
        copy(&a.root_cert, &source.trust_roots);
        let material = TlsMaterial::load(&source).unwrap();
        let revocation = Revocation::off(material.roots.clone()).unwrap();
        let reload = TlsReload::new(
            "drawbridge_test_tls_reload_total",
            source.clone(),
            material,
            revocation,
            |identity, _| Ok(identity.leaf_info()?.serial),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            net,
            source,
            reload,
        }
    }

    /// Copies keeping the key's 0600.
    fn copy(from: &Path, to: &Path) {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }

    /// A fresh certificate for `node` (same node CA), as the CA would issue at renewal.
    fn renew(f: &Fixture, node: usize) -> (PathBuf, PathBuf) {
        let n = &f.net.nodes[node];
        let out = f._dir.path().join(format!("renewed-{node}"));
        std::fs::create_dir_all(&out).unwrap();
        devpki::issue_tls_cert(n, &out.join("tls.crt"), &out.join("tls.key"), 30).unwrap();
        (out.join("tls.crt"), out.join("tls.key"))
    }

    fn serial(f: &Fixture) -> String {
        f.reload.current().built.clone()
    }

    #[test]
    fn sighup_takes_a_renewed_certificate() {
        let f = fixture();
        let before = serial(&f);
        let (cert, key) = renew(&f, 0);
        copy(&cert, &f.source.cert);
        copy(&key, &f.source.key);
        assert!(f.reload.reload_now());
        assert_ne!(serial(&f), before);
        assert_eq!(f.reload.current().generation, 1);
        let status = f.reload.status();
        assert_eq!(status["serial"], serial(&f));
        assert_eq!(status["last_reload_result"], "ok");
    }

    #[test]
    fn a_change_is_taken_once_the_files_are_stable() {
        let f = fixture();
        let before = serial(&f);
        assert!(!f.reload.poll_now(), "nothing changed");
        let (cert, key) = renew(&f, 0);
        copy(&cert, &f.source.cert);
        // First poll sees the change; the key is written before the next one.
        assert!(!f.reload.poll_now());
        copy(&key, &f.source.key);
        assert!(!f.reload.poll_now());
        assert!(f.reload.poll_now());
        assert_ne!(serial(&f), before);
        assert_eq!(f.reload.status()["reloads_refused"], 0);
        // A touch (same contents, new metadata) reloads nothing.
        std::fs::write(&f.source.cert, std::fs::read(&cert).unwrap()).unwrap();
        assert!(!f.reload.poll_now());
        assert!(!f.reload.poll_now());
        assert_eq!(f.reload.status()["reloads_ok"], 1);
    }

    #[test]
    fn bad_files_are_refused_once_and_the_old_material_stays() {
        let f = fixture();
        let before = serial(&f);
        // A renewed certificate with the old key: mismatched.
        let (cert, key) = renew(&f, 0);
        copy(&cert, &f.source.cert);
        assert!(!f.reload.poll_now());
        assert!(f.reload.poll_now(), "attempted");
        assert_eq!(serial(&f), before);
        let status = f.reload.status();
        assert_eq!(status["reloads_refused"], 1);
        assert_eq!(status["last_reload_result"], "refused");
        let reason = status["last_refusal"]["reason"].as_str().unwrap();
        assert!(reason.contains("does not belong"), "{reason}");
        assert_eq!(
            status["last_refusal"]["file"],
            f.source.key.display().to_string()
        );
        // Still bad, touched again: not retried, not counted again.
        std::fs::write(&f.source.cert, std::fs::read(&cert).unwrap()).unwrap();
        assert!(!f.reload.poll_now());
        assert!(!f.reload.poll_now());
        assert_eq!(f.reload.status()["reloads_refused"], 1);
        // A SIGHUP retries (and is counted).
        assert!(!f.reload.reload_now());
        assert_eq!(f.reload.status()["reloads_refused"], 2);
        // The matching key arrives: taken.
        copy(&key, &f.source.key);
        assert!(!f.reload.poll_now());
        assert!(f.reload.poll_now());
        assert_ne!(serial(&f), before);
    }

    #[test]
    fn each_kind_of_bad_file_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let f = fixture();
        let good_key = std::fs::read(&f.source.key).unwrap();
        let refusal = |f: &Fixture| {
            assert!(!f.reload.reload_now());
            let s = f.reload.status();
            (
                s["last_refusal"]["file"].as_str().unwrap().to_string(),
                s["last_refusal"]["reason"].as_str().unwrap().to_string(),
            )
        };
        let name = |p: &Path| p.display().to_string();

        std::fs::set_permissions(&f.source.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (file, reason) = refusal(&f);
        assert_eq!(file, name(&f.source.key));
        assert!(reason.contains("mode 0644"), "{reason}");
        std::fs::set_permissions(&f.source.key, std::fs::Permissions::from_mode(0o600)).unwrap();

        std::fs::write(&f.source.key, "garbage").unwrap();
        let (file, reason) = refusal(&f);
        assert_eq!(file, name(&f.source.key));
        assert!(reason.contains("no private key"), "{reason}");
        std::fs::write(&f.source.key, &good_key).unwrap();

        std::fs::remove_file(&f.source.trust_roots).unwrap();
        let (file, reason) = refusal(&f);
        assert_eq!(file, name(&f.source.trust_roots));
        assert!(reason.contains("cannot read"), "{reason}");
        copy(&f.net.nodes[0].root_cert, &f.source.trust_roots);

        std::fs::write(
            &f.source.cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let (file, _) = refusal(&f);
        assert_eq!(file, name(&f.source.cert));

        // Bank B's certificate and key: a valid pair, but another identity.
        copy(&f.net.nodes[1].tls_cert, &f.source.cert);
        copy(&f.net.nodes[1].tls_key, &f.source.key);
        let (file, reason) = refusal(&f);
        assert_eq!(file, name(&f.source.cert));
        assert!(
            reason.contains(BANK_B) && reason.contains(BANK_A),
            "{reason}"
        );

        // Expired.
        let out = f._dir.path().join("expired");
        std::fs::create_dir_all(&out).unwrap();
        devpki::issue_tls_cert(
            &f.net.nodes[0],
            &out.join("tls.crt"),
            &out.join("tls.key"),
            -1,
        )
        .unwrap();
        copy(&out.join("tls.crt"), &f.source.cert);
        copy(&out.join("tls.key"), &f.source.key);
        let (file, reason) = refusal(&f);
        assert_eq!(file, name(&f.source.cert));
        assert!(reason.contains("expired"), "{reason}");

        assert_eq!(f.reload.current().generation, 0, "nothing was taken");
        assert_eq!(f.reload.status()["reloads_refused"], 6);
    }

    #[test]
    fn new_trust_roots_go_to_the_verifiers() {
        let f = fixture();
        // Bank A's live roots become the root of another network.
        let other = tempfile::tempdir().unwrap();
        let net2 = devpki::generate_network(other.path(), &[BANK_A.parse().unwrap()]).unwrap();
        let roots_before = f.reload.inner.revocation.roots();
        let both = format!(
            "{}{}",
            std::fs::read_to_string(&f.net.root_cert).unwrap(),
            std::fs::read_to_string(&net2.root_cert).unwrap()
        );
        std::fs::write(&f.source.trust_roots, both).unwrap();
        assert!(f.reload.reload_now());
        let roots_after = f.reload.inner.revocation.roots();
        assert_eq!(roots_before.len(), 1);
        assert_eq!(roots_after.len(), 2);
        assert_eq!(f.reload.status()["trust_roots"], 2);
    }
}
