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
#[cfg(feature = "frame-guard")]
pub mod frame_guard;
pub mod logging;
pub mod lograte;
pub mod metrics_catalog;
pub mod proxy;
pub mod revocation;
pub mod sd_notify;
pub mod shutdown;
pub mod text;
pub mod tls_reload;
pub mod tunnel;
pub mod watchdog;

/// Exit code for invalid configuration (`EX_CONFIG` from sysexits.h, 78, which systemd also
/// names `CONFIG`): the units' `RestartPreventExitStatus=78` and `scripts/watchdog.sh` do not
/// restart a daemon that exits with it, since restarting cannot fix the file.
pub const EXIT_CONFIG: i32 = 78;
