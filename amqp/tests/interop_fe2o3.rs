//! Interoperability with a second implementation, fe2o3-amqp, on each end (plain TCP on
//! loopback: TLS is the driver's stream and changes nothing on the wire of AMQP).

use std::time::Duration;

use drawbridge_amqp::{
    connection::{Config, Connection, Event},
    driver::Driver,
    message::write_data_message,
    performatives::Outcome,
};
use fe2o3_amqp::{
    acceptor::{
        sasl_acceptor::SaslServerFrame, ConnectionAcceptor, LinkAcceptor, LinkEndpoint,
        SaslAcceptor, SessionAcceptor,
    },
    types::{
        messaging::{Body, Message},
        primitives::{Array, Binary, Symbol, Value},
        sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
    },
    Connection as FeConnection, Sender, Session,
};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
struct AnyMechanism;

impl SaslAcceptor for AnyMechanism {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("EXTERNAL"), Symbol::from("ANONYMOUS")])
    }
    fn on_init(&mut self, _init: SaslInit) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }
    fn on_response(&mut self, _r: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

/// Our client (the bridge's role) sends to a fe2o3 server that accepts every message and
/// rejects one: single- and multi-frame deliveries, credit from fe2o3's flow, outcomes.
#[tokio::test]
async fn our_sender_to_a_fe2o3_receiver() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let acceptor = ConnectionAcceptor::builder()
            .container_id("fe2o3-float")
            .max_frame_size(4096_u32)
            .sasl_acceptor(AnyMechanism)
            .build();
        let mut conn = acceptor.accept(tcp).await.expect("fe2o3 accepts our open");
        let mut session = SessionAcceptor::new().accept(&mut conn).await.unwrap();
        let link = LinkAcceptor::new().accept(&mut session).await.unwrap();
        let LinkEndpoint::Receiver(mut receiver) = link else {
            panic!("expected our sender")
        };
        let mut bodies = Vec::new();
        for _ in 0..50 {
            let d = receiver
                .recv::<Body<Value>>()
                .await
                .expect("fe2o3 decodes our transfer");
            let body = match d.body() {
                Body::Data(batch) => batch.iter().flat_map(|b| b.0.to_vec()).collect::<Vec<u8>>(),
                other => panic!("unexpected body {other:?}"),
            };
            if body.first() == Some(&13) {
                receiver
                    .reject(
                        &d,
                        fe2o3_amqp::types::definitions::Error::new(
                            fe2o3_amqp::types::definitions::AmqpError::NotAllowed,
                            Some("thirteen".to_string()),
                            None,
                        ),
                    )
                    .await
                    .unwrap();
            } else {
                receiver.accept(&d).await.unwrap();
            }
            bodies.push(body.len());
        }
        // Our close ends it.
        let _ = tokio::time::timeout(Duration::from_secs(5), receiver.close()).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), session.end()).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
        bodies
    });

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut d = Driver::new(tcp, Connection::client(Config::default()));
    let s = d.conn().begin().unwrap();
    let link = d.conn().attach_sender(s, "to-fe2o3", "inbox").unwrap();
    let mut sent = 0usize;
    let mut settled = Vec::new();
    let mut buf = Vec::new();
    let mut ready = false;
    let mut ids = Vec::new();
    while settled.len() < 50 {
        while ready && sent < 50 {
            buf.clear();
            let size = if sent == 7 { 10_000 } else { 200 };
            write_data_message(
                &mut buf,
                &(sent as u64).to_be_bytes(),
                &vec![sent as u8; size],
            );
            match d.conn().send(link, &(sent as u32).to_be_bytes(), &buf) {
                Ok(id) => {
                    ids.push(id);
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        let e = tokio::time::timeout(Duration::from_secs(10), d.next_event())
            .await
            .expect("no stall")
            .unwrap();
        match e {
            Event::LinkReady { .. } | Event::Credit { .. } => ready = true,
            Event::Settled {
                first,
                last,
                outcome,
                ..
            } => {
                for id in first..=last {
                    settled.push((id, outcome.clone()));
                }
            }
            Event::Closed { error, .. } => panic!("closed: {error:?}"),
            _ => {}
        }
    }
    let rejected: Vec<u32> = settled
        .iter()
        .filter(|(_, o)| matches!(o, Some(Outcome::Rejected(Some(e))) if e.description.as_deref() == Some("thirteen")))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(rejected, vec![ids[13]]);
    assert_eq!(
        settled
            .iter()
            .filter(|(_, o)| *o == Some(Outcome::Accepted))
            .count(),
        49
    );
    d.conn().close(None);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(d.next_event().await, Ok(Event::Closed { .. }) | Err(_)) {}
    })
    .await;
    let sizes = server.await.unwrap();
    assert_eq!(sizes.len(), 50);
    assert!(
        sizes.contains(&10_000),
        "the multi-frame delivery arrived whole: {sizes:?}"
    );
}

/// A fe2o3 client sends to our server (the float's role): SASL ANONYMOUS, its attach, our
/// credit, its transfers, our ranged dispositions as the outcomes of its sends.
#[tokio::test]
async fn a_fe2o3_sender_to_our_receiver() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut d = Driver::new(tcp, Connection::server(Config::default()));
        let mut got = Vec::new();
        loop {
            match d.next_event().await {
                Ok(Event::AttachRequested { link, .. }) => {
                    d.conn().accept_link(link, 20, None).unwrap()
                }
                Ok(Event::Delivery {
                    link, id, payload, ..
                }) => {
                    got.push(payload.len());
                    d.conn().settle(link, id, Outcome::Accepted).unwrap();
                }
                Ok(Event::Closed { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = d.finish().await;
        got
    });

    let mut conn = FeConnection::builder()
        .container_id("fe2o3-bridge")
        .max_frame_size(4096_u32)
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
        .open(format!("amqp://127.0.0.1:{}", addr.port()).as_str())
        .await
        .expect("our server opens with fe2o3");
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "from-fe2o3", "inbox")
        .await
        .unwrap();
    for i in 0..60u32 {
        let size = if i == 5 { 9_000 } else { 100 };
        let msg = Message::builder()
            .data(Binary::from(vec![i as u8; size]))
            .build();
        let outcome = tokio::time::timeout(Duration::from_secs(10), sender.send(msg))
            .await
            .expect("no stall")
            .expect("accepted");
        assert!(outcome.is_accepted(), "{outcome:?}");
    }
    sender.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
    let got = server.await.unwrap();
    assert_eq!(got.len(), 60);
}
