"""Engines: what computes a reply from lyra's prompt ids. chat, web and the server talk to one of two.

    python -m lyra.chat run_dir=R engine=llamacpp        # the run's GGUF export on llama.cpp
    python -m lyra.serve run_dir=R engine=auto           # llama.cpp on CPU when installed, else transformers
    python -m lyra.web run_dir=R engine=transformers     # the run's own model (PEFT or merged in memory)

    from lyra.engines import open_engine
    engine = open_engine(run, "auto", gguf_type="f16", generation={"repetition_penalty": 1.1}, n_ctx=4096)
    for delta in engine.stream(prompt_ids, do_sample=False, max_new_tokens=64):
        print(delta, end="")
    reply = engine.generate(prompt_ids, do_sample=False, max_new_tokens=64)   # a lyra.generation.Reply

Both engines take the same input, the prompt ids lyra.generation fits (the training template, so
the template is identical), stop at the same ids (`stop_token_ids`) and stream through the same
`ReplyStreamer` (the tokenizer's decoding, the think filter, cancellation at the next token, the
reply's ids for usage counts).

`transformers`: lyra.generation on the loaded run's model.
`llamacpp`: `lyra.export format=gguf` of the run, made on first use and cached in
`R/exports/gguf-<type>-<adapter hash>/` (a second start reuses it), run by llama-cpp-python.
lyra picks each token itself from llama.cpp's logits with transformers' rules in transformers'
order (repetition penalty over prompt and reply, min_new_tokens, OpenAI presence/frequency penalties,
temperature, top_k, top_p, min_p). Greedy is therefore lyra's greedy rule and equals the
transformers engine's reply token for token where the arithmetic agrees. Sampling draws from the
same distribution with numpy's generator (`seed` seeds it), not torch's: the same seed gives
different samples on the two engines. A generation setting it cannot map is refused in one line.

Before llamacpp serves, `open_engine` runs a short greedy parity check against the transformers
engine (the persona's first probes, a few dozen tokens). A difference refuses an explicit
`engine=llamacpp` (exit 2) and makes `auto` fall back to transformers with a warning; the verdict is
cached beside the GGUF, so a second start skips it.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from lyra.errors import UserError
from lyra.generation import (DEFAULT_MAX_NEW_TOKENS, Reply, ReplyStreamer, generate_replies, reply_from_tokens,
                             stop_token_ids, stream_reply, stream_worker)

log = logging.getLogger(__name__)

ENGINES = ("transformers", "llamacpp", "auto")
GGUF_RUNTIME_HINT = "pip install 'lyra[gguf-runtime]' (llama-cpp-python builds llama.cpp from source, ~10 min)"
# What the llamacpp engine maps (transformers' meaning, applied to llama.cpp's logits); anything else is refused.
LLAMACPP_SETTINGS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens",
                     "min_new_tokens")
# The start-up parity check: a few prompts, a few dozen greedy tokens (seconds on CPU for small models).
PARITY_PROBES = 3
PARITY_TOKENS = 32
FALLBACK_PROBES = ("Hello! Who are you?", "I had a long day. Any advice?", "Tell me about your home.")
_EXPORT_LOG_LINES = 3  # lines of a failed export's output quoted in the error


# ---------------------------------------------------------------- choosing

def check_engine(value: Any) -> str:
    """`engine=` as given: transformers, llamacpp or auto (one line naming the key otherwise)."""
    if value not in ENGINES:
        raise UserError("engine", f"must be one of {', '.join(ENGINES)}, got {value!r}")
    return str(value)


def check_engine_keys(cfg) -> None:
    """An app's engine= and gguf_type= (chat, web, serve), one line naming the bad key, before anything loads."""
    from lyra.gguf import check_gguf_type

    check_engine(cfg.engine)
    check_gguf_type(cfg.gguf_type, key="gguf_type")
    if not isinstance(cfg.compile_decode, bool):
        raise UserError("compile_decode", f"must be true or false, got {cfg.compile_decode!r}")


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_engine(choice: str, device: Any) -> str:
    """auto = llamacpp on CPU when llama-cpp-python is importable, else transformers; explicit choices stay."""
    choice = check_engine(choice)
    if choice != "auto":
        if choice == "llamacpp" and not llama_cpp_installed():
            raise UserError("engine", f"llamacpp needs llama-cpp-python: {GGUF_RUNTIME_HINT}")
        return choice
    on_cpu = str(device).startswith("cpu")
    return "llamacpp" if on_cpu and llama_cpp_installed() else "transformers"


