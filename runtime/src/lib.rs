//! Plumbing shared by the Drawbridge daemons: configuration loading, backoff, shutdown,
//! the supervised RabbitMQ session, the admin HTTP port and logging.
//!
//! One place per concern: if the bridge or the float needs a second copy of something
//! here, it belongs here instead.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod broker;
pub mod config;
pub mod daemon;
pub mod headers;
pub mod logging;
pub mod mapping;
pub mod shutdown;

/// Exit code for invalid configuration or command line (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Run `fut` with a deadline; on expiry return an error that names `what`.
///
/// A convenience for callers that want the expiry as a typed error. The daemons do not use
/// it today: they put their deadlines (`broker.op_timeout`, `settle_timeout`, the connect and
/// handshake timeouts) on each broker and network future with `tokio::time::timeout`
/// directly, so a peer or broker that stops answering becomes an error instead of a hang.
pub async fn timeout<T, E>(
    dur: std::time::Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, TimedError<E>> {
    match tokio::time::timeout(dur, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(TimedError::Failed(e)),
        Err(_) => Err(TimedError::TimedOut {
            what: what.to_string(),
            after: dur,
        }),
    }
}

/// Failure of a future run through [`timeout`].
#[derive(Debug, thiserror::Error)]
pub enum TimedError<E> {
    /// The future itself failed.
    #[error("{0}")]
    Failed(E),
    /// The deadline passed first.
    #[error("{what} timed out after {after:?}")]
    TimedOut {
        /// What was being waited for.
        what: String,
        /// The deadline that passed.
        after: std::time::Duration,
    },
}
