//! Fault-injection suite: every scenario streams verifiable messages from organisation A to
//! organisation B while a component fails, then checks that every message reached B's inbox
//! intact (0 lost, 0 corrupted) and reports duplicates and the time to recover.
//!
//! Slow (release build recommended): the tests are `#[ignore]`d and run by
//! `scripts/test.sh` when `CI=true` or `DRAWBRIDGE_FAULT_SUITE=1`:
//! `cargo test --release -p drawbridge-testkit --test faults -- --ignored --test-threads=1 --nocapture`.
//!
//! The suite is a table: each scenario is a [`Scenario`] (brokers, streams, daemon settings,
//! its faults with the recovery probe of each, extra checks), and [`run`] does the same for
//! every one: set up → start the stream → for each fault: wait for its point in the stream,
//! strike, measure recovery → wait for the whole stream → verify → report → assert. Each
//! `#[tokio::test]` is one line calling [`run`] with its entry, so a failure names the
//! scenario.
//!
//! Each scenario preloads A's peer queue, starts the link, injects its faults while the
//! stream flows, then drains B's inbox through the verifying consumer. "Recovery" is the time
//! from the heal being started (process restart issued, `start_app` issued, path restored)
//! until the next new message lands in B's inbox; for failovers without a restart it is the
//! time from the failure until the component reports itself recovered (link up on the
//! other float, float or link up on another cluster node). One line
//! per scenario starting with `FAULT-REPORT` is printed for the summary table.
//!
//! The `*_stream` scenarios repeat b, c, d1, e and j with B's inbox a RabbitMQ stream
//! (`float.inbox_queue_type = "stream"`), whose float rebuilds its dedup window from the
//! stream; m_stream kills the float during that rebuild. They require **0 duplicates** as
//! well: B's stream is watched by a reader from its first offset (a stream's depth from a
//! passive declare is coarse), and verified by reading it from its first offset, window
//! markers skipped, twice (the second time after a quiet period, for late resends).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drawbridge_certs::devpki;
use drawbridge_control_protocol::{ControlCommand, CreateLink, PeerLink, Target};
use drawbridge_testkit::{
    daemon::Daemon,
    proxy::{FaultProxy, ProxyMode},
    rabbit::{NodeOptions, RabbitCluster, RabbitNode},
    stream::{self, PublishSpec, Report, Tally},
    world::{self, Org, SnapshotResponder, INBOX},
    BANK_A, BANK_B, BANK_C,
};
use futures::{future::LocalBoxFuture, StreamExt};
use lapin::{
    options::{BasicAckOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

/// Bridge settings that make failures show quickly (the defaults suit WAN links).
const FAST_BRIDGE: &str = "reconnect_max = \"2s\"\nidle_timeout = \"5s\"\nsettle_timeout = \"10s\"\nconnect_timeout = \"3s\"\ndrain_grace = \"10s\"";
const FAST_FLOAT: &str = "idle_timeout = \"5s\"";

/// How long the inbox may take to fill up once the faults are over.
const WHOLE_STREAM_WITHIN: Duration = Duration::from_secs(300);
/// How long after a heal the inbox may take to grow again.
const RECOVERY_WITHIN: Duration = Duration::from_secs(60);

fn messages(default: u64) -> u64 {
    std::env::var("DRAWBRIDGE_FAULT_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// The tests: one per scenario, each running its table entry.
// ---------------------------------------------------------------------------------------

#[tokio::test]
#[ignore = "fault suite: run with --ignored (scripts/test.sh does when CI=true)"]
async fn a_bridge_killed_three_times() -> Result<()> {
    run(&A_BRIDGE_KILLED_THREE_TIMES).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn b_float_killed_and_restarted() -> Result<()> {
    run(&B_FLOAT_KILLED_AND_RESTARTED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn c_one_of_two_floats_killed() -> Result<()> {
    run(&C_ONE_OF_TWO_FLOATS_KILLED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn d1_receiving_cluster_node_killed() -> Result<()> {
    run(&D1_RECEIVING_CLUSTER_NODE_KILLED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn d2_sending_cluster_node_killed() -> Result<()> {
    run(&D2_SENDING_CLUSTER_NODE_KILLED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn e_brokers_stopped_for_ten_seconds() -> Result<()> {
    run(&E_BROKERS_STOPPED_FOR_TEN_SECONDS).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn f_path_cut_black_hole_then_reset() -> Result<()> {
    run(&F_PATH_CUT_BLACK_HOLE_THEN_RESET).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn g_stalled_peer_does_not_slow_the_other() -> Result<()> {
    run(&G_STALLED_PEER_DOES_NOT_SLOW_THE_OTHER).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn h_bridge_sigterm_drains() -> Result<()> {
    run(&H_BRIDGE_SIGTERM_DRAINS).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn i_float_sigterm_drains() -> Result<()> {
    run(&I_FLOAT_SIGTERM_DRAINS).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn j_float_refuses_publishes_for_a_minute() -> Result<()> {
    run(&J_FLOAT_REFUSES_PUBLISHES_FOR_A_MINUTE).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn b_stream_float_killed_and_restarted() -> Result<()> {
    run(&B_STREAM_FLOAT_KILLED_AND_RESTARTED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn c_stream_one_of_two_floats_killed() -> Result<()> {
    run(&C_STREAM_ONE_OF_TWO_FLOATS_KILLED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn d1_stream_receiving_cluster_node_killed() -> Result<()> {
    run(&D1_STREAM_RECEIVING_CLUSTER_NODE_KILLED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn e_stream_brokers_stopped_for_ten_seconds() -> Result<()> {
    run(&E_STREAM_BROKERS_STOPPED_FOR_TEN_SECONDS).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn j_stream_float_refuses_publishes_for_a_minute() -> Result<()> {
    run(&J_STREAM_FLOAT_REFUSES_PUBLISHES_FOR_A_MINUTE).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn m_stream_float_killed_during_rebuild() -> Result<()> {
    run(&M_STREAM_FLOAT_KILLED_DURING_REBUILD).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn k_tunnel_mode_receiving_bridge_killed() -> Result<()> {
    run(&K_TUNNEL_MODE_RECEIVING_BRIDGE_KILLED).await
}

#[tokio::test]
#[ignore = "fault suite"]
async fn l_tunnel_mode_keyless_float_killed() -> Result<()> {
    run(&L_TUNNEL_MODE_KEYLESS_FLOAT_KILLED).await
}

// ---------------------------------------------------------------------------------------
// The table.
// ---------------------------------------------------------------------------------------

/// What every scenario starts from: A and B on single brokers, one 30,000-message stream to
/// B, the fast daemon settings, the link created by a `CreateLink`, B's inbox verified.
const BASE: Scenario = Scenario {
    topology: Topology::TwoBrokers,
    messages: 30_000,
    max_messages: u64::MAX,
    peer_queue: "classic",
    streams: &[],
    float: &[FAST_FLOAT],
    bridge: &[FAST_BRIDGE],
    links: Links::CreateLink,
    prepare: None,
    started: None,
    fill: None,
    inbox: Inbox::Queue,
    faults: &[],
    verify: Verify::Inbox,
    note: None,
    checks: &[],
};

/// a. kill -9 the bridge three times during a 100,000-message stream, restarting it each
/// time; the restarted bridge gets its links from the node's answer to its snapshot request.
const A_BRIDGE_KILLED_THREE_TIMES: Scenario = Scenario {
    messages: 100_000,
    streams: &[Stream::to_b("a", "a. kill -9 bridge x3 (restart)")],
    links: Links::SnapshotAnswer,
    faults: &[
        Fault::restart(When::b_holds(20, 100, 300), kill9_bridge, restart_bridge),
        Fault::restart(When::b_holds(45, 100, 300), kill9_bridge, restart_bridge),
        Fault::restart(When::b_holds(70, 100, 300), kill9_bridge, restart_bridge),
    ],
    ..BASE
};

/// b. kill -9 the float mid-stream and restart it.
const B_FLOAT_KILLED_AND_RESTARTED: Scenario = Scenario {
    streams: &[Stream::to_b("b", "b. kill -9 float (restart)")],
    faults: &[Fault::restart(
        When::b_holds(1, 3, 120),
        kill9_float,
        restart_float,
    )],
    ..BASE
};

/// c. two floats as targets of one link; kill -9 one mid-stream; traffic continues through
/// the other.
const C_ONE_OF_TWO_FLOATS_KILLED: Scenario = Scenario {
    streams: &[Stream {
        route: Route::TwoFloats,
        ..Stream::to_b("c", "c. kill -9 one of two floats (failover, no restart)")
    }],
    links: Links::CreateLinkAndWaitUp,
    faults: &[Fault {
        at: When::b_holds(1, 3, 120),
        strike: kill9_float_in_use,
        recovery: Recovery::LinkUpElsewhere,
    }],
    ..BASE
};

/// d1. receiving side on a 3-node cluster with quorum inboxes: kill the node the float is
/// connected to, mid-stream.
const D1_RECEIVING_CLUSTER_NODE_KILLED: Scenario = Scenario {
    topology: Topology::ReceivingCluster,
    messages: 20_000,
    streams: &[Stream::to_b(
        "d1",
        "d1. kill -9 the float's cluster node (quorum inbox)",
    )],
    float: &[FAST_FLOAT, "inbox_queue_type = \"quorum\""],
    faults: &[Fault {
        at: When::b_holds(1, 3, 120),
        strike: kill_receiving_node_in_use,
        recovery: Recovery::FloatReadyElsewhere,
    }],
    ..BASE
};

/// d2. sending side on a 3-node cluster with a quorum peer queue: kill the node the bridge is
/// connected to, mid-stream.
const D2_SENDING_CLUSTER_NODE_KILLED: Scenario = Scenario {
    topology: Topology::SendingCluster,
    messages: 20_000,
    peer_queue: "quorum",
    streams: &[Stream::to_b(
        "d2",
        "d2. kill -9 the bridge's cluster node (quorum peer queue)",
    )],
    bridge: &[FAST_BRIDGE, "peer_queue_type = \"quorum\""],
    faults: &[Fault {
        at: When::b_holds(1, 3, 120),
        strike: kill_sending_node_in_use,
        recovery: Recovery::LinkReconnected,
    }],
    ..BASE
};

/// e. stop_app of the float's broker for 10 s, then of the bridge's broker for 10 s, with
/// publishes, confirms and acks in flight.
const E_BROKERS_STOPPED_FOR_TEN_SECONDS: Scenario = Scenario {
    streams: &[Stream::to_b(
        "e",
        "e. stop_app float's broker 10 s, then bridge's broker 10 s",
    )],
    faults: &stop_b_then_a((1, 4), (1, 2)),
    note: Some(broker_start_times),
    ..BASE
};

/// e: stop_app of B's broker (the float's) for 10 s once B holds `b` of the stream, then of
/// A's (the bridge's) once it holds `a`.
const fn stop_b_then_a(b: (u64, u64), a: (u64, u64)) -> [Fault; 2] {
    [
        Fault {
            at: When::b_holds(b.0, b.1, 120),
            strike: stop_app_b,
            recovery: Recovery::Heal {
                hold: Duration::from_secs(10),
                heal: start_app_b,
                // The inbox lives on this broker: its depth is the baseline once it is back
                // (nothing can have been added while it was down).
                baseline: Baseline::AfterHeal,
            },
        },
        Fault {
            at: When::b_holds(a.0, a.1, 120),
            strike: stop_app_a,
            recovery: Recovery::Heal {
                hold: Duration::from_secs(10),
                heal: start_app_a,
                baseline: Baseline::SettledBeforeHeal,
            },
        },
    ]
}

/// f. the bridge↔float path cut for 30 s as a black hole (no FIN/RST), then as resets.
const F_PATH_CUT_BLACK_HOLE_THEN_RESET: Scenario = Scenario {
    streams: &[Stream {
        route: Route::Proxy,
        ..Stream::to_b("f", "f. path cut 30 s: black hole, then reset")
    }],
    faults: &[
        Fault {
            at: When::b_holds(1, 4, 120),
            strike: black_hole,
            recovery: Recovery::Heal {
                hold: Duration::from_secs(30),
                heal: pass,
                baseline: Baseline::SettledBeforeHeal,
            },
        },
        Fault {
            at: When::b_holds(2, 4, 120),
            strike: reset,
            recovery: Recovery::Heal {
                hold: Duration::from_secs(30),
                heal: pass,
                baseline: Baseline::SettledBeforeHeal,
            },
        },
    ],
    note: Some(path_cut_recoveries),
    checks: &[traffic_resumed_within_ten_seconds],
    ..BASE
};

/// g. one peer's float stalls (its path stops forwarding) while a second peer link keeps
/// flowing; afterwards B's stream is sent again with C healthy, for comparison.
const G_STALLED_PEER_DOES_NOT_SLOW_THE_OTHER: Scenario = Scenario {
    topology: Topology::ThirdOrg,
    messages: 20_000,
    streams: &[
        Stream {
            label: "g/B",
            linked_at_start: false,
            ..Stream::to_b("gb", "g. stalled peer C; B's link unaffected (B stream)")
        },
        Stream {
            to: Peer::C,
            run: "gc",
            label: "g/C",
            title: "g. stalled peer C; C's stream after the stall",
            route: Route::Proxy,
            linked_at_start: true,
        },
    ],
    // Generous settle timeout: the stalled link must stay stalled, not recycle constantly.
    bridge: &["settle_timeout = \"60s\"\nidle_timeout = \"60s\""],
    faults: &[Fault {
        at: When::Inbox {
            peer: Peer::C,
            share: (1, 10),
            within: Duration::from_secs(120),
        },
        strike: black_hole,
        recovery: Recovery::Watched(stream_to_b_while_c_stalls),
    }],
    checks: &[b_rate_with_c_healthy],
    ..BASE
};

/// h. SIGTERM the bridge mid-stream: it drains; nothing is lost and nothing that was
/// already accepted is sent again.
const H_BRIDGE_SIGTERM_DRAINS: Scenario = Scenario {
    streams: &[Stream::to_b("h", "h. SIGTERM bridge (drain), restart")],
    links: Links::SnapshotAnswer,
    faults: &[Fault::restart(
        When::b_holds(1, 3, 120),
        terminate_bridge,
        restart_bridge,
    )],
    checks: &[no_resends_after_bridge_drain],
    ..BASE
};

/// i. SIGTERM the float mid-stream: it settles what is in flight and closes; after a
/// restart nothing is lost and nothing accepted is resent.
const I_FLOAT_SIGTERM_DRAINS: Scenario = Scenario {
    streams: &[Stream::to_b("i", "i. SIGTERM float (drain), restart")],
    faults: &[Fault::restart(
        When::b_holds(1, 3, 120),
        terminate_float,
        restart_float,
    )],
    checks: &[no_resends_after_float_drain],
    ..BASE
};

/// j. Recycle storm: B's float takes the connection but its broker refuses every publish
/// (write permission removed) for 60 s, on a quorum peer queue with a delivery limit of 5.
/// Each recycle returns what the link had in flight, and the queue drops a message returned
/// more often than the limit. Nothing may be lost: every message ends in B's inbox or in A's
/// dead-letter queue with a reason; the link backs off instead of recycling every second.
const J_FLOAT_REFUSES_PUBLISHES_FOR_A_MINUTE: Scenario = Scenario {
    messages: 500,
    max_messages: 5_000,
    peer_queue: "quorum",
    streams: &[Stream::to_b(
        "j",
        "j. float's broker refuses publishes 60 s (quorum, delivery-limit 5)",
    )],
    bridge: &["reconnect_max = \"20s\"\nidle_timeout = \"5s\"\nsettle_timeout = \"10s\"\nconnect_timeout = \"3s\"\npeer_queue_type = \"quorum\""],
    prepare: Some(limit_deliveries_and_refuse_publishes),
    faults: &[Fault {
        at: When::Start,
        strike: let_refusals_last_a_minute,
        recovery: Recovery::Accounted {
            heal: allow_publishes,
            within: Duration::from_secs(180),
        },
    }],
    verify: Verify::InboxAndDeadLetters,
    note: Some(recycle_storm_summary),
    checks: &[every_dead_letter_has_a_reason, stuck_link_reported, link_backed_off],
    ..BASE
};

/// k. tunnel mode (docs/tunnel.md): B's float holds no broker connection and no key; B's
/// bridge, which publishes for it and signs its handshakes, is killed mid-stream and
/// restarted. The float closes A's link, takes nothing until the bridge is back, and what it
/// had handed over without an outcome is resent.
const K_TUNNEL_MODE_RECEIVING_BRIDGE_KILLED: Scenario = Scenario {
    streams: &[Stream {
        route: Route::Tunnel,
        ..Stream::to_b("k", "k. tunnel mode: kill -9 B's bridge (restart)")
    }],
    faults: &[Fault::restart(
        When::b_holds(1, 3, 120),
        kill9_receiving_bridge,
        restart_receiving_bridge,
    )],
    ..BASE
};

/// l. tunnel mode: the keyless float is killed mid-stream and restarted; B's bridge dials it
/// again and re-activates it.
const L_TUNNEL_MODE_KEYLESS_FLOAT_KILLED: Scenario = Scenario {
    streams: &[Stream {
        route: Route::Tunnel,
        ..Stream::to_b("l", "l. tunnel mode: kill -9 float (restart)")
    }],
    faults: &[Fault::restart(
        When::b_holds(1, 3, 120),
        kill9_float,
        restart_float,
    )],
    ..BASE
};

// Stream inboxes (issue 26): the same faults with `float.inbox_queue_type = "stream"`. The
// float rebuilds its dedup window from the stream, so a resend of anything the broker stored
// is recognised: every one of these must show 0 lost *and 0 duplicates*, read back from the
// stream's first offset twice (the second time after a quiet period, for late resends).

/// b_stream. As b, with a stream inbox: the restarted float reads the stream back before it
/// publishes, so the bridge's resends of what the killed float had stored are suppressed.
const B_STREAM_FLOAT_KILLED_AND_RESTARTED: Scenario = Scenario {
    streams: &[Stream::to_b(
        "bs",
        "b_stream. kill -9 float (restart), stream inbox",
    )],
    inbox: Inbox::Stream,
    ..B_FLOAT_KILLED_AND_RESTARTED
};

/// c_stream. As c, both floats with stream inboxes: the surviving float has followed the
/// stream all along and reads it up to its own marker before the link publishes.
const C_STREAM_ONE_OF_TWO_FLOATS_KILLED: Scenario = Scenario {
    streams: &[Stream {
        route: Route::TwoFloats,
        ..Stream::to_b(
            "cs",
            "c_stream. kill -9 one of two floats (failover, no restart), stream inbox",
        )
    }],
    inbox: Inbox::Stream,
    ..C_ONE_OF_TWO_FLOATS_KILLED
};

/// d1_stream. As d1, with the inbox a stream replicated over B's 3-node cluster: the float's
/// node is killed; the float reconnects to another node and rebuilds before it publishes.
const D1_STREAM_RECEIVING_CLUSTER_NODE_KILLED: Scenario = Scenario {
    streams: &[Stream::to_b(
        "d1s",
        "d1_stream. kill -9 the float's cluster node (stream inbox)",
    )],
    float: &[FAST_FLOAT],
    inbox: Inbox::Stream,
    ..D1_RECEIVING_CLUSTER_NODE_KILLED
};

/// e_stream. As e, with a stream inbox: publishes whose confirms died with the float's
/// broker connection are found in the stream after the reconnect.
const E_STREAM_BROKERS_STOPPED_FOR_TEN_SECONDS: Scenario = Scenario {
    streams: &[Stream::to_b(
        "es",
        "e_stream. stop_app float's broker 10 s, then bridge's broker 10 s, stream inbox",
    )],
    // The stream inbox takes ~40,000 messages in the time `stop_app` takes to hold (its
    // CLI starts first): a longer stream and earlier strikes, so that both brokers stop with
    // messages still to come.
    messages: 200_000,
    faults: &stop_b_then_a((1, 10), (1, 2)),
    inbox: Inbox::Stream,
    ..E_BROKERS_STOPPED_FOR_TEN_SECONDS
};

/// j_stream. As j, with a stream inbox. The float must be up (its window rebuilt, which
/// publishes a marker) before its broker refuses publishes, so the refusal comes once the
/// floats are started, and B's connections are closed so that no channel keeps a permission
/// it checked before. Every message ends in the inbox or the dead-letter queue, none twice.
const J_STREAM_FLOAT_REFUSES_PUBLISHES_FOR_A_MINUTE: Scenario = Scenario {
    streams: &[Stream::to_b(
        "js",
        "j_stream. float's broker refuses publishes 60 s (quorum, delivery-limit 5), stream inbox",
    )],
    prepare: Some(limit_deliveries),
    started: Some(refuse_publishes_and_reconnect),
    inbox: Inbox::Stream,
    // The float holds what it takes while its window cannot be rebuilt (its marker is
    // refused) instead of releasing each refused publish: the bridge sees settle timeouts,
    // not returns, and does not call the head of the queue stuck within the minute. The
    // float says why it holds.
    checks: &[
        every_dead_letter_has_a_reason,
        window_reported_refusal,
        link_backed_off,
    ],
    ..J_FLOAT_REFUSES_PUBLISHES_FOR_A_MINUTE
};

/// m_stream. The stream inbox already holds a first run (`M_FILL` messages, sent through the
/// link before the stream) when, a third into the stream, the float is killed, restarted,
/// and killed again *while its window is rebuilding* from the stream (seen on `/status`), then
/// restarted once more. The interrupted rebuild must leave nothing half done: both runs are
/// in the stream exactly once.
const M_STREAM_FLOAT_KILLED_DURING_REBUILD: Scenario = Scenario {
    streams: &[Stream::to_b(
        "m2",
        "m_stream. kill -9 float, restart, kill -9 during its window rebuild, restart; stream inbox",
    )],
    fill: Some(("m1", M_FILL)),
    inbox: Inbox::Stream,
    faults: &[Fault::restart(
        When::b_holds(1, 3, 180),
        kill9_restart_kill9_while_rebuilding,
        restart_float,
    )],
    note: Some(rebuild_kill_summary),
    ..BASE
};

/// m_stream: messages of the first run, already in the stream when the faults strike.
const M_FILL: u64 = 100_000;

// ---------------------------------------------------------------------------------------
// What a scenario is.
// ---------------------------------------------------------------------------------------

/// An async step of a scenario (a fault, a heal, an extra setup step or check), run on the
/// scenario's [`Rig`].
type Step = for<'r> fn(&'r mut Rig) -> LocalBoxFuture<'r, Result<()>>;

/// One scenario: how the world is built, what breaks and how recovery is seen, what must
/// hold afterwards. [`run`] executes it.
struct Scenario {
    /// Where the organisations' brokers run.
    topology: Topology,
    /// Messages per stream (`DRAWBRIDGE_FAULT_MESSAGES` overrides it) …
    messages: u64,
    /// … and a cap on that override, for scenarios whose timing depends on the count.
    max_messages: u64,
    /// Type of A's peer queues (`classic` or `quorum`).
    peer_queue: &'static str,
    /// The streams from A, each to one peer; the first peer's inbox is the one the report of
    /// a single-stream scenario is about.
    streams: &'static [Stream],
    /// Lines of every float's `[float]` table.
    float: &'static [&'static str],
    /// Lines of A's `[bridge]` table.
    bridge: &'static [&'static str],
    /// How A's bridge learns the links that exist from the start.
    links: Links,
    /// Runs once the brokers are up, before the streams are loaded (policies, permissions).
    prepare: Option<Step>,
    /// Runs once the floats are up, before A's bridge starts.
    started: Option<Step>,
    /// A first run (name, messages) loaded into the same peer queue before the streams, so
    /// that it is in B's inbox before them; verified with them.
    fill: Option<(&'static str, u64)>,
    /// What B's inbox is (every float of B gets `inbox_queue_type` for it).
    inbox: Inbox,
    /// The faults, in order; each strikes at its point in the stream and is followed by its
    /// recovery probe.
    faults: &'static [Fault],
    /// How the delivered messages are checked.
    verify: Verify,
    /// A line printed before the `FAULT-REPORT` lines (what the report alone does not say).
    note: Option<fn(&Rig) -> String>,
    /// Checks after the reports and the intact-stream assertion (no resends, bounds on
    /// recovery, link status …).
    checks: &'static [Step],
}

/// Where the brokers run.
#[derive(Clone, Copy)]
enum Topology {
    /// A and B each on a single node.
    TwoBrokers,
    /// A on a single node, B on a 3-node cluster.
    ReceivingCluster,
    /// A on a 3-node cluster, B on a single node.
    SendingCluster,
    /// A, B and a third organisation C each on a single node.
    ThirdOrg,
}

/// A receiving organisation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    B,
    C,
}

/// One verifiable stream from A to a peer.
struct Stream {
    /// The receiving organisation.
    to: Peer,
    /// Run name of the stream's messages.
    run: &'static str,
    /// Name in assertion messages.
    label: &'static str,
    /// Label on the stream's `FAULT-REPORT` line.
    title: &'static str,
    /// How the link reaches the peer's float.
    route: Route,
    /// Whether the link exists from the start (else a step creates it).
    linked_at_start: bool,
}

impl Stream {
    /// The common case: a stream to B, straight to its float, linked from the start.
    const fn to_b(run: &'static str, title: &'static str) -> Stream {
        Stream {
            to: Peer::B,
            run,
            label: run,
            title,
            route: Route::Direct,
            linked_at_start: true,
        }
    }
}

/// How a link reaches the peer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The peer's float.
    Direct,
    /// The peer's float and a second float of the same peer, as two targets of the link.
    TwoFloats,
    /// The peer's float behind a [`FaultProxy`].
    Proxy,
    /// The peer's float in tunnel mode (no broker, no key), behind its own bridge.
    Tunnel,
}

/// How the bridge learns the links that exist from the start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Links {
    /// A `CreateLink` per link.
    CreateLink,
    /// A `CreateLink` per link, then wait until the (single) link is up.
    CreateLinkAndWaitUp,
    /// The node answers the bridge's snapshot requests (so a restarted bridge gets them too).
    SnapshotAnswer,
}

/// One fault: when it strikes, what it does, how recovery is seen.
struct Fault {
    /// When it strikes.
    at: When,
    /// What breaks.
    strike: Step,
    /// How the suite sees (and times) the recovery.
    recovery: Recovery,
}

impl Fault {
    /// A component fails (`strike`) and is restarted (`heal`) at once; recovery is the time
    /// from the restart until the inbox grows again.
    const fn restart(at: When, strike: Step, heal: Step) -> Fault {
        Fault {
            at,
            strike,
            recovery: Recovery::Heal {
                hold: Duration::ZERO,
                heal,
                baseline: Baseline::SettledBeforeHeal,
            },
        }
    }
}

/// When a fault strikes.
#[derive(Clone, Copy)]
enum When {
    /// As soon as the stream has started (the links exist).
    Start,
    /// Once `peer`'s inbox holds `share.0 / share.1` of the stream (waiting at most `within`).
    Inbox {
        peer: Peer,
        share: (u64, u64),
        within: Duration,
    },
}

impl When {
    /// Once B's inbox holds `num / den` of the stream, waiting at most `within_secs`.
    const fn b_holds(num: u64, den: u64, within_secs: u64) -> When {
        When::Inbox {
            peer: Peer::B,
            share: (num, den),
            within: Duration::from_secs(within_secs),
        }
    }
}

/// How the recovery from a fault is seen and timed.
enum Recovery {
    /// Leave the fault in place for `hold`, then `heal` it; recovery is the time from the
    /// heal being started until B's inbox grows past `baseline` (at most 60 s).
    Heal {
        hold: Duration,
        heal: Step,
        baseline: Baseline,
    },
    /// The link is up again on another of its targets; timed from the failure (60 s).
    LinkUpElsewhere,
    /// B's float is ready again on another cluster node; timed from the failure (90 s).
    FloatReadyElsewhere,
    /// A's link has connected again (through another cluster node); timed from the failure
    /// (90 s).
    LinkReconnected,
    /// `heal`, then every message is in B's inbox or in A's dead-letter queue (`within`);
    /// timed from the end of the heal.
    Accounted { heal: Step, within: Duration },
    /// The scenario's own step watches what happens while the fault lasts and heals it; no
    /// recovery time.
    Watched(Step),
}

/// The inbox depth a heal is measured against.
#[derive(Clone, Copy)]
enum Baseline {
    /// The depth once what was in flight when the fault hit has landed, taken before the heal.
    SettledBeforeHeal,
    /// The depth right after the heal: the inbox's own broker was down, so nothing can have
    /// landed meanwhile. Recovery is the heal's duration plus the time from then.
    AfterHeal,
}

/// What B's inbox is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inbox {
    /// The float's default queue inbox: duplicates are reported, not failed.
    Queue,
    /// `float.inbox_queue_type = "stream"`: B's inbox is a stream, watched by a reader from
    /// its first offset ([`StreamCount`]) instead of its (coarse) depth, verified by reading
    /// it from the first offset twice; 0 duplicates required.
    Stream,
}

/// The float line for a stream inbox.
const STREAM_INBOX: &str = "inbox_queue_type = \"stream\"";

/// How long the stream is left alone before it is read a second time (late resends).
const QUIET_BEFORE_REREAD: Duration = Duration::from_secs(5);

/// How the delivered messages are checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Every stream's inbox, drained through the verifying consumer (60 s idle timeout).
    Inbox,
    /// B's inbox (5 s idle timeout) and A's dead-letter queue together: every message must be
    /// in one of them; the dead-letters' reasons are counted.
    InboxAndDeadLetters,
}

// ---------------------------------------------------------------------------------------
// The runner.
// ---------------------------------------------------------------------------------------

/// Run one scenario: set up → start the streams → for each fault: wait for its point,
/// strike, measure the recovery → wait for the whole streams → verify → report → assert.
async fn run(s: &Scenario) -> Result<()> {
    let mut rig = Rig::set_up(s).await?;
    for fault in s.faults {
        if let When::Inbox {
            peer,
            share: (num, den),
            within,
        } = fault.at
        {
            let n = rig.n;
            rig.probe(peer)?.wait_for(n * num / den, within).await?;
        }
        if let Some(rec) = rig.strike_and_recover(fault).await? {
            rig.recoveries.push(rec);
        }
    }
    if s.verify == Verify::Inbox {
        for stream in s.streams {
            let n = rig.n;
            let whole = rig.probe(stream.to)?.wait_for(n, WHOLE_STREAM_WITHIN).await;
            whole.with_context(|| rig.logs())?;
        }
    }
    rig.reports = match (s.verify, s.inbox) {
        (Verify::Inbox, Inbox::Queue) => {
            let mut reports = Vec::new();
            for stream in s.streams {
                reports.push(verify(rig.org(stream.to)?, stream.run, rig.n, BANK_A).await?);
            }
            reports
        }
        (Verify::Inbox, Inbox::Stream) => {
            let (runs, idle) = (rig.stream_runs(s), Duration::from_secs(60));
            let first = read_stream(&rig.b, &runs, BANK_A, idle).await?;
            tokio::time::sleep(QUIET_BEFORE_REREAD).await;
            let again = read_stream(&rig.b, &runs, BANK_A, idle).await?;
            // The fill's report comes first; B's stream is the one reported.
            let reports = first.reports[usize::from(s.fill.is_some())..].to_vec();
            rig.stream_reads = vec![first, again];
            reports
        }
        (Verify::InboxAndDeadLetters, _) => {
            let r = rig.verify_with_dead_letters(&s.streams[0], s.inbox).await?;
            if s.inbox == Inbox::Stream {
                tokio::time::sleep(QUIET_BEFORE_REREAD).await;
                let idle = Duration::from_secs(5);
                let again = read_stream(&rig.b, &rig.stream_runs(s), BANK_A, idle).await?;
                rig.stream_reads = vec![again];
            }
            vec![r]
        }
    };
    if s.inbox == Inbox::Stream {
        rig.window_notes = rig.window_summaries().await;
    }
    if let Some(note) = s.note {
        println!("{}", note(&rig));
    }
    for line in rig.stream_notes(s) {
        println!("{line}");
    }
    for (stream, r) in s.streams.iter().zip(&rig.reports) {
        report(stream.title, r, &rig.recoveries);
    }
    for (stream, r) in s.streams.iter().zip(&rig.reports) {
        assert_intact(stream.label, r, &rig.logs());
    }
    if s.inbox == Inbox::Stream {
        rig.assert_exactly_once(s);
    }
    for check in s.checks {
        check(&mut rig).await?;
    }
    Ok(())
}

/// Where a scenario's brokers run.
enum Broker {
    Node(RabbitNode),
    Cluster(RabbitCluster),
}

impl Broker {
    async fn start(cluster: bool) -> Result<Broker> {
        Ok(if cluster {
            Broker::Cluster(RabbitCluster::start(3, NodeOptions::default()).await?)
        } else {
            Broker::Node(RabbitNode::start(NodeOptions::default()).await?)
        })
    }

    fn uris(&self) -> Vec<String> {
        match self {
            Broker::Node(n) => vec![n.amqp_uri("/")],
            Broker::Cluster(c) => c.uris("/"),
        }
    }

    fn node(&self) -> Result<&RabbitNode> {
        match self {
            Broker::Node(n) => Ok(n),
            Broker::Cluster(_) => bail!("a cluster, not a single node"),
        }
    }

    fn cluster(&mut self) -> Result<&mut RabbitCluster> {
        match self {
            Broker::Cluster(c) => Ok(c),
            Broker::Node(_) => bail!("a single node, not a cluster"),
        }
    }
}

/// What was in use when a fault struck, for the failover probes.
#[derive(Default)]
struct InUse {
    /// The link's target (c): where it came up, or where it is up now.
    target: String,
    /// The broker URI of the float (d1) or bridge (d2).
    broker: String,
    /// The link's connects so far (d2).
    connects: u64,
}

/// A running scenario: the organisations, their brokers and daemons, the probes on the
/// inboxes, and what the steps observed. Fields drop in order: daemons before brokers.
struct Rig {
    /// Messages per stream.
    n: u64,
    /// The node answering A's bridge's snapshot requests ([`Links::SnapshotAnswer`]).
    _responder: Option<SnapshotResponder>,
    /// The probe on B's inbox.
    probe_b: InboxProbe,
    /// The probe on C's inbox (third organisation only).
    probe_c: Option<InboxProbe>,
    /// The proxy in front of the float of the stream with [`Route::Proxy`].
    proxy: Option<FaultProxy>,
    /// B's second float ([`Route::TwoFloats`]) and its port.
    second_float: Option<(Daemon, u16)>,
    /// The sending organisation.
    a: Org,
    /// The receiving organisation.
    b: Org,
    /// The third organisation (a second receiver).
    c: Option<Org>,
    /// PKI files, configs and logs.
    _dir: tempfile::TempDir,
    /// A's brokers.
    broker_a: Broker,
    /// B's brokers.
    broker_b: Broker,
    /// C's broker.
    _broker_c: Option<Broker>,
    /// What was in use when the current fault struck.
    in_use: InUse,
    /// Recovery time of each fault that has one.
    recoveries: Vec<Duration>,
    /// How long each heal took (`start_app` of a broker, a restart …).
    heal_times: Vec<Duration>,
    /// How long B's stream took while C's path was stalled (g).
    b_elapsed_while_c_stalled: Option<Duration>,
    /// The link's connects and status at the end of an outage (j).
    outage: (u64, Option<serde_json::Value>),
    /// Inbox depth and dead-lettered messages once every message was accounted for (j).
    accounted: (u64, u64),
    /// Distinct messages delivered to the inbox, and dead-letters by reason (j).
    dead_letters: (u64, BTreeMap<String, u64>),
    /// One report per stream, once verified.
    reports: Vec<Report>,
    /// Stream inbox: what each read of it from the first offset found (the verification,
    /// then the re-read after a quiet period).
    stream_reads: Vec<StreamRead>,
    /// Stream inbox: B's floats' windows, duplicates suppressed, at the end.
    window_notes: Vec<String>,
    /// m: the float's `window` just before it was killed during its rebuild, and the stream's
    /// length then.
    rebuild_kill: Option<(serde_json::Value, u64)>,
    /// Faults healed after the whole stream had arrived (nothing left to recover).
    struck_late: u32,
    /// j_stream: messages both in the stream inbox and dead-lettered, with what says when.
    in_both: Vec<String>,
}

impl Rig {
    /// Brokers, organisations, the extra setup step, the preloaded streams, the floats (and
    /// proxy or second float), the bridge and the links that exist from the start.
    async fn set_up(s: &Scenario) -> Result<Rig> {
        let (broker_a, broker_b) = tokio::join!(
            Broker::start(matches!(s.topology, Topology::SendingCluster)),
            Broker::start(matches!(s.topology, Topology::ReceivingCluster))
        );
        let (broker_a, broker_b) = (broker_a?, broker_b?);
        let broker_c = match s.topology {
            Topology::ThirdOrg => Some(Broker::start(false).await?),
            _ => None,
        };

        drawbridge_certs::install_crypto_provider();
        let mut dir = tempfile::tempdir()?;
        if std::env::var_os("DRAWBRIDGE_FAULT_KEEP_DIR").is_some() {
            // Configs and daemon logs stay for a post-mortem.
            dir.disable_cleanup(true);
            println!("keeping {}", dir.path().display());
        }
        let mut names = vec![BANK_A.parse()?, BANK_B.parse()?];
        if broker_c.is_some() {
            names.push(BANK_C.parse()?);
        }
        let pki = devpki::generate_network(&dir.path().join("pki"), &names)?;
        let a = Org::new(pki.nodes[0].clone(), broker_a.uris(), dir.path());
        let b = Org::new(pki.nodes[1].clone(), broker_b.uris(), dir.path());
        let c = broker_c
            .as_ref()
            .map(|bc| Org::new(pki.nodes[2].clone(), bc.uris(), dir.path()));
        let mut rig = Rig {
            n: messages(s.messages).min(s.max_messages),
            _responder: None,
            probe_b: match s.inbox {
                Inbox::Queue => InboxProbe::new(&b),
                Inbox::Stream => InboxProbe::stream(&b, s.streams[0].run),
            },
            probe_c: c.as_ref().map(InboxProbe::new),
            proxy: None,
            second_float: None,
            a,
            b,
            c,
            _dir: dir,
            broker_a,
            broker_b,
            _broker_c: broker_c,
            in_use: InUse::default(),
            recoveries: Vec::new(),
            heal_times: Vec::new(),
            b_elapsed_while_c_stalled: None,
            outage: (0, None),
            accounted: (0, 0),
            dead_letters: (0, BTreeMap::new()),
            reports: Vec::new(),
            stream_reads: Vec::new(),
            window_notes: Vec::new(),
            rebuild_kill: None,
            struck_late: 0,
            in_both: Vec::new(),
        };

        if let Some(prepare) = s.prepare {
            prepare(&mut rig).await?;
        }
        if let Some((run, n)) = s.fill {
            preload(&rig.a, &rig.b, run, n, s.peer_queue).await?;
        }
        for stream in s.streams {
            preload(&rig.a, rig.org(stream.to)?, stream.run, rig.n, s.peer_queue).await?;
        }
        let mut float = s.float.to_vec();
        if s.inbox == Inbox::Stream {
            float.push(STREAM_INBOX);
        }
        let float = float.join("\n");
        for stream in s.streams {
            let org = rig.org_mut(stream.to)?;
            match stream.route {
                Route::Tunnel => org.start_tunnel(&float, FAST_BRIDGE).await?,
                _ => org.start_float(&float).await?,
            }
        }
        for stream in s.streams {
            match stream.route {
                Route::Direct | Route::Tunnel => {}
                Route::TwoFloats => {
                    let org = rig.org(stream.to)?;
                    rig.second_float = Some(org.start_extra_float("float-2", &float).await?);
                }
                Route::Proxy => {
                    let port = rig.org(stream.to)?.float_port;
                    rig.proxy = Some(FaultProxy::start(([127, 0, 0, 1], port).into()).await?);
                }
            }
        }
        if let Some(started) = s.started {
            started(&mut rig).await?;
        }
        rig.a.start_bridge(&s.bridge.join("\n")).await?;
        let mut links = Vec::new();
        for stream in s.streams.iter().filter(|st| st.linked_at_start) {
            links.push(rig.link_spec(stream)?);
        }
        match s.links {
            Links::SnapshotAnswer => {
                rig._responder = Some(rig.a.answer_snapshot_requests(links).await?);
            }
            Links::CreateLink | Links::CreateLinkAndWaitUp => {
                for link in links {
                    let queue = link.queue.clone();
                    rig.create_link(link).await?;
                    if s.links == Links::CreateLinkAndWaitUp {
                        let up = rig
                            .a
                            .wait_link_state(&queue, "up", Duration::from_secs(20))
                            .await?;
                        rig.in_use.target = up["target"].as_str().unwrap_or_default().into();
                    }
                }
            }
        }
        Ok(rig)
    }

    fn org(&self, peer: Peer) -> Result<&Org> {
        match peer {
            Peer::B => Ok(&self.b),
            Peer::C => self.c.as_ref().context("no third organisation"),
        }
    }

    fn org_mut(&mut self, peer: Peer) -> Result<&mut Org> {
        match peer {
            Peer::B => Ok(&mut self.b),
            Peer::C => self.c.as_mut().context("no third organisation"),
        }
    }

    fn probe(&mut self, peer: Peer) -> Result<&mut InboxProbe> {
        match peer {
            Peer::B => Ok(&mut self.probe_b),
            Peer::C => self.probe_c.as_mut().context("no third organisation"),
        }
    }

    fn proxy(&self) -> Result<&FaultProxy> {
        self.proxy.as_ref().context("no fault proxy")
    }

    fn bridge(&mut self) -> Result<&mut Daemon> {
        self.a.bridge.as_mut().context("A's bridge not started")
    }

    fn float(&mut self) -> Result<&mut Daemon> {
        self.b.float.as_mut().context("B's float not started")
    }

    /// A's peer queue to B.
    fn queue_to_b(&self) -> String {
        self.a.queue_to(&self.b)
    }

    /// The link from A for `stream`, with the targets its route asks for.
    fn link_spec(&self, stream: &Stream) -> Result<PeerLink> {
        let mut link = self.a.link_to(self.org(stream.to)?);
        match stream.route {
            Route::Direct | Route::Tunnel => {}
            Route::TwoFloats => {
                let (_, port) = self.second_float.as_ref().context("no second float")?;
                link.targets.push(Target::new("127.0.0.1", *port));
            }
            Route::Proxy => {
                link.targets = vec![Target::new("127.0.0.1", self.proxy()?.addr().port())];
            }
        }
        Ok(link)
    }

    /// Ask A's bridge to run `link`.
    async fn create_link(&self, link: PeerLink) -> Result<()> {
        self.a
            .control(&ControlCommand::CreateLink(CreateLink {
                node_identity: self.a.legal_name.clone(),
                link,
            }))
            .await
            .map(drop)
    }

    /// The daemons' log tails, for failure messages.
    fn logs(&self) -> String {
        let mut s = logs(&self.a) + &logs(&self.b);
        if let Some(c) = &self.c {
            s += &logs(c);
        }
        s
    }

    /// Strike `fault` and watch the recovery; returns its time, if it has one.
    async fn strike_and_recover(&mut self, fault: &Fault) -> Result<Option<Duration>> {
        // What is in use now, for the probes that must see it replaced.
        match fault.recovery {
            Recovery::LinkUpElsewhere => {
                // The target it came up on, unless it has moved since.
                if let Some(l) = link_view(&self.a, &self.queue_to_b()).await {
                    if let (true, Some(target)) = (l["state"] == "up", l["target"].as_str()) {
                        self.in_use.target = target.to_string();
                    }
                }
            }
            Recovery::FloatReadyElsewhere => {
                let status = self.float()?.status().await?;
                self.in_use.broker = status["broker"].as_str().unwrap_or_default().to_string();
            }
            Recovery::LinkReconnected => {
                let status = self.bridge()?.status().await?;
                self.in_use.broker = status["broker"].as_str().unwrap_or_default().to_string();
                self.in_use.connects = link_connects(&self.a, &self.queue_to_b()).await;
            }
            _ => {}
        }
        let struck = Instant::now();
        (fault.strike)(self).await?;
        let rec = match &fault.recovery {
            Recovery::Heal {
                hold,
                heal,
                baseline,
            } => {
                tokio::time::sleep(*hold).await;
                match baseline {
                    Baseline::SettledBeforeHeal => {
                        let baseline = self.probe_b.settled().await;
                        let t0 = Instant::now();
                        heal(self).await?;
                        self.heal_times.push(t0.elapsed());
                        if baseline >= self.n {
                            self.struck_late += 1;
                            // The backlog drained faster than the fault took hold (stop_app
                            // takes a second or two): everything had arrived before the heal,
                            // so there is no recovery to time. Loss and duplicates are still
                            // checked at the end.
                            println!(
                                "note: all {} messages had arrived before the heal; no recovery to time",
                                self.n
                            );
                            return Ok(None);
                        }
                        self.probe_b
                            .recovery_since(baseline, t0, RECOVERY_WITHIN)
                            .await
                    }
                    Baseline::AfterHeal => {
                        let t0 = Instant::now();
                        heal(self).await?;
                        let healed = t0.elapsed();
                        self.heal_times.push(healed);
                        let baseline = self.probe_b.caught_up().await;
                        if baseline >= self.n {
                            self.struck_late += 1;
                            println!(
                                "note: all {} messages had arrived before the heal; no recovery to time",
                                self.n
                            );
                            return Ok(Some(healed));
                        }
                        self.probe_b
                            .recovery_after(baseline, RECOVERY_WITHIN)
                            .await
                            .map(|d| healed + d)
                    }
                }
            }
            Recovery::LinkUpElsewhere => {
                link_up_elsewhere(&self.a, &self.queue_to_b(), &self.in_use.target, struck).await
            }
            Recovery::FloatReadyElsewhere => {
                float_ready_elsewhere(&self.b, &self.in_use.broker, struck).await
            }
            Recovery::LinkReconnected => {
                link_reconnected(&self.a, &self.queue_to_b(), self.in_use.connects, struck).await
            }
            Recovery::Accounted { heal, within } => {
                heal(self).await?;
                let healed = Instant::now();
                self.accounted = self.wait_accounted(*within).await?;
                return Ok(Some(healed.elapsed()));
            }
            Recovery::Watched(watch) => return watch(self).await.map(|()| None),
        };
        match rec {
            Ok(d) => Ok(Some(d)),
            // What each daemon believed when the probe gave up, beside what it logged: a link
            // `up` with nothing flowing is told apart from one that never came back.
            Err(e) => Err(e.context(format!("{}{}", self.statuses().await, self.logs()))),
        }
    }

    /// Every running daemon's `/status`, for failure messages.
    async fn statuses(&self) -> String {
        let mut s = String::new();
        for org in std::iter::once(&self.a)
            .chain(std::iter::once(&self.b))
            .chain(self.c.iter())
        {
            for (kind, d) in [("bridge", &org.bridge), ("float", &org.float)] {
                if let Some(d) = d {
                    let status = match d.status().await {
                        Ok(v) => v.to_string(),
                        Err(e) => format!("unavailable: {e}"),
                    };
                    s += &format!("--- {kind} {} /status\n{status}\n", org.legal_name);
                }
            }
        }
        s
    }

    /// Wait until every message is in B's inbox or A's dead-letter queue; returns both
    /// depths.
    async fn wait_accounted(&mut self, within: Duration) -> Result<(u64, u64)> {
        let deadline = Instant::now() + within;
        loop {
            let inbox = self.probe_b.now().await;
            let dead = self
                .broker_a
                .node()?
                .queue_depth("/", world::DEAD_LETTER)
                .await
                .unwrap_or(0);
            if inbox + dead >= self.n {
                return Ok((inbox, dead));
            }
            if Instant::now() > deadline {
                bail!(
                    "after the heal only {inbox} in the inbox and {dead} dead-lettered of {}\n{}",
                    self.n,
                    logs(&self.a)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Drain B's inbox and A's dead-letter queue into one tally, counting the dead-letters'
    /// reasons.
    async fn verify_with_dead_letters(&mut self, stream: &Stream, inbox: Inbox) -> Result<Report> {
        let (_cb, chb) = self.b.channel().await?;
        let mut tally = Tally::new(stream.run, self.n, Some(BANK_A.to_string()));
        let from = (inbox == Inbox::Stream).then(|| AMQPValue::LongString("first".into()));
        stream::consume_from(
            &chb,
            INBOX,
            from,
            &mut tally,
            Duration::from_secs(5),
            |_| {},
        )
        .await?;
        let delivered = tally.distinct();
        let (_ca, cha) = self.a.channel().await?;
        let mut reasons = BTreeMap::<String, u64>::new();
        // When the stream's watch first read each message (a stream inbox only).
        let stored = self
            .probe_b
            .stream_count()
            .map(|c| c.ids)
            .unwrap_or_default();
        while let Some(m) = cha
            .basic_get(
                world::DEAD_LETTER.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await?
        {
            let props = &m.delivery.properties;
            let h = props.headers().as_ref();
            let reason = stream::header_string(h, "drawbridge-reason")
                .or_else(|| stream::header_string(h, "x-first-death-reason"))
                .unwrap_or_else(|| "NO REASON".into());
            *reasons.entry(reason).or_default() += 1;
            let id = props.message_id().as_ref().map(|s| s.to_string());
            if let Some(at) = id.as_ref().and_then(|id| stored.get(id)) {
                self.in_both.push(format!(
                    "{} read in the stream inbox at {at} (Unix ms), dead-lettered with {}",
                    id.as_deref().unwrap_or_default(),
                    death(h)
                ));
            }
            tally.record(id.as_deref(), &m.delivery.data, Some(BANK_A));
        }
        self.dead_letters = (delivered, reasons);
        Ok(tally.report())
    }

    /// The runs a stream inbox holds: the fill (if any), then B's stream.
    fn stream_runs(&self, s: &Scenario) -> Vec<(&'static str, u64)> {
        s.fill
            .into_iter()
            .chain(
                s.streams
                    .iter()
                    .filter(|st| st.to == Peer::B)
                    .map(|st| (st.run, self.n)),
            )
            .collect()
    }

    /// One line per running float of B: its stream window and what it suppressed.
    async fn window_summaries(&self) -> Vec<String> {
        let mut floats = vec![("float", self.b.float.as_ref())];
        if let Some((second, _)) = &self.second_float {
            floats.push(("float-2", Some(second)));
        }
        let mut lines = Vec::new();
        for (name, float) in floats {
            let Some(float) = float else { continue };
            let line = match float.status().await {
                Ok(st) => {
                    let w = &st["window"];
                    format!(
                        "{name}: window {} rebuilds {} last_rebuild_ms {} read {} markers_published {} duplicates_stored {}; accepted {} duplicates_suppressed {}",
                        w["state"],
                        w["rebuilds"],
                        w["last_rebuild_ms"],
                        w["inboxes"][0]["read"],
                        w["markers_published"],
                        w["inboxes"][0]["duplicates_stored"],
                        st["accepted"],
                        st["duplicates_suppressed"]
                    )
                }
                Err(_) => format!("{name}: not running"),
            };
            lines.push(line);
        }
        lines
    }

    /// Stream inbox: what the reads from the first offset found, and B's floats' windows.
    fn stream_notes(&self, s: &Scenario) -> Vec<String> {
        let runs = self.stream_runs(s);
        let mut lines = Vec::new();
        for (i, read) in self.stream_reads.iter().enumerate() {
            let which = if i == 0 && s.verify == Verify::Inbox {
                "read".to_string()
            } else {
                format!("re-read after {}s quiet", QUIET_BEFORE_REREAD.as_secs())
            };
            for ((run, _), r) in runs.iter().zip(&read.reports) {
                lines.push(format!(
                    "stream inbox {which}, run {run}: received {} lost {} duplicates {} corrupted {} unexpected {}",
                    r.received, r.lost, r.duplicates, r.corrupted, r.unexpected
                ));
            }
            lines.push(format!(
                "stream inbox {which}: {} messages, {} window markers, {} of no run",
                read.messages, read.markers, read.other
            ));
        }
        let c = self.probe_b.stream_count();
        if let Some(c) = c {
            lines.push(format!(
                "stream inbox watch (reader from the first offset): run {}: {} distinct, {} copies; {} messages, {} markers; {} reconnects",
                s.streams[0].run, c.ids.len(), c.copies, c.messages, c.markers, c.connects.saturating_sub(1)
            ));
        }
        lines.extend(
            self.window_notes
                .iter()
                .map(|l| format!("stream window {l}")),
        );
        if !self.in_both.is_empty() {
            lines.push(format!(
                "stream inbox: {} messages both in the inbox (once) and dead-lettered:",
                self.in_both.len()
            ));
            lines.extend(self.in_both.iter().take(20).map(|l| format!("  {l}")));
        }
        // What B's floats said about their windows (a line per rebuild, warnings).
        let mut floats: Vec<&Daemon> = self.b.float.iter().collect();
        floats.extend(self.second_float.iter().map(|(d, _)| d));
        for (i, float) in floats.into_iter().enumerate() {
            let log = std::fs::read_to_string(float.log_path()).unwrap_or_default();
            let said: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("stream window"))
                .collect();
            for l in &said[said.len().saturating_sub(12)..] {
                lines.push(format!("float {} log: {}", i + 1, l.trim()));
            }
        }
        lines
    }

    /// A's broker (single node): how many crash reports (or terminating servers) its log has, and the first (its
    /// first 30 lines), for the messages both delivered and dead-lettered (j).
    fn broker_a_crashes(&self) -> (usize, Vec<String>) {
        let Ok(node) = self.broker_a.node() else {
            return (0, Vec::new());
        };
        let log = node.dir().join("log").join(format!("{}.log", node.name()));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let crash = |l: &str| l.contains("crasher:") || l.contains("terminating");
        let count = text.lines().filter(|l| crash(l)).count();
        // The first one's head and its reason (the message it choked on is long).
        let lines: Vec<&str> = text.lines().collect();
        let Some(at) = lines.iter().position(|l| crash(l)) else {
            return (count, Vec::new());
        };
        let reason = lines[at..]
            .iter()
            .position(|l| l.contains("Reason for termination"))
            .map_or(at, |r| at + r);
        let first = lines[at..at + 1]
            .iter()
            .chain(lines[reason..].iter().take(25))
            .map(|l| l.chars().take(240).collect())
            .collect();
        (count, first)
    }

    /// Stream inbox: every run once, in every read of the stream, nothing else in it.
    fn assert_exactly_once(&self, s: &Scenario) {
        assert_eq!(
            self.struck_late, 0,
            "a fault came after the whole stream had arrived: it shows nothing about a stream inbox"
        );
        let runs = self.stream_runs(s);
        assert!(
            !self.stream_reads.is_empty(),
            "the stream inbox was not read"
        );
        for (i, read) in self.stream_reads.iter().enumerate() {
            for ((run, _), r) in runs.iter().zip(&read.reports) {
                let lost_ok = if s.verify == Verify::Inbox {
                    r.lost == 0
                } else {
                    // Dead-lettered messages are not in the inbox: every one that is must be
                    // counted by the verification too.
                    r.received == self.dead_letters.0
                };
                assert!(
                    lost_ok
                        && r.duplicates == 0
                        && r.corrupted == 0
                        && r.unexpected == 0
                        && r.wrong_sender == 0,
                    "stream inbox read {i}, run {run}: exactly once expected: {r:?}\n{}\n{}",
                    self.window_notes.join("\n"),
                    self.logs()
                );
            }
            assert_eq!(read.other, 0, "messages of no run in the stream inbox");
        }
        for r in &self.reports {
            // j: a message A's broker dead-lettered after its copy had been stored in the
            // inbox is counted twice by the inbox-and-dead-letters tally; the inbox itself
            // holds it once (the reads above). Anything else counted twice is a duplicate.
            let in_both = self.in_both.len() as u64;
            assert_eq!(
                r.duplicates, in_both,
                "stream inbox: no duplicates ({in_both} in the inbox and dead-lettered): {r:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Steps: faults, heals, extra setup and checks.
// ---------------------------------------------------------------------------------------

fn kill9_bridge(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.bridge()?.kill9().await })
}

fn restart_bridge(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.bridge()?.restart().await })
}

/// B's bridge: in tunnel mode, the one that publishes for B's float.
fn kill9_receiving_bridge(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.b.bridge.as_mut().context("B's bridge")?.kill9().await })
}

fn restart_receiving_bridge(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.b.bridge.as_mut().context("B's bridge")?.restart().await })
}

fn kill9_float(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.float()?.kill9().await })
}

fn restart_float(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.float()?.restart().await })
}

/// SIGTERM A's bridge: it must drain, exit 0 and log its links stopping.
fn terminate_bridge(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let bridge = r.bridge()?;
        let code = bridge.terminate(Duration::from_secs(20)).await?;
        assert_eq!(code, Some(0), "bridge exit code after SIGTERM");
        assert!(
            bridge.log_contains("link stopped"),
            "{}",
            bridge.log_tail(20)
        );
        Ok(())
    })
}

/// SIGTERM B's float: it must settle what is in flight and exit 0.
fn terminate_float(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let code = r.float()?.terminate(Duration::from_secs(20)).await?;
        assert_eq!(code, Some(0), "float exit code after SIGTERM");
        Ok(())
    })
}

/// The line the float logs when its window is rebuilt from the stream inboxes.
const REBUILT: &str = "stream window rebuilt from the inboxes";

/// m: kill -9 the float, restart it, and kill -9 it again while its window is being rebuilt
/// from the stream: once `/status` says `rebuilding` and the float has read a quarter of the
/// stream back (not before it started reading, not after it finished).
fn kill9_restart_kill9_while_rebuilding(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let before = r.float()?.status().await.unwrap_or_default();
        r.float()?.kill9().await?;
        println!(
            "m: first kill: the float had accepted {}, suppressed {}",
            before["accepted"], before["duplicates_suppressed"]
        );
        let rebuilt_before = log_count(r.float()?, REBUILT);
        r.float()?.restart().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let (window, length) = loop {
            let length = r
                .probe_b
                .stream_count()
                .map_or(0, |c| c.messages + c.markers);
            let status = r.float()?.status().await.unwrap_or_default();
            let w = &status["window"];
            let read = w["inboxes"][0]["read"].as_u64().unwrap_or(0);
            if w["state"] == "ready" {
                bail!(
                    "the restarted float rebuilt its window (read {read} of {length}) before it could be killed during the rebuild: {w}"
                );
            }
            if w["state"] == "rebuilding" && read * 4 >= length && length > 0 {
                r.float()?.kill9().await?;
                break (status, length);
            }
            if Instant::now() > deadline {
                bail!("the restarted float's window was never seen rebuilding: {status}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The kill landed during the rebuild: the status just before it said so, the float
        // had published nothing yet, and its log never said the rebuild was done.
        let read = window["window"]["inboxes"][0]["read"].as_u64().unwrap_or(0);
        assert!(
            read < length,
            "killed after the whole stream was read back: {window}"
        );
        assert_eq!(
            window["accepted"], 0,
            "the float published before its window was rebuilt: {window}"
        );
        let rebuilt_after = log_count(r.float()?, REBUILT);
        assert_eq!(
            rebuilt_after,
            rebuilt_before,
            "the killed float had finished its rebuild:\n{}",
            r.float()?.log_tail(20)
        );
        r.rebuild_kill = Some((window, length));
        Ok(())
    })
}

/// kill -9 whichever of B's two floats the link is using.
fn kill9_float_in_use(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let killed_first = r.in_use.target.ends_with(&format!(":{}", r.b.float_port));
        if killed_first {
            r.float()?.kill9().await
        } else {
            let (second, _) = r.second_float.as_mut().context("no second float")?;
            second.kill9().await
        }
    })
}

/// kill -9 the node of B's cluster that the float is connected to.
fn kill_receiving_node_in_use(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let cluster = r.broker_b.cluster()?;
        let victim = node_in_use(cluster, &r.in_use.broker)?;
        cluster.nodes[victim].kill().await
    })
}

/// kill -9 the node of A's cluster that the bridge is connected to.
fn kill_sending_node_in_use(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let cluster = r.broker_a.cluster()?;
        let victim = node_in_use(cluster, &r.in_use.broker)?;
        cluster.nodes[victim].kill().await
    })
}

fn stop_app_a(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.broker_a.node()?.stop_app().await })
}

fn start_app_a(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.broker_a.node()?.start_app().await })
}

fn stop_app_b(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.broker_b.node()?.stop_app().await })
}

fn start_app_b(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move { r.broker_b.node()?.start_app().await })
}

/// The proxied path stops forwarding (no FIN/RST).
fn black_hole(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        r.proxy()?.set_mode(ProxyMode::BlackHole);
        Ok(())
    })
}

