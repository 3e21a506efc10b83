#!/usr/bin/env bash
# Checks a CUDA build on a GPU machine: the Driver and Theia on device = "cuda" against the same decoder on the
# CPU (greedy text, same prompt), then tier-bench on CUDA. Run from the repository root after
# scripts/cuda-build.sh (or with BIN pointing at a folder holding `nimmer` and `tier-bench` built that way).
#
#   scripts/cuda-check.sh [OUT_DIR]        # BIN=target/cuda/release by default; models in NIMMER_CACHE
# (BIN must hold nimmer, tier-bench and lora-bench)
#
# Writes OUT_DIR/cuda-check.log and OUT_DIR/RESULTS-cuda.md (tier-bench and lora-bench blocks for
# benches/RESULTS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-target/cuda-check}
BIN=${BIN:-target/cuda/release}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/cuda-check.log
exec > >(tee -a "$LOG") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# Two config folders from config/: the LLM tiers on candle's decoder on the CPU, and on CUDA.
CFG=$(mktemp -d)
for dev in cpu cuda; do
  mkdir -p "$CFG/$dev"
  cp config/*.toml "$CFG/$dev/"
  python3 - "$CFG/$dev/tiers.toml" "$dev" <<'EOF'
import re, sys
path, dev = sys.argv[1], sys.argv[2]
s = open(path).read()
for tier in ("driver", "theia"):
    s = re.sub(r'(\[tiers\.%s\][^\[]*?)device = "cpu"' % tier,
               r'\1device = "%s"\nbackend = "candle"' % dev, s, flags=re.S)
open(path, "w").write(s)
EOF
done

SYSTEM="You are a helpful assistant."
SAILOR="You are Brannoch, a dockworker at the harbor in the city of Nimmer. Stay in character and answer the player."
fails=0
n=0
compare() { # tier system user [generate flags...]
  local tier=$1 sys=$2 q=$3
  shift 3
  a=$("$BIN/nimmer" --config "$CFG/cpu" generate --tier "$tier" --system "$sys" --user "$q" --max-tokens 48 "$@" 2>/dev/null)
  b=$("$BIN/nimmer" --config "$CFG/cuda" generate --tier "$tier" --system "$sys" --user "$q" --max-tokens 48 "$@" 2>"$OUT_DIR/err.txt")
  if [ "$a" == "$b" ]; then verdict=same; else verdict=DIFFERENT; fi
  printf '== %s %s | %s | %s\n   cpu : %s\n   cuda: %s\n' "$tier" "$*" "$q" "$verdict" "$a" "$b"
  tail -2 "$OUT_DIR/err.txt"
  n=$((n + 1))
  [ "$verdict" == same ] || fails=$((fails + 1))
}
for tier in driver theia; do
  compare "$tier" "$SYSTEM" "What is the capital of France?"
  compare "$tier" "$SYSTEM" "Write one sentence about a lighthouse keeper."
done
compare driver "$SAILOR" "Where can I buy a map of the city?" --adapter loras/adapters/sailor
compare driver "$SAILOR" "Where can I buy a map of the city?" --adapter loras/adapters/terse
echo "generate: $fails of $n differ between the CPU and CUDA"

RES=$OUT_DIR/RESULTS-cuda.md
for tier in driver theia; do
  "$BIN/tier-bench" --config "$CFG/cuda" --tier "$tier" --device cuda \
    --concurrency "${CONCURRENCY:-1,4,16,32,64}" --rounds "${ROUNDS:-2}" --write "$RES" || echo "tier-bench $tier failed"
done
"$BIN/lora-bench" --device cuda --rounds "${ROUNDS:-2}" --write "$RES" || echo "lora-bench failed"
echo "== done"
