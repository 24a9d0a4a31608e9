//! A small outbound proxy for tests: SOCKS5 (RFC 1928, optional username/password) or HTTP
//! `CONNECT`, as a bank's egress proxy in front of a bridge. It connects where it is asked,
//! copies bytes both ways, and counts the tunnels it opened and the credentials it refused.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// Which protocol the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SOCKS5.
    Socks5,
    /// HTTP `CONNECT`.
    HttpConnect,
}

#[derive(Debug, Default)]
struct Counts {
    tunnels: AtomicU64,
    refused: AtomicU64,
}

/// A running proxy; dropping it stops the listener (open tunnels end with their tasks).
#[derive(Debug)]
pub struct OutboundProxy {
    addr: SocketAddr,
    kind: Kind,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl Drop for OutboundProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OutboundProxy {
    /// Listens on a free loopback port; with `auth`, only those credentials are let through.
    pub async fn start(kind: Kind, auth: Option<(&str, &str)>) -> Result<OutboundProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the test proxy")?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (c, auth) = (c.clone(), auth.clone());
                tokio::spawn(async move {
                    let _ = serve(kind, tcp, auth, &c).await;
                });
            }
        });
        Ok(OutboundProxy {
            addr,
            kind,
            counts,
            task,
        })
    }

    /// The proxy's URL, as `[bridge.proxy] url` takes it.
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Socks5 => format!("socks5://{}", self.addr),
            Kind::HttpConnect => format!("http://{}", self.addr),
        }
    }

    /// Tunnels opened so far.
    pub fn tunnels(&self) -> u64 {
        self.counts.tunnels.load(Ordering::Relaxed)
    }

    /// Clients refused for their credentials so far.
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::Relaxed)
    }
}

async fn serve(
    kind: Kind,
    mut client: TcpStream,
    auth: Option<(String, String)>,
    counts: &Counts,
) -> Result<()> {
    let target = match kind {
        Kind::Socks5 => socks5(&mut client, auth.as_ref(), counts).await?,
        Kind::HttpConnect => http_connect(&mut client, auth.as_ref(), counts).await?,
    };
    let Some(mut upstream) = target else {
        return Ok(());
    };
    counts.tunnels.fetch_add(1, Ordering::Relaxed);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    Ok(())
}

async fn socks5(
    c: &mut TcpStream,
    auth: Option<&(String, String)>,
    counts: &Counts,
) -> Result<Option<TcpStream>> {
    let mut head = [0u8; 2];
    c.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    c.read_exact(&mut methods).await?;
    let want = if auth.is_some() { 2 } else { 0 };
    if !methods.contains(&want) {
        c.write_all(&[5, 0xFF]).await?;
        counts.refused.fetch_add(1, Ordering::Relaxed);
        return Ok(None);
    }
    c.write_all(&[5, want]).await?;
    if let Some((user, pass)) = auth {
        let mut v = [0u8; 2];
        c.read_exact(&mut v).await?;
        let mut u = vec![0u8; usize::from(v[1])];
        c.read_exact(&mut u).await?;
        let mut plen = [0u8; 1];
        c.read_exact(&mut plen).await?;
        let mut p = vec![0u8; usize::from(plen[0])];
        c.read_exact(&mut p).await?;
        if u != user.as_bytes() || p != pass.as_bytes() {
            c.write_all(&[1, 1]).await?;
            counts.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        c.write_all(&[1, 0]).await?;
    }
    let mut req = [0u8; 4];
    c.read_exact(&mut req).await?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a).await?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            c.read_exact(&mut len).await?;
            let mut h = vec![0u8; usize::from(len[0])];
            c.read_exact(&mut h).await?;
            String::from_utf8(h)?
        }
        4 => {
            let mut a = [0u8; 16];
            c.read_exact(&mut a).await?;
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => return Ok(None),
    };
    let mut port = [0u8; 2];
    c.read_exact(&mut port).await?;
    match TcpStream::connect((host.as_str(), u16::from_be_bytes(port))).await {
        Ok(up) => {
            c.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await?;
            Ok(Some(up))
        }
        Err(_) => {
            c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            Ok(None)
        }
    }
}

async fn http_connect(
    c: &mut TcpStream,
    auth: Option<&(String, String)>,
    counts: &Counts,
) -> Result<Option<TcpStream>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        c.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let authority = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_default()
        .to_string();
    if let Some((user, pass)) = auth {
        let expected = format!(
            "Basic {}",
            drawbridge_runtime::proxy::base64(format!("{user}:{pass}").as_bytes())
        );
        // The header's name without case, its value exactly.
        if !text.lines().any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("proxy-authorization") && value.trim() == expected
            })
        }) {
            c.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                .await?;
            counts.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
    }
    match TcpStream::connect(authority.as_str()).await {
        Ok(up) => {
            c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            Ok(Some(up))
        }
        Err(_) => {
            c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await?;
            Ok(None)
        }
    }
}
