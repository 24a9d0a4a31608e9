//! Cutting a connection's bytes into protocol headers and frames (AMQP 1.0 part 2.3),
//! bounded by the negotiated maximum frame size before any body is buffered.

use bytes::{Buf as _, Bytes, BytesMut};

/// `AMQP` 0 1 0 0: the AMQP protocol header.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// `AMQP` 3 1 0 0: the SASL protocol header.
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";

/// Frame type of AMQP frames.
pub const TYPE_AMQP: u8 = 0;
/// Frame type of SASL frames.
pub const TYPE_SASL: u8 = 1;

/// Smallest maximum frame size a peer may announce (part 2.7.1).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// One frame: its header fields and its body (performative and payload), or an empty
/// (heartbeat) frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// 0 AMQP, 1 SASL.
    pub frame_type: u8,
    /// The channel.
    pub channel: u16,
    /// The body after the extended header; empty for a heartbeat.
    pub body: Bytes,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bigger than the maximum we announced.
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its size.
        size: u32,
        /// Ours.
        max: u32,
    },
    /// Size below 8, data offset below 2 or past the end.
    #[error("malformed frame header")]
    BadHeader,
    /// Not the protocol header expected.
    #[error("unexpected protocol header {0:02x?}")]
    BadProtocolHeader([u8; 8]),
}

/// Takes one frame off the front of `buf` if it is complete. A frame larger than `max` is
/// refused from its header alone, before its body is waited for.
pub fn take_frame(buf: &mut BytesMut, max: u32) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let doff = buf[4];
    if size < 8 || doff < 2 || u32::from(doff) * 4 > size {
        return Err(FrameError::BadHeader);
    }
    if size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    if buf.len() < size as usize {
        // Room for the whole frame, once: the peer sends it in pieces.
        buf.reserve(size as usize - buf.len());
        return Ok(None);
    }
    let frame_type = buf[5];
    let channel = u16::from_be_bytes([buf[6], buf[7]]);
    let mut frame = buf.split_to(size as usize);
    frame.advance(usize::from(doff) * 4);
    Ok(Some(Frame {
        frame_type,
        channel,
        body: frame.freeze(),
    }))
}

/// Takes the 8-byte protocol header off the front of `buf` if it is there and is `want`.
pub fn take_protocol_header(buf: &mut BytesMut, want: &[u8; 8]) -> Result<bool, FrameError> {
    if buf.len() < 8 {
        // Refuse early what can no longer become the header (e.g. a TLS record or HTTP).
        if buf[..] != want[..buf.len()] {
            let mut got = [0u8; 8];
            got[..buf.len()].copy_from_slice(buf);
            return Err(FrameError::BadProtocolHeader(got));
        }
        return Ok(false);
    }
    let mut got = [0u8; 8];
    got.copy_from_slice(&buf[..8]);
    if &got != want {
        return Err(FrameError::BadProtocolHeader(got));
    }
    buf.advance(8);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_frame_is_refused_from_its_header() {
        let mut b = BytesMut::from(&[0x00, 0x10, 0x00, 0x00, 2, 0, 0, 0][..]);
        assert_eq!(
            take_frame(&mut b, 65_536),
            Err(FrameError::TooLarge {
                size: 1 << 20,
                max: 65_536
            })
        );
    }

    #[test]
    fn frames_come_whole_and_heartbeats_are_empty() {
        let mut b = BytesMut::from(&[0, 0, 0, 8, 2, 0, 0, 0, 0, 0, 0, 12, 2, 0, 0, 1, 0xaa][..]);
        let hb = take_frame(&mut b, 512).unwrap().unwrap();
        assert!(hb.body.is_empty());
        assert_eq!(take_frame(&mut b, 512).unwrap(), None);
        b.extend_from_slice(&[0xbb, 0xcc, 0xdd]);
        let f = take_frame(&mut b, 512).unwrap().unwrap();
        assert_eq!((f.channel, &f.body[..]), (1, &[0xaa, 0xbb, 0xcc, 0xdd][..]));
        let mut bad = BytesMut::from(&[0, 0, 0, 4, 2, 0, 0, 0][..]);
        assert_eq!(take_frame(&mut bad, 512), Err(FrameError::BadHeader));
    }

    #[test]
    fn a_wrong_protocol_header_is_refused_as_soon_as_it_differs() {
        let mut b = BytesMut::from(&b"\x16\x03"[..]);
        assert!(take_protocol_header(&mut b, &AMQP_HEADER).is_err());
        let mut b = BytesMut::from(&b"AMQ"[..]);
        assert_eq!(take_protocol_header(&mut b, &AMQP_HEADER), Ok(false));
    }
}
