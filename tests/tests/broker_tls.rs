//! TLS to RabbitMQ: the daemons talk to a private RabbitMQ node's TLS listener (amqps://),
//! with a password read from a file or with a client certificate and SASL EXTERNAL; a wrong
//! CA is refused with a clear reason and no password in the log; the CLI never prints a
//! password in a connect error.
//!
//! Real RabbitMQ (a private node with `listeners.ssl.default`), real TLS (rustls client,
//! Erlang `ssl` server), real daemon processes.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use drawbridge_certs::devpki;
use drawbridge_runtime::{
    broker::{self, BrokerConfig},
    config::ConfigReader,
};
use drawbridge_testkit::{
    daemon::{bin_dir, free_port, Daemon, Kind},
    fixtures::{links_up_both_ways, receive, send, two_orgs_on},
    rabbit::{self, BrokerPki, NodeOptions, RabbitNode},
    world::{self, Org},
    BANK_A, BANK_B,
};

/// One RabbitMQ node per test process with a plain listener (the test acts as the nodes
/// through it) and a TLS listener (the daemons use it). Client certificates are optional at
/// the listener, verified when presented.
struct TlsBroker {
    node: RabbitNode,
    pki: BrokerPki,
    /// Where per-test secret files go (removed with the node's leftovers).
    dir: PathBuf,
}

async fn tls_broker() -> &'static TlsBroker {
    static SHARED: OnceLock<std::result::Result<TlsBroker, String>> = OnceLock::new();
    let r = match SHARED.get() {
        Some(r) => r,
        None => tokio::task::spawn_blocking(|| {
            SHARED.get_or_init(|| {
                std::thread::spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    rt.block_on(boot_tls_broker()).map_err(|e| format!("{e:#}"))
                })
                .join()
                .unwrap_or_else(|_| Err("TLS broker boot thread panicked".into()))
            })
        })
        .await
        .expect("tls_broker boot task"),
    };
    match r {
        Ok(b) => b,
        Err(e) => panic!("RabbitMQ node with a TLS listener failed to boot: {e}"),
    }
}

async fn boot_tls_broker() -> Result<TlsBroker> {
    // `dbt-` + owner.pid: the testkit removes it once this process is gone.
    let dir = rabbit::base_dir().join(format!("dbt-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
    let pki = BrokerPki::generate(&dir.join("pki"))?;
    let node = RabbitNode::start(NodeOptions {
        tls: Some(pki.listener(false)),
        ..Default::default()
    })
    .await?;
    Ok(TlsBroker { node, pki, dir })
}

fn random_secret() -> String {
    format!("pw-{}", uuid::Uuid::new_v4().simple())
}

/// A password file (mode 0600) holding `password` and a trailing newline, as `echo` writes.
fn password_file(dir: &Path, password: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("broker-{}.password", uuid::Uuid::new_v4().simple()));
    rabbit::write_private(&path, &format!("{password}\n"))?;
    Ok(path)
}

fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// The runtime's broker session connects over amqps with a password from a file, and the
/// broker sees a TLS connection from that user.
#[tokio::test]
async fn the_broker_session_connects_over_amqps_with_a_password_file() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    let b = tls_broker().await;
    let vhost = b.node.fresh_vhost().await?;
    let user = format!("u-{}", uuid::Uuid::new_v4().simple());
    let password = random_secret();
    b.node.add_user(&user, &password, &vhost).await?;
    let pw_file = password_file(&b.dir, &password)?;
    let toml = format!(
        "[broker]\nuris = [{uri:?}]\ntls_ca = {ca}\npassword_file = {pw}\n",
        uri = b.node.amqps_uri(&user, &vhost),
        ca = q(&b.pki.ca_cert),
        pw = q(&pw_file),
    );
    let mut r = ConfigReader::from_toml(&toml)?;
    let cfg = BrokerConfig::read(&mut r, "broker", Default::default());
    r.finish()?;
    assert!(cfg.tls.is_some());
    let name = format!("tls-session-{}", uuid::Uuid::new_v4().simple());
    let (conn, _) = broker::connect_any(&cfg, 0, &name)
        .await
        .map_err(anyhow::Error::msg)?;
    let ch = conn.create_channel().await?;
    world::declare_queue(&ch, "over-tls").await?;
    let rows = b
        .node
        .connections(&["client_properties", "ssl", "user", "ssl_protocol"])
        .await?;
    let row = rows
        .iter()
        .find(|r| r[0].contains(&name))
        .with_context(|| format!("connection {name} not listed: {rows:?}"))?;
    assert_eq!(row[1], "true", "the broker sees a TLS connection: {row:?}");
    assert_eq!(row[2], user, "{row:?}");
    assert!(row[3].starts_with("tlsv1."), "{row:?}");
    conn.close(200, "bye".into()).await?;
    Ok(())
}

