#!/usr/bin/env bash
# Health watchdog for hosts without systemd: runs a Drawbridge daemon, probes its admin
# port's /healthz, restarts it when it exits or stops answering, with exponential back-off,
# and gives up after too many failures in a window. The daemons' /healthz answers 503 when
# their work loop is wedged, so a hang is caught even while the admin port answers. Under
# systemd use deploy/systemd/ instead. See docs/operations.md.
#
#   scripts/watchdog.sh [options] -- COMMAND [ARGS...]
#   scripts/watchdog.sh --admin 127.0.0.1:9101 -- drawbridge-bridge --config /etc/drawbridge/bridge.toml
#
# Options (each also as an environment variable; flags win). Times are whole seconds.
#   --admin ADDR         WATCHDOG_ADMIN          admin port to probe (http://ADDR/healthz); the
#                        or DRAWBRIDGE_ADMIN     forms `drawbridge status` takes: HOST:PORT, a port
#                        =127.0.0.1:9101         (on 127.0.0.1), http://HOST:PORT
#   --url URL            WATCHDOG_URL            probe this URL instead
#   --interval S         WATCHDOG_INTERVAL=5     time between probes
#   --probe-timeout S    WATCHDOG_PROBE_TIMEOUT=3  curl --max-time of one probe
#   --probe-failures N   WATCHDOG_PROBE_FAILURES=3 consecutive failed probes that mean "hung"
#   --start-grace S      WATCHDOG_START_GRACE=30 failed probes after a (re)start do not count
#                                                for this long (the admin port opens after
#                                                the TLS material is loaded)
#   --backoff-min S      WATCHDOG_BACKOFF_MIN=1  first restart delay; doubles per failure
#   --backoff-max S      WATCHDOG_BACKOFF_MAX=60 cap of the restart delay
#   --max-failures N     WATCHDOG_MAX_FAILURES=5 give up at the N-th failure within ...
#   --window S           WATCHDOG_WINDOW=600     ... this many seconds (10 minutes)
#   --stop-timeout S     WATCHDOG_STOP_TIMEOUT=45 SIGTERM → SIGKILL of a hung daemon, and of
#                                                the daemon when the watchdog is stopped
#                                                (above the daemons' drain grace)
#
# A failure is an exit with a non-zero status or a hung daemon (killed). The back-off
# resets after the daemon ran for a whole window. Exit status: the daemon's own when it
# exits 0 (not restarted, as systemd's Restart=on-failure), 78 at once if it exits 78
# (EX_CONFIG, invalid configuration: restarting cannot fix it), 0 after SIGTERM/SIGINT (forwarded to
# the daemon, which drains), 1 when giving up, 2 on bad usage.

set -u

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

admin=${WATCHDOG_ADMIN:-${DRAWBRIDGE_ADMIN:-127.0.0.1:9101}}
url=${WATCHDOG_URL:-}
interval=${WATCHDOG_INTERVAL:-5}
probe_timeout=${WATCHDOG_PROBE_TIMEOUT:-3}
probe_failures=${WATCHDOG_PROBE_FAILURES:-3}
start_grace=${WATCHDOG_START_GRACE:-30}
backoff_min=${WATCHDOG_BACKOFF_MIN:-1}
backoff_max=${WATCHDOG_BACKOFF_MAX:-60}
max_failures=${WATCHDOG_MAX_FAILURES:-5}
window=${WATCHDOG_WINDOW:-600}
stop_timeout=${WATCHDOG_STOP_TIMEOUT:-45}

while [ $# -gt 0 ]; do
    case $1 in
        --admin) admin=${2:?--admin needs HOST:PORT, a port or http://HOST:PORT}; shift 2 ;;
        --url) url=${2:?--url needs a URL}; shift 2 ;;
        --interval) interval=${2:?}; shift 2 ;;
        --probe-timeout) probe_timeout=${2:?}; shift 2 ;;
        --probe-failures) probe_failures=${2:?}; shift 2 ;;
        --start-grace) start_grace=${2:?}; shift 2 ;;
        --backoff-min) backoff_min=${2:?}; shift 2 ;;
        --backoff-max) backoff_max=${2:?}; shift 2 ;;
        --max-failures) max_failures=${2:?}; shift 2 ;;
        --window) window=${2:?}; shift 2 ;;
        --stop-timeout) stop_timeout=${2:?}; shift 2 ;;
        -h | --help) usage ;;
        --) shift; break ;;
        *) echo "watchdog: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
    esac
