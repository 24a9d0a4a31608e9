//! Tunnel mode (issue 24, docs/tunnel.md), on loopback: B's float holds no broker
//! connection and no private key; B's bridge dials its tunnel, activates it, publishes what
//! it hands over and signs its handshakes. A's bridge links to B's float as to any float.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use drawbridge_testkit::{
    daemon::{free_port, Daemon, Kind},
    fixtures::{receive, send, two_orgs, TwoOrgs},
    netns::{open_files_of, tcp_sockets_of, NetWorld, Ns},
    world::{Org, TunnelPorts},
};

/// B's float in tunnel mode, its tunnel port, and the `[bridge]` lines of B's bridge that
/// dial it. The tunnel has its own CA (a dev network of its own), so no partner's
/// certificate could open a tunnel.
struct Tunnel {
    float: Daemon,
    bridge_lines: String,
}

/// Start B's float in tunnel mode at `at` (in the namespace `netns`, if any); the lines of a
/// B bridge dialling it come with it.
async fn start_tunnel_float(p: &TwoOrgs, at: &TunnelPorts, netns: Option<&str>) -> Result<Tunnel> {
    let b: &Org = &p.b;
    let t = b.tunnel_pki()?;
    let cfg = b.tunnel_float_config(&t, at, "");
    let float = match netns {
        Some(ns) => Daemon::start_in(ns, Kind::Float, &b.dir, "float", &cfg, at.admin, &[]).await?,
        None => Daemon::start(Kind::Float, &b.dir, "float", &cfg, at.admin).await?,
    };
    Ok(Tunnel {
        float,
        bridge_lines: Org::tunnel_bridge_lines(&t, at.tunnel),
    })
}

async fn float_status(addr: SocketAddr) -> Result<serde_json::Value> {
    let (code, body) = drawbridge_testkit::daemon::http_get(addr, "/status").await?;
    ensure!(code == 200, "/status answered {code}");
    Ok(serde_json::from_str(&body)?)
}