/// Bridge and float of both organisations reach their broker only over amqps: A's daemons
/// log in with a password from a file, B's with a client certificate (SASL EXTERNAL).
/// Messages flow both ways, the broker lists every daemon connection as TLS with the
/// expected login and mechanism, and the password appears in no daemon log.
#[tokio::test]
async fn bridge_and_float_over_amqps_with_password_file_and_sasl_external() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    let b = tls_broker().await;
    let w = two_orgs_on(&b.node, BANK_A, BANK_B).await?;
    let (va, vb, mut a, mut bb) = (w.va, w.vb, w.a, w.b);
    let dir = &w.dir;

    // A: password from a file.
    let user_a = format!("a-{}", uuid::Uuid::new_v4().simple());
    let password_a = random_secret();
    b.node.add_user(&user_a, &password_a, &va).await?;
    let pw_a = password_file(&dir.path().join("secrets"), &password_a)?;
    a.daemon_broker = Some(format!(
        "uris = [{uri:?}]\ntls_ca = {ca}\npassword_file = {pw}\n",
        uri = b.node.amqps_uri(&user_a, &va),
        ca = q(&b.pki.ca_cert),
        pw = q(&pw_a),
    ));

    // B: client certificate, SASL EXTERNAL (login = the certificate's common name). The
    // user's password is never used.
    let user_b = format!("b-{}", uuid::Uuid::new_v4().simple());
    b.node.add_user(&user_b, &random_secret(), &vb).await?;
    let (cert_b, key_b) = b.pki.client_cert(&user_b)?;
    bb.daemon_broker = Some(format!(
        "uris = [{uri:?}]\ntls_ca = {ca}\ntls_cert = {cert}\ntls_key = {key}\nauth = \"external\"\n",
        uri = b.node.amqps_uri("", &vb),
        ca = q(&b.pki.ca_cert),
        cert = q(&cert_b),
        key = q(&key_b),
    ));

    links_up_both_ways(&mut a, &mut bb, Duration::from_secs(30)).await?;

    let n = 300;
    let (ra, rb) = tokio::join!(
        async {
            send(&a, &bb, "tls-ab", n).await?;
            receive(&bb, "tls-ab", n, BANK_A).await
        },
        async {
            send(&bb, &a, "tls-ba", n).await?;
            receive(&a, "tls-ba", n, BANK_B).await
        }
    );
    let (ra, rb) = (ra?, rb?);
    assert!(ra.complete(), "A→B: {ra:?}");
    assert!(rb.complete(), "B→A: {rb:?}");
    assert_eq!((ra.duplicates, rb.duplicates), (0, 0));

    // Every daemon connection is TLS, as the expected user, with the expected mechanism.
    let rows = b
        .node
        .connections(&[
            "client_properties",
            "ssl",
            "user",
            "auth_mechanism",
            "vhost",
        ])
        .await?;
    // The connection name a daemon gives lapin ("drawbridge-bridge <id>", "drawbridge-float").
    let daemon_name = |r: &Vec<String>| -> Option<&'static str> {
        ["drawbridge-bridge", "drawbridge-float"]
            .into_iter()
            .find(|n| r[0].contains(n))
    };
    let daemon_rows = |vhost: &str| -> Vec<(&'static str, Vec<String>)> {
        rows.iter()
            .filter(|r| r[4] == vhost)
            .filter_map(|r| daemon_name(r).map(|n| (n, r.clone())))
            .collect()
    };
    for (org, vhost, user, mechanism) in [
        ("A", &va, &user_a, "PLAIN"),
        ("B", &vb, &user_b, "EXTERNAL"),
    ] {
        let mine = daemon_rows(vhost);
        let names: Vec<&str> = mine.iter().map(|(n, _)| *n).collect();
        assert!(
            names.contains(&"drawbridge-bridge") && names.contains(&"drawbridge-float"),
            "{org}: bridge and float connections expected, got {rows:?}"
        );
        for (_, r) in &mine {
            assert_eq!(r[1], "true", "{org}: not TLS: {r:?}");
            assert_eq!(&r[2], user, "{org}: {r:?}");
            assert_eq!(r[3], mechanism, "{org}: {r:?}");
        }
    }
    for d in [&a.float, &a.bridge, &bb.float, &bb.bridge] {
        let d = d.as_ref().expect("started");
        let log = std::fs::read_to_string(d.log_path())?;
        assert!(
            !log.contains(&password_a),
            "password in {}",
            d.log_path().display()
        );
    }
    Ok(())
}

