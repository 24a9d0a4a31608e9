//! A hostile float against a running bridge (real RabbitMQ, real TLS, the float's genuine
//! member certificate): whatever a float answers, the bridge stays up.
//!
//! The fake float is a raw TLS server holding Bank B's float certificate, so the bridge's
//! pin and identity rule accept it. It speaks just enough AMQP 1.0 (SASL EXTERNAL, open,
//! begin, attach, flow, a disposition per transfer) to walk the bridge's link up to the
//! performative under test, and puts a value nested [`DEPTH`] levels deep into it: the
//! properties of `open`, `begin`, `attach` and `flow`, the error `info` of a `rejected`
//! disposition, of `detach`, `end` and `close`. Before the bridge guarded its peer
//! connections, each of these aborted the bridge process ("thread 'tokio-rt-worker' has
//! overflowed its stack"), and again on every reconnect while the peer queue held messages.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use drawbridge_certs::{pki_types::PrivateKeyDer, TlsIdentity};
use drawbridge_testkit::{
    fixtures::two_orgs,
    rabbit::shared_node,
    stream::{self, PublishSpec},
    world::{self, Org},
    BANK_B,
};
use fe2o3_amqp::types::{
    definitions::{Handle, ReceiverSettleMode, Role},
    messaging::{Source, Target},
    performatives::{Attach, Begin, Close, Detach, Disposition, End, Flow, Open, Performative},
    primitives::Symbol,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};

/// Nesting of the hostile value: tens of thousands of levels, as in the report, and still
/// within the bridge's maximum frame of 256 KiB (9 bytes a level).
const DEPTH: usize = 27_000;

/// Where the fake float puts the nested value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Open,
    Begin,
    Attach,
    Flow,
    Disposition,
    Detach,
    End,
    Close,
    /// Not a nested value: every transfer is rejected with a 200 KB description.
    LongDescription,
}

const PLACES: [Place; 8] = [
    Place::Open,
    Place::Begin,
    Place::Attach,
    Place::Flow,
    Place::Disposition,
    Place::Detach,
    Place::End,
    Place::Close,
];

