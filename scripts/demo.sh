#!/usr/bin/env bash
# The README's main command: sets everything up on a fresh machine, then runs the embedded-default
# experiment end to end (prune -> select with each method -> recover -> evaluate -> report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
exec .venv/bin/paser pipeline --config "${1:-configs/demo.yaml}"
