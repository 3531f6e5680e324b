"""Streaming data for CoLoGen: one shard format, on-the-fly task builders, and a mixture DataModule.

See `docs/data.md` for the shard format, the builders and the batch every training step receives.
Names are imported lazily, so tools that only read shards do not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TASKS": "cologen.data.tasks",
    "check_task": "cologen.data.tasks",
    "BuilderConfig": "cologen.data.builders",
    "TaskBuilder": "cologen.data.builders",
    "collate": "cologen.data.collate",
    "MixtureDataModule": "cologen.data.datamodule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cologen.data' has no attribute {name!r}")
