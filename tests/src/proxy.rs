//! A fault-injecting TCP proxy: forwards 127.0.0.1:<random> to a target, and can black-hole or
//! reset connections on demand.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Pass,
    /// Existing connections stop forwarding both ways but stay open (no FIN/RST); new
    /// connections are accepted but nothing is forwarded.
    BlackHole,
    /// Existing connections are closed with RST (SO_LINGER 0); new connections are accepted and
    /// then reset.
    Reset,
}

impl ProxyMode {
    fn to_u8(self) -> u8 {
        match self {
            ProxyMode::Pass => 0,
            ProxyMode::BlackHole => 1,
            ProxyMode::Reset => 2,
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ProxyMode::BlackHole,
            2 => ProxyMode::Reset,
            _ => ProxyMode::Pass,
        }
    }
}

#[derive(Debug)]
struct Shared {
    mode: AtomicU8,
    mode_tx: watch::Sender<ProxyMode>,
    total: AtomicU64,
}

/// See the module docs. Dropping it stops the listener and every connection task.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `target`, on the calling tokio runtime.
    pub async fn start(target: SocketAddr) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding fault proxy")?;
        let addr = listener.local_addr()?;
        let (mode_tx, _) = watch::channel(ProxyMode::Pass);
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(ProxyMode::Pass.to_u8()),
            mode_tx,
            total: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            target,
            shared.clone(),
            cancel.clone(),
        ));
        Ok(FaultProxy {
            addr,
            shared,
            cancel,
        })
    }

    /// The proxy's listening address (connect here instead of the target).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.shared.mode.store(mode.to_u8(), Ordering::SeqCst);
        self.shared.mode_tx.send_replace(mode);
    }

    pub fn mode(&self) -> ProxyMode {
        ProxyMode::from_u8(self.shared.mode.load(Ordering::SeqCst))
    }

    /// Connections accepted so far (in any mode).
    pub fn connections_total(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (client, _) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("fault proxy accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.total.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = handle(client, target, shared) => {}
            }
        });
    }
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn handle(client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let mut mode_rx = shared.mode_tx.subscribe();
    let initial = *mode_rx.borrow_and_update();
    match initial {
        ProxyMode::Reset => return reset(client),
        ProxyMode::BlackHole => {
            // hold the socket open until told to reset (or cancelled); never forward
            hold(client, None, mode_rx).await;
            return;
        }
        ProxyMode::Pass => {}
    }
    let upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("fault proxy connect {target}: {e}");
            return reset(client);
        }
    };
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    let mut c_open = true;
    let mut u_open = true;
    loop {
        if !c_open && !u_open {
            return;
        }
        tokio::select! {
            changed = mode_rx.changed() => {
                if changed.is_err() { return; }
                let mode = *mode_rx.borrow_and_update();
                match mode {
                    ProxyMode::Pass => {}
                    ProxyMode::Reset => {
                        let client = cr.reunite(cw).expect("same stream");
                        let up = ur.reunite(uw).expect("same stream");
                        reset(client);
                        reset(up);
                        return;
                    }
                    ProxyMode::BlackHole => {
                        let client = cr.reunite(cw).expect("same stream");
                        let up = ur.reunite(uw).expect("same stream");
                        hold(client, Some(up), mode_rx).await;
                        return;
                    }
                }
            }
            r = cr.read(&mut cbuf), if c_open => match r {
                Ok(0) | Err(_) => { c_open = false; let _ = uw.shutdown().await; }
                Ok(n) => if uw.write_all(&cbuf[..n]).await.is_err() { return; },
            },
            r = ur.read(&mut ubuf), if u_open => match r {
                Ok(0) | Err(_) => { u_open = false; let _ = cw.shutdown().await; }
                Ok(n) => if cw.write_all(&ubuf[..n]).await.is_err() { return; },
            },
        }
    }
}

/// Black hole: keep both sockets open and forward nothing (even if the mode goes back to Pass,
/// a black-holed connection stays stuck); only a switch to Reset (or proxy drop) ends it.
async fn hold(
    client: TcpStream,
    upstream: Option<TcpStream>,
    mut mode_rx: watch::Receiver<ProxyMode>,
) {
    loop {
        if mode_rx.changed().await.is_err() {
            return;
        }
        if *mode_rx.borrow_and_update() == ProxyMode::Reset {
            reset(client);
            if let Some(u) = upstream {
                reset(u);
            }
            return;
        }
    }
}
