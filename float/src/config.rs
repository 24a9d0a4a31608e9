//! The float's configuration (`float.toml`, overridable by `DRAWBRIDGE_...` variables).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use drawbridge_certs::{KeyFileAccess, LegalName, RevocationSettings, TlsPolicy};
use drawbridge_node::topology::{QueueType, StreamRetention, INBOX_EXCHANGE};
use drawbridge_runtime::{
    broker::BrokerConfig,
    config::{ConfigErrors, ConfigReader},
    logging::LogFormat,
    revocation, tls_reload,
};

/// One identity this float receives for, and the inbox its messages go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The legal name peers put in `drawbridge-destination`.
    pub legal_name: LegalName,
    /// The broker queue its messages are published to.
    pub inbox: String,
}

/// Tunnel mode (`float.mode = "tunnel"`, docs/tunnel.md): no broker, no private key; the
/// bridges dial in to `[float.tunnel]`.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// Where bridges connect (mTLS with the tunnel CA), apart from the peers' port.
    pub listen: SocketAddr,
    /// PEM chain the float presents to bridges (issued under the tunnel CA).
    pub tls_cert: PathBuf,
    /// Its key: the tunnel's own, never the organisation's.
    pub tls_key: PathBuf,
    /// PEM tunnel CA: bridges' certificates must chain to it (not to the network's root).
    pub trust_roots: PathBuf,
    /// Legal names of the bridges allowed to hold a tunnel.
    pub bridges: Vec<LegalName>,
    /// How long a peer's TLS handshake waits for the bridge's signature.
    pub sign_timeout: Duration,
    /// How long a transfer waits for the bridge's outcome before it is released.
    pub outcome_timeout: Duration,
}

