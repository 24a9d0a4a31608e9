//! Least privilege: the broker users of `deploy/rabbitmq/definitions.json` run the whole
//! path, and nothing more.
//!
//! Two private RabbitMQ nodes (one per organisation) import the definitions file from the
//! repository as it is (the regexes are never copied here) and get a password per user. Each
//! party then logs in as its own user: the float as `drawbridge-float`, the bridge as
//! `drawbridge-bridge`, and the node — the `drawbridge` CLI and the node library — as
//! `drawbridge-node`, which the bridges accept control messages from (`node_user`).
//!
//! The test fails if the file grants too little (a step of the path breaks: links created by
//! control, messages both ways with the authenticated sender, a dead-letter, link status at
//! the node) or too much (one of the denials checked at the end is allowed, or the bridge can
//! create a peer queue, which would take write access to the default exchange).

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use drawbridge_certs::devpki;
use drawbridge_control_protocol::{LinkState, Notification};
use drawbridge_mapping::headers;
use drawbridge_testkit::{
    daemon::bin_dir,
    rabbit::{NodeOptions, RabbitNode},
    world::{self, Org, DEAD_LETTER, INBOX},
    BANK_A, BANK_B,
};
use lapin::{
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Connection,
};

/// The users the definitions must hold, by the part that logs in as each.
const NODE_USER: &str = "drawbridge-node";
const BRIDGE_USER: &str = "drawbridge-bridge";
const FLOAT_USER: &str = "drawbridge-float";
/// A legal name no float serves: what the float refuses and the bridge dead-letters.
const NOBODY: &str = "O=Nobody, L=Nowhere, C=XX";

fn definitions_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rabbitmq/definitions.json")
}

/// One `permissions` entry of the definitions file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Permission {
    user: String,
    vhost: String,
    configure: String,
    write: String,
    read: String,
}

/// The users and permissions of the definitions file, read as JSON.
fn definitions() -> Result<(Vec<serde_json::Value>, BTreeSet<Permission>)> {
    let path = definitions_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let users = v["users"].as_array().context("no `users`")?.clone();
    let s = |p: &serde_json::Value, k: &str| -> Result<String> {
        Ok(p[k]
            .as_str()
            .with_context(|| format!("permission without `{k}`: {p}"))?
            .to_string())
    };
    let mut perms = BTreeSet::new();
    for p in v["permissions"].as_array().context("no `permissions`")? {
        perms.insert(Permission {
            user: s(p, "user")?,
            vhost: s(p, "vhost")?,
            configure: s(p, "configure")?,
            write: s(p, "write")?,
            read: s(p, "read")?,
        });
    }
    Ok((users, perms))
}

/// One organisation's broker with the definitions imported and a password per user.
struct Broker {
    node: RabbitNode,
    passwords: Vec<(String, String)>,
}

impl Broker {
    async fn start() -> Result<Broker> {
        let node = RabbitNode::start(NodeOptions::default()).await?;
        let path = definitions_path();
        node.ctl(&["import_definitions", &path.display().to_string()])
            .await
            .context("importing deploy/rabbitmq/definitions.json")?;
        let (users, perms) = definitions()?;

        // The broker holds exactly the file's permissions for its users, and no user of the
        // file has a tag (`impersonator` would let it forge `user_id`; `administrator` and
        // the like would open the management API).
        let ours: BTreeSet<&str> = perms.iter().map(|p| p.user.as_str()).collect();
        let listed = node
            .ctl(&[
                "list_permissions",
                "-p",
                "/",
                "--quiet",
                "--no-table-headers",
            ])
            .await?;
        let imported: BTreeSet<Permission> = listed
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 4 && ours.contains(f[0])).then(|| Permission {
                    user: f[0].into(),
                    vhost: "/".into(),
                    configure: f[1].into(),
                    write: f[2].into(),
                    read: f[3].into(),
                })
            })
            .collect();
        assert_eq!(imported, perms, "imported permissions differ from the file");
        let listed_users = node
            .ctl(&["list_users", "--quiet", "--no-table-headers"])
            .await?;
        for line in listed_users.lines() {
            let mut f = line.split('\t');
            if let (Some(name), Some(tags)) = (f.next(), f.next()) {
                if ours.contains(name) {
                    assert_eq!(tags.trim(), "[]", "user {name} has tags: {line}");
                }
            }
        }

        // No password is in the file: each deployment sets its own (or uses certificates).
        let mut passwords = Vec::new();
        for u in &users {
            let name = u["name"].as_str().context("user without a name")?;
            let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
            node.ctl(&["change_password", name, &password]).await?;
            passwords.push((name.to_string(), password));
        }
        Ok(Broker { node, passwords })
    }

    /// `amqp://user:password@127.0.0.1:PORT/%2f` for one of the file's users.
    fn uri(&self, user: &str) -> String {
        let password = &self
            .passwords
            .iter()
            .find(|(u, _)| u == user)
            .unwrap_or_else(|| panic!("definitions.json has no user {user}"))
            .1;
        format!(
            "amqp://{user}:{password}@127.0.0.1:{}/%2f",
            self.node.amqp_port()
        )
    }

    /// A channel as `user`.
    async fn channel(&self, user: &str) -> Result<(Connection, Channel)> {
        let conn = drawbridge_node::connect(&self.uri(user)).await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    }

    /// A channel as `guest` (full access: the operator's view).
    async fn operator(&self) -> Result<(Connection, Channel)> {
        let conn = drawbridge_node::connect(&self.node.amqp_uri("/")).await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    }
}

