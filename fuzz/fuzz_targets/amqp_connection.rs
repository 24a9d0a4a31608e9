//! The engine's connection state machine fed a peer's bytes. The first byte chooses the side
//! (bit 7: a client, the bridge's role; else a server, the float's) and seeds the chunk
//! sizes; the rest is the stream. The state machine answers as the daemons will: a server
//! accepts every link with credit 8 and accepts every delivery; a client begins a session and
//! attaches a sender before the bytes arrive, and sends a delivery whenever it has credit.
//! Nothing may panic, the output must not depend on the chunking (the engine's output is
//! taken after each frame), and what the engine holds
//! stays bounded (a frame, a delivery in assembly).
#![no_main]

mod common;

use std::time::Instant;

use bytes::BytesMut;
use drawbridge_amqp::{
    connection::{CommandError, Config, Connection, Event},
    performatives::Outcome,
};
use libfuzzer_sys::fuzz_target;

fn run(client: bool, stream: &[u8], chunk: impl FnMut() -> usize) -> (Vec<u8>, bool, usize) {
    let config = Config {
        max_frame_size: 4096,
        max_message_size: 64 * 1024,
        ..Config::default()
    };
    let mut c = if client {
        Connection::client(config)
    } else {
        Connection::server(config)
    };
    let mut link = None;
    if client {
        let s = c.begin().expect("begin");
        link = Some(c.attach_sender(s, "fuzz", "inbox").expect("attach"));
    }
    let mut out = Vec::new();
    let mut events = 0usize;
    let mut pending = BytesMut::new();
    let mut rest = stream;
    let mut chunk = chunk;
    let now = Instant::now();
    while !rest.is_empty() && !c.is_closed() {
        let n = chunk().min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        pending.extend_from_slice(piece);
        // One frame at a time, its events answered before the next, whatever the chunking.
        while c.handle_one(&mut pending, now) {
            while let Some(e) = c.poll_event() {
                events += 1;
                match e {
                    Event::AttachRequested { link, .. } => {
                        let _ = c.accept_link(link, 8, None);
                    }
                    Event::Delivery {
                        link, id, payload, ..
                    } => {
                        assert!(payload.len() <= 64 * 1024);
                        // Only a link the peer already detached can refuse the settle.
                        match c.settle(link, id, Outcome::Accepted) {
                            Ok(()) | Err(CommandError::NotOpen) => {}
                            Err(e) => panic!("settle refused: {e}"),
                        }
                    }
                    Event::Credit { .. } | Event::LinkReady { .. } => {
                        if let Some(l) = link {
                            // The peer decides credit, window, link state and its
                            // max-message-size: only those may refuse the message (the bridge
                            // waits for credit, reconnects, or dead-letters what is too big);
                            // a new kind of refusal must be named here (the match is exhaustive).
                            match c.send(l, b"t", &[0x00, 0x53, 0x75, 0xa0, 0x01, 0x2a]) {
                                Ok(_)
                                | Err(
                                    CommandError::NoCredit
                                    | CommandError::NotOpen
                                    | CommandError::TooLarge { .. },
                                ) => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            // Written after each frame (the engine batches what one write takes, so the
            // write points must match for the two chunkings to compare).
            let t = c.transmit().to_vec();
            c.written(t.len(), now);
            out.extend_from_slice(&t);
        }
        while c.poll_event().is_some() {
            events += 1;
        }
        // Once closed the engine reads no further; until then it holds at most a frame.
        assert!(
            c.is_closed() || pending.len() <= 4096 + 8,
            "more than a frame buffered"
        );
    }
    let t = c.transmit().to_vec();
    out.extend_from_slice(&t);
    (out, c.is_closed(), events)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let client = first & 0x80 != 0;
    let stream = stream.to_vec();
    common::on_worker_stack(move || {
        let whole = run(client, &stream, || usize::MAX);
        let max = 1 + usize::from(first & 0x3f);
        let mut state = u32::from(first) | 0x100;
        let chunked = run(client, &stream, || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            1 + state as usize % max
        });
        assert_eq!(
            whole, chunked,
            "the engine's answer depends on the chunking"
        );
    });
});
