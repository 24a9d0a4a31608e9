//! systemd's `sd_notify(3)` protocol, by hand.
//!
//! The protocol is one datagram per message to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` for an abstract socket): `READY=1`, `STATUS=...`, `WATCHDOG=1`,
//! `STOPPING=1`, newline-separated. That is a few lines over `UnixDatagram`, so no crate
//! (and no C library) is added for it. Without `$NOTIFY_SOCKET` every call is a no-op, so
//! the daemons behave the same outside systemd. What is sent, and when, is the
//! [`crate::watchdog`]'s business.

use std::{ffi::OsString, time::Duration};

use tracing::{debug, warn};

/// Where `sd_notify` messages go: the socket of `$NOTIFY_SOCKET`, or nowhere.
#[derive(Debug)]
pub struct Notifier {
    /// `None` outside systemd (no `$NOTIFY_SOCKET`) or when the socket is unusable.
    #[cfg(unix)]
    target: Option<(
        std::os::unix::net::UnixDatagram,
        std::os::unix::net::SocketAddr,
    )>,
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        Notifier::for_socket(std::env::var_os("NOTIFY_SOCKET"))
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::for_socket(None)
    }

    /// The notifier for the socket named `name` (`/path` or `@abstract`).
    pub fn for_socket(name: Option<OsString>) -> Notifier {
        #[cfg(unix)]
        {
            let target = name.filter(|n| !n.is_empty()).and_then(|n| {
                let addr = match socket_addr(&n) {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(notify_socket = ?n, error = %e, "NOTIFY_SOCKET unusable; not notifying systemd");
                        return None;
                    }
                };
                match std::os::unix::net::UnixDatagram::unbound() {
                    Ok(s) => Some((s, addr)),
                    Err(e) => {
                        warn!(error = %e, "cannot create a datagram socket; not notifying systemd");
                        None
                    }
                }
            });
            Notifier { target }
        }
        #[cfg(not(unix))]
        {
            let _ = name;
            Notifier {}
        }
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        #[cfg(unix)]
        return self.target.is_some();
        #[cfg(not(unix))]
        false
    }

    /// Send `state` (e.g. `"READY=1\nSTATUS=serving"`). Returns whether it was sent; a
    /// failure is logged at debug level only, since systemd going away is not our problem.
    pub fn notify(&self, state: &str) -> bool {
        #[cfg(unix)]
        if let Some((socket, addr)) = &self.target {
            return match socket.send_to_addr(state.as_bytes(), addr) {
                Ok(_) => true,
                Err(e) => {
                    debug!(error = %e, state, "sd_notify failed");
                    false
                }
            };
        }
        let _ = state;
        false
    }
}

/// `/path` → a path socket; `@name` → the abstract socket `name` (Linux).
#[cfg(unix)]
fn socket_addr(name: &std::ffi::OsStr) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    match bytes.split_first() {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Some((b'@', abstract_name)) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
        }
        Some((b'/', _)) => std::os::unix::net::SocketAddr::from_pathname(name),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither an absolute path nor an @abstract name",
        )),
    }
}

/// The watchdog interval systemd expects, from `$WATCHDOG_USEC` and `$WATCHDOG_PID`:
/// `None` when unset, zero or unparsable, or when `$WATCHDOG_PID` names another process
/// (the variables were inherited from a parent that is the one being watched).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_variables() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifies_path_and_abstract_sockets() {
        use std::os::unix::net::UnixDatagram;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::for_socket(Some(path.clone().into_os_string()));
        assert!(n.notify("READY=1\nSTATUS=serving"));
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("drawbridge-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::for_socket(Some(format!("@{name}").into()));
        assert!(n.notify("WATCHDOG=1"));
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        assert!(!Notifier::for_socket(Some("relative".into())).is_enabled());
        assert!(!Notifier::disabled().notify("READY=1"));
    }
}
