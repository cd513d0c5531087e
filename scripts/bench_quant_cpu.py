"""LoRA step time on CPU, full precision vs 4-bit NF4, side by side on the same batches (default SmolLM2-135M).

    python scripts/bench_quant_cpu.py                              # model=smollm2_135m, lora=attn r=16, batch 4
    python scripts/bench_quant_cpu.py --data tests/fixtures/pippa/train.jsonl --steps 6 --json

Both models are built by lyra's own builders (`build_quantization`, `build_model`, `apply_lora`: the
NF4 one is prepared for k-bit training exactly as `python -m lyra.train quantization=nf4` does) and
step through the same batches (lyra's tokenization and collator) with lyra's loss (logits only at
supervised positions) and AdamW. Steps alternate between the two models, so a neighbour's load on a
shared machine hits both alike; the first step of each is warm-up and is not timed. Reported: median
seconds per step, the ratio nf4 / none, and the losses of the first step (the same model, so close).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "tests" / "fixtures" / "pippa" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m", help="a lyra/conf/model option")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a seed-format JSONL of conversations")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up step)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from lyra.data import load_conversations
    from lyra.data.tokenization import encode_conversations
    from lyra.paths import compose_config
    from lyra.modeling import apply_lora, build_model, build_quantization, build_tokenizer, resolve_dtype
    from lyra.data.collate import build_collator
    from lyra.loss import supervised_loss

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = compose_config("train", [f"model={args.model}", "lora=attn", "lora.r=16", "quantization=nf4"])
    tokenizer = build_tokenizer(cfg.model)
    examples, _ = encode_conversations(load_conversations(args.data), tokenizer, 512, None)
    dtype = resolve_dtype(cfg.model.dtype)
    torch.manual_seed(0)
    variants = {}
    for name, quantization in (("none", None), ("nf4", build_quantization(cfg.quantization, dtype))):
        model = apply_lora(build_model(cfg.model, quantization, dtype, "cpu"), cfg.lora)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        variants[name] = (model, optimizer, build_collator(tokenizer, model, padding_free=False))

    def step(model, optimizer, collator, features) -> float:
        loss, _ = supervised_loss(model, model.get_output_embeddings(), collator(features), fused=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss)

    times: dict[str, list[float]] = {name: [] for name in variants}
    first_loss = {}
    tokens = 0
    for index in range(args.steps + 1):
        start_row = index * args.batch_size % max(len(examples) - args.batch_size, 1)
        features = examples[start_row:start_row + args.batch_size]
        tokens += sum(len(f["input_ids"]) for f in features) if index else 0
        for name, (model, optimizer, collator) in variants.items():
            start = time.perf_counter()
            loss = step(model, optimizer, collator, [dict(f) for f in features])
            if index == 0:
                first_loss[name] = round(loss, 4)
            else:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["nf4"] / medians["none"]
    print(f"{args.model}, lora=attn r=16, batch {args.batch_size}, {args.steps} timed steps each "
          f"(~{tokens / args.steps:.0f} tokens/step), torch {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name in variants:
        print(f"  quantization={name:<5} {medians[name]:.2f} s/step (median; all: "
              f"{', '.join(f'{t:.2f}' for t in times[name])}), first-step loss {first_loss[name]}")
    print(f"  nf4 / none: {ratio:.2f}x the step time")
    if args.json:
        print(json.dumps({"model": args.model, "s_per_step": medians, "nf4_over_none": ratio,
                          "first_loss": first_loss, "threads": torch.get_num_threads(),
                          "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
