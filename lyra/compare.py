"""Compare training runs locally, no W&B account needed: ranked table, CSV and PNG.

    python -m lyra.compare multirun/2026-11-29/10-00-00          # one sweep dir
    python -m lyra.compare SWEEP_A SWEEP_B outputs/2026-11-29/09-12-31   # sweeps and single runs mixed
    python -m lyra.compare SWEEP --metric eval_loss --direction minimize --out reports/
    python -m lyra.compare SWEEP --metric address_rate                   # persona fidelity, best first
    python -m lyra.compare SWEEP --metric persona_hold                   # after lyra.evaluate drift.turns=8

Runs are found and ranked by lyra.results. The table shows each run's overrides (those that differ
between the runs compared), eval and train loss, trainable params, tokens/s, any persona metrics,
and persona_hold where `lyra.evaluate drift.turns=N` wrote it (the run's evaluation.json).
`compare.csv` holds every metric; `compare.png` plots the ranking metric against each swept
parameter and the train/eval loss curves of every run (from `trainer_state.json`).
Outputs go to the dir given (or to ./lyra-compare when several are given), unless --out says.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from lyra.errors import UserError, exit_on_user_error
from lyra.results import (Run, collect_runs, default_direction, describe, format_table, rank_runs,
                          read_json, score, short_key, table_columns, varying_keys)


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
    history = read_json(run_dir / "trainer_state.json").get("log_history", [])
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
    scored = [run for run in runs if score(run, metric) is not None]
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
        ys = [score(run, metric) for run in scored]
        ax.scatter(xs, ys)
        for x, y, run in zip(xs, ys, scored):
            ax.annotate(describe(run, keys), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {short_key(key)}")
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
    parser.add_argument("--metric", default="eval_loss",
                        help="metric to rank by (a key of metrics.json), e.g. address_rate")
    parser.add_argument("--direction", default="auto", choices=("auto", "minimize", "maximize"),
                        help="auto: minimize losses, perplexity, think_leak_rate and simplified_rate; "
                             "maximize the other persona rates (address_rate, self_name_rate, ...) and "
                             "the drift holds (persona_hold, ...)")
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
        direction = default_direction(args.metric) if args.direction == "auto" else args.direction
        runs = rank_runs(runs, args.metric, direction)
        out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path("lyra-compare"))
        out.mkdir(parents=True, exist_ok=True)
        print(format_table(runs, args.metric))
        write_csv(runs, args.metric, out / "compare.csv")
        plot(runs, args.metric, out / "compare.png")
        print(f"\nwrote {out / 'compare.csv'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
