"""An OpenAI-compatible HTTP server for a trained persona (FastAPI + uvicorn): SillyTavern, Open WebUI,
Agnai or the `openai` package talk to it as to any chat-completions endpoint.

    python -m lyra.serve run_dir=outputs/2026-01-01/12-00-00               # http://127.0.0.1:8000/v1
    python -m lyra.serve run_dir=R port=8080 system_prompt=merge generation.temperature=0.5
    python -m lyra.serve run_dir=R engine=llamacpp                          # the run's GGUF on llama.cpp
    LYRA_API_KEY=... python -m lyra.serve run_dir=R host=0.0.0.0             # the network needs a key

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="<persona name>", messages=[{"role": "user", "content": "Hi"}])

Endpoints: `GET /v1/models` (the persona, named after it, and `<name>-base`: the same model with the
adapter off) and `POST /v1/chat/completions` (stream or not; usage and finish_reason on every reply).
A request's messages become the prompt the way docs/serving.md describes (leading system messages and
SillyTavern's example dialogue merged into one system message; `system_prompt=run|client|merge`
decides where the persona's prompt goes), then generation is lyra.generation's, as in chat and web:
the fitted prompt, the template's stop ids, the think filter and the cancellable streamer, computed
by the `engine=` lyra.engines opened (transformers, or the run's GGUF on llama.cpp; `<name>-base`
always runs on transformers with the adapter off: the GGUF holds only the merged persona).

One model serves everyone: a request waits in a bounded queue (an asyncio semaphore plus a counter);
past `queue_size` waiting requests it gets 429 with Retry-After. Generation runs in a worker thread
under a lock; a client that hangs up cancels its streamer, which frees the model at the next token.
Bodies and messages are capped before any tokenization. Any bind but loopback needs an API key.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lyra.cli import hydra_app
from lyra.errors import UserError
from lyra.network import check_port_free, is_loopback

log = logging.getLogger("lyra.serve")  # not __name__: run as -m it is __main__, outside lyra's log level

API_KEY_ENV = "LYRA_API_KEY"
SYSTEM_PROMPT_MODES = ("run", "client", "merge")
EXAMPLE_NAMES = {"example_user": "user", "example_assistant": "assistant"}  # SillyTavern's example dialogue
EXAMPLES_HEADER = "Example dialogue:"
# Request fields the server reads; anything else is ignored, logged once per name and counted.
HANDLED_FIELDS = frozenset({
    "messages", "model", "stream", "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens",
    "stop", "seed", "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "tools", "functions", "response_format", "top_k", "min_p", "repetition_penalty"})


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class ServeSettings:
    host: str
    port: int
    api_key: str | None
    system_prompt: str
    queue_size: int
    retry_after_s: int
    max_body_bytes: int
    max_messages: int
    max_message_chars: int
    max_tokens_limit: int
    max_prompt_tokens: int


def resolve_api_key(cfg: DictConfig) -> str | None:
    """api_key= (the config reads LYRA_API_KEY by default); empty means none."""
    key = cfg.get("api_key")
    return str(key) if key not in (None, "") else None


def check_serve_config(cfg: DictConfig) -> ServeSettings:
    """One line naming the bad key, before the model is loaded (the key rule included)."""
    from lyra.engines import check_engine_keys
    from lyra.generation import check_generation
    from lyra.secrets import MIN_SECRET_LENGTH

    if OmegaConf.is_missing(cfg, "run_dir"):
        raise UserError("run_dir", "is required: python -m lyra.serve run_dir=<training output dir>")
    settings = ServeSettings(host=str(cfg.host), port=cfg.port, api_key=resolve_api_key(cfg),
                             system_prompt=str(cfg.system_prompt), queue_size=cfg.queue_size,
                             retry_after_s=cfg.retry_after_s, max_body_bytes=cfg.max_body_bytes,
                             max_messages=cfg.max_messages, max_message_chars=cfg.max_message_chars,
                             max_tokens_limit=cfg.max_tokens_limit, max_prompt_tokens=cfg.max_prompt_tokens)
    if settings.system_prompt not in SYSTEM_PROMPT_MODES:
        raise UserError("system_prompt", f"must be one of {', '.join(SYSTEM_PROMPT_MODES)}, got {settings.system_prompt!r}")
    for key, low in (("queue_size", 0), ("retry_after_s", 1), ("max_body_bytes", 1024), ("max_messages", 1),
                     ("max_message_chars", 1), ("max_tokens_limit", 1), ("max_prompt_tokens", 16)):
        value = getattr(settings, key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise UserError(key, f"must be an integer >= {low}, got {value}")
    if not (isinstance(settings.port, int) and 0 < settings.port < 65536):
        raise UserError("port", f"must be a TCP port (1-65535), got {settings.port}")
    if settings.api_key is not None and len(settings.api_key) < MIN_SECRET_LENGTH:
        raise UserError("api_key", f"is shorter than {MIN_SECRET_LENGTH} characters; use a long random one, "
                                   f"e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))'")
    if not is_loopback(settings.host) and settings.api_key is None:
        raise UserError("host", f"{settings.host} is reachable from the network and no API key is set: "
                                f"export {API_KEY_ENV}=<a long random key> (or api_key=...), or bind host=127.0.0.1")
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    check_generation(generation)
    check_engine_keys(cfg)
    default_new = generation.get("max_new_tokens")
    if default_new is not None and default_new > settings.max_tokens_limit:
        raise UserError("generation.max_new_tokens", f"{default_new} is above max_tokens_limit "
                                                     f"({settings.max_tokens_limit}); raise the limit or lower it")
    check_port_free(settings.host, settings.port, key="port")
    return settings


# ---------------------------------------------------------------- OpenAI shapes

class APIError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def completion_body(completion_id: str, created: int, model: str, content: str, finish_reason: str,
                    usage: Mapping[str, int]) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": dict(usage), "system_fingerprint": None}


def chunk_body(completion_id: str, created: int, model: str, delta: Mapping[str, str],
               finish_reason: str | None = None, usage: Mapping[str, int] | None = None,
               choices: bool = True) -> dict[str, Any]:
    """One `chat.completion.chunk`; choices=False gives the usage-only chunk of stream_options.include_usage."""
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "system_fingerprint": None,
                            "choices": [{"index": 0, "delta": dict(delta), "logprobs": None,
                                         "finish_reason": finish_reason}] if choices else []}
    if usage is not None:
        body["usage"] = dict(usage)
    return body


def sse(data: Mapping[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------- request -> generation settings

def _number(body: Mapping, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a number, got {value!r}", param=name)
    if value < low or value > high or (low_open and value == low):
        raise APIError(400, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", param=name)
    return float(value)


def _integer(body: Mapping, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise APIError(400, f"{name} must be an integer {bound}, got {value!r}", param=name)
    return value


def stop_strings(value: Any) -> list[str]:
    """`stop`: a string or a list of strings (empty ones dropped)."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    return [item for item in values if item]


