//! The versioned envelopes: what actually travels on the control and notify exchanges.

use prost::Message as _;

use crate::proto::{self, control_message, notify_message};
use crate::{
    CreateLink, DecodeError, DeleteLink, LinkStatus, Snapshot, SnapshotRequest, PROTOCOL_VERSION,
};

/// A node → bridge message (body of a `ControlMessage` envelope on `drawbridge.control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlCommand {
    /// The full desired link set.
    Snapshot(Snapshot),
    /// Start (or replace) one link.
    CreateLink(CreateLink),
    /// Stop one link.
    DeleteLink(DeleteLink),
}

/// A control command with the sender's sequence number: what a `ControlMessage` envelope carries.
///
/// The sequence orders a node's control messages: for each node identity a bridge applies only
/// messages whose sequence is higher than the highest it has applied, so an older snapshot
/// never undoes a newer create or delete. `0` means unsequenced (a sender that predates the
/// field); bridges apply those as they arrive, with a warning.
///
/// The epoch says which run of the sender's sequence source the number comes from: a bridge
/// restarts its ordering for a node at an epoch it has not seen, so a node whose sequence went
/// wrong (a clock far ahead, `u64::MAX`) recovers by starting a new epoch (see the `.proto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequencedCommand {
    /// Per-node monotonic sequence number; `0` = unsequenced.
    pub sequence: u64,
    /// Random id of the sender's sequence source; `0` = a sender without epochs.
    pub epoch: u64,
    /// The command.
    pub command: ControlCommand,
}

impl SequencedCommand {
    /// Serialises into a `ControlMessage` carrying [`PROTOCOL_VERSION`] and the sequence.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = proto::ControlMessage::from(self.command.clone());
        p.sequence = self.sequence;
        p.epoch = self.epoch;
        p.encode_to_vec()
    }

    /// Parses and validates a message body received from the broker, keeping its sequence.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let p = decode_control(bytes)?;
        let (sequence, epoch) = (p.sequence, p.epoch);
        Ok(Self {
            sequence,
            epoch,
            command: p.try_into()?,
        })
    }

    /// Whether the sender numbered this message (`sequence != 0`).
    pub fn is_sequenced(&self) -> bool {
        self.sequence != 0
    }
}

/// A bridge → node message (body of a `NotifyMessage` envelope on `drawbridge.notify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// The bridge needs a snapshot.
    SnapshotRequest(SnapshotRequest),
    /// A link changed state.
    LinkStatus(LinkStatus),
}

/// Envelope field numbers `ControlMessage` has in this build's schema.
const CONTROL_FIELDS: &[u32] = &[1, 2, 3, 4, 5, 16];
/// Envelope field numbers `NotifyMessage` has in this build's schema.
const NOTIFY_FIELDS: &[u32] = &[1, 2, 3];

/// Decodes a `ControlMessage` envelope and applies the compatibility rules (see
/// [`decode_checked`]); the body is validated by the caller.
fn decode_control(bytes: &[u8]) -> Result<proto::ControlMessage, DecodeError> {
    decode_checked(
        bytes,
        CONTROL_FIELDS,
        |p: &proto::ControlMessage| p.version,
        |p| p.body.is_some(),
    )
}

/// Decodes an envelope and applies the compatibility rules shared by both directions.
///
/// - A newer major is refused ([`DecodeError::UnsupportedVersion`]) even when this build cannot
///   parse the rest: `version` is field 1, a varint, in every major, so it can always be read.
/// - Unknown fields are ignored (prost drops them), which is what lets a same-major sender add
///   optional fields.
/// - An unset body is [`DecodeError::UnknownBody`] when the envelope holds a field number this
///   schema does not define (a newer sender's new body variant: protobuf cannot tell it from
///   any other unknown field, and a conforming sender always sets a body), and
///   [`DecodeError::Missing`] otherwise (malformed).
fn decode_checked<M: prost::Message + Default>(
    bytes: &[u8],
    known: &[u32],
    version: impl Fn(&M) -> u32,
    has_body: impl Fn(&M) -> bool,
) -> Result<M, DecodeError> {
    let p = match M::decode(bytes) {
        Ok(p) => p,
        Err(e) => {
            return Err(match scan(bytes, known) {
                Some(WireScan {
                    version: Some(v), ..
                }) if v > PROTOCOL_VERSION => unsupported(v),
                _ => DecodeError::Protobuf(e),
            })
        }
    };
    check_version(version(&p))?;
    if !has_body(&p) {
        if let Some(field) = scan(bytes, known).and_then(|s| s.first_unknown) {
            return Err(DecodeError::UnknownBody { field });
        }
    }
    Ok(p)
}

