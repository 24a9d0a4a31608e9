//! A member's AMQP 1.0 client on fe2o3 (the bridge's peer client before its own engine):
//! the second implementation the hostile-member, revocation and interop tests drive a float
//! with, so that the float is not only tested against its own engine's client.

use drawbridge_bridge::peer;
pub use drawbridge_bridge::peer::{ConnectFailure, PeerSettings};
use std::time::Duration;

use drawbridge_control_protocol::Target;
use fe2o3_amqp::{
    connection::ConnectionHandle, session::SessionHandle, Connection, Sender, Session,
};

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

/// Connect to `target`: TCP (NODELAY) → direct TLS → SASL EXTERNAL → session
/// → sender.
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
    // TLS here rather than inside fe2o3, as the bridge does (`peer::connect_tls`).
    let mut tls = peer::connect_tls(target, &s.tls, s.proxy.as_deref()).await?;
    sasl_external(&mut tls, &target.host)
        .await
        .map_err(|e| ConnectFailure::Amqp(format!("{target}: SASL: {e}")))?;
    let mut conn = Connection::builder()
        .container_id(s.container_id.clone())
        .scheme("amqp")
        .hostname(target.host.as_str())
        .max_frame_size(MAX_FRAME)
        .idle_time_out(s.idle_timeout.as_millis() as u32)
        .open_with_stream(tls)
        .await
        .map_err(|e| ConnectFailure::Amqp(format!("{target}: {e}")))?;
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

/// Largest frame the float may send (announced in `open`).
const MAX_FRAME: u32 = 256 * 1024;

/// Largest SASL frame read (the mechanisms and the outcome; AMQP's minimum max-frame-size is
/// 512 bytes, and SASL frames must fit it).
const MAX_SASL_FRAME: usize = 512;

/// The SASL layer, EXTERNAL (the identity is the TLS client certificate), done here because
/// fe2o3 0.18 refuses EXTERNAL on a stream it did not encrypt itself. Each read has the connect deadline of the caller.
async fn sasl_external<S>(io: &mut S, host: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use fe2o3_amqp::types::{
        primitives::Symbol,
        sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
    io.write_all(&SASL_HEADER)
        .await
        .map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    let mut header = [0u8; 8];
    io.read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    if header != SASL_HEADER {
        return Err(format!(
            "the float answered with protocol header {header:02x?}"
        ));
    }
    let mechanisms: SaslMechanisms = serde_amqp::from_slice(&read_sasl_frame(io).await?)
        .map_err(|e| format!("sasl-mechanisms: {e}"))?;
    if !mechanisms
        .sasl_server_mechanisms
        .0
        .iter()
        .any(|m| m.0 == "EXTERNAL")
    {
        return Err("the float does not offer EXTERNAL".into());
    }
    let init = SaslInit {
        mechanism: Symbol::from("EXTERNAL"),
        initial_response: None,
        hostname: Some(host.to_string()),
    };
    let body = serde_amqp::to_vec(&init).map_err(|e| e.to_string())?;
    let mut frame = Vec::with_capacity(8 + body.len());
    frame.extend_from_slice(&(8 + body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&[2, 1, 0, 0]);
    frame.extend_from_slice(&body);
    io.write_all(&frame).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    let outcome: SaslOutcome = serde_amqp::from_slice(&read_sasl_frame(io).await?)
        .map_err(|e| format!("sasl-outcome: {e}"))?;
    match outcome.code {
        SaslCode::Ok => Ok(()),
        code => Err(format!("the float refused EXTERNAL ({code:?})")),
    }
}

/// One SASL frame's body (after the extended header).
async fn read_sasl_frame<S>(io: &mut S) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 8];
    io.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let doff = usize::from(head[4]) * 4;
    if head[5] != 1 || size > MAX_SASL_FRAME || doff < 8 || doff > size {
        return Err(format!("not a SASL frame: header {head:02x?}"));
    }
    let mut rest = vec![0u8; size - 8];
    io.read_exact(&mut rest).await.map_err(|e| e.to_string())?;
    Ok(rest.split_off(doff - 8))
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
