//! Self-test of the network-namespace world (`drawbridge_testkit::netns`), with real sockets:
//! the inside reaches the dmz and the dmz cannot reach back, unless the firewall is taken
//! down (so these checks can fail); the outside reaches the dmz through a relay and cannot
//! reach the inside; processes and daemons started there live in the dmz's namespace; and
//! nothing of a world is left once it is dropped.
//!
//! Skipped, saying why, where worlds cannot be built (not root, no `ip` or `nft`), except
//! under `CI=true`.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use drawbridge_testkit::{
    daemon::{binary, free_port, Daemon, Kind},
    netns::{open_files_of, tcp_sockets_of, NetWorld, Ns, TcpState},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// How long a connection the firewall drops is given.
const DROPPED: Duration = Duration::from_secs(1);

/// Send `ping` one way and `pong` the other over an established pair.
async fn exchange(a: &mut TcpStream, b: &mut TcpStream) -> Result<()> {
    let mut buf = [0u8; 4];
    a.write_all(b"ping").await?;
    b.read_exact(&mut buf).await?;
    ensure!(&buf == b"ping", "{buf:?}");
    b.write_all(b"pong").await?;
    a.read_exact(&mut buf).await?;
    ensure!(&buf == b"pong", "{buf:?}");
    Ok(())
}

/// Accept one connection within a second.
async fn accept(listener: &TcpListener) -> Result<(TcpStream, SocketAddr)> {
    Ok(
        tokio::time::timeout(Duration::from_secs(1), listener.accept())
            .await
            .context("no connection accepted")??,
    )
}

/// `/proc/<pid>/ns/net` as `net:[inode]`.
fn netns_of(pid: u32) -> Result<PathBuf> {
    Ok(std::fs::read_link(format!("/proc/{pid}/ns/net"))?)
}

/// What `/proc/<pid>/ns/net` says for a process in the world's namespace `ns`.
fn netns_link(world: &NetWorld, ns: Ns) -> Result<PathBuf> {
    let ino = std::fs::metadata(Path::new("/run/netns").join(world.ns_name(ns)))?.ino();
    Ok(PathBuf::from(format!("net:[{ino}]")))
}

/// Wait until `pid` runs `program` (after `ip netns exec` has exec'd it).
async fn wait_exe(pid: u32, program: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        if exe == program {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "pid {pid} runs {exe:?}, not {program:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn world_leftovers(world_names: &[String], table: &str) -> Result<Vec<String>> {
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()?;
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()?;
    let text = format!(
        "{}{}{}",
        String::from_utf8_lossy(&namespaces.stdout),
        String::from_utf8_lossy(&tables.stdout),
        String::from_utf8_lossy(&links.stdout)
    );
    Ok(world_names
        .iter()
        .map(String::as_str)
        .chain([table])
        .filter(|name| {
            text.split(|c: char| c.is_whitespace() || c == ':' || c == '@')
                .any(|w| w == *name)
        })
        .map(String::from)
        .collect())
}

#[tokio::test]
async fn the_inside_reaches_the_dmz_and_the_dmz_cannot_connect_back() -> Result<()> {
    let started = Instant::now();
    let Some(w) = NetWorld::build_or_skip("netns firewall test")? else {
        return Ok(());
    };
    eprintln!("netns world built in {:?}", started.elapsed());

    // Inside -> dmz: a listener in the dmz, a connection from the test (root namespace).
    let dmz = w
        .listen_in(Ns::Dmz, SocketAddr::new(w.dmz_inside_addr().into(), 0))
        .await?;
    let mut from_inside = TcpStream::connect(dmz.local_addr()?).await?;
    let (mut in_dmz, peer) = accept(&dmz).await?;
    assert_eq!(peer.ip(), w.inside_addr());
    exchange(&mut from_inside, &mut in_dmz).await?;

    // Dmz -> inside: a listener on the inside link; the dmz's SYN is dropped.
    let inside = TcpListener::bind((w.inside_addr(), 0)).await?;
    let target = inside.local_addr()?;
    let err = w
        .connect_from(Ns::Dmz, target, DROPPED)
        .await
        .expect_err("the firewall lets the dmz connect inward");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");

    // The same connection with the firewall down goes through: the rules are what stopped it.
    w.set_firewall(false)?;
    let mut from_dmz = w.connect_from(Ns::Dmz, target, DROPPED).await?;
    let (mut accepted, peer) = accept(&inside).await?;
    assert_eq!(peer.ip(), w.dmz_inside_addr());
    exchange(&mut from_dmz, &mut accepted).await?;
    w.set_firewall(true)?;
    let err = w
        .connect_from(Ns::Dmz, target, DROPPED)
        .await
        .expect_err("the firewall is up again");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    // The connection the inside opened earlier still carries data both ways.
    exchange(&mut from_inside, &mut in_dmz).await?;

    // Outside -> dmz, through a relay: the dmz sees the outside's address.
    let public = w
        .listen_in(Ns::Dmz, SocketAddr::new(w.dmz_public_addr().into(), 0))
        .await?;
    let relay = w.forward_from(Ns::Outside, public.local_addr()?).await?;
    let mut peer_client = TcpStream::connect(relay.addr()).await?;
    let (mut in_dmz, peer) = accept(&public).await?;
    assert_eq!(peer.ip(), w.outside_addr());
    exchange(&mut peer_client, &mut in_dmz).await?;
    drop(relay);

    // Outside -> inside: no route at all (and the dmz would not forward).
    let err = w
        .connect_from(Ns::Outside, target, DROPPED)
        .await
        .expect_err("the outside reached the inside");
    assert_eq!(err.kind(), io::ErrorKind::NetworkUnreachable, "{err}");
    let forwarding = w
        .command(Ns::Dmz, "cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .await?;
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout).trim(), "0");
    // Nothing from the dmz ever reached the inside's listener but the one let through.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), inside.accept())
            .await
            .is_err()
    );

    // Dropped: nothing of the world is left (namespaces, root table, root veth).
    let names = vec![
        w.ns_name(Ns::Dmz).to_string(),
        w.ns_name(Ns::Outside).to_string(),
        w.inside_link().to_string(),
    ];
    let table = w.root_table().to_string();
    assert_eq!(
        world_leftovers(&names, &table)?.len(),
        4,
        "seen while alive"
    );
    drop(w);
    assert_eq!(world_leftovers(&names, &table)?, Vec::<String>::new());
    eprintln!("netns firewall test: {:?}", started.elapsed());
    Ok(())
}

