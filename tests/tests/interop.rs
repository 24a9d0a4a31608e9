//! Interoperability with Qpid Proton (Debian's python3-qpid-proton) in both directions.

use std::time::Duration;

use anyhow::Result;
use drawbridge_testkit::{
    fixtures::two_orgs,
    proton::{self, ReceiverOptions, SendOptions, TlsFiles},
    stream,
    world::{self, Org, INBOX},
    BANK_A, BANK_B,
};

fn tls(org: &Org) -> TlsFiles {
    TlsFiles {
        cert: org.files.tls_cert.clone(),
        key: org.files.tls_key.clone(),
        ca: org.files.root_cert.clone(),
    }
}

async fn orgs() -> Result<(Org, Org, tempfile::TempDir)> {
    drawbridge_certs::install_crypto_provider();
    assert!(
        proton::available(),
        "python3-qpid-proton is missing: run scripts/install-deps.sh"
    );
    let w = two_orgs().await?;
    Ok((w.a, w.b, w.dir))
}

#[tokio::test]
async fn proton_client_sends_to_the_float_and_its_subject_becomes_the_sender() -> Result<()> {
    let (a, mut b, _dir) = orgs().await?;
    b.start_float("").await?;
    let mut opts = SendOptions::new(
        format!("amqps://127.0.0.1:{}", b.float_port),
        tls(&a),
        5,
        BANK_B,
    );
    opts.sender_forge = Some("O=Forged, L=Nowhere, C=XX".into());
    let result = proton::send(&opts).await?;
    assert_eq!(result.accepted, 5, "{result:?}");

    let (_c, ch) = b.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 5 && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(
                INBOX.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await?
        {
            Some(m) => got.push(m.delivery),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(got.len(), 5);
    for d in &got {
        let sender = stream::header_string(d.properties.headers().as_ref(), "drawbridge-sender");
        assert_eq!(
            sender.as_deref(),
            Some(BANK_A),
            "sender must come from the certificate"
        );
        assert!(d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .starts_with("proton-"));
    }
    Ok(())
}

#[tokio::test]
async fn bridge_delivers_to_a_proton_receiver() -> Result<()> {
    let (mut a, b, _dir) = orgs().await?;
    let mut receiver = proton::spawn_receiver(&ReceiverOptions::new(tls(&b), 5)).await?;
    a.start_bridge("").await?;
    let mut link = a.link_to(&b);
    link.targets = vec![drawbridge_control_protocol::Target::new(
        "127.0.0.1",
        receiver.addr().port(),
    )];
    link.target_address = "proton.inbox".into();
    a.control(&drawbridge_control_protocol::ControlCommand::CreateLink(
        drawbridge_control_protocol::CreateLink {
            node_identity: BANK_A.into(),
            link: link.clone(),
        },
    ))
    .await?;
    let (_c, ch) = a.channel().await?;
    world::declare_peer_queue(&ch, &link.queue, "classic").await?;
    let spec = stream::PublishSpec {
        run: "px".into(),
        from: 0,
        to: 5,
        size: 100,
        destination: BANK_B.into(),
        headers: vec![("app".into(), "value".into())],
    };
    stream::publish(&ch, &link.queue, &spec, |_| {}).await?;
    let msgs = tokio::time::timeout(Duration::from_secs(30), receiver.collect(5)).await??;
    assert_eq!(msgs.len(), 5, "stderr: {}", receiver.stderr());
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.id, stream::message_id("px", i as u64));
        assert_eq!(m.body_kind, "data");
        assert_eq!(m.address.as_deref(), Some("proton.inbox"));
        assert_eq!(m.property("app"), Some("value"));
        assert_eq!(m.property("drawbridge-destination"), Some(BANK_B));
        assert!(stream::check_body(&m.body).is_some(), "body intact");
        let subject = m.peer_subject.clone().unwrap_or_default();
        for part in ["O=Bank A", "L=London", "C=GB"] {
            assert!(subject.contains(part), "peer subject {subject}");
        }
    }
    Ok(())
}
