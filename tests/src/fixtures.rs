//! Fixtures shared by the integration tests: the legal names of the test organisations,
//! the usual two-organisation world on the shared RabbitMQ node, a link brought up between
//! them, and verifiable message streams sent and counted through it.
//!
//! Each helper does exactly what the tests used to spell out in place, in the same order,
//! so a test that calls one runs the same steps with the same timeouts.

use std::time::Duration;

use anyhow::Result;
use drawbridge_certs::devpki::{self, DevNetwork};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection,
};

use crate::{
    rabbit::{shared_node, RabbitNode},
    stream::{self, PublishSpec, Report, Tally},
    world::{self, Org, INBOX},
};

/// Bank A's legal name: the usual sending organisation.
pub const BANK_A: &str = "O=Bank A, L=London, C=GB";
/// Bank B's legal name: the usual receiving organisation.
pub const BANK_B: &str = "O=Bank B, L=Paris, C=FR";
/// Bank C's legal name: a third organisation (the fault suite's stalled peer).
pub const BANK_C: &str = "O=Bank C, L=Berlin, C=DE";

/// Two organisations, each on a fresh vhost of one RabbitMQ node, with the files of one dev
/// PKI network; nothing started.
///
/// The organisations come first and the directory last, so that when a `TwoOrgs` is dropped
/// whole the daemons stop before their directory goes.
#[derive(Debug)]
pub struct TwoOrgs {
    /// The first organisation (`net.nodes[0]`, on `va`).
    pub a: Org,
    /// The second organisation (`net.nodes[1]`, on `vb`).
    pub b: Org,
    /// The RabbitMQ node both vhosts are on.
    pub node: &'static RabbitNode,
    /// A's vhost.
    pub va: String,
    /// B's vhost.
    pub vb: String,
    /// The dev PKI network both belong to (root CA, each node's files).
    pub net: DevNetwork,
    /// Where the PKI, the configs and the logs are (removed when dropped).
    pub dir: tempfile::TempDir,
}

/// Bank A ([`BANK_A`]) and Bank B ([`BANK_B`]) on fresh vhosts of the shared RabbitMQ node
/// (see [`two_orgs_on`]).
pub async fn two_orgs() -> Result<TwoOrgs> {
    two_orgs_named(BANK_A, BANK_B).await
}

/// Organisations named `a` and `b` on fresh vhosts of the shared RabbitMQ node (see
/// [`two_orgs_on`]).
pub async fn two_orgs_named(a: &str, b: &str) -> Result<TwoOrgs> {
    drawbridge_certs::install_crypto_provider();
    let node = shared_node().await;
    two_orgs_on(node, a, b).await
}

/// Organisations named `a` and `b` on `node`: installs the crypto provider, makes a
/// temporary directory with a dev PKI network of the two under `pki/`, then a fresh vhost
/// for A and one for B, and an [`Org`] for each on its vhost. Nothing is started.
pub async fn two_orgs_on(node: &'static RabbitNode, a: &str, b: &str) -> Result<TwoOrgs> {
    drawbridge_certs::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let names = [a.parse()?, b.parse()?];
    let net = devpki::generate_network(&dir.path().join("pki"), &names)?;
    let va = node.fresh_vhost().await?;
    let vb = node.fresh_vhost().await?;
    let a = Org::new(net.nodes[0].clone(), vec![node.amqp_uri(&va)], dir.path());
    let b = Org::new(net.nodes[1].clone(), vec![node.amqp_uri(&vb)], dir.path());
    Ok(TwoOrgs {
        a,
        b,
        node,
        va,
        vb,
        net,
        dir,
    })
}

/// A link from `from` to `to`, up: starts `to`'s float (`float_extra` `[float]` lines), then
/// `from`'s bridge (`bridge_extra` `[bridge]` lines), asks the bridge for the link
/// (CreateLink) and waits until its `/status` shows it up, at most `within`. Returns the
/// link's queue (`from.queue_to(to)`).
pub async fn link_up(
    from: &mut Org,
    to: &mut Org,
    float_extra: &str,
    bridge_extra: &str,
    within: Duration,
) -> Result<String> {
    to.start_float(float_extra).await?;
    from.start_bridge(bridge_extra).await?;
    from.create_link_to(to).await?;
    let queue = from.queue_to(to);
    from.wait_link_state(&queue, "up", within).await?;
    Ok(queue)
}

