//! Configuration loading that reports *every* bad key at once.
//!
//! A daemon's config is one TOML file plus `DRAWBRIDGE_...` environment overrides
//! (`DRAWBRIDGE_BROKER__URIS=a,b` sets `broker.uris`). Instead of failing on the first
//! serde error, callers read each key through a [`ConfigReader`], which collects type
//! errors, validation errors and unknown keys, so an operator fixes the whole file in one go.

use std::{collections::BTreeSet, fmt, path::Path, time::Duration};

use config::{Config, Environment, File, FileFormat, Value, ValueKind};
use serde::de::DeserializeOwned;

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads typed keys out of a merged file + environment configuration, collecting errors.
#[derive(Debug)]
pub struct ConfigReader {
    /// The merged configuration.
    cfg: Config,
    /// Problems found so far.
    errors: Vec<String>,
    /// Keys the daemon asked for; anything else present is reported as unknown.
    known: BTreeSet<String>,
}

impl ConfigReader {
    /// Load `file` (if any) and the environment variables starting with `{env_prefix}_`.
    /// `list_keys` are keys whose environment value is a comma-separated list.
    pub fn load(
        file: Option<&Path>,
        env_prefix: &str,
        list_keys: &[&str],
    ) -> Result<Self, ConfigErrors> {
        Self::load_with_env(file, env_prefix, list_keys, std::env::vars())
    }

