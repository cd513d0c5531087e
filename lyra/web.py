"""A web chat page for a trained persona (Gradio), with the base model beside it for comparison.

    pip install -e '.[web]'
    python -m lyra.web run_dir=outputs/2026-01-01/12-00-00          # http://127.0.0.1:7860
    python -m lyra.web run_dir=R server_port=8080 generation.temperature=0.3
    LYRA_WEB_AUTH=ana:long-password python -m lyra.web run_dir=R server_name=0.0.0.0   # your network, with a login
    python -m lyra.web run_dir=R server_name=0.0.0.0 auth_file=users.txt             # user:password lines

The page is titled with the run's persona name (from its resolved_config.yaml; `title=` overrides
it) and streams the replies through the terminal chat's own path (lyra.generation's fitted prompt
and cancellable streamer, the run's system prompt, think blocks removed), keeps a multi-turn history, has sliders for
temperature / top_p / max_new_tokens, a reset, and an "adapter off" comparison that answers the
same message with the base model (`LoadedRun.adapter_disabled()` on the one shared model: PEFT's
`disable_adapter()`, or the exact base weights swapped back into a run merged for speed). `engine=`
picks who computes the persona's replies (lyra.engines: transformers, or the run's GGUF on llama.cpp);
the comparison always runs on transformers, since the GGUF holds only the merged persona.

One model instance serves everyone: Gradio's queue runs one generation at a time (every model
event shares one concurrency slot) and `WebChat.lock` guards the model, so a comparison never
flips the adapter off under someone else's reply. Inputs are bounded (`max_input_chars`,
`max_prompt_tokens`, `max_new_tokens_limit`, `max_queue_size`).

A page reachable beyond this machine (`server_name` other than 127.0.0.1/localhost/::1, or
`share=true`) needs a login: without credentials it refuses to start (one line, exit 2, before the
model loads). Credentials (`auth=user:password`, else `auth_file=`, else the `LYRA_WEB_AUTH`
environment variable, one `user:password` per line) go to Gradio's own `auth`, so the page shows
its login form and the API answers only a client that logs in. Passwords are registered with
lyra.secrets, so no log line shows them; prefer the file or the variable (a command line is
visible to `ps`).

Programmatic use, from any machine that reaches the server:

    from gradio_client import Client
    Client("http://127.0.0.1:7860/").predict("Hello", [], api_name="/chat")   # -> reply text
    Client(url, auth=("ana", "long-password")).predict(...)                   # a page with a login

Gradio never phones home from here: analytics and its version check are off, `share` is false by
default, and the page loads no fonts or scripts from the web.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lyra.cli import hydra_app
from lyra.errors import UserError
from lyra.network import check_port_free, is_loopback

log = logging.getLogger(__name__)

INSTALL_HINT = "the web page needs Gradio: pip install -e '.[web]'"
EMPTY_REPLY = "*(empty reply: the model stopped without writing any text)*"  # shown, never fed back


def require_gradio():
    """Import gradio with its telemetry off, or stop with the one line that says what to install."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no analytics and no version check over the network
    try:
        import gradio
    except ImportError:
        raise UserError(None, INSTALL_HINT) from None
    return gradio


# ---------------------------------------------------------------- page settings

AUTH_ENV = "LYRA_WEB_AUTH"


def parse_credentials(text: str, key: str | None, source: str | None = None) -> list[tuple[str, str]]:
    """`user:password` lines (blank lines and # comments skipped) as Gradio's auth list.

    Errors name the line, never the password. Each password is registered with lyra.secrets so a
    log line quoting it is masked; one shorter than the masking minimum is refused.
    """
    from lyra.secrets import MIN_SECRET_LENGTH, register_secret

    credentials: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        user = user.strip()
        where = f"{source} line {number}: " if source else ""
        if not colon or not user or any(c.isspace() for c in user):
            raise UserError(key, f"{where}must be user:password")
        if len(password) < MIN_SECRET_LENGTH:
            raise UserError(key, f"{where}the password of {user!r} is shorter than {MIN_SECRET_LENGTH} characters")
        if any(user == known for known, _ in credentials):
            raise UserError(key, f"{where}user {user!r} is given twice")
        register_secret(password)
        credentials.append((user, password))
    if not credentials:
        raise UserError(key, f"{source or 'it'} holds no user:password line")
    return credentials


