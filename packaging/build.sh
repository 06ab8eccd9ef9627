#!/usr/bin/env bash
# Builds target/packages/{fieldhand,fieldhand-controller}_*.deb and *.rpm from a clean
# checkout, installing cargo-deb and cargo-generate-rpm if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm
cargo build --release --locked --bins
out=target/packages
mkdir -p "$out"
cargo deb --no-build --no-strip -o "$out/"
cargo deb --no-build --no-strip --variant controller -o "$out/"
cargo generate-rpm -o "$out/"
cargo generate-rpm --variant controller -o "$out/"
for f in target/release/fieldhand target/release/fieldhand-controller; do
    echo "$(basename "$f"): $(stat -c %s "$f") bytes"
done
ls -l "$out"
