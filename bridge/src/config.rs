//! The bridge's configuration (`bridge.toml`, overridable by `DRAWBRIDGE_...` variables).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use drawbridge_certs::{KeyFileAccess, LegalName, RevocationSettings, TlsPolicy};
use drawbridge_node::topology::QueueType;
use drawbridge_runtime::{
    broker::{BrokerConfig, Secret},
    config::{ConfigErrors, ConfigReader},
    logging::LogFormat,
    revocation, tls_reload,
};

/// How several bridges of one node share the work (`bridge.ha`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaMode {
    /// One bridge, always active (a second instance is fenced by single-active-consumer only).
    Off,
    /// One active bridge elected through a lock queue; the others stand by (see `crate::ha`).
    HotWarm,
    /// Every instance is active and the peer queues are shared out among them (see
    /// `crate::members`).
    HotHot,
}

impl HaMode {
    /// The name shown in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            HaMode::Off => "off",
            HaMode::HotWarm => "hot-warm",
            HaMode::HotHot => "hot-hot",
        }
    }
}

/// What `bridge.ha` takes: a boolean (the form before hot-hot) or a mode's name.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
enum HaSetting {
    On(bool),
    Named(String),
}

/// Leader election between several bridges of one node (see `crate::ha`), or the sharing of
/// their links (see `crate::members`).
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// `bridge.ha`: off, hot-warm (the default) or hot-hot.
    pub mode: HaMode,
    /// Elect one active bridge through the broker, or share the links (`mode` is not off).
    /// Off: this bridge is always active (a second instance is fenced by
    /// single-active-consumer only).
    pub enabled: bool,
    /// The lock queue's name; `None`: `drawbridge.bridge.lock.<group>`, where the group is
    /// `bridge.ha_group` or the slug of the node identity (resolved at start).
    pub lock_queue: Option<String>,
    /// Bridges that share this group contend for one lock (default: the node identity).
    pub group: Option<String>,
    /// Mean delay between a standby's attempts to take the lock (each one jittered ±50 %).
    pub retry: Duration,
    /// After a step-down, how long this bridge stays away from the election, so another
    /// one takes over.
    pub hold_off: Duration,
    /// How often the active bridge checks that it still holds the lock (its lease runs
    /// `2 × lease_check` from the last answered check; see `crate::ha::Lease`). Must satisfy
    /// `2 × lease_check ≤ broker.heartbeat_secs`, so a bridge cut off from its broker stops
    /// its links before the broker can give the lock to another one. Hot-hot: the same
    /// lease on the instance's member queue.
    pub lease_check: Duration,
    /// Hot-hot: how often each instance announces itself and checks the other members
    /// (`bridge.ha_member_interval`); a new instance listens for two intervals before it
    /// takes links.
    pub member_interval: Duration,
}

/// `[bridge.tunnel]`: the floats in tunnel mode this bridge serves.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// The floats' tunnel ports (`host:port`); the bridge keeps a tunnel to each.
    pub floats: Vec<drawbridge_control_protocol::Target>,
    /// The legal name of the floats' tunnel certificates; default: this bridge's own.
    pub float_name: Option<LegalName>,
    /// PEM chain this bridge presents on the tunnel (issued under the tunnel CA).
    pub tls_cert: PathBuf,
    /// Its key.
    pub tls_key: PathBuf,
    /// PEM tunnel CA the floats' tunnel certificates chain to.
    pub trust_roots: PathBuf,
    /// The queues floats may have published into (the floats' inboxes).
    pub inboxes: Vec<String>,
    /// Exchange the inboxes are published through (`""`: the default exchange).
    pub inbox_exchange: String,
    /// Declare the inboxes (durable, of `inbox_queue_type`) on each broker connection.
    pub declare_inboxes: bool,
    /// Their queue type.
    pub inbox_queue_type: QueueType,
    /// Publishes in flight per tunnel: the bridge reads no more from a float beyond it.
    pub max_in_flight: usize,
    /// Largest message a float may hand over (its `max_message_size`).
    pub max_message_size: usize,
}

