//! What both daemon binaries do around their own logic: load the config (exit 78 with
//! every problem listed), set up logging, turn SIGTERM into a shutdown token, and report
//! start-up failures.

use std::path::Path;

use crate::{
    config::{ConfigErrors, ConfigReader},
    EXIT_CONFIG,
};

/// Why a daemon could not start (after its configuration was accepted).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Certificates, keys or trust roots could not be loaded.
    #[error("TLS setup: {0}")]
    Tls(#[from] drawbridge_certs::CertError),
    /// A listener (peer or admin port) could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Load the configuration from `file` and the `DRAWBRIDGE_...` environment and build it
/// with `build`; on any problem print them all, prefixed with `name`, and exit with
/// [`EXIT_CONFIG`] (78).
pub fn load_config_or_exit<T>(
    name: &str,
    file: Option<&Path>,
    list_keys: &[&str],
    build: impl FnOnce(ConfigReader) -> Result<T, ConfigErrors>,
) -> T {
    match ConfigReader::load(file, "DRAWBRIDGE", list_keys).and_then(build) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// Log a start-up failure and exit with 1.
pub fn exit_start_failure(name: &str, e: &StartError) -> ! {
    tracing::error!(error = %e, "{name} failed to start");
    std::process::exit(1);
}

/// Milliseconds since the Unix epoch (status timestamps, link status events).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
