"""W&B for long runs: online when the user is logged in, offline otherwise, named and grouped by stage.

`RunWandbLogger` is Lightning's WandbLogger with two defaults a multi-day FLUX run wants: the mode follows the
machine (`WANDB_MODE` when set; else online with `WANDB_API_KEY` or a `wandb login` entry in ~/.netrc, offline
without, and W&B prints the `wandb sync` command at the end of an offline run), and the run's name and group come
from its folder (`runs/flux_dev/stage2` -> name `flux_dev/stage2`, group `flux_dev`), so the three stages of a
curriculum sit together in the project. Media are logged by rank 0 only, as every cologen callback does.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

WANDB_HOST = "api.wandb.ai"


def wandb_logged_in() -> bool:
    """An API key in the environment, or the entry `wandb login` writes to ~/.netrc (or $NETRC)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


def wandb_mode() -> str:
    """`WANDB_MODE` when the user set it, else online when logged in and offline when not."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def run_name(save_dir: str | os.PathLike) -> tuple[str, str]:
    """(name, group) of a run folder: its path below `runs/` (`flux_dev/stage2`) and that path's parent."""
    parts = Path(save_dir).parts
    below = parts[parts.index("runs") + 1:] if "runs" in parts else parts[-2:]
    name = "/".join(below) or Path(save_dir).name
    return name, "/".join(below[:-1]) or name


class RunWandbLogger(WandbLogger):
    """Args: as WandbLogger's; `name` and `group` default to the run folder's (`run_name`), `offline` to
    `wandb_mode()`."""

    def __init__(self, save_dir: str = ".", project: str = "cologen", name: str | None = None,
                 group: str | None = None, offline: bool | None = None, **kwargs):
        default_name, default_group = run_name(save_dir)
        offline = wandb_mode() == "offline" if offline is None else offline
        super().__init__(save_dir=save_dir, project=project, name=name or default_name,
                         group=group or default_group, offline=offline, **kwargs)
