//! Private RabbitMQ nodes for tests (no Docker): each node is a `rabbitmq-server` started
//! directly from `/usr/lib/rabbitmq/bin` with its own name, ports and data directory under
//! `std::env::temp_dir()/drawbridge-testkit/<name>`.
//!
//! # Cleanup
//! Every node is launched through a small `sh` watchdog that is the leader of its own process
//! group (the server script, `beam.smp`, `erl_child_setup` … all live in that group). The
//! watchdog polls the test process (`kill -0 $TESTPID`) every second; when the test process is
//! gone (normal `process::exit`, panic, SIGKILL …) it kills the whole group with SIGKILL and
//! removes the node directory. `Drop` does the same immediately. `epmd` is never killed (it is
//! shared with the system instance and daemonises out of the group anyway).

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use rand::Rng as _;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Keeps Erlang distribution (server and CLI) on loopback.
const ERL_FLAGS: &str = "-kernel inet_dist_use_interface {127,0,0,1}";

/// Watchdog run by `sh -c`. Env: DBT_SERVER, DBT_DIR, DBT_TESTPID.
const WATCHDOG: &str = r#"
"$DBT_SERVER" </dev/null >>"$DBT_DIR/console.log" 2>&1 &
srv=$!
while kill -0 "$DBT_TESTPID" 2>/dev/null && kill -0 "$srv" 2>/dev/null; do
    sleep 1
done
if ! kill -0 "$DBT_TESTPID" 2>/dev/null; then
    # The test process is gone: remove the node dir once the group below is dead.
    setsid sh -c 'sleep 2; rm -rf "$0"' "$DBT_DIR" </dev/null >/dev/null 2>&1 &
    h=$!
    i=0
    # wait until the helper has left our process group (else `kill 0` kills it too)
    while [ $i -lt 100 ] && [ "$(cut -d' ' -f5 /proc/$h/stat 2>/dev/null)" = "$$" ]; do
        sleep 0.02; i=$((i+1))
    done
fi
kill -KILL 0
"#;

/// Options for a private node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Plugins to enable, e.g. `"rabbitmq_shovel"`.
    pub plugins: Vec<String>,
    /// Extra lines appended to the node's `rabbitmq.conf`.
    pub extra_config: Vec<String>,
    /// A TLS (amqps) listener besides the plain one, if set.
    pub tls: Option<TlsListener>,
}

/// A node's TLS listener (`listeners.ssl.default`): its certificate, and the CA client
/// certificates are verified against. SASL EXTERNAL is offered (plugin
/// `rabbitmq_auth_mechanism_ssl`, login = the client certificate's common name) besides PLAIN.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// PEM CA for client certificates (`ssl_options.cacertfile`).
    pub ca_cert: PathBuf,
    /// The broker's PEM certificate (`ssl_options.certfile`).
    pub cert: PathBuf,
    /// Its key (`ssl_options.keyfile`).
    pub key: PathBuf,
    /// Refuse clients without a certificate (`fail_if_no_peer_cert`); a certificate a client
    /// does present is always verified (`verify_peer`).
    pub require_client_cert: bool,
}

impl TlsListener {
    fn config_lines(&self, port: u16) -> String {
        format!(
            "listeners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = {}\n\
             auth_mechanisms.1 = PLAIN\n\
             auth_mechanisms.2 = AMQPLAIN\n\
             auth_mechanisms.3 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n",
            self.ca_cert.display(),
            self.cert.display(),
            self.key.display(),
            self.require_client_cert,
        )
    }
}

/// A throw-away PKI for a broker's TLS listener, made with rcgen: a CA, the broker's
/// certificate (for `127.0.0.1` and `localhost`) and client certificates whose common name is
/// the broker login (SASL EXTERNAL). Keys are written with mode 0600.
#[derive(Debug, Clone)]
pub struct BrokerPki {
    /// PEM CA certificate: what a client's `broker.tls_ca` points at.
    pub ca_cert: PathBuf,
    /// The broker's certificate.
    pub server_cert: PathBuf,
    /// The broker's key.
    pub server_key: PathBuf,
    dir: PathBuf,
    ca_key_pem: String,
    ca_cert_pem: String,
}

