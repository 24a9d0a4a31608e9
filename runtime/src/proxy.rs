//! Outbound connections through a proxy, as banks route outbound traffic: SOCKS5 (RFC 1928,
//! with username/password authentication, RFC 1929) or HTTP `CONNECT` (RFC 9110 §9.3.6).
//!
//! The proxy sees only a TCP tunnel: TLS to the peer runs inside it, end to end, so the proxy
//! can neither read nor alter what crosses (the peer's certificate is verified as without a
//! proxy). The proxy is trusted no more than the network: its answers are read within fixed
//! bounds (an HTTP answer's head at most [`MAX_HTTP_HEAD`] bytes, a SOCKS reply by its own
//! length fields), never past the end of the handshake (what follows belongs to TLS), and
//! every failure says what the proxy answered. The caller bounds the whole connect with its
//! own deadline.

use std::{fmt, path::PathBuf};

use drawbridge_certs::KeyFileAccess;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    broker::{read_password_file, Secret},
    config::ConfigReader,
};

/// Longest HTTP answer head (status line and headers) taken from a proxy.
pub const MAX_HTTP_HEAD: usize = 8 * 1024;

/// Which protocol the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// SOCKS version 5; the proxy resolves the peer's host name.
    Socks5,
    /// HTTP/1.1 `CONNECT`.
    HttpConnect,
}

/// An outbound proxy (`[bridge.proxy]`).
#[derive(Clone)]
pub struct Proxy {
    kind: ProxyKind,
    host: String,
    port: u16,
    auth: Option<(String, Secret)>,
    /// Hosts reached directly, compared exactly (case-insensitively).
    bypass: Vec<String>,
}

/// The proxies a bridge's outbound connections go through: a proxy per target host
/// (`[bridge.proxies.<name>]` with `hosts`), else the global one (`[bridge.proxy]`, unless the
/// host is in its `bypass`), else none.
#[derive(Debug, Default)]
pub struct Proxies {
    per_host: Vec<(Vec<String>, Proxy)>,
    global: Option<Proxy>,
}

impl Proxies {
    /// One global proxy (tests, tools).
    pub fn global(proxy: Proxy) -> Self {
        Proxies {
            per_host: Vec::new(),
            global: Some(proxy),
        }
    }

    /// Read `{global}` (see [`Proxy::read`]) and every `{per_target}.<name>` table: `url`,
    /// `username`, `password_file` as for the global one, and `hosts`, the target hosts it
    /// serves (each host in one table at most). `None` when no proxy is configured. Every bad
    /// key is reported on `r`.
    pub fn read(
        r: &mut ConfigReader,
        global: &str,
        per_target: &str,
        access: KeyFileAccess,
    ) -> Option<Proxies> {
        let global = Proxy::read(r, global, access);
        let mut per_host: Vec<(Vec<String>, Proxy)> = Vec::new();
        let mut names = r.table_keys(per_target);
        names.sort();
        for name in names {
            let prefix = format!("{per_target}.{name}");
            let hosts_key = format!("{prefix}.hosts");
            let hosts: Vec<String> = r.required(&hosts_key).unwrap_or_default();
            if r.is_set(&format!("{prefix}.bypass")) {
                r.invalid(
                    &format!("{prefix}.bypass"),
                    "a proxy per target has `hosts`, not `bypass`",
                );
            }
            let hosts: Vec<String> = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            if hosts.is_empty() && r.is_present(&hosts_key) {
                r.invalid(&hosts_key, "names no host");
            }
            for h in &hosts {
                if per_host.iter().any(|(hs, _)| hs.contains(h)) {
                    r.invalid(
                        &hosts_key,
                        format!("`{h}` is already served by another proxy"),
                    );
                }
            }
            if !r.is_present(&format!("{prefix}.url")) {
                r.invalid(&format!("{prefix}.url"), "required but not set");
            }
            if let Some(proxy) = Proxy::read(r, &prefix, access) {
                per_host.push((hosts, proxy));
            }
        }
        (global.is_some() || !per_host.is_empty()).then_some(Proxies { per_host, global })
    }

