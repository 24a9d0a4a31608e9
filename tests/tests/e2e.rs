//! End to end: two organisations, each with broker (vhost), bridge and float as real
//! processes, real TLS, messages both ways.

use std::time::Duration;

use anyhow::Result;
use drawbridge_certs::devpki;
use drawbridge_testkit::{
    fixtures::{
        destination_headers, link_up, links_up_both_ways, peer_queue_channel, publish_raw, receive,
        send, send_sized, send_with_headers, two_orgs,
    },
    rabbit::shared_node,
    stream::{self, PublishSpec},
    world::{self, Org, INBOX},
    BANK_A, BANK_B,
};

#[tokio::test]
async fn messages_flow_both_ways_with_authenticated_sender() -> Result<()> {
    let mut p = two_orgs().await?;
    links_up_both_ways(&mut p.a, &mut p.b, Duration::from_secs(20)).await?;

    // A forges the sender and every other header the receiving side asserts, in any case;
    // the float drops them and stamps A's certificate subject in its canonical form.
    let forged: Vec<(String, String)> = [
        ("drawbridge-sender", "O=Evil, L=Nowhere, C=XX"),
        ("Drawbridge-Sender", "O=Evil, L=Nowhere, C=XX"),
        ("drawbridge-reason", "looks dead-lettered"),
        ("drawbridge-origin-queue", "drawbridge.peers.x"),
        ("x-death", "forged"),
        ("X-First-Death-Reason", "rejected"),
        ("drawbridge-topic", "kept"),
        ("app-header", "kept"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let n = 500;
    let (ra, rb) = tokio::join!(
        async {
            send_with_headers(&p.a, &p.b, "ab", n, forged.clone()).await?;
            receive(&p.b, "ab", n, BANK_A).await
        },
        async {
            send(&p.b, &p.a, "ba", n).await?;
            receive(&p.a, "ba", n, BANK_B).await
        }
    );
    let (ra, rb) = (ra?, rb?);
    assert!(ra.complete(), "A→B: {ra:?}");
    assert!(rb.complete(), "B→A: {rb:?}");
    assert_eq!((ra.duplicates, ra.unexpected), (0, 0), "A→B: {ra:?}");
    assert_eq!((rb.duplicates, rb.unexpected), (0, 0), "B→A: {rb:?}");
    assert_eq!(
        (ra.out_of_order, rb.out_of_order),
        (0, 0),
        "FIFO: {ra:?} {rb:?}"
    );
    let keys: Vec<&str> = ra.header_keys.iter().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "app-header",
            "drawbridge-destination",
            "drawbridge-sender",
            "drawbridge-topic",
        ],
        "A→B"
    );
    Ok(())
}

/// FIFO per peer queue in steady state (docs/guarantees.md): a stream larger than the
/// bridge's window and the float's credit, so many transfers and publishes are in flight at
/// once, arrives in the order it was queued.
#[tokio::test]
async fn a_peer_queue_arrives_in_the_order_it_was_queued() -> Result<()> {
    let mut p = two_orgs().await?;
    link_up(&mut p.a, &mut p.b, "", "", Duration::from_secs(20)).await?;
    let n = 5_000;
    let (sent, r) = tokio::join!(
        send_sized(&p.a, &p.b, "fifo", n, 64, vec![]),
        receive(&p.b, "fifo", n, BANK_A)
    );
    sent?;
    let r = r?;
    assert!(r.complete(), "{r:?}");
    assert_eq!((r.duplicates, r.out_of_order), (0, 0), "{r:?}");
    Ok(())
}

async fn notify_listener(org: &Org) -> Result<(lapin::Connection, lapin::Channel, String)> {
    let (c, ch) = org.channel().await?;
    let q = world::bind_notify_queue(&ch).await?;
    Ok((c, ch, q.as_str().to_string()))
}

/// Drain the notify queue, counting snapshot requests.
async fn count_snapshot_requests(ch: &lapin::Channel, q: &str) -> Result<usize> {
    use drawbridge_control_protocol::Notification;
    let mut n = 0;
    while let Some(m) = ch
        .basic_get(q.into(), lapin::options::BasicGetOptions { no_ack: true })
        .await?
    {
        if let Ok(Notification::SnapshotRequest(_)) = Notification::decode(&m.delivery.data) {
            n += 1;
        }
    }
    Ok(n)
}

