//! The systemd watchdog, fed only by the loops that do the work.
//!
//! Why the watchdog is fed by the work loops: a pinger on its own timer proves only that
//! tokio's timer runs. Here each work loop (the bridge's control loop, the float's accept
//! loop) owns a [`Heartbeat`] it bumps on every iteration and on an idle timer arm, so an
//! idle loop is not mistaken for a wedged one. The [`Service`] task pings `WATCHDOG=1` at
//! half the interval systemd asked for, but only when [`verdict`] says every heartbeat is
//! fresh and every watched task still runs; otherwise it logs one ERROR line and stays
//! silent, and systemd restarts the daemon when the interval runs out. The messages go out
//! through [`crate::sd_notify`].

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    admin::AdminState,
    sd_notify::{watchdog_interval, Notifier},
};

/// How long a work loop may be silent before `/healthz` calls the daemon wedged when
/// systemd set no watchdog interval (a loop beats at least every second when idle; its
/// bounded waits are declared ahead with [`Heartbeat::busy_for`]).
pub const DEFAULT_MAX_SILENCE: Duration = Duration::from_secs(15);

/// Milliseconds on a process-wide monotonic clock (heartbeat timestamps).
fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What one work loop shares with the watchdog: when it last ran.
#[derive(Debug)]
struct Beat {
    /// Names the loop in the ERROR line when it stalls.
    name: &'static str,
    /// [`now_ms`] of its last iteration, or a promised time it will be back by
    /// ([`Heartbeat::busy_for`]).
    at_ms: AtomicU64,
}

/// A work loop's proof of life. The loop calls [`Heartbeat::beat`] on every iteration and
/// has a timer arm firing every [`Heartbeat::tick_every`] so that an idle loop still beats.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    beat: Arc<Beat>,
    /// How often an idle loop must beat: well inside the silence the watchdog tolerates.
    tick: Duration,
}

impl Heartbeat {
    fn new(name: &'static str, tick: Duration) -> Heartbeat {
        Heartbeat {
            beat: Arc::new(Beat {
                name,
                at_ms: AtomicU64::new(now_ms()),
            }),
            tick,
        }
    }

    /// A heartbeat nobody watches (daemons started without a [`Service`], tests).
    pub fn unwatched(name: &'static str) -> Heartbeat {
        Heartbeat::new(name, Duration::from_secs(1))
    }

    /// The loop runs.
    pub fn beat(&self) {
        self.beat.at_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// The loop is about to wait for a step bounded by `d` (a broker call under its op
    /// timeout, links stopping within their deadline): count it as alive until then.
    pub fn busy_for(&self, d: Duration) {
        let d = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.beat
            .at_ms
            .store(now_ms().saturating_add(d), Ordering::Relaxed);
    }

    /// Period of the idle timer arm the loop must have.
    pub fn tick_every(&self) -> Duration {
        self.tick
    }

    /// A timer for that arm (missed ticks delayed, not bunched).
    pub fn ticker(&self) -> tokio::time::Interval {
        let mut t = tokio::time::interval(self.tick);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }
}

/// What the watchdog decides at a ping time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every loop ran recently and every watched task runs: send `WATCHDOG=1`.
    Ping,
    /// A work loop has not run for `silent`: do not ping.
    Stalled {
        /// The loop's name.
        name: String,
        /// How long it has been silent.
        silent: Duration,
    },
    /// A task the daemon cannot work without has ended: do not ping.
    Ended {
        /// The task's name.
        name: String,
    },
}

/// The pure core of the watchdog: given the time `now_ms`, each loop's last heartbeat
/// (name, ms; a time in the future is a promise and counts as fresh) and the names of
/// watched tasks that have ended, ping only if no loop has been silent longer than
/// `max_silence` and no task has ended.
pub fn verdict<'a>(
    now_ms: u64,
    beats: impl IntoIterator<Item = (&'a str, u64)>,
    ended: impl IntoIterator<Item = &'a str>,
    max_silence: Duration,
) -> Verdict {
    if let Some(name) = ended.into_iter().next() {
        return Verdict::Ended {
            name: name.to_string(),
        };
    }
    let worst = beats
        .into_iter()
        .map(|(name, at)| (name, Duration::from_millis(now_ms.saturating_sub(at))))
        .max_by_key(|(_, silent)| *silent);
    match worst {
        Some((name, silent)) if silent > max_silence => Verdict::Stalled {
            name: name.to_string(),
            silent,
        },
        _ => Verdict::Ping,
    }
}

