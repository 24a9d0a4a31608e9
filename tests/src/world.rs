//! A small "world" of organisations, each with its broker (vhost), float and bridge,
//! used by the integration tests, the demo and the benchmarks.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use drawbridge_certs::devpki::NodeFiles;
use drawbridge_control_protocol::{
    ControlCommand, CreateLink, DeleteLink, PeerLink, Snapshot, Target,
};
use drawbridge_node::Node;
pub use drawbridge_node::{declare_peer_queue, SnapshotResponder};
use lapin::{
    options::QueueDeclareOptions,
    types::{FieldTable, ShortString},
    Channel,
};

use drawbridge_node::topology::{self, QueueType};

use crate::daemon::{free_port, Daemon, Kind};

/// Default names (the daemons' defaults).
pub const CONTROL_EXCHANGE: &str = drawbridge_node::CONTROL_EXCHANGE;
/// Notify exchange.
pub const NOTIFY_EXCHANGE: &str = drawbridge_node::NOTIFY_EXCHANGE;
/// Inbox.
pub const INBOX: &str = "drawbridge.inbox";
/// Dead-letter queue.
pub const DEAD_LETTER: &str = "drawbridge.dead-letter";

/// Where a tunnel-mode float listens: peers, bridges (the tunnel) and admin.
#[derive(Debug, Clone, Copy)]
pub struct TunnelPorts {
    /// The peers' port.
    pub peers: SocketAddr,
    /// The tunnel port bridges dial.
    pub tunnel: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
}

impl TunnelPorts {
    /// On loopback: peers on `peer_port`, admin on `admin`, the tunnel on a free port.
    pub fn loopback(peer_port: u16, admin: SocketAddr) -> Self {
        TunnelPorts {
            peers: SocketAddr::from(([127, 0, 0, 1], peer_port)),
            tunnel: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin,
        }
    }
}

/// One organisation: a legal name, its PKI files, its broker and its daemons.
#[derive(Debug)]
pub struct Org {
    /// X.500 legal name.
    pub legal_name: String,
    /// TLS files from the dev PKI.
    pub files: NodeFiles,
    /// Broker URIs (one per cluster node): what the test, acting as the node, connects to;
    /// also the daemons' `broker.uris` unless `daemon_broker` is set.
    pub broker_uris: Vec<String>,
    /// The daemons' whole `[broker]` table (TOML lines), replacing `uris = broker_uris`:
    /// e.g. amqps:// URIs with `tls_ca` while the test itself uses the plain listener.
    pub daemon_broker: Option<String>,
    /// Port the float listens on.
    pub float_port: u16,
    /// Admin port of the float.
    pub float_admin: SocketAddr,
    /// Admin port of the bridge.
    pub bridge_admin: SocketAddr,
    /// The float process, once started.
    pub float: Option<Daemon>,
    /// The bridge process, once started.
    pub bridge: Option<Daemon>,
    /// Where configs and logs go.
    pub dir: PathBuf,
    /// The node's side of the control protocol (identity, broker login, sequence source).
    pub node: Node,
}

impl Org {
    /// An organisation whose files are in `files`, using `broker_uris`, writing configs and
    /// logs under `dir`.
    pub fn new(files: NodeFiles, broker_uris: Vec<String>, dir: &Path) -> Org {
        let slug = files.legal_name.slug();
        let login = broker_uris
            .first()
            .and_then(|u| drawbridge_node::broker_login(u).ok())
            .unwrap_or_else(|| "guest".into());
        Org {
            node: Node::new(files.legal_name.to_string(), login),
            legal_name: files.legal_name.to_string(),
            files,
            broker_uris,
            daemon_broker: None,
            float_port: free_port(),
            float_admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            bridge_admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            float: None,
            bridge: None,
            dir: dir.join(slug),
        }
    }