/// The proxied path resets its connections.
fn reset(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        r.proxy()?.set_mode(ProxyMode::Reset);
        Ok(())
    })
}

/// The proxied path forwards again.
fn pass(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        r.proxy()?.set_mode(ProxyMode::Pass);
        Ok(())
    })
}

/// g: with C's path stalled, start the link to B; B's whole stream must get through while C
/// stays stalled. Then C's path is restored.
fn stream_to_b_while_c_stalls(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let n = r.n;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c_at_stall = r.probe(Peer::C)?.now().await;
        let started = Instant::now();
        r.a.create_link_to(&r.b).await?;
        r.probe_b
            .wait_for(n, WHOLE_STREAM_WITHIN)
            .await
            .with_context(|| logs(&r.a))?;
        let b_elapsed = started.elapsed();
        let c_during = r.probe(Peer::C)?.now().await;
        assert!(
            c_during <= c_at_stall + 1000,
            "C's link was supposed to be stalled: {c_at_stall} → {c_during}"
        );
        println!(
            "stall: B's {n} messages took {:.2}s ({:.0} msg/s) while C was stalled at {c_during}",
            b_elapsed.as_secs_f64(),
            n as f64 / b_elapsed.as_secs_f64()
        );
        r.b_elapsed_while_c_stalled = Some(b_elapsed);
        r.proxy()?.set_mode(ProxyMode::Pass);
        Ok(())
    })
}

