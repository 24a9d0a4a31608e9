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

fn frames() -> Frames {
    Frames::with_limits(MAX_FRAME, PeerLimits::FOR_A_FLOAT)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let stream = stream.to_vec();
    common::on_worker_stack(move || {
        let whole = frames().feed(&stream);

        // The same bytes in chunks of 1..=max bytes, sizes from a small xorshift generator.
        let max = 1 + usize::from(seed & 0x3f);
        let mut state = u32::from(seed) | 0x100;
        let mut chunked_frames = frames();
        let mut chunked = Ok(());
        let mut rest = stream.as_slice();
        while !rest.is_empty() {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let n = (1 + state as usize % max).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            chunked = chunked_frames.feed(chunk);
            if chunked.is_err() {
                break;
            }
            rest = tail;
        }
        assert_eq!(
            whole, chunked,
            "the verdict depends on how the bytes were chunked"
        );
    });
});
