//! `drawbridge-float` binary: config → start → wait for SIGTERM → drain.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use drawbridge_float::FloatConfig;
use drawbridge_runtime::{admin, daemon, logging, sd_notify::Service, shutdown};

/// The Drawbridge float: receives peers' AMQP 1.0 transfers over mTLS and publishes them
/// into the broker, accepting only after the broker confirmed.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML). Every key can also be set as DRAWBRIDGE_SECTION__KEY.
    #[arg(short, long, env = "DRAWBRIDGE_FLOAT_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    drawbridge_certs::install_crypto_provider();
    let cfg = daemon::load_config_or_exit(
        "drawbridge-float",
        args.config.as_deref(),
        &["broker.uris", "float.crls", "float.crl_urls"],
        FloatConfig::from_reader,
    );
    logging::init(cfg.log_format, "info");
    let shutdown = shutdown::on_signal();
    // systemd (Type=notify): readiness, status, watchdog; a no-op elsewhere.
    let service = Service::from_env();
    match drawbridge_float::start_with_service(cfg, admin::install_metrics(), shutdown, service)
        .await
    {
        Ok(running) => {
            let _ = running.done.await;
        }
        Err(e) => daemon::exit_start_failure("float", &e),
    }
}
