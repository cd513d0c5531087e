"""Side-by-side training benchmark: the seed-style pipeline against lyra's default, on the same data.

    python scripts/bench_train.py                          # tiny model on CPU, a few minutes
    python scripts/bench_train.py --model qwen3_0_6b --steps 20 --batch-size 8 --json   # on a GPU
    python scripts/bench_train.py --generate               # chat generation: KV cache, static cache + compile

Variants (each in its own subprocess, so memory figures don't mix; same model, seed, steps and
batches of the embedded corpus; LoRA on a 4-bit NF4 base in both):
  baseline  seed-style: every sample padded to --max-length, labels on every non-pad token,
            full-vocabulary logits at every position (stock transformers.Trainer)
  lyra      lyra's default: dynamic padding, assistant-only labels, logits only where supervised
            (lyra.trainer.build_trainer, the Trainer `python -m lyra.train` uses)

Reported per variant: conversation tokens/s (non-pad tokens), supervised tokens/s, pad fraction,
training memory (CPU: peak RSS above the RSS after model load; GPU: torch.cuda.max_memory_allocated
above the allocation after model load). Summary: speedup (lyra / baseline conversation tokens/s),
memory_ratio (lyra / baseline training memory) and loss_parity (lyra's loss on one batch equals the
standard full-logits masked loss within 1e-4, both with assistant-only labels). The first step is
warm-up and is not timed. With --json the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_TOLERANCE = 1e-4
GOALS = {"speedup": 3.0, "memory_ratio": 0.5}  # the CPU goals for --model tiny

# Random Qwen3s built locally (weights a pure function of the seed), so no download is ever needed.
MODELS = {
    "tiny": {},  # conf/model/tiny_qwen3.yaml as is: 2 layers, hidden 64
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 64},
    # Qwen/Qwen3-0.6B's published architecture with random weights: for GPUs.
    "qwen3_0_6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}


# ---------------------------------------------------------------- shared setup (runs in each child)

def compose_config(args, output_dir: str):
    """The same Hydra composition `python -m lyra.train` would use, for the benchmark's model."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [
        "model=tiny_qwen3", "quantization=nf4", "lora=default", "logger=none", f"paths.output_dir={output_dir}",
        f"data.max_length={args.max_length}",
        f"trainer.max_steps={args.steps}", f"trainer.per_device_train_batch_size={args.batch_size}",
        "trainer.gradient_accumulation_steps=1", "trainer.eval_strategy=no", "trainer.save_strategy=no",
        "trainer.logging_steps=1000000", "trainer.warmup_steps=0", "trainer.dataloader_num_workers=0",
        # identical batches in both variants: one seeded shuffle, then read in order
        "trainer.train_sampling_strategy=sequential",
    ]
    if args.model != "tiny":
        overrides.append(f"model.name_or_path=${{paths.cache_dir}}/bench_{args.model}")
        overrides += [f"model.build.{key}={value}" for key, value in MODELS[args.model].items()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT / "lyra" / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def load_pipeline_inputs(cfg):
    """Tokenizer, assistant-labelled train split (one seeded shuffle), compute dtype, LoRA'd 4-bit model."""
    from transformers import set_seed

    from lyra.data import build_datasets
    from lyra.modeling import apply_lora, build_model, build_quantization, build_tokenizer, resolve_dtype

    set_seed(cfg.trainer.seed)
    tokenizer = build_tokenizer(cfg.model)
    dataset = build_datasets(cfg.data, tokenizer).train.shuffle(seed=cfg.trainer.data_seed)
    dtype = resolve_dtype(cfg.model.dtype)
    model = build_model(cfg.model, build_quantization(cfg.quantization, dtype), dtype)
    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    return tokenizer, dataset, dtype, model


class MemoryMeter:
    """Training memory: GPU allocation peak, or peak RSS, above the level when `start()` is called."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self._sampled_peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the allocation after model load"
            return
        import psutil

        self.base = psutil.Process().memory_info().rss
        try:  # Linux: writing 5 resets VmHWM (peak RSS) to the current RSS, an exact peak from here on
            Path("/proc/self/clear_refs").write_text("5")
            self._status_kib("VmHWM")
            self.method = "peak RSS (VmHWM, reset after model load) above the RSS after model load"
        except (OSError, KeyError):
            self.method = "peak RSS (sampled every 5 ms) above the RSS after model load"
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.wait(0.005):
            self._sampled_peak = max(self._sampled_peak, process.memory_info().rss)

    def stop(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        self._stop.set()
        peak = self._sampled_peak if "sampled" in self.method else self._status_kib("VmHWM") * 1024
        return int(max(peak - self.base, 0))


def measured(trainer_cls):
    """`trainer_cls` that counts tokens per training step and times whole optimizer steps."""
    import torch
    from transformers import TrainerCallback

    from lyra.trainer import IGNORE_INDEX, shifted_targets

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)

    class Measured(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.clock = StepClock()
            self.add_callback(self.clock)
            self.counts: list[tuple[int, int, int]] = []  # (non-pad, supervised, padded) per step

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            non_pad = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            supervised = int((shifted_targets(inputs["labels"]) != IGNORE_INDEX).sum())
            self.counts.append((non_pad, supervised, ids.numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    return Measured


def seed_style(dataset, tokenizer, max_length: int):
    """The seed's data: labels on every token (prompts included), padded to max_length by the collator."""
    from transformers import DataCollatorForSeq2Seq

    dataset = dataset.map(lambda example: {"labels": list(example["input_ids"])})
    collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=max_length, label_pad_token_id=-100)
    return dataset, collator


