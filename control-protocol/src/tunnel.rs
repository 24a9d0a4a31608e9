//! The tunnel between a bridge and a float in tunnel mode (`docs/tunnel.md`): frames, their
//! bounds and the length-prefixed framing, without I/O.
//!
//! Each frame is a 4-byte big-endian length, then one protobuf [`proto::TunnelFrame`]. The
//! receiver refuses a declared length above its limit before it allocates anything, and
//! [`decode`] checks every field against its bound, so a compromised peer of the tunnel (a
//! float in the DMZ is the exposed side) gets a clear refusal, never an unbounded buffer.

/// The generated types of `proto/drawbridge/tunnel/v1/tunnel.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!("gen/drawbridge.tunnel.v1.rs");
}

use prost::Message as _;
pub use proto::{tunnel_frame::Body, TunnelFrame};

/// The tunnel protocol's version; a hello with a newer one is refused.
pub const TUNNEL_VERSION: u32 = 1;

/// Room for a frame's fields around the message it carries.
pub const FRAME_OVERHEAD: usize = 64 * 1024;

/// Longest legal name, bridge or float id, inbox name or reason carried.
pub const MAX_NAME: usize = 1024;

/// Longest content a float may ask to have signed: a TLS 1.3 CertificateVerify content is 64
/// spaces, a 33-byte context string, a zero and a transcript hash of at most 64 bytes.
pub const MAX_SIGN_MESSAGE: usize = 64 + 34 + 64;

/// Longest signature (RSA 8192 is 1 KiB).
pub const MAX_SIGNATURE: usize = 1024;

/// Longest certificate in a float's hello.
pub const MAX_CERTIFICATE: usize = 16 * 1024;

/// Why a frame was refused. Any of them closes the tunnel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared length is above the receiver's limit.
    #[error("tunnel frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The receiver's limit.
        max: usize,
    },
    /// Not a protobuf `TunnelFrame`.
    #[error("malformed tunnel frame: {0}")]
    Malformed(String),
    /// A frame with no body this build knows.
    #[error("tunnel frame with an unknown or missing body")]
    NoBody,
    /// A field above its bound.
    #[error("tunnel frame field `{field}` has {len} bytes, more than {max}")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Its bound.
        max: usize,
    },
}

/// The frame limit for a tunnel carrying messages of at most `max_message_size` bytes.
pub fn frame_limit(max_message_size: usize) -> usize {
    max_message_size.saturating_add(FRAME_OVERHEAD)
}

/// Append `body` as one length-prefixed frame to `out`.
pub fn encode(body: Body, out: &mut Vec<u8>) {
    let frame = TunnelFrame { body: Some(body) };
    let len = frame.encoded_len();
    out.reserve(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    // Encoding into a Vec cannot run out of room.
    let _ = frame.encode(out);
}

/// The first frame of `buf`, if it holds a whole one: the frame's body and the bytes it took.
/// `Ok(None)` asks for more bytes. A declared length above `max` is refused from the prefix
/// alone.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Body, usize)>, FrameError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let Some(bytes) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let frame = TunnelFrame::decode(bytes).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let body = frame.body.ok_or(FrameError::NoBody)?;
    check(&body)?;
    Ok(Some((body, 4 + len)))
}

/// How many bytes the frame at the front of `buf` declares (prefix included), once the
/// prefix is there: what a reader must hold before [`decode`] can answer.
pub fn declared_len(buf: &[u8]) -> Option<usize> {
    let prefix = buf.get(..4)?;
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(prefix);
    Some(4 + u32::from_be_bytes(len_bytes) as usize)
}

fn bounded(field: &'static str, len: usize, max: usize) -> Result<(), FrameError> {
    if len > max {
        return Err(FrameError::FieldTooLong { field, len, max });
    }
    Ok(())
}

/// Every field against its bound (the message of a `Publish` is bounded by the frame).
fn check(body: &Body) -> Result<(), FrameError> {
    match body {
        Body::BridgeHello(h) => bounded("bridge_id", h.bridge_id.len(), MAX_NAME),
        Body::FloatHello(h) => {
            bounded("float_id", h.float_id.len(), MAX_NAME)?;
            bounded("certificate", h.certificate.len(), MAX_CERTIFICATE)
        }
        Body::Deactivate(d) => bounded("reason", d.reason.len(), MAX_NAME),
        Body::Publish(p) => {
            bounded("sender", p.sender.len(), MAX_NAME)?;
            bounded("inbox", p.inbox.len(), MAX_NAME)
        }
        Body::Outcome(o) => bounded("reason", o.reason.len(), MAX_NAME),
        Body::SignRequest(r) => bounded("message", r.message.len(), MAX_SIGN_MESSAGE),
        Body::SignResponse(r) => {
            bounded("signature", r.signature.len(), MAX_SIGNATURE)?;
            bounded("error", r.error.len(), MAX_NAME)
        }
        Body::Activate(_) | Body::Ping(_) | Body::Pong(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(message: Vec<u8>) -> Body {
        Body::Publish(proto::Publish {
            seq: 7,
            sender: "O=Alice, L=London, C=GB".into(),
            inbox: "drawbridge.inbox".into(),
            message,
            probe: false,
        })
    }

    #[test]
    fn frames_round_trip_back_to_back_and_ask_for_more_when_cut() {
        let mut buf = Vec::new();
        encode(publish(vec![1, 2, 3]), &mut buf);
        encode(Body::Ping(proto::Ping { nonce: 9 }), &mut buf);
        let (first, used) = decode(&buf, 1024).unwrap().unwrap();
        assert_eq!(first, publish(vec![1, 2, 3]));
        assert_eq!(declared_len(&buf), Some(used));
        let (second, used2) = decode(&buf[used..], 1024).unwrap().unwrap();
        assert_eq!(second, Body::Ping(proto::Ping { nonce: 9 }));
        assert_eq!(used + used2, buf.len());
        for cut in 0..used {
            assert_eq!(decode(&buf[..cut], 1024), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_from_the_prefix_alone() {
        let prefix = 1_000_000u32.to_be_bytes();
        assert_eq!(
            decode(&prefix, 1024),
            Err(FrameError::TooLarge {
                len: 1_000_000,
                max: 1024
            })
        );
    }

    #[test]
    fn bounds_of_fields_and_bodies_are_enforced() {
        let mut buf = Vec::new();
        encode(
            Body::SignRequest(proto::SignRequest {
                id: 1,
                scheme: 0x0403,
                message: vec![0; MAX_SIGN_MESSAGE + 1],
            }),
            &mut buf,
        );
        assert!(matches!(
            decode(&buf, 4096),
            Err(FrameError::FieldTooLong {
                field: "message",
                ..
            })
        ));
        // An empty frame: no body.
        assert_eq!(decode(&[0, 0, 0, 0], 4096), Err(FrameError::NoBody));
        // Garbage.
        assert!(matches!(
            decode(&[0, 0, 0, 2, 0xff, 0xff], 4096),
            Err(FrameError::Malformed(_))
        ));
    }
}
