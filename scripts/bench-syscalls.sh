#!/usr/bin/env bash
# System calls of the bridge and the float over one quick drawbridge-bench run.
# Usage: scripts/bench-syscalls.sh [BINDIR]   (default: target/release; needs linux-perf)
# BINDIR holds drawbridge-bench, drawbridge-bridge and drawbridge-float (the bench starts the
# daemons found next to itself). Prints the summed counts per daemon; the raw summaries are
# left in BINDIR/{bridge,float}.trace.
set -euo pipefail
v=$(realpath "${1:-target/release}")
"$v/drawbridge-bench" --quick --messages 30000 --runs 1 --warmup 2000 \
    --dir "$v/syscalls-work" --results "$v/syscalls-results" > "$v/syscalls-bench.txt" 2>&1 &
bench=$!
f="" r=""
for _ in $(seq 1 600); do
    f=$(pgrep -f "^$v/drawbridge-float" | head -1 || true)
    r=$(pgrep -f "^$v/drawbridge-bridge" | head -1 || true)
    [[ -n "$f" && -n "$r" ]] && break
    sleep 0.2
done
timeout 900 perf trace -s -p "$f" -o "$v/float.trace" 2>/dev/null &
timeout 900 perf trace -s -p "$r" -o "$v/bridge.trace" 2>/dev/null &
wait "$bench"
sleep 1
pkill -INT -f "perf trace -s -p" || true
sleep 2
for d in float bridge; do
    echo "$d: $(awk '$1~/^(write|writev|sendto|sendmsg|recvfrom|read|futex|epoll_wait)$/{a[$1]+=$2} END{for(k in a) printf "%s=%d ",k,a[k]}' "$v/$d.trace")"
done
tail -1 "$v/syscalls-bench.txt"