/// A liveness check of a task: returns false once the task has ended.
type Alive = Box<dyn Fn() -> bool + Send + Sync>;

struct ServiceInner {
    notifier: Notifier,
    /// `$WATCHDOG_USEC` if systemd asked for pings.
    watchdog: Option<Duration>,
    beats: Mutex<Vec<Heartbeat>>,
    tasks: Mutex<Vec<(&'static str, Alive)>>,
}

/// The daemon's side of the service manager: readiness, status, watchdog, stopping.
/// Cheap to clone; a disabled one costs a few atomics.
#[derive(Clone)]
pub struct Service {
    inner: Arc<ServiceInner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("notifier", &self.inner.notifier)
            .field("watchdog", &self.inner.watchdog)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
    pub fn from_env() -> Service {
        let var = |k: &str| std::env::var(k).ok();
        let watchdog = watchdog_interval(
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        );
        Service::new(Notifier::from_env(), watchdog)
    }

    /// One that notifies nothing (daemons started in-process by tests and tools).
    pub fn disabled() -> Service {
        Service::new(Notifier::disabled(), None)
    }

    /// With an explicit notifier and watchdog interval.
    pub fn new(notifier: Notifier, watchdog: Option<Duration>) -> Service {
        Service {
            inner: Arc::new(ServiceInner {
                notifier,
                watchdog,
                beats: Mutex::new(Vec::new()),
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The watchdog interval systemd expects, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.inner.watchdog
    }

    /// Longest silence of a work loop that still counts as alive: half the watchdog
    /// interval, or [`DEFAULT_MAX_SILENCE`] without one (for `/healthz`).
    fn max_silence(&self) -> Duration {
        self.inner.watchdog.map_or(DEFAULT_MAX_SILENCE, |w| w / 2)
    }

    /// For [`AdminState::live`]: `Err` with the ERROR line's reason unless [`Service::verdict`]
    /// says ping.
    pub fn live(&self) -> Result<(), String> {
        match self.verdict() {
            Verdict::Ping => Ok(()),
            Verdict::Stalled { name, silent } => {
                Err(format!("{name} has not run for {}s", silent.as_secs()))
            }
            Verdict::Ended { name } => Err(format!("{name} has ended")),
        }
    }

    /// A heartbeat for the work loop `name`, watched by the watchdog.
    pub fn heartbeat(&self, name: &'static str) -> Heartbeat {
        // An idle loop beats 8 times per interval (at most once a second, at least every
        // 50 ms), far inside the half interval of silence tolerated.
        let tick = self.inner.watchdog.map_or(Duration::from_secs(1), |w| {
            (w / 8).clamp(Duration::from_millis(50), Duration::from_secs(1))
        });
        let h = Heartbeat::new(name, tick);
        self.inner
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(h.clone());
        h
    }

    /// Watch a task the daemon cannot work without (the broker session supervisor):
    /// once `alive` returns false, the watchdog stops pinging.
    pub fn watch_task(&self, name: &'static str, alive: impl Fn() -> bool + Send + Sync + 'static) {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name, Box::new(alive)));
    }

    /// Send a raw `sd_notify` message.
    pub fn notify(&self, state: &str) -> bool {
        self.inner.notifier.notify(state)
    }

    /// The watchdog's verdict now.
    pub fn verdict(&self) -> Verdict {
        let beats = self
            .inner
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|h| (h.beat.name, h.beat.at_ms.load(Ordering::Relaxed)))
            .collect::<Vec<_>>();
        let ended = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, alive)| !alive())
            .map(|(name, _)| *name)
            .collect::<Vec<_>>();
        verdict(now_ms(), beats, ended, self.max_silence())
    }

    /// Follow the daemon until `shutdown`: `READY=1` the first time `state` is ready,
    /// `STATUS=` whenever its summary changes, `WATCHDOG=1` every half interval while
    /// [`Service::verdict`] allows it (with `EXTEND_TIMEOUT_USEC=` before the first
    /// `READY=1`, so a daemon waiting for its broker at boot is not killed by the start
    /// timeout while its loops run, and one wedged at boot is), and `STOPPING=1` on
    /// shutdown. Does nothing outside systemd.
    pub fn spawn(
        &self,
        state: Arc<dyn AdminState>,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.inner.notifier.is_enabled() {
            return None;
        }
        let this = self.clone();
        Some(tokio::spawn(
            async move { this.follow(state, shutdown).await },
        ))
    }

    async fn follow(self, state: Arc<dyn AdminState>, shutdown: CancellationToken) {
        let watchdog = self.inner.watchdog;
        let poll = watchdog.map_or(Duration::from_millis(250), |w| {
            (w / 8).clamp(Duration::from_millis(20), Duration::from_millis(250))
        });
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ready_sent = false;
        let mut last_summary = String::new();
        let mut last_ping: Option<Instant> = None;
        let mut stalled = false;
        if let Some(w) = watchdog {
            info!(interval = ?w, "systemd watchdog enabled; pinging from the work loops");
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.notify("STOPPING=1\nSTATUS=draining");
                    return;
                }
                _ = tick.tick() => {}
            }
            let summary = one_line(&state.summary());
            if !ready_sent && state.ready() {
                ready_sent = self.notify(&format!("READY=1\nSTATUS={summary}"));
                if ready_sent {
                    info!(status = %summary, "systemd notified: ready");
                }
                last_summary = summary;
            } else if summary != last_summary {
                self.notify(&format!("STATUS={summary}"));
                last_summary = summary;
            }
            let Some(w) = watchdog else { continue };
            if last_ping.is_some_and(|t| t.elapsed() < w / 2) {
                continue;
            }
            match self.verdict() {
                Verdict::Ping => {
                    let msg = if ready_sent {
                        "WATCHDOG=1".to_string()
                    } else {
                        format!("WATCHDOG=1\nEXTEND_TIMEOUT_USEC={}", w.as_micros())
                    };
                    self.notify(&msg);
                    last_ping = Some(Instant::now());
                    if std::mem::take(&mut stalled) {
                        warn!("watchdog: work loops running again; pinging again");
                    }
                }
                Verdict::Stalled { name, silent } => {
                    if !std::mem::replace(&mut stalled, true) {
                        error!(
                            "watchdog: {name} has not run for {}s; not pinging",
                            silent.as_secs()
                        );
                    }
                }
                Verdict::Ended { name } => {
                    if !std::mem::replace(&mut stalled, true) {
                        error!("watchdog: {name} has ended; not pinging");
                    }
                }
            }
        }
    }
}