/// Wait until `f` holds for B's float's `/status`.
async fn wait_float(
    addr: SocketAddr,
    within: Duration,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(s) = float_status(addr).await {
            if f(&s) {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("float never {what}: {s:#}");
            }
        } else if tokio::time::Instant::now() > deadline {
            anyhow::bail!("float never {what}: no /status");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn active(s: &serde_json::Value) -> bool {
    s["tunnel"]["active"] == true
}

#[tokio::test]
async fn a_keyless_float_serves_peers_through_its_bridge_and_loses_nothing_when_the_bridge_dies(
) -> Result<()> {
    let mut p = two_orgs().await?;
    let tunnel = start_tunnel_float(
        &p,
        &TunnelPorts::loopback(p.b.float_port, p.b.float_admin),
        None,
    )
    .await?;
    let mut float = tunnel.float;
    // No bridge yet: the float is up but not ready, and refuses peers (it cannot sign).
    let s = wait_float(p.b.float_admin, Duration::from_secs(20), "answered", |_| {
        true
    })
    .await?;
    ensure!(s["mode"] == "tunnel" && !active(&s), "{s:#}");
    ensure!(
        s["broker"].is_null(),
        "a tunnel-mode float has no broker: {s:#}"
    );

    // A's link comes first: its handshakes fail cleanly (nothing can sign them), the float
    // says why.
    p.a.start_bridge("").await?;
    p.a.create_link_to(&p.b).await?;
    let queue = p.a.queue_to(&p.b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !float.log_contains("no active bridge to sign the handshake") {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no refusal logged: {}",
            float.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        p.a.wait_link_state(&queue, "up", Duration::from_secs(1))
            .await
            .is_err(),
        "a link came up with no bridge to sign its handshake"
    );

    p.b.start_bridge(&tunnel.bridge_lines).await?;
    let s = wait_float(
        p.b.float_admin,
        Duration::from_secs(20),
        "activated",
        active,
    )
    .await?;
    ensure!(s["ready"] == true, "{s:#}");
    p.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await
        .context("A's link to B's keyless float")?;
    let bs = p.b.bridge.as_ref().context("B's bridge")?.status().await?;
    ensure!(
        bs["tunnels"][0]["state"] == "up" && bs["tunnels"][0]["activated_epoch"].is_u64(),
        "B's bridge shows its tunnel up and activated: {bs:#}"
    );

    let n = 300;
    send(&p.a, &p.b, "tunnel-1", n).await?;
    let report = receive(&p.b, "tunnel-1", n, &p.a.legal_name).await?;
    ensure!(
        report.lost == 0 && report.wrong_sender == 0 && report.corrupted == 0,
        "through the tunnel: {report:?}"
    );
    let s = float_status(p.b.float_admin).await?;
    ensure!(
        s["tunnel"]["signatures"].as_u64().unwrap_or(0) >= 1,
        "the handshake was signed by the bridge: {s:#}"
    );
    ensure!(
        s["accepted"].as_u64() == Some(n),
        "accepted on outcomes: {s:#}"
    );

    // The bridge dies mid-stream: the float closes its peers and serves none until a bridge
    // is back; what A sent meanwhile waits in A's queue and arrives once, after.
    let mut b_bridge = p.b.bridge.take().context("B's bridge")?;
    let sending = send(&p.a, &p.b, "tunnel-2", 2000);
    let killing = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b_bridge.kill9().await
    };
    let (sent, killed) = tokio::join!(sending, killing);
    sent?;
    killed?;
    wait_float(
        p.b.float_admin,
        Duration::from_secs(20),
        "deactivated",
        |s| !active(s),
    )
    .await?;
    b_bridge.restart().await?;
    wait_float(
        p.b.float_admin,
        Duration::from_secs(30),
        "re-activated",
        active,
    )
    .await?;
    let report = receive(&p.b, "tunnel-2", 2000, &p.a.legal_name).await?;
    ensure!(
        report.lost == 0 && report.wrong_sender == 0 && report.corrupted == 0,
        "bridge killed mid-stream: {report:?}"
    );
    eprintln!("bridge killed mid-stream: {report:?}");

    // The float never opened its key (it has none) and holds no broker connection.
    let pid = float.pid().context("float pid")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect::<Vec<_>>();
    ensure!(
        !fds.iter().any(|f| f == &p.b.files.tls_key),
        "the float has the organisation's key open: {fds:?}"
    );
    float.terminate(Duration::from_secs(15)).await?;
    Ok(())
}

#[tokio::test]
async fn a_tunnel_float_refuses_a_private_key_and_a_broker_section() -> Result<()> {
    let p = two_orgs().await?;
    let b = &p.b;
    let cfg = "[float]\nmode = \"tunnel\"\nlisten = \"127.0.0.1:1\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntrust_roots = \"r\"\n\n[broker]\nuris = [\"amqp://127.0.0.1:1/%2f\"]\n";
    let path = b.dir.join("bad-float.toml");
    std::fs::create_dir_all(&b.dir)?;
    std::fs::write(&path, cfg)?;
    let out = std::process::Command::new(drawbridge_testkit::daemon::binary(Kind::Float)?)
        .arg("--config")
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(78),
        "exit {:?}: {err}",
        out.status
    );
    for needle in [
        "float.tls_key: tunnel mode holds no private key",
        "broker: tunnel mode has no broker connection",
        "float.tunnel.listen: required",
        "float.tunnel.bridges: required",
    ] {
        ensure!(err.contains(needle), "`{needle}` not in: {err}");
    }
    Ok(())
}

/// The DMZ for real: B's float in a network namespace whose new connections toward the
/// inside are dropped by nftables, A as a peer outside, B's bridge and broker inside. The
/// float serves A through the tunnel B's bridge dialled in, holds no inward socket it opened,
/// and the tunnel cut mid-stream (the link between inside and DMZ down for longer than the
/// tunnel's silence limit) loses nothing.
#[tokio::test]
async fn in_a_dmz_that_cannot_connect_inward_the_float_serves_peers_and_survives_a_cut_tunnel(
) -> Result<()> {
    let Some(world) = NetWorld::build_or_skip("tunnel mode in a DMZ")? else {
        return Ok(());
    };
    let mut p = two_orgs().await?;
    let at = TunnelPorts {
        peers: SocketAddr::from((world.dmz_public_addr(), free_port())),
        tunnel: SocketAddr::from((world.dmz_inside_addr(), free_port())),
        admin: SocketAddr::from((world.dmz_inside_addr(), free_port())),
    };
    p.b.float_admin = at.admin;
    let tunnel = start_tunnel_float(&p, &at, Some(world.ns_name(Ns::Dmz))).await?;
    let mut float = tunnel.float;
    p.b.start_bridge(&tunnel.bridge_lines).await?;
    wait_float(at.admin, Duration::from_secs(30), "activated", active).await?;

    // A is outside: its link reaches the float's public address from the outside namespace.
    let outside = world.forward_from(Ns::Outside, at.peers).await?;
    p.b.float_port = outside.addr().port();
    p.a.start_bridge("").await?;
    p.a.create_link_to(&p.b).await?;
    let queue = p.a.queue_to(&p.b);
    p.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await
        .context("A's link from outside to B's float in the DMZ")?;
    let n = 300;
    send(&p.a, &p.b, "dmz-1", n).await?;
    let report = receive(&p.b, "dmz-1", n, &p.a.legal_name).await?;
    ensure!(
        report.lost == 0 && report.wrong_sender == 0 && report.corrupted == 0,
        "through the DMZ: {report:?}"
    );

    // Every socket of the float toward the inside is one the inside opened (the tunnel, the
    // admin port); none it opened itself, not even one the firewall left half-open.
    let pid = float.pid().context("float pid")?;
    let inside = std::net::IpAddr::V4(world.inside_addr());
    for s in tcp_sockets_of(pid)? {
        if s.remote.ip() == inside {
            ensure!(
                s.local == at.tunnel || s.local == at.admin,
                "the float opened a connection inward: {s:?}"
            );
        }
    }
    let files = open_files_of(pid)?;
    ensure!(
        !files.iter().any(|f| f == &p.b.files.tls_key),
        "the float holds the organisation's key open: {files:?}"
    );

    // Cut the tunnel mid-stream: the link between inside and DMZ goes down for longer than
    // the tunnel's silence limit (15 s), then comes back; the bridge dials again.
    let sending = send(&p.a, &p.b, "dmz-2", 3000);
    let cutting = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        set_link(world.inside_link(), false).await?;
        tokio::time::sleep(Duration::from_secs(18)).await;
        set_link(world.inside_link(), true).await
    };
    let (sent, cut) = tokio::join!(sending, cutting);
    sent?;
    cut?;
    wait_float(at.admin, Duration::from_secs(40), "re-activated", active).await?;
    let report = receive(&p.b, "dmz-2", 3000, &p.a.legal_name).await?;
    eprintln!("tunnel cut mid-stream: {report:?}");
    ensure!(
        report.lost == 0 && report.wrong_sender == 0 && report.corrupted == 0,
        "tunnel cut mid-stream: {report:?}"
    );
    float.terminate(Duration::from_secs(15)).await?;
    Ok(())
}

