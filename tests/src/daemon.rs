//! Running the real `drawbridge-bridge` / `drawbridge-float` binaries as child processes,
//! so tests can SIGTERM them, `kill -9` them and restart them.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use tokio::process::{Child, Command};

/// Which daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `drawbridge-bridge`.
    Bridge,
    /// `drawbridge-float`.
    Float,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Bridge => "drawbridge-bridge",
            Kind::Float => "drawbridge-float",
        }
    }
}

/// Directory holding the workspace binaries (next to the running executable, or its
/// parent when running from `target/<profile>/deps`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir
    }
}

/// Path of a daemon binary, building the binaries once if they are missing (so
/// `cargo test` alone works).
pub fn binary(kind: Kind) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let path = bin_dir().join(kind.binary());
    if !path.exists() {
        let built = BUILT.get_or_init(|| {
            let profile = bin_dir()
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut cmd = std::process::Command::new(
                std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            );
            cmd.args(["build", "-p", "drawbridge-bridge", "-p", "drawbridge-float"]);
            if profile == "release" {
                cmd.arg("--release");
            }
            match cmd.status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("cargo build exited with {s}")),
                Err(e) => Err(e.to_string()),
            }
        });
        if let Err(e) = built {
            bail!("building the daemons failed: {e}");
        }
    }
    if !path.exists() {
        bail!("{} not found; run `cargo build --bins`", path.display());
    }
    Ok(path)
}

/// A free loopback port (bound then released; good enough for tests), for a listener a test
/// may stop and start again: see [`free_ports`].
pub fn free_port() -> u16 {
    free_ports::<1>().expect("free port")[0]
}

/// Lowest port handed out by [`free_ports`] (above the well-known and registered services
/// tests might meet, e.g. epmd's 4369).
const POOL_MIN: u16 = 10_000;

/// One past the highest port handed out by [`free_ports`].
///
/// `rabbitmqctl` binds its own Erlang distribution port in `RABBITMQ_DIST_PORT + 10000 ..=
/// + 10010`. With node distribution ports taken from this pool, those land in `20_000..30_011`,
/// above the pool and below the usual ephemeral range (32768), so a `rabbitmqctl` call can no
/// longer take the port a daemon is about to listen on (CI once failed with "cannot listen on
/// 127.0.0.1:25820: Address already in use" while `import_definitions` ran).
const POOL_END: u16 = 20_000;

/// `N` distinct free loopback ports, bound together and then released.
///
/// They are taken from `POOL_MIN..POOL_END`, below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), where `bind(:0)` would pick them: a port from that range can
/// go to any outgoing connection of a concurrent test while its listener is down, and the
/// restarted daemon then fails with "address already in use" (seen once when a test restarted a
/// float). Falls back to the kernel's choice when the range leaves no room below it.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(0);
    let end = low.min(POOL_END);
    let mut held = Vec::with_capacity(N);
    if end > POOL_MIN + 1_000 {
        let span = u32::from(end - POOL_MIN);
        let start = rand::random_range(0..span);
        for i in 0..span {
            if held.len() == N {
                break;
            }
            let port = POOL_MIN + ((start + i) % span) as u16;
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                held.push(l);
            }
        }
    }
    while held.len() < N {
        held.push(TcpListener::bind("127.0.0.1:0")?);
    }
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&held) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

/// A running daemon process.
#[derive(Debug)]
pub struct Daemon {
    kind: Kind,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// Network namespace the process runs in (`ip netns exec`), kept across restarts.
    netns: Option<String>,
}

impl Daemon {
    /// Write `config_toml` to `dir/<name>.toml` and start the daemon with it. The config
    /// must set `admin.listen` to `admin`.
    pub async fn start(
        kind: Kind,
        dir: &Path,
        name: &str,
        config_toml: &str,
        admin: SocketAddr,
    ) -> Result<Daemon> {
        Daemon::start_with_env(kind, dir, name, config_toml, admin, &[]).await
    }

    /// [`Daemon::start`] with extra environment variables for the process (e.g.
    /// `NOTIFY_SOCKET` and `WATCHDOG_USEC`, as systemd sets them); kept across restarts.
    pub async fn start_with_env(
        kind: Kind,
        dir: &Path,
        name: &str,
        config_toml: &str,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        Daemon::launch(kind, dir, name, config_toml, admin, env, None).await
    }