/// g: the same stream to B again with C healthy and idle; reports B's rate in both runs.
fn b_rate_with_c_healthy(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let n = r.n;
        let b_elapsed = r
            .b_elapsed_while_c_stalled
            .context("no run of B's stream while C was stalled")?;
        r.a.delete_link_to(&r.b).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        preload(&r.a, &r.b, "gb2", n, "classic").await?;
        let started = Instant::now();
        r.a.create_link_to(&r.b).await?;
        r.probe_b.wait_for(n, WHOLE_STREAM_WITHIN).await?;
        let normal = started.elapsed();
        let rb2 = verify(&r.b, "gb2", n, BANK_A).await?;
        println!(
            "FAULT-REPORT | g. B's rate with C stalled / with C healthy: {:.0} / {:.0} msg/s = {:.2} |",
            n as f64 / b_elapsed.as_secs_f64(),
            n as f64 / normal.as_secs_f64(),
            normal.as_secs_f64() / b_elapsed.as_secs_f64()
        );
        assert_intact("g/B2", &rb2, &r.logs());
        Ok(())
    })
}

/// j: a delivery limit of 5 on A's peer queues, and B's broker refusing every publish.
fn limit_deliveries_and_refuse_publishes(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        limit_deliveries(r).await?;
        refuse_publishes(r).await
    })
}

