//! X.500 legal names and their set comparison.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertError;

/// Attribute short names we understand, with their OIDs. Anything else must be written as a
/// dotted OID (`2.5.4.97=...`).
const KNOWN_ATTRIBUTES: &[(&str, &str)] = &[
    ("CN", "2.5.4.3"),
    ("SERIALNUMBER", "2.5.4.5"),
    ("C", "2.5.4.6"),
    ("L", "2.5.4.7"),
    ("ST", "2.5.4.8"),
    ("STREET", "2.5.4.9"),
    ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("DC", "0.9.2342.19200300.100.1.25"),
];

const ORGANISATION_OID: &str = "2.5.4.10";

/// One attribute of a name: its OID (what is compared), the key as displayed, and the value.
#[derive(Debug, Clone)]
pub(crate) struct Attribute {
    /// Dotted OID, e.g. `2.5.4.10`; the identity of the attribute type.
    pub(crate) oid: String,
    /// Short name (`O`) if known, else the dotted OID; only for display.
    pub(crate) key: String,
    /// The value, trimmed.
    pub(crate) value: String,
}

/// An X.500 legal name such as `O=Bank A, L=London, C=GB`: how peers are identified.
///
/// Compared as a **set** of (attribute OID, value) pairs, because the same identity is written
/// differently by different tools (OpenSSL prints `C=GB, L=London, O=Bank A`, Corda-style
/// config says `O=Bank A, L=London, C=GB`): attribute order, whitespace around separators and
/// the case of attribute keys do not matter; values are compared exactly after trimming.
///
/// Known keys: `CN, O, OU, L, ST, C, STREET, SERIALNUMBER, DC, UID`; any other attribute can
/// be written by dotted OID. A literal comma or backslash inside a value is escaped with a
/// backslash (`O=Foo\, Inc`).
#[derive(Debug, Clone)]
pub struct LegalName {
    /// Attributes in the order given (for display and for writing a certificate subject).
    attrs: Vec<Attribute>,
    /// Sorted (OID, value) pairs: the identity used by `Eq` and `Hash`.
    canonical: Vec<(String, String)>,
}

fn oid_for_key(key: &str) -> Option<(&'static str, &'static str)> {
    KNOWN_ATTRIBUTES
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .copied()
}

fn key_for_oid(oid: &str) -> String {
    KNOWN_ATTRIBUTES
        .iter()
        .find(|(_, o)| *o == oid)
        .map_or_else(|| oid.to_owned(), |(k, _)| (*k).to_owned())
}

fn is_dotted_oid(s: &str) -> bool {
    let mut arcs = s.split('.');
    let all_numeric = s
        .split('.')
        .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()));
    all_numeric && arcs.nth(1).is_some()
}

/// Splits on unescaped commas, resolving backslash escapes.
fn split_attributes(input: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = input.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) => current.push(escaped),
                None => return Err("ends with a lone backslash".into()),
            },
            ',' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    Ok(parts)
}

impl LegalName {
    fn from_attrs(attrs: Vec<Attribute>) -> Self {
        let mut canonical: Vec<(String, String)> = attrs
            .iter()
            .map(|a| (a.oid.clone(), a.value.clone()))
            .collect();
        canonical.sort();
        canonical.dedup();
        Self { attrs, canonical }
    }

