"""Talk to a trained Lyra: the generation API and the interactive / one-shot chat CLI.

    python -m lyra.chat run_dir=outputs/2026-01-01/12-00-00                 # interactive, streamed
    python -m lyra.chat run_dir=R prompt=你好                                # one reply on stdout
    printf '你好\\n我今天有點累\\nexit\\n' | python -m lyra.chat run_dir=R    # scripted, no TTY
    python -m lyra.chat run_dir=R adapter=none                              # the bare base model
    python -m lyra.chat run_dir=R generation.temperature=0                  # greedy

In Python (what the web UI uses):

    from lyra.runs import load_run
    from lyra.chat import generate_response, stream_response
    run = load_run(run_dir)
    reply = generate_response("你好", run.model, run.tokenizer, system_prompt=run.system_prompt)

The prompt is built by `lyra.data.tokenization.chat_prompt_ids`, the code path that built the
training prompts, so the model sees exactly the tokens it was trained to answer. Generation stops
on the tokens that end a turn in the tokenizer's own template (`turn_end_ids`: <|im_end|> and
<|endoftext|> for Qwen3, <|im_end|> for SmolLM2). Qwen3 may still emit `<think>` (an ordinary token,
not a special one): for a model whose chat template uses think tags it is removed from every reply;
for any other model (SmolLM2) replies are only stripped of surrounding whitespace.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import hydra
from omegaconf import DictConfig, OmegaConf

from lyra.data.tokenization import chat_prompt_ids, turn_end_ids, with_system_prompt
from lyra.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)

EXIT_COMMANDS = ("exit", "quit")
RESET_COMMAND = "/reset"
DEFAULT_MAX_NEW_TOKENS = 256

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_THINK_OPEN_TAIL = re.compile(r"<think>.*\Z", re.DOTALL)
_THINK_CLOSE = re.compile(r"</think>\s*")
_TAGS = ("<think>", "</think>")


# ---------------------------------------------------------------- think tags

def has_think_tag(text: str) -> bool:
    return any(tag in text for tag in _TAGS)


def uses_think_tags(tokenizer) -> bool:
    """Whether the model's chat template knows think blocks (Qwen3 yes, SmolLM2 no)."""
    return "<think>" in str(getattr(tokenizer, "chat_template", None) or "")


