"""Runs that survive kills: resume resolution, atomic checkpoints, interrupts and OOM advice.

`lyra.train` calls two things from here:

    resume_from = resolve_resume(cfg.resume, cfg.overwrite, run_dir, cfg.lora)   # before anything heavy
    with guard_training(trainer, run_dir, cfg):                                  # around training
        result = train_from(trainer, resume_from)                               # trainer.train, or no step

- `resume=auto` continues from the newest *complete* checkpoint in `<run_dir>/checkpoints`;
  `resume=never` refuses a dir with earlier results unless `overwrite=true`; any other value is a
  run dir or a checkpoint to continue from. The Trainer restores weights, optimizer, scheduler,
  RNG state and the data order (it skips the batches already seen in the current epoch). From a
  checkpoint already at `trainer.max_steps` (a kill after the last checkpoint, before `adapter/`),
  `train_from` takes no step: the Trainer alone would take one past max_steps.
- Checkpoints are written under `checkpoints/.partial/` and renamed into place, so a process
  killed while saving leaves no `checkpoint-N` that looks usable. Leftovers are reported and
  removed; a `checkpoint-N` missing files (written by plain transformers) is reported and skipped.
- SIGINT/SIGTERM stop training after the current optimizer step, save a checkpoint and the
  adapter as `<run_dir>/interrupted/`, and exit with 128 + the signal number. A second signal
  aborts at once.
- An out-of-memory error ends with one line naming the knobs that help, in order, after saving
  the adapter to `interrupted/` when a checkpoint exists.
- Any other crash inside training (a callback, the data, ...) saves the adapter too: to `adapter/`
  after the last step, else to `interrupted/`; one line names what failed, the traceback goes to
  `<run_dir>/failure.log`, exit code 1. `keep_adapter_after_training` does the same for everything
  train() does once the adapter is saved (metrics, files, W&B).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from lyra.errors import RunFailed, UserError
from lyra.paths import resolve_user_path
from lyra.secrets import scrub_text

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".partial"  # inside CHECKPOINTS_DIR; never matches transformers' checkpoint-N pattern
INTERRUPTED_DIR = "interrupted"
# What the Trainer needs to continue exactly where it stopped (rng_state*.pth is optional: the
# Trainer then warns that reproducibility is not guaranteed).
REQUIRED_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                  "scheduler.pt")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------- resume

def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None for a complete checkpoint."""
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        step = json.loads((path / "trainer_state.json").read_text())["global_step"]
    except (ValueError, KeyError) as error:
        return f"unreadable trainer_state.json ({error})"
    match = _CHECKPOINT_NAME.match(path.name)
    if match and int(match.group(1)) != step:
        return f"trainer_state.json says step {step}"
    try:
        from safetensors import safe_open

        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as weights:
            weights.keys()
    except Exception as error:  # a truncated file fails in the header parser with varied types
        return f"unreadable adapter_model.safetensors ({type(error).__name__})"
    return None


