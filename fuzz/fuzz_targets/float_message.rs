//! The float's path for an incoming AMQP 1.0 message (its raw sections, as the transfer
//! payloads concatenate to): the frame guard's scanner first; only what it accepts whole,
//! ending between values, is decoded by serde_amqp as fe2o3 does, and what decodes is
//! validated and converted by `from_amqp`. Nothing may panic, and nothing the scanner
//! accepts may overflow the stack of a float worker thread (2 MiB) when decoded, and what
//! decodes must re-encode to something the scanner accepts (so the decoder read the bytes as
//! the scanner did).
#![no_main]

mod common;

use drawbridge_mapping::inbound::from_amqp;
use drawbridge_runtime::frame_guard::Scanner;
use fe2o3_amqp::types::{
    messaging::{
        message::__private::{Deserializable, Serializable},
        Body, Message,
    },
    primitives::Value,
};
use libfuzzer_sys::fuzz_target;

/// The float's default body limit.
const MAX_SIZE: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut scanner = Scanner::new();
    match scanner.feed(data, None) {
        Ok(n) => assert_eq!(n, data.len(), "the scanner stops early only when asked to"),
        Err(_) => return,
    }
    if !scanner.at_boundary() {
        return;
    }
    let bytes = data.to_vec();
    common::on_worker_stack(move || {
        let Ok(msg) = serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(&bytes) else {
            return;
        };
        // What was decoded nests as the scanner saw it: its encoding passes the scanner too
        // (a decoder that read the bytes otherwise than the scanner, e.g. by count where the
        // scanner went by size, would nest deeper than the scanner allowed).
        if !has_timestamp_key(&msg.0) {
            let again =
                serde_amqp::to_vec(&Serializable(&msg.0)).expect("a decoded message encodes");
            let mut rescan = Scanner::new();
            if let Err(e) = rescan.feed(&again, None) {
                panic!(
                    "the scanner passed a message whose decoded form it refuses ({e}): {again:?}"
                );
            }
        }
        if let Ok(inbound) = from_amqp(msg.0, MAX_SIZE) {
            assert!(
                inbound.body.len() <= MAX_SIZE,
                "body over the limit accepted"
            );
            assert!(!inbound.message_id.is_empty() && inbound.message_id.len() <= 255);
            let _ = inbound.dedup_key();
        }
    });
});

/// Whether the message holds what serde_amqp 0.18 cannot encode back as it read it, so the
/// re-encoding check skips it (Drawbridge never encodes a peer's message):
/// - a map with a timestamp key: followed by a string it hits `unreachable!()` in
///   `serialize_str` (the timestamp leaves its type marker set);
/// - an array of nulls: it writes `[0xe0, 3, 2, 0x40, 0x40]` for the `[0xe0, 2, 2, 0x40]` it
///   read (found by this target). The scanner and the decoder agree on what was read (two
///   zero-width elements): only the encoder is off.
fn has_timestamp_key(msg: &Message<Body<Value>>) -> bool {
    let mut todo: Vec<&Value> = Vec::new();
    for a in [msg.delivery_annotations.as_ref().map(|a| &a.0)]
        .into_iter()
        .flatten()
        .chain(msg.message_annotations.as_ref().map(|a| &a.0))
        .chain(msg.footer.as_ref().map(|f| &f.0))
    {
        todo.extend(a.values());
    }
    match &msg.body {
        Body::Value(v) => todo.push(&v.0),
        Body::Sequence(seqs) => {
            for s in seqs.iter() {
                todo.extend(s.0.iter());
            }
        }
        _ => {}
    }
    while let Some(v) = todo.pop() {
        match v {
            Value::Map(m) => {
                for (k, v) in m.iter() {
                    if matches!(k, Value::Timestamp(_)) {
                        return true;
                    }
                    todo.push(k);
                    todo.push(v);
                }
            }
            Value::List(l) => todo.extend(l.iter()),
            Value::Array(a) => {
                if a.iter().any(|e| matches!(e, Value::Null)) {
                    return true;
                }
                todo.extend(a.iter());
            }
            Value::Described(d) => todo.push(&d.value),
            _ => {}
        }
    }
    false
}
