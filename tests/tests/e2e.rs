//! End to end: two organisations, each with broker (vhost), bridge and float as real
//! processes, real TLS, messages both ways.

use std::time::Duration;

use anyhow::Result;
use drawbridge_certs::devpki;
use drawbridge_testkit::{
    rabbit::shared_node,
    stream::{self, PublishSpec, Tally},
    world::{self, Org, INBOX},
};

const BANK_A: &str = "O=Bank A, L=London, C=GB";
const BANK_B: &str = "O=Bank B, L=Paris, C=FR";

struct Pair {
    a: Org,
    b: Org,
    _dir: tempfile::TempDir,
}

async fn pair() -> Result<Pair> {
    drawbridge_certs::install_crypto_provider();
    let node = shared_node().await;
    let dir = tempfile::tempdir()?;
    let names = [BANK_A.parse()?, BANK_B.parse()?];
    let net = devpki::generate_network(&dir.path().join("pki"), &names)?;
    let va = node.fresh_vhost().await?;
    let vb = node.fresh_vhost().await?;
    let a = Org::new(net.nodes[0].clone(), vec![node.amqp_uri(&va)], dir.path());
    let b = Org::new(net.nodes[1].clone(), vec![node.amqp_uri(&vb)], dir.path());
    Ok(Pair { a, b, _dir: dir })
}

async fn send(from: &Org, to: &Org, run: &str, n: u64, extra_headers: Vec<(String, String)>) -> Result<()> {
    let (_c, ch) = from.channel().await?;
    let q = from.queue_to(to);
    world::declare_peer_queue(&ch, &q, "classic").await?;
    let spec = PublishSpec {
        run: run.to_string(),
        from: 0,
        to: n,
        size: 256,
        destination: to.legal_name.clone(),
        headers: extra_headers,
    };
    stream::publish(&ch, &q, &spec, |_| {}).await
}

async fn receive(at: &Org, run: &str, n: u64, sender: &str) -> Result<stream::Report> {
    let (_c, ch) = at.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    let mut tally = Tally::new(run, n, Some(sender.to_string()));
    stream::consume(&ch, INBOX, &mut tally, Duration::from_secs(30), |_| {}).await?;
    Ok(tally.report())
}

#[tokio::test]
async fn messages_flow_both_ways_with_authenticated_sender() -> Result<()> {
    let mut p = pair().await?;
    p.a.start_float("").await?;
    p.b.start_float("").await?;
    p.a.start_bridge("").await?;
    p.b.start_bridge("").await?;
    p.a.create_link_to(&p.b).await?;
    p.b.create_link_to(&p.a).await?;
    p.a.wait_link_state(&p.a.queue_to(&p.b), "up", Duration::from_secs(20)).await?;
    p.b.wait_link_state(&p.b.queue_to(&p.a), "up", Duration::from_secs(20)).await?;

    // A forges the sender header; the float must overwrite it with A's certificate subject.
    let forged = vec![
        ("drawbridge-sender".to_string(), "O=Evil, L=Nowhere, C=XX".to_string()),
        ("app-header".to_string(), "kept".to_string()),
    ];
    let n = 500;
    let (ra, rb) = tokio::join!(
        async {
            send(&p.a, &p.b, "ab", n, forged.clone()).await?;
            receive(&p.b, "ab", n, BANK_A).await
        },
        async {
            send(&p.b, &p.a, "ba", n, vec![]).await?;
            receive(&p.a, "ba", n, BANK_B).await
        }
    );
    let (ra, rb) = (ra?, rb?);
    assert!(ra.complete(), "A→B: {ra:?}");
    assert!(rb.complete(), "B→A: {rb:?}");
    assert_eq!((ra.duplicates, ra.unexpected), (0, 0), "A→B: {ra:?}");
    assert_eq!((rb.duplicates, rb.unexpected), (0, 0), "B→A: {rb:?}");
    Ok(())
}