/// j_stream: B's broker refuses every publish, and closes every connection so that no
/// channel goes on with a write permission it checked before (RabbitMQ caches them per
/// channel). The float reconnects and cannot rebuild its window (its marker is refused).
fn refuse_publishes_and_reconnect(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        refuse_publishes(r).await?;
        r.broker_b.node()?.close_all_connections().await
    })
}

/// j: a delivery limit of 5 on A's peer queues.
fn limit_deliveries(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        r.broker_a
            .node()?
            .ctl(&[
                "set_policy",
                "-p",
                "/",
                "delivery-limit",
                "^drawbridge\\.peers\\.",
                r#"{"delivery-limit": 5}"#,
                "--apply-to",
                "queues",
            ])
            .await
            .map(drop)
    })
}

/// j: B's broker refuses every publish.
fn refuse_publishes(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        // No write on the float's publishing exchange (`drawbridge.inboxes`), so every
        // publish is refused; write on the inbox queue itself stays, since binding it to the
        // exchange at start needs it (RabbitMQ checks a bind as write on the queue).
        r.broker_b
            .node()?
            .ctl(&[
                "set_permissions",
                "-p",
                "/",
                "guest",
                ".*",
                "^drawbridge\\.inbox$",
                ".*",
            ])
            .await
            .map(drop)
    })
}

