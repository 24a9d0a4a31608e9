//! [`FrameGuard`]: the `AsyncRead + AsyncWrite` wrapper that puts [`Frames`] between TLS and
//! the AMQP engine.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Frames, PeerLimits, Violation};

/// Which end of a peer link a [`FrameGuard`] protects: names its metric and its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The float, guarding what a peer (a bridge, or anyone with a member certificate) sends.
    Float,
    /// The bridge, guarding what a float answers.
    Bridge,
}

impl Side {
    fn refused(self, peer: &str, v: &Violation) {
        match self {
            Side::Float => {
                tracing::warn!(peer = %crate::text::escape(peer), reason = %v, "connection refused: malformed or hostile AMQP frames");
                metrics::counter!("drawbridge_float_connections_refused_total", "reason" => v.label())
                    .increment(1);
            }
            Side::Bridge => {
                tracing::warn!(target_addr = %crate::text::escape(peer), reason = %v, "float connection closed: malformed or hostile AMQP frames");
                metrics::counter!("drawbridge_bridge_peer_frames_refused_total", "reason" => v.label())
                    .increment(1);
            }
        }
    }
}

/// The stream fe2o3 reads from: scans every byte before handing it on (see the module
/// docs). Writes pass through untouched (read, with [`PeerLimits::enforce_credit`], for the
/// credit they grant).
#[derive(Debug)]
pub struct FrameGuard<S> {
    inner: S,
    frames: Frames,
    refused: Option<Violation>,
    /// Who is on the other end, for the log line.
    peer: String,
    side: Side,
}

impl<S> FrameGuard<S> {
    /// Guard `inner`, whose peer (`peer`, for the log line) may send frames of up to
    /// `max_frame` bytes and is held to `limits`.
    pub fn new(inner: S, max_frame: u32, limits: PeerLimits, peer: String, side: Side) -> Self {
        FrameGuard {
            inner,
            frames: Frames::with_limits(max_frame, limits),
            refused: None,
            peer,
            side,
        }
    }

    /// Why the guard refused the stream, if it did.
    pub fn refused(&self) -> Option<&Violation> {
        self.refused.as_ref()
    }

    /// The guarded stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(v) = &this.refused {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, v.clone())));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = buf.filled().get(before..).unwrap_or_default();
                if let Err(v) = this.frames.feed(fresh) {
                    // Nothing of this read reaches the decoder.
                    buf.set_filled(before);
                    this.side.refused(&this.peer, &v);
                    this.refused = Some(v.clone());
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, v)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.frames.outgoing(buf.get(..n).unwrap_or_default());
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let take = n.min(b.len());
                this.frames.outgoing(b.get(..take).unwrap_or_default());
                n -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
