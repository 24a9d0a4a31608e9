//! The background CRL refresh: a thread polling the CRL files (and CRL expiry) and one
//! fetching the CRL URLs.
//!
//! Threads rather than tasks: file reads and `ureq` block, and a handshake must never wait
//! behind either. What each round does is `drawbridge_certs`' ([`Revocation::reload_now`],
//! [`Revocation::fetches_due`], [`Revocation::apply_fetched`]); the threads only wait and
//! fetch. They hold a [`WeakRevocation`] and end once the daemon drops its last clone.

use std::time::{Duration, Instant};

use drawbridge_certs::{Revocation, RevocationMode, WeakRevocation};

/// Largest CRL accepted from a URL.
const MAX_FETCHED_CRL_BYTES: u64 = 32 * 1024 * 1024;

/// Starting the background refresh of a [`Revocation`] (a method, so that `start` and the
/// tests read `revocation.spawn_refresh()`).
pub trait SpawnRefresh {
    /// Start the background refresh: a thread polling the files (and CRL expiry) every
    /// `reload_interval`, and one fetching the URLs. Does nothing in mode `off`. The threads
    /// end once every clone of this `Revocation` is dropped.
    fn spawn_refresh(&self) -> std::io::Result<()>;
}

impl SpawnRefresh for Revocation {
    fn spawn_refresh(&self) -> std::io::Result<()> {
        if self.mode() == RevocationMode::Off {
            return Ok(());
        }
        let settings = self.settings();
        let weak = self.downgrade();
        let interval = settings.reload_interval.max(Duration::from_millis(10));
        std::thread::Builder::new()
            .name("crl-reload".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(revocation) = weak.upgrade() else {
                    return;
                };
                revocation.reload_now();
            })?;
        if !settings.crl_urls.is_empty() {
            let weak = self.downgrade();
            let timeout = settings.fetch_timeout;
            std::thread::Builder::new()
                .name("crl-fetch".into())
                .spawn(move || fetch_loop(weak, timeout))?;
        }
        Ok(())
    }
}

/// Fetches the URLs as they fall due. No strong handle is held across a fetch (one can take
/// the whole timeout), so the thread ends soon after the daemon drops its last clone.
fn fetch_loop(weak: WeakRevocation, timeout: Duration) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .proxy(None)
        .build()
        .into();
    loop {
        let Some(revocation) = weak.upgrade() else {
            return;
        };
        let due = revocation.fetches_due();
        drop(revocation);
        for url in due.urls {
            let result = fetch(&agent, &url);
            let Some(revocation) = weak.upgrade() else {
                return;
            };
            revocation.apply_fetched(&url, result);
        }
        let wait = due
            .next
            .map(|n| n.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        std::thread::sleep(wait);
    }
}

/// One GET of `url`: the body, or why there is none (the error is logged by the caller).
fn fetch(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, String> {
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_FETCHED_CRL_BYTES)
        .read_to_vec()
        .map_err(|e| e.to_string())
}
