"""Sweeps end to end: a real multirun (basic launcher, one job failing), read back from disk and
from the offline W&B runs; the same sweep through submitit; an Optuna search whose jobs all fail.

The two-job multirun subprocess is shared by the tests of this module (`grid_sweep`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lyra import compare
from lyra.errors import UserError
from lyra.persona import PERSONA_METRICS
from lyra.sweep import check_objective, objective_value, swept_keys, worst_value
from lyra.tracking import run_name

FAST = ["experiment=smoke", "trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_strategy=no"]


def lyra_train(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(cwd / "home")}  # anything written under ~ would show up here
    return subprocess.run([sys.executable, "-m", "lyra.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wandb_run_record(job_dir: Path) -> dict:
    """The offline run of one job, read back with wandb's own reader: run record + final summary."""
    run_files = list((job_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, f"{job_dir}: expected exactly one W&B run, got {run_files}"
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_files[0])], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    summary: dict = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    run["summary"] = summary
    run["artifacts"] = [r["artifact"] for r in records if r["type"] == "artifact"]
    return run


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, small_corpus):
    """lora.r=4,8,0 with W&B on and adapters uploaded: two jobs train, r=0 fails validation."""
    cwd = tmp_path_factory.mktemp("grid")
    result = lyra_train(["-m", *FAST, *small_corpus, "lora.r=4,8,0", "logger.log_adapter=true", "hydra.sweep.dir=S"],
                        cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, cwd / "S", result


@pytest.mark.slow
def test_grid_sweep_survives_a_failed_job_and_writes_a_summary(grid_sweep):
    cwd, sweep, result = grid_sweep
    for job in ("0", "1"):
        assert (sweep / job / "adapter" / "adapter_model.safetensors").is_file()
        assert not (sweep / job / "failed.json").exists()
    failed = json.loads((sweep / "2" / "failed.json").read_text())
    assert failed["key"] == "lora.r" and failed["error"] == "lora.r: must be an integer > 0, got 0"
    assert "lora.r=0" in failed["overrides"]
    assert not (sweep / "2" / "adapter").exists()
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("lyra: error:")]
    failed_file = (sweep / "2").resolve() / "failed.json"
    assert error_lines == [f"lyra: error: lora.r: must be an integer > 0, got 0 [{failed_file}]"]

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    losses = {job: json.loads((sweep / job / "metrics.json").read_text())["eval_loss"] for job in ("0", "1")}
    best_job = min(losses, key=losses.get)
    assert (summary["completed"], summary["failed"], summary["incomplete"]) == (2, 1, 0)
    assert summary["best"]["job"] == best_job and summary["best"]["value"] == losses[best_job]
    assert f"lora.r={'4' if best_job == '0' else '8'}" in summary["best"]["overrides"]
    assert [job["job"] for job in summary["jobs"]][-1] == "2"  # failed jobs rank last
    assert f"best: {best_job}  eval_loss=" in result.stdout
    assert json.loads((sweep / "sweep.json").read_text())["swept"] == ["lora.r"]
    # isolation: nothing outside the sweep dir, not even under $HOME (W&B artifact staging)
    assert sorted(p.name for p in cwd.iterdir() if p.name != "home") == ["S"]  # home: the redirected ~, if used
    home_files = [p for p in (cwd / "home").rglob("*") if p.is_file() and "wandb" in p.parts and "artifacts" in p.parts]
    assert home_files == []


@pytest.mark.slow
def test_grid_sweep_wandb_runs_share_a_group_and_carry_swept_values(grid_sweep):
    _, sweep, _ = grid_sweep
    assert not (sweep / "2" / "wandb").exists()  # the failed job never got as far as a run
    # the sweep's wandb/ links each job's run, for `wandb leet S/wandb` and `wandb sync S/wandb/offline-run-*`
    hub = {link.resolve() for link in (sweep / "wandb").iterdir()}
    assert hub == {run.resolve() for job in ("0", "1") for run in (sweep / job / "wandb").glob("offline-run-*")}
    assert len(hub) == 2
    runs = {job: wandb_run_record(sweep / job) for job in ("0", "1")}
    groups = {run["run_group"] for run in runs.values()}
    assert len(groups) == 1 and groups.pop() == f"{sweep.parent.name}/S"
    for job, r in (("0", 4), ("1", 8)):
        run = runs[job]
        assert run["display_name"] == f"r={r}" and run["job_type"] == "train"
        config = run["config"]["update"]
        assert config["lora"]["r"] == r and config["trainer"]["max_steps"] == 2  # nested, resolved
        assert config["paths"]["output_dir"] == str((sweep / job).resolve())
        assert f"lora-r{r}" in run["tags"] and "tiny_qwen3" in run["tags"] and "4bit" in run["tags"]
        assert "persona-萊拉" in run["tags"] and "lang-zh-TW" in run["tags"]  # the persona the job trained
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        for key in ("eval_loss", "final_train_loss", "trainable_params", "peak_memory_bytes", "tokens_per_second",
                    *PERSONA_METRICS):  # smoke runs two persona probes at the last step
            assert run["summary"][key] == metrics[key], key
        assert run["summary"]["status"] == "completed"
        (artifact,) = [a for a in run["artifacts"] if a["type"] == "model"]  # eval tables come as run_table
        assert artifact["type"] == "model"
        uploaded = {entry["path"] for entry in artifact["manifest"]["contents"]}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= uploaded


