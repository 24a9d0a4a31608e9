//! The identity rule: a legal name is bound to its node CA.
//!
//! Every member of the network holds a node CA, and a CA can sign any subject. So a TLS
//! certificate's subject alone proves nothing: Bank B's node CA can sign a leaf whose subject
//! is `O=Bank A, …`. Like Corda's network, Drawbridge accepts a TLS certificate as speaking
//! for legal name X only if, on a verified path to a trust root,
//!
//! 1. the certificate that signed the leaf (its issuer on that path) is a CA whose subject,
//!    compared as a [`LegalName`] (attribute order and string encoding free), is X; and
//! 2. that node CA is itself issued by a trust root (the path is exactly
//!    leaf → node CA → trust root).
//!
//! Rule 2 stops a member whose node CA may issue sub-CAs from minting a sub-CA named X. A
//! network with an issuing tier between its root and the node CAs lists that tier's CA
//! certificates as trust roots.
//!
//! The check runs on the path that rustls-webpki builds and verifies (signatures, validity,
//! basic constraints, key usage), through its `verify_path` hook: the CA compared is the one
//! whose key verified the leaf's signature, never just any certificate the peer sent, and
//! every candidate path is tried before the certificate is refused.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use rustls::{CertificateError, OtherError, RootCertStore};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};

use crate::LegalName;

/// Why a verified peer certificate does not speak for the legal name in its subject.
///
/// Carried in `rustls::Error::InvalidCertificate(CertificateError::Other(..))`, so it can be
/// found with `downcast_ref`. Its `Debug` is its `Display`, because rustls prints the inner
/// error with `{:?}` and the operator should read the reason in the log.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityRefused {
    /// The legal name the certificate claims (its subject).
    pub claimed: LegalName,
    /// What each verified path to a trust root showed instead (usually one).
    pub reasons: Vec<String>,
}

impl fmt::Display for IdentityRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate for `{}` refused: a TLS certificate speaks for a legal name only if \
             it is issued by a node CA with that same legal name, directly under a trust root; \
             this one {}",
            self.claimed,
            self.reasons.join("; or ")
        )
    }
}

impl fmt::Debug for IdentityRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for IdentityRefused {}

/// What the CAs of one verified path say about the leaf's claim to `claimed`; `None` if the
/// path satisfies the rule.
fn judge(claimed: &LegalName, path: &webpki::VerifiedPath<'_>) -> Option<String> {
    let mut cas = path.intermediate_certificates();
    let Some(node_ca) = cas.next() else {
        return Some("is issued directly by a trust root, with no node CA".into());
    };
    let ca_name = match LegalName::from_der_cert(&node_ca.der()) {
        Ok(name) => name,
        Err(e) => {
            return Some(format!(
                "is issued by a CA whose subject is unreadable: {e}"
            ))
        }
    };
    if ca_name != *claimed {
        return Some(format!("is issued by node CA `{ca_name}`"));
    }
    let above = cas.count();
    if above > 0 {
        return Some(format!(
            "is issued by a CA named `{ca_name}` that is not issued by a trust root \
             ({above} more CA(s) between it and the root)"
        ));
    }
    None
}

/// Applies the identity rule to a peer's certificate (after the usual chain verification
/// passed) and returns the legal name it speaks for.
///
/// `usage` is the extended key usage the peer's role needs (server or client auth), as in the
/// chain verification.
pub(crate) fn verify_bound_to_node_ca(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    sig_algs: &[&dyn SignatureVerificationAlgorithm],
    usage: webpki::KeyUsage,
    now: UnixTime,
) -> Result<LegalName, rustls::Error> {
    let claimed = LegalName::from_der_cert(end_entity).map_err(|e| other(e.to_string()))?;
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| other(format!("peer certificate: {e}")))?;
    let reasons = RefCell::new(Vec::<String>::new());
    let hook = |path: &webpki::VerifiedPath<'_>| match judge(&claimed, path) {
        None => Ok(()),
        Some(reason) => {
            let mut reasons = reasons.borrow_mut();
            if !reasons.contains(&reason) {
                reasons.push(reason);
            }
            // Not fatal: webpki goes on to try the other candidate paths.
            Err(webpki::Error::UnknownIssuer)
        }
    };
    match cert.verify_for_usage(
        sig_algs,
        &roots.roots,
        intermediates,
        now,
        usage,
        None,
        Some(&hook),
    ) {
        Ok(_) => Ok(claimed),
        Err(e) => {
            let reasons = reasons.into_inner();
            if reasons.is_empty() {
                // No path reached a root at all; the chain verification that ran first
                // should have said so already.
                Err(other(format!(
                    "certificate for `{claimed}`: no verified path to a trust root: {e}"
                )))
            } else {
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(IdentityRefused { claimed, reasons })),
                )))
            }
        }
    }
}

fn other(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Message(
        message,
    )))))
}

/// A plain-text error whose `Debug` is the text (see [`IdentityRefused`]).
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}
