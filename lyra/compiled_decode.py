"""Compiled decoding on CPU: transformers' one-token steps through one inductor graph per cache length.

    from lyra.compiled_decode import compile_decode
    report = compile_decode(model, tokenizer, max_length=2304)   # chat, web, serve: compile_decode=true
    print(report)            # "decode compiled for caches up to 2304 tokens (... s; ...)"
    generate_replies([ids], model, tokenizer, do_sample=False, max_new_tokens=64)   # now uses it

Decoding one token on CPU is reading every weight once, so its speed is how fast the products stream
the weights plus the cost of the ~900 small ops around them. Eager transformers reaches ~0.38 of the
read-bandwidth bound on SmolLM2-135M fp32 with `lyra.prepack` (oneDNN products at ~20 GB/s of 33).
Here the decode step is compiled with inductor's freezing and max-autotune: the weights become
constants packed for inductor's own C++ GEMM template, which streams a [1, in] x [in, out] product at
~28 GB/s on this machine's 2 cores (oneDNN ~20, MKL's gemv ~10), and the norms, rotary, residuals
and cache writes between the products are fused into a few C++ loops. SmolLM2 fp32 greedy decodes
~1.9x faster than prepack with the same tokens (docs/performance.md, "Replies";
tests/test_compiled_decode.py).

What it costs, and the limits:
- **Compile time.** One graph per static cache length, compiled on first use: ~70 s for SmolLM2 on
  2 cores (longer for larger models), in every new process (inductor does not cache graphs with frozen
  weights across processes). `compile_decode` compiles the smallest length at load, before the first
  reply; a longer conversation compiles the next length when it first needs it and says so.
- **Cache lengths.** A static cache is attended over its whole length every token, so a reply uses
  the smallest length in BUCKETS (512, 1024, 2048, ... up to max_length) that holds its prompt and
  max_new_tokens: at 2,304 positions SmolLM2 decodes ~0.6x as fast as at 128.
- **Memory.** Each compiled length holds its own packed copy of the weights (freezing), beside the
  parameters and `lyra.prepack`'s copy: SmolLM2 fp32 +540 MB per length in use.
- **Which replies.** Batch 1 (chat, web, serve; evaluate's batches decode eagerly), no autograd,
  float weights on CPU. A weight swapped or edited after compiling (the web page's base toggle,
  an adapter switch) sends replies back to the eager path, never to stale constants.
- **Guards.** dynamo checks ~1.5-2 ms of guards (the weights, the modules, the arguments) before every
  call. A reply's first two steps check them all (and compile a new cache length where needed); from
  the third, while a step's arguments have the same kinds as the last's (`_step_signature`), only the
  guards that tell the compiled graphs apart run (`skip_guard_eval_unsafe`: the cache length, the
  model). What the skipped ones check holds by construction: the weights are checked once per reply
  (below), and the apps hold their model lock for a whole reply. ~1.03-1.05x per reply (paired,
  docs/performance.md). The stance is process-global, so every compiled step takes one lock.
- **Numerics.** Another summation order than eager's, so logits differ in the last bits; greedy
  replies are token-identical on SmolLM2's real weights (tested), which is what a user sees.
- inductor needs a C++ compiler; without one `compile_decode` says why and replies decode eagerly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

BUCKETS_FROM = 512  # the smallest static cache: a persona prompt and a reply of a few hundred tokens
COMPILE_DTYPES = ("float32", "bfloat16")
# inductor settings for the step: weights as constants (freezing) is what lets max-autotune pick its C++
# GEMM template for the one-row products; without freezing the products stay ATen's. Patched in around
# each compiled call (torch.compile's options= does not reach freezing), so other compiles keep theirs.
INDUCTOR_SETTINGS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
_MARK = "lyra_compiled_decode"  # attribute on a model that decodes compiled, and on the caches it made
_STEPS = "lyra_compiled_steps"  # attribute on such a cache: (compiled steps run on it, the last step's signature)
# A reply's first steps on a cache check dynamo's guards in full (and compile where needed); after that,
# while the step's signature stays the same, only the guards that tell compiled graphs apart
# (CompiledDecode.forward). Two: the first step after the prefill is the one that differs, if any does.
GUARDED_STEPS = 2
# Around every compiled step, in every thread: torch's stance that skips guards is process-global, so no
# compiled step may start while another runs under it (the apps decode one reply at a time anyway)
_STEP_LOCK = threading.RLock()


@dataclass
class CompileReport:
    max_length: int = 0
    seconds: float = 0.0
    reason: str = ""  # why decoding stays eager

    def __str__(self) -> str:
        if self.reason:
            return f"decode not compiled: {self.reason}"
        return (f"decode compiled for caches of {BUCKETS_FROM} up to {self.max_length} tokens ({self.seconds:.0f} s "
                f"for the first length; a longer chat compiles the next once; compile_decode=false turns it off)")


def bucket_length(length: int, max_length: int) -> int:
    """The static cache length a reply needing `length` positions runs on: the next power of two from
    BUCKETS_FROM, capped at max_length (one compiled graph each, so few distinct lengths)."""
    bucket = BUCKETS_FROM
    while bucket < length:
        bucket *= 2
    return min(bucket, max_length)


def compile_problem(model) -> str | None:
    """Why this model's decode cannot be compiled here, or None when it can."""
    import torch

    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu":
        return "the model is not on the CPU (this compiles for CPU; on a GPU use transformers' own compile)"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "the base is quantized (bitsandbytes layers do not compile)"
    dtype = str(parameter.dtype).removeprefix("torch.")
    if dtype not in COMPILE_DTYPES:
        return f"weights are {dtype}, not {' or '.join(COMPILE_DTYPES)}"
    if not getattr(_inner_model(model), "_can_compile_fullgraph", False):
        return f"{type(_inner_model(model)).__name__} does not support a static cache in one graph"
    return None


