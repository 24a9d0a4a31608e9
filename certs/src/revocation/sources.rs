//! Where CRLs come from (files and URLs) and choosing, per issuer, the one in force.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls_pki_types::{CertificateRevocationListDer, SignatureVerificationAlgorithm};
use tracing::{debug, info, warn};

use super::crl::{compare_numbers, crl_signed_by, der_sequence, Crl};
use crate::FileStamp;

/// First retry delay of a failing URL (doubles up to the fetch interval).
pub(super) const FETCH_RETRY_MIN: Duration = Duration::from_secs(5);

pub(super) struct FileSource {
    pub(super) path: PathBuf,
    pub(super) stamp: Option<FileStamp>,
    pub(super) crls: Vec<Crl>,
    /// The problem last logged, so each is logged once.
    pub(super) problem: Option<String>,
}

pub(super) struct UrlSource {
    pub(super) url: String,
    pub(super) crls: Vec<Crl>,
    pub(super) bytes: Vec<u8>,
    pub(super) next_due: Instant,
    pub(super) retry: Duration,
    pub(super) failing: bool,
}

/// A CA whose key CRLs of its name are checked against.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct KnownCa {
    /// Its subject, DER with the outer SEQUENCE (as a CRL's issuer is kept).
    pub(super) subject: Vec<u8>,
    /// Contents of its SubjectPublicKeyInfo, without the outer SEQUENCE (as a trust anchor
    /// holds it).
    pub(super) spki: Vec<u8>,
}

/// Node CAs learned from verified paths are capped (they are only learned for issuers that
/// have a CRL waiting, so a real network stays far below).
pub(super) const MAX_LEARNED_CAS: usize = 4096;

pub(super) struct Sources {
    pub(super) files: Vec<FileSource>,
    pub(super) urls: Vec<UrlSource>,
    /// Labels of the CRLs that were past `nextUpdate` at the last check.
    pub(super) expired: Vec<String>,
    /// Node CAs seen on verified paths (leaf → node CA → trust root) whose name issues a CRL
    /// of a source; with the trust anchors, the keys CRL signatures are checked against.
    pub(super) learned: Vec<KnownCa>,
    /// Per issuer (DER name), the CRL in force: the newest valid one any source offered. It
    /// is only ever replaced by a newer one, whatever the sources offer later.
    pub(super) held: BTreeMap<Vec<u8>, Crl>,
    /// Issuers with a CRL that no known key verifies (yet): a handshake presenting a node
    /// CA of that name teaches its key (`Revocation::learn_issuers`).
    pub(super) wanted: HashSet<Vec<u8>>,
    /// Per (source, issuer), why its CRL is not used, as last logged (logged once each).
    pub(super) problems: HashMap<(String, Vec<u8>), String>,
    /// CRLs whose issuer's key has not been seen yet (status pages).
    pub(super) pending: Vec<String>,
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
    pub(super) fn in_force(&self) -> Vec<Crl> {
        self.held.values().cloned().collect()
    }

    pub(super) fn knows(&self, ca: &KnownCa) -> bool {
        self.learned.contains(ca)
    }

    /// Chooses, per issuer, the CRL in force: the newest of those whose signature verifies
    /// with the key of a trust anchor or of a learned node CA of that name, never older
    /// than the one held. Sources whose CRL does not verify, or goes back, are ignored
    /// (logged once per change, counted). Returns whether the CRLs in force changed.
    pub(super) fn select(
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