/// A process started with `command` runs in the dmz's namespace under its own pid, sees the
/// dmz's sockets in `/proc/<pid>/net/tcp`, and is killed when the world goes.
#[tokio::test]
async fn processes_started_in_the_dmz_live_in_its_namespace() -> Result<()> {
    let Some(w) = NetWorld::build_or_skip("netns process test")? else {
        return Ok(());
    };
    let mut sleep = w
        .command(Ns::Dmz, "sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()?;
    let pid = sleep.id().context("no pid")?;
    wait_exe(pid, Path::new("/usr/bin/sleep")).await?;
    assert_ne!(netns_of(pid)?, netns_of(std::process::id())?);
    assert_eq!(netns_of(pid)?, netns_link(&w, Ns::Dmz)?);

    // Its namespace's sockets: a dmz listener is there, the test's own loopback one is not.
    let dmz = w
        .listen_in(Ns::Dmz, SocketAddr::new(w.dmz_public_addr().into(), 0))
        .await?;
    let ours = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let sockets = tcp_sockets_of(pid)?;
    assert!(
        sockets
            .iter()
            .any(|s| s.local == dmz.local_addr().unwrap() && s.state == TcpState::Listen),
        "{sockets:?}"
    );
    assert!(
        !sockets
            .iter()
            .any(|s| s.local == ours.local_addr().unwrap()),
        "{sockets:?}"
    );
    assert!(tcp_sockets_of(std::process::id())?
        .iter()
        .any(|s| s.local == ours.local_addr().unwrap()));

    // Open files: one the test holds shows up in its own list.
    let held = tempfile::NamedTempFile::new()?;
    assert!(open_files_of(std::process::id())?.contains(&held.path().to_path_buf()));

    // Dropping the world kills what still runs in it (it would keep the namespace alive).
    drop(w);
    let status = tokio::time::timeout(Duration::from_secs(5), sleep.wait()).await??;
    assert!(!status.success(), "{status}");
    assert!(
        tcp_sockets_of(pid).is_err(),
        "a gone process has no sockets to show"
    );
    Ok(())
}

/// A float started with `Daemon::start_in` runs in the dmz under the pid the test holds,
/// answers on its admin port at `dmz_inside_addr`, and its attempt to reach a broker on the
/// inside is dropped: seen as `SynSent` in its sockets, never accepted. `kill9` and `restart`
/// keep it there.
#[tokio::test]
async fn a_float_started_in_the_dmz_cannot_reach_its_broker_inside() -> Result<()> {
    let Some(w) = NetWorld::build_or_skip("netns daemon test")? else {
        return Ok(());
    };
    drawbridge_certs::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let net = drawbridge_certs::devpki::generate_network(
        &dir.path().join("pki"),
        &[drawbridge_testkit::BANK_A.parse()?],
    )?;
    let files = &net.nodes[0];
    let broker = TcpListener::bind((w.inside_addr(), 0)).await?;
    let admin = SocketAddr::new(w.dmz_inside_addr().into(), free_port());
    let config = format!(
        "[float]\nlisten = \"{public}:{port}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
         trust_roots = {root:?}\n\n[broker]\nuris = [\"amqp://guest:guest@{broker}/\"]\n\n\
         [admin]\nlisten = \"{admin}\"\n",
        public = w.dmz_public_addr(),
        port = free_port(),
        cert = files.tls_cert.display().to_string(),
        key = files.tls_key.display().to_string(),
        root = files.root_cert.display().to_string(),
        broker = broker.local_addr()?,
    );
    let started = Instant::now();
    let mut float = Daemon::start_in(
        w.ns_name(Ns::Dmz),
        Kind::Float,
        dir.path(),
        "float",
        &config,
        admin,
        &[],
    )
    .await?;
    eprintln!("float healthy in the dmz after {:?}", started.elapsed());
    let float_bin = binary(Kind::Float)?;

    for round in 0..2 {
        let pid = float.pid().context("float not running")?;
        wait_exe(pid, &float_bin).await?;
        assert_eq!(netns_of(pid)?, netns_link(&w, Ns::Dmz)?);
        assert!(float.status().await?.is_object());
        assert!(open_files_of(pid)?.contains(&float.log_path().to_path_buf()));

        // Its connection to the broker never gets past the SYN.
        let deadline = Instant::now() + Duration::from_secs(5);
        let broker_addr = broker.local_addr()?;
        loop {
            let sockets = tcp_sockets_of(pid)?;
            if sockets
                .iter()
                .any(|s| s.remote == broker_addr && s.state == TcpState::SynSent)
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "round {round}: no SYN toward the broker seen: {sockets:?}\n{}",
                float.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(50), broker.accept())
                .await
                .is_err(),
            "the float connected to the inside"
        );
        if round == 0 {
            float.kill9().await?;
            float.restart().await?;
        }
    }
    float.terminate(Duration::from_secs(10)).await?;
    Ok(())
}
