"""Loading a finished training run: its config, tokenizer, base model and LoRA adapter.

    from lyra.runs import load_run
    run = load_run("outputs/2026-01-01/12-00-00")            # base (4-bit if trained so) + adapter
    run = load_run(run_dir, adapter="none")                    # the bare base, for comparison
    run = load_run(run_dir, adapter="checkpoints/checkpoint-50")
    with run.adapter_disabled():                              # answer as the bare base (web's comparison)
        ...

A run dir is what `python -m lyra.train` writes: `resolved_config.yaml` (the config with every
interpolation resolved, so the base model, quantization, persona and system prompt match what was trained;
`.hydra/config.yaml` still holds unresolved `${...}`) and `adapter/` (adapter weights, tokenizer,
chat template). Used by `lyra.chat`, `lyra.export`, `lyra.evaluate` and the web UI.

Inference speed: a full-precision base gets the adapter merged into its weights in memory
(`merge=None`, the default), so every token costs one matmul per layer instead of W x + B A x
through PEFT's wrappers (measured by scripts/bench_chat.py; greedy replies stay equal). The base
weights the merge overwrote are kept, so `adapter_disabled()` still answers exactly as the bare
base. A 4-bit base keeps the PEFT adapter: merging into NF4 weights would re-quantize them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lyra.errors import UserError
from lyra.paths import CONF_DIR, resolve_user_path

log = logging.getLogger(__name__)

RUN_CONFIG = "resolved_config.yaml"
DEFAULT_ADAPTER = "adapter"
NO_ADAPTER = "none"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DEFAULT_PERSONA = "lyra"  # what runs from before the persona group were trained with


@dataclass
class LoadedRun:
    """A run ready for generation: `model` is in eval mode with the KV cache on."""

    model: Any
    tokenizer: Any
    cfg: DictConfig  # the run's resolved training config
    system_prompt: str
    run_dir: Path
    adapter: str = DEFAULT_ADAPTER  # what was applied: a path relative to run_dir, or "none"
    persona: DictConfig | None = None  # the run's persona (run_persona): name, labels, language, probes
    # merged runs: the base weights the merge replaced, by parameter name (exact copies, not W - BA)
    base_weights: dict[str, Any] = field(default_factory=dict)

    @property
    def merged(self) -> bool:
        return bool(self.base_weights)

    @property
    def has_adapter(self) -> bool:
        return self.adapter != NO_ADAPTER

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """While active, `model` is the bare base: PEFT's disable_adapter(), or for a merged run the
        saved base weights swapped in (pointer swaps, no copies) and swapped back after. Not
        thread-safe: callers that share the model hold a lock (lyra.web does)."""
        if not self.has_adapter:
            yield
            return
        if not self.merged:
            with self.model.disable_adapter():
                yield
            return
        parameters = dict(self.model.named_parameters())
        merged = {name: parameters[name].data for name in self.base_weights}
        try:
            for name, weight in self.base_weights.items():
                parameters[name].data = weight
            yield
        finally:
            for name, weight in merged.items():
                parameters[name].data = weight


def run_dir_path(run_dir: str | Path | None) -> Path:
    """The run dir as an absolute path (relative to the launch dir); one clear line if it is not one."""
    if run_dir is None or str(run_dir) in ("", "???"):
        raise UserError("run_dir", "is required: the output dir of a training run, e.g. run_dir=outputs/2026-01-01/12-00-00")
    path = resolve_user_path(run_dir)
    if not path.is_dir():
        raise UserError("run_dir", f"not a directory: {path}")
    if not (path / RUN_CONFIG).is_file():
        hint = " (it holds .hydra/ only: the training did not finish)" if (path / ".hydra").is_dir() else ""
        raise UserError("run_dir", f"{path} has no {RUN_CONFIG}{hint}; pass the output dir of `python -m lyra.train`")
    return path


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's resolved training config."""
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    for key in ("model", "quantization", "data"):
        if key not in cfg:
            raise UserError("run_dir", f"{run_dir / RUN_CONFIG} has no `{key}` section; is it a lyra run?")
    return cfg