/// `[bridge.tunnel]`, if present.
fn read_tunnel(r: &mut ConfigReader) -> Option<TunnelSettings> {
    if !r.is_present("bridge.tunnel") {
        return None;
    }
    let raw: Vec<String> = r.required("bridge.tunnel.floats").unwrap_or_default();
    let mut floats = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        match f.parse::<drawbridge_control_protocol::Target>() {
            Ok(t) => floats.push(t),
            Err(e) => r.invalid(&format!("bridge.tunnel.floats[{i}]"), e),
        }
    }
    let float_name = r
        .optional::<String>("bridge.tunnel.float_name")
        .and_then(|n| match n.parse::<LegalName>() {
            Ok(n) => Some(n),
            Err(e) => {
                r.invalid("bridge.tunnel.float_name", e);
                None
            }
        });
    let inboxes: Vec<String> = r.get(
        "bridge.tunnel.inboxes",
        vec!["drawbridge.inbox".to_string()],
    );
    r.check(
        "bridge.tunnel.inboxes",
        !inboxes.is_empty()
            && inboxes
                .iter()
                .all(|q| !q.is_empty() && q.len() <= 255 && !q.starts_with("amq.")),
        "must name at least one queue, each 1..=255 bytes and not starting with `amq.`",
    );
    let max_in_flight: usize = r.get("bridge.tunnel.max_in_flight", 1024);
    r.check(
        "bridge.tunnel.max_in_flight",
        (1..=65536).contains(&max_in_flight),
        "must be 1..=65536",
    );
    let max_message_size: usize = r.get("bridge.tunnel.max_message_size", 10 * 1024 * 1024);
    r.check(
        "bridge.tunnel.max_message_size",
        (1024..=512 * 1024 * 1024).contains(&max_message_size),
        "must be 1 KiB..=512 MiB",
    );
    Some(TunnelSettings {
        floats,
        float_name,
        tls_cert: r.required("bridge.tunnel.tls_cert").unwrap_or_default(),
        tls_key: r.required("bridge.tunnel.tls_key").unwrap_or_default(),
        trust_roots: r.required("bridge.tunnel.trust_roots").unwrap_or_default(),
        inboxes,
        inbox_exchange: r.get(
            "bridge.tunnel.inbox_exchange",
            drawbridge_node::topology::INBOX_EXCHANGE.to_string(),
        ),
        declare_inboxes: r.get("bridge.tunnel.declare_inboxes", true),
        inbox_queue_type: {
            let t = r.get("bridge.tunnel.inbox_queue_type", QueueType::Classic);
            // Not yet: in tunnel mode this bridge publishes for the float, so it would be the
            // one to rebuild the window from the stream (docs/guarantees.md). Refused rather
            // than accepted at a weaker promise than a stream inbox makes in direct mode.
            r.check(
                "bridge.tunnel.inbox_queue_type",
                t != QueueType::Stream,
                "a stream inbox is not supported in tunnel mode yet; use `classic` or `quorum`",
            );
            t
        },
        max_in_flight,
        max_message_size,
    })
}

