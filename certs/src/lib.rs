//! Drawbridge PKI and TLS: legal names, certificate loading, rustls configurations for both
//! ends of a peer link, and a development PKI generator.
//!
//! Peers in a Drawbridge network are identified by the X.500 **legal name** in their TLS
//! certificate's subject, never by host name:
//!
//! * the bridge (TLS client) accepts a float only if its certificate chains to the network root
//!   **and** its subject is one of the legal names the node pinned for that link
//!   ([`client_config`]);
//! * the float (TLS server) requires a client certificate chaining to the root
//!   ([`server_config`]) and reads the sender's identity from it ([`peer_legal_name`]);
//! * on both sides a certificate speaks for the legal name in its subject only if it is
//!   issued by a node CA with that same legal name, itself issued by a trust root
//!   ([`binding`]): a member's node CA can sign any subject, and this is what stops it from
//!   issuing itself another member's name.
//!
//! All TLS goes through rustls with the aws-lc-rs crypto provider only; call
//! [`install_crypto_provider`] at the top of `main`.
#![forbid(unsafe_code)]

pub mod binding;
pub mod devpki;
mod error;
mod file_stamp;
pub mod keyfile;
mod legal_name;
pub mod revocation;
mod tls;

pub use binding::IdentityRefused;
pub use error::CertError;
pub use file_stamp::FileStamp;
pub use keyfile::{check_secret_file, KeyFileAccess};
pub use legal_name::LegalName;
pub use revocation::{
    EstablishedPeer, FetchesDue, PeerRefusal, PeerRole, Revocation, RevocationMode,
    RevocationSettings, WeakRevocation,
};
pub use tls::{
    client_config, client_config_with, install_crypto_provider, is_tls13_server_certificate_verify,
    load_cert_chain, load_crls, load_trust_roots, peer_legal_name, server_config,
    server_config_remote_key, server_config_with, trust_roots_from_pem, CertInfo, TlsIdentity,
    TlsPolicy, VerifiedPeerChain,
};

/// Re-exported so callers name the same rustls types this crate was built against.
pub use rustls;
/// Re-exported certificate/key container types (`CertificateDer`, `PrivateKeyDer`, ...).
pub use rustls_pki_types as pki_types;
