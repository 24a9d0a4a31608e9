//! The link canary: the design's watchdog "verifies that messaging is able to process new
//! work". While a link is up, a task of its session sends a small probe every
//! `bridge.canary_interval` on a second sending link of the same AMQP session, to the
//! float's `canary_address`. The float publishes the probe to a transient queue of its own
//! broker (never an inbox) with a confirm and only then accepts it, so an accepted probe
//! proves the whole path — this bridge, TLS, the float, the float's broker — and its round
//! trip is the path's latency without any queueing behind the link's backlog.
//!
//! A probe is never on the message path: it holds no delivery and no broker ack, and a
//! failed probe does not recycle the link (the link's own transfers do that when the path is
//! really broken). It is reported: `/status` (`canary_*` fields), the metrics
//! `drawbridge_bridge_link_canary_rtt_seconds`, `..._canary_last_ok_timestamp_seconds` and
//! `..._canary_failures_total{reason}`, and `/readyz?links`.

use std::time::{Duration, Instant};

use drawbridge_runtime::text;
use fe2o3_amqp::{
    types::{
        messaging::{Message, Outcome, Properties},
        primitives::Binary,
    },
    Sender,
};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::view::SharedView;

/// A running canary; stopped (its task aborted) when dropped with its session.
pub(crate) struct Canary {
    task: JoinHandle<()>,
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start probing on `sender` every `interval`; a probe not settled within `timeout` failed.
pub(crate) fn start(
    sender: Sender,
    queue: String,
    interval: Duration,
    timeout: Duration,
    view: SharedView,
) -> Canary {
    Canary {
        task: tokio::spawn(run(sender, queue, interval, timeout, view)),
    }
}

/// How a probe ended; the label of `drawbridge_bridge_link_canary_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Not settled within the timeout (or no credit).
    Timeout,
    /// The float rejected it (e.g. its canary queue is unavailable).
    Rejected,
    /// The float released or modified it (its broker refused the publish).
    Released,
    /// The canary link failed.
    Link,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Rejected => "rejected",
            Failure::Released => "released",
            Failure::Link => "link",
        }
    }
}

/// A probe's outcome, or how it failed and why.
pub(crate) fn judge(outcome: Option<Result<Outcome, String>>) -> Result<(), (Failure, String)> {
    match outcome {
        None => Err((Failure::Timeout, "not settled in time".to_string())),
        Some(Ok(Outcome::Accepted(_))) => Ok(()),
        Some(Ok(Outcome::Rejected(r))) => Err((
            Failure::Rejected,
            format!(
                "rejected by the float: {}",
                r.error
                    .and_then(|e| e.description)
                    .unwrap_or_else(|| "no reason given".into())
            ),
        )),
        Some(Ok(Outcome::Released(_) | Outcome::Modified(_))) => Err((
            Failure::Released,
            "released by the float (its broker did not take the probe)".to_string(),
        )),
        #[allow(unreachable_patterns)]
        Some(Ok(other)) => Err((Failure::Released, format!("unexpected outcome {other:?}"))),
        Some(Err(e)) => Err((Failure::Link, format!("canary link failed: {e}"))),
    }
}

async fn run(
    mut sender: Sender,
    queue: String,
    interval: Duration,
    timeout: Duration,
    view: SharedView,
) {
    let rtt_seconds =
        metrics::histogram!("drawbridge_bridge_link_canary_rtt_seconds", "queue" => queue.clone());
    let last_ok = metrics::gauge!("drawbridge_bridge_link_canary_last_ok_timestamp_seconds", "queue" => queue.clone());
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    for n in 1u64.. {
        ticker.tick().await;
        let now_ms = drawbridge_runtime::daemon::unix_ms();
        let probe = Message::builder()
            .properties(
                Properties::builder()
                    .message_id(format!("drawbridge-canary-{n}"))
                    .build(),
            )
            .data(Binary::from(now_ms.to_be_bytes().to_vec()))
            .build();
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, sender.send(probe))
            .await
            .ok()
            .map(|r| r.map_err(|e| e.to_string()));
        let link_failed = matches!(outcome, Some(Err(_)));
        match judge(outcome) {
            Ok(()) => {
                let rtt = started.elapsed();
                rtt_seconds.record(rtt.as_secs_f64());
                let at = drawbridge_runtime::daemon::unix_ms();
                last_ok.set(at as f64 / 1000.0);
                {
                    let mut v = view.lock().expect("poisoned");
                    v.canary_rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                    v.canary_ok_unix_ms = Some(at);
                    v.canary_error = None;
                }
                if std::mem::take(&mut failing) {
                    info!(queue = %queue, rtt = ?rtt, "link canary answers again");
                }
            }
            Err((failure, reason)) => {
                metrics::counter!("drawbridge_bridge_link_canary_failures_total", "queue" => queue.clone(), "reason" => failure.label())
                    .increment(1);
                if link_failed && n == 1 {
                    // The float detached the canary link at once: it does not take probes
                    // (an older float, or its canary is off). Said once per reason, not at
                    // every reconnect; the link forwards without a canary.
                    let reason = format!("the float refused the canary link: {reason}");
                    let mut v = view.lock().expect("poisoned");
                    if v.canary_error.as_deref() != Some(reason.as_str()) {
                        warn!(queue = %queue, reason = %text::escape(&reason), "link canary unavailable; the link forwards without it");
                        v.canary_error = Some(reason);
                    }
                    return;
                }
                view.lock().expect("poisoned").canary_error = Some(reason.clone());
                // One line per episode, not per probe.
                if !std::mem::replace(&mut failing, true) {
                    warn!(queue = %queue, reason = %text::escape(&reason), "link canary failed: the path to the float's broker does not take new work");
                }
                if link_failed {
                    // The canary link is gone; the session's own link notices the rest.
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::{
        definitions::{AmqpError, Error},
        messaging::{Accepted, Rejected, Released},
    };

    use super::*;

    #[test]
    fn outcomes_are_judged_with_a_reason() {
        assert_eq!(judge(Some(Ok(Outcome::Accepted(Accepted {})))), Ok(()));
        let (f, why) = judge(None).unwrap_err();
        assert_eq!(f, Failure::Timeout);
        assert!(why.contains("not settled"));
        let rejected = Outcome::Rejected(Rejected {
            error: Some(Error::new(
                AmqpError::NotFound,
                "canary queue unavailable".to_string(),
                None,
            )),
        });
        let (f, why) = judge(Some(Ok(rejected))).unwrap_err();
        assert_eq!(f, Failure::Rejected);
        assert!(why.contains("canary queue unavailable"), "{why}");
        assert_eq!(
            judge(Some(Ok(Outcome::Released(Released {}))))
                .unwrap_err()
                .0,
            Failure::Released
        );
        assert_eq!(
            judge(Some(Err("detached".into()))).unwrap_err().0,
            Failure::Link
        );
    }
}
