"""Keeping secrets out of everything a run writes: saved config, metrics, logs, W&B config.

A secret is the value of `WANDB_API_KEY`, `HF_TOKEN`, `LYRA_WEB_AUTH`, `LYRA_API_KEY`, or any
environment variable whose name looks like a credential (`*TOKEN*`, `*KEY*`, `*SECRET*`, `*PASSWORD*`,
...), the password part of each `user:password` line in `LYRA_WEB_AUTH`, and any value registered with
`register_secret` (the web page's passwords from `auth=` or `auth_file=`, lyra.serve's `api_key=`
given on the command line). Such values reach a
config through `${oc.env:HF_TOKEN}` interpolation or a shell-expanded override; lyra masks them as
`***` wherever it writes:

    scrub(OmegaConf.to_container(cfg, resolve=True))   # any nested dict/list/str
    scrub_config(cfg)                                  # a resolved, masked copy of a DictConfig
    protect_run(run_dir)                               # log records + the run's .hydra/*.yaml

The values are read from the environment at the moment of writing, so a token exported after
start-up is covered too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

MASK = "***"
ALWAYS_SECRET = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "LYRA_WEB_AUTH")
# Variables holding `user:password` lines: the password alone is masked too (a log may quote it alone).
USER_PASSWORD_VARS = ("LYRA_WEB_AUTH",)
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Shorter values (TOKENIZERS_PARALLELISM=false, SOME_KEY=1) are flags, and masking them would
# shred unrelated text; no real credential is this short.
MIN_SECRET_LENGTH = 8


_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask `value` in this process from now on: a secret that came from a file or an override, not the
    env (web passwords, lyra.serve's api_key=). Both refuse secrets shorter than MIN_SECRET_LENGTH, the
    shortest value masked."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _registered.add(str(value))


def is_secret_name(name: str) -> bool:
    return name.upper() in ALWAYS_SECRET or bool(SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Secret values in the environment (and, for this process's own, the registered ones), longest
    first so a value containing another is masked whole."""
    registered = _registered if environ is None else set()
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items() if is_secret_name(name) and len(value) >= MIN_SECRET_LENGTH}
    for name in USER_PASSWORD_VARS:
        for line in environ.get(name, "").splitlines():
            password = line.partition(":")[2].strip()
            if len(password) >= MIN_SECRET_LENGTH:
                values.add(password)
    return sorted(values | registered, key=len, reverse=True)


def scrub_text(text: str, secrets: list[str] | None = None) -> str:
    for secret in secret_values() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of `value` (nested dicts, lists, strings) with every secret value masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, Mapping):
        return {scrub(key, secrets): scrub(item, secrets) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(item, secrets) for item in value)
    return value


def scrub_config(cfg: DictConfig) -> DictConfig:
    """The resolved config with secrets masked: what resolved_config.yaml and W&B may see."""
    return OmegaConf.create(scrub(OmegaConf.to_container(cfg, resolve=True)))


_factory_installed = False


def install_log_scrubber() -> None:
    """Mask secrets in every log record, whichever logger or handler (console, train.log) gets it.

    A record factory rather than a handler filter: Hydra, transformers and W&B each attach their
    own handlers, and a factory sees every record before any of them.
    """
    global _factory_installed
    if _factory_installed:
        return
    make_record = logging.getLogRecordFactory()

    def scrubbed_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        secrets = secret_values()
        if secrets:
            message = record.getMessage()
            clean = scrub_text(message, secrets)
            if clean != message:
                record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(scrubbed_record)
    _factory_installed = True


def scrub_files(directory: Path) -> None:
    """Rewrite the text files in `directory` with secrets masked (Hydra's .hydra/*.yaml hold the
    overrides as typed, so a shell-expanded `+model.token=$HF_TOKEN` would land there)."""
    if not directory.is_dir():
        return
    secrets = secret_values()
    for path in directory.iterdir():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        clean = scrub_text(text, secrets)
        if clean != text:
            path.write_text(clean, encoding="utf-8")


def protect_run(run_dir: Path) -> None:
    """Everything secret-related a job needs at start: masked logs and masked Hydra records."""
    install_log_scrubber()
    scrub_files(run_dir / ".hydra")
