//! The revocation modes and settings, read from each daemon's configuration.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// What to do about certificate revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RevocationMode {
    /// Every certificate of the chain must be covered by a current CRL of its issuer: a
    /// listed certificate, a missing CRL or an expired CRL all refuse the peer.
    HardFail,
    /// Certificates listed on a CRL are refused (an expired CRL still counts); a certificate
    /// whose issuer has no CRL is accepted.
    SoftFail,
    /// No revocation checking.
    #[default]
    Off,
}

impl RevocationMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HardFail => "hard-fail",
            Self::SoftFail => "soft-fail",
            Self::Off => "off",
        }
    }

    /// The default when `revocation` is not configured: `soft-fail` if any CRL source is
    /// configured, `off` otherwise.
    pub fn default_for(has_sources: bool) -> Self {
        if has_sources {
            Self::SoftFail
        } else {
            Self::Off
        }
    }
}

impl fmt::Display for RevocationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RevocationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hard-fail" => Ok(Self::HardFail),
            "soft-fail" => Ok(Self::SoftFail),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "`{other}` is not a revocation mode (hard-fail, soft-fail or off)"
            )),
        }
    }
}

/// Where CRLs come from and how they are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationSettings {
    /// The mode.
    pub mode: RevocationMode,
    /// CRL files (PEM or DER), re-read when they change.
    pub crl_files: Vec<PathBuf>,
    /// `http://` URLs fetched in the background.
    pub crl_urls: Vec<String>,
    /// How often the files are polled (and CRL expiry re-evaluated).
    pub reload_interval: Duration,
    /// How often each URL is fetched after a success.
    pub fetch_interval: Duration,
    /// Deadline of one fetch.
    pub fetch_timeout: Duration,
}

impl Default for RevocationSettings {
    fn default() -> Self {
        Self {
            mode: RevocationMode::Off,
            crl_files: Vec::new(),
            crl_urls: Vec::new(),
            reload_interval: Duration::from_secs(30),
            fetch_interval: Duration::from_secs(300),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

/// Which side of the handshake the checked peer was (its certificate's extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (the float checks bridges).
    Client,
    /// The peer is a TLS server (the bridge checks floats).
    Server,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            RevocationMode::HardFail,
            RevocationMode::SoftFail,
            RevocationMode::Off,
        ] {
            assert_eq!(mode.as_str().parse::<RevocationMode>().unwrap(), mode);
        }
        assert!("hard".parse::<RevocationMode>().is_err());
        assert_eq!(RevocationMode::default_for(true), RevocationMode::SoftFail);
        assert_eq!(RevocationMode::default_for(false), RevocationMode::Off);
    }
}
