"""Sweeps that survive their failures and end with a summary.

    python -m lyra.train -m experiment=smoke lora.r=4,8,16 lora.lora_alpha=16,32
    python -m lyra.train experiment=sweep_lora                 # preset grid (r x alpha x modules)
    python -m lyra.train hparams_search=optuna                 # TPE search on objective.metric

`run_job` is what `lyra.train.main` returns to Hydra: the job's objective value (for the Optuna
sweeper). In a multirun, a failing job (a bad value, out of memory, ...) is recorded in
`<job_dir>/failed.json`, its W&B run is marked failed (by lyra.train, which owns the run), and the job returns the worst possible
value instead of raising: Hydra 1.3's basic sweeper re-raises the first failure after the batch
(so no summary is written) and `sys.exit` from a user error would end the sweep on the spot.

`SweepSummary` is a Hydra callback (wired in conf/train.yaml). At the start of a multirun it
writes `<sweep_dir>/sweep.json` (the swept keys, which name each job's W&B run, even when jobs
run in other processes or on other machines); at the end it ranks the jobs, prints the table
and writes `<sweep_dir>/sweep_summary.json` with the best job and its overrides. It also links
every job's W&B run into `<sweep_dir>/wandb/`, so `wandb leet <sweep_dir>/wandb` browses the whole
sweep and `wandb sync <sweep_dir>/wandb/offline-run-*` uploads it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lyra.errors import UserError
from lyra.secrets import scrub

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "sweep_summary.json"
FAILED_FILE = "failed.json"
DIRECTIONS = ("minimize", "maximize")


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def worst_value(direction: str) -> float:
    """What a failed job reports to the sweeper: a complete trial with the worst score, so TPE
    learns to avoid the region (e.g. an r that runs out of memory) instead of crashing on NaN."""
    return math.inf if direction == "minimize" else -math.inf


def check_objective(objective: DictConfig) -> None:
    if objective.direction not in DIRECTIONS:
        raise UserError("objective.direction", f"must be minimize or maximize, got {objective.direction!r}")
    if not isinstance(objective.metric, str) or not objective.metric:
        raise UserError("objective.metric", "must name a key of metrics.json, e.g. eval_loss")


def objective_value(metrics: dict[str, Any], objective: DictConfig) -> float:
    """The number the sweeper optimizes: metrics[objective.metric]."""
    value = metrics.get(objective.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise UserError("objective.metric", f"{objective.metric!r} is not a numeric metric of this run; "
                        f"available: {', '.join(numeric)}")
    return float(value)


def task_overrides() -> list[str]:
    """This job's own overrides (`hydra.*` ones excluded), as Hydra recorded them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("hydra")]


def record_failure(job_dir: Path, error: BaseException, overrides: list[str]) -> dict[str, Any]:
    """Write `failed.json` (error, the key to change for user errors, traceback) into the job dir."""
    record = {
        "status": "failed",
        "error_type": type(error).__name__,
        "error": str(error),
        "key": error.key if isinstance(error, UserError) else None,  # other errors' .key (omegaconf) is no config key
        "overrides": overrides,
        "traceback": "".join(traceback.format_exception(error)),
    }
    record = scrub(record)  # overrides come back from Hydra with ${oc.env:...} resolved
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / FAILED_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return record


