//! Parsing CRLs and checking their signatures.
//!
//! A CRL's signature is checked here, not by rustls: sources are untrusted, and one that does
//! not verify must be ignored before it reaches a verifier (where it would refuse everyone).

use std::cmp::Ordering as CmpOrdering;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateRevocationListDer, SignatureVerificationAlgorithm};

/// One parsed CRL.
#[derive(Clone)]
pub(super) struct Crl {
    pub(super) der: CertificateRevocationListDer<'static>,
    /// DER of the issuer name, to match certificates' issuers.
    pub(super) issuer_raw: Vec<u8>,
    pub(super) issuer: String,
    /// `nextUpdate` as Unix seconds.
    pub(super) next_update: Option<i64>,
    /// `thisUpdate` as Unix seconds.
    pub(super) this_update: i64,
    /// The CRL number, big-endian without leading zeros (empty if the CRL has none).
    pub(super) number: Vec<u8>,
    /// Raw serial numbers listed.
    pub(super) revoked: Vec<Vec<u8>>,
    /// File or URL it came from.
    pub(super) source: String,
}

impl Crl {
    pub(super) fn label(&self) -> String {
        format!("CRL of `{}` from {}", self.issuer, self.source)
    }

    pub(super) fn expired_at(&self, now: i64) -> Option<i64> {
        self.next_update.filter(|&t| t < now)
    }

    /// Whether this CRL goes back from `held` in CRL number or in `thisUpdate`: a source
    /// offering it is ignored (a revoked member could serve the list from before its
    /// revocation, genuine and signed).
    pub(super) fn older_than(&self, held: &Crl) -> bool {
        compare_numbers(&self.number, &held.number) == CmpOrdering::Less
            || self.this_update < held.this_update
    }

    /// Whether this CRL may replace `held`: neither goes back, and one moves forward.
    pub(super) fn newer_than(&self, held: &Crl) -> bool {
        !self.older_than(held)
            && (compare_numbers(&self.number, &held.number) == CmpOrdering::Greater
                || self.this_update > held.this_update)
    }

    pub(super) fn version(&self) -> String {
        let number = if self.number.is_empty() {
            "none".to_string()
        } else {
            self.number.iter().map(|b| format!("{b:02x}")).collect()
        };
        format!("number 0x{number}, thisUpdate (unix) {}", self.this_update)
    }
}

/// Orders two big-endian unsigned integers without leading zeros.
pub(super) fn compare_numbers(a: &[u8], b: &[u8]) -> CmpOrdering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

pub(super) fn parse_one(
    der: CertificateRevocationListDer<'static>,
    source: &str,
) -> Result<Crl, String> {
    webpki::BorrowedCertRevocationList::from_der(der.as_ref())
        .map_err(|e| format!("not a usable CRL: {e:?}"))?;
    let (issuer_raw, issuer, next_update, this_update, number, revoked) = {
        let (_, parsed) =
            x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| format!("not a CRL: {e}"))?;
        let number = parsed
            .crl_number()
            .map(|n| {
                let bytes = n.to_bytes_be();
                let zeros = bytes.iter().take_while(|&&b| b == 0).count();
                bytes[zeros..].to_vec()
            })
            .unwrap_or_default();
        (
            parsed.issuer().as_raw().to_vec(),
            parsed.issuer().to_string(),
            parsed.next_update().map(|t| t.timestamp()),
            parsed.last_update().timestamp(),
            number,
            parsed
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect(),
        )
    };
    Ok(Crl {
        der,
        issuer_raw,
        issuer,
        next_update,
        this_update,
        number,
        revoked,
        source: source.to_string(),
    })
}

/// Parses the CRLs in one file or download: PEM `X509 CRL` blocks, or a single DER CRL.
pub(super) fn parse_crls(bytes: &[u8], source: &str) -> Result<Vec<Crl>, String> {
    let ders = if bytes.first() == Some(&0x30) {
        vec![CertificateRevocationListDer::from(bytes.to_vec())]
    } else {
        let ders = <CertificateRevocationListDer as PemObject>::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        if ders.is_empty() {
            return Err("no `-----BEGIN X509 CRL-----` block found".into());
        }
        ders
    };
    ders.into_iter().map(|d| parse_one(d, source)).collect()
}

/// A DER element: its tag, its contents, the whole element, and what follows it.
pub(super) type DerElement<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// One DER element at the start of `input`. `None` if it does not parse (short input,
/// indefinite or huge length, a high tag number).
pub(super) fn der_element(input: &[u8]) -> Option<DerElement<'_>> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((tag, &rest[..len], &input[..header + len], &rest[len..]))
}

/// `contents` wrapped in a DER SEQUENCE.
pub(super) fn der_sequence(contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = vec![0x30];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// Whether the CRL `crl_der` is signed by the key in `spki` (SubjectPublicKeyInfo contents,
/// without the outer SEQUENCE), as rustls-webpki checks it during a handshake: the same
/// algorithms, matched by their DER identifiers.
pub(super) fn crl_signed_by(
    crl_der: &[u8],
    spki: &[u8],
    algs: &[&dyn SignatureVerificationAlgorithm],
) -> bool {
    let check = || -> Option<bool> {
        let (0x30, crl, _, _) = der_element(crl_der)? else {
            return None;
        };
        let (0x30, _, tbs, rest) = der_element(crl)? else {
            return None;
        };
        let (0x30, signature_alg, _, rest) = der_element(rest)? else {
            return None;
        };
        let (0x03, signature_bits, _, _) = der_element(rest)? else {
            return None;
        };
        let (0, signature) = signature_bits.split_first().map(|(u, s)| (*u, s))? else {
            return None;
        };
        let (0x30, key_alg, _, rest) = der_element(spki)? else {
            return None;
        };
        let (0x03, key_bits, _, _) = der_element(rest)? else {
            return None;
        };
        let (0, key) = key_bits.split_first().map(|(u, s)| (*u, s))? else {
            return None;
        };
        Some(
            algs.iter()
                .filter(|a| {
                    a.signature_alg_id().as_ref() == signature_alg
                        && a.public_key_alg_id().as_ref() == key_alg
                })
                .any(|a| a.verify_signature(key, tbs, signature).is_ok()),
        )
    };
    check().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::aws_lc_rs;

    #[test]
    fn der_helpers_and_crl_order() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let contents = vec![7u8; len];
            let wrapped = der_sequence(&contents);
            let (tag, inner, whole, rest) = der_element(&wrapped).unwrap();
            assert_eq!(
                (tag, inner, whole, rest.len()),
                (0x30, &contents[..], &wrapped[..], 0)
            );
        }
        // Truncated or garbage input never parses (nor panics), and verifies nothing.
        assert!(der_element(&[0x30, 0x82, 0x01]).is_none());
        assert!(der_element(&[0x30, 0x05, 1, 2]).is_none());
        assert!(der_element(&[0x1f, 0x00]).is_none());
        let algs = aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all;
        assert!(!crl_signed_by(&[], &[], algs));
        assert!(!crl_signed_by(&der_sequence(&[0x30, 0x00]), &[], algs));
        assert_eq!(compare_numbers(&[2], &[1]), CmpOrdering::Greater);
        assert_eq!(compare_numbers(&[1, 0], &[0xff]), CmpOrdering::Greater);
        assert_eq!(compare_numbers(&[], &[1]), CmpOrdering::Less);
    }

    #[test]
    fn garbage_is_not_a_crl() {
        assert!(parse_crls(b"hello", "x").is_err());
        assert!(parse_crls(&[0x30, 0x03, 0x02, 0x01, 0x01], "x").is_err());
    }
}