def generation_settings(body: Mapping[str, Any], defaults: Mapping[str, Any], max_tokens_limit: int) -> dict[str, Any]:
    """The server's generation group with the request's sampling knobs on top (GenerationConfig kwargs).

    temperature 0 is greedy, as in the config. top_k, min_p and repetition_penalty are not OpenAI
    fields but vLLM and text-generation-webui accept them, and SillyTavern can merge them into the
    body: they are transformers knobs, so they map one to one.
    """
    from lyra.generation import check_generation

    settings = dict(defaults)
    temperature = _number(body, "temperature", 0, 2)
    if temperature is not None:
        settings["temperature"] = temperature
        settings["do_sample"] = temperature > 0
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    if top_p is not None:
        settings["top_p"] = top_p
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are sent
        value = _integer(body, name, 1)
        if value is not None:
            if value > max_tokens_limit:
                raise APIError(400, f"{name}={value} is above this server's limit of {max_tokens_limit} "
                                    f"(max_tokens_limit); ask for fewer", param=name)
            settings["max_new_tokens"] = value
            break
    top_k = _integer(body, "top_k", 0)
    if top_k is not None:
        settings["top_k"] = top_k
    min_p = _number(body, "min_p", 0, 1)
    if min_p is not None:
        settings["min_p"] = min_p
    repetition_penalty = _number(body, "repetition_penalty", 0, 10, low_open=True)
    if repetition_penalty is not None:
        settings["repetition_penalty"] = repetition_penalty
    try:
        check_generation(settings)
    except UserError as error:
        raise APIError(400, error.message, param=str(error.key).removeprefix("generation.")) from None
    return settings


# ---------------------------------------------------------------- request -> prompt messages

def content_text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (the only kind a text model can read)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise APIError(400, f"{where}: only text content is supported, got a {kind!r} part", param=where)
        return "".join(parts)
    raise APIError(400, f"{where} must be a string or a list of text parts", param=where)


