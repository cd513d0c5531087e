"""Measure a trained persona: eval loss / perplexity, and persona fidelity on probe prompts.

    python -m lyra.evaluate run_dir=outputs/2026-01-01/12-00-00        # -> <run_dir>/evaluation.json
    python -m lyra.evaluate run_dir=R adapter=none                      # the bare base, for contrast
    python -m lyra.evaluate run_dir=R compare_base=true                 # trained and bare base side by side
    python -m lyra.evaluate run_dir=R eval.num_probes=10 eval.generation.max_new_tokens=64
    python -m lyra.evaluate run_dir=R eval_file=my_heldout.jsonl
    python -m lyra.evaluate run_dir=R targets=hf,merged,gguf,server   # parity: the persona served 4 ways (lyra.parity)
    python -m lyra.evaluate run_dir=R drift.turns=8                     # persona per turn of long chats (lyra.drift)

The persona metrics (address_rate, self_name_rate, language_rate, simplified_rate for zh-TW, ...;
see lyra.probes) count the words of the persona the run was trained with, read from its
resolved_config.yaml; its probes_file is used unless eval.probes_file is given. Runs from before
the persona group fall back to the default persona, with a logged note (lyra.runs.run_persona).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lyra.cli import hydra_app
from lyra.errors import UserError
from lyra.paths import resolve_user_path
from lyra.persona import HOLD_KEYS, PERSONA_METRICS
from lyra.probes import probes_per_rate, run_probes, selected_probes, validate_probes

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- eval loss

def eval_loss(model, dataset, tokenizer, batch_size: int) -> tuple[float, int]:
    """(mean NLL per supervised token, number of supervised tokens) over a tokenized split.

    Token-weighted, so it can differ slightly from the Trainer's eval_loss (a mean of batch means).
    Uses training's collator and supervised-only loss (lyra.loss): no full-vocabulary logits.
    """
    import torch

    from lyra.data.collate import build_collator
    from lyra.data.tokenization import IGNORE_INDEX
    from lyra.loss import shifted_targets, supervised_loss

    collator = build_collator(tokenizer, model, padding_free=False)
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {key: value.to(device) for key, value in collator(features).items()}
            tokens = int((shifted_targets(batch["labels"]) != IGNORE_INDEX).sum())  # positions that predict
            if tokens:
                loss_sum, _ = supervised_loss(model, head, batch, num_items_in_batch=1)  # a sum
                total += float(loss_sum)
                count += tokens
    return (total / count if count else float("nan")), count


def perplexity(loss: float | None) -> float | None:
    if loss is None or math.isnan(loss):
        return None
    return math.exp(loss) if loss < 700 else float("inf")


def eval_data_config(run_cfg: DictConfig, run_dir: Path, eval_file: str | None) -> DictConfig:
    """The run's data config with paths made absolute (and eval_file replaced when given)."""
    from lyra.runs import launch_dir

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


def _shown(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def table_keys(results: dict[str, Any]) -> list[str]:
    return ["eval_loss", "perplexity", "eval_tokens", "num_probes",
            *(k for k in (*PERSONA_METRICS, *HOLD_KEYS) if k in results)]


def rates_note(results: dict[str, Any]) -> list[str]:
    """Which rates were computed over fewer probes than all (tagged probes, lyra.persona.CHECKS)."""
    counts, total = results.get("probes_per_rate", {}), results.get("num_probes")
    partial = [f"{metric} over {count}" for metric, count in counts.items() if count != total]
    return [f"(of {total} probes, by their \"checks\": {', '.join(partial)})"] if partial else []


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'metric':<18}{'value':>12}", "-" * 30]
    lines += [f"{key:<18}{_shown(results.get(key)):>12}" for key in table_keys(results)]
    return "\n".join(lines + rates_note(results))


def format_comparison(results: dict[str, Any]) -> str:
    """Base and trained side by side, with trained - base."""
    base, delta = results["base"], results["delta"]
    lines = [f"{'metric':<18}{'base':>12}{'trained':>12}{'delta':>12}", "-" * 54]
    for key in table_keys(results):
        change = delta.get(key)
        lines.append(f"{key:<18}{_shown(base.get(key)):>12}{_shown(results.get(key)):>12}"
                     f"{('n/a' if change is None else f'{change:+.4f}'):>12}")
    return "\n".join(lines + rates_note(results))


