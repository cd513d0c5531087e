"""model.fused_lora (lyra.fused_lora): PEFT's LoRA layers as one autograd node each while training on CPU fp32.

Without dropout the fused layers must give PEFT's loss and every LoRA gradient; with dropout, the same
function as PEFT's math under the fused node's own mask, a mask that drops p of the elements and repeats
under a seed; and every case outside the plain one must run PEFT's own forward.
"""

from __future__ import annotations

import pytest
import torch

from lyra import fused_lora
from lyra.fused_lora import fuse_lora_layers, kept_mask, uses_fused_lora


def _tiny_lora_qwen3(lora_dropout: float, **lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=lora_dropout,
                      **lora_kwargs)
    model = get_peft_model(Qwen3ForCausalLM(config), lora)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give A's gradient something to be
            torch.nn.init.normal_(parameter, std=0.1)
    return model.train()


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(model, ids=IDS):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _fused_calls(model, ids=IDS) -> int:
    """How many LoRA layers ran the fused node in one forward."""
    loss = model(input_ids=ids, labels=ids).loss
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(1 for node in seen if "FusedLoRA" in type(node).__name__)


@pytest.mark.parametrize("onednn", [False, True], ids=["F.linear base", "oneDNN base"])
def test_without_dropout_the_fused_layers_give_peft_loss_and_gradients(onednn):
    from lyra.prepack import onednn_frozen_linears

    model = _tiny_lora_qwen3(lora_dropout=0.0)
    peft_loss, peft_grads = _loss_and_grads(model)
    if onednn:
        assert onednn_frozen_linears(model).startswith("15 frozen linear layers")
    assert fuse_lora_layers(model).startswith("6 LoRA layers fused")  # q, v, down in 2 layers
    assert _fused_calls(model) == 6  # a silent fallback to PEFT's forward would make this test compare PEFT with itself
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == peft_grads.keys() and len(grads) == 2 * 3 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_with_dropout_the_fused_node_is_peft_math_under_its_mask(monkeypatch):
    """The fused node against the same function in plain autograd ops, with the mask it drew."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, requires_grad=True)
    weight, bias = torch.randn(10, 12), torch.randn(10)
    lora_a = torch.randn(3, 12, requires_grad=True)
    lora_b = torch.randn(10, 3, requires_grad=True)
    masks = []
    monkeypatch.setattr(fused_lora, "kept_mask", lambda shape, p: masks.append(kept_mask(shape, p)) or masks[-1])
    out = fused_lora._fused_function().apply(x, weight, bias, lora_a, lora_b, 2.0, 0.25, torch.nn.functional.linear)
    grad_out = torch.randn_like(out)
    fused = torch.autograd.grad(out, (x, lora_a, lora_b), grad_out)
    (mask,) = masks
    assert mask.shape == (14, 12) and mask.dtype == torch.uint8 and 0 < int(mask.sum()) < 14 * 12
    assert set(mask.unique().tolist()) == {0, 1}
    kept = x * mask.view(2, 7, 12).bool() / 0.75
    reference = torch.nn.functional.linear(x, weight, bias) + (kept @ lora_a.t() @ lora_b.t()) * 2.0
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused, torch.autograd.grad(reference, (x, lora_a, lora_b), grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_dropout_mask_drops_p_and_repeats_under_a_seed():
    def dropped(shape, p):
        return kept_mask(shape, p) == 0

    torch.manual_seed(3)
    first = dropped((400, 500), 0.05)
    torch.manual_seed(3)
    assert torch.equal(dropped((400, 500), 0.05), first)  # trainer.seed makes a run repeat
    assert not torch.equal(dropped((400, 500), 0.05), first)  # each call its own mask
    rate = first.float().mean().item()
    assert abs(rate - 0.05) < 4 * (0.05 * 0.95 / first.numel()) ** 0.5  # within 4 sigma of p
    assert abs(dropped((200_000,), 0.5).float().mean().item() - 0.5) < 0.005
    odd = kept_mask((3, 5), 0.3)  # an odd element count: 64-bit draws split in two
    assert odd.shape == (3, 5) and odd.dtype == torch.uint8
    assert not dropped((1000,), 1e-12).any()  # a p too small for 32 bits: nothing dropped, no overflow


def test_with_dropout_training_is_seeded_and_differs_from_no_dropout():
    model = _tiny_lora_qwen3(lora_dropout=0.3)
    fuse_lora_layers(model)
    torch.manual_seed(5)
    first = _loss_and_grads(model)[0]
    torch.manual_seed(5)
    assert torch.equal(_loss_and_grads(model)[0], first)
    model.eval()  # no dropout: PEFT's own forward
    assert _fused_calls(model) == 0
    assert not torch.equal(_loss_and_grads(model)[0], first)


def test_everything_but_the_plain_case_runs_peft_forward():
    model = _tiny_lora_qwen3(lora_dropout=0.1)
    fuse_lora_layers(model)
    layers = [m for m in model.modules() if uses_fused_lora(m)]
    assert len(layers) == 6
    assert _fused_calls(model) == 6
    with model.disable_adapter():  # the base alone
        assert _fused_calls(model) == 0
    model.float().to(torch.bfloat16)
    assert _fused_calls(model) == 0  # bf16: PEFT's forward
    model.to(torch.float32)
    layers[0].base_layer.weight.requires_grad_(True)  # an unfrozen base needs its weight gradient
    assert _fused_calls(model) == 5
    layers[0].base_layer.weight.requires_grad_(False)
    model.merge_adapter()
    assert _fused_calls(model) == 0
    model.unmerge_adapter()
    assert _fused_calls(model) == 6


def test_dora_layers_are_left_to_peft():
    model = _tiny_lora_qwen3(lora_dropout=0.0, use_dora=True)
    fuse_lora_layers(model)
    assert _fused_calls(model) == 0
    loss, grads = _loss_and_grads(model)
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for name, g in grads.items() if "lora_A" in name)
