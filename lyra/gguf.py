"""GGUF export: one file with weights + tokenizer for llama.cpp, Ollama and LM Studio, plus an Ollama Modelfile.

    python -m lyra.export run_dir=R output_dir=D format=gguf               # f16 (default)
    python -m lyra.export run_dir=R output_dir=D format=gguf gguf.type=q8_0

In Python (lyra.export calls exactly this after merging the adapter):

    from lyra.gguf import check_gguf_export, write_gguf, modelfile
    target = check_gguf_export(model_config, tokenizer, chat_template, "q8_0")   # cheap, before the merge
    write_gguf(model, tokenizer, "model-q8_0.gguf", target, chat_template, eos_ids=[151645, 151643])

The file is written with the `gguf` package (gguf-py, llama.cpp's own writer): its architecture
enum, tensor-name tables (`get_tensor_name_map`, `MODEL_TENSORS`), key names, quantizer
(`gguf.quants`) and tokenizer reader (`SpecialVocab` for merges and special tokens). Nothing of
the format is hand-rolled here; what lives here is the mapping from a transformers model and its
tokenizer onto those tables, for the architectures lyra trains: Qwen3 and Llama (SmolLM2).

No maintained HF-to-GGUF converter is on PyPI: llama.cpp's convert_hf_to_gguf.py ships only in
its source tree (and inside llama-cpp-python's sdist, as a script, not a module).

The Ollama Modelfile's TEMPLATE is Go text/template, so it cannot be derived from the Jinja chat
template. lyra writes a ChatML template (with or without Qwen3's empty think block) and only after
checking, on reference chats, that the run's Jinja template renders the very same prompts.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lyra.errors import UserError

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")  # what gguf.type accepts: f32 is the merged model exactly, f16 near-exact at half its size, q8_0 halves it again

# Qwen3's template with enable_thinking=False: an empty think block opens the reply being generated.
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"
# Jinja: forces thinking off for every caller of the embedded template (llama.cpp, LM Studio), as in training.
THINKING_OFF = "{%- set enable_thinking = false %}\n"


@dataclass(frozen=True)
class GgufTarget:
    """What one export will write: decided up front, from the config and tokenizer alone."""

    model_type: str  # transformers model_type: qwen3 | llama
    arch: Any  # gguf.MODEL_ARCH
    tokenizer_pre: str  # llama.cpp pre-tokenizer name (regex split before BPE)
    type: str  # f16 | q8_0
    reply_prefix: str  # what the template puts before a reply: Qwen3's empty think block, or ""
    default_system: str  # the system prompt the chat template adds when a chat has none ("" = none)


def _architectures() -> dict[str, tuple[Any, bool]]:
    """model_type -> (gguf arch, whether q/k rows are permuted for llama.cpp's rotary layout)."""
    import gguf

    # llama.cpp's llama graph rotates adjacent pairs; HF Llama rotates halves, hence the permutation.
    # Qwen3 uses NeoX (halves) rotary in both, so its weights go over unchanged.
    return {"qwen3": (gguf.MODEL_ARCH.QWEN3, False), "llama": (gguf.MODEL_ARCH.LLAMA, True)}


def _tokenizer_pre(model_type: str, tokenizer) -> str:
    """llama.cpp's pre-tokenizer for this tokenizer; only the two byte-level BPE vocabularies lyra knows.

    llama.cpp picks the split regex by this name, so a wrong name tokenizes differently: refuse
    rather than guess.
    """
    vocab = tokenizer.get_vocab()
    if model_type == "qwen3" and vocab.get("<|im_end|>") == 151645 and len(vocab) >= 151643:
        return "qwen2"  # Qwen3 kept Qwen2's tokenizer
    if model_type == "llama" and len(vocab) == 49152 and vocab.get("<|im_start|>") == 1:
        return "smollm"  # SmolLM / SmolLM2's GPT-2-style vocabulary (49,152 tokens, ChatML specials)
    raise UserError("format", f"gguf export knows the Qwen3 and SmolLM2 tokenizers; this {model_type} model's "
                              f"tokenizer ({len(vocab):,} tokens) is neither")


def check_gguf_type(type: str, key: str = "gguf.type") -> None:
    if type not in GGUF_TYPES:
        raise UserError(key, f"{type!r} is not one of {', '.join(GGUF_TYPES)}")


def check_gguf_export(model_config, tokenizer, chat_template: str, type: str) -> GgufTarget:
    """Validate architecture, type, tokenizer and chat template before anything heavy; one line if not."""
    check_gguf_type(type)
    model_type = getattr(model_config, "model_type", None)
    architectures = _architectures()
    if model_type not in architectures:
        raise UserError("format", f"gguf export supports {', '.join(architectures)} models, not {model_type!r}")
    rope = getattr(model_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError("format", f"gguf export writes plain rotary embeddings; this model uses "
                                  f"rope_type={rope['rope_type']!r}")
    arch, _ = architectures[model_type]
    reply_prefix, default_system = _chatml_variant(tokenizer, chat_template)
    return GgufTarget(model_type=model_type, arch=arch, tokenizer_pre=_tokenizer_pre(model_type, tokenizer),
                      type=type, reply_prefix=reply_prefix, default_system=default_system)


# ---------------------------------------------------------------- chat template

def gguf_chat_template(chat_template: str) -> str:
    """The Jinja template embedded in the file: the export's template with thinking always off."""
    return THINKING_OFF + chat_template


_REFERENCE_CHATS = (  # every turn shape a persona chat has: first turn, own system, history
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
)


def render_chatml(messages: Sequence[Mapping[str, str]], reply_prefix: str) -> str:
    """What OLLAMA_TEMPLATE renders for a chat ending in a user turn (the Go template, in Python)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n" + reply_prefix


def _chatml_variant(tokenizer, chat_template: str) -> tuple[str, str]:
    """(reply_prefix, default system prompt) under which ChatML reproduces `chat_template` exactly.

    Rendered with the embedded template (thinking forced off) on reference chats; the default system
    prompt is whatever the template inserts into a chat that has none (the run's persona prompt).
    """
    def render(messages):
        return tokenizer.apply_chat_template(messages, chat_template=gguf_chat_template(chat_template),
                                             tokenize=False, add_generation_prompt=True)

    head = "<|im_start|>system\n"
    bare = render(_REFERENCE_CHATS[0])
    default_system = bare[len(head):bare.index("<|im_end|>")] if bare.startswith(head) else ""
    for reply_prefix in (QWEN3_EMPTY_THINK, ""):
        if all(render(chat) == render_chatml(_with_system(chat, default_system), reply_prefix)
               for chat in _REFERENCE_CHATS):
            return reply_prefix, default_system
    raise UserError("format", "the run's chat template is not ChatML (<|im_start|>role ... <|im_end|>); "
                              "gguf export can only write an Ollama template for ChatML models")


def _with_system(messages, system: str):
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def ollama_template(reply_prefix: str) -> str:
    """Go text/template over .Messages (Ollama prepends the Modelfile's SYSTEM as a system message).

    Every message renders `<|im_start|>role\\ncontent<|im_end|>\\n`; after a final user turn the
    reply opens with `<|im_start|>assistant\\n` + reply_prefix, as `render_chatml` does. A final
    assistant message is continued (no <|im_end|>), Ollama's convention for a prefilled reply.
    """
    return (
        '{{- range $i, $_ := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '{{- if eq .Role "assistant" }}<|im_start|>assistant\n'
        '{{ if $last }}' + reply_prefix + '{{ end }}{{ .Content }}{{ if not $last }}<|im_end|>\n'
        '{{ end }}\n'
        '{{- else }}<|im_start|>{{ .Role }}\n'
        '{{ .Content }}<|im_end|>\n'
        '{{ end }}\n'
        '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n'
        + reply_prefix + '{{ end }}\n'
        '{{- end }}'
    )


def _quoted(text: str) -> str:
    """A Modelfile triple-quoted value; a literal \"\"\" inside cannot be written."""
    if '"""' in text:
        raise UserError("data.system_prompt", 'contains """, which an Ollama Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, target: GgufTarget, stop_tokens: Sequence[str], parameters: Mapping[str, Any]) -> str:
    """The Ollama Modelfile: FROM the file, the persona's SYSTEM, the ChatML TEMPLATE, one stop per eos."""
    lines = ["# ollama create lyra -f Modelfile && ollama run lyra", f"FROM ./{gguf_name}"]
    if target.default_system:
        lines.append(f"SYSTEM {_quoted(target.default_system)}")
    lines.append(f"TEMPLATE {_quoted(ollama_template(target.reply_prefix))}")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    lines += [f"PARAMETER {name} {value}" for name, value in parameters.items()]
    return "\n".join(lines) + "\n"


def ollama_parameters(generation: Mapping[str, Any]) -> dict[str, Any]:
    """The generation group as Ollama PARAMETERs (same names' meaning); greedy becomes temperature 0."""
    greedy = generation.get("do_sample") is False or generation.get("temperature") == 0
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict"}
    parameters = {ollama: generation[hf] for hf, ollama in names.items() if generation.get(hf) is not None}
    if greedy:
        parameters = {"temperature": 0, **{k: v for k, v in parameters.items() if k in ("repeat_penalty", "num_predict")}}
    return parameters


SYSTEM_PROMPT_FILE = "system_prompt.txt"
LLAMA_SERVER_SCRIPT = "llama-server.sh"


def llama_server_flags(generation: Mapping[str, Any]) -> list[str]:
    """The generation group as llama-server's default sampling flags (a request's own values win).

    Ollama's parameters are llama.cpp's sampler settings, so they map one to one."""
    options = {"temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k", "repeat_penalty": "--repeat-penalty",
               "num_predict": "-n"}
    return [item for name, value in ollama_parameters(generation).items() for item in (options[name], str(value))]


def llama_server_script(gguf_name: str, target: GgufTarget, generation: Mapping[str, Any]) -> str:
    """A shell script that serves the file with llama.cpp's llama-server, persona kept.

    `--jinja` makes llama-server run the template embedded in the file, which adds the persona's
    system prompt to a chat that has none. Without it, llama-server recognises ChatML and formats
    the chat itself (llama_chat_apply_template), which drops that built-in prompt: the persona is
    gone for every client that sends no system message. llama-server has no system-prompt file
    option (llama-cli has: -sysf system_prompt.txt).
    """
    lines = [
        "#!/bin/sh",
        "# Serve this persona with llama.cpp's OpenAI-compatible server: http://127.0.0.1:8080/v1",
        "#   sh llama-server.sh            (extra llama-server flags are passed on, e.g. --port 9000)",
        "# --jinja runs the chat template embedded in the file, which adds the persona's system prompt",
        "# to a chat without one. Without --jinja llama-server formats ChatML itself and drops that",
        "# prompt: the character forgets who it is. A client's own system message replaces it either way.",
    ]
    if target.default_system:
        lines.append(f"# The persona's prompt is also in {SYSTEM_PROMPT_FILE} (llama-cli -m {gguf_name} --jinja -sysf {SYSTEM_PROMPT_FILE}).")
    command = ["exec llama-server -m", gguf_name, "--jinja --host 127.0.0.1 --port 8080",
               *llama_server_flags(generation), '"$@"']
    lines += ['cd "$(dirname "$0")" || exit 1', " ".join(command)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- tensors and tokenizer

def _permute_rotary(weights, n_head: int):
    """HF Llama q/k rows (halves rotated together) -> llama.cpp's layout (adjacent pairs)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_tensors(model, target: GgufTarget):
    """(gguf name, numpy data, raw ggml type or None) per weight, through gguf-py's name table."""
    import gguf
    import numpy as np

    config = model.config
    name_map = gguf.get_tensor_name_map(target.arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[target.arch])
    _, permute = _architectures()[target.model_type]
    quantize = target.type == "q8_0"
    fallbacks = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise UserError("format", f"{hf_name} has no GGUF {target.model_type} tensor name; is the model modified?")
        kind, name = found
        data = tensor.detach().to("cpu").float().numpy()
        if permute and kind == gguf.MODEL_TENSOR.ATTN_Q:
            data = _permute_rotary(data, config.num_attention_heads)
        elif permute and kind == gguf.MODEL_TENSOR.ATTN_K:
            data = _permute_rotary(data, config.num_key_value_heads)
        if data.ndim == 1:
            yield name, data.astype(np.float32), None  # norms stay f32, as llama.cpp expects
        elif quantize and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            yield name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        else:
            if quantize:
                fallbacks.append(name)
            yield name, data.astype(np.float32 if target.type == "f32" else np.float16), None
    if fallbacks:
        log.warning("q8_0 needs rows in blocks of 32: %d tensor(s) kept in f16: %s", len(fallbacks), ", ".join(fallbacks))


def _add_hparams(writer, config, target: GgufTarget) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)  # Qwen3's head_dim is not hidden/heads (128 vs 64 in the 0.6B)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer, tokenizer, target: GgufTarget, vocab_size: int, chat_template: str, eos_ids) -> None:
    """Vocabulary, merges, special ids and chat template, so llama.cpp tokenizes like transformers.

    The embedding matrix may have more rows than the tokenizer has tokens (Qwen3: 151,936 vs
    151,669); llama.cpp wants one entry per row, so the rest are unused [PAD<id>] tokens.
    """
    import gguf

    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(id_to_token) >= vocab_size:
        raise UserError("format", f"the tokenizer has ids up to {max(id_to_token)}, beyond the model's {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # specials (<|im_end|>) are control tokens; <think> and friends are plain text
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre(target.tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    with tempfile.TemporaryDirectory(prefix="lyra-gguf-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)  # SpecialVocab reads merges + add_bos from the saved files
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise UserError("format", "the tokenizer has no BPE merges; llama.cpp could not tokenize")
    special.special_token_ids = {"eos": eos_ids[0]}  # the turn end; every eos id is a stop in the Modelfile
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        special.special_token_ids["bos"] = tokenizer.bos_token_id
    special.chat_template = gguf_chat_template(chat_template)
    special.add_to_gguf(writer, quiet=True)


def write_gguf(model, tokenizer, path: str | os.PathLike, target: GgufTarget, chat_template: str,
               eos_ids: Sequence[int], name: str = "lyra") -> dict[str, int]:
    """Write `model` (merged, any float dtype) + tokenizer to one GGUF file; returns tensor counts per type."""
    import gguf

    writer = gguf.GGUFWriter(Path(path), gguf.MODEL_ARCH_NAMES[target.arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hparams(writer, model.config, target)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[target.type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, target, model.config.vocab_size, chat_template, list(eos_ids))
    counts: dict[str, int] = {}
    for tensor_name, data, raw_dtype in _gguf_tensors(model, target):
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        kind = raw_dtype.name if raw_dtype is not None else {"float32": "F32", "float16": "F16"}[data.dtype.name]
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s)", path, json.dumps(counts))
    return counts
