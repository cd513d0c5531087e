#!/usr/bin/env bash
# The persona study on real weights (docs/preference.md): SmolLM2-135M-Instruct + persona=lyra_en (experiment=cpu_real),
#   1. SFT on the English Lyra corpus
#   2. pairs: chosen = corpus reply, rejected = the base model's out-of-character reply (python -m lyra.data pairs)
#   3. DPO continuing the SFT adapter on those pairs
#   4. ORPO from the base on the same pairs
#   5. lyra.evaluate on each (the persona's held-out split + probes; the SFT run also with the bare base),
#      then one table: base / SFT / SFT+DPO / ORPO, and lyra.compare over the three training runs.
# Long on a CPU (each stage is a cpu_real-sized job); every stage is resumable (resume=auto) and skipped when done.
#   bash scripts/persona_study.sh [OUT_DIR] [extra Hydra overrides for every training stage...]
set -euo pipefail
out="${1:-outputs/persona_study}"
shift || true
mkdir -p "$out"
common=(experiment=cpu_real logger=none "$@")
DPO_STEPS="${DPO_STEPS:-100}"  # pairs are few (one per kept turn): ~2 epochs at batch 4
DPO_LR="${DPO_LR:-5e-5}"  # preference steps move a persona faster than SFT steps: a tenth of cpu_real's rate
MAX_PAIRS="${MAX_PAIRS:-}"  # empty: every training turn (the English corpus has a few hundred)
ORPO_STEPS="${ORPO_STEPS:-200}"  # ORPO learns the persona from the base: as many steps as the SFT stage
DRIFT_TURNS="${DRIFT_TURNS:-8}"  # persona_hold over chats this long (docs/drift.md)

stage() {  # stage NAME DIR ARGS...: train unless DIR already has its metrics
  local name="$1" dir="$2"; shift 2
  if [[ -f "$dir/metrics.json" ]]; then echo "== $name: done ($dir)"; return; fi
  echo "== $name -> $dir"
  python -m lyra.train "${common[@]}" "hydra.run.dir=$dir" "$@"
}

stage "SFT" "$out/sft"
if [[ ! -s "$out/pairs.jsonl" ]]; then
  echo "== pairs (rejected: the base model)"
  python -m lyra.data pairs "run_dir=$out/sft" --out "$out/pairs.jsonl" ${MAX_PAIRS:+--max-pairs "$MAX_PAIRS"}
fi
python -m lyra.data stats "$out/pairs.jsonl" --max-length 512
stage "DPO (from the SFT adapter)" "$out/dpo" objective=dpo "objective.init_adapter=$out/sft" \
  "objective.train_file=$out/pairs.jsonl" "trainer.max_steps=$DPO_STEPS" "trainer.learning_rate=$DPO_LR"
stage "ORPO (from the base)" "$out/orpo" objective=orpo "objective.train_file=$out/pairs.jsonl" \
  "trainer.max_steps=$ORPO_STEPS"

echo "== evaluate"
python -m lyra.evaluate "run_dir=$out/sft" compare_base=true "drift.turns=$DRIFT_TURNS"
python -m lyra.evaluate "run_dir=$out/dpo" "drift.turns=$DRIFT_TURNS"
python -m lyra.evaluate "run_dir=$out/orpo" "drift.turns=$DRIFT_TURNS"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
sft = json.loads((out / "sft" / "evaluation.json").read_text())
rows = {"base": sft["base"], "SFT": sft, "SFT+DPO": json.loads((out / "dpo" / "evaluation.json").read_text()),
        "ORPO": json.loads((out / "orpo" / "evaluation.json").read_text())}
keys = ["eval_loss", "self_name_rate", "address_rate", "language_rate", "eos_rate", "persona_hold",
        "avg_reply_chars"]
print(f"{'':<10}" + "".join(f"{k:>16}" for k in keys))
for name, row in rows.items():
    print(f"{name:<10}" + "".join(f"{row.get(k) if row.get(k) is None else round(row[k], 4):>16}" for k in keys))
for name, row in rows.items():
    print(f"\n{name}:")
    for reply in row["replies"][:3]:
        print(f"  > {reply.get('prompt')}\n    {reply.get('reply')}")
PY
python -m lyra.compare "$out/sft" "$out/dpo" "$out/orpo" --metric self_name_rate --out "$out/compare"
