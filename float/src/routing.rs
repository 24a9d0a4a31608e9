//! Where a transfer goes: its `drawbridge-destination` (a legal name, as the sender wrote
//! it) to the inbox of the identity this float serves under that name.
//!
//! Legal names are compared as names (attribute order and spacing do not matter), so a
//! destination is parsed once per distinct spelling; each inbound link keeps a small cache
//! of spellings it has seen, including the ones this float does not serve.

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
    /// `drawbridge-destination` as written → inbox (`None`: not served). Shared, so a hit
    /// costs no allocation: every transfer looks its destination up here.
    cache: HashMap<String, Option<Arc<str>>>,
}

impl Routes {
    /// Beyond this many spellings the cache starts over, so a peer cycling through made-up
    /// destinations cannot grow it without bound.
    const MAX_ENTRIES: usize = 1024;

    /// The inbox for `destination`, resolved through `identities` the first time.
    pub(crate) fn inbox(&mut self, identities: &Identities, destination: &str) -> Option<Arc<str>> {
        if let Some(hit) = self.cache.get(destination) {
            return hit.clone();
        }
        if self.cache.len() >= Self::MAX_ENTRIES {
            self.cache.clear();
        }
        let inbox: Option<Arc<str>> = identities.resolve(destination).map(Arc::from);
        self.cache.insert(destination.to_string(), inbox.clone());
        inbox
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
    fn the_route_cache_remembers_misses_and_stays_bounded() {
        let ids = identities();
        let mut routes = Routes::default();
        assert_eq!(routes.inbox(&ids, "O=Bank Z, L=Oslo, C=NO"), None);
        assert_eq!(
            routes.inbox(&ids, "O=Bank B, L=Paris, C=FR").as_deref(),
            Some("inbox.b")
        );
        assert_eq!(routes.cache.len(), 2);
        for i in 0..3 * Routes::MAX_ENTRIES {
            let _ = routes.inbox(&ids, &format!("O=Made Up {i}, L=Nowhere, C=XX"));
            assert!(routes.cache.len() <= Routes::MAX_ENTRIES);
        }
        assert_eq!(
            routes.inbox(&ids, "O=Bank B, L=Paris, C=FR").as_deref(),
            Some("inbox.b")
        );
    }
}