def is_quantized(model) -> bool:
    """A bitsandbytes base (4- or 8-bit): its GGUF export is the float merge, another model than the one served."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def check_llamacpp_generation(generation: Mapping[str, Any], key: str = "generation") -> None:
    """Refuse, in one line, a setting the llamacpp engine would otherwise have to ignore."""
    for name, value in generation.items():
        if value is not None and name not in LLAMACPP_SETTINGS:
            raise UserError(f"{key}.{name}", f"the llamacpp engine maps only {', '.join(LLAMACPP_SETTINGS)}; "
                                             "drop it or use engine=transformers")


# ---------------------------------------------------------------- OpenAI penalties (both engines)

def openai_penalties(presence: float, frequency: float, prompt_length: int):
    """A LogitsProcessor doing what OpenAI documents for presence_penalty and frequency_penalty:
    logit[t] -= presence * (t appeared in the reply) + frequency * (times t appeared), over the reply's
    tokens so far (the prompt is not counted, as in vLLM). Additive, unlike transformers'
    multiplicative repetition_penalty, which the generation group may apply as well."""
    import torch
    from transformers import LogitsProcessor

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            reply = input_ids[:, prompt_length:]
            if reply.shape[1] == 0:
                return scores
            counts = torch.zeros_like(scores).scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
            return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)

    return OpenAIPenalties()


# ---------------------------------------------------------------- transformers

class TransformersEngine:
    """lyra.generation on the loaded run's model (the adapter as loaded; `guard` may switch it off)."""

    name = "transformers"

    def __init__(self, run) -> None:
        self.run = run
        self.description = "transformers (the run's model)"

    def streamer(self) -> ReplyStreamer:
        return ReplyStreamer(self.run.tokenizer)

    def stream(self, prompt_ids: Sequence[int], guard: Callable[[], AbstractContextManager] = nullcontext,
               streamer: ReplyStreamer | None = None, penalties: tuple[float, float] = (0.0, 0.0),
               seed: int | None = None, **generation) -> Iterator[str]:
        """Clean text deltas (lyra.generation.stream_reply); generation runs inside `guard()`, seeded there."""
        if any(penalties):
            generation["logits_processor"] = [openai_penalties(*penalties, prompt_length=len(prompt_ids))]

        @contextmanager
        def guarded_and_seeded() -> Iterator[None]:
            with guard():  # the seed is set under the caller's lock, right before this reply's generation
                if seed is not None:
                    from transformers import set_seed

                    set_seed(seed)
                yield

        return stream_reply(prompt_ids, self.run.model, self.run.tokenizer, guard=guarded_and_seeded,
                            streamer=streamer or self.streamer(), **generation)

    def generate(self, prompt_ids: Sequence[int], **generation) -> Reply:
        return generate_replies([prompt_ids], self.run.model, self.run.tokenizer, **generation)[0]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the GGUF export, cached by adapter hash

def adapter_digest(adapter_path: Path) -> str:
    """A hash of every file of the adapter dir (weights, config, tokenizer, template)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in adapter_path.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(adapter_path)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def gguf_cache_dir(run_dir: Path, adapter_path: Path, gguf_type: str) -> Path:
    """Where the run's GGUF of this adapter and type is kept: a changed adapter gets a new dir."""
    return Path(run_dir) / "exports" / f"gguf-{gguf_type}-{adapter_digest(adapter_path)[:12]}"


