"""Persona probes: greedy replies to a persona's probe prompts, scored for fidelity to that persona.

    from lyra.probes import load_probes, probes_path, run_probes
    probes = load_probes(probes_path(eval_cfg, persona))
    metrics, rows = run_probes(model, tokenizer, probes, persona, system_prompt, generation, batch_size=8)

The persona metrics and their text checks live in `lyra.persona` (no transformers import there).
A probe line is {"id", "prompt"} plus, optionally, "checks": the persona checks it tests ("name",
"address", "language"); its reply then counts only in those rates (untagged: in every rate).
Drift over long chats (the probes chained turn after turn) is lyra.drift.

`PersonaProbeCallback` runs the probes during training (conf/eval/probes.yaml) every
`eval.probes_every`-th Trainer evaluation and once at the end, logs `probe/*` metrics and a
(prompt, reply) table to the job's W&B run, and puts the final values into metrics.json.
`python -m lyra.evaluate` runs them on a finished run, with the persona stored in that run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from lyra.errors import UserError
from lyra.paths import resolve_user_path
from lyra.persona import checked_counts, persona_metrics, unknown_checks

log = logging.getLogger(__name__)

WANDB_PREFIX = "probe/"


# ---------------------------------------------------------------- probe files

@dataclass
class Probe:
    id: str
    prompt: str
    checks: tuple[str, ...] | None = None  # the persona checks it tests (lyra.persona.CHECKS); None = all


def probes_path(eval_cfg: DictConfig, persona: Mapping) -> Path:
    """eval.probes_file when set, else the persona's probes_file."""
    return resolve_user_path(eval_cfg.get("probes_file") or persona["probes_file"])


def _probes_key(eval_cfg: DictConfig) -> str:
    return "eval.probes_file" if eval_cfg.get("probes_file") else "persona.probes_file"


def load_probes(path: Path, key: str = "eval.probes_file") -> list[Probe]:
    """Probe prompts from a JSONL of {"id", "prompt"} (+ "checks"); a bad line is one error naming FILE:LINE."""
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
        checks = record.get("checks")
        if checks is not None and (problem := unknown_checks(checks)):
            raise UserError(key, f"{path}:{number}: {problem}")
        probes.append(Probe(str(record.get("id", f"{path.stem}-{number}")), prompt,
                            None if checks is None else tuple(dict.fromkeys(checks))))
    if not probes:
        raise UserError(key, f"{path} holds no probes")
    return probes


def selected_probes(eval_cfg: DictConfig, persona: Mapping) -> list[Probe]:
    """The first eval.num_probes probes (all when null) of the probe file in use."""
    return load_probes(probes_path(eval_cfg, persona), _probes_key(eval_cfg))[: eval_cfg.num_probes or None]


def probes_enabled(eval_cfg: DictConfig | None, say: bool = True) -> bool:
    """Whether the eval group turns training-time probes on. `eval=none` is empty, but an experiment
    may still set eval.num_probes on top of it (experiment=cpu_real eval=none): those keys are said
    to be ignored, in one line, and the probes stay off."""
    if not eval_cfg:
        return False
    if "generation" not in eval_cfg:  # every probes option sets its generation; none sets nothing
        if say:  # validate says it once; the training callback checks again quietly
            log.warning("eval=none: probes are off, so %s from the experiment %s ignored",
                        ", ".join(f"eval.{key}" for key in eval_cfg), "is" if len(eval_cfg) == 1 else "are")
        return False
    return True


def validate_probes(eval_cfg: DictConfig | None, persona: Mapping) -> None:
    """Check the eval group (training-time probes) before anything heavy; `eval=none` passes."""
    from lyra.generation import check_generation

    if not probes_enabled(eval_cfg):
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
    selected_probes(eval_cfg, persona)


def run_probes(model, tokenizer, probes: Sequence[Probe], persona: Mapping, system_prompt: str | None,
               generation: dict[str, Any], batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate one reply per probe (batched, same prompt path as chat); (metrics, per-probe rows)."""
    from lyra.generation import build_prompt_ids, generate_in_batches

    prompts = [build_prompt_ids(p.prompt, tokenizer, system_prompt=system_prompt) for p in probes]
    replies = generate_in_batches(prompts, model, tokenizer, batch_size, **generation)
    rows = [{"id": p.id, "prompt": p.prompt, "checks": None if p.checks is None else list(p.checks), "reply": r.text,
             "ended_by_eos": r.ended_by_eos, "think_leak": r.think_leak} for p, r in zip(probes, replies)]
    return persona_metrics(replies, persona, [p.checks for p in probes]), rows


def probes_per_rate(probes: Sequence[Probe], persona: Mapping) -> dict[str, int]:
    """How many of `probes` each checked rate is computed over (tagged probes count only in theirs)."""
    return checked_counts([p.checks for p in probes], str(persona["language"]))


# ---------------------------------------------------------------- training-time probes

class PersonaProbeCallback(TrainerCallback):
    """Runs the persona probes during training and reports them next to the loss.

    Probes run at every `probes_every`-th evaluation (so they follow trainer.eval_steps) and once
    at the end of training if the last step was not probed; 0 = only at the end. Only the main
    process generates. `metrics` holds the latest values (train() adds them to metrics.json).
    With `eval=none` (empty eval_cfg) the callback does nothing. `wandb_run`: the job's run, or None.
    """

    def __init__(self, eval_cfg: DictConfig | None, persona: Mapping, system_prompt: str | None, wandb_run=None):
        self.enabled = probes_enabled(eval_cfg, say=False)
        self.run = wandb_run
        self.persona = persona
        self.system_prompt = system_prompt
        self.metrics: dict[str, float] = {}
        self.evaluations = 0
        self._probed_step: int | None = None
        if self.enabled:
            validate_probes(eval_cfg, persona)
            self.probes = selected_probes(eval_cfg, persona)
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
        metrics, rows = run_probes(model, tokenizer, self.probes, self.persona, self.system_prompt, self.generation,
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