/// A daemon whose `tls_ca` did not issue the broker's certificate refuses the broker: it
/// never becomes ready, logs why (the certificate and the key to check), and the log holds
/// the URI with its password hidden, never the password.
#[tokio::test]
async fn a_wrong_ca_is_refused_with_a_clear_reason_and_no_password() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    let b = tls_broker().await;
    let dir = tempfile::tempdir()?;
    let net = devpki::generate_network(&dir.path().join("pki"), &[BANK_A.parse()?])?;
    let other_ca = BrokerPki::generate(&dir.path().join("other-ca"))?;
    let vhost = b.node.fresh_vhost().await?;
    let user = format!("w-{}", uuid::Uuid::new_v4().simple());
    let password = random_secret();
    b.node.add_user(&user, &password, &vhost).await?;
    let mut org = Org::new(
        net.nodes[0].clone(),
        vec![b.node.amqp_uri(&vhost)],
        dir.path(),
    );
    // The password in the URI this time, so that redaction is what keeps it out of the log.
    org.daemon_broker = Some(format!(
        "uris = [{uri:?}]\ntls_ca = {ca}\nreconnect_max = \"1s\"\n",
        uri = b.node.amqps_uri(&format!("{user}:{password}"), &vhost),
        ca = q(&other_ca.ca_cert),
    ));
    let cfg = org.float_config("");
    let float = Daemon::start(Kind::Float, &org.dir, "float", &cfg, org.float_admin).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !float.log_contains("broker unreachable") {
        if tokio::time::Instant::now() > deadline {
            bail!("no 'broker unreachable' line; log:\n{}", float.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = std::fs::read_to_string(float.log_path())?;
    let line = log
        .lines()
        .find(|l| l.contains("broker unreachable"))
        .expect("checked above");
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(line.contains("broker.tls_ca"), "{line}");
    assert!(line.contains(&format!("{user}:***@127.0.0.1")), "{line}");
    assert!(!log.contains(&password), "password in the log:\n{log}");
    assert_ne!(
        drawbridge_testkit::daemon::http_get(org.float_admin, "/readyz")
            .await?
            .0,
        200,
        "a float without its broker is not ready"
    );
    // The broker never saw a login from this user.
    let rows = b.node.connections(&["user"]).await?;
    assert!(!rows.iter().any(|r| r[0] == user), "{rows:?}");
    Ok(())
}

/// Secret files readable by others stop a daemon at start-up with the file, its mode and
/// the fix; `allow_group_readable_key` accepts a group-readable one.
#[tokio::test]
async fn a_world_readable_password_file_stops_the_daemon() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    drawbridge_certs::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let net = devpki::generate_network(&dir.path().join("pki"), &[BANK_A.parse()?])?;
    let pw = password_file(&dir.path().join("secrets"), "secret")?;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644))?;
    let mut org = Org::new(
        net.nodes[0].clone(),
        vec!["amqp://127.0.0.1:1/%2f".into()],
        dir.path(),
    );
    org.daemon_broker = Some(format!(
        "uris = [\"amqp://node-a@127.0.0.1:{}/%2f\"]\npassword_file = {}\n",
        free_port(),
        q(&pw)
    ));
    let cfg_path = dir.path().join("float.toml");
    std::fs::write(&cfg_path, org.float_config(""))?;
    let out = tokio::process::Command::new(bin_dir().join("drawbridge-float"))
        .arg("--config")
        .arg(&cfg_path)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("broker.password_file"), "{stderr}");
    assert!(stderr.contains("mode 0644"), "{stderr}");
    assert!(
        stderr.contains(&format!("chmod 600 {}", pw.display())),
        "{stderr}"
    );

    // Group-readable: refused by default, accepted with the override.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640))?;
    let out = tokio::process::Command::new(bin_dir().join("drawbridge-float"))
        .arg("--config")
        .arg(&cfg_path)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("allow_group_readable_key"), "{stderr}");
    let mut float = Daemon::start(
        Kind::Float,
        &dir.path().join("ok"),
        "float",
        &org.float_config("allow_group_readable_key = true"),
        org.float_admin,
    )
    .await?;
    float.terminate(Duration::from_secs(10)).await?;
    Ok(())
}

