#!/usr/bin/env bash
# Train the main job on whatever this machine has: the real 4-bit Qwen3-0.6B QLoRA on a GPU,
# the tiny offline smoke experiment on CPU. Extra arguments are Hydra overrides.
#   bash scripts/train_default.sh [lora.r=16 ...]
set -euo pipefail
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec python -m lyra.train "$@"
fi
echo "lyra: no GPU found: running the CPU smoke experiment (tiny Qwen3, real 4-bit path)" >&2
exec python -m lyra.train experiment=smoke "$@"
