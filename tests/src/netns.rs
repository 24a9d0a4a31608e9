//! A small network world built from Linux network namespaces, for the tunnel-mode tests: a
//! float in a DMZ must never open a connection toward the inside network, and here the
//! kernel, not the float, decides what can reach what.
//!
//! ```text
//!   inside = the root namespace        dmz (namespace)                outside (namespace)
//!   tests, RabbitMQ, bridge            float                          peers
//!   inside_addr ──── veth ──── dmz_inside_addr   dmz_public_addr ──── veth ──── outside_addr
//! ```
//!
//! - The dmz does not forward (`net.ipv4.ip_forward=0` in it) and nobody has more than
//!   connected routes, so the outside and the inside cannot reach each other at all.
//! - nftables, in a table of the world's own in the root namespace, drops every new
//!   connection arriving from the dmz link; answers to connections the inside opened pass.
//!   The dmz drops new connections toward the inside link on their way out as well (belt and
//!   braces). [`NetWorld::set_firewall`] lifts both, to show a test could fail.
//! - Everything belongs to one world: two namespaces, two veth pairs and one nftables table
//!   in the root namespace, all named after the owning pid and a per-process counter. Drop
//!   removes them; no other table is ever touched (the ruleset is never flushed). Worlds that
//!   a killed test run left behind are removed by the next [`NetWorld::build`].
//!
//! Sockets keep the namespace they were created in, so [`NetWorld::connect_from`] and
//! [`NetWorld::listen_in`] create theirs on a short-lived thread moved into the namespace
//! (`setns(2)` through `rustix`; the kit forbids `unsafe`). [`NetWorld::forward_from`] turns
//! that into a loopback address any existing client can dial to act as a host in `outside`.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` (iproute2) and `nft` (nftables, see
//! `scripts/install-deps.sh`). Without them [`NetWorld::build`] fails with [`Unavailable`],
//! which a test turns into a skip ([`NetWorld::build_or_skip`]), except under `CI=true`.

use std::{
    collections::BTreeSet,
    fmt,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, OnceLock,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

/// Start of every name a world creates (namespaces, veths); the table's is [`TABLE_PREFIX`].
const PREFIX: &str = "db";
/// Start of the root-namespace table's name (`drawbridge_<pid>x<n>`).
const TABLE_PREFIX: &str = "drawbridge_";
/// The dmz namespace's own table: that namespace is the world's, so a fixed name is enough.
const DMZ_TABLE: &str = "drawbridge";
/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Serialises building (and stale cleanup) across threads and processes, so two worlds never
/// pick the same addresses and a cleanup never sees a half-built world.
const LOCK_FILE: &str = "/run/drawbridge-testkit-netns.lock";
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;
/// How long a [`Forward`] waits for its connection from the namespace.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Worlds of this process, by counter: the ones a stale cleanup must leave alone although
/// their pid (ours) is alive. Anything else named after our pid is from an earlier process
/// that had the same pid.
static LIVE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// One of the world's namespaces (the inside is the root namespace: no `Ns` needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ns {
    /// Between the two links; where the float runs.
    Dmz,
    /// Beyond the dmz; where peers are.
    Outside,
}

/// Why a world cannot be built on this machine (not root, `ip` or `nft` missing): a test may
/// skip on it, except under `CI=true`, where [`NetWorld::build`] returns a plain error.
#[derive(Debug)]
pub struct Unavailable(String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "network namespace tests unavailable: {} (they need root, iproute2 and nftables: \
             run scripts/install-deps.sh as root)",
            self.0
        )
    }
}

impl std::error::Error for Unavailable {}

/// The two programs a world is built with.
#[derive(Debug, Clone)]
struct Tools {
    ip: PathBuf,
    nft: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools, Unavailable> {
        if !rustix::process::geteuid().is_root() {
            return Err(Unavailable("not running as root".into()));
        }
        let ip = find_program("ip").ok_or_else(|| Unavailable("`ip` not found".into()))?;
        let nft = find_program("nft").ok_or_else(|| Unavailable("`nft` not found".into()))?;
        Ok(Tools { ip, nft })
    }
}

