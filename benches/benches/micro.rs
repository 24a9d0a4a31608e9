//! In-process micro-benchmarks (divan): the per-message and per-command CPU work of the bridge
//! and the float, without brokers, TLS or sockets.
//!
//! - `control`: decoding a node's control envelope (`SequencedCommand::decode`, what the
//!   bridge's control loop calls) for a `Snapshot` of 1, 100 and 1000 links and a `CreateLink`,
//!   the inputs built with the protocol crate's own encoder.
//! - `bridge`: `outbound::to_amqp`, AMQP 0.9.1 delivery → AMQP 1.0 message, for bodies of
//!   128 B, 1 KiB and 64 KiB with a realistic set of properties and headers; that message's
//!   fe2o3 encoding; both together (the fe2o3 path); and `wire_out::encode`, the same bytes
//!   written directly into a reused buffer.
//! - `float`: `inbound::from_amqp`, AMQP 1.0 message → what the float publishes, same sizes,
//!   plus decoding the transfer payload into a message (what fe2o3 does before it) and the
//!   frame guard (`frame_guard::Frames`, `frame_guard::Scanner`) on a 1 KiB transfer; the
//!   three together (`old_path`) against `wire_in::from_bytes`, which does their work in one
//!   pass over the payload (time and allocations per message).
//!
//! Run with `cargo bench -p drawbridge-benches --bench micro` (add a filter such as `float` to
//! run a part). Allocations are counted (divan's `AllocProfiler`), so each row also shows
//! allocations and bytes allocated per iteration. The end-to-end benchmark is `--bench e2e`
//! (see `e2e.rs`).

use divan::{black_box, counter::BytesCount, AllocProfiler, Bencher};
use drawbridge_control_protocol::{
    ControlCommand, CreateLink, PeerLink, SequencedCommand, Snapshot, Target,
    DEFAULT_TARGET_ADDRESS,
};
use fe2o3_amqp::types::{
    definitions::{Handle, SequenceNo},
    messaging::{
        message::__private::{Deserializable, Serializable},
        Body, Data, Message,
    },
    performatives::{Performative, Transfer},
    primitives::Value,
};
use lapin::{
    message::Delivery,
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties,
};

// Allocations per message are part of what the rows compare.
#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

/// Body sizes of the conversion benchmarks: small, typical, large.
const SIZES: [usize; 3] = [128, 1024, 64 * 1024];

/// The float's and the bridge's default `max_message_size` is far above every size here.
const MAX_SIZE: usize = 16 * 1024 * 1024;

const NODE: &str = "O=Bank A, L=London, C=GB";

// ---------------------------------------------------------------------------------------------
// control protocol

fn peer_link(i: usize) -> PeerLink {
    PeerLink {
        queue: format!("drawbridge.peers.bank-{i:04}"),
        targets: vec![
            Target::new(format!("float-a.bank-{i:04}.example.net"), 5671),
            Target::new(format!("float-b.bank-{i:04}.example.net"), 5671),
        ],
        legal_names: vec![format!("O=Bank {i:04}, L=Frankfurt, C=DE")],
        target_address: DEFAULT_TARGET_ADDRESS.to_owned(),
    }
}

fn encoded_snapshot(links: usize) -> Vec<u8> {
    SequencedCommand {
        sequence: 42,
        epoch: 0,
        command: ControlCommand::Snapshot(Snapshot {
            node_identity: NODE.into(),
            inbox_queues: vec!["drawbridge.inbox".into()],
            links: (0..links).map(peer_link).collect(),
        }),
    }
    .encode()
}

mod control {
    use super::*;

    /// `SequencedCommand::decode` of a snapshot with `links` peer links (protobuf parse and
    /// validation of every link).
    #[divan::bench(args = [1, 100, 1000])]
    fn decode_snapshot(bencher: Bencher, links: usize) {
        let bytes = encoded_snapshot(links);
        bencher
            .counter(BytesCount::of_slice(&bytes))
            .bench(|| SequencedCommand::decode(black_box(&bytes)).expect("valid snapshot"));
    }

