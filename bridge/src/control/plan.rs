//! What to start and stop to get from the running links to the wanted ones (pure).

use std::collections::BTreeMap;

use drawbridge_control_protocol::{ControlCommand, PeerLink};

/// One step of converging the running links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start a link on a queue that has none.
    Create(PeerLink),
    /// Stop the link on this queue (the queue and its messages stay).
    Delete(String),
    /// The queue's link runs with another spec: stop it, then start this one.
    Replace(PeerLink),
}

impl Action {
    /// The queue the action concerns.
    pub(crate) fn queue(&self) -> &str {
        match self {
            Action::Create(l) | Action::Replace(l) => &l.queue,
            Action::Delete(q) => q,
        }
    }

    /// Whether a running link has to stop first.
    pub(crate) fn stops(&self) -> bool {
        matches!(self, Action::Delete(_) | Action::Replace(_))
    }
}

/// The actions that turn `running` (queue → spec) into exactly `wanted`: deletes first, then
/// replacements and creations, each group in queue order. A link that already runs as
/// wanted is left alone. `wanted` holds each queue at most once (the decoder guarantees it for
/// snapshots); should a queue repeat, its last spec wins.
pub(crate) fn plan(running: &BTreeMap<String, PeerLink>, wanted: &[PeerLink]) -> Vec<Action> {
    let wanted: BTreeMap<&str, &PeerLink> = wanted.iter().map(|l| (l.queue.as_str(), l)).collect();
    let deletes = running
        .keys()
        .filter(|q| !wanted.contains_key(q.as_str()))
        .map(|q| Action::Delete(q.clone()));
    let starts = wanted
        .values()
        .filter_map(|spec| match running.get(&spec.queue) {
            None => Some(Action::Create((*spec).clone())),
            Some(current) if current != *spec => Some(Action::Replace((*spec).clone())),
            Some(_) => None,
        });
    deletes.chain(starts).collect()
}

/// The link set `command` asks for, given the `running` one: a snapshot names it whole, a
/// create adds or replaces one link, a delete removes one.
pub(crate) fn wanted(
    command: &ControlCommand,
    running: &BTreeMap<String, PeerLink>,
) -> Vec<PeerLink> {
    match command {
        ControlCommand::Snapshot(s) => s.links.clone(),
        ControlCommand::CreateLink(c) => with_link(running, c.link.clone()),
        ControlCommand::DeleteLink(d) => without_link(running, &d.queue),
    }
}

/// `running` with `link` added or replaced: the wanted set of a `CreateLink`.
fn with_link(running: &BTreeMap<String, PeerLink>, link: PeerLink) -> Vec<PeerLink> {
    let mut wanted = running.clone();
    wanted.insert(link.queue.clone(), link);
    wanted.into_values().collect()
}

/// `running` without the link on `queue`: the wanted set of a `DeleteLink`.
fn without_link(running: &BTreeMap<String, PeerLink>, queue: &str) -> Vec<PeerLink> {
    running
        .values()
        .filter(|l| l.queue != queue)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use drawbridge_control_protocol::{
        CreateLink, DeleteLink, Snapshot, Target, DEFAULT_TARGET_ADDRESS,
    };

    use super::*;

    fn link(queue: &str, port: u16) -> PeerLink {
        PeerLink {
            queue: queue.into(),
            targets: vec![Target::new("127.0.0.1", port)],
            legal_names: vec!["O=Bank B, L=Paris, C=FR".into()],
            target_address: DEFAULT_TARGET_ADDRESS.into(),
        }
    }

    fn running(links: &[PeerLink]) -> BTreeMap<String, PeerLink> {
        links.iter().map(|l| (l.queue.clone(), l.clone())).collect()
    }

    #[test]
    fn from_nothing_creates_everything() {
        let wanted = [link("p.b", 1), link("p.a", 2)];
        assert_eq!(
            plan(&BTreeMap::new(), &wanted),
            vec![
                Action::Create(link("p.a", 2)),
                Action::Create(link("p.b", 1))
            ]
        );
    }

    #[test]
    fn unchanged_links_are_left_alone() {
        let now = [link("p.a", 1), link("p.b", 2)];
        assert!(plan(&running(&now), &now).is_empty());
    }

    #[test]
    fn deletes_come_first_then_replacements_and_creations() {
        let now = running(&[link("p.a", 1), link("p.b", 2), link("p.c", 3)]);
        let wanted = [link("p.b", 20), link("p.c", 3), link("p.d", 4)];
        let actions = plan(&now, &wanted);
        assert_eq!(
            actions,
            vec![
                Action::Delete("p.a".into()),
                Action::Replace(link("p.b", 20)),
                Action::Create(link("p.d", 4)),
            ]
        );
        assert_eq!(
            actions.iter().filter(|a| a.stops()).count(),
            2,
            "delete and replace stop a link"
        );
        assert_eq!(actions[1].queue(), "p.b");
    }

    #[test]
    fn empty_snapshot_deletes_everything() {
        let now = running(&[link("p.a", 1), link("p.b", 2)]);
        assert_eq!(
            plan(&now, &[]),
            vec![Action::Delete("p.a".into()), Action::Delete("p.b".into())]
        );
    }

    #[test]
    fn create_and_delete_are_plans_over_the_running_set() {
        let now = running(&[link("p.a", 1)]);
        assert_eq!(
            plan(&now, &with_link(&now, link("p.b", 2))),
            vec![Action::Create(link("p.b", 2))]
        );
        assert!(plan(&now, &with_link(&now, link("p.a", 1))).is_empty());
        assert_eq!(
            plan(&now, &with_link(&now, link("p.a", 9))),
            vec![Action::Replace(link("p.a", 9))]
        );
        assert_eq!(
            plan(&now, &without_link(&now, "p.a")),
            vec![Action::Delete("p.a".into())]
        );
        assert!(plan(&now, &without_link(&now, "p.zzz")).is_empty());
    }

    #[test]
    fn wanted_by_each_command() {
        let now = running(&[link("p.a", 1), link("p.b", 2)]);
        let node = "O=Bank A, L=London, C=GB".to_string();
        let snapshot = ControlCommand::Snapshot(Snapshot {
            node_identity: node.clone(),
            inbox_queues: vec![],
            links: vec![link("p.c", 3)],
        });
        assert_eq!(wanted(&snapshot, &now), vec![link("p.c", 3)]);
        let create = ControlCommand::CreateLink(CreateLink {
            node_identity: node.clone(),
            link: link("p.c", 3),
        });
        assert_eq!(
            wanted(&create, &now),
            vec![link("p.a", 1), link("p.b", 2), link("p.c", 3)]
        );
        let delete = ControlCommand::DeleteLink(DeleteLink {
            node_identity: node,
            queue: "p.a".into(),
        });
        assert_eq!(wanted(&delete, &now), vec![link("p.b", 2)]);
    }
}
