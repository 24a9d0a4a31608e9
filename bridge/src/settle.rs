//! The settlement rules of a link, apart from any I/O (so they are unit-tested without a
//! broker or a peer): how a peer's outcome maps to what happens to the broker delivery,
//! and when the in-order `multiple=true` acks are sent.

use std::time::Duration;

use fe2o3_amqp::{link::SendError, types::messaging::Outcome};

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

/// Map the peer's outcome (`None`: no disposition within `timeout`) to a [`Settled`].
pub fn classify(outcome: Option<Result<Outcome, SendError>>, timeout: Duration) -> Settled {
    match outcome {
        Some(Ok(Outcome::Accepted(_))) => Settled::Accepted,
        Some(Ok(Outcome::Rejected(r))) => Settled::DeadLetter(format!(
            "rejected by peer: {}",
            r.error
                .and_then(|e| e.description)
                .unwrap_or_else(|| "no reason given".into())
        )),
        Some(Ok(Outcome::Released(_))) => Settled::Retry("peer released a transfer".into()),
        Some(Ok(Outcome::Modified(_))) => Settled::Retry("peer modified a transfer".into()),
        #[allow(unreachable_patterns)]
        Some(Ok(other)) => Settled::Retry(format!("unexpected outcome {other:?}")),
        Some(Err(e)) => Settled::Retry(format!("transfer failed: {e}")),
        None => Settled::Retry(format!("peer did not settle within {timeout:?}")),
    }
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

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::{
        definitions::{AmqpError, Error},
        messaging::{Accepted, Modified, Rejected, Released},
    };

    use super::*;

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn outcomes_map_to_ack_dead_letter_or_retry() {
        assert_eq!(
            classify(Some(Ok(Outcome::Accepted(Accepted {}))), T),
            Settled::Accepted
        );
        let rejected = Rejected {
            error: Some(Error::new(
                AmqpError::PreconditionFailed,
                "destination `X` is not served".to_string(),
                None,
            )),
        };
        assert_eq!(
            classify(Some(Ok(Outcome::Rejected(rejected))), T),
            Settled::DeadLetter("rejected by peer: destination `X` is not served".into())
        );
        assert_eq!(
            classify(Some(Ok(Outcome::Rejected(Rejected { error: None }))), T),
            Settled::DeadLetter("rejected by peer: no reason given".into())
        );
        assert!(matches!(
            classify(Some(Ok(Outcome::Released(Released {}))), T),
            Settled::Retry(_)
        ));
        let modified = Modified {
            delivery_failed: Some(true),
            undeliverable_here: None,
            message_annotations: None,
        };
        assert!(matches!(
            classify(Some(Ok(Outcome::Modified(modified))), T),
            Settled::Retry(_)
        ));
        assert!(matches!(
            classify(Some(Err(SendError::MessageEncodeError)), T),
            Settled::Retry(_)
        ));
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
        // 5 and 6 accepted, 7 released: the link acks up to 6 and nothing after.
        let mut a = AckBatch::new(64);
        a.settled(5, false);
        a.settled(6, false);
        let outcome = classify(Some(Ok(Outcome::Released(Released {}))), T);
        assert!(matches!(outcome, Settled::Retry(_)));
        assert_eq!(a.take(), Some(6));
    }
}
