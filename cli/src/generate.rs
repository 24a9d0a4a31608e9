//! `drawbridge completions` and `drawbridge man`: shell completions and man pages for the
//! three binaries, generated from the same clap definitions the binaries parse, so they
//! cannot drift from the real flags. The .deb packages ship what these write
//! (`scripts/package.sh`).

use std::{fs, io, path::Path};

use anyhow::{bail, Context, Result};
use clap::{Command, CommandFactory, ValueEnum};
use clap_complete::Shell;

/// The binaries Drawbridge installs, each with its command-line definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Binary {
    /// The operator CLI, `drawbridge`.
    Drawbridge,
    /// The bridge daemon, `drawbridge-bridge`.
    DrawbridgeBridge,
    /// The float daemon, `drawbridge-float`.
    DrawbridgeFloat,
}

impl Binary {
    pub const ALL: [Binary; 3] = [
        Binary::Drawbridge,
        Binary::DrawbridgeBridge,
        Binary::DrawbridgeFloat,
    ];

    /// The binary's clap command, named as it is installed.
    pub fn command(self) -> Command {
        match self {
            Binary::Drawbridge => crate::Cli::command().name("drawbridge"),
            Binary::DrawbridgeBridge => drawbridge_bridge::Args::command(),
            Binary::DrawbridgeFloat => drawbridge_float::Args::command(),
        }
    }
}

/// Write `binary`'s completion script for `shell` to `out`.
pub fn completions(shell: Shell, binary: Binary, out: &mut dyn io::Write) {
    let mut cmd = binary.command();
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Write a man page (section 1) for every binary and every subcommand of `drawbridge`
/// (`drawbridge-certs-init.1`, …) into `dir`, created if missing. Returns the file names.
pub fn man_pages(dir: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for binary in Binary::ALL {
        let mut cmd = binary.command();
        // Subcommand pages are named after their parent (`drawbridge-control-create`): the
        // names clap gives them only once the tree is built.
        cmd.build();
        write_tree(&cmd, dir, &mut written)?;
    }
    if written.is_empty() {
        bail!("no man page was generated");
    }
    Ok(written)
}

fn write_tree(cmd: &Command, dir: &Path, written: &mut Vec<String>) -> Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let file = format!("{name}.1");
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .section("1")
        .source(format!("Drawbridge {}", env!("CARGO_PKG_VERSION")))
        .manual("Drawbridge Manual")
        .render(&mut page)
        .with_context(|| format!("rendering {file}"))?;
    fs::write(dir.join(&file), page).with_context(|| format!("writing {file}"))?;
    written.push(file);
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_tree(sub, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_binary_has_completions_for_every_shell_naming_its_flags() {
        for binary in Binary::ALL {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let mut out = Vec::new();
                completions(shell, binary, &mut out);
                let text = String::from_utf8(out).unwrap();
                let flag = match binary {
                    Binary::Drawbridge => "step-down",
                    _ => "config",
                };
                assert!(
                    text.contains(flag),
                    "{binary:?} {shell}: completions do not mention {flag}"
                );
            }
        }
    }

    #[test]
    fn man_pages_cover_the_daemons_and_each_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = man_pages(dir.path()).unwrap();
        for expected in [
            "drawbridge.1",
            "drawbridge-bridge.1",
            "drawbridge-float.1",
            "drawbridge-step-down.1",
            "drawbridge-certs-init.1",
            "drawbridge-control-create.1",
        ] {
            assert!(
                files.iter().any(|f| f == expected),
                "{expected} missing from {files:?}"
            );
        }
        let bridge = fs::read_to_string(dir.path().join("drawbridge-bridge.1")).unwrap();
        assert!(bridge.contains("DRAWBRIDGE_BRIDGE_CONFIG"), "{bridge}");
        assert!(
            bridge.starts_with(".ie") || bridge.contains(".TH"),
            "{bridge}"
        );
    }
}
