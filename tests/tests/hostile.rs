//! A hostile peer against a running float (real RabbitMQ, real TLS, a valid member
//! certificate): each attack is refused with a reason and counted, the float stays up, and a
//! well-behaved peer keeps flowing.

use std::time::Duration;

use anyhow::{Context, Result};
use drawbridge_bridge::peer::{self, PeerSettings};
use drawbridge_certs::{devpki, TlsIdentity, TlsPolicy};
use drawbridge_control_protocol::Target;
use drawbridge_testkit::{
    rabbit::shared_node,
    stream::{self, PublishSpec, Tally},
    world::{self, Org, INBOX},
};
use fe2o3_amqp::types::{
    messaging::{AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties},
    primitives::{SimpleValue, Value},
};

const BANK_A: &str = "O=Bank A, L=London, C=GB";
const BANK_B: &str = "O=Bank B, L=Paris, C=FR";

/// Bank B (the attacker, a genuine member) sends one message to Bank A's float whose body is
/// `depth` nested lists. Runs on its own thread with a big stack: encoding (and dropping) the
/// value recurses once per level on the sending side too.
fn send_nested_body(b: &Org, a: &Org, depth: usize) -> Result<String> {
    let identity = TlsIdentity::load(&b.files.tls_cert, &b.files.tls_key)?;
    let roots = drawbridge_certs::load_trust_roots(&b.files.root_cert)?;
    let tls = drawbridge_certs::client_config(
        &identity,
        roots,
        vec![a.legal_name.parse()?],
        TlsPolicy::Tls13Only,
    )?;
    let settings = PeerSettings {
        tls,
        connect_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        container_id: "mallory".into(),
        link_name: "nested".into(),
        address: drawbridge_control_protocol::DEFAULT_TARGET_ADDRESS.into(),
    };
    let target = Target::new("127.0.0.1", a.float_port);
    let destination = a.legal_name.clone();
    let worker =
        std::thread::Builder::new()
            .stack_size(1 << 30)
            .spawn(move || -> Result<String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut c = peer::connect(&target, &settings)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let mut v = Value::Null;
                    for _ in 0..depth {
                        v = Value::List(vec![v]);
                    }
                    let mut app = ApplicationProperties::default();
                    app.0.insert(
                        "drawbridge-destination".into(),
                        SimpleValue::String(destination),
                    );
                    let msg = Message::builder()
                        .properties(Properties {
                            message_id: Some(MessageId::String("deep-1".into())),
                            ..Default::default()
                        })
                        .application_properties(app)
                        .body(Body::Value(AmqpValue(v)))
                        .build();
                    let outcome =
                        tokio::time::timeout(Duration::from_secs(15), c.sender.send(msg)).await;
                    Ok(format!("{outcome:?}"))
                })
            })?;
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("attacker thread panicked"))?
}

#[tokio::test]
async fn a_deeply_nested_body_is_refused_and_the_float_stays_up() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    let node = shared_node().await;
    let dir = tempfile::tempdir()?;
    let net =
        devpki::generate_network(&dir.path().join("pki"), &[BANK_A.parse()?, BANK_B.parse()?])?;
    let va = node.fresh_vhost().await?;
    let vb = node.fresh_vhost().await?;
    let mut a = Org::new(net.nodes[0].clone(), vec![node.amqp_uri(&va)], dir.path());
    let mut b = Org::new(net.nodes[1].clone(), vec![node.amqp_uri(&vb)], dir.path());
    a.start_float("").await?;
    b.start_bridge("").await?;
    b.create_link_to(&a).await?;
    b.wait_link_state(&b.queue_to(&a), "up", Duration::from_secs(20))
        .await?;

    // Deep enough to abort the float before (20,000 did in a release build; fe2o3 encodes
    // nesting in quadratic time, so the attacker here stays at 5,000).
    let depth = std::env::var("HOSTILE_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(5_000);
    let outcome = send_nested_body(&b, &a, depth)?;
    let float = a.float.as_ref().context("float")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !float.log_contains("connection refused: malformed or hostile AMQP frames") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal logged (attacker saw {outcome}):\n{}",
            float.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        float.log_contains("nest deeper than 64"),
        "{}",
        float.log_tail(20)
    );
    assert!(!outcome.contains("Accepted"), "attacker: {outcome}");
    // Still up, counted, and the well-behaved link still flows.
    let metrics = float.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("drawbridge_float_connections_refused_total{reason=\"frames\"} 1")),
        "{metrics}"
    );
    let (_c, ch) = b.channel().await?;
    let spec = PublishSpec {
        run: "after".into(),
        from: 0,
        to: 50,
        size: 512,
        destination: a.legal_name.clone(),
        headers: vec![],
    };
    stream::publish(&ch, &b.queue_to(&a), &spec, |_| {}).await?;
    let (_c, ch) = a.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    let mut tally = Tally::new("after", 50, Some(BANK_B.to_string()));
    stream::consume(&ch, INBOX, &mut tally, Duration::from_secs(30), |_| {}).await?;
    let r = tally.report();
    assert!(r.complete() && r.duplicates == 0, "{r:?}");
    assert!(float.status().await.is_ok(), "float went down");
    // Nothing of the attack reached the inbox.
    assert_eq!(r.unexpected, 0, "{r:?}");
    Ok(())
}
