//! `drawbridge status`: a daemon's `/status` as a table an operator reads at a glance.
//!
//! Rendering is a pure function of the JSON and the current time, so it is tested without
//! a daemon; `--json` prints the JSON itself for scripts.

use serde_json::Value;

/// Render the `/status` document `v` of a bridge or a float, at `now_unix_ms`.
pub fn render(v: &Value, now_unix_ms: u64) -> String {
    match v["role"].as_str() {
        Some("bridge") => bridge(v, now_unix_ms),
        Some("float") => float(v, now_unix_ms),
        _ => format!(
            "unknown daemon role {}; use --json\n",
            v["role"].as_str().unwrap_or("(none)")
        ),
    }
}

fn bridge(v: &Value, now: u64) -> String {
    let mut out = String::new();
    let state = text(&v["ha_state"]);
    let ready = if v["ready"].as_bool() == Some(true) {
        "ready"
    } else {
        "NOT READY"
    };
    let converged = match (state.as_str(), v["converged"].as_bool()) {
        ("active", Some(true)) => ", links converged",
        ("active", _) => ", links not converged",
        _ => "",
    };
    out.push_str(&format!(
        "bridge {}: {state} ({ready}{converged})\n",
        text(&v["id"])
    ));
    out.push_str(&format!("  broker    {}\n", text(&v["broker"])));
    out.push_str(&format!("  node      {}\n", text(&v["node_identity"])));
    let hot_hot = v["ha"]["mode"].as_str() == Some("hot-hot");
    if hot_hot {
        out.push_str(&format!(
            "  hot-hot   {} ({})\n",
            text(&v["ha"]["members_exchange"]),
            text(&v["ha"]["reason"])
        ));
        for m in v["ha"]["members"].as_array().into_iter().flatten() {
            let me = if m["self"].as_bool() == Some(true) {
                ", this instance"
            } else {
                ""
            };
            out.push_str(&format!(
                "  member    {}: {}, {} links{me}\n",
                text(&m["id"]),
                text(&m["state"]),
                number(&m["links"])
            ));
        }
    } else if v["ha"]["enabled"].as_bool() == Some(true) {
        let mut lock = format!(
            "{} ({})",
            text(&v["ha"]["lock_queue"]),
            text(&v["ha"]["reason"])
        );
        if let Some(ms) = v["ha"]["hold_off_ms_left"].as_u64() {
            lock.push_str(&format!(", holding off {}", human(ms)));
        }
        out.push_str(&format!("  lock      {lock}\n"));
    }
    for t in v["tunnels"].as_array().into_iter().flatten() {
        let since = t["since_unix_ms"]
            .as_u64()
            .map_or("-".to_string(), |ms| human(now.saturating_sub(ms)));
        let line = match (t["state"].as_str(), t["activated_epoch"].as_u64()) {
            (Some("up"), Some(epoch)) => format!(
                "up {since}, activated (epoch {epoch}); {} published, {} handshakes signed",
                number(&t["published"]),
                number(&t["signatures"])
            ),
            (Some("up"), None) => format!("up {since}, not activated (standby)"),
            _ => format!("DOWN {since}: {}", text(&t["reason"])),
        };
        out.push_str(&format!("  tunnel    {} {line}\n", text(&t["float"])));
    }
    let wanted = v["wanted_links"].as_array().map_or(0, Vec::len);
    let links = v["links"].as_array().cloned().unwrap_or_default();
    // Hot-hot: where each wanted link runs that does not run here.
    let elsewhere: Vec<[String; 2]> = v["ha"]["owners"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, owner)| owner.as_str() != v["id"].as_str())
        .map(|(queue, owner)| {
            let owner = match owner.as_str() {
                Some("") | None => "nobody (no alive member)".to_string(),
                Some(o) => o.to_string(),
            };
            [queue.clone(), owner]
        })
        .collect();
    let elsewhere = if elsewhere.is_empty() {
        String::new()
    } else {
        let mut rows = vec![["QUEUE", "RUNS ON"].map(String::from)];
        rows.extend(elsewhere);
        format!("\n{}", table(&rows))
    };
    if hot_hot && links.is_empty() {
        out.push_str(&format!(
            "  links     none running here ({wanted} wanted in the group)\n"
        ));
        out.push_str(&elsewhere);
        return out;
    }
    if links.is_empty() {
        if state == "active" {
            out.push_str(&format!("  links     none running ({wanted} wanted)\n"));
        } else {
            out.push_str(&format!(
                "  links     {wanted} wanted; they run on the active bridge\n"
            ));
        }
        return out;
    }
    let mut rows = vec![[
        "QUEUE",
        "STATE",
        "SINCE",
        "PEER",
        "TARGET",
        "IN FLIGHT",
        "FORWARDED",
        "DEAD-LETTERED",
        "CANARY",
        "LAST ERROR",
    ]
    .map(String::from)];
    for l in &links {
        let up = l["state"].as_str() == Some("up");
        let canary = match (l["canary_rtt_ms"].as_f64(), l["canary_error"].as_str()) {
            (_, Some(_)) => "failing".to_string(),
            (Some(ms), None) => format!("{ms:.1} ms"),
            (None, None) => "-".to_string(),
        };
        let error = match (up, l["canary_error"].as_str()) {
            (false, _) => text(&l["reason"]),
            (true, Some(e)) => format!("canary: {e}"),
            (true, None) => "-".to_string(),
        };
        rows.push([
            text(&l["queue"]),
            text(&l["state"]),
            l["since_unix_ms"]
                .as_u64()
                .map_or("-".to_string(), |t| human(now.saturating_sub(t))),
            text(&l["peer"]),
            text(&l["target"]),
            number(&l["in_flight"]),
            number(&l["forwarded"]),
            number(&l["dead_lettered"]),
            canary,
            error,
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    out.push_str(&elsewhere);
    out
}

fn float(v: &Value, now: u64) -> String {
    let mut out = String::new();
    let ready = if v["ready"].as_bool() == Some(true) {
        "ready"
    } else {
        "NOT READY"
    };
    out.push_str(&format!("float on {} ({ready})\n", text(&v["listen"])));
    if v["mode"].as_str() == Some("tunnel") {
        let t = &v["tunnel"];
        let state = if t["active"].as_bool() == Some(true) {
            format!("active (epoch {})", number(&t["epoch"]))
        } else {
            "NO ACTIVE BRIDGE".to_string()
        };
        out.push_str(&format!(
            "  tunnel    {state}; {} handshakes signed by the bridge, {} failed; {} publishes waiting for an outcome\n",
            number(&t["signatures"]),
            number(&t["signature_failures"]),
            number(&t["publishes_waiting"]),
        ));
        for b in t["tunnels"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  bridge    {} ({}) from {}, {}, up {}\n",
                text(&b["bridge_id"]),
                text(&b["bridge"]),
                text(&b["address"]),
                if b["active"].as_bool() == Some(true) {
                    "active"
                } else {
                    "standby"
                },
                b["up_seconds"]
                    .as_u64()
                    .map_or("-".to_string(), |s| human(s * 1000)),
            ));
        }
    } else {
        out.push_str(&format!("  broker    {}\n", text(&v["broker"])));
    }
    for id in v["identities"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  serves    {} -> {}\n",
            text(&id["legal_name"]),
            text(&id["inbox"])
        ));
    }
    out.push_str(&format!(
        "  messages  {} accepted, {} rejected, {} released, {} duplicates suppressed; {} bytes in flight\n",
        number(&v["accepted"]),
        number(&v["rejected"]),
        number(&v["released"]),
        number(&v["duplicates_suppressed"]),
        number(&v["bytes_in_flight"]),
    ));
    out.push_str(&window_line(&v["window"]));
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    if conns.is_empty() {
        out.push_str("  peers     none connected\n");
        return out;
    }
    let mut rows = vec![["PEER", "ADDRESS", "SINCE", "CERTIFICATE SERIAL"].map(String::from)];
    for c in &conns {
        rows.push([
            text(&c["peer"]),
            text(&c["addr"]),
            c["since_unix_ms"]
                .as_u64()
                .map_or("-".to_string(), |t| human(now.saturating_sub(t))),
            text(&c["cert_serial"]),
        ]);
    }
    rows[1..].sort();
    out.push('\n');
    out.push_str(&table(&rows));
    out
}