    /// The daemons' `[broker]` table body.
    fn broker_toml(&self) -> String {
        match &self.daemon_broker {
            Some(b) => b.clone(),
            None => {
                let list: Vec<String> = self.broker_uris.iter().map(|u| format!("{u:?}")).collect();
                format!("uris = [{}]", list.join(", "))
            }
        }
    }

    /// The float's config, with `extra` TOML lines appended to the `[float]` table.
    pub fn float_config(&self, extra: &str) -> String {
        self.float_config_at(self.float_port, self.float_admin, extra)
    }

    /// A float config listening on `port` with its admin port on `admin`.
    pub fn float_config_at(&self, port: u16, admin: SocketAddr, extra: &str) -> String {
        format!(
            "[float]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\ntrust_roots = {root:?}\n{extra}\n\n[broker]\n{broker}\n\n[admin]\nlisten = \"{admin}\"\n",
            cert = self.files.tls_cert.display().to_string(),
            key = self.files.tls_key.display().to_string(),
            root = self.files.root_cert.display().to_string(),
            broker = self.broker_toml(),
        )
    }

    /// Start one more float for this organisation (same identity and broker) on a new port;
    /// returns it and its port. Used for multi-target links.
    pub async fn start_extra_float(&self, name: &str, extra: &str) -> Result<(Daemon, u16)> {
        let port = free_port();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = self.float_config_at(port, admin, extra);
        let d = Daemon::start(Kind::Float, &self.dir, name, &cfg, admin).await?;
        d.wait_ready(Duration::from_secs(30)).await?;
        Ok((d, port))
    }

    /// The bridge's config, with `extra` TOML lines appended to the `[bridge]` table.
    ///
    /// Control messages are obeyed from the node's broker login (`node_user`), as in
    /// production, unless `extra` says otherwise (`node_user` or
    /// `insecure_accept_any_control_user`).
    pub fn bridge_config(&self, extra: &str) -> String {
        self.bridge_config_at(self.bridge_admin, extra)
    }

    /// The bridge's config with its admin port on `admin` (a second bridge of this
    /// organisation: same identity, broker and `bridge.id`, for high-availability tests).
    pub fn bridge_config_at(&self, admin: SocketAddr, extra: &str) -> String {
        let says = |key: &str| extra.lines().any(|l| l.trim_start().starts_with(key));
        let control_user = if says("node_user") || says("insecure_accept_any_control_user") {
            String::new()
        } else {
            format!("node_user = {:?}\n", self.node.user)
        };
        format!(
            "[bridge]\nid = \"bridge-{id}\"\ntls_cert = {cert:?}\ntls_key = {key:?}\ntrust_roots = {root:?}\n{control_user}{extra}\n\n[broker]\n{broker}\n\n[admin]\nlisten = \"{admin}\"\n",
            id = self.files.legal_name.slug(),
            cert = self.files.tls_cert.display().to_string(),
            key = self.files.tls_key.display().to_string(),
            root = self.files.root_cert.display().to_string(),
            broker = self.broker_toml(),
        )
    }

