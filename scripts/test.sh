#!/usr/bin/env bash
# Runs Drawbridge's test suites. Usage: scripts/test.sh
#   DRAWBRIDGE_FAULT_SUITE=1 (or CI=true) also runs the slow fault-injection suite
#   (tests/tests/faults.rs, release build, ignored tests, one at a time).
#   DRAWBRIDGE_PACKAGE_TEST=1 (or CI=true) also builds the .deb packages and checks them
#   (tests/tests/packaging.rs).
#   DRAWBRIDGE_FUZZ_SMOKE=1 (or CI=true) also runs each fuzz target briefly (scripts/fuzz.sh),
#   if the nightly toolchain and cargo-fuzz are installed.
#   DRAWBRIDGE_DENY=1 (or CI=true) also checks the dependencies with cargo-deny (deny.toml:
#   bans, licenses, sources; advisories when the RustSec database is at hand), installing
#   cargo-deny if missing (skipped, saying why, when it cannot be installed).
# RabbitMQ nodes are private (started by the tests on free loopback ports); the system
# RabbitMQ service is neither needed nor touched.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/install-deps.sh

failed=()

echo "test.sh: building the daemons and the CLI (debug)"
cargo build --workspace --bins

echo "test.sh: cargo test --workspace (debug)"
if ! cargo test --workspace --no-fail-fast -- --test-threads=4; then
    failed+=("workspace tests")
fi

if [[ "${DRAWBRIDGE_FAULT_SUITE:-}" == "1" || "${CI:-}" == "true" ]]; then
    if [[ -f tests/tests/faults.rs ]]; then
        echo "test.sh: fault suite (release, --ignored, one thread)"
        # The suite runs the daemons' release binaries: build them from this tree first
        # (a stale binary from an earlier build would be tested otherwise).
        cargo build --release -p drawbridge-bridge -p drawbridge-float
        if ! cargo test --release -p drawbridge-testkit --test faults -- --ignored --test-threads=1 --nocapture; then
            failed+=("fault suite")
        fi
    else
        echo "test.sh: tests/tests/faults.rs not present, fault suite skipped"
    fi
fi

# Debian packages (docs/operations.md, "Packages"): scripts/package.sh builds them (release
# binaries, cargo-deb installed if missing) and the test unpacks them into a scratch root and
# checks them against the units. In CI (or with DRAWBRIDGE_PACKAGE_TEST=1).
if [[ "${DRAWBRIDGE_PACKAGE_TEST:-}" == "1" || "${CI:-}" == "true" ]]; then
    echo "test.sh: Debian packages (scripts/package.sh, unpacked with dpkg -x and checked)"
    if ! cargo test -p drawbridge-testkit --test packaging -- --ignored; then
        failed+=("packaging")
    fi
fi

# Fuzzing smoke run (docs/security.md, "Fuzzing"): each fuzz target for a short time, in CI
# (or with DRAWBRIDGE_FUZZ_SMOKE=1). Needs the nightly toolchain and cargo-fuzz; skipped
# (saying why) when either is missing. DRAWBRIDGE_FUZZ_SECONDS sets the time per target.
if [[ "${DRAWBRIDGE_FUZZ_SMOKE:-}" == "1" || "${CI:-}" == "true" ]]; then
    if ! cargo +nightly --version >/dev/null 2>&1; then
        echo "test.sh: fuzz smoke run skipped: no nightly toolchain"
    elif ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        echo "test.sh: fuzz smoke run skipped: cargo-fuzz is not installed (cargo install cargo-fuzz)"
    else
        echo "test.sh: fuzz smoke run (${DRAWBRIDGE_FUZZ_SECONDS:-20} s per target)"
        if ! ./scripts/fuzz.sh "${DRAWBRIDGE_FUZZ_SECONDS:-20}"; then
            failed+=("fuzz smoke run")
        fi
    fi
fi

# Supply chain (docs/security.md, "Supply chain"): cargo-deny against deny.toml. Advisories
# need the RustSec database, fetched from the network: checked only when a copy is present
# (~/.cargo/advisory-dbs), without fetching; otherwise skipped with a message.
if [[ "${DRAWBRIDGE_DENY:-}" == "1" || "${CI:-}" == "true" ]]; then
    if ! cargo deny --version >/dev/null 2>&1; then
        echo "test.sh: installing cargo-deny (cargo install cargo-deny --locked)"
        cargo install cargo-deny --locked --quiet || true
    fi
    if ! cargo deny --version >/dev/null 2>&1; then
        echo "test.sh: cargo-deny check skipped: cargo-deny is not installed and could not be"
    else
        checks=(bans licenses sources)
        if compgen -G "${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/*" >/dev/null; then
            checks+=(advisories)
        else
            echo "test.sh: cargo-deny: advisories skipped: no RustSec database at hand (offline)"
        fi
        # cargo-deny reads `cargo metadata` of every platform: fetch those crates first
        # (crates.io), then check without network.
        cargo fetch --locked --quiet || true
        echo "test.sh: cargo deny check ${checks[*]}"
        if ! cargo deny --offline check "${checks[@]}"; then
            failed+=("cargo deny")
        fi
    fi
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "test.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "test.sh: all suites passed"
