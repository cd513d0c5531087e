"""The causal-LM loss lyra trains and evaluates with: logits only where a token is supervised.

    from lyra.loss import supervised_loss
    loss, outputs = supervised_loss(model, model.get_output_embeddings(), batch, num_items_in_batch)

Qwen3's head is 151,936 wide, so a full-logits pass over a system prompt that is never trained on is
most of a step's FLOPs and memory. `supervised_loss` applies the head only to hidden states whose
*shifted* label is supervised (`head_sees_only`), and so does the last layer's MLP, whose output
feeds nothing else (`last_mlp_sees_only`: on SmolLM2's persona batches, where ~1/3 of the tokens
are supervised, ~1% of a training step). For a plain linear head the projection and the
cross-entropy are fused and chunked (`linear_cross_entropy`): at most `CE_CHUNK_BYTES` of logits exist
at a time, and their gradient is taken on the spot, so neither the logits nor their softmax are kept
for the backward. The loss is the standard masked mean cross-entropy, the same normalisation as
`ForCausalLMLoss`: a sum over supervised tokens divided by `num_items_in_batch` (the Trainer's count
over all gradient-accumulation micro-batches), or a per-batch mean without it.

Used by `lyra.trainer` (training, eval_loss) and `lyra.evaluate` (held-out loss of a finished run);
tests/test_trainer.py proves it equals the model's own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lyra.data.tokenization import IGNORE_INDEX
from lyra.prepack import onednn_linear, uses_onednn

# Logits alive at once in the fused head + loss: 256 MiB is ~440 Qwen3 tokens of fp32 logits. Bigger
# chunks run the head's matmuls faster (this 2-core CPU, fwd + bwd per supervised token at Qwen3's
# vocab and hidden 512: 2.8 ms at 110 rows, 2.1 at 216, 1.9 at 432) and cost memory one for one.
CE_CHUNK_BYTES = 256 * 2**20


def token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[rows, seq]: which positions hold a token. A prefix-sharing tree mask ([rows, 1, L, L]) says it on
    its diagonal (a token sees itself; padding never does), a padding mask is one already."""
    return attention_mask.diagonal(dim1=-2, dim2=-1)[:, 0] if attention_mask.dim() == 4 else attention_mask


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: labels shifted left by one, IGNORE_INDEX at the end."""
    return nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


@contextlib.contextmanager
def head_sees_only(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, `head` receives only the hidden states where `keep` ([batch, seq]) is True.

    A pre-hook rather than calling the decoder directly keeps the model's own forward (and any
    DDP/FSDP/PEFT wrapper around it) in charge; the head then returns [n_kept, vocab] logits.
    """
    def select(_module, args):
        return (args[0][keep], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def supervised_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                             num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """`ForCausalLMLoss` on already selected rows: fp32 CE summed / num_items, or mean without it."""
    logits = logits.float()
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, targets, reduction="mean")
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def even_chunks(total: int, most: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest chunks of at most `most` rows covering `total`, all within one row of
    each other: a short last chunk would re-read the whole head for a handful of rows."""
    count = -(-total // most) if total else 0
    return [(total * i // count, total * (i + 1) // count) for i in range(count)]


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of `linear(hidden, weight, bias)` rows against `targets`, chunk by chunk.

    The gradient w.r.t. each chunk's logits (softmax - one-hot) is known as soon as its logits are,
    so it is pushed through the head in the forward and only [n, hidden]-sized gradients are kept
    (the Liger/"cut cross-entropy" idea, in plain torch so it runs on CPU too).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, with_grads: bool, linear):
        ce_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, as ForCausalLMLoss
        total = torch.zeros((), dtype=ce_dtype, device=hidden.device)
        grads = with_grads and (hidden.requires_grad or weight.requires_grad
                                or (bias is not None and bias.requires_grad))
        grad_hidden = torch.zeros_like(hidden) if grads and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads and weight.requires_grad else None
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                     if grads and bias is not None and bias.requires_grad else None)
        for start, stop in even_chunks(hidden.shape[0], chunk_rows):
            rows = hidden[start:stop]
            target = targets[start:stop, None]
            logits = linear(rows, weight, bias).to(ce_dtype)
            # log-sum-exp in place, with no [rows, vocab] temporaries: max, exp(logits - max), its sum
            top = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, target)
            norm = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            total += (top + norm.log() - picked).sum()
            if not grads:
                continue
            logits.div_(norm)  # softmax: d(sum CE)/d(logits) is softmax - one-hot
            logits.scatter_add_(1, target, torch.full_like(picked, -1.0))
            grad_logits = logits.to(rows.dtype if rows.dtype == weight.dtype else torch.float32)
            if grad_hidden is not None:
                grad_hidden[start:stop] = linear(grad_logits, weight.to(grad_logits.dtype).t()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.float().T @ rows.float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        out = []
        for grad, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes):
            out.append((grad * grad_total.to(grad.dtype)).to(dtype) if present else None)
        return (*out, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                         chunk_bytes: int = CE_CHUNK_BYTES) -> torch.Tensor:
    """sum over rows of CE(head(hidden), targets) in fp32, never holding more than `chunk_bytes` of logits."""
    chunk_rows = max(1, chunk_bytes // (4 * head.out_features))
    frozen_fp32 = (head.weight.dtype == hidden.dtype == torch.float32 and not head.weight.requires_grad
                   and (head.bias is None or not head.bias.requires_grad))
    # a head model.onednn_linears switched (lyra.prepack): its products on oneDNN here too, ~1.3x MKL's
    # forward and ~1.2x its input gradient at [216, 512] x [512, 151936] on this CPU
    linear = onednn_linear if frozen_fp32 and uses_onednn(head) else nn.functional.linear
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_rows, torch.is_grad_enabled(),
                                     linear)


def fusable_head(model, head: nn.Module) -> bool:
    """A plain nn.Linear head with no logit scaling/softcapping: the fused loss computes exactly its logits."""
    config = getattr(model, "config", None)
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in
                 ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"))
    return type(head) is nn.Linear and not scaled


@contextlib.contextmanager
def head_captures(head: nn.Module) -> Iterator[dict]:
    """While active, `head` returns [rows, 0] (no logits) and its input lands in the yielded dict."""
    captured: dict[str, torch.Tensor] = {}
    replaced = "forward" in head.__dict__
    original = head.__dict__.get("forward")

    def capture(hidden):
        captured["hidden"] = hidden
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = capture
    try:
        yield captured
    finally:
        if replaced:
            head.forward = original
        else:
            del head.forward


def _last_mlp(model):
    """The last decoder layer's MLP when the layer is the usual pre-norm `h + mlp(norm(h))` whose output
    only feeds the final norm and the head (Llama, Qwen, Mistral...), else None. Not under activation
    checkpointing: its recompute in the backward runs after the hooks are gone."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    if (not hasattr(last, "post_attention_layernorm") or not isinstance(getattr(last, "mlp", None), nn.Module)
            or getattr(last, "gradient_checkpointing", False)):
        return None
    return last.mlp


