//! Connecting to a node's broker, over `amqp://` or `amqps://`: the one place that turns a
//! URI and TLS material into a lapin connection. The daemons' supervised session
//! (`drawbridge-runtime`), the operator CLI and the node library all connect through here, so
//! TLS is set up one way everywhere: only the configured CA is trusted (no system roots), a
//! client certificate is offered if configured, and SASL EXTERNAL is used on request.

use std::{fmt, path::Path, time::Duration};

use drawbridge_certs::{CertError, KeyFileAccess, TlsIdentity};
use lapin::{
    tcp::{OwnedIdentity, OwnedTLSConfig},
    uri::{AMQPScheme, AMQPUri, SASLMechanism},
    Connection, ConnectionProperties,
};

use crate::{redact_uri, NodeError, CONNECT_TIMEOUT};

/// TLS material for `amqps://` broker connections, loaded and checked when configured, so a
/// bad file is reported before any connection is tried.
#[derive(Clone)]
pub struct BrokerTls {
    /// PEM CA certificate(s) the broker's certificate must chain to; the only roots trusted.
    ca_pem: String,
    /// Client certificate chain and key (PEM), if configured.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerTls")
            .field("ca_pem_len", &self.ca_pem.len())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl BrokerTls {
    /// Load `ca` (PEM trust anchors) and, if given, a client certificate chain and key; the
    /// key file must pass [`drawbridge_certs::check_secret_file`] with `access` and belong to
    /// the certificate. An error names the file it is about: `"tls_ca"`, `"tls_cert"` or
    /// `"tls_key"` (the daemons' configuration keys; the CLI maps them to its flags).
    pub fn load(
        ca: &Path,
        client: Option<(&Path, &Path)>,
        access: KeyFileAccess,
    ) -> Result<BrokerTls, (&'static str, String)> {
        drawbridge_certs::load_trust_roots(ca).map_err(|e| ("tls_ca", e.to_string()))?;
        let ca_pem = std::fs::read_to_string(ca)
            .map_err(|e| ("tls_ca", format!("cannot read `{}`: {e}", ca.display())))?;
        let client = match client {
            None => None,
            Some((cert, key)) => {
                TlsIdentity::load_with(cert, key, access).map_err(|e| {
                    let which = match &e {
                        CertError::SecretFileExposed(_) | CertError::NoPrivateKey { .. } => {
                            "tls_key"
                        }
                        CertError::Io { path, .. } | CertError::Pem { path, .. } if path == key => {
                            "tls_key"
                        }
                        _ => "tls_cert",
                    };
                    (which, e.to_string())
                })?;
                let read = |p: &Path, k: &'static str| {
                    std::fs::read(p).map_err(|e| (k, format!("cannot read `{}`: {e}", p.display())))
                };
                Some((read(cert, "tls_cert")?, read(key, "tls_key")?))
            }
        };
        Ok(BrokerTls { ca_pem, client })
    }

    /// Whether a client certificate is configured.
    pub fn has_client_certificate(&self) -> bool {
        self.client.is_some()
    }

    /// lapin's TLS settings: only the configured CA is trusted (no system roots), and the
    /// client certificate, if any, is offered.
    fn lapin_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self.client.as_ref().map(|(pem, key)| OwnedIdentity::PKCS8 {
                pem: pem.clone(),
                key: key.clone(),
            }),
            cert_chain: Some(self.ca_pem.clone()),
        }
    }
}

/// How to connect besides the URI. The default is a plain connection (TLS only if the URI is
/// `amqps://` and `tls` is set), user and password from the URI, [`CONNECT_TIMEOUT`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// TLS material; required for `amqps://` URIs, refused with `amqp://` ones (the
    /// connection would not use it).
    pub tls: Option<BrokerTls>,
    /// Log in with SASL EXTERNAL: the broker takes the login from the client certificate
    /// (RabbitMQ's `rabbitmq_auth_mechanism_ssl`), no password is sent.
    pub external: bool,
    /// Deadline for TCP + TLS + AMQP connection setup.
    pub timeout: Duration,
    /// Connection name shown by the broker (`rabbitmqctl list_connections client_properties`).
    pub connection_name: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            tls: None,
            external: false,
            timeout: CONNECT_TIMEOUT,
            connection_name: None,
        }
    }
}

/// Connect to `uri` as `options` say. `uri` is parsed already so callers can adjust it (the
/// daemons set heartbeat and a password from a file); errors name it with its password
/// hidden (`shown`, see [`redact_uri`]).
pub async fn connect_uri(
    mut uri: AMQPUri,
    shown: &str,
    options: &ConnectOptions,
) -> Result<Connection, NodeError> {
    if options.external {
        uri.query.auth_mechanism = Some(SASLMechanism::External);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(options.timeout.as_millis() as u64);
    }
    let mut props = ConnectionProperties::default();
    if let Some(name) = &options.connection_name {
        props = props.with_connection_name(name.as_str().into());
    }
    let tls = match (&uri.scheme, &options.tls) {
        (AMQPScheme::AMQPS, Some(tls)) => Some(tls.lapin_config()),
        (AMQPScheme::AMQP, None) => None,
        (AMQPScheme::AMQPS, None) => return Err(NodeError::TlsCaMissing),
        (AMQPScheme::AMQP, Some(_)) => return Err(NodeError::TlsWithoutAmqps),
    };
    let connect = async {
        match tls {
            Some(config) => {
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_uri_with_config(uri, props, config, runtime).await
            }
            None => Connection::connect_uri(uri, props).await,
        }
    };
    tokio::time::timeout(options.timeout, connect)
        .await
        .map_err(|_| NodeError::ConnectTimeout {
            uri: shown.to_string(),
            timeout: options.timeout,
        })?
        .map_err(NodeError::Broker)
}

/// Connect to one broker URI as `options` say.
pub async fn connect_with(uri: &str, options: &ConnectOptions) -> Result<Connection, NodeError> {
    let parsed: AMQPUri = uri.parse().map_err(NodeError::Uri)?;
    connect_uri(parsed, &redact_uri(uri), options).await
}

/// Connect to the first of `uris` that answers, starting at `start` and wrapping around: the
/// connection and the index of its URI, or why each one failed (URIs redacted), `; `-joined.
/// `connect_one` makes one attempt: the node library's [`connect_any_with`](crate::connect_any_with)
/// passes its options, the daemons' broker session sets heartbeat, frame size and the password
/// file's password. The one walk over a cluster's URI list, for both.
pub async fn connect_first<F, Fut>(
    uris: &[String],
    start: usize,
    mut connect_one: F,
) -> Result<(Connection, usize), String>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Connection, String>>,
{
    if uris.is_empty() {
        return Err("no broker URI given".into());
    }
    let mut errors = Vec::new();
    for i in 0..uris.len() {
        let idx = (start + i) % uris.len();
        match connect_one(uris[idx].clone()).await {
            Ok(c) => return Ok((c, idx)),
            Err(e) => errors.push(format!("{}: {e}", redact_uri(&uris[idx]))),
        }
    }
    Err(errors.join("; "))
}
