#!/usr/bin/env bash
# Install lyra and its test tools into the current Python (3.11+). Safe to re-run.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then
  # No GPU: take the CPU build of torch first; an unpinned torch would pull a multi-GB CUDA build.
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[dev]"