@pytest.mark.slow
def test_compare_ranks_a_sweep_and_a_mixture(grid_sweep, capsys, tmp_path):
    _, sweep, _ = grid_sweep
    assert compare.main([str(sweep), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert len(rows) == 3 and "failed: UserError: lora.r" in rows[2]
    losses = {job: json.loads((sweep / job / "metrics.json").read_text())["eval_loss"] for job in ("0", "1")}
    best = min(losses, key=losses.get)
    assert rows[0].split()[1] == best and f"{losses[best]:.4f}" in rows[0]
    assert {"r=4", "r=8"} <= {row.split()[3] for row in rows}
    assert "address_rate" in out.splitlines()[0]  # persona metrics get their own columns
    csv_rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert csv_rows[0].startswith("rank,run,status,overrides,lora.r,eval_loss") and len(csv_rows) == 4
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    # a single run dir, and a mixture of a run dir and a sweep (labels stay distinct)
    runs = compare.collect_runs([sweep / "0"])
    assert [(run.label, run.status) for run in runs] == [("0", "completed")]
    mixed = compare.collect_runs([sweep / "1", sweep])
    assert [run.label for run in mixed] == ["1", "S/0", "S/1", "S/2"]
    assert compare.main([str(sweep / "1"), str(sweep), "--out", str(tmp_path / "mix")]) == 0
    assert (tmp_path / "mix" / "compare.png").is_file()


def test_compare_refuses_a_dir_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"lyra: error: SWEEP_DIR: no run found under {tmp_path}")


def test_rank_runs_puts_failures_last_and_honours_direction(tmp_path):
    def run(name, **metrics):
        return compare.Run(path=tmp_path / name, label=name, status="completed" if metrics else "failed",
                           overrides=[f"lora.r={name}"], metrics=metrics)

    runs = [run("a", eval_loss=2.0), run("b"), run("c", eval_loss=1.0), run("d", eval_loss=float("nan"))]
    assert [r.label for r in compare.rank_runs(runs, "eval_loss", "minimize")] == ["c", "a", "b", "d"]
    assert [r.label for r in compare.rank_runs(runs, "eval_loss", "maximize")] == ["a", "c", "b", "d"]
    assert compare.varying_keys(runs) == ["lora.r"]


def test_run_names_keep_only_swept_keys_shortened():
    overrides = ["experiment=smoke", "lora.r=16", "lora.lora_alpha=32", "trainer.learning_rate=1e-4",
                 "lora.target_modules=[q_proj,v_proj]", "lora.lora_dropout=0.05"]
    assert run_name(overrides, ["lora.r", "lora.lora_alpha"]) == "r=16,lora_alpha=32"
    assert run_name(overrides, ["lora.target_modules", "lora.lora_dropout"]) == \
        "target_modules=[q_proj,v_proj],lora_dropout=0.05"
    assert run_name(["+trainer.foo=1", "lora.r=4"]) == "foo=1,r=4"  # unknown sweep: all overrides


def test_swept_keys_from_command_line_and_sweeper_params():
    config = OmegaConf.create({"hydra": {
        "overrides": {"task": ["experiment=smoke", "lora.r=4,8", "trainer.learning_rate=interval(1e-5,1e-3)",
                               "lora.target_modules=[q_proj,v_proj],[q_proj]", "lora.lora_alpha=16"]},
        "sweeper": {"params": {"lora.lora_dropout": "0.0,0.1", "lora.r": "4,8"}}}})
    assert swept_keys(config) == ["lora.r", "trainer.learning_rate", "lora.target_modules", "lora.lora_dropout"]


def test_objective_reads_the_configured_metric():
    objective = OmegaConf.create({"metric": "eval_loss", "direction": "minimize"})
    assert objective_value({"eval_loss": 1.5, "train_loss": 2}, objective) == 1.5
    with pytest.raises(UserError, match=r"'persona_score' is not a numeric metric of this run; available: eval_loss"):
        objective_value({"eval_loss": 1.5}, OmegaConf.create({"metric": "persona_score", "direction": "maximize"}))
    with pytest.raises(UserError) as error:
        check_objective(OmegaConf.create({"metric": "eval_loss", "direction": "down"}))
    assert str(error.value) == "objective.direction: must be minimize or maximize, got 'down'"
    assert worst_value("minimize") == math.inf and worst_value("maximize") == -math.inf


@pytest.mark.slow
def test_same_sweep_through_submitit(tmp_path, small_corpus):
    """hydra/launcher=submitit_local: the code path of the SLURM preset, jobs in their own processes."""
    result = lyra_train(["-m", "hydra/launcher=submitit_local", *FAST, *small_corpus, "eval=none", "lora.r=4,8",
                         "hydra.sweep.dir=S"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "S"
    names, groups = set(), set()
    for job in ("0", "1"):
        assert (sweep / job / "adapter" / "adapter_model.safetensors").is_file()
        run = wandb_run_record(sweep / job)
        names.add(run["display_name"])
        groups.add(run["run_group"])
    assert names == {"r=4", "r=8"} and len(groups) == 1 and "" not in groups
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["completed"] == 2 and summary["best"]["job"] in ("0", "1")


@pytest.mark.slow
def test_optuna_search_survives_jobs_that_all_fail(tmp_path):
    """Every trial fails validation: the study records them with the worst value and still ends."""
    result = lyra_train(["hparams_search=optuna", "experiment=smoke", "logger=none", "hydra.sweeper.n_trials=2",
                         "data.max_length=8", "hydra.sweep.dir=S"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "S"
    for job in ("0", "1"):
        assert json.loads((sweep / job / "failed.json").read_text())["key"] == "data.max_length"
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (summary["failed"], summary["best"]) == (2, None)
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == math.inf and set(results.best_params) == {
        "lora.r", "lora.lora_alpha", "lora.lora_dropout", "trainer.learning_rate"}


def test_presets_compose_with_their_documented_values():
    from conftest import compose

    grid = compose(["experiment=[smoke,sweep_lora]"], return_hydra_config=True)
    assert str(grid.hydra.mode) == "RunMode.MULTIRUN" and grid.model.build is not None
    assert dict(grid.hydra.sweeper.params) == {
        "lora.r": "8,16,32", "lora.lora_alpha": "16,32",
        "lora.target_modules": "[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]"}

    optuna = compose(["hparams_search=optuna", "objective.direction=maximize"], return_hydra_config=True)
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert optuna.hydra.sweeper.direction == "maximize"  # follows objective.direction
    assert optuna.hydra.sweeper.sampler.seed == 1234 and optuna.hydra.sweeper.max_failure_rate == 1.0

    slurm = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                     "hydra.launcher.mem_gb=16", "hydra.launcher.gpus_per_node=2"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.mem_gb, launcher.gpus_per_node) == ("gpu", 30, 16, 2)
    assert launcher.cpus_per_task == 8 and launcher.tasks_per_node == 1
    assert slurm.hydra.callbacks.sweep_summary._target_ == "lyra.sweep.SweepSummary"


def test_a_crashing_multirun_job_is_recorded_and_scores_the_worst_value(tmp_path, capsys):
    """The path an out-of-memory job takes, in-process: failed.json, one stderr line, -inf/inf."""
    from conftest import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lyra.sweep import run_job

    cfg = compose(["experiment=smoke", "lora.r=64", "objective.direction=maximize"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.runtime.output_dir = str(tmp_path / "3")
        cfg.hydra.overrides.task = ["experiment=smoke", "lora.r=64"]
    HydraConfig.instance().set_config(cfg)
    try:
        def out_of_memory(_cfg):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        assert run_job(cfg, out_of_memory) == -math.inf
    finally:
        HydraConfig.instance().cfg = None
    failed = json.loads((tmp_path / "3" / "failed.json").read_text())
    assert (failed["error_type"], failed["key"]) == ("RuntimeError", None)
    assert failed["overrides"] == ["experiment=smoke", "lora.r=64"]
    assert "in out_of_memory" in failed["traceback"]
    message = "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert capsys.readouterr().err.splitlines() == [
        f"lyra: job failed: RuntimeError: {message} [{tmp_path / '3' / 'failed.json'}]"]