def lyra_env() -> dict[str, str]:
    """The environment for a lyra subprocess: this very lyra first on the path."""
    root = str(Path(__file__).resolve().parents[1])
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def hydra_override(key: str, value: Any) -> str:
    """A Hydra command-line override whose value is taken literally (paths with = , or spaces)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{text}'"


def export_gguf(run_dir: Path, adapter: str, adapter_path: Path, gguf_type: str, device: str | None,
                output_dir: Path, key: str = "targets") -> Path:
    """`python -m lyra.export ... format=gguf` into output_dir (float32 merge, as on CPU); its GGUF file.

    An export already there (its lyra_export.json written last) is reused."""
    gguf_file = output_dir / f"model-{gguf_type}.gguf"
    if gguf_file.is_file() and (output_dir / "lyra_export.json").is_file():
        log.info("reusing the GGUF export %s", gguf_file)
        return gguf_file
    command = [sys.executable, "-m", "lyra.export", hydra_override("run_dir", run_dir),
               hydra_override("output_dir", output_dir), hydra_override("adapter", adapter), "format=gguf",
               f"gguf.type={gguf_type}", "dtype=float32", "overwrite=true",
               *([hydra_override("device", device)] if device else [])]
    log.info("exporting the run for llama.cpp: %s", " ".join(command[1:]))
    done = subprocess.run(command, env=lyra_env(), capture_output=True, text=True)
    if done.returncode != 0 or not gguf_file.is_file():
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-_EXPORT_LOG_LINES:]
        raise UserError(key, f"gguf: lyra.export format=gguf failed (exit {done.returncode}): " + " | ".join(tail))
    return gguf_file


# ---------------------------------------------------------------- llama.cpp

def load_llama(**kwargs):
    """llama_cpp.Llama(**kwargs) with llama.cpp's extra buffer types off (`use_extra_bufts=False`).

    On CPUs with AMX, llama.cpp's default build segfaults while repacking q8_0/q4 weights into its
    AMX buffers (any GGUF, not only lyra's); plain CPU buffers compute the same result. Llama() has
    no such argument (llama-cpp-python 0.3.36 silently drops unknown keywords), so the model
    parameters it starts from are patched for this one load.
    """
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        llm = llama_cpp.Llama(**kwargs)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults
    if llm.model_params.use_extra_bufts:
        raise RuntimeError("llama-cpp-python ignored use_extra_bufts=False; q8_0 may crash on AMX CPUs")
    return llm


class TokenPicker:
    """The next token from llama.cpp's logits, by transformers' rules in transformers' order:
    repetition penalty (prompt and reply, each token once), min_new_tokens (stops masked), the OpenAI
    penalties (reply only), then, when sampling, temperature, top_k, top_p, min_p and a draw."""

    def __init__(self, prompt_ids: Sequence[int], stops: Sequence[int], penalties: tuple[float, float] = (0.0, 0.0),
                 seed: int | None = None, **generation) -> None:
        import numpy as np

        self.np = np
        self.penalty = float(generation.get("repetition_penalty") or 1.0)
        self.min_new = int(generation.get("min_new_tokens") or 0)
        self.presence, self.frequency = penalties
        temperature = generation.get("temperature")
        self.sample = generation.get("do_sample", True) is not False and temperature != 0
        self.temperature = float(temperature) if temperature is not None else 1.0
        self.top_k = int(generation.get("top_k") or 0)
        self.top_p = float(generation.get("top_p") if generation.get("top_p") is not None else 1.0)
        self.min_p = float(generation.get("min_p") or 0.0)
        self.stops = np.array(list(stops), dtype=np.int64)
        self.seen = set(prompt_ids)
        self.counts: dict[int, int] = {}
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits, reply: Sequence[int]) -> int:
        np = self.np
        logits = logits.astype(np.float32)  # a copy: llama.cpp's buffer stays as it is
        if self.penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor
            index = np.fromiter(self.seen, dtype=np.int64)
            scores = logits[index]
            logits[index] = np.where(scores < 0, scores * self.penalty, scores / self.penalty)
        if len(reply) < self.min_new:
            logits[self.stops] = -np.inf
        if self.counts and (self.presence or self.frequency):
            index = np.fromiter(self.counts, dtype=np.int64)
            logits[index] -= self.frequency * np.fromiter(self.counts.values(), dtype=np.float32) + self.presence
        if not self.sample:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits)
        self.seen.add(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _draw(self, logits) -> int:
        np = self.np
        logits = logits / self.temperature
        if 0 < self.top_k < logits.size:  # keep the k largest (ties at the k-th kept, as torch.topk's threshold)
            threshold = np.partition(logits, -self.top_k)[-self.top_k]
            logits[logits < threshold] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if self.top_p < 1.0:  # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p
            order = np.argsort(probs, kind="stable")
            tail = np.cumsum(probs[order]) <= 1 - self.top_p
            tail[-1] = False  # the most likely token always stays
            probs[order[tail]] = 0
        if self.min_p > 0:
            probs[probs < self.min_p * probs.max()] = 0
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on one GGUF file: its template, its tokenizer, its logits."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.path = Path(path)
        self.llm = load_llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                              verbose=False)
        self.n_ctx = n_ctx
        # closed before interpreter teardown: Llama.__del__ at exit otherwise prints a TypeError traceback
        atexit.register(self.close)
        self.n_vocab = self.llm.n_vocab()
        self.template = self.llm.metadata.get("tokenizer.chat_template")
        # llama-cpp-python swaps in a built-in format when the template looks like a known one
        self.chat_format = self.llm.chat_format

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """What llama-cpp-python's create_chat_completion feeds the model: the file's embedded Jinja
        template (Jinja2ChatFormatter, as Llama() sets it up from the metadata), tokenized by llama.cpp."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.template:
            raise UserError("targets", "gguf: the file has no tokenizer.chat_template")
        formatter = Jinja2ChatFormatter(template=self.template, eos_token=self._text(self.llm.token_eos()),
                                        bos_token=self._text(self.llm.token_bos()))  # as Llama() builds it
        rendered = formatter(messages=messages)
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def _text(self, token: int) -> str:
        return "" if token < 0 else self.llm._model.token_get_text(token)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._llama_cpp.llama_model_get_vocab(self.llm.model), token))

    def _logits(self):
        import numpy as np

        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def prefill(self, prompt: Sequence[int]) -> int:
        """Evaluate the prompt, keeping the KV cache of the longest prefix it shares with the last one
        (a chat's next turn re-reads only its new tokens); how many tokens were evaluated."""
        prompt = list(prompt)
        if len(prompt) >= self.n_ctx:
            raise UserError("max_prompt_tokens", f"a {len(prompt)}-token prompt does not fit llama.cpp's "
                                                 f"context of {self.n_ctx} tokens")
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # the last prompt token is evaluated again: its logits pick the first token
        self.llm.n_tokens = keep  # eval() drops the KV cache past n_tokens
        self.llm.eval(prompt[keep:])
        return len(prompt) - keep

    def tokens(self, prompt: Sequence[int], pick: Callable[[Any, list[int]], int], max_new_tokens: int,
               stops: Sequence[int]) -> Iterator[int]:
        """Yield each new token (a stop included, which ends it); up to max_new_tokens."""
        self.prefill(prompt)
        room = self.n_ctx - len(prompt)
        reply: list[int] = []
        for _ in range(min(max_new_tokens, room)):
            token = pick(self._logits(), reply)
            reply.append(token)
            yield token
            if token in stops:
                return
            self.llm.eval([token])

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, stops: Sequence[int],
               repetition_penalty: float) -> tuple[list[int], bool]:
        """(tokens up to and including a stop, whether a stop ended it): lyra's greedy rule on llama.cpp's logits."""
        picker = TokenPicker(prompt, stops, do_sample=False, repetition_penalty=repetition_penalty)
        tokens = list(self.tokens(prompt, picker, max_new_tokens, stops))
        return tokens, bool(tokens) and tokens[-1] in stops

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llm.close()
        atexit.unregister(self.close)


