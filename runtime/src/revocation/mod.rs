//! The revocation keys both daemons share (under their own section) and starting the
//! background CRL refresh.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `crls` | `[]` | CRL files (PEM or DER), re-read when they change |
//! | `crl_urls` | `[]` | `http://` URLs fetched in the background |
//! | `revocation` | `soft-fail` with a CRL source, `off` without | `hard-fail`, `soft-fail` or `off` |
//! | `crl_reload_interval` | `30s` | how often files are polled and CRL expiry re-evaluated |
//! | `crl_fetch_interval` | `5m` | how often each URL is fetched after a success |
//! | `crl_fetch_timeout` | `10s` | deadline of one fetch |

mod refresh;

pub use refresh::SpawnRefresh;

use std::{path::PathBuf, sync::Arc, time::Duration};

use drawbridge_certs::{
    rustls::RootCertStore, CertError, Revocation, RevocationMode, RevocationSettings,
};
use tracing::{info, warn};

use crate::config::ConfigReader;

/// Reads `<section>.crls`, `crl_urls`, `revocation`, `crl_reload_interval`,
/// `crl_fetch_interval` and `crl_fetch_timeout`, reporting every problem by key.
pub fn read_settings(r: &mut ConfigReader, section: &str) -> RevocationSettings {
    let key = |k: &str| format!("{section}.{k}");
    let defaults = RevocationSettings::default();
    let crl_files: Vec<PathBuf> = r.get(&key("crls"), Vec::new());
    let crl_urls: Vec<String> = r.get(&key("crl_urls"), Vec::new());
    for (i, u) in crl_urls.iter().enumerate() {
        let ok = url::Url::parse(u)
            .map(|p| p.scheme() == "http" && p.host().is_some())
            .unwrap_or(false);
        r.check(
            &format!("{}[{i}]", key("crl_urls")),
            ok,
            format!(
                "`{u}` is not an http:// URL (CRLs are signed; they are fetched over plain HTTP)"
            ),
        );
    }
    let has_sources = !crl_files.is_empty() || !crl_urls.is_empty();
    let mode = match r.optional::<String>(&key("revocation")) {
        None => RevocationMode::default_for(has_sources),
        Some(s) => match s.parse::<RevocationMode>() {
            Ok(m) => m,
            Err(e) => {
                r.invalid(&key("revocation"), e);
                RevocationMode::default_for(has_sources)
            }
        },
    };
    r.check(
        &key("revocation"),
        mode == RevocationMode::Off || has_sources,
        format!(
            "`{mode}` needs a CRL source: set `{}` or `{}` (or `revocation = \"off\"`)",
            key("crls"),
            key("crl_urls")
        ),
    );
    let reload_interval = r.duration(&key("crl_reload_interval"), defaults.reload_interval);
    r.check(
        &key("crl_reload_interval"),
        reload_interval >= Duration::from_millis(100),
        "must be at least 100ms",
    );
    let fetch_interval = r.duration(&key("crl_fetch_interval"), defaults.fetch_interval);
    r.check(
        &key("crl_fetch_interval"),
        fetch_interval >= Duration::from_secs(1),
        "must be at least 1s",
    );
    let fetch_timeout = r.duration(&key("crl_fetch_timeout"), defaults.fetch_timeout);
    r.check(
        &key("crl_fetch_timeout"),
        fetch_timeout >= Duration::from_millis(100),
        "must be at least 100ms",
    );
    RevocationSettings {
        mode,
        crl_files,
        crl_urls,
        reload_interval,
        fetch_interval,
        fetch_timeout,
    }
}

/// Loads the CRL files (an unreadable or malformed one is a start error), starts the
/// background refresh and logs what is in force.
pub fn start(
    roots: Arc<RootCertStore>,
    settings: RevocationSettings,
) -> Result<Revocation, CertError> {
    if settings.mode == RevocationMode::Off
        && (!settings.crl_files.is_empty() || !settings.crl_urls.is_empty())
    {
        warn!("CRLs are configured but `revocation = \"off\"`: no certificate is checked for revocation");
    }
    let revocation = Revocation::load(roots, settings.clone())?;
    revocation.spawn_refresh().map_err(|e| CertError::Io {
        path: PathBuf::from("<crl refresh thread>"),
        source: e,
    })?;
    info!(
        mode = %settings.mode,
        crl_files = settings.crl_files.len(),
        crl_urls = settings.crl_urls.len(),
        crls = revocation.crl_count(),
        reload_interval = ?settings.reload_interval,
        "revocation checking"
    );
    Ok(revocation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(toml: &str) -> (RevocationSettings, Vec<String>) {
        let mut r = ConfigReader::from_toml(toml).unwrap();
        let s = read_settings(&mut r, "float");
        let errs = r.finish().err().map(|e| e.0).unwrap_or_default();
        (s, errs)
    }

    #[test]
    fn defaults_follow_the_sources() {
        let (s, errs) = read("[float]\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.mode, RevocationMode::Off);
        let (s, errs) = read("[float]\ncrls = [\"a.crl\"]\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.mode, RevocationMode::SoftFail);
        assert_eq!(s.reload_interval, Duration::from_secs(30));
        let (s, _) = read("[float]\ncrl_urls = [\"http://ca.example/a.crl\"]\nrevocation = \"hard-fail\"\ncrl_reload_interval = \"1s\"\n");
        assert_eq!(s.mode, RevocationMode::HardFail);
        assert_eq!(s.reload_interval, Duration::from_secs(1));
    }

    #[test]
    fn problems_are_reported_by_key() {
        let (_, errs) = read("[float]\nrevocation = \"strict\"\ncrl_urls = [\"https://x/a.crl\", \"nope\"]\ncrl_reload_interval = \"1ms\"\n");
        for key in [
            "float.revocation",
            "float.crl_urls[0]",
            "float.crl_urls[1]",
            "float.crl_reload_interval",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:#?}");
        }
        let (_, errs) = read("[float]\nrevocation = \"hard-fail\"\n");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("float.revocation") && e.contains("needs a CRL source")),
            "{errs:#?}"
        );
        let (s, errs) = read("[float]\nrevocation = \"off\"\ncrls = [\"a.crl\"]\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.mode, RevocationMode::Off);
    }
}