    /// Reads the subject of a DER certificate, e.g. the one a peer presented.
    ///
    /// String encodings (UTF8String, PrintableString, IA5String, BMPString, ...) are decoded,
    /// so a name compares equal whatever encoding the issuing CA chose.
    ///
    /// A subject that no written legal name can express is refused, as the parser refuses
    /// its written form: an attribute with an empty value, the same attribute and value
    /// twice, an attribute type that is no dotted OID. So [`LegalName::canonical`] of every
    /// name read here parses back to the same name (the float stamps it as the sender, and
    /// the receiving node parses it).
    pub fn from_der_cert(cert: &CertificateDer<'_>) -> Result<LegalName, CertError> {
        let (_, parsed) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| CertError::X509(format!("not a DER X.509 certificate: {e}")))?;
        let mut attrs: Vec<Attribute> = Vec::new();
        for attr in parsed.subject().iter_attributes() {
            let oid = attr.attr_type().to_id_string();
            if !is_dotted_oid(&oid) {
                return Err(CertError::X509(format!(
                    "subject attribute type `{oid}` is not a dotted OID"
                )));
            }
            let key = key_for_oid(&oid);
            let value = decode_string(attr).ok_or_else(|| {
                CertError::X509(format!(
                    "subject attribute {key} has a value that is not a supported string type"
                ))
            })?;
            let value = value.trim().to_owned();
            if value.is_empty() {
                return Err(CertError::X509(format!(
                    "subject attribute {key} has an empty value"
                )));
            }
            if attrs.iter().any(|a| a.oid == oid && a.value == value) {
                return Err(CertError::X509(format!(
                    "subject attribute {key}={value} appears twice"
                )));
            }
            attrs.push(Attribute { key, oid, value });
        }
        if attrs.is_empty() {
            return Err(CertError::X509("certificate subject is empty".into()));
        }
        Ok(Self::from_attrs(attrs))
    }

    /// The `O` (organisation) attribute, e.g. for display.
    pub fn organisation(&self) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.oid == ORGANISATION_OID)
            .map(|a| a.value.as_str())
    }

    /// A filesystem- and URL-safe name for this identity, e.g. `O=Bank A, L=London, C=GB` →
    /// `bank-a-london-gb`: the values in order, lower-cased, runs of anything but ASCII letters
    /// and digits replaced by one `-`.
    pub fn slug(&self) -> String {
        let mut slug = String::new();
        for c in self
            .attrs
            .iter()
            .map(|a| a.value.as_str())
            .collect::<Vec<_>>()
            .join("-")
            .chars()
        {
            if c.is_ascii_alphanumeric() {
                slug.push(c.to_ascii_lowercase());
            } else if !slug.is_empty() && !slug.ends_with('-') {
                slug.push('-');
            }
        }
        while slug.ends_with('-') {
            slug.pop();
        }
        if slug.is_empty() {
            slug.push_str("node");
        }
        slug
    }

    /// The attributes in the order given (used to write certificate subjects).
    pub(crate) fn attributes(&self) -> &[Attribute] {
        &self.attrs
    }
}

/// Decodes any of the usual X.500 string types into UTF-8.
fn decode_string(attr: &x509_parser::x509::AttributeTypeAndValue<'_>) -> Option<String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    if let Ok(s) = attr.as_str() {
        return Some(s.to_owned());
    }
    let data = attr.as_slice();
    match attr.attr_value().tag() {
        Tag::BmpString => {
            let chunks = data.chunks_exact(2);
            if !chunks.remainder().is_empty() {
                return None;
            }
            let units = chunks.map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        Tag::UniversalString => {
            let chunks = data.chunks_exact(4);
            if !chunks.remainder().is_empty() {
                return None;
            }
            chunks
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        }
        // T61/Teletex and VisibleString: treat as Latin-1, which covers what CAs put there.
        Tag::T61String | Tag::VisibleString => Some(data.iter().map(|&b| char::from(b)).collect()),
        _ => None,
    }
}

impl FromStr for LegalName {
    type Err = CertError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| CertError::InvalidLegalName {
            input: input.to_owned(),
            reason,
        };
        if input.trim().is_empty() {
            return Err(err("it is empty".into()));
        }
        let mut attrs = Vec::new();
        for part in split_attributes(input).map_err(err)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(err("it has an empty attribute (stray comma?)".into()));
            }
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("`{part}` is not a KEY=VALUE attribute")))?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() {
                return Err(err(format!("`{part}` has no attribute key")));
            }
            let (key, oid) = if let Some((k, oid)) = oid_for_key(key) {
                (k.to_owned(), oid.to_owned())
            } else if is_dotted_oid(key) {
                (key_for_oid(key), key.to_owned())
            } else {
                return Err(err(format!(
                    "unknown attribute key `{key}` (known: CN, O, OU, L, ST, C, STREET, SERIALNUMBER, DC, UID, or a dotted OID)"
                )));
            };
            if value.is_empty() {
                return Err(err(format!("attribute `{key}` has an empty value")));
            }
            if attrs
                .iter()
                .any(|a: &Attribute| a.oid == oid && a.value == value)
            {
                return Err(err(format!("attribute `{key}={value}` appears twice")));
            }
            attrs.push(Attribute {
                oid,
                key,
                value: value.to_owned(),
            });
        }
        Ok(Self::from_attrs(attrs))
    }
}

