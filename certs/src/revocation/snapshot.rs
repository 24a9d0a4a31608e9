//! The verifiers built from the trust roots and the CRLs in force, swapped as one.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::crl::Crl;
use super::RevocationMode;
use crate::CertError;

/// The trust roots and CRLs in force and the verifiers built from them.
pub(crate) struct Snapshot {
    mode: RevocationMode,
    /// Kept with the verifiers built from them, so that one handshake checks the chain and
    /// the identity rule against the same roots even while they are being replaced.
    pub(super) roots: Arc<RootCertStore>,
    pub(super) crls: Vec<Crl>,
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

impl Snapshot {
    pub(super) fn build(
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