/// The operator CLI's connect errors show the broker URI with its password hidden.
#[tokio::test]
async fn the_cli_hides_the_password_in_connect_errors() -> Result<()> {
    let secret = random_secret();
    let uri = format!("amqp://node-a:{secret}@127.0.0.1:{}/%2f", free_port());
    let out = tokio::process::Command::new(bin_dir().join("drawbridge"))
        .args([
            "send",
            "--broker",
            &uri,
            "--queue",
            "q",
            "--destination",
            BANK_B,
            "--count",
            "1",
        ])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("node-a:***@127.0.0.1"), "{stderr}");
    assert!(!stderr.contains(&secret), "{stderr}");

    // `--help` does not show the value of DRAWBRIDGE_BROKER either.
    let out = tokio::process::Command::new(bin_dir().join("drawbridge"))
        .args(["send", "--help"])
        .env("DRAWBRIDGE_BROKER", &uri)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("DRAWBRIDGE_BROKER"), "{stdout}");
    assert!(!stdout.contains(&secret), "{stdout}");
    Ok(())
}

/// Run the operator CLI; returns whether it succeeded, and stdout + stderr.
async fn cli(args: &[&str]) -> Result<(bool, String)> {
    let out = tokio::process::Command::new(bin_dir().join("drawbridge"))
        .args(args)
        .env_remove("DRAWBRIDGE_BROKER")
        .output()
        .await
        .context("running drawbridge (build it: cargo build -p drawbridge-cli)")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The CLI reaches a broker's TLS listener with `--broker-ca`: `send`, `receive` and `control`
/// work with a password, and `send` with a client certificate (SASL EXTERNAL). Without
/// `--broker-ca`, or with the wrong CA, it fails saying what to give, without the password.
#[tokio::test]
async fn the_cli_sends_receives_and_controls_over_amqps_with_broker_ca() -> Result<()> {
    let b = tls_broker().await;
    let vhost = b.node.fresh_vhost().await?;
    let user = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let password = random_secret();
    b.node.add_user(&user, &password, &vhost).await?;
    let uri = b.node.amqps_uri(&format!("{user}:{password}"), &vhost);
    let ca = b.pki.ca_cert.display().to_string();
    let queue = "drawbridge.peers.over-tls";
    let send = |broker: String, extra: Vec<String>, run: &'static str| async move {
        let mut args: Vec<String> = [
            "send",
            "--broker",
            &broker,
            "--queue",
            queue,
            "--destination",
            BANK_B,
            "--count",
            "20",
            "--size",
            "64",
            "--run",
            run,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args).await
    };

    let (ok, out) = send(uri.clone(), vec!["--broker-ca".into(), ca.clone()], "tls").await?;
    assert!(ok, "{out}");
    let (ok, out) = cli(&[
        "receive",
        "--broker",
        &uri,
        "--broker-ca",
        &ca,
        "--queue",
        queue,
        "--expect",
        "20",
        "--run",
        "tls",
        "--idle",
        "10s",
    ])
    .await?;
    assert!(ok && out.contains("received=20 lost=0"), "{out}");
    let (ok, out) = cli(&[
        "control",
        "--broker",
        &uri,
        "--broker-ca",
        &ca,
        "--node",
        BANK_A,
        "snapshot",
    ])
    .await?;
    assert!(ok && out.contains(&format!("user_id {user}")), "{out}");
    assert!(!out.contains(&password), "{out}");

    // SASL EXTERNAL: no password in the URI, the login comes from the certificate.
    let (cert, key) = b.pki.client_cert(&user)?;
    let (ok, out) = send(
        b.node.amqps_uri(&user, &vhost),
        vec![
            "--broker-ca".into(),
            ca.clone(),
            "--broker-cert".into(),
            cert.display().to_string(),
            "--broker-key".into(),
            key.display().to_string(),
        ],
        "external",
    )
    .await?;
    assert!(ok, "{out}");

    // Without --broker-ca: refused before connecting, naming the flag.
    let (ok, out) = send(uri.clone(), vec![], "no-ca").await?;
    assert!(!ok, "{out}");
    assert!(out.contains("--broker-ca"), "{out}");
    assert!(!out.contains(&password), "{out}");

    // With another CA: the handshake fails, and the message says what to check.
    let other = BrokerPki::generate(
        &b.dir
            .join(format!("other-{}", uuid::Uuid::new_v4().simple())),
    )?;
    let (ok, out) = send(
        uri.clone(),
        vec!["--broker-ca".into(), other.ca_cert.display().to_string()],
        "wrong-ca",
    )
    .await?;
    assert!(!ok, "{out}");
    assert!(
        out.contains("invalid peer certificate") && out.contains("--broker-ca"),
        "{out}"
    );
    assert!(out.contains(&format!("{user}:***@127.0.0.1")), "{out}");
    assert!(!out.contains(&password), "{out}");

    // A CA with an amqp:// URI would not be used: refused too.
    let (ok, out) = send(
        b.node.amqp_uri(&vhost),
        vec!["--broker-ca".into(), ca.clone()],
        "plain",
    )
    .await?;
    assert!(!ok && out.contains("would not use TLS"), "{out}");
    Ok(())
}
