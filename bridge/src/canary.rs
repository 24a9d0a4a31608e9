//! The link canary: the design's watchdog "verifies that messaging is able to process new
//! work". While a link is up, its task sends a small probe every
//! `bridge.canary_interval` on a second sending link of the same AMQP session, to the
//! float's `canary_address`. The float publishes the probe to a transient queue of its own
//! broker (never an inbox) with a confirm and only then accepts it, so an accepted probe
//! proves the whole path — this bridge, TLS, the float, the float's broker — and its round
//! trip is the path's latency without any queueing behind the link's backlog.
//!
//! The canary runs in the link's own task, on the link's connection: a probe and its
//! disposition cross no task boundary, and a stopped session stops its canary with it.
//!
//! A probe is never on the message path: it holds no delivery and no broker ack, and a
//! failed probe does not recycle the link (the link's own transfers do that when the path is
//! really broken). It is reported: `/status` (`canary_*` fields), the metrics
//! `drawbridge_bridge_link_canary_rtt_seconds`, `..._canary_last_ok_timestamp_seconds` and
//! `..._canary_failures_total{reason}`, and `/readyz?links`.

use std::time::{Duration, Instant};

use drawbridge_amqp::{
    connection::{CommandError, Connection, LinkId},
    message::write_data_message,
    performatives::Outcome,
};
use drawbridge_runtime::text;
use tracing::{info, warn};

use crate::view::SharedView;

/// A link's canary: its sending link, its timer and the probe in flight.
pub(crate) struct Canary {
    link: LinkId,
    queue: String,
    timeout: Duration,
    view: SharedView,
    ticker: tokio::time::Interval,
    probe: Option<Probe>,
    sent: u64,
    failing: bool,
    /// The float settled a probe on this connection.
    answered: bool,
    rtt_seconds: metrics::Histogram,
    last_ok: metrics::Gauge,
}

/// The probe in flight: sent (its delivery id) or waiting for the float's credit.
struct Probe {
    id: Option<u32>,
    started: Instant,
    deadline: tokio::time::Instant,
}

/// What [`Canary::due`] waited for.
pub(crate) enum Due {
    /// Time for the next probe.
    Tick,
    /// The probe in flight was not settled in time.
    Deadline,
}

impl Canary {
    /// Probe on `link` every `interval`; a probe not settled within `timeout` failed.
    pub(crate) fn new(
        link: LinkId,
        queue: String,
        interval: Duration,
        timeout: Duration,
        view: SharedView,
    ) -> Canary {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Canary {
            link,
            timeout,
            view,
            ticker,
            probe: None,
            sent: 0,
            failing: false,
            answered: false,
            rtt_seconds: metrics::histogram!("drawbridge_bridge_link_canary_rtt_seconds", "queue" => queue.clone()),
            last_ok: metrics::gauge!("drawbridge_bridge_link_canary_last_ok_timestamp_seconds", "queue" => queue.clone()),
            queue,
        }
    }

    /// The canary's link.
    pub(crate) fn link(&self) -> LinkId {
        self.link
    }

    /// Waits for the next probe's time, or for the probe in flight's deadline. Cancel-safe.
    pub(crate) async fn due(&mut self) -> Due {
        match &self.probe {
            Some(p) => {
                tokio::time::sleep_until(p.deadline).await;
                Due::Deadline
            }
            None => {
                self.ticker.tick().await;
                Due::Tick
            }
        }
    }

    /// Acts on what [`Canary::due`] returned.
    pub(crate) fn on_due(&mut self, due: Due, conn: &mut Connection) {
        match due {
            Due::Tick => {
                self.probe = Some(Probe {
                    id: None,
                    started: Instant::now(),
                    deadline: tokio::time::Instant::now() + self.timeout,
                });
                self.send(conn);
            }
            Due::Deadline => {
                self.probe = None;
                self.judged(judge(None));
            }
        }
    }

    /// The float granted the canary's link credit: a probe waiting for it goes now.
    pub(crate) fn on_credit(&mut self, conn: &mut Connection) {
        self.send(conn);
    }

    /// Deliveries `first..=last` of the canary's link were settled.
    pub(crate) fn on_settled(&mut self, first: u32, last: u32, outcome: Option<Outcome>) {
        let Some(id) = self.probe.as_ref().and_then(|p| p.id) else {
            return;
        };
        if id.wrapping_sub(first) <= last.wrapping_sub(first) {
            self.answered = true;
            let started = self.probe.take().map(|p| p.started);
            let verdict = judge(Some(Ok(outcome.unwrap_or(Outcome::Released))));
            if verdict.is_ok() {
                if let Some(started) = started {
                    self.record_ok(started.elapsed());
                }
            } else {
                self.judged(verdict);
            }
        }
    }

