#!/usr/bin/env bash
# Same-hour A/B of two builds of the daemons: drawbridge-bench runs old, new, old, new, each
# time with its Shovel and raw-broker paths, so every run has its own yardstick (the machine is
# shared and noisy: compare the ratios, not the absolute figures across runs).
#
# Usage: scripts/bench-ab.sh OLD_BINDIR NEW_BINDIR [drawbridge-bench options...]
#   Each BINDIR holds drawbridge-bridge and drawbridge-float (the bench starts the daemons
#   found next to itself, so the current drawbridge-bench is copied into both).
#   Default options: --quick --messages 20000 --runs 2 --warmup 2000.
# Example (the daemons of the commit before a change against this tree's):
#   git worktree add --detach /tmp/base <rev>
#   (cd /tmp/base && CARGO_TARGET_DIR=/tmp/base-target cargo build --release \
#        -p drawbridge-bridge -p drawbridge-float)
#   cargo build --release -p drawbridge-bridge -p drawbridge-float -p drawbridge-benches
#   scripts/bench-ab.sh /tmp/base-target/release target/release
# Prints, per round, the bench's per-path table and its RATIO line; the full outputs stay in
# BINDIR/ab-*.txt.
set -euo pipefail
old=$(realpath "${1:?OLD_BINDIR}")
new=$(realpath "${2:?NEW_BINDIR}")
shift 2
opts=("$@")
if [[ ${#opts[@]} -eq 0 ]]; then
    opts=(--quick --messages 20000 --runs 2 --warmup 2000)
fi
bench=$(realpath target/release/drawbridge-bench)
[[ -x "$bench" ]] || { echo "build drawbridge-bench first (cargo build --release -p drawbridge-benches)" >&2; exit 1; }
for d in "$old" "$new"; do
    for b in drawbridge-bridge drawbridge-float; do
        [[ -x "$d/$b" ]] || { echo "$d/$b is missing" >&2; exit 1; }
    done
    [[ "$d/drawbridge-bench" -ef "$bench" ]] || cp "$bench" "$d/drawbridge-bench"
done
round=0
for side in old new old new; do
    round=$((round + 1))
    dir=${!side}
    out="$dir/ab-$round-$side.txt"
    echo "== round $round: $side ($dir)"
    "$dir/drawbridge-bench" "${opts[@]}" --dir "$dir/ab-work" --results "$dir/ab-results" >"$out" 2>&1 || {
        echo "the bench failed; see $out" >&2
        tail -20 "$out" >&2
        exit 1
    }
    grep -E '^\|' "$out" | head -20 || true
    grep -E '^(RATIO|RESULT)' "$out"
done
