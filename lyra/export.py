"""Ship a trained persona: merge a run's LoRA adapter into its base model and save a standalone model.

    python -m lyra.export run_dir=outputs/2026-01-01/12-00-00 output_dir=lyra-merged
    python -m lyra.export run_dir=R output_dir=M adapter=checkpoints/checkpoint-50 dtype=float32

The adapter is merged with `merge_and_unload` into a full-precision copy of the base (bf16 on a
bf16 GPU, fp32 elsewhere; a 4-bit-trained run is merged into the unquantized base, as QLoRA
intends). The output holds safetensors weights, the tokenizer and chat template, and a
generation_config that stops on the tokenizer's turn-end tokens (Qwen3: <|im_end|> and <|endoftext|>;
SmolLM2: <|im_end|>) with the generation group's sampling settings. It loads with plain transformers, no peft:

    model = AutoModelForCausalLM.from_pretrained("lyra-merged")
    tokenizer = AutoTokenizer.from_pretrained("lyra-merged")

With embed_system_prompt=true (default) the saved chat template adds the run's system prompt to
any chat that has none, so `apply_chat_template` gives exactly the prompts the run was trained on.

format=gguf writes one GGUF file instead (llama.cpp, Ollama, LM Studio), an Ollama Modelfile and a
README (see lyra.gguf):

    python -m lyra.export run_dir=R output_dir=D format=gguf                 # D/model-f16.gguf
    python -m lyra.export run_dir=R output_dir=D format=gguf gguf.type=q8_0  # D/model-q8_0.gguf
    ollama create lyra -f D/Modelfile && ollama run lyra

format=card writes the persona as a Character Card V2 (SillyTavern and other role-play frontends):
D/<name>.json and D/<name>.png (`chara` chunk), no weights read (lyra.persona.cards, docs/cards.md):

    python -m lyra.export run_dir=R output_dir=D format=card
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import lyra
from lyra.cli import hydra_app
from lyra.data.tokenization import template_with_system_prompt
from lyra.errors import UserError
from lyra.paths import resolve_user_path

log = logging.getLogger(__name__)

PROVENANCE_FILE = "lyra_export.json"
FORMATS = ("safetensors", "gguf", "card")


def export_dtype(name: str):
    """auto: bf16 on a bf16-capable GPU, fp32 otherwise (fp16 would risk overflow in Qwen3)."""
    import torch

    from lyra.modeling import resolve_dtype

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return resolve_dtype(name)


def _publishable(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; a shipped model follows the umask."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod((0o777 if path.suffix == ".sh" else 0o666) & ~umask)  # scripts stay runnable


def check_output_dir(output_dir: Path, run_dir: Path, overwrite: bool) -> None:
    inside_training = any(output_dir.is_relative_to(run_dir / name) for name in ("adapter", "checkpoints"))
    if run_dir.is_relative_to(output_dir) or inside_training:
        raise UserError("output_dir", f"{output_dir} would overwrite the training run; choose a new directory")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError("output_dir", f"{output_dir} is a file")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError("output_dir", f"{output_dir} is not empty; choose another or pass overwrite=true")


def export(cfg: DictConfig) -> Path:
    """Merge and save; returns the output dir. Writes nothing but output_dir."""
    from lyra.generation import check_generation, generation_config
    from lyra.modeling import training_device
    from lyra.runs import load_full_precision_merged, load_run_tokenizer, open_run

    for key in ("run_dir", "output_dir"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(key, "is required: python -m lyra.export run_dir=<training output dir> output_dir=<new dir>")
    if cfg.format not in FORMATS:
        raise UserError("format", f"{cfg.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.format == "card":
        return _export_card(cfg)
    if cfg.format == "gguf":
        from lyra.gguf import check_gguf_type

        check_gguf_type(cfg.gguf.type)
    generation: dict[str, Any] = OmegaConf.to_container(cfg.generation, resolve=True)
    check_generation(generation)
    dtype = export_dtype(cfg.dtype)
    files = open_run(cfg.run_dir, cfg.adapter)  # the untrusted-run-dir checks (lyra.runs)
    run_dir, run_cfg, adapter_path = files.path, files.cfg, files.adapter_path
    output_dir = resolve_user_path(cfg.output_dir)
    check_output_dir(output_dir, run_dir, cfg.overwrite)
    if adapter_path is None:
        raise UserError("adapter", "export merges an adapter; adapter=none would only copy the base model")
    tokenizer = load_run_tokenizer(run_dir, adapter_path, run_cfg.model)
    system_prompt = run_cfg.data.get("system_prompt") or ""
    chat_template = tokenizer.chat_template
    if cfg.embed_system_prompt and system_prompt:
        chat_template = template_with_system_prompt(chat_template, system_prompt)
    gguf_target = None
    if cfg.format == "gguf":  # architecture, type, tokenizer and template checked before the merge
        from transformers import AutoConfig

        from lyra.gguf import check_gguf_export
        from lyra.modeling import model_path

        gguf_target = check_gguf_export(AutoConfig.from_pretrained(model_path(run_cfg.model)), tokenizer,
                                        chat_template, cfg.gguf.type)

    model = load_full_precision_merged(run_cfg, adapter_path, dtype, cfg.device or training_device())
    gen_config = generation_config(tokenizer, **generation)
    gen_config.bos_token_id = model.generation_config.bos_token_id
    model.generation_config = gen_config

    tokenizer.chat_template = chat_template

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        if gguf_target is None:
            model.save_pretrained(staging, max_shard_size=cfg.max_shard_size)
            tokenizer.save_pretrained(staging)
        else:
            _write_gguf_export(staging, model, tokenizer, gguf_target, chat_template, gen_config, generation)
        provenance = {
            "format": cfg.format,
            "gguf_type": cfg.gguf.type if gguf_target is not None else None,
            "lyra_version": lyra.__version__,
            "run_dir": str(run_dir),
            "adapter": str(adapter_path),
            "base_model": str(run_cfg.model.name_or_path),
            "trained_quantization": OmegaConf.to_container(run_cfg.quantization, resolve=True),
            "lora": OmegaConf.to_container(run_cfg.lora, resolve=True) if "lora" in run_cfg else None,
            "dtype": str(dtype).removeprefix("torch."),
            "system_prompt": system_prompt,
            "system_prompt_in_chat_template": bool(cfg.embed_system_prompt and system_prompt),
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
        _publishable(staging)
        if output_dir.exists():  # only reached when empty or overwrite=true
            # renamed aside, then deleted: a kill leaves output_dir whole (old or new) or absent, never half
            aside = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
            os.replace(output_dir, aside / output_dir.name)
            staging.rename(output_dir)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"merged model written to {output_dir}" + (f" ({cfg.format})" if gguf_target is not None else ""))
    return output_dir


def _export_card(cfg: DictConfig) -> Path:
    """format=card: the run's persona as a Character Card V2, JSON and PNG (lyra.persona.cards)."""
    from lyra.persona.cards import write_run_card
    from lyra.runs import run_dir_path

    run_dir = run_dir_path(cfg.run_dir)
    output_dir = resolve_user_path(cfg.output_dir)
    check_output_dir(output_dir, run_dir, cfg.overwrite)
    files, notes = write_run_card(run_dir, output_dir)
    for note in notes:
        print(f"note: {note}")
    print(f"character card written to {', '.join(str(path) for path in files)}")
    return output_dir


