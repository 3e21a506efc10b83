#!/usr/bin/env bash
# The multi-host topology on one machine, for trying it: a 3-node JetStream cluster, PostgreSQL, two Driver
# workers, one Theia worker, one Saturn worker, two gateways and two compositors, each its own process with
# its own log. What runs where is what a studio would spread over hosts (README, "Many hosts").
#
#   scripts/topology.sh [start]   build nimmer (release), start everything, wait until both gateways answer
#   scripts/topology.sh status    the processes and their pids
#   scripts/topology.sh stop      stop everything (SIGTERM, then SIGKILL)
#
# State, logs and pids live in $NIMMER_TOPOLOGY (default .topology/ in the checkout); `stop` keeps them.
# NIMMER_BIN=path runs that nimmer binary instead of building the release one.
# Ports: NATS 4222-4224 (cluster 6222-6224, monitoring 8222-8224), PostgreSQL 5433, gateways 8080 and 8081.
# Idempotent: `start` leaves running processes alone and starts the missing ones.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${NIMMER_TOPOLOGY:-$ROOT/.topology}
mkdir -p "$DIR/logs" "$DIR/pids"
NATS_URLS=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
PG_PORT=5433
PG_URL=postgres://nimmer@127.0.0.1:$PG_PORT/nimmer

running() { [ -f "$DIR/pids/$1" ] && kill -0 "$(cat "$DIR/pids/$1")" 2>/dev/null; }

# Starts `$1` (a name) as `${@:2}` unless it runs; output to logs/<name>.log.
launch() {
  local name=$1
  shift
  if running "$name"; then
    echo "   $name already running (pid $(cat "$DIR/pids/$name"))"
    return
  fi
  "$@" >>"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$DIR/pids/$name"
  echo "   $name: pid $!, log $DIR/logs/$name.log"
}

# Waits up to $2 seconds for `$1` (a command) to succeed.
wait_for() {
  local what=$1 secs=$2
  for _ in $(seq 1 $((secs * 5))); do
    if eval "$what" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "error: timed out waiting for: $what (logs in $DIR/logs)" >&2
  return 1
}

