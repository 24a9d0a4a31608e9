//! The outbound AMQP 1.0 connection to one float target.

use std::{sync::Arc, time::Duration};

use drawbridge_amqp::{
    self as amqp,
    connection::{Config, Connection, Event, LinkId},
    driver::Driver,
    Limits,
};
use drawbridge_control_protocol::Target;
use drawbridge_runtime::proxy::Proxies;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Why connecting to a target failed; the kind decides how soon it is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// TCP refused, unreachable or timed out: retry on the normal backoff.
    Network(String),
    /// TLS verification failed (wrong CA, subject not in `legal_names`, expired...): a
    /// configuration problem, retried later than network trouble.
    Tls(String),
    /// AMQP open, SASL, session or attach failed.
    Amqp(String),
}

impl ConnectFailure {
    /// The reason, for logs and status.
    pub fn reason(&self) -> String {
        match self {
            ConnectFailure::Network(s) => format!("network: {s}"),
            ConnectFailure::Tls(s) => format!("TLS: {s}"),
            ConnectFailure::Amqp(s) => format!("AMQP: {s}"),
        }
    }
}

/// The stream a peer connection runs on.
pub type PeerStream =
    tokio_rustls::client::TlsStream<drawbridge_runtime::coalesce::Coalesce<TcpStream>>;

/// One open peer connection with a sending link, driven by the link's own task: the
/// engine (`drawbridge_amqp`) is a state machine, so a transfer and its disposition cross no
/// task boundary.
#[derive(Debug)]
pub struct PeerConnection {
    /// The connection and its stream.
    pub driver: Driver<PeerStream>,
    /// The sending link to the target address.
    pub link: LinkId,
    /// The canary's sending link (with `canary_address` set), or why the float refused it:
    /// a float without canary support must not cost the link its messages.
    pub canary: Option<Result<LinkId, String>>,
    /// Which target this is.
    pub target: Target,
}

/// Settings for connecting.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// Client TLS config pinning the link's legal names.
    pub tls: Arc<rustls::ClientConfig>,
    /// Deadline for the whole connect.
    pub connect_timeout: Duration,
    /// AMQP idle timeout.
    pub idle_timeout: Duration,
    /// Container id announced in Open.
    pub container_id: String,
    /// Link name.
    pub link_name: String,
    /// AMQP 1.0 target address.
    pub address: String,
    /// Target address of the link canary; `None` attaches no canary link.
    pub canary_address: Option<String>,
    /// The outbound proxy (`[bridge.proxy]`), if connections go through one.
    pub proxy: Option<Arc<Proxies>>,
}

/// Connect to `target`: TCP (NODELAY) → direct TLS → SASL EXTERNAL → open → session →
/// sender (and the canary's sender).
pub async fn connect(target: &Target, s: &PeerSettings) -> Result<PeerConnection, ConnectFailure> {
    match tokio::time::timeout(s.connect_timeout, connect_inner(target, s)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectFailure::Network(format!(
            "{target}: no answer within {:?}",
            s.connect_timeout
        ))),
    }
}

/// What a float may hold the bridge to: one session, two links (the link and its canary);
/// the decoder's limits bound everything it sends (depth, sizes, counts), so a hostile float
/// is refused while its frames are read, never after.
fn engine_config(target: &Target, s: &PeerSettings) -> Config {
    Config {
        container_id: s.container_id.clone(),
        hostname: Some(target.host.clone()),
        max_frame_size: MAX_FRAME,
        max_sessions: 1,
        max_links_per_session: 2,
        idle_timeout: s.idle_timeout,
        min_peer_idle_timeout: Duration::from_secs(1),
        incoming_window: 2048,
        // The bridge receives no messages.
        max_message_size: 0,
        sasl_external: true,
        limits: Limits::DEFAULT,
    }
}

