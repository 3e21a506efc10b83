#!/usr/bin/env bash
# Cold prefill before and after a change, in one run on one machine.
#
# Builds tier-bench at BASE (default: the commit that introduced the cold-prefill test, before the prefill
# kernels) in a git worktree that shares this checkout's target dir (only the workspace crates rebuild), builds
# it at the working tree, then runs the two binaries alternately ROUNDS times (each run: distinct 512-token
# prompts, 1 and 16 at a time, prefix cache off, median of 3) and prints a table of the medians and ratios.
#
# Usage: benches/prefill-ab.sh [BASE] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-f2ca6e9}
ROUNDS=${2:-3}
ROOT=$PWD
OUT=$ROOT/target/prefill-ab
# Outside the checkout: a worktree below it would also read this checkout's .cargo/config.toml, whose
# rustflags then appear twice, which changes every crate's fingerprint and rebuilds all dependencies.
WT=${TMPDIR:-/tmp}/nimmer-prefill-ab-base
mkdir -p "$OUT"
git worktree remove --force "$WT" 2>/dev/null || rm -rf "$WT"
git worktree add --quiet --detach "$WT" "$BASE"
trap 'git -C "$ROOT" worktree remove --force "$WT" 2>/dev/null || true' EXIT
echo "== building tier-bench at $BASE (before)"
(cd "$WT" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release --quiet -p nimmer-benches --bin tier-bench)
cp target/release/tier-bench "$OUT/before"
echo "== building tier-bench at the working tree (after)"
# Both builds share artifact names (cargo's metadata hash leaves out the workspace path) and cargo judges
# workspace crates by mtime: the worktree's fresh checkout is newer than this tree's sources, so touch them.
git ls-files -z -- '*.rs' | xargs -0 touch
cargo build --release --quiet -p nimmer-benches --bin tier-bench
cp target/release/tier-bench "$OUT/after"
if cmp -s "$OUT/before" "$OUT/after"; then
  echo "error: the two builds are the same binary (is BASE the working tree?)" >&2
  exit 1
fi
: > "$OUT/runs.txt"
for r in $(seq "$ROUNDS"); do
  for v in before after; do
    line=$("$OUT/$v" --prefill-only --prefill-concurrency 1,16 2>/dev/null | grep "at a time")
    echo "round $r $v: $line" | tee -a "$OUT/runs.txt"
  done
done
python3 - "$OUT/runs.txt" "$BASE" "$(git rev-parse --short HEAD)" <<'PY'
import re, statistics, sys
runs, base, head = sys.argv[1], sys.argv[2], sys.argv[3]
figs = {}
for line in open(runs):
    v = line.split()[2].rstrip(":")
    for n, tps in re.findall(r"(\d+) at a time \*\*(\d+) tok/s", line):
        figs.setdefault((v, int(n)), []).append(int(tps))
print(f"\n| prompts at a time | before ({base}) tok/s | after ({head} + working tree) tok/s | after / before |")
print("|---|---|---|---|")
for n in sorted({n for _, n in figs}):
    b, a = figs.get(("before", n), []), figs.get(("after", n), [])
    if b and a:
        mb, ma = statistics.median(b), statistics.median(a)
        print(f"| {n} | {mb:.0f} ({', '.join(map(str, b))}) | {ma:.0f} ({', '.join(map(str, a))}) | {ma / mb:.2f}x |")
PY