    /// Start one more bridge for this organisation (same configuration, its own admin port)
    /// and wait until it is ready (a standby is ready once it contends for the lock).
    pub async fn start_extra_bridge(&self, name: &str, extra: &str) -> Result<Daemon> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = self.bridge_config_at(admin, extra);
        let d = Daemon::start(Kind::Bridge, &self.dir, name, &cfg, admin).await?;
        d.wait_ready(Duration::from_secs(30)).await?;
        Ok(d)
    }

    /// Start the float (extra `[float]` lines) and wait until it is ready.
    pub async fn start_float(&mut self, extra: &str) -> Result<()> {
        let cfg = self.float_config(extra);
        let d = Daemon::start(Kind::Float, &self.dir, "float", &cfg, self.float_admin).await?;
        d.wait_ready(Duration::from_secs(30)).await?;
        self.float = Some(d);
        Ok(())
    }

    /// Start the bridge (extra `[bridge]` lines) and wait until it is ready.
    pub async fn start_bridge(&mut self, extra: &str) -> Result<()> {
        let cfg = self.bridge_config(extra);
        let d = Daemon::start(Kind::Bridge, &self.dir, "bridge", &cfg, self.bridge_admin).await?;
        d.wait_ready(Duration::from_secs(30)).await?;
        self.bridge = Some(d);
        Ok(())
    }

    /// The tunnel's own PKI for this organisation (a dev network of its legal name alone,
    /// under `<dir>/tunnel-pki`): the files both its bridges and its tunnel-mode floats
    /// present on the tunnel, and the tunnel CA. Generated on first use.
    pub fn tunnel_pki(&self) -> Result<NodeFiles> {
        let dir = self.dir.join("tunnel-pki");
        let net = drawbridge_certs::devpki::generate_network(
            &dir,
            std::slice::from_ref(&self.files.legal_name),
        )?;
        net.nodes.first().cloned().context("no tunnel node files")
    }

    /// A tunnel-mode float's config (docs/tunnel.md): no `tls_key`, no `[broker]`; peers on
    /// `at.peers`, bridges on `at.tunnel` (this organisation's bridges only), admin on
    /// `at.admin`; `extra` lines go to `[float]`.
    pub fn tunnel_float_config(&self, t: &NodeFiles, at: &TunnelPorts, extra: &str) -> String {
        format!(
            "[float]\nmode = \"tunnel\"\nlisten = \"{peers}\"\ntls_cert = {cert:?}\ntrust_roots = {root:?}\n{extra}\n\n[float.tunnel]\nlisten = \"{tunnel}\"\ntls_cert = {tcert:?}\ntls_key = {tkey:?}\ntrust_roots = {troot:?}\nbridges = [{name:?}]\n\n[admin]\nlisten = \"{admin}\"\n",
            peers = at.peers,
            tunnel = at.tunnel,
            admin = at.admin,
            cert = self.files.tls_cert.display().to_string(),
            root = self.files.root_cert.display().to_string(),
            tcert = t.tls_cert.display().to_string(),
            tkey = t.tls_key.display().to_string(),
            troot = t.root_cert.display().to_string(),
            name = self.legal_name,
        )
    }

    /// The `[bridge]` lines of a bridge of this organisation dialling the tunnel at `tunnel`.
    pub fn tunnel_bridge_lines(t: &NodeFiles, tunnel: SocketAddr) -> String {
        format!(
            "tunnel.floats = [\"{tunnel}\"]\ntunnel.tls_cert = {tcert:?}\ntunnel.tls_key = {tkey:?}\ntunnel.trust_roots = {troot:?}\n",
            tcert = t.tls_cert.display().to_string(),
            tkey = t.tls_key.display().to_string(),
            troot = t.root_cert.display().to_string(),
        )
    }

    /// Tunnel mode on loopback: start this organisation's float in tunnel mode on its usual
    /// peer and admin ports, then its bridge dialling it (`bridge_extra` `[bridge]` lines
    /// besides the tunnel's), and wait until the float is ready (activated by the bridge).
    pub async fn start_tunnel(&mut self, float_extra: &str, bridge_extra: &str) -> Result<()> {
        let t = self.tunnel_pki()?;
        let at = TunnelPorts::loopback(self.float_port, self.float_admin);
        let cfg = self.tunnel_float_config(&t, &at, float_extra);
        let float = Daemon::start(Kind::Float, &self.dir, "float", &cfg, self.float_admin).await?;
        self.float = Some(float);
        let lines = format!("{}{bridge_extra}", Org::tunnel_bridge_lines(&t, at.tunnel));
        self.start_bridge(&lines).await?;
        self.float
            .as_ref()
            .context("float")?
            .wait_ready(Duration::from_secs(30))
            .await
            .context("the tunnel-mode float was not activated by its bridge")
    }

    /// The peer queue this org uses for messages to `peer`.
    pub fn queue_to(&self, peer: &Org) -> String {
        format!("drawbridge.peers.{}", peer.files.legal_name.slug())
    }

    /// The link spec from this org to `peer`'s float.
    pub fn link_to(&self, peer: &Org) -> PeerLink {
        PeerLink {
            queue: self.queue_to(peer),
            targets: vec![Target::new("127.0.0.1", peer.float_port)],
            legal_names: vec![peer.legal_name.clone()],
            target_address: drawbridge_control_protocol::DEFAULT_TARGET_ADDRESS.to_string(),
        }
    }

    /// `n` links to `peer`'s float, each on its own peer queue `<queue_to(peer)>-<i>` (`i` in
    /// `0..n`, zero-padded to two digits): for tests that share many links out among bridges.
    pub fn links_to(&self, peer: &Org, n: usize) -> Vec<PeerLink> {
        (0..n)
            .map(|i| PeerLink {
                queue: format!("{}-{i:02}", self.queue_to(peer)),
                ..self.link_to(peer)
            })
            .collect()
    }

    /// The `drawbridge-reason` of each message taken from this org's dead-letter queue, until
    /// `n` were taken or `within` ran out ("" for a copy without a reason).
    pub async fn dead_letter_reasons(&self, n: usize, within: Duration) -> Result<Vec<String>> {
        use lapin::options::BasicGetOptions;
        // The dead-letter queue may not exist yet when this starts (the bridge declares it):
        // a `basic_get` on a missing queue closes the channel, so a failed get opens a new one
        // instead of polling a dead channel until the deadline.
        let (mut _conn, mut ch) = self.channel().await?;
        let mut reasons = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while reasons.len() < n && tokio::time::Instant::now() < deadline {
            match ch
                .basic_get(DEAD_LETTER.into(), BasicGetOptions { no_ack: true })
                .await
            {
                Ok(Some(m)) => reasons.push(
                    drawbridge_stream::header_string(
                        m.delivery.properties.headers().as_ref(),
                        drawbridge_mapping::headers::REASON,
                    )
                    .unwrap_or_default(),
                ),
                Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    (_conn, ch) = self.channel().await?;
                }
            }
        }
        Ok(reasons)
    }

    /// The first broker URI.
    pub fn broker_uri(&self) -> &str {
        &self.broker_uris[0]
    }

    /// The vhost of the first broker URI (its last path segment, `%2F` decoded to `/`): what
    /// the broker's management commands name, e.g. for a queue depth.
    pub fn vhost(&self) -> String {
        self.broker_uri()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .replace("%2F", "/")
    }

    /// A channel on this org's broker (first URI that answers).
    pub async fn channel(&self) -> Result<(lapin::Connection, Channel)> {
        let conn = drawbridge_node::connect_any(&self.broker_uris).await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    }

    /// Publish a control command as this org's node (next sequence number, `user_id` set);
    /// returns its sequence number.
    pub async fn control(&self, cmd: &ControlCommand) -> Result<u64> {
        let (_conn, ch) = self.channel().await?;
        Ok(self.node.publish(&ch, cmd.clone()).await?)
    }

    /// Publish a control message exactly as given (its own sequence; 0 = unsequenced).
    pub async fn control_sequenced(
        &self,
        msg: &drawbridge_control_protocol::SequencedCommand,
    ) -> Result<()> {
        let (_conn, ch) = self.channel().await?;
        Ok(self.node.publish_sequenced(&ch, msg).await?)
    }

    /// Publish `body` to the control exchange exactly as given, as this org's node would
    /// (its broker login as `user_id`): what a newer node's library puts on the wire.
    pub async fn publish_raw_control(&self, body: &[u8]) -> Result<()> {
        let (_conn, ch) = self.channel().await?;
        publish_raw_control(&ch, &self.node.user, body).await
    }

    /// Ask the bridge to run a link to `peer` (CreateLink).
    pub async fn create_link_to(&self, peer: &Org) -> Result<()> {
        self.control(&ControlCommand::CreateLink(CreateLink {
            node_identity: self.legal_name.clone(),
            link: self.link_to(peer),
        }))
        .await
        .map(drop)
    }

    /// Ask the bridge to stop the link to `peer` (DeleteLink).
    pub async fn delete_link_to(&self, peer: &Org) -> Result<()> {
        self.control(&ControlCommand::DeleteLink(DeleteLink {
            node_identity: self.legal_name.clone(),
            queue: self.queue_to(peer),
        }))
        .await
        .map(drop)
    }

    /// Send a snapshot with links to `peers`.
    pub async fn snapshot(&self, links: Vec<PeerLink>) -> Result<()> {
        self.control(&ControlCommand::Snapshot(Snapshot {
            node_identity: self.legal_name.clone(),
            inbox_queues: vec![INBOX.to_string()],
            links,
        }))
        .await
        .map(drop)
    }

    /// Wait until the bridge's `/status` shows the link on `queue` in `state`.
    pub async fn wait_link_state(
        &self,
        queue: &str,
        state: &str,
        within: Duration,
    ) -> Result<serde_json::Value> {
        let bridge = self.bridge.as_ref().context("bridge not started")?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(s) = bridge.status().await {
                if let Some(l) = s["links"]
                    .as_array()
                    .and_then(|ls| ls.iter().find(|l| l["queue"] == queue))
                {
                    if l["state"] == state {
                        return Ok(l.clone());
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                let s = bridge.status().await.ok();
                anyhow::bail!(
                    "link {queue} not {state} within {within:?}; status: {s:?}\nlog:\n{}",
                    bridge.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Publish `body` to the control exchange on `ch` exactly as given, with `user` (the node's
/// broker login) as `user_id`, and wait for the broker's confirm if the channel has them.
pub async fn publish_raw_control(ch: &Channel, user: &str, body: &[u8]) -> Result<()> {
    use lapin::{options::BasicPublishOptions, BasicProperties};
    ch.basic_publish(
        CONTROL_EXCHANGE.into(),
        "".into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default()
            .with_content_type("application/x-protobuf".into())
            .with_user_id(user.into()),
    )
    .await?
    .await?;
    Ok(())
}

/// Append field `field` as a varint to an encoded protobuf message: an addition of a newer
/// minor release of the control protocol, which this build does not know.
pub fn append_varint_field(mut msg: Vec<u8>, field: u64, value: u64) -> Vec<u8> {
    for mut v in [field << 3, value] {
        while v >= 0x80 {
            msg.push((v as u8) | 0x80);
            v >>= 7;
        }
        msg.push(v as u8);
    }
    msg
}

/// Declare a durable classic queue (inbox, dead-letter) so tests can read it before a
/// daemon declared it.
pub async fn declare_queue(ch: &Channel, queue: &str) -> Result<()> {
    declare_durable(ch, queue, topology::plain_queue_args(QueueType::Classic)).await
}

async fn declare_durable(ch: &Channel, queue: &str, args: FieldTable) -> Result<()> {
    ch.queue_declare(
        ShortString::from(queue),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .with_context(|| format!("declaring {queue}"))?;
    Ok(())
}

/// Declare the notify fanout exchange and bind a new exclusive queue to it (what a node
/// does to hear snapshot requests and link status events); returns the queue name.
pub async fn bind_notify_queue(ch: &Channel) -> Result<ShortString> {
    Ok(drawbridge_node::bind_notify_queue(ch, NOTIFY_EXCHANGE).await?)
}

impl Org {
    /// Answer the bridge's snapshot requests with `links` (as the node would), and send one
    /// snapshot right away for a bridge that is already waiting.
    pub async fn answer_snapshot_requests(
        &self,
        links: Vec<PeerLink>,
    ) -> Result<SnapshotResponder> {
        let identity = self.legal_name.clone();
        Ok(self
            .node
            .answer_snapshot_requests(self.broker_uris.clone(), move || Snapshot {
                node_identity: identity.clone(),
                inbox_queues: vec![INBOX.to_string()],
                links: links.clone(),
            })
            .await?)
    }
}
