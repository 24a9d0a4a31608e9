//! Validated domain types and their conversions to and from the wire types.

use std::collections::HashSet;
use std::fmt;

use crate::{proto, validate, DecodeError, Target, DEFAULT_TARGET_ADDRESS};

/// One outbound link the node wants: forward everything on `queue` to a peer.
///
/// The bridge dials the `targets` in turn and accepts the peer only if its TLS certificate's
/// subject is one of `legal_names` (pinning), then attaches to `target_address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    /// Broker queue holding the messages for this peer (the link's identity).
    pub queue: String,
    /// Peer endpoints, tried in order; at least one.
    pub targets: Vec<Target>,
    /// X.500 legal names the peer's certificate subject may have; at least one.
    pub legal_names: Vec<String>,
    /// AMQP 1.0 address to attach to; [`DEFAULT_TARGET_ADDRESS`] unless the node set one.
    pub target_address: String,
}

/// The node's complete desired state; the bridge creates missing links and deletes the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Legal name (or configured id) of the node, used to check the sender and for logs.
    pub node_identity: String,
    /// Queues the node consumes its inbound messages from (where the float delivers).
    pub inbox_queues: Vec<String>,
    /// Every link that should run; queues are unique.
    pub links: Vec<PeerLink>,
}

/// Create (or replace) one link; idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateLink {
    /// Identity of the node sending the command.
    pub node_identity: String,
    /// The link to run.
    pub link: PeerLink,
}

/// Stop forwarding from one queue; idempotent. The queue and its messages stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteLink {
    /// Identity of the node sending the command.
    pub node_identity: String,
    /// Queue of the link to stop.
    pub queue: String,
}

/// The bridge asking the node for a [`Snapshot`] (on start, reconnect, promotion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// Which bridge instance asks, so the node's logs can tell instances apart.
    pub bridge_id: String,
}

/// Life-cycle state of one link, as reported to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Dialling or handshaking with the peer.
    Connecting,
    /// Attached and forwarding.
    Up,
    /// Not connected; the bridge keeps retrying with backoff.
    Down,
    /// Removed by a `DeleteLink` or a snapshot; no more retries.
    Deleted,
}

impl LinkState {
    /// Lower-case word for logs, metrics labels and `/status` JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Up => "up",
            Self::Down => "down",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of one link's state, sent by the bridge so the node can see its links' health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    /// Bridge instance reporting.
    pub bridge_id: String,
    /// Queue of the link concerned; the control exchange's name when the bridge reports a
    /// refused control message (state [`LinkState::Down`], `reason` starting with `refused:`).
    pub queue: String,
    /// The new state.
    pub state: LinkState,
    /// Peer endpoint or legal name concerned (may be empty).
    pub peer: String,
    /// Why the state changed, e.g. the last connection error (may be empty).
    pub reason: String,
    /// When it changed, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// wire -> domain (validating)

/// Adds "where" context to an error from a nested message, keeping the field name.
fn within(err: DecodeError, context: impl fmt::Display) -> DecodeError {
    match err {
        DecodeError::Invalid { field, reason } => DecodeError::Invalid {
            field,
            reason: format!("{reason} ({context})"),
        },
        other => other,
    }
}

impl TryFrom<proto::PeerLink> for PeerLink {
    type Error = DecodeError;