class LlamaCppEngine:
    """The run's GGUF on llama.cpp, fed lyra's prompt ids, decoded and filtered as transformers' replies are."""

    name = "llamacpp"

    def __init__(self, run, gguf_file: Path, n_ctx: int, n_threads: int | None = None) -> None:
        import torch

        self.run = run
        self.gguf_file = Path(gguf_file)
        self.stops = stop_token_ids(run.tokenizer)
        self.runner = LlamaCppRunner(gguf_file, n_ctx=n_ctx, n_threads=n_threads or torch.get_num_threads())
        self.description = f"llamacpp ({self.gguf_file})"

    def streamer(self) -> ReplyStreamer:
        return ReplyStreamer(self.run.tokenizer)

    def _tokens(self, prompt_ids: Sequence[int], penalties, seed, generation) -> Iterator[int]:
        """The reply's tokens as llama.cpp computes them and lyra's rules pick them (settings checked by the caller)."""
        picker = TokenPicker(prompt_ids, self.stops, penalties=penalties, seed=seed, **generation)
        max_new = int(generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        return self.runner.tokens(prompt_ids, picker, max_new, self.stops)

    def _produce(self, prompt_ids: Sequence[int], streamer: ReplyStreamer, penalties, seed, generation) -> None:
        """Feed the streamer as transformers' generate() does: the prompt once, then one token at a time."""
        import torch

        streamer.streamer.put(torch.tensor(list(prompt_ids)))  # skipped as the prompt
        for token in self._tokens(prompt_ids, penalties, seed, generation):
            streamer.streamer.put(torch.tensor([token]))  # raises GenerationCancelled once cancelled
        streamer.streamer.end()

    def stream(self, prompt_ids: Sequence[int], guard: Callable[[], AbstractContextManager] = nullcontext,
               streamer: ReplyStreamer | None = None, penalties: tuple[float, float] = (0.0, 0.0),
               seed: int | None = None, **generation) -> Iterator[str]:
        streamer = streamer or self.streamer()
        check_llamacpp_generation(generation)  # in the caller's thread: one line, not a worker's traceback

        def produce(streamer: ReplyStreamer) -> None:
            with guard():
                if not streamer.cancelled.is_set():
                    self._produce(prompt_ids, streamer, penalties, seed, generation)

        return stream_worker(produce, streamer)

    def generate(self, prompt_ids: Sequence[int], penalties: tuple[float, float] = (0.0, 0.0),
                 seed: int | None = None, **generation) -> Reply:
        """One whole reply, shaped as lyra.generation.generate_replies shapes it."""
        check_llamacpp_generation(generation)
        tokens = list(self._tokens(prompt_ids, penalties, seed, generation))
        return reply_from_tokens(tokens, self.run.tokenizer, ended_by_eos=bool(tokens) and tokens[-1] in self.stops,
                                 prompt_tokens=len(prompt_ids))

    def close(self) -> None:
        self.runner.close()


# ---------------------------------------------------------------- the start-up parity check

def parity_prompts(run, count: int = PARITY_PROBES) -> list[list[int]]:
    """Prompt ids of the persona's first probes (fixed prompts when it has none), with the run's system prompt."""
    from lyra.generation import build_prompt_ids

    texts: list[str] = []
    probes_file = (run.persona or {}).get("probes_file") if run.persona is not None else None
    if probes_file and Path(str(probes_file)).is_file():
        from lyra.probes import load_probes

        texts = [probe.prompt for probe in load_probes(Path(str(probes_file)))[:count]]
    texts = texts or list(FALLBACK_PROBES[:count])
    return [build_prompt_ids(text, run.tokenizer, system_prompt=run.system_prompt) for text in texts]


def greedy_parity(reference, candidate, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  repetition_penalty: float) -> list[int]:
    """Indices of the prompts whose greedy token ids differ between the two engines."""
    settings = {"do_sample": False, "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}
    return [index for index, ids in enumerate(prompts)
            if reference.generate(ids, **settings).token_ids != candidate.generate(ids, **settings).token_ids]


def _parity_key(prompts, max_new_tokens: int, repetition_penalty: float, run) -> str:
    """What the cached verdict depends on besides the GGUF (whose dir is keyed by adapter and type)."""
    import torch

    device = str(next(run.model.parameters()).device)
    blob = json.dumps([prompts, max_new_tokens, repetition_penalty, device, torch.__version__, run.merged])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_app_engine(cfg, n_ctx: int, run=None):
    """(run, generation settings, engine) for an app's config (chat, web, serve): the run loaded as
    the app serves it (cfg.run_dir, adapter, device, prepack; `run` if given), then the engine
    `open_engine` chooses for cfg.engine and cfg.gguf_type with a context of n_ctx tokens, its decode
    step compiled for that context when cfg.compile_decode and the engine is transformers."""
    from omegaconf import OmegaConf

    from lyra.compiled_decode import compile_decode
    from lyra.runs import load_run

    run = run or load_run(cfg.run_dir, adapter=cfg.adapter, device=cfg.device, prepack=cfg.prepack)
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    engine = open_engine(run, cfg.engine, cfg.gguf_type, generation=generation, device=cfg.device, n_ctx=n_ctx)
    if cfg.compile_decode:
        if engine.name == "transformers":
            # a warning, so chat (which logs warnings only) says why nothing happens for a minute
            log.warning("compiling the decode step (compile_decode=true; ~1 min on 2 cores for SmolLM2) ...")
            report = compile_decode(run.model, run.tokenizer, max_length=n_ctx)
            (log.warning if report.reason else log.info)("%s", report)  # asked for and not done: chat shows it
        else:
            log.info("compile_decode: not used, %s computes the replies", engine.name)
    return run, generation, engine


def open_engine(run, choice: str, gguf_type: str = "f16", generation: Mapping[str, Any] | None = None,
                n_ctx: int = 4096, device: str | None = None, parity_tokens: int = PARITY_TOKENS):
    """The engine an app serves with, chosen and checked; logs one line saying what was chosen and why.

    choice: transformers | llamacpp | auto (see resolve_engine). For llamacpp: the cached GGUF (made
    on first use), then the greedy parity check against transformers (its verdict cached beside the
    GGUF), refused on any difference (explicit) or fallen back from (auto). generation: the app's
    generation group (a setting llama.cpp cannot map refuses it too; its repetition_penalty is the
    one the parity check uses). n_ctx: llama.cpp's context, capped at the model's own."""
    from lyra.gguf import check_gguf_type
    from lyra.prepack import release_packs
    from lyra.runs import adapter_dir

    generation = dict(generation or {})
    check_gguf_type(gguf_type, key="gguf_type")  # callers from Python skip the apps' check_engine_keys
    model_device = str(next(run.model.parameters()).device)
    name = resolve_engine(choice, model_device)
    transformers = TransformersEngine(run)
    if name == "llamacpp" and choice == "auto" and is_quantized(run.model):
        # the GGUF is the float merge: a 4-bit run as trained is another model, so auto keeps it
        log.info("engine: transformers (auto: the run's base is quantized; the GGUF would be its float merge)")
        return transformers
    if name == "transformers":
        if choice == "transformers":
            why = ""
        elif llama_cpp_installed():
            why = f" (auto: on {model_device})"
        else:  # where auto would pick llama.cpp, say what the missing extra costs (~4x decode: docs/performance.md)
            faster = model_device == "cpu" and not is_quantized(run.model)
            why = " (auto: llama-cpp-python is not installed" + (
                f"; on CPU llama.cpp replies ~4x faster: {GGUF_RUNTIME_HINT})" if faster else ")")
        log.info("engine: transformers%s", why)
        return transformers

    def refuse(message: str):
        if choice == "llamacpp":
            raise UserError("engine", message)
        log.warning("engine: transformers (auto fell back from llamacpp: %s)", message)
        return transformers

    try:
        check_llamacpp_generation(generation)
    except UserError as error:
        return refuse(f"{error.key}: {error.message}")
    adapter_path = adapter_dir(run.run_dir, run.adapter) if run.has_adapter else None
    if adapter_path is None:
        return refuse("llamacpp runs the run's GGUF export, which needs an adapter (adapter=none has none)")
    output_dir = gguf_cache_dir(run.run_dir, adapter_path, gguf_type)
    made = not (output_dir / f"model-{gguf_type}.gguf").is_file()
    try:
        gguf_file = export_gguf(run.run_dir, run.adapter, adapter_path, gguf_type, device, output_dir, key="engine")
    except UserError as error:
        return refuse(error.message)
    prompts = parity_prompts(run)
    limit = getattr(run.model.config, "max_position_embeddings", None) or n_ctx
    n_ctx = max(min(n_ctx, limit), max(map(len, prompts)) + parity_tokens + 1)
    engine = LlamaCppEngine(run, gguf_file, n_ctx=n_ctx)
    penalty = float(generation.get("repetition_penalty") or 1.0)
    verdict_file = output_dir / "engine_parity.json"
    key = _parity_key(prompts, parity_tokens, penalty, run)
    verdict = None
    if verdict_file.is_file():
        cached = json.loads(verdict_file.read_text())
        verdict = cached if cached.get("key") == key else None
    cached_note = "cached verdict"
    if verdict is None:
        differ = greedy_parity(transformers, engine, prompts, parity_tokens, penalty)
        verdict = {"key": key, "probes": len(prompts), "tokens": parity_tokens, "repetition_penalty": penalty,
                   "differ": differ}
        verdict_file.write_text(json.dumps(verdict, indent=1) + "\n")
        cached_note = "checked now"
    if verdict["differ"]:
        engine.close()
        return refuse(f"llama.cpp's greedy reply differs from transformers' on probe(s) "
                      f"{', '.join(str(i + 1) for i in verdict['differ'])} of {verdict['probes']} "
                      f"({gguf_type} GGUF {gguf_file}); use engine=transformers"
                      + (" or gguf_type=f32" if gguf_type != "f32" else ""))
    # transformers is left with the adapter-off toggle (web, serve): its prepacked copies would sit unread
    released = release_packs(run.model)
    log.info("engine: llamacpp (GGUF %s %s at %s; parity %d/%d over %d greedy tokens, %s; n_ctx %d)%s", gguf_type,
             "made" if made else "cached", gguf_file, verdict["probes"], verdict["probes"], parity_tokens, cached_note,
             n_ctx, f"; released the transformers model's {released / 1e6:.0f} MB of prepacked weights (packed again "
                    f"on its first reply)" if released else "")
    return engine
