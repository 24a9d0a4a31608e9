//! Legal-name parsing (`LegalName: FromStr`): configuration, control messages and the
//! `drawbridge-destination` header a peer sends. Whatever parses must write itself in a form
//! that parses back to the same name: `canonical()` (what the float stamps as the sender)
//! and `Display`.
#![no_main]

use drawbridge_certs::LegalName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(name) = text.parse::<LegalName>() else {
        return;
    };
    let canonical = name.canonical();
    let back: LegalName = canonical
        .parse()
        .unwrap_or_else(|e| panic!("canonical form {canonical:?} does not parse: {e}"));
    assert_eq!(back, name, "canonical form {canonical:?} is another name");
    assert_eq!(back.canonical(), canonical, "canonical form is not stable");
    let shown = name.to_string();
    let back: LegalName = shown
        .parse()
        .unwrap_or_else(|e| panic!("displayed form {shown:?} does not parse: {e}"));
    assert_eq!(back, name, "displayed form {shown:?} is another name");
    let _ = name.organisation();
    assert!(!name.slug().is_empty());
});