def _inner_model(model):
    """The transformers model that PEFT wraps (its forward is what generate calls per token)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weights_key(model) -> tuple:
    """Which tensors hold the weights now, and their in-place versions: a swap or an edit changes it."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class CompiledDecode:
    """A model's one-token steps on a cache this object made go through the compiled graph; every
    other call (prefill, batches, dynamic caches) runs the model's own forward unchanged."""

    def __init__(self, model, max_length: int) -> None:
        import torch

        self.model = _inner_model(model)
        self.max_length = max_length
        self.eager = self.model.forward
        self.compiled = torch.compile(self.eager, fullgraph=True, dynamic=False)
        self.weights = _weights_key(self.model)
        self.lengths: set[int] = set()
        self.unguarded_steps = 0  # steps that checked only the guards telling graphs apart (tests read it)
        self._lock = threading.Lock()

    def cache_for(self, batch: int, length: int):
        """A fresh static cache for a reply of `length` positions, or None where the reply decodes eagerly."""
        import torch
        from transformers import StaticCache

        if batch != 1 or length > self.max_length or torch.is_grad_enabled():
            return None
        if _weights_key(self.model) != self.weights:  # swapped or edited since the graphs were frozen
            return None
        bucket = bucket_length(length, self.max_length)
        with self._lock:
            if bucket not in self.lengths:
                self.lengths.add(bucket)
                if len(self.lengths) > 1:  # a warning: chat shows only those, and this reply waits for it
                    log.warning("compiling the decode step for a %d-token cache (this reply needs %d; once per "
                                "process, ~a minute on 2 cores)", bucket, length)
        cache = StaticCache(config=self.model.config, max_cache_len=bucket)
        setattr(cache, _MARK, True)
        return cache

    def forward(self, *args, **kwargs):
        import torch._inductor.config

        cache = kwargs.get("cache")
        input_ids = kwargs.get("input_ids")
        if args or not getattr(cache, _MARK, False) or input_ids is None or input_ids.shape[1] != 1:
            return self.eager(*args, **kwargs)
        if hasattr(cache.layers[0].keys, "_dynamo_static_input_type"):  # once per cache: the prefill marked them
            _unmark_static(cache)
        steps, last = getattr(cache, _STEPS, (0, None))
        signature = _step_signature(kwargs)
        unguarded = steps >= GUARDED_STEPS and signature == last
        setattr(cache, _STEPS, (steps + 1, signature))
        with _STEP_LOCK, _sdpa_gqa_with_mask(), torch._inductor.config.patch(INDUCTOR_SETTINGS), \
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=unguarded):
            self.unguarded_steps += unguarded
            return self.compiled(**kwargs)