def _release_memory() -> None:
    """A failed job's model must not stay resident for the next job of a sequential sweep."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_job(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]]) -> float | None:
    """Train and return the objective; in a multirun, record a failure and return the worst value.

    Single runs keep their normal behaviour: a user error exits 2 with one line, a crash raises.
    """
    check_objective(cfg.objective)  # before training: a typo here would waste a whole sweep
    if not is_multirun():
        metrics = train(cfg)
        return metrics.get(cfg.objective.metric)
    try:
        return objective_value(train(cfg), cfg.objective)
    except Exception as error:  # noqa: BLE001 - any failure of one job must leave the sweep running
        job_dir = Path(cfg.paths.output_dir).resolve()
        record_failure(job_dir, error, task_overrides())  # its W&B run is already closed as failed (lyra.train)
        prefix = "lyra: error: " if isinstance(error, UserError) else f"lyra: job failed: {type(error).__name__}: "
        print(f"{prefix}{error} [{job_dir / FAILED_FILE}]", file=sys.stderr, flush=True)
        log.error("job failed (%s: %s); the sweep goes on", type(error).__name__, error)
    _release_memory()  # outside `except`: the traceback, and the model held by its frames, are gone
    return worst_value(cfg.objective.direction)


def swept_keys(config: DictConfig) -> list[str]:
    """Keys a multirun sweeps: command-line sweeps (`a=1,2`, `choice(...)`) and `hydra.sweeper.params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    keys += [str(key) for key in params if str(key) not in keys]
    return keys


def read_sweep_file(sweep_dir: Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class SweepSummary(Callback):
    """Hydra callback: `sweep.json` at the start of a multirun, ranked summary at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "swept": swept_keys(config),
            "overrides": list(config.hydra.overrides.task),
            "objective": OmegaConf.to_container(config.objective, resolve=True),
            "sweeper": config.hydra.sweeper._target_,
            "launcher": config.hydra.launcher._target_,
        }
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lyra.results import collect_runs, format_table, rank_runs

        sweep_dir = Path(str(config.hydra.sweep.dir))
        metric, direction = config.objective.metric, config.objective.direction
        runs = rank_runs(collect_runs([sweep_dir]), metric, direction)
        summary = summarize(runs, metric, direction, sweep_dir)
        (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        linked = link_wandb_runs(sweep_dir, [run.path for run in runs])
        print(f"\nlyra sweep summary: {sweep_dir} ({summary['completed']} completed, {summary['failed']} failed, "
              f"{summary['incomplete']} incomplete; ranked by {metric}, {direction})")
        print(format_table(runs, metric))
        best = summary["best"]
        if best:
            print(f"best: {best['job']}  {metric}={best['value']:.6g}  overrides: {' '.join(best['overrides'])}")
        else:
            print(f"best: none (no job reported {metric})")
        print(f"saved: {sweep_dir / SUMMARY_FILE}", flush=True)
        if linked:
            hub = sweep_dir / "wandb"
            print(f"W&B: {linked} runs linked in {hub}: browse with `wandb leet {hub}`, "
                  f"upload offline runs with `wandb sync {hub}/offline-run-*`", flush=True)


def link_wandb_runs(sweep_dir: Path, job_dirs: list[Path]) -> int:
    """`<sweep_dir>/wandb/<run>` -> `../<job>/wandb/<run>`: one wandb dir for `wandb leet` / `wandb sync`,
    while each run's files stay in its own job dir. Returns how many runs are linked."""
    run_dirs = [run for job in job_dirs for run in sorted((job / "wandb").glob("*run-*")) if run.is_dir()]
    if not run_dirs:
        return 0
    hub = sweep_dir / "wandb"
    hub.mkdir(exist_ok=True)
    for run_dir in run_dirs:
        link = hub / run_dir.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(os.path.relpath(run_dir, hub), target_is_directory=True)
    return len(run_dirs)


def summarize(runs: list, metric: str, direction: str, sweep_dir: Path) -> dict[str, Any]:
    """The best job and every job's status, from runs already ranked by `rank_runs`."""
    scored = [run for run in runs if run.status == "completed" and isinstance(run.metrics.get(metric), (int, float))]
    best = scored[0] if scored else None

    def job(run) -> dict[str, Any]:
        return {"job": run.label, "status": run.status, "overrides": run.overrides,
                "value": run.metrics.get(metric), "error": run.error}

    return {
        "sweep_dir": str(Path(sweep_dir).resolve()),
        "metric": metric,
        "direction": direction,
        "completed": sum(run.status == "completed" for run in runs),
        "failed": sum(run.status == "failed" for run in runs),
        "incomplete": sum(run.status == "incomplete" for run in runs),
        "best": ({**job(best), "dir": str(best.path.resolve())} if best else None),
        "jobs": [job(run) for run in runs],
    }