/// What a schema-less look at an envelope's top-level fields finds.
#[derive(Debug, Default, PartialEq, Eq)]
struct WireScan {
    /// The last field 1 varint (`version`), as protobuf's "last one wins" reads it.
    version: Option<u32>,
    /// The first field number not in the schema.
    first_unknown: Option<u32>,
}

/// Walks the top-level fields of a protobuf message without its schema; `None` if the bytes
/// are not well-formed protobuf.
///
/// Written here rather than with `prost::encoding`, which is prost's hidden, unstable API.
fn scan(mut buf: &[u8], known: &[u32]) -> Option<WireScan> {
    let mut out = WireScan::default();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = u32::try_from(key >> 3).ok().filter(|f| *f != 0)?;
        match key & 7 {
            0 => {
                let v = varint(&mut buf)?;
                if field == 1 {
                    // uint32 semantics: protobuf truncates to the low 32 bits.
                    out.version = Some(v as u32);
                }
            }
            1 => buf = buf.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                buf = buf.get(len..)?;
            }
            5 => buf = buf.get(4..)?,
            // Groups (3, 4) are long deprecated and never used by this protocol.
            _ => return None,
        }
        if !known.contains(&field) && out.first_unknown.is_none() {
            out.first_unknown = Some(field);
        }
    }
    Some(out)
}

/// Reads one base-128 varint from the front of `buf`.
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn unsupported(found: u32) -> DecodeError {
    DecodeError::UnsupportedVersion {
        found,
        supported: PROTOCOL_VERSION,
    }
}

/// Applies the version rules shared by both envelopes: any major up to ours is understood
/// (older senders included), a newer one is not.
fn check_version(version: u32) -> Result<(), DecodeError> {
    match version {
        0 => Err(DecodeError::MissingVersion),
        v if v > PROTOCOL_VERSION => Err(unsupported(v)),
        _ => Ok(()),
    }
}

impl ControlCommand {
    /// Serialises into an unsequenced `ControlMessage` carrying [`PROTOCOL_VERSION`].
    ///
    /// Nodes should publish a [`SequencedCommand`] instead, so that bridges can order them.
    pub fn encode(&self) -> Vec<u8> {
        proto::ControlMessage::from(self.clone()).encode_to_vec()
    }

    /// Parses and validates a message body received from the broker (dropping the sequence;
    /// see [`SequencedCommand::decode`]).
    ///
    /// Fails on malformed protobuf, a missing or newer (major) version, a missing body, or any
    /// field that does not pass validation; the error says which and why. Unknown fields are
    /// ignored; a body this build does not know (a newer node's new command) fails with
    /// [`DecodeError::UnknownBody`], which a receiver skips rather than treats as malformed.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_control(bytes)?.try_into()
    }

    /// The `node_identity` a control message claims, read as well as this build can: for the
    /// log line and notification of a message that is refused (a newer major, say) so the
    /// operator knows which node to look at.
    ///
    /// Best effort and unauthenticated: it reads the body with this build's schema (every body
    /// so far has the identity as its field 1) and gives `None` when that does not work.
    pub fn sender_identity(bytes: &[u8]) -> Option<String> {
        let body = proto::ControlMessage::decode(bytes).ok()?.body?;
        let node = match body {
            control_message::Body::Snapshot(s) => s.node_identity,
            control_message::Body::CreateLink(c) => c.node_identity,
            control_message::Body::DeleteLink(d) => d.node_identity,
        };
        (!node.trim().is_empty()).then_some(node)
    }

    /// Short name of the command for logs and metric labels: `snapshot`, `create_link`,
    /// `delete_link`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Snapshot(_) => "snapshot",
            Self::CreateLink(_) => "create_link",
            Self::DeleteLink(_) => "delete_link",
        }
    }

    /// The identity the sending node claims, so the bridge can check it against its config.
    pub fn node_identity(&self) -> &str {
        match self {
            Self::Snapshot(s) => &s.node_identity,
            Self::CreateLink(c) => &c.node_identity,
            Self::DeleteLink(d) => &d.node_identity,
        }
    }
}

