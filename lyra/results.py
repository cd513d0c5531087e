"""Finished runs as records on disk: find run dirs, read their metrics, rank and tabulate them.

    from lyra.results import collect_runs, rank_runs, format_table
    runs = rank_runs(collect_runs([Path("multirun/2026-11-29/10-00-00")]), "address_rate", "maximize")
    print(format_table(runs, "address_rate"))

Each run dir is found by its `metrics.json` (completed), `failed.json` (failed, see lyra.sweep) or
`.hydra/` (started, never finished). Used by the sweep summary (lyra.sweep) and `python -m lyra.compare`.
A run's `evaluation.json` (python -m lyra.evaluate drift.turns=N) adds the drift holds (persona_hold,
lyra.persona.HOLD_KEYS) that training does not measure; metrics.json keeps every key it has.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra.errors import UserError

RUN_MARKERS = ("metrics.json", "failed.json", ".hydra")
SKIP_DIRS = {"adapter", "checkpoints", "wandb", ".hydra", ".submitit"}
MAX_DEPTH = 4  # sweep dir / job dir is depth 1; nested launch layouts stay well under this


@dataclass
class Run:
    path: Path
    label: str
    status: str  # completed | failed | incomplete
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def params(self) -> dict[str, str]:
        """Overridden key -> value as typed, e.g. {'lora.r': '16'}."""
        return dict(override.lstrip("+~").split("=", 1) for override in self.overrides if "=" in override)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path) if not str(o).lstrip("+~").startswith("hydra")]


def _is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_run_dirs(root: Path, depth: int = 0) -> list[Path]:
    """Run dirs at or below root (a run dir itself, a sweep dir, or a dir of sweeps)."""
    if _is_run_dir(root):
        return [root]
    if depth >= MAX_DEPTH or not root.is_dir():
        return []
    found = []
    for child in sorted((c for c in root.iterdir() if c.is_dir() and c.name not in SKIP_DIRS), key=_job_order):
        found += find_run_dirs(child, depth + 1)
    return found


def evaluated_holds(run_dir: Path) -> dict[str, float]:
    """The drift holds lyra.evaluate wrote to the run's evaluation.json (none without drift.turns)."""
    from lyra.persona import HOLD_KEYS

    evaluation = read_json(run_dir / "evaluation.json")
    return {key: evaluation[key] for key in HOLD_KEYS if isinstance(evaluation.get(key), (int, float))}


def read_run(run_dir: Path, label: str) -> Run:
    metrics = read_json(run_dir / "metrics.json")
    failed = read_json(run_dir / "failed.json") if (run_dir / "failed.json").exists() else None
    status = "failed" if failed is not None else "completed" if metrics else "incomplete"
    if metrics:
        metrics = {**evaluated_holds(run_dir), **metrics}
    overrides = _read_overrides(run_dir) or (failed or {}).get("overrides", [])
    error = f"{failed.get('error_type')}: {failed.get('error')}" if failed is not None else None
    return Run(path=run_dir, label=label, status=status, overrides=overrides, metrics=metrics, error=error)


def collect_runs(dirs: list[Path]) -> list[Run]:
    """Every run under the given dirs; labels are paths relative to the dir they were found in."""
    runs = []
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            raise UserError("SWEEP_DIR", f"not a directory: {root}")
        for run_dir in find_run_dirs(root):
            relative = run_dir.relative_to(root).as_posix()
            label = root.name if relative == "." else f"{root.name}/{relative}" if len(dirs) > 1 else relative
            runs.append(read_run(run_dir, label))
    return runs


def score(run: Run, metric: str) -> float | None:
    value = run.metrics.get(metric)
    if run.status != "completed" or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def default_direction(metric: str) -> str:
    """minimize for losses, perplexity and the failure rates, maximize for the persona rates."""
    from lyra.persona import metric_direction

    return metric_direction(metric)


def rank_runs(runs: list[Run], metric: str, direction: str) -> list[Run]:
    """Best first; runs without the metric (failed, incomplete) keep their order at the end."""
    if direction not in ("minimize", "maximize"):
        raise UserError("--direction", f"must be minimize or maximize, got {direction!r}")
    sign = 1 if direction == "minimize" else -1
    scored = [run for run in runs if score(run, metric) is not None]
    unscored = [run for run in runs if score(run, metric) is None]
    return sorted(scored, key=lambda run: sign * score(run, metric)) + unscored


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (a key missing from a run counts as differing)."""
    keys: list[str] = []
    for run in runs:
        keys += [key for key in run.params if key not in keys]
    return [key for key in keys if len({run.params.get(key) for run in runs}) > 1]


def persona_keys(runs: list[Run]) -> list[str]:
    """The persona probe metrics and drift holds (lyra.persona) that at least one run reports."""
    from lyra.persona import HOLD_KEYS, PERSONA_METRICS

    return [key for key in (*PERSONA_METRICS, *HOLD_KEYS)
            if any(isinstance(run.metrics.get(key), (int, float)) for run in runs)]


def short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def describe(run: Run, keys: list[str]) -> str:
    """The run's distinguishing overrides, `r=16,lora_alpha=32`; all overrides if none differ."""
    params = run.params
    chosen = [f"{short_key(key)}={params[key]}" for key in keys if key in params]
    return ",".join(chosen) or ",".join(run.overrides) or "(defaults)"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def table_columns(runs: list[Run], metric: str) -> list[str]:
    columns = ["eval_loss", "final_train_loss", "trainable_params", "tokens_per_second", *persona_keys(runs)]
    return [metric, *[c for c in columns if c != metric]]


def format_table(runs: list[Run], metric: str) -> str:
    """A plain-text table, ranked as given."""
    keys = varying_keys(runs)
    columns = table_columns(runs, metric)
    header = ["#", "run", "status", "overrides", *columns]
    rows = []
    for rank, run in enumerate(runs, start=1):
        values = [_fmt(run.metrics.get(column)) for column in columns]
        status = run.status if run.error is None else f"failed: {run.error[:60]}"
        rows.append([str(rank), run.label, status, describe(run, keys), *values])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
