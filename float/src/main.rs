//! `drawbridge-float` binary: config → start → wait for SIGTERM → drain.
#![forbid(unsafe_code)]

use clap::Parser;
use drawbridge_float::{Args, FloatConfig};
use drawbridge_runtime::{admin, daemon, logging, metrics_catalog, shutdown, watchdog::Service};

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
    logging::init(cfg.log_format, &cfg.log_level);
    let shutdown = shutdown::on_signal();
    // systemd (Type=notify): readiness, status, watchdog; a no-op elsewhere.
    let service = Service::from_env();
    match drawbridge_float::start_with_service(
        cfg,
        admin::install_metrics_for(metrics_catalog::Daemon::Float),
        shutdown,
        service,
    )
    .await
    {
        Ok(running) => {
            let _ = running.done.await;
        }
        Err(e) => daemon::exit_start_failure("float", &e),
    }
}