def client_messages(body: Mapping[str, Any], max_messages: int, max_message_chars: int) -> list[dict[str, str]]:
    """The request's messages as {"role", "content"[, "name"]}, capped in number and size (no tokenization)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    if len(messages) > max_messages:
        raise APIError(400, f"{len(messages)} messages is over this server's limit of {max_messages} "
                            f"(max_messages)", param="messages", code="too_many_messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise APIError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role {role!r} is not supported (system, user, assistant)",
                           param=f"{where}.role")
        text = content_text(message.get("content"), f"{where}.content")
        if len(text) > max_message_chars:
            raise APIError(400, f"{where} has {len(text)} characters, over this server's limit of "
                                f"{max_message_chars} (max_message_chars)", param=f"{where}.content",
                           code="message_too_long")
        item = {"role": role, "content": text}
        if isinstance(message.get("name"), str):
            item["name"] = message["name"]
        parsed.append(item)
    return parsed


@dataclass
class PromptMessages:
    """What the model sees: a leading system text, the history, and the message it answers."""

    system: str | None
    history: list[dict[str, str]]
    prompt_text: str
    notes: Counter = field(default_factory=Counter)  # what was merged, moved or inserted


def _system_text(parts: Sequence[dict[str, str]], user_label: str, bot_label: str, notes: Counter) -> str:
    """Consecutive system messages as one text; SillyTavern's example_user / example_assistant
    messages become an example-dialogue transcript in the run persona's chat labels."""
    blocks: list[str] = []
    examples: list[str] = []
    for message in parts:
        speaker = EXAMPLE_NAMES.get(message.get("name", ""))
        if speaker is not None:
            examples.append(f"{user_label if speaker == 'user' else bot_label}{message['content'].strip()}")
            notes["example_messages"] += 1
            continue
        if examples:
            blocks.append("\n".join([EXAMPLES_HEADER, *examples]))
            examples = []
        if message["content"].strip():
            blocks.append(message["content"].strip())
        else:
            notes["empty_system_messages"] += 1
    if examples:
        blocks.append("\n".join([EXAMPLES_HEADER, *examples]))
    if len(parts) > 1:
        notes["system_messages_merged"] += len(parts)
    return "\n\n".join(blocks)


def prompt_messages(messages: Sequence[dict[str, str]], mode: str, persona_prompt: str,
                    user_label: str = "User: ", bot_label: str = "Assistant: ") -> PromptMessages:
    """Turn an OpenAI message list into (system, history, prompt) for lyra.generation.fit_prompt.

    - The system messages before the first user/assistant turn (a card's description, personality,
      scenario, SillyTavern's "[Start a new Chat]", its example dialogue) become ONE system message:
      the models were trained on one system message at the start.
    - Later runs of consecutive system messages (an author's note) become one system turn in place.
    - System messages after the last user message (post-history instructions) move to just before it:
      the reply must follow a user turn.
    - mode run: the persona's prompt when the client sends no leading system text; client: the
      client's as is (none if it sends none); merge: the persona's prompt, then the client's.
    """
    notes: Counter = Counter()
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise APIError(400, "messages need at least one user message to answer", param="messages")
    if any(m["role"] == "assistant" for m in messages[last_user + 1:]):
        raise APIError(400, "the last non-system message must be the user's: continuing or prefilling an "
                            "assistant reply is not supported", param="messages", code="assistant_prefill")
    trailing = list(messages[last_user + 1:])
    ordered = [*messages[:last_user], *trailing, messages[last_user]]
    if trailing:
        notes["trailing_system_moved"] += len(trailing)
    lead_end = next((i for i, m in enumerate(ordered) if m["role"] != "system"), len(ordered))
    client_system = _system_text(ordered[:lead_end], user_label, bot_label, notes) if lead_end else ""
    history: list[dict[str, str]] = []
    run_of_system: list[dict[str, str]] = []
    for message in ordered[lead_end:-1]:
        if message["role"] == "system":
            run_of_system.append(message)
            continue
        if run_of_system:
            history.append({"role": "system", "content": _system_text(run_of_system, user_label, bot_label, notes)})
            run_of_system = []
        history.append({"role": message["role"], "content": message["content"]})
    if run_of_system:
        history.append({"role": "system", "content": _system_text(run_of_system, user_label, bot_label, notes)})
    if mode == "run":
        system = client_system or persona_prompt or None
        if not client_system and persona_prompt:
            notes["persona_prompt_inserted"] += 1
    elif mode == "merge":
        system = "\n\n".join(part for part in (persona_prompt, client_system) if part) or None
        if persona_prompt:
            notes["persona_prompt_inserted"] += 1
    else:
        system = client_system or None
    return PromptMessages(system=system, history=history, prompt_text=ordered[-1]["content"], notes=notes)


