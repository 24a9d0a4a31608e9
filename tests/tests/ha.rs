//! Hot-warm bridges: two bridges of one organisation with the same configuration elect one
//! active through the broker (an exclusive lock queue), the other stands by with the wanted
//! link set warm. Real daemons, real RabbitMQ, real TLS.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use drawbridge_certs::devpki;
use drawbridge_control_protocol::{
    proto, ControlCommand, CreateLink, Notification, PeerLink, SequencedCommand, Snapshot,
    PROTOCOL_VERSION,
};
use drawbridge_runtime::broker::Secret;
use drawbridge_testkit::{
    daemon::{bin_dir, free_port, Daemon, Kind},
    proxy::{FaultProxy, ProxyMode},
    rabbit::{shared_node, write_private, NodeOptions, RabbitCluster, RabbitNode},
    stream::{self, PublishSpec, Tally},
    world::{self, Org, SnapshotResponder, INBOX},
    BANK_A, BANK_B,
};
use futures::StreamExt;
use prost::Message as _;
use tokio::time::Instant;

struct Pair {
    /// The sending organisation: two bridges, no float.
    a: Org,
    /// The receiving organisation: a float.
    b: Org,
    va: String,
    token_file: PathBuf,
    dir: tempfile::TempDir,
}

async fn pair_on(uris_a: Vec<String>, va: String) -> Result<Pair> {
    drawbridge_certs::install_crypto_provider();
    let node = shared_node().await;
    let dir = tempfile::tempdir()?;
    let names = [BANK_A.parse()?, BANK_B.parse()?];
    let net = devpki::generate_network(&dir.path().join("pki"), &names)?;
    let vb = node.fresh_vhost().await?;
    let a = Org::new(net.nodes[0].clone(), uris_a, dir.path());
    let b = Org::new(net.nodes[1].clone(), vec![node.amqp_uri(&vb)], dir.path());
    let token_file = dir.path().join("admin.token");
    write_private(&token_file, "step-down-token-0123456789\n")?;
    Ok(Pair {
        a,
        b,
        va,
        token_file,
        dir,
    })
}

async fn pair() -> Result<Pair> {
    let node = shared_node().await;
    let va = node.fresh_vhost().await?;
    pair_on(vec![node.amqp_uri(&va)], va).await
}

/// Start a bridge of A with `extra` `[bridge]` lines, the admin token file, and the broker
/// table `broker` (`None`: A's URIs).
async fn start_bridge(p: &Pair, name: &str, extra: &str, broker: Option<String>) -> Result<Daemon> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut a = Org::new(p.a.files.clone(), p.a.broker_uris.clone(), p.dir.path());
    a.daemon_broker = broker;
    let cfg = a.bridge_config_at(admin, extra).replace(
        "[admin]\n",
        &format!(
            "[admin]\ntoken_file = {:?}\n",
            p.token_file.display().to_string()
        ),
    );
    let d = Daemon::start(Kind::Bridge, &p.a.dir, name, &cfg, admin).await?;
    d.wait_ready(Duration::from_secs(30)).await?;
    Ok(d)
}

async fn ha_state(d: &Daemon) -> String {
    match d.status().await {
        Ok(s) => s["ha_state"].as_str().unwrap_or("?").to_string(),
        Err(_) => "unreachable".into(),
    }
}