def scan_checkpoints(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(broken checkpoint, why)]) under `root`."""
    complete, broken = [], []
    if not root.is_dir():
        return complete, broken
    for staged in sorted((root / STAGING_DIR).glob("*")):
        broken.append((staged, "half-written (the run stopped while saving it)"))
    for path in root.iterdir():
        if path.is_dir() and _CHECKPOINT_NAME.match(path.name):
            problem = checkpoint_problem(path)
            if problem:
                broken.append((path, problem))
            else:
                complete.append(path)
    complete.sort(key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))
    return complete, broken


def _report_broken(broken: list[tuple[Path, str]]) -> None:
    for path, why in broken:
        log.warning("ignoring checkpoint %s: %s", path, why)
        if path.parent.name == STAGING_DIR:
            shutil.rmtree(path, ignore_errors=True)


def _targets(target_modules) -> str | list[str]:
    """A regex / all-linear string as is, a list of layer names sorted (peft saves a set)."""
    return target_modules if isinstance(target_modules, str) else sorted(target_modules)


def _check_adapter_matches(checkpoint: Path, lora_cfg: DictConfig) -> None:
    """Continuing an adapter of another shape would fail deep inside PEFT; say which key differs."""
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    if saved.get("r") != lora_cfg.r:
        raise UserError("lora.r", f"{checkpoint} was trained with lora.r={saved.get('r')}, not {lora_cfg.r}; "
                                  "set it back or start a new run dir")
    trained, wanted = _targets(saved.get("target_modules") or []), _targets(lora_cfg.target_modules)
    if wanted != "all-linear" and trained != wanted:  # all-linear is saved as the layer names it resolved to
        raise UserError("lora.target_modules", f"{checkpoint} was trained with {trained}; "
                                               "set them back or start a new run dir")


def _previous_results(run_dir: Path) -> list[str]:
    names = [CHECKPOINTS_DIR, INTERRUPTED_DIR, "adapter"]
    return [name for name in names if (run_dir / name).exists() and any((run_dir / name).iterdir())]


def _clear_previous(run_dir: Path, found: list[str]) -> None:
    for name in found:
        shutil.rmtree(run_dir / name)
    log.warning("overwrite=true: removed %s from %s; training starts from scratch", ", ".join(found), run_dir)


def _step(checkpoint_or_run: Path) -> int | None:
    state = checkpoint_or_run / "trainer_state.json"
    return json.loads(state.read_text()).get("global_step") if state.is_file() else None


def _refuse_finished(run_dir: Path, newest: Path) -> None:
    """Rerunning a finished command would train 0 steps and overwrite metrics.json with zeros."""
    if (run_dir / "metrics.json").is_file() and (run_dir / "adapter").is_dir() and _step(run_dir) == _step(newest):
        raise UserError("resume", f"{run_dir} already finished at step {_step(newest)}; use overwrite=true to retrain, "
                                  f"resume={newest} with more trainer.max_steps to train further, or another dir")


def _resolve_path(resume: str) -> Path:
    path = resolve_user_path(resume)
    if not path.exists():
        raise UserError("resume", f"{path} does not exist; use auto, never, or a run dir or checkpoint path")
    if (path / "trainer_state.json").is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise UserError("resume", f"{path} is not a complete checkpoint: {problem}")
        return path
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    complete, broken = scan_checkpoints(root)
    for checkpoint, why in broken:
        log.warning("ignoring checkpoint %s: %s", checkpoint, why)
    if not complete:
        raise UserError("resume", f"no complete checkpoint in {root}")
    return complete[-1]


def resolve_resume(resume: str, overwrite: bool, run_dir: Path, lora_cfg: DictConfig) -> str | None:
    """The checkpoint `trainer.train` continues from, or None to start from scratch.

    Cheap (no model, no tokenizer): runs right after validation so a refused resume costs nothing.
    """
    root = run_dir / CHECKPOINTS_DIR
    found = _previous_results(run_dir)
    if resume not in ("auto", "never"):
        checkpoint = _resolve_path(str(resume))
        if overwrite and checkpoint.is_relative_to(run_dir):
            raise UserError("overwrite", f"would delete {checkpoint}, the checkpoint resume= points at")
        if overwrite and found:
            _clear_previous(run_dir, found)
        elif any(name != "adapter" for name in found) and not checkpoint.is_relative_to(run_dir):
            raise UserError("resume", f"{run_dir} already has {', '.join(found)}; resume=auto continues it, "
                                      "overwrite=true replaces it")
    elif overwrite:
        if found:
            _clear_previous(run_dir, found)
        return None
    else:
        complete, broken = scan_checkpoints(root)
        _report_broken(broken)
        if resume == "never" and found:
            raise UserError("resume", f"resume=never but {run_dir} already has {', '.join(found)}; "
                                      "use resume=auto to continue or overwrite=true to start over")
        if not complete:
            if "adapter" in found or INTERRUPTED_DIR in found:
                raise UserError("resume", f"{run_dir} holds a trained adapter but no checkpoint to continue from; "
                                          "use overwrite=true to retrain or another hydra.run.dir")
            return None
        checkpoint = complete[-1]
        _refuse_finished(run_dir, checkpoint)
    _check_adapter_matches(checkpoint, lora_cfg)
    log.info("resuming from %s (step %d): weights, optimizer, scheduler, RNG and data order restored",
             checkpoint, _step(checkpoint))
    return str(checkpoint)


def train_from(trainer, checkpoint: str | None):
    """`trainer.train(resume_from_checkpoint=checkpoint)`, except from a checkpoint already at trainer.max_steps.

    The Trainer checks max_steps only after a step, so resuming there would train step N+1 of N and
    end one update away from the uninterrupted run. Here the checkpoint's weights and state are loaded
    as the Trainer loads them, the end-of-training callbacks run (persona probes), and no step is taken:
    the adapter is the uninterrupted run's bit for bit. train_loss, which the Trainer keeps only in
    memory, is recomputed from the checkpoint's logged losses (each weighted by its logging window).
    """
    step = _step(Path(checkpoint)) if checkpoint else None
    max_steps = trainer.args.max_steps
    if step is None or max_steps <= 0 or step < max_steps:  # epoch-based runs end by epochs, not one step past
        return trainer.train(resume_from_checkpoint=checkpoint)
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    log.info("%s is at step %d of trainer.max_steps=%d: nothing left to train; its weights are the run's final ones "
             "(raise trainer.max_steps to train further)", checkpoint, step, max_steps)
    if step > max_steps:
        log.warning("%s is past trainer.max_steps=%d: its step-%d weights are kept as they are", checkpoint, max_steps,
                    step)
    trainer._load_from_checkpoint(checkpoint)  # the adapter, exactly as trainer.train(resume_from_checkpoint=...)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    trainer.control = trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    windows = [entry["step"] - before["step"] for before, entry in zip([{"step": 0}, *logged], logged)]
    train_loss = sum(entry["loss"] * window for entry, window in zip(logged, windows)) / sum(windows) if logged else None
    return TrainOutput(trainer.state.global_step, train_loss, {"train_runtime": 0.0, "train_loss": train_loss})


# ------------------------------------------------------------------------------ atomic checkpoints

def _publish(staged: Path, final: Path) -> None:
    """Move a fully written directory into place; a stale `final` (same step, older run) goes first.

    The stale one is renamed aside before it is deleted, so a kill at any moment leaves `final`
    either whole (old or new) or absent, never half deleted (scripts/chaos.py kills at random).
    """
    if final.exists():
        aside = final.parent / f".{final.name}.stale"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(staged, final)
        shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(staged, final)


def make_checkpoints_atomic(trainer) -> None:
    """Make `trainer` write each checkpoint under `.partial/` and rename it once complete.

    Wraps the instance's `_save_checkpoint` (rather than subclassing Trainer) so it composes with
    whatever Trainer subclass lyra uses. The Trainer derives the checkpoint dir from
    `_get_output_dir`, which is pointed at the staging dir while a save is in progress.
    """
    from transformers.trainer_utils import rotate_checkpoints

    if getattr(trainer, "_lyra_atomic", False):
        return
    root = Path(trainer.args.output_dir)
    staging_root = root / STAGING_DIR
    save_checkpoint, get_output_dir = trainer._save_checkpoint, trainer._get_output_dir
    saving = threading.local()

    def staged_output_dir(trial=None):
        return str(staging_root) if getattr(saving, "active", False) else get_output_dir(trial)

    def atomic_save_checkpoint(model, trial):
        name = f"checkpoint-{trainer.state.global_step}"
        saving.active = True
        try:
            save_checkpoint(model, trial)
        finally:
            saving.active = False
        if getattr(trainer.args, "world_size", 1) > 1:
            trainer.accelerator.wait_for_everyone()  # every rank's rng_state_<rank>.pth is in before the rename
        if trainer.args.should_save:
            _publish(staging_root / name, root / name)
            if trainer.state.best_model_checkpoint and Path(trainer.state.best_model_checkpoint).parent == staging_root:
                trainer.state.best_model_checkpoint = str(root / Path(trainer.state.best_model_checkpoint).name)
            with contextlib.suppress(OSError):
                staging_root.rmdir()
            rotate_checkpoints(str(root), save_total_limit=trainer.args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint)

    trainer._get_output_dir = staged_output_dir
    trainer._save_checkpoint = atomic_save_checkpoint
    trainer._lyra_atomic = True


# ------------------------------------------------------------------------------- interrupts + OOM

def save_adapter(trainer, final: Path, note: dict | None = None) -> Path:
    """The adapter as it is now (+ tokenizer, + `note` as interrupted.json), written atomically to `final`."""
    staged = final.parent / f".{final.name}.partial"
    shutil.rmtree(staged, ignore_errors=True)
    trainer.model.save_pretrained(staged)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(staged)
    if note is not None:
        (staged / "interrupted.json").write_text(json.dumps(note, indent=2) + "\n")
    _publish(staged, final)
    return final


def save_interrupted(trainer, run_dir: Path, reason: str) -> Path:
    """The adapter of a run stopped mid-training, with why and where to resume, in `<run_dir>/interrupted/`."""
    complete, _ = scan_checkpoints(Path(trainer.args.output_dir))
    return save_adapter(trainer, run_dir / INTERRUPTED_DIR, {
        "reason": reason,
        "global_step": trainer.state.global_step,
        "resume_checkpoint": str(complete[-1]) if complete else None,
    })


# ------------------------------------------------------------------------------ any other failure
FAILURE_LOG = "failure.log"


def failed_component(error: BaseException) -> str:
    """What raised, for the one-line message: the Trainer callback hook it came from, else the innermost function."""
    from transformers.trainer_callback import CallbackHandler

    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in frames:  # outermost first: the hook the Trainer called, not a helper inside it
        owner = frame.f_locals.get("self")
        if isinstance(owner, TrainerCallback) and not isinstance(owner, CallbackHandler):
            return f"{type(owner).__name__}.{frame.f_code.co_name}"
    return frames[-1].f_code.co_name if frames else "training"


def write_failure_log(run_dir: Path, error: BaseException) -> Path:
    """The full traceback, kept in the run dir so the console gets one line; secrets masked like every run file."""
    import traceback as tb

    path = run_dir / FAILURE_LOG
    path.write_text(scrub_text("".join(tb.format_exception(error))), encoding="utf-8")
    return path


def _error(error: BaseException) -> str:
    """`Type: message` of the error for the one-line report, secrets masked (it may quote an env value)."""
    return scrub_text(f"{type(error).__name__}: {error}")


@contextlib.contextmanager
def keep_adapter_after_training(run_dir: Path, adapter: Path) -> Iterator[None]:
    """Around everything after the adapter is saved (metrics, files, W&B): a failure costs nothing trained."""
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - disk full, W&B, a metric: the weights are already safe
        log_file = write_failure_log(run_dir, error)
        raise RunFailed(f"{failed_component(error)} failed after training ({_error(error)}); "
                        f"the trained adapter is saved in {adapter}; traceback in {log_file}") from error


class _StopOnSignal(TrainerCallback):
    """Ends training after the current optimizer step, with a checkpoint, once a signal arrived."""

    def __init__(self):
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
        return control


def oom_advice(cfg: DictConfig, step: int, saved: Path | None, resume_from: Path | None) -> str:
    """One line: the knobs that lower memory, in the order that costs the least quality/speed."""
    trainer, data = cfg.trainer, cfg.data
    batch, accumulation = trainer.per_device_train_batch_size, trainer.gradient_accumulation_steps
    hints = []
    if batch > 1:
        hints.append(f"trainer.per_device_train_batch_size={batch // 2} trainer.gradient_accumulation_steps="
                     f"{accumulation * 2} (same effective batch {batch * accumulation})")
    hints.append(f"a lower data.max_length (now {data.max_length})")
    if not trainer.gradient_checkpointing:
        hints.append("trainer.gradient_checkpointing=true")
    message = f"out of memory at step {step}; try, in order: " + "; then ".join(hints)
    if saved is not None:
        message += f". Adapter saved in {saved}; rerunning resumes from {resume_from.name}"
    return message


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _saved_after_crash(trainer, run_dir: Path, error: BaseException) -> RunFailed:
    """Save the adapter of a run that crashed (a callback, a data error, ...) and say so in one line.

    After the last optimizer step the weights are final, so they go to `adapter/`, where chat and
    export look; earlier, they go to `interrupted/` with the checkpoint to resume from.
    """
    for callback in trainer.callback_handler.callbacks:  # an open progress bar would swallow the line's start
        if getattr(callback, "training_bar", None) is not None:
            callback.training_bar.close()
            callback.training_bar = None
    what, step = failed_component(error), trainer.state.global_step
    log_file = write_failure_log(run_dir, error)
    if step == 0:  # nothing trained, nothing to keep: an empty interrupted/ would only block the rerun
        return RunFailed(f"{what} failed before the first step ({_error(error)}); "
                         f"traceback in {log_file}")
    finished = trainer.state.max_steps > 0 and step >= trainer.state.max_steps
    if trainer.is_world_process_zero():
        saved = (save_adapter(trainer, run_dir / "adapter") if finished
                 else save_interrupted(trainer, run_dir, f"{what}: {_error(error)}"))
    else:
        saved = run_dir / ("adapter" if finished else INTERRUPTED_DIR)
    complete, _ = scan_checkpoints(Path(trainer.args.output_dir))
    where = "after the last step" if finished else f"at step {step}"
    resume = f"; rerun the same command to resume from {complete[-1].name}" if complete else ""
    return RunFailed(f"{what} failed {where} ({_error(error)}); adapter saved in {saved}{resume}; "
                     f"traceback in {log_file}")


@contextlib.contextmanager
def guard_training(trainer, run_dir: Path, cfg: DictConfig) -> Iterator[None]:
    """Atomic checkpoints, SIGINT/SIGTERM -> `interrupted/` + exit 128+signum, OOM -> advice.

    Wrap exactly the `trainer.train(...)` call.
    """
    make_checkpoints_atomic(trainer)
    stopper = _StopOnSignal()
    trainer.add_callback(stopper)
    previous: dict[int, object] = {}

    def on_signal(signum, frame):
        stopper.signum = signum
        signal.signal(signum, previous[signum])  # a second signal takes the default way out
        log.warning("%s received: stopping after this step and saving the adapter (send again to abort now)",
                    signal.Signals(signum).name)

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # signal handlers can only be installed there (e.g. not under a web UI thread)
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal) or signal.SIG_DFL  # None: set outside Python
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:
        if not _is_oom(error):
            raise _saved_after_crash(trainer, run_dir, error) from error
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        complete, _ = scan_checkpoints(Path(trainer.args.output_dir))
        saved = save_interrupted(trainer, run_dir, "out of memory") if complete else None
        raise UserError(None, oom_advice(cfg, trainer.state.global_step, saved,
                                         complete[-1] if complete else None)) from None
    finally:
        trainer.remove_callback(stopper)
        if in_main_thread:
            for signum, handler in previous.items():
                if signal.getsignal(signum) is on_signal:
                    signal.signal(signum, handler)
    if stopper.signum is not None:
        name = signal.Signals(stopper.signum).name
        saved = save_interrupted(trainer, run_dir, name)
        complete, _ = scan_checkpoints(Path(trainer.args.output_dir))
        log.warning("%s: stopped at step %d; adapter saved in %s%s", name, trainer.state.global_step, saved,
                    f"; rerun the same command to resume from {complete[-1].name}" if complete else "")
        raise SystemExit(128 + stopper.signum)
