//! The settlement rules of a link, apart from any I/O (so they are unit-tested without a
//! broker or a peer): how a peer's outcome maps to what happens to the broker delivery,
//! and when the in-order `multiple=true` acks are sent.

use std::time::Duration;

use drawbridge_amqp::performatives::Outcome;
use drawbridge_runtime::text;

/// Longest part of a peer's rejection description kept in the dead-letter reason
/// (`drawbridge-reason`), in bytes: the peer writes it, and it is copied into a header of
/// every message it rejects and into the bridge's log.
pub const MAX_PEER_REASON: usize = 1024;

/// What a settled in-flight transfer means for its broker delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The peer accepted: ack.
    Accepted,
    /// It can never be delivered: dead-letter with this reason, then ack.
    DeadLetter(String),
    /// Transient failure: do not ack it or anything after it; recycle the link.
    Retry(String),
}

/// Map the peer's outcome to a [`Settled`]: `None` when no disposition came within
/// `timeout`, `Some(None)` when the peer settled without an outcome (taken as released).
pub fn classify(outcome: Option<Option<Outcome>>, timeout: Duration) -> Settled {
    match outcome {
        Some(Some(Outcome::Accepted)) => Settled::Accepted,
        Some(Some(Outcome::Rejected(error))) => {
            let why = error
                .and_then(|e| e.description)
                .unwrap_or_else(|| "no reason given".into());
            let kept = text::truncate(&why, MAX_PEER_REASON);
            let cut = if kept.len() < why.len() { "…" } else { "" };
            Settled::DeadLetter(format!("rejected by peer: {kept}{cut}"))
        }
        Some(Some(Outcome::Released)) => Settled::Retry("peer released a transfer".into()),
        Some(None) => Settled::Retry("peer settled a transfer without an outcome".into()),
        Some(Some(Outcome::Modified { .. })) => Settled::Retry("peer modified a transfer".into()),
        Some(Some(Outcome::Received)) => {
            Settled::Retry("peer settled a transfer as `received`".into())
        }
        None => Settled::Retry(format!("peer did not settle within {timeout:?}")),
    }
}

/// What the link does after an outcome was fed to [`AckBatch::outcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Recorded for the next ack; send the ack now if `flush_now`.
    Ack {
        /// The batch is full or nothing else is in flight.
        flush_now: bool,
    },
    /// Dead-letter with this reason, then call [`AckBatch::settled`].
    DeadLetter(String),
    /// Ack the settled prefix and recycle the link for this reason.
    Recycle(String),
}

/// The pending `multiple=true` ack of a link session.
///
/// Deliveries are settled strictly in queue order, so "everything up to tag N is done" is
/// one number; acking it with `multiple=true` every `batch` deliveries (or when nothing else
/// is in flight) replaces one ack per message.
#[derive(Debug)]
pub struct AckBatch {
    /// Highest settled delivery tag not yet acked.
    upto: Option<u64>,
    /// Deliveries settled since the last ack.
    count: u32,
    /// Ack at least every this many deliveries.
    batch: u32,
}

impl AckBatch {
    /// Ack at least every `batch` deliveries.
    pub fn new(batch: u32) -> Self {
        AckBatch {
            upto: None,
            count: 0,
            batch: batch.max(1),
        }
    }

    /// Delivery `tag` (the next in queue order) is done. Returns true when the ack should
    /// be sent now: the batch is full or nothing else is in flight.
    pub fn settled(&mut self, tag: u64, nothing_else_in_flight: bool) -> bool {
        debug_assert!(self.upto.is_none_or(|t| tag > t), "settled out of order");
        self.upto = Some(tag);
        self.count += 1;
        self.count >= self.batch || nothing_else_in_flight
    }

    /// Feed the outcome of delivery `tag` (the next in queue order): an acceptance is
    /// recorded; a dead-letter is recorded by the caller once the copy is confirmed
    /// ([`AckBatch::settled`]); a retry records nothing, so neither it nor anything after
    /// it is ever acked.
    pub fn outcome(&mut self, tag: u64, settled: &Settled, nothing_else_in_flight: bool) -> Step {
        match settled {
            Settled::Accepted => Step::Ack {
                flush_now: self.settled(tag, nothing_else_in_flight),
            },
            Settled::DeadLetter(reason) => Step::DeadLetter(reason.clone()),
            Settled::Retry(reason) => Step::Recycle(reason.clone()),
        }
    }

