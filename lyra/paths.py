"""Path helpers that keep Hydra jobs honest: user paths resolve against the launch directory,
and job outputs land in the job's own output dir, never the cwd.

Config files name files shipped inside the package with `${lyra.asset:NAME}` (e.g. a persona's
corpus in lyra/data/assets); importing `lyra` registers that resolver.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSET_RESOLVER = "lyra.asset"
# The one place that knows where the shipped configs live (inside the package, so a wheel carries them).
CONF_DIR = Path(__file__).resolve().parent / "conf"


def resolve_user_path(path: str | Path) -> Path:
    """A user-given path, relative to where the user launched (not the job's dir)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path

    path = Path(path).expanduser()
    if HydraConfig.initialized():
        return Path(to_absolute_path(str(path)))
    return path.resolve()


def asset_path(name: str) -> str:
    """The absolute path of a file shipped in lyra/data/assets (what `${lyra.asset:NAME}` resolves to)."""
    return str(resources.files("lyra.data") / "assets" / str(name))


def register_resolvers() -> None:
    """Make `${lyra.asset:NAME}` resolvable in every config lyra composes or loads."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(ASSET_RESOLVER):
        OmegaConf.register_new_resolver(ASSET_RESOLVER, asset_path)


def compose_config(config_name: str = "train", overrides: list[str] | None = None,
                   return_hydra_config: bool = False):
    """Compose a shipped config outside `@hydra.main` (scripts, stats, tests): the same groups and
    defaults the CLI would use, with `overrides` as on the command line. Hydra's global state is
    cleared before and after, so it never leaks into a later `@hydra.main` or compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()  # the persona files use ${lyra.asset:...}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides or []),
                           return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()
