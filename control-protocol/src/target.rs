//! Peer endpoints (`host:port`).

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// One network endpoint of a peer's float, as the node wrote it: `host:port`.
///
/// Kept as host + port rather than a resolved `SocketAddr` because the bridge must resolve
/// names afresh on every connection attempt (floats move behind DNS). IPv6 literals are written
/// in brackets (`[::1]:5671`) and stored without them (`host == "::1"`), so
/// `TcpStream::connect((host, port))` works directly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// DNS name, IPv4 literal, or IPv6 literal without brackets.
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl Target {
    /// Builds a target from parts; no validation (use [`str::parse`] for untrusted input).
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }
}

/// Why a `host:port` string is not a valid [`Target`]; names the input for operator logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid target `{input}`: {reason}")]
pub struct TargetParseError {
    /// The string that was refused.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Target {
    type Err = TargetParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| TargetParseError {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| err("missing `]` after IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| err("expected `:port` after `]`"))?;
            host.parse::<Ipv6Addr>()
                .map_err(|_| err("not a valid IPv6 address inside brackets"))?;
            (host, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| err("expected host:port"))?;
            if host.contains(':') {
                return Err(err(
                    "IPv6 addresses must be written in brackets, e.g. [::1]:5671",
                ));
            }
            if host.is_empty() {
                return Err(err("host is empty"));
            }
            if !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            {
                return Err(err("host contains characters not allowed in a host name"));
            }
            (host, port)
        };
        if port.is_empty() {
            return Err(err("port is empty"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| err("port is not a number between 1 and 65535"))?;
        if port == 0 {
            return Err(err("port 0 is not allowed"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_literals() {
        assert_eq!(
            "float.bank-b.example:5671".parse::<Target>().unwrap(),
            Target::new("float.bank-b.example", 5671)
        );
        assert_eq!(
            "127.0.0.1:1".parse::<Target>().unwrap(),
            Target::new("127.0.0.1", 1)
        );
        assert_eq!(
            "[::1]:5671".parse::<Target>().unwrap(),
            Target::new("::1", 5671)
        );
        assert_eq!(
            " localhost:65535 ".parse::<Target>().unwrap(),
            Target::new("localhost", 65535)
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "float.example:5671",
            "[::1]:5671",
            "[fe80::1]:1",
            "10.0.0.1:443",
        ] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn refuses_bad_input() {
        for (input, needle) in [
            ("", "host:port"),
            ("localhost", "host:port"),
            (":5671", "host is empty"),
            ("localhost:", "port is empty"),
            ("localhost:0", "port 0"),
            ("localhost:65536", "port is not a number"),
            ("localhost:abc", "port is not a number"),
            ("::1:5671", "brackets"),
            ("[::1:5671", "missing `]`"),
            ("[::1]5671", "`:port`"),
            ("[nope]:5671", "IPv6"),
            ("bad host:5671", "characters"),
            ("host/path:5671", "characters"),
        ] {
            let err = input.parse::<Target>().unwrap_err();
            assert!(err.to_string().contains(needle), "{input}: {err}");
            assert_eq!(err.input, input);
        }
    }
}
