//! Contender (b): ntex-amqp 6.0 (codec ntex-amqp-codec 3.0) on ntex's tokio backend.
//!
//! ntex normally owns its sockets: `ntex::server` starts worker threads of its own and
//! `ntex-net` wraps the TCP stream itself (TLS then being an ntex filter from ntex-tls). To
//! keep our TLS (tokio-rustls with rustls' aws-lc-rs provider and our own configurations and
//! certificate verifiers) and to keep both ends on one thread, this contender does neither:
//!
//! - TLS is accepted and connected by tokio-rustls, exactly as for the other contenders, and
//!   the resulting stream is handed to ntex through [`TlsIo`], an `ntex_io::IoStream`
//!   written here after ntex-net's own tokio adapter (a read task and a write task per
//!   connection, sharing the stream; `ntex-net` 4.0's adapter only takes tokio's plain
//!   `TcpStream`/`UnixStream`).
//! - No ntex server or `System` is started: `ntex_amqp::server::Server` is a `Service` over
//!   an `IoBoxed`, so each accepted TLS stream is served by calling it in a task of its own on
//!   our current-thread tokio runtime, inside a `LocalSet` (ntex spawns its tasks with
//!   `spawn_local`). The client's dispatcher (`Client::start_default`) is another such task.
//!
//! ntex-amqp 6.0 sends an empty frame at most every second on each connection, whatever the
//! peer's idle timeout (`dispatcher.rs`: `min(idle_timeout / 2, 1000 ms)`; 6.3 schedules it
//! from the peer's timeout): that is most of its idle CPU in `src/bin/idle.rs`.
//!
//! ntex-util's timer wheel sleeps with `futures-timer`, whose one global helper thread fires
//! the wake-ups of ntex's timers (idle pings, handshake timeouts); it does no protocol work.
//!
//! The client connects without SASL (ntex-amqp's client only speaks SASL PLAIN; the other
//! contenders use EXTERNAL): the TLS client certificate authenticates it either way, and that
//! exchange is part of the connect, not of a round. Frames are limited to 256 KiB each way
//! (`max_frame_size`, and `max_size` which bounds what the server's decoder accepts: ntex's
//! server-side default is unbounded).
//!
//! The server (float's role) is a publish service of its own rather than ntex's `Router`
//! (whose credit policy is "50 more when it reaches 0"): it settles each delivery `accepted`
//! as it arrives and, like the own engine, credits the link back to 500 once half of the
//! credit is used. ntex grants 50 itself when it confirms the attach; the first transfer
//! brings it to 500. `ReceiverLink::set_link_credit(n)` sends `link-credit = n` (absolute, as
//! the protocol says) but adds `n` to its own count, so the count of credit left is kept here.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::poll_fn,
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{ready, Context, Poll},
};

use anyhow::{anyhow, bail, Context as _};
use ntex_amqp::{
    client,
    codec::protocol::{Accepted, DeliveryState, MessageId},
    codec::Message,
    error::Error as AmqpError,
    server::{self, Handshake},
    types::Message as Incoming,
    AmqpServiceConfig, Delivery, SenderLink,
};
use ntex_bytes::{BufMut, BytePage, Bytes};
use ntex_io::{Handle, Io, IoBoxed, IoContext, IoStream, IoTaskStatus, Readiness};
use ntex_service::{cfg::SharedCfg, fn_factory, Ctx, Pipeline, Service};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::LocalSet,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{tls::Tls, Contender, IdleLinks, CREDIT, DEADLINE};

const MAX_FRAME: u32 = 256 * 1024;

/// ntex-amqp's client and server on one current-thread runtime.
pub struct Ntex {
    rt: Runtime,
    local: LocalSet,
    link: SenderLink,
    pending: VecDeque<Delivery>,
    next_id: u64,
}

impl std::fmt::Debug for Ntex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ntex").finish_non_exhaustive()
    }
}

/// The AMQP configuration of either end (container id, 256 KiB frames, 30 s idle timeout).
fn config(tag: &'static str) -> SharedCfg {
    SharedCfg::new(tag)
        .add(
            AmqpServiceConfig::new()
                .set_container_id(tag)
                .set_hostname("localhost")
                .set_max_frame_size(MAX_FRAME)
                .set_max_size(MAX_FRAME as usize)
                .set_idle_timeout(30)
                .set_handshake_timeout(ntex_util::time::Seconds(DEADLINE.as_secs() as u16)),
        )
        .build()
}

// ---------------------------------------------------------------------------------------------
// A tokio AsyncRead + AsyncWrite stream (here tokio-rustls) as an ntex `IoStream`.