/// j: let B's broker refuse publishes for a minute of the stream, then note how often the
/// link connected and what its status says.
fn let_refusals_last_a_minute(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let queue = r.queue_to_b();
        r.outage = (
            link_connects(&r.a, &queue).await,
            link_view(&r.a, &queue).await,
        );
        Ok(())
    })
}

/// j: B's broker accepts publishes again.
fn allow_publishes(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        r.broker_b
            .node()?
            .ctl(&["set_permissions", "-p", "/", "guest", ".*", ".*", ".*"])
            .await
            .map(drop)
    })
}

/// f: each path cut healed within 10 s.
fn traffic_resumed_within_ten_seconds(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        for rec in &r.recoveries {
            // The requirement is 5 s; the bound leaves room for a loaded 2-core CI machine.
            assert!(
                *rec < Duration::from_secs(10),
                "traffic resumed only after {rec:?}"
            );
        }
        Ok(())
    })
}

/// h: a drained bridge resends nothing the float had accepted.
fn no_resends_after_bridge_drain(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let float = r.float()?.status().await?;
        assert_eq!(
            r.reports[0].duplicates, 0,
            "a drained bridge must not resend accepted messages"
        );
        assert_eq!(
            float["duplicates_suppressed"], 0,
            "nothing accepted may be resent: {float}"
        );
        Ok(())
    })
}

