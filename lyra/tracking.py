"""Weights & Biases: exactly one run per Hydra job, with its files inside the job's output dir.

    python -m lyra.train -m experiment=smoke lora.r=4,8     # 2 runs, one group (the sweep dir)
    python -m lyra.train logger.log_adapter=true            # also upload the adapter as an artifact
    python -m lyra.train logger=none                        # no tracking at all

The Trainer's own WandbCallback reuses whatever run is active in the process, so sequential
multirun jobs would merge into one run. lyra starts and finishes the run itself and logs the
Trainer's metrics through `WandbLogCallback`. Each run is grouped by its sweep, named after its
swept overrides (`r=16,lora_alpha=32`), typed `train`, tagged from `logger.tags`, and carries the
resolved config nested (so `lora.r` is filterable); its summary is the job's metrics.json.
Only rank 0 of a multi-process job opens a run (`lyra.train`).

Offline (no API key) runs are uploaded later with `wandb sync <run_dir>/wandb/offline-run-*`,
and browsed locally with `wandb leet <run_dir>/wandb` (or `wandb leet <sweep_dir>/<job>/wandb`).
`update_run_summary` adds later measurements (lyra.evaluate's persona_hold) to a finished job's run:
it resumes the run by its id, offline as another `offline-run-*` dir of the same id that the same
`wandb sync` glob uploads into that run.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from lyra.secrets import scrub

log = logging.getLogger(__name__)


def has_wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def run_name(overrides: list[str], swept: list[str] | None = None) -> str:
    """`r=16,lora_alpha=32`: the swept overrides (all overrides when unknown), keys shortened."""
    if swept:
        overrides = [o for o in overrides if _override_key(o) in swept] or overrides
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}" if value or "=" in override else key)
    return ",".join(parts)


def hydra_job_identity(run_dir: Path) -> tuple[str | None, str]:
    """(group, name): the sweep dir for multirun jobs, and a name made of the job's swept overrides.

    The swept keys come from `<sweep_dir>/sweep.json`, written by `lyra.sweep.SweepSummary` when
    the multirun starts, so jobs on other processes or machines (submitit) name runs the same way.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lyra.sweep import read_sweep_file, task_overrides

    if not HydraConfig.initialized():
        return None, run_dir.name
    hydra_cfg = HydraConfig.get()
    overrides = task_overrides()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, run_name(overrides) or run_dir.name
    sweep_dir = Path(hydra_cfg.runtime.cwd, str(hydra_cfg.sweep.dir)).resolve()
    group = f"{sweep_dir.parent.name}/{sweep_dir.name}"
    name = run_name(overrides, read_sweep_file(sweep_dir).get("swept")) or f"job{hydra_cfg.job.num}"
    return group, name


def run_tags(cfg: DictConfig) -> list[str]:
    """The configured tags plus the model, the adapter's shape and the persona, for dashboard filters."""
    generated = [Path(str(cfg.model.name_or_path)).name, f"lora-r{cfg.lora.r}",
                 "4bit" if cfg.quantization.get("load_in_4bit") else "full-precision"]
    persona = cfg.get("persona")
    if persona:
        generated += [f"persona-{persona.name}", f"lang-{persona.language}"]
    return list(dict.fromkeys([*map(str, cfg.logger.tags), *generated]))


# wandb stages logged tables/artifacts under WANDB_DATA_DIR (default ~/.local/share/wandb) until they
# are uploaded; lyra points it into the job's own wandb/ dir unless the user chose a location.
_USER_DATA_DIR = os.environ.get("WANDB_DATA_DIR")


def start_run(cfg: DictConfig, run_dir: Path, job_type: str = "train"):
    """A fresh wandb run for this job, or None with `logger=none`."""
    if not cfg.logger:
        return None
    import wandb

    mode = cfg.logger.mode
    if mode == "auto":
        mode = "online" if has_wandb_api_key() else "offline"
    group, name = hydra_job_identity(run_dir)
    if _USER_DATA_DIR is None:
        os.environ["WANDB_DATA_DIR"] = str(run_dir / "wandb")
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        dir=str(run_dir),
        mode=mode,
        group=group,
        name=scrub(name),  # overrides read back from Hydra come with ${oc.env:...} resolved
        job_type=job_type,
        tags=run_tags(cfg),
        config=scrub(OmegaConf.to_container(cfg, resolve=True)),  # env secrets masked (lyra.secrets)
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    if mode == "offline":
        log.info("W&B is offline (no API key); upload later with: wandb sync %s", run.dir.rsplit("/files", 1)[0])
    return run


