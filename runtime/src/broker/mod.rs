//! The supervised RabbitMQ session both daemons use.
//!
//! lapin's own recovery is not used: it was measured to hang with confirms in flight when the
//! broker restarts (see `docs/architecture.md`). Instead one supervisor task per daemon owns the
//! connection: it walks the URI list with backoff + jitter, runs the daemon's topology setup,
//! publishes the live connection through a `watch`, and tears it down when lapin reports an
//! error, the connection stops being connected, or any user reports it broken (for example
//! after a confirm timed out). Users never reuse anything from a dead connection: each
//! [`Live`] has a generation and a `lost` token, and deliveries of a lost connection are
//! simply never acked (the broker requeues them).
//!
//! Three parts: [`config`] (the `[broker]` table, read and checked), [`connect`] (one
//! connection to the first URI that answers) and [`session`] (the supervisor and the [`Live`]
//! connection it publishes).

mod config;
mod connect;
mod session;

pub use config::{
    read_password_file, BrokerAuth, BrokerConfig, Secret, CONSUMER_FRAME_MAX, DEFAULT_FRAME_MAX,
};
pub use connect::{connect_any, redact};
pub use drawbridge_node::BrokerTls;
pub use session::{BrokerSession, Live, Setup, SetupFuture};
