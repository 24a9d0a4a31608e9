//! `cargo bench --bench engines` (from benches/engines/): CPU time and allocations per 1 KiB
//! transfer + disposition, for each AMQP 1.0 engine, on one loopback mTLS connection whose two
//! ends share one thread (so time per message is both ends' CPU; see the crate docs).

use divan::{counter::ItemsCount, AllocProfiler, Bencher};
use drawbridge_engine_bench::{
    fe2o3::Fe2o3, ntex::Ntex, own::Own, tls::Tls, Contender, BODY, ROUND,
};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

fn run<C: Contender>(bencher: Bencher) {
    let tls = Tls::new().expect("PKI");
    let mut pair = C::start(&tls).expect("connect");
    let body = vec![0x5a_u8; BODY];
    // Warm up: the TLS session, buffers and credit reach their steady state.
    pair.round(&body, ROUND).expect("warm-up round");
    bencher
        .counter(ItemsCount::new(ROUND))
        .bench_local(|| pair.round(&body, ROUND).expect("round"));
}

#[divan::bench(sample_count = 20, sample_size = 1)]
fn fe2o3(bencher: Bencher) {
    run::<Fe2o3>(bencher);
}

#[divan::bench(sample_count = 20, sample_size = 1)]
fn ntex(bencher: Bencher) {
    run::<Ntex>(bencher);
}

#[divan::bench(sample_count = 20, sample_size = 1)]
fn own(bencher: Bencher) {
    run::<Own>(bencher);
}
