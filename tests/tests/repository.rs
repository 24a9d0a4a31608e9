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
