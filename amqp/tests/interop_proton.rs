//! Interoperability with Qpid Proton (Debian's python3-qpid-proton, run with
//! `/usr/bin/python3`; `scripts/install-deps.sh` installs it): a Proton client sending to our
//! server (the float's role), and a Proton server receiving from our client (the bridge's).

use std::{process::Stdio, time::Duration};

use drawbridge_amqp::{
    connection::{Config, Connection, Event},
    driver::Driver,
    message::write_data_message,
    performatives::Outcome,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{TcpListener, TcpStream},
    process::Command,
};

fn script(name: &str) -> String {
    format!("{}/tests/proton/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn proton_available() {
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import proton"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3-qpid-proton is missing: run scripts/install-deps.sh"
    );
}

#[tokio::test]
async fn a_proton_client_sends_to_our_server() {
    proton_available();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let config = Config {
            // Proton's 10 s idle timeout asks for heartbeats every 5 s: allowed.
            max_frame_size: 4096,
            ..Config::default()
        };
        let mut d = Driver::new(tcp, Connection::server(config));
        let mut sizes = Vec::new();
        loop {
            match d.next_event().await {
                Ok(Event::AttachRequested { link, .. }) => {
                    d.conn().accept_link(link, 7, None).unwrap()
                }
                Ok(Event::Delivery {
                    link, id, payload, ..
                }) => {
                    sizes.push(payload.len());
                    d.conn().settle(link, id, Outcome::Accepted).unwrap();
                }
                Ok(Event::Closed { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = d.finish().await;
        sizes
    });
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("/usr/bin/python3")
            .args([
                script("send.py"),
                port.to_string(),
                "40".into(),
                "6000".into(),
            ])
            .output(),
    )
    .await
    .expect("proton finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "send.py: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("ACCEPTED").count(), 40, "{stdout}");
    assert!(stdout.contains("DONE"));
    let sizes = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sizes.len(), 40);
    // Each 6,000-byte body crossed 4 KiB frames: assembled whole.
    assert!(sizes.iter().all(|s| *s > 6000), "{sizes:?}");
}

#[tokio::test]
async fn our_client_sends_to_a_proton_server() {
    proton_available();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new("/usr/bin/python3")
        .args([
            script("receive.py"),
            "30".into(),
            "10".into(),
            port.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("proton listens")
        .unwrap();
    assert_eq!(first.as_deref(), Some("LISTENING"));

    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let config = Config {
        sasl_external: false,
        max_frame_size: 4096,
        idle_timeout: Duration::from_secs(4),
        ..Config::default()
    };
    let mut d = Driver::new(tcp, Connection::client(config));
    let s = d.conn().begin().unwrap();
    let link = d.conn().attach_sender(s, "to-proton", "inbox").unwrap();
    let (mut sent, mut ids, mut outcomes) = (0usize, Vec::new(), Vec::new());
    let mut buf = Vec::new();
    while outcomes.len() < 30 {
        while sent < 30 {
            buf.clear();
            let body: Vec<u8> = if sent == 3 {
                b"reject me".to_vec()
            } else {
                vec![b'x'; if sent == 10 { 20_000 } else { 300 }]
            };
            write_data_message(&mut buf, &(sent as u64).to_be_bytes(), &body);
            match d.conn().send(link, &(sent as u32).to_be_bytes(), &buf) {
                Ok(id) => {
                    ids.push(id);
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        match tokio::time::timeout(Duration::from_secs(20), d.next_event())
            .await
            .expect("no stall")
            .unwrap()
        {
            Event::Settled {
                first,
                last,
                outcome,
                ..
            } => {
                for id in first..=last {
                    outcomes.push((id, outcome.clone()));
                }
            }
            Event::Closed { error, .. } => panic!("closed: {error:?}"),
            _ => {}
        }
    }
    let rejected: Vec<u32> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Some(Outcome::Rejected(_))))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(rejected, vec![ids[3]]);
    // Idle for longer than Proton's and our heartbeat periods: the connection stays up.
    let idle = tokio::time::timeout(Duration::from_secs(6), d.next_event()).await;
    assert!(
        idle.is_err(),
        "nothing happens on an idle connection: {idle:?}"
    );
    d.conn().close(None);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(d.next_event().await, Ok(Event::Closed { .. }) | Err(_)) {}
    })
    .await;
    let mut got = 0;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await
    {
        if line.starts_with("GOT") {
            got += 1;
        }
    }
    assert_eq!(got, 30);
    let _ = child.kill().await;
}