# ---------------------------------------------------------------- stop strings

class StopCutter:
    """Streamed text cut at the first stop string: text that could still begin one is held back."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        hits = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if hits:
            text, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return text
        held = max((length for stop in self.stops for length in range(min(len(stop) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(stop[:length])), default=0)
        text, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
        return text

    def finish(self) -> str:
        text, self.pending = self.pending, ""
        return text


# ---------------------------------------------------------------- the shared model

@dataclass
class Job:
    """One admitted chat completion, ready to generate."""

    model: str
    adapter: bool
    prompt_ids: list[int]
    generation: dict[str, Any]
    stop: list[str]
    seed: int | None
    penalties: tuple[float, float]
    stream: bool
    include_usage: bool
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    finish_reason: str = "length"
    completion_tokens: int = 0


class ChatService:
    """One loaded run shared by every client: admission, prompt building, generation."""

    def __init__(self, run, settings: ServeSettings, generation: Mapping[str, Any], engine=None):
        from lyra.engines import TransformersEngine
        from lyra.generation import stop_token_ids

        self.run = run
        self.base_engine = TransformersEngine(run)  # <name>-base: the loaded model with the adapter off
        self.engine = engine or self.base_engine
        self.settings = settings
        self.generation = dict(generation)
        self.name = str(run.persona.name) if run.persona is not None else "lyra"
        self.base_name = f"{self.name}-base"
        self.user_label = str((run.persona or {}).get("user_label") or "User: ")
        self.bot_label = str((run.persona or {}).get("bot_label") or "Assistant: ")
        self.stop_ids = set(stop_token_ids(run.tokenizer))
        self.lock = threading.Lock()  # the model: also held by a cancelled reply until its next token
        self.slot = asyncio.Semaphore(1)  # whose turn it is; the rest wait in the queue
        self.admitted = 0  # requests holding the model or waiting for it (event-loop thread only)
        self.stats: Counter = Counter()
        self._ignored_logged: set[str] = set()

    # -- models

    def model_ids(self) -> list[str]:
        return [self.name, self.base_name] if self.run.has_adapter else [self.base_name]

    def adapter_for(self, model: Any) -> bool:
        if model in (None, "", self.name) and self.run.has_adapter:
            return True
        if model in (None, "", self.base_name):
            return False
        raise APIError(404, f"model {model!r} does not exist here; this server has {', '.join(self.model_ids())}",
                       param="model", code="model_not_found")

    # -- admission: a bounded queue

    def admit(self) -> Callable[[], None]:
        """Take a place (the model's or the queue's) or raise 429; returns the idempotent release."""
        if self.admitted >= 1 + self.settings.queue_size:
            self.stats["refused_queue_full"] += 1
            raise APIError(429, f"the server is busy: {self.admitted} requests are already in line "
                                f"(queue_size={self.settings.queue_size}); retry shortly",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1

        return release

    # -- request -> job

    def note_ignored(self, body: Mapping[str, Any]) -> None:
        for name in body:
            if name in HANDLED_FIELDS:
                continue
            self.stats[f"ignored_field:{name}"] += 1
            if name not in self._ignored_logged:
                self._ignored_logged.add(name)
                log.warning("ignoring request field %r (not used by this server; logged once, counted)", name)

    def parse(self, body: Any) -> tuple[Job, PromptMessages]:
        """Everything checkable without the tokenizer: shapes, ranges, caps, refusals."""
        if not isinstance(body, Mapping):
            raise APIError(400, "the request body must be a JSON object")
        adapter = self.adapter_for(body.get("model"))
        messages = client_messages(body, self.settings.max_messages, self.settings.max_message_chars)
        n = _integer(body, "n", 1)
        if n not in (None, 1):
            raise APIError(400, f"n={n}: this server generates one choice per request (n=1)", param="n")
        if body.get("logit_bias") not in (None, {}):
            raise APIError(400, "logit_bias is not supported: its keys are token ids of OpenAI's tokenizers, "
                                "which mean nothing to this model; send {} or leave it out", param="logit_bias")
        if body.get("logprobs"):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for name in ("tools", "functions"):
            if body.get(name):
                raise APIError(400, f"{name}: this persona server does not call tools", param=name)
        response_format = body.get("response_format")
        if response_format not in (None, {}) and not (isinstance(response_format, Mapping)
                                                      and response_format.get("type") == "text"):
            raise APIError(400, "response_format: only plain text replies are supported", param="response_format")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise APIError(400, "stream must be true or false", param="stream")
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, Mapping) else False
        presence = _number(body, "presence_penalty", -2, 2) or 0.0
        frequency = _number(body, "frequency_penalty", -2, 2) or 0.0
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
        settings = generation_settings(body, self.generation, self.settings.max_tokens_limit)
        prompt = prompt_messages(messages, self.settings.system_prompt, self.run.system_prompt,
                                 self.user_label, self.bot_label)
        self.note_ignored(body)
        job = Job(model=self.name if adapter else self.base_name, adapter=adapter, prompt_ids=[],
                  generation=settings, stop=stop_strings(body.get("stop")), seed=seed,
                  penalties=(presence, frequency), stream=bool(stream), include_usage=include_usage)
        return job, prompt

    def build_prompt(self, job: Job, prompt: PromptMessages) -> None:
        """Tokenize and fit the prompt (lyra.generation.fit_prompt: oldest turns dropped first)."""
        from lyra.generation import DEFAULT_MAX_NEW_TOKENS, context_budget, fit_prompt

        tokenizer = self.run.tokenizer
        budget = context_budget(self.run.model, job.generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
                                self.settings.max_prompt_tokens)
        history = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + prompt.history
        try:
            fitted = fit_prompt(prompt.prompt_text, tokenizer, history, None, budget)
        except UserError as error:
            raise APIError(400, f"the prompt does not fit: {error.message}", param="messages") from None
        if fitted.dropped_messages or fitted.cut:
            self.stats["prompts_fitted"] += 1
            log.info("prompt over %d tokens (max_prompt_tokens): dropped the %d oldest messages%s", budget,
                     fitted.dropped_messages, ", cut the last message" if fitted.cut else "")
        self.stats.update(prompt.notes)
        job.prompt_ids = fitted.ids

    # -- generation

    @contextlib.contextmanager
    def _model_for(self, job: Job) -> Iterator[None]:
        """The worker thread's hold on the model: the lock and the adapter switch (the engine seeds)."""
        with self.lock:
            adapter_off = self.run.adapter_disabled() if not job.adapter and self.run.has_adapter \
                else contextlib.nullcontext()
            with adapter_off:
                yield

    async def _watch(self, request, streamer) -> None:
        """Cancel the streamer when the client hangs up: the worker stops at its next token."""
        while not streamer.cancelled.is_set():
            if await request.is_disconnected():
                self.stats["client_disconnects"] += 1
                log.info("client disconnected: generation stopped")
                streamer.cancel()
                return
            await asyncio.sleep(0.05)

    async def generate(self, job: Job, request) -> AsyncIterator[str]:
        """Yield the reply's text pieces (stop strings cut); sets job.finish_reason/completion_tokens.

        Waits for its turn first; the caller holds an admission place until this ends.
        """
        import anyio

        engine = self.engine if job.adapter else self.base_engine
        streamer = engine.streamer()
        cutter = StopCutter(job.stop)
        async with self.slot:
            watcher = asyncio.create_task(self._watch(request, streamer))
            pieces = engine.stream(job.prompt_ids, guard=lambda: self._model_for(job), streamer=streamer,
                                   penalties=job.penalties, seed=job.seed, **job.generation)
            try:
                while (delta := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                    text = cutter.feed(delta)
                    if text:
                        yield text
                    if cutter.stopped:
                        break
                if not cutter.stopped:
                    tail = cutter.finish()
                    if tail:
                        yield tail
            finally:
                streamer.cancel()  # a stop string, a hang-up or an error: the worker ends at its next token
                watcher.cancel()
                pieces.close()  # not running: every next() above has returned
                generated = list(streamer.generated)
                job.completion_tokens = len(generated)
                job.finish_reason = "stop" if cutter.stopped or (generated and generated[-1] in self.stop_ids) \
                    else "length"
                self.stats["replies"] += 1


# ---------------------------------------------------------------- the app

def bearer_ok(request, api_key: str | None) -> bool:
    """No key configured: anything goes (SillyTavern sends `Bearer undefined`). Else an exact match."""
    if api_key is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes: by Content-Length first, then as it arrives."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "bad Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"the request body is {declared} bytes, over this server's limit of {limit} "
                                f"(max_body_bytes)", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over this server's limit of {limit} bytes (max_body_bytes)",
                           code="request_too_large")
    return bytes(body)


