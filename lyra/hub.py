"""Fail fast, in one line, when a base model can be neither found locally nor fetched.

    from lyra.hub import ensure_base_available
    ensure_base_available("Qwen/Qwen3-0.6B")   # a local dir, a cached hub id, or a reachable hub; else UserError

Without this, transformers retries an unreachable hub for about 50 s and then raises a 30-line
OSError. Here a hub id that is not in the local Hugging Face cache costs one TCP connect to the hub
endpoint (`HUB_CONNECT_TIMEOUT_S` at most) and, if that fails, one `lyra: error:` line that names
the ways out. `lyra.modeling.model_path` calls it, so training, chat, evaluate, export and web all
get the same line.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from urllib.parse import urlparse

from lyra.errors import UserError
from lyra.paths import resolve_user_path

HUB_CONNECT_TIMEOUT_S = 5.0  # long enough for a slow link, short enough to answer within 15 s
KEY = "model.name_or_path"


def _remedies(name: str) -> str:
    return (f"use model.name_or_path=/local/dir/of/{name.rsplit('/', 1)[-1]}, fill the Hugging Face cache "
            "(HF_HOME) on a machine with network and set HF_HUB_OFFLINE=1, or run experiment=smoke "
            "(the offline tiny model)")


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_unreachable() -> str | None:
    """Why the hub endpoint cannot be reached, or None when a TCP connection opens."""
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as error:  # DNS failure, refused, unreachable, timeout
        return f"{constants.ENDPOINT} is unreachable ({error.strerror or type(error).__name__})"
    return None


@functools.cache
def ensure_base_available(name_or_path: str) -> str:
    """`name_or_path` when it is a local directory, a cached hub id or a reachable hub id; else UserError."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return name_or_path
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise UserError(KEY, f"{resolve_user_path(name_or_path)} is not a directory (nor a Hugging Face hub id)")
    if _is_cached(name_or_path):
        return name_or_path
    if constants.HF_HUB_OFFLINE:
        raise UserError(KEY, f"{name_or_path} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                             f"downloading it; {_remedies(name_or_path)}")
    problem = _hub_unreachable()
    if problem:
        raise UserError(KEY, f"cannot fetch {name_or_path}: it is not in the Hugging Face cache and {problem}; "
                             f"{_remedies(name_or_path)}")
    return name_or_path