def clean_reply(raw: str, think: bool = True) -> str:
    """What the user sees: think blocks removed (when the template has them), whitespace stripped."""
    return strip_think(raw) if think else raw.strip()


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
    `clean_reply(raw, think)` of everything fed so far once `finish()` is called. think=False (a
    template without think tags) only strips whitespace: a literal "<think>" in a reply stays.
    """

    def __init__(self, think: bool = True) -> None:
        self.raw = ""
        self._emitted = ""
        self.think = think

    def _emit(self, clean: str) -> str:
        if not clean.startswith(self._emitted):  # cannot happen with the rules above; never un-print
            log.debug("think filter: %r does not extend %r", clean, self._emitted)
            return ""
        delta, self._emitted = clean[len(self._emitted):], clean
        return delta

    def feed(self, chunk: str) -> str:
        self.raw += chunk
        stable = self.raw[: len(self.raw) - _partial_tag_suffix(self.raw)] if self.think else self.raw
        return self._emit(clean_reply(stable, self.think))

    def finish(self) -> str:
        return self._emit(clean_reply(self.raw, self.think))


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
                messages.append({"role": "assistant", "content": clean_reply(str(assistant), think)})
    return messages


def build_prompt_ids(prompt_text: str, tokenizer, history: Sequence | None = None,
                     system_prompt: str | None = None) -> list[int]:
    """The tokens before Lyra's reply: exactly what training placed before that assistant turn."""
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
    """A GenerationConfig from the generation group, stopping on the tokenizer's turn-end tokens.

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
    text: str  # clean: think blocks removed, stripped
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


def generate_replies(prompts: Sequence[Sequence[int]], model, tokenizer, streamer=None, **generation) -> list[Reply]:
    """Generate for a batch of prompt token lists (left-padded together); one Reply each."""
    import torch

    config = generation_config(tokenizer, **generation)
    stops = set(config.eos_token_id)
    think = uses_think_tags(tokenizer)
    input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id, _model_device(model))
    width = input_ids.shape[1]
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                streamer=streamer)
    replies = []
    for prompt, row in zip(prompts, output[:, width:].tolist()):
        end = next((i for i, token in enumerate(row) if token in stops), None)
        kept = row if end is None else row[: end + 1]
        raw = tokenizer.decode(kept, skip_special_tokens=True)
        replies.append(Reply(text=clean_reply(raw, think), raw=raw, token_ids=kept, ended_by_eos=end is not None,
                             prompt_tokens=len(prompt)))
    return replies


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
    """Lyra's clean reply to prompt_text after `history` (messages or (user, reply) pairs).

    system_prompt: pass the run's (`LoadedRun.system_prompt`); a system message at the start of
    history wins. generation: temperature, top_p, top_k, repetition_penalty, max_new_tokens,
    do_sample (any GenerationConfig option). streamer: a transformers streamer that receives the
    raw tokens (think tags included); use `stream_response` for clean streamed text.
    """
    ids = _fitted_ids(prompt_text, model, tokenizer, history, system_prompt, max_prompt_tokens, generation)
    return generate_replies([ids], model, tokenizer, streamer=streamer, **generation)[0].text


def stream_response(prompt_text: str, model, tokenizer, history: Sequence | None = None,
                    system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                    **generation) -> Iterator[str]:
    """Like generate_response, but yields clean text deltas as tokens arrive (think blocks never shown).

    The deltas concatenate to exactly what generate_response returns for the same (greedy) call.
    """
    from transformers import TextIteratorStreamer

    ids = _fitted_ids(prompt_text, model, tokenizer, history, system_prompt, max_prompt_tokens, generation)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            generate_replies([ids], model, tokenizer, streamer=streamer, **generation)
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)
            streamer.end()

    # daemon: Ctrl-C in the caller must not wait for the rest of the reply
    thread = threading.Thread(target=work, daemon=True, name="lyra-generate")
    thread.start()
    think = ThinkFilter(uses_think_tags(tokenizer))
    for chunk in streamer:
        delta = think.feed(chunk)
        if delta:
            yield delta
    thread.join()
    if failure:
        raise failure[0]
    tail = think.finish()
    if tail:
        yield tail


# ---------------------------------------------------------------- CLI

class ChatSession:
    """The interactive loop, reading lines from `stdin` and writing the transcript to `stdout`."""

    def __init__(self, run, cfg: DictConfig, stdin: TextIO, stdout: TextIO, stderr: TextIO):
        self.run, self.cfg = run, cfg
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.generation = OmegaConf.to_container(cfg.generation, resolve=True)
        self.budget = context_budget(run.model, self.generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
                                     cfg.max_prompt_tokens)
        self.history: list[dict[str, str]] = []
        self.interactive = stdin.isatty()

    def notice(self, text: str) -> None:
        print(f"（{text}）", file=self.stderr, flush=True)

    def read_line(self) -> str | None:
        """The next user line, or None at EOF. A TTY gets line editing; piped input is echoed."""
        if self.interactive and self.stdin is sys.stdin:
            try:
                return input(self.cfg.user_label)
            except EOFError:
                return None
        self.stdout.write(self.cfg.user_label)
        self.stdout.flush()
        line = self.stdin.readline()
        if not line:
            self.stdout.write("\n")
            return None
        line = line.rstrip("\r\n")
        self.stdout.write(line + "\n")  # the transcript shows what was said, as on a TTY
        return line

    def reply(self, text: str, label: str) -> str:
        fitted = fit_prompt(text, self.run.tokenizer, self.history, self.run.system_prompt, self.budget)
        if fitted.cut:
            self.notice(f"輸入過長，已截斷至約 {self.budget} 個 token 的上限 (max_prompt_tokens)")
        elif fitted.dropped_messages:
            self.notice(f"已略去最早的 {fitted.dropped_messages} 則訊息以符合長度上限")
        self.stdout.write(label)
        self.stdout.flush()
        parts = []
        for delta in stream_response(fitted.prompt_text, self.run.model, self.run.tokenizer, fitted.history,
                                     self.run.system_prompt, max_prompt_tokens=self.budget, **self.generation):
            parts.append(delta)
            self.stdout.write(delta)
            self.stdout.flush()
        self.stdout.write("\n")
        self.stdout.flush()
        reply = "".join(parts)
        self.history = [*fitted.history, {"role": "user", "content": fitted.prompt_text},
                        {"role": "assistant", "content": reply}]
        return reply

    def loop(self) -> None:
        self.notice(f"萊拉準備好了（{self.run.run_dir}，adapter={self.run.adapter}）。"
                    f"輸入 {' / '.join(EXIT_COMMANDS)} 離開，{RESET_COMMAND} 清除對話")
        while True:
            line = self.read_line()
            if line is None:
                return
            text = line.strip()
            if not text:
                continue
            if text.lower() in EXIT_COMMANDS:
                return
            if text == RESET_COMMAND:
                self.history = []
                self.notice("對話已重置")
                continue
            self.reply(text, self.cfg.bot_label)


def chat(cfg: DictConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None, run=None) -> None:
    """Run the chat app for a composed conf/chat.yaml: one-shot with `prompt`, else interactive.

    run: an already loaded `LoadedRun` to talk to instead of loading cfg.run_dir (tests, notebooks).
    """
    from lyra.runs import load_run, run_dir_path

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise UserError("run_dir", "is required: python -m lyra.chat run_dir=<training output dir>")
    run_dir_path(cfg.run_dir)  # before anything slow: a wrong path is the most common mistake
    check_generation(OmegaConf.to_container(cfg.generation, resolve=True))
    if not (isinstance(cfg.max_prompt_tokens, int) and cfg.max_prompt_tokens >= 16):
        raise UserError("max_prompt_tokens", f"must be an integer >= 16, got {cfg.max_prompt_tokens}")
    run = run or load_run(cfg.run_dir, adapter=cfg.adapter, device=cfg.device)
    session = ChatSession(run, cfg, stdin, stdout, stderr)
    if cfg.prompt is not None:
        session.reply(str(cfg.prompt), label="")
        return
    session.loop()


TEXT_KEYS = ("prompt", "user_label", "bot_label")


def hydra_quote(value: str) -> str:
    """A Hydra override value that reads back as exactly `value` (quotes, `${`, trailing backslashes)."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)  # no interpolation
    return "'" + value + "'"


def quote_text_overrides(argv: list[str], keys: Sequence[str] = TEXT_KEYS) -> list[str]:
    """Quote free-text overrides such as `prompt=你好，主人！`, which Hydra's grammar rejects unquoted.

    Values the user already quoted are left alone.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        already_quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if sep and key in keys and not already_quoted:
            arg = f"{key}={hydra_quote(value)}"
        quoted.append(arg)
    return quoted


@hydra.main(version_base="1.3", config_path="conf", config_name="chat")
def main(cfg: DictConfig) -> None:
    from lyra.runs import configure_cli_logging

    configure_cli_logging(logging.WARNING)  # stdout is the transcript; keep stderr quiet too
    with exit_on_user_error():
        try:
            chat(cfg)
        except (KeyboardInterrupt, EOFError):
            print(file=sys.stdout, flush=True)


if __name__ == "__main__":
    sys.argv = quote_text_overrides(sys.argv)
    main()