    /// Whether an ack is pending.
    pub fn is_pending(&self) -> bool {
        self.upto.is_some()
    }

    /// The tag to ack with `multiple=true`, if any; resets the batch.
    pub fn take(&mut self) -> Option<u64> {
        self.count = 0;
        self.upto.take()
    }
}

/// Watches the head of a peer queue across link sessions: when sessions keep starting with
/// a redelivered message and ending without anything acked, the link is reported once, so an operator sees a stuck link before a quorum queue's delivery limit
/// dead-letters it.
#[derive(Debug)]
pub struct HeadWatch {
    /// Message id of the latest head that came back, if any.
    id: Option<String>,
    /// Sessions in a row that started with a redelivered message and acked nothing.
    returns: u32,
    /// Report once `returns` reaches this.
    threshold: u32,
    /// Whether the current episode was reported.
    reported: bool,
}

/// A change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadEvent {
    /// The head message came back `returns` times without progress.
    Stuck {
        /// Its message id.
        id: String,
        /// Sessions in a row.
        returns: u32,
    },
    /// A stuck head moved on.
    Cleared {
        /// Its message id.
        id: String,
    },
}

impl HeadWatch {
    /// Report after `threshold` returns in a row.
    pub fn new(threshold: u32) -> Self {
        HeadWatch {
            id: None,
            returns: 0,
            threshold: threshold.max(1),
            reported: false,
        }
    }

    /// Times in a row the current head came back.
    pub fn returns(&self) -> u32 {
        self.returns
    }

    /// The head that keeps coming back, once reported.
    pub fn stuck_id(&self) -> Option<&str> {
        self.id.as_deref().filter(|_| self.reported)
    }

