#!/usr/bin/env bash
# Builds target/packages/{fieldhand,fieldhand-controller}_*.deb and *.rpm from a clean
# checkout, installing cargo-deb and cargo-generate-rpm if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm
cargo build --release --locked --bins
# Man pages and shell completions, made from each binary's clap definition (the packages'
# assets name these paths; they are relative to the checkout whatever CARGO_TARGET_DIR is).
bin_dir="${CARGO_TARGET_DIR:-target}/release"
rm -rf target/generated
for b in fieldhand fieldhand-controller fieldhandctl; do
    "$bin_dir/$b" generate --dir target/generated >/dev/null
done
out=target/packages
mkdir -p "$out"
cargo deb --no-build --no-strip -o "$out/"
cargo deb --no-build --no-strip --variant controller -o "$out/"
cargo generate-rpm -o "$out/"
cargo generate-rpm --variant controller -o "$out/"
for f in "$bin_dir/fieldhand" "$bin_dir/fieldhand-controller" "$bin_dir/fieldhandctl"; do
    echo "$(basename "$f"): $(stat -c %s "$f") bytes"
done
ls -l "$out"