/// Everything the float needs to run.
#[derive(Debug, Clone)]
pub struct FloatConfig {
    /// Tunnel mode's settings; `None` in direct mode (the default), where the float publishes
    /// into the broker itself.
    pub tunnel: Option<TunnelSettings>,
    /// Where peers connect (TLS).
    pub listen: SocketAddr,
    /// PEM chain presented to peers (leaf first).
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert` (direct mode; tunnel mode has none: the bridge signs).
    pub tls_key: PathBuf,
    /// PEM network root(s) that client certificates must chain to.
    pub trust_roots: PathBuf,
    /// How often `tls_cert`, `tls_key` and `trust_roots` are checked for changes (SIGHUP
    /// reloads them at once); see `drawbridge_runtime::tls_reload`.
    pub tls_reload_interval: Duration,
    /// Revocation checking of client certificates (`float.crls`, `float.crl_urls`,
    /// `float.revocation`, `float.crl_reload_interval`, `float.crl_fetch_interval`,
    /// `float.crl_fetch_timeout`; see `drawbridge_runtime::revocation`).
    pub revocation: RevocationSettings,
    /// TLS 1.3 only, or 1.2 (ECDHE + AEAD) too.
    pub tls_policy: TlsPolicy,
    /// Who may read key and password files besides their owner
    /// (`float.allow_group_readable_key`).
    pub key_access: KeyFileAccess,
    /// Deadline for the TLS + AMQP open handshake of a new connection.
    pub handshake_timeout: Duration,
    /// Established connections beyond this are refused.
    pub max_connections: usize,
    /// Established connections of one peer legal name beyond this are refused.
    pub max_connections_per_peer: usize,
    /// Established connections from one source address beyond this are refused.
    pub max_connections_per_address: usize,
    /// Connections still in the TLS handshake or AMQP open, all sources together; a new
    /// connection beyond this is closed at once (established peers are not affected).
    pub max_pending_handshakes: usize,
    /// Connections in the handshake from one source address.
    pub max_pending_handshakes_per_address: usize,
    /// Connections in the handshake from one address prefix (`pending_prefix_ipv4`,
    /// `pending_prefix_ipv6`), for addresses that did not complete a handshake recently.
    pub max_pending_handshakes_per_prefix: usize,
    /// Prefix length that groups IPv4 sources for the per-prefix share.
    pub pending_prefix_ipv4: u8,
    /// Prefix length that groups IPv6 sources for the per-prefix share.
    pub pending_prefix_ipv6: u8,
    /// Handshake slots that only recently good addresses may take.
    pub pending_reserved_for_recent: usize,
    /// Handshake deadline of a stranger admitted while half the pool or more is taken.
    pub handshake_timeout_under_pressure: Duration,
    /// Recently good addresses remembered at most.
    pub recent_peers: usize,
    /// How long an address stays recently good after its last completed handshake.
    pub recent_peer_ttl: Duration,
    /// Sessions one connection may have open at once.
    pub max_sessions_per_connection: u16,
    /// Links one connection may have attached at once, over all its sessions.
    pub max_links_per_connection: u32,
    /// Shortest idle timeout a peer may ask for (it makes the float send heartbeats that
    /// often).
    pub min_peer_idle_timeout: Duration,
    /// Bytes of unconfirmed publishes one connection (all its links) may hold.
    pub max_connection_bytes_in_flight: usize,
    /// Broker channels the float publishes on; links share them.
    pub publish_channels: usize,
    /// Bigger messages are rejected.
    pub max_message_size: usize,
    /// AMQP idle timeout we announce; a peer silent for longer is dropped.
    pub idle_timeout: Duration,
    /// Credit per inbound link: how many unsettled transfers a peer may have in flight.
    pub link_credit: u32,
    /// Bytes of unconfirmed publishes one inbound link may hold before it stops taking
    /// transfers; a link with nothing pending always takes one, however big.
    pub max_link_bytes_in_flight: usize,
    /// Bytes of unconfirmed publishes the whole float may hold; links wait for room.
    pub max_bytes_in_flight: usize,
    /// The AMQP 1.0 address peers attach to.
    pub address: String,
    /// The address bridges' link canaries attach to (see the bridge's `canary_interval`).
    pub canary_address: String,
    /// Transient queue of our broker where probes go (declared on each broker connection,
    /// bounded and expiring, bound to `inbox_exchange`); `""` turns the canary off (its
    /// links are refused).
    pub canary_queue: String,
    /// Identities served; empty means "the subject of our own certificate" with
    /// `default_inbox`.
    pub identities: Vec<Identity>,
    /// Inbox used when `identities` is empty.
    pub default_inbox: String,
    /// `x-queue-type` of the inboxes (`classic`, `quorum` or `stream`). With `stream` the
    /// dedup window is rebuilt from the inboxes themselves (see `crate::window`), whether
    /// the float or the node declares them.
    pub inbox_queue_type: QueueType,
    /// Retention of stream inboxes the float declares (`float.stream_max_age`,
    /// `float.stream_max_bytes`).
    pub stream_retention: StreamRetention,
    /// Declare the inboxes on connect (off if the node owns their declaration).
    pub declare_inboxes: bool,
    /// Direct exchange the float publishes through, each inbox bound with its own name as
    /// routing key; `""` publishes through the default exchange instead. A named exchange
    /// lets the broker grant the float write access to the inboxes alone: write access to
    /// the default exchange (`amq.default`) reaches every queue of the vhost, peer queues
    /// included (see `deploy/rabbitmq/`).
    pub inbox_exchange: String,
    /// Number of (sender, message-id) pairs remembered for duplicate suppression.
    pub dedup_capacity: usize,
    /// How long a pair is remembered.
    pub dedup_max_age: Duration,
    /// Broker connection (direct mode; tunnel mode has none).
    pub broker: Option<BrokerConfig>,
    /// Admin HTTP port (health, readiness, metrics, status); `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// SIGTERM grace period for settling in-flight transfers.
    pub drain_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level or filter (`log.level`); `RUST_LOG` wins when set.
    pub log_level: String,
}