/// TCP (NODELAY), directly or through `proxy` (unless it bypasses the target's host), and the
/// TLS handshake to `target` with `tls`, end to end through the proxy; failures classified for
/// the retry policy (a proxy's refusal is a network failure: the next target may go).
pub async fn connect_tls(
    target: &Target,
    tls: &Arc<rustls::ClientConfig>,
    proxy: Option<&Proxies>,
) -> Result<PeerStream, ConnectFailure> {
    let tcp = match proxy.and_then(|p| p.for_host(&target.host)) {
        Some(p) => p
            .connect(&target.host, target.port)
            .await
            .map_err(|e| ConnectFailure::Network(format!("{target}: {e}")))?,
        None => TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| ConnectFailure::Network(format!("{target}: {e}")))?,
    };
    let _ = tcp.set_nodelay(true);
    // The host name is not what is verified (the link's legal names are), but rustls needs
    // one for SNI.
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| ConnectFailure::Tls(format!("{target}: {e}")))?;
    // What the engine queued in one step leaves in one write; `Coalesce` keeps TLS records
    // of one flush in one segment.
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, drawbridge_runtime::coalesce::Coalesce::new(tcp))
        .await
        .map_err(|e| classify_tls(target, &e))
}

async fn connect_inner(
    target: &Target,
    s: &PeerSettings,
) -> Result<PeerConnection, ConnectFailure> {
    let tls = connect_tls(target, &s.tls, s.proxy.as_deref()).await?;
    let mut driver = Driver::new(tls, Connection::client(engine_config(target, s)));
    let amqp = |e: String| ConnectFailure::Amqp(format!("{target}: {e}"));
    let session = driver.conn().begin().map_err(|e| amqp(e.to_string()))?;
    let link = driver
        .conn()
        .attach_sender(session, &s.link_name, &s.address)
        .map_err(|e| amqp(e.to_string()))?;
    let canary_name = format!("{}-canary", s.link_name);
    let canary_link = match &s.canary_address {
        Some(address) => Some(
            driver
                .conn()
                .attach_sender(session, &canary_name, address)
                .map_err(|e| amqp(e.to_string()))?,
        ),
        None => None,
    };
    // The link itself: attached when the float answers with a target, refused when it
    // answers without one (and detaches with its reason).
    let mut refused = false;
    let mut canary: Option<Result<LinkId, String>> = None;
    loop {
        match next(&mut driver, target).await? {
            Event::LinkReady { link: l, attach } if l == link => {
                if attach.target.is_some() {
                    break;
                }
                refused = true;
            }
            Event::Detached { link: l, error } if l == link => {
                let why = if refused { "refused" } else { "detached" };
                return Err(amqp(format!(
                    "attach to `{}` {why}: {}",
                    s.address,
                    describe(error.as_ref())
                )));
            }
            e => note_canary(e, canary_link, &mut canary, s),
        }
    }
    // Bounded on its own (half the connect deadline): a float that does not answer the
    // canary's attach must not keep the link itself from coming up.
    if let (Some(c), None) = (canary_link, &canary) {
        let wait = s.connect_timeout / 2;
        let address = s.canary_address.as_deref().unwrap_or_default();
        let answered = tokio::time::timeout(wait, async {
            while canary.is_none() {
                let e = next(&mut driver, target).await?;
                note_canary(e, Some(c), &mut canary, s);
            }
            Ok::<_, ConnectFailure>(())
        })
        .await;
        match answered {
            Ok(r) => r?,
            Err(_) => {
                canary = Some(Err(format!(
                    "the float did not answer the canary link to `{address}` within {wait:?}"
                )))
            }
        }
    }
    Ok(PeerConnection {
        driver,
        link,
        canary,
        target: target.clone(),
    })
}

/// The next event while connecting; a closed connection or a failed stream is the
/// connect's failure.
async fn next(driver: &mut Driver<PeerStream>, target: &Target) -> Result<Event, ConnectFailure> {
    match driver.next_event().await {
        Ok(Event::Closed {
            error, violation, ..
        }) => {
            if let Some(label) = violation {
                hostile(target, label, error.as_ref());
            }
            Err(ConnectFailure::Amqp(format!(
                "{target}: connection closed: {}",
                describe(error.as_ref())
            )))
        }
        Ok(Event::Ended { error, .. }) => Err(ConnectFailure::Amqp(format!(
            "{target}: session ended: {}",
            describe(error.as_ref())
        ))),
        Ok(e) => Ok(e),
        Err(e) => Err(ConnectFailure::Network(format!("{target}: {e}"))),
    }
}

