#!/usr/bin/env bash
# Install the Debian packages Drawbridge's tests need (idempotent, quiet when all present).
#   rabbitmq-server      private broker nodes for the tests (the system service is NOT started/stopped)
#   python3-qpid-proton  Qpid Proton peers (tests/proton/*.py), run with /usr/bin/python3
#   python3-pika, python3-protobuf  the Python node example (examples/node-python/), run with /usr/bin/python3
#   openssl              test certificates for the Proton self-test
#   iproute2             `ss` for diagnostics; `ip netns` for the network-namespace world (tests/src/netns.rs)
#   nftables             `nft`: that world's firewall (the dmz may not connect to the inside)
#   dpkg-dev             dpkg-shlibdeps, for the .deb packages' dependencies (scripts/package.sh)
#   curl, shellcheck     scripts/watchdog.sh probes with curl; its test checks it with shellcheck
set -euo pipefail

PACKAGES=(rabbitmq-server python3-qpid-proton python3-pika python3-protobuf openssl iproute2 nftables curl shellcheck dpkg-dev)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-deps.sh: missing packages (${missing[*]}) and not root, no sudo" >&2
    exit 1
fi

echo "install-deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
# Installing rabbitmq-server would normally start the system service; the tests never use it
# (they start private nodes on free ports), so keep it from being started by the install with a
# temporary policy-rc.d (only if none exists; removed again on exit).
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    trap '"${SUDO[@]}" rm -f "$policy"' EXIT
fi
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