/// Run the `drawbridge` CLI; returns whether it succeeded, and its stdout and stderr.
async fn cli(args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(bin_dir().join("drawbridge"))
        .args(args)
        .output()
        .await
        .context("running drawbridge (build it: cargo build -p drawbridge-cli)")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn cli_ok(args: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = cli(args).await?;
    if !ok {
        bail!("drawbridge {args:?} failed:\n{stdout}\n{stderr}");
    }
    Ok(stdout)
}

/// Start `org`'s float and bridge (extra `[bridge]` lines `bridge`), each logged in as its
/// own user.
async fn start_daemons(org: &mut Org, broker: &Broker, bridge: &str) -> Result<()> {
    // `daemon_broker` is the `[broker]` table of the daemon started next.
    org.daemon_broker = Some(format!("uris = [{:?}]", broker.uri(FLOAT_USER)));
    org.start_float("").await?;
    org.daemon_broker = Some(format!("uris = [{:?}]", broker.uri(BRIDGE_USER)));
    org.start_bridge(bridge).await?;
    Ok(())
}

/// `what` must have failed with `403 ACCESS_REFUSED`, not anything else (a 404 or 405 would
/// mean the check proved nothing about permissions).
fn assert_refused<T: std::fmt::Debug>(r: Result<T, lapin::Error>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: allowed ({v:?}), but the definitions should refuse it"),
        Err(e) => {
            let text = format!("{e} / {e:?}");
            assert!(
                text.contains("ACCESS_REFUSED") || text.contains("ACCESSREFUSED"),
                "{what}: refused, but not for lack of permission: {text}"
            );
        }
    }
}

/// Publish one persistent message with confirms; the error if the broker refuses it.
async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    props: BasicProperties,
) -> Result<lapin::Confirmation, lapin::Error> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.basic_publish(
        ShortString::from(exchange),
        ShortString::from(routing_key),
        BasicPublishOptions::default(),
        b"least privilege",
        props.with_delivery_mode(2),
    )
    .await?
    .await
}

