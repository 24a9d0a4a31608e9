//! The `[broker]` table of a daemon's configuration, read and checked.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use drawbridge_certs::{check_secret_file, KeyFileAccess};
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::config::ConfigReader;

use super::redact;

/// Default `broker.frame_max` of a daemon that only publishes (the float): 32 KiB, a quarter
/// of RabbitMQ's default. It saves 6 MiB of resident buffers per broker connection (see
/// [`BrokerConfig::frame_max`]), and a 1 MiB body is 32 frames instead of 8, which the bench
/// does not tell apart (docs/performance.md). What it publishes is checked against it
/// (`mapping::max_properties_len`).
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Default `broker.frame_max` of a daemon that consumes what others published (the bridge):
/// RabbitMQ's own default, 128 KiB. A message's properties travel in one frame, and lapin
/// refuses a frame over the negotiated `frame_max` by closing the whole connection: with a
/// smaller frame than the broker's, one node message with large headers (which the node's own
/// connection, at the broker's frame size, could publish) closed the bridge's broker
/// connection on every delivery, for ever (found by
/// `e2e::oversize_headers_and_reasons_are_dead_lettered_not_resent_in_a_loop`).
pub const CONSUMER_FRAME_MAX: u32 = 128 * 1024;

/// AMQP 0-9-1's smallest `frame_max` (`FRAME_MIN_SIZE`).
const FRAME_MAX_MIN: u32 = 4096;

/// Largest `broker.frame_max` taken: 64 MiB of buffers per broker connection.
const FRAME_MAX_MAX: u32 = 1024 * 1024;