impl FloatConfig {
    /// Read and validate; every problem is reported.
    pub fn from_reader(mut r: ConfigReader) -> Result<FloatConfig, ConfigErrors> {
        let listen = parse_addr(&mut r, "float.listen", true);
        let tls_cert = r.required::<PathBuf>("float.tls_cert").unwrap_or_default();
        let mode: String = r.get("float.mode", "direct".to_string());
        let tunnel_mode = match mode.as_str() {
            "direct" => false,
            "tunnel" => true,
            other => {
                r.invalid(
                    "float.mode",
                    format!("`{other}` is not a mode: `direct` (the default) or `tunnel`"),
                );
                false
            }
        };
        let tls_key = if tunnel_mode {
            if r.is_set("float.tls_key") {
                r.invalid(
                    "float.tls_key",
                    "tunnel mode holds no private key (the bridge signs the handshakes): remove it",
                );
            }
            PathBuf::new()
        } else {
            r.required::<PathBuf>("float.tls_key").unwrap_or_default()
        };
        let tunnel = if tunnel_mode {
            if r.is_set("broker") {
                r.invalid(
                    "broker",
                    "tunnel mode has no broker connection (the bridge publishes): remove [broker]",
                );
            }
            Some(read_tunnel(&mut r))
        } else {
            if r.is_set("float.tunnel") {
                r.invalid("float.tunnel", "only with float.mode = \"tunnel\"");
            }
            None
        };
        let trust_roots = r
            .required::<PathBuf>("float.trust_roots")
            .unwrap_or_default();
        let revocation = revocation::read_settings(&mut r, "float");
        let tls_reload_interval = tls_reload::read_interval(&mut r, "float");
        let tls12: bool = r.get("float.allow_tls12", false);
        let key_access = KeyFileAccess::from_allow_group_readable(
            r.get("float.allow_group_readable_key", false),
        );
        let max_connections: usize = r.get("float.max_connections", 1000);
        r.check(
            "float.max_connections",
            max_connections > 0,
            "must be at least 1",
        );
        let max_connections_per_peer: usize = r.get("float.max_connections_per_peer", 256);
        r.check(
            "float.max_connections_per_peer",
            max_connections_per_peer > 0,
            "must be at least 1",
        );
        let max_connections_per_address: usize = r.get("float.max_connections_per_address", 512);
        r.check(
            "float.max_connections_per_address",
            max_connections_per_address > 0,
            "must be at least 1",
        );
        let max_pending_handshakes: usize = r.get("float.max_pending_handshakes", 128);
        r.check(
            "float.max_pending_handshakes",
            max_pending_handshakes > 0,
            "must be at least 1",
        );
        let max_pending_handshakes_per_address: usize =
            r.get("float.max_pending_handshakes_per_address", 32);
        r.check(
            "float.max_pending_handshakes_per_address",
            max_pending_handshakes_per_address > 0,
            "must be at least 1",
        );
        let max_pending_handshakes_per_prefix: usize =
            r.get("float.max_pending_handshakes_per_prefix", 32);
        r.check(
            "float.max_pending_handshakes_per_prefix",
            max_pending_handshakes_per_prefix > 0,
            "must be at least 1",
        );
        let pending_prefix_ipv4: u8 = r.get("float.pending_prefix_ipv4", 24);
        r.check(
            "float.pending_prefix_ipv4",
            (8..=32).contains(&pending_prefix_ipv4),
            "must be 8..=32 (32: each address on its own)",
        );
        let pending_prefix_ipv6: u8 = r.get("float.pending_prefix_ipv6", 64);
        r.check(
            "float.pending_prefix_ipv6",
            (16..=128).contains(&pending_prefix_ipv6),
            "must be 16..=128 (128: each address on its own)",
        );
        let pending_reserved_for_recent: usize = r.get("float.pending_reserved_for_recent", 32);
        r.check(
            "float.pending_reserved_for_recent",
            pending_reserved_for_recent < max_pending_handshakes.max(1),
            "must be smaller than float.max_pending_handshakes (strangers need a slot too)",
        );
        let handshake_timeout = r.duration("float.handshake_timeout", Duration::from_secs(10));
        r.check(
            "float.handshake_timeout",
            !handshake_timeout.is_zero(),
            "must be more than 0",
        );
        let handshake_timeout_under_pressure = r.duration(
            "float.handshake_timeout_under_pressure",
            Duration::from_secs(2).min(handshake_timeout),
        );
        r.check(
            "float.handshake_timeout_under_pressure",
            !handshake_timeout_under_pressure.is_zero()
                && handshake_timeout_under_pressure <= handshake_timeout,
            "must be more than 0 and at most float.handshake_timeout",
        );
        let recent_peers: usize = r.get("float.recent_peers", 4096);
        r.check(
            "float.recent_peers",
            recent_peers <= 1_000_000,
            "must be 0..=1000000 (0: no address is preferred)",
        );
        let recent_peer_ttl = r.duration("float.recent_peer_ttl", Duration::from_secs(24 * 3600));
        r.check(
            "float.recent_peer_ttl",
            recent_peer_ttl >= Duration::from_secs(1),
            "must be at least 1s",
        );
        let max_sessions_per_connection: u16 = r.get("float.max_sessions_per_connection", 8);
        r.check(
            "float.max_sessions_per_connection",
            max_sessions_per_connection > 0,
            "must be 1..=65535",
        );
        let max_links_per_connection: u32 = r.get("float.max_links_per_connection", 32);
        r.check(
            "float.max_links_per_connection",
            (1..=65_536).contains(&max_links_per_connection),
            "must be 1..=65536",
        );
        let min_peer_idle_timeout =
            r.duration("float.min_peer_idle_timeout", Duration::from_secs(1));
        r.check(
            "float.min_peer_idle_timeout",
            min_peer_idle_timeout <= Duration::from_secs(3600),
            "must be at most 1h",
        );
        let publish_channels: usize = r.get("float.publish_channels", 16);
        r.check(
            "float.publish_channels",
            (1..=1024).contains(&publish_channels),
            "must be 1..=1024",
        );
        let max_message_size: usize = r.get("float.max_message_size", 10 * 1024 * 1024);
        r.check(
            "float.max_message_size",
            max_message_size >= 1024,
            "must be at least 1024",
        );
        let link_credit: u32 = r.get("float.link_credit", 1000);
        r.check(
            "float.link_credit",
            (1..=100_000).contains(&link_credit),
            "must be 1..=100000",
        );
        let max_link_bytes_in_flight: usize =
            r.get("float.max_link_bytes_in_flight", 64 * 1024 * 1024);
        r.check(
            "float.max_link_bytes_in_flight",
            max_link_bytes_in_flight >= 1024,
            "must be at least 1024",
        );
        let max_connection_bytes_in_flight: usize =
            r.get("float.max_connection_bytes_in_flight", 128 * 1024 * 1024);
        r.check(
            "float.max_connection_bytes_in_flight",
            max_connection_bytes_in_flight >= 1024,
            "must be at least 1024",
        );
        let max_bytes_in_flight: usize = r.get("float.max_bytes_in_flight", 512 * 1024 * 1024);
        r.check(
            "float.max_bytes_in_flight",
            max_bytes_in_flight >= max_message_size,
            format!("must be at least float.max_message_size ({max_message_size})"),
        );
        r.check(
            "float.max_bytes_in_flight",
            max_bytes_in_flight <= 1 << 40,
            "must be at most 1 TiB",
        );
        let mut identities = Vec::new();
        if r.is_set("float.identities") {
            let raw: Vec<std::collections::HashMap<String, String>> =
                r.get("float.identities", Vec::new());
            for (i, t) in raw.iter().enumerate() {
                let key = format!("float.identities[{i}]");
                match (t.get("legal_name"), t.get("inbox")) {
                    (Some(n), Some(inbox)) => match n.parse::<LegalName>() {
                        Ok(legal_name) => identities.push(Identity {
                            legal_name,
                            inbox: inbox.clone(),
                        }),
                        Err(e) => r.invalid(&key, format!("legal_name: {e}")),
                    },
                    _ => r.invalid(&key, "needs both `legal_name` and `inbox`"),
                }
                for k in t.keys() {
                    if k != "legal_name" && k != "inbox" {
                        r.invalid(&format!("{key}.{k}"), "unknown key");
                    }
                }
            }
        }
        // Parsed as the node library's `QueueType`, as the bridge's queue types are: anything
        // but `classic` / `quorum` is reported by key.
        let inbox_queue_type: QueueType = r.get("float.inbox_queue_type", QueueType::Classic);
        let dedup_max_age = r.duration("dedup.max_age", Duration::from_secs(600));
        let stream_retention = StreamRetention {
            max_age: r.get("float.stream_max_age", StreamRetention::default().max_age),
            max_bytes: r.get(
                "float.stream_max_bytes",
                StreamRetention::default().max_bytes,
            ),
        };
        match stream_retention.max_age_duration() {
            Err(e) => r.invalid("float.stream_max_age", e),
            // The window is read back from the stream: what the stream no longer keeps
            // cannot be recognised.
            Ok(age) if inbox_queue_type == QueueType::Stream && age < dedup_max_age => r.invalid(
                "float.stream_max_age",
                format!(
                    "must be at least dedup.max_age ({}s): the window is rebuilt from what the stream keeps",
                    dedup_max_age.as_secs()
                ),
            ),
            Ok(_) => {}
        }
        r.check(
            "float.stream_max_bytes",
            stream_retention.max_bytes >= 1024 * 1024,
            "must be at least 1 MiB (1048576)",
        );
        r.check(
            "float.inbox_queue_type",
            !(tunnel_mode && inbox_queue_type == QueueType::Stream),
            "a stream inbox is not supported in tunnel mode yet (the bridge publishes there)",
        );
        let cfg = FloatConfig {
            tunnel,
            listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            tls_cert,
            tls_key,
            trust_roots,
            tls_reload_interval,
            revocation,
            key_access,
            tls_policy: if tls12 {
                TlsPolicy::AllowTls12
            } else {
                TlsPolicy::Tls13Only
            },
            handshake_timeout,
            max_connections,
            max_connections_per_peer,
            max_connections_per_address,
            max_pending_handshakes,
            max_pending_handshakes_per_address,
            max_pending_handshakes_per_prefix,
            pending_prefix_ipv4,
            pending_prefix_ipv6,
            pending_reserved_for_recent,
            handshake_timeout_under_pressure,
            recent_peers,
            recent_peer_ttl,
            max_sessions_per_connection,
            max_links_per_connection,
            min_peer_idle_timeout,
            max_connection_bytes_in_flight,
            publish_channels,
            max_message_size,
            idle_timeout: r.duration("float.idle_timeout", Duration::from_secs(30)),
            link_credit,
            max_link_bytes_in_flight,
            max_bytes_in_flight,
            address: r.get("float.address", "drawbridge.inbound".to_string()),
            canary_address: r.get("float.canary_address", "drawbridge.canary".to_string()),
            canary_queue: r.get("float.canary_queue", "drawbridge.canary".to_string()),
            identities,
            default_inbox: r.get("float.default_inbox", "drawbridge.inbox".to_string()),
            inbox_queue_type,
            stream_retention,
            declare_inboxes: r.get("float.declare_inboxes", true),
            inbox_exchange: r.get("float.inbox_exchange", INBOX_EXCHANGE.to_string()),
            dedup_capacity: r.get("dedup.capacity", 100_000),
            dedup_max_age,
            broker: (!tunnel_mode).then(|| BrokerConfig::read(&mut r, "broker", key_access)),
            admin_listen: parse_addr(&mut r, "admin.listen", false),
            drain_grace: r.duration("float.drain_grace", Duration::from_secs(10)),
            log_format: r.get("log.format", LogFormat::Human),
            log_level: drawbridge_runtime::logging::read_level(&mut r),
        };
        r.check(
            "float.canary_address",
            !cfg.canary_address.is_empty() && cfg.canary_address != cfg.address,
            "must be set and differ from float.address",
        );
        r.check(
            "float.canary_queue",
            cfg.canary_queue.len() <= 255
                && !cfg.canary_queue.starts_with("amq.")
                && cfg.identities.iter().all(|i| i.inbox != cfg.canary_queue)
                && cfg.default_inbox != cfg.canary_queue,
            "must be at most 255 bytes, not start with `amq.`, and not be an inbox",
        );
        r.check(
            "float.inbox_exchange",
            cfg.inbox_exchange.len() <= 255 && !cfg.inbox_exchange.starts_with("amq."),
            "must be at most 255 bytes and not start with `amq.` (reserved by RabbitMQ)",
        );
        r.finish()?;
        Ok(cfg)
    }
}