/// `drawbridge status --admin` of `d`: the table an operator reads.
async fn cli_status(d: &Daemon) -> Result<String> {
    let out =
        tokio::process::Command::new(drawbridge_testkit::daemon::bin_dir().join("drawbridge"))
            .args(["status", "--admin", &d.admin().to_string()])
            .output()
            .await?;
    anyhow::ensure!(out.status.success(), "drawbridge status: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

/// Wait until exactly one of `bridges` is active and the others standby; its index.
async fn one_active(bridges: &[&Daemon], within: Duration) -> Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut states = Vec::new();
        for b in bridges {
            states.push(ha_state(b).await);
        }
        let active: Vec<usize> = (0..states.len())
            .filter(|i| states[*i] == "active")
            .collect();
        if active.len() == 1
            && states.iter().filter(|s| *s == "standby").count() == bridges.len() - 1
        {
            return Ok(active[0]);
        }
        if active.len() > 1 {
            bail!("two bridges active at once: {states:?}");
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = bridges.iter().map(|b| b.log_tail(20)).collect();
            bail!(
                "not exactly one active within {within:?}: {states:?}\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `bridge` is active and its link on `queue` is up; returns the time at each.
async fn until_forwarding(
    bridge: &Daemon,
    queue: &str,
    within: Duration,
) -> Result<(Instant, Instant)> {
    let deadline = Instant::now() + within;
    let mut active_at = None;
    loop {
        if let Ok(s) = bridge.status().await {
            if active_at.is_none() && s["ha_state"] == "active" {
                active_at = Some(Instant::now());
            }
            let up = s["links"]
                .as_array()
                .is_some_and(|ls| ls.iter().any(|l| l["queue"] == queue && l["state"] == "up"));
            if let (Some(a), true) = (active_at, up) {
                return Ok((a, Instant::now()));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "bridge not forwarding within {within:?}: {:?}\n{}",
                bridge.status().await.ok(),
                bridge.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Consumers of `queue` in `vhost`, from the broker.
async fn consumers(node: &RabbitNode, vhost: &str, queue: &str) -> Result<u64> {
    let all = node.consumers(vhost).await?;
    all.get(queue)
        .copied()
        .with_context(|| format!("queue {queue} not listed: {all:?}"))
}

fn spec(run: &str, from: u64, to: u64) -> PublishSpec {
    PublishSpec {
        run: run.into(),
        from,
        to,
        size: 256,
        destination: BANK_B.into(),
        headers: vec![],
    }
}

/// Publish `from..to` as the node would, in chunks of 25 every 40 ms: a steady stream.
fn publish_steadily(
    uris: &[String],
    q: &str,
    run: &str,
    from: u64,
    to: u64,
) -> tokio::task::JoinHandle<Result<()>> {
    let uris = uris.to_vec();
    let (q, run) = (q.to_string(), run.to_string());
    tokio::spawn(async move {
        let conn = drawbridge_testkit::node::connect_any(&uris).await?;
        let ch = conn.create_channel().await?;
        let mut at = from;
        while at < to {
            let end = (at + 25).min(to);
            stream::publish(&ch, &q, &spec(&run, at, end), |_| {}).await?;
            at = end;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        Ok(())
    })
}

/// Like [`publish_steadily`] from `from` on, until `stop` is set; returns the end of the
/// range published.
fn publish_until(
    uris: &[String],
    q: &str,
    run: &str,
    from: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64>> {
    let uris = uris.to_vec();
    let (q, run) = (q.to_string(), run.to_string());
    tokio::spawn(async move {
        let conn = drawbridge_testkit::node::connect_any(&uris).await?;
        let ch = conn.create_channel().await?;
        let mut at = from;
        while !stop.load(Ordering::SeqCst) {
            stream::publish(&ch, &q, &spec(&run, at, at + 25), |_| {}).await?;
            at += 25;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        Ok(at)
    })
}

/// Count what reaches B's inbox (each message once, from A).
fn receive(b: &Org, run: &str, n: u64) -> tokio::task::JoinHandle<Result<stream::Report>> {
    let uris = b.broker_uris.clone();
    let run = run.to_string();
    tokio::spawn(async move {
        let conn = drawbridge_testkit::node::connect_any(&uris).await?;
        let ch = conn.create_channel().await?;
        world::declare_queue(&ch, INBOX).await?;
        let mut tally = Tally::new(&run, n, Some(BANK_A.to_string()));
        stream::consume(&ch, INBOX, &mut tally, Duration::from_secs(60), |_| {}).await?;
        Ok(tally.report())
    })
}

/// B's float, A's peer queue and a node answering A's snapshot requests with the link.
async fn prepare(p: &mut Pair, queue_type: &str) -> Result<(String, SnapshotResponder)> {
    p.b.start_float("").await?;
    let q = p.a.queue_to(&p.b);
    let (_c, ch) = p.a.channel().await?;
    world::declare_peer_queue(&ch, &q, queue_type).await?;
    let responder =
        p.a.answer_snapshot_requests(vec![p.a.link_to(&p.b)])
            .await?;
    Ok((q, responder))
}

fn assert_exactly_once(r: &stream::Report, logs: &[&Daemon]) {
    let tails: Vec<String> = logs.iter().map(|d| d.log_tail(30)).collect();
    assert!(
        r.complete() && r.lost == 0 && r.duplicates == 0 && r.corrupted == 0,
        "{r:?}\n{}",
        tails.join("\n----\n")
    );
}

/// (a) + (c): exactly one active, the standby opens no peer link and consumes no peer
/// queue; kill -9 the active during a stream → the standby takes over within seconds and
/// every message arrives exactly once.
#[tokio::test]
async fn the_standby_takes_over_after_kill_9_and_nothing_is_lost_or_duplicated() -> Result<()> {
    let mut p = pair().await?;
    let (q, _responder) = prepare(&mut p, "classic").await?;
    let b1 = start_bridge(&p, "bridge-1", "", None).await?;
    let b2 = start_bridge(&p, "bridge-2", "", None).await?;
    let mut bridges = [b1, b2];
    let i = one_active(&[&bridges[0], &bridges[1]], Duration::from_secs(15)).await?;
    let standby = 1 - i;
    until_forwarding(&bridges[i], &q, Duration::from_secs(20)).await?;

    // (c) The standby knows the link but runs none; one peer connection, one consumer.
    let s = bridges[standby].status().await?;
    assert_eq!(s["links"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(s["wanted_links"], serde_json::json!([q]), "{s}");
    let float = p.b.float.as_ref().expect("float").status().await?;
    let conns = float["connections"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(conns, 1, "one peer connection, not one per bridge: {float}");
    let node = shared_node().await;
    assert_eq!(
        consumers(node, &p.va, &q).await?,
        1,
        "only the active bridge consumes"
    );
    // `drawbridge status` tells the leader from the standby.
    let active_table = cli_status(&bridges[i]).await?;
    assert!(active_table.contains(": active (ready"), "{active_table}");
    assert!(active_table.contains(&q), "{active_table}");
    let standby_table = cli_status(&bridges[standby]).await?;
    println!("drawbridge status (active):\n{active_table}\ndrawbridge status (standby):\n{standby_table}");
    assert!(
        standby_table.contains(": standby (ready)"),
        "{standby_table}"
    );
    assert!(
        standby_table.contains("1 wanted; they run on the active bridge"),
        "{standby_table}"
    );
    let metrics = bridges[i].metrics().await?;
    assert!(metrics.contains("drawbridge_bridge_active 1"), "{metrics}");
    let metrics = bridges[standby].metrics().await?;
    assert!(metrics.contains("drawbridge_bridge_active 0"), "{metrics}");

    let n = 1500;
    let rx = receive(&p.b, "kill9", n);
    let (_c, ch) = p.a.channel().await?;
    stream::publish(&ch, &q, &spec("kill9", 0, 300), |_| {}).await?;
    let tx = publish_steadily(&p.a.broker_uris, &q, "kill9", 300, 1200);
    tokio::time::sleep(Duration::from_millis(700)).await;
    bridges[i].kill9().await?;
    let killed = Instant::now();
    let (active_at, up_at) =
        until_forwarding(&bridges[standby], &q, Duration::from_secs(20)).await?;
    println!(
        "FAILOVER kill -9 → standby active in {:?}, its link up in {:?}",
        active_at - killed,
        up_at - killed
    );
    assert!(
        up_at - killed < Duration::from_secs(5),
        "failover took {:?}",
        up_at - killed
    );
    tx.await??;
    stream::publish(&ch, &q, &spec("kill9", 1200, n), |_| {}).await?;
    let r = rx.await??;
    println!("kill9: {r:?}");
    assert_exactly_once(&r, &[&bridges[standby]]);
    // The killed bridge comes back as a standby.
    bridges[i].restart().await?;
    bridges[i].wait_ready(Duration::from_secs(30)).await?;
    assert_eq!(
        one_active(&[&bridges[0], &bridges[1]], Duration::from_secs(10)).await?,
        standby
    );
    Ok(())
}

/// (b): step-down under load hands over to the other bridge with nothing lost or duplicated;
/// the stepped-down bridge stays standby during its hold-off; the endpoint wants the token.
#[tokio::test]
async fn step_down_under_load_hands_over_and_holds_off() -> Result<()> {
    let mut p = pair().await?;
    let (q, _responder) = prepare(&mut p, "classic").await?;
    let extra = "ha_hold_off = \"20s\"";
    let b1 = start_bridge(&p, "bridge-1", extra, None).await?;
    let b2 = start_bridge(&p, "bridge-2", extra, None).await?;
    let bridges = [b1, b2];
    let i = one_active(&[&bridges[0], &bridges[1]], Duration::from_secs(15)).await?;
    let other = 1 - i;
    until_forwarding(&bridges[i], &q, Duration::from_secs(20)).await?;
    let token = Secret::new("step-down-token-0123456789");
    let admin = |d: &Daemon| d.admin().to_string();

    // The token is required, and only the active bridge can step down.
    let wrong =
        drawbridge_runtime::admin::post_step_down(&admin(&bridges[i]), &Secret::new("nope")).await;
    assert_eq!(wrong.map(|r| r.0), Ok(401));
    let (code, _) = drawbridge_testkit::daemon::http_get(bridges[i].admin(), "/step-down").await?;
    assert_eq!(code, 405, "GET is not a step-down");
    let standby = drawbridge_runtime::admin::post_step_down(&admin(&bridges[other]), &token).await;
    assert_eq!(standby.as_ref().map(|r| r.0), Ok(409), "{standby:?}");
    // The CLI says the same, with exit code 3.
    let cli = bin_dir().join("drawbridge");
    if cli.exists() {
        let out = tokio::process::Command::new(&cli)
            .args([
                "step-down",
                "--admin",
                &format!("http://{}", admin(&bridges[other])),
            ])
            .arg("--token-file")
            .arg(&p.token_file)
            .output()
            .await?;
        assert_eq!(out.status.code(), Some(3), "{out:?}");
    } else {
        println!("(drawbridge CLI not built; skipping its step-down check)");
    }
    assert_eq!(
        ha_state(&bridges[i]).await,
        "active",
        "a refused request changes nothing"
    );

    let n = 2000;
    let rx = receive(&p.b, "stepdown", n);
    let tx = publish_steadily(&p.a.broker_uris, &q, "stepdown", 0, 1700);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let asked = Instant::now();
    let (code, body) = if cli.exists() {
        let out = tokio::process::Command::new(&cli)
            .args(["step-down", "--admin", &admin(&bridges[i])])
            .arg("--token-file")
            .arg(&p.token_file)
            .output()
            .await?;
        (
            if out.status.success() {
                200
            } else {
                out.status.code().unwrap_or(-1) as u16
            },
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    } else {
        drawbridge_runtime::admin::post_step_down(&admin(&bridges[i]), &token)
            .await
            .map_err(anyhow::Error::msg)?
    };
    assert_eq!(code, 200, "{body}");
    let answered = asked.elapsed();
    let (active_at, up_at) = until_forwarding(&bridges[other], &q, Duration::from_secs(20)).await?;
    println!(
        "STEP-DOWN answered in {answered:?}; other bridge active after {:?}, its link up after {:?}",
        active_at - asked,
        up_at - asked
    );
    // The stepped-down bridge stays standby through its hold-off.
    for _ in 0..30 {
        let s = bridges[i].status().await?;
        assert_eq!(s["ha_state"], "standby", "{s}");
        assert!(s["ha"]["hold_off_ms_left"].as_u64().unwrap_or(0) > 0, "{s}");
        assert_eq!(s["links"].as_array().map(Vec::len), Some(0), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        bridges[i].log_contains("stepped down: lock released"),
        "{}",
        bridges[i].log_tail(20)
    );
    tx.await??;
    let (_c, ch) = p.a.channel().await?;
    stream::publish(&ch, &q, &spec("stepdown", 1700, n), |_| {}).await?;
    let r = rx.await??;
    println!("step-down: {r:?}");
    assert_exactly_once(&r, &[&bridges[0], &bridges[1]]);
    Ok(())
}

/// (d): a 3-node cluster; the bridges connect to different nodes. The node holding the lock
/// queue (always the node of the holder's connection: RabbitMQ places an exclusive queue on
/// its connection's node) is killed → the holder loses its connection and the lock with it,
/// and the standby, connected elsewhere, takes over: exactly one active, nothing lost.
#[tokio::test]
async fn the_cluster_node_holding_the_lock_dies_and_the_other_bridge_takes_over() -> Result<()> {
    let mut cluster = RabbitCluster::start(3, NodeOptions::default()).await?;
    let va = cluster.fresh_vhost().await?;
    let uris = cluster.uris(&va);
    let mut p = pair_on(uris.clone(), va.clone()).await?;
    let (q, _responder) = prepare(&mut p, "quorum").await?;
    let broker = |order: [usize; 3]| {
        let list: Vec<String> = order.iter().map(|i| format!("{:?}", uris[*i])).collect();
        Some(format!(
            "uris = [{}]\nop_timeout = \"5s\"\nconnect_timeout = \"3s\"",
            list.join(", ")
        ))
    };
    let extra = "peer_queue_type = \"quorum\"";
    let b1 = start_bridge(&p, "bridge-1", extra, broker([0, 1, 2])).await?;
    let i = one_active(&[&b1], Duration::from_secs(15)).await?;
    assert_eq!(i, 0);
    let b2 = start_bridge(&p, "bridge-2", extra, broker([1, 2, 0])).await?;
    let bridges = [b1, b2];
    one_active(&[&bridges[0], &bridges[1]], Duration::from_secs(15)).await?;
    until_forwarding(&bridges[0], &q, Duration::from_secs(20)).await?;

    // Where the lock queue lives.
    let lock = bridges[0].status().await?["ha"]["lock_queue"]
        .as_str()
        .context("lock queue")?
        .to_string();
    let out = cluster.nodes[1]
        .ctl(&[
            "list_queues",
            "-p",
            &va,
            "--no-table-headers",
            "-q",
            "name",
            "pid",
        ])
        .await?;
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(lock.as_str()))
        .with_context(|| format!("lock queue not listed: {out}"))?
        .to_string();
    let holder_node = cluster
        .nodes
        .iter()
        .position(|n| line.contains(n.name()))
        .with_context(|| format!("lock on no known node: {line}"))?;
    println!("lock queue {lock} lives on node {holder_node} ({line})");
    assert_eq!(
        holder_node, 0,
        "an exclusive queue lives on its connection's node"
    );

    let n = 1200;
    let rx = receive(&p.b, "cluster", n);
    let tx = publish_steadily(&uris[1..], &q, "cluster", 0, 800);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let killed = Instant::now();
    cluster.nodes[holder_node].kill().await?;
    // Either bridge may be the first to forward: the old holder reconnects to a surviving
    // node and contends too.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (who, up_at) = 'wait: loop {
        for (k, b) in bridges.iter().enumerate() {
            if let Ok(s) = b.status().await {
                let up = s["links"].as_array().is_some_and(|ls| {
                    ls.iter()
                        .any(|l| l["queue"] == q.as_str() && l["state"] == "up")
                });
                if s["ha_state"] == "active" && up {
                    break 'wait (k, Instant::now());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no bridge forwarding 30 s after the lock node died");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "CLUSTER lock node killed → bridge {} forwarding after {:?}",
        who + 1,
        up_at - killed
    );
    tx.await??;
    let conn = drawbridge_testkit::node::connect_any(&uris[1..]).await?;
    let ch = conn.create_channel().await?;
    stream::publish(&ch, &q, &spec("cluster", 800, n), |_| {}).await?;
    let r = rx.await??;
    println!("cluster: {r:?}");
    // Afterwards exactly one bridge is active, and stays so. (Which one may change while the
    // quorum queue elects its new leader: RabbitMQ 3.10 fails a consume on it meanwhile with a
    // connection-level INTERNAL_ERROR, which closes that bridge's connection and its lock.)
    one_active(&[&bridges[0], &bridges[1]], Duration::from_secs(30)).await?;
    for _ in 0..20 {
        one_active(&[&bridges[0], &bridges[1]], Duration::from_secs(0)).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if std::env::var_os("DRAWBRIDGE_HA_SHOW_LOGS").is_some() {
        for b in &bridges {
            println!("---- {}\n{}", b.log_path().display(), b.log_tail(80));
        }
    }
    assert_exactly_once(&r, &[&bridges[0], &bridges[1]]);
    Ok(())
}

/// A node one minor release of the control protocol ahead of the bridges: every control
/// message it sends carries a field this build does not know (field 99, a varint, appended
/// as a newer node's library would write it), and it answers snapshot requests with such
/// snapshots. The bridges must obey it as if the field were not there.
struct NewerNode {
    /// Links of the snapshots it answers with.
    links: Arc<Mutex<Vec<PeerLink>>>,
    /// Its per-node sequence (it is the only publisher of control messages in the test).
    sequence: Arc<AtomicU64>,
    identity: String,
    user: String,
    uris: Vec<String>,
    answered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NewerNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `cmd` as a newer minor release encodes it: this build's encoding plus an unknown field.
fn newer_minor(sequence: u64, command: ControlCommand) -> Vec<u8> {
    world::append_varint_field(
        SequencedCommand {
            sequence,
            epoch: 0,
            command,
        }
        .encode(),
        99,
        sequence,
    )
}

impl NewerNode {
    async fn start(org: &Org, links: Vec<PeerLink>) -> Result<NewerNode> {
        let links = Arc::new(Mutex::new(links));
        let sequence = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let (identity, user, uris) = (
            org.legal_name.clone(),
            org.node.user.clone(),
            org.broker_uris.clone(),
        );
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = {
            let (links, sequence, answered) = (links.clone(), sequence.clone(), answered.clone());
            let (identity, user, uris) = (identity.clone(), user.clone(), uris.clone());
            tokio::spawn(async move {
                let session = async {
                    let conn = drawbridge_testkit::node::connect_any(&uris).await?;
                    let ch = conn.create_channel().await?;
                    let q = world::bind_notify_queue(&ch).await?;
                    let mut consumer = ch
                        .basic_consume(
                            q,
                            "newer-node".into(),
                            lapin::options::BasicConsumeOptions {
                                no_ack: true,
                                ..Default::default()
                            },
                            lapin::types::FieldTable::default(),
                        )
                        .await?;
                    let _ = ready_tx.send(());
                    while let Some(d) = consumer.next().await {
                        let d = d?;
                        if let Ok(Notification::SnapshotRequest(_)) = Notification::decode(&d.data)
                        {
                            let snapshot = ControlCommand::Snapshot(Snapshot {
                                node_identity: identity.clone(),
                                inbox_queues: vec![INBOX.to_string()],
                                links: links.lock().unwrap().clone(),
                            });
                            let seq = sequence.fetch_add(1, Ordering::SeqCst) + 1;
                            world::publish_raw_control(&ch, &user, &newer_minor(seq, snapshot))
                                .await?;
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    anyhow::Ok(())
                };
                if let Err(e) = session.await {
                    eprintln!("newer node's snapshot responder ended: {e:#}");
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .context("newer node not consuming notify")??;
        Ok(NewerNode {
            links,
            sequence,
            identity,
            user,
            uris,
            answered,
            task,
        })
    }

    /// Publish `command` in the newer minor encoding.
    async fn send(&self, command: ControlCommand) -> Result<()> {
        let conn = drawbridge_testkit::node::connect_any(&self.uris).await?;
        let ch = conn.create_channel().await?;
        let seq = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        world::publish_raw_control(&ch, &self.user, &newer_minor(seq, command)).await
    }

    /// Add `link` (a newer-minor CreateLink) and answer later snapshot requests with it.
    async fn create(&self, link: PeerLink) -> Result<()> {
        self.links.lock().unwrap().push(link.clone());
        self.send(ControlCommand::CreateLink(CreateLink {
            node_identity: self.identity.clone(),
            link,
        }))
        .await
    }

    /// A command this build does not know at all (envelope body field 6): skipped, not refused.
    async fn send_unknown_command(&self) -> Result<()> {
        let conn = drawbridge_testkit::node::connect_any(&self.uris).await?;
        let ch = conn.create_channel().await?;
        let mut m = proto::ControlMessage {
            version: PROTOCOL_VERSION,
            body: None,
            sequence: 0,
            epoch: 0,
        }
        .encode_to_vec();
        m.extend_from_slice(&[0x32, 0x02, 0x0a, 0x00]);
        world::publish_raw_control(&ch, &self.user, &m).await
    }
}

/// Wait until `bridge` is a standby that knows every queue of `queues` (its wanted links).
async fn ready_standby(bridge: &Daemon, queues: &[&str], within: Duration) -> Result<()> {
    bridge.wait_ready(within).await?;
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = bridge.status().await {
            let wanted = s["wanted_links"].as_array().cloned().unwrap_or_default();
            if s["ha_state"] == "standby" && queues.iter().all(|q| wanted.iter().any(|w| w == q)) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "not a standby wanting {queues:?} within {within:?}: {:?}\n{}",
                bridge.status().await.ok(),
                bridge.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Step `bridge` down with the CLI as an operator would (`drawbridge step-down`), or through
/// the admin API if the CLI is not built; how long the answer took.
async fn step_down(p: &Pair, bridge: &Daemon) -> Result<Duration> {
    let asked = Instant::now();
    let cli = bin_dir().join("drawbridge");
    if cli.exists() {
        let out = tokio::process::Command::new(&cli)
            .args(["step-down", "--admin", &bridge.admin().to_string()])
            .arg("--token-file")
            .arg(&p.token_file)
            .output()
            .await?;
        ensure!(out.status.success(), "step-down failed: {out:?}");
    } else {
        let token = Secret::new("step-down-token-0123456789");
        let (code, body) =
            drawbridge_runtime::admin::post_step_down(&bridge.admin().to_string(), &token)
                .await
                .map_err(anyhow::Error::msg)?;
        ensure!(code == 200, "step-down: {code} {body}");
    }
    Ok(asked.elapsed())
}

fn control_refused(s: &serde_json::Value) -> u64 {
    s["control_refused"].as_u64().unwrap_or(u64::MAX)
}

/// Rolling upgrade under load: two bridges A and B; step down A (whichever is active) → B
/// takes over; SIGTERM A and start its replacement A'; once A' is a ready standby, step down
/// B → A' takes over; SIGTERM B and start B'. A steady stream runs throughout and the node
/// speaks a newer minor release of the control protocol (unknown fields in every message,
/// an unknown command): both bridges obey it. Every message arrives exactly once.
///
/// The replacement runs the same binary as the bridge it replaces: the project has had one
/// release so far (0.1.0), so there is no older binary to run beside a newer one, and this
/// test does not pretend otherwise. What it checks is the procedure (hand over, replace, hand
/// back, under load, 0 lost) and the newer-node half of mixed versions. Once a previous
/// release exists, the cross-version run is this test with A and B started from the previous
/// release's binaries (e.g. a `DRAWBRIDGE_PREVIOUS_BIN_DIR` with its `drawbridge-bridge`,
/// built from its tag) and A', B' from this build; see docs/operations.md, *Rolling upgrade*.
#[tokio::test]
async fn rolling_upgrade_under_load_loses_nothing_and_obeys_a_newer_minor_node() -> Result<()> {
    let mut p = pair().await?;
    p.b.start_float("").await?;
    let q = p.a.queue_to(&p.b);
    // A second link, created by the newer node during the roll.
    let qx = format!("{q}.roll");
    let (_c, ch) = p.a.channel().await?;
    world::declare_peer_queue(&ch, &q, "classic").await?;
    world::declare_peer_queue(&ch, &qx, "classic").await?;
    let node = NewerNode::start(&p.a, vec![p.a.link_to(&p.b)]).await?;
    let extra = "ha_hold_off = \"20s\"";
    let mut a = start_bridge(&p, "bridge-a", extra, None).await?;
    let mut b = start_bridge(&p, "bridge-b", extra, None).await?;
    // "A" is whichever is active first.
    if one_active(&[&a, &b], Duration::from_secs(15)).await? == 1 {
        std::mem::swap(&mut a, &mut b);
    }
    until_forwarding(&a, &q, Duration::from_secs(20)).await?;
    ready_standby(&b, &[&q], Duration::from_secs(20)).await?;

    // The stream on the main link runs until the roll is over; the extra link's messages
    // take the first sequence numbers, the stream the rest.
    let x_n = 200u64;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tx = publish_until(&p.a.broker_uris, &q, "roll", x_n, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The newer node adds a link and sends a command nobody here knows: the active bridge
    // runs the link, the standby wants it.
    let mut x = p.a.link_to(&p.b);
    x.queue = qx.clone();
    node.create(x).await?;
    node.send_unknown_command().await?;
    until_forwarding(&a, &qx, Duration::from_secs(20)).await?;
    ready_standby(&b, &[&q, &qx], Duration::from_secs(20)).await?;
    stream::publish(&ch, &qx, &spec("roll", 0, x_n / 2), |_| {}).await?;

    // 1. Step down A → B takes over.
    let asked = Instant::now();
    let answered = step_down(&p, &a).await?;
    let (active_at, up_at) = until_forwarding(&b, &q, Duration::from_secs(20)).await?;
    until_forwarding(&b, &qx, Duration::from_secs(20)).await?;
    println!(
        "ROLL step-down A answered in {answered:?}; B active after {:?}, forwarding after {:?}",
        active_at - asked,
        up_at - asked
    );
    // 2. Replace A: SIGTERM, then A' with the same configuration, a ready standby.
    let s = a.status().await?;
    assert_eq!(
        control_refused(&s),
        0,
        "A refused a newer-minor message: {s}"
    );
    let code = a.terminate(Duration::from_secs(30)).await?;
    ensure!(
        code == Some(0),
        "A exited with {code:?}\n{}",
        a.log_tail(30)
    );
    let a2 = start_bridge(&p, "bridge-a-new", extra, None).await?;
    ready_standby(&a2, &[&q, &qx], Duration::from_secs(30)).await?;
    // 3. Step down B → A' takes over.
    let asked = Instant::now();
    let answered = step_down(&p, &b).await?;
    let (active_at, up_at) = until_forwarding(&a2, &q, Duration::from_secs(20)).await?;
    until_forwarding(&a2, &qx, Duration::from_secs(20)).await?;
    println!(
        "ROLL step-down B answered in {answered:?}; A' active after {:?}, forwarding after {:?}",
        active_at - asked,
        up_at - asked
    );
    // 4. Replace B.
    let s = b.status().await?;
    assert_eq!(
        control_refused(&s),
        0,
        "B refused a newer-minor message: {s}"
    );
    let code = b.terminate(Duration::from_secs(30)).await?;
    ensure!(
        code == Some(0),
        "B exited with {code:?}\n{}",
        b.log_tail(30)
    );
    let b2 = start_bridge(&p, "bridge-b-new", extra, None).await?;
    ready_standby(&b2, &[&q, &qx], Duration::from_secs(30)).await?;
    assert_eq!(one_active(&[&a2, &b2], Duration::from_secs(5)).await?, 0);

    stop.store(true, Ordering::SeqCst);
    let n = tx.await??;
    stream::publish(&ch, &qx, &spec("roll", x_n / 2, x_n), |_| {}).await?;
    // Everything waits in B's inbox; count it now.
    let r = receive(&p.b, "roll", n).await??;
    println!(
        "roll: {r:?}; snapshots answered by the newer node: {}",
        node.answered.load(Ordering::SeqCst)
    );
    assert_exactly_once(&r, &[&a, &b, &a2, &b2]);
    // Nothing the newer node sent was refused; its unknown command was skipped, not refused.
    for d in [&a2, &b2] {
        let s = d.status().await?;
        assert_eq!(control_refused(&s), 0, "{s}");
    }
    for d in [&a, &b] {
        let log = std::fs::read_to_string(d.log_path())?;
        assert!(
            log.contains("ignored: unknown control command (newer node?)"),
            "{}",
            d.log_tail(30)
        );
    }
    Ok(())
}

/// The time (unix ms) the bridge's link on `queue` came up, if it is up.
fn up_since(s: &serde_json::Value, queue: &str) -> Option<u64> {
    s["links"].as_array().and_then(|ls| {
        ls.iter()
            .find(|l| l["queue"] == queue && l["state"] == "up")
            .and_then(|l| l["since_unix_ms"].as_u64())
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// `drawbridge_bridge_forwarded_total{queue}` of a bridge (0 if not exported yet).
async fn forwarded(d: &Daemon, queue: &str) -> Result<u64> {
    let m = d.metrics().await?;
    let prefix = format!("drawbridge_bridge_forwarded_total{{queue=\"{queue}\"}} ");
    Ok(m.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}

/// Never two active: bridge A is active with its broker connection through a proxy, B is
/// connected directly. The proxy black-holes A's connection (no FIN, no RST: a silent
/// partition). A must stop forwarding — its link down, its connection to the float closed,
/// its forwarded count frozen — before B's link comes up, and nothing may be lost.
///
/// Observed from outside, on one clock (unix ms): A's `/status` and the float's connection
/// list are polled every 20 ms (A's stop is the first poll that no longer shows it, so it
/// is late by up to a poll, which only makes the test stricter); B's link and B's float
/// connection carry their own `since_unix_ms`.
#[tokio::test]
async fn a_black_holed_active_bridge_stops_before_the_standby_starts() -> Result<()> {
    let mut p = pair().await?;
    let (q, _responder) = prepare(&mut p, "classic").await?;
    let node = shared_node().await;
    let proxy = FaultProxy::start(node.amqp_addr()).await?;
    let via_proxy = node.amqp_uri(&p.va).replace(
        &format!(":{}/", node.amqp_port()),
        &format!(":{}/", proxy.addr().port()),
    );
    ensure!(via_proxy != node.amqp_uri(&p.va), "{via_proxy}");
    let a = start_bridge(
        &p,
        "bridge-a",
        "",
        Some(format!(
            "uris = [{via_proxy:?}]\nconnect_timeout = \"3s\"\nop_timeout = \"5s\""
        )),
    )
    .await?;
    one_active(&[&a], Duration::from_secs(15)).await?;
    let b = start_bridge(&p, "bridge-b", "", None).await?;
    assert_eq!(one_active(&[&a, &b], Duration::from_secs(15)).await?, 0);
    until_forwarding(&a, &q, Duration::from_secs(20)).await?;
    let float = p.b.float.as_ref().context("float")?;
    let conns = |s: &serde_json::Value| -> Vec<(String, u64)> {
        s["connections"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        (
                            c["addr"].as_str().unwrap_or("?").to_string(),
                            c["since_unix_ms"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = conns(&float.status().await?);
    ensure!(before.len() == 1, "one peer connection (A's): {before:?}");
    let a_conn = before[0].0.clone();

    let n = 2500;
    let rx = receive(&p.b, "blackhole", n);
    let tx = publish_steadily(&p.a.broker_uris, &q, "blackhole", 0, 2000);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let cut = unix_ms();
    proxy.set_mode(ProxyMode::BlackHole);

    // Poll until B forwards and A has stopped, recording when each was first seen.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut a_link_gone, mut a_float_gone, mut a_state_left) = (None, None, None);
    let (mut b_up, mut b_float_since) = (None, None);
    let mut a_forwarded_at_stop = None;
    let mut overlaps = Vec::new();
    loop {
        let sa = a.status().await?;
        let polled = unix_ms();
        let a_up = up_since(&sa, &q).is_some();
        if !a_up && a_link_gone.is_none() {
            a_link_gone = Some(polled);
            a_forwarded_at_stop = Some(forwarded(&a, &q).await?);
        }
        if sa["ha_state"] != "active" && a_state_left.is_none() {
            a_state_left = Some((polled, sa["ha_state"].as_str().unwrap_or("?").to_string()));
        }
        let sf = float.status().await?;
        let polled_float = unix_ms();
        let cs = conns(&sf);
        if a_float_gone.is_none() && !cs.iter().any(|(addr, _)| *addr == a_conn) {
            a_float_gone = Some(polled_float);
        }
        if b_float_since.is_none() {
            b_float_since = cs
                .iter()
                .find(|(addr, _)| *addr != a_conn)
                .map(|(_, since)| *since);
        }
        let sb = b.status().await?;
        if let Some(since) = up_since(&sb, &q) {
            b_up.get_or_insert(since);
            if a_up {
                overlaps.push(format!(
                    "at {polled}: A's link up and B's link up since {since}"
                ));
            }
        }
        if b_up.is_some() && a_link_gone.is_some() && a_float_gone.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "60 s after the black hole: A link gone {a_link_gone:?}, A left active {a_state_left:?}, B up {b_up:?}\nA: {sa}\nB: {sb}\n{}\n----\n{}",
                a.log_tail(30),
                b.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a_link_gone, a_float_gone, b_up) = (
        a_link_gone.expect("set"),
        a_float_gone.expect("set"),
        b_up.expect("set"),
    );
    let b_float_since = b_float_since.unwrap_or(u64::MAX);
    let ms = |t: u64| t as i64 - cut as i64;
    println!(
        "BLACK HOLE at 0 ms: A left active at {:?} ({}), A's link seen gone at {} ms, A's float connection seen gone at {} ms; B's float connection from {} ms, B's link up at {} ms",
        a_state_left.as_ref().map(|(t, _)| ms(*t)),
        a_state_left.as_ref().map(|(_, s)| s.as_str()).unwrap_or("?"),
        ms(a_link_gone),
        ms(a_float_gone),
        ms(b_float_since.min(u64::MAX / 2)),
        ms(b_up),
    );
    let logs = || format!("{}\n----\n{}", a.log_tail(40), b.log_tail(40));
    assert!(overlaps.is_empty(), "two active: {overlaps:?}\n{}", logs());
    // The guarantee, independent of how fast B happens to be: RabbitMQ frees the lock no
    // sooner than two heartbeats (5 s, the default) after it last heard from A, which was
    // before the cut; A must have stopped by then. (Without the lease, A noticed only through
    // lapin's own heartbeat check, 10–11 s after the cut, and B came up 0.8–4 s later only
    // because RabbitMQ samples its heartbeat more coarsely.)
    assert!(
        ms(a_link_gone) < 2 * 5_000,
        "A stopped {} ms after the cut: not before the broker could give the lock away\n{}",
        ms(a_link_gone),
        logs()
    );
    assert!(
        a_link_gone < b_up,
        "A's link was still up when B's came up ({} ms vs {} ms)\n{}",
        ms(a_link_gone),
        ms(b_up),
        logs()
    );
    assert!(
        a_float_gone < b_float_since.min(b_up),
        "A's float connection was still open when B connected ({} ms vs {} ms)\n{}",
        ms(a_float_gone),
        ms(b_float_since),
        logs()
    );

    tx.await??;
    let (_c, ch) = p.a.channel().await?;
    stream::publish(&ch, &q, &spec("blackhole", 2000, n), |_| {}).await?;
    let r = rx.await??;
    let fs = float.status().await?;
    println!(
        "blackhole: {r:?}; float duplicates suppressed {}",
        fs["duplicates_suppressed"]
    );
    // A sent nothing after it stopped.
    assert_eq!(
        Some(forwarded(&a, &q).await?),
        a_forwarded_at_stop,
        "A forwarded after its link stopped"
    );
    assert_exactly_once(&r, &[&a, &b]);
    // The path heals: A comes back as a standby.
    proxy.set_mode(ProxyMode::Pass);
    assert_eq!(one_active(&[&a, &b], Duration::from_secs(30)).await?, 1);
    Ok(())
}