/// `name` on `PATH` or in the sbin directories (which a non-login `PATH` may lack).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The `ip` program (for [`crate::daemon::Daemon::start_in`]).
pub(crate) fn ip_program() -> PathBuf {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| find_program("ip").unwrap_or_else(|| "ip".into()))
        .clone()
}

/// A built world; dropping it takes everything down again.
#[derive(Debug)]
pub struct NetWorld {
    tools: Tools,
    /// `<pid>x<n>`.
    id: String,
    serial: u32,
    dmz: String,
    outside: String,
    /// Root end of the inside link.
    inside_veth: String,
    /// Dmz end of the inside link.
    dmz_inside_veth: String,
    table: String,
    subnet: Ipv4Addr,
}

impl NetWorld {
    /// Build a world: namespaces, links, addresses, no forwarding in the dmz, the firewall.
    ///
    /// Removes stale worlds of dead processes first. Fails with [`Unavailable`] (a skip) when
    /// not root or `ip`/`nft` are missing, unless `CI=true`: there a missing world is an
    /// error, since a skipped test proves nothing.
    pub fn build() -> Result<NetWorld> {
        let tools = match Tools::find() {
            Ok(t) => t,
            Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
                bail!("{why} (CI=true, so this is an error, not a skip)")
            }
            Err(why) => return Err(why.into()),
        };
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {LOCK_FILE}"))?;