def launch_dir(run_dir: Path) -> Path | None:
    """Where the training was launched (Hydra records it), to resolve the run's relative paths."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    return Path(OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd", default=None) or run_dir)


def default_persona() -> DictConfig:
    """The shipped default persona (conf/persona/<DEFAULT_PERSONA>.yaml), resolved."""
    path = CONF_DIR / "persona" / f"{DEFAULT_PERSONA}.yaml"
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def run_persona(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The persona the run was trained with, its relative file paths made absolute (launch dir).

    Runs trained before personas existed have no `persona` key: they get the default persona,
    with the run's own system prompt, and a logged note.
    """
    if "persona" in cfg and cfg.persona is not None:
        persona = OmegaConf.create(OmegaConf.to_container(cfg.persona, resolve=True))
    else:
        persona = default_persona()
        if cfg.data.get("system_prompt"):
            persona.system_prompt = cfg.data.system_prompt
        log.warning("%s has no persona (trained before persona configs): using the default persona %r",
                    run_dir / RUN_CONFIG, DEFAULT_PERSONA)
    origin = launch_dir(run_dir)
    for key in ("train_file", "eval_file", "probes_file"):
        value = persona.get(key)
        if value and not Path(value).expanduser().is_absolute() and origin is not None:
            persona[key] = str(origin / value)
    return persona


def adapter_dir(run_dir: Path, adapter: str | None) -> Path | None:
    """Where the adapter lives (None for adapter=none); missing weights are a one-line error."""
    if adapter is None or str(adapter).lower() in (NO_ADAPTER, "null", ""):
        return None
    path = Path(adapter).expanduser()
    path = path if path.is_absolute() else run_dir / path
    if not path.is_dir():
        checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
        hint = f"; the run has checkpoints, e.g. adapter=checkpoints/{checkpoints[-1].name}" if checkpoints else ""
        raise UserError("adapter", f"no adapter directory {path}{hint}")
    if not (path / "adapter_config.json").is_file():
        raise UserError("adapter", f"{path} has no adapter_config.json; is it a LoRA adapter dir?")
    if not any((path / name).is_file() for name in _ADAPTER_WEIGHTS):
        raise UserError("adapter", f"{path} has no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")
    return path


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_adapter_base(adapter_path: Path, model_cfg: DictConfig) -> None:
    """The adapter must have been trained on the base that the run's config names."""
    adapter_cfg = json.loads((adapter_path / "adapter_config.json").read_text())
    trained_on = adapter_cfg.get("base_model_name_or_path")
    expected = str(model_cfg.name_or_path)
    if trained_on and not _same_model(str(trained_on), expected):
        raise UserError("adapter", f"{adapter_path} was trained on base model {trained_on!r}, but the run's "
                                   f"config uses {expected!r}; pass the run dir the adapter came from")


def load_run_tokenizer(run_dir: Path, adapter_path: Path | None, model_cfg: DictConfig):
    """The tokenizer saved with the adapter (or the run's adapter/), else the base model's own."""
    from transformers import AutoTokenizer

    from lyra.modeling import build_tokenizer, ensure_pad_token

    for candidate in (adapter_path, run_dir / DEFAULT_ADAPTER):
        if candidate is not None and (candidate / "tokenizer_config.json").is_file():
            return ensure_pad_token(AutoTokenizer.from_pretrained(candidate))
    log.warning("%s holds no tokenizer; using the base model's", run_dir)
    return build_tokenizer(model_cfg)


