"""Path helpers that keep Hydra jobs honest: user paths resolve against the launch directory,
and job outputs land in the job's own output dir, never the cwd.

Config files name files shipped inside the package with `${lyra.asset:NAME}` (e.g. a persona's
corpus in lyra/data/assets); importing `lyra` registers that resolver.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSET_RESOLVER = "lyra.asset"


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