    /// [`ConfigReader::load`] with the environment given as `vars` (tests pass a map).
    ///
    /// Only `{env_prefix}_{SECTION}__{KEY}` variables are configuration: every key has a
    /// section, so the separator is always there. Other variables with the prefix belong to
    /// the command line (`DRAWBRIDGE_BRIDGE_CONFIG`, the path of this very file, or the
    /// CLI's `DRAWBRIDGE_ADMIN`) and are left alone instead of being reported as unknown keys.
    pub fn load_with_env(
        file: Option<&Path>,
        env_prefix: &str,
        list_keys: &[&str],
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let mut builder = Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigErrors(vec![format!(
                    "config file {} does not exist",
                    path.display()
                )]));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let prefix = format!("{env_prefix}_");
        let vars: config::Map<String, String> = vars
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        let mut env = Environment::with_prefix(env_prefix)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(vars));
        // With a list separator but no list keys, `config` would split *every* value.
        if !list_keys.is_empty() {
            env = env.list_separator(",");
            for key in list_keys {
                env = env.with_list_parse_key(key);
            }
        }
        builder = builder.add_source(env);
        let cfg = builder
            .build()
            .map_err(|e| ConfigErrors(vec![format!("cannot read configuration: {e}")]))?;
        Ok(Self::from_config(cfg))
    }

    /// Build from a TOML string only (tests, examples).
    pub fn from_toml(toml: &str) -> Result<Self, ConfigErrors> {
        let cfg = Config::builder()
            .add_source(File::from_str(toml, FileFormat::Toml))
            .build()
            .map_err(|e| ConfigErrors(vec![format!("cannot parse configuration: {e}")]))?;
        Ok(Self::from_config(cfg))
    }

    fn from_config(cfg: Config) -> Self {
        ConfigReader {
            cfg,
            errors: Vec::new(),
            known: BTreeSet::new(),
        }
    }

    /// Whether `key` (a key or a table) is present, without counting it as known: what is
    /// under it is still reported if no one reads it.
    pub fn is_present(&self, key: &str) -> bool {
        self.cfg.get::<Value>(key).is_ok()
    }

    /// The keys of the table at `key` (empty when absent or not a table), without counting
    /// anything as known: the caller reads what is under each.
    pub fn table_keys(&self, key: &str) -> Vec<String> {
        self.cfg
            .get::<config::Map<String, Value>>(key)
            .map(|m| m.into_keys().collect())
            .unwrap_or_default()
    }

    /// Whether `key` is set (file or environment).
    pub fn is_set(&mut self, key: &str) -> bool {
        self.known.insert(key.to_string());
        self.cfg.get::<Value>(key).is_ok()
    }

    /// The value of `key`, or `default` when absent; a value of the wrong type is recorded
    /// as an error (and `default` returned so reading can go on).
    pub fn get<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        self.optional(key).unwrap_or(default)
    }

    /// The value of `key` if present and well-typed.
    pub fn optional<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.known.insert(key.to_string());
        match self.cfg.get::<T>(key) {
            Ok(v) => Some(v),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(e) => {
                self.errors
                    .push(format!("{key}: {}", strip_key(&e.to_string())));
                None
            }
        }
    }

    /// The value of a mandatory `key`; absence is recorded as an error.
    pub fn required<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let present = self.is_set(key);
        if !present {
            self.errors.push(format!("{key}: required but not set"));
            return None;
        }
        self.optional(key)
    }

    /// A duration written for humans, such as `"500ms"`, `"30s"`, `"2m"` or `"1h 30m"`
    /// (parsed by `humantime`; a unit is required).
    pub fn duration(&mut self, key: &str, default: Duration) -> Duration {
        self.known.insert(key.to_string());
        match self.cfg.get::<humantime_serde::Serde<Duration>>(key) {
            Ok(d) => d.into_inner(),
            Err(config::ConfigError::NotFound(_)) => default,
            Err(e) => {
                self.errors.push(format!(
                    "{key}: {} (write a duration such as 500ms, 30s or 2m)",
                    strip_key(&e.to_string())
                ));
                default
            }
        }
    }

    /// Record a validation problem with `key`.
    pub fn invalid(&mut self, key: &str, reason: impl fmt::Display) {
        self.errors.push(format!("{key}: {reason}"));
    }

    /// Check `ok`, recording `reason` against `key` when false.
    pub fn check(&mut self, key: &str, ok: bool, reason: impl fmt::Display) {
        if !ok {
            self.invalid(key, reason);
        }
    }

    /// Finish reading: report unknown keys and every error collected.
    pub fn finish(mut self) -> Result<(), ConfigErrors> {
        let mut leaves = Vec::new();
        if let Ok(table) = self
            .cfg
            .clone()
            .try_deserialize::<config::Map<String, Value>>()
        {
            for (k, v) in table {
                collect_leaves(&k, &v, &mut leaves);
            }
        }
        for leaf in leaves {
            let known = self
                .known
                .iter()
                .any(|k| leaf == *k || leaf.starts_with(&format!("{k}.")));
            if !known {
                self.errors.push(format!("{leaf}: unknown key"));
            }
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            self.errors.sort();
            self.errors.dedup();
            Err(ConfigErrors(self.errors))
        }
    }
}