/// Everything the bridge needs to run.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// This instance's id, sent in snapshot requests and link status events.
    pub id: String,
    /// PEM chain presented to floats (leaf first).
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM network root(s) float certificates must chain to.
    pub trust_roots: PathBuf,
    /// How often `tls_cert`, `tls_key` and `trust_roots` are checked for changes (SIGHUP
    /// reloads them at once); see `drawbridge_runtime::tls_reload`.
    pub tls_reload_interval: Duration,
    /// TLS 1.3 only, or 1.2 (ECDHE + AEAD) too.
    pub tls_policy: TlsPolicy,
    /// Revocation checking of float certificates (`bridge.crls`, `bridge.crl_urls`,
    /// `bridge.revocation`, `bridge.crl_reload_interval`, `bridge.crl_fetch_interval`,
    /// `bridge.crl_fetch_timeout`; see `drawbridge_runtime::revocation`).
    pub revocation: RevocationSettings,
    /// Who may read key and password files besides their owner
    /// (`bridge.allow_group_readable_key`).
    pub key_access: KeyFileAccess,
    /// Fanout exchange the node publishes control messages to.
    pub control_exchange: String,
    /// Fanout exchange the bridge publishes snapshot requests and link status to.
    pub notify_exchange: String,
    /// Queue for undeliverable messages; the bridge publishes them through a direct
    /// exchange of the same name bound to it (see `dead_letter`).
    pub dead_letter_queue: String,
    /// Links must name queues starting with this.
    pub queue_prefix: String,
    /// Control messages must carry this broker-validated `user_id` (RabbitMQ refuses a
    /// publish whose `user_id` is not the publishing connection's login). `None` only with
    /// `insecure_accept_any_control_user`.
    pub node_user: Option<String>,
    /// Accept control messages from any broker user (no `node_user` check). Off unless set
    /// explicitly; logged loudly at start.
    pub insecure_accept_any_control_user: bool,
    /// Control messages must name this node identity; default: the legal name of
    /// `tls_cert` (the node's own certificate), resolved at start.
    pub node_identity: Option<LegalName>,
    /// `x-queue-type` of the peer queues (must match the node's declaration).
    pub peer_queue_type: QueueType,
    /// `x-queue-type` of the dead-letter queue (default: as the peer queues).
    pub dead_letter_queue_type: QueueType,
    /// Unsettled transfers per link (and the broker prefetch).
    pub window: u16,
    /// Bigger messages are dead-lettered.
    pub max_message_size: usize,
    /// Bytes of message bodies one link may hold (prefetched + unsettled); its prefetch
    /// follows the sizes it sees to stay within it.
    pub max_link_bytes: u64,
    /// Bytes of message bodies sent and not yet settled across all links.
    pub max_bytes_in_flight: u64,
    /// A transfer not settled by the peer within this recycles the link.
    pub settle_timeout: Duration,
    /// Deadline for TCP + TLS + AMQP open to a float.
    pub connect_timeout: Duration,
    /// AMQP idle timeout towards floats (a silent peer is detected).
    pub idle_timeout: Duration,
    /// First reconnect delay of a peer link.
    pub reconnect_min: Duration,
    /// Reconnect delay cap of a peer link.
    pub reconnect_max: Duration,
    /// First delay between repeated snapshot requests.
    pub snapshot_retry_min: Duration,
    /// Cap of the delay between repeated snapshot requests.
    pub snapshot_retry_max: Duration,
    /// SIGTERM / DeleteLink grace period for settling in-flight transfers.
    pub drain_grace: Duration,
    /// Link canary: every this long, each up link sends a small probe to the float's
    /// `canary_address`, which publishes it to a transient queue of its own broker with a
    /// confirm before accepting; `None` (`"0s"`, the default) turns probes off.
    pub canary_interval: Option<Duration>,
    /// Target address of the probes (the float's `canary_address`).
    pub canary_address: String,
    /// The outbound proxy peer links go through (`[bridge.proxy]`), if any.
    pub proxy: Option<Arc<drawbridge_runtime::proxy::Proxies>>,
    /// Tunnel mode (`[bridge.tunnel]`, docs/tunnel.md): the floats this bridge dials and
    /// carries the inbound path for; `None`: no tunnels.
    pub tunnel: Option<TunnelSettings>,
    /// Broker connection.
    pub broker: BrokerConfig,
    /// Admin HTTP port; `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token of the admin port's state-changing endpoints (`POST /step-down`), read
    /// from `admin.token_file` (owner-only like a key file); `None` turns them off.
    pub admin_token: Option<Secret>,
    /// Leader election between bridges of one node (`bridge.ha`, see `ha`).
    pub ha: HaConfig,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level or filter (`log.level`); `RUST_LOG` wins when set.
    pub log_level: String,
}

