//! How a transfer is settled, apart from any I/O: the broker's answer to a publish mapped
//! to `accepted`, `released` or `rejected`.
//!
//! The sending bridge dead-letters a `rejected` transfer and resends a `released` one, so
//! `rejected` is kept for what can never succeed (invalid, too big, a destination this
//! float does not serve — decided before publishing). Everything the broker says after a
//! publish is about the broker's state right now — a full inbox with `reject-publish`, a
//! memory or disk alarm, an inbox being recreated, a closed channel — and is `released`:
//! the message waits and is resent, it is never dead-lettered for a passing condition.

use std::time::Duration;

use drawbridge_runtime::backoff::Backoff;
use lapin::Confirmation;
use tokio::time::Instant;

/// How one transfer ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Published and confirmed (or a confirmed duplicate): accept.
    Accept,
    /// Cannot ever be delivered: reject with this description.
    Reject(String),
    /// Transient trouble: release, the bridge resends.
    Release(Transient),
}

/// Why a transfer was released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Transient {
    /// No broker connection or channel.
    #[error("broker unavailable")]
    BrokerUnavailable,
    /// The broker nacked the publish (inbox full with `reject-publish`, resource alarm).
    #[error("the broker refused the message for now (nack): inbox `{0}` full or broker in alarm")]
    Nacked(String),
    /// The publish was returned as unroutable: the configured inbox does not exist (yet).
    #[error("inbox `{0}` does not exist (yet)")]
    NoInbox(String),
    /// The publish or its confirm failed (channel closed, e.g. access refused).
    #[error("publish failed: {0}")]
    PublishFailed(String),
    /// No confirm within the operation timeout.
    #[error("publisher confirm timed out after {0:?}")]
    ConfirmTimedOut(Duration),
    /// Tunnel mode: no bridge holds an active tunnel (or it went before answering).
    #[error("no active bridge")]
    NoBridge,
    /// Tunnel mode: the bridge released the publish (its broker's answer).
    #[error("released by the bridge: {0}")]
    Bridge(String),
    /// Confirms were not enabled on the channel (a bug; never accept unconfirmed).
    #[error("internal error: publisher confirms not enabled")]
    NotConfirmed,
}

impl Transient {
    /// Whether the float should pause the link before taking more transfers: the broker
    /// said no, so more publishes now would only be refused too.
    pub fn backs_off(&self) -> bool {
        !matches!(self, Transient::NotConfirmed)
    }

    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Transient::BrokerUnavailable => "broker_unavailable",
            Transient::Nacked(_) => "nacked",
            Transient::NoInbox(_) => "no_inbox",
            Transient::PublishFailed(_) => "publish_failed",
            Transient::ConfirmTimedOut(_) => "confirm_timeout",
            Transient::NotConfirmed => "not_confirmed",
            Transient::NoBridge => "no_bridge",
            Transient::Bridge(_) => "bridge",
        }
    }
}

/// What the broker answered to one publish, reduced to what decides the settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAnswer {
    /// Confirmed and routed.
    Ack,
    /// Confirmed but returned as unroutable (mandatory publish, no queue).
    Returned,
    /// Refused (`basic.nack`).
    Nack,
    /// The channel is not in confirm mode.
    NotRequested,
    /// The publish or its confirm failed.
    Failed(String),
    /// No answer within the deadline.
    TimedOut,
}

impl BrokerAnswer {
    /// From lapin's confirm future (`None`: the deadline passed).
    pub fn from_confirm(answer: Option<Result<Confirmation, lapin::Error>>) -> Self {
        match answer {
            Some(Ok(Confirmation::Ack(None))) => BrokerAnswer::Ack,
            Some(Ok(Confirmation::Ack(Some(_)))) => BrokerAnswer::Returned,
            // A nack may carry the returned message too; either way the broker refused.
            Some(Ok(Confirmation::Nack(_))) => BrokerAnswer::Nack,
            Some(Ok(Confirmation::NotRequested)) => BrokerAnswer::NotRequested,
            Some(Err(e)) => BrokerAnswer::Failed(e.to_string()),
            None => BrokerAnswer::TimedOut,
        }
    }
}

/// Map the broker's answer to a publish into `inbox` with confirm deadline `timeout`.
pub fn confirmed(answer: BrokerAnswer, inbox: &str, timeout: Duration) -> Settle {
    match answer {
        BrokerAnswer::Ack => Settle::Accept,
        BrokerAnswer::Returned => Settle::Release(Transient::NoInbox(inbox.into())),
        BrokerAnswer::Nack => Settle::Release(Transient::Nacked(inbox.into())),
        BrokerAnswer::NotRequested => Settle::Release(Transient::NotConfirmed),
        BrokerAnswer::Failed(e) => Settle::Release(Transient::PublishFailed(e)),
        BrokerAnswer::TimedOut => Settle::Release(Transient::ConfirmTimedOut(timeout)),
    }
}