def log_adapter(run, adapter_dir: Path) -> None:
    """The saved adapter (+ tokenizer) as a `model` artifact of this run."""
    import wandb

    artifact = wandb.Artifact(name=f"lyra-adapter-{run.id}", type="model",
                              metadata={"group": run.group, "name": run.name})
    # immutable + skip_cache: no copy under ~/.local/share/wandb or ~/.cache/wandb; the offline run
    # uploads the adapter straight from the job dir at `wandb sync`, so it must stay there.
    artifact.add_dir(str(adapter_dir), skip_cache=True, policy="immutable")
    run.log_artifact(artifact, aliases=["latest"])


def finish_run(run, summary: dict[str, Any], adapter_dir: Path | None = None) -> None:
    """Close a completed run with the job's metrics as its summary; adapter_dir: upload it (logger.log_adapter)."""
    if run is None:
        return
    run.summary.update({**summary, "status": "completed"})
    if adapter_dir is not None:
        log_adapter(run, adapter_dir)
    run.finish()


def job_run_id(run_dir: Path) -> tuple[str, bool] | None:
    """(id, was offline) of the W&B run the job opened, from its `<run_dir>/wandb/[offline-]run-<time>-<id>` dir."""
    found = sorted((path.name.split("-")[-2], path.name.rsplit("-", 1)[1], path.name.startswith("offline-"))
                   for path in (run_dir / "wandb").glob("*run-*-*") if path.is_dir() and not path.is_symlink())
    return (found[0][1], found[0][2]) if found else None  # the earliest: the training run itself


def update_run_summary(run_dir: Path, run_cfg: DictConfig, summary: dict[str, Any]) -> bool:
    """Add `summary` (None values left out) to the job's W&B run, if it had one; False when it had none."""
    found = job_run_id(run_dir) if run_cfg.get("logger") else None
    if found is None:
        log.info("the run has no W&B run (logger=none or no %s): W&B summary not updated", run_dir / "wandb")
        return False
    import wandb

    run_id, offline = found
    mode = "offline" if offline or not has_wandb_api_key() else "online"
    if _USER_DATA_DIR is None:
        os.environ["WANDB_DATA_DIR"] = str(run_dir / "wandb")
    run = wandb.init(project=run_cfg.logger.project, entity=run_cfg.logger.entity, id=run_id, resume="allow",
                     dir=str(run_dir), mode=mode, reinit="create_new",
                     settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
    run.summary.update({key: value for key, value in summary.items() if value is not None})
    run.finish()
    log.info("W&B run %s (%s): summary updated with %s%s", run_id, mode, ", ".join(summary),
             f"; upload with: wandb sync {run_dir / 'wandb'}/offline-run-*" if mode == "offline" else "")
    return True


def fail_run(run, error: BaseException) -> None:
    """Mark the run of a job that raised as failed (exit code 1) and close it."""
    if run is None:
        return
    run.summary.update({"status": "failed", "error": f"{type(error).__name__}: {error}"})
    run.finish(exit_code=1)


@contextlib.contextmanager
def closed_on_failure(run) -> Iterator[Any]:
    """Yield `run`; if the block raises, mark it failed and close it before the error propagates.

    A sweep job that dies half-way (lyra.sweep keeps the sweep going) thus never leaves its run
    open for the next job of the same process.
    """
    try:
        yield run
    except BaseException as error:
        fail_run(run, error)
        raise


class WandbLogCallback(TrainerCallback):
    """Sends the Trainer's logs (loss, lr, eval_loss, ...) to this job's run."""

    def __init__(self, run):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.run.log({key: value for key, value in logs.items() if isinstance(value, (int, float))},
                         step=state.global_step)
