//! Shared by the float targets: run a check on a thread whose stack is as small as the
//! float's tokio workers' (2 MiB, tokio's default), so that input which would overflow the
//! float's stack overflows it here too (and libFuzzer records the crash).

use std::sync::{
    mpsc::{self, Receiver, Sender},
    Mutex, OnceLock,
};

/// Stack of a tokio worker thread (tokio's default, which the float keeps).
pub const WORKER_STACK: usize = 2 * 1024 * 1024;

type Job = Box<dyn FnOnce() + Send>;

struct Worker {
    jobs: Sender<Job>,
    done: Receiver<()>,
}

static WORKER: OnceLock<Mutex<Worker>> = OnceLock::new();

/// Runs `job` on the small-stack worker and waits for it. A panic there aborts the process
/// (libfuzzer-sys' panic hook), so the fuzzer sees it as a crash.
pub fn on_worker_stack(job: impl FnOnce() + Send + 'static) {
    let worker = WORKER.get_or_init(|| {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("fuzz-worker".into())
            .stack_size(WORKER_STACK)
            .spawn(move || {
                for job in rx {
                    job();
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the worker thread");
        Mutex::new(Worker { jobs, done })
    });
    let w = worker.lock().unwrap_or_else(|e| e.into_inner());
    w.jobs.send(Box::new(job)).expect("worker alive");
    w.done.recv().expect("worker finished the job");
}

/// The frame guard's verdict on `stream`, fed whole and fed in chunks of 1..=64 bytes (sizes
/// from a small xorshift generator seeded by `seed`), must be the same; `frames` makes a
/// guard with the limits of the daemon under test. Shared by `float_frames` and
/// `bridge_frames`.
#[allow(dead_code)] // Not every target that includes this module uses it.
pub fn same_verdict_in_chunks(
    seed: u8,
    stream: &[u8],
    frames: impl Fn() -> drawbridge_runtime::frame_guard::Frames,
) {
    let whole = frames().feed(stream);
    let max = 1 + usize::from(seed & 0x3f);
    let mut state = u32::from(seed) | 0x100;
    let mut chunked_frames = frames();
    let mut chunked = Ok(());
    let mut rest = stream;
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
}
