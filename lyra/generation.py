"""Generation shared by every front end: prompt fitting, the think filter, batched generation and
one cancellable streamer.

    from lyra.runs import load_run
    from lyra.generation import generate_response, stream_response
    run = load_run(run_dir)
    reply = generate_response("Hello!", run.model, run.tokenizer, system_prompt=run.system_prompt)
    for delta in stream_response("Hello!", run.model, run.tokenizer, system_prompt=run.system_prompt):
        print(delta, end="", flush=True)

The prompt is built by `lyra.data.tokenization.chat_prompt_ids`, the code path that built the
training prompts, so the model sees exactly the tokens it was trained to answer. Generation stops
on the tokens that end a turn in the tokenizer's own template (`turn_end_ids`: <|im_end|> and
<|endoftext|> for Qwen3, <|im_end|> for SmolLM2). Qwen3 may still emit `<think>` (an ordinary token,
not a special one): it is removed from every reply. With a chat template that has no think tags
(ChatML models such as SmolLM2) the think filter is a no-op.

Used by lyra.chat (terminal), lyra.web (page), lyra.probes (training-time and evaluate probes) and
lyra.export (the saved generation_config).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from lyra.compiled_decode import compiled_decode_of
from lyra.data.tokenization import chat_prompt_ids, turn_end_ids, with_system_prompt
from lyra.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_THINK_OPEN_TAIL = re.compile(r"<think>.*\Z", re.DOTALL)
_THINK_CLOSE = re.compile(r"</think>\s*")
_TAGS = ("<think>", "</think>")


# ---------------------------------------------------------------- think tags

def has_think_tag(text: str) -> bool:
    return any(tag in text for tag in _TAGS)


def strip_think(text: str) -> str:
    """Remove `<think>…</think>` blocks, an unterminated `<think>…` tail and stray `</think>` tags."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_OPEN_TAIL.sub("", text)
    text = _THINK_CLOSE.sub("", text)
    return text.strip()


def _partial_tag_suffix(text: str) -> int:
    """Length of a trailing proper prefix of a think tag ("<", "</thi"...), which may still grow."""
    for length in range(min(len(text), len("</think>") - 1), 0, -1):
        tail = text[-length:]
        if any(tag.startswith(tail) for tag in _TAGS):
            return length
    return 0


class ThinkFilter:
    """Incremental `strip_think`: feed raw text deltas, get clean deltas.

    Whatever could still turn out to be a think block (a partial tag, an open `<think>`) or
    trailing whitespace is held back, so the concatenated output always equals
    `strip_think(raw)` of everything fed so far once `finish()` is called. enabled=False (a chat
    template without think tags) keeps every tag: the output is then `raw.strip()`.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.raw = ""
        self._emitted = ""
        self._clean = strip_think if enabled else str.strip
        self._enabled = enabled

    def _emit(self, clean: str) -> str:
        if not clean.startswith(self._emitted):  # cannot happen with the rules above; never un-print
            log.debug("think filter: %r does not extend %r", clean, self._emitted)
            return ""
        delta, self._emitted = clean[len(self._emitted):], clean
        return delta

    def feed(self, chunk: str) -> str:
        self.raw += chunk
        held = _partial_tag_suffix(self.raw) if self._enabled else 0
        return self._emit(self._clean(self.raw[: len(self.raw) - held]))

    def finish(self) -> str:
        return self._emit(self._clean(self.raw))


def uses_think_tags(tokenizer) -> bool:
    """Whether the tokenizer's chat template knows <think> (Qwen3); ChatML models like SmolLM2 do not."""
    return "<think>" in str(getattr(tokenizer, "chat_template", None) or "")


def reply_cleaner(tokenizer) -> Callable[[str], str]:
    """How a raw reply becomes the text shown: think blocks removed where the template has them, else stripped."""
    return strip_think if uses_think_tags(tokenizer) else str.strip


# ---------------------------------------------------------------- prompt

def normalize_history(history: Sequence | None, think: bool = True) -> list[dict[str, str]]:
    """History as chat messages; (user, assistant) pairs are accepted too (Gradio's tuple format)."""
    messages: list[dict[str, str]] = []
    for item in history or []:
        if isinstance(item, Mapping):
            messages.append({"role": str(item["role"]), "content": str(item["content"])})
        else:
            user, assistant = item
            messages.append({"role": "user", "content": str(user)})
            if assistant is not None:
                messages.append({"role": "assistant", "content": strip_think(str(assistant)) if think
                                 else str(assistant).strip()})
    return messages