/// `STATUS=` is one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(15);

    #[test]
    fn fresh_loops_ping() {
        assert_eq!(
            verdict(100_000, [("control loop", 99_000)], [], S),
            Verdict::Ping
        );
        assert_eq!(
            verdict(100_000, [("control loop", 85_000)], [], S),
            Verdict::Ping
        );
        assert_eq!(verdict(100_000, [], [], S), Verdict::Ping);
    }

    #[test]
    fn a_wedged_loop_stops_the_pings() {
        let v = verdict(
            100_000,
            [("accept loop", 99_500), ("control loop", 80_000)],
            [],
            S,
        );
        assert_eq!(
            v,
            Verdict::Stalled {
                name: "control loop".into(),
                silent: Duration::from_secs(20)
            }
        );
    }

    #[test]
    fn a_promised_return_counts_as_fresh() {
        // busy_for: the loop promised to be back by 130 s.
        assert_eq!(
            verdict(100_000, [("control loop", 130_000)], [], S),
            Verdict::Ping
        );
    }

    #[test]
    fn an_ended_task_stops_the_pings() {
        assert_eq!(
            verdict(100_000, [("accept loop", 100_000)], ["broker session"], S),
            Verdict::Ended {
                name: "broker session".into()
            }
        );
    }

    #[test]
    fn service_verdict_follows_heartbeats() {
        let service = Service::new(Notifier::disabled(), Some(Duration::from_millis(200)));
        let h = service.heartbeat("work loop");
        assert_eq!(h.tick_every(), Duration::from_millis(50));
        h.beat();
        assert_eq!(service.verdict(), Verdict::Ping);
        std::thread::sleep(Duration::from_millis(250));
        assert!(matches!(service.verdict(), Verdict::Stalled { .. }));
        h.busy_for(Duration::from_secs(10));
        assert_eq!(service.verdict(), Verdict::Ping);
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let a = alive.clone();
        service.watch_task("broker session", move || a.load(Ordering::Relaxed));
        assert_eq!(service.verdict(), Verdict::Ping);
        alive.store(false, Ordering::Relaxed);
        assert!(matches!(service.verdict(), Verdict::Ended { .. }));
    }
}