/// A list32 of already-encoded values.
fn list32(items: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = items.concat();
    let mut out = vec![0xd0];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn symbol(s: &str) -> Vec<u8> {
    let mut out = vec![0xa3, s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// `{"x-hostile": <DEPTH nested lists>}`, encoded by hand, iteratively: serde_amqp would
/// recurse once per level and copy each level's bytes into the next (quadratic).
fn deep_fields() -> Vec<u8> {
    let mut v = vec![0x45];
    for _ in 0..DEPTH {
        v = list32(&[&v]);
    }
    let key = symbol("x-hostile");
    let body = [key.as_slice(), v.as_slice()].concat();
    let mut out = vec![0xd1];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// An `amqp:internal-error` error whose `info` is [`deep_fields`].
fn deep_error() -> Vec<u8> {
    let described = [0x00, 0x53, 0x1d];
    let description = [&[0xa1, 7][..], b"hostile"].concat();
    [
        &described[..],
        &list32(&[&symbol("amqp:internal-error"), &description, &deep_fields()]),
    ]
    .concat()
}

/// A `rejected` outcome carrying [`deep_error`].
fn deep_rejected() -> Vec<u8> {
    [&[0x00, 0x53, 0x25][..], &list32(&[&deep_error()])].concat()
}

/// `p` encoded, with field `index` of its list set to `value` (the fields after it dropped:
/// every field used here is the last one that matters).
fn with_field(p: &Performative, index: usize, value: &[u8]) -> Result<Vec<u8>> {
    use drawbridge_runtime::frame_guard::Scanner;
    let enc = serde_amqp::to_vec(p)?;
    let (head, list) = enc.split_at(3);
    let (count, mut fields): (usize, &[u8]) = match list.first() {
        Some(0x45) => (0, &[]),
        Some(0xc0) => (usize::from(list[2]), &list[3..]),
        Some(0xd0) => (
            u32::from_be_bytes([list[5], list[6], list[7], list[8]]) as usize,
            &list[9..],
        ),
        other => bail!("not a list: {other:?}"),
    };
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for _ in 0..count.min(index) {
        let used = Scanner::new().feed(fields, Some(1))?;
        kept.push(fields[..used].to_vec());
        fields = &fields[used..];
    }
    while kept.len() < index {
        kept.push(vec![0x40]);
    }
    kept.push(value.to_vec());
    let refs: Vec<&[u8]> = kept.iter().map(Vec::as_slice).collect();
    Ok([head, &list32(&refs)].concat())
}

/// A frame around an encoded performative.
fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(8 + body.len() as u32).to_be_bytes());
    f.extend_from_slice(&[2, 0]);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn sasl_frame(body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(8 + body.len() as u32).to_be_bytes());
    f.extend_from_slice(&[2, 1, 0, 0]);
    f.extend_from_slice(body);
    f
}

/// One frame from the bridge: (channel, body); `None` for an empty (heartbeat) frame.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<(u16, Vec<u8>)> {
    let mut head = [0u8; 8];
    s.read_exact(&mut head).await?;
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let doff = usize::from(head[4]) * 4;
    if !(8..=1 << 20).contains(&size) || doff < 8 || doff > size {
        bail!("bad frame header {head:02x?}");
    }
    let mut rest = vec![0u8; size - 8];
    s.read_exact(&mut rest).await?;
    Ok((
        u16::from_be_bytes([head[6], head[7]]),
        rest.split_off(doff - 8),
    ))
}

/// Serve one bridge connection, answering as a float would and putting the nested value
/// into the performative at `place`. Returns when the bridge hangs up.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, place: Place) -> Result<()> {
    use fe2o3_amqp::types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};

    // SASL: the bridge's header, then mechanisms, its init, our outcome.
    let mut header = [0u8; 8];
    s.read_exact(&mut header).await?;
    s.write_all(b"AMQP\x03\x01\x00\x00").await?;
    let mechanisms = SaslMechanisms {
        sasl_server_mechanisms: vec![Symbol::from("EXTERNAL")].into(),
    };
    s.write_all(&sasl_frame(&serde_amqp::to_vec(&mechanisms)?))
        .await?;
    s.flush().await?;
    read_frame(&mut s).await?;
    let outcome = SaslOutcome {
        code: SaslCode::Ok,
        additional_data: None,
    };
    s.write_all(&sasl_frame(&serde_amqp::to_vec(&outcome)?))
        .await?;
    s.flush().await?;
    s.read_exact(&mut header).await?;
    s.write_all(b"AMQP\x00\x01\x00\x00").await?;
    s.flush().await?;

    // Each answer: a performative, and the field to replace when it is the place under test.
    let answer = |p: Performative, at: Place, index: usize, value: fn() -> Vec<u8>| {
        if at == place {
            with_field(&p, index, &value())
        } else {
            Ok(serde_amqp::to_vec(&p)?)
        }
    };
    loop {
        let (channel, body) = read_frame(&mut s).await?;
        if body.is_empty() {
            continue;
        }
        let out: Vec<Vec<u8>> = match serde_amqp::from_slice::<Performative>(&body) {
            Ok(Performative::Open(_)) => vec![answer(
                Performative::Open(Open {
                    container_id: "hostile-float".into(),
                    hostname: None,
                    max_frame_size: (1024 * 1024u32).into(),
                    channel_max: 8u16.into(),
                    idle_time_out: None,
                    outgoing_locales: None,
                    incoming_locales: None,
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: None,
                }),
                Place::Open,
                9,
                deep_fields,
            )?],
            Ok(Performative::Begin(_)) => vec![answer(
                Performative::Begin(Begin {
                    remote_channel: Some(channel),
                    next_outgoing_id: 0,
                    incoming_window: 10_000,
                    outgoing_window: 10_000,
                    handle_max: Handle(255),
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: None,
                }),
                Place::Begin,
                7,
                deep_fields,
            )?],
            Ok(Performative::Attach(a)) => {
                let handle = a.handle.clone();
                let count = a.initial_delivery_count.unwrap_or(0);
                vec![
                    answer(
                        Performative::Attach(Attach {
                            name: a.name,
                            handle: a.handle,
                            role: Role::Receiver,
                            snd_settle_mode: a.snd_settle_mode,
                            rcv_settle_mode: ReceiverSettleMode::First,
                            source: a.source.or_else(|| Some(Box::new(Source::default()))),
                            target: a.target.or_else(|| {
                                Some(Box::new(
                                    Target::builder().address("hostile").build().into(),
                                ))
                            }),
                            unsettled: None,
                            incomplete_unsettled: false,
                            initial_delivery_count: None,
                            max_message_size: None,
                            offered_capabilities: None,
                            desired_capabilities: None,
                            properties: None,
                        }),
                        Place::Attach,
                        13,
                        deep_fields,
                    )?,
                    answer(
                        Performative::Flow(Flow {
                            next_incoming_id: Some(0),
                            incoming_window: 10_000,
                            next_outgoing_id: 0,
                            outgoing_window: 10_000,
                            handle: Some(handle),
                            delivery_count: Some(count),
                            link_credit: Some(100),
                            available: None,
                            drain: false,
                            echo: false,
                            properties: None,
                        }),
                        Place::Flow,
                        10,
                        deep_fields,
                    )?,
                ]
            }
            Ok(Performative::Transfer(t)) => match place {
                Place::Detach => vec![answer(
                    Performative::Detach(Detach {
                        handle: t.handle,
                        closed: true,
                        error: None,
                    }),
                    Place::Detach,
                    2,
                    deep_error,
                )?],
                Place::End => vec![answer(
                    Performative::End(End { error: None }),
                    Place::End,
                    0,
                    deep_error,
                )?],
                Place::Close => vec![answer(
                    Performative::Close(Close { error: None }),
                    Place::Close,
                    0,
                    deep_error,
                )?],
                Place::LongDescription => {
                    let Some(id) = t.delivery_id else { continue };
                    let error = fe2o3_amqp::types::definitions::Error::new(
                        fe2o3_amqp::types::definitions::AmqpError::NotAllowed,
                        Some("z".repeat(200_000)),
                        None,
                    );
                    vec![serde_amqp::to_vec(&Performative::Disposition(
                        Disposition {
                            role: Role::Receiver,
                            first: id,
                            last: None,
                            settled: true,
                            state: Some(
                                fe2o3_amqp::types::messaging::Rejected { error: Some(error) }
                                    .into(),
                            ),
                            batchable: false,
                        },
                    ))?]
                }
                // Place::Disposition (the places before it never see a transfer).
                _ => {
                    let Some(id) = t.delivery_id else { continue };
                    vec![answer(
                        Performative::Disposition(Disposition {
                            role: Role::Receiver,
                            first: id,
                            last: None,
                            settled: true,
                            state: None,
                            batchable: false,
                        }),
                        Place::Disposition,
                        4,
                        deep_rejected,
                    )?]
                }
            },
            Ok(Performative::Close(_)) | Err(_) => return Ok(()),
            Ok(_) => continue,
        };
        for p in &out {
            s.write_all(&frame(channel, p)).await?;
        }
        s.flush().await?;
    }
}

