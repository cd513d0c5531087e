"""oneDNN for linear layers on CPU: faster replies on transformers from weights prepacked once (greedy
decoding reads them at about twice the memory bandwidth of eager `F.linear`), and faster LoRA training
steps from the frozen base's products (`onednn_frozen_linears`, last section).

    from lyra.prepack import prepack_linears
    report = prepack_linears(model)   # after any merge; chat, web, serve and evaluate do it (prepack=true)
    print(report)                     # "prepacked 211 linear layers for oneDNN (+538 MB beside the weights; ...)"
    onednn_frozen_linears(model)      # after apply_lora; lyra.train does it (model.onednn_linears=true)

Decoding one token multiplies a single row by every weight matrix, so on CPU its speed is the speed
at which those weights stream from memory. Eager `F.linear` runs that [1, in] x [out, in]^T product
as a single-threaded MKL gemv that streams about 10 GB/s on this machine's 2 cores, a third of the
read bandwidth (`scripts/bench_chat.py` prints both). oneDNN's inner product on a weight reordered
once into its own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's
CPU freezing pass uses) streams about 20 GB/s with two threads, as MKL's gemv does not: SmolLM2-135M
fp32 decodes 1.38x faster on 2 idle cores (14.9 -> 20.5 tok/s, `scripts/bench_chat.py --peer llamacpp`,
docs/bench/chat_llamacpp.json; the rest of a token is ~900 small ops). With one thread it gains
little: the gain is the second core reading weights. Both sum each output in fp32, in a different
order, so logits differ in the last bits; greedy replies are token-identical on the real SmolLM2
weights (tests/test_prepack.py), which is what a user sees.

The cost is memory: the packed copy lives beside the original weight (+ the linear weights' size,
logged), because the original stays the parameter that merges, adapter switches, saving and
training read. Only exact `nn.Linear` modules (a PEFT LoRA layer's base layer included; never
bitsandbytes' 4-bit layers) in float32 or bfloat16 on CPU are packed, and only for inference:
with autograd on (training, probes during training) every layer runs eager `F.linear`. A weight
swapped by pointer (`LoadedRun.adapter_disabled`, the web page's base toggle) is packed once more
on first use and both packs are kept; a weight changed in place after packing is not noticed, so
call `unpack_linears` before editing weights. `release_packs` drops the copies and keeps the packing
forward (lyra.engines calls it once llama.cpp serves the replies): a layer packs again on first use.
Linears that read the same input (q/k/v, gate/up: `_Siblings`) share one packed product over their
stacked weights, ~120 products per SmolLM2 token instead of ~210, each output bit for bit the
member's own, at the same memory: 1.06x decode (docs/performance.md, "Replies").

Training (`onednn_frozen_linears`, `model.onednn_linears=true`): LoRA's frozen base layers run their
products through oneDNN too, on the plain weight (no packed copy, no extra memory): the forward
`x W^T` and the input gradient `g W` (the frozen weight needs no gradient of its own). At a training
step's sizes (hundreds of rows) MKL's sgemm reaches ~200 GFLOP/s on this machine's 2 cores and
oneDNN ~220 (fwd and input grad, [510, 576] x [576, 1536] and the like); products are most of a
CPU step. Same fp32 math, another summation order: the loss agrees to ~1e-6 relative
(tests/test_prepack.py). The fused loss (lyra.loss) runs a switched head's products with
`onednn_linear` as well: the head's forward at [216, 512] x [512, 151936] takes ~207 ms instead of
~275, its input gradient ~165 instead of ~194 (best of 5, idle). LoRA's own A and B, anything trainable, 4-bit layers and non-fp32 layers keep eager `F.linear`.
"""

from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass

log = logging.getLogger(__name__)

PACK_DTYPES = ("float32", "bfloat16")
MAX_PACKS_PER_LAYER = 2  # the merged weight and the base weight the web page's toggle swaps in


@dataclass
class PrepackReport:
    layers: int = 0
    extra_bytes: int = 0
    reason: str = ""  # why nothing was packed
    sibling_sets: int = 0  # q/k/v and gate/up sets packed as one product each

    def __str__(self) -> str:
        if not self.layers:
            return f"linear weights not prepacked: {self.reason}"
        return (f"prepacked {self.layers} linear layers for oneDNN (+{self.extra_bytes / 1e6:.0f} MB beside the "
                f"weights; {self.sibling_sets} q/k/v and gate/up sets as one product each; prepack=false turns it off)")


def prepack_problem(model) -> str | None:
    """Why this model's linears cannot be prepacked here, or None when they can."""
    import torch

    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu":
        return "the model is not on the CPU (oneDNN packing is a CPU path)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    return None


