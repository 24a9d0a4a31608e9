//! Every metric the daemons export, with its help text: `/metrics` carries a `# HELP` line
//! for each (Prometheus and Grafana show it), `drawbridge_build_info{version,commit}` says
//! which build answers, and the `process_*` metrics come from `metrics-process`.
//!
//! The catalog is one list for both daemons: a daemon describes its own metrics (its prefix)
//! and the common ones. A test (`tests/tests/repository.rs`) checks that every name the
//! sources pass to `counter!`/`gauge!`/`histogram!` is listed here, so a new metric cannot
//! ship without its help text.

use std::sync::OnceLock;

/// The kind of a metric (how it is described to the recorder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution.
    Histogram,
}

/// Which daemon emits a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// `drawbridge-bridge`.
    Bridge,
    /// `drawbridge-float`.
    Float,
}

impl Daemon {
    fn owns(self, name: &str) -> bool {
        let own = match self {
            Daemon::Bridge => "drawbridge_bridge_",
            Daemon::Float => "drawbridge_float_",
        };
        name.starts_with(own)
            || !(name.starts_with("drawbridge_bridge_") || name.starts_with("drawbridge_float_"))
    }
}

use Kind::{Counter, Gauge, Histogram};

/// (name, kind, help) of every metric. Labels are documented in docs/operations.md.
pub const CATALOG: &[(&str, Kind, &str)] = &[
    (
        "drawbridge_build_info",
        Gauge,
        "Always 1; the labels say which build runs (version, git commit).",
    ),
    (
        "drawbridge_crl_ignored_total",
        Counter,
        "CRLs a source offered and that were not taken: reason signature (does not verify) or older (would roll the list back).",
    ),
    (
        "drawbridge_broker_connected",
        Gauge,
        "1 while connected to the broker, 0 while reconnecting.",
    ),
    (
        "drawbridge_broker_connects_total",
        Counter,
        "Broker connections made (a rate above a few per hour is a flapping broker path).",
    ),
    (
        "drawbridge_bridge_tls_reload_total",
        Counter,
        "Reloads of the TLS certificate, key and trust roots, by result (ok, refused).",
    ),
    (
        "drawbridge_float_tls_reload_total",
        Counter,
        "Reloads of the TLS certificate, key and trust roots, by result (ok, refused).",
    ),
    // The bridge.
    (
        "drawbridge_bridge_active",
        Gauge,
        "1 on the active bridge of an HA group (in hot-hot: on every alive member), 0 on standbys.",
    ),
    (
        "drawbridge_bridge_members",
        Gauge,
        "Hot-hot: alive members of the group this instance counts (itself included).",
    ),
    (
        "drawbridge_bridge_links_owned",
        Gauge,
        "Wanted links this instance runs (in hot-hot: its share; otherwise all of them while active).",
    ),
    (
        "drawbridge_bridge_link_handovers_total",
        Counter,
        "Hot-hot: links moved because the members changed, by direction (out: handed over to their new owner; in: started while other members were alive, i.e. taken over or joined into).",
    ),
    (
        "drawbridge_bridge_member_announcements_refused_total",
        Counter,
        "Hot-hot: announcements on the members fanout ignored as malformed or oversized.",
    ),
    (
        "drawbridge_bridge_tunnels_up",
        Gauge,
        "Tunnels to floats in tunnel mode that are up now (bridge.tunnel.floats).",
    ),
    (
        "drawbridge_bridge_tunnel_signatures_total",
        Counter,
        "TLS handshake signatures made for floats in tunnel mode.",
    ),
    (
        "drawbridge_bridge_tunnel_sign_refused_total",
        Counter,
        "Signing requests from floats refused: not a TLS 1.3 server CertificateVerify, or over 500 a second.",
    ),
    (
        "drawbridge_bridge_link_up",
        Gauge,
        "1 while the link forwards to its peer, 0 while it connects or is down.",
    ),
    (
        "drawbridge_bridge_forwarded_total",
        Counter,
        "Messages the peer accepted and the bridge acked.",
    ),
    (
        "drawbridge_bridge_dead_lettered_total",
        Counter,
        "Messages sent to the dead-letter queue (reason in the drawbridge-reason header).",
    ),
    (
        "drawbridge_bridge_peer_frames_refused_total",
        Counter,
        "Float connections closed by the frame guard (malformed or hostile AMQP frames), by reason.",
    ),
    (
        "drawbridge_bridge_dead_letter_failures_total",
        Counter,
        "Failed attempts to publish to the dead-letter queue (the link holds the message and retries).",
    ),
    (
        "drawbridge_bridge_redelivered_total",
        Counter,
        "Deliveries the broker marked redelivered (resends after a failure).",
    ),
    (
        "drawbridge_bridge_link_connects_total",
        Counter,
        "Times the link was (re)established.",
    ),
    (
        "drawbridge_bridge_link_last_accepted_timestamp_seconds",
        Gauge,
        "Unix time of the link's last acceptance by the peer.",
    ),
    (
        "drawbridge_bridge_link_in_flight",
        Gauge,
        "Transfers sent to the float and not yet settled.",
    ),
    (
        "drawbridge_bridge_link_head_returns",
        Gauge,
        "Times the message at the head of the queue came back unsettled in a row (a poison message).",
    ),
    (
        "drawbridge_bridge_link_stop_aborted_total",
        Counter,
        "Links that did not drain within their deadline and were aborted (messages requeued).",
    ),
    (
        "drawbridge_bridge_delivery_age_seconds",
        Histogram,
        "Age of each message when the peer accepted it, from its AMQP timestamp (whole seconds).",
    ),
    (
        "drawbridge_bridge_link_canary_rtt_seconds",
        Histogram,
        "Round trip of link canary probes: bridge, float, float's broker and back.",
    ),
    (
        "drawbridge_bridge_link_canary_last_ok_timestamp_seconds",
        Gauge,
        "Unix time of the link's last accepted canary probe.",
    ),
    (
        "drawbridge_bridge_link_canary_failures_total",
        Counter,
        "Canary probes that failed, by reason (timeout, rejected, released, link).",
    ),
    (
        "drawbridge_bridge_undeliverable_total",
        Counter,
        "Messages the bridge could not send as they are, by reason.",
    ),
    (
        "drawbridge_bridge_control_refused_total",
        Counter,
        "Control messages refused (another broker user, another node identity, a newer protocol), by reason.",
    ),
    (
        "drawbridge_bridge_control_ignored_total",
        Counter,
        "Control messages skipped as not for this bridge, by reason.",
    ),
    (
        "drawbridge_bridge_control_stale_total",
        Counter,
        "Control messages ignored as older than what was already applied (sequence).",
    ),
    (
        "drawbridge_bridge_control_unsequenced_total",
        Counter,
        "Control messages without a sequence number, applied in arrival order.",
    ),
    (
        "drawbridge_bridge_notifications_dropped_total",
        Counter,
        "Link status events and snapshot requests dropped because the notify queue was full.",
    ),
    // The float.
    (
        "drawbridge_float_accepted_total",
        Counter,
        "Transfers published, confirmed by the broker and accepted, per authenticated sender.",
    ),
    (
        "drawbridge_float_rejected_total",
        Counter,
        "Transfers rejected (the sender's bridge dead-letters them), by reason and peer.",
    ),
    (
        "drawbridge_float_released_total",
        Counter,
        "Transfers released for broker trouble (the peer resends them), by reason and peer.",
    ),
    (
        "drawbridge_float_canary_probes_total",
        Counter,
        "Link canary probes received, per peer (not counted as accepted messages).",
    ),
    (
        "drawbridge_float_connections",
        Gauge,
        "Peer connections established now.",
    ),
    (
        "drawbridge_float_tunnels",
        Gauge,
        "Tunnel mode: bridges' tunnels up now.",
    ),
    (
        "drawbridge_float_tunnel_epoch",
        Gauge,
        "Tunnel mode: the activation epoch in force (the active bridge's).",
    ),
    (
        "drawbridge_float_sign_seconds",
        Histogram,
        "Tunnel mode: time a peer's TLS handshake waited for the bridge's signature.",
    ),
    (
        "drawbridge_float_connections_refused_total",
        Counter,
        "Connections refused, by reason.",
    ),
    (
        "drawbridge_float_handshakes_shortened_total",
        Counter,
        "Handshakes given the shorter deadline because the handshake pool was over half full.",
    ),
    (
        "drawbridge_float_connections_revoked_total",
        Counter,
        "Connections closed because a CRL change revoked the peer's certificate.",
    ),
    (
        "drawbridge_float_connections_expired_total",
        Counter,
        "Connections closed because a certificate of the peer's chain passed its notAfter.",
    ),
    (
        "drawbridge_float_peer_verifications_total",
        Counter,
        "Full chain and CRL verifications of established peers (once per connection and per CRL change, not per session).",
    ),
    (
        "drawbridge_float_budget_holds_total",
        Counter,
        "Times a link waited for room in the float's bytes-in-flight budget.",
    ),
    (
        "drawbridge_float_duplicates_suppressed_total",
        Counter,
        "Resends of already confirmed messages accepted without publishing them again.",
    ),
    (
        "drawbridge_float_duplicates_passed_total",
        Counter,
        "Resends of messages still in flight, published again (deduplication cannot tell yet).",
    ),
    (
        "drawbridge_float_window_ready",
        Gauge,
        "Stream inboxes: 1 while the dedup window is read back from the inbox streams on the current broker connection (links publish), 0 while it is rebuilt.",
    ),
    (
        "drawbridge_float_window_rebuilds_total",
        Counter,
        "Stream inboxes: rebuilds of the dedup window from the inbox streams (at start, after each broker reconnect, after a failure).",
    ),
    (
        "drawbridge_float_window_last_rebuild_seconds",
        Gauge,
        "Stream inboxes: how long the last rebuild held the links, from start or connection loss until the window was read back.",
    ),
    (
        "drawbridge_float_window_stream_read_total",
        Counter,
        "Stream inboxes: messages read back from the inbox streams into the dedup window.",
    ),
    (
        "drawbridge_float_window_duplicates_stored_total",
        Counter,
        "Stream inboxes: messages read back from an inbox stream a second time within the window (a copy stored twice: two floats publishing at once, or a resend while its first copy was in flight).",
    ),
    (
        "drawbridge_float_window_markers_total",
        Counter,
        "Stream inboxes: window markers published into the inbox streams (one per inbox per round).",
    ),
    (
        "drawbridge_float_reserved_headers_stripped_total",
        Counter,
        "Headers a peer set under Drawbridge's reserved names, removed before publishing.",
    ),
];

/// The git commit the binaries were built from (`runtime/build.rs`), `unknown` outside a
/// git checkout.
pub const COMMIT: &str = env!("DRAWBRIDGE_BUILD_COMMIT");

/// Describe `daemon`'s metrics and the common ones to the installed recorder, set
/// `drawbridge_build_info`, and describe the process metrics. Once at start; repeating it is
/// harmless.
pub fn describe(daemon: Daemon) {
    for (name, kind, help) in CATALOG.iter().filter(|(n, _, _)| daemon.owns(n)) {
        match kind {
            Counter => metrics::describe_counter!(*name, *help),
            Gauge => metrics::describe_gauge!(*name, *help),
            Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
    metrics::gauge!(
        "drawbridge_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => COMMIT
    )
    .set(1.0);
    process().describe();
}

/// Sample the process metrics (CPU seconds, resident memory, open file descriptors, start
/// time, threads) into the recorder: on each scrape, so they are as fresh as the scrape.
pub fn collect_process() {
    process().collect();
}

fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}
