//! Plumbing shared by the Drawbridge daemons: configuration loading, backoff, shutdown,
//! the supervised RabbitMQ session, the admin HTTP port, logging and systemd notification.
//!
//! One place per concern: if the bridge or the float needs a second copy of something
//! here, it belongs here instead.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod broker;
pub mod coalesce;
pub mod config;
pub mod daemon;
pub mod headers;
pub mod logging;
pub mod lograte;
pub mod mapping;
pub mod revocation;
pub mod sd_notify;
pub mod shutdown;
pub mod text;
pub mod tls_reload;

/// Exit code for invalid configuration or command line (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;
