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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequencedCommand {
    /// Per-node monotonic sequence number; `0` = unsequenced.
    pub sequence: u64,
    /// The command.
    pub command: ControlCommand,
}

impl SequencedCommand {
    /// Serialises into a `ControlMessage` carrying [`PROTOCOL_VERSION`] and the sequence.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = proto::ControlMessage::from(self.command.clone());
        p.sequence = self.sequence;
        p.encode_to_vec()
    }

    /// Parses and validates a message body received from the broker, keeping its sequence.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let p = proto::ControlMessage::decode(bytes)?;
        let sequence = p.sequence;
        Ok(Self {
            sequence,
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

/// Applies the version rules shared by both envelopes.
fn check_version(version: u32) -> Result<(), DecodeError> {
    match version {
        0 => Err(DecodeError::MissingVersion),
        v if v > PROTOCOL_VERSION => Err(DecodeError::UnsupportedVersion {
            found: v,
            supported: PROTOCOL_VERSION,
        }),
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
    /// Fails on malformed protobuf, a missing or newer version, a missing body, or any field
    /// that does not pass validation; the error says which and why.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        proto::ControlMessage::decode(bytes)?.try_into()
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
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        proto::NotifyMessage::decode(bytes)?.try_into()
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
            command: command.clone(),
        };
        let bytes = sequenced.encode();
        assert_eq!(SequencedCommand::decode(&bytes).unwrap(), sequenced);
        assert!(sequenced.is_sequenced());
        // An older receiver that only knows the command still reads it.
        assert_eq!(ControlCommand::decode(&bytes).unwrap(), command);
        // A message from a sender without the field decodes as unsequenced.
        let legacy = SequencedCommand::decode(&command.encode()).unwrap();
        assert_eq!(legacy.sequence, 0);
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
}
