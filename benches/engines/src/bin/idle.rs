//! `cargo run --release --bin idle [-- LINKS]` (from benches/engines/): memory and idle CPU
//! per idle link for each engine. The server (float's role) and the clients (bridge's role)
//! run on threads of their own; live heap bytes are counted per side (see
//! `drawbridge_engine_bench::alloc_slot`), RSS and CPU for the whole process.

use std::{
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use drawbridge_engine_bench::{
    alloc_slot::{self, Counting, Slot},
    fe2o3::Fe2o3,
    ntex::Ntex,
    own::Own,
    tls::Tls,
    IdleLinks,
};

#[global_allocator]
static ALLOC: Counting = Counting;

/// How long the links sit idle while CPU is sampled.
const IDLE: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let links: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(500);
    let only = std::env::args().nth(2);
    println!("engine | links | bridge side heap KiB/link | float side heap KiB/link | process RSS KiB/link | idle CPU % of a core");
    println!("---|---|---|---|---|---");
    if only.as_deref().is_none_or(|o| o == Fe2o3::NAME) {
        measure::<Fe2o3>(links)?;
    }
    if only.as_deref().is_none_or(|o| o == Ntex::NAME) {
        measure::<Ntex>(links)?;
    }
    if only.as_deref().is_none_or(|o| o == Own::NAME) {
        measure::<Own>(links)?;
    }
    Ok(())
}

fn measure<E: IdleLinks>(links: usize) -> anyhow::Result<()> {
    // Each engine in a process of its own would be cleaner; running them one after the other
    // in one process is fine as long as each one's memory is measured as a difference.
    let tls = Tls::new()?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_tls = tls.clone();
    thread::Builder::new()
        .name(format!("{}-server", E::NAME))
        .spawn(move || {
            alloc_slot::tag(Slot::Server);
            if let Err(e) = E::serve(&server_tls, ready_tx) {
                eprintln!("{}: server: {e:#}", E::NAME);
            }
        })?;
    let port = ready_rx.recv_timeout(Duration::from_secs(30))?;
    thread::sleep(Duration::from_millis(200));

    let (result_tx, result_rx) = mpsc::channel();
    let client_tls = tls.clone();
    let client = thread::Builder::new()
        .name(format!("{}-client", E::NAME))
        .spawn(move || -> anyhow::Result<()> {
            alloc_slot::tag(Slot::Client);
            let before = (
                alloc_slot::live(Slot::Client),
                alloc_slot::live(Slot::Server),
                rss_kib(),
            );
            E::hold(&client_tls, port, links, &mut || {
                // Let both sides settle (attach answers, first flows) before measuring.
                thread::sleep(Duration::from_secs(2));
                let after = (
                    alloc_slot::live(Slot::Client),
                    alloc_slot::live(Slot::Server),
                    rss_kib(),
                );
                let cpu0 = cpu_ticks();
                let t0 = Instant::now();
                thread::sleep(IDLE);
                let cpu =
                    (cpu_ticks() - cpu0) as f64 / ticks_per_second() / t0.elapsed().as_secs_f64();
                let _ = result_tx.send((before, after, cpu));
            })
        })?;
    let (before, after, cpu) = result_rx.recv_timeout(Duration::from_secs(600))?;
    client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let n = links as f64;
    println!(
        "{} | {} | {:.1} | {:.1} | {:.1} | {:.2}",
        E::NAME,
        links,
        (after.0 - before.0) as f64 / 1024.0 / n,
        (after.1 - before.1) as f64 / 1024.0 / n,
        (after.2 - before.2) as f64 / n,
        cpu * 100.0,
    );
    Ok(())
}

fn rss_kib() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn ticks_per_second() -> f64 {
    100.0
}
