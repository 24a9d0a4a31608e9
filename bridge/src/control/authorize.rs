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
///
/// Keyed by the node's legal name in its canonical form, so the same name written another way
/// (attribute order, spacing, key case) shares one mark. Each node's epochs seen are kept too
/// (the last [`MAX_EPOCHS`], least recently applied forgotten first): a message of an epoch not
/// seen starts the order again from its sequence (see the `.proto`), which is how a node whose
/// mark went wrong (`u64::MAX`, a clock far ahead) gets obeyed again without a bridge restart.
#[derive(Debug, Default, Clone)]
pub(crate) struct Sequences(HashMap<String, Mark>);

/// How many epochs of one node are remembered. A node has one per process run (the CLI one per
/// invocation), so this covers many restarts; an epoch forgotten and seen again just starts the
/// order again, as a new one does.
pub(crate) const MAX_EPOCHS: usize = 64;

/// One node's ordering state.
#[derive(Debug, Clone)]
struct Mark {
    /// Highest sequence applied since the last new epoch.
    highest: u64,
    /// Epochs applied, most recently applied last.
    epochs: Vec<u64>,
}

/// The key of `node`: its canonical legal name, or the text as written if it is none (such a
/// message is refused before it is recorded anyway).
fn key(node: &str) -> String {
    node.parse::<LegalName>()
        .map(|n| n.canonical())
        .unwrap_or_else(|_| node.to_string())
}

impl Sequences {
    /// Highest sequence applied for `node` (any spelling of its legal name), if any.
    #[cfg(test)]
    pub(crate) fn applied(&self, node: &str) -> Option<u64> {
        self.0.get(&key(node)).map(|m| m.highest)
    }

    /// The mark `msg` is checked against: `None` when nothing was applied for its node, or
    /// when its epoch is new (the order starts again from it).
    fn mark_for(&self, msg: &SequencedCommand) -> Option<u64> {
        let mark = self.0.get(&key(msg.command.node_identity()))?;
        mark.epochs.contains(&msg.epoch).then_some(mark.highest)
    }

    /// Remember that `msg` was applied. Unsequenced messages leave the mark where it is.
    /// Returns true when `msg` started a new epoch for a node that had a mark (the caller
    /// logs it: the node's order starts again).
    pub(crate) fn record(&mut self, msg: &SequencedCommand) -> bool {
        if !msg.is_sequenced() {
            return false;
        }
        let node = key(msg.command.node_identity());
        let Some(mark) = self.0.get_mut(&node) else {
            self.0.insert(
                node,
                Mark {
                    highest: msg.sequence,
                    epochs: vec![msg.epoch],
                },
            );
            return false;
        };
        match mark.epochs.iter().position(|e| *e == msg.epoch) {
            Some(i) => {
                let e = mark.epochs.remove(i);
                mark.epochs.push(e);
                mark.highest = mark.highest.max(msg.sequence);
                false
            }
            None => {
                if mark.epochs.len() >= MAX_EPOCHS {
                    mark.epochs.remove(0);
                }
                mark.epochs.push(msg.epoch);
                mark.highest = msg.sequence;
                true
            }
        }
    }
}

/// The broker-validated `user_id` must be the node user (unless the operator turned the check
/// off).
fn check_user(user_id: Option<&str>, policy: &Policy) -> Result<(), Refusal> {
    match &policy.node_user {
        Some(want) if user_id != Some(want.as_str()) => Err(Refusal::WrongUser {
            got: user_id.map(str::to_string),
            want: want.clone(),
        }),
        _ => Ok(()),
    }
}

