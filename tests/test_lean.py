"""lyra.lean: the same loss and gradients as the stock modules, with less kept for the backward."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lyra.lean import lean_activations
from lyra.modeling import apply_lora

LORA = OmegaConf.create({"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear",
                         "bias": "none", "task_type": "CAUSAL_LM"})


def random_causal_lm(family: str):
    """A 2-layer random Qwen3 or Llama (SmolLM2's family) with LoRA on every linear layer, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                        attn_implementation="sdpa")
    model = model_cls(config)
    # norms start at ones: perturb them so a wrong weight gradient or a dropped weight shows
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model = apply_lora(model, LORA)
    for name, module in model.named_modules():  # B starts at zero: give the adapter an effect
        if name.endswith("lora_B.default"):
            nn.init.normal_(module.weight, std=0.02)
    return model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def saved_bytes(model, batch) -> int:
    """Bytes of activations autograd keeps for the backward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in parameters:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    return sum(storages.values())


def batch_of(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt, as in chat data
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_lean_modules_give_the_stock_loss_and_gradients_with_less_saved(family):
    stock = random_causal_lm(family)
    lean = copy.deepcopy(stock)
    counts = lean_activations(lean)
    layers = stock.config.num_hidden_layers
    norms_per_layer = 4 if family == "qwen3" else 2  # Qwen3 also normalises q and k per head
    assert counts == {"rms_norm": layers * norms_per_layer + 1, "swiglu_mlp": layers, "kept_stock": 0}

    batch = batch_of(stock)
    stock_loss, stock_grads = loss_and_grads(stock, batch)
    lean_loss, lean_grads = loss_and_grads(lean, batch)
    assert torch.equal(stock_loss, lean_loss)  # the forward runs the same ops: bit-identical
    assert stock_grads.keys() == lean_grads.keys() and len(stock_grads) > 0
    for name, grad in stock_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)

    ratio = saved_bytes(lean, batch) / saved_bytes(stock, batch)
    print(family, ratio)
    assert ratio < 0.9


def test_trainable_norm_weights_get_their_gradient():
    """Full fine-tuning of a norm (modules_to_save, or no LoRA at all) still gets the weight gradient."""
    stock = random_causal_lm("qwen3")
    for name, parameter in stock.named_parameters():
        if "norm" in name:
            parameter.requires_grad_(True)
    lean = copy.deepcopy(stock)
    lean_activations(lean)
    batch = batch_of(stock)
    _, stock_grads = loss_and_grads(stock, batch)
    _, lean_grads = loss_and_grads(lean, batch)
    norm_grads = [name for name in stock_grads if "norm" in name]
    assert norm_grads
    for name in norm_grads:
        torch.testing.assert_close(lean_grads[name], stock_grads[name], rtol=1e-4, atol=1e-7, msg=name)


class OnePlusWeightRMSNorm(nn.Module):
    """Gemma's norm: same attributes as Qwen3's, different formula. The probe must refuse it."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.variance_epsilon = 1e-6

    def forward(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return (1 + self.weight) * hidden * torch.rsqrt(variance + self.variance_epsilon)


class GeluMLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(width, 8), nn.Linear(width, 8), nn.Linear(8, width)
        self.act_fn = nn.GELU()
        self.hidden_size = width

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_modules_that_only_look_alike_keep_their_own_forward():
    model = nn.Sequential(OnePlusWeightRMSNorm(16), GeluMLP(16))
    counts = lean_activations(model)
    assert counts == {"rms_norm": 0, "swiglu_mlp": 0, "kept_stock": 2}
    assert all("forward" not in module.__dict__ for module in model)