def loss_parity(trainer, model, dataset) -> dict:
    """lyra's supervised-only loss vs the model's own full-logits masked loss on one batch, per-token
    mean and sum/num_items (the gradient-accumulation normalisation), assistant-only labels in both."""
    import torch

    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(trainer.args.train_batch_size)]))
    num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
    model.eval()  # no LoRA dropout: both passes must see the same function
    pairs = {}
    with torch.no_grad():
        for name, count in (("mean", None), ("sum_over_num_items", num_items)):
            extra = {} if count is None else {"num_items_in_batch": count}
            standard = model(**batch, **extra).loss.item()
            lyra = trainer.compute_loss(model, dict(batch), num_items_in_batch=count).item()
            pairs[name] = {"standard": standard, "lyra": lyra, "abs_diff": abs(standard - lyra)}
    model.train()
    worst = max(pair["abs_diff"] for pair in pairs.values())
    return {"ok": worst <= PARITY_TOLERANCE, "max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, **pairs}


def run_variant(args) -> dict:
    """One pipeline's training run in this process; returns its measurements."""
    from transformers import Trainer

    from lyra.train import build_training_args
    from lyra.trainer import SupervisedLogitsTrainer, build_trainer

    with tempfile.TemporaryDirectory(prefix=f"bench-{args.variant}-") as run_dir:
        cfg = compose_config(args, run_dir)
        tokenizer, dataset, dtype, model = load_pipeline_inputs(cfg)
        training_args = build_training_args(cfg.trainer, Path(run_dir), dtype, has_eval=False)
        if args.variant == "baseline":
            train_data, collator = seed_style(dataset, tokenizer, args.max_length)
            trainer = measured(Trainer)(model=model, args=training_args, train_dataset=train_data,
                                        data_collator=collator, processing_class=tokenizer)
        else:
            trainer = build_trainer(model, training_args, tokenizer, dataset, None, cfg.data.padding_free,
                                    trainer_cls=measured(SupervisedLogitsTrainer))
        memory = MemoryMeter()
        memory.start()
        result = trainer.train()
        training_memory = memory.stop()
        parity = loss_parity(trainer, model, dataset) if args.variant == "lyra" else None

    timed = slice(1, None) if len(trainer.counts) > 1 else slice(None)  # step 1 is warm-up
    seconds = sum(trainer.clock.seconds[timed])
    non_pad, supervised, padded = (sum(step[i] for step in trainer.counts[timed]) for i in range(3))
    all_non_pad, all_padded = sum(s[0] for s in trainer.counts), sum(s[2] for s in trainer.counts)
    return {
        "variant": args.variant,
        "steps": len(trainer.counts),
        "timed_steps": len(trainer.counts[timed]),
        "timed_seconds": seconds,
        "conversation_tokens_per_s": non_pad / seconds,
        "supervised_tokens_per_s": supervised / seconds,
        "pad_fraction": 1 - all_non_pad / all_padded,
        "training_memory_bytes": training_memory,
        "memory_measure": memory.method,
        "train_loss": result.training_loss,
        "dtype": str(dtype).removeprefix("torch."),
        "loss_parity": parity,
    }


# ---------------------------------------------------------------- generation benchmark (--generate)

def run_generation(args) -> dict:
    """Greedy chat generation of exactly --new-tokens tokens for a few probe prompts; tokens/s."""
    import torch

    from lyra.data.tokenization import chat_prompt_ids, with_system_prompt

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as run_dir:
        cfg = compose_config(args, run_dir)
        tokenizer, _, _, model = load_pipeline_inputs(cfg)
    model.eval()
    model.config.use_cache = True
    probes = [json.loads(line)["prompt"] for line in
              (REPO_ROOT / "lyra/data/assets/lyra_probes.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    prompts = [torch.tensor([chat_prompt_ids(with_system_prompt([{"role": "user", "content": p}],
                                                                cfg.data.system_prompt), tokenizer)])
               for p in probes]
    kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}
    if args.variant == "static_compile":
        kwargs["cache_implementation"] = "static"
        base = model.get_base_model()  # PeftModel.generate runs the base model's forward
        base.forward = torch.compile(base.forward, dynamic=False)
    else:
        kwargs["use_cache"] = args.variant == "kv_cache"

    def generate_all() -> int:
        produced = 0
        for ids in prompts:
            out = model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                 **kwargs)
            produced += out.shape[1] - ids.shape[1]
        return produced

    with torch.no_grad():
        warmup_start = time.perf_counter()
        generate_all()  # warm-up; for static_compile this is where compilation happens
        warmup = time.perf_counter() - warmup_start
        start = time.perf_counter()
        produced = generate_all()
        seconds = time.perf_counter() - start
    return {"variant": args.variant, "status": "ok", "new_tokens": produced, "seconds": seconds,
            "tokens_per_s": produced / seconds, "warmup_seconds": warmup}