/// The fake float: accepts connections on `listener` with Bank B's float certificate, serves
/// each with the place `place` currently says, and counts connections per place. Runs on a
/// thread of its own.
fn spawn_fake_float(
    listener: std::net::TcpListener,
    b: &Org,
    places: &'static [Place],
    place: Arc<AtomicUsize>,
    served: Arc<Vec<AtomicUsize>>,
) -> Result<()> {
    let identity = TlsIdentity::load(&b.files.tls_cert, &b.files.tls_key)?;
    let key: PrivateKeyDer<'static> = identity.key.clone_key();
    let chain = identity.cert_chain.clone();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    std::thread::Builder::new().spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let i = place.load(Ordering::SeqCst).min(places.len() - 1);
                served[i].fetch_add(1, Ordering::SeqCst);
                // Each connection on a task of its own: a bridge that reconnects must not wait
                // for the fake float to give up on the connection before.
                let (acceptor, place) = (acceptor.clone(), places[i]);
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(20), serve(tls, place)).await;
                    }
                });
            }
        });
    })?;
    Ok(())
}

/// Bank A (whose bridge is under test) and Bank B (whose float port the fake float takes),
/// each on a vhost of its own.
async fn orgs() -> Result<(Org, Org, tempfile::TempDir)> {
    let w = two_orgs().await?;
    Ok((w.a, w.b, w.dir))
}

