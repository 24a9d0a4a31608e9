//! Whether the bridge may act on a control message (pure).

use std::collections::HashMap;

use drawbridge_certs::LegalName;
use drawbridge_control_protocol::{ControlCommand, DecodeError, SequencedCommand};

/// Why a control message is not acted on. Every refusal is logged with this text and
/// counted; the message is acked either way (a bad message must not loop).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The body is not a valid control message.
    #[error("cannot decode: {0}")]
    Decode(#[from] DecodeError),
    /// The broker-validated `user_id` is not the configured node user.
    #[error("user_id `{}` is not the configured node user `{want}`", .got.as_deref().unwrap_or("<none>"))]
    WrongUser {
        /// `user_id` the message carried, if any.
        got: Option<String>,
        /// `bridge.node_user`.
        want: String,
    },
    /// The message speaks for another node than the configured one.
    #[error("node_identity `{got}` is not the configured node identity `{want}`")]
    WrongNode {
        /// `node_identity` of the message.
        got: String,
        /// `bridge.node_identity`.
        want: String,
    },
    /// A link names a queue outside the configured prefix.
    #[error("queue `{queue}` is outside the prefix `{prefix}`")]
    OutsidePrefix {
        /// The offending queue.
        queue: String,
        /// `bridge.queue_prefix`.
        prefix: String,
    },
    /// Not newer than what was already applied for this node: acting on it could undo a newer
    /// command (e.g. a snapshot built before a create but delivered after it).
    #[error(
        "stale: sequence {sequence} from `{node}` is not newer than {applied}, the highest applied"
    )]
    Stale {
        /// `node_identity` of the message.
        node: String,
        /// The message's sequence.
        sequence: u64,
        /// Highest sequence applied for `node`.
        applied: u64,
    },
}

impl Refusal {
    /// Metric label: `stale` for ordering, `refused` for everything else.
    pub(crate) fn is_stale(&self) -> bool {
        matches!(self, Refusal::Stale { .. })
    }

    /// Short label for the `reason` of `drawbridge_bridge_control_refused_total`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            // A node upgraded before its bridge: an operator's to-do, not an attack or a bug,
            // so it gets its own label to alert on.
            Refusal::Decode(DecodeError::UnsupportedVersion { .. }) => "newer_version",
            Refusal::Decode(_) => "decode",
            Refusal::WrongUser { .. } => "wrong_user",
            Refusal::WrongNode { .. } => "wrong_node",
            Refusal::OutsidePrefix { .. } => "outside_prefix",
            Refusal::Stale { .. } => "stale",
        }
    }
}

/// The rules a control message must pass, taken from the bridge's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Every link queue must start with this.
    pub(crate) queue_prefix: String,
    /// The broker-validated `user_id` must be this; `None` only when the operator set
    /// `insecure_accept_any_control_user`.
    pub(crate) node_user: Option<String>,
    /// `node_identity` must be this legal name (compared as a legal name: attribute order and
    /// spacing are free).
    pub(crate) node_identity: LegalName,
}

/// Highest sequence applied, per node identity. Lives as long as the bridge process (across
/// broker reconnects), so a control message from before a reconnect cannot win either.
#[derive(Debug, Default, Clone)]
pub(crate) struct Sequences(HashMap<String, u64>);

impl Sequences {
    /// Highest sequence applied for `node`, if any.
    pub(crate) fn applied(&self, node: &str) -> Option<u64> {
        self.0.get(node).copied()
    }

    /// Remember that `msg` was applied. Unsequenced messages leave the mark where it is.
    pub(crate) fn record(&mut self, msg: &SequencedCommand) {
        if !msg.is_sequenced() {
            return;
        }
        let mark = self
            .0
            .entry(msg.command.node_identity().to_string())
            .or_default();
        *mark = (*mark).max(msg.sequence);
    }
}