def _step_signature(kwargs) -> tuple:
    """What a decode step's guards could see change from one step of a reply to the next: each argument's
    kind (a tensor's shape, dtype and device; any other value itself, or its identity) and the grad
    modes. Tensor values (the token, its position) are graph inputs and never guarded. The weights are
    checked once per reply (`cache_for`), and the apps hold their model lock for the whole reply."""
    import torch

    def kind(value):
        if torch.is_tensor(value):
            return value.shape, value.dtype, value.device
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dict):  # transformers' masks come as {layer type: mask}, a new dict each step
            return dict, tuple((key, kind(item)) for key, item in sorted(value.items()))
        if isinstance(value, (list, tuple)):
            return type(value), tuple(kind(item) for item in value)
        return type(value), id(value)

    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *((key, kind(value)) for key, value in sorted(kwargs.items())))


def _unmark_static(cache) -> None:
    """Make a cache's tensors plain graph inputs. transformers marks them static addresses (for CUDA
    graphs); with freezing, inductor then folds the first cache's tensors into the graph, and the next
    reply's fresh cache would read and write the old one (seen as an index out of bounds)."""
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None),
                       getattr(layer, "cumulative_length", None)):
            if tensor is not None and hasattr(tensor, "_dynamo_static_input_type"):
                del tensor._dynamo_static_input_type


@contextmanager
def _sdpa_gqa_with_mask():
    """transformers repeats the shared k/v heads for every query head whenever sdpa gets a mask (CUDA's
    fallback needs it), and a static cache always has one: on CPU, sdpa's enable_gqa does the same
    arithmetic without copying the whole cache 3x per token (SmolLM2: 33 against 26 tok/s at 2,304
    positions). transformers reads this switch while tracing, so it only matters for a compile; the
    apps hold their model lock around a reply."""
    previous = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
        else:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = previous


def compiled_decode_of(model) -> CompiledDecode | None:
    return getattr(_inner_model(model), _MARK, None)


def compile_decode(model, tokenizer, max_length: int) -> CompileReport:
    """Route this model's batch-1 decode steps through compiled graphs, and compile the smallest cache
    length now (a two-token reply), so the first real reply does not wait. max_length: the longest
    prompt + reply it serves (the app's max_prompt_tokens + max_new_tokens), capped at the model's own."""
    from lyra.generation import generate_replies

    if problem := compile_problem(model):
        return CompileReport(reason=problem)
    inner = _inner_model(model)
    limit = getattr(inner.config, "max_position_embeddings", None) or max_length
    decoder = CompiledDecode(model, min(max_length, limit))
    inner.forward = decoder.forward
    setattr(inner, _MARK, decoder)
    start = time.perf_counter()
    try:
        generate_replies([[tokenizer.eos_token_id] * 4], model, tokenizer, do_sample=False, max_new_tokens=2,
                         min_new_tokens=2)
    except Exception as error:  # no C++ compiler, an op inductor cannot lower: say so, decode eagerly
        uncompile_decode(model)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return CompileReport(reason=f"inductor could not compile it ({type(error).__name__}: {first_line[:200]})")
    return CompileReport(max_length=decoder.max_length, seconds=time.perf_counter() - start)


def uncompile_decode(model) -> None:
    """Back to the model's own forward for every reply. Graphs already compiled stay in torch's cache
    (with their packed weights) until `torch._dynamo.reset()`."""
    inner = _inner_model(model)
    if getattr(inner, _MARK, None) is not None:
        inner.__dict__.pop("forward", None)  # the class's forward again
        delattr(inner, _MARK)