    /// The float detached the canary's link: reported, and the link forwards without it.
    /// Detached before it settled any probe, the float does not take probes (an older
    /// float, or its canary is off; some answer the attach and detach at once): said once
    /// per reason, not at every reconnect.
    pub(crate) fn on_detached(&mut self, reason: String) {
        self.probe = None;
        if self.answered {
            self.judged(judge(Some(Err(reason))));
            return;
        }
        metrics::counter!("drawbridge_bridge_link_canary_failures_total", "queue" => self.queue.clone(), "reason" => Failure::Link.label())
            .increment(1);
        let reason = format!("the float refused the canary link: {reason}");
        let mut v = self.view.lock().expect("poisoned");
        if v.canary_error.as_deref() != Some(reason.as_str()) {
            warn!(queue = %self.queue, reason = %text::escape(&reason), "link canary unavailable; the link forwards without it");
            v.canary_error = Some(reason);
        }
    }

    fn send(&mut self, conn: &mut Connection) {
        let Some(probe) = self.probe.as_mut().filter(|p| p.id.is_none()) else {
            return;
        };
        let n = self.sent + 1;
        let id = format!("drawbridge-canary-{n}");
        let now_ms = drawbridge_runtime::daemon::unix_ms();
        let mut payload = Vec::with_capacity(64);
        write_data_message(&mut payload, id.as_bytes(), &now_ms.to_be_bytes());
        match conn.send(self.link, &n.to_be_bytes(), &payload) {
            Ok(delivery) => {
                self.sent = n;
                probe.id = Some(delivery);
            }
            // Sent when the float grants credit (or failed at the deadline).
            Err(CommandError::NoCredit) => {}
            Err(e) => {
                self.probe = None;
                self.judged(judge(Some(Err(format!("cannot send a probe: {e}")))));
            }
        }
    }

    fn record_ok(&mut self, rtt: Duration) {
        self.rtt_seconds.record(rtt.as_secs_f64());
        let at = drawbridge_runtime::daemon::unix_ms();
        self.last_ok.set(at as f64 / 1000.0);
        {
            let mut v = self.view.lock().expect("poisoned");
            v.canary_rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            v.canary_ok_unix_ms = Some(at);
            v.canary_error = None;
        }
        if std::mem::take(&mut self.failing) {
            info!(queue = %self.queue, rtt = ?rtt, "link canary answers again");
        }
    }

    fn judged(&mut self, verdict: Result<(), (Failure, String)>) {
        let Err((failure, reason)) = verdict else {
            return;
        };
        metrics::counter!("drawbridge_bridge_link_canary_failures_total", "queue" => self.queue.clone(), "reason" => failure.label())
            .increment(1);
        self.view.lock().expect("poisoned").canary_error = Some(reason.clone());
        // One line per episode, not per probe.
        if !std::mem::replace(&mut self.failing, true) {
            warn!(queue = %self.queue, reason = %text::escape(&reason), "link canary failed: the path to the float's broker does not take new work");
        }
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
        Some(Ok(Outcome::Accepted)) => Ok(()),
        Some(Ok(Outcome::Rejected(error))) => Err((
            Failure::Rejected,
            format!(
                "rejected by the float: {}",
                error
                    .and_then(|e| e.description)
                    .unwrap_or_else(|| "no reason given".into())
            ),
        )),
        Some(Ok(Outcome::Released | Outcome::Modified { .. })) => Err((
            Failure::Released,
            "released by the float (its broker did not take the probe)".to_string(),
        )),
        Some(Ok(Outcome::Received)) => Err((
            Failure::Released,
            "unexpected outcome `received`".to_string(),
        )),
        Some(Err(e)) => Err((Failure::Link, format!("canary link failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use drawbridge_amqp::performatives::Error;

    use super::*;

    #[test]
    fn outcomes_are_judged_with_a_reason() {
        assert_eq!(judge(Some(Ok(Outcome::Accepted))), Ok(()));
        let (f, why) = judge(None).unwrap_err();
        assert_eq!(f, Failure::Timeout);
        assert!(why.contains("not settled"));
        let rejected = Outcome::Rejected(Some(Error::new(
            "amqp:not-found",
            "canary queue unavailable",
        )));
        let (f, why) = judge(Some(Ok(rejected))).unwrap_err();
        assert_eq!(f, Failure::Rejected);
        assert!(why.contains("canary queue unavailable"), "{why}");
        assert_eq!(
            judge(Some(Ok(Outcome::Released))).unwrap_err().0,
            Failure::Released
        );
        assert_eq!(
            judge(Some(Err("detached".into()))).unwrap_err().0,
            Failure::Link
        );
    }
}
