//! [`Coalesce`]: a socket wrapper that turns many small writes into few system calls.
//!
//! fe2o3's connection engine sends every AMQP 1.0 frame with `send(frame).await`: encode,
//! write, **flush**. Under TLS each frame becomes its own record and its own `writev`; on the
//! bridge that was 15 % of its CPU under load (docs/performance.md). The engine only ever
//! waits on its socket in one place, its event loop, where it polls the read side whenever it
//! has nothing else ready. So this wrapper, placed between the TLS layer and the TCP stream,
//! keeps what is written (and "flushed") in a buffer and puts it on the wire
//!
//! - when the owner next polls the read side (the engine's loop is idle or looks for
//!   incoming frames: everything it produced meanwhile goes out in one write),
//! - when the buffer reaches [`HIGH_WATER`] (a write or flush then writes it out, with
//!   back-pressure), and
//! - on shutdown.
//!
//! The rule that makes this safe: **the reader of this stream is the writer's own task and
//! polls the read side whenever it waits**. That holds for fe2o3's connection engine (one
//! task owns the transport and selects over reading it, its heartbeat and its outgoing
//! frames). Do not use it under a protocol stack that may flush and then wait for something
//! other than this stream's readability.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes at which a write or a flush puts them on the wire without waiting for the
/// next read poll: a few full TLS records.
pub const HIGH_WATER: usize = 64 * 1024;

/// Capacity the buffer keeps once drained. A larger batch grows it again (a reallocation or
/// two per batch, not per frame), and an idle connection holds at most this much: a float with 10,000 connections must not keep 10,000 high-water buffers.
pub const RETAIN: usize = 16 * 1024;

/// See the module documentation.
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    /// Bytes written to us and not yet to `inner`, from `pos` on.
    buf: Vec<u8>,
    pos: usize,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes waiting for the wire.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes the buffer holds allocated (at most [`RETAIN`] once drained).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Write everything buffered to `inner` (and flush it).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.buf.clear();
        // Shrunk, not freed: the next large batch grows from `RETAIN` (two reallocations to
        // the high-water mark) instead of from nothing.
        self.buf.shrink_to(RETAIN);
        self.pos = 0;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Make room for `len` more bytes: drain first if they would pass the high-water mark.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.buffered() > 0 && self.buffered() + len > HIGH_WATER {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 {
            // The owner is looking for input: what it wrote meanwhile goes out first. If the
            // socket cannot take it all now, the rest waits for writability (this task is
            // woken then and polls here again); reading goes on regardless.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, data.len()))?;
        if this.buffered() == 0 && data.len() >= HIGH_WATER {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if this.buffered() == 0 && len >= HIGH_WATER {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Deferred below the high-water mark: the next read poll writes it (module doc).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() >= HIGH_WATER {
            return this.poll_drain(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Whether `peer` has something to read within a short while.
    async fn readable(peer: &mut tokio::io::DuplexStream, buf: &mut [u8]) -> Option<usize> {
        tokio::time::timeout(Duration::from_millis(50), peer.read(buf))
            .await
            .ok()
            .map(|r| r.expect("read"))
    }

    #[tokio::test]
    async fn small_flushed_writes_wait_for_the_next_read_poll_and_go_out_together() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut c = Coalesce::new(ours);
        for frame in [&b"one"[..], b"two", b"three"] {
            c.write_all(frame).await.unwrap();
            c.flush().await.unwrap();
        }
        let mut got = [0u8; 64];
        assert_eq!(
            readable(&mut peer, &mut got).await,
            None,
            "nothing on the wire yet"
        );
        assert_eq!(c.buffered(), 11);
        // The owner polls for input (nothing there): the buffer goes out in one write.
        let mut input = [0u8; 8];
        let poll = tokio::time::timeout(Duration::from_millis(20), c.read(&mut input)).await;
        assert!(poll.is_err(), "no input, the read waits");
        assert_eq!(c.buffered(), 0);
        let n = readable(&mut peer, &mut got).await.expect("written");
        assert_eq!(&got[..n], b"onetwothree");
        // And reading works through it.
        peer.write_all(b"reply").await.unwrap();
        let n = c.read(&mut input).await.unwrap();
        assert_eq!(&input[..n], b"reply");
    }

    #[tokio::test]
    async fn past_the_high_water_mark_a_write_goes_out_without_a_read_poll() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut c = Coalesce::new(ours);
        let chunk = vec![7u8; HIGH_WATER / 4];
        for _ in 0..5 {
            c.write_all(&chunk).await.unwrap();
            c.flush().await.unwrap();
        }
        assert!(c.buffered() < HIGH_WATER, "{}", c.buffered());
        let mut got = vec![0u8; 2 * HIGH_WATER];
        let n = readable(&mut peer, &mut got)
            .await
            .expect("drained at the mark");
        assert!(n >= HIGH_WATER, "{n}");
        // A single write larger than the mark goes straight through.
        let (ours, mut peer) = duplex(1 << 20);
        let mut c = Coalesce::new(ours);
        c.write_all(&vec![1u8; 2 * HIGH_WATER]).await.unwrap();
        assert_eq!(c.buffered(), 0);
        assert!(readable(&mut peer, &mut got).await.is_some());
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_buffered_first() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut c = Coalesce::new(ours);
        c.write_all(b"close frame").await.unwrap();
        c.flush().await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"close frame");
    }

    #[tokio::test]
    async fn a_full_socket_applies_back_pressure_and_loses_nothing() {
        // The peer's side holds 4 KiB: writes past the mark must wait for it to read.
        let (ours, mut peer) = duplex(4096);
        let mut c = Coalesce::new(ours);
        let total = 3 * HIGH_WATER + 123;
        let writer = tokio::spawn(async move {
            let data: Vec<u8> = (0..total).map(|i| i as u8).collect();
            for piece in data.chunks(1000) {
                c.write_all(piece).await.unwrap();
                c.flush().await.unwrap();
            }
            c.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), total);
        assert!(got.iter().enumerate().all(|(i, b)| *b == i as u8));
    }

    #[tokio::test]
    async fn a_drained_buffer_keeps_at_most_the_retained_capacity() {
        let (ours, mut peer) = duplex(1 << 20);
        let mut c = Coalesce::new(ours);
        // A small batch keeps its buffer for the next one.
        c.write_all(&[1u8; 1000]).await.unwrap();
        c.flush().await.unwrap();
        let mut input = [0u8; 8];
        let _ = tokio::time::timeout(Duration::from_millis(10), c.read(&mut input)).await;
        assert_eq!(c.buffered(), 0);
        assert!(
            c.capacity() >= 1000 && c.capacity() <= RETAIN,
            "{}",
            c.capacity()
        );
        // A large one gives its buffer back once written.
        for _ in 0..(HIGH_WATER / 1000 - 1) {
            c.write_all(&[2u8; 1000]).await.unwrap();
            c.flush().await.unwrap();
        }
        assert!(c.capacity() > RETAIN, "{}", c.capacity());
        let _ = tokio::time::timeout(Duration::from_millis(10), c.read(&mut input)).await;
        assert_eq!(c.buffered(), 0);
        assert!(c.capacity() <= RETAIN, "{}", c.capacity());
        let mut got = vec![0u8; 2 * HIGH_WATER];
        let mut n = 0;
        while let Some(k) = readable(&mut peer, &mut got[n..]).await {
            n += k;
        }
        assert_eq!(n, 1000 + (HIGH_WATER / 1000 - 1) * 1000);
    }
}
