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
