//! What the bridge tells the node on its notify exchange, by way of the control task's
//! outgoing queue (`Ctx::notify`). A module of its own so that links report their state
//! without importing the control plane that starts them.

use drawbridge_control_protocol::{LinkState, LinkStatus, Notification, PeerLink, SnapshotRequest};

use crate::Ctx;

/// Tell the node about a link's new state (a `LinkStatus` event on the notify exchange). A full
/// notification queue drops it and counts the drop: status events are advisory.
pub(crate) fn link_status(ctx: &Ctx, spec: &PeerLink, state: LinkState, peer: &str, reason: &str) {
    let n = Notification::LinkStatus(LinkStatus {
        bridge_id: ctx.cfg.id.clone(),
        queue: spec.queue.clone(),
        state,
        peer: peer.to_string(),
        reason: reason.to_string(),
        timestamp_ms: drawbridge_runtime::daemon::unix_ms(),
    });
    if ctx.notify.try_send(n).is_err() {
        metrics::counter!("drawbridge_bridge_notifications_dropped_total").increment(1);
    }
}

/// A snapshot request for this bridge.
pub(crate) fn snapshot_request(ctx: &Ctx) -> Notification {
    Notification::SnapshotRequest(SnapshotRequest {
        bridge_id: ctx.cfg.id.clone(),
    })
}