impl BridgeConfig {
    /// Read and validate; every problem is reported.
    pub fn from_reader(mut r: ConfigReader) -> Result<BridgeConfig, ConfigErrors> {
        let default_id = format!(
            "{}-{}",
            std::fs::read_to_string("/etc/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "bridge".into()),
            std::process::id()
        );
        let window: u32 = r.get("bridge.window", 1000);
        r.check(
            "bridge.window",
            (1..=65535).contains(&window),
            "must be 1..=65535",
        );
        // Parsed as a `QueueType`: anything but `classic` / `quorum` is reported by key.
        let peer_queue_type: QueueType = r.get("bridge.peer_queue_type", QueueType::Classic);
        let dead_letter_queue_type: QueueType =
            r.get("bridge.dead_letter_queue_type", peer_queue_type);
        // A stream keeps what was read and cannot be consumed with single-active-consumer
        // and acks as the bridge consumes: it is an inbox type only.
        for (key, t) in [
            ("bridge.peer_queue_type", peer_queue_type),
            ("bridge.dead_letter_queue_type", dead_letter_queue_type),
        ] {
            r.check(
                key,
                t != QueueType::Stream,
                "must be `classic` or `quorum` (a stream is for inboxes only)",
            );
        }
        let max_message_size: usize = r.get("bridge.max_message_size", 10 * 1024 * 1024);
        r.check(
            "bridge.max_message_size",
            max_message_size >= 1024,
            "must be at least 1024",
        );
        let max_link_bytes: u64 = r.get("bridge.max_link_bytes", 64 * 1024 * 1024);
        r.check(
            "bridge.max_link_bytes",
            max_link_bytes >= 1024 * 1024,
            "must be at least 1 MiB (1048576)",
        );
        let max_bytes_in_flight: u64 = r.get("bridge.max_bytes_in_flight", 1024 * 1024 * 1024);
        r.check(
            "bridge.max_bytes_in_flight",
            (1024 * 1024..=4 * 1024 * 1024 * 1024 * 1024).contains(&max_bytes_in_flight),
            "must be between 1 MiB and 4 TiB",
        );
        let node_user: Option<String> = r.optional("bridge.node_user");
        let insecure_accept_any_control_user: bool =
            r.get("bridge.insecure_accept_any_control_user", false);
        match (&node_user, insecure_accept_any_control_user) {
            (None, false) => r.invalid(
                "bridge.node_user",
                "required: the broker user the node publishes control messages as (its messages carry it as the broker-validated user_id); only `insecure_accept_any_control_user = true` turns the check off",
            ),
            (Some(_), true) => r.invalid(
                "bridge.insecure_accept_any_control_user",
                "contradicts bridge.node_user: set one or the other",
            ),
            (Some(u), false) => r.check("bridge.node_user", !u.is_empty(), "must not be empty"),
            (None, true) => {}
        }
        let node_identity = match r.optional::<String>("bridge.node_identity") {
            Some(s) => match s.parse::<LegalName>() {
                Ok(n) => Some(n),
                Err(e) => {
                    r.invalid(
                        "bridge.node_identity",
                        format!("`{s}` is not a legal name: {e}"),
                    );
                    None
                }
            },
            None => None,
        };
        let key_access = KeyFileAccess::from_allow_group_readable(
            r.get("bridge.allow_group_readable_key", false),
        );
        let admin_listen = match r.optional::<String>("admin.listen") {
            Some(s) => match s.parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    r.invalid(
                        "admin.listen",
                        format!("`{s}` is not an ip:port address: {e}"),
                    );
                    None
                }
            },
            None => None,
        };
        let revocation = revocation::read_settings(&mut r, "bridge");
        let admin_token = match r.optional::<PathBuf>("admin.token_file") {
            Some(path) => match drawbridge_runtime::broker::read_password_file(&path, key_access) {
                Ok(t) => Some(t),
                Err(e) => {
                    r.invalid("admin.token_file", e);
                    None
                }
            },
            None => None,
        };
        let lease_check_set = r.is_set("bridge.ha_lease_check");
        let mode = match r.get("bridge.ha", HaSetting::On(true)) {
            HaSetting::On(true) => HaMode::HotWarm,
            HaSetting::On(false) => HaMode::Off,
            HaSetting::Named(n) => match n.as_str() {
                "hot-warm" => HaMode::HotWarm,
                "hot-hot" => HaMode::HotHot,
                "off" => HaMode::Off,
                other => {
                    r.invalid(
                        "bridge.ha",
                        format!("`{}` is not one of \"hot-warm\", \"hot-hot\", \"off\" (or true / false)", drawbridge_runtime::text::escape(other)),
                    );
                    HaMode::HotWarm
                }
            },
        };
        let ha = HaConfig {
            mode,
            enabled: mode != HaMode::Off,
            lock_queue: r.optional("bridge.ha_lock_queue"),
            group: r.optional("bridge.ha_group"),
            retry: r.duration("bridge.ha_retry", Duration::from_millis(500)),
            hold_off: r.duration("bridge.ha_hold_off", Duration::from_secs(30)),
            // Resolved against `broker.heartbeat_secs` once that is read (below).
            lease_check: r.duration("bridge.ha_lease_check", Duration::ZERO),
            member_interval: r.duration("bridge.ha_member_interval", Duration::from_secs(1)),
        };
        r.check(
            "bridge.ha_member_interval",
            (Duration::from_millis(100)..=Duration::from_secs(30)).contains(&ha.member_interval),
            "must be between 100ms and 30s",
        );
        r.check(
            "bridge.ha_retry",
            (Duration::from_millis(10)..=Duration::from_secs(60)).contains(&ha.retry),
            "must be between 10ms and 60s",
        );
        if let Some(q) = &ha.lock_queue {
            r.check(
                "bridge.ha_lock_queue",
                !q.is_empty() && q.len() <= 255 && !q.starts_with("amq."),
                "must be 1..=255 bytes and not start with `amq.`",
            );
        }
        if let Some(g) = &ha.group {
            r.check(
                "bridge.ha_group",
                !g.is_empty() && g.len() <= 200,
                "must be 1..=200 bytes",
            );
        }
        let mut cfg = BridgeConfig {
            id: r.get("bridge.id", default_id),
            tls_cert: r.required("bridge.tls_cert").unwrap_or_default(),
            tls_key: r.required("bridge.tls_key").unwrap_or_default(),
            trust_roots: r.required("bridge.trust_roots").unwrap_or_default(),
            tls_reload_interval: tls_reload::read_interval(&mut r, "bridge"),
            key_access,
            revocation,
            tls_policy: if r.get("bridge.allow_tls12", false) {
                TlsPolicy::AllowTls12
            } else {
                TlsPolicy::Tls13Only
            },
            control_exchange: r.get("bridge.control_exchange", "drawbridge.control".to_string()),
            notify_exchange: r.get("bridge.notify_exchange", "drawbridge.notify".to_string()),
            dead_letter_queue: r.get(
                "bridge.dead_letter_queue",
                "drawbridge.dead-letter".to_string(),
            ),
            queue_prefix: r.get("bridge.queue_prefix", "drawbridge.peers.".to_string()),
            node_user,
            insecure_accept_any_control_user,
            node_identity,
            peer_queue_type,
            dead_letter_queue_type,
            window: window.clamp(1, 65535) as u16,
            max_message_size,
            max_link_bytes,
            max_bytes_in_flight,
            settle_timeout: r.duration("bridge.settle_timeout", Duration::from_secs(30)),
            connect_timeout: r.duration("bridge.connect_timeout", Duration::from_secs(10)),
            idle_timeout: r.duration("bridge.idle_timeout", Duration::from_secs(30)),
            reconnect_min: r.duration("bridge.reconnect_min", Duration::from_secs(1)),
            reconnect_max: r.duration("bridge.reconnect_max", Duration::from_secs(60)),
            snapshot_retry_min: r.duration("bridge.snapshot_retry_min", Duration::from_secs(1)),
            snapshot_retry_max: r.duration("bridge.snapshot_retry_max", Duration::from_secs(30)),
            drain_grace: r.duration("bridge.drain_grace", Duration::from_secs(10)),
            canary_interval: Some(r.duration("bridge.canary_interval", Duration::ZERO))
                .filter(|d| !d.is_zero()),
            canary_address: r.get(
                "bridge.canary_address",
                drawbridge_control_protocol::CANARY_ADDRESS.to_string(),
            ),
            proxy: drawbridge_runtime::proxy::Proxies::read(
                &mut r,
                "bridge.proxy",
                "bridge.proxies",
                key_access,
            )
            .map(Arc::new),
            tunnel: read_tunnel(&mut r),
            broker: BrokerConfig::read_with(
                &mut r,
                "broker",
                key_access,
                drawbridge_runtime::broker::CONSUMER_FRAME_MAX,
            ),
            admin_listen,
            admin_token,
            ha,
            log_format: r.get("log.format", LogFormat::Human),
            log_level: drawbridge_runtime::logging::read_level(&mut r),
        };
        r.check(
            "bridge.reconnect_max",
            cfg.reconnect_max >= cfg.reconnect_min,
            "must not be smaller than reconnect_min",
        );
        // A float in tunnel mode takes one active bridge (its epoch); hot-hot has several.
        r.check(
            "bridge.ha",
            !(cfg.ha.mode == HaMode::HotHot && cfg.tunnel.is_some()),
            "\"hot-hot\" cannot be used with [bridge.tunnel]: a tunnel-mode float is served by one active bridge at a time; use \"hot-warm\"",
        );
        let heartbeat = cfg.broker.heartbeat;
        if !lease_check_set {
            cfg.ha.lease_check = crate::ha::default_lease_check(heartbeat);
        } else {
            r.check(
                "bridge.ha_lease_check",
                (Duration::from_millis(100)..=Duration::from_secs(60))
                    .contains(&cfg.ha.lease_check),
                "must be between 100ms and 60s",
            );
            r.check(
                "bridge.ha_lease_check",
                crate::ha::lease_fits(cfg.ha.lease_check, heartbeat),
                format!(
                    "must be at most half of broker.heartbeat_secs ({heartbeat}s): 2 × ha_lease_check ≤ heartbeat, so a bridge cut off from its broker stops its links before the broker (after 2 heartbeats of silence) can give the lock to another bridge"
                ),
            );
        }
        r.check(
            "bridge.canary_interval",
            cfg.canary_interval
                .is_none_or(|d| d >= Duration::from_secs(1)),
            "must be 0s (off) or at least 1s",
        );
        r.check(
            "bridge.canary_address",
            !cfg.canary_address.is_empty() && cfg.canary_address.len() <= 255,
            "must be 1..=255 bytes",
        );
        r.finish()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem() {
        let r = ConfigReader::from_toml(
            "[bridge]\nwindow = 0\npeer_queue_type = \"lazy\"\nsettle_timeout = \"soon\"\nwindw = 5\n",
        )
        .unwrap();
        let errs = BridgeConfig::from_reader(r).unwrap_err().0;
        for key in [
            "bridge.window",
            "bridge.peer_queue_type",
            "bridge.settle_timeout",
            "bridge.windw",
            "bridge.tls_cert",
            "bridge.node_user",
            "broker.uris",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(key)),
                "{key} not in {errs:#?}"
            );
        }
    }
}

