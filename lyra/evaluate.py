"""Measure a trained Lyra: eval loss / perplexity, and persona fidelity on probe prompts.

    python -m lyra.evaluate run_dir=outputs/2026-01-01/12-00-00        # -> <run_dir>/evaluation.json
    python -m lyra.evaluate run_dir=R adapter=none                      # the bare base, for contrast
    python -m lyra.evaluate run_dir=R eval.num_probes=10 eval.generation.max_new_tokens=64
    python -m lyra.evaluate run_dir=R eval_file=my_heldout.jsonl

Persona metrics (each a fraction of the probe replies, except avg_reply_chars):
    think_leak_rate  the raw reply contained <think> or </think> (removed before display)
    eos_rate         the reply ended with <|im_end|>/<|endoftext|>, not by hitting max_new_tokens
    master_rate      the reply addresses the user as 主人
    self_name_rate   the reply uses her name 萊拉
    simplified_rate  the reply contains Simplified-only characters (OpenCC tables, lyra.data.zh_tw)
    avg_reply_chars  mean length of the clean reply in characters

During training, `PersonaProbeCallback` runs the same probes (conf/eval/probes.yaml) every
`eval.probes_every`-th Trainer evaluation and once at the end, logs `probe/*` metrics and a
(prompt, reply) table to the job's W&B run, and puts the final values into metrics.json.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from lyra.errors import UserError, exit_on_user_error
from lyra.paths import resolve_user_path

log = logging.getLogger(__name__)

PERSONA_METRICS = ("think_leak_rate", "eos_rate", "master_rate", "self_name_rate", "simplified_rate",
                   "avg_reply_chars")
MASTER, SELF_NAME = "主人", "萊拉"
WANDB_PREFIX = "probe/"


# ---------------------------------------------------------------- probes

@dataclass
class Probe:
    id: str
    prompt: str


def probes_path(eval_cfg: DictConfig) -> Path:
    from lyra.data import corpus_file

    return resolve_user_path(eval_cfg.probes_file) if eval_cfg.get("probes_file") else corpus_file("probes")


def load_probes(path: Path, key: str = "eval.probes_file") -> list[Probe]:
    """Probe prompts from a JSONL of {"id", "prompt"}; a bad line is one error naming FILE:LINE."""
    if not path.is_file():
        raise UserError(key, f"file not found: {path}")
    probes = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt = record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(key, f"{path}:{number}: expected {{\"id\", \"prompt\"}} ({type(error).__name__}: {error})") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(key, f"{path}:{number}: prompt must be a non-empty string")
        probes.append(Probe(str(record.get("id", f"{path.stem}-{number}")), prompt))
    if not probes:
        raise UserError(key, f"{path} holds no probes")
    return probes


def validate_probes(eval_cfg: DictConfig | None) -> None:
    """Check the eval group (training-time probes) before anything heavy; `eval=none` passes."""
    from lyra.chat import check_generation

    if not eval_cfg:
        return
    num = eval_cfg.num_probes
    if num is not None and not (isinstance(num, int) and num >= 1):
        raise UserError("eval.num_probes", f"must be an integer >= 1 or null (all), got {num}")
    every = eval_cfg.probes_every
    if not (isinstance(every, int) and every >= 0):
        raise UserError("eval.probes_every", f"must be an integer >= 0 (0 = only at the end), got {every}")
    if not (isinstance(eval_cfg.batch_size, int) and eval_cfg.batch_size >= 1):
        raise UserError("eval.batch_size", f"must be an integer >= 1, got {eval_cfg.batch_size}")
    check_generation(OmegaConf.to_container(eval_cfg.generation, resolve=True), key="eval.generation")
    load_probes(probes_path(eval_cfg))


def has_simplified(text: str) -> bool:
    from lyra.data.zh_tw import simplified_only_characters

    return bool(simplified_only_characters(text))


def persona_metrics(replies: Sequence) -> dict[str, float]:
    """The persona metrics of a list of `lyra.chat.Reply`."""
    n = len(replies)
    if n == 0:
        return {name: 0.0 for name in PERSONA_METRICS}

    def rate(flags) -> float:
        return sum(bool(flag) for flag in flags) / n

    return {
        "think_leak_rate": rate(r.think_leak for r in replies),
        "eos_rate": rate(r.ended_by_eos for r in replies),
        "master_rate": rate(MASTER in r.text for r in replies),
        "self_name_rate": rate(SELF_NAME in r.text for r in replies),
        "simplified_rate": rate(has_simplified(r.text) for r in replies),
        "avg_reply_chars": sum(len(r.text) for r in replies) / n,
    }


def run_probes(model, tokenizer, probes: Sequence[Probe], system_prompt: str | None, generation: dict[str, Any],
               batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate one reply per probe (batched, same prompt path as chat); (metrics, per-probe rows)."""
    from lyra.chat import build_prompt_ids, generate_replies

    was_training = model.training
    model.eval()
    replies = []
    try:
        for start in range(0, len(probes), batch_size):
            batch = probes[start:start + batch_size]
            prompts = [build_prompt_ids(p.prompt, tokenizer, system_prompt=system_prompt) for p in batch]
            replies += generate_replies(prompts, model, tokenizer, **generation)
    finally:
        if was_training:
            model.train()
    rows = [{"id": p.id, "prompt": p.prompt, "reply": r.text, "ended_by_eos": r.ended_by_eos,
             "think_leak": r.think_leak} for p, r in zip(probes, replies)]
    return persona_metrics(replies), rows


