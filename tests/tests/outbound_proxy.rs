//! Peer links through an outbound proxy (`[bridge.proxy]`), as banks route outbound traffic:
//! SOCKS5 with username/password and HTTP `CONNECT`, each carrying a link end to end (TLS to
//! the float inside the tunnel), and a proxy that refuses the credentials named in the link's
//! reason.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use anyhow::Result;
use drawbridge_testkit::{
    fixtures::{link_up, receive, send, two_orgs},
    outbound_proxy::{Kind, OutboundProxy},
    BANK_A,
};

/// `[bridge]` lines for `proxy`, with `user` and a password file holding `password`.
fn proxy_lines(dir: &std::path::Path, proxy: &OutboundProxy, auth: Option<(&str, &str)>) -> String {
    let mut lines = format!("proxy.url = {:?}\n", proxy.url());
    if let Some((user, password)) = auth {
        let file = dir.join("proxy-password");
        std::fs::write(&file, format!("{password}\n")).expect("password file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("mode");
        lines.push_str(&format!(
            "proxy.username = {user:?}\nproxy.password_file = {:?}\n",
            file.display().to_string()
        ));
    }
    lines
}

async fn a_link_through(kind: Kind) -> Result<()> {
    let mut p = two_orgs().await?;
    let proxy = OutboundProxy::start(kind, Some(("bridge-a", "s3cret"))).await?;
    let lines = proxy_lines(p.dir.path(), &proxy, Some(("bridge-a", "s3cret")));
    link_up(&mut p.a, &mut p.b, "", &lines, Duration::from_secs(30)).await?;
    assert!(proxy.tunnels() >= 1, "the link went through the proxy");
    send(&p.a, &p.b, "via-proxy", 50).await?;
    let r = receive(&p.b, "via-proxy", 50, BANK_A).await?;
    assert!(
        r.complete() && r.duplicates == 0 && r.corrupted == 0,
        "{r:?}"
    );
    assert_eq!(proxy.refused(), 0);
    Ok(())
}

#[tokio::test]
async fn a_link_goes_through_a_socks5_proxy_with_credentials() -> Result<()> {
    a_link_through(Kind::Socks5).await
}

#[tokio::test]
async fn a_link_goes_through_an_http_connect_proxy_with_credentials() -> Result<()> {
    a_link_through(Kind::HttpConnect).await
}

/// Wrong credentials: the link stays down and says why; nothing is taken from the queue.
#[tokio::test]
async fn a_proxy_that_refuses_the_credentials_is_named_in_the_links_reason() -> Result<()> {
    let mut p = two_orgs().await?;
    let proxy = OutboundProxy::start(Kind::Socks5, Some(("bridge-a", "s3cret"))).await?;
    let lines = proxy_lines(p.dir.path(), &proxy, Some(("bridge-a", "wrong")));
    p.b.start_float("").await?;
    p.a.start_bridge(&lines).await?;
    p.a.create_link_to(&p.b).await?;
    let queue = p.a.queue_to(&p.b);
    let link =
        p.a.wait_link_state(&queue, "down", Duration::from_secs(30))
            .await?;
    let reason = link["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("refused the credentials"), "{link}");
    assert!(proxy.refused() >= 1);
    assert_eq!(proxy.tunnels(), 0);
    Ok(())
}

/// A proxy per target host (`[bridge.proxies.<name>]`) wins over the global one: the link to
/// B's float (host `127.0.0.1`) goes through its own proxy, and the global proxy sees nothing.
#[tokio::test]
async fn a_proxy_per_target_host_carries_its_link_and_the_global_one_is_not_used() -> Result<()> {
    let mut p = two_orgs().await?;
    let global = OutboundProxy::start(Kind::Socks5, None).await?;
    let partners = OutboundProxy::start(Kind::HttpConnect, None).await?;
    let lines = format!(
        "proxy.url = {:?}\nproxies.partners.url = {:?}\nproxies.partners.hosts = [\"127.0.0.1\"]\n",
        global.url(),
        partners.url()
    );
    link_up(&mut p.a, &mut p.b, "", &lines, Duration::from_secs(30)).await?;
    send(&p.a, &p.b, "per-target", 50).await?;
    let r = receive(&p.b, "per-target", 50, BANK_A).await?;
    assert!(r.complete() && r.corrupted == 0, "{r:?}");
    assert!(
        partners.tunnels() >= 1,
        "the link went through its own proxy"
    );
    assert_eq!(global.tunnels(), 0, "the global proxy was not used");
    Ok(())
}

/// Tunnel mode (docs/tunnel.md): B's bridge reaches its float's tunnel port through the
/// proxy, as banks route the inside's outbound traffic, and A's messages reach B through it.
#[tokio::test]
async fn the_bridge_reaches_its_tunnel_mode_float_through_a_proxy() -> Result<()> {
    let mut p = two_orgs().await?;
    let proxy = OutboundProxy::start(Kind::Socks5, Some(("bridge-b", "s3cret"))).await?;
    let lines = proxy_lines(p.dir.path(), &proxy, Some(("bridge-b", "s3cret")));
    p.b.start_tunnel("", &lines).await?;
    assert!(proxy.tunnels() >= 1, "the tunnel went through the proxy");
    p.a.start_bridge("").await?;
    p.a.create_link_to(&p.b).await?;
    p.a.wait_link_state(&p.a.queue_to(&p.b), "up", Duration::from_secs(30))
        .await?;
    send(&p.a, &p.b, "tunnel-via-proxy", 50).await?;
    let r = receive(&p.b, "tunnel-via-proxy", 50, BANK_A).await?;
    assert!(r.complete() && r.corrupted == 0, "{r:?}");
    Ok(())
}
