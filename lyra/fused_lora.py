"""Fused LoRA layers for CPU training: each LoRA linear's base product, dropout and adapter in one autograd node.

    from lyra.fused_lora import fuse_lora_layers
    print(fuse_lora_layers(model))   # after apply_lora and onednn_frozen_linears; lyra.train does it (model.fused_lora=true)

PEFT runs a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: six autograd nodes and
as many full-size passes over the activations, forward and backward, around two rank-r products
that cost almost nothing. On a CPU most of that time is not the products:
- `nn.Dropout` draws its mask with `bernoulli_`, one draw after another from torch's Mersenne
  Twister: ~1.4 ms for a [485, 576] SmolLM2 activation, as long as the base layer's own product;
- the scale, the sum with the base output and the dropout's backward are each another pass.

`_FusedLoRALinear` computes the same function in one node. The forward adds the adapter into the base
product in place (`addmm_`), and the backward adds the adapter's input gradient into the base's.
The dropout mask comes from numpy's SFC64, seeded for each call from torch's generator: one 32-bit
draw per element against (1 - p) * 2^32, 1 byte per element kept for the backward. That is ~0.3 ms
for the same activation. The result is exact dropout: each element is dropped with probability p
(to 2^-32) and the rest are scaled by 1/(1 - p), reproducible under `trainer.seed`. It is a different
random stream from PEFT's, though, so a run's losses differ from `model.fused_lora=false` from the
first dropped element, and agree with it exactly when `lora_dropout` is 0 (tests/test_fused_lora.py).

Measured on SmolLM2-135M, LoRA on q/v (60 layers), the bench's batches: one layer's forward and
backward 6.5 -> 5.3 ms; a whole step 1.04x faster (paired, alternated, same batches), and 1.04-1.09x
in `scripts/bench_train.py --variants hf,lyra,lyra_peft_lora` (docs/performance.md). It keeps what PEFT
keeps (the dropped input and a 1-byte mask) and no more: 0.81-0.84 of PEFT's training memory there.

Only the plain case is fused: training mode, one active adapter that is vanilla LoRA (no DoRA or
other variant, no LoRA bias), not merged, not disabled, an exact `nn.Linear` base that is frozen,
and fp32 inputs and weights on the CPU. Anything else (evaluation, generation, 4-bit bases, bf16,
GPU) runs PEFT's own forward, checked on every call.
"""

from __future__ import annotations

import functools
import types

from lyra.prepack import onednn_linear, uses_onednn


def kept_mask(shape, p: float):
    """A uint8 tensor of `shape`, 1 where an element is kept and 0 where it is dropped (probability p, exact
    to 2^-32), drawn from numpy's SFC64 seeded by torch's default generator, so `torch.manual_seed` makes it
    repeat. uint8 rather than bool because `x * mask` with it is ~4x faster than `torch.where` on a bool."""
    import numpy as np
    import torch

    count = 1
    for size in shape:
        count *= size
    seed = int(torch.randint(0, 2**62, (1,)))
    bits = np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.uint32)[:count]  # 64-bit draws, two per draw
    threshold = min(round((1.0 - p) * 2**32), 2**32 - 1)  # a p below 2^-33 still fits in 32 bits
    return torch.from_numpy((bits < np.uint32(threshold)).view(np.uint8)).view(shape)


