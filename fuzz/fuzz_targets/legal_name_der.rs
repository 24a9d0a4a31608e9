//! A certificate's subject as a legal name (`LegalName::from_der_cert`): the float reads the
//! peer's certificate with it, and stamps its canonical form as the sender, which the
//! receiving node parses. Arbitrary DER must not panic; a subject that is read must have a
//! canonical form that parses back to the same name.
#![no_main]

use drawbridge_certs::LegalName;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = LegalName::from_der_cert(&CertificateDer::from(data)) else {
        return;
    };
    let canonical = name.canonical();
    let back: LegalName = canonical
        .parse()
        .unwrap_or_else(|e| panic!("canonical form {canonical:?} does not parse: {e}"));
    assert_eq!(back, name, "canonical form {canonical:?} is another name");
    let _ = name.organisation();
    let _ = name.slug();
});