/// `[float.tunnel]`.
fn read_tunnel(r: &mut ConfigReader) -> TunnelSettings {
    let listen = parse_addr(r, "float.tunnel.listen", true);
    let tls_cert = r
        .required::<PathBuf>("float.tunnel.tls_cert")
        .unwrap_or_default();
    let tls_key = r
        .required::<PathBuf>("float.tunnel.tls_key")
        .unwrap_or_default();
    let trust_roots = r
        .required::<PathBuf>("float.tunnel.trust_roots")
        .unwrap_or_default();
    let names: Vec<String> = r.required("float.tunnel.bridges").unwrap_or_default();
    let mut bridges = Vec::new();
    for (i, n) in names.iter().enumerate() {
        match n.parse::<LegalName>() {
            Ok(name) => bridges.push(name),
            Err(e) => r.invalid(&format!("float.tunnel.bridges[{i}]"), e),
        }
    }
    if names.is_empty() && r.is_set("float.tunnel.bridges") {
        r.invalid(
            "float.tunnel.bridges",
            "names no bridge: no tunnel could be held",
        );
    }
    let sign_timeout = r.duration("float.tunnel.sign_timeout", Duration::from_secs(2));
    r.check(
        "float.tunnel.sign_timeout",
        sign_timeout >= Duration::from_millis(10),
        "must be at least 10ms",
    );
    let outcome_timeout = r.duration("float.tunnel.outcome_timeout", Duration::from_secs(30));
    r.check(
        "float.tunnel.outcome_timeout",
        outcome_timeout >= Duration::from_millis(100),
        "must be at least 100ms",
    );
    TunnelSettings {
        listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        tls_cert,
        tls_key,
        trust_roots,
        bridges,
        sign_timeout,
        outcome_timeout,
    }
}

