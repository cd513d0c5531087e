"""Chat speed on CPU: greedy tok/s of SmolLM2-135M + LoRA, PEFT adapter vs merged, fp32 vs bf16, side by side.

    python scripts/bench_chat.py                                # random LoRA (lora=attn, r=16), 64 tokens
    python scripts/bench_chat.py --run-dir outputs/D/T --json   # a trained run's adapter; last line = JSON
    python scripts/bench_chat.py --peer llamacpp --json         # lyra (transformers, llamacpp engine) vs llama.cpp
    python scripts/bench_chat.py --peer llamacpp --threads 1 --repeats 5   # steadier on a shared machine

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

--peer llamacpp compares lyra against llama.cpp itself, in one invocation, on the same run (--run-dir,
or the random LoRA written as a run dir), the same prompt ids, greedy (no repetition penalty: llama.cpp's
own greedy is top_k=1), the same thread count, each variant's prompt processing and decode measured apart:
    lyra transformers fp32   lyra's chat engine on the run merged in memory, eager F.linear (prepack=false)
    ... fp32 prepacked       the same with oneDNN-packed linear weights (lyra.prepack): what
                             engine=transformers serves on CPU by default
    ... fp32 compiled        the same with compile_decode=true: the decode step through inductor
                             (lyra.compiled_decode), compiled before timing
    lyra llamacpp f16/q8_0   lyra.engines' llamacpp engine on the run's cached GGUF export (engine=llamacpp)
    llama.cpp f16/q8_0       llama-cpp-python alone on the same GGUF file: `eval` for the prompt,
                             `Llama.generate(temp=0, top_k=1)` for the reply, no lyra code in the loop
Prefill tok/s = prompt tokens / the prompt's forward pass (KV cache empty). Decode tok/s = new tokens /
(reply time - prefill time). The bound is the read bandwidth (best-of-N torch `sum` over an fp32
buffer) over the variant's weight bytes (the GGUF file; the fp32 parameters): decode can at best read
every weight once per token. A VM's bandwidth moves with its neighbours, so it is read at the start
and again before every round, and the bound takes the median of those readings (all in the JSON).
Each lyra row shows its decode ratio to llama.cpp on the same file (the transformers rows: to
llama.cpp f32 when --gguf-types has it, else f16) and whether its reply's ids equal llama.cpp f16's
and the eager transformers row's. Each round starts one variant later than the last. On a machine
shared with other work, llama.cpp's spinning threads suffer most: --threads below the core count and
more --repeats steady the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "I had a long day at work. Any advice for a quiet evening?"
CHAT_CONTEXT = 2048 + 256  # lyra.chat's default max_prompt_tokens + max_new_tokens: the compiled variant's cap
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


def read_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N read bandwidth in GB/s: torch summing a size_bytes fp32 buffer (bytes read once, nothing
    written). --peer reads 1 GiB at the start, then 512 MiB before each round, to keep the rounds short."""
    import torch

    source = torch.ones(size_bytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        source.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9


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
    from peft import PeftModel

    from lyra.modeling import build_model, build_tokenizer
    from lyra.paths import compose_config

    cfg = compose_config("train", ["model=smollm2_135m", "lora=attn", "lora.r=16"])
    tokenizer = build_tokenizer(cfg.model)
    # a trained run's adapter, or the random LoRA written as a run dir (random_lora_run)
    adapter_dir = Path(args.run_dir or random_lora_run(Path(args.work_dir))) / "adapter"
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


# ---------------------------------------------------------------- --peer llamacpp

def random_lora_run(work_dir: Path) -> Path:
    """A random LoRA on SmolLM2 (lora=attn r=16; small B weights, so merged != base) written as a lyra run
    dir: resolved config, adapter and tokenizer, so lyra.export and lyra.runs treat it as a trained run."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from lyra.modeling import build_model, build_tokenizer
    from lyra.paths import compose_config

    run_dir = Path(work_dir) / "bench-chat-run"
    if (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        return run_dir
    cfg = compose_config("train", ["model=smollm2_135m", "lora=attn", "lora.r=16", "quantization=none",
                                   "logger=none", f"paths.output_dir={run_dir}"])
    cfg.data.system_prompt = SYSTEM
    tokenizer = build_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = get_peft_model(build_model(cfg.model, None, torch.float32, "cpu"),
                           LoraConfig(**OmegaConf.to_container(cfg.lora, resolve=True)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    OmegaConf.save(cfg, run_dir / "resolved_config.yaml", resolve=True)
    return run_dir


def peer_llamacpp(args) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from lyra.compiled_decode import compile_decode
    from lyra.engines import LlamaCppEngine, TransformersEngine, gguf_cache_dir, load_llama, open_engine
    from lyra.errors import UserError
    from lyra.generation import build_prompt_ids
    from lyra.runs import load_run

    run = load_run(args.run_dir or random_lora_run(Path(args.work_dir)), device="cpu")
    if args.threads:  # after load_run, which sets torch's threads to the cores idle at its start
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()  # the llamacpp engine takes torch's count; the raw peer gets it too
    # with those threads (one core alone may not saturate memory); read again at every round's start,
    # because a VM's bandwidth moves with its neighbours (seen here: 38 to 72 GB/s within minutes)
    read_readings = [read_bandwidth()]
    prompt = build_prompt_ids(PROMPT, run.tokenizer, system_prompt=run.system_prompt)
    n = args.tokens
    forced = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": n, "min_new_tokens": n}
    greedy = {"do_sample": False, "repetition_penalty": 1.0}

    variants: dict[str, dict] = {}  # name: prefill(), reply() -> token ids, weight bytes, notes
    model = run.model

    def prefill_of(model):
        """The prompt's forward alone, empty KV cache (a compiled variant's prefill is eager too)."""
        def prefill():
            with torch.inference_mode():
                model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        return prefill

    transformers = TransformersEngine(run)
    same_precision = "llama.cpp f32" if "f32" in args.gguf_types.split(",") else "llama.cpp f16"
    variants["lyra transformers fp32"] = {
        "prefill": prefill_of(model), "bytes": weight_bytes(model), "peer": same_precision,
        "reply": lambda: transformers.generate(prompt, **forced).token_ids, "note": "merged in memory, prepack=false"}
    # the same run as chat, web and serve load it by default on CPU: oneDNN-packed linears (lyra.prepack)
    packed_run = load_run(run.run_dir, adapter=run.adapter, device="cpu", prepack=True)
    packed_model, packed = packed_run.model, TransformersEngine(packed_run)

    variants["lyra transformers fp32 prepacked"] = {
        "prefill": prefill_of(packed_model), "bytes": weight_bytes(model), "peer": same_precision,
        "reply": lambda: packed.generate(prompt, **forced).token_ids, "note": "prepack=true (the default)"}
    # compile_decode=true: the decode step through inductor (lyra.compiled_decode), for chat's default context
    compiled_run = load_run(run.run_dir, adapter=run.adapter, device="cpu", prepack=True)
    compiled_model, compiled = compiled_run.model, TransformersEngine(compiled_run)
    report = compile_decode(compiled_model, compiled_run.tokenizer, max_length=CHAT_CONTEXT)
    print(f"lyra transformers fp32 compiled: {report}", flush=True)

    variants["lyra transformers fp32 compiled"] = {
        "prefill": prefill_of(compiled_model), "bytes": weight_bytes(model), "peer": same_precision,
        "reply": lambda: compiled.generate(prompt, **forced).token_ids,
        "note": f"compile_decode=true ({report.seconds:.0f} s compile)" if not report.reason else report.reason}
    for gguf_type in args.gguf_types.split(","):
        try:
            engine = open_engine(run, "llamacpp", gguf_type, generation=greedy, n_ctx=len(prompt) + n + 8)
            note = "parity ok"
        except UserError as error:  # measured anyway, and said: engine=llamacpp would refuse this file
            print(f"lyra llamacpp {gguf_type}: {error}", flush=True)
            adapter_path = Path(run.run_dir) / run.adapter
            engine = LlamaCppEngine(run, gguf_cache_dir(run.run_dir, adapter_path, gguf_type) / f"model-{gguf_type}.gguf",
                                    n_ctx=len(prompt) + n + 8)
            note = "parity FAILED: engine=llamacpp refuses it"

        def engine_prefill(engine=engine):
            engine.runner.llm.n_tokens = 0  # no KV reuse between rounds: every prefill reads the whole prompt
            engine.runner.prefill(prompt)

        def engine_reply(engine=engine):
            engine.runner.llm.n_tokens = 0
            return engine.generate(prompt, **forced).token_ids

        size = engine.gguf_file.stat().st_size
        variants[f"lyra llamacpp {gguf_type}"] = {"prefill": engine_prefill, "reply": engine_reply, "bytes": size,
                                                  "peer": f"llama.cpp {gguf_type}", "note": note}
        llm = load_llama(model_path=str(engine.gguf_file), n_ctx=len(prompt) + n + 8, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

        def raw_prefill(llm=llm):
            llm.reset()
            llm.eval(prompt)

        def raw_reply(llm=llm):
            llm.reset()  # else generate() reuses the cached prompt and skips the prefill the lyra rows pay
            tokens = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                tokens.append(token)
                if len(tokens) == n:  # forced length: past any end token, as min_new_tokens does
                    break
            return tokens

        variants[f"llama.cpp {gguf_type}"] = {"prefill": raw_prefill, "reply": raw_reply, "bytes": size, "peer": None,
                                            "note": "llama-cpp-python, no lyra code"}
    for variant in variants.values():  # warm-up
        variant["prefill"]()
        variant["reply"]()
    prefill_s = {name: [] for name in variants}
    reply_s = {name: [] for name in variants}
    replies = {}
    names = list(variants)
    for round_index in range(args.repeats):
        read_readings.append(read_bandwidth(size_bytes=1 << 29, repeats=3))
        # each round starts one variant later: no variant always follows the same neighbour
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            variant = variants[name]
            start = time.perf_counter()
            variant["prefill"]()
            prefill_s[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            replies[name] = variant["reply"]()
            reply_s[name].append(time.perf_counter() - start)
    read_gbps = statistics.median(read_readings)  # the bound's bandwidth: the run's typical reading, like the tok/s
    rows = {}
    for name, variant in variants.items():
        prefill, reply = statistics.median(prefill_s[name]), statistics.median(reply_s[name])
        bound = read_gbps * 1e9 / variant["bytes"]
        decode = n / max(reply - prefill, 1e-9)
        rows[name] = {"variant": name, "prefill_tok_s": round(len(prompt) / prefill, 1), "decode_tok_s": round(decode, 2),
                      "weight_mb": round(variant["bytes"] / 1e6, 1), "bound_tok_s": round(bound, 1),
                      "of_bound": round(decode / bound, 3), "peer": variant["peer"], "note": variant["note"],
                      "same_reply_as_llamacpp_f16": replies[name] == replies.get("llama.cpp f16"),
                      "same_reply_as_transformers": replies[name] == replies["lyra transformers fp32"]}
    for row in rows.values():
        peer_row = rows.get(row["peer"]) if row["peer"] else None
        row["decode_vs_llamacpp"] = round(row["decode_tok_s"] / peer_row["decode_tok_s"], 3) if peer_row else None
        row["prefill_vs_llamacpp"] = round(row["prefill_tok_s"] / peer_row["prefill_tok_s"], 3) if peer_row else None
    print(f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), torch "
          f"{torch.__version__}, {threads} threads (torch and llama.cpp); load average {os.getloadavg()[0]:.2f}; "
          f"read bandwidth {read_gbps:.1f} GB/s (torch sum, "
          f"median of {len(read_readings)} readings, one per round and one at the start: "
          f"{min(read_readings):.1f} to {max(read_readings):.1f})")
    print(f"{run.run_dir}: greedy, {n} new tokens forced, prompt {len(prompt)} tokens, median of {args.repeats} "
          f"round-robin rounds, each starting one variant later")
    header = (f"{'variant':<34}{'prefill tok/s':>14}{'decode tok/s':>13}{'vs llama.cpp':>13}{'weights MB':>11}"
              f"{'bound tok/s':>12}{'of bound':>9}  same reply as f16 / as transformers  note")
    print(header)
    print("-" * len(header))
    for row in rows.values():
        ratio = f"{row['decode_vs_llamacpp']:.2f}x" if row["decode_vs_llamacpp"] is not None else "-"
        print(f"{row['variant']:<34}{row['prefill_tok_s']:>14.1f}{row['decode_tok_s']:>13.2f}{ratio:>13}"
              f"{row['weight_mb']:>11.1f}{row['bound_tok_s']:>12.1f}{row['of_bound']:>9.2f}  "
              f"{'yes' if row['same_reply_as_llamacpp_f16'] else 'NO':<4} / "
              f"{'yes' if row['same_reply_as_transformers'] else 'NO':<4}  {row['note']}")
    print(f"reply (llama.cpp f16): {run.tokenizer.decode(replies.get('llama.cpp f16', []), skip_special_tokens=True)!r}")
    if args.json:
        print(json.dumps({"read_gbps": read_gbps, "read_gbps_readings": [round(r, 1) for r in read_readings],
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
                          "tokens": n, "prompt_tokens": len(prompt),
                          "repeats": args.repeats, "load_average": os.getloadavg()[0], "rows": list(rows.values())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a trained SmolLM2 run (its adapter/); default: a random LoRA")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply (forced)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--work-dir", default=os.environ.get("TMPDIR", "/tmp"))
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--peer", choices=("llamacpp",), help="compare lyra's engines against llama.cpp itself")
    parser.add_argument("--gguf-types", default="f16,q8_0", help="--peer: the GGUF types to run (f16,q8_0,f32)")
    parser.add_argument("--threads", type=int, help="--peer: threads for torch and llama.cpp alike "
                                                     "(default: torch's); fewer than the cores = less hurt by neighbours")
    args = parser.parse_args()
    if args.peer:
        return peer_llamacpp(args)

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