/// Decides whether `msg`, published with the broker-validated `user_id`, may be applied.
///
/// Checks, in order: node user (unless the operator turned it off), node identity, queue
/// prefix of every queue named, and ordering: a sequenced message must be newer than the
/// highest sequence applied for its node. Unsequenced messages pass the ordering check (the
/// caller logs a warning).
pub(crate) fn authorize(
    msg: &SequencedCommand,
    user_id: Option<&str>,
    policy: &Policy,
    applied: &Sequences,
) -> Result<(), Refusal> {
    if let Some(want) = &policy.node_user {
        if user_id != Some(want.as_str()) {
            return Err(Refusal::WrongUser {
                got: user_id.map(str::to_string),
                want: want.clone(),
            });
        }
    }
    let node = msg.command.node_identity();
    if node.parse::<LegalName>().ok().as_ref() != Some(&policy.node_identity) {
        return Err(Refusal::WrongNode {
            got: node.to_string(),
            want: policy.node_identity.to_string(),
        });
    }
    let queues: Vec<&str> = match &msg.command {
        ControlCommand::Snapshot(s) => s.links.iter().map(|l| l.queue.as_str()).collect(),
        ControlCommand::CreateLink(c) => vec![c.link.queue.as_str()],
        ControlCommand::DeleteLink(d) => vec![d.queue.as_str()],
    };
    if let Some(q) = queues
        .into_iter()
        .find(|q| !q.starts_with(&policy.queue_prefix))
    {
        return Err(Refusal::OutsidePrefix {
            queue: q.to_string(),
            prefix: policy.queue_prefix.clone(),
        });
    }
    if msg.is_sequenced() {
        if let Some(applied) = applied.applied(node) {
            if msg.sequence <= applied {
                return Err(Refusal::Stale {
                    node: node.to_string(),
                    sequence: msg.sequence,
                    applied,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use drawbridge_control_protocol::{
        CreateLink, DeleteLink, PeerLink, Snapshot, Target, DEFAULT_TARGET_ADDRESS,
    };

    use super::*;

    const NODE: &str = "O=Bank A, L=London, C=GB";

    fn policy() -> Policy {
        Policy {
            queue_prefix: "drawbridge.peers.".into(),
            node_user: Some("node-a".into()),
            node_identity: NODE.parse().unwrap(),
        }
    }

    fn link(queue: &str) -> PeerLink {
        PeerLink {
            queue: queue.into(),
            targets: vec![Target::new("127.0.0.1", 5671)],
            legal_names: vec!["O=Bank B, L=Paris, C=FR".into()],
            target_address: DEFAULT_TARGET_ADDRESS.into(),
        }
    }

    fn create(seq: u64, queue: &str) -> SequencedCommand {
        SequencedCommand {
            sequence: seq,
            command: ControlCommand::CreateLink(CreateLink {
                node_identity: NODE.into(),
                link: link(queue),
            }),
        }
    }

    fn snapshot(seq: u64, node: &str, queues: &[&str]) -> SequencedCommand {
        SequencedCommand {
            sequence: seq,
            command: ControlCommand::Snapshot(Snapshot {
                node_identity: node.into(),
                inbox_queues: vec![],
                links: queues.iter().map(|q| link(q)).collect(),
            }),
        }
    }

    fn ok(msg: &SequencedCommand, applied: &Sequences) -> Result<(), Refusal> {
        authorize(msg, Some("node-a"), &policy(), applied)
    }

    #[test]
    fn a_good_message_passes() {
        assert_eq!(
            ok(&create(1, "drawbridge.peers.b"), &Sequences::default()),
            Ok(())
        );
    }

    #[test]
    fn node_user_is_checked_unless_turned_off_insecurely() {
        let msg = create(1, "drawbridge.peers.b");
        let none = Sequences::default();
        assert_eq!(
            authorize(&msg, Some("guest"), &policy(), &none),
            Err(Refusal::WrongUser {
                got: Some("guest".into()),
                want: "node-a".into()
            })
        );
        assert!(matches!(
            authorize(&msg, None, &policy(), &none),
            Err(Refusal::WrongUser { got: None, .. })
        ));
        let open = Policy {
            node_user: None,
            ..policy()
        };
        assert_eq!(authorize(&msg, None, &open, &none), Ok(()));
    }

    #[test]
    fn node_identity_is_compared_as_a_legal_name() {
        let none = Sequences::default();
        let other = snapshot(1, "O=Mallory, L=Nowhere, C=GB", &[]);
        let err = ok(&other, &none).unwrap_err();
        assert!(matches!(err, Refusal::WrongNode { .. }), "{err}");
        assert!(err.to_string().contains("Mallory"), "{err}");
        assert_eq!(err.label(), "wrong_node");
        // Same name written another way: obeyed.
        assert_eq!(
            ok(&snapshot(1, "C=GB,L=London,  O=Bank A", &[]), &none),
            Ok(())
        );
        // Not a legal name at all, or a prefix of ours: refused.
        assert!(ok(&snapshot(1, "Bank A", &[]), &none).is_err());
        assert!(ok(&snapshot(1, "O=Bank A, C=GB", &[]), &none).is_err());
    }

    #[test]
    fn every_queue_must_be_inside_the_prefix() {
        let none = Sequences::default();
        let bad_snapshot = snapshot(1, NODE, &["drawbridge.peers.b", "drawbridge.inbox"]);
        assert_eq!(
            ok(&bad_snapshot, &none),
            Err(Refusal::OutsidePrefix {
                queue: "drawbridge.inbox".into(),
                prefix: "drawbridge.peers.".into()
            })
        );
        assert!(ok(&create(1, "other.b"), &none).is_err());
        let delete = SequencedCommand {
            sequence: 1,
            command: ControlCommand::DeleteLink(DeleteLink {
                node_identity: NODE.into(),
                queue: "orders".into(),
            }),
        };
        assert!(matches!(
            ok(&delete, &none),
            Err(Refusal::OutsidePrefix { .. })
        ));
    }

    #[test]
    fn a_stale_snapshot_after_a_create_is_refused() {
        let mut applied = Sequences::default();
        let create = create(2, "drawbridge.peers.b");
        assert_eq!(ok(&create, &applied), Ok(()));
        applied.record(&create);
        let older = snapshot(1, NODE, &[]);
        let err = ok(&older, &applied).unwrap_err();
        assert_eq!(
            err,
            Refusal::Stale {
                node: NODE.into(),
                sequence: 1,
                applied: 2
            }
        );
        assert!(err.is_stale());
        // The same sequence again (a duplicate) is not newer either.
        assert!(ok(&create, &applied).unwrap_err().is_stale());
        // A newer snapshot replaces the state.
        let newer = snapshot(3, NODE, &[]);
        assert_eq!(ok(&newer, &applied), Ok(()));
        applied.record(&newer);
        assert_eq!(applied.applied(NODE), Some(3));
    }

    #[test]
    fn unsequenced_messages_pass_and_leave_the_mark() {
        let mut applied = Sequences::default();
        applied.record(&create(5, "drawbridge.peers.b"));
        let legacy = snapshot(0, NODE, &[]);
        assert_eq!(ok(&legacy, &applied), Ok(()));
        applied.record(&legacy);
        assert_eq!(applied.applied(NODE), Some(5));
    }

    #[test]
    fn sequences_are_per_node_identity() {
        let other_node = "O=Bank C, L=Rome, C=IT";
        let theirs = Policy {
            node_identity: other_node.parse().unwrap(),
            ..policy()
        };
        let mut applied = Sequences::default();
        applied.record(&snapshot(100, NODE, &[]));
        let other = snapshot(1, other_node, &[]);
        assert_eq!(authorize(&other, Some("node-a"), &theirs, &applied), Ok(()));
        // Recording never lowers the mark.
        applied.record(&snapshot(50, NODE, &[]));
        assert_eq!(applied.applied(NODE), Some(100));
    }

    #[test]
    fn a_newer_protocol_major_has_its_own_refusal_label() {
        let newer = Refusal::from(DecodeError::UnsupportedVersion {
            found: 2,
            supported: 1,
        });
        assert_eq!(newer.label(), "newer_version");
        assert!(!newer.is_stale());
        assert_eq!(
            Refusal::from(DecodeError::Missing("body")).label(),
            "decode"
        );
    }
}