def _packed_forward(self, x):
    """nn.Linear.forward through the packed weight; eager F.linear where autograd needs the original."""
    import torch

    weight = self.weight
    if torch.compiler.is_compiling():  # lyra.compiled_decode's graph: inductor packs the weight its own way
        return torch.nn.functional.linear(x, weight, self.bias)
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return torch.nn.functional.linear(x, weight, self.bias)
    if x.dtype != weight.dtype:  # the op does not cast; F.linear would refuse the same call
        return torch.nn.functional.linear(x, weight, self.bias)
    siblings = self.__dict__.get("_lyra_siblings")
    if siblings is not None:
        out = siblings.output(self, x)
        if out is not None:
            return out
    packed = _packed_once(self._lyra_packs, weight.data_ptr(), lambda: weight)
    if packed is None:
        return torch.nn.functional.linear(x, weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def _packed_once(packs: dict, key, weight):
    """The packed copy of `weight()` kept in `packs` under `key` (its data pointers), made on first use: a
    weight swapped in by pointer (adapter_disabled) is packed once and both are kept. None when the layer
    already keeps MAX_PACKS_PER_LAYER (the caller runs eager F.linear)."""
    packed = packs.get(key)
    if packed is None:
        if len(packs) >= MAX_PACKS_PER_LAYER:
            return None
        packed = packs[key] = _pack(weight())
    return packed


def _packed_bytes(packs: dict) -> int:
    return sum(packed.numel() * packed.element_size() for packed in packs.values())


class _Siblings:
    """Linears that read the same input (q/k/v, gate/up) as one product over their stacked weights.

    The first member called with an input computes all members' outputs in one oneDNN product and
    keeps the others' slices, with the input itself (held, so no new tensor can reuse its address),
    until each sibling takes its own; its next call with another input computes again. A decoding
    step's ~210 products become ~120: each streams more at once, and the per-call overhead is paid
    less often (SmolLM2: 25.5 -> 22.8 ms of products per token). Each output row is the same dot
    products as the member's own packed product, bit for bit (tests/test_prepack.py).
    """

    def __init__(self, members):
        self.members = members
        self.sizes = [member.out_features for member in members]
        self.packs: dict[tuple[int, ...], object] = {}
        self.held = None  # (input, its version, {member index: output slice}), swapped whole: thread-safe

    def output(self, member, x):
        import torch

        index = self.members.index(member)
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        held = self.held  # read once: a call from another thread replaces the tuple, never edits ours
        if held is not None and x is held[0] and version == held[1]:
            out = held[2].pop(index, None)
            if out is not None:
                if not held[2]:
                    self.held = None  # every sibling took its slice: hold nothing between calls
                return out
        weights = [sibling.weight for sibling in self.members]
        packed = _packed_once(self.packs, tuple(weight.data_ptr() for weight in weights),
                              lambda: torch.cat([weight.detach() for weight in weights]))
        if packed is None:
            return None
        biases = [sibling.bias for sibling in self.members]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        outputs = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").split(self.sizes, dim=-1)
        self.held = (x, version, {i: out for i, out in enumerate(outputs) if i != index})
        return outputs[index]

    def release(self) -> int:
        released = _packed_bytes(self.packs)
        self.packs.clear()
        self.held = None
        return released


SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama, Qwen, Mistral names


def _group_siblings(model) -> int:
    """Give each packed q/k/v and gate/up set a shared `_Siblings`; returns how many sets."""
    groups = 0
    for parent in model.modules():
        for names in SIBLING_GROUPS:
            members = [getattr(parent, name, None) for name in names]
            members = [getattr(member, "base_layer", member) for member in members]  # a PEFT LoRA layer's base
            if not all(hasattr(member, "_lyra_packs") for member in members):
                continue
            if (len({member.in_features for member in members}) != 1
                    or len({member.weight.dtype for member in members}) != 1
                    or len({member.bias is None for member in members}) != 1):
                continue
            siblings = _Siblings(members)
            for member in members:
                member._lyra_packs.clear()  # the stacked pack replaces the members' own
                member._lyra_siblings = siblings
            groups += 1
    return groups


def _pack(weight):
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def prepack_linears(model) -> PrepackReport:
    """Give every eligible nn.Linear of `model` a oneDNN-packed copy of its weight (see the module doc)."""
    import torch

    problem = prepack_problem(model)
    if problem:
        return PrepackReport(reason=problem)
    report = PrepackReport()
    for module in model.modules():
        if type(module) is not torch.nn.Linear or hasattr(module, "_lyra_packs"):
            continue  # subclasses (bitsandbytes Linear4bit/8bit) keep their own forward
        weight = module.weight
        if str(weight.dtype).removeprefix("torch.") not in PACK_DTYPES or weight.device.type != "cpu":
            continue
        try:
            packed = _pack(weight)
        except RuntimeError as error:  # e.g. bfloat16 on a CPU without bf16 instructions
            unpack_linears(model)
            return PrepackReport(reason=f"oneDNN cannot pack {weight.dtype} weights here ({str(error).splitlines()[0]})")
        module._lyra_packs = {weight.data_ptr(): packed}
        module.forward = types.MethodType(_packed_forward, module)
        report.layers += 1
        report.extra_bytes += weight.numel() * weight.element_size()
    if not report.layers:
        report.reason = "no float32/bfloat16 nn.Linear layers on the CPU"
    report.sibling_sets = _group_siblings(model)
    return report


@functools.cache
def _frozen_linear_function():
    """Autograd for `linear(x, weight, bias)` with a frozen weight and bias: both products by oneDNN.
    Built on first use, so importing this module needs no torch."""
    import torch

    class OneDNNFrozenLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(weight)  # the parameter itself: nothing new is kept
            return onednn_linear(x, weight, bias)

        @staticmethod
        def backward(ctx, grad_out):
            if not ctx.needs_input_grad[0]:
                return None, None, None
            (weight,) = ctx.saved_tensors  # g W as a linear with weight W^T: oneDNN reads the view as is
            return onednn_linear(grad_out.contiguous(), weight.t()), None, None

    return OneDNNFrozenLinear


def onednn_linear(x, weight, bias=None):
    """`F.linear(x, weight, bias)` through oneDNN, without autograd: for fp32 CPU tensors, and weights
    that take no gradient. lyra.loss runs a switched head's products with it (`uses_onednn`)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def uses_onednn(module) -> bool:
    """Whether `onednn_frozen_linears` switched this layer (a call still takes F.linear when the layer has
    been unfrozen since, or its input is not fp32 on the CPU)."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is _frozen_onednn_forward


def _frozen_onednn_forward(self, x):
    """nn.Linear.forward through oneDNN while the layer stays frozen, fp32 and on the CPU."""
    import torch

    weight, bias = self.weight, self.bias
    if (weight.requires_grad or (bias is not None and bias.requires_grad) or x.dtype != torch.float32
            or weight.dtype != torch.float32 or x.device.type != "cpu"):
        return torch.nn.functional.linear(x, weight, bias)
    return _frozen_linear_function().apply(x, weight, bias)


def onednn_frozen_linears(model) -> str:
    """Route every frozen fp32 nn.Linear of `model` through oneDNN, forward and input gradient (see the
    module doc); call after apply_lora, so LoRA's trainable layers are left alone. Returns what it did."""
    import torch

    problem = prepack_problem(model)
    if problem:
        return f"frozen linears stay on F.linear: {problem}"
    layers = [module for module in model.modules()
              if type(module) is torch.nn.Linear and "forward" not in module.__dict__
              and not module.weight.requires_grad and module.weight.dtype == torch.float32
              and module.weight.device.type == "cpu"]
    if not layers:
        return "frozen linears stay on F.linear: no frozen float32 nn.Linear layers on the CPU"
    first = layers[0]  # one product checked against F.linear before any layer is switched
    probe = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            got = onednn_linear(probe, first.weight, first.bias)
            want = torch.nn.functional.linear(probe, first.weight, first.bias)
    except RuntimeError as error:
        return f"frozen linears stay on F.linear: oneDNN cannot run them here ({str(error).splitlines()[0]})"
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return "frozen linears stay on F.linear: oneDNN's product differs from F.linear's on a probe"
    for module in layers:
        module.forward = types.MethodType(_frozen_onednn_forward, module)
    return f"{len(layers)} frozen linear layers run on oneDNN (model.onednn_linears=false: F.linear)"


def release_packs(model) -> int:
    """Drop every layer's packed copies but keep its packing forward, so a layer packs again on its next
    inference call; returns the bytes released. The engines call it when llama.cpp serves the replies
    and the transformers model is left for the adapter-off toggle: the copies (as large as the linear
    weights: +538 MB at SmolLM2-135M fp32, ~2.4 GB at Qwen3-0.6B) would otherwise sit unread."""
    released = 0
    siblings = {}
    for module in model.modules():
        packs = getattr(module, "_lyra_packs", None)
        if packs:
            released += _packed_bytes(packs)
            packs.clear()
        if "_lyra_siblings" in module.__dict__:
            siblings[id(module._lyra_siblings)] = module._lyra_siblings
    released += sum(group.release() for group in siblings.values())
    if released:
        _return_freed_memory()
    return released


def _return_freed_memory() -> None:
    """glibc keeps freed blocks below its mmap threshold in the heap; malloc_trim hands them back to the
    OS, so the process's RSS shows the release (SmolLM2: 1,602 -> 1,469 MB without it, 1,083 MB with)."""
    import ctypes

    # the process's own symbols: glibc's malloc_trim where there is one; elsewhere (musl, macOS) the
    # memory stays reusable by this process
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def unpack_linears(model) -> int:
    """Undo prepack_linears: every layer runs eager F.linear again; returns how many were packed."""
    count = 0
    for module in model.modules():
        if hasattr(module, "_lyra_packs"):
            del module._lyra_packs
            del module.forward  # back to the class's forward
            module.__dict__.pop("_lyra_siblings", None)
            count += 1
    return count
