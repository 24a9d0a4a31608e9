//! Where a transfer goes: its `drawbridge-destination` (a legal name, as the sender wrote
//! it) to the inbox of the identity this float serves under that name.
//!
//! Legal names are compared as names (attribute order and spacing do not matter), so a
//! destination is parsed once per distinct spelling; each inbound link keeps a small cache
//! of the spellings it has seen of names this float serves. A destination it does not serve
//! is not remembered: the peer chooses those freely, and each would otherwise hold its
//! bytes until the cache starts over (its length is bounded before it gets here,
//! `drawbridge_mapping::inbound::MAX_DESTINATION_BYTES`).

use std::{collections::HashMap, sync::Arc};

use drawbridge_certs::LegalName;

/// The identities a float receives for, each with its inbox.
#[derive(Debug, Clone)]
pub(crate) struct Identities(Vec<(LegalName, String)>);

impl Identities {
    /// Identities as configured (legal name, inbox).
    pub(crate) fn new(identities: Vec<(LegalName, String)>) -> Self {
        Identities(identities)
    }

    /// Every (legal name, inbox) pair, in configuration order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(LegalName, String)> {
        self.0.iter()
    }

    /// The inbox of `destination`, or `None` if it is not a legal name this float serves.
    pub(crate) fn resolve(&self, destination: &str) -> Option<String> {
        let name: LegalName = destination.parse().ok()?;
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, inbox)| inbox.clone())
    }
}

/// One inbound link's cache of destination spellings → inbox.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    /// `drawbridge-destination` as written → inbox, for served names only. Shared, so a hit
    /// costs no allocation: every transfer looks its destination up here.
    cache: HashMap<String, Arc<str>>,
}

impl Routes {
    /// Beyond this many spellings the cache starts over: a well-behaved sender writes each
    /// served name one way, and a peer cycling through spellings of a served name (spacing,
    /// attribute order) cannot grow it past this many destinations.
    const MAX_ENTRIES: usize = 64;

    /// The inbox for `destination`, resolved through `identities` the first time.
    pub(crate) fn inbox(&mut self, identities: &Identities, destination: &str) -> Option<Arc<str>> {
        if let Some(hit) = self.cache.get(destination) {
            return Some(hit.clone());
        }
        let inbox: Arc<str> = identities.resolve(destination).map(Arc::from)?;
        if self.cache.len() >= Self::MAX_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(destination.to_string(), inbox.clone());
        Some(inbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identities() -> Identities {
        Identities::new(vec![
            ("O=Bank B, L=Paris, C=FR".parse().unwrap(), "inbox.b".into()),
            (
                "O=Bank C, L=Berlin, C=DE".parse().unwrap(),
                "inbox.c".into(),
            ),
        ])
    }

    #[test]
    fn destinations_resolve_as_legal_names() {
        let ids = identities();
        assert_eq!(
            ids.resolve("O=Bank B, L=Paris, C=FR").as_deref(),
            Some("inbox.b")
        );
        assert_eq!(
            ids.resolve("C=DE,L=Berlin,O=Bank C").as_deref(),
            Some("inbox.c"),
            "attribute order and spacing do not matter"
        );
        assert_eq!(ids.resolve("O=Bank Z, L=Oslo, C=NO"), None, "not served");
        assert_eq!(ids.resolve("not a legal name"), None);
    }

    #[test]
    fn the_route_cache_remembers_served_names_only_and_stays_bounded() {
        let ids = identities();
        let mut routes = Routes::default();
        assert_eq!(routes.inbox(&ids, "O=Bank Z, L=Oslo, C=NO"), None);
        assert_eq!(
            routes.cache.len(),
            0,
            "a destination not served is not kept"
        );
        assert_eq!(
            routes.inbox(&ids, "O=Bank B, L=Paris, C=FR").as_deref(),
            Some("inbox.b")
        );
        assert_eq!(routes.cache.len(), 1);
        for i in 0..3 * Routes::MAX_ENTRIES {
            let _ = routes.inbox(&ids, &format!("O=Made Up {i}, L=Nowhere, C=XX"));
        }
        assert_eq!(routes.cache.len(), 1, "misses never grow the cache");
        // Spellings of a served name are kept, up to the bound.
        for i in 0..3 * Routes::MAX_ENTRIES {
            let spelling = format!("O=Bank B,{}L=Paris, C=FR", " ".repeat(i));
            assert_eq!(routes.inbox(&ids, &spelling).as_deref(), Some("inbox.b"));
            assert!(routes.cache.len() <= Routes::MAX_ENTRIES);
        }
        assert_eq!(
            routes.inbox(&ids, "O=Bank B, L=Paris, C=FR").as_deref(),
            Some("inbox.b")
        );
    }
}
