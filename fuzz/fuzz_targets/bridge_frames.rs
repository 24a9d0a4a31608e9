//! The bridge's frame guard on what a float answers (`Frames::feed` with the limits a bridge
//! holds a float to), fed in the chunks a TLS stream might deliver them in. The first byte of
//! the input seeds the chunk sizes; the rest is the byte stream. Nothing may panic or
//! overflow a bridge worker's stack (performatives are decoded there), and the verdict must
//! not depend on the chunking.
#![no_main]

mod common;

use drawbridge_runtime::frame_guard::{Frames, PeerLimits};
use libfuzzer_sys::fuzz_target;

/// The bridge's maximum frame size.
const MAX_FRAME: u32 = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let stream = stream.to_vec();
    common::on_worker_stack(move || {
        common::same_verdict_in_chunks(seed, &stream, || {
            Frames::with_limits(MAX_FRAME, PeerLimits::FOR_A_FLOAT)
        });
    });
});
