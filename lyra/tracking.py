"""Weights & Biases: exactly one run per Hydra job, with its files inside the job's output dir.

The Trainer's own WandbCallback reuses whatever run is active in the process, so sequential
multirun jobs would merge into one run. lyra starts and finishes the run itself and logs the
Trainer's metrics through `WandbLogCallback`.

Offline (no API key) runs are uploaded later with `wandb sync <run_dir>/wandb/offline-run-*`,
and browsed locally with `wandb leet <run_dir>/wandb`.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

log = logging.getLogger(__name__)


def has_wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def hydra_job_identity(run_dir: Path) -> tuple[str | None, str]:
    """(group, name): the sweep dir for multirun jobs, and a name made of the job's overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, run_dir.name
    hydra_cfg = HydraConfig.get()
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
        group = f"{sweep_dir.parent.name}/{sweep_dir.name}"
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("hydra")]
    short = [o.split(".")[-1] if "=" in o and "." in o.split("=")[0] else o for o in overrides]
    return group, ",".join(short) or run_dir.name


def start_run(cfg: DictConfig, run_dir: Path, job_type: str = "train"):
    """A fresh wandb run for this job, or None with `logger=none`."""
    if not cfg.logger:
        return None
    import wandb

    mode = cfg.logger.mode
    if mode == "auto":
        mode = "online" if has_wandb_api_key() else "offline"
    group, name = hydra_job_identity(run_dir)
    tags = list(cfg.logger.tags) + [Path(str(cfg.model.name_or_path)).name, f"lora-r{cfg.lora.r}"]
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        dir=str(run_dir),
        mode=mode,
        group=group,
        name=name,
        job_type=job_type,
        tags=tags,
        config=OmegaConf.to_container(cfg, resolve=True),
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    if mode == "offline":
        log.info("W&B is offline (no API key); upload later with: wandb sync %s", run.dir.rsplit("/files", 1)[0])
    return run


def finish_run(run, summary: dict[str, Any]) -> None:
    if run is None:
        return
    run.summary.update(summary)
    run.finish()


class WandbLogCallback(TrainerCallback):
    """Sends the Trainer's logs (loss, lr, eval_loss, ...) to this job's run."""

    def __init__(self, run):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.run.log({key: value for key, value in logs.items() if isinstance(value, (int, float))},
                         step=state.global_step)
