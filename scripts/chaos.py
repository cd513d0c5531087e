"""Kills at random moments: SIGKILL a smoke training, a safetensors export or a GGUF export at a
seeded random time, rerun the same command, and check that nothing half-written passes for complete.

    python scripts/chaos.py 30                       # 30 trials (train, export, gguf in turn), seed 0
    python scripts/chaos.py 3 --seed 1 --kinds train # what the slow test runs
    scripts/chaos_train.sh 30                        # the same, as a shell command

First it runs each command once uninterrupted (the reference, and its duration T). Each trial then
starts the command in a fresh dir, sends SIGKILL after uniform(0, T) seconds (seeded; a trial that
finishes before its kill lowers T to its own duration, so a busy machine during the reference does
not leave most trials unkilled), and checks:

- after the kill, every `checkpoints/checkpoint-N`, `adapter/`, tokenized-cache file and export
  that exists under its final name is complete (lyra's own completeness rule, and every
  safetensors / npz / GGUF / JSON file in it parses): otherwise the trial counts as *corrupt*;
- the rerun of the same command exits 0 within a time limit (a stale lock would hang it);
- the rerun's adapter (training) or model file (exports) equals the reference bit for bit
  (*exact*), else its largest absolute difference is reported, and the trial fails the run.
  Trials whose rerun resumed from the *last* checkpoint (step == trainer.max_steps, killed before
  the adapter was saved) are counted too (`resumed_at_final_step`): there the rerun takes no step
  (`lyra.checkpointing.train_from`; the Trainer alone would take one past max_steps).

The tokenized cache is emptied before each training trial, so kills also land in its write.
Prints one JSON summary (also written to <workdir>/chaos.json); exit 1 when a trial failed.
Training uses the fast settings of tests/test_resume.py (full precision tiny Qwen3, dropout on).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["experiment=smoke", "logger=none", "quantization=none", "data.max_length=128", "trainer.eval_strategy=no",
         "trainer.logging_steps=1", "trainer.max_steps=8", "trainer.save_steps=2", "trainer.save_total_limit=2",
         "trainer.per_device_train_batch_size=1"]
KINDS = ("train", "export", "gguf")
FINAL_STEP = int(next(a for a in TRAIN if a.startswith("trainer.max_steps=")).split("=")[1])


def command(kind: str, target: Path, reference_run: Path) -> list[str]:
    if kind == "train":
        return [sys.executable, "-m", "lyra.train", *TRAIN, f"hydra.run.dir={target}"]
    fmt = "safetensors" if kind == "export" else "gguf"
    # overwrite=true: a kill after the rename leaves a finished export, which the rerun replaces
    return [sys.executable, "-m", "lyra.export", f"run_dir={reference_run}", f"output_dir={target}",
            f"format={fmt}", "overwrite=true"]


def run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, "timed out (a stale lock or a hang)"
    return done.returncode, time.monotonic() - start, done.stderr[-1500:]


# ------------------------------------------------------------------ what counts as complete

def problems(kind: str, target: Path, cache: Path) -> list[str]:
    """Files present under their final names that do not parse, or dirs lyra calls complete that are not."""
    import numpy as np
    from safetensors.torch import load_file

    from lyra.checkpointing import checkpoint_problem

    found = []

    def check_file(path: Path) -> None:
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    for name in data.files:
                        data[name]
            elif path.suffix == ".gguf":
                from gguf import GGUFReader

                GGUFReader(str(path))
        except Exception as error:  # any parse failure of a file under its final name is corruption
            found.append(f"{path}: {type(error).__name__}: {str(error)[:120]}")

    def check_dir(directory: Path) -> None:
        for path in directory.rglob("*"):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts):
                check_file(path)

    for npz in (cache / "tokenized").glob("*.npz"):
        check_file(npz)
    if kind == "train":
        for checkpoint in sorted((target / "checkpoints").glob("checkpoint-*")):
            if checkpoint_problem(checkpoint) is None:  # lyra would resume from it: it must be whole
                check_dir(checkpoint)
        for name in ("adapter", "interrupted"):
            if (target / name).is_dir():
                if not (target / name / "adapter_model.safetensors").is_file():
                    found.append(f"{target / name}: no adapter_model.safetensors")
                check_dir(target / name)
    elif target.is_dir():  # an export under its final name must be whole
        from lyra.export import PROVENANCE_FILE

        if not (target / PROVENANCE_FILE).is_file():
            found.append(f"{target}: no {PROVENANCE_FILE}")
        check_dir(target)
    return found


def weights_file(kind: str, target: Path) -> Path:
    if kind == "train":
        return target / "adapter" / "adapter_model.safetensors"
    if kind == "export":
        return target / "model.safetensors"
    return next(target.glob("*.gguf"))


def compare(kind: str, result: Path, reference: Path) -> tuple[bool, float | None]:
    """(bit-identical, largest absolute difference for tensors; None when byte-compared)."""
    if kind == "gguf":
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (result, reference)]
        return digest[0] == digest[1], None
    from safetensors.torch import load_file

    a, b = load_file(str(result)), load_file(str(reference))
    if a.keys() != b.keys():
        return False, float("inf")
    diff = max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)
    return all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a), diff


def leftovers(kind: str, target: Path) -> list[str]:
    """Staging/aside dirs a kill left (dot-named: never read, but litter until a later save cleans them)."""
    places = [target, target / "checkpoints"] if kind == "train" else [target.parent]
    return sorted(str(p) for place in places if place.is_dir() for p in place.iterdir()
                  if p.name.startswith(".") and p.name not in (".hydra",) and
                  (kind == "train" or p.name.startswith(f".{target.name}.")))


# ------------------------------------------------------------------ trials

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trials", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, taken in turn: train,export,gguf")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir (removed unless --keep)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--rerun-timeout", type=float, default=600)
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if not set(kinds) <= set(KINDS) or args.trials < 1:
        parser.error(f"--kinds must name some of {', '.join(KINDS)}; trials >= 1")
    rng = random.Random(args.seed)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lyra-chaos-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LYRA_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.setdefault("OMP_NUM_THREADS", "1")

    reference_run = workdir / "reference" / "run"
    references: dict[str, Path] = {}
    durations: dict[str, float] = {}
    for kind in ["train", *[k for k in KINDS if k in kinds and k != "train"]]:
        target = reference_run if kind == "train" else workdir / "reference" / kind
        code, seconds, err = run(command(kind, target, reference_run), workdir, env, args.rerun_timeout)
        if code != 0:
            print(f"reference {kind} failed ({code}): {err}", file=sys.stderr)
            return 1
        references[kind], durations[kind] = weights_file(kind, target), seconds

    records = []
    for trial in range(args.trials):
        kind = kinds[trial % len(kinds)]
        target = workdir / "trials" / f"{trial:03d}-{kind}"
        if kind == "train":
            shutil.rmtree(cache / "tokenized", ignore_errors=True)  # the cache write is a kill target too
        cmd = command(kind, target, reference_run)
        kill_after = rng.uniform(0, durations[kind])
        started = time.monotonic()
        process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=kill_after)
            killed = False  # finished first: a trial without a kill
            # the reference ran slower (a busy machine): later kill times are drawn within this faster run
            durations[kind] = min(durations[kind], time.monotonic() - started)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed = True
        after_kill = problems(kind, target, cache)
        resumable = None  # training: the step the rerun continues from (None: it starts over)
        if kind == "train":
            from lyra.checkpointing import scan_checkpoints

            complete, _ = scan_checkpoints(target / "checkpoints")
            resumable = int(complete[-1].name.rsplit("-", 1)[1]) if complete else None
        finished = kind == "train" and (target / "metrics.json").is_file()
        if finished:
            code, err = 0, ""  # the run had finished; a rerun is refused by design (lyra.checkpointing)
        else:
            code, _, err = run(cmd, workdir, env, args.rerun_timeout)
        after_rerun = problems(kind, target, cache) if code == 0 else []
        exact, diff = compare(kind, weights_file(kind, target), references[kind]) if code == 0 else (False, None)
        record = {"trial": trial, "kind": kind, "kill_after_s": round(kill_after, 2), "killed": killed,
                  "resumed_from_step": resumable,
                  "resumed_at_final_step": resumable == FINAL_STEP and not finished,
                  "rerun_exit": code, "corrupt_after_kill": after_kill, "corrupt_after_rerun": after_rerun,
                  "exact": exact, "max_abs_diff": diff, "leftovers": leftovers(kind, target)}
        if code != 0:
            record["rerun_stderr"] = err
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "rerun_stderr"}), file=sys.stderr, flush=True)
        (workdir / "chaos_records.jsonl").open("a").write(json.dumps(record) + "\n")  # survives a stopped run
        if not args.keep:
            shutil.rmtree(target, ignore_errors=True)

    by_kind = {kind: [r for r in records if r["kind"] == kind] for kind in kinds}
    summary = {
        "seed": args.seed, "trials": len(records), "kills": sum(r["killed"] for r in records),
        "recovered": sum(r["rerun_exit"] == 0 for r in records),
        "corrupt": sum(bool(r["corrupt_after_kill"] or r["corrupt_after_rerun"]) for r in records),
        "exact": sum(r["exact"] for r in records),
        "resumed_at_final_step": sum(r["resumed_at_final_step"] for r in records),
        "inexact": sum(not r["exact"] for r in records),
        "by_kind": {kind: {"trials": len(rs), "kills": sum(r["killed"] for r in rs),
                           "resumed": sum(r["resumed_from_step"] is not None for r in rs),
                           "recovered": sum(r["rerun_exit"] == 0 for r in rs), "exact": sum(r["exact"] for r in rs),
                           "max_abs_diff": max((r["max_abs_diff"] or 0.0 for r in rs), default=0.0),
                           "with_leftovers": sum(bool(r["leftovers"]) for r in rs)}
                    for kind, rs in by_kind.items()},
        "failures": [r for r in records if r["rerun_exit"] != 0 or r["corrupt_after_kill"] or r["corrupt_after_rerun"]
                     or not r["exact"]],
    }
    (workdir / "chaos.json").write_text(json.dumps({"summary": summary, "records": records}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = summary["recovered"] == summary["trials"] and not summary["corrupt"] and not summary["inexact"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
