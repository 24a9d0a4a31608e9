//! Names of the message headers Drawbridge reads and writes (the message contract of
//! DESIGN.md), and which names a peer may not set ([`reserved`]).

/// Legal name of the node a message is for; the float routes by it.
pub const DESTINATION: &str = "drawbridge-destination";
/// Legal name of the sender, set by the float from the client certificate (never trusted
/// from the sender).
pub const SENDER: &str = "drawbridge-sender";
/// Optional topic, carried through unchanged.
pub const TOPIC: &str = "drawbridge-topic";
/// Why a message was dead-lettered.
pub const REASON: &str = "drawbridge-reason";
/// Queue a dead-lettered message came from.
pub const ORIGIN_QUEUE: &str = "drawbridge-origin-queue";
/// Type of a non-string AMQP 1.0 message id (`ulong`, `uuid` or `binary`), set by the float
/// next to the id's string rendering in `message_id`, so that it is not mistaken for a
/// string id with the same text.
pub const MESSAGE_ID_TYPE: &str = "drawbridge-message-id-type";
/// As [`MESSAGE_ID_TYPE`], for the correlation id.
pub const CORRELATION_ID_TYPE: &str = "drawbridge-correlation-id-type";
/// The sender's 0.9.1 `user-id`, set by the float. It cannot stay in `user_id`: the
/// receiving broker checks `user_id` against the float's own login and refuses others.
pub const ORIGINAL_USER_ID: &str = "drawbridge-original-user-id";

/// Headers a sending node sets for the receiving node; a float passes them on.
pub const SET_BY_SENDER: [&str; 2] = [DESTINATION, TOPIC];

/// Headers RabbitMQ acts on when a message is published, beyond the `x-*` ones: `CC` and
/// `BCC` are sender-selected distribution (each listed routing key is routed to as well, on
/// the same exchange; `BCC` is removed before delivery).
pub const BROKER_ACTS_ON: [&str; 2] = ["CC", "BCC"];

/// Whether a float strips header `key` from what a peer sent: every `drawbridge-*` name but
/// the two a sender sets ([`SET_BY_SENDER`], written exactly so), every `x-*` name, and
/// every header the broker acts on ([`BROKER_ACTS_ON`]), in any letter case. The meaning of
/// the first two is asserted by the receiving side (the float's stamped sender, the bridge's
/// dead-letter reason, the broker's `x-death`), so a peer that sets them would make its
/// message look authenticated differently or dead-lettered by the receiver. `CC` and `BCC`
/// would let a peer route its message into any queue bound to the inbox exchange (with
/// `inbox_exchange = ""`, any queue of the vhost, peer queues included, and from there to a
/// third organisation under this one's name).
pub fn reserved(key: &str) -> bool {
    let prefixed = |p: &str| {
        key.get(..p.len())
            .is_some_and(|k| k.eq_ignore_ascii_case(p))
    };
    (prefixed("drawbridge-") && !SET_BY_SENDER.contains(&key))
        || prefixed("x-")
        || BROKER_ACTS_ON.iter().any(|h| key.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_of_a_reserved_prefix_is_reserved() {
        for key in [
            SENDER,
            "Drawbridge-Sender",
            "DRAWBRIDGE-SENDER",
            REASON,
            ORIGIN_QUEUE,
            MESSAGE_ID_TYPE,
            ORIGINAL_USER_ID,
            "drawbridge-anything-new",
            "Drawbridge-Destination",
            "x-death",
            "X-Death",
            "x-first-death-reason",
            "x-",
            "CC",
            "cc",
            "Bcc",
            "BCC",
        ] {
            assert!(reserved(key), "{key}");
        }
        for key in [
            DESTINATION,
            TOPIC,
            "trade-id",
            "drawbridge",
            "xdeath",
            "CCC",
            "BC",
            "cc-list",
            "",
            "é-x-",
        ] {
            assert!(!reserved(key), "{key}");
        }
    }
}