@contextlib.contextmanager
def last_mlp_sees_only(model, keep: torch.Tensor) -> Iterator[None]:
    """While active, the last layer's MLP runs only on the rows in `keep` ([batch, seq]); the other rows
    of its output are zeros. Those rows of the last layer feed nothing but the head, which sees only
    `keep` too (head_sees_only), so the loss and every gradient are unchanged."""
    mlp = _last_mlp(model)
    if mlp is None or bool(keep.all()):
        yield
        return

    def select(_module, args):
        return (args[0][keep], *args[1:])

    def scatter(_module, _args, output):
        full = output.new_zeros(*keep.shape, output.shape[-1])
        full[keep] = output
        return full

    handles = [mlp.register_forward_pre_hook(select), mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def supervised_loss(model, head: nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None,
                    fused: bool = True) -> tuple[torch.Tensor, object]:
    """(loss, model outputs) of a batch with `labels` (and optionally `shift_labels`, prefix sharing).

    `head` is the (unwrapped) model's output layer. fused: project and take the CE chunk by chunk
    when the head allows it (`fusable_head`); the outputs' logits are then empty. Under DDP pass
    fused=False: DDP finds the parameters a step used by walking back from the wrapped model's
    outputs, and the fused loss reads the head's input outside that graph.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = inputs.pop("shift_labels", None)
    targets = shifted_targets(labels) if targets is None else targets
    keep = targets != IGNORE_INDEX
    if fused and fusable_head(model, head):
        with head_sees_only(head, keep), head_captures(head) as captured, last_mlp_sees_only(model, keep):
            outputs = model(**inputs)
        total = linear_cross_entropy(captured["hidden"], head, targets[keep])
        if num_items_in_batch is None:
            return total / max(int(keep.sum()), 1), outputs
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch, outputs
    with head_sees_only(head, keep), last_mlp_sees_only(model, keep):
        outputs = model(**inputs)
    return supervised_cross_entropy(outputs.logits, targets[keep], num_items_in_batch), outputs