impl BrokerPki {
    /// Generate a CA and a broker certificate under `dir`.
    pub fn generate(dir: &Path) -> Result<BrokerPki> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        // A name of its own, as a different CA would have.
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("Drawbridge test broker CA {}", random_suffix()),
        );
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, &ca_key);

        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &issuer)?;

        let pki = BrokerPki {
            ca_cert: dir.join("broker-ca.crt"),
            server_cert: dir.join("broker.crt"),
            server_key: dir.join("broker.key"),
            dir: dir.to_owned(),
            ca_key_pem: ca_key.serialize_pem(),
            ca_cert_pem: ca_cert.pem(),
        };
        std::fs::write(&pki.ca_cert, &pki.ca_cert_pem)?;
        std::fs::write(&pki.server_cert, cert.pem())?;
        write_private(&pki.server_key, &key.serialize_pem())?;
        Ok(pki)
    }

    /// The listener options for this PKI.
    pub fn listener(&self, require_client_cert: bool) -> TlsListener {
        TlsListener {
            ca_cert: self.ca_cert.clone(),
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            require_client_cert,
        }
    }

    /// A client certificate with common name `login` (the broker user SASL EXTERNAL logs in
    /// as); returns (certificate, key) paths.
    pub fn client_cert(&self, login: &str) -> Result<(PathBuf, PathBuf)> {
        use rcgen::{
            CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::from_pem(&self.ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &ca_key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, login);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer)?;
        let (c, k) = (
            self.dir.join(format!("{login}.crt")),
            self.dir.join(format!("{login}.key")),
        );
        std::fs::write(&c, cert.pem())?;
        write_private(&k, &key.serialize_pem())?;
        Ok((c, k))
    }
}

/// Write a file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// A private RabbitMQ node. Killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct RabbitNode {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// The TLS listener's port, if the node has one.
    amqps_port: Option<u16>,
    dir: PathBuf,
    opts: NodeOptions,
    /// The watchdog `sh` (process-group leader of the node's processes).
    child: Option<Child>,
}

/// Root of all testkit node directories.
pub fn base_dir() -> PathBuf {
    std::env::temp_dir().join("drawbridge-testkit")
}

fn home_dir() -> PathBuf {
    base_dir().join("home")
}

/// Creates the shared HOME with an `.erlang.cookie` (mode 0400), race-free across processes.
fn ensure_cookie() -> Result<PathBuf> {
    let home = home_dir();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let cookie = home.join(".erlang.cookie");
    if cookie.exists() {
        return Ok(home);
    }
    let tmp = home.join(format!(
        ".erlang.cookie.{}.{}",
        std::process::id(),
        random_suffix()
    ));
    let value: String = {
        let mut rng = rand::rng();
        (0..20)
            .map(|_| (b'A' + rng.random_range(0..26u8)) as char)
            .collect()
    };
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(value.as_bytes())?;
    }
    // hard_link fails if the cookie appeared meanwhile: the first writer wins.
    let _ = std::fs::hard_link(&tmp, &cookie);
    let _ = std::fs::remove_file(&tmp);
    if !cookie.exists() {
        bail!("could not create {}", cookie.display());
    }
    Ok(home)
}