/// Hands a tokio stream to ntex-io: two local tasks move bytes between it and ntex's buffers.
pub struct TlsIo<T>(pub T);

type Shared<T> = Rc<RefCell<T>>;

impl<T> IoStream for TlsIo<T>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    fn start(self, ctx: IoContext) -> Box<dyn Handle> {
        let io = Rc::new(RefCell::new(self.0));
        tokio::task::spawn_local(run_read(io.clone(), ctx.clone()));
        tokio::task::spawn_local(run_write(io, ctx));
        // No in-place write: ntex then wakes the write task (`Handle::write` has no task
        // context to register with tokio, and TLS may keep records back that need one).
        Box::new(NoDirectWrite)
    }
}

struct NoDirectWrite;

impl Handle for NoDirectWrite {}

async fn run_read<T: AsyncRead + Unpin>(io: Shared<T>, ctx: IoContext) {
    poll_fn(|cx| loop {
        match ready!(ctx.poll_read_ready(cx)) {
            Readiness::Ready => {}
            Readiness::Shutdown | Readiness::Terminate => return Poll::Ready(()),
        }
        let mut buf = ctx.get_read_buf();
        if buf.remaining_mut() == 0 {
            ctx.resize_read_buf(&mut buf);
        }
        let mut pending = false;
        let result = {
            // SAFETY: `UninitSlice` is a transparent wrapper of `[MaybeUninit<u8>]`.
            let spare =
                unsafe { &mut *(std::ptr::from_mut(buf.chunk_mut()) as *mut [MaybeUninit<u8>]) };
            let mut rb = ReadBuf::uninit(spare);
            let polled = Pin::new(&mut *io.borrow_mut()).poll_read(cx, &mut rb);
            match polled {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        ctx.stop(None);
                    } else {
                        // SAFETY: `n` bytes were initialised by `poll_read`.
                        unsafe { buf.advance_mut(n) };
                    }
                    Ok(n)
                }
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => {
                    pending = true;
                    Ok(0)
                }
            }
        };
        match ctx.update_read_status(buf, result) {
            IoTaskStatus::Io if !pending => continue,
            IoTaskStatus::Io | IoTaskStatus::Pause => return Poll::Pending,
            IoTaskStatus::Stop => return Poll::Ready(()),
        }
    })
    .await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wrt {
    More,
    Pending,
    Terminate,
}

/// Writes what ntex has buffered, then flushes what TLS kept back.
fn write<T: AsyncWrite + Unpin>(io: &Shared<T>, ctx: &IoContext, cx: &mut Context<'_>) -> Wrt {
    let result = ctx.with_write_buf(|dst| -> io::Result<bool> {
        let mut s = io.borrow_mut();
        let mut written = false;
        // As ntex-net's tokio adapter: up to 16 pages per vectored write, the unwritten rest
        // put back in front.
        while !dst.is_empty() {
            let mut pages: [Option<BytePage>; 16] = Default::default();
            let mut num = 0;
            while num < pages.len() {
                match dst.take() {
                    Some(p) => {
                        pages[num] = Some(p);
                        num += 1;
                    }
                    None => break,
                }
            }
            let polled = {
                let mut slices = [io::IoSlice::new(&[]); 16];
                for (slice, page) in slices.iter_mut().zip(pages[..num].iter().flatten()) {
                    *slice = io::IoSlice::new(page.as_ref());
                }
                Pin::new(&mut *s).poll_write_vectored(cx, &slices[..num])
            };
            let blocked = polled.is_pending();
            let result = match polled {
                Poll::Ready(Ok(0)) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                Poll::Ready(Ok(n)) => Ok(n),
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Ok(0),
            };
            if let Ok(mut n) = result {
                written |= n > 0;
                for page in pages[..num].iter_mut() {
                    let Some(p) = page else { break };
                    let m = n.min(p.len());
                    p.advance_to(m);
                    n -= m;
                    if p.is_empty() {
                        *page = None;
                    }
                }
            }
            for page in pages[..num].iter_mut().rev() {
                if let Some(p) = page.take() {
                    dst.prepend(p);
                }
            }
            result?;
            if blocked {
                break;
            }
        }
        match Pin::new(&mut *s).poll_flush(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(written),
        }
    });
    match ctx.update_write_status(result) {
        IoTaskStatus::Io => Wrt::More,
        IoTaskStatus::Pause => Wrt::Pending,
        IoTaskStatus::Stop => Wrt::Terminate,
    }
}