done

[ $# -gt 0 ] || { echo "watchdog: no command given" >&2; usage; }
for n in "$interval" "$probe_timeout" "$probe_failures" "$start_grace" "$backoff_min" \
    "$backoff_max" "$max_failures" "$window" "$stop_timeout"; do
    case $n in
        '' | *[!0-9]*) echo "watchdog: '$n' is not a whole number of seconds/count" >&2; exit 2 ;;
    esac
done
if [ -z "$url" ]; then
    # The admin address forms of the CLI (runtime/src/admin.rs, AdminAddress).
    addr=${admin#http://}
    addr=${addr%/}
    case $addr in
        '' | *://* | */* | :* | *:) echo "watchdog: --admin '$admin': expected HOST:PORT, a port or http://HOST:PORT" >&2; exit 2 ;;
        *[!0-9]*) ;;
        *) addr=127.0.0.1:$addr ;;
    esac
    url="http://$addr/healthz"
fi
command -v curl >/dev/null || { echo "watchdog: curl is required" >&2; exit 2; }

log() { printf '%s watchdog: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

child=""
stopping=0

# Sleep in the background and wait for it, so SIGTERM is handled at once, not after sleep.
nap() {
    sleep "$1" &
    wait $! 2>/dev/null
}

# Stop the daemon: SIGTERM (it drains), SIGKILL after --stop-timeout. Returns its status.
stop_child() {
    local waited=0
    [ -n "$child" ] || return 0
    kill -TERM "$child" 2>/dev/null
    while kill -0 "$child" 2>/dev/null && [ "$waited" -lt "$stop_timeout" ]; do
        sleep 1
        waited=$((waited + 1))
    done
    if kill -0 "$child" 2>/dev/null; then
        log "pid $child still running ${stop_timeout}s after SIGTERM; SIGKILL"
        kill -KILL "$child" 2>/dev/null
    fi
    wait "$child" 2>/dev/null
    local rc=$?
    child=""
    return "$rc"
}

on_signal() {
    stopping=1
    log "$1 received; stopping ${child:+pid $child }and exiting"
    stop_child
    exit 0
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT

probe() {
    curl --silent --fail --max-time "$probe_timeout" --noproxy '*' -o /dev/null "$url"
}

failures=()  # times (epoch s) of failures within the window
delay=$backoff_min

while [ "$stopping" -eq 0 ]; do
    "$@" &
    child=$!
    started=$(date +%s)
    log "started pid $child: $*"
    bad=0
    reason=""
    while :; do
        nap "$interval"
        if ! kill -0 "$child" 2>/dev/null; then
            wait "$child" 2>/dev/null
            rc=$?
            child=""
            if [ "$rc" -eq 0 ]; then
                log "daemon exited with status 0; not restarting"
                exit 0
            fi
            if [ "$rc" -eq 78 ]; then
                log "daemon exited with status 78 (invalid configuration); not restarting: fix the configuration"
                exit 78
            fi
            reason="exited with status $rc"
            break
        fi
        if probe; then
            bad=0
            continue
        fi
        now=$(date +%s)
        if [ $((now - started)) -lt "$start_grace" ]; then
            continue
        fi
        bad=$((bad + 1))
        log "health probe $url failed ($bad/$probe_failures)"
        if [ "$bad" -ge "$probe_failures" ]; then
            reason="hung: $bad health probes failed"
            log "pid $child $reason; stopping it"
            stop_child
            break
        fi
    done
    now=$(date +%s)
    # A daemon that ran for a whole window earns a fresh back-off.
    if [ $((now - started)) -ge "$window" ]; then
        delay=$backoff_min
    fi
    kept=()
    for t in "${failures[@]+"${failures[@]}"}"; do
        [ $((now - t)) -lt "$window" ] && kept+=("$t")
    done
    failures=("${kept[@]+"${kept[@]}"}" "$now")
    if [ "${#failures[@]}" -ge "$max_failures" ]; then
        log "GIVING UP: ${#failures[@]} failures within ${window}s (last: $reason); not restarting $1. Look at the daemon's log, fix the cause, then start the watchdog again."
        exit 1
    fi
    log "daemon $reason (failure ${#failures[@]}/$max_failures within ${window}s); restarting in ${delay}s"
    nap "$delay"
    delay=$((delay * 2))
    [ "$delay" -le "$backoff_max" ] || delay=$backoff_max
done