#[tokio::test]
async fn a_hostile_float_cannot_bring_the_bridge_down() -> Result<()> {
    let (mut a, b, _dir) = orgs().await?;
    let node = shared_node().await;

    // The fake float takes Bank B's float port.
    let listener = std::net::TcpListener::bind(("127.0.0.1", b.float_port))?;
    let place = Arc::new(AtomicUsize::new(0));
    let served: Arc<Vec<AtomicUsize>> =
        Arc::new(PLACES.iter().map(|_| AtomicUsize::new(0)).collect());
    spawn_fake_float(listener, &b, &PLACES, place.clone(), served.clone())?;

    a.start_bridge("reconnect_min = \"100ms\"\nreconnect_max = \"300ms\"")
        .await?;
    a.create_link_to(&b).await?;
    let queue = a.queue_to(&b);
    let (_conn, ch) = a.channel().await?;
    world::declare_peer_queue(&ch, &queue, "classic").await?;
    stream::publish(
        &ch,
        &queue,
        &PublishSpec {
            run: "hostile-float".into(),
            from: 0,
            to: 5,
            size: 64,
            destination: BANK_B.into(),
            headers: vec![],
        },
        |_| {},
    )
    .await?;

    // Walk through the places: each one is served at least once, and the bridge must come
    // back for the next (the connection after a refusal proves the process lived on).
    for (i, p) in PLACES.iter().enumerate() {
        place.store(i, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while served[i].load(Ordering::SeqCst) < 2 {
            let bridge = a.bridge.as_mut().context("bridge")?;
            if let Some(status) = bridge.exit_status()? {
                bail!(
                    "the bridge died with {status} on a nested value in `{p:?}`; log tail:\n{}",
                    bridge.log_tail(20)
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the bridge did not connect twice while the fake float nested `{p:?}`; log tail:\n{}",
                    bridge.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let bridge = a.bridge.as_mut().context("bridge")?;
    assert!(bridge.exit_status()?.is_none(), "the bridge is up");
    assert!(
        bridge.log_contains("float connection closed: malformed or hostile AMQP frames"),
        "one log line says why"
    );
    let metrics = bridge.metrics().await?;
    let refused: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("drawbridge_bridge_peer_frames_refused_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        refused >= PLACES.len() as f64,
        "each refusal counted: {refused}"
    );
    // A refused disposition settles nothing: the messages are all still queued.
    let vhost = a.vhost();
    assert_eq!(node.queue_depth(&vhost, &queue).await?, 5, "nothing lost");
    Ok(())
}

/// Before: a float's rejection description went whole into the dead-letter copy's
/// `drawbridge-reason` header; 200 KB of it does not fit one broker frame, so the dead-letter
/// publish closed the bridge's broker connection, the message came back, and so on for ever.
/// Now the reason is cut to 1 KiB and each message is dead-lettered once.
#[tokio::test]
async fn a_200_kb_rejection_description_is_cut_in_the_dead_letter_reason() -> Result<()> {
    let (mut a, b, _dir) = orgs().await?;
    let node = shared_node().await;
    let listener = std::net::TcpListener::bind(("127.0.0.1", b.float_port))?;
    let served = Arc::new(vec![AtomicUsize::new(0)]);
    spawn_fake_float(
        listener,
        &b,
        &[Place::LongDescription],
        Arc::new(AtomicUsize::new(0)),
        served,
    )?;
    a.start_bridge("").await?;
    a.create_link_to(&b).await?;
    let queue = a.queue_to(&b);
    let (_conn, ch) = a.channel().await?;
    world::declare_peer_queue(&ch, &queue, "classic").await?;
    stream::publish(
        &ch,
        &queue,
        &PublishSpec {
            run: "long-reason".into(),
            from: 0,
            to: 3,
            size: 64,
            destination: BANK_B.into(),
            headers: vec![],
        },
        |_| {},
    )
    .await?;
    let reasons = a.dead_letter_reasons(3, Duration::from_secs(60)).await?;
    let bridge = a.bridge.as_ref().context("bridge")?;
    assert_eq!(
        reasons.len(),
        3,
        "each dead-lettered; bridge log:\n{}",
        bridge.log_tail(15)
    );
    for r in &reasons {
        assert!(
            r.starts_with("rejected by peer"),
            "{}",
            &r[..r.len().min(100)]
        );
        assert!(r.len() <= 1100, "the reason is cut: {} bytes", r.len());
    }
    assert!(
        !bridge.log_contains("frame too large") && !bridge.log_contains("broker connection lost"),
        "the broker connection never failed"
    );
    let vhost = a.vhost();
    assert_eq!(
        node.queue_depth(&vhost, &queue).await?,
        0,
        "none left to loop"
    );
    Ok(())
}
