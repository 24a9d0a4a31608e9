//! Judging the peer of an established connection again, and explaining a refusal.

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime};

use rustls::CertificateError;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tracing::debug;

use super::crl::{der_element, der_sequence};
use super::snapshot::Snapshot;
use super::sources::{KnownCa, MAX_LEARNED_CAS};
use super::{unix_now, PeerRole, Revocation, RevocationMode};

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

impl Revocation {
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