/// Decides whether `msg`, published with the broker-validated `user_id`, may be applied.
///
/// Checks, in order: node user (unless the operator turned it off), node identity, queue
/// prefix of every queue named, and ordering: a sequenced message must be newer than the
/// highest sequence applied for its node in an epoch seen before (a new epoch starts the
/// order again). Unsequenced messages pass the ordering check (the
/// caller logs a warning).
pub(crate) fn authorize(
    msg: &SequencedCommand,
    user_id: Option<&str>,
    policy: &Policy,
    applied: &Sequences,
) -> Result<(), Refusal> {
    check_user(user_id, policy)?;
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
        if let Some(applied) = applied.mark_for(msg) {
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

/// What to do with one control message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Apply it.
    Apply(SequencedCommand),
    /// A same-major node's command this bridge does not know (`field` is its body field
    /// number): ignore it, not an error.
    UnknownCommand {
        /// The envelope field number of the unknown body.
        field: u32,
    },
    /// Refused (logged and counted by the caller); [`Refusal::Decode`] with
    /// [`DecodeError::UnsupportedVersion`] is also reported to the node.
    Refused(Refusal),
}

/// Decides what to do with a control message `body` published with the broker-validated
/// `user_id`: decode, then [`authorize`].
pub(crate) fn decide(
    body: &[u8],
    user_id: Option<&str>,
    policy: &Policy,
    applied: &Sequences,
) -> Verdict {
    // Who sent it comes first: a sender other than the node gets no reply of any kind, even
    // for a body this bridge cannot read.
    if let Err(refusal) = check_user(user_id, policy) {
        return Verdict::Refused(refusal);
    }
    let msg = match SequencedCommand::decode(body) {
        Ok(msg) => msg,
        Err(DecodeError::UnknownBody { field }) => return Verdict::UnknownCommand { field },
        Err(e) => return Verdict::Refused(Refusal::Decode(e)),
    };
    match authorize(&msg, user_id, policy, applied) {
        Ok(()) => Verdict::Apply(msg),
        Err(refusal) => Verdict::Refused(refusal),
    }
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
            epoch: 0,
            command: ControlCommand::CreateLink(CreateLink {
                node_identity: NODE.into(),
                link: link(queue),
            }),
        }
    }

    fn snapshot(seq: u64, node: &str, queues: &[&str]) -> SequencedCommand {
        SequencedCommand {
            sequence: seq,
            epoch: 0,
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
            epoch: 0,
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

    /// Before: the mark was kept under the identity as written, so the same legal name
    /// written another way (attribute order, spacing, key case) started from no mark and an
    /// old message passed.
    #[test]
    fn the_mark_is_kept_per_legal_name_not_per_spelling() {
        let mut applied = Sequences::default();
        applied.record(&create(5, "drawbridge.peers.b"));
        for spelling in ["C=GB, L=London, O=Bank A", "o=Bank A,l=London,  c=GB"] {
            let old = snapshot(3, spelling, &[]);
            assert!(
                ok(&old, &applied).unwrap_err().is_stale(),
                "{spelling} bypassed the mark"
            );
        }
        applied.record(&snapshot(9, "C=GB, L=London, O=Bank A", &[]));
        assert_eq!(applied.applied(NODE), Some(9));
    }

    /// Before: a body of a newer protocol version was answered (a `LinkStatus` on the notify
    /// exchange, a log line) before the `user_id` was looked at, so anyone who could publish
    /// to the control exchange got a reply. Now the sender is authenticated first.
    #[test]
    fn only_the_node_user_hears_about_a_newer_version_or_an_unknown_command() {
        // A valid create, then field 1 (`version`) again: protobuf's last value wins.
        let mut newer = create(1, "drawbridge.peers.b").encode();
        let next = u8::try_from(drawbridge_control_protocol::PROTOCOL_VERSION + 1).unwrap();
        newer.extend_from_slice(&[0x08, next]);
        let none = Sequences::default();
        let wrong_user = |v: &Verdict| {
            matches!(
                v,
                Verdict::Refused(Refusal::WrongUser { got, .. }) if got.as_deref() == Some("guest")
            )
        };
        let v = decide(&newer, Some("guest"), &policy(), &none);
        assert!(wrong_user(&v), "{v:?}");
        assert!(matches!(
            decide(&newer, None, &policy(), &none),
            Verdict::Refused(Refusal::WrongUser { got: None, .. })
        ));
        assert!(matches!(
            decide(&newer, Some("node-a"), &policy(), &none),
            Verdict::Refused(Refusal::Decode(DecodeError::UnsupportedVersion { .. }))
        ));
        // A body this build does not know, and bytes that are no protobuf at all: the same.
        // Version 1 and field 99 (varint 1), no body this build knows.
        let unknown = [0x08, 0x01, 0x98, 0x06, 0x01];
        let v = decide(&unknown, Some("guest"), &policy(), &none);
        assert!(wrong_user(&v), "{v:?}");
        assert_eq!(
            decide(&unknown, Some("node-a"), &policy(), &none),
            Verdict::UnknownCommand { field: 99 }
        );
        let v = decide(b"\xff\xff garbage", Some("guest"), &policy(), &none);
        assert!(wrong_user(&v), "{v:?}");
        // With the check turned off (insecure), a newer version is reported as before.
        let open = Policy {
            node_user: None,
            ..policy()
        };
        assert!(matches!(
            decide(&newer, Some("guest"), &open, &none),
            Verdict::Refused(Refusal::Decode(DecodeError::UnsupportedVersion { .. }))
        ));
    }

    fn in_epoch(mut msg: SequencedCommand, epoch: u64) -> SequencedCommand {
        msg.epoch = epoch;
        msg
    }

    /// Before: once `u64::MAX` (or a clock far ahead) was applied, nothing the node sent was
    /// newer, until the bridge restarted. Now a new epoch (a restarted node) starts the order
    /// again, and the order holds within and across the epochs seen.
    #[test]
    fn a_new_epoch_recovers_a_node_from_a_sequence_it_cannot_beat() {
        let (e1, e2) = (0x1111, 0x2222);
        let mut applied = Sequences::default();
        let max = in_epoch(create(u64::MAX, "drawbridge.peers.b"), e1);
        assert_eq!(ok(&max, &applied), Ok(()));
        assert!(!applied.record(&max), "the first mark is no reset");
        let next = in_epoch(snapshot(1_800_000_000_000, NODE, &[]), e1);
        assert!(ok(&next, &applied).unwrap_err().is_stale(), "locked in e1");

        // The node restarts: a new epoch, with a sequence far below the mark.
        let restarted = in_epoch(
            snapshot(1_800_000_000_000, "C=GB, L=London, O=Bank A", &[]),
            e2,
        );
        assert_eq!(ok(&restarted, &applied), Ok(()));
        assert!(applied.record(&restarted), "a new epoch resets the mark");
        assert_eq!(applied.applied(NODE), Some(1_800_000_000_000));
        // Ordered again: older or equal in e2 is stale, newer passes.
        let older = in_epoch(create(1_799_999_999_999, "drawbridge.peers.b"), e2);
        assert!(ok(&older, &applied).unwrap_err().is_stale());
        let newer = in_epoch(create(1_800_000_000_001, "drawbridge.peers.b"), e2);
        assert_eq!(ok(&newer, &applied), Ok(()));
        assert!(!applied.record(&newer));
        // A late message of the old epoch is judged against the new mark: not a reset.
        let late = in_epoch(snapshot(5, NODE, &[]), e1);
        assert!(ok(&late, &applied).unwrap_err().is_stale());
    }

    #[test]
    fn epochs_remembered_are_bounded_least_recently_applied_first() {
        let mut applied = Sequences::default();
        let live = 7_000;
        applied.record(&in_epoch(create(100, "drawbridge.peers.b"), live));
        for e in 0..MAX_EPOCHS as u64 - 1 {
            applied.record(&in_epoch(create(200 + e, "drawbridge.peers.b"), e + 1));
        }
        // The live epoch is applied again (most recent), then one more epoch comes in: the
        // oldest (epoch 1) is forgotten, the live one stays.
        applied.record(&in_epoch(create(1_000, "drawbridge.peers.b"), live));
        applied.record(&in_epoch(create(2_000, "drawbridge.peers.b"), 9_999));
        let m = &applied.0[&key(NODE)];
        assert_eq!(m.epochs.len(), MAX_EPOCHS);
        assert!(m.epochs.contains(&live) && !m.epochs.contains(&1));
        assert!(ok(
            &in_epoch(create(1_500, "drawbridge.peers.b"), live),
            &applied
        )
        .unwrap_err()
        .is_stale());
        // Forgotten: treated as new.
        assert_eq!(
            ok(&in_epoch(create(1, "drawbridge.peers.b"), 1), &applied),
            Ok(())
        );
    }
}
