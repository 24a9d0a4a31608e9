//! Contender (c): Drawbridge's own engine (`drawbridge-amqp`), driven as the daemons will
//! drive it: TLS by tokio-rustls on the task that owns the connection, the state machine
//! polled by that same task through `drawbridge_amqp::driver::Driver` (no engine tasks, no
//! channels), SASL EXTERNAL, 256 KiB frames, credit 500 on the receiving link.
//!
//! The server accepts each delivery as soon as it arrives (the float does so after the
//! broker's confirm); consecutive accepts leave as one ranged disposition, as the engine
//! always does.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{bail, Context as _};
use drawbridge_amqp::{
    connection::{Config, Connection, Event, LinkId},
    driver::Driver,
    message::write_data_message,
    performatives::Outcome,
};
use rustls_pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

use crate::{tls::Tls, Contender, IdleLinks, CREDIT, DEADLINE};

type ClientDriver = Driver<TlsStream<TcpStream>>;

/// The own engine's client and server on one current-thread runtime.
#[derive(Debug)]
pub struct Own {
    rt: Runtime,
    client: ClientDriver,
    link: LinkId,
    buf: Vec<u8>,
    next_id: u64,
}

fn config(name: &str) -> Config {
    Config {
        container_id: name.into(),
        hostname: Some("localhost".into()),
        max_frame_size: 256 * 1024,
        idle_timeout: Duration::from_secs(30),
        ..Config::default()
    }
}

async fn serve_one(acceptor: TlsAcceptor, tcp: TcpStream) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let tls = acceptor.accept(tcp).await?;
    let mut d = Driver::new(tls, Connection::server(config("float")));
    loop {
        match d.next_event().await? {
            Event::AttachRequested { link, .. } => d.conn().accept_link(link, CREDIT, None)?,
            Event::Delivery { link, id, .. } => d.conn().settle(link, id, Outcome::Accepted)?,
            Event::Closed { .. } => {
                d.finish().await.ok();
                return Ok(());
            }
            _ => {}
        }
    }
}

async fn accept_loop(listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(acceptor, tcp).await {
                // A client dropped at the end of a measurement: not worth a line.
                let _ = e;
            }
        });
    }
}

/// Connects and attaches one sending link; returns once it has credit.
async fn connect(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> anyhow::Result<(ClientDriver, LinkId)> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let stream = TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let mut d = Driver::new(stream, Connection::client(config("bridge")));
    let s = d.conn().begin()?;
    let link = d.conn().attach_sender(s, "bench", "drawbridge.inbox")?;
    loop {
        match d.next_event().await? {
            Event::Credit { .. } => return Ok((d, link)),
            Event::Closed { error, .. } => bail!("closed while attaching: {error:?}"),
            Event::Detached { error, .. } => bail!("refused: {error:?}"),
            _ => {}
        }
    }
}

impl Contender for Own {
    const NAME: &'static str = "own";

    fn start(tls: &Tls) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (client, link) = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            tokio::spawn(accept_loop(listener, tls.server.clone()));
            tokio::time::timeout(DEADLINE, connect(tls.client.clone(), addr))
                .await
                .context("connect deadline")?
        })?;
        Ok(Own {
            rt,
            client,
            link,
            buf: Vec::with_capacity(2048),
            next_id: 0,
        })
    }

    fn round(&mut self, body: &[u8], n: usize) -> anyhow::Result<()> {
        let Own {
            rt,
            client,
            link,
            buf,
            next_id,
        } = self;
        rt.block_on(async {
            tokio::time::timeout(DEADLINE, async {
                let mut sent = 0;
                let mut done = 0u32;
                while (done as usize) < n {
                    while sent < n {
                        buf.clear();
                        let id = next_id.to_be_bytes();
                        write_data_message(buf, &id, body);
                        match client.conn().send(*link, &id, buf) {
                            Ok(_) => {
                                sent += 1;
                                *next_id += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    match client.next_event().await? {
                        Event::Settled {
                            first,
                            last,
                            outcome,
                            ..
                        } => {
                            if outcome != Some(Outcome::Accepted) {
                                bail!("delivery {first}..={last}: {outcome:?}");
                            }
                            done += last.wrapping_sub(first) + 1;
                        }
                        Event::Closed { error, .. } => bail!("closed: {error:?}"),
                        _ => {}
                    }
                }
                Ok(())
            })
            .await
        })
        .context("round deadline")?
    }
}

impl IdleLinks for Own {
    const NAME: &'static str = "own";

    fn serve(tls: &Tls, ready: std::sync::mpsc::Sender<u16>) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            ready.send(listener.local_addr()?.port())?;
            accept_loop(listener, tls.server.clone()).await;
            Ok(())
        })
    }

    fn hold(tls: &Tls, port: u16, n: usize, opened: &mut dyn FnMut()) -> anyhow::Result<()> {
        // One worker thread (tagged as the client's) drives the connections while `opened`
        // measures on this thread; each connection is a task of its own, as each link is in
        // the bridge.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .on_thread_start(|| crate::alloc_slot::tag(crate::alloc_slot::Slot::Client))
            .enable_all()
            .build()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (up_tx, mut up_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(n.max(1));
        let stop = Arc::new(tokio::sync::Notify::new());
        for _ in 0..n {
            let tls = tls.client.clone();
            let up = up_tx.clone();
            let stop = stop.clone();
            rt.spawn(async move {
                match connect(tls, addr).await {
                    Ok((mut d, _link)) => {
                        let _ = up.send(Ok(())).await;
                        tokio::select! {
                            _ = stop.notified() => {}
                            r = async { loop { d.next_event().await?; } } => {
                                let r: std::io::Result<()> = r;
                                eprintln!("own: idle connection ended: {r:?}");
                            }
                        }
                    }
                    Err(e) => {
                        let _ = up.send(Err(e)).await;
                    }
                }
            });
        }
        rt.block_on(async {
            for _ in 0..n {
                up_rx.recv().await.context("connections")??;
            }
            anyhow::Ok(())
        })?;
        opened();
        stop.notify_waiters();
        Ok(())
    }
}
