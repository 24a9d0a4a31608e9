//! `drawbridge-bridge` binary: config → start → wait for SIGTERM → drain.
#![forbid(unsafe_code)]

use clap::Parser;
use drawbridge_bridge::{Args, BridgeConfig};
use drawbridge_runtime::{admin, daemon, logging, metrics_catalog, shutdown, watchdog::Service};

#[tokio::main]
async fn main() {
    let args = Args::parse();
    drawbridge_certs::install_crypto_provider();
    let cfg = daemon::load_config_or_exit(
        "drawbridge-bridge",
        args.config.as_deref(),
        &["broker.uris", "bridge.crls", "bridge.crl_urls"],
        BridgeConfig::from_reader,
    );
    logging::init(cfg.log_format, &cfg.log_level);
    let shutdown = shutdown::on_signal();
    // systemd (Type=notify): readiness, status, watchdog; a no-op elsewhere.
    let service = Service::from_env();
    match drawbridge_bridge::start_with_service(
        cfg,
        admin::install_metrics_for(metrics_catalog::Daemon::Bridge),
        shutdown,
        service,
    )
    .await
    {
        Ok(running) => {
            let _ = running.done.await;
        }
        Err(e) => daemon::exit_start_failure("bridge", &e),
    }
}