impl Notification {
    /// Serialises into a `NotifyMessage` carrying [`PROTOCOL_VERSION`], ready to publish.
    pub fn encode(&self) -> Vec<u8> {
        proto::NotifyMessage::from(self.clone()).encode_to_vec()
    }

    /// Parses and validates a message body received from the broker (node side).
    ///
    /// A notification of a kind this build does not know (from a newer bridge of the same
    /// major) fails with [`DecodeError::UnknownBody`]: skip it, it is not for this node.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_checked(
            bytes,
            NOTIFY_FIELDS,
            |p: &proto::NotifyMessage| p.version,
            |p| p.body.is_some(),
        )?
        .try_into()
    }

    /// Short name of the notification for logs: `snapshot_request`, `link_status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SnapshotRequest(_) => "snapshot_request",
            Self::LinkStatus(_) => "link_status",
        }
    }
}

impl TryFrom<proto::ControlMessage> for ControlCommand {
    type Error = DecodeError;

    fn try_from(p: proto::ControlMessage) -> Result<Self, Self::Error> {
        check_version(p.version)?;
        match p.body.ok_or(DecodeError::Missing("body"))? {
            control_message::Body::Snapshot(s) => Ok(Self::Snapshot(s.try_into()?)),
            control_message::Body::CreateLink(c) => Ok(Self::CreateLink(c.try_into()?)),
            control_message::Body::DeleteLink(d) => Ok(Self::DeleteLink(d.try_into()?)),
        }
    }
}

impl From<ControlCommand> for proto::ControlMessage {
    fn from(d: ControlCommand) -> Self {
        let body = match d {
            ControlCommand::Snapshot(s) => control_message::Body::Snapshot(s.into()),
            ControlCommand::CreateLink(c) => control_message::Body::CreateLink(c.into()),
            ControlCommand::DeleteLink(x) => control_message::Body::DeleteLink(x.into()),
        };
        Self {
            version: PROTOCOL_VERSION,
            body: Some(body),
            sequence: 0,
            epoch: 0,
        }
    }
}

impl TryFrom<proto::NotifyMessage> for Notification {
    type Error = DecodeError;

    fn try_from(p: proto::NotifyMessage) -> Result<Self, Self::Error> {
        check_version(p.version)?;
        match p.body.ok_or(DecodeError::Missing("body"))? {
            notify_message::Body::SnapshotRequest(r) => Ok(Self::SnapshotRequest(r.try_into()?)),
            notify_message::Body::LinkStatus(s) => Ok(Self::LinkStatus(s.try_into()?)),
        }
    }
}