    /// The proxy connections to `host` go through, if any.
    pub fn for_host(&self, host: &str) -> Option<&Proxy> {
        self.per_host
            .iter()
            .find(|(hosts, _)| hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
            .map(|(_, p)| p)
            .or_else(|| self.global.as_ref().filter(|p| p.applies_to(host)))
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.auth.as_ref().map(|(u, _)| u))
            .field("bypass", &self.bypass)
            .finish()
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            ProxyKind::Socks5 => "socks5",
            ProxyKind::HttpConnect => "http",
        };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// Why a connection through the proxy failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The proxy could not be reached, or the connection to it failed.
    #[error("proxy {proxy}: {source}")]
    Io {
        /// The proxy.
        proxy: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The proxy refused our credentials.
    #[error("proxy {proxy} refused the credentials{detail}")]
    Auth {
        /// The proxy.
        proxy: String,
        /// What it said, if anything.
        detail: String,
    },
    /// The proxy would not connect us to the target.
    #[error("proxy {proxy} did not connect to {target}: {reason}")]
    Refused {
        /// The proxy.
        proxy: String,
        /// Where we asked to go.
        target: String,
        /// What it answered.
        reason: String,
    },
    /// The proxy's answer is not the protocol.
    #[error("proxy {proxy} answered outside the protocol: {reason}")]
    Protocol {
        /// The proxy.
        proxy: String,
        /// What was wrong.
        reason: String,
    },
}

impl Proxy {
    /// A proxy at `url` (`socks5://host:port` or `http://host:port`), without credentials.
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let u = url::Url::parse(url).map_err(|e| format!("`{url}`: {e}"))?;
        let kind = match u.scheme() {
            "socks5" | "socks5h" => ProxyKind::Socks5,
            "http" => ProxyKind::HttpConnect,
            other => {
                return Err(format!(
                    "`{url}`: scheme `{other}` is not a proxy this knows (socks5://, http://)"
                ))
            }
        };
        if !u.username().is_empty() || u.password().is_some() {
            return Err(format!(
                "`{url}`: credentials do not go in the URL (username and password_file)"
            ));
        }
        if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
            return Err(format!(
                "`{url}`: a proxy URL is scheme://host:port, nothing more"
            ));
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{url}`: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = u
            .port()
            .ok_or_else(|| format!("`{url}`: the port must be given"))?;
        Ok(Proxy {
            kind,
            host,
            port,
            auth: None,
            bypass: Vec::new(),
        })
    }

    /// Read `{prefix}.url`, `.username`, `.password_file` and `.bypass`; `None` when `url` is
    /// not set. Every bad key is reported on `r`.
    pub fn read(r: &mut ConfigReader, prefix: &str, access: KeyFileAccess) -> Option<Proxy> {
        let key = |k: &str| format!("{prefix}.{k}");
        let url: Option<String> = r.optional(&key("url"));
        let username: Option<String> = r.optional(&key("username"));
        let password_file: Option<PathBuf> = r.optional(&key("password_file"));
        let bypass: Vec<String> = r.get(&key("bypass"), Vec::new());
        let Some(url) = url else {
            if username.is_some() || password_file.is_some() || !bypass.is_empty() {
                r.invalid(&key("url"), "must be set when the other proxy keys are");
            }
            return None;
        };
        // Every key is checked, also when the URL is bad: the operator sees every problem.
        let auth = match (username, password_file) {
            (None, None) => None,
            (Some(user), Some(path)) => {
                if user.is_empty() || user.len() > 255 {
                    r.invalid(&key("username"), "must be 1..=255 bytes");
                }
                match read_password_file(&path, access) {
                    Ok(pw) if pw.expose().len() > 255 => {
                        r.invalid(
                            &key("password_file"),
                            "the password must be at most 255 bytes",
                        );
                        None
                    }
                    Ok(pw) => Some((user, pw)),
                    Err(e) => {
                        r.invalid(&key("password_file"), e);
                        None
                    }
                }
            }
            (Some(_), None) => {
                r.invalid(&key("password_file"), "must be set with username");
                None
            }
            (None, Some(_)) => {
                r.invalid(&key("username"), "must be set with password_file");
                None
            }
        };
        let mut proxy = Proxy::parse(&url)
            .map_err(|e| r.invalid(&key("url"), e))
            .ok()?;
        proxy.auth = auth;
        proxy.bypass = bypass.iter().map(|h| h.to_ascii_lowercase()).collect();
        Some(proxy)
    }

    /// Whether connections to `host` go through the proxy (it is not in `bypass`).
    pub fn applies_to(&self, host: &str) -> bool {
        !self.bypass.iter().any(|b| b.eq_ignore_ascii_case(host))
    }

    /// A TCP connection to `host:port` through the proxy, its handshake done: what follows is
    /// the caller's (TLS).
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let io = |source| ProxyError::Io {
            proxy: self.to_string(),
            source,
        };
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(io)?;
        let _ = tcp.set_nodelay(true);
        let auth = self.auth.as_ref().map(|(u, p)| (u.as_str(), p.expose()));
        match self.kind {
            ProxyKind::Socks5 => socks5(&mut tcp, host, port, auth).await,
            ProxyKind::HttpConnect => http_connect(&mut tcp, host, port, auth).await,
        }
        .map_err(|e| e.into_error(self, host, port))?;
        Ok(tcp)
    }
}

/// What a handshake found, before it is told which proxy it was.
#[derive(Debug)]
pub enum Failure {
    /// Reading or writing failed (a proxy that closes early is one).
    Io(std::io::Error),
    /// The credentials were refused.
    Auth(String),
    /// The connect was refused.
    Refused(String),
    /// Outside the protocol.
    Protocol(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

impl Failure {
    fn into_error(self, proxy: &Proxy, host: &str, port: u16) -> ProxyError {
        let proxy = proxy.to_string();
        match self {
            Failure::Io(source) => ProxyError::Io { proxy, source },
            Failure::Auth(detail) => ProxyError::Auth { proxy, detail },
            Failure::Refused(reason) => ProxyError::Refused {
                proxy,
                target: format!("{host}:{port}"),
                reason,
            },
            Failure::Protocol(reason) => ProxyError::Protocol { proxy, reason },
        }
    }
}

/// The SOCKS5 handshake on `s`: method selection, username/password if `auth`, `CONNECT` to
/// `host:port` (the proxy resolves a name).
pub async fn socks5<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<(), Failure> {
    if host.is_empty() || host.len() > 255 {
        return Err(Failure::Refused(format!(
            "a host name of {} bytes cannot be asked for (1..=255)",
            host.len()
        )));
    }
    // Offer only what we can do: with credentials, only username/password (no fallback to
    // none, so a proxy cannot downgrade us to an unauthenticated path it logs differently).
    let method = if auth.is_some() { 0x02 } else { 0x00 };
    s.write_all(&[0x05, 0x01, method]).await?;
    let mut chosen = [0u8; 2];
    s.read_exact(&mut chosen).await?;
    if chosen[0] != 0x05 {
        return Err(Failure::Protocol(format!(
            "version {} in the method selection (5 expected)",
            chosen[0]
        )));
    }
    match (chosen[1], auth) {
        (0x00, None) => {}
        (0x02, Some((user, pass))) => {
            if user.len() > 255 || pass.len() > 255 {
                return Err(Failure::Auth(
                    " (a username or password over 255 bytes)".into(),
                ));
            }
            let mut req = Vec::with_capacity(3 + user.len() + pass.len());
            req.push(0x01);
            req.push(user.len() as u8);
            req.extend_from_slice(user.as_bytes());
            req.push(pass.len() as u8);
            req.extend_from_slice(pass.as_bytes());
            s.write_all(&req).await?;
            let mut status = [0u8; 2];
            s.read_exact(&mut status).await?;
            if status[1] != 0x00 {
                return Err(Failure::Auth(format!(" (status {})", status[1])));
            }
        }
        (0xFF, _) => {
            return Err(Failure::Auth(
                " (no acceptable authentication method: does it want credentials?)".into(),
            ))
        }
        (m, _) => {
            return Err(Failure::Protocol(format!(
                "method {m:#04x} chosen, which was not offered"
            )))
        }
    }
    let mut req = Vec::with_capacity(7 + host.len());
    req.extend_from_slice(&[0x05, 0x01, 0x00]);
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            req.push(0x01);
            req.extend_from_slice(&ip.octets());
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            req.push(0x04);
            req.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            req.push(0x03);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[0] != 0x05 {
        return Err(Failure::Protocol(format!(
            "version {} in the reply (5 expected)",
            head[0]
        )));
    }
    if head[1] != 0x00 {
        return Err(Failure::Refused(socks_reply(head[1])));
    }
    // The bound address, read to its end (and dropped) so that nothing of it is left for TLS.
    let rest = match head[3] {
        0x01 => 4 + 2,
        0x04 => 16 + 2,
        0x03 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            usize::from(len[0]) + 2
        }
        t => {
            return Err(Failure::Protocol(format!(
                "address type {t:#04x} in the reply"
            )))
        }
    };
    let mut bound = [0u8; 257];
    s.read_exact(&mut bound[..rest]).await?;
    Ok(())
}

fn socks_reply(code: u8) -> String {
    let what = match code {
        0x01 => "general failure",
        0x02 => "connection not allowed by its rules",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "unknown reply",
    };
    format!("{what} (SOCKS reply {code})")
}

/// The HTTP `CONNECT` handshake on `s`; a `2xx` answer opens the tunnel.
pub async fn http_connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> Result<(), Failure> {
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(Failure::Refused(format!(
            "host `{}` cannot go in a request line",
            host.escape_debug()
        )));
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some((user, pass)) = auth {
        req.push_str("Proxy-Authorization: Basic ");
        req.push_str(&base64(format!("{user}:{pass}").as_bytes()));
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    // Byte by byte up to the blank line: the tunnel's first bytes (TLS) must not be taken.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() == MAX_HTTP_HEAD {
            return Err(Failure::Protocol(format!(
                "an answer head longer than {MAX_HTTP_HEAD} bytes"
            )));
        }
        s.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    let status_line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Failure::Protocol(format!(
            "status line `{}`",
            crate::text::escape(crate::text::truncate(&status_line, 200))
        )));
    }
    match code.as_bytes()[0] {
        b'2' => Ok(()),
        _ if code == "407" => Err(Failure::Auth(format!(
            ": `{}`",
            crate::text::escape(crate::text::truncate(&status_line, 200))
        ))),
        _ => Err(Failure::Refused(format!(
            "`{}`",
            crate::text::escape(crate::text::truncate(&status_line, 200))
        ))),
    }
}

/// Standard base64 with padding (RFC 4648 §4), for `Proxy-Authorization: Basic`.
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
    }

    #[test]
    fn urls_name_a_kind_a_host_and_a_port_and_nothing_else() {
        let p = Proxy::parse("socks5://proxy.bank.example:1080").unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port),
            (ProxyKind::Socks5, "proxy.bank.example", 1080)
        );
        let p = Proxy::parse("http://[::1]:3128").unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port),
            (ProxyKind::HttpConnect, "::1", 3128)
        );
        for bad in [
            "https://p:1",
            "socks4://p:1",
            "socks5://p",
            "http://user:pw@p:1",
            "http://p:1/path",
            "not a url",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bypassed_hosts_go_direct() {
        let mut p = Proxy::parse("socks5://p:1").unwrap();
        p.bypass = vec!["float.internal".into()];
        assert!(!p.applies_to("FLOAT.internal"));
        assert!(p.applies_to("float.bank-b.example"));
    }

    /// A scripted proxy: for each exchange, checks what it is sent, then answers.
    async fn script(exchanges: Vec<(Vec<u8>, Vec<u8>)>) -> tokio::io::DuplexStream {
        let (ours, mut theirs) = duplex(64 * 1024);
        tokio::spawn(async move {
            for (expect, reply) in exchanges {
                let mut got = vec![0u8; expect.len()];
                // Sent less than expected: fail (the stream drops), never hang.
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    theirs.read_exact(&mut got),
                );
                if !matches!(read.await, Ok(Ok(_))) {
                    return;
                }
                assert_eq!(got, expect, "what the proxy was sent");
                let _ = theirs.write_all(&reply).await;
            }
            // Keep the stream open (a proxy waiting for the tunnel's bytes).
            let mut rest = Vec::new();
            let _ = theirs.read_to_end(&mut rest).await;
        });
        ours
    }

    #[tokio::test]
    async fn socks5_connects_by_name_with_credentials() {
        let mut login = vec![1, 4];
        login.extend(b"user");
        login.extend([2]);
        login.extend(b"pw");
        let mut ask = vec![5, 1, 0, 3, 13];
        ask.extend(b"float.example");
        ask.extend(5671u16.to_be_bytes());
        // The bound address, then the tunnel's first byte, which must stay unread.
        let reply = vec![5, 0, 0, 1, 10, 0, 0, 1, 0x16, 0x27, 0x16];
        let mut s = script(vec![
            (vec![5, 1, 2], vec![5, 2]),
            (login, vec![1, 0]),
            (ask, reply),
        ])
        .await;
        socks5(&mut s, "float.example", 5671, Some(("user", "pw")))
            .await
            .unwrap();
        let mut next = [0u8; 1];
        s.read_exact(&mut next).await.unwrap();
        assert_eq!(next, [0x16], "the handshake stopped at its end");
    }

    #[tokio::test]
    async fn socks5_failures_say_what_the_proxy_answered() {
        let hello = || (vec![5, 1, 0], vec![5, 0]);
        let mut ask = vec![5, 1, 0, 1, 127, 0, 0, 1];
        ask.extend(5671u16.to_be_bytes());
        let mut s = script(vec![hello(), (ask, vec![5, 2, 0, 1])]).await;
        let e = socks5(&mut s, "127.0.0.1", 5671, None).await.unwrap_err();
        assert!(
            matches!(&e, Failure::Refused(r) if r.contains("not allowed")),
            "{e:?}"
        );

        let mut s = script(vec![(vec![5, 1, 0], vec![5, 0xFF])]).await;
        let e = socks5(&mut s, "127.0.0.1", 5671, None).await.unwrap_err();
        assert!(matches!(e, Failure::Auth(_)), "{e:?}");

        let mut s = script(vec![(vec![5, 1, 0], vec![4, 0])]).await;
        let e = socks5(&mut s, "127.0.0.1", 5671, None).await.unwrap_err();
        assert!(matches!(e, Failure::Protocol(_)), "{e:?}");

        // A proxy that picks a method we did not offer.
        let mut s = script(vec![(vec![5, 1, 0], vec![5, 2])]).await;
        let e = socks5(&mut s, "127.0.0.1", 5671, None).await.unwrap_err();
        assert!(matches!(e, Failure::Protocol(_)), "{e:?}");

        // Wrong credentials.
        let mut s = script(vec![
            (vec![5, 1, 2], vec![5, 2]),
            (vec![1, 1, b'u', 1, b'p'], vec![1, 1]),
        ])
        .await;
        let e = socks5(&mut s, "h", 1, Some(("u", "p"))).await.unwrap_err();
        assert!(matches!(e, Failure::Auth(_)), "{e:?}");

        // An address type that does not exist in the reply.
        let mut ask = vec![5, 1, 0, 3, 1, b'h'];
        ask.extend(1u16.to_be_bytes());
        let mut s = script(vec![hello(), (ask, vec![5, 0, 0, 9])]).await;
        let e = socks5(&mut s, "h", 1, None).await.unwrap_err();
        assert!(matches!(e, Failure::Protocol(_)), "{e:?}");

        // A reply cut short: an error, not a hang (the stream ends).
        let (mut ours, theirs) = duplex(64);
        drop(theirs);
        assert!(matches!(
            socks5(&mut ours, "h", 1, None).await.unwrap_err(),
            Failure::Io(_)
        ));
    }

    #[tokio::test]
    async fn http_connect_opens_the_tunnel_on_2xx_and_reads_no_further() {
        let sent = b"CONNECT float.example:5671 HTTP/1.1\r\nHost: float.example:5671\r\nProxy-Authorization: Basic dXNlcjpwdw==\r\n\r\n".to_vec();
        let mut reply = b"HTTP/1.1 200 Connection established\r\nVia: squid\r\n\r\n".to_vec();
        reply.push(0x16);
        let mut s = script(vec![(sent, reply)]).await;
        http_connect(&mut s, "float.example", 5671, Some(("user", "pw")))
            .await
            .unwrap();
        let mut next = [0u8; 1];
        s.read_exact(&mut next).await.unwrap();
        assert_eq!(next, [0x16]);
    }

    #[tokio::test]
    async fn http_connect_failures_are_bounded_and_named() {
        let sent = b"CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\n\r\n".to_vec();
        let mut s = script(vec![(
            sent.clone(),
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n".to_vec(),
        )])
        .await;
        let e = http_connect(&mut s, "h", 1, None).await.unwrap_err();
        assert!(matches!(&e, Failure::Auth(d) if d.contains("407")), "{e:?}");

        let mut s = script(vec![(
            sent.clone(),
            b"HTTP/1.1 403 Forbidden\r\n\r\n".to_vec(),
        )])
        .await;
        let e = http_connect(&mut s, "h", 1, None).await.unwrap_err();
        assert!(
            matches!(&e, Failure::Refused(r) if r.contains("403")),
            "{e:?}"
        );

        let mut s = script(vec![(sent.clone(), b"SSH-2.0-OpenSSH\r\n\r\n".to_vec())]).await;
        let e = http_connect(&mut s, "h", 1, None).await.unwrap_err();
        assert!(matches!(e, Failure::Protocol(_)), "{e:?}");

        // A head that never ends is cut at the bound.
        let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
        endless.extend(std::iter::repeat_n(b'x', 2 * MAX_HTTP_HEAD));
        let mut s = script(vec![(sent, endless)]).await;
        let e = http_connect(&mut s, "h", 1, None).await.unwrap_err();
        assert!(
            matches!(&e, Failure::Protocol(r) if r.contains("longer")),
            "{e:?}"
        );

        // A host that would forge a header line is refused before anything is sent.
        let (mut ours, _theirs) = duplex(64);
        let e = http_connect(&mut ours, "h\r\nX-Evil: 1", 1, None)
            .await
            .unwrap_err();
        assert!(matches!(e, Failure::Refused(_)), "{e:?}");
    }
}

#[cfg(test)]
mod per_target_tests {
    use super::*;

    fn read(toml: &str) -> (Option<Proxies>, Vec<String>) {
        let mut r = ConfigReader::from_toml(toml).unwrap();
        let p = Proxies::read(
            &mut r,
            "bridge.proxy",
            "bridge.proxies",
            KeyFileAccess::OwnerOnly,
        );
        let errs = r.finish().err().map(|e| e.0).unwrap_or_default();
        (p, errs)
    }

    #[test]
    fn a_target_host_takes_its_own_proxy_else_the_global_one() {
        let (p, errs) = read(
            r#"
[bridge.proxy]
url = "socks5://global:1080"
bypass = ["inside.example"]
[bridge.proxies.partners]
url = "http://partners-proxy:3128"
hosts = ["Float.Bank-B.example", "float.bank-c.example"]
"#,
        );
        assert!(errs.is_empty(), "{errs:#?}");
        let p = p.unwrap();
        let via = |h: &str| p.for_host(h).map(|x| x.to_string());
        assert_eq!(
            via("float.bank-b.example").as_deref(),
            Some("http://partners-proxy:3128")
        );
        assert_eq!(
            via("FLOAT.BANK-C.EXAMPLE").as_deref(),
            Some("http://partners-proxy:3128")
        );
        assert_eq!(
            via("float.bank-d.example").as_deref(),
            Some("socks5://global:1080")
        );
        assert_eq!(via("inside.example"), None);
        // Per-target proxies alone: other hosts go directly.
        let (p, errs) = read("[bridge.proxies.x]\nurl = \"socks5://x:1\"\nhosts = [\"a\"]\n");
        assert!(errs.is_empty(), "{errs:#?}");
        let p = p.unwrap();
        assert!(p.for_host("a").is_some() && p.for_host("b").is_none());
        assert!(read("").0.is_none());
    }

    #[test]
    fn every_bad_per_target_key_is_listed() {
        let (_, errs) = read(
            r#"
[bridge.proxies.one]
url = "socks5://one:1"
hosts = ["a"]
bypass = ["b"]
[bridge.proxies.two]
hosts = ["a"]
colour = "red"
[bridge.proxies.three]
url = "socks5://three:1"
"#,
        );
        for key in [
            "bridge.proxies.one.bypass",
            "bridge.proxies.two.hosts",
            "bridge.proxies.two.url",
            "bridge.proxies.two.colour",
            "bridge.proxies.three.hosts",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
    }
}