    /// [`Daemon::start_with_env`] in the network namespace `netns` (e.g. a
    /// [`crate::netns::NetWorld`]'s dmz), under `ip netns exec`, which execs the daemon: the
    /// pid held here is the daemon's, so signals, `kill9`, `restart` and `/proc/<pid>` reach
    /// it. `admin` must be reachable from the test, e.g. on
    /// [`crate::netns::NetWorld::dmz_inside_addr`] (the inside may connect to the dmz).
    pub async fn start_in(
        netns: &str,
        kind: Kind,
        dir: &Path,
        name: &str,
        config_toml: &str,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        Daemon::launch(kind, dir, name, config_toml, admin, env, Some(netns)).await
    }

    async fn launch(
        kind: Kind,
        dir: &Path,
        name: &str,
        config_toml: &str,
        admin: SocketAddr,
        env: &[(&str, &str)],
        netns: Option<&str>,
    ) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, config_toml)?;
        let log = dir.join(format!("{name}.log"));
        let mut d = Daemon {
            kind,
            config,
            log,
            admin,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: netns.map(String::from),
        };
        d.spawn().await?;
        Ok(d)
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match &self.netns {
            None => Command::new(binary(self.kind)?),
            Some(ns) => {
                let mut cmd = Command::new(crate::netns::ip_program());
                cmd.args(["netns", "exec", ns]).arg(binary(self.kind)?);
                cmd
            }
        };
        cmd.arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("DRAWBRIDGE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        // Environment overrides meant for the test process must not leak into daemons.
        for (k, _) in std::env::vars() {
            if k.starts_with("DRAWBRIDGE_") && k != "DRAWBRIDGE_TEST_LOG" {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().context("spawning daemon")?);
        self.wait_healthy(Duration::from_secs(20)).await
    }

    /// Wait until `/healthz` answers.
    pub async fn wait_healthy(&mut self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if http_get(self.admin, "/healthz").await.is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "{} exited with {status}; log:\n{}",
                        self.kind.binary(),
                        self.log_tail(40)
                    );
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not healthy within {within:?}; log:\n{}",
                    self.kind.binary(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until `/readyz` says ready.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok((200, _)) = http_get(self.admin, "/readyz").await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready within {within:?}; log:\n{}",
                    self.kind.binary(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> Result<serde_json::Value> {
        let (_, body) = http_get(self.admin, "/status").await?;
        Ok(serde_json::from_str(&body)?)
    }

    /// `/metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String> {
        let (_, body) = http_get(self.admin, "/metrics").await?;
        Ok(body)
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The network namespace it runs in ([`Daemon::start_in`]), if not the test's.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// How the process ended, if it has (reaped here); `None` while it runs.
    pub fn exit_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was not started", self.kind.binary()),
        }
    }

    /// SIGHUP the process: the daemons reload their TLS certificate, key and trust roots.
    pub fn hangup(&self) -> Result<()> {
        let pid = self
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .context("daemon not running")?;
        // The child is ours and not yet reaped, so the pid cannot have been reused.
        signal::kill(Pid::from_raw(pid), Signal::SIGHUP)?;
        Ok(())
    }

    /// SIGKILL the process and reap it.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?;
            c.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM the process and wait for it to exit (up to `within`); returns its exit code.
    pub async fn terminate(&mut self, within: Duration) -> Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            // The child is ours and not yet reaped, so the pid cannot have been reused.
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        match tokio::time::timeout(within, c.wait()).await {
            Ok(s) => Ok(s?.code()),
            Err(_) => {
                c.start_kill()?;
                c.wait().await?;
                bail!(
                    "{} did not exit within {within:?} after SIGTERM",
                    self.kind.binary()
                )
            }
        }
    }

    /// Start again with the same config (after `kill9` or `terminate`).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill9().await?;
        }
        self.spawn().await
    }

    /// Path of the log file (stderr of every run, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the log contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log)
            .map(|s| s.contains(needle))
            .unwrap_or(false)
    }
}

/// GET `path` on the admin port: (status, body) (see [`drawbridge_runtime::admin::fetch`]).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(drawbridge_runtime::admin::fetch(addr, path).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_clear_of_ephemeral_and_rabbitmqctl_ports() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ports = free_ports::<3>().unwrap();
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "{ports:?}");
        for p in ports {
            let end = low.min(POOL_END);
            if end > POOL_MIN + 1_000 {
                // Also clear of rabbitmqctl's own ports (dist port + 10000 ..= + 10010).
                assert!((POOL_MIN..end).contains(&p), "{p} (ephemeral from {low})");
            }
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
