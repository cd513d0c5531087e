"""User-facing errors: one line that names the config key to change, exit code 2, no traceback.

Every CLI entrypoint wraps its work in `exit_on_user_error`, so a bad value or a missing file is
reported as `lyra: error: <key>: <what is wrong and the allowed range>`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem the user fixes by changing a config value or an input file."""

    def __init__(self, key: str | None, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a UserError into one stderr line and exit code 2."""
    try:
        yield
    except UserError as error:
        print(f"lyra: error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
