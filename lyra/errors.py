"""User-facing errors: one line that names the config key to change, exit code 2, no traceback.

Every CLI entrypoint wraps its work in `exit_on_user_error`, so a bad value or a missing file is
reported as `lyra: error: <key>: <what is wrong and the allowed range>`. A crash during or after
training that left the adapter on disk is a `RunFailed`: one line naming what failed and where the
weights are, exit code 1 (the traceback goes to the run's failure.log).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

USER_ERROR_EXIT_CODE = 2
RUN_FAILED_EXIT_CODE = 1


class UserError(Exception):
    """A problem the user fixes by changing a config value or an input file."""

    def __init__(self, key: str | None, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class RunFailed(Exception):
    """A crash the run survived with its weights saved: one line says what failed and where they are."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a UserError into one stderr line and exit code 2, a RunFailed into one line and exit code 1."""
    try:
        yield
    except UserError as error:
        print(f"lyra: error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except RunFailed as error:
        print(f"lyra: error: {error}", file=sys.stderr, flush=True)
        sys.exit(RUN_FAILED_EXIT_CODE)
