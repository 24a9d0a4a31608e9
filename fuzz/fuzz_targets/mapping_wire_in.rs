//! `wire_in::from_bytes` (the float's one-pass conversion of a delivery's payload) against the
//! float's old path on arbitrary bytes: the frame guard's scanner, fe2o3's decoding into a
//! `Message<Body<Value>>` (on a float worker's 2 MiB stack), `inbound::from_amqp`.
//!
//! - Where the scanner accepts the bytes whole and fe2o3 decodes them, `from_bytes` gives the
//!   same result: the same `Inbound` (properties bit for bit, headers, body, id, stripped
//!   count, properties size) or the same refusal; plain and stamped, with a body limit above
//!   and below the payload's size.
//! - Where either refused them (the float closed the link), `from_bytes` refuses them as
//!   `Invalid::Malformed`.
//! - `from_bytes` never panics, on the same small stack.
#![no_main]

mod common;

use drawbridge_mapping::{
    check::same_properties,
    inbound::{from_amqp, from_amqp_stamped, Inbound, Invalid},
    wire_in::{from_bytes, from_bytes_stamped},
};
use drawbridge_runtime::frame_guard::Scanner;
use fe2o3_amqp::types::{
    messaging::{message::__private::Deserializable, Body, Message},
    primitives::Value,
};
use libfuzzer_sys::fuzz_target;

/// The float's default body limit.
const MAX_SIZE: usize = 1 << 20;
/// A limit some bodies exceed.
const SMALL: usize = 64;
const SENDER: &str = "O=Bank A, L=London, C=GB";

fuzz_target!(|data: &[u8]| {
    let bytes = data.to_vec();
    common::on_worker_stack(move || {
        let new = from_bytes(&bytes, MAX_SIZE);
        let new_small = from_bytes_stamped(&bytes, SMALL, SENDER);
        let mut scanner = Scanner::new();
        let guard = matches!(scanner.feed(&bytes, None), Ok(n) if n == bytes.len())
            && scanner.at_boundary();
        if !guard {
            assert_malformed(&new, "the frame guard refused it", &bytes);
            assert_malformed(&new_small, "the frame guard refused it", &bytes);
            return;
        }
        let msg = match serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(&bytes) {
            Ok(m) => m.0,
            Err(e) => {
                let why = format!("fe2o3 could not decode it ({e})");
                assert_malformed(&new, &why, &bytes);
                assert_malformed(&new_small, &why, &bytes);
                return;
            }
        };
        assert_same(&from_amqp(msg.clone(), MAX_SIZE), &new, &bytes);
        assert_same(&from_amqp_stamped(msg, SMALL, SENDER), &new_small, &bytes);
    });
});

fn assert_malformed(new: &Result<Inbound, Invalid>, why: &str, bytes: &[u8]) {
    if !matches!(new, Err(Invalid::Malformed(_))) {
        panic!("{why}, but from_bytes gave {new:?}\nbytes {bytes:02x?}");
    }
}

fn assert_same(old: &Result<Inbound, Invalid>, new: &Result<Inbound, Invalid>, bytes: &[u8]) {
    let same = match (old, new) {
        (Ok(a), Ok(b)) => {
            same_properties(&a.properties, &b.properties)
                && a.message_id == b.message_id
                && a.message_id_type == b.message_id_type
                && a.body == b.body
                && a.destination == b.destination
                && a.stripped_headers == b.stripped_headers
                && a.properties_len == b.properties_len
        }
        (Err(a), Err(b)) => a == b,
        _ => false,
    };
    if !same {
        panic!("from_amqp gave {old:?}\nfrom_bytes gave {new:?}\nbytes {bytes:02x?}");
    }
}