@functools.cache
def _fused_function():
    """Built on first use, so importing this module needs no torch."""
    import torch

    class _FusedLoRALinear(torch.autograd.Function):
        """linear(x, W, b) + scaling * (dropout_p(x) A^T) B^T, with W and b frozen and `linear` either
        F.linear or onednn_linear (the base layer's own choice)."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, linear):
            out = linear(x, weight, bias)
            rows = x.reshape(-1, x.shape[-1])
            mask = kept_mask(rows.shape, p) if p > 0 else None  # [rows, in], 1 = kept
            kept = rows if mask is None else rows * mask
            keep_scale = 1.0 / (1.0 - p)
            hidden = torch.mm(kept, lora_a.t())
            if keep_scale != 1.0:
                hidden.mul_(keep_scale)  # [rows, r]: the scale on the small side
            out.view(-1, out.shape[-1]).addmm_(hidden, lora_b.t(), alpha=scaling)
            ctx.save_for_backward(weight, lora_a, lora_b, kept, mask, hidden)
            ctx.scaling, ctx.keep_scale, ctx.linear = scaling, keep_scale, linear
            return out

        @staticmethod
        def backward(ctx, grad_out):
            weight, lora_a, lora_b, kept, mask, hidden = ctx.saved_tensors
            grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
            grad_hidden = torch.mm(grad_rows, lora_b).mul_(ctx.scaling)  # [rows, r]
            grad_a = grad_b = grad_x = None
            if ctx.needs_input_grad[4]:
                grad_b = torch.mm(grad_rows.t(), hidden).mul_(ctx.scaling)
            if ctx.needs_input_grad[3]:
                grad_a = torch.mm(grad_hidden.t(), kept)
                if ctx.keep_scale != 1.0:
                    grad_a.mul_(ctx.keep_scale)
            if ctx.needs_input_grad[0]:
                grad_x = ctx.linear(grad_out.contiguous(), weight.t())  # g W: the frozen base's input gradient
                through_adapter = torch.mm(grad_hidden, lora_a)
                if mask is not None:
                    through_adapter.mul_(mask)
                grad_x.view(-1, grad_x.shape[-1]).add_(through_adapter, alpha=ctx.keep_scale)
            return grad_x, None, None, grad_a, grad_b, None, None, None

    return _FusedLoRALinear


def _plain_lora(self, x, args, kwargs):
    """The adapter name when this call is the plain case the module doc lists, else None."""
    import torch

    if args or kwargs or not self.training or self.disable_adapters or self.merged:
        return None
    active = self.active_adapters
    if (len(active) != 1 or active[0] not in self.lora_A or active[0] in getattr(self, "lora_variant", {})
            or getattr(self, "use_dora", {}).get(active[0], False)):
        return None
    name = active[0]
    base, lora_a, lora_b, dropout = self.base_layer, self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    if (type(base) is not torch.nn.Linear or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear
            or lora_a.bias is not None or lora_b.bias is not None
            or type(dropout) not in (torch.nn.Dropout, torch.nn.Identity) or getattr(dropout, "p", 0.0) >= 1):
        return None
    tensors = (x, base.weight, lora_a.weight, lora_b.weight)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    return name


def _fused_forward(self, x, *args, **kwargs):
    """A PEFT LoRA Linear's forward: the fused node in the plain case, PEFT's own forward otherwise."""
    import torch

    name = _plain_lora(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    base = self.base_layer
    linear = onednn_linear if uses_onednn(base) else torch.nn.functional.linear
    return _fused_function().apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                   float(self.scaling[name]), p, linear)


def uses_fused_lora(module) -> bool:
    """Whether `fuse_lora_layers` gave this layer the fused forward (a call outside the plain case still runs PEFT's)."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fused_forward


def fuse_lora_layers(model) -> str:
    """Give every PEFT LoRA Linear of `model` the fused forward (see the module doc). Returns what it did."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return "LoRA layers stay on PEFT's forward: peft has no lora.layer.Linear here"
    layers = [module for module in model.modules() if type(module) is LoraLinear and "forward" not in module.__dict__]
    for module in layers:
        module.forward = types.MethodType(_fused_forward, module)
    if not layers:
        return "LoRA layers stay on PEFT's forward: no plain PEFT LoRA Linear layers (4-bit or other layer types)"
    return (f"{len(layers)} LoRA layers fused (base + dropout + adapter in one node while training on CPU fp32; "
            f"model.fused_lora=false: PEFT's forward)")