/// Attribute order of [`LegalName::canonical`]: Corda's (`CN, OU, O, L, ST, C`), then the rest
/// by OID.
const CANONICAL_ORDER: [&str; 6] = [
    "2.5.4.3", "2.5.4.11", "2.5.4.10", "2.5.4.7", "2.5.4.8", "2.5.4.6",
];

impl LegalName {
    /// The one written form of this name, whatever order it was given or issued in:
    /// `CN, OU, O, L, ST, C` first (Corda's order), other attributes after them by OID. Equal
    /// names have equal canonical forms; this is what the float stamps as the sender, so a
    /// receiving node can compare it as a string.
    pub fn canonical(&self) -> String {
        let rank = |a: &Attribute| {
            CANONICAL_ORDER
                .iter()
                .position(|o| *o == a.oid)
                .unwrap_or(CANONICAL_ORDER.len())
        };
        let mut attrs: Vec<&Attribute> = self.attrs.iter().collect();
        attrs.sort_by(|a, b| {
            rank(a)
                .cmp(&rank(b))
                .then_with(|| a.oid.cmp(&b.oid))
                .then_with(|| a.value.cmp(&b.value))
        });
        let mut out = String::new();
        write_attrs(&mut out, attrs.into_iter()).expect("writing to a String");
        out
    }
}

fn write_attrs<'a>(
    f: &mut impl fmt::Write,
    attrs: impl Iterator<Item = &'a Attribute>,
) -> fmt::Result {
    for (i, a) in attrs.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{}=", a.key)?;
        for c in a.value.chars() {
            if matches!(c, ',' | '\\') {
                f.write_str("\\")?;
            }
            write!(f, "{c}")?;
        }
    }
    Ok(())
}

impl fmt::Display for LegalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_attrs(f, self.attrs.iter())
    }
}

impl PartialEq for LegalName {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for LegalName {}

impl Hash for LegalName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.canonical.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn name(s: &str) -> LegalName {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn equal_names_have_one_canonical_form() {
        let want =
            "CN=Gateway, OU=Payments, O=Bank\\, A, L=London, ST=Greater London, C=GB, 2.5.4.97=X";
        for written in [
            "C=GB, ST=Greater London, L=London, O=Bank\\, A, OU=Payments, CN=Gateway, 2.5.4.97=X",
            "2.5.4.97=X,o=Bank\\, A,cn=Gateway,l=London,c=GB,ou=Payments,st=Greater London",
        ] {
            let n = name(written);
            assert_eq!(n.canonical(), want, "{written}");
            assert_eq!(name(&n.canonical()), n, "the canonical form parses back");
        }
        assert_eq!(
            name("C=GB, L=London, O=Bank A").canonical(),
            "O=Bank A, L=London, C=GB"
        );
    }

    #[test]
    fn set_comparison_ignores_order_spacing_and_key_case() {
        let a = name("O=Bank A, L=London, C=GB");
        for same in [
            "C=GB, L=London, O=Bank A",
            "o=Bank A,l=London,c=GB",
            "  O = Bank A ,L=  London  , C=GB ",
            "L=London, 2.5.4.10=Bank A, c=GB",
        ] {
            assert_eq!(a, name(same), "{same}");
            let set: HashSet<_> = [a.clone()].into_iter().collect();
            assert!(set.contains(&name(same)), "hash differs for {same}");
        }
        for different in [
            "O=Bank a, L=London, C=GB",
            "O=Bank A, L=London",
            "O=Bank A, L=London, C=GB, OU=IT",
            "O=Bank A, L=Paris, C=GB",
            "CN=Bank A, L=London, C=GB",
        ] {
            assert_ne!(a, name(different), "{different}");
        }
    }

