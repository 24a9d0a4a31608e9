#!/usr/bin/env bash
# README command 1: the end-to-end demo. Installs what is missing (Debian's
# rabbitmq-server, ...), builds the release binaries, and runs `drawbridge demo`:
# two organisations, each with a private RabbitMQ node, a float and a bridge as real
# processes, 10,000 messages each way over mTLS AMQP 1.0. Exits non-zero if anything
# was lost. Extra arguments go to `drawbridge demo` (e.g. --messages 50000).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
echo "==> building release binaries (first build takes a few minutes)"
cargo build --release --bins --quiet
exec ./target/release/drawbridge demo "$@"