# ---------------------------------------------------------------- the parent: subprocesses + report

def child_command(args, variant: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--model", args.model,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--new-tokens", str(args.new_tokens)]
    return command + (["--generate"] if args.generate else [])


def run_child(args, variant: str) -> dict:
    """One variant in a fresh interpreter; its last stdout line is its JSON result."""
    try:
        done = subprocess.run(child_command(args, variant), capture_output=True, text=True, timeout=args.timeout,
                              cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": "unsupported", "reason": f"did not finish within {args.timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if args.generate:  # e.g. torch.compile or a static cache not supported here: report, don't fail
            return {"variant": variant, "status": "unsupported", "reason": tail[-300:]}
        raise SystemExit(f"bench_train: variant {variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def summarize(results: dict[str, dict]) -> dict:
    baseline, lyra = results["baseline"], results["lyra"]
    return {
        "speedup": lyra["conversation_tokens_per_s"] / baseline["conversation_tokens_per_s"],
        "memory_ratio": lyra["training_memory_bytes"] / max(baseline["training_memory_bytes"], 1),
        "loss_parity": bool(lyra["loss_parity"]["ok"]),
    }


def print_training_report(report: dict) -> None:
    print(f"{'variant':<10} {'conv tok/s':>11} {'sup tok/s':>10} {'pad frac':>9} {'train mem MiB':>14} {'timed s':>8}")
    for name in ("baseline", "lyra"):
        row = report["variants"][name]
        print(f"{name:<10} {row['conversation_tokens_per_s']:>11.1f} {row['supervised_tokens_per_s']:>10.1f} "
              f"{row['pad_fraction']:>9.3f} {row['training_memory_bytes'] / 2**20:>14.1f} {row['timed_seconds']:>8.2f}")
    parity = report["variants"]["lyra"]["loss_parity"]
    print(f"speedup {report['speedup']:.2f}x   memory_ratio {report['memory_ratio']:.3f}   "
          f"loss_parity {report['loss_parity']} (max |diff| {parity['max_abs_diff']:.2e})")
    print(f"memory: {report['variants']['lyra']['memory_measure']}")
    if report["model"] == "tiny":
        met = report["speedup"] >= GOALS["speedup"] and report["memory_ratio"] <= GOALS["memory_ratio"]
        print(f"CPU goals (speedup >= {GOALS['speedup']}, memory_ratio <= {GOALS['memory_ratio']}, parity): "
              f"{'met' if met and report['loss_parity'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="tiny: CPU in minutes; small: mid-size random Qwen3; qwen3_0_6b: the real architecture")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first is untimed)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step, both variants")
    parser.add_argument("--max-length", type=int, default=512, help="the baseline pads every sample to this")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--generate", action="store_true",
                        help="benchmark chat generation instead: no cache, KV cache, static cache + torch.compile")
    parser.add_argument("--new-tokens", type=int, default=32, help="--generate: tokens generated per prompt")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="seconds per variant subprocess; a generation variant past it is reported unsupported")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")

    if args.variant:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = run_generation(args) if args.generate else run_variant(args)
        print(json.dumps(result))
        return 0

    shown = ["python", "scripts/bench_train.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"command: {shlex.join(shown)}")
    print(f"machine: {machine()}")
    variants = ("no_cache", "kv_cache", "static_compile") if args.generate else ("baseline", "lyra")
    results = {}
    for variant in variants:
        print(f"running {variant} ...", flush=True)
        results[variant] = run_child(args, variant)
    report = {"command": shlex.join(shown), "machine": machine(), "model": args.model, "steps": args.steps,
              "batch_size": args.batch_size, "variants": results}
    if args.generate:
        for name, row in results.items():
            print(f"{name:<15} " + (f"{row['tokens_per_s']:8.1f} tok/s (warm-up {row['warmup_seconds']:.1f} s)"
                                    if row.get("status") == "ok" else f"unsupported: {row['reason']}"))
        ok = {name: row for name, row in results.items() if row.get("status") == "ok"}
        if "kv_cache" in ok and "no_cache" in ok:
            report["kv_cache_speedup"] = ok["kv_cache"]["tokens_per_s"] / ok["no_cache"]["tokens_per_s"]
    else:
        report.update(summarize(results))
        print_training_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
