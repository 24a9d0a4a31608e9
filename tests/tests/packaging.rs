//! The Debian packages (`scripts/package.sh`, `[package.metadata.deb]` in the crates): built
//! from this tree, unpacked into a scratch root with `dpkg -x`, and checked against what the
//! systemd units expect of the file system — the binary of `ExecStart=` (runnable), the user
//! of `User=` (created by the postinst), the pages of `Documentation=`, the example
//! configuration (with /etc/drawbridge paths), man pages and completions, the /etc/default
//! file, the documentation with every page's links resolving inside the package, the
//! monitoring files under /usr/share/drawbridge/ — and that no two packages own the same file.
//!
//! Ignored by default: it builds the release binaries and needs `cargo-deb` (package.sh
//! installs it). `scripts/test.sh` runs it in CI:
//! `cargo test -p drawbridge-testkit --test packaging -- --ignored`.

use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    os::unix::fs::PermissionsExt,
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

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `.deb` files package.sh printed, by package name.
fn build_packages() -> Result<BTreeMap<String, PathBuf>> {
    let stdout = run(Command::new(repo().join("scripts/package.sh")).current_dir(repo()))?;
    let mut debs = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.ends_with(".deb")) {
        let path = repo().join(line.trim());
        let name = run(Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&path)
            .arg("Package"))?;
        debs.insert(name.trim().to_string(), path);
    }
    Ok(debs)
}

/// The values of `key=` in a unit file (one per line, continuation lines not used).
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

fn gunzip(path: &Path) -> Result<String> {
    let out = run(Command::new("gzip").arg("-dc").arg(path))?;
    Ok(out)
}