async fn run_write<T: AsyncWrite + Unpin>(io: Shared<T>, ctx: IoContext) {
    let shutdown = poll_fn(|cx| {
        // TLS records kept back by an earlier write go out even while ntex has nothing new
        // (the waker is registered with the socket when the flush is pending).
        if let Poll::Ready(Err(e)) = Pin::new(&mut *io.borrow_mut()).poll_flush(cx) {
            ctx.stop(Some(e));
            return Poll::Ready(false);
        }
        match ready!(ctx.poll_write_ready(cx)) {
            // `More` is left only when the socket would block, with the waker registered.
            Readiness::Ready => match write(&io, &ctx, cx) {
                Wrt::More | Wrt::Pending => Poll::Pending,
                Wrt::Terminate => Poll::Ready(false),
            },
            Readiness::Shutdown => Poll::Ready(true),
            Readiness::Terminate => Poll::Ready(false),
        }
    })
    .await;
    if !ctx.is_stopped() {
        poll_fn(|cx| {
            if write(&io, &ctx, cx) == Wrt::Terminate {
                Poll::Ready(())
            } else {
                ctx.shutdown(shutdown, cx)
            }
        })
        .await;
        let _ = poll_fn(|cx| Pin::new(&mut *io.borrow_mut()).poll_shutdown(cx)).await;
    }
    if !ctx.is_stopped() {
        ctx.stop(None);
    }
}

// ---------------------------------------------------------------------------------------------
// Server: the float's role.

/// The publish service of one connection: accepts every delivery, keeps the credit topped up.
struct Float {
    /// Credit the sender has left, as granted by the last flow (ntex's own count drifts).
    credit: Cell<u32>,
}

impl Service<server::State<()>, Incoming> for Float {
    type Res = ();
    type Error = AmqpError;

    async fn call(
        &self,
        msg: Incoming,
        _: Ctx<'_, Self, server::State<()>>,
    ) -> Result<(), AmqpError> {
        match msg {
            // ntex confirms the attach and grants 50 once this returns.
            Incoming::Attached(..) => self.credit.set(50),
            Incoming::Transfer(link) => {
                while let Some((mut delivery, _transfer)) = link.get_delivery() {
                    delivery.settle(DeliveryState::Accepted(Accepted {}));
                    let left = self.credit.get().saturating_sub(1);
                    if left <= CREDIT / 2 {
                        link.set_link_credit(CREDIT);
                        self.credit.set(CREDIT);
                    } else {
                        self.credit.set(left);
                    }
                }
            }
            Incoming::Detached(_) | Incoming::DetachedAll(_) => {}
        }
        Ok(())
    }
}

async fn serve_one(acceptor: TlsAcceptor, tcp: TcpStream, cfg: SharedCfg) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let tls = acceptor.accept(tcp).await?;
    let io = IoBoxed::from(Io::new(TlsIo(tls), cfg));
    let server = server::Server::<(), (), IoBoxed, _>::builder(async |hs: Handshake| match hs {
        Handshake::Amqp(hs) => Ok(hs.open().await?.ack(())),
        Handshake::Sasl(_) => Err(server::HandshakeError::Disconnected(None)),
    })
    .build(fn_factory(async |_: &server::State<()>| {
        Ok::<_, std::convert::Infallible>(Float {
            credit: Cell::new(0),
        })
    }));
    Pipeline::new((), server)
        .call(io)
        .await
        .map_err(|e| anyhow!("{e:?}"))
}