/// The dedup window: in memory (not shown), or read back from stream inboxes (its state,
/// and what the read back found).
fn window_line(w: &Value) -> String {
    if w["mode"] != "stream" {
        return String::new();
    }
    let inboxes = w["inboxes"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| inboxes.iter().filter_map(|i| i[k].as_u64()).sum::<u64>();
    let state = match (w["state"].as_str(), w["rebuilding_for_ms"].as_u64()) {
        (Some("ready"), _) => format!(
            "ready (last rebuild {})",
            w["last_rebuild_ms"].as_u64().map_or("-".to_string(), human)
        ),
        (_, Some(ms)) => format!("REBUILDING for {}: links publish nothing yet", human(ms)),
        _ => "REBUILDING: links publish nothing yet".to_string(),
    };
    let mut line = format!(
        "  window    stream, {state}; {} read back, {} copies stored twice, {} rebuilds\n",
        sum("read"),
        sum("duplicates_stored"),
        number(&w["rebuilds"]),
    );
    if let Some(e) = w["last_error"].as_str() {
        line.push_str(&format!("  window    last error: {e}\n"));
    }
    line
}

/// A JSON string or number as text; `-` when absent.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "-".to_string(),
    }
}

fn number(v: &Value) -> String {
    v.as_u64().map_or("-".to_string(), |n| n.to_string())
}