def build_run_base(cfg: DictConfig, device: str | None = None, quantized: bool = True, dtype=None):
    """The run's base model as trained (4-bit when it was, unless quantized=False), in eval mode.

    dtype: the weights' dtype (None = the run's model.dtype)."""
    from lyra.config import bitsandbytes_problem
    from lyra.modeling import build_model, build_quantization, resolve_dtype

    from lyra.threads import use_free_cores

    use_free_cores()  # CPU: one torch thread per idle core (lyra.threads); OMP_NUM_THREADS overrides
    dtype = dtype or resolve_dtype(cfg.model.dtype)
    quantization_config = build_quantization(cfg.quantization, dtype) if quantized else None
    if quantization_config is not None:
        problem = bitsandbytes_problem()
        if problem:
            raise UserError("quantization", f"the run was trained in 4-bit, which needs bitsandbytes ({problem})")
    model = build_model(cfg.model, quantization_config, dtype, device)
    model.config.use_cache = True  # build_model turns it off for training; generation needs it
    return model.eval()


def apply_adapter(model, adapter_path: Path):
    """Wrap `model` with the saved LoRA adapter (inference mode)."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=False)
    except RuntimeError as error:  # shape mismatch: the adapter belongs to another architecture
        first_line = str(error).strip().splitlines()[-1].strip()
        raise UserError("adapter", f"{adapter_path} does not fit the run's base model ({first_line})") from None
    return model.eval()


def merge_for_inference(model) -> tuple[Any, dict[str, Any]]:
    """(plain model with the LoRA merged in, {parameter name: a copy of the base weight it replaced}).

    PEFT merges in place, so the targeted base weights are copied first (LoRA targets a fraction
    of the model: for lora=attn on SmolLM2, 27M of 135M params); swapping them back gives the base
    bit for bit, which W + s B A - s B A would not.
    """
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    base_weights = {name.removeprefix(prefix) + ".weight": module.get_base_layer().weight.data.clone()
                    for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    return model.merge_and_unload().eval(), base_weights


def load_full_precision_merged(cfg: DictConfig, adapter_path: Path, dtype, device: str | None = None):
    """The run's base in full precision (`dtype`, even if it trained in 4-bit) with the adapter merged
    into its weights: what `lyra.export` ships. No copy of the replaced base weights is kept."""
    log.info("merging %s into %s (%s, %s)", adapter_path, cfg.model.name_or_path, dtype, device)
    model = build_run_base(cfg, device, quantized=False, dtype=dtype)
    return apply_adapter(model, adapter_path).merge_and_unload().eval()


def load_run(run_dir: str | Path, adapter: str = DEFAULT_ADAPTER, device: str | None = None,
             merge: bool | None = None) -> LoadedRun:
    """Rebuild a trained run for generation: base model as trained + adapter + the run's tokenizer.

    adapter: a dir relative to run_dir ("adapter", "checkpoints/checkpoint-8"), an absolute dir,
    or "none" for the bare base. device: None = cuda:0 if available, else cpu. merge: None = merge
    the adapter into a full-precision base for speed (4-bit bases keep PEFT); False = always PEFT.
    """
    path = run_dir_path(run_dir)
    cfg = load_run_config(path)
    adapter_path = adapter_dir(path, adapter)
    if adapter_path is not None:
        check_adapter_base(adapter_path, cfg.model)
    tokenizer = load_run_tokenizer(path, adapter_path, cfg.model)
    model = build_run_base(cfg, device)
    base_weights: dict[str, Any] = {}
    if adapter_path is not None:
        model = apply_adapter(model, adapter_path)
        if merge is not False and not getattr(model, "is_loaded_in_4bit", False):
            model, base_weights = merge_for_inference(model)
    log.info("loaded %s with %s%s", cfg.model.name_or_path, adapter_path or "no adapter",
             " (merged in memory)" if base_weights else "")
    return LoadedRun(model=model, tokenizer=tokenizer, cfg=cfg, system_prompt=cfg.data.get("system_prompt") or "",
                     run_dir=path, adapter=str(adapter) if adapter_path is not None else NO_ADAPTER,
                     persona=run_persona(cfg, path), base_weights=base_weights)