/// Links both ways between `a` and `b`, up: starts A's float, B's float, A's bridge and B's
/// bridge (no extra settings), creates the link A → B and the link B → A, then waits until
/// each bridge shows its link up, at most `within` each.
pub async fn links_up_both_ways(a: &mut Org, b: &mut Org, within: Duration) -> Result<()> {
    a.start_float("").await?;
    b.start_float("").await?;
    a.start_bridge("").await?;
    b.start_bridge("").await?;
    a.create_link_to(b).await?;
    b.create_link_to(a).await?;
    a.wait_link_state(&a.queue_to(b), "up", within).await?;
    b.wait_link_state(&b.queue_to(a), "up", within).await?;
    Ok(())
}

/// Publish messages `0..n` of run `run` (256 bytes each, no extra headers) on `from`'s peer
/// queue for `to`, declaring that queue first (classic); see [`send_sized`].
pub async fn send(from: &Org, to: &Org, run: &str, n: u64) -> Result<()> {
    send_sized(from, to, run, n, 256, vec![]).await
}

/// [`send`] with `headers` on every message.
pub async fn send_with_headers(
    from: &Org,
    to: &Org,
    run: &str,
    n: u64,
    headers: Vec<(String, String)>,
) -> Result<()> {
    send_sized(from, to, run, n, 256, headers).await
}

/// Publish messages `0..n` of run `run`, `size` bytes each with `headers`, addressed to
/// `to`'s legal name, on `from`'s peer queue for `to`: declares that queue (classic) on a
/// channel of its own, then publishes with confirms.
pub async fn send_sized(
    from: &Org,
    to: &Org,
    run: &str,
    n: u64,
    size: usize,
    headers: Vec<(String, String)>,
) -> Result<()> {
    let (_c, ch) = from.channel().await?;
    let q = from.queue_to(to);
    world::declare_peer_queue(&ch, &q, "classic").await?;
    let spec = PublishSpec {
        run: run.to_string(),
        from: 0,
        to: n,
        size,
        destination: to.legal_name.clone(),
        headers,
    };
    stream::publish(&ch, &q, &spec, |_| {}).await
}

/// Read `at`'s inbox (declared first) until the `n` messages of run `run` arrived or nothing
/// came for 30 s; the report counts those whose authenticated sender is not `sender`.
pub async fn receive(at: &Org, run: &str, n: u64, sender: &str) -> Result<Report> {
    receive_within(at, run, n, sender, Duration::from_secs(30)).await
}

/// [`receive`] giving up after `idle` of silence.
pub async fn receive_within(
    at: &Org,
    run: &str,
    n: u64,
    sender: &str,
    idle: Duration,
) -> Result<Report> {
    let (_c, ch) = at.channel().await?;
    world::declare_queue(&ch, INBOX).await?;
    let mut tally = Tally::new(run, n, Some(sender.to_string()));
    stream::consume(&ch, INBOX, &mut tally, idle, |_| {}).await?;
    Ok(tally.report())
}

/// Publish messages `0..count` of run `run` (256 bytes each) on `from`'s peer queue for
/// `to`, which the bridge declared (this does not), then read `to`'s inbox until all arrived
/// or nothing came for `idle` ([`receive_within`], sender `from`). What to make of the
/// report is the caller's.
pub async fn send_and_receive(
    from: &Org,
    to: &Org,
    run: &str,
    count: u64,
    idle: Duration,
) -> Result<Report> {
    let (_c, ch) = from.channel().await?;
    let spec = PublishSpec {
        run: run.into(),
        from: 0,
        to: count,
        size: 256,
        destination: to.legal_name.clone(),
        headers: vec![],
    };
    stream::publish(&ch, &from.queue_to(to), &spec, |_| {}).await?;
    receive_within(to, run, count, &from.legal_name, idle).await
}

/// A header table holding only `drawbridge-destination` = `destination`, what a node puts on
/// each message for a peer.
pub fn destination_headers(destination: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        "drawbridge-destination".into(),
        AMQPValue::LongString(destination.into()),
    );
    h
}

/// A channel of `from`'s node for publishing by hand on its peer queue for `to`: connects,
/// declares that queue (classic) and puts the channel in confirm mode. Returns the
/// connection (keep it while the channel is used), the channel and the queue.
pub async fn peer_queue_channel(from: &Org, to: &Org) -> Result<(Connection, Channel, String)> {
    let q = from.queue_to(to);
    let (c, ch) = from.channel().await?;
    world::declare_peer_queue(&ch, &q, "classic").await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((c, ch, q))
}

/// Publish `body` with `props` to `queue` through the default exchange and wait for the
/// broker's confirmation (on a channel in confirm mode; otherwise there is none to wait for).
pub async fn publish_raw(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<()> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await?
    .await?;
    Ok(())
}
