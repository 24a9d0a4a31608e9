#!/usr/bin/env bash
# Start a private RabbitMQ node (loopback ports, the stream plugin on), run the probe against
# it, stop the node. Arguments go to the probe (--messages, --size, --window).
#
#   probes/stream-dedup/run.sh --messages 100000 --size 1024
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
cargo build --release --quiet
dir=$(mktemp -d /tmp/stream-dedup-probe.XXXXXX)
home="$dir/home"
mkdir -p "$dir/mnesia" "$dir/log" "$home"
head -c 20 /dev/urandom | base64 | tr -dc A-Z | head -c 20 >"$home/.erlang.cookie"
chmod 400 "$home/.erlang.cookie"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
amqp=$(port); stream=$(port); dist=$(port)
name="sdp-$$@localhost"
cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$amqp
stream.listeners.tcp.1 = 127.0.0.1:$stream
stream.advertised_host = 127.0.0.1
stream.advertised_port = $stream
loopback_users = none
log.console = false
CONF
echo "[rabbitmq_stream]." >"$dir/enabled_plugins"
: >"$dir/rabbitmq-env.conf"
export HOME="$home" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" ERL_EPMD_ADDRESS=127.0.0.1 \
    LC_ALL=C.UTF-8 RABBITMQ_NODENAME="$name" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$amqp" RABBITMQ_DIST_PORT="$dist" RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/beam.pid"
/usr/lib/rabbitmq/bin/rabbitmq-server </dev/null >"$dir/console.log" 2>&1 &
cleanup() {
    /usr/lib/rabbitmq/bin/rabbitmqctl -n "$name" stop >/dev/null 2>&1 || true
    if [ -z "${KEEP:-}" ]; then rm -rf "$dir"; else echo "kept $dir"; fi
}
trap cleanup EXIT
/usr/lib/rabbitmq/bin/rabbitmqctl -n "$name" wait --timeout 120 "$dir/beam.pid" >/dev/null
/usr/lib/rabbitmq/bin/rabbitmqctl -n "$name" await_startup >/dev/null
echo "RabbitMQ $(/usr/lib/rabbitmq/bin/rabbitmqctl -n "$name" version) on 127.0.0.1:$amqp (AMQP 0.9.1), :$stream (stream protocol)"
./target/release/stream-dedup-probe --amqp-uri "amqp://guest:guest@127.0.0.1:$amqp/%2f" \
    --stream-port "$stream" "$@"
