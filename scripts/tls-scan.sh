#!/usr/bin/env bash
# Scan a running float's TLS listener with Debian's testssl.sh and fail on any weak protocol,
# suite or vulnerability (severity MEDIUM or worse).
#
#   scripts/tls-scan.sh                 # starts its own float (dev PKI, loopback) and scans it
#   scripts/tls-scan.sh 127.0.0.1:5671  # scans a float that is already running
#   ALLOW_TLS12=1 scripts/tls-scan.sh   # the float started here also offers TLS 1.2
#
# The float needs no broker for this: the TLS handshake comes first. testssl.sh has no client
# certificate, so it sees what any stranger sees: protocols, suites, key exchange groups,
# the certificate, and the handshake refused at the client-certificate stage.
# The summary goes to stdout; the full JSON to target/tls-scan/findings.json.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v testssl >/dev/null && ! command -v testssl.sh >/dev/null; then
    echo "==> installing testssl.sh (Debian)"
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q testssl.sh >/dev/null; else sudo apt-get install -y -q testssl.sh >/dev/null; fi
fi
TESTSSL=$(command -v testssl || command -v testssl.sh)

out=target/tls-scan
rm -rf "$out"
mkdir -p "$out"
target=${1:-}
float_pid=
cleanup() { [ -n "$float_pid" ] && kill "$float_pid" 2>/dev/null || true; }
trap cleanup EXIT

if [ -z "$target" ]; then
    echo "==> building the float and the CLI"
    cargo build --release --quiet -p drawbridge-float -p drawbridge-cli
    ./target/release/drawbridge certs init --dir "$out/pki" --name "O=Bank A, L=London, C=GB" >/dev/null
    tls12=false
    if [ -n "${ALLOW_TLS12:-}" ]; then tls12=true; fi
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$out/float.toml" <<EOF
[float]
listen = "127.0.0.1:$port"
tls_cert = "$out/pki/bank-a-london-gb/tls.crt"
tls_key = "$out/pki/bank-a-london-gb/tls.key"
trust_roots = "$out/pki/root/ca.crt"
allow_tls12 = $tls12

[broker]
# Nothing listens here: the scan only needs the TLS listener.
uris = ["amqp://guest:guest@127.0.0.1:1/%2f"]
EOF
    DRAWBRIDGE_FLOAT_CONFIG="$out/float.toml" ./target/release/drawbridge-float >"$out/float.log" 2>&1 &
    float_pid=$!
    for i in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        if ! kill -0 "$float_pid" 2>/dev/null || [ "$i" = 50 ]; then
            echo "the float did not start:" >&2
            cat "$out/float.log" >&2
            exit 2
        fi
        sleep 0.2
    done
    target="127.0.0.1:$port"
fi

echo "==> testssl.sh against $target"
# -p protocols, -s cipher categories, -P server preference, -f forward secrecy, -U
# vulnerabilities; --ip one avoids DNS; findings of MEDIUM and worse fail the scan.
"$TESTSSL" --quiet --color 0 --warnings off --ip one -p -s -P -f -U \
    --jsonfile "$out/findings.json" "$target" >"$out/report.txt" 2>&1 || true

python3 - "$out/findings.json" <<'PY'
import json, sys
findings = json.load(open(sys.argv[1]))
by_id = {f["id"]: f for f in findings}
def show(key):
    f = by_id.get(key)
    return f["finding"] if f else "n/a"
print("  protocols: " + ", ".join(f"{k}={show(k)}" for k in ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"]))
for key in ["cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_OBSOLETED", "cipherlist_STRONG_NOFS", "cipherlist_STRONG_FS", "FS", "FS_ECDHE_curves"]:
    if key in by_id:
        print(f"  {key}: {show(key)}")
bad = [f for f in findings if f.get("severity") in ("MEDIUM", "HIGH", "CRITICAL")]
for f in bad:
    print(f"  WEAK {f['severity']}: {f['id']}: {f['finding']}")
scan_errors = [f for f in findings if f.get("id") in ("scanProblem", "engine_problem")]
for f in scan_errors:
    print(f"  SCAN PROBLEM: {f['finding']}")
if not any(k in by_id for k in ("TLS1_2", "TLS1_3")):
    print("  the scan found no protocol at all: see target/tls-scan/report.txt")
    sys.exit(2)
if bad:
    sys.exit(1)
print("RESULT tls-scan: no weak protocol, suite or vulnerability")
PY
