//! What `/status` shows about each link, and the one place a link's state changes
//! ([`set_state`]: the view, the `link_up` gauge and the node's link status event together).
//! A module of its own so that the link, its canary and the control plane share it without
//! importing each other.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use drawbridge_control_protocol::{LinkState, PeerLink};
use drawbridge_runtime::text;

use crate::Ctx;

/// What `/status` shows about a link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkView {
    /// Peer queue.
    pub queue: String,
    /// The legal name(s) the float must present (the link's `legal_names`).
    pub peer: String,
    /// connecting / up / down / deleted.
    pub state: String,
    /// Target in use (when up) or last tried.
    pub target: String,
    /// Why it is in this state.
    pub reason: String,
    /// Messages accepted by the peer (and acked) since start.
    pub forwarded: u64,
    /// Messages sent to the dead-letter queue since start.
    pub dead_lettered: u64,
    /// Deliveries the broker marked as redelivered (resends after a failure).
    pub redelivered: u64,
    /// Times the link was (re)established.
    pub connects: u64,
    /// Sessions in a row that started with the same redelivered message and accepted
    /// nothing (a peer that takes the connection but not the messages).
    pub head_returns: u32,
    /// That message's id, once reported as stuck.
    pub stuck_message_id: Option<String>,
    /// The peer queue exists without the dead-letter arguments (declared by an older
    /// node): consumed as it is, but broker-side drops are not dead-lettered.
    pub legacy_queue_args: bool,
    /// Broker prefetch of the current consumer (follows message sizes, see `budget`).
    pub prefetch: u16,
    /// Times the link decided to lower its prefetch for bigger messages.
    pub prefetch_narrowed: u64,
    /// Times it decided to raise it again for smaller ones.
    pub prefetch_widened: u64,
    /// Unix ms of the last state change.
    pub since_unix_ms: u64,
    /// Transfers sent to the peer and not yet settled (sampled every 50 ms while up).
    pub in_flight: u32,
    /// Round trip of the last probe the float accepted (`bridge.canary_interval`), in ms.
    pub canary_rtt_ms: Option<f64>,
    /// Unix ms when the float last accepted a probe.
    pub canary_ok_unix_ms: Option<u64>,
    /// Why the last probe failed (cleared by the next accepted one), or why the float
    /// refused the canary link.
    pub canary_error: Option<String>,
}

impl LinkView {
    /// Why this link cannot take new work now (for `/readyz?links`), or `None`: it is up and,
    /// with `canary_interval` set, its last probe was accepted within three intervals (a link
    /// just up has that long for its first).
    pub fn unusable(&self, now_unix_ms: u64, canary_interval: Option<Duration>) -> Option<String> {
        if self.state != LinkState::Up.to_string() {
            return Some(format!("{} ({})", self.state, self.reason));
        }
        let interval = canary_interval?;
        let allowed = 3 * interval.as_millis() as u64;
        let last = self
            .canary_ok_unix_ms
            .filter(|t| *t >= self.since_unix_ms)
            .unwrap_or(self.since_unix_ms);
        let silent = now_unix_ms.saturating_sub(last);
        (silent > allowed).then(|| match &self.canary_error {
            Some(e) => format!("canary: {e}"),
            None => format!("canary: no probe accepted for {} ms", silent),
        })
    }
}

/// Shared handle on a link's view.
pub type SharedView = Arc<Mutex<LinkView>>;

/// A new view for the link `spec`.
pub fn new_view(spec: &PeerLink) -> SharedView {
    Arc::new(Mutex::new(LinkView {
        queue: spec.queue.clone(),
        peer: spec.legal_names.join(" | "),
        state: LinkState::Connecting.to_string(),
        target: String::new(),
        reason: String::new(),
        forwarded: 0,
        dead_lettered: 0,
        redelivered: 0,
        connects: 0,
        head_returns: 0,
        stuck_message_id: None,
        legacy_queue_args: false,
        prefetch: 0,
        prefetch_narrowed: 0,
        prefetch_widened: 0,
        since_unix_ms: drawbridge_runtime::daemon::unix_ms(),
        in_flight: 0,
        canary_rtt_ms: None,
        canary_ok_unix_ms: None,
        canary_error: None,
    }))
}

/// Longest link reason kept in `/status` and sent in a link status event, in bytes.
const MAX_STATUS_REASON: usize = 1024;

pub(crate) fn set_state(
    ctx: &Ctx,
    view: &SharedView,
    spec: &PeerLink,
    state: LinkState,
    target: &str,
    reason: &str,
) {
    // The reason can quote a float (a detach's or a rejection's description, as long as a
    // frame): what `/status` keeps and the link status event carries is bounded here, the
    // one place both are set.
    let bounded;
    let reason = if reason.len() > MAX_STATUS_REASON {
        bounded = format!(
            "{}… ({} bytes in all)",
            text::truncate(reason, MAX_STATUS_REASON),
            reason.len()
        );
        bounded.as_str()
    } else {
        reason
    };
    {
        let mut v = view.lock().expect("poisoned");
        v.state = state.to_string();
        v.target = target.to_string();
        v.reason = reason.to_string();
        v.since_unix_ms = drawbridge_runtime::daemon::unix_ms();
    }
    // 1 while the link forwards; an alert on 0 for longer than a reconnect names the queue.
    metrics::gauge!("drawbridge_bridge_link_up", "queue" => spec.queue.clone())
        .set(if state == LinkState::Up { 1.0 } else { 0.0 });
    crate::notify::link_status(ctx, spec, state, target, reason);
}