#[cfg(test)]
mod control_user_tests {
    use super::*;

    const BASE: &str = "[bridge]\ntls_cert = \"c\"\ntls_key = \"k\"\ntrust_roots = \"r\"\n";
    const BROKER: &str = "\n[broker]\nuris = [\"amqp://127.0.0.1:5672/%2f\"]\n";

    fn load(bridge_lines: &str) -> Result<BridgeConfig, Vec<String>> {
        let r = ConfigReader::from_toml(&format!("{BASE}{bridge_lines}{BROKER}")).unwrap();
        BridgeConfig::from_reader(r).map_err(|e| e.0)
    }

    #[test]
    fn the_node_user_is_required() {
        let errs = load("").unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("bridge.node_user")
                && e.contains("insecure_accept_any_control_user")),
            "{errs:#?}"
        );
        let cfg = load("node_user = \"node-a\"\n").unwrap();
        assert_eq!(cfg.node_user.as_deref(), Some("node-a"));
        assert!(!cfg.insecure_accept_any_control_user);
    }

    #[test]
    fn only_the_explicit_insecure_switch_turns_the_check_off() {
        let cfg = load("insecure_accept_any_control_user = true\n").unwrap();
        assert_eq!(cfg.node_user, None);
        let errs =
            load("node_user = \"n\"\ninsecure_accept_any_control_user = true\n").unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("bridge.insecure_accept_any_control_user")),
            "{errs:#?}"
        );
        assert!(load("node_user = \"\"\n").is_err());
    }

    #[test]
    fn the_node_identity_is_a_legal_name() {
        let cfg =
            load("node_user = \"n\"\nnode_identity = \"C=GB, O=Bank A, L=London\"\n").unwrap();
        assert_eq!(
            cfg.node_identity,
            Some("O=Bank A, L=London, C=GB".parse().unwrap())
        );
        let errs = load("node_user = \"n\"\nnode_identity = \"Bank A\"\n").unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("bridge.node_identity")),
            "{errs:#?}"
        );
    }
}