        let serial = NEXT.fetch_add(1, Ordering::Relaxed);
        live().insert(serial);
        if let Err(e) = cleanup_stale_with(&tools) {
            eprintln!("netns: cleaning up stale worlds: {e:#}");
        }
        let id = format!("{}x{serial}", std::process::id());
        let subnet = match pick_subnet(&tools, std::process::id(), serial) {
            Ok(s) => s,
            Err(e) => {
                live().remove(&serial);
                return Err(e);
            }
        };
        // From here on, dropping `world` (on any error below) removes what was made.
        let world = NetWorld {
            dmz: format!("{PREFIX}{id}-dmz"),
            outside: format!("{PREFIX}{id}-out"),
            inside_veth: format!("{PREFIX}{id}a"),
            dmz_inside_veth: format!("{PREFIX}{id}b"),
            table: format!("{TABLE_PREFIX}{id}"),
            tools,
            id,
            serial,
            subnet,
        };
        if world.inside_veth.len() > IFNAME_MAX {
            bail!("interface name {} too long", world.inside_veth);
        }
        world.create()?;
        drop(lock);
        Ok(world)
    }

    /// [`NetWorld::build`], printing why and returning `None` when the machine cannot build
    /// worlds (and `CI` is not `true`): `let Some(w) = NetWorld::build_or_skip("name")? else
    /// { return Ok(()) };`.
    pub fn build_or_skip(test: &str) -> Result<Option<NetWorld>> {
        match NetWorld::build() {
            Ok(w) => Ok(Some(w)),
            Err(e) if e.downcast_ref::<Unavailable>().is_some() => {
                eprintln!("skipping {test}: {e}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn create(&self) -> Result<()> {
        let (dmz, out) = (self.dmz.as_str(), self.outside.as_str());
        let (a, b) = (self.inside_veth.as_str(), self.dmz_inside_veth.as_str());
        let (c, d) = (
            format!("{PREFIX}{}c", self.id),
            format!("{PREFIX}{}d", self.id),
        );
        let cidr = |addr: Ipv4Addr| format!("{addr}/30");
        self.ip(&["netns", "add", dmz])?;
        self.ip(&["netns", "add", out])?;
        self.ip(&[
            "link", "add", a, "type", "veth", "peer", "name", b, "netns", dmz,
        ])?;
        self.ip(&[
            "link", "add", &c, "netns", dmz, "type", "veth", "peer", "name", &d, "netns", out,
        ])?;
        self.ip(&["addr", "add", &cidr(self.inside_addr()), "dev", a])?;
        self.ip(&["link", "set", a, "up"])?;
        for (ns, dev, addr) in [
            (dmz, b, self.dmz_inside_addr()),
            (dmz, c.as_str(), self.dmz_public_addr()),
            (out, d.as_str(), self.outside_addr()),
        ] {
            self.ip(&["-n", ns, "addr", "add", &cidr(addr), "dev", dev])?;
            self.ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        self.ip(&["-n", dmz, "link", "set", "lo", "up"])?;
        self.ip(&["-n", out, "link", "set", "lo", "up"])?;

        // New namespaces start with forwarding off, unless the host says to inherit its
        // settings (net.core.devconf_inherit_init_net): say it, and check.
        let forwarding = in_namespace_blocking(self.ns_path(Ns::Dmz), || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")?;
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        })?;
        if forwarding.trim() != "0" {
            bail!("ip_forward in {dmz} is {forwarding:?} after writing 0");
        }

        // The outside's subnet is routed nowhere from the inside but the default route: reject
        // it here so a test's stray connection never leaves the machine.
        self.nft(
            None,
            &format!(
                "table inet {t} {{\n\
                 \tchain input {{ type filter hook input priority 0; policy accept; }}\n\
                 \tchain forward {{ type filter hook forward priority 0; policy accept; }}\n\
                 \tchain output {{\n\
                 \t\ttype filter hook output priority 0; policy accept;\n\
                 \t\tip daddr {outside} reject with icmpx type host-unreachable\n\
                 \t}}\n\
                 }}\n",
                t = self.table,
                outside = self.outside_subnet(),
            ),
        )?;
        self.nft(
            Some(Ns::Dmz),
            &format!(
                "table inet {DMZ_TABLE} {{\n\
                 \tchain output {{ type filter hook output priority 0; policy accept; }}\n\
                 }}\n"
            ),
        )?;
        self.set_firewall(true)
    }

    /// Put the firewall up (`true`, as built) or take it down (`false`): the inside drops new
    /// connections from the dmz link, and the dmz drops new connections to the inside link.
    ///
    /// Down, the dmz can connect inward: for showing that a test would catch it, or that a
    /// daemon opens no inward connection even when nothing stops it.
    pub fn set_firewall(&self, up: bool) -> Result<()> {
        let (t, a, b) = (&self.table, &self.inside_veth, &self.dmz_inside_veth);
        let mut root = format!("flush chain inet {t} input\nflush chain inet {t} forward\n");
        let mut dmz = format!("flush chain inet {DMZ_TABLE} output\n");
        if up {
            root += &format!(
                "add rule inet {t} input iifname \"{a}\" ct state new drop\n\
                 add rule inet {t} forward iifname \"{a}\" ct state new drop\n"
            );
            dmz += &format!(
                "add rule inet {DMZ_TABLE} output oifname \"{b}\" ct state new drop\n\
                 add rule inet {DMZ_TABLE} output ip daddr {} ct state new drop\n",
                self.inside_subnet()
            );
        }
        self.nft(None, &root)?;
        self.nft(Some(Ns::Dmz), &dmz)
    }

    /// Root end of the inside link: where the dmz reaches the inside (and must not connect).
    pub fn inside_addr(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// Dmz end of the inside link: where the inside reaches the dmz (e.g. a float's admin
    /// port, so [`crate::daemon::Daemon::status`] works from the test).
    pub fn dmz_inside_addr(&self) -> Ipv4Addr {
        self.host(2)
    }

    /// Dmz end of the public link: where the outside reaches the dmz (a float's listener).
    /// Not from the inside: the outside's subnet is rejected there, lest a connection to it
    /// follow the default route off the machine.
    pub fn dmz_public_addr(&self) -> Ipv4Addr {
        self.host(5)
    }

    /// Outside end of the public link: the address peers in `outside` connect from.
    pub fn outside_addr(&self) -> Ipv4Addr {
        self.host(6)
    }

    /// Name of a namespace (for `ip netns exec`, [`crate::daemon::Daemon::start_in`]).
    pub fn ns_name(&self, ns: Ns) -> &str {
        match ns {
            Ns::Dmz => &self.dmz,
            Ns::Outside => &self.outside,
        }
    }

    /// Name of the world's nftables table in the root namespace (family `inet`).
    pub fn root_table(&self) -> &str {
        &self.table
    }

    /// Name of the root end of the inside link (the interface the firewall watches).
    pub fn inside_link(&self) -> &str {
        &self.inside_veth
    }

    /// `ip netns exec <ns> <program>`: `ip` execs the program, so the child's pid is the
    /// program's (signals and `/proc/<pid>` reach it, not `ip`).
    pub fn command(&self, ns: Ns, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.tools.ip);
        cmd.args(["netns", "exec", self.ns_name(ns)]).arg(program);
        cmd
    }

    /// Run `f` on a new thread moved into `ns` (the thread ends with it, so no thread of the
    /// process stays in the namespace): what `f` creates there, sockets included, belongs to
    /// that namespace.
    pub async fn run_in<T, F>(&self, ns: Ns, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        in_namespace(self.ns_path(ns), f).await
    }

    /// A TCP connection from `ns` to `addr` (its socket lives in `ns`), within `timeout`.
    /// A connection the firewall drops fails with `TimedOut`.
    pub async fn connect_from(
        &self,
        ns: Ns,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        connect_in(self.ns_path(ns), addr, timeout).await
    }

    /// A TCP listener on `addr` in `ns` (e.g. a service in the dmz or outside).
    pub async fn listen_in(&self, ns: Ns, addr: SocketAddr) -> io::Result<TcpListener> {
        let listener = self
            .run_in(ns, move || {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .await?;
        TcpListener::from_std(listener)
    }

    /// A relay on `127.0.0.1:<ephemeral>` in the root namespace whose every connection is
    /// carried on to `target` from `ns`: any client of the kit that dials an address can so
    /// act as a host in `ns` (the far end sees `outside_addr` for [`Ns::Outside`]).
    ///
    /// When the connection from `ns` fails, the accepted connection is closed.
    pub async fn forward_from(&self, ns: Ns, target: SocketAddr) -> Result<Forward> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let path = self.ns_path(ns);
        let task = tokio::spawn(async move {
            // Dropping the set (when the task is aborted) aborts every relayed connection.
            let mut relays = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let path = path.clone();
                        relays.spawn(async move {
                            match connect_in(path, target, FORWARD_CONNECT_TIMEOUT).await {
                                Ok(mut outbound) => {
                                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                        .await;
                                }
                                Err(e) => tracing::debug!("forward to {target}: {e}"),
                            }
                        });
                    }
                    Some(_) = relays.join_next(), if !relays.is_empty() => {}
                }
            }
        });
        Ok(Forward { addr, task })
    }

    /// `/run/netns/<name>`: the handle `setns(2)` takes.
    fn ns_path(&self, ns: Ns) -> PathBuf {
        Path::new(NETNS_DIR).join(self.ns_name(ns))
    }

    /// The `n`th address of the world's /29 (0..4: inside link, 4..8: public link).
    fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + n)
    }

    fn inside_subnet(&self) -> String {
        format!("{}/30", self.host(0))
    }

    fn outside_subnet(&self) -> String {
        format!("{}/30", self.host(4))
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run(&self.tools.ip, &[], args, None)
    }

    /// `nft -f -` with `script`, in the root namespace or `ns`.
    fn nft(&self, ns: Option<Ns>, script: &str) -> Result<()> {
        let nft = self.tools.nft.to_string_lossy().into_owned();
        match ns {
            None => run(&self.tools.nft, &[], &["-f", "-"], Some(script)),
            Some(ns) => run(
                &self.tools.ip,
                &["netns", "exec", self.ns_name(ns)],
                &[&nft, "-f", "-"],
                Some(script),
            ),
        }
    }
}