    /// `SequencedCommand::decode` of one `CreateLink`.
    #[divan::bench]
    fn decode_create_link(bencher: Bencher) {
        let bytes = SequencedCommand {
            sequence: 43,
            epoch: 0,
            command: ControlCommand::CreateLink(CreateLink {
                node_identity: NODE.into(),
                link: peer_link(7),
            }),
        }
        .encode();
        bencher
            .counter(BytesCount::of_slice(&bytes))
            .bench(|| SequencedCommand::decode(black_box(&bytes)).expect("valid create"));
    }
}

// ---------------------------------------------------------------------------------------------
// messages

/// What a node typically publishes to a peer queue: persistent, a message id, content type,
/// timestamp, the destination header and a couple of application headers.
fn properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in [
        (
            "drawbridge-destination",
            AMQPValue::LongString(LongString::from("O=Bank B, L=Frankfurt, C=DE")),
        ),
        (
            "trade-ref",
            AMQPValue::LongString(LongString::from("TR-2026-000123456")),
        ),
        ("schema-version", AMQPValue::LongInt(3)),
        ("urgent", AMQPValue::Boolean(false)),
    ] {
        headers.insert(ShortString::from(k), v);
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from("7f6c2a9e-3b1d-4c8e-9a2f-0d5e6b7c8a91"))
        .with_content_type(ShortString::from("application/json"))
        .with_timestamp(1_767_225_600)
        .with_headers(headers)
}

fn body(size: usize) -> Vec<u8> {
    (0..size).map(|i| b"{\"amount\":12345}"[i % 16]).collect()
}

fn delivery(size: usize) -> Delivery {
    let mut d = Delivery::mock(
        1,
        ShortString::from(""),
        ShortString::from("drawbridge.peers.bank-b"),
        false,
        body(size),
    );
    d.properties = properties();
    d
}

/// The AMQP 1.0 message the bridge sends for a body of `size` bytes.
fn bridge_message(size: usize) -> Message<Data> {
    drawbridge_mapping::outbound::to_amqp(&delivery(size), MAX_SIZE).expect("convertible")
}

/// That message encoded, as it travels in the transfer frames.
fn encoded_message(size: usize) -> Vec<u8> {
    serde_amqp::to_vec(&Serializable(&bridge_message(size))).expect("encodable")
}

/// A transfer payload decoded as the float's link receives it.
fn decode_message(bytes: &[u8]) -> Message<Body<Value>> {
    serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes)
        .expect("decodable")
        .0
}

mod bridge {
    use super::*;

    /// `outbound::to_amqp`: 0.9.1 delivery → AMQP 1.0 message (body copied once).
    #[divan::bench(args = SIZES)]
    fn to_amqp(bencher: Bencher, size: usize) {
        let d = delivery(size);
        bencher
            .counter(BytesCount::new(size))
            .bench(|| drawbridge_mapping::outbound::to_amqp(black_box(&d), MAX_SIZE).expect("ok"));
    }

    /// The same message encoded to the bytes of its transfer (fe2o3's `serde_amqp` encoding,
    /// what the bridge's sender does after `to_amqp`).
    #[divan::bench(args = SIZES)]
    fn encode_message(bencher: Bencher, size: usize) {
        let msg = bridge_message(size);
        bencher
            .counter(BytesCount::new(size))
            .bench(|| serde_amqp::to_vec(&Serializable(black_box(&msg))).expect("ok"));
    }

    /// `to_amqp` then the fe2o3 encoding: delivery → transfer payload bytes on the fe2o3 path.
    #[divan::bench(args = SIZES)]
    fn to_amqp_and_encode(bencher: Bencher, size: usize) {
        let d = delivery(size);
        bencher.counter(BytesCount::new(size)).bench(|| {
            let msg = drawbridge_mapping::outbound::to_amqp(black_box(&d), MAX_SIZE).expect("ok");
            serde_amqp::to_vec(&Serializable(msg)).expect("ok")
        });
    }

    /// `wire_out::encode`: delivery → the same payload bytes, written directly into a buffer
    /// the link reuses (cleared, with room: as the bridge's sender holds one).
    #[divan::bench(args = SIZES)]
    fn encode_bytes(bencher: Bencher, size: usize) {
        let d = delivery(size);
        let mut out = Vec::with_capacity(size + 1024);
        bencher.counter(BytesCount::new(size)).bench_local(|| {
            out.clear();
            drawbridge_mapping::wire_out::encode(black_box(&d), MAX_SIZE, &mut out).expect("ok");
            out.len()
        });
    }
}