#[test]
#[ignore = "builds the release binaries and the .deb packages (scripts/test.sh runs it in CI)"]
fn packages_install_what_the_units_expect() -> Result<()> {
    let debs = build_packages()?;
    let names: Vec<&str> = debs.keys().map(String::as_str).collect();
    // package.sh prints every .deb in target/debian: older versions may be among them, but
    // the three of this tree must be.
    for want in ["drawbridge", "drawbridge-bridge", "drawbridge-float"] {
        ensure!(
            debs.contains_key(want),
            "package {want} not built: {names:?}"
        );
    }

    let scratch = tempfile::tempdir()?;
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for (name, deb) in &debs {
        let root = scratch.path().join(name);
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
        // No file may be in two packages (dpkg would refuse to install the second).
        for entry in run(Command::new("dpkg-deb").arg("-c").arg(deb))?.lines() {
            let path = entry.split_whitespace().last().unwrap_or_default();
            if path.ends_with('/') {
                continue;
            }
            if let Some(other) = owner.insert(path.to_string(), name.clone()) {
                bail!("{path} is in both {other} and {name}");
            }
        }
    }

    // The CLI: runnable, with its man pages and completions.
    let cli_root = scratch.path().join("drawbridge");
    let version = run(Command::new(cli_root.join("usr/bin/drawbridge")).arg("--version"))?;
    ensure!(
        version == format!("drawbridge {}\n", env!("CARGO_PKG_VERSION")),
        "drawbridge --version: {version}"
    );
    // The monitoring files, under /usr/share/drawbridge/ as they are in deploy/.
    for (installed, source) in [
        (
            "usr/share/drawbridge/prometheus/alerts.yml",
            "deploy/prometheus/alerts.yml",
        ),
        (
            "usr/share/drawbridge/grafana/drawbridge.json",
            "deploy/grafana/drawbridge.json",
        ),
    ] {
        let text = fs::read_to_string(cli_root.join(installed))
            .with_context(|| format!("drawbridge: {installed}"))?;
        ensure!(
            text == fs::read_to_string(repo().join(source))?,
            "drawbridge: {installed} differs from {source}"
        );
    }
    for name in debs.keys() {
        check_doc_links(&scratch.path().join(name), name)?;
    }
    for page in [
        "drawbridge.1.gz",
        "drawbridge-status.1.gz",
        "drawbridge-step-down.1.gz",
    ] {
        let text = gunzip(&cli_root.join("usr/share/man/man1").join(page))?;
        ensure!(text.contains(".TH"), "{page} is not a man page");
    }
    for completion in [
        "usr/share/bash-completion/completions/drawbridge",
        "usr/share/zsh/vendor-completions/_drawbridge",
        "usr/share/fish/vendor_completions.d/drawbridge.fish",
    ] {
        let text = fs::read_to_string(cli_root.join(completion))
            .with_context(|| format!("drawbridge: {completion}"))?;
        ensure!(text.contains("step-down"), "{completion} lacks step-down");
    }

    for daemon in ["bridge", "float"] {
        let package = format!("drawbridge-{daemon}");
        let root = scratch.path().join(&package);
        let unit_path = ["lib/systemd/system", "usr/lib/systemd/system"]
            .iter()
            .map(|d| root.join(d).join(format!("{package}.service")))
            .find(|p| p.exists())
            .with_context(|| format!("{package}: no {package}.service installed"))?;
        let unit = fs::read_to_string(&unit_path)?;
        // The packaged unit is the one in the repository.
        let repo_unit =
            fs::read_to_string(repo().join(format!("deploy/systemd/{package}.service")))?;
        ensure!(unit == repo_unit, "{package}: packaged unit differs");

        // ExecStart= names a binary the package installs, executable, that runs.
        let exec = unit_values(&unit, "ExecStart");
        ensure!(exec.len() == 1, "{package}: ExecStart {exec:?}");
        let mut words = exec[0].split_whitespace();
        let binary = words.next().unwrap_or_default();
        let installed = root.join(binary.trim_start_matches('/'));
        let mode = fs::metadata(&installed)
            .with_context(|| format!("{package}: ExecStart binary {binary} not installed"))?
            .permissions()
            .mode();
        ensure!(mode & 0o111 != 0, "{package}: {binary} not executable");
        let help = run(Command::new(&installed).arg("--help"))?;
        ensure!(help.contains("--config"), "{package} --help: {help}");

        // --config /etc/drawbridge/<daemon>.toml: the package ships the example to copy there.
        let config = words.skip_while(|w| *w != "--config").nth(1);
        ensure!(
            config == Some(&format!("/etc/drawbridge/{daemon}.toml")),
            "{package}: ExecStart config {config:?}"
        );
        let example = root.join(format!("usr/share/drawbridge/examples/{daemon}.toml"));
        let example_text = fs::read_to_string(&example)
            .with_context(|| format!("{package}: example configuration"))?;
        ensure!(
            example_text == fs::read_to_string(repo().join(format!("examples/{daemon}.toml")))?,
            "{package}: packaged example differs from examples/{daemon}.toml"
        );
        // Its files are where a packaged install keeps them.
        for key in ["tls_cert", "tls_key", "trust_roots"] {
            let value = example_text
                .lines()
                .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix('='))
                .with_context(|| format!("{package}: example has no {key}"))?;
            ensure!(
                value.trim().starts_with("\"/etc/drawbridge/"),
                "{package}: example {key} ={value} is not under /etc/drawbridge"
            );
        }

        // /etc/default/drawbridge-<daemon>: the unit's optional EnvironmentFile=, shipped as a
        // conffile with nothing set (installing it changes nothing).
        let default = format!("etc/default/{package}");
        ensure!(
            unit_values(&unit, "EnvironmentFile") == [format!("-/{default}")],
            "{package}: EnvironmentFile {:?}",
            unit_values(&unit, "EnvironmentFile")
        );
        let default_text = fs::read_to_string(root.join(&default))
            .with_context(|| format!("{package}: /{default} not installed"))?;
        ensure!(
            default_text
                .lines()
                .all(|l| l.trim().is_empty() || l.starts_with('#'))
                && default_text.contains("#RUST_LOG="),
            "{package}: /{default} sets something or lacks RUST_LOG:\n{default_text}"
        );

        // Documentation= pages exist in the package (man pages gzipped, as Debian has them).
        for doc in unit_values(&unit, "Documentation")
            .into_iter()
            .flat_map(str::split_whitespace)
        {
            if let Some(file) = doc.strip_prefix("file://") {
                ensure!(
                    root.join(file.trim_start_matches('/')).is_file(),
                    "{package}: Documentation {doc} not installed"
                );
            } else if let Some(man) = doc.strip_prefix("man:") {
                let (page, section) = man
                    .trim_end_matches(')')
                    .split_once('(')
                    .with_context(|| format!("{package}: Documentation {doc}"))?;
                let path = root.join(format!("usr/share/man/man{section}/{page}.{section}.gz"));
                let text = gunzip(&path)
                    .with_context(|| format!("{package}: Documentation {doc} not installed"))?;
                ensure!(
                    text.contains(&format!("DRAWBRIDGE_{}_CONFIG", daemon.to_uppercase())),
                    "{package}: man page lacks the config variable"
                );
            } else {
                bail!("{package}: Documentation {doc}: neither file:// nor man:");
            }
        }
        for completion in [
            format!("usr/share/bash-completion/completions/{package}"),
            format!("usr/share/zsh/vendor-completions/_{package}"),
            format!("usr/share/fish/vendor_completions.d/{package}.fish"),
        ] {
            let text = fs::read_to_string(root.join(&completion))
                .with_context(|| format!("{package}: {completion}"))?;
            ensure!(text.contains("config"), "{package}: {completion}");
        }

        // User= / Group= are created by the postinst, which also carries the systemd
        // fragments (daemon-reload and the unit's state; neither enabled nor started).
        let user = unit_values(&unit, "User");
        ensure!(user == ["drawbridge"], "{package}: User {user:?}");
        let control = scratch.path().join(format!("{package}.control"));
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(&debs[&package])
            .arg(&control))?;
        let mut postinst = String::new();
        fs::File::open(control.join("postinst"))
            .with_context(|| format!("{package}: no postinst"))?
            .read_to_string(&mut postinst)?;
        ensure!(
            postinst.contains("adduser --system") && postinst.contains("drawbridge"),
            "{package}: postinst does not create the drawbridge user:\n{postinst}"
        );
        ensure!(
            postinst.contains("deb-systemd-helper update-state")
                && !postinst.contains("#DEBHELPER#"),
            "{package}: postinst lacks the systemd fragment:\n{postinst}"
        );
        // Installing must neither start nor enable the unit (the configuration is not written
        // yet); an upgrade keeps it enabled only if the operator had enabled it.
        ensure!(
            !postinst.contains("deb-systemd-invoke start")
                && postinst.matches("deb-systemd-helper enable").count()
                    <= postinst.matches("was-enabled").count(),
            "{package}: the unit would be started or enabled before it is configured:\n{postinst}"
        );
        run(Command::new("sh").arg("-n").arg(control.join("postinst")))?;
        let conffiles = fs::read_to_string(control.join("conffiles")).unwrap_or_default();
        ensure!(
            conffiles
                .lines()
                .any(|l| l == format!("/etc/default/{package}")),
            "{package}: /etc/default/{package} is not a conffile: {conffiles:?}"
        );
        let fields = fs::read_to_string(control.join("control"))?;
        ensure!(
            fields.contains("adduser") && fields.contains("libc6"),
            "{package}: Depends: {fields}"
        );
    }
    Ok(())
}

/// Every relative link of every Markdown page a package installs leads to a file or
/// directory the same package installs: the pages are read where they are installed
/// (`/usr/share/doc/<package>/`), with no repository around them.
fn check_doc_links(root: &Path, package: &str) -> Result<()> {
    let doc = root.join("usr/share/doc").join(package);
    let mut pages = Vec::new();
    let mut stack = vec![doc.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("{package}: {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
    }
    ensure!(
        pages.iter().any(|p| p.ends_with("docs/operations.md")),
        "{package}: docs/operations.md not installed"
    );
    let mut broken = Vec::new();
    for page in &pages {
        let text = fs::read_to_string(page)?;
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = page.parent().unwrap_or(&doc).join(target);
            if !resolved.exists() {
                broken.push(format!(
                    "{} -> {target}",
                    page.strip_prefix(root).unwrap_or(page).display()
                ));
            }
        }
    }
    ensure!(broken.is_empty(), "{package}: broken links: {broken:#?}");
    Ok(())
}