fn parse_addr(r: &mut ConfigReader, key: &str, required: bool) -> Option<SocketAddr> {
    let raw: Option<String> = if required {
        r.required(key)
    } else {
        r.optional(key)
    };
    let raw = raw?;
    match raw.parse() {
        Ok(a) => Some(a),
        Err(e) => {
            r.invalid(key, format!("`{raw}` is not an ip:port address: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem() {
        let r = ConfigReader::from_toml(
            r#"
[float]
listen = "nowhere"
max_connections = 0
max_pending_handshakes_per_address = 0
max_pending_handshakes_per_prefix = 0
pending_prefix_ipv4 = 33
pending_prefix_ipv6 = 8
pending_reserved_for_recent = 128
handshake_timeout = "5s"
handshake_timeout_under_pressure = "6s"
recent_peer_ttl = "0s"
max_links_per_connection = 0
max_message_size = 2048
max_bytes_in_flight = 1024
max_link_bytes_in_flight = 10
inbox_queue_type = "lazy"
identities = [{ legal_name = "not a name", inbox = "x" }]
[broker]
uris = ["amqp://127.0.0.1:5672/%2f"]
"#,
        )
        .unwrap();
        let errs = FloatConfig::from_reader(r).unwrap_err().0;
        for key in [
            "float.listen",
            "float.max_connections",
            "float.max_pending_handshakes_per_address",
            "float.max_pending_handshakes_per_prefix",
            "float.pending_prefix_ipv4",
            "float.pending_prefix_ipv6",
            "float.pending_reserved_for_recent",
            "float.handshake_timeout_under_pressure",
            "float.recent_peer_ttl",
            "float.max_links_per_connection",
            "float.max_bytes_in_flight",
            "float.max_link_bytes_in_flight",
            "float.inbox_queue_type",
            "float.identities[0]",
            "float.tls_cert",
            "float.tls_key",
            "float.trust_roots",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(key)),
                "{key} not in {errs:#?}"
            );
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/float.toml");

    #[test]
    fn example_config_is_valid_with_every_documented_key() {
        drawbridge_runtime::config::assert_example_valid(EXAMPLE, FloatConfig::from_reader);
    }

    /// A stream inbox must keep what the window reads back; its retention is RabbitMQ's
    /// syntax.
    #[test]
    fn a_stream_inbox_keeps_at_least_the_window_and_its_retention_is_checked() {
        let cfg = |lines: &str| {
            FloatConfig::from_reader(
                ConfigReader::from_toml(&format!(
                    "[float]\nlisten = \"127.0.0.1:5671\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntrust_roots = \"r\"\n{lines}\n[broker]\nuris = [\"amqp://127.0.0.1:5672/%2f\"]\n"
                ))
                .unwrap(),
            )
        };
        let ok = cfg("inbox_queue_type = \"stream\"").unwrap();
        assert_eq!(ok.inbox_queue_type, QueueType::Stream);
        assert_eq!(ok.stream_retention, StreamRetention::default());
        let errs = cfg("inbox_queue_type = \"stream\"\nstream_max_age = \"5m\"\nstream_max_bytes = 10\n[dedup]\nmax_age = \"10m\"")
            .unwrap_err()
            .0;
        assert!(
            errs.iter()
                .any(|e| e.starts_with("float.stream_max_age") && e.contains("dedup.max_age")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("float.stream_max_bytes")),
            "{errs:#?}"
        );
        let errs = cfg("stream_max_age = \"7 days\"").unwrap_err().0;
        assert!(
            errs.iter().any(|e| e.starts_with("float.stream_max_age")),
            "{errs:#?}"
        );
        // A queue inbox does not care how long a stream would keep.
        assert!(cfg("stream_max_age = \"1m\"").is_ok());
    }

    #[test]
    fn the_tunnel_mode_example_is_valid_with_every_documented_key() {
        drawbridge_runtime::config::assert_example_valid(
            include_str!("../../examples/float-tunnel.toml"),
            |r| {
                let cfg = FloatConfig::from_reader(r)?;
                assert!(cfg.tunnel.is_some() && cfg.broker.is_none());
                Ok(cfg)
            },
        );
    }
}