mod float {
    use drawbridge_runtime::frame_guard::{Frames, Scanner};

    use super::*;

    /// `inbound::from_amqp`: AMQP 1.0 message → validated 0.9.1 properties and body.
    #[divan::bench(args = SIZES)]
    fn from_amqp(bencher: Bencher, size: usize) {
        let bytes = encoded_message(size);
        bencher
            .counter(BytesCount::new(size))
            .with_inputs(|| decode_message(&bytes))
            .bench_values(|msg| drawbridge_mapping::inbound::from_amqp(msg, MAX_SIZE).expect("ok"));
    }

    /// Transfer payload bytes → `Message<Body<Value>>` (the decoding fe2o3 does for the
    /// float's receiver before `from_amqp`).
    #[divan::bench(args = SIZES)]
    fn decode_transfer_payload(bencher: Bencher, size: usize) {
        let bytes = encoded_message(size);
        bencher
            .counter(BytesCount::of_slice(&bytes))
            .bench(|| super::decode_message(black_box(&bytes)));
    }

    /// The float's whole old path for a transfer payload: the frame guard's scanner,
    /// fe2o3's decoding into `Message<Body<Value>>`, `inbound::from_amqp`.
    #[divan::bench(args = SIZES)]
    fn old_path(bencher: Bencher, size: usize) {
        let bytes = encoded_message(size);
        bencher.counter(BytesCount::new(size)).bench(|| {
            let mut s = Scanner::new();
            s.feed(black_box(&bytes), None).expect("clean");
            assert!(s.at_boundary());
            drawbridge_mapping::inbound::from_amqp(super::decode_message(&bytes), MAX_SIZE)
                .expect("ok")
        });
    }

    /// `wire_in::from_bytes`: the same, in one pass from the payload bytes (what replaces
    /// the three above).
    #[divan::bench(args = SIZES)]
    fn from_bytes(bencher: Bencher, size: usize) {
        let bytes = encoded_message(size);
        bencher.counter(BytesCount::new(size)).bench(|| {
            drawbridge_mapping::wire_in::from_bytes(black_box(&bytes), MAX_SIZE).expect("ok")
        });
    }

    /// The frame guard's value scanner over the encoded 1 KiB message (the depth check on
    /// a transfer payload).
    #[divan::bench]
    fn scan_1k_message(bencher: Bencher) {
        let bytes = encoded_message(1024);
        bencher.counter(BytesCount::of_slice(&bytes)).bench(|| {
            let mut s = Scanner::new();
            s.feed(black_box(&bytes), None).expect("clean");
            s.completed()
        });
    }

    /// `Frames::feed` on a connection stream of a protocol header and one transfer frame
    /// carrying the encoded 1 KiB message (performative decode and payload scan).
    #[divan::bench]
    fn frames_1k_transfer(bencher: Bencher) {
        let stream = transfer_stream(&encoded_message(1024));
        bencher.counter(BytesCount::of_slice(&stream)).bench(|| {
            let mut f = Frames::new(256 * 1024);
            f.feed(black_box(&stream)).expect("clean");
            f
        });
    }

    fn transfer_stream(payload: &[u8]) -> Vec<u8> {
        let transfer = Performative::Transfer(Transfer {
            handle: Handle(0),
            delivery_id: Some(1 as SequenceNo),
            delivery_tag: Some(vec![0, 0, 0, 1].into()),
            message_format: Some(0),
            settled: None,
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        });
        let performative = serde_amqp::to_vec(&transfer).expect("encodable");
        let size = u32::try_from(8 + performative.len() + payload.len()).expect("fits");
        let mut stream = b"AMQP\x00\x01\x00\x00".to_vec();
        stream.extend_from_slice(&size.to_be_bytes());
        stream.extend_from_slice(&[2, 0, 0, 0]); // doff 2 (8 bytes), type AMQP, channel 0
        stream.extend_from_slice(&performative);
        stream.extend_from_slice(payload);
        stream
    }
}
