#!/usr/bin/env bash
# One unattended GPU check, from a fresh clone, in under 8 minutes on one GPU; no prompts.
#
#   bash scripts/gpu_check.sh [OUT_JSON]          # default: gpu_check.json in the repo root
#
# On a GPU it runs, each under its own time limit so the whole stays within budget:
#   1. setup: lyra (+ the [bench] peers when pip can reach an index) into the current Python, unless
#      `import lyra` already works; Unsloth if it installs; LLaMA-Factory's venv if it can be built;
#   2. the training benchmark at qwen3_0_6b size (random weights, Qwen3-0.6B's architecture), every
#      peer, in 4-bit NF4 and in bf16 (`--quantization nf4|none`);
#   3. a 30-step 4-bit LoRA training of that full architecture through `python -m lyra.train`;
#   4. the generation benchmark (no cache, KV cache, static cache + torch.compile);
#   5. `python -m pytest -m gpu`.
# Without a GPU it says so in one line and runs the same parts on the CPU, cut to seconds (tiny model).
# Everything lands in one JSON: device, package versions, and every figure (or the reason a part failed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lyra-gpu-check.XXXXXX")
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=(-m pip install -q --retries 0 --timeout 10)
START=$(date +%s)
log() { echo "gpu_check [$(( $(date +%s) - START ))s]: $*"; }
part() {  # part NAME SECONDS CMD... : run with a time limit; stdout+stderr to WORK/NAME.log, rc to WORK/NAME.rc
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  if [ "$left" -lt 15 ]; then
    log "$name skipped: the ${BUDGET}s budget is spent"; echo "skipped: budget spent" > "$WORK/$name.log"
    echo 124 > "$WORK/$name.rc"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  echo $? > "$WORK/$name.rc"
  log "$name done (exit $(cat "$WORK/$name.rc"))"
}

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
   || (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  GPU=1
else
  GPU=0
  echo "gpu_check: no CUDA GPU found; running the CPU parts only, cut to seconds (tiny model)"
fi
# seconds for everything (each part is also clamped to what is left): 7.5 min on a GPU; the CPU dry
# run takes ~2 min on an idle 2-core machine and gets slack for a loaded one
BUDGET=${GPU_CHECK_BUDGET:-$([ "$GPU" = 1 ] && echo 450 || echo 900)}

# ---- 1. setup (never prompts; a missing index only skips the optional peers)
# the torch already installed stays: a resolver that wants another one fails instead of downloading it
"$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$WORK/constraints.txt" 2>/dev/null || : > "$WORK/constraints.txt"
if ! "$PY" -c 'import lyra' 2>/dev/null; then
  part setup_lyra 120 "$PY" "${PIP[@]}" -c "$WORK/constraints.txt" -e ".[bench]"
  if ! "$PY" -c 'import lyra' 2>/dev/null; then  # offline: lyra itself needs no download
    part setup_lyra_offline 60 "$PY" "${PIP[@]}" --no-deps --no-build-isolation -e .
  fi
fi
"$PY" -c 'import trl' 2>/dev/null || part setup_trl 45 "$PY" "${PIP[@]}" -c "$WORK/constraints.txt" "trl>=1.16,<1.17"
LF_PY=""
if [ "$GPU" = 1 ]; then
  "$PY" -c 'import unsloth' 2>/dev/null \
    || part setup_unsloth 60 "$PY" "${PIP[@]}" -c "$WORK/constraints.txt" unsloth
  part setup_llamafactory 60 env PYTHON="$PY" bash scripts/bench_llamafactory_venv.sh "$WORK/lf-venv"
  [ -x "$WORK/lf-venv/bin/python" ] && "$WORK/lf-venv/bin/python" -c 'import llamafactory' 2>/dev/null \
    && LF_PY="$WORK/lf-venv/bin/python"
fi
LF_ARGS=()
[ -n "$LF_PY" ] && LF_ARGS=(--llamafactory-python "$LF_PY")

# ---- 2-5. the parts: GPU sizes, or the CPU dry run
if [ "$GPU" = 1 ]; then
  MODEL=qwen3_0_6b
  BENCH=(--model "$MODEL" --steps 8 --batch-size 8 --timeout 100 --json "${LF_ARGS[@]}")
  part bench_nf4 180 "$PY" scripts/bench_train.py "${BENCH[@]}" --quantization nf4
  part bench_bf16 150 "$PY" scripts/bench_train.py "${BENCH[@]}" --quantization none
  TRAIN_STEPS=30 GEN=(--new-tokens 32 --timeout 40) LIMITS=(60 60 45)  # train, generate, pytest
else
  MODEL=tiny
  part bench_cpu 300 "$PY" scripts/bench_train.py --model tiny --variants hf,trl --steps 1 \
    --batch-size 2 --max-length 128 --quantization none --json
  TRAIN_STEPS=2 GEN=(--new-tokens 2 --timeout 60) LIMITS=(150 200 120)
fi
read -r -a MODEL_OVERRIDES <<< "$("$PY" scripts/bench_train.py --model "$MODEL" --print-model-overrides)"
part train_4bit "${LIMITS[0]}" "$PY" -m lyra.train "${MODEL_OVERRIDES[@]}" quantization=nf4 logger=none eval=none \
  trainer.max_steps="$TRAIN_STEPS" trainer.save_strategy=no trainer.eval_strategy=no trainer.logging_steps=10 \
  trainer.warmup_steps=0 hydra.run.dir="$WORK/train_4bit_run"
part generate "${LIMITS[1]}" "$PY" scripts/bench_train.py --generate --model "$MODEL" "${GEN[@]}" --json
part pytest_gpu "${LIMITS[2]}" "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$WORK/pytest_gpu.xml"

# ---- the one JSON
"$PY" - "$WORK" "$OUT" "$GPU" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, os, platform, sys, xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

work, out, gpu, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
try:
    import torch
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (no CUDA GPU)")
    cuda = torch.version.cuda
except Exception as error:  # torch itself missing: still write the JSON
    device, cuda = f"unknown ({error})", None
versions = {}
for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "unsloth", "flash-attn", "lyra"):
    try:
        versions[name] = version(name)
    except PackageNotFoundError:
        pass

