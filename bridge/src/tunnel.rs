//! Tunnel mode, the bridge's side (`docs/tunnel.md`): the bridge dials each float's tunnel
//! port, activates the floats while it holds the HA lock, publishes what they hand over into
//! the inboxes with publisher confirms, answers each publish with its outcome, and signs the
//! floats' TLS handshakes with the organisation's key (the floats hold none).
//!
//! The bridge trusts a float no more than a peer: every message it is handed is converted
//! again with the same checks as at the float (`wire_in::from_bytes_stamped`), only the
//! configured inboxes are published into, and only TLS 1.3 server CertificateVerify content
//! is signed, and only for the float's certificate, and only while this bridge has the float
//! activated.

use std::{sync::Arc, time::Duration};

use drawbridge_certs::{
    is_tls13_server_certificate_verify,
    rustls::{self, SignatureScheme},
    LegalName, Revocation, TlsIdentity, TlsPolicy,
};
use drawbridge_control_protocol::{
    tunnel::{proto, Body, TUNNEL_VERSION},
    Target,
};
use drawbridge_mapping::{self as mapping, wire_in};
use drawbridge_runtime::{
    backoff::Backoff,
    broker::Live,
    tunnel::{within, TunnelCodec},
};
use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, SinkExt, StreamExt};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::ShortString,
    Channel, Confirmation,
};
use tokio_util::{codec::Framed, sync::CancellationToken};
use tracing::{info, warn};

use crate::{config::TunnelSettings, ha::HaState, Ctx};

/// How often the bridge pings a float; a float silent for [`SILENCE`] is redialled.
const PING_EVERY: Duration = Duration::from_secs(5);
/// See [`PING_EVERY`].
const SILENCE: Duration = Duration::from_secs(15);
/// Connect, TLS and hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel as `/status` shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct TunnelView {
    /// The float's tunnel address.
    pub float: String,
    /// `up` or `down`.
    pub state: &'static str,
    /// The epoch this bridge activated the float with, while it holds it.
    pub activated_epoch: Option<u64>,
    /// Since when (Unix ms) it is in this state.
    pub since_unix_ms: u64,
    /// Why it is down, or why it went down last.
    pub reason: Option<String>,
    /// Publishes answered on it, and handshakes signed for its float.
    pub published: u64,
    pub signatures: u64,
}

fn view(ctx: &Ctx, target: &Target, f: impl FnOnce(&mut TunnelView)) {
    let mut views = ctx.tunnels.lock().expect("poisoned");
    let v = views
        .entry(target.to_string())
        .or_insert_with(|| TunnelView {
            float: target.to_string(),
            state: "down",
            since_unix_ms: drawbridge_runtime::daemon::unix_ms(),
            ..TunnelView::default()
        });
    f(v);
}

fn set_state(ctx: &Ctx, target: &Target, state: &'static str, reason: Option<String>) {
    view(ctx, target, |v| {
        if v.state != state {
            v.since_unix_ms = drawbridge_runtime::daemon::unix_ms();
        }
        v.state = state;
        if reason.is_some() {
            v.reason = reason;
        }
        if state == "down" {
            v.activated_epoch = None;
        }
    });
}

/// What every tunnel of this bridge shares.
struct Shared {
    settings: TunnelSettings,
    tls: Arc<rustls::ClientConfig>,
    /// The key that signs for the floats, and its certificate's public key (a float
    /// presenting another key is not signed for).
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    signing_spki: Vec<u8>,
}

/// Start one task per configured float; they stop with `shutdown`.
pub(crate) fn start(
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) -> Result<(), drawbridge_certs::CertError> {
    use drawbridge_certs::CertError;
    let Some(settings) = ctx.cfg.tunnel.clone() else {
        return Ok(());
    };
    let identity =
        TlsIdentity::load_with(&settings.tls_cert, &settings.tls_key, ctx.cfg.key_access)?;
    let roots = drawbridge_certs::load_trust_roots(&settings.trust_roots)?;
    let float_name = settings
        .float_name
        .clone()
        .unwrap_or_else(|| ctx.tls.legal_name().clone());
    let (tls, _) = drawbridge_certs::client_config_with(
        &identity,
        &Revocation::off(roots)?,
        vec![float_name],
        TlsPolicy::Tls13Only,
    )?;
    // The organisation's key: the one this bridge presents to partners' floats.
    let own = ctx.tls.current();
    let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&own.identity.key)
        .map_err(|e| CertError::Verifier(format!("bridge.tls_key cannot sign: {e}")))?;
    let signing_spki = own
        .identity
        .cert_chain
        .first()
        .and_then(|c| spki(c.as_ref()))
        .ok_or_else(|| CertError::Verifier("bridge.tls_cert: cannot read its public key".into()))?;
    let shared = Arc::new(Shared {
        settings,
        tls,
        signing_key,
        signing_spki,
    });
    for target in &shared.settings.floats {
        set_state(&ctx, target, "down", Some("dialling".into()));
        info!(float = %target, "tunnel: dialling the float");
        tokio::spawn(dial(
            ctx.clone(),
            shared.clone(),
            target.clone(),
            shutdown.clone(),
        ));
    }
    Ok(())
}

