//! Tunnel decode: bytes on the tunnel between a bridge and a float in tunnel mode, as either
//! side reads them (`drawbridge_control_protocol::tunnel::decode`, the float's and the
//! bridge's codec). A frame either decodes within its bounds or is refused; whatever decodes
//! must encode and decode back to itself, and nothing over the limit is ever accepted.
#![no_main]

use drawbridge_control_protocol::tunnel;
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((body, used))) = tunnel::decode(rest, MAX) {
        assert!(used >= 4 && used <= 4 + MAX && used <= rest.len());
        let mut again = Vec::new();
        tunnel::encode(body.clone(), &mut again);
        let (back, n) = tunnel::decode(&again, usize::MAX)
            .expect("re-encoded frame decodes")
            .expect("whole frame");
        assert_eq!(n, again.len());
        assert_eq!(back, body);
        rest = &rest[used..];
    }
});
