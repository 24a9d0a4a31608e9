//! The float's frame guard on a connection's incoming bytes (`Frames::feed`), fed in the
//! chunks a TLS stream might deliver them in. The first byte of the input seeds the chunk
//! sizes; the rest is the byte stream. Nothing may panic or overflow a float worker's stack
//! (performatives are decoded there), and the verdict must not depend on the chunking.
#![no_main]

mod common;

use drawbridge_runtime::frame_guard::Frames;
use libfuzzer_sys::fuzz_target;

/// The float's maximum frame size.
const MAX_FRAME: u32 = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let stream = stream.to_vec();
    common::on_worker_stack(move || {
        common::same_verdict_in_chunks(seed, &stream, || Frames::new(MAX_FRAME));
    });
});