    fn try_from(p: proto::PeerLink) -> Result<Self, Self::Error> {
        validate::queue_name("queue", &p.queue)?;
        let in_link = |err| within(err, format_args!("link for queue `{}`", p.queue));
        if p.targets.is_empty() {
            return Err(in_link(DecodeError::invalid(
                "targets",
                "a link needs at least one target host:port",
            )));
        }
        let targets = p
            .targets
            .iter()
            .map(|t| {
                t.parse::<Target>()
                    .map_err(|e| in_link(DecodeError::invalid("targets", e.to_string())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if p.legal_names.is_empty() {
            return Err(in_link(DecodeError::invalid(
                "legal_names",
                "a link needs at least one expected peer legal name",
            )));
        }
        for name in &p.legal_names {
            validate::legal_name("legal_names", name).map_err(in_link)?;
        }
        let target_address = match p.target_address {
            Some(a) if !a.trim().is_empty() => a,
            _ => DEFAULT_TARGET_ADDRESS.to_owned(),
        };
        Ok(Self {
            queue: p.queue,
            targets,
            legal_names: p.legal_names.iter().map(|n| n.trim().to_owned()).collect(),
            target_address,
        })
    }
}

impl TryFrom<proto::Snapshot> for Snapshot {
    type Error = DecodeError;

    fn try_from(p: proto::Snapshot) -> Result<Self, Self::Error> {
        validate::non_empty("node_identity", &p.node_identity)?;
        for q in &p.inbox_queues {
            validate::queue_name("inbox_queues", q)?;
        }
        let links = p
            .links
            .into_iter()
            .enumerate()
            .map(|(i, l)| PeerLink::try_from(l).map_err(|e| within(e, format_args!("links[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        for link in &links {
            if !seen.insert(link.queue.as_str()) {
                return Err(DecodeError::invalid(
                    "links",
                    format!("queue `{}` appears in more than one link", link.queue),
                ));
            }
            if p.inbox_queues.contains(&link.queue) {
                return Err(DecodeError::invalid(
                    "links",
                    format!(
                        "queue `{}` is both an inbox queue and a peer link queue",
                        link.queue
                    ),
                ));
            }
        }
        Ok(Self {
            node_identity: p.node_identity,
            inbox_queues: p.inbox_queues,
            links,
        })
    }
}

impl TryFrom<proto::CreateLink> for CreateLink {
    type Error = DecodeError;

    fn try_from(p: proto::CreateLink) -> Result<Self, Self::Error> {
        validate::non_empty("node_identity", &p.node_identity)?;
        let link = p.link.ok_or(DecodeError::Missing("link"))?.try_into()?;
        Ok(Self {
            node_identity: p.node_identity,
            link,
        })
    }
}

impl TryFrom<proto::DeleteLink> for DeleteLink {
    type Error = DecodeError;

    fn try_from(p: proto::DeleteLink) -> Result<Self, Self::Error> {
        validate::non_empty("node_identity", &p.node_identity)?;
        validate::queue_name("queue", &p.queue)?;
        Ok(Self {
            node_identity: p.node_identity,
            queue: p.queue,
        })
    }
}

impl TryFrom<proto::SnapshotRequest> for SnapshotRequest {
    type Error = DecodeError;

    fn try_from(p: proto::SnapshotRequest) -> Result<Self, Self::Error> {
        validate::non_empty("bridge_id", &p.bridge_id)?;
        Ok(Self {
            bridge_id: p.bridge_id,
        })
    }
}

impl TryFrom<proto::LinkState> for LinkState {
    type Error = DecodeError;

    fn try_from(p: proto::LinkState) -> Result<Self, Self::Error> {
        match p {
            proto::LinkState::Unspecified => Err(DecodeError::invalid(
                "state",
                "link state is LINK_STATE_UNSPECIFIED",
            )),
            proto::LinkState::Connecting => Ok(Self::Connecting),
            proto::LinkState::Up => Ok(Self::Up),
            proto::LinkState::Down => Ok(Self::Down),
            proto::LinkState::Deleted => Ok(Self::Deleted),
        }
    }
}

impl TryFrom<proto::LinkStatus> for LinkStatus {
    type Error = DecodeError;

    fn try_from(p: proto::LinkStatus) -> Result<Self, Self::Error> {
        validate::non_empty("bridge_id", &p.bridge_id)?;
        validate::queue_name("queue", &p.queue)?;
        let state = proto::LinkState::try_from(p.state)
            .map_err(|_| DecodeError::invalid("state", format!("unknown link state {}", p.state)))?
            .try_into()?;
        Ok(Self {
            bridge_id: p.bridge_id,
            queue: p.queue,
            state,
            peer: p.peer,
            reason: p.reason,
            timestamp_ms: p.timestamp_ms,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// domain -> wire

impl From<PeerLink> for proto::PeerLink {
    fn from(d: PeerLink) -> Self {
        Self {
            queue: d.queue,
            targets: d.targets.iter().map(Target::to_string).collect(),
            legal_names: d.legal_names,
            target_address: Some(d.target_address),
        }
    }
}

impl From<Snapshot> for proto::Snapshot {
    fn from(d: Snapshot) -> Self {
        Self {
            node_identity: d.node_identity,
            inbox_queues: d.inbox_queues,
            links: d.links.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<CreateLink> for proto::CreateLink {
    fn from(d: CreateLink) -> Self {
        Self {
            node_identity: d.node_identity,
            link: Some(d.link.into()),
        }
    }
}

impl From<DeleteLink> for proto::DeleteLink {
    fn from(d: DeleteLink) -> Self {
        Self {
            node_identity: d.node_identity,
            queue: d.queue,
        }
    }
}

impl From<SnapshotRequest> for proto::SnapshotRequest {
    fn from(d: SnapshotRequest) -> Self {
        Self {
            bridge_id: d.bridge_id,
        }
    }
}

impl From<LinkState> for proto::LinkState {
    fn from(d: LinkState) -> Self {
        match d {
            LinkState::Connecting => Self::Connecting,
            LinkState::Up => Self::Up,
            LinkState::Down => Self::Down,
            LinkState::Deleted => Self::Deleted,
        }
    }
}

impl From<LinkStatus> for proto::LinkStatus {
    fn from(d: LinkStatus) -> Self {
        Self {
            bridge_id: d.bridge_id,
            queue: d.queue,
            state: proto::LinkState::from(d.state) as i32,
            peer: d.peer,
            reason: d.reason,
            timestamp_ms: d.timestamp_ms,
        }
    }
}
