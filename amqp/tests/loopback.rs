//! Both ends of the engine over an in-memory stream: SASL EXTERNAL, open, begin, attach,
//! credit, pipelined transfers (single- and multi-frame), ranged dispositions, detach, close.

use std::time::Duration;

use drawbridge_amqp::{
    connection::{Config, Connection, Event},
    driver::Driver,
    message::write_data_message,
    performatives::{Outcome, Role},
};

async fn server(io: tokio::io::DuplexStream, credit: u32) -> Vec<usize> {
    let mut d = Driver::new(io, Connection::server(Config::default()));
    let mut sizes = Vec::new();
    loop {
        match d.next_event().await.expect("server io") {
            Event::AttachRequested { link, role, .. } => {
                assert_eq!(role, Role::Sender);
                d.conn().accept_link(link, credit, None).unwrap();
            }
            Event::Delivery {
                link, id, payload, ..
            } => {
                sizes.push(payload.len());
                let outcome = if payload.len() == 7 {
                    Outcome::Rejected(None)
                } else {
                    Outcome::Accepted
                };
                d.conn().settle(link, id, outcome).unwrap();
            }
            Event::Closed { .. } => {
                d.finish().await.ok();
                return sizes;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_sender_pipelines_within_credit_and_sees_every_outcome() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = tokio::spawn(server(b, 10));
    let config = Config {
        max_frame_size: 4096,
        ..Config::default()
    };
    let mut d = Driver::new(a, Connection::client(config));
    let s = d.conn().begin().unwrap();
    let link = d.conn().attach_sender(s, "link-1", "inbox").unwrap();
    let bodies: Vec<Vec<u8>> = (0..100)
        .map(|i| vec![i as u8; if i == 50 { 20_000 } else { 100 + i }])
        .collect();
    let mut sent = 0;
    let mut accepted = 0u32;
    let mut rejected = 0u32;
    let mut ready = false;
    let mut buf = Vec::new();
    while accepted + rejected < 101 {
        if ready {
            while sent < 101 {
                buf.clear();
                if sent == 100 {
                    buf.extend_from_slice(b"7 bytes");
                } else {
                    write_data_message(&mut buf, &(sent as u64).to_be_bytes(), &bodies[sent]);
                }
                match d.conn().send(link, &(sent as u32).to_be_bytes(), &buf) {
                    Ok(_) => sent += 1,
                    Err(_) => break,
                }
            }
        }
        let e = tokio::time::timeout(Duration::from_secs(10), d.next_event())
            .await
            .expect("no stall")
            .expect("client io");
        match e {
            Event::LinkReady { .. } => ready = true,
            Event::Settled {
                first,
                last,
                outcome,
                ..
            } => {
                let n = last - first + 1;
                match outcome {
                    Some(Outcome::Accepted) => accepted += n,
                    Some(Outcome::Rejected(_)) => rejected += n,
                    other => panic!("unexpected outcome {other:?}"),
                }
            }
            _ => {}
        }
    }
    assert_eq!((accepted, rejected), (100, 1));
    d.conn().close(None);
    loop {
        if let Event::Closed { .. } = d.next_event().await.unwrap() {
            break;
        }
    }
    d.finish().await.ok();
    let sizes = srv.await.unwrap();
    assert_eq!(sizes.len(), 101);
    assert!(
        sizes.iter().any(|s| *s > 20_000),
        "the multi-frame delivery arrived whole"
    );
}