def build_prompt_ids(prompt_text: str, tokenizer, history: Sequence | None = None,
                     system_prompt: str | None = None) -> list[int]:
    """The tokens before the assistant's reply: exactly what training placed before that assistant turn."""
    messages = with_system_prompt([*normalize_history(history, uses_think_tags(tokenizer)),
                                   {"role": "user", "content": prompt_text}],
                                  system_prompt)
    return chat_prompt_ids(messages, tokenizer)


@dataclass
class FittedPrompt:
    ids: list[int]
    history: list[dict[str, str]]  # what was kept (the system prompt is never dropped)
    prompt_text: str  # the user input, cut if it alone did not fit
    dropped_messages: int = 0
    cut: bool = False


def fit_prompt(prompt_text: str, tokenizer, history: Sequence | None, system_prompt: str | None,
               max_prompt_tokens: int) -> FittedPrompt:
    """Keep the prompt within max_prompt_tokens: drop the oldest turns, then cut the input's tail."""
    messages = normalize_history(history, uses_think_tags(tokenizer))
    system = [messages.pop(0)] if messages and messages[0]["role"] == "system" else []
    dropped = 0
    while True:
        kept = system + messages
        ids = build_prompt_ids(prompt_text, tokenizer, kept, system_prompt)
        if len(ids) <= max_prompt_tokens:
            return FittedPrompt(ids, kept, prompt_text, dropped_messages=dropped)
        if not messages:
            break
        # one turn = a user message and everything up to the next user message
        end = next((i for i in range(1, len(messages)) if messages[i]["role"] == "user"), len(messages))
        del messages[:end]
        dropped += end
    overhead = len(build_prompt_ids("", tokenizer, system, system_prompt))
    budget = max_prompt_tokens - overhead
    if budget <= 0:
        raise UserError("max_prompt_tokens", f"{max_prompt_tokens} cannot even hold the system prompt "
                                             f"({overhead} tokens); raise it")
    text_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    while budget > 0:
        cut_text = tokenizer.decode(text_ids[:budget]).rstrip("\ufffd")  # no half UTF-8 character
        ids = build_prompt_ids(cut_text, tokenizer, system, system_prompt)
        if len(ids) <= max_prompt_tokens:
            return FittedPrompt(ids, system, cut_text, dropped_messages=dropped, cut=True)
        budget -= len(ids) - max_prompt_tokens  # re-tokenizing across the cut can merge differently
    raise UserError("max_prompt_tokens", f"{max_prompt_tokens} leaves no room for any input")


# ---------------------------------------------------------------- generation

_GREEDY_IGNORES = ("temperature", "top_p", "top_k", "min_p", "typical_p")


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops where a turn ends in the tokenizer's template (lyra.data.tokenization)."""
    return turn_end_ids(tokenizer)


def check_generation(generation: Mapping[str, Any], key: str = "generation") -> None:
    """One line naming the bad generation knob, before any model is loaded."""
    from transformers import GenerationConfig

    known = GenerationConfig().to_dict()
    for name, value in generation.items():
        if name not in known:
            raise UserError(f"{key}.{name}", "not a transformers GenerationConfig option")
    temperature = generation.get("temperature")
    if temperature is not None and not temperature >= 0:
        raise UserError(f"{key}.temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    top_p = generation.get("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"{key}.top_p", f"must be in (0, 1], got {top_p}")
    top_k = generation.get("top_k")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise UserError(f"{key}.top_k", f"must be an integer >= 0 (0 = off), got {top_k}")
    penalty = generation.get("repetition_penalty")
    if penalty is not None and not penalty > 0:
        raise UserError(f"{key}.repetition_penalty", f"must be > 0 (1 = off), got {penalty}")
    max_new = generation.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not (isinstance(max_new, int) and max_new >= 1):
        raise UserError(f"{key}.max_new_tokens", f"must be an integer >= 1, got {max_new}")


def generation_config(tokenizer, **generation):
    """A GenerationConfig from the generation group, stopping on <|im_end|> and <|endoftext|>.

    Sampling is on unless do_sample=false or temperature=0 (greedy). Built from scratch, not from
    the model's own generation_config.json, so replies depend on lyra's config alone.
    """
    from transformers import GenerationConfig

    check_generation(generation)
    kwargs = {key: value for key, value in generation.items() if value is not None}
    kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if kwargs.get("temperature") == 0:
        kwargs["do_sample"] = False
    kwargs.setdefault("do_sample", True)
    if not kwargs["do_sample"]:
        for name in _GREEDY_IGNORES:
            kwargs.pop(name, None)
    return GenerationConfig(**kwargs, eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            use_cache=True)


