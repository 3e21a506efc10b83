# Sourced by scripts/test.sh (from the repository root) after scripts/tools.sh: installs, idempotently, what
# only the tests use, and exports where it is.
# - NIMMER_OPENAI_PY: the official `openai` Python client (PyPI, pinned, with its dependencies) for the
#   OpenAI-compatibility test, installed into .tools/ like nats-server.
OPENAI_VERSION=3.63.0
OPENAI_DIR=.tools/openai-$OPENAI_VERSION
if [ ! -f "$OPENAI_DIR/.installed" ]; then
  echo "== installing the openai Python client $OPENAI_VERSION (PyPI openai) into $OPENAI_DIR"
  PY=$(command -v python3 || command -v python)
  rm -rf "$OPENAI_DIR"
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --target "$OPENAI_DIR" "openai==$OPENAI_VERSION"
  touch "$OPENAI_DIR/.installed"
fi
export NIMMER_OPENAI_PY="$PWD/$OPENAI_DIR"

# Chromium (Debian/Ubuntu package `chromium`) for the ops console's browser test, driven headless over the
# DevTools protocol; CHROMIUM says which binary.
if [ -z "${CHROMIUM:-}" ]; then
  for c in chromium chromium-browser; do
    if command -v "$c" >/dev/null 2>&1; then CHROMIUM=$(command -v "$c"); break; fi
  done
fi
if [ -z "${CHROMIUM:-}" ]; then
  echo "== installing Chromium (apt package chromium)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  CHROMIUM=$(command -v chromium)
fi
export CHROMIUM