impl Drop for NetWorld {
    fn drop(&mut self) {
        let errors = teardown(
            &self.tools,
            &[&self.dmz, &self.outside],
            Some(&self.table),
            Some(&self.inside_veth),
        );
        for e in errors {
            eprintln!("netns: tearing down world {}: {e:#}", self.id);
        }
        live().remove(&self.serial);
    }
}

/// A relay made by [`NetWorld::forward_from`]; stops (with its connections) when dropped.
#[derive(Debug)]
pub struct Forward {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Forward {
    /// Where to connect (loopback, root namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Remove the worlds of processes that no longer exist (their namespaces, after killing what
/// still runs in them, their root table and root veth), as [`NetWorld::build`] does first:
/// a test run killed with SIGKILL never ran its drops. Returns how many things it removed.
pub fn cleanup_stale() -> Result<usize> {
    let tools = Tools::find()?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
    cleanup_stale_with(&tools)
}

fn cleanup_stale_with(tools: &Tools) -> Result<usize> {
    let mut namespaces = Vec::new();
    if let Ok(dir) = std::fs::read_dir(NETNS_DIR) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner(&name, PREFIX, &["-dmz", "-out"]).is_some_and(stale) {
                namespaces.push(name);
            }
        }
    }
    let tables: Vec<String> = output(&tools.nft, &["list", "tables"])?
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .map(str::trim)
        .filter(|name| owner(name, TABLE_PREFIX, &[""]).is_some_and(stale))
        .map(String::from)
        .collect();
    let links: Vec<String> = output(&tools.ip, &["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter(|name| owner(name, PREFIX, &["a"]).is_some_and(stale))
        .map(String::from)
        .collect();
    let count = namespaces.len() + tables.len() + links.len();
    let ns: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    let mut errors = teardown(tools, &ns, None, None);
    for t in &tables {
        errors.extend(teardown(tools, &[], Some(t), None));
    }
    for l in &links {
        errors.extend(teardown(tools, &[], None, Some(l)));
    }
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(count)
}

/// `(pid, serial)` of a name `<prefix><pid>x<serial><suffix>` with one of `suffixes`.
fn owner(name: &str, prefix: &str, suffixes: &[&str]) -> Option<(u32, u32)> {
    let rest = name.strip_prefix(prefix)?;
    let (pid, rest) = rest.split_once('x')?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (serial, suffix) = rest.split_at(digits);
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(serial) || !suffixes.contains(&suffix) {
        return None;
    }
    Some((pid.parse().ok()?, serial.parse().ok()?))
}

/// Whether the world `(pid, serial)` has no owner any more: its process is gone, or it is
/// named after our pid but is none of ours (an earlier process with the same pid).
fn stale((pid, serial): (u32, u32)) -> bool {
    if pid == std::process::id() {
        !live().contains(&serial)
    } else {
        !Path::new("/proc").join(pid.to_string()).exists()
    }
}

fn live() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remove namespaces (killing what still runs in them: it would keep them alive), a root
/// table and a root veth (its peer goes with it), ignoring what is already gone.
fn teardown(
    tools: &Tools,
    namespaces: &[&str],
    table: Option<&str>,
    link: Option<&str>,
) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    let gone = |e: &anyhow::Error| {
        let s = format!("{e:#}");
        s.contains("No such file") || s.contains("Cannot find device") || s.contains("not exist")
    };
    let mut keep = |r: Result<()>| {
        if let Err(e) = r {
            if !gone(&e) {
                errors.push(e);
            }
        }
    };
    for ns in namespaces {
        if let Ok(pids) = output(&tools.ip, &["netns", "pids", ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    if let Some(t) = table {
        keep(run(&tools.nft, &[], &["delete", "table", "inet", t], None));
    }
    if let Some(l) = link {
        keep(run(&tools.ip, &[], &["link", "del", l], None));
    }
    for ns in namespaces {
        keep(run(&tools.ip, &[], &["netns", "del", ns], None));
    }
    errors
}

/// A /29 in 10.0.0.0/8 for world `(pid, serial)` that overlaps no route or address of the
/// root namespace (other worlds' included: their inside links are routes here). Starts
/// from a spread of pid and serial, so parallel worlds rarely probe the same slots.
fn pick_subnet(tools: &Tools, pid: u32, serial: u32) -> Result<Ipv4Addr> {
    const SLOTS: u32 = 1 << 21; // /29s in a /8
    let routes = output(&tools.ip, &["-4", "-o", "route", "show", "table", "all"])?;
    let taken: Vec<(u32, u32)> = routes.lines().filter_map(route_prefix).collect();
    let start = (pid.wrapping_mul(2_654_435_761) ^ serial.wrapping_mul(40_503)) % SLOTS;
    for i in 0..4096 {
        let base = (10 << 24) | (((start + i) % SLOTS) << 3);
        let overlaps = taken.iter().any(|&(net, len)| {
            let len = len.min(29);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            net & mask == base & mask
        });
        if !overlaps {
            return Ok(Ipv4Addr::from(base));
        }
    }
    bail!("no free /29 in 10.0.0.0/8 near slot {start}")
}

/// `(network, prefix length)` of one line of `ip -4 -o route show table all`, if it names
/// a destination (`default` does not: it overlaps everything and is no world's).
fn route_prefix(line: &str) -> Option<(u32, u32)> {
    const TYPES: &[&str] = &[
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "anycast",
        "unreachable",
        "blackhole",
        "prohibit",
        "throw",
        "nat",
    ];
    let mut words = line.split_whitespace();
    let mut dest = words.next()?;
    if TYPES.contains(&dest) {
        dest = words.next()?;
    }
    let (addr, len) = match dest.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (dest, 32),
    };
    Some((u32::from(addr.parse::<Ipv4Addr>().ok()?), len))
}

/// Run `program pre.. args..` (with `stdin` fed in), failing with its stderr.
fn run(program: &Path, pre: &[&str], args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write as _;
    let mut cmd = std::process::Command::new(program);
    cmd.args(pre)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let described = || format!("{} {} {}", program.display(), pre.join(" "), args.join(" "));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", described()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            described(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Standard output of `program args..`.
fn output(program: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Move the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> io::Result<()> {
    let handle = File::open(path)?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&handle),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// Run `f` on a new thread in the namespace at `path`, blocking until it is done.
fn in_namespace_blocking<T, F>(path: PathBuf, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || enter(&path).and_then(|()| f()))?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Run `f` on a new thread in the namespace at `path` (never a pooled thread: it would stay
/// in the namespace), awaiting its result.
async fn in_namespace<T, F>(path: PathBuf, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let _ = tx.send(enter(&path).and_then(|()| f()));
        })?;
    rx.await
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

async fn connect_in(path: PathBuf, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = in_namespace(path, move || {
        let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .await?;
    TcpStream::from_std(stream)
}

/// A TCP socket's state, as `/proc/net/tcp` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    /// A number this list does not know.
    Other(u8),
}

impl TcpState {
    fn from_proc(n: u8) -> TcpState {
        use TcpState::*;
        match n {
            0x01 => Established,
            0x02 => SynSent,
            0x03 => SynRecv,
            0x04 => FinWait1,
            0x05 => FinWait2,
            0x06 => TimeWait,
            0x07 => Close,
            0x08 => CloseWait,
            0x09 => LastAck,
            0x0A => Listen,
            0x0B => Closing,
            0x0C => NewSynRecv,
            other => Other(other),
        }
    }
}

/// One line of `/proc/<pid>/net/tcp` or `tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// The socket's own address.
    pub local: SocketAddr,
    /// Its peer (`0.0.0.0:0` or `[::]:0` for a listener).
    pub remote: SocketAddr,
    /// Where the connection is (a dropped SYN stays `SynSent`).
    pub state: TcpState,
    /// Socket inode: `/proc/<pid>/fd/*` links to `socket:[inode]` for the ones it holds.
    pub inode: u64,
}

/// The TCP sockets (IPv4 and IPv6) of the network namespace `pid` is in: for a daemon alone
/// in the dmz, all of its sockets (connections being opened, `SynSent`, included).
///
/// An error, not an empty list, when the process is gone: "no inward socket" must not pass
/// because nothing was read.
pub fn tcp_sockets_of(pid: u32) -> io::Result<Vec<TcpSocket>> {
    let mut sockets = Vec::new();
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{file}");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // No IPv6 in this kernel: only tcp6 may be missing.
            Err(e) if file == "tcp6" && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let socket = parse_tcp_line(line)
                .ok_or_else(|| io::Error::other(format!("{path}: cannot parse {line:?}")))?;
            sockets.push(socket);
        }
    }
    Ok(sockets)
}

fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(TcpSocket {
        local: parse_proc_addr(fields.get(1)?)?,
        remote: parse_proc_addr(fields.get(2)?)?,
        state: TcpState::from_proc(u8::from_str_radix(fields.get(3)?, 16).ok()?),
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// `0100007F:1F90` (the kernel prints the address as 32-bit words in host byte order).
fn parse_proc_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// What `pid` has open: the targets of `/proc/<pid>/fd/*` (files, `socket:[inode]`,
/// `pipe:[..]`, ...). An error when the process is gone.
pub fn open_files_of(pid: u32) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        match std::fs::read_link(entry?.path()) {
            Ok(target) => files.push(target),
            // Closed between the listing and the look.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed_strictly() {
        assert_eq!(
            owner("db123x4-dmz", PREFIX, &["-dmz", "-out"]),
            Some((123, 4))
        );
        assert_eq!(owner("db123x4a", PREFIX, &["a"]), Some((123, 4)));
        assert_eq!(owner("drawbridge_9x0", TABLE_PREFIX, &[""]), Some((9, 0)));
        for other in [
            "db123x4b",
            "dbx4a",
            "db12x",
            "docker0",
            "db1x2-dmzz",
            "db1y2a",
        ] {
            assert_eq!(owner(other, PREFIX, &["a", "-dmz"]), None, "{other}");
        }
        assert_eq!(owner("drawbridge", TABLE_PREFIX, &[""]), None);
    }

    #[test]
    fn proc_net_tcp_lines_are_parsed() {
        let v4 = "   0: 0100007F:1F90 0200000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1";
        let s = parse_tcp_line(v4).unwrap();
        assert_eq!(s.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.remote, "10.0.0.2:50000".parse().unwrap());
        assert_eq!(s.state, TcpState::Established);
        assert_eq!(s.inode, 4242);
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 100 0 0 10 0";
        let s = parse_tcp_line(v6).unwrap();
        assert_eq!(s.local, "[::1]:8080".parse().unwrap());
        assert_eq!(s.state, TcpState::Listen);
    }

    #[test]
    fn route_lines_give_their_destination() {
        assert_eq!(route_prefix("default via 192.0.2.1 dev eth0"), None);
        assert_eq!(
            route_prefix("192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2"),
            Some((u32::from(Ipv4Addr::new(192, 0, 2, 0)), 24))
        );
        assert_eq!(
            route_prefix("local 10.1.2.1 dev dbx table local proto kernel scope host"),
            Some((u32::from(Ipv4Addr::new(10, 1, 2, 1)), 32))
        );
    }
}