impl From<Notification> for proto::NotifyMessage {
    fn from(d: Notification) -> Self {
        let body = match d {
            Notification::SnapshotRequest(r) => notify_message::Body::SnapshotRequest(r.into()),
            Notification::LinkStatus(s) => notify_message::Body::LinkStatus(s.into()),
        };
        Self {
            version: PROTOCOL_VERSION,
            body: Some(body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LinkState, PeerLink, Target, DEFAULT_TARGET_ADDRESS};

    const BANK_A: &str = "O=Bank A, L=London, C=GB";
    const BANK_B: &str = "O=Bank B, L=Paris, C=FR";

    fn link(queue: &str) -> PeerLink {
        PeerLink {
            queue: queue.into(),
            targets: vec![Target::new("float.bank-b", 5671), Target::new("::1", 5672)],
            legal_names: vec![BANK_B.into()],
            target_address: DEFAULT_TARGET_ADDRESS.into(),
        }
    }

    fn proto_link(queue: &str) -> proto::PeerLink {
        proto::PeerLink {
            queue: queue.into(),
            targets: vec!["float.bank-b:5671".into()],
            legal_names: vec![BANK_B.into()],
            target_address: None,
        }
    }

    fn control(body: control_message::Body) -> Vec<u8> {
        proto::ControlMessage {
            version: PROTOCOL_VERSION,
            body: Some(body),
            sequence: 0,
            epoch: 0,
        }
        .encode_to_vec()
    }

    fn snapshot_bytes(s: proto::Snapshot) -> Vec<u8> {
        control(control_message::Body::Snapshot(s))
    }

    fn decode_err(bytes: &[u8]) -> DecodeError {
        ControlCommand::decode(bytes).unwrap_err()
    }

    fn assert_invalid(err: DecodeError, want_field: &str, needle: &str) {
        match &err {
            DecodeError::Invalid { field, reason } => {
                assert_eq!(*field, want_field, "{err}");
                assert!(reason.contains(needle), "`{needle}` not in: {err}");
                assert!(err.to_string().contains(want_field), "{err}");
            }
            other => panic!("expected Invalid({want_field}), got {other:?}"),
        }
    }

    #[test]
    fn control_commands_round_trip() {
        let commands = [
            ControlCommand::Snapshot(Snapshot {
                node_identity: BANK_A.into(),
                inbox_queues: vec!["drawbridge.inbox".into()],
                links: vec![link("drawbridge.peers.b"), link("drawbridge.peers.c")],
            }),
            ControlCommand::Snapshot(Snapshot {
                node_identity: BANK_A.into(),
                inbox_queues: vec![],
                links: vec![],
            }),
            ControlCommand::CreateLink(CreateLink {
                node_identity: BANK_A.into(),
                link: PeerLink {
                    target_address: "queue://other".into(),
                    ..link("drawbridge.peers.b")
                },
            }),
            ControlCommand::DeleteLink(DeleteLink {
                node_identity: BANK_A.into(),
                queue: "drawbridge.peers.b".into(),
            }),
        ];
        for cmd in commands {
            let bytes = cmd.encode();
            let raw = proto::ControlMessage::decode(bytes.as_slice()).unwrap();
            assert_eq!(raw.version, PROTOCOL_VERSION);
            assert_eq!(ControlCommand::decode(&bytes).unwrap(), cmd);
        }
    }

    #[test]
    fn sequence_round_trips_and_is_optional_on_the_wire() {
        let command = ControlCommand::DeleteLink(DeleteLink {
            node_identity: BANK_A.into(),
            queue: "drawbridge.peers.b".into(),
        });
        let sequenced = SequencedCommand {
            sequence: 1_700_000_000_123,
            epoch: 0x5eed_0000_0000_0001,
            command: command.clone(),
        };
        let bytes = sequenced.encode();
        assert_eq!(SequencedCommand::decode(&bytes).unwrap(), sequenced);
        assert!(sequenced.is_sequenced());
        // An older receiver that only knows the command still reads it.
        assert_eq!(ControlCommand::decode(&bytes).unwrap(), command);
        // A message from a sender without the field decodes as unsequenced.
        let legacy = SequencedCommand::decode(&command.encode()).unwrap();
        assert_eq!((legacy.sequence, legacy.epoch), (0, 0));
        assert!(!legacy.is_sequenced());
        assert_eq!(legacy.command, command);
    }

    #[test]
    fn notifications_round_trip() {
        let mut all = vec![Notification::SnapshotRequest(SnapshotRequest {
            bridge_id: "bridge-1".into(),
        })];
        for state in [
            LinkState::Connecting,
            LinkState::Up,
            LinkState::Down,
            LinkState::Deleted,
        ] {
            all.push(Notification::LinkStatus(LinkStatus {
                bridge_id: "bridge-1".into(),
                queue: "drawbridge.peers.b".into(),
                state,
                peer: "float.bank-b:5671".into(),
                reason: "connection refused".into(),
                timestamp_ms: 1_700_000_000_123,
            }));
        }
        for n in all {
            let bytes = n.encode();
            assert_eq!(
                proto::NotifyMessage::decode(bytes.as_slice())
                    .unwrap()
                    .version,
                PROTOCOL_VERSION
            );
            assert_eq!(Notification::decode(&bytes).unwrap(), n);
        }
    }

    #[test]
    fn kinds_and_identity() {
        let d = ControlCommand::DeleteLink(DeleteLink {
            node_identity: BANK_A.into(),
            queue: "q".into(),
        });
        assert_eq!(d.kind(), "delete_link");
        assert_eq!(d.node_identity(), BANK_A);
        let s = ControlCommand::Snapshot(Snapshot {
            node_identity: BANK_A.into(),
            inbox_queues: vec![],
            links: vec![],
        });
        assert_eq!(s.kind(), "snapshot");
        let c = ControlCommand::CreateLink(CreateLink {
            node_identity: BANK_A.into(),
            link: link("q"),
        });
        assert_eq!(c.kind(), "create_link");
        assert_eq!(LinkState::Connecting.to_string(), "connecting");
        assert_eq!(LinkState::Up.to_string(), "up");
        assert_eq!(LinkState::Down.to_string(), "down");
        assert_eq!(LinkState::Deleted.to_string(), "deleted");
    }

    #[test]
    fn version_rules() {
        let body = Some(control_message::Body::DeleteLink(proto::DeleteLink {
            node_identity: BANK_A.into(),
            queue: "q".into(),
        }));
        let with = |version| {
            proto::ControlMessage {
                version,
                body: body.clone(),
                sequence: 0,
                epoch: 0,
            }
            .encode_to_vec()
        };
        assert_eq!(decode_err(&with(0)), DecodeError::MissingVersion);
        assert_eq!(
            decode_err(&with(PROTOCOL_VERSION + 1)),
            DecodeError::UnsupportedVersion {
                found: PROTOCOL_VERSION + 1,
                supported: PROTOCOL_VERSION
            }
        );
        let msg = decode_err(&with(7)).to_string();
        assert!(msg.contains("version 7") || msg.contains('7'), "{msg}");
        for v in 1..=PROTOCOL_VERSION {
            assert!(ControlCommand::decode(&with(v)).is_ok());
        }

        let notify = |version| {
            proto::NotifyMessage {
                version,
                body: Some(notify_message::Body::SnapshotRequest(
                    proto::SnapshotRequest {
                        bridge_id: "b".into(),
                    },
                )),
            }
            .encode_to_vec()
        };
        assert_eq!(
            Notification::decode(&notify(0)).unwrap_err(),
            DecodeError::MissingVersion
        );
        assert!(matches!(
            Notification::decode(&notify(2)).unwrap_err(),
            DecodeError::UnsupportedVersion { found: 2, .. }
        ));
        assert!(Notification::decode(&notify(1)).is_ok());
    }

    #[test]
    fn malformed_and_missing() {
        assert!(matches!(
            decode_err(&[0xff, 0xff, 0xff]),
            DecodeError::Protobuf(_)
        ));
        let empty_body = proto::ControlMessage {
            version: 1,
            body: None,
            sequence: 0,
            epoch: 0,
        }
        .encode_to_vec();
        assert_eq!(decode_err(&empty_body), DecodeError::Missing("body"));
        assert_eq!(
            Notification::decode(
                &proto::NotifyMessage {
                    version: 1,
                    body: None
                }
                .encode_to_vec()
            )
            .unwrap_err(),
            DecodeError::Missing("body")
        );
        let no_link = control(control_message::Body::CreateLink(proto::CreateLink {
            node_identity: BANK_A.into(),
            link: None,
        }));
        assert_eq!(decode_err(&no_link), DecodeError::Missing("link"));
        assert!(DecodeError::Missing("link").to_string().contains("`link`"));
    }

    #[test]
    fn empty_target_address_means_default() {
        for addr in [None, Some(String::new())] {
            let bytes = control(control_message::Body::CreateLink(proto::CreateLink {
                node_identity: BANK_A.into(),
                link: Some(proto::PeerLink {
                    target_address: addr,
                    ..proto_link("q")
                }),
            }));
            let ControlCommand::CreateLink(c) = ControlCommand::decode(&bytes).unwrap() else {
                panic!("wrong kind");
            };
            assert_eq!(c.link.target_address, DEFAULT_TARGET_ADDRESS);
        }
    }

    fn create(link: proto::PeerLink) -> Vec<u8> {
        control(control_message::Body::CreateLink(proto::CreateLink {
            node_identity: BANK_A.into(),
            link: Some(link),
        }))
    }

    #[test]
    fn link_validation() {
        assert_invalid(
            decode_err(&create(proto_link(""))),
            "queue",
            "queue name is empty",
        );
        assert_invalid(
            decode_err(&create(proto_link(&"x".repeat(256)))),
            "queue",
            "256 bytes",
        );
        assert_invalid(
            decode_err(&create(proto::PeerLink {
                targets: vec![],
                ..proto_link("q")
            })),
            "targets",
            "at least one target",
        );
        assert_invalid(
            decode_err(&create(proto::PeerLink {
                targets: vec!["float:5671".into(), "float:0".into()],
                ..proto_link("q")
            })),
            "targets",
            "float:0",
        );
        assert_invalid(
            decode_err(&create(proto::PeerLink {
                legal_names: vec![],
                ..proto_link("q")
            })),
            "legal_names",
            "at least one",
        );
        assert_invalid(
            decode_err(&create(proto::PeerLink {
                legal_names: vec![BANK_B.into(), "Bank C".into()],
                ..proto_link("q")
            })),
            "legal_names",
            "Bank C",
        );
        let no_node = control(control_message::Body::CreateLink(proto::CreateLink {
            node_identity: String::new(),
            link: Some(proto_link("q")),
        }));
        assert_invalid(decode_err(&no_node), "node_identity", "empty");
    }

    #[test]
    fn snapshot_validation() {
        let base = proto::Snapshot {
            node_identity: BANK_A.into(),
            inbox_queues: vec!["drawbridge.inbox".into()],
            links: vec![proto_link("p.b"), proto_link("p.c")],
        };
        assert!(ControlCommand::decode(&snapshot_bytes(base.clone())).is_ok());

        let dup = proto::Snapshot {
            links: vec![proto_link("p.b"), proto_link("p.b")],
            ..base.clone()
        };
        assert_invalid(decode_err(&snapshot_bytes(dup)), "links", "p.b");

        let clash = proto::Snapshot {
            inbox_queues: vec!["p.b".into()],
            ..base.clone()
        };
        assert_invalid(decode_err(&snapshot_bytes(clash)), "links", "inbox");

        let bad_inbox = proto::Snapshot {
            inbox_queues: vec![String::new()],
            ..base.clone()
        };
        assert_invalid(
            decode_err(&snapshot_bytes(bad_inbox)),
            "inbox_queues",
            "empty",
        );

        let no_node = proto::Snapshot {
            node_identity: "  ".into(),
            ..base.clone()
        };
        assert_invalid(
            decode_err(&snapshot_bytes(no_node)),
            "node_identity",
            "empty",
        );

        let bad_link = proto::Snapshot {
            links: vec![
                proto_link("p.b"),
                proto::PeerLink {
                    targets: vec!["nope".into()],
                    ..proto_link("p.c")
                },
            ],
            ..base
        };
        let err = decode_err(&snapshot_bytes(bad_link));
        assert_invalid(err.clone(), "targets", "links[1]");
        assert!(err.to_string().contains("p.c"), "{err}");
    }

    #[test]
    fn delete_and_notify_validation() {
        let del = |node: &str, queue: &str| {
            control(control_message::Body::DeleteLink(proto::DeleteLink {
                node_identity: node.into(),
                queue: queue.into(),
            }))
        };
        assert_invalid(decode_err(&del(BANK_A, "")), "queue", "empty");
        assert_invalid(decode_err(&del("", "q")), "node_identity", "empty");

        let status = |state: i32, bridge: &str| {
            proto::NotifyMessage {
                version: 1,
                body: Some(notify_message::Body::LinkStatus(proto::LinkStatus {
                    bridge_id: bridge.into(),
                    queue: "q".into(),
                    state,
                    ..Default::default()
                })),
            }
            .encode_to_vec()
        };
        assert_invalid(
            Notification::decode(&status(0, "b")).unwrap_err(),
            "state",
            "UNSPECIFIED",
        );
        assert_invalid(
            Notification::decode(&status(99, "b")).unwrap_err(),
            "state",
            "99",
        );
        assert_invalid(
            Notification::decode(&status(2, "")).unwrap_err(),
            "bridge_id",
            "empty",
        );
        let req = proto::NotifyMessage {
            version: 1,
            body: Some(notify_message::Body::SnapshotRequest(
                proto::SnapshotRequest::default(),
            )),
        }
        .encode_to_vec();
        assert_invalid(
            Notification::decode(&req).unwrap_err(),
            "bridge_id",
            "empty",
        );
    }

    // ---- compatibility rule (crate docs, *Compatibility*) ----

    /// Appends field `field` to an encoded message: a varint, or length-delimited `bytes`.
    fn with_field(mut msg: Vec<u8>, field: u32, value: Field<'_>) -> Vec<u8> {
        let put = |out: &mut Vec<u8>, mut v: u64| loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        };
        match value {
            Field::Varint(v) => {
                put(&mut msg, u64::from(field) << 3);
                put(&mut msg, v);
            }
            Field::Bytes(b) => {
                put(&mut msg, (u64::from(field) << 3) | 2);
                put(&mut msg, b.len() as u64);
                msg.extend_from_slice(b);
            }
        }
        msg
    }

    enum Field<'a> {
        Varint(u64),
        Bytes(&'a [u8]),
    }

    #[test]
    fn unknown_fields_from_a_same_major_sender_are_ignored() {
        let msg = SequencedCommand {
            sequence: 42,
            epoch: 0,
            command: ControlCommand::CreateLink(CreateLink {
                node_identity: BANK_A.into(),
                link: link("drawbridge.peers.b"),
            }),
        };
        // A new optional envelope field (number 99, varint) and a new length-delimited one.
        let bytes = with_field(msg.encode(), 99, Field::Varint(7));
        let bytes = with_field(bytes, 100, Field::Bytes(b"future"));
        assert_eq!(SequencedCommand::decode(&bytes).unwrap(), msg);
        assert_eq!(ControlCommand::decode(&bytes).unwrap(), msg.command);

        let n = Notification::SnapshotRequest(SnapshotRequest {
            bridge_id: "bridge-1".into(),
        });
        let bytes = with_field(n.encode(), 99, Field::Varint(1));
        assert_eq!(Notification::decode(&bytes).unwrap(), n);
    }

    #[test]
    fn an_unknown_body_is_skippable_and_a_missing_one_is_malformed() {
        let envelope = |version| {
            proto::ControlMessage {
                version,
                body: None,
                sequence: 9,
                epoch: 0,
            }
            .encode_to_vec()
        };
        // A newer node's new command: a body variant with a field number this build lacks.
        let new_command = with_field(envelope(1), 6, Field::Bytes(b"\x0a\x01x"));
        assert_eq!(
            decode_err(&new_command),
            DecodeError::UnknownBody { field: 6 }
        );
        assert_eq!(
            SequencedCommand::decode(&new_command).unwrap_err(),
            DecodeError::UnknownBody { field: 6 }
        );
        assert!(decode_err(&new_command)
            .to_string()
            .contains("unknown message body"));
        // No body and nothing unknown: malformed, as before.
        assert_eq!(decode_err(&envelope(1)), DecodeError::Missing("body"));
        // The version rule comes first: a newer major with an unknown body is refused.
        assert_eq!(
            decode_err(&with_field(
                envelope(PROTOCOL_VERSION + 1),
                6,
                Field::Bytes(b"")
            )),
            unsupported(PROTOCOL_VERSION + 1)
        );
        // The same holds for notifications from a newer bridge.
        let notify = with_field(
            proto::NotifyMessage {
                version: 1,
                body: None,
            }
            .encode_to_vec(),
            4,
            Field::Bytes(b""),
        );
        assert_eq!(
            Notification::decode(&notify).unwrap_err(),
            DecodeError::UnknownBody { field: 4 }
        );
    }

    #[test]
    fn a_newer_major_is_refused_even_when_its_schema_no_longer_parses() {
        // Version 2 turned field 2 into a varint: prost cannot decode it as a Snapshot, yet the
        // receiver must still say "newer version", not "malformed".
        let bytes = with_field(
            with_field(
                Vec::new(),
                1,
                Field::Varint(u64::from(PROTOCOL_VERSION) + 1),
            ),
            2,
            Field::Varint(5),
        );
        assert!(proto::ControlMessage::decode(bytes.as_slice()).is_err());
        assert_eq!(decode_err(&bytes), unsupported(PROTOCOL_VERSION + 1));
        // Garbage stays garbage.
        assert!(matches!(
            decode_err(&[0x08, 0xff]),
            DecodeError::Protobuf(_)
        ));
        // Every major up to ours is understood.
        for v in 1..=PROTOCOL_VERSION {
            let ok = proto::ControlMessage {
                version: v,
                ..proto::ControlMessage::from(ControlCommand::DeleteLink(DeleteLink {
                    node_identity: BANK_A.into(),
                    queue: "q".into(),
                }))
            }
            .encode_to_vec();
            assert!(ControlCommand::decode(&ok).is_ok(), "version {v}");
        }
    }

    #[test]
    fn the_sender_identity_of_a_refused_message_is_read_when_possible() {
        let newer = proto::ControlMessage {
            version: PROTOCOL_VERSION + 1,
            ..proto::ControlMessage::from(ControlCommand::DeleteLink(DeleteLink {
                node_identity: BANK_A.into(),
                queue: "q".into(),
            }))
        }
        .encode_to_vec();
        assert!(matches!(
            decode_err(&newer),
            DecodeError::UnsupportedVersion { .. }
        ));
        assert_eq!(
            ControlCommand::sender_identity(&newer).as_deref(),
            Some(BANK_A)
        );
        assert_eq!(ControlCommand::sender_identity(&[0xff, 0xff]), None);
        let anonymous = proto::ControlMessage {
            version: 1,
            body: None,
            sequence: 0,
            epoch: 0,
        }
        .encode_to_vec();
        assert_eq!(ControlCommand::sender_identity(&anonymous), None);
    }

    #[test]
    fn the_wire_scan_reads_version_and_unknown_fields() {
        let bytes = with_field(
            with_field(
                with_field(Vec::new(), 1, Field::Varint(3)),
                2,
                Field::Bytes(b"ab"),
            ),
            77,
            Field::Varint(1),
        );
        assert_eq!(
            scan(&bytes, CONTROL_FIELDS),
            Some(WireScan {
                version: Some(3),
                first_unknown: Some(77)
            })
        );
        assert_eq!(scan(&[0x12, 0x05, b'a'], CONTROL_FIELDS), None, "truncated");
        assert_eq!(scan(&[0x00], CONTROL_FIELDS), None, "field 0");
        assert_eq!(scan(&[0x0b], CONTROL_FIELDS), None, "group");
        assert_eq!(scan(&[], CONTROL_FIELDS), Some(WireScan::default()));
    }
}
