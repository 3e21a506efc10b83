#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the peer the persona bench compares against) into .tools/, idempotently,
# from the llama.cpp sources vendored in the llama-cpp-python sdist on PyPI (registries are all a CI or bench
# machine may reach), then execs it with the given arguments, or prints its path with `--path`.
#
#   scripts/llama-server.sh --path
#   scripts/llama-server.sh -m ~/.cache/nimmer/models/smollm2-135m-instruct-q4_1/model.gguf \
#       --parallel 16 --cont-batching -t 2 -c 32768 --port 18080
#
# GGML_NATIVE=ON tunes it for this CPU (as a user building it here would); about 8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
DIR=$PWD/.tools/llama-cpp-python-$VERSION
BIN=$DIR/build/bin/llama-server
if [ ! -x "$BIN" ]; then
  PY=$(command -v python3 || command -v python)
  mkdir -p "$DIR"
  if [ ! -d "$DIR/src/vendor/llama.cpp" ]; then
    echo "== fetching llama-cpp-python $VERSION (sdist, for its vendored llama.cpp)" >&2
    # Only this package from source (its build backend and cmake may come as wheels, for pip's metadata step).
    if ! ls "$DIR"/dl/*.tar.gz >/dev/null 2>&1; then
      PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python -d "$DIR/dl" "llama-cpp-python==$VERSION"
    fi
    rm -rf "$DIR/src" && mkdir -p "$DIR/src"
    tar -xzf "$DIR"/dl/*.tar.gz -C "$DIR/src" --strip-components=1
  fi
  if ! command -v cmake >/dev/null 2>&1; then
    echo "== installing cmake (PyPI) into $DIR/cmake" >&2
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --disable-pip-version-check --target "$DIR/cmake" cmake
    export PATH="$DIR/cmake/bin:$PATH"
    export PYTHONPATH="$DIR/cmake${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "== building llama-server (cmake, Release, GGML_NATIVE=ON)" >&2
  cmake -S "$DIR/src/vendor/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$DIR/build" --target llama-server -j "$(nproc)" >&2
fi
if [ "${1:-}" = "--path" ]; then
  echo "$BIN"
  exit 0
fi
exec "$BIN" "$@"