def build_app(service: ChatService):
    """The FastAPI app: /v1/models and /v1/chat/completions, every error OpenAI-shaped.

    (This module has no `from __future__ import annotations`: FastAPI reads the handlers' `Request`
    annotation at runtime, and Request is imported here, not at module level.)"""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    settings = service.settings

    @contextlib.asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        yield
        if service.stats:
            log.info("served: %s", ", ".join(f"{key}={value}" for key, value in sorted(service.stats.items())))

    app = FastAPI(title="lyra", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail), code=str(error.status_code)))

    def check_key(request: Request) -> None:
        if not bearer_ok(request, settings.api_key):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    class ReleasingStream(StreamingResponse):
        """A stream that gives its admission place back however it ends (even if never iterated)."""

        def __init__(self, content, release: Callable[[], None], **kwargs):
            super().__init__(content, **kwargs)
            self.release = release

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.release()

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_key(request)
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "lyra"} for name in service.model_ids()]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        raw = await read_body(request, settings.max_body_bytes)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise APIError(400, f"the body is not JSON ({error})") from None
        job, prompt = service.parse(body)
        release = service.admit()
        try:
            await asyncio.to_thread(service.build_prompt, job, prompt)
        except BaseException:
            release()
            raise
        if job.stream:
            return ReleasingStream(stream_events(service, job, request), release,
                                   media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async with contextlib.aclosing(service.generate(job, request)) as pieces:
                content = "".join([piece async for piece in pieces])
        except Exception as error:  # a generation crash: the server stays up, the client gets an OpenAI error
            if isinstance(error, APIError):
                raise
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error") from None
        finally:
            release()
        return JSONResponse(completion_body(job.completion_id, job.created, job.model, content, job.finish_reason,
                                            usage_of(len(job.prompt_ids), job.completion_tokens)))

    return app


async def stream_events(service: ChatService, job: Job, request) -> AsyncIterator[bytes]:
    """SSE: a role chunk, content chunks, a finish chunk with usage, [DONE]; an error is a chunk too."""
    head = (job.completion_id, job.created, job.model)
    yield sse(chunk_body(*head, {"role": "assistant", "content": ""}))
    try:
        async with contextlib.aclosing(service.generate(job, request)) as pieces:
            async for piece in pieces:
                yield sse(chunk_body(*head, {"content": piece}))
    except Exception as error:  # headers are sent: SillyTavern shows a chunk with an `error` key as an error
        log.exception("generation failed")
        yield sse(APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error").body())
        yield sse("[DONE]")
        return
    usage = usage_of(len(job.prompt_ids), job.completion_tokens)
    yield sse(chunk_body(*head, {}, finish_reason=job.finish_reason, usage=usage))
    if job.include_usage:
        yield sse(chunk_body(*head, {}, usage=usage, choices=False))
    yield sse("[DONE]")


def serve(cfg: DictConfig) -> None:
    """Check the config, load the run, serve until Ctrl-C."""
    from lyra.engines import open_app_engine
    from lyra.secrets import install_log_scrubber, register_secret

    settings = check_serve_config(cfg)
    try:
        import fastapi  # noqa: F401  (build_app's)
    except ImportError:
        raise UserError(None, "the server needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    register_secret(settings.api_key)
    install_log_scrubber()
    run, generation, engine = open_app_engine(cfg, n_ctx=settings.max_prompt_tokens + settings.max_tokens_limit)
    service = ChatService(run, settings, generation, engine=engine)
    if engine is not service.base_engine and run.has_adapter:
        log.info("engine: %s on %s; %s runs on transformers (the adapter off: the GGUF holds only the persona)",
                 service.name, engine.name, service.base_name)
    app = build_app(service)
    import uvicorn

    log.info("serving %s at http://%s:%d/v1 (models: %s; system_prompt=%s; %s)", service.name,
             settings.host if ":" not in settings.host else f"[{settings.host}]", settings.port,
             ", ".join(service.model_ids()), settings.system_prompt,
             "API key required" if settings.api_key else "no API key: loopback only")
    # log_config=None: uvicorn logs through lyra's stderr logging (and its secret scrubber)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=5)


@hydra_app("serve")
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
