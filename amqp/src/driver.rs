//! The thin tokio driver: one [`Connection`] and its stream, polled by the task that owns
//! them. Writing, reading and the connection's timer are polled together, so a peer that
//! stops reading cannot stall our reading (and its close), and what the state machine
//! queued in one step leaves in one write.

use std::{
    future::{poll_fn, Future},
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;

use crate::connection::{Connection, Event};

/// Room made for a read. Small on purpose: it is what an idle connection keeps (16 KiB made
/// the bridge's side of an idle link 33 KiB of heap, 4 KiB makes it 21 KiB; `idle` in
/// benches/engines). A frame bigger than this gets room for itself (`frame::take_frame`).
const READ_CHUNK: usize = 4 * 1024;

/// A connection and its stream.
#[derive(Debug)]
pub struct Driver<S> {
    io: S,
    conn: Connection,
    rbuf: BytesMut,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<tokio::time::Instant>,
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Driver<S> {
    /// Drives `conn` over `io`.
    pub fn new(io: S, conn: Connection) -> Self {
        Driver {
            io,
            conn,
            rbuf: BytesMut::new(),
            timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            timer_at: None,
            eof: false,
        }
    }

    /// The state machine, for commands.
    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// The next event: writes what the connection holds, reads, runs its timer. An I/O error
    /// or the peer's end of stream before `close` is an error.
    pub async fn next_event(&mut self) -> io::Result<Event> {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Writes everything queued (e.g. after commands, when no event is awaited).
    pub async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_all(cx)).await
    }

    /// Writes what is left and shuts the stream down (after [`Event::Closed`]).
    pub async fn finish(mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }

    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let out = self.conn.transmit();
            if out.is_empty() {
                return Pin::new(&mut self.io).poll_flush(cx);
            }
            match Pin::new(&mut self.io).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.conn.written(n, Instant::now()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Event>> {
        loop {
            if let Some(e) = self.conn.poll_event() {
                return Poll::Ready(Ok(e));
            }
            // Write; a pending write does not keep us from reading.
            if let Poll::Ready(Err(e)) = self.poll_write_all(cx) {
                return Poll::Ready(Err(e));
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer ended the stream without closing the connection",
                )));
            }
            let mut progressed = false;
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK {
                self.rbuf.reserve(READ_CHUNK);
            }
            match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    progressed = true;
                }
                Poll::Ready(Ok(_)) => {
                    self.conn.handle_input(&mut self.rbuf, Instant::now());
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            // The timer: reset when the connection's deadline moved.
            let want = self.conn.poll_timeout().map(tokio::time::Instant::from_std);
            if want != self.timer_at {
                self.timer_at = want;
                if let Some(at) = want {
                    self.timer.as_mut().reset(at);
                }
            }
            if self.timer_at.is_some() && self.timer.as_mut().poll(cx).is_ready() {
                self.timer_at = None;
                self.conn.handle_timeout(Instant::now());
                progressed = true;
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }
}