# ---------------------------------------------------------------- eval loss

def eval_loss(model, dataset, tokenizer, batch_size: int) -> tuple[float, int]:
    """(mean NLL per supervised token, number of supervised tokens) over a tokenized split.

    Token-weighted, so it can differ slightly from the Trainer's eval_loss (a mean of batch means).
    Uses training's collator and supervised-only logits (lyra.trainer): no full-vocabulary logits.
    """
    import torch

    from lyra.trainer import (IGNORE_INDEX, build_collator, head_sees_only, shifted_targets,
                              supervised_cross_entropy)

    collator = build_collator(tokenizer, model, padding_free=False)
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {key: value.to(device) for key, value in collator(features).items()}
            targets = shifted_targets(batch.pop("labels"))  # the token each position predicts
            keep = targets != IGNORE_INDEX
            tokens = int(keep.sum())
            if tokens:
                with head_sees_only(head, keep):
                    logits = model(**batch).logits
                total += float(supervised_cross_entropy(logits, targets[keep], num_items_in_batch=1))  # a sum
                count += tokens
    return (total / count if count else float("nan")), count


def perplexity(loss: float | None) -> float | None:
    if loss is None or math.isnan(loss):
        return None
    return math.exp(loss) if loss < 700 else float("inf")


def launch_dir(run_dir: Path) -> Path | None:
    """Where the training was launched (Hydra records it), to resolve the run's relative data paths."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    return Path(OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd", default=None) or run_dir)


def eval_data_config(run_cfg: DictConfig, run_dir: Path, eval_file: str | None) -> DictConfig:
    """The run's data config with paths made absolute (and eval_file replaced when given)."""
    data = OmegaConf.create(OmegaConf.to_container(run_cfg.data, resolve=True))
    origin = launch_dir(run_dir)
    for key in ("train_file", "eval_file"):
        value = data.get(key)
        if value and not Path(value).expanduser().is_absolute() and origin is not None:
            data[key] = str(origin / value)
    if eval_file:
        data.eval_file = str(resolve_user_path(eval_file))
    return data


# ---------------------------------------------------------------- report

def output_path(run_dir: Path, adapter: str, output_file: str | None) -> Path:
    if output_file:
        return resolve_user_path(output_file)
    if adapter == "adapter":
        return run_dir / "evaluation.json"
    name = "base" if adapter == "none" else Path(adapter).name
    return run_dir / f"evaluation-{name}.json"


