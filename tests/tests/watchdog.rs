//! `scripts/watchdog.sh` against a fake daemon (`tests/fixtures/fake_daemon.py`): a daemon
//! whose `/healthz` stops answering is killed and restarted; one that crashes every time is
//! restarted with growing delays until the script gives up with a clear message and a
//! non-zero exit; SIGTERM is forwarded to the daemon.
//!
//! Small back-off values keep these fast; every wait is generous and nothing asserts a
//! precise time, so a loaded two-core machine does not make them flaky.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use drawbridge_testkit::daemon::free_port;
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use tokio::process::{Child, Command};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Start the watchdog over the fake daemon in `mode`; stderr goes to `dir/watchdog.log`.
fn watchdog(dir: &Path, port: u16, mode: &str, flags: &[&str]) -> Result<Child> {
    let log = std::fs::File::create(dir.join("watchdog.log"))?;
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/watchdog.sh"))
        // A port alone: the admin address forms of `drawbridge status`.
        .args(["--admin", &port.to_string()])
        .args(flags)
        .arg("--")
        .arg("python3")
        .arg(repo().join("tests/fixtures/fake_daemon.py"))
        .arg(port.to_string())
        .arg(dir.join("starts"))
        .arg(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    Ok(cmd.spawn()?)
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

fn starts(dir: &Path) -> usize {
    read(dir, "starts")
        .lines()
        .filter(|l| l.starts_with("start"))
        .count()
}

async fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !ok() {
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn sigterm(child: &Child) -> Result<()> {
    let pid = child.id().context("watchdog not running")?;
    // Our own unreaped child: the pid cannot have been reused.
    signal::kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
    Ok(())
}

#[tokio::test]
async fn a_hung_daemon_is_killed_and_restarted_and_sigterm_is_forwarded() -> Result<()> {
    if !have("curl") || !have("python3") {
        eprintln!("SKIPPED: needs curl and python3");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let mut wd = watchdog(
        dir.path(),
        port,
        "hang-first",
        &[
            "--interval",
            "1",
            "--probe-timeout",
            "1",
            "--probe-failures",
            "2",
            // Python may take seconds to answer on a loaded machine.
            "--start-grace",
            "5",
            "--backoff-min",
            "1",
            "--stop-timeout",
            "2",
        ],
    )?;
    // The first start hangs after 1 s and ignores SIGTERM: two failed probes after the
    // start grace, SIGTERM, SIGKILL 2 s later, a restart 1 s after that.
    let within = Duration::from_secs(60);
    wait_for("a second start", within, || starts(dir.path()) >= 2).await?;
    let log = read(dir.path(), "watchdog.log");
    assert!(log.contains("hung: 2 health probes failed"), "{log}");
    assert!(log.contains("SIGKILL"), "{log}");
    // The second start stays healthy: no third start over a few probes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        starts(dir.path()),
        2,
        "{}",
        read(dir.path(), "watchdog.log")
    );

    // SIGTERM reaches the daemon, which stops; the watchdog exits 0.
    sigterm(&wd)?;
    let status = tokio::time::timeout(within, wd.wait()).await??;
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        read(dir.path(), "watchdog.log")
    );
    assert!(
        read(dir.path(), "starts").ends_with("stopped\n"),
        "{}",
        read(dir.path(), "starts")
    );
    Ok(())
}

#[tokio::test]
async fn a_crashing_daemon_is_restarted_with_growing_delays_then_given_up() -> Result<()> {
    if !have("curl") || !have("python3") {
        eprintln!("SKIPPED: needs curl and python3");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let mut wd = watchdog(
        dir.path(),
        port,
        "crash",
        &[
            "--interval",
            "1",
            "--backoff-min",
            "1",
            "--backoff-max",
            "60",
            "--max-failures",
            "4",
            "--window",
            "600",
        ],
    )?;
    // Delays 1 s, 2 s, 4 s, then the 4th failure gives up: about 11 s in all.
    let status = tokio::time::timeout(Duration::from_secs(120), wd.wait()).await??;
    let log = read(dir.path(), "watchdog.log");
    assert_eq!(status.code(), Some(1), "{log}");
    assert_eq!(starts(dir.path()), 4, "{log}");
    assert!(
        log.contains("GIVING UP: 4 failures within 600s (last: exited with status 1)"),
        "{log}"
    );
    let delays: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("restarting in ").nth(1))
        .collect();
    assert_eq!(delays, ["1s", "2s", "4s"], "{log}");
    Ok(())
}

#[tokio::test]
async fn exit_78_is_not_restarted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = std::fs::File::create(dir.path().join("watchdog.log"))?;
    let status = Command::new("bash")
        .arg(repo().join("scripts/watchdog.sh"))
        .args(["--admin", "127.0.0.1:1", "--interval", "1", "--"])
        .args(["sh", "-c", "exit 78"])
        .stderr(Stdio::from(log))
        .status()
        .await?;
    let log = read(dir.path(), "watchdog.log");
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("invalid configuration"), "{log}");
    Ok(())
}

#[test]
fn the_script_is_shellcheck_clean() {
    if !have("shellcheck") {
        eprintln!("SKIPPED: shellcheck not installed");
        return;
    }
    let out = std::process::Command::new("shellcheck")
        .arg(repo().join("scripts/watchdog.sh"))
        .output()
        .expect("shellcheck runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