/// Broker connection settings (`[broker]` in a daemon's config).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// AMQP URIs of the broker or of every cluster node, tried in turn. Never log these
    /// as they are: they may hold a password (use [`redact`]).
    pub uris: Vec<String>,
    /// Deadline for TCP + AMQP connection setup to one URI.
    pub connect_timeout: Duration,
    /// Deadline for every broker RPC, confirm and ack.
    pub op_timeout: Duration,
    /// AMQP heartbeat in seconds (a silent broker is detected after about twice this).
    pub heartbeat: u16,
    /// Largest AMQP 0-9-1 frame asked for (the broker's own limit applies if lower). lapin
    /// allocates its receive and send buffers as 32 frames each when it connects, so this is
    /// what one broker connection holds resident: 64 × `frame_max` (8 MiB at RabbitMQ's
    /// 128 KiB default, 2 MiB at ours). Larger bodies are cut into more frames.
    pub frame_max: u32,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Reconnect delay cap.
    pub reconnect_max: Duration,
    /// The password read from `password_file`; it replaces the URIs' (which have none).
    pub password: Option<Secret>,
    /// TLS settings for `amqps://` URIs (`tls_ca`, `tls_cert`, `tls_key`).
    pub tls: Option<BrokerTls>,
    /// How the daemon authenticates to the broker.
    pub auth: BrokerAuth,
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself (only to hand it to the broker).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the daemon logs in to the broker (`broker.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerAuth {
    /// User name and password (SASL PLAIN): from the URI, the password possibly from
    /// `password_file`.
    #[default]
    Plain,
    /// SASL EXTERNAL: the broker takes the login from the client certificate
    /// (`tls_cert`; RabbitMQ's `rabbitmq_auth_mechanism_ssl` plugin). No password.
    External,
}

/// TLS material for `amqps://` broker connections (`tls_ca`, `tls_cert`, `tls_key`), loaded
/// and checked at configuration time; it lives with the node library's connect code, which
/// the daemons, the CLI and the node library share.
pub use drawbridge_node::BrokerTls;

impl BrokerConfig {
    /// Read `{prefix}.uris`, `{prefix}.connect_timeout`, ... from `r`. Secret files
    /// (`password_file`, `tls_key`) are checked against `access`.
    pub fn read(r: &mut ConfigReader, prefix: &str, access: KeyFileAccess) -> BrokerConfig {
        Self::read_with(r, prefix, access, DEFAULT_FRAME_MAX)
    }

    /// [`BrokerConfig::read`] with another default `frame_max` ([`CONSUMER_FRAME_MAX`] for a
    /// daemon that consumes).
    pub fn read_with(
        r: &mut ConfigReader,
        prefix: &str,
        access: KeyFileAccess,
        default_frame_max: u32,
    ) -> BrokerConfig {
        let key = |k: &str| format!("{prefix}.{k}");
        let uris: Vec<String> = r.required(&key("uris")).unwrap_or_default();
        let mut parsed = Vec::new();
        for u in &uris {
            match u.parse::<AMQPUri>() {
                Ok(p) => parsed.push((u, p)),
                Err(e) => r.invalid(
                    &key("uris"),
                    format!("`{}` is not an AMQP URI: {e}", redact(u)),
                ),
            }
        }
        if uris.is_empty() {
            r.invalid(&key("uris"), "at least one broker URI is needed");
        }
        let tls_uris = parsed
            .iter()
            .filter(|(_, p)| p.scheme == AMQPScheme::AMQPS)
            .count();
        if tls_uris > 0 && tls_uris < parsed.len() {
            r.invalid(
                &key("uris"),
                "mixes amqp:// and amqps:// URIs: use amqps:// for every node, or the password and messages cross the network in clear to the others",
            );
        }

        let auth: BrokerAuth = r.get(&key("auth"), BrokerAuth::Plain);

        // TLS.
        let tls_ca: Option<PathBuf> = r.optional(&key("tls_ca"));
        let tls_cert: Option<PathBuf> = r.optional(&key("tls_cert"));
        let tls_key: Option<PathBuf> = r.optional(&key("tls_key"));
        let client = match (&tls_cert, &tls_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (Some(_), None) => {
                r.invalid(&key("tls_key"), "required when tls_cert is set");
                None
            }
            (None, Some(_)) => {
                r.invalid(&key("tls_cert"), "required when tls_key is set");
                None
            }
            (None, None) => None,
        };
        let tls = match tls_ca {
            None => {
                if tls_uris > 0 {
                    r.invalid(
                        &key("tls_ca"),
                        "required for amqps:// URIs: the PEM CA certificate that issued the broker's certificate (no system roots are trusted)",
                    );
                }
                None
            }
            Some(_) if tls_uris == 0 && !parsed.is_empty() => {
                r.invalid(
                    &key("tls_ca"),
                    format!(
                        "is set, but no URI in {} uses amqps://: the connection would not use TLS",
                        key("uris")
                    ),
                );
                None
            }
            Some(ca) => match BrokerTls::load(&ca, client, access) {
                Ok(t) => Some(t),
                Err((k, e)) => {
                    r.invalid(&key(k), e);
                    None
                }
            },
        };
        if client.is_some() && tls_uris == 0 && !parsed.is_empty() {
            r.invalid(
                &key("tls_cert"),
                "a client certificate needs TLS: use amqps:// URIs (and tls_ca)",
            );
        }

        // Password.
        let password_file: Option<PathBuf> = r.optional(&key("password_file"));
        let password = match &password_file {
            None => None,
            Some(path) => match read_password_file(path, access) {
                Ok(pw) => Some(pw),
                Err(e) => {
                    r.invalid(&key("password_file"), e);
                    None
                }
            },
        };
        if password_file.is_some() {
            for (i, (raw, _)) in parsed.iter().enumerate() {
                if has_password(raw) {
                    r.invalid(
                        &key("password_file"),
                        format!(
                            "conflicts with the password in {}[{i}] (`{}`): keep the password in one place",
                            key("uris"),
                            redact(raw)
                        ),
                    );
                }
            }
        }
        if auth == BrokerAuth::External {
            if client.is_none() {
                r.invalid(
                    &key("auth"),
                    "`external` (SASL EXTERNAL) logs in with the client certificate: set tls_cert and tls_key",
                );
            }
            if password_file.is_some() {
                r.invalid(
                    &key("password_file"),
                    "not used with auth = \"external\": the broker takes the login from the client certificate",
                );
            }
            for (i, (raw, _)) in parsed.iter().enumerate() {
                if has_password(raw) {
                    r.invalid(
                        &key("uris"),
                        format!(
                            "{}[{i}] (`{}`) holds a password, but auth = \"external\" does not send it: remove it",
                            key("uris"),
                            redact(raw)
                        ),
                    );
                }
            }
        }

        let cfg = BrokerConfig {
            uris,
            connect_timeout: r.duration(&key("connect_timeout"), Duration::from_secs(10)),
            op_timeout: r.duration(&key("op_timeout"), Duration::from_secs(15)),
            heartbeat: r.get(&key("heartbeat_secs"), 5u16),
            frame_max: r.get(&key("frame_max"), default_frame_max),
            reconnect_min: r.duration(&key("reconnect_min"), Duration::from_millis(500)),
            // A local broker is cheap to retry; a short cap bounds recovery after an outage.
            reconnect_max: r.duration(&key("reconnect_max"), Duration::from_secs(5)),
            password,
            tls,
            auth,
        };
        r.check(
            &key("reconnect_max"),
            cfg.reconnect_max >= cfg.reconnect_min,
            "must not be smaller than reconnect_min",
        );
        r.check(
            &key("frame_max"),
            (FRAME_MAX_MIN..=FRAME_MAX_MAX).contains(&cfg.frame_max),
            format_args!(
                "must be between {FRAME_MAX_MIN} (AMQP's smallest frame) and {FRAME_MAX_MAX} bytes"
            ),
        );
        cfg
    }

    /// Settings for tests and tools: the given URIs, defaults otherwise.
    pub fn with_uris(uris: Vec<String>) -> BrokerConfig {
        BrokerConfig {
            uris,
            connect_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(15),
            heartbeat: 5,
            frame_max: DEFAULT_FRAME_MAX,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(5),
            password: None,
            tls: None,
            auth: BrokerAuth::Plain,
        }
    }
}

use drawbridge_node::uri_has_password as has_password;

/// Read a broker password file: the whole file, without its trailing line break(s).
pub fn read_password_file(path: &Path, access: KeyFileAccess) -> Result<Secret, String> {
    check_secret_file(path, access).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let pw = text.trim_end_matches(['\n', '\r']);
    if pw.is_empty() {
        return Err(format!("`{}` is empty", path.display()));
    }
    if pw.contains(['\n', '\r']) {
        return Err(format!(
            "`{}` holds more than one line: it must hold the password alone",
            path.display()
        ));
    }
    Ok(Secret::new(pw))
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn read(toml: &str, access: KeyFileAccess) -> Result<BrokerConfig, Vec<String>> {
        let mut r = ConfigReader::from_toml(toml).unwrap();
        let cfg = BrokerConfig::read(&mut r, "broker", access);
        r.finish().map(|()| cfg).map_err(|e| e.0)
    }

    fn ok(toml: &str) -> BrokerConfig {
        read(toml, KeyFileAccess::OwnerOnly).unwrap()
    }

    fn errors(toml: &str) -> Vec<String> {
        read(toml, KeyFileAccess::OwnerOnly).unwrap_err()
    }

    fn q(p: &Path) -> String {
        format!("{:?}", p.display().to_string())
    }

    fn has(errs: &[String], key: &str, needle: &str) -> bool {
        errs.iter()
            .any(|e| e.starts_with(&format!("{key}:")) && e.contains(needle))
    }

    #[test]
    fn the_password_file_replaces_the_uri_password_without_its_newline() {
        let d = tempfile::tempdir().unwrap();
        for (i, text) in ["s3cr:t@pw\n", "s3cr:t@pw\r\n", "s3cr:t@pw"]
            .iter()
            .enumerate()
        {
            let pw = write(d.path(), &format!("pw{i}"), text, 0o600);
            let cfg = ok(&format!(
                "[broker]\nuris = [\"amqp://node-a@127.0.0.1/%2f\"]\npassword_file = {}\n",
                q(&pw)
            ));
            assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("s3cr:t@pw"));
            let debug = format!("{cfg:?}");
            assert!(!debug.contains("s3cr"), "{debug}");
        }
    }

    #[test]
    fn frame_max_defaults_to_32_kib_and_is_bounded() {
        assert_eq!(ok("[broker]\nuris = [\"amqp://h/%2f\"]\n").frame_max, 32768);
        assert_eq!(
            ok("[broker]\nuris = [\"amqp://h/%2f\"]\nframe_max = 131072\n").frame_max,
            131072
        );
        for bad in ["4095", "2097152", "0"] {
            let errs = errors(&format!(
                "[broker]\nuris = [\"amqp://h/%2f\"]\nframe_max = {bad}\n"
            ));
            assert!(
                has(&errs, "broker.frame_max", "between 4096"),
                "{bad}: {errs:#?}"
            );
        }
    }

    #[test]
    fn a_password_file_and_a_uri_password_conflict() {
        let d = tempfile::tempdir().unwrap();
        let pw = write(d.path(), "pw", "from-file\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://node-a@h1/%2f\", \"amqp://node-a:in-uri@h2/%2f\"]\npassword_file = {}\n",
            q(&pw)
        ));
        assert!(
            has(&errs, "broker.password_file", "broker.uris[1]")
                && has(&errs, "broker.password_file", "amqp://node-a:***@h2/%2f"),
            "{errs:#?}"
        );
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(!errs.iter().any(|e| e.contains("in-uri")), "{errs:#?}");
    }

    #[test]
    fn a_missing_or_empty_password_file_is_reported_by_key() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope");
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\nheartbeat_secs = \"x\"\n",
            q(&missing)
        ));
        assert!(
            has(
                &errs,
                "broker.password_file",
                &missing.display().to_string()
            ),
            "{errs:#?}"
        );
        // Every problem at once.
        assert!(
            errs.iter().any(|e| e.starts_with("broker.heartbeat_secs")),
            "{errs:#?}"
        );
        let empty = write(d.path(), "empty", "\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\n",
            q(&empty)
        ));
        assert!(has(&errs, "broker.password_file", "is empty"), "{errs:#?}");
        let two = write(d.path(), "two", "a\nb\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\n",
            q(&two)
        ));
        assert!(
            has(&errs, "broker.password_file", "more than one line"),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_readable_password_file_is_refused_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let pw = write(d.path(), "pw", "secret\n", 0o644);
        let toml = format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\npassword_file = {}\n",
            q(&pw)
        );
        let errs = errors(&toml);
        assert!(
            has(&errs, "broker.password_file", "mode 0644")
                && has(
                    &errs,
                    "broker.password_file",
                    &format!("chmod 600 {}", pw.display())
                ),
            "{errs:#?}"
        );
        // 0644 stays refused with the override; 0640 passes with it only.
        assert!(read(&toml, KeyFileAccess::GroupReadable).is_err());
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(has(
            &errors(&toml),
            "broker.password_file",
            "allow_group_readable_key"
        ));
        read(&toml, KeyFileAccess::GroupReadable).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        ok(&toml);
    }

    fn pki(dir: &Path) -> drawbridge_certs::devpki::NodeFiles {
        let names = ["O=Bank A, L=London, C=GB".parse().unwrap()];
        drawbridge_certs::devpki::generate_network(dir, &names)
            .unwrap()
            .nodes
            .remove(0)
    }

    #[test]
    fn amqps_needs_tls_ca_and_tls_ca_needs_amqps() {
        let errs = errors("[broker]\nuris = [\"amqps://h/%2f\"]\n");
        assert!(
            has(&errs, "broker.tls_ca", "required for amqps://"),
            "{errs:#?}"
        );
        let d = tempfile::tempdir().unwrap();
        let files = pki(d.path());
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqp://h/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        ));
        assert!(
            has(&errs, "broker.tls_ca", "would not use TLS"),
            "{errs:#?}"
        );
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqps://h1/%2f\", \"amqp://h2/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        ));
        assert!(
            has(&errs, "broker.uris", "mixes amqp:// and amqps://"),
            "{errs:#?}"
        );
        let cfg = ok(&format!(
            "[broker]\nuris = [\"amqps://h1/%2f\", \"amqps://h2/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        ));
        assert!(cfg
            .tls
            .as_ref()
            .is_some_and(|t| !t.has_client_certificate()));
    }

    #[test]
    fn a_bad_ca_file_is_reported_by_key() {
        let d = tempfile::tempdir().unwrap();
        let not_pem = write(d.path(), "ca.pem", "hello\n", 0o644);
        for ca in [not_pem, d.path().join("missing.pem")] {
            let errs = errors(&format!(
                "[broker]\nuris = [\"amqps://h/%2f\"]\ntls_ca = {}\n",
                q(&ca)
            ));
            assert!(
                has(&errs, "broker.tls_ca", &ca.display().to_string()),
                "{errs:#?}"
            );
        }
    }

    #[test]
    fn client_certificate_and_sasl_external() {
        let d = tempfile::tempdir().unwrap();
        let files = pki(d.path());
        let base = format!(
            "[broker]\nuris = [\"amqps://h/%2f\"]\ntls_ca = {}\n",
            q(&files.root_cert)
        );
        let client = format!(
            "tls_cert = {}\ntls_key = {}\n",
            q(&files.tls_cert),
            q(&files.tls_key)
        );
        let cfg = ok(&format!("{base}{client}auth = \"external\"\n"));
        assert_eq!(cfg.auth, BrokerAuth::External);
        assert!(cfg
            .tls
            .as_ref()
            .is_some_and(BrokerTls::has_client_certificate));
        assert!(!format!("{cfg:?}").contains("PRIVATE KEY"));

        // External without a certificate; a certificate without its key.
        let errs = errors(&format!("{base}auth = \"external\"\n"));
        assert!(
            has(&errs, "broker.auth", "set tls_cert and tls_key"),
            "{errs:#?}"
        );
        let errs = errors(&format!("{base}tls_cert = {}\n", q(&files.tls_cert)));
        assert!(
            has(&errs, "broker.tls_key", "required when tls_cert"),
            "{errs:#?}"
        );
        let errs = errors(&format!("{base}auth = \"kerberos\"\n"));
        assert!(
            errs.iter().any(|e| e.starts_with("broker.auth")),
            "{errs:#?}"
        );

        // External with a password anywhere.
        let pw = write(d.path(), "pw", "x\n", 0o600);
        let errs = errors(&format!(
            "[broker]\nuris = [\"amqps://u:p@h/%2f\"]\ntls_ca = {}\n{client}auth = \"external\"\npassword_file = {}\n",
            q(&files.root_cert),
            q(&pw)
        ));
        assert!(has(&errs, "broker.uris", "does not send it"), "{errs:#?}");
        assert!(
            has(&errs, "broker.password_file", "not used with auth"),
            "{errs:#?}"
        );

        // The client key file is checked like every secret file.
        std::fs::set_permissions(&files.tls_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let errs = errors(&format!("{base}{client}"));
        assert!(
            has(&errs, "broker.tls_key", "mode 0644")
                && has(
                    &errs,
                    "broker.tls_key",
                    &files.tls_key.display().to_string()
                ),
            "{errs:#?}"
        );
    }
}