/// The raw SubjectPublicKeyInfo of a DER certificate.
fn spki(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// Keep a tunnel to `target` up until `shutdown`: reconnect with backoff (jitter, capped),
/// one log line per change.
async fn dial(ctx: Arc<Ctx>, shared: Arc<Shared>, target: Target, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut last_failure: Option<String> = None;
    loop {
        let connected = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&ctx, &shared, &target)) => {
                r.unwrap_or_else(|_| Err(format!("no tunnel within {CONNECT_TIMEOUT:?}")))
            }
            _ = shutdown.cancelled() => return,
        };
        match connected {
            Ok((framed, hello)) => {
                backoff.reset();
                last_failure = None;
                metrics::gauge!("drawbridge_bridge_tunnels_up").increment(1.0);
                set_state(&ctx, &target, "up", None);
                let why = Tunnel::new(&ctx, &shared, &target, hello)
                    .run(framed, &shutdown)
                    .await;
                metrics::gauge!("drawbridge_bridge_tunnels_up").decrement(1.0);
                set_state(&ctx, &target, "down", Some(why.clone()));
                if shutdown.is_cancelled() {
                    return;
                }
                warn!(float = %target, reason = %why, "tunnel down; redialling");
            }
            Err(why) => {
                set_state(&ctx, &target, "down", Some(why.clone()));
                if last_failure.as_deref() != Some(why.as_str()) {
                    warn!(float = %target, reason = %why, "tunnel not established; retrying with backoff");
                    last_failure = Some(why);
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

type TunnelStream = Framed<
    tokio_rustls::client::TlsStream<drawbridge_runtime::coalesce::Coalesce<tokio::net::TcpStream>>,
    TunnelCodec,
>;

async fn connect(
    ctx: &Ctx,
    shared: &Shared,
    target: &Target,
) -> Result<(TunnelStream, proto::FloatHello), String> {
    // The peer links' dialler: directly or through the proxy for this host, TLS end to end.
    let tls = crate::peer::connect_tls(target, &shared.tls, ctx.cfg.proxy.as_deref())
        .await
        .map_err(|e| e.reason())?;
    let mut framed = Framed::new(tls, TunnelCodec::new(shared.settings.max_message_size));
    framed
        .send(Body::BridgeHello(proto::BridgeHello {
            version: TUNNEL_VERSION,
            bridge_id: ctx.cfg.id.clone(),
            max_in_flight: u32::try_from(shared.settings.max_in_flight).unwrap_or(u32::MAX),
            max_bytes_in_flight: 0,
        }))
        .await
        .map_err(|e| e.to_string())?;
    match framed.next().await {
        Some(Ok(Body::FloatHello(h))) if h.version <= TUNNEL_VERSION => Ok((framed, h)),
        Some(Ok(Body::FloatHello(h))) => Err(format!(
            "the float speaks tunnel protocol {}, this bridge {TUNNEL_VERSION}",
            h.version
        )),
        Some(Ok(_)) => Err("the float's first frame is not its hello".into()),
        Some(Err(e)) => Err(e.to_string()),
        None => {
            Err("the float closed the tunnel (is this bridge one of float.tunnel.bridges?)".into())
        }
    }
}

/// A publish's outcome, for the float.
type Answer = BoxFuture<'static, proto::Outcome>;

/// One established tunnel.
struct Tunnel<'a> {
    ctx: &'a Arc<Ctx>,
    shared: &'a Shared,
    target: &'a Target,
    /// The float's highest epoch as last heard.
    float_epoch: u64,
    /// The epoch this bridge activated the float with, while it holds it.
    activated: Option<u64>,
    /// Whether the float presents this bridge's key (it is signed for only then).
    can_sign: bool,
    /// The confirm-mode channel publishes go on, and the connection it is on.
    channel: Option<(Arc<Live>, Channel)>,
    /// Signatures this float may still ask for now, and when they were last topped up: a
    /// float cannot make the bridge spend its CPU signing (see [`SIGN_RATE`]).
    sign_tokens: f64,
    sign_refilled: std::time::Instant,
}

/// Signatures per second (and burst) a float may ask for: a peer handshake each, so a
/// reconnect storm of 1,000 peers is signed within about two seconds, and a compromised float
/// gets no more than this out of the bridge's CPU.
const SIGN_RATE: f64 = 500.0;

impl<'a> Tunnel<'a> {
    fn new(
        ctx: &'a Arc<Ctx>,
        shared: &'a Shared,
        target: &'a Target,
        hello: proto::FloatHello,
    ) -> Self {
        let can_sign = spki(&hello.certificate).is_some_and(|k| k == shared.signing_spki);
        let float_id = drawbridge_runtime::text::truncate(&hello.float_id, 128).to_string();
        if can_sign {
            info!(float = %target, float_id = %float_id, epoch = hello.epoch, "tunnel up");
        } else {
            warn!(float = %target, float_id = %float_id, "tunnel up, but the float's certificate is not for this bridge's key (bridge.tls_cert): its peers' handshakes will not be signed");
        }
        Tunnel {
            ctx,
            shared,
            target,
            float_epoch: hello.epoch,
            activated: None,
            can_sign,
            channel: None,
            sign_tokens: SIGN_RATE,
            sign_refilled: std::time::Instant::now(),
        }
    }

    async fn run(mut self, mut framed: TunnelStream, shutdown: &CancellationToken) -> String {
        let mut ha = self.ctx.ha.state.subscribe();
        let mut answers: FuturesUnordered<Answer> = FuturesUnordered::new();
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut heard = tokio::time::Instant::now();
        let mut nonce = 0u64;
        loop {
            // Activate while this bridge is the active one and its broker is up; step back
            // otherwise. A float activated by a newer epoch has told us (Deactivate).
            let should =
                *ha.borrow_and_update() == HaState::Active && self.ctx.broker.is_connected();
            if should && self.activated.is_none() {
                let epoch = (self.float_epoch + 1).max(drawbridge_runtime::daemon::unix_ms());
                if let Err(e) = within(framed.send(Body::Activate(proto::Activate { epoch }))).await
                {
                    return e.to_string();
                }
                self.activated = Some(epoch);
                self.float_epoch = epoch;
                view(self.ctx, self.target, |v| v.activated_epoch = Some(epoch));
                info!(float = %self.target, epoch, "tunnel: float activated");
            } else if !should && self.activated.is_some() {
                let epoch = self.activated.take().unwrap_or_default();
                view(self.ctx, self.target, |v| v.activated_epoch = None);
                if let Err(e) = framed
                    .send(Body::Deactivate(proto::Deactivate {
                        epoch,
                        reason: "the bridge is not active (HA) or lost its broker".into(),
                    }))
                    .await
                {
                    return e.to_string();
                }
                info!(float = %self.target, "tunnel: float deactivated (this bridge is not active)");
            }
            let room = answers.len() < self.shared.settings.max_in_flight;
            tokio::select! {
                frame = framed.next(), if room => {
                    let body = match frame {
                        Some(Ok(b)) => b,
                        Some(Err(e)) => return e.to_string(),
                        None => return "closed by the float".into(),
                    };
                    heard = tokio::time::Instant::now();
                    match body {
                        Body::Publish(p) => {
                            let answer = self.publish(p).await;
                            answers.push(answer);
                        }
                        Body::SignRequest(r) => {
                            let answer = self.sign(r);
                            if let Err(e) = within(framed.send(Body::SignResponse(answer))).await {
                                return e.to_string();
                            }
                        }
                        Body::Deactivate(d) => {
                            self.float_epoch = self.float_epoch.max(d.epoch);
                            if self.activated.take().is_some() {
                                view(self.ctx, self.target, |v| v.activated_epoch = None);
                                info!(float = %self.target, epoch = d.epoch, reason = %drawbridge_runtime::text::escape(&d.reason), "tunnel: the float was activated by another bridge");
                            }
                        }
                        Body::Ping(p) => {
                            if let Err(e) = within(framed.send(Body::Pong(proto::Pong { nonce: p.nonce }))).await {
                                return e.to_string();
                            }
                        }
                        Body::Pong(_) => {}
                        _ => return "unexpected frame from the float".into(),
                    }
                }
                Some(outcome) = answers.next(), if !answers.is_empty() => {
                    if let Err(e) = within(framed.feed(Body::Outcome(outcome))).await {
                        return e.to_string();
                    }
                    let mut answered = 1;
                    while let Some(Some(o)) = answers.next().now_or_never() {
                        answered += 1;
                        if let Err(e) = within(framed.feed(Body::Outcome(o))).await {
                            return e.to_string();
                        }
                    }
                    view(self.ctx, self.target, |v| v.published += answered);
                    if let Err(e) = within(framed.flush()).await {
                        return e.to_string();
                    }
                }
                changed = ha.changed() => {
                    if changed.is_err() {
                        return "bridge stopping".into();
                    }
                }
                _ = ping.tick() => {
                    if heard.elapsed() > SILENCE {
                        return format!("nothing from the float for {SILENCE:?}");
                    }
                    nonce += 1;
                    if let Err(e) = within(framed.send(Body::Ping(proto::Ping { nonce }))).await {
                        return e.to_string();
                    }
                }
                _ = shutdown.cancelled() => {
                    // What is in flight is answered first (the float settles on it). An
                    // outcome that cannot be written leaves its transfer waiting at the float
                    // until its outcome timeout: released, resent, recognised by the dedup
                    // window if the broker confirmed it. Never a loss. The Deactivate is a
                    // courtesy: the float sees the tunnel close either way.
                    while let Ok(Some(o)) = tokio::time::timeout(Duration::from_secs(5), answers.next()).await {
                        let _ = within(framed.feed(Body::Outcome(o))).await;
                    }
                    let _ = within(framed.send(Body::Deactivate(proto::Deactivate {
                        epoch: self.activated.unwrap_or_default(),
                        reason: "bridge shutting down".into(),
                    }))).await;
                    return "bridge shutting down".into();
                }
            }
        }
    }

    /// Sign a handshake for the float, if this bridge may.
    fn sign(&mut self, r: proto::SignRequest) -> proto::SignResponse {
        let refuse = |error: &str| proto::SignResponse {
            id: r.id,
            signature: Vec::new(),
            error: error.to_string(),
        };
        if self.activated.is_none() {
            return refuse("this bridge has not activated the float");
        }
        if !self.can_sign {
            return refuse("the float's certificate is not for this bridge's key");
        }
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.sign_refilled).as_secs_f64();
        self.sign_refilled = now;
        self.sign_tokens = (self.sign_tokens + elapsed * SIGN_RATE).min(SIGN_RATE);
        if self.sign_tokens < 1.0 {
            metrics::counter!("drawbridge_bridge_tunnel_sign_refused_total").increment(1);
            return refuse("more than 500 signatures a second asked for");
        }
        self.sign_tokens -= 1.0;
        if !is_tls13_server_certificate_verify(&r.message) {
            metrics::counter!("drawbridge_bridge_tunnel_sign_refused_total").increment(1);
            return refuse("only a TLS 1.3 server CertificateVerify is signed");
        }
        let scheme = SignatureScheme::from(u16::try_from(r.scheme).unwrap_or(0));
        let Some(signer) = self.shared.signing_key.choose_scheme(&[scheme]) else {
            return refuse("signature scheme not offered by this key");
        };
        match signer.sign(&r.message) {
            Ok(signature) => {
                metrics::counter!("drawbridge_bridge_tunnel_signatures_total").increment(1);
                view(self.ctx, self.target, |v| v.signatures += 1);
                proto::SignResponse {
                    id: r.id,
                    signature,
                    error: String::new(),
                }
            }
            Err(e) => refuse(&e.to_string()),
        }
    }

    /// Publish what the float handed over: its outcome as a future (the confirm), or at once.
    async fn publish(&mut self, p: proto::Publish) -> Answer {
        let seq = p.seq;
        let done = move |kind: proto::outcome::Kind, reason: String| proto::Outcome {
            seq,
            kind: kind as i32,
            reason,
        };
        use proto::outcome::Kind;
        if p.probe {
            return futures::future::ready(done(
                Kind::Rejected,
                "link canary probes are not served in tunnel mode".into(),
            ))
            .boxed();
        }
        if !self.shared.settings.inboxes.contains(&p.inbox) {
            warn!(float = %self.target, inbox = %drawbridge_runtime::text::truncate(&p.inbox, 255), "tunnel: the float asked for a queue that is not one of bridge.tunnel.inboxes; rejected");
            return futures::future::ready(done(
                Kind::Rejected,
                "the inbox is not one this bridge publishes into".into(),
            ))
            .boxed();
        }
        if p.sender.parse::<LegalName>().is_err() {
            return futures::future::ready(done(
                Kind::Rejected,
                "the sender is not a legal name".into(),
            ))
            .boxed();
        }
        let inbound = match wire_in::from_bytes_stamped(
            &p.message,
            self.shared.settings.max_message_size,
            &p.sender,
        ) {
            Ok(m) => m,
            Err(e) => return futures::future::ready(done(Kind::Rejected, e.to_string())).boxed(),
        };
        let Some((live, channel)) = self.channel().await else {
            return futures::future::ready(done(Kind::Released, "broker unavailable".into()))
                .boxed();
        };
        let frame_max = live.conn.configuration().frame_max();
        if !mapping::fits_frame(inbound.properties_len, frame_max) {
            return futures::future::ready(done(
                Kind::Rejected,
                "headers too large for the broker's frame".into(),
            ))
            .boxed();
        }
        let op = self.ctx.broker.config().op_timeout;
        let exchange = ShortString::from(self.shared.settings.inbox_exchange.as_str());
        let inbox = p.inbox;
        // The publish and its confirm as one future. It is polled once here, which hands the
        // publish to lapin in the tunnel's order (lapin numbers it for its confirm), and not
        // awaited: waiting for lapin's I/O thread to write each message would cost two thread
        // hand-offs per message, the float's largest cost before it stopped doing so
        // (docs/performance.md). A failed publish closes the channel or reports the
        // connection broken; the next publish then opens another (`Tunnel::channel`).
        let mut answer = async move {
            let publish = tokio::time::timeout(
                op,
                channel.basic_publish(
                    exchange,
                    ShortString::from(inbox.as_str()),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &inbound.body,
                    inbound.properties,
                ),
            )
            .await;
            let confirm = match publish {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return done(Kind::Released, format!("publish failed: {e}")),
                Err(_) => {
                    live.report_broken("publish timed out");
                    return done(Kind::Released, "publish timed out".into());
                }
            };
            match tokio::time::timeout(op, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => done(Kind::Accepted, String::new()),
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    done(Kind::Released, format!("inbox `{inbox}` does not exist (yet)"))
                }
                Ok(Ok(Confirmation::Nack(_))) => done(
                    Kind::Released,
                    format!("the broker refused the message for now (nack): inbox `{inbox}` full or broker in alarm"),
                ),
                Ok(Ok(Confirmation::NotRequested)) => {
                    done(Kind::Released, "publisher confirms not enabled".into())
                }
                Ok(Err(e)) => done(Kind::Released, format!("publish failed: {e}")),
                Err(_) => {
                    live.report_broken("publisher confirm timed out");
                    done(Kind::Released, format!("publisher confirm timed out after {op:?}"))
                }
            }
        }
        .boxed();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(outcome) = answer.as_mut().poll(&mut cx) {
            return futures::future::ready(outcome).boxed();
        }
        answer
    }

    /// The tunnel's confirm-mode channel, opened (and the inboxes declared and bound) on the
    /// current broker connection when needed.
    async fn channel(&mut self) -> Option<(Arc<Live>, Channel)> {
        if let Some((live, ch)) = &self.channel {
            if !live.is_lost() && ch.status().connected() {
                return Some((live.clone(), ch.clone()));
            }
        }
        self.channel = None;
        let live = self.ctx.broker.current()?;
        let settings = &self.shared.settings;
        let opened = tokio::time::timeout(self.ctx.broker.config().op_timeout, async {
            let ch = live.conn.create_channel().await?;
            for q in &settings.inboxes {
                if settings.declare_inboxes {
                    ch.queue_declare(
                        ShortString::from(q.as_str()),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        drawbridge_node::topology::plain_queue_args(settings.inbox_queue_type),
                    )
                    .await?;
                }
                if !settings.inbox_exchange.is_empty() {
                    drawbridge_node::topology::bind_to_direct(&ch, &settings.inbox_exchange, q)
                        .await?;
                }
            }
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(ch)
        })
        .await;
        match opened {
            Ok(Ok(ch)) => {
                self.channel = Some((live.clone(), ch.clone()));
                Some((live, ch))
            }
            Ok(Err(e)) => {
                warn!(float = %self.target, reason = %e, "tunnel: cannot open a publishing channel; publishes are released");
                None
            }
            Err(_) => {
                live.report_broken("channel open timed out");
                None
            }
        }
    }
}
