//! `drawbridge-float` binary: config → start → wait for SIGTERM → drain.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use drawbridge_float::FloatConfig;
use drawbridge_runtime::{admin, config::ConfigReader, logging, shutdown, EXIT_CONFIG};

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
    let cfg = ConfigReader::load(
        args.config.as_deref(),
        "DRAWBRIDGE",
        &["broker.uris", "float.crls"],
    )
    .and_then(FloatConfig::from_reader);
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drawbridge-float: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    logging::init(cfg.log_format, "info");
    let shutdown = shutdown::on_signal();
    let running = match drawbridge_float::start(cfg, admin::install_metrics(), shutdown).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "float failed to start");
            std::process::exit(1);
        }
    };
    let _ = running.done.await;
}