#[tokio::test]
async fn snapshot_request_repeats_until_a_snapshot_arrives() -> Result<()> {
    let mut p = two_orgs().await?;
    let (_c, ch, q) = notify_listener(&p.a).await?;
    p.a.start_bridge("snapshot_retry_min = \"200ms\"\nsnapshot_retry_max = \"400ms\"")
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = count_snapshot_requests(&ch, &q).await?;
    assert!(
        before >= 3,
        "expected repeated snapshot requests, saw {before}"
    );
    p.a.snapshot(vec![]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = count_snapshot_requests(&ch, &q).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = count_snapshot_requests(&ch, &q).await?;
    assert_eq!(after, 0, "requests must stop once a snapshot arrived");
    Ok(())
}

/// Control ordering: a snapshot built before a CreateLink but delivered after it (lower
/// sequence) must not delete the link; a newer snapshot does replace the state.
#[tokio::test]
async fn a_stale_snapshot_after_a_create_keeps_the_link() -> Result<()> {
    use drawbridge_control_protocol::{ControlCommand, CreateLink, SequencedCommand, Snapshot};
    let mut p = two_orgs().await?;
    p.b.start_float("").await?;
    // The node library sets user_id to the broker login (guest here) and the bridge checks
    // both it and the node identity (by default its own certificate's legal name).
    p.a.start_bridge("").await?;
    let q = p.a.queue_to(&p.b);
    let snapshot = |sequence, links| SequencedCommand {
        sequence,
        epoch: 0,
        command: ControlCommand::Snapshot(Snapshot {
            node_identity: BANK_A.into(),
            inbox_queues: vec![INBOX.into()],
            links,
        }),
    };
    p.a.control_sequenced(&SequencedCommand {
        sequence: 2,
        epoch: 0,
        command: ControlCommand::CreateLink(CreateLink {
            node_identity: BANK_A.into(),
            link: p.a.link_to(&p.b),
        }),
    })
    .await?;
    p.a.wait_link_state(&q, "up", Duration::from_secs(20))
        .await?;

    p.a.control_sequenced(&snapshot(1, vec![])).await?;
    let bridge = p.a.bridge.as_ref().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !bridge.log_contains("stale control message ignored") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stale snapshot not reported:\n{}",
            bridge.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status =
        p.a.wait_link_state(&q, "up", Duration::from_secs(5))
            .await?;
    assert_eq!(status["connects"], 1, "the link must not restart: {status}");
    send(&p.a, &p.b, "stale", 20).await?;
    let r = receive(&p.b, "stale", 20, BANK_A).await?;
    assert!(r.complete() && r.duplicates == 0, "{r:?}");

    // A newer snapshot without the link replaces the state: the link goes.
    p.a.control_sequenced(&snapshot(3, vec![])).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = bridge.status().await?;
        if s["links"].as_array().map(|l| l.is_empty()).unwrap_or(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "link not deleted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Control is authenticated: only the configured node user (RabbitMQ validates `user_id`
/// against the publishing connection's login) and node identity are obeyed. Another broker
/// user, with its own `user_id`, without one, or forging the node's (the broker refuses that
/// publish), creates nothing; each refusal is logged and counted.
#[tokio::test]
async fn control_from_another_broker_user_is_refused_and_the_nodes_is_obeyed() -> Result<()> {
    use drawbridge_control_protocol::{ControlCommand, CreateLink, SequencedCommand};
    use drawbridge_node::Node;
    use drawbridge_testkit::rabbit::encode_vhost;
    use lapin::{options::*, BasicProperties};

    let mut p = two_orgs().await?;
    p.b.start_float("").await?;
    p.a.start_bridge("").await?;
    let bridge = p.a.bridge.as_ref().unwrap();
    let q = p.a.queue_to(&p.b);

    // Mallory may publish to A's control exchange (a broker user of the same vhost).
    let node = shared_node().await;
    let mallory = format!("mallory-{}", &p.va[2..12]);
    node.ctl(&["add_user", &mallory, "m-secret"]).await?;
    node.ctl(&["set_permissions", "-p", &p.va, &mallory, ".*", ".*", ".*"])
        .await?;
    let uri = format!(
        "amqp://{mallory}:m-secret@127.0.0.1:{}/{}",
        node.amqp_port(),
        encode_vhost(&p.va)
    );
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await?;
    let create = ControlCommand::CreateLink(CreateLink {
        node_identity: BANK_A.into(),
        link: p.a.link_to(&p.b),
    });

    // 1. With her own (valid) user_id.
    let ch = conn.create_channel().await?;
    Node::new(BANK_A, mallory.clone())
        .publish(&ch, create.clone())
        .await?;
    // 2. Without a user_id.
    let msg = SequencedCommand {
        sequence: u64::MAX / 2,
        epoch: 0,
        command: create.clone(),
    };
    ch.basic_publish(
        "drawbridge.control".into(),
        "".into(),
        BasicPublishOptions::default(),
        &msg.encode(),
        BasicProperties::default(),
    )
    .await?
    .await?;
    // 3. Forging the node's user_id: the broker refuses the publish and closes the channel.
    let forged = conn.create_channel().await?;
    forged
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let refused = Node::new(BANK_A, p.a.node.user.clone())
        .publish(&forged, create.clone())
        .await;
    assert!(refused.is_err(), "RabbitMQ accepted a forged user_id");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = bridge.status().await?;
        if s["control_refused"] == 2 {
            assert!(
                s["links"].as_array().is_some_and(|l| l.is_empty()),
                "a refused control message created a link: {s}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusals not counted: {s}\n{}",
            bridge.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        bridge.log_contains(&format!("user_id={mallory}"))
            && bridge.log_contains("user_id=<none>")
            && bridge.log_contains("control message refused"),
        "{}",
        bridge.log_tail(30)
    );
    let metrics = bridge.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("drawbridge_bridge_control_refused_total{reason=\"wrong_user\"} 2")),
        "{metrics}"
    );

    // The node's own control message, naming another node: refused as well.
    p.a.control(&ControlCommand::CreateLink(CreateLink {
        node_identity: BANK_B.into(),
        link: p.a.link_to(&p.b),
    }))
    .await?;
    // And the node's own, for itself: obeyed.
    p.a.create_link_to(&p.b).await?;
    p.a.wait_link_state(&q, "up", Duration::from_secs(20))
        .await?;
    let s = bridge.status().await?;
    assert_eq!(s["control_refused"], 3, "{s}");
    assert!(bridge.log_contains("is not the configured node identity"));
    send(&p.a, &p.b, "authz", 10).await?;
    let r = receive(&p.b, "authz", 10, BANK_A).await?;
    assert!(r.complete() && r.duplicates == 0, "{r:?}");
    Ok(())
}

#[tokio::test]
async fn create_and_delete_are_idempotent_and_delete_leaves_messages_queued() -> Result<()> {
    let mut p = two_orgs().await?;
    p.b.start_float("").await?;
    p.a.start_bridge("").await?;
    let q = p.a.queue_to(&p.b);
    p.a.create_link_to(&p.b).await?;
    p.a.create_link_to(&p.b).await?;
    p.a.wait_link_state(&q, "up", Duration::from_secs(20))
        .await?;
    send(&p.a, &p.b, "c1", 100).await?;
    let r = receive(&p.b, "c1", 100, BANK_A).await?;
    assert!(r.complete() && r.duplicates == 0, "{r:?}");
    let status =
        p.a.wait_link_state(&q, "up", Duration::from_secs(5))
            .await?;
    assert_eq!(
        status["connects"], 1,
        "a repeated CreateLink must not restart the link: {status}"
    );

    p.a.delete_link_to(&p.b).await?;
    p.a.delete_link_to(&p.b).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = p.a.bridge.as_ref().unwrap().status().await?;
        if s["links"].as_array().map(|l| l.is_empty()).unwrap_or(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "link not deleted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send(&p.a, &p.b, "c2", 50).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = shared_node().await;
    let vhost_a = p.a.vhost();
    assert_eq!(
        node.queue_depth(&vhost_a, &q).await?,
        50,
        "deleted link must leave messages in the queue"
    );

    // Re-creating the link delivers what waited.
    p.a.create_link_to(&p.b).await?;
    let r = receive(&p.b, "c2", 50, BANK_A).await?;
    assert!(r.complete() && r.duplicates == 0, "{r:?}");
    Ok(())
}

#[tokio::test]
async fn float_subject_not_in_legal_names_moves_nothing() -> Result<()> {
    let mut p = two_orgs().await?;
    p.b.start_float("").await?;
    p.a.start_bridge("").await?;
    let mut link = p.a.link_to(&p.b);
    link.legal_names = vec!["O=Bank C, L=Berlin, C=DE".into()];
    p.a.control(&drawbridge_control_protocol::ControlCommand::CreateLink(
        drawbridge_control_protocol::CreateLink {
            node_identity: BANK_A.into(),
            link: link.clone(),
        },
    ))
    .await?;
    send(&p.a, &p.b, "pin", 20).await?;
    let status =
        p.a.wait_link_state(&link.queue, "down", Duration::from_secs(20))
            .await?;
    let reason = status["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("not one of the expected legal names"),
        "reason: {reason}"
    );
    assert!(
        reason.contains("Bank B"),
        "reason names the subject seen: {reason}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = shared_node().await;
    let vhost_a = p.a.vhost();
    assert_eq!(
        node.queue_depth(&vhost_a, &link.queue).await?,
        20,
        "nothing may leave the queue"
    );
    assert!(p
        .a
        .bridge
        .as_ref()
        .unwrap()
        .log_contains("not one of the expected legal names"));
    Ok(())
}

/// Connect to the float with `client` TLS config and see whether the float lets us talk.
async fn float_accepts(port: u16, client: std::sync::Arc<rustls::ClientConfig>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let Ok(Ok(mut tls)) =
        tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await
    else {
        return false;
    };
    // AMQP SASL header; a float that accepted us answers with its own header.
    if tls.write_all(b"AMQP\x03\x01\x00\x00").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf[..4] == b"AMQP"
}

#[tokio::test]
async fn float_refuses_client_certificates_from_another_ca_or_none() -> Result<()> {
    let mut p = two_orgs().await?;
    p.b.start_float("").await?;
    let roots = drawbridge_certs::load_trust_roots(&p.a.files.root_cert)?;
    let expected = vec![BANK_B.parse()?];
    // Control: the real A identity is accepted.
    let a_id = drawbridge_certs::TlsIdentity::load(&p.a.files.tls_cert, &p.a.files.tls_key)?;
    let good = drawbridge_certs::client_config(
        &a_id,
        roots.clone(),
        expected.clone(),
        Default::default(),
    )?;
    assert!(
        float_accepts(p.b.float_port, good).await,
        "genuine client must be accepted"
    );
    // Same legal name, another network's CA.
    let other = tempfile::tempdir()?;
    let net = devpki::generate_network(other.path(), &[BANK_A.parse()?])?;
    let forged =
        drawbridge_certs::TlsIdentity::load(&net.nodes[0].tls_cert, &net.nodes[0].tls_key)?;
    let bad = drawbridge_certs::client_config(
        &forged,
        roots.clone(),
        expected.clone(),
        Default::default(),
    )?;
    assert!(
        !float_accepts(p.b.float_port, bad).await,
        "foreign CA must be refused"
    );
    // No client certificate at all.
    let mut store = rustls::RootCertStore::empty();
    for c in roots.roots.iter() {
        store.roots.push(c.clone());
    }
    let none = std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(store)
            .with_no_client_auth(),
    );
    assert!(
        !float_accepts(p.b.float_port, none).await,
        "no client certificate must be refused"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let float = p.b.float.as_ref().unwrap();
    assert!(
        float.log_contains("TLS handshake refused"),
        "float log:\n{}",
        float.log_tail(20)
    );
    Ok(())
}

#[tokio::test]
async fn undeliverable_messages_are_dead_lettered_and_the_rest_keep_flowing() -> Result<()> {
    use lapin::BasicProperties;
    let mut p = two_orgs().await?;
    // The float takes bodies of up to 4 KiB: it announces 4 KiB + 64 KiB (the whole encoded
    // message) on attach. The bridge takes up to 256 KiB itself.
    p.b.start_float("max_message_size = 4096").await?;
    p.a.start_bridge("max_message_size = 262144").await?;
    let (_c, ch, q) = peer_queue_channel(&p.a, &p.b).await?;
    let publish = |id: Option<String>, body: Vec<u8>, dest: &str| {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(destination_headers(dest));
        if let Some(id) = id {
            props = props.with_message_id(id.into());
        }
        let ch = ch.clone();
        let q = q.clone();
        async move { publish_raw(&ch, &q, &body, props).await }
    };
    // seq 0..10 valid, with four bad ones in between.
    for seq in 0..10u64 {
        if seq == 3 {
            publish(Some("too-big".into()), vec![7u8; 300_000], BANK_B).await?;
        }
        if seq == 4 {
            publish(Some("over-float".into()), vec![8u8; 100_000], BANK_B).await?;
        }
        if seq == 5 {
            publish(None, stream::make_body(99, 64), BANK_B).await?;
        }
        if seq == 7 {
            publish(
                Some("elsewhere".into()),
                stream::make_body(98, 64),
                "O=Bank Z, L=Oslo, C=NO",
            )
            .await?;
        }
        publish(
            Some(stream::message_id("dl", seq)),
            stream::make_body(seq, 256),
            BANK_B,
        )
        .await?;
    }
    p.a.create_link_to(&p.b).await?;
    let r = receive(&p.b, "dl", 10, BANK_A).await?;
    assert!(
        r.complete() && r.duplicates == 0 && r.unexpected == 0,
        "{r:?}"
    );

    let reasons = p.a.dead_letter_reasons(4, Duration::from_secs(30)).await?;
    assert_eq!(reasons.len(), 4, "dead-letter queue: {reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("exceeds the maximum")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("the peer accepts messages of at most 69632 bytes")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no message_id")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("rejected by peer") && r.contains("not served")),
        "{reasons:?}"
    );
    Ok(())
}

/// A node's own message whose headers do not fit the bridge's broker frames, or would not
/// once the dead-letter reason is added, and a float that rejects with a 200 KB description:
/// each is dead-lettered with a bounded reason, none is resent in a loop, and the rest of
/// the queue keeps flowing.
#[tokio::test]
async fn oversize_headers_and_reasons_are_dead_lettered_not_resent_in_a_loop() -> Result<()> {
    use lapin::{options::*, types::*, BasicProperties};
    let mut p = two_orgs().await?;
    p.b.start_float("").await?;
    p.a.start_bridge("").await?;
    let q = p.a.queue_to(&p.b);
    // The node's own connection, with RabbitMQ's frame size (128 KiB): it may publish
    // headers the daemons' 32 KiB frames cannot carry.
    let conn = lapin::Connection::connect(p.a.broker_uri(), lapin::ConnectionProperties::default())
        .await?;
    let ch = conn.create_channel().await?;
    world::declare_peer_queue(&ch, &q, "classic").await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let publish = |id: String, seq: u64, blob: usize| {
        let mut h = destination_headers(BANK_B);
        if blob > 0 {
            h.insert(
                "blob".into(),
                AMQPValue::LongString(vec![b'x'; blob].into()),
            );
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_headers(h);
        let ch = ch.clone();
        let q = q.clone();
        async move { publish_raw(&ch, &q, &stream::make_body(seq, 64), props).await }
    };
    for seq in 0..6u64 {
        if seq == 2 {
            publish("over-frame".into(), 90, 40_000).await?;
        }
        if seq == 4 {
            // Fits the bridge's 128 KiB frames as delivered; its dead-letter copy has room for
            // only part of the reason.
            publish("near-frame".into(), 91, 130_800).await?;
        }
        publish(stream::message_id("ov", seq), seq, 0).await?;
    }
    p.a.create_link_to(&p.b).await?;
    let r = receive(&p.b, "ov", 6, BANK_A).await?;
    assert!(
        r.complete() && r.duplicates == 0,
        "{r:?}\nbridge log:\n{}",
        p.a.bridge.as_ref().unwrap().log_tail(30)
    );
    let reasons = p.a.dead_letter_reasons(2, Duration::from_secs(30)).await?;
    assert_eq!(reasons.len(), 2, "dead-letter queue: {reasons:?}");
    assert!(
        reasons[0].contains("at most 14336 are forwarded"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("the message's headers") && reasons[1].contains("bytes in all"),
        "the near-frame copy's reason is cut to fit: {reasons:?}"
    );
    let bridge = p.a.bridge.as_ref().unwrap();
    assert!(
        !bridge.log_contains("frame_too_large"),
        "the bridge's broker connection never failed"
    );
    Ok(())
}

#[tokio::test]
async fn bad_config_lists_every_problem_and_exits_78_ex_config() -> Result<()> {
    use drawbridge_testkit::daemon::{binary, Kind};
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[float]\nlisten = \"nowhere\"\nmax_conections = 5\n[broker]\nuris = []\n[log]\nlevel = \"verbose\"\n",
    )?;
    let out = tokio::process::Command::new(binary(Kind::Float)?)
        .arg("--config")
        .arg(&cfg)
        .env_remove("DRAWBRIDGE_FLOAT__LISTEN")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "float.listen",
        "float.max_conections: unknown key",
        "float.tls_cert",
        "broker.uris",
        "log.level: `verbose` names no level",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    let out = tokio::process::Command::new(binary(Kind::Bridge)?)
        .env("DRAWBRIDGE_BRIDGE__WINDOW", "0")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bridge.window") && err.contains("bridge.tls_cert"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn link_state_changes_are_published_as_link_status_events() -> Result<()> {
    use drawbridge_control_protocol::{LinkState, Notification};
    let mut p = two_orgs().await?;
    let (_c, ch, q) = notify_listener(&p.a).await?;
    let queue = link_up(&mut p.a, &mut p.b, "", "", Duration::from_secs(20)).await?;
    p.a.delete_link_to(&p.b).await?;
    let mut states = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !states.contains(&LinkState::Deleted) && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(
                q.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await?
        {
            Some(m) => {
                if let Ok(Notification::LinkStatus(s)) = Notification::decode(&m.delivery.data) {
                    assert_eq!(s.queue, queue);
                    assert_eq!(s.bridge_id, "bridge-bank-a-london-gb");
                    if s.state == LinkState::Up {
                        assert_eq!(s.peer, format!("127.0.0.1:{}", p.b.float_port), "{s:?}");
                    }
                    states.push(s.state);
                }
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(
        states,
        vec![LinkState::Connecting, LinkState::Up, LinkState::Deleted]
    );
    Ok(())
}

/// Messages bigger than the float's per-link budget (and several times its whole budget in
/// total) all arrive, intact and once: the link takes one at a time while it is over budget
/// and resumes as confirms come back, and every byte is given back at the end.
#[tokio::test]
async fn messages_bigger_than_the_link_budget_all_arrive() -> Result<()> {
    let mut p = two_orgs().await?;
    link_up(
        &mut p.a,
        &mut p.b,
        "max_message_size = 1048576\nmax_link_bytes_in_flight = 65536\nmax_bytes_in_flight = 1048576",
        "",
        Duration::from_secs(20),
    )
    .await?;
    let n = 40;
    send_sized(&p.a, &p.b, "big", n, 200 * 1024, vec![]).await?;
    let r = receive(&p.b, "big", n, BANK_A).await?;
    assert!(
        r.complete() && r.duplicates == 0 && r.unexpected == 0,
        "{r:?}"
    );
    // Each body took several AMQP 0-9-1 frames on both brokers: the float asks for
    // `broker.frame_max`'s 32 KiB default (a quarter of lapin's buffers, see
    // docs/performance.md), the bridge for the broker's 128 KiB (it must receive whatever
    // headers a node could publish).
    let rows = shared_node()
        .await
        .connections(&["vhost", "client_properties", "frame_max"])
        .await?;
    let daemons: Vec<&Vec<String>> = rows
        .iter()
        .filter(|r| (r[0] == p.va || r[0] == p.vb) && r[1].contains("drawbridge-"))
        .collect();
    assert!(
        daemons.iter().any(|r| r[0] == p.va) && daemons.iter().any(|r| r[0] == p.vb),
        "the bridge's and the float's broker connections: {rows:?}"
    );
    for r in &daemons {
        let want = if r[0] == p.va { "131072" } else { "32768" };
        assert_eq!(r[2], want, "{r:?}");
    }
    let float = p.b.float.as_ref().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = float.status().await?;
        if s["accepted"] == n && s["bytes_in_flight"] == 0 {
            assert!(
                s["budget_holds"].as_u64().unwrap_or(0) > 0,
                "the link never held back: {s}"
            );
            assert_eq!(s["rejected"], 0, "{s}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bytes still in flight after every message arrived: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One sample of a Prometheus text exposition: name, labels, value.
fn samples(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(v) => v,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let mut map = std::collections::BTreeMap::new();
        // Label values here hold no `",` sequence (queue names and legal names).
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
        }
        out.push((name.to_string(), map, value));
    }
    out
}

/// The value of `name` with (at least) `labels`, summed over any other labels; 0 if absent.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// `/metrics` of both daemons, parsed as Prometheus text, agrees with what was sent: per
/// link (queue label) on the bridge, per authenticated peer on the float, rejects counted.
#[tokio::test]
async fn metrics_count_what_was_sent_per_link_and_per_peer() -> Result<()> {
    let mut p = two_orgs().await?;
    let q = link_up(&mut p.a, &mut p.b, "", "", Duration::from_secs(20)).await?;
    let n = 120;
    send(&p.a, &p.b, "metrics", n).await?;
    let report = receive(&p.b, "metrics", n, BANK_A).await?;
    assert!(report.complete(), "{report:?}");
    // Two for a legal name B's float does not serve: rejected there, dead-lettered here.
    {
        let (_c, ch) = p.a.channel().await?;
        let spec = PublishSpec {
            run: "nobody".into(),
            from: 0,
            to: 2,
            size: 64,
            destination: "O=Nobody, L=Nowhere, C=XX".into(),
            headers: vec![],
        };
        stream::publish(&ch, &q, &spec, |_| {}).await?;
    }
    let bridge = p.a.bridge.as_ref().expect("bridge");
    let float = p.b.float.as_ref().expect("float");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (bm, fm) = loop {
        let (bm, fm) = (bridge.metrics().await?, float.metrics().await?);
        if sample(
            &bm,
            "drawbridge_bridge_dead_lettered_total",
            &[("queue", &q)],
        ) >= 2.0
            || tokio::time::Instant::now() > deadline
        {
            break (bm, fm);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let queue = [("queue", q.as_str())];
    assert_eq!(
        sample(&bm, "drawbridge_bridge_forwarded_total", &queue),
        n as f64,
        "{bm}"
    );
    assert_eq!(
        sample(&bm, "drawbridge_bridge_dead_lettered_total", &queue),
        2.0,
        "{bm}"
    );
    assert_eq!(
        sample(&bm, "drawbridge_bridge_link_up", &queue),
        1.0,
        "{bm}"
    );
    assert!(
        sample(&bm, "drawbridge_bridge_link_connects_total", &queue) >= 1.0,
        "{bm}"
    );
    for m in [&bm, &fm] {
        assert_eq!(sample(m, "drawbridge_broker_connected", &[]), 1.0, "{m}");
        assert!(
            sample(m, "drawbridge_broker_connects_total", &[]) >= 1.0,
            "{m}"
        );
    }
    let last = sample(
        &bm,
        "drawbridge_bridge_link_last_accepted_timestamp_seconds",
        &queue,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        (now - last).abs() < 300.0,
        "last accepted {last}, now {now}"
    );
    let peer = [("peer", BANK_A)];
    assert_eq!(
        sample(&fm, "drawbridge_float_accepted_total", &peer),
        n as f64,
        "{fm}"
    );
    assert_eq!(
        sample(
            &fm,
            "drawbridge_float_rejected_total",
            &[("peer", BANK_A), ("reason", "unknown_destination")]
        ),
        2.0,
        "{fm}"
    );
    // As Prometheus users expect: a `# HELP` for every metric, the build, the process.
    for m in [&bm, &fm] {
        let types: Vec<&str> = m
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(types.len() > 5, "{m}");
        for name in types {
            assert!(
                m.lines()
                    .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 12),
                "no HELP for {name}:\n{m}"
            );
        }
        let build = samples(m)
            .into_iter()
            .find(|(n, _, _)| n == "drawbridge_build_info")
            .unwrap_or_else(|| panic!("no drawbridge_build_info:\n{m}"));
        assert_eq!(build.2, 1.0, "{m}");
        assert_eq!(
            build.1.get("version").map(String::as_str),
            Some(env!("CARGO_PKG_VERSION")),
            "{m}"
        );
        let commit = build.1.get("commit").cloned().unwrap_or_default();
        assert!(
            commit == "unknown"
                || (commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "commit {commit:?}"
        );
        // CPU time is whole seconds (a counter): present, maybe 0 this early.
        assert!(
            samples(m)
                .iter()
                .any(|(n, _, _)| n == "process_cpu_seconds_total"),
            "{m}"
        );
        for process in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(sample(m, process, &[]) > 0.0, "{process}:\n{m}");
        }
    }
    Ok(())
}

/// Every metric the alert rules and the dashboard use is one the daemons export (a renamed
/// metric would otherwise leave an alert that can never fire).
#[test]
fn alert_rules_and_dashboard_use_only_exported_metrics() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = String::new();
    for dir in ["bridge/src", "float/src", "runtime/src"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    sources += &std::fs::read_to_string(&path)?;
                }
            }
        }
    }
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/drawbridge.json",
    ] {
        let text = std::fs::read_to_string(root.join(file))?;
        let mut names: Vec<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("drawbridge_") && w.len() > "drawbridge_".len())
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 5, "{file}: only {names:?}");
        for name in names {
            // A histogram is exported as `<name>_bucket`, `_count` and `_sum`.
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| sources.contains(&format!("histogram!(\"{base}\"")))
                .unwrap_or(name);
            assert!(
                sources.contains(&format!("\"{base}\"")),
                "{file} uses `{name}`, which no daemon exports"
            );
        }
    }
    Ok(())
}