def web_auth(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> list[tuple[str, str]] | None:
    """The page's logins, or None for an open page; an open page off loopback is refused (one line)."""
    from lyra.paths import resolve_user_path

    if cfg.auth is not None and cfg.auth_file is not None:
        raise UserError("auth", "give auth=user:password or auth_file=FILE, not both")
    credentials = None
    if cfg.auth is not None:
        credentials = parse_credentials(str(cfg.auth), "auth")
    elif cfg.auth_file is not None:
        path = resolve_user_path(cfg.auth_file)
        if not path.is_file():
            raise UserError("auth_file", f"no such file: {path}")
        credentials = parse_credentials(path.read_text(encoding="utf-8"), "auth_file", str(path))
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users of this machine: chmod 600 it", path)
    elif environ.get(AUTH_ENV):
        credentials = parse_credentials(environ[AUTH_ENV], None, AUTH_ENV)
    exposed = ("share=true puts the page on a public gradio.live link" if cfg.share else
               None if is_loopback(str(cfg.server_name)) else
               f"server_name={cfg.server_name} serves the page beyond this machine")
    if exposed and credentials is None:
        raise UserError("auth", f"{exposed}, so it needs a login: set {AUTH_ENV}=user:password, or give "
                                "auth_file=FILE (user:password lines) or auth=user:password")
    return credentials


@dataclass(frozen=True)
class Limits:
    max_input_chars: int
    max_prompt_tokens: int
    max_new_tokens_limit: int
    max_queue_size: int


def check_web_config(cfg: DictConfig) -> Limits:
    """One line naming the bad key, before the model is loaded."""
    from lyra.engines import check_engine_keys
    from lyra.generation import check_generation

    if OmegaConf.is_missing(cfg, "run_dir"):
        raise UserError("run_dir", "is required: python -m lyra.web run_dir=<training output dir>")
    limits = Limits(cfg.max_input_chars, cfg.max_prompt_tokens, cfg.max_new_tokens_limit, cfg.max_queue_size)
    for key, low in (("max_input_chars", 1), ("max_prompt_tokens", 16), ("max_new_tokens_limit", 1),
                     ("max_queue_size", 1)):
        value = getattr(limits, key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise UserError(key, f"must be an integer >= {low}, got {value}")
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    check_generation(generation)
    check_engine_keys(cfg)
    default_new = generation.get("max_new_tokens")
    if default_new is not None and default_new > limits.max_new_tokens_limit:
        raise UserError("generation.max_new_tokens", f"{default_new} is above max_new_tokens_limit "
                                                     f"({limits.max_new_tokens_limit}); raise the limit or lower it")
    port = cfg.server_port
    if port is not None and not (isinstance(port, int) and 0 < port < 65536):
        raise UserError("server_port", f"must be a TCP port (1-65535) or null, got {port}")
    if port is not None:
        check_port_free(cfg.server_name, port)
    return limits


def page_title(persona, title: str | None = None) -> str:
    """The page heading: `title` if set, else the run's persona name."""
    return str(title) if title else str(persona.name)


def run_summary(run_cfg: DictConfig, run_dir: Path, adapter: str) -> str:
    """One Markdown line saying what was trained: base, quantization, LoRA, steps, losses."""
    parts = [f"base `{Path(str(run_cfg.model.name_or_path)).name}`"]
    if run_cfg.quantization.get("load_in_4bit"):
        parts.append(f"4-bit {str(run_cfg.quantization.get('bnb_4bit_quant_type', '')).upper()}".strip())
    lora = run_cfg.get("lora")
    if lora is not None and adapter != "none":
        targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
        parts.append(f"LoRA r={lora.r} on {targets}")
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if "global_step" in metrics:
            parts.append(f"{metrics['global_step']} steps")
        for key in ("final_train_loss", "eval_loss"):
            if isinstance(metrics.get(key), (int, float)):
                parts.append(f"{key.replace('final_', '').replace('_', ' ')} {metrics[key]:.3f}")
    parts.append(f"adapter `{adapter}`")
    return " · ".join(parts)


# ---------------------------------------------------------------- the shared model

def message_text(content: Any) -> str:
    """Plain text of a Gradio message's content (a string, or a list of typed parts in Gradio 6)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text") or "")
    if isinstance(content, Sequence):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def plain_history(history: Sequence | None) -> list[dict[str, str]]:
    """Gradio chatbot messages as the chat API's {"role", "content"} messages."""
    messages = []
    for item in history or []:
        if isinstance(item, Mapping) and item.get("role") in ("user", "assistant", "system"):
            text = message_text(item.get("content"))
            messages.append({"role": item["role"], "content": "" if text == EMPTY_REPLY else text})
    return messages


class WebChat:
    """One loaded run shared by every visitor; `stream` yields a growing reply."""

    def __init__(self, run, generation: Mapping[str, Any], limits: Limits, engine=None):
        from lyra.engines import TransformersEngine

        self.run = run
        self.base_engine = TransformersEngine(run)  # "adapter off": the loaded model, its adapter switched off
        self.engine = engine or self.base_engine
        self.generation = dict(generation)
        self.limits = limits
        self.lock = threading.Lock()
        self.has_adapter = run.has_adapter

    def settings(self, temperature=None, top_p=None, max_new_tokens=None) -> dict[str, Any]:
        """The generation group with the page's slider values on top, checked like the config."""
        from lyra.generation import check_generation

        settings = dict(self.generation)
        if temperature is not None:
            settings["do_sample"] = temperature > 0  # the slider's 0 means greedy, as in the config
        for key, value in (("temperature", temperature), ("top_p", top_p), ("max_new_tokens", max_new_tokens)):
            if value is not None:
                settings[key] = value
        if settings.get("max_new_tokens") is not None:
            settings["max_new_tokens"] = int(settings["max_new_tokens"])
            if not 1 <= settings["max_new_tokens"] <= self.limits.max_new_tokens_limit:
                raise UserError("max_new_tokens", f"must be in [1, {self.limits.max_new_tokens_limit}], "
                                                  f"got {settings['max_new_tokens']}")
        check_generation(settings, key="generation")
        return settings

    def check_message(self, message: str) -> str:
        message = (message or "").strip()
        if not message:
            raise UserError("message", "is empty")
        if len(message) > self.limits.max_input_chars:
            raise UserError("message", f"{len(message)} characters is over the limit of "
                                       f"{self.limits.max_input_chars} (max_input_chars)")
        return message

    def _adapter(self, enabled: bool):
        if enabled or not self.has_adapter:
            return contextlib.nullcontext()
        return self.run.adapter_disabled()  # PEFT's disable_adapter(), or the merged run's base weights

    def stream(self, message: str, history: Sequence | None = None, adapter: bool = True,
               notify: Callable[[str], Any] | None = None, **generation) -> Iterator[str]:
        """Yield the clean reply so far, token by token; the last value is the whole reply.

        Generation runs in a worker thread that holds the model lock for the whole reply; closing
        this generator (Stop, Reset) stops that worker at its next token.
        """
        from lyra.generation import DEFAULT_MAX_NEW_TOKENS, context_budget, fit_prompt

        message = self.check_message(message)
        settings = self.settings(**generation)
        model, tokenizer, system_prompt = self.run.model, self.run.tokenizer, self.run.system_prompt
        budget = context_budget(model, settings.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS, self.limits.max_prompt_tokens)
        fitted = fit_prompt(message, tokenizer, plain_history(history), system_prompt, budget)
        if notify and (fitted.dropped_messages or fitted.cut):
            notify(f"Over {budget} prompt tokens (max_prompt_tokens): " + (
                "the message was cut" if fitted.cut else f"the oldest {fitted.dropped_messages} messages are left out"))

        @contextlib.contextmanager
        def model_for_this_reply():  # the lock for the whole reply: a comparison never flips another's adapter
            with self.lock, self._adapter(adapter):
                yield

        shown = None
        engine = self.engine if adapter else self.base_engine
        for delta in engine.stream(fitted.ids, guard=model_for_this_reply, **settings):
            shown = (shown or "") + delta
            yield shown
        if shown is None:  # an empty reply still ends the stream with a value (the page shows EMPTY_REPLY)
            yield ""

    def reply(self, message: str, history: Sequence | None = None, adapter: bool = True, **generation) -> str:
        text = ""
        for text in self.stream(message, history, adapter, **generation):
            pass
        return text


# ---------------------------------------------------------------- the page

@contextlib.contextmanager
def shown_on_page(gr) -> Iterator[None]:
    """A UserError (bad slider value, message too long) becomes Gradio's error toast / API error."""
    try:
        yield
    except UserError as error:
        raise gr.Error(str(error)) from None


def build_page(chat: WebChat, title: str, gr):
    """The Gradio Blocks page; queue it and launch it (see `serve`)."""
    from lyra.generation import DEFAULT_MAX_NEW_TOKENS

    run, limits = chat.run, chat.limits
    defaults = chat.settings()
    greedy = not defaults.get("do_sample", True) or defaults.get("temperature") == 0
    model_events = {"concurrency_id": "model", "concurrency_limit": 1}  # one generation at a time, UI and API

    with gr.Blocks(title=f"{title} · lyra", analytics_enabled=False, fill_height=True) as page:
        gr.Markdown(f"# {title}\n{run_summary(run.cfg, run.run_dir, run.adapter)}", elem_id="lyra-header")
        with gr.Accordion("Persona: the run's system prompt", open=False):
            gr.Markdown(run.system_prompt or "*(no system prompt)*", elem_id="lyra-system-prompt")
        with gr.Row(equal_height=True):
            with gr.Column():
                lyra_chat = gr.Chatbot(label=f"{title} (adapter on)", elem_id="lyra-chat", height=460,
                                       placeholder=f"**{title}** is listening.", buttons=["copy"])
            with gr.Column(visible=False) as base_column:
                base_chat = gr.Chatbot(label="Base model (adapter off)", elem_id="lyra-base-chat", height=460,
                                       buttons=["copy"])
        with gr.Row():
            textbox = gr.Textbox(placeholder=f"Message {title}… (Enter to send)", show_label=False, scale=8,
                                 max_length=limits.max_input_chars, autofocus=True, elem_id="lyra-input")
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="lyra-send")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="lyra-stop")
            reset = gr.Button("Reset", scale=1, min_width=80, elem_id="lyra-reset")
        with gr.Accordion("Generation", open=True):
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0 if greedy else defaults.get("temperature", 0.7), step=0.05,
                                        label="temperature", info="0 = greedy; higher = more varied")
                top_p = gr.Slider(0.05, 1, value=defaults.get("top_p") or 1.0, step=0.05, label="top_p",
                                  info="nucleus sampling: drops the unlikely tail")
                max_new_tokens = gr.Slider(1, limits.max_new_tokens_limit, step=1, label="max_new_tokens",
                                           value=min(defaults.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
                                                     limits.max_new_tokens_limit),
                                           info="reply length cap: longer answers vs. waiting")
            compare = gr.Checkbox(value=False, interactive=chat.has_adapter, elem_id="lyra-compare",
                                  label="Compare with the base model (adapter off): the same message, answered "
                                        "without the fine-tuning" if chat.has_adapter else
                                        "Compare with the base model: this page was started with adapter=none")
        pending = gr.State("")

        def input_enabled(enabled: bool, clear: bool = False):
            """Input is locked while a reply streams: a second message would race the first one's panes."""
            textbox_update = gr.Textbox(value="", interactive=enabled) if clear else gr.Textbox(interactive=enabled)
            return textbox_update, gr.Button(interactive=enabled)

        def add_message(message: str, history: list, base_history: list, compare_on: bool):
            with shown_on_page(gr):
                message = chat.check_message(message)
            turn = {"role": "user", "content": message}
            base_history = [*base_history, turn] if compare_on else base_history
            return *input_enabled(False, clear=True), [*history, turn], base_history, message

        def respond(message: str, history: list, base_history: list, compare_on: bool,
                    temperature_value: float, top_p_value: float, max_new: float):
            settings = {"temperature": temperature_value, "top_p": top_p_value, "max_new_tokens": int(max_new)}
            panes = [(history, True)] + ([(base_history, False)] if compare_on and chat.has_adapter else [])
            with shown_on_page(gr):
                for pane, adapter_on in panes:
                    prior = pane[:-1]  # the pane ends with this message, added by add_message
                    pane.append({"role": "assistant", "content": ""})
                    for text in chat.stream(message, prior, adapter=adapter_on, notify=gr.Info, **settings):
                        pane[-1] = {"role": "assistant", "content": text or EMPTY_REPLY}
                        yield history, base_history

        private = {"api_visibility": "private"}  # the page's own events; programs use /chat
        sent = []
        for trigger in (textbox.submit, send.click):
            reply_event = trigger(add_message, [textbox, lyra_chat, base_chat, compare],
                                  [textbox, send, lyra_chat, base_chat, pending], queue=False, **private).success(
                respond, [pending, lyra_chat, base_chat, compare, temperature, top_p, max_new_tokens],
                [lyra_chat, base_chat], **model_events, **private)
            reply_event.then(lambda: input_enabled(True), None, [textbox, send], queue=False, **private)
            sent.append(reply_event)
        stop.click(lambda: input_enabled(True), None, [textbox, send], cancels=sent, queue=False, **private)
        reset.click(lambda: ([], [], *input_enabled(True, clear=True)), None, [lyra_chat, base_chat, textbox, send],
                    cancels=sent, queue=False, **private)
        compare.change(lambda on: gr.Column(visible=on), compare, base_column, queue=False, **private)

        def chat_api(message: str, history: list[dict] | None = None, temperature: float | None = None,
                     top_p: float | None = None, max_new_tokens: int | None = None,
                     adapter: bool = True) -> Iterator[str]:
            """The persona's reply to `message` after `history` ([{"role", "content"}...]), streamed as it grows.
            adapter=False answers with the base model. Unset knobs use the server's generation config."""
            with shown_on_page(gr):
                yield from chat.stream(message, history, adapter=adapter, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens)

        gr.api(chat_api, api_name="chat", **model_events)
    return page


def serve(cfg: DictConfig) -> None:
    """Load the run and serve its page until Ctrl-C."""
    from lyra.engines import open_app_engine
    from lyra.secrets import install_log_scrubber

    gr = require_gradio()
    auth = web_auth(cfg)  # first: an exposed page without a login never loads anything
    install_log_scrubber()  # the passwords web_auth registered are masked in every log record
    limits = check_web_config(cfg)
    run, generation, engine = open_app_engine(cfg, n_ctx=limits.max_prompt_tokens + limits.max_new_tokens_limit)
    chat = WebChat(run, generation, limits, engine=engine)
    if engine is not chat.base_engine and run.has_adapter:
        log.info("engine: the persona on %s; the adapter-off comparison runs on transformers (the GGUF holds "
                 "only the persona)", engine.name)
    page = build_page(chat, page_title(run.persona, cfg.title), gr)
    page.queue(max_size=limits.max_queue_size, default_concurrency_limit=1)
    page.launch(server_name=cfg.server_name, server_port=cfg.server_port, share=cfg.share, ssr_mode=False,
                show_error=True, mcp_server=False, auth=auth)


@hydra_app("web")
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
