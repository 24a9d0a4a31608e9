//! Names of the message headers Drawbridge reads and writes (the message contract of
//! DESIGN.md). Headers starting with `drawbridge-` other than these are reserved.

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
