//! Errors of certificate loading, legal-name parsing and TLS configuration.

use std::path::PathBuf;

/// Why a certificate, key, legal name or TLS configuration could not be produced.
///
/// Messages name the file (or input) and the reason, because they are shown to operators
/// at start-up when a daemon refuses its configuration.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("cannot access `{}`: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file is not well-formed PEM (or holds something unusable).
    #[error("`{}` is not usable PEM: {reason}", path.display())]
    Pem {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A file that should hold certificates holds none.
    #[error("`{}` contains no PEM certificates (expected `-----BEGIN CERTIFICATE-----`)", path.display())]
    NoCertificates {
        /// The file concerned.
        path: PathBuf,
    },

    /// A file that should hold a private key holds none.
    #[error("`{}` contains no private key (expected PKCS#8, PKCS#1 or SEC1 PEM)", path.display())]
    NoPrivateKey {
        /// The file concerned.
        path: PathBuf,
    },

    /// A string is not a valid X.500 legal name.
    #[error("invalid legal name `{input}`: {reason}")]
    InvalidLegalName {
        /// The string that was refused.
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A certificate could not be parsed, or has a subject we cannot read.
    #[error("cannot read certificate: {0}")]
    X509(String),

    /// rustls refused the configuration (bad key, key/cert mismatch, bad root, ...).
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),

    /// A certificate verifier could not be built (e.g. no usable roots, bad CRL).
    #[error("cannot build certificate verifier: {0}")]
    Verifier(String),

    /// A private key or password file is readable by group or others.
    #[error(transparent)]
    SecretFileExposed(#[from] crate::keyfile::SecretFileExposed),

    /// Certificate generation (dev PKI) failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        Self::Generate(e.to_string())
    }
}

impl CertError {
    /// Shorthand for wrapping an I/O error with the file it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
