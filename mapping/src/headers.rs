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

/// Set (with the publishing float's instance and round, `<instance>:<round>`) on the
/// window markers a float publishes into a *stream* inbox: an empty message that tells the
/// float reading the stream back that it has read everything stored before it (see
/// `docs/guarantees.md`, "Exactly once into a stream inbox"). It carries no sender and is no
/// peer's message: a node reading a stream inbox skips it. A peer cannot forge one: the name
/// is reserved ([`reserved`]), so the float strips it from what peers send.
pub const WINDOW_MARKER: &str = "drawbridge-window-marker";

/// Headers a sending node sets for the receiving node; a float passes them on.
pub const SET_BY_SENDER: [&str; 2] = [DESTINATION, TOPIC];

/// Headers RabbitMQ routes by without an `x-` prefix: sender-selected distribution adds
/// the values of `CC` and `BCC` as routing keys on the exchange of the publish
/// (<https://www.rabbitmq.com/docs/sender-selected>). Every other header the broker acts on
/// or writes (`x-death`, `x-first-death-*`, `x-delivery-count`, `x-received-from`,
/// `x-stream-filter-value`, `x-delay`, ...) starts `x-`.
pub const BROKER_ROUTING: [&str; 2] = ["CC", "BCC"];

/// Whether a float strips header `key` from what a peer sent: every `drawbridge-*` name but
/// the two a sender sets ([`SET_BY_SENDER`], written exactly so), every `x-*` name, and the
/// broker's routing headers [`BROKER_ROUTING`], in any letter case. The meaning of the first
/// two is asserted by the receiving side (the float's stamped sender, the bridge's
/// dead-letter reason, the broker's `x-death`), so a peer that sets them would make its
/// message look authenticated differently or dead-lettered by the receiver. `CC`/`BCC` would
/// let the peer, not the float, choose where its message goes: with the default exchange as
/// the inbox exchange, into any queue of the vhost (another peer's queue included, which the
/// bridge would forward to a third organisation under this one's name).
pub fn reserved(key: &str) -> bool {
    let prefixed = |p: &str| {
        key.get(..p.len())
            .is_some_and(|k| k.eq_ignore_ascii_case(p))
    };
    (prefixed("drawbridge-") && !SET_BY_SENDER.contains(&key))
        || prefixed("x-")
        || BROKER_ROUTING.iter().any(|r| key.eq_ignore_ascii_case(r))
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
            "BCC",
            "cc",
            "Bcc",
        ] {
            assert!(reserved(key), "{key}");
        }
        for key in [
            DESTINATION,
            TOPIC,
            "trade-id",
            "drawbridge",
            "xdeath",
            "",
            "é-x-",
            "ccc",
            "bcc-list",
            "C",
        ] {
            assert!(!reserved(key), "{key}");
        }
    }
}
