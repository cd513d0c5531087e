"""Validation of a composed config, before anything heavy (model download, tokenization) runs.

`validate(cfg)` raises `UserError` naming the first bad key and its allowed range; the CLI turns
that into one line and exit code 2. Checks that need the tokenizer or the model live next to the
code that has them (`validate_max_length`, `lyra.modeling.apply_lora`).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lyra.errors import UserError
from lyra.hub import ensure_base_available
from lyra.modeling import resolve_dtype
from lyra.paths import resolve_user_path


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise UserError(key, message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PERSONA_TEXT_KEYS = ("name", "user_address", "system_prompt")
PERSONA_FILE_KEYS = ("train_file", "eval_file", "probes_file")
PERSONA_OPTIONAL_FILES = ("eval_file",)  # null = no eval split
PERSONA_LABEL_KEYS = ("user_label", "bot_label")  # optional; null = "You: " / "<name>: "


def validate_persona(persona: DictConfig | None) -> None:
    """The persona group (conf/persona/ or the user's --config-dir): every key present, every file there."""
    from omegaconf.errors import InterpolationResolutionError

    from lyra.persona import LANGUAGES

    _require(persona is not None and OmegaConf.is_dict(persona), "persona",
             "is required: persona=NAME picks conf/persona/NAME.yaml (your own: --config-dir DIR persona=NAME)")
    for key in (*PERSONA_TEXT_KEYS, "language", *PERSONA_FILE_KEYS):
        _require(key in persona and not OmegaConf.is_missing(persona, key), f"persona.{key}",
                 "missing from the persona file (every persona sets name, user_address, system_prompt, "
                 "language, train_file, eval_file, probes_file)")
    try:
        values = {key: persona[key] for key in (*PERSONA_TEXT_KEYS, "language", *PERSONA_FILE_KEYS,
                                                *(k for k in PERSONA_LABEL_KEYS if k in persona))}
    except InterpolationResolutionError as error:
        raise UserError("persona", f"cannot resolve a value: {error}".splitlines()[0]) from None
    for key in PERSONA_TEXT_KEYS:
        _require(isinstance(values[key], str) and values[key].strip() != "", f"persona.{key}",
                 f"must be a non-empty string, got {values[key]!r}")
    _require(values["language"] in LANGUAGES, "persona.language",
             f"must be one of {', '.join(LANGUAGES)}, got {values['language']!r}")
    for key in PERSONA_LABEL_KEYS:
        value = values.get(key)
        _require(value is None or isinstance(value, str), f"persona.{key}", f"must be a string or null, got {value!r}")
    for key in PERSONA_FILE_KEYS:
        if values[key] is None and key in PERSONA_OPTIONAL_FILES:
            continue
        _require(isinstance(values[key], str) and values[key] != "", f"persona.{key}",
                 f"must be a path (relative to where you launch), got {values[key]!r}")
        _check_file(persona, key, name=f"persona.{key}")


def _check_missing(cfg: DictConfig) -> None:
    for key in ("data.train_file",):
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            raise UserError(key, "is required with data=jsonl (e.g. data.train_file=my_chats.jsonl)") from None


def _check_file(cfg: DictConfig, key: str, name: str | None = None) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    name = name or key
    path = resolve_user_path(value)
    _require(path.is_file(), name, f"file not found: {path}")
    _require(path.stat().st_size > 0 and _has_content(path), name, f"file is empty: {path}")


def _has_content(path: Path) -> bool:
    """Any non-blank line; reads only up to the first one, so huge files cost nothing."""
    with path.open("rb") as handle:
        return any(line.strip() for line in handle)


def bitsandbytes_problem() -> str | None:
    """Why 4-bit cannot run here, or None when bitsandbytes is usable."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a broken native library surfaces as any exception
        return f"bitsandbytes cannot load ({type(error).__name__}: {error})"
    return None


def _is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def validate_output_dir(output_dir: Path, hydra_cfg: DictConfig) -> None:
    """A job writes under the project's outputs/ (or multirun/) unless the dir is given explicitly.

    Explicit means `hydra.run.dir=`, `hydra.sweep.dir=` or `paths.output_dir=` on the command line;
    a dir that only comes from a config file (e.g. an experiment preset) must stay in the project.
    Multirun jobs must each write inside their own job dir, or they would resume each other.
    """
    from hydra.types import RunMode

    output_dir = Path(output_dir).resolve()
    job_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    if hydra_cfg.mode == RunMode.MULTIRUN and not _is_within(output_dir, job_dir):
        raise UserError("paths.output_dir", f"{output_dir} is shared by every job of this multirun; leave "
                                            "paths.output_dir alone and set hydra.sweep.dir= instead")
    explicit_keys = {"hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "paths.output_dir"}
    overrides = [*hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task]
    if any(override.split("=", 1)[0].lstrip("+~") in explicit_keys for override in overrides):
        return
    launch_dir = Path(hydra_cfg.runtime.cwd).resolve()
    roots = [launch_dir / "outputs", launch_dir / "multirun"]
    _require(any(_is_within(output_dir, root) for root in roots), "paths.output_dir",
             f"{output_dir} is outside the project's outputs ({roots[0]}, {roots[1]}); pass hydra.run.dir= "
             "or paths.output_dir= on the command line to write there on purpose")


def _check_target_modules(target_modules) -> None:
    """The forms peft.LoraConfig accepts: a list of layer names, `all-linear`, or a regex string."""
    key = "lora.target_modules"
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise UserError(key, f"{target_modules!r} is neither all-linear nor a valid regex ({error})") from None
        return
    _require(OmegaConf.is_list(target_modules) and len(target_modules) > 0
             and all(isinstance(name, str) and name for name in target_modules), key,
             f"must be a non-empty list of layer names such as [q_proj,v_proj], all-linear, or a regex "
             f"string; got {target_modules!r}")


OBJECTIVES = ("sft", "dpo", "orpo")
# Keys of the objective node that lyra reads itself; the rest are kwargs of TRL's DPOConfig / ORPOConfig.
OBJECTIVE_LYRA_KEYS = ("name", "init_adapter", "train_file", "eval_file", "metric", "direction")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def init_adapter_path(value) -> Path:
    """objective.init_adapter as an adapter dir: a run dir's adapter/, or an adapter dir itself."""
    key = "objective.init_adapter"
    _require(isinstance(value, str) and value.strip() != "", key,
             f"must be the dir of an SFT run (or of its adapter), got {value!r}")
    path = resolve_user_path(value)
    _require(path.is_dir(), key, f"not a directory: {path}")
    adapter = path if (path / "adapter_config.json").is_file() else path / "adapter"
    _require((adapter / "adapter_config.json").is_file(), key,
             f"{path} holds no adapter (adapter_config.json), nor does {path / 'adapter'}: give an SFT run dir")
    _require(any((adapter / name).is_file() for name in _ADAPTER_WEIGHTS), key,
             f"{adapter} has no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")
    return adapter


def _check_init_adapter(adapter: Path, cfg: DictConfig) -> None:
    """DPO continues the adapter as trained: same base and LoRA shape, or PEFT would fail deep inside."""
    import json

    saved = json.loads((adapter / "adapter_config.json").read_text())
    base = saved.get("base_model_name_or_path")
    if base and str(base) != str(cfg.model.name_or_path):
        same = Path(str(base)).expanduser().exists() and Path(str(base)).expanduser().resolve() == \
            Path(str(cfg.model.name_or_path)).expanduser().resolve()
        _require(same, "objective.init_adapter", f"{adapter} was trained on {base!r}, but model.name_or_path is "
                                                 f"{cfg.model.name_or_path!r}: use the SFT run's model= and quantization=")
    for key in ("r", "lora_alpha"):
        _require(saved.get(key) == cfg.lora[key], f"lora.{key}",
                 f"{adapter} was trained with lora.{key}={saved.get(key)}, not {cfg.lora[key]}: "
                 "use the SFT run's lora settings")
    trained, wanted = saved.get("target_modules") or [], cfg.lora.target_modules
    if wanted != "all-linear" and not isinstance(wanted, str) and not isinstance(trained, str):
        _require(sorted(trained) == sorted(wanted), "lora.target_modules",
                 f"{adapter} was trained with {sorted(trained)}: use the SFT run's lora settings")


def validate_objective(cfg: DictConfig) -> None:
    """The objective group: sft, or dpo/orpo with their pair files, TRL knobs and (dpo) the SFT adapter."""
    objective = cfg.get("objective")
    _require(objective is not None and objective.get("name") in OBJECTIVES, "objective",
             f"objective=NAME picks conf/objective/NAME.yaml: one of {', '.join(OBJECTIVES)}, got "
             f"{objective.get('name') if objective is not None else None!r}")
    name = objective.name
    _require(name == "dpo" or "init_adapter" not in objective, "objective.init_adapter",
             "applies to objective=dpo only (ORPO and SFT start from the base)")
    if name == "sft":
        extra = sorted(set(objective) - {"name", "metric", "direction"})
        _require(not extra, f"objective.{extra[0] if extra else ''}",
                 "is a preference knob: set objective=dpo or objective=orpo to use it")
        return
    for key in ("train_file", "init_adapter") if name == "dpo" else ("train_file",):
        try:
            OmegaConf.select(cfg, f"objective.{key}", throw_on_missing=True)
        except MissingMandatoryValue:
            what = "a file of preference pairs (python -m lyra.data pairs builds one)" if key == "train_file" \
                else "the SFT run DPO continues (its adapter is also the frozen reference)"
            raise UserError(f"objective.{key}", f"is required with objective={name}: {what}") from None
    _check_file(cfg, "objective.train_file")
    _check_file(cfg, "objective.eval_file")
    beta = objective.get("beta")
    _require(_is_number(beta) and beta > 0, "objective.beta", f"must be a number > 0, got {beta!r}")
    if name == "dpo":
        _check_init_adapter(init_adapter_path(objective.init_adapter), cfg)


def validate(cfg: DictConfig) -> None:
    """Refuse bad values with one line naming the key and the allowed range."""
    validate_persona(cfg.get("persona"))  # first: data's files and system prompt default to the persona's
    _check_missing(cfg)
    _require(isinstance(cfg.resume, str) and cfg.resume.strip() != "", "resume",
             f"must be auto, never, or the path of a run dir or checkpoint, got {cfg.resume!r}")
    _require(isinstance(cfg.overwrite, bool), "overwrite", f"must be true or false, got {cfg.overwrite!r}")
    _require(isinstance(cfg.model.trust_remote_code, bool), "model.trust_remote_code",
             f"must be true or false, got {cfg.model.trust_remote_code!r}")
    _require(isinstance(cfg.model.get("lean_activations", True), bool), "model.lean_activations",
             f"must be true or false, got {cfg.model.get('lean_activations')!r}")
    _require(isinstance(cfg.model.get("onednn_linears", True), bool), "model.onednn_linears",
             f"must be true or false, got {cfg.model.get('onednn_linears')!r}")
    _require(isinstance(cfg.model.get("fused_lora", True), bool), "model.fused_lora",
             f"must be true or false, got {cfg.model.get('fused_lora')!r}")
    lora, trainer, data = cfg.lora, cfg.trainer, cfg.data
    _require(isinstance(lora.r, int) and lora.r > 0, "lora.r", f"must be an integer > 0, got {lora.r}")
    _require(_is_number(lora.lora_alpha) and lora.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {lora.lora_alpha}")
    _require(_is_number(lora.lora_dropout) and 0 <= lora.lora_dropout < 1, "lora.lora_dropout",
             f"must be in [0, 1), got {lora.lora_dropout}")
    _check_target_modules(lora.target_modules)
    _require(_is_number(trainer.learning_rate) and trainer.learning_rate > 0, "trainer.learning_rate",
             f"must be > 0, got {trainer.learning_rate}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = trainer.get(key)
        _require(isinstance(value, int) and value >= 1, f"trainer.{key}", f"must be an integer >= 1, got {value}")
    _require(trainer.max_steps == -1 or trainer.max_steps > 0, "trainer.max_steps", f"must be -1 (use epochs) or > 0, got {trainer.max_steps}")
    _require(trainer.max_steps > 0 or trainer.num_train_epochs > 0, "trainer.num_train_epochs",
             f"must be > 0 when trainer.max_steps=-1, got {trainer.num_train_epochs}")
    _require(isinstance(data.max_length, int) and data.max_length >= 32, "data.max_length",
             f"must be an integer >= 32, got {data.max_length}")
    _require(isinstance(data.get("padding_free", False), bool), "data.padding_free",
             f"must be true or false, got {data.get('padding_free')!r}")
    _require(isinstance(data.get("prefix_sharing", False), bool), "data.prefix_sharing",
             f"must be true or false, got {data.get('prefix_sharing')!r}")
    _require(isinstance(data.get("tree_attention", False), bool), "data.tree_attention",
             f"must be true or false, got {data.get('tree_attention')!r}")
    _require(not (data.get("prefix_sharing") and data.get("padding_free")), "data.prefix_sharing",
             "and data.padding_free both pack a batch into rows, in different ways: set one of them to false")
    _require(data.get("on_invalid") in ("error", "skip"), "data.on_invalid", f"must be error or skip, got {data.get('on_invalid')}")
    _check_file(cfg, "data.train_file")
    _check_file(cfg, "data.eval_file")
    validate_objective(cfg)
    resolve_dtype(cfg.model.dtype)
    if cfg.model.get("gguf"):  # a model converted from a GGUF in a wheel: the wheel must be there until converted
        if not (Path(cfg.model.name_or_path).expanduser() / "config.json").is_file():
            from lyra.modeling import gguf_source

            gguf_source(cfg.model.gguf)  # one line naming the install command
    elif cfg.model.get("build") is None:
        _require(bool(cfg.model.name_or_path), "model.name_or_path", "must name a hub model or a local directory")
        ensure_base_available(str(cfg.model.name_or_path))  # cached, local or reachable: else one line now
    if cfg.quantization.get("load_in_4bit"):  # importing bitsandbytes costs seconds: after the model check
        problem = bitsandbytes_problem()
        _require(problem is None, "quantization",
                 f"4-bit needs bitsandbytes>=0.47 ({problem}); `pip install -U bitsandbytes` or use quantization=none")
    from lyra.probes import validate_probes  # the eval group (persona probes); eval=none passes. Imports
    validate_probes(cfg.get("eval"), cfg.persona)  # transformers' Trainer stack: after the cheaper checks
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():  # API callers (tests, notebooks) choose their dir themselves
        validate_output_dir(Path(cfg.paths.output_dir), HydraConfig.get())


def validate_max_length(max_length: int, system_prompt: str | None, tokenizer) -> None:
    """data.max_length must hold the system prompt, a short user turn and a short reply."""
    from lyra.data.tokenization import chat_prompt_ids, with_system_prompt

    messages = with_system_prompt([{"role": "user", "content": "你好，請問你是誰？"}], system_prompt)
    needed = len(chat_prompt_ids(messages, tokenizer)) + 16  # room for a short reply + <|im_end|>
    _require(max_length >= needed, "data.max_length",
             f"{max_length} cannot hold the system prompt plus one turn; use at least {needed}")

