//! One broker connection: the first URI of the list that answers, set up as the configuration says.

use drawbridge_node::ConnectOptions;
use lapin::{
    uri::{AMQPScheme, AMQPUri},
    Connection,
};

use super::config::{BrokerAuth, BrokerConfig};

/// A URI with its password hidden, for logs and configuration errors
/// (`drawbridge_node::redact_uri`).
pub use drawbridge_node::redact_uri as redact;

/// Connect to the first URI of `cfg.uris` (starting at `start`) that answers.
/// Returns the connection and the index of the URI that worked.
pub async fn connect_any(
    cfg: &BrokerConfig,
    start: usize,
    name: &str,
) -> Result<(Connection, usize), String> {
    drawbridge_node::connect::connect_first(&cfg.uris, start, |raw| async move {
        connect_one(cfg, &raw, name).await
    })
    .await
}

async fn connect_one(cfg: &BrokerConfig, raw: &str, name: &str) -> Result<Connection, String> {
    let mut uri: AMQPUri = raw.parse()?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(cfg.heartbeat);
    }
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(cfg.frame_max);
    }
    if let Some(pw) = &cfg.password {
        uri.authority.userinfo.password = pw.expose().to_string();
    }
    if uri.scheme == AMQPScheme::AMQPS && cfg.tls.is_none() {
        return Err("amqps:// needs broker.tls_ca (the CA of the broker's certificate)".into());
    }
    let options = ConnectOptions {
        // Config validation refuses TLS material with amqp:// URIs; a URI without TLS does
        // not get it here either.
        tls: cfg.tls.clone().filter(|_| uri.scheme == AMQPScheme::AMQPS),
        external: cfg.auth == BrokerAuth::External,
        timeout: cfg.connect_timeout,
        connection_name: Some(name.to_string()),
    };
    drawbridge_node::connect::connect_uri(uri, &redact(raw), &options)
        .await
        .map_err(|e| match e {
            drawbridge_node::NodeError::ConnectTimeout { timeout, .. } => {
                format!("no answer within {timeout:?}")
            }
            e => explain_tls_error(e.to_string()),
        })
}

/// Add what to check to a TLS handshake failure.
fn explain_tls_error(e: String) -> String {
    if e.contains("invalid peer certificate") {
        format!(
            "{e} (TLS: the broker's certificate is not issued by broker.tls_ca, has expired, or does not name the URI's host)"
        )
    } else if e.contains("CertificateRequired") || e.contains("certificate required") {
        format!("{e} (TLS: the broker requires a client certificate: set broker.tls_cert and broker.tls_key)")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }

    #[test]
    fn redacts_passwords_with_at_and_colon() {
        // An unescaped `@` in the password: the last `@` ends the userinfo.
        let r = redact("amqp://user:p@ss@broker:5672/%2f");
        assert_eq!(r, "amqp://user:***@broker:5672/%2f");
        // `:` in the password: the first `:` ends the user name.
        let r = redact("amqp://user:pa:ss:word@broker/vh");
        assert_eq!(r, "amqp://user:***@broker/vh");
        // Percent-encoded specials stay hidden too.
        let r = redact("amqp://user:p%40ss%3Aw@broker/vh");
        assert_eq!(r, "amqp://user:***@broker/vh");
        for r in [
            redact("amqp://user:p@ss@broker:5672/%2f"),
            redact("amqp://user:pa:ss:word@broker/vh"),
        ] {
            assert!(!r.contains("ss"), "{r}");
        }
    }

    #[test]
    fn keeps_uris_without_password() {
        assert_eq!(redact("amqp://guest@broker/%2f"), "amqp://guest@broker/%2f");
        assert_eq!(
            redact("amqps://broker.example:5671/%2f?heartbeat=5"),
            "amqps://broker.example:5671/%2f?heartbeat=5"
        );
    }

    #[test]
    fn redacts_amqps() {
        assert_eq!(
            redact("amqps://node:s3cr%23t@broker.example:5671/prod?heartbeat=10"),
            "amqps://node:***@broker.example:5671/prod?heartbeat=10"
        );
    }

    #[test]
    fn never_shows_an_unparseable_uri_with_credentials() {
        for bad in ["amqp://user:secret@[broken", "amqp:user:secret@host"] {
            let r = redact(bad);
            assert!(!r.contains("secret"), "{r}");
        }
        assert_eq!(redact("not a uri"), "not a uri");
    }
}
