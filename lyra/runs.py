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
chat template). Used by `lyra.chat`, `lyra.export`, `lyra.evaluate`, the web UI and the server.

A run dir may come from someone else, so every loader enters it through `open_run`, which treats
it as untrusted (docs/security.md): lyra reads only YAML, JSON, safetensors and tokenizer text
from it; an adapter shipped only as a pickle (`adapter_model.bin`) is refused, other pickles
(`*.bin`, `*.pt`, ...) are named in a warning and never opened; a `_target_` key or a `${...}`
interpolation anywhere in `resolved_config.yaml` is refused (lyra instantiates nothing from a run's
config, and an interpolation could read the server's environment into a page); the run's
`model.trust_remote_code: true` is ignored with a warning; a local `model.name_or_path` must be a
model dir with safetensors weights (or, for a model lyra builds itself, a path in lyra's cache);
and a tokenizer whose chat template differs from its base model's is warned about.

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
import re
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
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_ADAPTER = "adapter_model.bin"  # PEFT would torch.load it: never opened from a run dir
# Formats that unpickle (or may) when loaded: a run dir's copies are never opened, and named in a warning.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# adapter=checkpoints/checkpoint-N: the Trainer's own resume state in it is expected (and still never opened)
_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")
_TRAINER_STATE_FILE = re.compile(r"^(optimizer\.pt|scheduler\.pt|rng_state(_\d+)?\.pth|training_args\.bin)$")
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
    """The run's resolved training config, checked as untrusted input (`check_run_config`)."""
    config_file = run_dir / RUN_CONFIG
    try:
        cfg = OmegaConf.load(config_file)
    except Exception as error:  # YAML syntax, or a top-level list: one line, not a traceback
        raise UserError("run_dir", f"{config_file} is not a readable config ({type(error).__name__})") from None
    if not isinstance(cfg, DictConfig):
        raise UserError("run_dir", f"{config_file} is not a mapping; is it a lyra run?")
    for key in ("model", "quantization", "data"):
        if not isinstance(cfg.get(key), DictConfig):
            raise UserError("run_dir", f"{config_file} has no `{key}` section; is it a lyra run?")
    check_run_config(cfg, config_file)
    return cfg


def _config_items(value: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, key, value) for every key of a plain (unresolved) config tree, depth first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        yield dotted, key, child
        yield from _config_items(child, dotted)


def lyra_cache_dir() -> Path:
    """Where lyra builds and converts base models on this machine (train.yaml's paths.cache_dir)."""
    import os

    return Path(os.environ.get("LYRA_CACHE") or Path.home() / ".cache" / "lyra").expanduser().resolve()


def check_run_config(cfg: DictConfig, config_file: Path) -> None:
    """No value in a run's config may make lyra import or run code, or read outside what it names.

    Refused (one line): `_target_` anywhere (Hydra's instantiate key; lyra instantiates nothing from a
    run, but a config that holds one was edited to), any `${...}` interpolation (lyra saves the config
    resolved; `${oc.env:...}` would copy this machine's secrets into a system prompt shown on a page),
    a local base model path that is not a safetensors model dir, and a dotted `model.gguf.package`
    (finding a dotted module imports its parent). `model.trust_remote_code: true` is ignored with a
    warning: its loading code would come from wherever `model.name_or_path` points.
    """
    for dotted, key, value in _config_items(OmegaConf.to_container(cfg, resolve=False)):
        if key == "_target_":
            raise UserError("run_dir", f"{config_file} holds `{dotted}`: lyra never instantiates anything from a "
                                       f"run's config; this run dir was edited, do not use it")
        if isinstance(value, str) and "${" in value:
            raise UserError("run_dir", f"{config_file}: `{dotted}` is an interpolation; lyra saves configs "
                                       f"resolved, so this run dir was edited, do not use it")
    model = cfg.model
    if model.get("trust_remote_code"):
        log.warning("%s asks for model.trust_remote_code=true: ignored, lyra never runs code named by a run dir "
                    "(a base that needs it fails to load)", config_file)
        model.trust_remote_code = False
    gguf = model.get("gguf")
    if gguf and not str(gguf.get("package", "")).isidentifier():
        raise UserError("run_dir", f"{config_file}: model.gguf.package {gguf.get('package')!r} is not a plain module name")
    name = str(model.get("name_or_path") or "")
    path = Path(name).expanduser()
    if not (name.startswith(("/", "~", ".")) or path.exists()):
        return  # a hub id: transformers reads safetensors only (use_safetensors=True in lyra.modeling)
    path = path.resolve()
    if (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise UserError("run_dir", f"{config_file}: model.name_or_path {path} has no *.safetensors weights; "
                                       f"lyra loads no pickled (*.bin) base models")
        return
    cache = lyra_cache_dir()
    built_by_lyra = bool(model.get("build") or gguf)
    if built_by_lyra and path.is_relative_to(cache):
        return  # lyra builds (tiny) or converts (GGUF) it there on first use
    why = f"no config.json, and lyra builds models only under {cache}" if built_by_lyra else "no config.json"
    raise UserError("run_dir", f"{config_file}: model.name_or_path {path} is not a model directory here ({why}); "
                               "put the base model there or fix the path in the run's config")


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
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / PICKLE_ADAPTER).is_file():
            raise UserError("adapter", f"{path} holds only {PICKLE_ADAPTER}, a pickle that can run code when loaded; "
                                       f"lyra loads {ADAPTER_WEIGHTS} only (convert it where you trust its source)")
        raise UserError("adapter", f"{path} has no adapter weights ({ADAPTER_WEIGHTS})")
    return path


def warn_pickles(run_dir: Path, adapter_path: Path | None) -> list[Path]:
    """Name (one line) the pickle-format files lying where lyra loads from; none of them is ever opened.

    Checkpoints' optimizer.pt / rng_state.pth are the Trainer's own (only `resume` reads them, on the
    machine that wrote them), so only the run's top level, its adapter/ and the chosen adapter dir count.
    """
    places = {run_dir, run_dir / DEFAULT_ADAPTER, *([adapter_path] if adapter_path else [])}
    found = sorted(p for place in places if place.is_dir() for p in place.iterdir()
                   if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
                   and not (_CHECKPOINT_DIR.match(place.name) and _TRAINER_STATE_FILE.match(p.name)))
    if found:
        log.warning("%s holds pickle-format files lyra never loads: %s", run_dir,
                    ", ".join(str(p.relative_to(run_dir)) for p in found))
    return found


def chat_template_text(directory: Path) -> str | None:
    """A tokenizer dir's chat template, read as text (chat_template.jinja, else tokenizer_config.json)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


def base_model_dir(model_cfg: DictConfig) -> Path | None:
    """The base model's local dir if it is on disk already (a local path, or a hub id in the HF cache)."""
    name = str(model_cfg.name_or_path)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a hub id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def check_chat_template(run_dir: Path, adapter_path: Path | None, model_cfg: DictConfig) -> bool:
    """Warn (one line) when the run's tokenizer formats chats differently from its base model's own.

    lyra saves the base's template unchanged, so a difference means the run dir was edited: a
    template decides what the model is shown (a hidden system prompt, say). Returns whether they differ.
    """
    tokenizer_dir = next((d for d in (adapter_path, run_dir / DEFAULT_ADAPTER)
                          if d is not None and (d / "tokenizer_config.json").is_file()), None)
    base_dir = base_model_dir(model_cfg)
    if tokenizer_dir is None or base_dir is None:
        return False
    run_template, base_template = chat_template_text(tokenizer_dir), chat_template_text(base_dir)
    if run_template == base_template:
        return False
    log.warning("the chat template in %s differs from its base model's (%s): the run's own is used; "
                "compare them if the run is not yours", tokenizer_dir, base_dir)
    return True


@dataclass
class RunFiles:
    """A run dir opened and checked by `open_run`: what every loader builds from."""

    path: Path
    cfg: DictConfig
    adapter_path: Path | None


def open_run(run_dir: str | Path | RunFiles, adapter: str | None = DEFAULT_ADAPTER) -> RunFiles:
    """The one way into a run dir (chat, web, serve, evaluate, export): every untrusted-input check.

    Reads only resolved_config.yaml, adapter_config.json and tokenizer text here; refuses in one
    line what could run code (`check_run_config`, a pickle-only adapter), warns about the rest.
    """
    if isinstance(run_dir, RunFiles):
        return run_dir
    path = run_dir_path(run_dir)
    cfg = load_run_config(path)
    adapter_path = adapter_dir(path, adapter)
    if adapter_path is not None:
        check_adapter_base(adapter_path, cfg.model)
    warn_pickles(path, adapter_path)
    check_chat_template(path, adapter_path, cfg.model)
    return RunFiles(path, cfg, adapter_path)


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


def load_run(run_dir: str | Path | RunFiles, adapter: str = DEFAULT_ADAPTER, device: str | None = None,
             merge: bool | None = None, prepack: bool = False) -> LoadedRun:
    """Rebuild a trained run for generation: base model as trained + adapter + the run's tokenizer.

    run_dir: a path, or what `open_run` returned (then `adapter` is the one it was opened with).
    adapter: a dir relative to run_dir ("adapter", "checkpoints/checkpoint-8"), an absolute dir,
    or "none" for the bare base. device: None = cuda:0 if available, else cpu. merge: None = merge
    the adapter into a full-precision base for speed (4-bit bases keep PEFT); False = always PEFT.
    """
    files = open_run(run_dir, adapter)
    path, cfg, adapter_path = files.path, files.cfg, files.adapter_path
    adapter = str(adapter_path.relative_to(path)) if adapter_path and adapter_path.is_relative_to(path) else (
        str(adapter_path) if adapter_path else NO_ADAPTER)
    tokenizer = load_run_tokenizer(path, adapter_path, cfg.model)
    model = build_run_base(cfg, device)
    base_weights: dict[str, Any] = {}
    if adapter_path is not None:
        model = apply_adapter(model, adapter_path)
        if merge is not False and not getattr(model, "is_loaded_in_4bit", False):
            model, base_weights = merge_for_inference(model)
    log.info("loaded %s with %s%s", cfg.model.name_or_path, adapter_path or "no adapter",
             " (merged in memory)" if base_weights else "")
    if prepack:  # after the merge: the packed copies are of the weights replies use
        from lyra.prepack import prepack_linears

        log.info("%s", prepack_linears(model))
    return LoadedRun(model=model, tokenizer=tokenizer, cfg=cfg, system_prompt=cfg.data.get("system_prompt") or "",
                     run_dir=path, adapter=str(adapter) if adapter_path is not None else NO_ADAPTER,
                     persona=run_persona(cfg, path), base_weights=base_weights)