/// Removes node dirs left behind by test processes that no longer exist (belt and braces: the
/// watchdog normally removes them).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(base_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().starts_with("dbt-") {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(path.join("owner.pid")) else {
            continue;
        };
        let owner = owner.trim();
        let alive = !owner.is_empty() && Path::new("/proc").join(owner).exists();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(30));
        if !alive && old {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn random_suffix() -> String {
    format!("{:08x}", rand::rng().random::<u32>())
}

/// Percent-encodes a vhost name for an AMQP URI path.
pub fn encode_vhost(vhost: &str) -> String {
    let mut out = String::new();
    for b in vhost.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let v: Vec<&str> = s.lines().collect();
            v[v.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<{}: {e}>", path.display()),
    }
}

impl RabbitNode {
    /// Boots a node on free loopback ports and waits until it is ready (60 s timeout).
    pub async fn start(opts: NodeOptions) -> Result<RabbitNode> {
        match Self::start_once(opts.clone()).await {
            Ok(n) => Ok(n),
            Err(e) if format!("{e:#}").to_lowercase().contains("eaddrinuse") => {
                tracing::warn!("rabbit node hit EADDRINUSE, retrying with new ports: {e:#}");
                Self::start_once(opts).await
            }
            Err(e) => Err(e),
        }
    }

    async fn start_once(opts: NodeOptions) -> Result<RabbitNode> {
        ensure_cookie()?;
        remove_stale_dirs();
        let short = format!("dbt-{}", random_suffix());
        let name = format!("{short}@localhost");
        let [amqp_port, dist_port, ssl_port] = crate::daemon::free_ports()?;
        let amqps_port = opts.tls.as_ref().map(|_| ssl_port);
        let dir = base_dir().join(&name);
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{amqp_port}\nloopback_users = none\n\
             log.file.level = info\nlog.console = false\n"
        );
        let mut plugins = opts.plugins.clone();
        if let Some(tls) = &opts.tls {
            conf.push_str(&tls.config_lines(ssl_port));
            plugins.push("rabbitmq_auth_mechanism_ssl".into());
        }
        for l in &opts.extra_config {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(
            dir.join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
        let mut node = RabbitNode {
            name,
            amqp_port,
            dist_port,
            amqps_port,
            dir,
            opts,
            child: None,
        };
        node.spawn()?;
        // on error, drop kills the node and removes its dir
        node.wait_ready().await?;
        Ok(node)
    }

    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.env("HOME", home_dir())
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("ERL_FLAGS", ERL_FLAGS)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("LC_ALL", "C.UTF-8");
    }

    fn spawn(&mut self) -> Result<()> {
        let d = self.dir.clone();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(WATCHDOG);
        self.env(&mut cmd);
        cmd.env("DBT_SERVER", SERVER)
            .env("DBT_DIR", &d)
            .env("DBT_TESTPID", std::process::id().to_string())
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("beam.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let _ = std::fs::remove_file(d.join("beam.pid"));
        let child = cmd.spawn().context("spawning rabbitmq-server watchdog")?;
        self.child = Some(child);
        Ok(())
    }

    fn log_tails(&self) -> String {
        format!(
            "--- {}.log ---\n{}\n--- console.log ---\n{}",
            self.name,
            tail(&self.dir.join("log").join(format!("{}.log", self.name)), 30),
            tail(&self.dir.join("console.log"), 30)
        )
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + BOOT_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.amqp_port));
        // 1. the AMQP listener accepts (cheap to poll)
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "rabbit node {} exited during boot ({st})\n{}",
                    self.name,
                    self.log_tails()
                );
            }
            let ok = tokio::task::spawn_blocking(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            })
            .await
            .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "rabbit node {} not listening on {addr} after {:?}\n{}",
                    self.name,
                    BOOT_TIMEOUT,
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // 2. await_startup
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(5);
        let t = left.to_string();
        self.ctl(&["await_startup", "--timeout", &t])
            .await
            .with_context(|| format!("await_startup\n{}", self.log_tails()))?;
        tracing::info!(node = %self.name, port = self.amqp_port, elapsed = ?started.elapsed(), "rabbit node ready");
        Ok(())
    }

    /// `name@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.amqp_port))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/<percent-encoded vhost>`.
    pub fn amqp_uri(&self, vhost: &str) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            self.amqp_port,
            encode_vhost(vhost)
        )
    }

    /// The TLS listener's port (nodes started with [`NodeOptions::tls`]).
    pub fn amqps_port(&self) -> Option<u16> {
        self.amqps_port
    }

    /// `amqps://<userinfo>@127.0.0.1:TLSPORT/<vhost>` (`userinfo` as is, e.g. `user` or
    /// `user:password`; empty for none). Panics if the node has no TLS listener.
    pub fn amqps_uri(&self, userinfo: &str, vhost: &str) -> String {
        let port = self
            .amqps_port
            .expect("node started without a TLS listener");
        let at = if userinfo.is_empty() { "" } else { "@" };
        format!(
            "amqps://{userinfo}{at}127.0.0.1:{port}/{}",
            encode_vhost(vhost)
        )
    }

    /// Add broker user `name` with `password` and full permissions on `vhost`.
    pub async fn add_user(&self, name: &str, password: &str, vhost: &str) -> Result<()> {
        self.ctl(&["add_user", name, password]).await?;
        self.ctl(&["set_permissions", "-p", vhost, name, ".*", ".*", ".*"])
            .await?;
        Ok(())
    }

    /// `rabbitmqctl list_connections` with the given columns, one `Vec` per connection.
    pub async fn connections(&self, columns: &[&str]) -> Result<Vec<Vec<String>>> {
        let mut args = vec!["list_connections", "--quiet", "--no-table-headers"];
        args.extend_from_slice(columns);
        let out = self.ctl(&args).await?;
        Ok(out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect())
    }

    /// Consumers per queue of `vhost` (`rabbitmqctl list_queues name consumers`).
    pub async fn consumers(&self, vhost: &str) -> Result<std::collections::BTreeMap<String, u64>> {
        let out = self
            .ctl(&[
                "list_queues",
                "-p",
                vhost,
                "--no-table-headers",
                "-q",
                "name",
                "consumers",
            ])
            .await?;
        let mut m = std::collections::BTreeMap::new();
        for line in out.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if let [name, n] = cols[..] {
                m.insert(
                    name.to_string(),
                    n.parse()
                        .map_err(|e| anyhow::anyhow!("consumers of {name}: {e}"))?,
                );
            }
        }
        Ok(m)
    }

    /// `rabbitmqctl -n NAME args...`; returns stdout, errors include stderr.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(CTL);
        self.env(&mut cmd);
        cmd.arg("-n").arg(&self.name).args(args);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(CTL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow!("rabbitmqctl -n {} {args:?} timed out", self.name))?
            .context("running rabbitmqctl")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "rabbitmqctl -n {} {:?} failed ({}): {}{}",
                self.name,
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                if stdout.trim().is_empty() {
                    String::new()
                } else {
                    format!("\nstdout: {}", stdout.trim())
                }
            );
        }
        Ok(stdout)
    }

    /// `add_vhost` + `set_permissions guest ".*" ".*" ".*"`.
    pub async fn create_vhost(&self, name: &str) -> Result<()> {
        self.ctl(&["add_vhost", name]).await?;
        self.ctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
            .await?;
        Ok(())
    }

    /// Creates a uniquely named vhost and returns its name.
    pub async fn fresh_vhost(&self) -> Result<String> {
        let name = format!("t-{}", uuid::Uuid::new_v4().simple());
        self.create_vhost(&name).await?;
        Ok(name)
    }

    pub async fn stop_app(&self) -> Result<()> {
        self.ctl(&["stop_app"]).await.map(drop)
    }

    pub async fn start_app(&self) -> Result<()> {
        self.ctl(&["start_app"]).await?;
        self.ctl(&["await_startup"]).await.map(drop)
    }

    pub async fn close_all_connections(&self) -> Result<()> {
        self.ctl(&["close_all_connections", "--global", "drawbridge-testkit"])
            .await
            .map(drop)
    }

    fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("beam.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// SIGKILLs this node's `beam.smp` (a crash), then its whole process group, and waits.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(pid) = self.beam_pid().and_then(|p| i32::try_from(p).ok()) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        kill_group(child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {} watchdog did not exit after SIGKILL", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // wait until the beam is really gone (it may take a moment to be reaped)
        if let Some(pid) = self.beam_pid() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Starts the node again (after `kill` or an exit) with the same name, ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill().await?;
        }
        self.spawn()?;
        self.wait_ready().await
    }

    /// Messages (ready + unacked) in `queue` of `vhost`.
    pub async fn queue_depth(&self, vhost: &str, queue: &str) -> Result<u64> {
        let out = self
            .ctl(&[
                "list_queues",
                "-p",
                vhost,
                "--quiet",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .await?;
        for line in out.lines() {
            if let Some((n, m)) = line.rsplit_once('\t') {
                if n == queue {
                    return m
                        .trim()
                        .parse()
                        .with_context(|| format!("parsing depth from {line:?}"));
                }
            }
        }
        bail!("queue {queue:?} not found in vhost {vhost:?}: {out}")
    }

    /// Options the node was started with.
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }
}