fn collect_leaves(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match &v.kind {
        // An empty table (a section with everything commented out) holds no key.
        ValueKind::Table(t) => {
            for (k, v) in t {
                collect_leaves(&format!("{prefix}.{k}"), v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn strip_key(msg: &str) -> String {
    // config's messages end with `for key "x"`; we already say which key.
    match msg.find(" for key") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Check that `example` (a commented example config) builds with `build` as written and
/// with every documented key enabled; panics with the problems otherwise. For tests.
pub fn assert_example_valid<T>(
    example: &str,
    build: impl Fn(ConfigReader) -> Result<T, ConfigErrors>,
) {
    for text in [example.to_string(), uncomment_example(example)] {
        let r = ConfigReader::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        if let Err(e) = build(r) {
            panic!("{e}\n---\n{text}");
        }
    }
}

/// An example config with every commented-out `# key = value` line (and
/// commented multi-line arrays) enabled, so tests can check that every documented key is
/// a real key.
pub fn uncomment_example(text: &str) -> String {
    let mut out = String::new();
    let mut in_array = false;
    for line in text.lines() {
        let t = line.trim_start();
        let rest = t.strip_prefix("# ").unwrap_or("");
        let is_key = rest
            .split_once(" = ")
            .map(|(k, _)| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            })
            .unwrap_or(false);
        if is_key || (in_array && t.starts_with('#')) {
            let value = if in_array {
                t.trim_start_matches('#')
            } else {
                rest
            };
            // Drop trailing comments after values.
            let value = match value.find("  #") {
                Some(i) => &value[..i],
                None => value,
            };
            if is_key && value.trim_end().ends_with('[') {
                in_array = true;
            } else if in_array && value.trim() == "]" {
                in_array = false;
            }
            out.push_str(value);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_section_key_variables_are_configuration() {
        let vars = [
            ("DRAWBRIDGE_BRIDGE_CONFIG", "/etc/drawbridge/bridge.toml"),
            ("DRAWBRIDGE_ADMIN", "127.0.0.1:9101"),
            ("DRAWBRIDGE_BRIDGE__WINDOW", "5"),
            ("DRAWBRIDGE_BROKER__URIS", "amqp://a/%2f,amqp://b/%2f"),
            ("OTHER__THING", "x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let mut r =
            ConfigReader::load_with_env(None, "DRAWBRIDGE", &["broker.uris"], vars).expect("loads");
        assert_eq!(r.get::<u32>("bridge.window", 0), 5);
        assert_eq!(
            r.get::<Vec<String>>("broker.uris", vec![]),
            vec!["amqp://a/%2f".to_string(), "amqp://b/%2f".to_string()]
        );
        assert_eq!(
            r.finish(),
            Ok(()),
            "no unknown key from command-line variables"
        );
    }

    #[test]
    fn every_bad_key_is_reported() {
        let mut r = ConfigReader::from_toml(
            "[broker]\nuris = 5\n[link]\nwindow = \"many\"\ntimeout = \"3 parsecs\"\ntypo_key = 1\n",
        )
        .unwrap();
        let _: Vec<String> = r.get("broker.uris", vec![]);
        let _: u32 = r.get("link.window", 10);
        let _ = r.duration("link.timeout", Duration::from_secs(1));
        let _: Option<String> = r.required("float.listen");
        let errs = r.finish().unwrap_err().0;
        assert_eq!(errs.len(), 5, "{errs:#?}");
        for key in [
            "broker.uris",
            "link.window",
            "link.timeout",
            "link.typo_key",
            "float.listen",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(key)),
                "{key} missing in {errs:#?}"
            );
        }
    }

    #[test]
    fn durations() {
        let mut r = ConfigReader::from_toml(
            "[t]\na = \"250ms\"\nb = \"5s\"\nc = \"2m\"\nd = \"1h 30m\"\n\
             e = \"abc\"\nf = \"5 parsecs\"\ng = 7\n",
        )
        .unwrap();
        let d = Duration::from_secs(99);
        assert_eq!(r.duration("t.a", d), Duration::from_millis(250));
        assert_eq!(r.duration("t.b", d), Duration::from_secs(5));
        assert_eq!(r.duration("t.c", d), Duration::from_secs(120));
        assert_eq!(r.duration("t.d", d), Duration::from_secs(5400));
        assert_eq!(r.duration("t.missing", d), d);
        // Bad values fall back to the default so reading goes on, and are all reported.
        assert_eq!(r.duration("t.e", d), d);
        assert_eq!(r.duration("t.f", d), d);
        assert_eq!(r.duration("t.g", d), d);
        let errs = r.finish().unwrap_err().0;
        assert_eq!(errs.len(), 3, "{errs:#?}");
        for key in ["t.e", "t.f", "t.g"] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
    }

    #[test]
    fn durations_from_the_environment() {
        let vars = [("DRAWBRIDGE_BRIDGE__DRAIN_GRACE", "500ms")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let mut r = ConfigReader::load_with_env(None, "DRAWBRIDGE", &[], vars).unwrap();
        assert_eq!(
            r.duration("bridge.drain_grace", Duration::ZERO),
            Duration::from_millis(500)
        );
        assert_eq!(r.finish(), Ok(()));
    }
}
