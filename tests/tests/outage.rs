//! The float's broker stops in the middle of a stream: nothing is accepted while it is
//! down, and everything arrives once it is back.

use std::time::Duration;

use anyhow::Result;
use drawbridge_certs::devpki;
use drawbridge_testkit::{
    rabbit::{NodeOptions, RabbitNode},
    stream::{self, PublishSpec, Tally},
    world::{self, Org, INBOX},
    BANK_A, BANK_B,
};

#[tokio::test]
async fn float_broker_stopped_mid_stream_loses_nothing() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    let (na, nb) = tokio::join!(
        RabbitNode::start(NodeOptions::default()),
        RabbitNode::start(NodeOptions::default())
    );
    let (na, nb) = (na?, nb?);
    let dir = tempfile::tempdir()?;
    let net =
        devpki::generate_network(&dir.path().join("pki"), &[BANK_A.parse()?, BANK_B.parse()?])?;
    let mut a = Org::new(net.nodes[0].clone(), vec![na.amqp_uri("/")], dir.path());
    let mut b = Org::new(net.nodes[1].clone(), vec![nb.amqp_uri("/")], dir.path());
    b.start_float("").await?;
    a.start_bridge("reconnect_max = \"2s\"").await?;

    let n = 4000;
    let q = a.queue_to(&b);
    {
        let (_c, ch) = a.channel().await?;
        world::declare_peer_queue(&ch, &q, "classic").await?;
        let spec = PublishSpec {
            run: "out".into(),
            from: 0,
            to: n,
            size: 512,
            destination: BANK_B.into(),
            headers: vec![],
        };
        stream::publish(&ch, &q, &spec, |_| {}).await?;
    }
    a.create_link_to(&b).await?;
    // Wait until part of the stream is through, then stop B's broker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while nb.queue_depth("/", INBOX).await.unwrap_or(0) < 300 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nb.stop_app().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let float = b.float.as_ref().unwrap();
    let accepted = |s: serde_json::Value| s["accepted"].as_u64().unwrap_or(0);
    let before = accepted(float.status().await?);
    assert!(
        !float.status().await?["ready"].as_bool().unwrap_or(true),
        "float must report not ready"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = accepted(float.status().await?);
    assert_eq!(
        before, after,
        "nothing may be accepted while the broker is down"
    );
    nb.start_app().await?;

    let (_c, ch) = b.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    let mut tally = Tally::new("out", n, Some(BANK_A.into()));
    stream::consume(&ch, INBOX, &mut tally, Duration::from_secs(60), |_| {}).await?;
    let r = tally.report();
    println!("broker outage: {r:?}");
    assert!(
        r.complete(),
        "{r:?}\nbridge log:\n{}\nfloat log:\n{}",
        a.bridge.as_ref().unwrap().log_tail(30),
        float.log_tail(30)
    );
    assert_eq!(r.unexpected, 0);
    Ok(())
}
