//! The outbound AMQP 1.0 connection to one float target.

use std::{sync::Arc, time::Duration};

use drawbridge_control_protocol::Target;
use fe2o3_amqp::{
    connection::{ConnectionHandle, OpenError},
    sasl_profile::SaslProfile,
    session::SessionHandle,
    Connection, Sender, Session,
};
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

/// One open peer connection with a sending link.
#[derive(Debug)]
pub struct PeerConnection {
    /// The AMQP connection.
    pub conn: ConnectionHandle<()>,
    /// Its one session.
    pub session: SessionHandle<()>,
    /// The sending link to the target address.
    pub sender: Sender,
    /// The canary's sending link (with `canary_address` set), or why the float refused it:
    /// a float without canary support must not cost the link its messages.
    pub canary: Option<Result<Sender, String>>,
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
}

/// Connect to `target`: TCP (NODELAY) → direct TLS → SASL EXTERNAL → session → sender.
pub async fn connect(target: &Target, s: &PeerSettings) -> Result<PeerConnection, ConnectFailure> {
    match tokio::time::timeout(s.connect_timeout, connect_inner(target, s)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectFailure::Network(format!(
            "{target}: no answer within {:?}",
            s.connect_timeout
        ))),
    }
}

async fn connect_inner(
    target: &Target,
    s: &PeerSettings,
) -> Result<PeerConnection, ConnectFailure> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| ConnectFailure::Network(format!("{target}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(s.tls.clone());
    let mut conn = Connection::builder()
        .container_id(s.container_id.clone())
        .scheme("amqps")
        .domain(target.host.as_str())
        .alt_tls_establishment(true)
        .rustls_connector(connector)
        .sasl_profile(SaslProfile::External)
        .hostname(target.host.as_str())
        .max_frame_size(256 * 1024u32)
        .idle_time_out(s.idle_timeout.as_millis() as u32)
        // Frames written while the connection engine is busy leave in one write (and TLS
        // records in one segment) instead of one `writev` per frame: see `Coalesce`.
        .open_with_stream(drawbridge_runtime::coalesce::Coalesce::new(tcp))
        .await
        .map_err(|e| classify(target, e))?;
    let mut session = match Session::begin(&mut conn).await {
        Ok(s) => s,
        Err(e) => {
            let _ = conn.close().await;
            return Err(ConnectFailure::Amqp(format!("{target}: session: {e}")));
        }
    };
    let sender = match Sender::attach(&mut session, s.link_name.clone(), s.address.clone()).await {
        Ok(l) => l,
        Err(e) => {
            let _ = session.end().await;
            let _ = conn.close().await;
            return Err(ConnectFailure::Amqp(format!(
                "{target}: attach to `{}`: {e}",
                s.address
            )));
        }
    };
    // Bounded on its own (half the connect deadline): a float that does not answer the
    // canary's attach must not keep the link itself from coming up.
    let canary = match &s.canary_address {
        None => None,
        Some(address) => {
            let name = format!("{}-canary", s.link_name);
            let wait = s.connect_timeout / 2;
            Some(
                match tokio::time::timeout(
                    wait,
                    Sender::attach(&mut session, name, address.clone()),
                )
                .await
                {
                    Ok(Ok(sender)) => Ok(sender),
                    Ok(Err(e)) => Err(format!(
                        "the float refused the canary link to `{address}`: {e}"
                    )),
                    Err(_) => Err(format!(
                        "the float did not answer the canary link to `{address}` within {wait:?}"
                    )),
                },
            )
        }
    };
    Ok(PeerConnection {
        conn,
        session,
        sender,
        canary,
        target: target.clone(),
    })
}

fn classify(target: &Target, e: OpenError) -> ConnectFailure {
    if let OpenError::Io(io) = &e {
        if let Some(inner) = io.get_ref() {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return ConnectFailure::Tls(format!("{target}: {tls}"));
            }
        }
        return match io.kind() {
            std::io::ErrorKind::InvalidData => ConnectFailure::Tls(format!("{target}: {io}")),
            _ => ConnectFailure::Network(format!("{target}: {io}")),
        };
    }
    ConnectFailure::Amqp(format!("{target}: {e}"))
}

impl PeerConnection {
    /// Close link, session and connection, each with a short deadline (the peer may be
    /// gone already).
    ///
    /// The closing futures are boxed: together they are several KiB, awaited once per
    /// connection, and a caller's task would otherwise keep room for them for its whole life
    /// (1,000 idle links, 1,000 such tasks).
    pub async fn close(self) {
        Box::pin(self.close_inner()).await;
    }

    async fn close_inner(self) {
        let d = Duration::from_secs(2);
        let PeerConnection {
            mut conn,
            mut session,
            sender,
            canary,
            ..
        } = self;
        if let Some(Ok(canary)) = canary {
            let _ = tokio::time::timeout(d, canary.close()).await;
        }
        let _ = tokio::time::timeout(d, sender.close()).await;
        let _ = tokio::time::timeout(d, session.end()).await;
        let _ = tokio::time::timeout(d, conn.close()).await;
    }
}