def context_budget(model, max_new_tokens: int, max_prompt_tokens: int | None = None) -> int:
    """Prompt tokens allowed: the caller's budget, capped by the model's context minus the reply."""
    limit = getattr(model.config, "max_position_embeddings", None)
    budget = max_prompt_tokens or (limit - max_new_tokens if limit else 32768)
    if limit:
        budget = min(budget, limit - max_new_tokens)
    return budget


@dataclass
class Reply:
    text: str  # clean: think blocks removed (templates with think tags), stripped
    raw: str  # decoded without special tokens, think tags kept
    token_ids: list[int] = field(default_factory=list)  # generated tokens up to and including the stop token
    ended_by_eos: bool = False  # False: cut by max_new_tokens
    prompt_tokens: int = 0

    @property
    def think_leak(self) -> bool:
        return has_think_tag(self.raw)


def _model_device(model):
    return next(model.parameters()).device


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int, device=None):
    """(input_ids, attention_mask) with prompts right-aligned, so every row continues at the end."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, attention_mask


def generate_replies(prompts: Sequence[Sequence[int]], model, tokenizer, streamer=None, logits_processor=None,
                     **generation) -> list[Reply]:
    """Generate for a batch of prompt token lists (left-padded together); one Reply each.

    logits_processor: extra transformers LogitsProcessors (lyra.serve's OpenAI penalties), applied
    after the ones the GenerationConfig builds."""
    import torch
    from transformers import LogitsProcessorList

    config = generation_config(tokenizer, **generation)
    stops = set(config.eos_token_id)
    input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id, _model_device(model))
    width = input_ids.shape[1]
    with torch.inference_mode():
        # compile_decode=true (lyra.compiled_decode): a static cache its compiled step runs on, where this reply fits
        decoder = compiled_decode_of(model)
        cache = None
        if decoder is not None and config.max_new_tokens:
            cache = decoder.cache_for(len(prompts), width + config.max_new_tokens)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                streamer=streamer, logits_processor=LogitsProcessorList(logits_processor or []),
                                **({"cache": cache} if cache is not None else {}))
    replies = []
    for prompt, row in zip(prompts, output[:, width:].tolist()):
        end = next((i for i, token in enumerate(row) if token in stops), None)
        kept = row if end is None else row[: end + 1]
        replies.append(reply_from_tokens(kept, tokenizer, ended_by_eos=end is not None, prompt_tokens=len(prompt)))
    return replies


def reply_from_tokens(token_ids: list[int], tokenizer, ended_by_eos: bool, prompt_tokens: int) -> Reply:
    """A Reply from a reply's token ids (up to and including its stop token): every engine shapes replies here."""
    raw = tokenizer.decode(token_ids, skip_special_tokens=True)
    return Reply(text=reply_cleaner(tokenizer)(raw), raw=raw, token_ids=token_ids, ended_by_eos=ended_by_eos,
                 prompt_tokens=prompt_tokens)


def _fitted_ids(prompt_text, model, tokenizer, history, system_prompt, max_prompt_tokens, generation) -> list[int]:
    budget = context_budget(model, generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS, max_prompt_tokens)
    fitted = fit_prompt(prompt_text, tokenizer, history, system_prompt, budget)
    if fitted.dropped_messages or fitted.cut:
        log.warning("prompt over %d tokens: dropped %d old messages%s", budget, fitted.dropped_messages,
                    ", cut the input" if fitted.cut else "")
    return fitted.ids


def generate_response(prompt_text: str, model, tokenizer, history: Sequence | None = None,
                      system_prompt: str | None = None, streamer=None, max_prompt_tokens: int | None = None,
                      **generation) -> str:
    """The clean reply to prompt_text after `history` (messages or (user, reply) pairs).

    system_prompt: pass the run's (`LoadedRun.system_prompt`); a system message at the start of
    history wins. generation: temperature, top_p, top_k, repetition_penalty, max_new_tokens,
    do_sample (any GenerationConfig option). streamer: a transformers streamer that receives the
    raw tokens (think tags included); use `stream_response` for clean streamed text.
    """
    ids = _fitted_ids(prompt_text, model, tokenizer, history, system_prompt, max_prompt_tokens, generation)
    return generate_replies([ids], model, tokenizer, streamer=streamer, **generation)[0].text


def generate_in_batches(prompts: Sequence[Sequence[int]], model, tokenizer, batch_size: int,
                        **generation) -> list[Reply]:
    """generate_replies over `batch_size` prompts at a time, in eval mode (training mode restored after)."""
    was_training = model.training
    model.eval()
    replies: list[Reply] = []
    try:
        for start in range(0, len(prompts), batch_size):
            replies += generate_replies(prompts[start:start + batch_size], model, tokenizer, **generation)
    finally:
        if was_training:
            model.train()
    return replies


# ---------------------------------------------------------------- streaming

class GenerationCancelled(Exception):
    """The reader went away (Ctrl-C, Stop, Reset): generation ends at the next token."""


class ReplyStreamer:
    """A transformers streamer that queues clean text deltas (think blocks never shown) and can be
    cancelled: generate() calls `put` once per new token, and raising there is the only way to end
    a running generation early, which frees the model as soon as a reply is abandoned.
    """

    def __init__(self, tokenizer, think_tags: bool | None = None):
        """think_tags: None = whether the tokenizer's template has them (uses_think_tags)."""
        from transformers import TextStreamer

        if think_tags is None:
            think_tags = uses_think_tags(tokenizer)

        self.queue: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        # the reply's token ids so far, the stop token included: usage counts and finish reasons
        self.generated: list[int] = []
        think = ThinkFilter(enabled=think_tags)
        outer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                delta = think.feed(text) + (think.finish() if stream_end else "")
                if delta:
                    outer.queue.put(delta)

            def put(self, value) -> None:
                if outer.cancelled.is_set():
                    raise GenerationCancelled
                prompt = self.skip_prompt and self.next_tokens_are_prompt  # generate() puts the prompt first
                super().put(value)
                if not prompt:
                    outer.generated.extend(value.reshape(-1).tolist())

        self.streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def cancel(self) -> None:
        self.cancelled.set()


_DONE = object()


def stream_worker(produce: Callable[[ReplyStreamer], None], streamer: ReplyStreamer) -> Iterator[str]:
    """Yield the clean text deltas that `produce(streamer)` feeds the streamer, as they arrive.

    `produce` runs in a daemon worker thread (it takes any lock it needs); closing this generator
    (Ctrl-C, Stop, Reset) cancels the streamer, so the worker stops at its next token. Every engine
    (lyra.engines) streams through here.
    """

    def work() -> None:
        try:
            produce(streamer)
        except GenerationCancelled:
            log.info("a reply was abandoned: generation stopped early")
        except BaseException as error:  # re-raised in the reader's thread
            streamer.queue.put(error)
        finally:
            streamer.queue.put(_DONE)

    # daemon: Ctrl-C in the caller must not wait for the rest of the reply
    threading.Thread(target=work, daemon=True, name="lyra-generate").start()
    try:
        while (item := streamer.queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        streamer.cancel()


def stream_reply(prompt_ids: Sequence[int], model, tokenizer, guard: Callable[[], AbstractContextManager] = nullcontext,
                 streamer: ReplyStreamer | None = None, **generation) -> Iterator[str]:
    """Yield clean text deltas of the reply to `prompt_ids` as tokens arrive.

    Generation runs in a daemon worker thread inside `guard()` (the web page passes its model lock
    and adapter switch); closing this generator (Ctrl-C, Stop, Reset) stops the worker at its next
    token. The deltas concatenate to exactly what generate_replies returns as `text` (greedy).
    streamer: pass your own ReplyStreamer to read its `generated` ids or `cancel()` it from another
    thread (lyra.serve: a client that hung up while this generator waits for a token).
    """
    streamer = streamer or ReplyStreamer(tokenizer)

    def produce(streamer: ReplyStreamer) -> None:
        with guard():
            if not streamer.cancelled.is_set():
                generate_replies([prompt_ids], model, tokenizer, streamer=streamer.streamer, **generation)

    return stream_worker(produce, streamer)


def stream_response(prompt_text: str, model, tokenizer, history: Sequence | None = None,
                    system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                    **generation) -> Iterator[str]:
    """Like generate_response, but yields clean text deltas as tokens arrive (think blocks never shown).

    The deltas concatenate to exactly what generate_response returns for the same (greedy) call.
    """
    ids = _fitted_ids(prompt_text, model, tokenizer, history, system_prompt, max_prompt_tokens, generation)
    yield from stream_reply(ids, model, tokenizer, **generation)
