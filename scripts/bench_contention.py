"""A training step and a decode step alone, and beside one and two CPU-bound processes.

    python scripts/bench_contention.py [--steps 4] [--tokens 16] [--json]

Each scenario starts N spinners (`python -c 'while True: pass'`, normal priority, what a user's other
work looks like), then times `--steps` LoRA steps of the CPU main job's setup (SmolLM2-135M-Instruct
fp32, lora=attn r=16, batch 4 of the English persona corpus, lyra's loss) and `--tokens` greedy decode
tokens, twice: with torch's default thread count (one per allowed core) and with lyra's choice
(`lyra.threads.use_free_cores`: one per idle core). It reports median seconds per step / per token and
each as a ratio to the idle machine. Run it alone: anything else running is one more competitor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def spinners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per scenario (after 1 warm-up)")
    parser.add_argument("--tokens", type=int, default=16, help="timed greedy decode tokens per scenario")
    parser.add_argument("--competitors", default="0,1,2", help="numbers of CPU-bound processes to run beside")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)  # the point is lyra's own choice; the override would hide it

    import torch
    from transformers.utils import logging as hf_logging

    from lyra.data import load_conversations
    from lyra.data.collate import build_collator
    from lyra.data.tokenization import encode_conversations
    from lyra.generation import build_prompt_ids, generate_replies
    from lyra.loss import supervised_loss
    from lyra.modeling import apply_lora, build_model, build_tokenizer, resolve_dtype
    from lyra.paths import compose_config
    from lyra.threads import allowed_cores, use_free_cores

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = compose_config("train", ["experiment=cpu_real"])
    tokenizer = build_tokenizer(cfg.model)
    examples, _ = encode_conversations(load_conversations(cfg.persona.train_file), tokenizer,
                                       cfg.data.max_length, cfg.data.system_prompt)
    torch.manual_seed(0)
    model = apply_lora(build_model(cfg.model, None, resolve_dtype(cfg.model.dtype), "cpu"), cfg.lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    collator = build_collator(tokenizer, model, padding_free=False)
    prompt = build_prompt_ids("Good evening! How was your day?", tokenizer, system_prompt=cfg.data.system_prompt)
    batch_size = cfg.trainer.per_device_train_batch_size

    def train_step(index: int) -> float:
        model.train()
        features = [dict(f) for f in examples[index * batch_size:(index + 1) * batch_size]]
        start = time.perf_counter()
        loss, _ = supervised_loss(model, model.get_output_embeddings(), collator(features))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    def decode_seconds_per_token() -> float:
        model.eval()
        start = time.perf_counter()
        generate_replies([prompt], model, tokenizer, do_sample=False, max_new_tokens=args.tokens,
                         min_new_tokens=args.tokens)
        return (time.perf_counter() - start) / args.tokens

    rows = []
    for competitors in (int(n) for n in args.competitors.split(",")):
        for policy in ("torch default", "lyra"):
            procs = spinners(competitors)
            try:
                time.sleep(1.0)  # let the spinners take their cores before lyra looks
                threads = use_free_cores() if policy == "lyra" else allowed_cores()
                torch.set_num_threads(threads)
                train_step(0)  # warm-up
                steps = [train_step(i + 1) for i in range(args.steps)]
                decode = decode_seconds_per_token()
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
            rows.append({"competitors": competitors, "policy": policy, "threads": threads,
                         "s_per_step": statistics.median(steps), "s_per_token": decode})
    idle = next(r for r in rows if r["competitors"] == 0 and r["policy"] == "torch default")
    print(f"experiment=cpu_real step (batch {batch_size}) and greedy decode; {allowed_cores()} allowed cores; "
          f"median of {args.steps} steps, {args.tokens} tokens")
    print(f"{'beside':<8}{'threads':<16}{'n':>3}{'s/step':>9}{'x idle':>8}{'s/token':>9}{'x idle':>8}")
    for row in rows:
        row["step_x_idle"] = row["s_per_step"] / idle["s_per_step"]
        row["token_x_idle"] = row["s_per_token"] / idle["s_per_token"]
        print(f"{row['competitors']:<8}{row['policy']:<16}{row['threads']:>3}{row['s_per_step']:>9.2f}"
              f"{row['step_x_idle']:>8.2f}{row['s_per_token']:>9.3f}{row['token_x_idle']:>8.2f}")
    if args.json:
        print(json.dumps({"rows": rows, "allowed_cores": allowed_cores()}))


if __name__ == "__main__":
    main()
