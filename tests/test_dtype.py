"""Compute dtype by hardware: bf16 on bf16 GPUs, fp16 on older GPUs (T4), fp32 on CPU; the 4-bit
compute dtype follows; a non-tiny 4-bit model on CPU is warned about once, never overridden."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import lyra.modeling as modeling
from lyra.errors import UserError
from lyra.modeling import build_quantization, resolve_compute_dtype, resolve_dtype, warn_4bit_on_cpu

NF4 = OmegaConf.create({"load_in_4bit": True, "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_type": "nf4",
                        "bnb_4bit_compute_dtype": "bfloat16"})


@pytest.fixture
def hardware(monkeypatch):
    """hardware("bf16_gpu" | "t4" | "cpu" | "bf16_cpu"): fake what torch reports."""
    def use(kind: str) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: kind in ("bf16_gpu", "t4"))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: kind == "bf16_gpu")
        monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: kind == "bf16_cpu")
    return use


@pytest.mark.parametrize("kind, expected", [("bf16_gpu", torch.bfloat16), ("t4", torch.float16),
                                            ("cpu", torch.float32), ("bf16_cpu", torch.float32)])
def test_auto_dtype_follows_the_hardware(hardware, kind, expected):
    hardware(kind)
    assert resolve_dtype("auto") is expected


def test_explicit_dtype_is_kept_and_unknown_is_a_user_error(hardware):
    hardware("cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    with pytest.raises(UserError, match="model.dtype: unknown dtype 'half'; use auto, bfloat16, float16 or float32"):
        resolve_dtype("half")


@pytest.mark.parametrize("kind, model_dtype, expected, logged", [
    ("bf16_gpu", torch.bfloat16, torch.bfloat16, None),
    ("t4", torch.float16, torch.float16, "this GPU has no bf16: 4-bit compute dtype falls back to float16"),
    ("cpu", torch.float32, torch.float32,
     "CPU without native bf16/fp16: 4-bit compute dtype bfloat16 -> float32 (faster here, same memory)"),
    ("bf16_cpu", torch.float32, torch.bfloat16, None),  # AVX512-BF16/AMX run bf16 natively
    ("cpu", torch.bfloat16, torch.bfloat16, None),  # model.dtype=bfloat16 set by the user: respected
])
def test_4bit_compute_dtype_follows_the_hardware(hardware, caplog, kind, model_dtype, expected, logged):
    hardware(kind)
    with caplog.at_level(logging.INFO, logger="lyra.modeling"):
        assert resolve_compute_dtype("bfloat16", model_dtype) is expected
        assert build_quantization(NF4, model_dtype).bnb_4bit_compute_dtype is expected
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ([logged, logged] if logged else [])


def test_float32_compute_dtype_is_never_changed(hardware):
    for kind in ("bf16_gpu", "t4", "cpu"):
        hardware(kind)
        assert resolve_compute_dtype("float32", torch.float32) is torch.float32


def fake_model(hidden, intermediate, layers, heads, kv_heads, head_dim, in_4bit=True, device="cpu"):
    config = SimpleNamespace(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    return SimpleNamespace(config=config, is_loaded_in_4bit=in_4bit, device=torch.device(device))


def test_4bit_on_cpu_warns_once_for_non_tiny_models(monkeypatch, caplog):
    monkeypatch.setattr(modeling, "_warned_4bit_on_cpu", set())
    qwen3_0_6b = fake_model(1024, 3072, 28, 16, 8, 128)
    with caplog.at_level(logging.WARNING, logger="lyra.modeling"):
        warn_4bit_on_cpu(fake_model(64, 128, 2, 4, 2, 16), "tiny")  # the test model: silent
        warn_4bit_on_cpu(fake_model(1024, 3072, 28, 16, 8, 128, in_4bit=False), "fp32")  # not 4-bit: silent
        warn_4bit_on_cpu(fake_model(1024, 3072, 28, 16, 8, 128, device="cuda:0"), "gpu")  # on GPU: silent
        warn_4bit_on_cpu(qwen3_0_6b, "Qwen/Qwen3-0.6B")
        warn_4bit_on_cpu(qwen3_0_6b, "Qwen/Qwen3-0.6B")  # a multirun's next job: not again
    assert [record.getMessage() for record in caplog.records] == [
        "training Qwen/Qwen3-0.6B (440M non-embedding params) in 4-bit on CPU: the NF4 backward dominates. "
        "Measured on 2 cores with Qwen3-0.6B, one 128-token LoRA step takes ~470 s in 4-bit vs ~14 s in fp32. "
        "`quantization=none` trains in fp32 (more memory, much faster here); keeping 4-bit as configured."]


# ---------------------------------------------------------------- k-bit preparation

def kbit_precision_problems(model) -> list[str]:
    """Norms, embeddings and head of a prepared 4-bit model must train in fp32 (prepare_model_for_kbit_training):
    in bf16 their updates round away. Returns what is not fp32."""
    problems = []
    for name, parameter in model.named_parameters():
        kind = ("norm" in name and "norm") or ("embed_tokens" in name and "embeddings") or ("lm_head" in name and "head")
        if kind and "lora_" not in name and parameter.dtype != torch.float32:
            problems.append(f"{kind} {name} is {parameter.dtype}")
    return problems


def build_bf16_4bit_lora(tmp_path):
    from conftest import compose

    from lyra.modeling import apply_lora, build_model

    cfg = compose(["experiment=smoke", "logger=none", f"paths.output_dir={tmp_path}", "model.dtype=bfloat16",
                   "quantization.bnb_4bit_compute_dtype=bfloat16"])
    model = build_model(cfg.model, build_quantization(cfg.quantization, torch.bfloat16), torch.bfloat16)
    assert getattr(model, "is_loaded_in_4bit", False)
    assert any(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "norm" in n)  # loaded in bf16
    return apply_lora(model, cfg.lora)


def test_apply_lora_prepares_a_4bit_model_with_fp32_norms_embeddings_and_head(tmp_path):
    model = build_bf16_4bit_lora(tmp_path)
    names = [name for name, _ in model.named_parameters()]
    assert any("norm" in n for n in names) and any("embed_tokens" in n for n in names)
    assert kbit_precision_problems(model) == []


def test_the_kbit_check_fails_when_the_preparation_is_skipped(tmp_path, monkeypatch):
    """The check above is not vacuous: without prepare_model_for_kbit_training it finds bf16 weights."""
    import peft

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda model, **kwargs: model)
    problems = kbit_precision_problems(build_bf16_4bit_lora(tmp_path))
    assert any(p.startswith("norm ") for p in problems) and any(p.startswith("embeddings ") for p in problems)
