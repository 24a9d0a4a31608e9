#!/usr/bin/env bash
# Fuzzes the decoders that face untrusted input (docs/security.md, "Fuzzing").
# Usage: scripts/fuzz.sh [seconds-per-target] [target ...]
#   default 60 s per target, every target; FUZZ_RUNS=N runs N executions per target instead.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target starts
# from its checked-in seeds (fuzz/seeds/<target>) and its generated corpus (fuzz/corpus/<target>,
# not in git); a crash is saved under fuzz/artifacts/<target>/ and makes the script exit 1.
# Prints the executions and executions per second of each target (libFuzzer's final stats).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds="${1:-60}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    # float_message, float_frames and bridge_frames fuzz the frame guard and the fe2o3 path
    # the daemons ran before their own engine (issue 23): kept to replay what they found, run
    # by name, not by default.
    targets=(control_decode tunnel_decode mapping_round_trip mapping_wire_in amqp_decode amqp_connection legal_name legal_name_der)
fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "fuzz.sh: seconds per target must be a whole number, got '$seconds'" >&2
    exit 2
fi

# Release build with debug assertions and overflow checks; no sanitizer (the code under test
# is safe Rust, so AddressSanitizer finds nothing more and halves the speed). Stack overflows
# and panics are crashes either way.
build_flags=(--sanitizer none --debug-assertions)

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: no nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
fi

echo "fuzz.sh: building the fuzz targets"
cargo +nightly fuzz build "${build_flags[@]}"

max_len() {
    case "$1" in
        legal_name) echo 1024 ;;
        float_message | mapping_wire_in) echo 16384 ;;
        float_frames) echo 32768 ;;
        amqp_connection) echo 32768 ;;
        *) echo 4096 ;;
    esac
}

mkdir -p target/fuzz-logs
summary=()
crashed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    limit=(-max_total_time="$seconds")
    if [[ -n "${FUZZ_RUNS:-}" ]]; then
        limit=(-runs="$FUZZ_RUNS")
    fi
    log="target/fuzz-logs/$t.log"
    if [[ -n "${FUZZ_RUNS:-}" ]]; then what="$FUZZ_RUNS runs"; else what="$seconds s"; fi
    echo "fuzz.sh: $t ($what), log in fuzz/$log"
    set +e
    cargo +nightly fuzz run "${build_flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
        "${limit[@]}" -max_len="$(max_len "$t")" -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    line="$(printf '%-16s %12s execs %8s exec/s  cov %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}")"
    if [[ $rc -ne 0 ]]; then
        line+="  CRASH (exit $rc)"
        crashed+=("$t")
        echo "fuzz.sh: $t failed; the end of its log:" >&2
        tail -40 "$log" >&2
    fi
    echo "fuzz.sh: $line"
    summary+=("$line")
done

echo
echo "fuzz.sh: summary"
printf '  %s\n' "${summary[@]}"
if [[ ${#crashed[@]} -gt 0 ]]; then
    echo "fuzz.sh: CRASHED: ${crashed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: no crash"
