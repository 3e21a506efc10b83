#!/usr/bin/env bash
# Builds nimmer (and the benches) with candle's `cuda` feature on a machine WITHOUT a CUDA toolkit, from the
# CUDA 13.0 packages NVIDIA publishes on PyPI (nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC), unpacked into
# .tools/cuda-13.0. A machine with a system CUDA toolkit and driver needs none of this:
#   CUDA_COMPUTE_CAP=90 cargo build --release --features cuda -p nimmer
#
# The binaries link the CUDA libraries dynamically (candle's cudarc uses `dynamic-linking`), so they run where a
# driver >= 580 (CUDA 13.0) and the CUDA 13 runtime libraries are installed (a CUDA 13 toolkit, or the same PyPI
# packages: point LD_LIBRARY_PATH at their lib folders). libcuda.so itself comes with the driver: here, at link
# time only, a stub generated from cudarc's driver bindings stands in for it (NVIDIA ships no stub on PyPI).
#
# Usage: scripts/cuda-build.sh [COMPUTE_CAP]   (default 90: H100/H200; 80 A100, 89 L4/4090, 120 Blackwell)
# Output: target/cuda/release/{nimmer,tier-bench,lora-bench}
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${1:-${CUDA_COMPUTE_CAP:-90}}
ROOT=$PWD/.tools/cuda-13.0
WHEELS=$PWD/.tools/cuda-wheels
TK=$ROOT/nvidia/cu13

# Pinned to CUDA 13.0 so the PTX that candle's kernels are compiled to loads on every driver from 580 on.
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.5.25 nvidia-cublas==13.10.0.20)

if [ ! -x "$TK/bin/nvcc" ] || [ ! -e "$TK/lib/stubs/libcuda.so" ]; then
  echo "== fetching the CUDA 13.0 toolchain from PyPI into $ROOT"
  mkdir -p "$WHEELS" "$ROOT"
  PY=$(command -v python3 || command -v python)
  for p in "${PKGS[@]}"; do
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 \
      --platform manylinux_2_5_x86_64 -d "$WHEELS" "$p"
  done
  for w in "$WHEELS"/*.whl; do
    (cd "$ROOT" && python3 -m zipfile -e "$w" .)
  done
  chmod +x "$TK"/bin/* "$TK"/nvvm/bin/* 2>/dev/null || true
  # The linker wants unversioned names.
  (cd "$TK/lib" && for f in *.so.*; do ln -sf "$f" "${f%%.so.*}.so"; done)
  # libcuda.so link stub: every driver entry point cudarc declares, as empty functions, soname libcuda.so.1
  # (the real library, from the driver, is what the binary loads at run time).
  CUDARC=$(cargo metadata --format-version 1 --locked --features nimmer-tiers/cuda 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
  mkdir -p "$TK/lib/stubs"
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$(dirname "$CUDARC")/src/driver/sys/mod.rs" | sort -u |
    sed -E 's/pub unsafe fn (.*)/int \1(void) { return 999; }/' >"$TK/lib/stubs/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$TK/lib/stubs/libcuda.c"
fi

export CUDA_HOME=$TK CUDA_PATH=$TK CUDA_COMPUTE_CAP=$CAP
export PATH=$TK/bin:$TK/nvvm/bin:$PATH
export LIBRARY_PATH=$TK/lib:$TK/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="-C target-cpu=x86-64-v3 -L native=$TK/lib -L native=$TK/lib/stubs"
nvcc --version | tail -2
echo "== cargo build --release --features cuda (compute capability $CAP)"
cargo build --release --locked --target-dir target/cuda \
  -p nimmer --features nimmer/cuda -p nimmer-benches --features nimmer-benches/cuda \
  --bin nimmer --bin tier-bench --bin lora-bench
ls -la target/cuda/release/nimmer target/cuda/release/tier-bench target/cuda/release/lora-bench
