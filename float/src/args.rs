//! The float's command line. It lives in the library (not in `main.rs`) so that the CLI's
//! `drawbridge man` and `drawbridge completions` generate this binary's man page and shell
//! completions from the same definition the binary parses.

use std::path::PathBuf;

/// The Drawbridge float: receives peers' AMQP 1.0 transfers over mTLS and publishes them
/// into the broker, accepting only after the broker confirmed.
#[derive(Debug, clap::Parser)]
#[command(name = "drawbridge-float", version)]
#[command(
    after_help = "Exit status: 0 after a clean drain (SIGTERM), 78 (EX_CONFIG) on invalid \
configuration (every bad key is logged), 1 when it cannot start.\n\
Documentation: /usr/share/doc/drawbridge-float/docs/ (operations.md, configuration.md, runbooks.md)."
)]
pub struct Args {
    /// Configuration file (TOML). Every key can also be set as DRAWBRIDGE_SECTION__KEY.
    #[arg(short, long, env = "DRAWBRIDGE_FLOAT_CONFIG", value_hint = clap::ValueHint::FilePath)]
    pub config: Option<PathBuf>,
}
