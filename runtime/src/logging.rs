//! Logging setup: human-readable or JSON lines, filtered by `RUST_LOG` or the config.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event, for log shippers.
    Json,
}

/// The level when neither `log.level` nor `RUST_LOG` says one.
pub const DEFAULT_LEVEL: &str = "info";

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Read `log.level`: a level (`info`), or a level and per-target levels as `RUST_LOG` takes
/// them (`info,lapin=warn`). Checked here rather than left to the filter parser, which takes
/// any bare word as a target name: `level = "verbose"` would silently log only a target
/// called `verbose`.
pub fn read_level(r: &mut crate::config::ConfigReader) -> String {
    let level: String = r.get("log.level", DEFAULT_LEVEL.to_string());
    if let Err(why) = check_level(&level) {
        r.invalid("log.level", why);
    }
    level
}

fn check_level(level: &str) -> Result<(), String> {
    let form = "write a level (trace, debug, info, warn, error, off), optionally with per-target levels: info,lapin=warn";
    if level.trim().is_empty() {
        return Err(format!("empty ({form})"));
    }
    for directive in level.split(',').map(str::trim) {
        let lvl = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&lvl.to_ascii_lowercase().as_str()) {
            return Err(format!("`{directive}` names no level ({form})"));
        }
    }
    EnvFilter::builder()
        .parse(level)
        .map(drop)
        .map_err(|e| format!("`{level}`: {e} ({form})"))
}

/// The filter that applies: `RUST_LOG` when set (non-empty), so an operator can turn on
/// debug logging for one run without editing the file; else `log.level`.
pub fn effective_filter<'a>(config_level: &'a str, rust_log: Option<&'a str>) -> &'a str {
    match rust_log {
        Some(env) if !env.trim().is_empty() => env,
        _ => config_level,
    }
}

/// lapin's log target for a message the broker returned (a mandatory publish no queue took).
const LAPIN_RETURNS: &str = "lapin::returned_messages";

/// `filter` with lapin's returned-message line turned off, unless it names that target itself.
///
/// lapin logs every returned message at WARN with the whole message in `Debug` form, body
/// included: a bank's payload in the log file, one line per message, as large as the message.
/// The float reports returns itself (once per episode, without the content), so the line is off
/// whatever level lapin is given; an operator who really wants it names the target.
pub fn quiet_returns(filter: &str) -> String {
    if filter.contains(LAPIN_RETURNS) {
        filter.to_string()
    } else {
        format!("{filter},{LAPIN_RETURNS}=off")
    }
}

/// Install the global subscriber, filtered by `RUST_LOG` if set, else by `config_level`
/// (`log.level`; see [`effective_filter`]). An unparsable `RUST_LOG` falls back to
/// `config_level`. Either way lapin's returned-message line is off ([`quiet_returns`]).
pub fn init(format: LogFormat, config_level: &str) {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let wanted = effective_filter(config_level, rust_log.as_deref());
    let filter = EnvFilter::try_new(quiet_returns(wanted))
        .unwrap_or_else(|_| EnvFilter::new(quiet_returns(config_level)));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigReader;

    fn level(toml: &str) -> Result<String, String> {
        let mut r = ConfigReader::from_toml(toml).unwrap();
        let level = read_level(&mut r);
        r.finish().map(|()| level).map_err(|e| e.to_string())
    }

    #[test]
    fn lapins_returned_message_line_is_off_unless_named() {
        assert_eq!(quiet_returns("info"), "info,lapin::returned_messages=off");
        assert_eq!(
            quiet_returns("debug,lapin=trace"),
            "debug,lapin=trace,lapin::returned_messages=off"
        );
        assert_eq!(
            quiet_returns("info,lapin::returned_messages=warn"),
            "info,lapin::returned_messages=warn"
        );
        for f in ["info", "warn,lapin=debug", "trace"] {
            EnvFilter::try_new(quiet_returns(f)).unwrap();
        }
    }

    #[test]
    fn log_level_takes_levels_and_per_target_levels() {
        assert_eq!(level("").unwrap(), "info");
        assert_eq!(level("[log]\nlevel = \"debug\"").unwrap(), "debug");
        assert_eq!(
            level("[log]\nlevel = \"info,lapin=warn\"").unwrap(),
            "info,lapin=warn"
        );
        for bad in ["verbose", "", "info,lapin=loud", "debug,"] {
            let err = level(&format!("[log]\nlevel = \"{bad}\"")).unwrap_err();
            assert!(err.contains("log.level"), "{bad}: {err}");
        }
    }

    #[test]
    fn rust_log_wins_over_the_configured_level_when_set() {
        assert_eq!(effective_filter("warn", Some("debug")), "debug");
        assert_eq!(effective_filter("warn", Some("")), "warn");
        assert_eq!(effective_filter("warn", None), "warn");
    }
}