    #[test]
    fn display_is_canonical_in_given_order() {
        assert_eq!(
            name(" o = Bank A ,l=London,c=GB").to_string(),
            "O=Bank A, L=London, C=GB"
        );
        assert_eq!(name("c=GB, O=X").to_string(), "C=GB, O=X");
        assert_eq!(
            name("2.5.4.97=VAT123, o=X").to_string(),
            "2.5.4.97=VAT123, O=X"
        );
        let escaped = name(r"O=Foo\, Inc, C=US");
        assert_eq!(escaped.organisation(), Some("Foo, Inc"));
        assert_eq!(escaped.to_string(), r"O=Foo\, Inc, C=US");
        assert_eq!(name(&escaped.to_string()), escaped);
    }

    #[test]
    fn organisation_and_slug() {
        let a = name("O=Bank A, L=London, C=GB");
        assert_eq!(a.organisation(), Some("Bank A"));
        assert_eq!(a.slug(), "bank-a-london-gb");
        assert_eq!(name("CN=x").organisation(), None);
        assert_eq!(
            name("O=Société Générale, C=FR").slug(),
            "soci-t-g-n-rale-fr"
        );
        assert_eq!(name("O=../../etc, C=GB").slug(), "etc-gb");
        assert_eq!(name("O=---").slug(), "node");
    }

    #[test]
    fn invalid_inputs_say_why() {
        for (input, needle) in [
            ("", "empty"),
            ("   ", "empty"),
            ("Bank A", "not a KEY=VALUE"),
            ("O=Bank A,", "empty attribute"),
            ("O=Bank A,,C=GB", "empty attribute"),
            ("=Bank A", "no attribute key"),
            ("O=", "empty value"),
            ("O=  , C=GB", "empty value"),
            ("XX=1", "unknown attribute key `XX`"),
            ("O=A, O=A", "appears twice"),
            ("O=A\\", "backslash"),
        ] {
            match input.parse::<LegalName>() {
                Err(CertError::InvalidLegalName { input: got, reason }) => {
                    assert_eq!(got, input);
                    assert!(reason.contains(needle), "{input}: {reason}");
                }
                other => panic!("{input}: expected InvalidLegalName, got {other:?}"),
            }
        }
        let msg = "XX=1".parse::<LegalName>().unwrap_err().to_string();
        assert!(msg.contains("XX=1") && msg.contains("unknown"), "{msg}");
    }