def _write_gguf_export(staging: Path, model, tokenizer, target, chat_template: str, gen_config,
                       generation: dict[str, Any]) -> None:
    """model-<type>.gguf, the Ollama Modelfile, a llama-server script, the persona's prompt and a README."""
    from lyra.gguf import (LLAMA_SERVER_SCRIPT, SYSTEM_PROMPT_FILE, llama_server_script, modelfile, ollama_parameters,
                           write_gguf)

    eos_ids = list(gen_config.eos_token_id)
    gguf_name = f"model-{target.type}.gguf"
    write_gguf(model, tokenizer, staging / gguf_name, target, chat_template, eos_ids, name="lyra")
    stops = tokenizer.convert_ids_to_tokens(eos_ids)
    (staging / "Modelfile").write_text(modelfile(gguf_name, target, stops, ollama_parameters(generation)),
                                       encoding="utf-8")
    (staging / LLAMA_SERVER_SCRIPT).write_text(llama_server_script(gguf_name, target, generation), encoding="utf-8")
    if target.default_system:
        (staging / SYSTEM_PROMPT_FILE).write_text(target.default_system + "\n", encoding="utf-8")
    size_mb = (staging / gguf_name).stat().st_size / 1e6
    prompt_file = bool(target.default_system)
    (staging / "README.md").write_text(GGUF_README.format(
        gguf_name=gguf_name, type=target.type, size_mb=size_mb, stops=", ".join(stops),
        cli_system=f" -sysf {SYSTEM_PROMPT_FILE}" if prompt_file else "",
        lm_studio_system=f": paste {SYSTEM_PROMPT_FILE} there to keep it" if prompt_file else ""), encoding="utf-8")


GGUF_README = """# lyra, exported as GGUF

`{gguf_name}` ({type}, {size_mb:.0f} MB) holds the merged weights, the tokenizer and the chat template
(thinking off; the run's system prompt built in unless exported with embed_system_prompt=false).
`Modelfile` tells Ollama the same: the system prompt, a ChatML template equivalent to the training
one, and the stop tokens ({stops}).

Ollama:

    ollama create lyra -f Modelfile
    ollama run lyra

llama.cpp's OpenAI-compatible server (SillyTavern, Open WebUI, the openai client: http://127.0.0.1:8080/v1):

    sh llama-server.sh          # llama-server -m {gguf_name} --jinja ...

Keep `--jinja`: it runs the template embedded in the file, which adds the persona's system prompt
to a chat without one. Without it llama-server formats ChatML itself and drops that prompt.
llama.cpp's terminal chat:

    llama-cli -m {gguf_name} --jinja{cli_system}

LM Studio: load {gguf_name}; it uses the template embedded in the file. A system prompt set in LM
Studio is a system message, which replaces the persona's{lm_studio_system}.

transformers (dequantized to float32):

    AutoModelForCausalLM.from_pretrained(".", gguf_file="{gguf_name}")
"""


@hydra_app("export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
