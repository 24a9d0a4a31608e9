//! Reloading the sources: re-reading changed files, taking in fetched URLs, noticing CRL
//! expiry.
//!
//! Only the synchronous steps live here. The loops that call them — a thread polling the
//! files every `reload_interval`, one fetching the URLs over HTTP — are the daemons'
//! (`drawbridge_runtime::revocation`), so this crate holds no thread, timer or HTTP client.

use std::time::Instant;

use tracing::{debug, info, warn};

use super::crl::{parse_crls, Crl};
use super::sources::FETCH_RETRY_MIN;
use super::{unix_now, Revocation, RevocationMode};
use crate::FileStamp;

/// The URLs to fetch now, and when the next fetch is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchesDue {
    /// Due now (or overdue), in configuration order.
    pub urls: Vec<String>,
    /// The earliest due time of any URL, as of this call (`None`: no URLs configured).
    pub next: Option<Instant>,
}

impl Revocation {
    /// Poll the files once: re-read those that changed, re-evaluate CRL expiry. Returns
    /// whether the generation moved. The runtime's polling thread calls this every
    /// `reload_interval`; tests may call it directly.
    pub fn reload_now(&self) -> bool {
        let changed = self.poll_files();
        let rebuilt = changed && self.rebuild("file", true);
        let expiry = self.check_expiry(!rebuilt);
        rebuilt || expiry
    }

    /// Re-reads changed files; true if any file's CRLs changed.
    fn poll_files(&self) -> bool {
        let mut sources = self.inner.sources.lock().expect("poisoned");
        let mut changed = false;
        for file in sources
            .files
            .iter_mut()
            .filter(|f| !f.path.as_os_str().is_empty())
        {
            let problem = match FileStamp::of(&file.path) {
                Err(e) => Some(format!("cannot access it: {e}")),
                Ok(st) if Some(&st) == file.stamp.as_ref() => None,
                Ok(st) => match std::fs::read(&file.path) {
                    Err(e) => Some(format!("cannot read it: {e}")),
                    Ok(bytes) => match parse_crls(&bytes, &file.path.display().to_string()) {
                        Err(e) => {
                            // Retry the same version only if it changes again.
                            file.stamp = Some(st);
                            Some(e)
                        }
                        Ok(crls) => {
                            file.stamp = Some(st);
                            let same = crls.len() == file.crls.len()
                                && crls.iter().zip(&file.crls).all(|(a, b)| a.der == b.der);
                            if !same {
                                info!(file = %file.path.display(), crls = crls.len(), "CRL file changed; reloaded");
                                file.crls = crls;
                                changed = true;
                            }
                            None
                        }
                    },
                },
            };
            match problem {
                Some(p) => {
                    if file.problem.as_ref() != Some(&p) {
                        warn!(file = %file.path.display(), problem = %p, "CRL file unusable; keeping its last good CRLs");
                        file.problem = Some(p);
                    }
                }
                None => {
                    if file.problem.take().is_some() {
                        info!(file = %file.path.display(), "CRL file usable again");
                    }
                }
            }
        }
        changed
    }

    /// Logs CRLs that crossed `nextUpdate` (or were renewed) since the last check; moves
    /// the generation if `bump` and the set changed.
    pub(super) fn check_expiry(&self, bump: bool) -> bool {
        let now = unix_now();
        let expired: Vec<String> = self
            .current()
            .crls
            .iter()
            .filter(|c| c.expired_at(now).is_some())
            .map(Crl::label)
            .collect();
        let mut sources = self.inner.sources.lock().expect("poisoned");
        if expired == sources.expired {
            return false;
        }
        for label in expired.iter().filter(|l| !sources.expired.contains(l)) {
            match self.mode() {
                RevocationMode::HardFail => {
                    warn!(crl = %label, "CRL past its nextUpdate: hard-fail refuses every certificate it covers until a newer one is loaded")
                }
                _ => {
                    warn!(crl = %label, "CRL past its nextUpdate: still applied (soft-fail); load a newer one")
                }
            }
        }
        sources.expired = expired;
        drop(sources);
        if bump {
            self.inner.generation.send_modify(|g| *g += 1);
        }
        bump
    }

    /// The URLs due for a fetch now, and when the next one is due: the fetch loop fetches
    /// these, hands each outcome to [`Revocation::apply_fetched`], and asks again.
    pub fn fetches_due(&self) -> FetchesDue {
        let sources = self.inner.sources.lock().expect("poisoned");
        let now = Instant::now();
        let urls = sources
            .urls
            .iter()
            .filter(|u| u.next_due <= now)
            .map(|u| u.url.clone())
            .collect();
        let next = sources.urls.iter().map(|u| u.next_due).min();
        FetchesDue { urls, next }
    }

    /// Records the outcome of one fetch of `url` (the body, or why there is none): a new
    /// body's CRLs are parsed and may come into force; a failure schedules the retry with
    /// backoff. Unknown URLs are ignored.
    pub fn apply_fetched(&self, url: &str, result: Result<Vec<u8>, String>) {
        let fetch_interval = self.inner.settings.fetch_interval;
        let mut changed = false;
        {
            let mut sources = self.inner.sources.lock().expect("poisoned");
            let Some(source) = sources.urls.iter_mut().find(|u| u.url == url) else {
                return;
            };
            let result = result.and_then(|bytes| parse_crls(&bytes, url).map(|c| (bytes, c)));
            match result {
                Ok((bytes, crls)) => {
                    if source.failing {
                        info!(url, "CRL fetch works again");
                    }
                    source.failing = false;
                    source.retry = FETCH_RETRY_MIN;
                    source.next_due = Instant::now() + fetch_interval;
                    if bytes != source.bytes {
                        debug!(url, crls = crls.len(), "fetched a new CRL");
                        source.bytes = bytes;
                        source.crls = crls;
                        changed = true;
                    }
                }
                Err(e) => {
                    let retry = source.retry;
                    if !source.failing {
                        warn!(url, error = %e, retry_in = ?retry, "cannot fetch CRL; its last good copy (if any) stays in force, retrying with backoff");
                    } else {
                        debug!(url, error = %e, retry_in = ?retry, "CRL fetch still failing");
                    }
                    source.failing = true;
                    source.next_due = Instant::now() + retry;
                    source.retry = (retry * 2).min(fetch_interval.max(FETCH_RETRY_MIN));
                }
            }
        }
        if changed {
            let rebuilt = self.rebuild("url", true);
            self.check_expiry(!rebuilt);
        }
    }
}
