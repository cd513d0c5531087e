"""What every lyra command line shares: logging to stderr, one-line errors, and the Hydra entry point.

    from lyra.cli import hydra_app

    @hydra_app("chat", log_level=logging.WARNING)
    def main(cfg: DictConfig) -> None:
        chat(cfg)

`hydra_app(config_name)` composes `lyra/conf/<config_name>.yaml` (plus any `--config-dir`), turns on
`configure_cli_logging`, and runs the body under `exit_on_user_error`, so a bad value is one line and
exit code 2. Hydra's own composition errors are put in the same voice (`hydra_errors_in_lyra_voice`):
`lora.use_dora=true` is not a key of conf/lora/*.yaml but a `peft.LoraConfig` option, so the line says
to add it as `+lora.use_dora=true`; any other unknown key gets the nearest known one; an unknown group
option lists the options. Library modules never import this one: it belongs to the apps (chat, web,
serve, evaluate, export) and to `lyra.train`'s entry point.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator

from lyra.errors import USER_ERROR_EXIT_CODE, exit_on_user_error
from lyra.paths import CONF_DIR


def configure_cli_logging(level: int = logging.INFO) -> None:
    """Log lyra's messages to stderr (stdout carries the command's output); silence library chatter.

    The lyra apps run with Hydra's job logging off so they never write log files into the cwd.
    """
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations are not the user's concern
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lyra").setLevel(level)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def hydra_app(config_name: str, log_level: int = logging.INFO,
              quiet_exceptions: tuple[type[BaseException], ...] = ()) -> Callable:
    """Decorate an app's `main(cfg)`: Hydra composes `conf/<config_name>.yaml`, errors are one line.

    quiet_exceptions: ends the app quietly (a newline, exit 0), e.g. Ctrl-C or EOF in the chat loop.
    """
    import hydra

    def decorate(body: Callable) -> Callable:
        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
        @functools.wraps(body)
        def hydra_main(cfg) -> None:
            configure_cli_logging(log_level)
            with exit_on_user_error():
                try:
                    body(cfg)
                except quiet_exceptions:
                    print(flush=True)

        @functools.wraps(body)
        def main() -> None:
            with hydra_errors_in_lyra_voice(config_name):
                hydra_main()

        return main

    return decorate


# ---------------------------------------------------------------- Hydra's errors, in lyra's voice

def _dataclass_fields(cls) -> set[str]:
    import dataclasses

    return {field.name for field in dataclasses.fields(cls)}


def _init_parameters(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs", "args"}


def _lora_options() -> set[str]:
    from peft import LoraConfig

    return _dataclass_fields(LoraConfig)


def _training_options() -> set[str]:
    from transformers import TrainingArguments

    return _dataclass_fields(TrainingArguments)


def _quantization_options() -> set[str]:
    from transformers import BitsAndBytesConfig

    return _init_parameters(BitsAndBytesConfig)


def _generation_options() -> set[str]:
    from transformers import GenerationConfig

    return set(GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}


# A group's keys are the kwargs of the object it builds; a kwarg its YAML does not list is still valid
# with Hydra's `+` (append) form. {config node: (the object, its kwargs)}
BUILT_OBJECTS: dict[str, tuple[str, Callable[[], set[str]]]] = {
    "lora": ("peft.LoraConfig", _lora_options),
    "trainer": ("transformers.TrainingArguments", _training_options),
    "quantization": ("transformers.BitsAndBytesConfig", _quantization_options),
    "generation": ("transformers.GenerationConfig", _generation_options),
    "eval.generation": ("transformers.GenerationConfig", _generation_options),
}


def _known_keys(config_name: str, node: str) -> list[str]:
    """The keys of `node` in the shipped config as composed without overrides (for a suggestion)."""
    from omegaconf import OmegaConf

    from lyra.paths import compose_config

    try:
        cfg = compose_config(config_name)
    except Exception:  # a broken shipped config must not hide the user's error behind another one
        return []
    if not node:
        return [str(key) for key in cfg]
    selected = OmegaConf.select(cfg, node)
    return [str(key) for key in selected] if OmegaConf.is_dict(selected) else []


def unknown_key_message(config_name: str, full_key: str, value: str | None) -> str:
    """One line for an override of a key no config file sets: the `+` form for a real kwarg, else the nearest key."""
    node, _, leaf = full_key.rpartition(".")
    built = BUILT_OBJECTS.get(node)
    if built is not None:
        with contextlib.suppress(ImportError):
            if leaf in built[1]():
                shown = f"{full_key}={value}" if value is not None else full_key
                return (f"{full_key}: not set by the config files, but a {built[0]} option: "
                        f"add it with +{shown}")
    known = _known_keys(config_name, node)
    nearest = difflib.get_close_matches(leaf, known, n=1, cutoff=0.5)
    if nearest:
        return f"{full_key}: no such key; did you mean {f'{node}.' if node else ''}{nearest[0]}?"
    where = (f"{f'`{node}` has' if node else 'top-level keys'}: {', '.join(known)}" if known
             else "see `python -m lyra.train --cfg job`")
    return f"{full_key}: no such key ({where})"


def _override_value(full_key: str) -> str | None:
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == full_key:
            return value
    return None


def lyra_voice(config_name: str, error: BaseException) -> str | None:
    """One line for a Hydra composition error, or None when it is not one lyra knows how to say."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    text = "\n".join(str(e) for e in (error, error.__cause__) if e is not None)
    if isinstance(error, MissingConfigException) or "Could not find '" in text:
        missing = re.search(r"Could not (?:find|load) '([^']+)'", text)
        options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
        if missing:
            group, _, option = missing.group(1).rpartition("/")
            choices = ", ".join(line.strip() for line in options.group(2).splitlines()) if options else ""
            hint = f"; options: {choices}" if choices else ""
            return f"{group or option}={option if group else ''}: no such option{hint}".replace("=:", ":")
        return None
    if isinstance(error, OverrideParseException):
        return f"cannot parse an override: {str(error).splitlines()[0]}"
    if isinstance(error, ConfigCompositionException):
        struct = re.search(r"full_key: (\S+)", text)
        if struct and ("not in struct" in text or "Could not override" in text):
            full_key = struct.group(1)
            return unknown_key_message(config_name, full_key, _override_value(full_key))
        return str(error).splitlines()[0]
    return None


@contextlib.contextmanager
def hydra_errors_in_lyra_voice(config_name: str) -> Iterator[None]:
    """Around a `@hydra.main` call: a composition error is one `lyra: error:` line and exit code 2.

    Hydra prints its errors itself unless HYDRA_FULL_ERROR is set, so it is set for the call and the
    error is caught here; an error lyra does not recognise is re-raised whole (a full traceback).
    """
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as error:
        message = lyra_voice(config_name, error)
        if message is None:
            raise
        print(f"lyra: error: {message}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