/// Wait until `GET path` on `admin` answers `code`; the last body.
async fn wait_http(
    admin: std::net::SocketAddr,
    path: &str,
    code: u16,
    within: Duration,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (c, body) = drawbridge_testkit::daemon::http_get(admin, path).await?;
        if c == code {
            return Ok(body);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{path} still answers {c} after {within:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 8, items 5 and 6: readiness questions, the link canary, the age histogram, the
/// in-flight gauge and `drawbridge status`.
/// - `/readyz` is 200 as soon as the bridge serves; `/readyz?converged` waits for the
///   node's snapshot; `/readyz?links` for the link to be up and its canary answered.
/// - Probes reach the float's canary queue, never the inbox, and are not counted as
///   messages; their round trip is a histogram.
/// - Every message with a timestamp is in `drawbridge_bridge_delivery_age_seconds`.
/// - With the canary queue gone from the float's broker, `/readyz?links` turns 503 naming
///   the canary while messages keep flowing.
/// - `drawbridge status` renders the link as a table row; `--json` is the document.
#[tokio::test]
async fn readiness_canary_latency_and_status_tell_an_operator_what_works() -> Result<()> {
    let mut p = two_orgs().await?;
    p.b.start_float("").await?;
    p.a.start_bridge("canary_interval = \"1s\"").await?;
    let bridge_admin = p.a.bridge.as_ref().expect("bridge").admin();
    let q = p.a.queue_to(&p.b);
    // Serving, but the node has not said which links it wants.
    assert_eq!(
        drawbridge_testkit::daemon::http_get(bridge_admin, "/readyz")
            .await?
            .0,
        200
    );
    let (code, body) =
        drawbridge_testkit::daemon::http_get(bridge_admin, "/readyz?converged").await?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("snapshot"), "{body}");
    assert_eq!(
        drawbridge_testkit::daemon::http_get(bridge_admin, "/readyz?typo")
            .await?
            .0,
        400,
        "an unknown question is not answered as the plain one"
    );

    p.a.snapshot(vec![p.a.link_to(&p.b)]).await?;
    let body = wait_http(
        bridge_admin,
        "/readyz?converged",
        200,
        Duration::from_secs(20),
    )
    .await?;
    assert!(body.contains("1 links converged"), "{body}");
    let body = wait_http(bridge_admin, "/readyz?links", 200, Duration::from_secs(20)).await?;
    assert!(body.contains("links up"), "{body}");

    let n = 200;
    send(&p.a, &p.b, "canary", n).await?;
    let report = receive(&p.b, "canary", n, BANK_A).await?;
    assert!(report.complete(), "{report:?}");
    assert_eq!(
        report.unexpected, 0,
        "a probe reached the inbox: {report:?}"
    );

    let bridge = p.a.bridge.as_ref().expect("bridge");
    let float = p.b.float.as_ref().expect("float");
    let queue = [("queue", q.as_str())];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (bm, fm) = loop {
        let (bm, fm) = (bridge.metrics().await?, float.metrics().await?);
        if sample(
            &bm,
            "drawbridge_bridge_link_canary_rtt_seconds_count",
            &queue,
        ) >= 2.0
            || tokio::time::Instant::now() > deadline
        {
            break (bm, fm);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        sample(&bm, "drawbridge_bridge_delivery_age_seconds_count", &queue),
        n as f64,
        "{bm}"
    );
    // Sent just now: every age is within the histogram's lower buckets.
    assert_eq!(
        sample(
            &bm,
            "drawbridge_bridge_delivery_age_seconds_bucket",
            &[("queue", q.as_str()), ("le", "60")]
        ),
        n as f64,
        "{bm}"
    );
    assert!(
        sample(
            &bm,
            "drawbridge_bridge_link_canary_rtt_seconds_count",
            &queue
        ) >= 2.0,
        "{bm}"
    );
    assert_eq!(
        sample(&bm, "drawbridge_bridge_link_in_flight", &queue),
        0.0,
        "{bm}"
    );
    let probes = sample(
        &fm,
        "drawbridge_float_canary_probes_total",
        &[("peer", BANK_A)],
    );
    assert!(probes >= 2.0, "{fm}");
    assert_eq!(
        sample(&fm, "drawbridge_float_accepted_total", &[("peer", BANK_A)]),
        n as f64,
        "probes are not counted as messages: {fm}"
    );
    // The probes are in the float's canary queue (transient, bounded).
    let (_c, ch) = p.b.channel().await?;
    let canary = ch
        .queue_declare(
            "drawbridge.canary".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    assert!(canary.message_count() >= 1, "no probe in the canary queue");

    // `drawbridge status`: the link as a row of the table, and the JSON.
    let cli = drawbridge_testkit::daemon::bin_dir().join("drawbridge");
    let admin = bridge_admin.to_string();
    let table = tokio::process::Command::new(&cli)
        .args(["status", "--admin", &admin])
        .output()
        .await?;
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8(table.stdout)?;
    assert!(table.contains("active (ready, links converged)"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(q.as_str()))
        .unwrap_or_else(|| panic!("no row for {q}:\n{table}"));
    for cell in ["up", BANK_B, &n.to_string(), " ms"] {
        assert!(row.contains(cell), "{cell} missing from {row}");
    }
    let json = tokio::process::Command::new(&cli)
        .args(["status", "--admin", &admin, "--json"])
        .output()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(v["links"][0]["queue"], q.as_str());
    assert!(v["links"][0]["canary_rtt_ms"].as_f64().is_some(), "{v}");

    // The float's broker loses the canary queue: probes come back unroutable, the link's
    // canary fails and `/readyz?links` says so, while messages keep flowing.
    ch.queue_delete("drawbridge.canary".into(), Default::default())
        .await?;
    let body = wait_http(bridge_admin, "/readyz?links", 503, Duration::from_secs(20)).await?;
    assert!(body.contains(&q) && body.contains("canary"), "{body}");
    assert_eq!(
        drawbridge_testkit::daemon::http_get(bridge_admin, "/readyz?converged")
            .await?
            .0,
        200,
        "a failing canary does not undo convergence"
    );
    send(&p.a, &p.b, "after", 20).await?;
    let report = receive(&p.b, "after", 20, BANK_A).await?;
    assert!(report.complete(), "{report:?}");
    assert!(
        bridge.log_contains("link canary failed"),
        "{}",
        bridge.log_tail(30)
    );
    Ok(())
}

/// A bridge with the canary on and a float that does not take probes (an older float, or
/// `canary_queue = ""`): the link forwards as usual, the bridge says once why it has no
/// canary, and `/readyz?links` names it instead of pretending the path was proven.
#[tokio::test]
async fn a_float_without_canary_costs_the_link_nothing() -> Result<()> {
    let mut p = two_orgs().await?;
    p.b.start_float("canary_queue = \"\"").await?;
    p.a.start_bridge("canary_interval = \"1s\"").await?;
    let bridge_admin = p.a.bridge.as_ref().expect("bridge").admin();
    let q = p.a.queue_to(&p.b);
    p.a.snapshot(vec![p.a.link_to(&p.b)]).await?;
    p.a.wait_link_state(&q, "up", Duration::from_secs(20))
        .await?;
    let n = 50;
    send(&p.a, &p.b, "nocanary", n).await?;
    let report = receive(&p.b, "nocanary", n, BANK_A).await?;
    assert!(report.complete(), "{report:?}");
    let body = wait_http(bridge_admin, "/readyz?links", 503, Duration::from_secs(20)).await?;
    assert!(
        body.contains("canary") && body.contains("refused"),
        "{body}"
    );
    let bridge = p.a.bridge.as_ref().expect("bridge");
    let lines = std::fs::read_to_string(bridge.log_path())?
        .lines()
        .filter(|l| l.contains("link canary unavailable"))
        .count();
    assert_eq!(lines, 1, "{}", bridge.log_tail(20));
    Ok(())
}
