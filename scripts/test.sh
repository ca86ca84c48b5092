#!/usr/bin/env bash
# The README's test command: sets everything up on a fresh machine, then runs the whole suite
# (fast unit tests on tiny models plus a few small end-to-end runs of the real embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export PASER_CACHE="${PASER_CACHE:-$HOME/.cache/paser}"
exec .venv/bin/python -m pytest -q "$@"
