"""Talk to a trained persona: the interactive / one-shot chat CLI.

    python -m lyra.chat run_dir=outputs/2026-01-01/12-00-00                 # interactive, streamed
    python -m lyra.chat run_dir=R prompt=你好                                # one reply on stdout
    printf '你好\\n我今天有點累\\nexit\\n' | python -m lyra.chat run_dir=R    # scripted, no TTY
    python -m lyra.chat run_dir=R adapter=none                              # the bare base model
    python -m lyra.chat run_dir=R generation.temperature=0                  # greedy
    python -m lyra.chat run_dir=R engine=llamacpp                           # the run's GGUF on llama.cpp

The transcript labels and the notices come from the run's persona (its `resolved_config.yaml`);
`user_label=` / `bot_label=` override the labels. Generation itself (prompt fitting, the think
filter, the streamer) is lyra.generation, shared with the web page and the probes; `engine=` picks who
computes the reply from those prompt ids (lyra.engines: transformers, or the run's GGUF on llama.cpp,
checked against transformers at start). In Python:

    from lyra.generation import generate_response, stream_response
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from typing import TextIO

from omegaconf import DictConfig, OmegaConf

from lyra.cli import hydra_app
from lyra.errors import UserError
from lyra.generation import DEFAULT_MAX_NEW_TOKENS, check_generation, context_budget, fit_prompt

log = logging.getLogger(__name__)

EXIT_COMMANDS = ("exit", "quit")
RESET_COMMAND = "/reset"
# The session's own notices, in the persona's language (English for any other).
NOTICES = {
    "zh-TW": {"ready": "{name}準備好了（{run_dir}，adapter={adapter}，engine={engine}）。輸入 {exits} 離開，{reset} 清除對話",
              "reset": "對話已重置", "cut": "輸入過長，已截斷至約 {budget} 個 token 的上限 (max_prompt_tokens)",
              "dropped": "已略去最早的 {dropped} 則訊息以符合長度上限"},
    "en": {"ready": "{name} is ready ({run_dir}, adapter={adapter}, engine={engine}). Type {exits} to leave, {reset} to clear the chat",
           "reset": "the conversation was reset", "cut": "input too long: cut to about {budget} tokens (max_prompt_tokens)",
           "dropped": "left out the oldest {dropped} messages to fit the length limit"},
}


# ---------------------------------------------------------------- CLI

class ChatSession:
    """The interactive loop, reading lines from `stdin` and writing the transcript to `stdout`."""

    def __init__(self, run, cfg: DictConfig, stdin: TextIO, stdout: TextIO, stderr: TextIO, engine=None):
        from lyra.engines import TransformersEngine

        self.run, self.cfg = run, cfg
        self.engine = engine or TransformersEngine(run)
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.generation = OmegaConf.to_container(cfg.generation, resolve=True)
        self.budget = context_budget(run.model, self.generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
                                     cfg.max_prompt_tokens)
        self.history: list[dict[str, str]] = []
        self.interactive = stdin.isatty()
        self.user_label, self.bot_label = transcript_labels(cfg, run.persona)
        language = str(run.persona.language)
        self.notices = NOTICES.get(language, NOTICES["en"])
        self._brackets = ("（", "）") if language.startswith("zh") else ("(", ")")

    def notice(self, key: str, **values) -> None:
        opening, closing = self._brackets
        print(f"{opening}{self.notices[key].format(**values)}{closing}", file=self.stderr, flush=True)

    def read_line(self) -> str | None:
        """The next user line, or None at EOF. A TTY gets line editing; piped input is echoed."""
        if self.interactive and self.stdin is sys.stdin:
            try:
                return input(self.user_label)
            except EOFError:
                return None
        self.stdout.write(self.user_label)
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
            self.notice("cut", budget=self.budget)
        elif fitted.dropped_messages:
            self.notice("dropped", dropped=fitted.dropped_messages)
        self.stdout.write(label)
        self.stdout.flush()
        parts = []
        for delta in self.engine.stream(fitted.ids, **self.generation):
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
        self.notice("ready", name=self.run.persona.name, run_dir=self.run.run_dir, adapter=self.run.adapter,
                    engine=self.engine.name,
                    exits=" / ".join(EXIT_COMMANDS), reset=RESET_COMMAND)
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
                self.notice("reset")
                continue
            self.reply(text, self.bot_label)


def transcript_labels(cfg: DictConfig, persona: DictConfig) -> tuple[str, str]:
    """(user_label, bot_label): the command line's, else the persona's, else "You: " / "<name>: "."""
    user = cfg.get("user_label") or persona.get("user_label") or "You: "
    bot = cfg.get("bot_label") or persona.get("bot_label") or f"{persona.name}: "
    return str(user), str(bot)


def chat(cfg: DictConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None, run=None) -> None:
    """Run the chat app for a composed conf/chat.yaml: one-shot with `prompt`, else interactive.

    run: an already loaded `LoadedRun` to talk to instead of loading cfg.run_dir (tests, notebooks).
    """
    from lyra.engines import check_engine_keys, open_app_engine
    from lyra.runs import run_dir_path

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise UserError("run_dir", "is required: python -m lyra.chat run_dir=<training output dir>")
    run_dir_path(cfg.run_dir)  # before anything slow: a wrong path is the most common mistake
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    check_generation(generation)
    check_engine_keys(cfg)
    if not (isinstance(cfg.max_prompt_tokens, int) and cfg.max_prompt_tokens >= 16):
        raise UserError("max_prompt_tokens", f"must be an integer >= 16, got {cfg.max_prompt_tokens}")
    run, _, engine = open_app_engine(
        cfg, n_ctx=cfg.max_prompt_tokens + (generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), run=run)
    session = ChatSession(run, cfg, stdin, stdout, stderr, engine=engine)
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
    """Quote free-text overrides such as `prompt=你好，請問：今天呢？`, which Hydra's grammar rejects unquoted.

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


# stdout is the transcript; keep stderr quiet too. Ctrl-C and Ctrl-D end the session quietly.
@hydra_app("chat", log_level=logging.WARNING, quiet_exceptions=(KeyboardInterrupt, EOFError))
def main(cfg: DictConfig) -> None:
    chat(cfg)


if __name__ == "__main__":
    sys.argv = quote_text_overrides(sys.argv)
    main()
