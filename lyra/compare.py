"""Compare training runs locally, no W&B account needed: ranked table, CSV and PNG.

    python -m lyra.compare multirun/2026-11-29/10-00-00          # one sweep dir
    python -m lyra.compare SWEEP_A SWEEP_B outputs/2026-11-29/09-12-31   # sweeps and single runs mixed
    python -m lyra.compare SWEEP --metric eval_loss --direction minimize --out reports/

Each run dir is found by its `metrics.json` (completed), `failed.json` (failed, see lyra.sweep) or
`.hydra/` (started, never finished). The table shows each run's overrides (those that differ
between the runs compared), eval and train loss, trainable params, tokens/s and any persona
metrics. `compare.csv` holds every metric; `compare.png` plots the ranking metric against each
swept parameter and the train/eval loss curves of every run (from `trainer_state.json`).
Outputs go to the dir given (or to ./lyra-compare when several are given), unless --out says.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra.errors import UserError, exit_on_user_error

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


def _read_json(path: Path) -> dict[str, Any]:
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


def load_run(run_dir: Path, label: str) -> Run:
    metrics = _read_json(run_dir / "metrics.json")
    failed = _read_json(run_dir / "failed.json") if (run_dir / "failed.json").exists() else None
    status = "failed" if failed is not None else "completed" if metrics else "incomplete"
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
            runs.append(load_run(run_dir, label))
    return runs


def _score(run: Run, metric: str) -> float | None:
    value = run.metrics.get(metric)
    if run.status != "completed" or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def rank_runs(runs: list[Run], metric: str, direction: str) -> list[Run]:
    """Best first; runs without the metric (failed, incomplete) keep their order at the end."""
    if direction not in ("minimize", "maximize"):
        raise UserError("--direction", f"must be minimize or maximize, got {direction!r}")
    sign = 1 if direction == "minimize" else -1
    scored = [run for run in runs if _score(run, metric) is not None]
    unscored = [run for run in runs if _score(run, metric) is None]
    return sorted(scored, key=lambda run: sign * _score(run, metric)) + unscored


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (a key missing from a run counts as differing)."""
    keys: list[str] = []
    for run in runs:
        keys += [key for key in run.params if key not in keys]
    return [key for key in keys if len({run.params.get(key) for run in runs}) > 1]


def persona_keys(runs: list[Run]) -> list[str]:
    """The persona probe metrics (lyra.evaluate) that at least one run reports."""
    from lyra.evaluate import PERSONA_METRICS

    return [key for key in PERSONA_METRICS if any(isinstance(run.metrics.get(key), (int, float)) for run in runs)]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def describe(run: Run, keys: list[str]) -> str:
    """The run's distinguishing overrides, `r=16,lora_alpha=32`; all overrides if none differ."""
    params = run.params
    chosen = [f"{_short(key)}={params[key]}" for key in keys if key in params]
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


def write_csv(runs: list[Run], metric: str, path: Path) -> None:
    keys = varying_keys(runs)
    metric_keys = table_columns(runs, metric)
    metric_keys += sorted({k for run in runs for k in run.metrics if k not in metric_keys})
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "run", "status", "overrides", *keys, *metric_keys, "error", "path"])
        for rank, run in enumerate(runs, start=1):
            writer.writerow([rank, run.label, run.status, " ".join(run.overrides),
                             *[run.params.get(key, "") for key in keys],
                             *[run.metrics.get(key, "") for key in metric_keys], run.error or "", str(run.path)])


def loss_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{'loss': (steps, values), 'eval_loss': (...)} from the run's trainer_state.json."""
    history = _read_json(run_dir / "trainer_state.json").get("log_history", [])
    curves = {}
    for key in ("loss", "eval_loss"):
        points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
        if points:
            curves[key] = ([step for step, _ in points], [value for _, value in points])
    return curves


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot(runs: list[Run], metric: str, path: Path) -> None:
    """One panel of `metric` against each varying parameter, then one of every run's loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varying_keys(runs)
    scored = [run for run in runs if _score(run, metric) is not None]
    panels = len(keys) + 1
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, key in zip(flat, keys):
        values = [run.params.get(key, "(default)") for run in scored]
        numbers = [_as_number(value) for value in values]
        if numbers and all(number is not None for number in numbers):
            xs: list[float] = numbers  # type: ignore[assignment]
        else:  # lists of modules, names: one slot per distinct value, in first-seen order
            categories = list(dict.fromkeys(values))
            xs = [categories.index(value) for value in values]
            ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right", fontsize=8)
        ys = [_score(run, metric) for run in scored]
        ax.scatter(xs, ys)
        for x, y, run in zip(xs, ys, scored):
            ax.annotate(describe(run, keys), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {_short(key)}")
        ax.grid(alpha=0.3)
    curves_ax = flat[len(keys)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        name = describe(run, keys)
        for key, style in (("loss", ".-"), ("eval_loss", "o--")):  # markers: a short run has 1 eval point
            curve = loss_curves(run.path).get(key)
            if curve:
                curves_ax.plot(*curve, style, color=color, label=f"{name} ({'train' if key == 'loss' else 'eval'})")
    curves_ax.set_xlabel("step")
    curves_ax.set_ylabel("loss")
    curves_ax.set_title("loss curves (train solid, eval dashed)")
    curves_ax.grid(alpha=0.3)
    if curves_ax.lines:
        curves_ax.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lyra.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, metavar="SWEEP_DIR", help="sweep dirs, run dirs, or dirs of them")
    parser.add_argument("--metric", default="eval_loss", help="metric to rank by (a key of metrics.json)")
    parser.add_argument("--direction", default="minimize", choices=("minimize", "maximize"))
    parser.add_argument("--out", type=Path, default=None,
                        help="where compare.csv and compare.png go (default: the one dir given, else ./lyra-compare)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with exit_on_user_error():
        runs = collect_runs(args.dirs)
        if not runs:
            raise UserError("SWEEP_DIR", f"no run found under {', '.join(map(str, args.dirs))} "
                                         "(looked for metrics.json, failed.json or .hydra/)")
        runs = rank_runs(runs, args.metric, args.direction)
        out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path("lyra-compare"))
        out.mkdir(parents=True, exist_ok=True)
        print(format_table(runs, args.metric))
        write_csv(runs, args.metric, out / "compare.csv")
        plot(runs, args.metric, out / "compare.png")
        print(f"\nwrote {out / 'compare.csv'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
