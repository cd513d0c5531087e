"""What every lyra command line shares: logging to stderr, one-line errors, and the Hydra entry point.

    from lyra.cli import hydra_app

    @hydra_app("chat", log_level=logging.WARNING)
    def main(cfg: DictConfig) -> None:
        chat(cfg)

`hydra_app(config_name)` composes `lyra/conf/<config_name>.yaml` (plus any `--config-dir`), turns on
`configure_cli_logging`, and runs the body under `exit_on_user_error`, so a bad value is one line and
exit code 2. Library modules never import this one: it belongs to the apps (chat, web, serve,
evaluate, export) and to `lyra.train`'s entry point.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from lyra.errors import exit_on_user_error
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
        def main(cfg) -> None:
            configure_cli_logging(log_level)
            with exit_on_user_error():
                try:
                    body(cfg)
                except quiet_exceptions:
                    print(flush=True)

        return main

    return decorate