/// SIGKILL every process in the group led by the watchdog `pgid`.
fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        let _ = signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id());
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One node per test-binary process, booted on first use (each test should then use its own
/// `fresh_vhost()`). Safe from concurrent `#[tokio::test]`s: the boot runs on a dedicated
/// thread with its own runtime; the stored node holds no runtime-bound objects. Panics if the
/// node cannot boot. Killed by its watchdog when the process exits.
pub async fn shared_node() -> &'static RabbitNode {
    static SHARED: OnceLock<std::result::Result<RabbitNode, String>> = OnceLock::new();
    let r = match SHARED.get() {
        Some(r) => r,
        None => tokio::task::spawn_blocking(|| {
            SHARED.get_or_init(|| {
                std::thread::spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    rt.block_on(RabbitNode::start(NodeOptions::default()))
                        .map_err(|e| format!("{e:#}"))
                })
                .join()
                .unwrap_or_else(|_| Err("shared node boot thread panicked".into()))
            })
        })
        .await
        .expect("shared_node boot task"),
    };
    match r {
        Ok(n) => n,
        Err(e) => panic!("shared RabbitMQ node failed to boot: {e}"),
    }
}

/// A RabbitMQ cluster of private nodes (`nodes[0]` is the seed).
#[derive(Debug)]
pub struct RabbitCluster {
    pub nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Boots `n` nodes in parallel and joins nodes 1.. to node 0.
    pub async fn start(n: usize, opts: NodeOptions) -> Result<Self> {
        anyhow::ensure!(n >= 1, "a cluster needs at least one node");
        let results =
            futures::future::join_all((0..n).map(|_| RabbitNode::start(opts.clone()))).await;
        let nodes = results.into_iter().collect::<Result<Vec<_>>>()?;
        let seed = nodes[0].name().to_string();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["reset"]).await?;
            node.ctl(&["join_cluster", &seed]).await?;
            node.ctl(&["start_app"]).await?;
            node.ctl(&["await_startup"]).await?;
        }
        Ok(RabbitCluster { nodes })
    }

    /// One AMQP URI per node for `vhost`.
    pub fn uris(&self, vhost: &str) -> Vec<String> {
        self.nodes.iter().map(|n| n.amqp_uri(vhost)).collect()
    }

    /// Creates the vhost (cluster-wide) with guest permissions.
    pub async fn create_vhost(&self, name: &str) -> Result<()> {
        self.nodes[0].create_vhost(name).await
    }

    /// Creates a uniquely named vhost and returns its name.
    pub async fn fresh_vhost(&self) -> Result<String> {
        self.nodes[0].fresh_vhost().await
    }
}
