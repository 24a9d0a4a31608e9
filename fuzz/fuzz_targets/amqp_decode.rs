//! The engine's one decoder (`drawbridge_amqp`) on arbitrary bytes as a performative body and
//! as a SASL frame body: never a panic, never deeper than the limit on a worker's stack, and
//! what decodes is written back by the encoder to bytes that decode to the same value (the
//! decoder and the encoder agree on every field).
#![no_main]

mod common;

use drawbridge_amqp::{
    performatives::{Performative, Sasl},
    Limits,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    common::on_worker_stack(move || {
        if let Ok((p, used)) = Performative::decode(&data, Limits::DEFAULT) {
            assert!(used <= data.len());
            let mut again = Vec::new();
            p.encode(&mut again);
            let (back, n) = Performative::decode(&again, Limits::DEFAULT)
                .expect("what the encoder writes decodes");
            assert_eq!(n, again.len());
            assert_eq!(back, p, "decode(encode(p)) != p");
        }
        if let Ok(s) = Sasl::decode(&data, Limits::DEFAULT) {
            let mut again = Vec::new();
            s.encode(&mut again);
            assert_eq!(Sasl::decode(&again, Limits::DEFAULT).expect("decodes"), s);
        }
    });
});
