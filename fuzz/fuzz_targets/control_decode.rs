//! Control decode: a `ControlMessage` (node → bridge) or `NotifyMessage` (bridge → node) body
//! as it arrives from the broker. Whatever decodes must encode and decode back to itself.
#![no_main]

use drawbridge_control_protocol::{ControlCommand, Notification, SequencedCommand};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SequencedCommand::decode(data) {
        let again = SequencedCommand::decode(&s.encode()).expect("re-encoded command decodes");
        assert_eq!(again, s);
        let _ = s.command.kind();
        let _ = s.command.node_identity();
    }
    if let Ok(c) = ControlCommand::decode(data) {
        let again = ControlCommand::decode(&c.encode()).expect("re-encoded command decodes");
        assert_eq!(again, c);
    }
    if let Ok(n) = Notification::decode(data) {
        let again = Notification::decode(&n.encode()).expect("re-encoded notification decodes");
        assert_eq!(again, n);
    }
});