    /// A session ended. `first_redelivered` is the message id of its first delivery if the
    /// broker marked it redelivered; `progressed` whether the peer accepted anything.
    pub fn session_ended(
        &mut self,
        first_redelivered: Option<&str>,
        progressed: bool,
    ) -> Option<HeadEvent> {
        if progressed {
            let cleared = self.reported.then(|| HeadEvent::Cleared {
                id: self.id.clone().unwrap_or_default(),
            });
            *self = HeadWatch::new(self.threshold);
            return cleared;
        }
        // Counted whatever the id: a quorum queue redelivers returned messages in the order
        // they were returned, so the head seen by each session can differ while the link
        // is just as stuck.
        let first = first_redelivered?;
        self.id = Some(first.to_string());
        self.returns += 1;
        if self.returns >= self.threshold && !self.reported {
            self.reported = true;
            return Some(HeadEvent::Stuck {
                id: first.to_string(),
                returns: self.returns,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use drawbridge_amqp::performatives::Error;

    use super::*;

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn outcomes_map_to_ack_dead_letter_or_retry() {
        assert_eq!(
            classify(Some(Some(Outcome::Accepted)), T),
            Settled::Accepted
        );
        let rejected = Some(Error::new(
            "amqp:precondition-failed",
            "destination `X` is not served",
        ));
        assert_eq!(
            classify(Some(Some(Outcome::Rejected(rejected))), T),
            Settled::DeadLetter("rejected by peer: destination `X` is not served".into())
        );
        assert_eq!(
            classify(Some(Some(Outcome::Rejected(None))), T),
            Settled::DeadLetter("rejected by peer: no reason given".into())
        );
        assert!(matches!(
            classify(Some(Some(Outcome::Released)), T),
            Settled::Retry(_)
        ));
        let modified = Outcome::Modified {
            delivery_failed: true,
            undeliverable_here: false,
        };
        assert!(matches!(
            classify(Some(Some(modified)), T),
            Settled::Retry(_)
        ));
        assert!(matches!(classify(Some(None), T), Settled::Retry(_)));
        assert_eq!(
            classify(None, T),
            Settled::Retry("peer did not settle within 30s".into())
        );
    }

    #[test]
    fn acks_are_batched_in_order_and_flushed_when_idle() {
        let mut a = AckBatch::new(3);
        assert!(!a.is_pending());
        assert!(!a.settled(1, false));
        assert!(!a.settled(2, false));
        assert!(a.settled(3, false), "batch full");
        assert_eq!(a.take(), Some(3));
        assert_eq!(a.take(), None, "taken once");
        assert!(a.settled(4, true), "nothing else in flight: ack now");
        assert_eq!(a.take(), Some(4));
    }

    #[test]
    fn a_retry_acks_only_the_settled_prefix() {
        // 5 and 6 accepted, 7 released, 8 accepted after it: the link acks up to 6 only.
        let mut a = AckBatch::new(64);
        let accepted = Settled::Accepted;
        let released = classify(Some(Some(Outcome::Released)), T);
        assert_eq!(
            a.outcome(5, &accepted, false),
            Step::Ack { flush_now: false }
        );
        assert_eq!(
            a.outcome(6, &accepted, false),
            Step::Ack { flush_now: false }
        );
        assert!(matches!(a.outcome(7, &released, false), Step::Recycle(_)));
        assert_eq!(a.take(), Some(6), "the retried delivery is not acked");
        assert_eq!(a.take(), None);
    }

    /// Before: the whole description went into `drawbridge-reason` (and the log), however
    /// long the peer made it.
    #[test]
    fn a_peers_long_rejection_description_is_cut_on_a_character_boundary() {
        let rejected =
            |d: String| Outcome::Rejected(Some(Error::new("amqp:precondition-failed", d)));
        let Settled::DeadLetter(reason) = classify(Some(Some(rejected("é".repeat(100_000)))), T)
        else {
            panic!()
        };
        let kept = reason
            .strip_prefix("rejected by peer: ")
            .and_then(|r| r.strip_suffix('…'))
            .unwrap();
        assert_eq!(kept, "é".repeat(MAX_PEER_REASON / 2));
        let short = "x".repeat(MAX_PEER_REASON);
        assert_eq!(
            classify(Some(Some(rejected(short.clone()))), T),
            Settled::DeadLetter(format!("rejected by peer: {short}"))
        );
    }

    #[test]
    fn a_dead_letter_is_acked_only_after_the_caller_settles_it() {
        let mut a = AckBatch::new(64);
        let dl = Settled::DeadLetter("rejected by peer: x".into());
        assert_eq!(
            a.outcome(1, &dl, true),
            Step::DeadLetter("rejected by peer: x".into())
        );
        assert!(!a.is_pending(), "not acked before the copy is confirmed");
        assert!(a.settled(1, true));
        assert_eq!(a.take(), Some(1));
    }

    #[test]
    fn a_head_that_keeps_coming_back_is_reported_once_and_cleared_by_progress() {
        let mut h = HeadWatch::new(3);
        assert_eq!(h.session_ended(Some("m1"), false), None);
        assert_eq!(h.session_ended(Some("m1"), false), None);
        assert_eq!(
            h.session_ended(Some("m1"), false),
            Some(HeadEvent::Stuck {
                id: "m1".into(),
                returns: 3
            })
        );
        assert_eq!(h.stuck_id(), Some("m1"));
        assert_eq!(h.session_ended(Some("m1"), false), None, "reported once");
        assert_eq!(h.returns(), 4);
        assert_eq!(
            h.session_ended(Some("m1"), true),
            Some(HeadEvent::Cleared { id: "m1".into() })
        );
        assert_eq!(h.returns(), 0);
        assert_eq!(h.stuck_id(), None);
    }

    #[test]
    fn a_different_head_or_an_empty_session_keeps_the_count() {
        let mut h = HeadWatch::new(3);
        h.session_ended(Some("m1"), false);
        assert_eq!(
            h.session_ended(Some("m2"), false),
            None,
            "a quorum queue may redeliver returns in another order"
        );
        assert_eq!(h.returns(), 2);
        h.session_ended(Some("m3"), true);
        assert_eq!(h.returns(), 0);
        h.session_ended(Some("m1"), false);
        assert_eq!(h.returns(), 1);
        assert_eq!(h.session_ended(None, false), None, "no delivery: no change");
        assert_eq!(h.returns(), 1);
        assert_eq!(h.session_ended(None, true), None, "progress without report");
        assert_eq!(h.returns(), 0);
    }
}