    /// A self-signed certificate for `subject` (in this order), DER.
    fn cert(subject: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn read(der: &[u8]) -> Result<LegalName, CertError> {
        LegalName::from_der_cert(&CertificateDer::from(der))
    }

    /// Replaces every occurrence of `from` in `der` by `to` (same length).
    fn patch(der: &mut [u8], from: &[u8], to: &[u8]) {
        let mut i = 0;
        while i + from.len() <= der.len() {
            if &der[i..i + from.len()] == from {
                der[i..i + from.len()].copy_from_slice(to);
            }
            i += 1;
        }
    }

    #[test]
    fn certificate_subject_round_trips_through_its_canonical_form() {
        use rcgen::DnType;
        let der = cert(&[
            (DnType::CountryName, "GB"),
            (DnType::LocalityName, "London"),
            (DnType::OrganizationName, "Bank, A"),
        ]);
        let n = read(&der).unwrap();
        assert_eq!(n, name("O=Bank\\, A, L=London, C=GB"));
        assert_eq!(name(&n.canonical()), n);
    }

    // Found by fuzzing (fuzz/, target legal_name_der): a subject whose canonical form does
    // not parse, so the float would stamp a sender no node can read.
    #[test]
    fn certificate_subject_with_an_empty_value_is_refused() {
        use rcgen::DnType;
        let der = cert(&[
            (DnType::OrganizationName, "Bank A"),
            (DnType::OrganizationalUnitName, " "),
        ]);
        let err = read(&der).unwrap_err().to_string();
        assert!(err.contains("OU has an empty value"), "{err}");
    }

    #[test]
    fn certificate_subject_with_a_repeated_attribute_is_refused() {
        use rcgen::DnType;
        let mut der = cert(&[
            (DnType::OrganizationName, "Bank A"),
            (DnType::LocalityName, "Bank A"),
        ]);
        // L's OID 2.5.4.7 becomes O's 2.5.4.10: `O=Bank A` twice.
        patch(
            &mut der,
            &[0x06, 0x03, 0x55, 0x04, 0x07],
            &[0x06, 0x03, 0x55, 0x04, 0x0a],
        );
        let err = read(&der).unwrap_err().to_string();
        assert!(err.contains("O=Bank A appears twice"), "{err}");
        // The same attribute with two values is a legal name (`DC=example, DC=com`).
        let der = cert(&[
            (DnType::OrganizationName, "Bank A"),
            (DnType::LocalityName, "London"),
        ]);
        let mut der = der;
        // `O=Bank A, O=London`.
        patch(
            &mut der,
            &[0x06, 0x03, 0x55, 0x04, 0x07],
            &[0x06, 0x03, 0x55, 0x04, 0x0a],
        );
        let n = read(&der).unwrap();
        assert_eq!(name(&n.canonical()), n);
    }

    #[test]
    fn certificate_subject_with_a_non_dotted_oid_is_refused() {
        use rcgen::DnType;
        let mut der = cert(&[
            (DnType::OrganizationName, "Bank A"),
            (DnType::LocalityName, "LondonLondonXY"),
        ]);
        // `L=LondonLondonXY` becomes an attribute whose type is an OID with an arc too big
        // for 64 bits, which x509-parser writes as hex bytes ("81 81 ..."): no key a written
        // legal name can have. Same length, so the DER stays well-formed.
        let mut from = vec![0x06, 0x03, 0x55, 0x04, 0x07, 0x0c, 14];
        from.extend_from_slice(b"LondonLondonXY");
        let mut to = vec![0x06, 11];
        to.extend_from_slice(&[0x81; 10]);
        to.extend_from_slice(&[0x01, 0x0c, 6]);
        to.extend_from_slice(b"London");
        assert_eq!(from.len(), to.len());
        patch(&mut der, &from, &to);
        let err = read(&der).unwrap_err().to_string();
        assert!(err.contains("is not a dotted OID"), "{err}");
    }

    /// What `docs/security.md` (*Names the root may issue*) tells a network root, pinned: which
    /// differences the comparison ignores (so two such names are one identity) and which it
    /// keeps although an operator cannot see them.
    #[test]
    fn what_the_comparison_ignores_and_what_it_keeps() {
        let a = name("O=Bank A, L=London, C=GB");
        // Ignored: Unicode whitespace at either end of a value (NBSP, ideographic space).
        assert_eq!(a, name("O=\u{a0}Bank A\u{3000}, L=London, C=GB"));
        // Kept, though invisible or near-identical on screen: zero-width characters (not
        // Unicode whitespace), inner spacing, case, composed vs decomposed accents, look-alike
        // letters from another script.
        for lookalike in [
            "O=Bank A\u{200b}, L=London, C=GB",
            "O=Bank\u{a0}A, L=London, C=GB",
            "O=Bank  A, L=London, C=GB",
            "O=BANK A, L=London, C=GB",
            "O=B\u{430}nk A, L=London, C=GB",
        ] {
            assert_ne!(a, name(lookalike), "{lookalike:?}");
        }
        assert_ne!(
            name("O=Soci\u{e9}t\u{e9}, C=FR"),
            name("O=Socie\u{301}te\u{301}, C=FR")
        );
        // Encodings: the same text as UTF8String or BMPString is the same name.
        use rcgen::{DnType, DnValue};
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::OrganizationName,
            DnValue::BmpString("Soci\u{e9}t\u{e9}".try_into().unwrap()),
        );
        params.distinguished_name.push(
            DnType::CountryName,
            DnValue::PrintableString("FR".try_into().unwrap()),
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let bmp = read(params.self_signed(&key).unwrap().der()).unwrap();
        assert_eq!(bmp, name("O=Soci\u{e9}t\u{e9}, C=FR"));
    }

    #[test]
    fn dotted_oids() {
        assert!(is_dotted_oid("2.5.4.10"));
        assert!(!is_dotted_oid("2"));
        assert!(!is_dotted_oid("2..4"));
        assert!(!is_dotted_oid("O"));
    }
}