/// The float's backoff on a link whose publishes the broker refuses: after a release for
/// broker trouble the link takes no transfer for a growing delay (which withholds credit from
/// the sender), and starts from the minimum again after an accept. One event per episode.
#[derive(Debug)]
pub struct Pause {
    /// Delay before the next transfer after a refusal.
    backoff: Backoff,
    /// No transfer is taken before this.
    until: Option<Instant>,
    /// Whether the link is in a refusal episode (for one log line each way).
    troubled: bool,
}

/// A change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseEvent {
    /// The broker started refusing; the link pauses.
    Paused(String),
    /// An accept after an episode of refusals.
    Resumed,
}

impl Pause {
    /// Pauses from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Pause {
            backoff: Backoff::new(min, max),
            until: None,
            troubled: false,
        }
    }

    /// Until when the link takes no transfer, if paused at `now`.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|t| *t > now)
    }

    /// Feed a settlement decided at `now`.
    pub fn observe(&mut self, settle: &Settle, now: Instant) -> Option<PauseEvent> {
        match settle {
            Settle::Accept => {
                self.backoff.reset();
                self.until = None;
                std::mem::take(&mut self.troubled).then_some(PauseEvent::Resumed)
            }
            Settle::Release(t) if t.backs_off() => {
                self.until = Some(now + self.backoff.next_delay());
                (!std::mem::replace(&mut self.troubled, true))
                    .then(|| PauseEvent::Paused(t.to_string()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn only_a_plain_ack_accepts() {
        assert_eq!(confirmed(BrokerAnswer::Ack, "inbox", T), Settle::Accept);
        assert_eq!(
            BrokerAnswer::from_confirm(Some(Ok(Confirmation::Ack(None)))),
            BrokerAnswer::Ack
        );
        assert_eq!(BrokerAnswer::from_confirm(None), BrokerAnswer::TimedOut);
        assert_eq!(
            BrokerAnswer::from_confirm(Some(Ok(Confirmation::Nack(None)))),
            BrokerAnswer::Nack
        );
    }

    #[test]
    fn what_the_broker_says_after_a_publish_is_transient() {
        assert_eq!(
            confirmed(BrokerAnswer::Nack, "inbox", T),
            Settle::Release(Transient::Nacked("inbox".into()))
        );
        assert_eq!(
            confirmed(BrokerAnswer::Returned, "inbox", T),
            Settle::Release(Transient::NoInbox("inbox".into()))
        );
        assert_eq!(
            confirmed(BrokerAnswer::TimedOut, "inbox", T),
            Settle::Release(Transient::ConfirmTimedOut(T))
        );
        assert_eq!(
            confirmed(BrokerAnswer::Failed("ACCESS_REFUSED".into()), "inbox", T),
            Settle::Release(Transient::PublishFailed("ACCESS_REFUSED".into()))
        );
        assert_eq!(
            confirmed(BrokerAnswer::NotRequested, "inbox", T),
            Settle::Release(Transient::NotConfirmed)
        );
    }

    #[test]
    fn refusals_back_off() {
        assert!(Transient::Nacked("i".into()).backs_off());
        assert!(Transient::BrokerUnavailable.backs_off());
        assert!(!Transient::NotConfirmed.backs_off());
    }
    #[test]
    fn refusals_pause_the_link_longer_and_an_accept_resumes_it() {
        let t0 = Instant::now();
        let mut p = Pause::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(p.until(t0), None);
        let nack = Settle::Release(Transient::Nacked("inbox".into()));
        assert!(matches!(p.observe(&nack, t0), Some(PauseEvent::Paused(_))));
        let first = p.until(t0).expect("paused");
        assert!(first > t0);
        assert_eq!(p.observe(&nack, t0), None, "one event per episode");
        assert_eq!(p.observe(&nack, t0), None);
        let third = p.until(t0).expect("paused");
        assert!(
            third - t0 >= Duration::from_millis(200),
            "grows: {:?}",
            third - t0
        );
        assert!(third - t0 <= Duration::from_secs(5), "capped");
        assert_eq!(p.until(third + Duration::from_millis(1)), None, "over");
        assert_eq!(p.observe(&Settle::Accept, t0), Some(PauseEvent::Resumed));
        assert_eq!(p.until(t0), None);
        assert_eq!(p.observe(&Settle::Accept, t0), None);
        assert_eq!(
            p.observe(&Settle::Reject("invalid".into()), t0),
            None,
            "a permanent refusal is about the message, not the broker"
        );
    }
}
