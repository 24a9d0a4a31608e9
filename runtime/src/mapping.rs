//! Names and limits of the AMQP 0.9.1 ↔ AMQP 1.0 message mapping.
//!
//! The bridge encodes a 0.9.1 delivery with these names and the float decodes with the same
//! ones, so they live in one place. The full table, with the exceptions and the reasons
//! for them, is in docs/architecture.md, section "Message mapping (AMQP 0.9.1 ↔ AMQP 1.0)".
//!
//! Message-annotation keys start `x-opt-`: AMQP 1.0 lets a receiver that does not know an
//! `x-opt-` annotation ignore it, so a foreign AMQP 1.0 consumer still reads the message.

/// Message annotation (string): the 0.9.1 `app-id`. AMQP 1.0 has no application-id field;
/// RabbitMQ maps it to `group-id`, which means message grouping in AMQP 1.0, so we don't.
pub const ANN_APP_ID: &str = "x-opt-app-id";
/// Message annotation (string): the 0.9.1 `cluster-id` (deprecated in 0.9.1, no AMQP 1.0
/// equivalent).
pub const ANN_CLUSTER_ID: &str = "x-opt-cluster-id";
/// Message annotation (ubyte): the 0.9.1 `priority`, present only when the 0.9.1 message
/// had one. `header.priority` carries it too, but AMQP 1.0 gives it a default (4), so
/// "no priority" and "priority 4" can only be told apart with this annotation.
pub const ANN_PRIORITY: &str = "x-opt-drawbridge-priority";
/// Message annotation (string): a 0.9.1 `expiration` that is not the canonical decimal
/// form of a `u32` (e.g. `"007"`, `"+5"`), which `header.ttl` cannot reproduce byte for byte.
pub const ANN_EXPIRATION: &str = "x-opt-drawbridge-expiration";
/// Message annotation (ulong, seconds): a 0.9.1 `timestamp` too large to express in
/// milliseconds as an AMQP 1.0 timestamp (an `i64`).
pub const ANN_TIMESTAMP: &str = "x-opt-drawbridge-timestamp";
/// Message annotation (map of string → value): the 0.9.1 headers that AMQP 1.0
/// application properties cannot hold (tables, arrays, decimals, long strings that are not
/// UTF-8, timestamps beyond the millisecond range), each encoded so that it decodes back to
/// exactly the same field value.
pub const ANN_HEADERS: &str = "x-opt-drawbridge-headers";

/// Descriptor of a 0.9.1 decimal: described list `[ubyte scale, uint value]`. AMQP 1.0's
/// decimal32/64/128 are IEEE 754 decimals, a different value space than 0.9.1's
/// (scale, u32) pair.
pub const DESC_DECIMAL: &str = "drawbridge:decimal";
/// Descriptor of a 0.9.1 long string that is not valid UTF-8: described binary. A plain
/// binary is a 0.9.1 byte array (`x`), a different type.
pub const DESC_LONGSTR: &str = "drawbridge:longstr";
/// Descriptor of a 0.9.1 timestamp (seconds) beyond the AMQP 1.0 millisecond range:
/// described ulong.
pub const DESC_TIMESTAMP: &str = "drawbridge:timestamp";

/// Deepest nesting of tables and arrays in one header value that is carried. A peer is
/// hostile: decoding recurses once per level, so the float refuses deeper values instead of
/// risking its stack, and the bridge dead-letters them rather than send what the float
/// would refuse.
pub const MAX_DEPTH: usize = 16;

/// Longest AMQP 0.9.1 short string (message id, content type, header key, ...), in bytes.
pub const MAX_SHORT_STRING: usize = 255;
