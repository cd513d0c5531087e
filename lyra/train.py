"""Train a LoRA adapter on a (4-bit) Qwen3 base: the one entrypoint of lyra.

    python -m lyra.train                                  # QLoRA on Qwen/Qwen3-0.6B, the default persona
    python -m lyra.train persona=lyra_en                  # another persona (conf/persona/)
    python -m lyra.train --config-dir my_conf persona=mara  # your own: my_conf/persona/mara.yaml
    python -m lyra.train experiment=smoke                 # tiny offline model on CPU, < 1 minute
    python -m lyra.train objective=dpo objective.init_adapter=RUN objective.train_file=pairs.jsonl  # preference
    python -m lyra.train lora.r=16 lora.lora_alpha=32     # any key of conf/ can be overridden
    python -m lyra.train --cfg job                        # print the composed config

`train(cfg)` reads top to bottom in dependency order and returns the metrics dict that is also
written to `<run_dir>/metrics.json`.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lyra.config import init_adapter_path, validate, validate_max_length
from lyra.data import build_datasets
from lyra.distributed import process_group_teardown, rank_aware_argv
from lyra.errors import UserError, exit_on_user_error
from lyra.fused_lora import fuse_lora_layers
from lyra.lean import lean_activations
from lyra.modeling import (apply_lora, build_model, build_quantization, build_tokenizer, count_parameters,
                           resolve_dtype)
from lyra.prepack import onednn_frozen_linears
from lyra.secrets import protect_run, scrub, scrub_config
from lyra.sweep import run_job
from lyra.threads import free_cores_callback, use_free_cores

log = logging.getLogger("lyra.train")


def build_training_args(trainer_cfg: DictConfig, run_dir: Path, dtype: torch.dtype, has_eval: bool,
                        objective: DictConfig | None = None, max_length: int | None = None):
    """TrainingArguments from the trainer group; lyra owns output dir, reporting and precision.

    objective=dpo|orpo: TRL's DPOConfig / ORPOConfig (TrainingArguments subclasses) with the
    objective's knobs added (lyra.preference)."""
    import dataclasses

    from transformers import TrainingArguments

    kwargs: dict[str, Any] = OmegaConf.to_container(trainer_cfg, resolve=True)
    unknown = sorted(set(kwargs) - {field.name for field in dataclasses.fields(TrainingArguments)})
    if unknown:  # an unknown kwarg in conf/trainer/*.yaml or an override
        raise UserError(f"trainer.{unknown[0]}", "not a TrainingArguments option")
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    kwargs.update(output_dir=str(run_dir / "checkpoints"),
                  report_to="none",  # lyra.tracking owns the W&B run (one per job)
                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                  include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available())
    if objective is not None and objective.name != "sft":
        from lyra.preference import preference_args

        return preference_args(objective, kwargs, max_length)
    try:
        return TrainingArguments(**kwargs)
    except TypeError as error:
        raise UserError("trainer", f"not a TrainingArguments option: {error}") from None


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def last_logged(log_history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return values[-1] if values else None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by `cfg`; returns its metrics."""
    validate(cfg)
    # The training stack (transformers' Trainer, peft, bitsandbytes, W&B: ~6 s of CPU to import) loads
    # once the config is known to be good, so a bad value or an unreachable hub answers in seconds.
    from transformers import set_seed

    from lyra.checkpointing import (guard_training, keep_adapter_after_training, resolve_resume, save_adapter,
                                    train_from)
    from lyra.probes import PersonaProbeCallback
    from lyra.tracking import WandbLogCallback, closed_on_failure, finish_run, start_run
    from lyra.data.collate import SHARED_ROW_LENGTHS
    from lyra.trainer import build_trainer

    preference = cfg.objective.name != "sft"  # dpo | orpo: chosen/rejected pairs on TRL (lyra.preference)
    if preference:  # TRL loads only for pair training
        from lyra.preference import build_preference_datasets, build_preference_trainer

    run_dir = Path(cfg.paths.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    protect_run(run_dir)  # secrets masked in logs and .hydra/ from here on
    resume_from = resolve_resume(cfg.resume, cfg.overwrite, run_dir, cfg.lora)

    set_seed(cfg.trainer.seed)  # python, numpy and torch; data order follows trainer.data_seed
    use_free_cores()  # CPU: one torch thread per idle core; a busy neighbour costs 1.6x, not 6.8x (lyra.threads)

    tokenizer = build_tokenizer(cfg.model)
    validate_max_length(cfg.data.max_length, cfg.data.system_prompt, tokenizer)

    if preference:  # tokenized like SFT prompts: what chat shows the model, each reply to its turn end
        splits = build_preference_datasets(cfg.objective, cfg.data, tokenizer)
    else:
        splits = build_datasets(cfg.data, tokenizer, cache_dir=cfg.paths.cache_dir)  # tokenized once per file

    # accelerate/torchrun: on success no rank exits before rank 0 has saved (barrier); on failure the
    # group is torn down at once, so no rank exits with a live gloo/NCCL group (lyra.distributed)
    with process_group_teardown():
        dtype = resolve_dtype(cfg.model.dtype)
        # before the model: a knob TRL refuses costs no model load
        args = build_training_args(cfg.trainer, run_dir, dtype, has_eval=splits.eval is not None,
                                   objective=cfg.objective, max_length=cfg.data.max_length)
        quantization_config = build_quantization(cfg.quantization, dtype)

        model = build_model(cfg.model, quantization_config, dtype)

        # dpo continues the SFT run's adapter (trainable); sft and orpo start a fresh one from cfg.lora
        init_adapter = init_adapter_path(cfg.objective.init_adapter) if cfg.objective.name == "dpo" else None
        model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.trainer.gradient_checkpointing,
                           init_adapter=init_adapter)
        if cfg.model.get("lean_activations", True):  # same outputs, less kept for the backward (lyra.lean)
            log.info("lean activations: %s", lean_activations(model))
        if cfg.model.get("onednn_linears", True):  # CPU: the frozen base's products on oneDNN (lyra.prepack)
            log.info("%s", onednn_frozen_linears(model))
        if cfg.model.get("fused_lora", True):  # CPU: each LoRA layer one autograd node, a cheap dropout mask (lyra.fused_lora)
            log.info("%s", fuse_lora_layers(model))
        trainable_params, total_params = count_parameters(model)
        log.info("LoRA: %s trainable of %s params", f"{trainable_params:,}", f"{total_params:,}")

        if args.process_index == 0:  # written first, so whatever adapter this run leaves can be loaded
            OmegaConf.save(scrub_config(cfg), run_dir / "resolved_config.yaml")
        wandb_run = start_run(cfg, run_dir) if args.process_index == 0 else None
        with closed_on_failure(wandb_run):  # a job that raises leaves no run open (sweeps go on in-process)
            # persona probes at evaluations, counted in the persona's words; eval=none: a no-op
            probes = PersonaProbeCallback(cfg.get("eval"), cfg.persona, cfg.data.system_prompt, wandb_run)
            threads = free_cores_callback()  # CPU: torch's thread count follows neighbours that come and go
            callbacks = ([WandbLogCallback(wandb_run)] if wandb_run else []) + [probes] + ([threads] if threads else [])
            if preference:  # TRL's DPO / ORPO loss on lyra's model and pairs; pairs are padded by TRL's collator
                trainer = build_preference_trainer(cfg.objective, model, args, tokenizer, splits, callbacks)
            else:  # supervised-only logits + shared prompt prefixes / dynamic padding / padding-free (lyra.trainer, lyra.loss, lyra.data.collate)
                trainer = build_trainer(model, args, tokenizer, splits.train, splits.eval, cfg.data.padding_free,
                                        prefix_sharing=cfg.data.get("prefix_sharing", False),
                                        tree_attention=cfg.data.get("tree_attention", False),
                                        max_row_tokens=SHARED_ROW_LENGTHS * cfg.data.max_length, callbacks=callbacks)

            with guard_training(trainer, run_dir, cfg):  # atomic checkpoints; signals, OOM and crashes keep the adapter
                result = train_from(trainer, resume_from)  # from a checkpoint at max_steps: no step past it
            adapter_dir = run_dir / "adapter"
            if trainer.is_world_process_zero():
                save_adapter(trainer, adapter_dir)  # first: nothing after this line can cost the trained weights
                log.info("adapter and tokenizer saved in %s", adapter_dir)

            with keep_adapter_after_training(run_dir, adapter_dir):  # a failure below: one line, exit 1
                metrics = collect_metrics(trainer, result, splits, probes, args, trainable_params, total_params)
                if trainer.is_world_process_zero():
                    trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
                    (run_dir / "metrics.json").write_text(json.dumps(scrub(metrics), indent=2) + "\n")
                    log.info("metrics saved in %s", run_dir / "metrics.json")
                finish_run(wandb_run, metrics, adapter_dir=adapter_dir if cfg.logger and cfg.logger.log_adapter else None)
    return metrics


def collect_metrics(trainer, result, splits, probes, args, trainable_params: int, total_params: int) -> dict[str, Any]:
    """What metrics.json, the W&B summary and sweeps see: losses, throughput, sizes, persona metrics."""
    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "final_train_loss": last_logged(trainer.state.log_history, "loss"),
        "global_step": trainer.state.global_step,
        "train_runtime": result.metrics["train_runtime"],
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        # None when this call trained no step (resumed from a checkpoint at trainer.max_steps)
        "tokens_per_second": (trainer.state.num_input_tokens_seen / result.metrics["train_runtime"]
                              if result.metrics["train_runtime"] else None),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "train_examples": len(splits.train),
        "dropped_turns": splits.train_stats.dropped_turns,
        "skipped_conversations": splits.skipped,  # invalid ones, under data.on_invalid=skip
        "system_prompt_inserted": splits.system_prompt_inserted,  # conversations that had no system message
        "world_size": args.world_size,
    }
    if splits.eval is not None:
        final_eval = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
        metrics["eval_loss"] = final_eval[-1]["eval_loss"] if final_eval else trainer.evaluate()["eval_loss"]
    metrics.update(probes.metrics)  # final persona metrics: sweeps can rank by them
    metrics["peak_memory_bytes"] = peak_memory_bytes()
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns objective.metric for the sweeper; in a multirun a failed job is recorded, not raised."""
    with exit_on_user_error():
        return run_job(cfg, train)


if __name__ == "__main__":
    from lyra.cli import hydra_errors_in_lyra_voice

    with exit_on_user_error():  # accelerate/torchrun: ranks must share one explicit run dir
        sys.argv = rank_aware_argv(sys.argv)
    with hydra_errors_in_lyra_voice("train"):  # an unknown key or option: one line, exit 2
        main()