#[cfg(test)]
mod ha_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const BASE: &str =
        "[bridge]\ntls_cert = \"c\"\ntls_key = \"k\"\ntrust_roots = \"r\"\nnode_user = \"n\"\n";
    const BROKER: &str = "\n[broker]\nuris = [\"amqp://127.0.0.1:5672/%2f\"]\n";

    fn load(bridge_lines: &str, admin_lines: &str) -> Result<BridgeConfig, Vec<String>> {
        let text = format!("{BASE}{bridge_lines}{BROKER}\n[admin]\n{admin_lines}");
        BridgeConfig::from_reader(ConfigReader::from_toml(&text).unwrap()).map_err(|e| e.0)
    }

    #[test]
    fn ha_is_on_by_default_and_its_keys_are_checked() {
        let cfg = load("", "").unwrap();
        assert!(cfg.ha.enabled);
        assert_eq!(cfg.ha.retry, Duration::from_millis(500));
        assert_eq!(cfg.ha.hold_off, Duration::from_secs(30));
        assert_eq!(cfg.ha.lease_check, Duration::from_secs(2));
        assert!(cfg.admin_token.is_none());
        let errs = load("ha_retry = \"1ms\"\nha_lock_queue = \"amq.lock\"\n", "").unwrap_err();
        for key in ["bridge.ha_retry", "bridge.ha_lock_queue"] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
    }

    #[test]
    fn ha_takes_a_mode_or_a_boolean_and_hot_hot_refuses_a_tunnel() {
        use super::HaMode;
        for (text, mode) in [
            ("", HaMode::HotWarm),
            ("ha = true\n", HaMode::HotWarm),
            ("ha = false\n", HaMode::Off),
            ("ha = \"hot-warm\"\n", HaMode::HotWarm),
            ("ha = \"hot-hot\"\n", HaMode::HotHot),
            ("ha = \"off\"\n", HaMode::Off),
        ] {
            let cfg = load(text, "").unwrap();
            assert_eq!(cfg.ha.mode, mode, "{text}");
            assert_eq!(cfg.ha.enabled, mode != HaMode::Off, "{text}");
        }
        let cfg = load("ha = \"hot-hot\"\n", "").unwrap();
        assert_eq!(cfg.ha.member_interval, Duration::from_secs(1));
        // Every bad key listed: the mode's name and the interval.
        let errs = load("ha = \"hot-cold\"\nha_member_interval = \"1ms\"\n", "").unwrap_err();
        for key in ["bridge.ha", "bridge.ha_member_interval"] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
        assert!(errs.iter().any(|e| e.contains("hot-cold")), "{errs:#?}");
        let errs = load(
            "ha = \"hot-hot\"\ntunnel.floats = [\"float-1.dmz:7443\"]\ntunnel.tls_cert = \"t.crt\"\ntunnel.tls_key = \"t.key\"\ntunnel.trust_roots = \"ca.crt\"\n",
            "",
        )
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("bridge.ha") && e.contains("[bridge.tunnel]")),
            "{errs:#?}"
        );
    }

    #[test]
    fn the_lease_check_fits_within_the_heartbeat() {
        let with = |bridge: &str, heartbeat: &str| {
            let text = format!(
                "{BASE}{bridge}\n[broker]\nuris = [\"amqp://127.0.0.1:5672/%2f\"]\n{heartbeat}\n[admin]\n"
            );
            BridgeConfig::from_reader(ConfigReader::from_toml(&text).unwrap()).map_err(|e| e.0)
        };
        // The default follows the heartbeat: 2 s, or half a shorter heartbeat.
        let cfg = with("", "heartbeat_secs = 3").unwrap();
        assert_eq!(cfg.ha.lease_check, Duration::from_millis(1500));
        let cfg = with("", "heartbeat_secs = 0").unwrap();
        assert_eq!(cfg.ha.lease_check, Duration::from_secs(2));
        let cfg = with("ha_lease_check = \"5s\"", "heartbeat_secs = 10").unwrap();
        assert_eq!(cfg.ha.lease_check, Duration::from_secs(5));
        // 2 × 3 s > 5 s, the default heartbeat: refused, naming the heartbeat; listed with
        // the other bad keys.
        let errs = with("ha_lease_check = \"3s\"\nha_retry = \"1ms\"", "").unwrap_err();
        assert!(
            errs.iter().any(
                |e| e.starts_with("bridge.ha_lease_check") && e.contains("heartbeat_secs (5s)")
            ),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("bridge.ha_retry")),
            "{errs:#?}"
        );
        let errs = with("ha_lease_check = \"10ms\"", "").unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("bridge.ha_lease_check")),
            "{errs:#?}"
        );
    }

    #[test]
    fn the_tunnel_section_is_checked_key_by_key() {
        assert!(load("", "").unwrap().tunnel.is_none());
        let cfg = load(
            "tunnel.floats = [\"float-1.dmz:7443\"]\ntunnel.tls_cert = \"t.crt\"\ntunnel.tls_key = \"t.key\"\ntunnel.trust_roots = \"ca.crt\"\ntunnel.float_name = \"O=Bank A, L=London, C=GB\"\n",
            "",
        )
        .unwrap();
        let t = cfg.tunnel.expect("tunnel");
        assert_eq!(t.floats.len(), 1);
        assert_eq!(t.inboxes, vec!["drawbridge.inbox".to_string()]);
        assert_eq!(t.max_in_flight, 1024);
        // Every bad key is listed.
        let errs = load(
            "tunnel.floats = [\"no port\"]\ntunnel.float_name = \"nobody\"\ntunnel.inboxes = [\"amq.x\"]\ntunnel.max_in_flight = 0\ntunnel.colour = 1\n",
            "",
        )
        .unwrap_err();
        for key in [
            "bridge.tunnel.floats[0]",
            "bridge.tunnel.float_name",
            "bridge.tunnel.inboxes",
            "bridge.tunnel.max_in_flight",
            "bridge.tunnel.tls_cert",
            "bridge.tunnel.tls_key",
            "bridge.tunnel.trust_roots",
            "bridge.tunnel.colour",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
    }

    /// A stream is an inbox type: the bridge consumes and acks its queues away.
    #[test]
    fn a_stream_is_refused_for_the_bridges_queues_and_a_tunnel_inbox() {
        let errs = load(
            "peer_queue_type = \"stream\"\ndead_letter_queue_type = \"stream\"\ntunnel.floats = [\"f:7443\"]\ntunnel.tls_cert = \"t.crt\"\ntunnel.tls_key = \"t.key\"\ntunnel.trust_roots = \"ca.crt\"\ntunnel.float_name = \"O=Bank A, L=London, C=GB\"\ntunnel.inbox_queue_type = \"stream\"\n",
            "",
        )
        .unwrap_err();
        for key in [
            "bridge.peer_queue_type",
            "bridge.dead_letter_queue_type",
            "bridge.tunnel.inbox_queue_type",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
    }

    #[test]
    fn the_outbound_proxy_is_checked_key_by_key() {
        assert!(load("", "").unwrap().proxy.is_none());
        let cfg = load(
            "proxy.url = \"socks5://127.0.0.1:1080\"\nproxy.bypass = [\"Float.Internal\"]\n",
            "",
        )
        .unwrap();
        let proxies = cfg.proxy.expect("proxy");
        assert!(proxies.for_host("float.internal").is_none(), "bypassed");
        let proxy = proxies.for_host("float.bank-b.example").expect("global");
        assert_eq!(proxy.to_string(), "socks5://127.0.0.1:1080");
        // Every bad key is listed: a URL with credentials in it, a username without its
        // password file.
        let errs = load(
            "proxy.url = \"http://u:p@proxy:3128\"\nproxy.username = \"u\"\nproxy.port = 1\n",
            "",
        )
        .unwrap_err();
        for key in [
            "bridge.proxy.url",
            "bridge.proxy.password_file",
            "bridge.proxy.port",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
        let errs = load("proxy.username = \"u\"\n", "").unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("bridge.proxy.url")),
            "{errs:#?}"
        );
        // The password file is a secret file.
        let path = std::env::temp_dir().join(format!("drawbridge-proxy-{}", std::process::id()));
        std::fs::write(&path, "pw\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let lines = format!(
            "proxy.url = \"http://proxy:3128\"\nproxy.username = \"u\"\nproxy.password_file = {:?}\n",
            path.display().to_string()
        );
        let errs = load(&lines, "").unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("bridge.proxy.password_file")),
            "{errs:#?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&lines, "").unwrap().proxy.is_some());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_admin_token_file_is_a_secret_file() {
        let path = std::env::temp_dir().join(format!("drawbridge-token-{}", std::process::id()));
        std::fs::write(&path, "tok\n").unwrap();
        let line = format!("token_file = {:?}\n", path.display().to_string());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let errs = load("", &line).unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("admin.token_file")),
            "{errs:#?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = load("", &line).unwrap();
        assert_eq!(cfg.admin_token.as_ref().map(Secret::expose), Some("tok"));
        std::fs::remove_file(&path).unwrap();
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/bridge.toml");

    #[test]
    fn example_config_is_valid_with_every_documented_key() {
        drawbridge_runtime::config::assert_example_valid(EXAMPLE, BridgeConfig::from_reader);
    }
}