async fn accept_loop(listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let cfg = config("float");
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, cfg) = (acceptor.clone(), cfg.clone());
        tokio::task::spawn_local(async move {
            // A client dropped at the end of a measurement ends its connection: no report.
            let _ = serve_one(acceptor, tcp, cfg).await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Client: the bridge's role.

/// Connects, opens a session and attaches one sending link; returns once it has credit.
async fn connect(tls: Arc<rustls::ClientConfig>, addr: SocketAddr) -> anyhow::Result<SenderLink> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let stream = TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let cfg = config("bridge");
    let io = IoBoxed::from(Io::new(TlsIo(stream), cfg.clone()));
    let client = client::Connector::<String, ()>::new()
        .negotiate(io, Some("localhost".into()), cfg.get())
        .await
        .map_err(|e| anyhow!("open: {e:?}"))?;
    let sink = client.sink();
    tokio::task::spawn_local(async move {
        let _ = client.start_default().await;
    });
    let session = sink
        .open_session()
        .await
        .map_err(|e| anyhow!("begin: {e:?}"))?;
    let link = session
        .build_sender_link("bench", "drawbridge.inbox")
        .attach()
        .await
        .map_err(|e| anyhow!("attach: {e:?}"))?;
    if !link.ready().await {
        bail!("link closed before credit");
    }
    Ok(link)
}

fn outcome(
    d: Result<Option<DeliveryState>, ntex_amqp::error::AmqpProtocolError>,
) -> anyhow::Result<()> {
    match d {
        Ok(Some(DeliveryState::Accepted(_))) => Ok(()),
        other => bail!("delivery not accepted: {other:?}"),
    }
}

impl Contender for Ntex {
    const NAME: &'static str = "ntex";

    fn start(tls: &Tls) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = LocalSet::new();
        let link = local.block_on(&rt, async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::task::spawn_local(accept_loop(listener, tls.server.clone()));
            tokio::time::timeout(DEADLINE, connect(tls.client.clone(), addr))
                .await
                .context("connect deadline")?
        })?;
        Ok(Ntex {
            rt,
            local,
            link,
            pending: VecDeque::with_capacity(CREDIT as usize),
            next_id: 0,
        })
    }

    fn round(&mut self, body: &[u8], n: usize) -> anyhow::Result<()> {
        let Ntex {
            rt,
            local,
            link,
            pending,
            next_id,
        } = self;
        local
            .block_on(rt, async {
                tokio::time::timeout(DEADLINE, async {
                    for _ in 0..n {
                        // Never more unsettled than the credit (as the bridge): the oldest
                        // outcome first.
                        if pending.len() >= CREDIT as usize {
                            let d = pending.pop_front().expect("pending");
                            outcome(d.wait().await)?;
                        }
                        let mut msg = Message::with_body(Bytes::copy_from_slice(body));
                        let id = Bytes::copy_from_slice(&next_id.to_be_bytes());
                        msg.set_properties(|p| p.message_id = Some(MessageId::Binary(id)));
                        *next_id += 1;
                        // Waits for credit when there is none.
                        let d = link
                            .transfer(msg)
                            .send()
                            .await
                            .map_err(|e| anyhow!("send: {e:?}"))?;
                        pending.push_back(d);
                    }
                    while let Some(d) = pending.pop_front() {
                        outcome(d.wait().await)?;
                    }
                    anyhow::Ok(())
                })
                .await
            })
            .context("round deadline")?
    }
}

impl IdleLinks for Ntex {
    const NAME: &'static str = "ntex";

    fn serve(tls: &Tls, ready: std::sync::mpsc::Sender<u16>) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        LocalSet::new().block_on(&rt, async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            ready.send(listener.local_addr()?.port())?;
            accept_loop(listener, tls.server.clone()).await;
            Ok(())
        })
    }

    fn hold(tls: &Tls, port: u16, n: usize, opened: &mut dyn FnMut()) -> anyhow::Result<()> {
        // ntex's connections are `!Send` and live on the thread that made them: one thread of
        // our own (tagged as the client's) runs a current-thread runtime with a LocalSet that
        // opens and drives every connection (each a task, as each link is in the bridge) while
        // `opened` measures on this thread.
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let tls = tls.client.clone();
        let (up_tx, up_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let driver = std::thread::Builder::new()
            .name("ntex-client".into())
            .spawn(move || -> anyhow::Result<()> {
                crate::alloc_slot::tag(crate::alloc_slot::Slot::Client);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                LocalSet::new().block_on(&rt, async move {
                    let mut links = Vec::with_capacity(n);
                    let mut opening = tokio::task::JoinSet::new();
                    for _ in 0..n {
                        opening.spawn_local(tokio::time::timeout(
                            DEADLINE,
                            connect(tls.clone(), addr),
                        ));
                    }
                    let mut failed = None;
                    while let Some(r) = opening.join_next().await {
                        match r
                            .map_err(anyhow::Error::from)
                            .and_then(|r| r.context("connect deadline").and_then(|r| r))
                        {
                            Ok(link) => links.push(link),
                            Err(e) => {
                                failed.get_or_insert(e);
                            }
                        }
                    }
                    match failed {
                        Some(e) => {
                            let _ = up_tx.send(Err(e));
                            return Ok(());
                        }
                        None => {
                            let _ = up_tx.send(Ok(()));
                        }
                    }
                    // Keep the links (and so their connections) until `opened` has returned.
                    let _ = stop_rx.await;
                    drop(links);
                    anyhow::Ok(())
                })
            })?;
        let up = up_rx
            .recv_timeout(DEADLINE * 2)
            .context("connections")
            .and_then(|r| r);
        if up.is_ok() {
            opened();
        }
        let _ = stop_tx.send(());
        driver
            .join()
            .map_err(|_| anyhow!("ntex client thread panicked"))??;
        up
    }
}