/// Milliseconds as the two largest units: `850ms`, `42s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_read_as_two_units() {
        assert_eq!(human(850), "850ms");
        assert_eq!(human(42_000), "42s");
        assert_eq!(human(192_000), "3m12s");
        assert_eq!(human(7_500_000), "2h05m");
        assert_eq!(human(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }

    #[test]
    fn an_active_bridge_shows_each_link_with_its_state_peer_and_errors() {
        let now = 1_000_000_000;
        let v = json!({
            "role": "bridge", "id": "bridge-a", "ready": true, "converged": true,
            "ha_state": "active", "broker": "amqp://127.0.0.1:5672/%2f",
            "node_identity": "O=Bank A, L=London, C=GB",
            "ha": {"enabled": true, "state": "active", "reason": "holding the lock",
                   "lock_queue": "drawbridge.bridge.lock.a", "hold_off_ms_left": null},
            "wanted_links": ["drawbridge.peers.b", "drawbridge.peers.c"],
            "links": [
                {"queue": "drawbridge.peers.b", "peer": "O=Bank B, L=Paris, C=FR", "state": "up",
                 "target": "127.0.0.1:5671", "reason": "connected", "forwarded": 10000,
                 "dead_lettered": 2, "in_flight": 17, "since_unix_ms": now - 192_000,
                 "canary_rtt_ms": 1.84, "canary_error": null},
                {"queue": "drawbridge.peers.c", "peer": "O=Bank C, L=Berlin, C=DE", "state": "down",
                 "target": "127.0.0.1:5681", "reason": "network: connection refused",
                 "forwarded": 0, "dead_lettered": 0, "in_flight": 0, "since_unix_ms": now - 5_000,
                 "canary_rtt_ms": null, "canary_error": null}
            ]
        });
        let out = render(&v, now);
        assert!(
            out.starts_with("bridge bridge-a: active (ready, links converged)\n"),
            "{out}"
        );
        assert!(
            out.contains("lock      drawbridge.bridge.lock.a (holding the lock)"),
            "{out}"
        );
        let lines: Vec<&str> = out.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("QUEUE")).unwrap();
        let b = lines[header + 1];
        let c = lines[header + 2];
        for cell in [
            "drawbridge.peers.b",
            "up",
            "3m12s",
            "O=Bank B, L=Paris, C=FR",
            "17",
            "10000",
            "1.8 ms",
        ] {
            assert!(b.contains(cell), "{cell} missing in {b}");
        }
        assert!(
            c.contains("down") && c.ends_with("network: connection refused"),
            "{c}"
        );
        // Columns line up: each row's state starts where the header's does.
        let col = lines[header].find("STATE").unwrap();
        assert_eq!(&b[col..col + 2], "up");
        assert_eq!(&c[col..col + 4], "down");
    }

    #[test]
    fn a_hot_hot_member_shows_the_members_and_where_each_link_runs() {
        let v = json!({
            "role": "bridge", "id": "bridge-1", "ready": true, "converged": true,
            "ha_state": "active", "broker": "amqp://x",
            "ha": {"enabled": true, "mode": "hot-hot", "state": "active",
                   "reason": "member: running the links this instance owns",
                   "members_exchange": "drawbridge.bridge.members.a",
                   "members": [
                       {"id": "bridge-1", "state": "alive", "links": 1, "self": true},
                       {"id": "bridge-2", "state": "alive", "links": 1, "self": false},
                       {"id": "bridge-3", "state": "joining", "links": 0, "self": false}],
                   "owners": {"drawbridge.peers.b": "bridge-1", "drawbridge.peers.c": "bridge-2"}},
            "wanted_links": ["drawbridge.peers.b", "drawbridge.peers.c"],
            "links": [{"queue": "drawbridge.peers.b", "peer": "O=Bank B, L=Paris, C=FR",
                       "state": "up", "target": "127.0.0.1:5671", "reason": "connected",
                       "forwarded": 3, "dead_lettered": 0, "in_flight": 0, "since_unix_ms": 0}]
        });
        let out = render(&v, 1000);
        assert!(
            out.contains("  hot-hot   drawbridge.bridge.members.a (member: running"),
            "{out}"
        );
        assert!(
            out.contains("  member    bridge-1: alive, 1 links, this instance\n"),
            "{out}"
        );
        assert!(
            out.contains("  member    bridge-3: joining, 0 links\n"),
            "{out}"
        );
        assert!(!out.contains("  lock "), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        let header = lines.iter().position(|l| l.starts_with("QUEUE  ")).unwrap();
        assert!(lines[header + 1].starts_with("drawbridge.peers.b"), "{out}");
        let runs_on = lines.iter().position(|l| l.contains("RUNS ON")).unwrap();
        assert!(
            lines[runs_on + 1].starts_with("drawbridge.peers.c")
                && lines[runs_on + 1].ends_with("bridge-2"),
            "{out}"
        );
        assert_eq!(
            lines.len(),
            runs_on + 2,
            "only the link run elsewhere: {out}"
        );
    }

    #[test]
    fn a_standby_says_where_its_links_run() {
        let v = json!({
            "role": "bridge", "id": "bridge-a2", "ready": true, "converged": true,
            "ha_state": "standby", "broker": "amqp://127.0.0.1:5672/%2f",
            "ha": {"enabled": true, "reason": "another bridge holds the lock",
                   "lock_queue": "drawbridge.bridge.lock.a", "hold_off_ms_left": 42_000},
            "wanted_links": ["drawbridge.peers.b"], "links": []
        });
        let out = render(&v, 0);
        assert!(
            out.starts_with("bridge bridge-a2: standby (ready)\n"),
            "{out}"
        );
        assert!(out.contains("holding off 42s"), "{out}");
        assert!(
            out.contains("1 wanted; they run on the active bridge"),
            "{out}"
        );
    }

    #[test]
    fn a_tunnel_float_and_its_bridge_show_the_tunnel() {
        let float = serde_json::json!({
            "role": "float", "ready": true, "listen": "10.0.0.2:5671", "mode": "tunnel",
            "broker": null, "identities": [], "connections": [],
            "tunnel": {"active": true, "epoch": 1765000000000u64, "signatures": 4,
                "signature_failures": 1, "publishes_waiting": 0, "tunnels": [
                {"bridge": "O=Bank B, L=Paris, C=FR", "bridge_id": "bridge-b", "address": "10.0.0.1:40000",
                 "active": true, "up_seconds": 90}]},
        });
        let out = render(&float, 0);
        assert!(out.contains("  tunnel    active (epoch 1765000000000); 4 handshakes signed by the bridge, 1 failed"), "{out}");
        assert!(out.contains("  bridge    bridge-b (O=Bank B, L=Paris, C=FR) from 10.0.0.1:40000, active, up 1m30s"), "{out}");
        assert!(!out.contains("broker"), "{out}");
        let bridge = serde_json::json!({
            "role": "bridge", "id": "bridge-b", "ready": true, "ha_state": "standby",
            "broker": "amqp://x", "node_identity": "O=Bank B, L=Paris, C=FR", "links": [],
            "wanted_links": [], "ha": {"enabled": false},
            "tunnels": [
                {"float": "10.0.0.2:7000", "state": "up", "activated_epoch": null, "since_unix_ms": 0},
                {"float": "10.0.0.3:7000", "state": "down", "since_unix_ms": 0, "reason": "connection refused"},
            ],
        });
        let out = render(&bridge, 5_000);
        assert!(
            out.contains("  tunnel    10.0.0.2:7000 up 5s, not activated (standby)"),
            "{out}"
        );
        assert!(
            out.contains("  tunnel    10.0.0.3:7000 DOWN 5s: connection refused"),
            "{out}"
        );
    }

    #[test]
    fn a_float_with_a_stream_inbox_shows_its_window() {
        let mut v = json!({
            "role": "float", "ready": true, "listen": "127.0.0.1:5671", "broker": "amqp://x",
            "accepted": 5, "rejected": 0, "released": 0, "duplicates_suppressed": 2,
            "bytes_in_flight": 0, "connections": [],
            "window": {"mode": "stream", "state": "ready", "last_rebuild_ms": 2000, "rebuilds": 2,
                       "last_error": null,
                       "inboxes": [{"inbox": "a", "read": 10, "duplicates_stored": 1},
                                   {"inbox": "b", "read": 5, "duplicates_stored": 0}]}
        });
        let out = render(&v, 0);
        assert!(
            out.contains("  window    stream, ready (last rebuild 2s); 15 read back, 1 copies stored twice, 2 rebuilds\n"),
            "{out}"
        );
        v["window"]["state"] = json!("rebuilding");
        v["window"]["rebuilding_for_ms"] = json!(3000);
        v["window"]["last_error"] = json!("the marker was unroutable");
        let out = render(&v, 0);
        assert!(
            out.contains("REBUILDING for 3s: links publish nothing yet"),
            "{out}"
        );
        assert!(
            out.contains("last error: the marker was unroutable"),
            "{out}"
        );
    }

    #[test]
    fn a_float_lists_its_peers() {
        let v = json!({
            "role": "float", "ready": false, "listen": "127.0.0.1:5671", "broker": null,
            "identities": [{"legal_name": "O=Bank B, L=Paris, C=FR", "inbox": "drawbridge.inbox"}],
            "accepted": 5, "rejected": 1, "released": 0, "duplicates_suppressed": 2,
            "bytes_in_flight": 0,
            "connections": [{"peer": "O=Bank A, L=London, C=GB", "addr": "127.0.0.1:40000",
                             "cert_serial": "0a1b", "since_unix_ms": 0}]
        });
        let out = render(&v, 61_000);
        assert!(
            out.starts_with("float on 127.0.0.1:5671 (NOT READY)\n"),
            "{out}"
        );
        assert!(out.contains("broker    -"), "{out}");
        assert!(out.contains("5 accepted, 1 rejected"), "{out}");
        assert!(
            !out.contains("window"),
            "a window in memory is not shown: {out}"
        );
        assert!(
            out.contains("O=Bank A, L=London, C=GB  127.0.0.1:40000  1m01s  0a1b"),
            "{out}"
        );
    }
}
