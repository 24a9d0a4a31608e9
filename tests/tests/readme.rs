//! The README's "Run it yourself" block, taken from README.md itself and run by bash as a
//! reader would run it: a dev PKI, Bank B's float and Bank A's bridge in the background,
//! a control message from the CLI, 1,000 messages sent and received, `drawbridge status`.
//!
//! Only what cannot be the same on a test host changes: the binaries are this build's (not
//! `./target/release/`, so `cargo build` is left out), and the ports (RabbitMQ's 5672, the
//! float's 5671, the admin ports 9101 and 9102) are free ones, replaced in the block and in
//! `examples/walkthrough/*.toml` alike. Each replacement must find its text, so a README that
//! drifts from the configurations fails here rather than on a reader's machine.
//!
//! The RabbitMQ node is a private one (the system service is not touched). It runs in the
//! directory of a scratch copy of `examples/walkthrough/`, where `certs init` writes
//! `drawbridge-pki/`.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use drawbridge_testkit::{
    daemon::{bin_dir, free_ports},
    rabbit::{NodeOptions, RabbitNode},
};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

/// The marker line before the fenced block the test runs.
const MARKER: &str = "<!-- walkthrough: tests/tests/readme.rs runs this block";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The shell block after [`MARKER`] in `readme`.
fn walkthrough(readme: &str) -> Result<String> {
    let after = &readme[readme
        .find(MARKER)
        .context("README: walkthrough marker missing")?..];
    let body = after
        .split_once("```sh\n")
        .context("README: no ```sh block after the marker")?
        .1;
    let (block, _) = body
        .split_once("\n```")
        .context("README: walkthrough block not closed")?;
    Ok(block.to_string())
}

/// Replace every `from` with `to` in `text`; an error if `from` is not there.
fn replace(text: &str, from: &str, to: &str, what: &str) -> Result<String> {
    ensure!(text.contains(from), "{what}: `{from}` not found");
    Ok(text.replace(from, to))
}

/// Kills the script's process group (the daemons it started in the background included)
/// however the test ends.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

#[tokio::test]
async fn the_readme_walkthrough_runs_as_written() -> Result<()> {
    let readme = std::fs::read_to_string(repo().join("README.md"))?;
    let block = walkthrough(&readme)?;
    let rabbit = RabbitNode::start(NodeOptions::default()).await?;
    let [float_port, bridge_admin, float_admin] = free_ports::<3>()?;
    let ports = [
        (
            "127.0.0.1:5672",
            format!("127.0.0.1:{}", rabbit.amqp_port()),
        ),
        ("127.0.0.1:5671", format!("127.0.0.1:{float_port}")),
        ("127.0.0.1:9101", format!("127.0.0.1:{bridge_admin}")),
        ("127.0.0.1:9102", format!("127.0.0.1:{float_admin}")),
    ];

    // The block: this build's binaries, no cargo build, the free ports.
    let mut script = String::new();
    for line in block.lines() {
        if line.starts_with("cargo build") {
            continue;
        }
        script.push_str(line);
        script.push('\n');
    }
    let bin = bin_dir();
    for name in ["drawbridge", "drawbridge-bridge", "drawbridge-float"] {
        ensure!(
            bin.join(name).exists(),
            "{} missing: run `cargo build --bins`",
            bin.join(name).display()
        );
    }
    script = replace(
        &script,
        "./target/release/",
        &format!("{}/", bin.display()),
        "README",
    )?;
    script = replace(
        &script,
        "--admin 9101",
        &format!("--admin {bridge_admin}"),
        "README",
    )?;
    for (from, to) in [&ports[0], &ports[1]] {
        script = replace(&script, from, to, "README")?;
    }

    // The configurations it names, with the same ports.
    let dir = tempfile::tempdir()?;
    let configs = dir.path().join("examples/walkthrough");
    std::fs::create_dir_all(&configs)?;
    for (name, wanted) in [("bridge.toml", [0, 2]), ("float.toml", [0, 1])] {
        ensure!(
            script.contains(&format!("examples/walkthrough/{name}")),
            "README does not run examples/walkthrough/{name}"
        );
        let mut text = std::fs::read_to_string(repo().join("examples/walkthrough").join(name))?;
        for i in wanted {
            text = replace(&text, ports[i].0, &ports[i].1, name)?;
        }
        if name == "float.toml" {
            text = replace(&text, ports[3].0, &ports[3].1, name)?;
        }
        std::fs::write(configs.join(name), text)?;
    }

    let log = dir.path().join("walkthrough.log");
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir.path())
        .env_remove("DRAWBRIDGE_ADMIN")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(
            std::fs::File::options().append(true).open(&log)?,
        ));
    cmd.as_std_mut().process_group(0);
    let mut child = cmd.spawn()?;
    let _group = Group(child.id().context("script pid")? as i32);
    let status = match tokio::time::timeout(Duration::from_secs(180), child.wait()).await {
        Ok(status) => status?,
        Err(_) => bail!(
            "the walkthrough did not finish within 180 s:\n{}",
            std::fs::read_to_string(&log)?
        ),
    };
    let out = std::fs::read_to_string(&log)?;
    ensure!(
        status.success(),
        "the walkthrough failed ({status}):\n{out}"
    );
    ensure!(
        out.contains("received=1000 lost=0 duplicates=0 corrupted=0"),
        "{out}"
    );
    let status_line = out
        .lines()
        .find(|l| l.starts_with("drawbridge.peers.bank-b-paris-fr"))
        .with_context(|| format!("no link row in `drawbridge status`:\n{out}"))?;
    ensure!(
        status_line.contains(" up ") && status_line.contains("O=Bank B, L=Paris, C=FR"),
        "{status_line}"
    );
    ensure!(
        dir.path().join("drawbridge-pki/root/ca.crt").is_file(),
        "certs init wrote no drawbridge-pki/"
    );
    Ok(())
}