def last_json(log: Path):
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return None

parts = {}
for rc_file in sorted(work.glob("*.rc")):
    name, log = rc_file.stem, rc_file.with_suffix(".log")
    rc = int(rc_file.read_text().strip() or 1)
    text = log.read_text(errors="replace") if log.exists() else ""
    entry = {"exit_code": rc, "status": "ok" if rc == 0 else ("timed out" if rc in (124, 137) else "failed")}
    if rc != 0:
        entry["log_tail"] = text.strip().splitlines()[-5:]
    if name.startswith(("bench", "generate")):
        entry["report"] = last_json(log)
    parts[name] = entry
metrics = work / "train_4bit_run" / "metrics.json"
if "train_4bit" in parts and metrics.exists():
    parts["train_4bit"]["metrics"] = json.loads(metrics.read_text())
junit = work / "pytest_gpu.xml"
if "pytest_gpu" in parts and junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    parts["pytest_gpu"]["tests"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    if rc_exit := parts["pytest_gpu"]["exit_code"]:  # 5 = nothing collected/selected: not a failure of the check
        parts["pytest_gpu"]["status"] = "ok" if rc_exit == 5 else parts["pytest_gpu"]["status"]
result = {"gpu": gpu, "device": device, "cuda": cuda, "versions": versions, "seconds": seconds, "parts": parts}
out.write_text(json.dumps(result, indent=1) + "\n")
bad = [name for name, part in parts.items() if part["status"] != "ok" and not name.startswith("setup")]
print(f"gpu_check: wrote {out} ({device}; {seconds} s; " + (f"problems: {', '.join(bad)})" if bad else "all parts ok)"))
PYEOF