/// Takes what an event says about the canary's attach.
fn note_canary(
    e: Event,
    canary_link: Option<LinkId>,
    canary: &mut Option<Result<LinkId, String>>,
    s: &PeerSettings,
) {
    let Some(c) = canary_link else { return };
    let address = s.canary_address.as_deref().unwrap_or_default();
    match e {
        Event::LinkReady { link, attach }
            if link == c && canary.is_none() && attach.target.is_some() =>
        {
            *canary = Some(Ok(c));
        }
        Event::Detached { link, error } if link == c => {
            *canary = Some(Err(format!(
                "the float refused the canary link to `{address}`: {}",
                describe(error.as_ref())
            )));
        }
        _ => {}
    }
}

/// An AMQP error as one line of text.
/// The float writes both parts: each is cut to [`MAX_FLOAT_TEXT`] bytes (the engine keeps up
/// to 64 KiB of a description), since the result goes into the log, `/status` and the
/// `LinkStatus` event at every reconnect.
pub(crate) fn describe(error: Option<&amqp::performatives::Error>) -> String {
    use drawbridge_runtime::text::truncate;
    let cut = |s: &str| {
        let kept = truncate(s, MAX_FLOAT_TEXT);
        if kept.len() < s.len() {
            format!("{kept}…")
        } else {
            kept.to_string()
        }
    };
    match error {
        None => "no error given".into(),
        Some(e) => {
            let condition = cut(&String::from_utf8_lossy(&e.condition));
            match &e.description {
                Some(d) => format!("{condition}: {}", cut(d)),
                None => condition,
            }
        }
    }
}

/// Longest part of a float's error kept in a link's reason (as the dead-letter reason keeps
/// of a rejection, `settle::MAX_PEER_REASON`).
const MAX_FLOAT_TEXT: usize = crate::settle::MAX_PEER_REASON;

/// A float that broke the protocol or the decoder's limits: one line and a count, as the
/// runbooks say (`drawbridge_bridge_peer_frames_refused_total{reason}`). A float that fell
/// silent is no attacker: that is a lost connection, said where it ends the link.
pub(crate) fn hostile(
    target: &Target,
    label: &'static str,
    error: Option<&amqp::performatives::Error>,
) {
    if label == "silent" {
        return;
    }
    tracing::warn!(target_addr = %drawbridge_runtime::text::escape(&target.to_string()), reason = %drawbridge_runtime::text::escape(&describe(error)), "float connection closed: malformed or hostile AMQP frames");
    metrics::counter!("drawbridge_bridge_peer_frames_refused_total", "reason" => label)
        .increment(1);
}

/// Largest frame the float may send (announced in `open`, enforced by the decoder).
const MAX_FRAME: u32 = 256 * 1024;

/// A TLS handshake's failure: verification problems are `Tls` (retried later), the rest
/// network trouble.
fn classify_tls(target: &Target, io: &std::io::Error) -> ConnectFailure {
    if let Some(inner) = io.get_ref() {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return ConnectFailure::Tls(format!("{target}: {tls}"));
        }
    }
    match io.kind() {
        std::io::ErrorKind::InvalidData => ConnectFailure::Tls(format!("{target}: {io}")),
        _ => ConnectFailure::Network(format!("{target}: {io}")),
    }
}

impl PeerConnection {
    /// Close the connection with a short deadline (the peer may be gone already): our
    /// `close`, the float's answer, then the stream's end.
    pub async fn close(mut self) {
        let d = Duration::from_secs(2);
        self.driver.conn().close(None);
        let _ = tokio::time::timeout(d, async {
            loop {
                match self.driver.next_event().await {
                    Ok(Event::Closed { .. }) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(d, self.driver.finish()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floats_long_error_is_cut_in_the_links_reason() {
        let e = amqp::performatives::Error::new("amqp:internal-error", "é".repeat(30_000));
        let d = describe(Some(&e));
        assert!(d.starts_with("amqp:internal-error: é"), "{d}");
        assert!(d.ends_with('…'));
        assert!(d.len() <= MAX_FLOAT_TEXT + 64, "{} bytes", d.len());
        assert_eq!(describe(None), "no error given");
    }
}