/// i: a drained float causes no resends.
fn no_resends_after_float_drain(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        assert_eq!(
            r.reports[0].duplicates, 0,
            "a drained float must not cause resends of accepted messages"
        );
        Ok(())
    })
}

/// j: every dead-lettered message says why.
fn every_dead_letter_has_a_reason(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let reasons = &r.dead_letters.1;
        assert!(
            !reasons.contains_key("NO REASON"),
            "every dead-letter has a reason: {reasons:?}"
        );
        Ok(())
    })
}

/// j: the link's status names the message stuck at the head of the queue.
fn stuck_link_reported(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let view = r.outage.1.clone().unwrap_or_default();
        assert!(
            view["head_returns"].as_u64().unwrap_or(0) >= 3 && view["stuck_message_id"].is_string(),
            "the stuck link is reported in its status: {view}"
        );
        Ok(())
    })
}

/// j_stream: the float said why its window could not be rebuilt.
fn window_reported_refusal(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let float = r.float()?;
        assert!(
            float.log_contains("cannot read the inbox stream back")
                && float.log_contains("ACCESS_REFUSED"),
            "the float reports its window blocked by the refusal:\n{}",
            float.log_tail(20)
        );
        Ok(())
    })
}

/// j: the link backed off while the peer refused (at most 10 connects in the minute).
fn link_backed_off(r: &mut Rig) -> LocalBoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let connects = r.outage.0;
        assert!(
            connects <= 10,
            "the link must back off while the peer refuses: {connects} connects in 60 s\n{}",
            logs(&r.a)
        );
        Ok(())
    })
}