def format_table(results: dict[str, Any]) -> str:
    keys = ["eval_loss", "perplexity", "eval_tokens", "num_probes", *PERSONA_METRICS]
    lines = [f"{'metric':<18}{'value':>12}", "-" * 30]
    for key in keys:
        value = results.get(key)
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<18}{shown:>12}")
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The evaluate app for a composed conf/evaluate.yaml; returns what it writes to the JSON."""
    from lyra.data import build_datasets
    from lyra.runs import load_run, run_dir_path

    if OmegaConf.is_missing(cfg, "run_dir"):
        raise UserError("run_dir", "is required: python -m lyra.evaluate run_dir=<training output dir>")
    if not cfg.eval:
        raise UserError("eval", "eval=none leaves nothing to evaluate; use eval=probes")
    validate_probes(cfg.eval)
    run_dir = run_dir_path(cfg.run_dir)
    probes = load_probes(probes_path(cfg.eval))[: cfg.eval.num_probes or None]
    run = load_run(run_dir, adapter=cfg.adapter, device=cfg.device)
    data_cfg = eval_data_config(run.cfg, run_dir, cfg.eval_file)

    splits = build_datasets(data_cfg, run.tokenizer)
    loss, tokens = (None, 0)
    if splits.eval is not None:
        loss, tokens = eval_loss(run.model, splits.eval, run.tokenizer, cfg.eval.batch_size)
    generation = OmegaConf.to_container(cfg.eval.generation, resolve=True)
    metrics, rows = run_probes(run.model, run.tokenizer, probes, run.system_prompt, generation, cfg.eval.batch_size)

    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "adapter": run.adapter,
        "eval_file": data_cfg.get("eval_file"),
        "eval_loss": loss,
        "perplexity": perplexity(loss),
        "eval_tokens": tokens,
        "eval_examples": len(splits.eval) if splits.eval is not None else 0,
        "num_probes": len(rows),
        **metrics,
        "generation": generation,
        "replies": rows,
    }
    path = output_path(run_dir, run.adapter, cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(format_table(results))
    print(f"\n{len(rows)} probe replies and all metrics written to {path}")
    return results


# ---------------------------------------------------------------- training-time probes

class PersonaProbeCallback(TrainerCallback):
    """Runs the persona probes during training and reports them next to the loss.

    Probes run at every `probes_every`-th evaluation (so they follow trainer.eval_steps) and once
    at the end of training if the last step was not probed; 0 = only at the end. Only the main
    process generates. `metrics` holds the latest values (train() adds them to metrics.json).
    With `eval=none` (empty eval_cfg) the callback does nothing.
    """

    def __init__(self, eval_cfg: DictConfig | None, system_prompt: str | None, wandb_run=None):
        self.enabled = bool(eval_cfg)
        self.run = wandb_run
        self.system_prompt = system_prompt
        self.metrics: dict[str, float] = {}
        self.evaluations = 0
        self._probed_step: int | None = None
        if self.enabled:
            validate_probes(eval_cfg)
            self.probes = load_probes(probes_path(eval_cfg))[: eval_cfg.num_probes or None]
            self.every = eval_cfg.probes_every
            self.batch_size = eval_cfg.batch_size
            self.generation = OmegaConf.to_container(eval_cfg.generation, resolve=True)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not (self.enabled and state.is_world_process_zero):
            return
        self.evaluations += 1
        if self.every and self.evaluations % self.every == 0:
            self.probe(state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.enabled and state.is_world_process_zero and self._probed_step != state.global_step:
            self.probe(state, model, processing_class)

    def probe(self, state, model, tokenizer) -> None:
        metrics, rows = run_probes(model, tokenizer, self.probes, self.system_prompt, self.generation,
                                   self.batch_size)
        self.metrics, self._probed_step = metrics, state.global_step
        logged = {f"{WANDB_PREFIX}{key}": value for key, value in metrics.items()}
        state.log_history.append({**logged, "step": state.global_step})  # kept in trainer_state.json
        log.info("step %d persona probes: %s", state.global_step,
                 ", ".join(f"{key}={value:.3g}" for key, value in metrics.items()))
        if self.run is not None:
            import wandb

            table = wandb.Table(columns=["step", "id", "prompt", "reply", "ended_by_eos"],
                                data=[[state.global_step, r["id"], r["prompt"], r["reply"], r["ended_by_eos"]]
                                      for r in rows])
            self.run.log({**logged, f"{WANDB_PREFIX}replies": table}, step=state.global_step)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from lyra.runs import configure_cli_logging

    configure_cli_logging()
    with exit_on_user_error():
        evaluate(cfg)


if __name__ == "__main__":
    main()
