#!/usr/bin/env bash
# Builds the Debian packages into target/debian/:
#   drawbridge          the operator CLI, its man pages and shell completions
#   drawbridge-bridge   the bridge, its systemd unit, man page, completions, example config, docs
#   drawbridge-float    the float, likewise
# Usage: scripts/package.sh
# Needs cargo-deb (installed with `cargo install cargo-deb --locked` when missing) and dpkg-dev.
# The packages' metadata is in each crate's Cargo.toml ([package.metadata.deb]); what they
# install and why: docs/operations.md, "Packages".
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: installing cargo-deb (cargo install cargo-deb --locked)" >&2
    cargo install cargo-deb --locked --quiet
fi

target_dir=${CARGO_TARGET_DIR:-target}
echo "package.sh: building the release binaries" >&2
cargo build --release --quiet -p drawbridge-cli -p drawbridge-bridge -p drawbridge-float

# Man pages and completions come from the binaries' own clap definitions. The assets' paths
# in the Cargo.toml files point here (relative to the repository, whatever CARGO_TARGET_DIR).
assets=target/package-assets
rm -rf "$assets"
mkdir -p "$assets/man/cli" "$assets/man/daemons" "$assets/completions"
cli="$target_dir/release/drawbridge"
"$cli" man --out "$assets/man/cli" >/dev/null
mv "$assets/man/cli/drawbridge-bridge.1" "$assets/man/cli/drawbridge-float.1" "$assets/man/daemons/"
# -n: no name or time stamp in the gzip header, so the same tree gives the same package.
gzip -9n "$assets"/man/cli/*.1 "$assets"/man/daemons/*.1
for bin in drawbridge drawbridge-bridge drawbridge-float; do
    "$cli" completions bash --bin "$bin" >"$assets/completions/$bin.bash"
    "$cli" completions zsh --bin "$bin" >"$assets/completions/_$bin"
    "$cli" completions fish --bin "$bin" >"$assets/completions/$bin.fish"
done

mkdir -p "$target_dir/debian"
for crate in drawbridge-cli drawbridge-bridge drawbridge-float; do
    cargo deb --no-build --strip --quiet -p "$crate" --output "$target_dir/debian/" >&2
done
ls -1 "$target_dir"/debian/*.deb