/// e: how long each broker took to start (included in the recovery times).
fn broker_start_times(r: &Rig) -> String {
    format!(
        "broker start_app took {:.2}s (B) and {:.2}s (A); recovery times below include it",
        r.heal_times[0].as_secs_f64(),
        r.heal_times[1].as_secs_f64()
    )
}

/// m: where the rebuild was when the float was killed, and how long the last one took.
fn rebuild_kill_summary(r: &Rig) -> String {
    let Some((status, length)) = &r.rebuild_kill else {
        return "m: no kill during a rebuild".into();
    };
    let w = &status["window"];
    format!(
        "m: second kill during the window rebuild: read {} of the stream's {length} (messages and markers), rebuilding for {} ms, accepted {}; the float after the last restart: {}",
        w["inboxes"][0]["read"],
        w["rebuilding_for_ms"],
        status["accepted"],
        r.window_notes.first().map_or("-", String::as_str)
    )
}

/// f: the recovery after each kind of cut.
fn path_cut_recoveries(r: &Rig) -> String {
    [ProxyMode::BlackHole, ProxyMode::Reset]
        .iter()
        .zip(&r.recoveries)
        .map(|(mode, rec)| format!("path cut ({mode:?}) healed; traffic resumed after {rec:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// j: what the outage did to the link and where the messages went.
fn recycle_storm_summary(r: &Rig) -> String {
    let (connects, view) = &r.outage;
    let (inbox, dead) = r.accounted;
    let (delivered, reasons) = &r.dead_letters;
    let crashes = r.broker_a_crashes();
    format!(
        "j: link connects during the 60 s outage {connects}; delivered {delivered}; dead-lettered {dead} {reasons:?}; inbox depth at heal+{:.1}s {inbox}; link {}\nj: A's broker: {} channel crash reports{}",
        r.recoveries.first().copied().unwrap_or_default().as_secs_f64(),
        view.clone().unwrap_or_default(),
        crashes.0,
        if crashes.1.is_empty() { String::new() } else { format!(", the first:\n{}", crashes.1.join("\n")) }
    )
}

// ---------------------------------------------------------------------------------------
// Streams and probes.
// ---------------------------------------------------------------------------------------

/// Publish `n` verifiable messages from `from` to its peer queue for `to`.
async fn preload(from: &Org, to: &Org, run: &str, n: u64, queue_type: &str) -> Result<()> {
    let (_c, ch) = from.channel().await?;
    world::declare_peer_queue(&ch, &from.queue_to(to), queue_type).await?;
    let spec = PublishSpec {
        run: run.into(),
        from: 0,
        to: n,
        size: 512,
        destination: to.legal_name.clone(),
        headers: vec![],
    };
    stream::publish(&ch, &from.queue_to(to), &spec, |_| {}).await
}

/// Watches the depth of an org's inbox over AMQP (passive declare), reconnecting across
/// its broker URIs as needed. The inbox is not consumed until the end, so its depth only grows.
///
/// A stream inbox's message count from a passive declare comes from the broker's coarse
/// metrics (updated every few seconds, never lower): a stream is watched instead by a reader
/// that follows it from its first offset ([`StreamCount`]), and its "depth" is the number of
/// *distinct* messages of the scenario's run read so far (markers and other runs aside).
struct InboxProbe {
    uris: Vec<String>,
    queue: String,
    chan: Option<(lapin::Connection, lapin::Channel)>,
    /// Stream inbox: what the reader has counted, and the reader.
    stream: Option<(Arc<Mutex<StreamCount>>, AbortOnDrop)>,
}

impl InboxProbe {
    fn new(org: &Org) -> Self {
        InboxProbe {
            uris: org.broker_uris.clone(),
            queue: INBOX.to_string(),
            chan: None,
            stream: None,
        }
    }

    /// A probe on an org's stream inbox, counting the messages of `run`.
    fn stream(org: &Org, run: &str) -> Self {
        let count = Arc::new(Mutex::new(StreamCount::default()));
        let reader = tokio::spawn(follow_stream(
            org.broker_uris.clone(),
            format!("{run}-"),
            count.clone(),
        ));
        InboxProbe {
            stream: Some((count, AbortOnDrop(reader))),
            ..InboxProbe::new(org)
        }
    }

    /// Stream inbox: a copy of what the reader has counted so far.
    fn stream_count(&self) -> Option<StreamCount> {
        self.stream.as_ref().map(|(c, _)| lock(c).clone())
    }

    /// The depth now, for a baseline: for a stream, once the reader is consuming and has read
    /// nothing for 300 ms (it has caught up after its broker came back), at most 10 s.
    async fn caught_up(&mut self) -> u64 {
        if let Some((count, _)) = &self.stream {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let quiet = {
                    let c = lock(count);
                    let gap = Duration::from_millis(300);
                    c.consuming_since.is_some_and(|t| t.elapsed() >= gap)
                        && c.last_delivery.is_none_or(|t| t.elapsed() >= gap)
                };
                if quiet {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.now().await
    }

    async fn depth(&mut self) -> Option<u64> {
        if let Some((count, _)) = &self.stream {
            let c = lock(count);
            return (c.connects > 0).then_some(c.ids.len() as u64);
        }
        if self
            .chan
            .as_ref()
            .map(|(c, ch)| !c.status().connected() || !ch.status().connected())
            .unwrap_or(true)
        {
            self.chan = None;
            for uri in &self.uris {
                let fut = async {
                    let c = lapin::Connection::connect(uri, Default::default()).await?;
                    let ch = c.create_channel().await?;
                    Ok::<_, lapin::Error>((c, ch))
                };
                if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(2), fut).await {
                    self.chan = Some(v);
                    break;
                }
            }
        }
        let (_, ch) = self.chan.as_ref()?;
        let q = tokio::time::timeout(
            Duration::from_secs(2),
            ch.queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        match q {
            Ok(Ok(q)) => Some(u64::from(q.message_count())),
            _ => {
                self.chan = None;
                None
            }
        }
    }

    /// Wait until the inbox holds at least `n` messages.
    async fn wait_for(&mut self, n: u64, within: Duration) -> Result<u64> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(d) = self.depth().await {
                if d >= n {
                    return Ok(d);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "inbox did not reach {n} within {within:?} (now {:?})",
                    self.depth().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Time from now until the inbox grows past `baseline`.
    async fn recovery_after(&mut self, baseline: u64, within: Duration) -> Result<Duration> {
        self.recovery_since(baseline, Instant::now(), within).await
    }

    /// Time from `t0` (when the fault was healed) until the inbox grows past `baseline`.
    async fn recovery_since(
        &mut self,
        baseline: u64,
        t0: Instant,
        within: Duration,
    ) -> Result<Duration> {
        loop {
            if let Some(d) = self.depth().await {
                if d > baseline {
                    return Ok(t0.elapsed());
                }
            }
            if t0.elapsed() > within {
                bail!("no new message in the inbox within {within:?} after the fault was healed");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Wait until the depth has not changed for 500 ms (what was in flight when the fault
    /// hit has landed), at most 10 s; returns it. Used as the baseline before healing.
    async fn settled(&mut self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.now().await;
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let d = self.now().await;
            if d != last {
                last = d;
                since = Instant::now();
            } else if since.elapsed() >= Duration::from_millis(500) {
                break;
            }
        }
        last
    }

    /// Current depth, retrying while the broker is unreachable.
    async fn now(&mut self) -> u64 {
        for _ in 0..100 {
            if let Some(d) = self.depth().await {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        0
    }
}

/// Ends a task when dropped (the stream reader ends with its scenario).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the reader of a stream inbox has counted.
#[derive(Clone, Default)]
struct StreamCount {
    /// Distinct message ids of the watched run, and when each was first read (Unix ms).
    ids: HashMap<String, u64>,
    /// Messages of the watched run, copies included.
    copies: u64,
    /// Messages that are no window marker (every run).
    messages: u64,
    /// Window markers.
    markers: u64,
    /// The offset to read next.
    next: Option<i64>,
    /// Connections on which it consumed.
    connects: u64,
    /// Since when it consumes on its current connection (`None`: not connected).
    consuming_since: Option<Instant>,
    /// When the last message came.
    last_delivery: Option<Instant>,
}

/// Follow B's stream inbox from its first offset, counting into `count`, across broker
/// restarts and node failures (it resumes where it stopped, on whichever node answers).
async fn follow_stream(uris: Vec<String>, prefix: String, count: Arc<Mutex<StreamCount>>) {
    let mut turn = 0usize;
    loop {
        let uri = &uris[turn % uris.len()];
        turn += 1;
        let from = lock(&count).next;
        let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(2),
            lapin::Connection::connect(uri, Default::default()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let consume = tokio::time::timeout(Duration::from_secs(5), async {
            let ch = conn.create_channel().await?;
            ch.basic_qos(1000, Default::default()).await?;
            let mut args = FieldTable::default();
            let offset = match from {
                Some(o) => AMQPValue::LongLongInt(o),
                None => AMQPValue::LongString("first".into()),
            };
            args.insert("x-stream-offset".into(), offset);
            let consumer = ch
                .basic_consume(
                    INBOX.into(),
                    "fault-suite-stream-watch".into(),
                    Default::default(),
                    args,
                )
                .await?;
            Ok::<_, lapin::Error>((ch, consumer))
        })
        .await;
        if let Ok(Ok((ch, mut consumer))) = consume {
            {
                let mut c = lock(&count);
                c.connects += 1;
                c.consuming_since = Some(Instant::now());
            }
            let mut unacked = 0;
            while let Some(Ok(d)) = consumer.next().await {
                {
                    let mut c = lock(&count);
                    c.last_delivery = Some(Instant::now());
                    if let Some(offset) = stream_offset(&d) {
                        c.next = Some(offset + 1);
                    }
                    let h = d.properties.headers().as_ref();
                    if h.is_some_and(|h| h.inner().contains_key(stream::WINDOW_MARKER)) {
                        c.markers += 1;
                    } else {
                        c.messages += 1;
                        if let Some(id) = d.properties.message_id() {
                            if id.as_str().starts_with(&prefix) {
                                c.copies += 1;
                                c.ids.entry(id.to_string()).or_insert_with(unix_ms);
                            }
                        }
                    }
                }
                unacked += 1;
                if unacked >= 200 {
                    let multiple = BasicAckOptions { multiple: true };
                    if ch.basic_ack(d.delivery_tag, multiple).await.is_err() {
                        break;
                    }
                    unacked = 0;
                }
            }
            lock(&count).consuming_since = None;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "".into())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A dead-letter's `x-death` (first entry): reason, count, time.
fn death(h: Option<&FieldTable>) -> String {
    let Some(AMQPValue::FieldArray(deaths)) = h.and_then(|h| h.inner().get("x-death")) else {
        return "no x-death".into();
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
        return "an empty x-death".into();
    };
    let f = first.inner();
    let reason = match f.get("reason") {
        Some(AMQPValue::LongString(r)) => String::from_utf8_lossy(r.as_bytes()).into_owned(),
        other => format!("{other:?}"),
    };
    let time = match f.get("time") {
        Some(AMQPValue::Timestamp(t)) => format!("{t} (Unix s)"),
        other => format!("{other:?}"),
    };
    format!("reason {reason}, count {:?}, at {time}", f.get("count"))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stream delivery's offset.
fn stream_offset(d: &lapin::message::Delivery) -> Option<i64> {
    match d
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-offset")?
    {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// What one read of a stream inbox from its first offset found.
struct StreamRead {
    /// One report per run asked for.
    reports: Vec<Report>,
    /// Window markers skipped.
    markers: u64,
    /// Messages that are no marker.
    messages: u64,
    /// Messages of none of the runs.
    other: u64,
}

/// Read B's stream inbox from its first offset (window markers skipped) until every run is
/// complete and nothing more came for 2 s (or, while some is not, for `idle`).
async fn read_stream(
    at: &Org,
    runs: &[(&str, u64)],
    sender: &str,
    idle: Duration,
) -> Result<StreamRead> {
    let (_c, ch) = at.channel().await?;
    ch.basic_qos(1000, Default::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut consumer = ch
        .basic_consume(
            INBOX.into(),
            "fault-suite-stream-verify".into(),
            Default::default(),
            args,
        )
        .await
        .context("reading the stream inbox")?;
    let mut tallies: Vec<(String, Tally)> = runs
        .iter()
        .map(|(run, n)| (format!("{run}-"), Tally::new(run, *n, Some(sender.into()))))
        .collect();
    let expected: u64 = runs.iter().map(|(_, n)| n).sum();
    let (mut markers, mut messages, mut other, mut unacked) = (0, 0, 0, 0);
    loop {
        let complete = tallies.iter().map(|(_, t)| t.distinct()).sum::<u64>() >= expected;
        let idle = if complete {
            Duration::from_secs(2)
        } else {
            idle
        };
        let d = match tokio::time::timeout(idle, consumer.next()).await {
            Err(_) => break,
            Ok(None) => bail!("the stream inbox reader was cancelled"),
            Ok(Some(Err(e))) => bail!("reading the stream inbox: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        let h = d.properties.headers().as_ref();
        if h.is_some_and(|h| h.inner().contains_key(stream::WINDOW_MARKER)) {
            markers += 1;
        } else {
            messages += 1;
            let id = d.properties.message_id().as_ref().map(|s| s.to_string());
            let from = stream::header_string(h, stream::SENDER);
            match tallies
                .iter_mut()
                .find(|(p, _)| id.as_deref().is_some_and(|i| i.starts_with(p.as_str())))
            {
                Some((_, t)) => t.record(id.as_deref(), &d.data, from.as_deref()),
                None => other += 1,
            }
        }
        unacked += 1;
        if unacked >= 200 {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
            unacked = 0;
        }
    }
    Ok(StreamRead {
        reports: tallies.iter().map(|(_, t)| t.report()).collect(),
        markers,
        messages,
        other,
    })
}

/// Drain B's inbox through the verifying consumer.
async fn verify(to: &Org, run: &str, n: u64, sender: &str) -> Result<Report> {
    let (_c, ch) = to.channel().await?;
    let mut tally = Tally::new(run, n, Some(sender.to_string()));
    stream::consume(&ch, INBOX, &mut tally, Duration::from_secs(60), |_| {}).await?;
    Ok(tally.report())
}

fn report(name: &str, r: &Report, recoveries: &[Duration]) {
    let rec: Vec<String> = recoveries
        .iter()
        .map(|d| format!("{:.2}s", d.as_secs_f64()))
        .collect();
    println!(
        "FAULT-REPORT | {name} | messages {} | received {} | lost {} | corrupted {} | duplicates {} | recovery {} |",
        r.expected,
        r.received,
        r.lost,
        r.corrupted,
        r.duplicates,
        if rec.is_empty() { "-".into() } else { rec.join(", ") }
    );
}

fn assert_intact(name: &str, r: &Report, ctx: &str) {
    assert!(
        r.lost == 0 && r.corrupted == 0 && r.unexpected == 0 && r.wrong_sender == 0,
        "{name}: {r:?}\n{ctx}"
    );
}

/// How often `needle` occurs in a daemon's log (every run of it).
fn log_count(d: &Daemon, needle: &str) -> usize {
    std::fs::read_to_string(d.log_path())
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

fn logs(org: &Org) -> String {
    let mut s = String::new();
    if let Some(b) = &org.bridge {
        s += &format!("--- bridge {}\n{}\n", org.legal_name, b.log_tail(25));
    }
    if let Some(f) = &org.float {
        s += &format!("--- float {}\n{}\n", org.legal_name, f.log_tail(25));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Link, float and cluster status.
// ---------------------------------------------------------------------------------------

async fn link_view(org: &Org, queue: &str) -> Option<serde_json::Value> {
    let s = org.bridge.as_ref()?.status().await.ok()?;
    s["links"]
        .as_array()?
        .iter()
        .find(|l| l["queue"] == queue)
        .cloned()
}

async fn link_connects(org: &Org, queue: &str) -> u64 {
    link_view(org, queue)
        .await
        .and_then(|l| l["connects"].as_u64())
        .unwrap_or(0)
}

/// Time from `since` until the link is up on a target other than `old_target`.
async fn link_up_elsewhere(
    org: &Org,
    queue: &str,
    old_target: &str,
    since: Instant,
) -> Result<Duration> {
    loop {
        if let Some(l) = link_view(org, queue).await {
            if l["state"] == "up" && l["target"] != old_target {
                return Ok(since.elapsed());
            }
        }
        if since.elapsed() > Duration::from_secs(60) {
            bail!("link {queue} did not fail over within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Time from `since` until the link has connected again (more than `connects` times).
async fn link_reconnected(
    org: &Org,
    queue: &str,
    connects: u64,
    since: Instant,
) -> Result<Duration> {
    // Wall-clock time of the strike: with hot-warm HA a bridge that lost its broker
    // connection gives up its links and, active again, creates them anew (their `connects`
    // starts from 1), so "up since after the strike" counts as reconnected too.
    let struck_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        .saturating_sub(since.elapsed().as_millis()) as u64;
    loop {
        if let Some(l) = link_view(org, queue).await {
            let up = l["state"] == "up";
            let more = l["connects"].as_u64().unwrap_or(0) > connects;
            let anew = l["since_unix_ms"].as_u64().unwrap_or(0) >= struck_unix_ms;
            if up && (more || anew) {
                return Ok(since.elapsed());
            }
        }
        if since.elapsed() > Duration::from_secs(90) {
            bail!("link {queue} did not come back within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Time from `since` until the float is ready on a broker other than `old_uri`.
async fn float_ready_elsewhere(org: &Org, old_uri: &str, since: Instant) -> Result<Duration> {
    let float = org.float.as_ref().context("no float")?;
    loop {
        if let Ok(s) = float.status().await {
            if s["ready"] == true && s["broker"].as_str().map(|u| u != old_uri).unwrap_or(false) {
                return Ok(since.elapsed());
            }
        }
        if since.elapsed() > Duration::from_secs(90) {
            bail!("float not ready on another node within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node_in_use(cluster: &RabbitCluster, uri: &str) -> Result<usize> {
    cluster
        .nodes
        .iter()
        .position(|n| uri.contains(&format!(":{}/", n.amqp_port())))
        .with_context(|| format!("no cluster node matches {uri}"))
}