/// `ip link set <link> up|down` in our namespace.
async fn set_link(link: &str, up: bool) -> Result<()> {
    let status = tokio::process::Command::new("ip")
        .args(["link", "set", link, if up { "up" } else { "down" }])
        .status()
        .await?;
    ensure!(status.success(), "ip link set {link}: {status}");
    Ok(())
}

/// The HA state (`active`, `standby`, …) of a bridge, `""` when it does not answer.
async fn ha_state(bridge: &Daemon) -> String {
    match bridge.status().await {
        Ok(s) => s["ha"]["state"].as_str().unwrap_or_default().to_string(),
        Err(_) => String::new(),
    }
}

/// Two bridges of B keep a tunnel each to B's float; only the one holding the HA lock
/// activates it. The active one is killed mid-stream: the standby takes the lock and
/// activates the float over the tunnel it already holds, and nothing is lost.
#[tokio::test]
async fn the_standby_bridge_re_activates_the_float_when_the_active_one_dies() -> Result<()> {
    let mut p = two_orgs().await?;
    let tunnel = start_tunnel_float(
        &p,
        &TunnelPorts::loopback(p.b.float_port, p.b.float_admin),
        None,
    )
    .await?;
    let mut float = tunnel.float;
    p.b.start_bridge(&tunnel.bridge_lines).await?;
    let second =
        p.b.start_extra_bridge("bridge-2", &tunnel.bridge_lines)
            .await?;
    let first = p.b.bridge.take().context("B's bridge")?;
    let mut bridges = [first, second];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let active_one = loop {
        let states = [ha_state(&bridges[0]).await, ha_state(&bridges[1]).await];
        if let Some(i) = states.iter().position(|s| s == "active") {
            if states[1 - i] == "standby" {
                break i;
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no active + standby pair: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The standby dials its tunnel on its own schedule: it may arrive after the
    // active bridge has already activated the float, so wait for both.
    let s = wait_float(
        p.b.float_admin,
        Duration::from_secs(20),
        "activated, with both bridges holding a tunnel",
        |s| active(s) && s["tunnel"]["tunnels"].as_array().map(Vec::len) == Some(2),
    )
    .await?;
    let epoch_before = s["tunnel"]["epoch"].as_u64().unwrap_or_default();

    p.a.start_bridge("").await?;
    p.a.create_link_to(&p.b).await?;
    let queue = p.a.queue_to(&p.b);
    p.a.wait_link_state(&queue, "up", Duration::from_secs(30))
        .await?;

    let sending = send(&p.a, &p.b, "failover", 3000);
    let killing = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        bridges[active_one].kill9().await
    };
    let (sent, killed) = tokio::join!(sending, killing);
    sent?;
    killed?;
    let s = wait_float(
        p.b.float_admin,
        Duration::from_secs(30),
        "re-activated by the standby",
        |s| active(s) && s["tunnel"]["epoch"].as_u64().unwrap_or_default() > epoch_before,
    )
    .await?;
    ensure!(
        s["tunnel"]["tunnels"].as_array().map(Vec::len) == Some(1),
        "the dead bridge's tunnel is gone: {s:#}"
    );
    let report = receive(&p.b, "failover", 3000, &p.a.legal_name).await?;
    eprintln!("active bridge killed mid-stream: {report:?}");
    ensure!(
        report.lost == 0 && report.wrong_sender == 0 && report.corrupted == 0,
        "active bridge killed mid-stream: {report:?}"
    );
    ensure!(
        ha_state(&bridges[1 - active_one]).await == "active",
        "the standby took over"
    );
    float.terminate(Duration::from_secs(15)).await?;
    Ok(())
}
