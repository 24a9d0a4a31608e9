//! Checks of the repository itself, the things a newcomer meets before any daemon runs: the
//! declared Rust version holds for every locked dependency, and the toolchain file names a
//! channel rustup has without downloading a pinned version.
//!
//! Fast (no build, no broker): part of the default `cargo test`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `1.90` or `1.90.0` as (major, minor, patch).
fn version(v: &str) -> Result<(u64, u64, u64)> {
    let mut parts = v.split('.').map(str::parse::<u64>);
    let mut next = || parts.next().transpose().map(Option::unwrap_or_default);
    Ok((next()?, next()?, next()?))
}

/// The workspace's `rust-version` is what the locked dependencies need at least: a rustc
/// that old builds the tree (`cargo metadata` reads each package's own `rust-version`;
/// offline, for the platform the daemons run on).
#[test]
fn declared_rust_version_covers_every_locked_dependency() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo())
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .output()
        .context("running cargo metadata")?;
    ensure!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .context("workspace_members")?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let packages = meta["packages"].as_array().context("packages")?;
    let mut declared = None;
    for p in packages
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
    {
        let Some(v) = p["rust_version"].as_str() else {
            bail!(
                "{} declares no rust-version (set rust-version.workspace = true)",
                p["name"]
            );
        };
        declared = Some(version(v)?);
    }
    let declared = declared.context("no workspace members")?;
    let too_new: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let v = p["rust_version"].as_str()?;
            (version(v).ok()? > declared)
                .then(|| format!("{} {} needs {v}", p["name"], p["version"]))
        })
        .collect();
    ensure!(
        too_new.is_empty(),
        "the workspace declares rust-version {declared:?}, but: {too_new:?}"
    );
    Ok(())
}

/// `rust-toolchain.toml` names a channel (not a pinned version rustup would have to
/// download) and the components CI uses.
#[test]
fn toolchain_file_names_stable_with_fmt_and_clippy() -> Result<()> {
    let text = std::fs::read_to_string(repo().join("rust-toolchain.toml"))
        .context("rust-toolchain.toml")?;
    ensure!(text.contains("channel = \"stable\""), "{text}");
    for component in ["rustfmt", "clippy"] {
        ensure!(text.contains(component), "{component} missing: {text}");
    }
    Ok(())
}

/// Every metric the daemons' sources emit (`counter!`, `gauge!`, `histogram!` with a literal
/// name, and the TLS reload counters passed by name) has a help text in the catalog, so
/// `/metrics` has a `# HELP` line for it.
#[test]
fn every_emitted_metric_has_a_help_text() -> Result<()> {
    use drawbridge_runtime::metrics_catalog::CATALOG;
    let mut emitted = std::collections::BTreeSet::new();
    for dir in [
        "bridge/src",
        "float/src",
        "runtime/src",
        "certs/src",
        "node/src",
    ] {
        let mut stack = vec![repo().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path)?;
                for mac in ["counter!(", "gauge!(", "histogram!("] {
                    for (i, _) in text.match_indices(mac) {
                        let rest = text[i + mac.len()..].trim_start();
                        if let Some(lit) = rest.strip_prefix('"') {
                            let name = &lit[..lit.find('"').unwrap_or(0)];
                            if !name.is_empty() {
                                emitted.insert(name.to_string());
                            }
                        }
                    }
                }
                for word in text.split('"') {
                    if word.starts_with("drawbridge_")
                        && word.ends_with("_tls_reload_total")
                        && !word.contains("_test_")
                    {
                        emitted.insert(word.to_string());
                    }
                }
            }
        }
    }
    ensure!(emitted.len() > 20, "found only {emitted:?}");
    let missing: Vec<&String> = emitted
        .iter()
        .filter(|name| !CATALOG.iter().any(|(n, _, _)| n == name))
        .collect();
    ensure!(
        missing.is_empty(),
        "no help text in runtime/src/metrics_catalog.rs for {missing:?}"
    );
    Ok(())
}
