//! A member's own AMQP 1.0 connection to a float, through the bridge's peer client
//! (`drawbridge_bridge::peer`) but driven by the test: what the hostile-member and revocation
//! tests send a float directly, without a bridge in between.

use std::{path::Path, time::Duration};

use crate::fe2o3_peer::{self as peer, PeerConnection, PeerSettings};
use anyhow::{Context, Result};
use drawbridge_certs::{TlsIdentity, TlsPolicy};
use drawbridge_control_protocol::Target;
use fe2o3_amqp::types::{
    messaging::{AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties},
    primitives::{SimpleValue, Value},
};

use crate::world::Org;

/// How `from` connects to `to`'s float presenting the certificate `cert` and its key `key`:
/// `from`'s trust roots, `to`'s legal name expected (TLS 1.3 only), a connect timeout of
/// 10 s, an idle timeout of 30 s, container `container_id`, link `link_name`, the default
/// target address, no canary.
pub fn peer_settings(
    from: &Org,
    to: &Org,
    cert: &Path,
    key: &Path,
    container_id: &str,
    link_name: &str,
) -> Result<PeerSettings> {
    let identity = TlsIdentity::load(cert, key)?;
    let roots = drawbridge_certs::load_trust_roots(&from.files.root_cert)?;
    let tls = drawbridge_certs::client_config(
        &identity,
        roots,
        vec![to.legal_name.parse()?],
        TlsPolicy::Tls13Only,
    )?;
    Ok(PeerSettings {
        tls,
        connect_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        container_id: container_id.into(),
        link_name: link_name.into(),
        address: drawbridge_control_protocol::DEFAULT_TARGET_ADDRESS.into(),
        canary_address: None,
        proxy: None,
    })
}

/// How `b` (the attacker, a genuine member with its own TLS certificate) connects to `a`'s
/// float: [`peer_settings`] with container `mallory` and link `link_name`.
pub fn attacker_settings(b: &Org, a: &Org, link_name: &str) -> Result<PeerSettings> {
    peer_settings(
        b,
        a,
        &b.files.tls_cert,
        &b.files.tls_key,
        "mallory",
        link_name,
    )
}

/// `b`, the attacker, connected to `a`'s float ([`attacker_settings`] with link `link_name`).
pub async fn attacker_connects(b: &Org, a: &Org, link_name: &str) -> Result<PeerConnection> {
    let target = Target::new("127.0.0.1", a.float_port);
    peer::connect(&target, &attacker_settings(b, a, link_name)?)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// A message from the attacker to `a` on `c`: message id `id`, `drawbridge-destination`
/// set to `a`'s legal name, a 3-byte binary body, then `edit` applied. Returns the float's
/// outcome (`Debug` of it); fails if no disposition came within 10 s.
pub async fn attacker_sends(
    c: &mut PeerConnection,
    a: &Org,
    id: &str,
    edit: impl FnOnce(&mut Message<Body<Value>>),
) -> Result<String> {
    let mut app = ApplicationProperties::default();
    app.0.insert(
        "drawbridge-destination".into(),
        SimpleValue::String(a.legal_name.clone()),
    );
    let mut msg = Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String(id.into())),
            ..Default::default()
        })
        .application_properties(app)
        .body(Body::Value(AmqpValue(Value::Binary(vec![1, 2, 3].into()))))
        .build();
    edit(&mut msg);
    let outcome = tokio::time::timeout(Duration::from_secs(10), c.sender.send(msg))
        .await
        .context("no disposition within 10 s")??;
    Ok(format!("{outcome:?}"))
}
