//! The tunnel's framing on a byte stream (`docs/tunnel.md`): a `tokio_util` codec over
//! [`drawbridge_control_protocol::tunnel`], shared by the bridge (which dials) and the float
//! (which accepts), so both refuse the same frames the same way.

use bytes::{Buf, BytesMut};
use drawbridge_control_protocol::tunnel::{self, Body, FrameError};
use tokio_util::codec::{Decoder, Encoder};

/// Why a tunnel's stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelIoError {
    /// The other side sent a frame this side refuses.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("tunnel I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-prefixed tunnel frames of at most `max` bytes each way.
#[derive(Debug, Clone, Copy)]
pub struct TunnelCodec {
    max: usize,
}

impl TunnelCodec {
    /// A codec for a tunnel carrying messages of at most `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> Self {
        TunnelCodec {
            max: tunnel::frame_limit(max_message_size),
        }
    }
}

impl Decoder for TunnelCodec {
    type Item = Body;
    type Error = TunnelIoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Body>, TunnelIoError> {
        match tunnel::decode(src, self.max)? {
            Some((body, used)) => {
                src.advance(used);
                Ok(Some(body))
            }
            None => {
                // Room for the whole frame once its length is known (bounded by `max`,
                // checked by `decode` before this).
                if let Some(len) = tunnel::declared_len(src) {
                    src.reserve(len.saturating_sub(src.len()));
                }
                Ok(None)
            }
        }
    }
}

impl Encoder<Body> for TunnelCodec {
    type Error = TunnelIoError;

    fn encode(&mut self, body: Body, dst: &mut BytesMut) -> Result<(), TunnelIoError> {
        let mut out = Vec::new();
        tunnel::encode(body, &mut out);
        if out.len().saturating_sub(4) > self.max {
            return Err(FrameError::TooLarge {
                len: out.len() - 4,
                max: self.max,
            }
            .into());
        }
        dst.extend_from_slice(&out);
        Ok(())
    }
}

/// How long a write on the tunnel may wait for the other side to take bytes: a tunnel whose
/// other end stopped reading (or whose path went black) is given up instead of holding its
/// task, and with it the heartbeat, forever.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// `write` (a send, feed or flush on the tunnel), given up after [`WRITE_TIMEOUT`].
pub async fn within<T>(
    write: impl std::future::Future<Output = Result<T, TunnelIoError>>,
) -> Result<T, String> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("the other side took nothing for {WRITE_TIMEOUT:?}")),
    }
}