stop() {
  for f in "$DIR"/pids/*; do
    [ -e "$f" ] || continue
    local name pid
    name=$(basename "$f")
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      echo "   stopped $name ($pid)"
    fi
    rm -f "$f"
  done
}

status() {
  for f in "$DIR"/pids/*; do
    [ -e "$f" ] || continue
    local name
    name=$(basename "$f")
    if running "$name"; then echo "   $name: running (pid $(cat "$f"))"; else echo "   $name: stopped"; fi
  done
}

case "${1:-start}" in
  stop) stop; exit 0 ;;
  status) status; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac

# --- tools: nats-server and PostgreSQL (as scripts/test.sh installs them), the nimmer binary
. scripts/tools.sh
NATS=$NATS_SERVER
if [ -n "${NIMMER_BIN:-}" ]; then
  NIMMER=$NIMMER_BIN
else
  echo "== building nimmer (release)"
  cargo build --release --locked -p nimmer
  NIMMER=$ROOT/target/release/nimmer
fi

# --- configuration: the repository's, every tier through NATS workers, every stream on 3 replicas
CFG=$DIR/config
mkdir -p "$CFG"
cp config/tiers.toml config/budgets.toml config/classifiers.toml config/transport.toml "$CFG/"
python3 - "$CFG" "$PG_URL" <<'EOF'
import re, sys
cfg, pg = sys.argv[1], sys.argv[2]
t = open(f"{cfg}/tiers.toml").read()
for tier in ("driver", "theia", "saturn"):
    t = t.replace(f"[tiers.{tier}]\n", f"[tiers.{tier}]\nvia = \"nats\"\n", 1)
open(f"{cfg}/tiers.toml", "w").write(t)
tr = open(f"{cfg}/transport.toml").read()
tr = re.sub(r"^url = .*$", f'url = "{pg}"', tr, count=1, flags=re.M)
tr = re.sub(r"^(results|canon|players|factions|feeds|dead_letter) = 1$", r"\1 = 3", tr, flags=re.M)
open(f"{cfg}/transport.toml", "w").write(tr)
EOF
# The adapters directory is relative to the config directory.
ln -sfn "$ROOT/loras" "$DIR/loras"
export NIMMER_CONFIG=$CFG

echo "== NATS: 3 nodes, one JetStream cluster"
ROUTES=nats-route://127.0.0.1:6222,nats-route://127.0.0.1:6223,nats-route://127.0.0.1:6224
for i in 0 1 2; do
  launch "nats-n$i" "$NATS" -a 127.0.0.1 -p $((4222 + i)) -js -sd "$DIR/nats-n$i" --server_name "n$i" \
    --cluster_name nimmer --cluster "nats://127.0.0.1:$((6222 + i))" --routes "$ROUTES" -m $((8222 + i))
done
wait_for "curl -sf http://127.0.0.1:8222/jsz | grep -q '\"leader\": \"n'" 30

echo "== PostgreSQL on port $PG_PORT"
AS=()
if [ "$(id -u)" = 0 ]; then AS=(setpriv --reuid=postgres --regid=postgres --init-groups --); fi
if [ ! -d "$DIR/pg/data" ]; then
  mkdir -p "$DIR/pg"
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$DIR/pg"; fi
  "${AS[@]}" "$PG_BIN/initdb" -A trust -U nimmer -E UTF8 --no-locale -D "$DIR/pg/data" >"$DIR/logs/initdb.log"
fi
launch postgres "${AS[@]}" "$PG_BIN/postgres" -D "$DIR/pg/data" -h 127.0.0.1 -p $PG_PORT -k "$DIR/pg"
wait_for "$PG_BIN/psql -h 127.0.0.1 -p $PG_PORT -U nimmer -d postgres -qtc 'SELECT 1'" 30
"$PG_BIN/psql" -h 127.0.0.1 -p $PG_PORT -U nimmer -d postgres -qtc "CREATE DATABASE nimmer" >/dev/null 2>&1 || true

echo "== tier workers (the first start fetches the models)"
CORES=$(nproc)
# The two Driver workers on their own cores where there are two.
launch driver-w1 taskset -c 0 "$NIMMER" tier --tier driver --nats "$NATS_URLS" --worker w1
launch driver-w2 taskset -c $((1 % CORES)) "$NIMMER" tier --tier driver --nats "$NATS_URLS" --worker w2
launch theia-t1 "$NIMMER" tier --tier theia --nats "$NATS_URLS" --worker t1
launch saturn-s1 "$NIMMER" tier --tier saturn --nats "$NATS_URLS" --worker s1

echo "== compositors"
launch compositor-c1 "$NIMMER" compositor --nats "$NATS_URLS" --postgres "$PG_URL"
launch compositor-c2 "$NIMMER" compositor --nats "$NATS_URLS" --postgres "$PG_URL"

echo "== gateways"
launch gateway-a "$NIMMER" serve --nats "$NATS_URLS" --listen 127.0.0.1:8080
launch gateway-b "$NIMMER" serve --nats "$NATS_URLS" --listen 127.0.0.1:8081
for port in 8080 8081; do
  wait_for "curl -sf http://127.0.0.1:$port/readyz" 900
done

cat <<EOF
== ready: gateways on http://127.0.0.1:8080 and http://127.0.0.1:8081, NATS $NATS_URLS
   try:  curl -s localhost:8081/v1/dialog -H 'content-type: application/json' -d '{"uid":"ev1/docks/quay/s1",
           "zone":"docks-1","kind":"dialog","participants":["p1"],"max_tokens":24,"messages":[{"role":"system","content":
           "You are a fisherman in a busy port city."},{"role":"user","content":"What did you catch today?"}]}'
         $NIMMER player --id p1 --nats $NATS_URLS      (its canon, replayed and followed)
   stop: $0 stop
EOF
