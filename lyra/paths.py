"""Path helpers that keep Hydra jobs honest: user paths resolve against the launch directory,
and job outputs land in the job's own output dir, never the cwd.
"""

from __future__ import annotations

from pathlib import Path


def resolve_user_path(path: str | Path) -> Path:
    """A user-given path, relative to where the user launched (not the job's dir)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path

    path = Path(path).expanduser()
    if HydraConfig.initialized():
        return Path(to_absolute_path(str(path)))
    return path.resolve()
