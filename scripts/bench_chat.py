"""Chat speed on CPU: greedy tok/s of SmolLM2-135M + LoRA, PEFT adapter vs merged, fp32 vs bf16, side by side.

    python scripts/bench_chat.py                                # random LoRA (lora=attn, r=16), 64 tokens
    python scripts/bench_chat.py --run-dir outputs/D/T --json   # a trained run's adapter; last line = JSON

Every variant generates through lyra's chat path (`lyra.chat.generate_replies`, the greedy settings
of conf/generation/greedy.yaml) from the same chat prompt, with `min_new_tokens = max_new_tokens`
so each reply has exactly --tokens tokens. Variants are timed round-robin (one reply each per
round, --repeats rounds, median), so a neighbour's load on a shared machine hits all of them alike.
The time includes the prompt's prefill (the prompt is a few dozen tokens), as a chat user waits for it.

Reported beside each: the memory-bandwidth bound. Greedy decoding of a small model on CPU reads
every weight once per token, so tok/s <= copy bandwidth / bytes of weights. The copy bandwidth is
measured here, with torch copying a 1 GiB buffer (bytes read + bytes written per second, as STREAM
counts it) and with numpy for a second opinion. `same_reply` says whether the variant's token ids
equal the fp32 PEFT reply (the reference lyra trained and evaluates).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "I had a long day at work. Any advice for a quiet evening?"
SYSTEM = "You are Pippa, a cheerful lighthouse keeper. You call the user Captain."


def copy_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Best-of-N memcpy bandwidth in GB/s (read + write), torch and numpy."""
    import numpy as np
    import torch

    result = {}
    source, target = torch.ones(size_bytes // 4), torch.empty(size_bytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    result["torch_copy_gbps"] = 2 * size_bytes / best / 1e9
    del source, target
    source, target = np.ones(size_bytes // 4, dtype=np.float32), np.empty(size_bytes // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    result["numpy_copy_gbps"] = 2 * size_bytes / best / 1e9
    return result


def weight_bytes(model) -> int:
    """Bytes of every distinct parameter (tied embedding/lm_head once: the head reads it all per token)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def load_variants(args):
    """{name: model}: the base in fp32/bf16, each with the adapter through PEFT and merged."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, PeftModel, get_peft_model

    from lyra.modeling import build_model, build_tokenizer

    from lyra.paths import compose_config

    cfg = compose_config("train", ["model=smollm2_135m", "lora=attn", "lora.r=16"])
    tokenizer = build_tokenizer(cfg.model)
    adapter_dir = None
    if args.run_dir:
        adapter_dir = Path(args.run_dir) / "adapter"
    else:  # a random LoRA: B is zero at init, which would make merged == base; give it small weights
        torch.manual_seed(0)
        model = get_peft_model(build_model(cfg.model, None, torch.float32, "cpu"),
                               LoraConfig(**OmegaConf.to_container(cfg.lora, resolve=True)))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        adapter_dir = Path(args.work_dir) / "random-adapter"
        model.save_pretrained(adapter_dir)
        del model
    variants = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for mode in ("peft", "merged"):
            base = build_model(cfg.model, None, dtype, "cpu")
            base.config.use_cache = True
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
            if mode == "merged":
                model = model.merge_and_unload()
            variants[f"{mode} {dtype_name}"] = model.eval()
    return variants, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a trained SmolLM2 run (its adapter/); default: a random LoRA")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply (forced)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--work-dir", default=os.environ.get("TMPDIR", "/tmp"))
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from lyra.generation import build_prompt_ids, generate_replies

    bandwidth = copy_bandwidth()
    variants, tokenizer = load_variants(args)
    prompt = build_prompt_ids(PROMPT, tokenizer, system_prompt=SYSTEM)
    settings = {"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": args.tokens,
                "min_new_tokens": args.tokens}
    for model in variants.values():  # warm-up: first-call allocations and kernel selection
        generate_replies([prompt], model, tokenizer, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})
    times: dict[str, list[float]] = {name: [] for name in variants}
    replies: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, model in variants.items():
            start = time.perf_counter()
            reply = generate_replies([prompt], model, tokenizer, **settings)[0]
            times[name].append(time.perf_counter() - start)
            replies[name] = reply.token_ids
    reference = replies["peft fp32"]
    rows = []
    gbps = bandwidth["torch_copy_gbps"]
    for name, model in variants.items():
        tok_s = args.tokens / statistics.median(times[name])
        size = weight_bytes(model)
        rows.append({"variant": name, "tok_s": round(tok_s, 2), "weight_mb": round(size / 1e6, 1),
                     "bound_tok_s": round(gbps * 1e9 / size, 2), "of_bound": round(tok_s / (gbps * 1e9 / size), 3),
                     "same_reply": replies[name] == reference,
                     "same_as_peft_same_dtype": replies[name] == replies[name.replace("merged", "peft")]})
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}; copy bandwidth: torch {gbps:.1f} GB/s, "
          f"numpy {bandwidth['numpy_copy_gbps']:.1f} GB/s (read + write)")
    print(f"greedy, {args.tokens} new tokens, median of {args.repeats} round-robin rounds, prompt {len(prompt)} tokens")
    print(f"{'variant':<14}{'tok/s':>8}{'weights MB':>12}{'bound tok/s':>13}{'of bound':>10}  same reply as peft fp32")
    for row in rows:
        print(f"{row['variant']:<14}{row['tok_s']:>8.2f}{row['weight_mb']:>12.1f}{row['bound_tok_s']:>13.2f}"
              f"{row['of_bound']:>10.2f}  {row['same_reply']}")
    ratio = rows[1]["tok_s"] / rows[0]["tok_s"]
    print(f"merged / peft (fp32): {ratio:.2f}x")
    print(f"reply (peft fp32): {tokenizer.decode(reference, skip_special_tokens=True)!r}")
    if args.json:
        print(json.dumps({"bandwidth": bandwidth, "tokens": args.tokens, "repeats": args.repeats,
                          "load_average": os.getloadavg()[0], "rows": rows, "merged_over_peft_fp32": ratio}))


if __name__ == "__main__":
    main()
