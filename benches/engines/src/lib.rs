//! The contenders of the AMQP 1.0 engine comparison (issue 23, step 1), each driving one
//! client (the bridge's role: a sending link) and one server (the float's role: a receiving
//! link that accepts every delivery) over a loopback mTLS connection, in one process.
//!
//! Every contender implements [`Contender`] on a single-threaded runtime of its own, with
//! both ends on the same thread: the wall time of a [`Contender::round`] is then the CPU time
//! both ends spend on it (TLS both ways included), and divan's allocation profiler, which
//! counts the allocations of the thread it measures, sees both ends' allocations.
//!
//! What a round is, for every contender: `n` messages of the given body (AMQP 1.0 `data`
//! section, a message id, no other sections), sent unsettled on one link, pipelined within
//! the link credit the server grants (as the bridge does), each accepted by the server with a
//! settled `accepted` disposition as soon as it arrives (the float does that after the
//! broker's confirm), and the round ends when the client has seen every outcome.

pub mod fe2o3;
pub mod ntex;
pub mod own;
pub mod tls;

use std::time::Duration;

/// The body size the issue asks about.
pub const BODY: usize = 1024;

/// Messages per measured round (divan's "items" counter divides by this).
pub const ROUND: usize = 1000;

/// Link credit the server grants, as the float's default `link_credit`.
pub const CREDIT: u32 = 500;

/// Deadline on every round and every connect: a contender that stalls fails the bench
/// instead of hanging it.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One engine: a connected client and server on one thread.
pub trait Contender: Sized {
    /// Short name for tables.
    const NAME: &'static str;

    /// Start a server on a loopback port and connect a client to it, over mTLS with
    /// `tls`'s configurations, with one session and one sending link attached.
    fn start(tls: &tls::Tls) -> anyhow::Result<Self>;

    /// Send `n` messages with `body` and return once all of them are accepted.
    fn round(&mut self, body: &[u8], n: usize) -> anyhow::Result<()>;
}

/// Idle links for the memory comparison (`src/bin/idle.rs`): connections with one session
/// and one sending link each, nothing sent, kept open.
///
/// The server and the clients run on two threads of their own (each a current-thread
/// runtime), so that the memory each side holds can be told apart: the bridge's side is the
/// client, the float's the server. An engine that starts threads of its own must run them
/// under [`alloc_slot::tag`] with the side's slot, or its memory is counted as neither side's.
pub trait IdleLinks {
    /// Short name for tables.
    const NAME: &'static str;

    /// Serve on the calling thread until the process ends; send the listening port to
    /// `ready` once connections are accepted.
    fn serve(tls: &tls::Tls, ready: std::sync::mpsc::Sender<u16>) -> anyhow::Result<()>;

    /// On the calling thread: open `n` connections to `port` (one session and one sending
    /// link each, with a 30 s idle timeout as the bridge's default), call `opened` once all
    /// are attached, and return (dropping them) when it returns.
    fn hold(tls: &tls::Tls, port: u16, n: usize, opened: &mut dyn FnMut()) -> anyhow::Result<()>;
}

pub mod alloc_slot {
    //! Live heap bytes per side: a global allocator (installed by the `idle` binary) that
    //! adds each allocation's size to the slot of the thread that made it and subtracts it
    //! where it is freed. Memory allocated by one side and freed by the other is rare in an
    //! idle connection; the process's total is reported beside the sides.

    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
        sync::atomic::{AtomicIsize, Ordering},
    };

    /// Which side a thread works for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Slot {
        /// Not one of the two sides (the main thread, the engines' helper threads untagged).
        Other = 0,
        /// The bridge's role.
        Client = 1,
        /// The float's role.
        Server = 2,
    }

    static LIVE: [AtomicIsize; 3] = [
        AtomicIsize::new(0),
        AtomicIsize::new(0),
        AtomicIsize::new(0),
    ];

    thread_local! {
        static SLOT: Cell<usize> = const { Cell::new(0) };
    }

    /// Count the calling thread's allocations to `slot` from now on.
    pub fn tag(slot: Slot) {
        SLOT.with(|s| s.set(slot as usize));
    }

    /// Live bytes allocated by threads of `slot`.
    pub fn live(slot: Slot) -> isize {
        LIVE[slot as usize].load(Ordering::Relaxed)
    }

    /// Live bytes of the whole process (as far as the allocator saw them).
    pub fn total() -> isize {
        LIVE.iter().map(|l| l.load(Ordering::Relaxed)).sum()
    }

    fn add(n: isize) {
        let slot = SLOT.try_with(|s| s.get()).unwrap_or(0);
        LIVE[slot].fetch_add(n, Ordering::Relaxed);
    }

    /// The counting allocator (over the system allocator).
    #[derive(Debug)]
    pub struct Counting;

    #[allow(unsafe_code)]
    // SAFETY: every call is passed on to `System` unchanged; only counters are updated.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}