async fn consume(ch: &Channel, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    ch.basic_consume(
        ShortString::from(queue),
        ShortString::from("permissions-test"),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

fn destination(legal_name: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        ShortString::from(headers::DESTINATION),
        AMQPValue::LongString(LongString::from(legal_name)),
    );
    h
}

/// Wait until `org`'s bridge reports the link on `queue` down because it may not create the
/// queue: creating a queue whose dead-letter exchange is the default one needs write on
/// `amq.default`, which the bridge does not have.
async fn wait_queue_refused(org: &Org, queue: &str) -> Result<()> {
    let bridge = org.bridge.as_ref().context("bridge not started")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = serde_json::Value::Null;
    while tokio::time::Instant::now() < deadline {
        if let Ok(s) = bridge.status().await {
            if let Some(l) = s["links"]
                .as_array()
                .and_then(|ls| ls.iter().find(|l| l["queue"] == queue))
            {
                let reason = l["reason"].as_str().unwrap_or_default();
                if reason.contains("ACCESS_REFUSED") && reason.contains("amq.default") {
                    return Ok(());
                }
                last = l.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the bridge did not report {queue} refused: {last}")
}

/// Wait for a `LinkStatus` event `Up` for `queue` on the node's notify queue.
async fn wait_link_up_event(ch: &Channel, notify: &str, queue: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(ShortString::from(notify), BasicGetOptions { no_ack: true })
            .await?
        {
            Some(m) => match Notification::decode(&m.delivery.data) {
                Ok(Notification::LinkStatus(s)) if s.queue == queue && s.state == LinkState::Up => {
                    return Ok(())
                }
                Ok(other) => seen.push(format!("{other:?}")),
                Err(e) => seen.push(format!("undecodable: {e}")),
            },
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    bail!("no LinkStatus Up for {queue} reached the node; saw: {seen:#?}")
}

/// Wait for the dead-letter copy of message `id` in `broker`'s dead-letter queue.
async fn wait_dead_letter(broker: &Broker, id: &str) -> Result<FieldTable> {
    let (_c, ch) = broker.operator().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        // The bridge declares the queue before it consumes a peer queue.
        if let Some(m) = ch
            .basic_get(
                ShortString::from(DEAD_LETTER),
                BasicGetOptions { no_ack: true },
            )
            .await
            .ok()
            .flatten()
        {
            if m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str())
                == Some(id)
            {
                return Ok(m.delivery.properties.headers().clone().unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("message {id} did not reach {DEAD_LETTER}")
}

#[tokio::test]
async fn the_least_privilege_users_run_the_whole_path_and_nothing_more() -> Result<()> {
    drawbridge_certs::install_crypto_provider();
    let (ba, bb) = tokio::join!(Broker::start(), Broker::start());
    let (ba, bb) = (ba?, bb?);
    let dir = tempfile::tempdir()?;
    let names = [BANK_A.parse()?, BANK_B.parse()?];
    let net = devpki::generate_network(&dir.path().join("pki"), &names)?;
    // The test acts as each organisation's node through `drawbridge-node`.
    let mut a = Org::new(net.nodes[0].clone(), vec![ba.uri(NODE_USER)], dir.path());
    let mut b = Org::new(net.nodes[1].clone(), vec![bb.uri(NODE_USER)], dir.path());
    assert_eq!(a.node.user, NODE_USER, "the bridges' node_user");
    start_daemons(&mut a, &ba, "").await?;
    // B's bridge runs hot-hot: its members fanout and member queue are within the patterns
    // too (it runs no link unless it can join).
    start_daemons(&mut b, &bb, "ha = \"hot-hot\"").await?;

    // Every daemon is connected as its own user.
    for (broker, org) in [(&ba, &a), (&bb, &b)] {
        let rows = broker
            .node
            .connections(&["client_properties", "user"])
            .await?;
        for (daemon, user) in [
            ("drawbridge-bridge", BRIDGE_USER),
            ("drawbridge-float", FLOAT_USER),
        ] {
            assert!(
                rows.iter().any(|r| r[0].contains(daemon) && r[1] == user),
                "{}: no {daemon} connection as {user}: {rows:?}",
                org.legal_name
            );
        }
    }

    // The node listens for link status (node library, as drawbridge-node).
    let (_na, na_ch) = a.channel().await?;
    let notify_a = world::bind_notify_queue(&na_ch).await?;
    assert!(
        notify_a.as_str().starts_with("drawbridge.notify."),
        "{notify_a}"
    );

    // The node declares its peer queues and sends (the CLI, as drawbridge-node); the bridge
    // may not create a peer queue (see deploy/rabbitmq/README.md). A→B: the queue exists
    // before the link is created; B→A: the link is created first and comes up once the node
    // has declared the queue.
    let n = "40";
    let send = |from: &Org, to: &Org, run: &'static str| {
        let args: Vec<String> = [
            "send",
            "--broker",
            from.broker_uri(),
            "--queue",
            &from.queue_to(to),
            "--destination",
            &to.legal_name,
            "--count",
            n,
            "--size",
            "128",
            "--run",
            run,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli_ok(&args).await.map(drop)
        }
    };
    send(&a, &b, "ab").await?;

    // Control creates the links (the CLI sets user_id = drawbridge-node; the bridges obey
    // only that user).
    for (from, to) in [(&a, &b), (&b, &a)] {
        let out = cli_ok(&[
            "control",
            "--broker",
            from.broker_uri(),
            "--node",
            &from.legal_name,
            "create",
            "--queue",
            &from.queue_to(to),
            "--target",
            &format!("127.0.0.1:{}", to.float_port),
            "--legal-name",
            &to.legal_name,
        ])
        .await?;
        assert!(out.contains(&format!("user_id {NODE_USER}")), "{out}");
    }
    wait_queue_refused(&b, &b.queue_to(&a)).await?;
    send(&b, &a, "ba").await?;
    for (from, to) in [(&a, &b), (&b, &a)] {
        from.wait_link_state(&from.queue_to(to), "up", Duration::from_secs(30))
            .await?;
    }
    wait_link_up_event(&na_ch, notify_a.as_str(), &a.queue_to(&b)).await?;

    // Both ways, with the authenticated sender, read by the node (CLI, drawbridge-node).
    for (at, run, sender) in [(&b, "ab", BANK_A), (&a, "ba", BANK_B)] {
        let out = cli_ok(&[
            "receive",
            "--broker",
            at.broker_uri(),
            "--queue",
            INBOX,
            "--expect",
            n,
            "--run",
            run,
            "--sender",
            sender,
            "--idle",
            "30s",
        ])
        .await?;
        assert!(
            out.contains(&format!("received={n} lost=0")) && out.contains("wrong_sender=0"),
            "{out}"
        );
    }

    // An undeliverable message (no float serves its destination) reaches A's dead-letter
    // queue through the bridge, with the reason.
    let (_c, ch) = a.channel().await?;
    publish(
        &ch,
        "",
        &a.queue_to(&b),
        BasicProperties::default()
            .with_message_id(ShortString::from("undeliverable-1"))
            .with_headers(destination(NOBODY)),
    )
    .await?;
    let headers = wait_dead_letter(&ba, "undeliverable-1").await?;
    assert!(headers.inner().contains_key(headers::REASON), "{headers:?}");

    // --- What each user may not do (checked on A's broker, everything running). ---
    let peer_queue = a.queue_to(&b);
    let control_queues: Vec<String> = ba
        .node
        .ctl(&[
            "list_queues",
            "-p",
            "/",
            "name",
            "--quiet",
            "--no-table-headers",
        ])
        .await?
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with("drawbridge.control."))
        .map(String::from)
        .collect();
    let control_queue = control_queues
        .first()
        .context("the bridge's control queue is not listed")?;

    // The float (DMZ): no peer queue, no control, no default exchange.
    let (_c, ch) = ba.channel(FLOAT_USER).await?;
    assert_refused(
        consume(&ch, &peer_queue).await,
        "float consumes a peer queue",
    );
    let (_c, ch) = ba.channel(FLOAT_USER).await?;
    assert_refused(
        publish(
            &ch,
            "",
            &peer_queue,
            BasicProperties::default().with_headers(destination(BANK_B)),
        )
        .await,
        "float publishes into a peer queue",
    );
    let (_c, ch) = ba.channel(FLOAT_USER).await?;
    assert_refused(
        publish(&ch, "drawbridge.control", "", BasicProperties::default()).await,
        "float publishes a control message",
    );

    // The bridge: no inbox, through either exchange; no control messages of its own.
    for exchange in ["", drawbridge_node::topology::INBOX_EXCHANGE] {
        let (_c, ch) = ba.channel(BRIDGE_USER).await?;
        assert_refused(
            publish(&ch, exchange, INBOX, BasicProperties::default()).await,
            &format!("bridge publishes to the inbox through `{exchange}`"),
        );
    }
    let (_c, ch) = ba.channel(BRIDGE_USER).await?;
    assert_refused(
        publish(&ch, "drawbridge.control", "", BasicProperties::default()).await,
        "bridge publishes a control message",
    );

    // The node: not the bridge's control queue, and no configure on what it does not own.
    let (_c, ch) = ba.channel(NODE_USER).await?;
    assert_refused(
        consume(&ch, control_queue).await,
        "node consumes the bridge's control queue",
    );
    let (_c, ch) = ba.channel(NODE_USER).await?;
    assert_refused(
        ch.queue_declare(
            ShortString::from(INBOX),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
        "node declares the float's inbox",
    );
    let (_c, ch) = ba.channel(NODE_USER).await?;
    assert_refused(
        consume(&ch, DEAD_LETTER).await,
        "node consumes the dead-letter queue",
    );
    // The float's link-canary queue is within its permissions too (declared and bound on
    // connect; a refusal would only be logged, so look for it).
    for org in [&a, &b] {
        let float = org.float.as_ref().expect("float");
        assert!(
            !float.log_contains("cannot declare the canary queue"),
            "{}",
            float.log_tail(20)
        );
    }
    Ok(())
}