def measure(model, tokenizer, splits, probes, persona, system_prompt: str, eval_cfg: DictConfig,
            drift=None) -> dict[str, Any]:
    """Eval loss over the split and persona metrics over the probes (and drift), for `model` as it is now."""
    loss, tokens = (None, 0)
    if splits.eval is not None:
        loss, tokens = eval_loss(model, splits.eval, tokenizer, eval_cfg.batch_size)
    generation = OmegaConf.to_container(eval_cfg.generation, resolve=True)
    metrics, rows = run_probes(model, tokenizer, probes, persona, system_prompt, generation, eval_cfg.batch_size)
    drifted = drift.run(model, tokenizer, persona, system_prompt) if drift else {}
    return {"eval_loss": loss, "perplexity": perplexity(loss), "eval_tokens": tokens, "num_probes": len(rows),
            **metrics, "probes_per_rate": probes_per_rate(probes, persona), **drifted, "replies": rows}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The evaluate app for a composed conf/evaluate.yaml; returns what it writes to the JSON."""
    from lyra.data import build_datasets
    from lyra.drift import format_drift_table, plan_drift
    from lyra.runs import DEFAULT_ADAPTER, NO_ADAPTER, load_run, open_run, run_persona
    from lyra.tracking import update_run_summary

    if OmegaConf.is_missing(cfg, "run_dir"):
        raise UserError("run_dir", "is required: python -m lyra.evaluate run_dir=<training output dir>")
    if not cfg.eval:
        raise UserError("eval", "eval=none leaves nothing to evaluate; use eval=probes")
    if cfg.compare_base and str(cfg.adapter).lower() == NO_ADAPTER:
        raise UserError("compare_base", "adapter=none already evaluates the bare base; drop one of the two")
    files = open_run(cfg.run_dir, cfg.adapter)  # the untrusted-run-dir checks, once
    run_dir = files.path
    persona = run_persona(files.cfg, run_dir)
    validate_probes(cfg.eval, persona)
    probes = selected_probes(cfg.eval, persona)
    if cfg.targets is not None:
        if cfg.drift.turns:
            raise UserError("drift.turns", "the parity check runs the probes only; drop drift.turns or targets")
        return check_parity(cfg, run_dir, persona, probes)
    data_cfg = eval_data_config(files.cfg, run_dir, cfg.eval_file)
    drift = plan_drift(cfg.drift, data_cfg, cfg.eval, persona)  # None with drift.turns=0; checked before the model
    run = load_run(files, device=cfg.device, prepack=cfg.prepack)

    splits = build_datasets(data_cfg, run.tokenizer)
    measured = measure(run.model, run.tokenizer, splits, probes, persona, run.system_prompt, cfg.eval, drift)
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "adapter": run.adapter,
        "eval_file": data_cfg.get("eval_file"),
        "eval_examples": len(splits.eval) if splits.eval is not None else 0,
        "persona": {key: persona.get(key) for key in ("name", "user_address", "language")},
        **measured,
        "generation": OmegaConf.to_container(cfg.eval.generation, resolve=True),
    }
    if cfg.compare_base:  # the same model with its adapter off: same probes, same split, same decoding
        with run.adapter_disabled():
            base = measure(run.model, run.tokenizer, splits, probes, persona, run.system_prompt, cfg.eval, drift)
        results["base"] = base
        results["delta"] = {key: results[key] - base[key] for key in table_keys(results)
                            if isinstance(results.get(key), (int, float)) and isinstance(base.get(key), (int, float))}
    path = output_path(run_dir, run.adapter, cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(format_comparison(results) if cfg.compare_base else format_table(results))
    if drift:
        holds = {key: results[key] for key in HOLD_KEYS}
        print("\n" + format_drift_table(results["drift"], holds))
        if cfg.compare_base:
            print("\nbase (adapter off) " + format_drift_table(base["drift"], {key: base[key] for key in HOLD_KEYS}))
        if run.adapter == DEFAULT_ADAPTER:  # the run's own adapter: its W&B run (if it has one) gets the holds
            update_run_summary(run_dir, run.cfg, holds)
    print(f"\n{len(results['replies'])} probe replies and all metrics written to {path}")
    return results


def check_parity(cfg: DictConfig, run_dir: Path, persona, probes) -> dict[str, Any]:
    """targets=...: the parity check (lyra.parity), written under `parity` in the evaluation JSON
    (its other keys, from an earlier plain evaluation, are kept)."""
    from lyra.parity import format_parity, parity_check

    if cfg.compare_base:
        raise UserError("compare_base", "the parity check compares the trained persona only; drop compare_base")
    generation = OmegaConf.to_container(cfg.eval.generation, resolve=True)
    report = parity_check(run_dir, cfg.targets, probes, persona, generation, adapter=cfg.adapter, device=cfg.device,
                          **OmegaConf.to_container(cfg.parity, resolve=True))
    path = output_path(run_dir, str(cfg.adapter), cfg.output_file)
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"run_dir": str(run_dir)}
    results["parity"] = report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(format_parity(report))
    print(f"\nparity written to {path} (key `parity`)")
    return results


def targets_as_list(argv: list[str]) -> list[str]:
    """`targets=hf,merged` as Hydra reads a list: unquoted, Hydra would take the commas for a sweep."""
    return [f"targets=[{arg.split('=', 1)[1]}]" if arg.startswith("targets=") and "," in arg
            and not arg.split("=", 1)[1].startswith(("[", "'", '"')) else arg for arg in argv]


@hydra_app("evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    sys.argv = targets_as_list(sys.argv)
    main()
