"""Reading cologen checkpoints, with one clear error for anything that is not one.

A Lightning checkpoint is a zip archive written by `torch.save`, with a CRC-32 per record: `verify` reads every
record once and checks it, so a truncated or bit-flipped file is refused instead of loading damaged weights.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from cologen.errors import MissingInput, UsageError, one_line


class NotACheckpoint(UsageError):
    """`PATH is not a cologen checkpoint (why)`."""

    def __init__(self, path: str | Path, why: str):
        super().__init__(f"{path} is not a cologen checkpoint ({why})")


class MissingCheckpoint(NotACheckpoint, MissingInput):
    pass


def verify(path: str | Path) -> None:
    """Raise NotACheckpoint unless `path` is a complete torch archive whose records all pass their CRC check."""
    p = Path(path)
    if not p.exists():
        raise MissingCheckpoint(path, "the file does not exist")
    if p.is_dir():
        inside = sorted(x.name for x in p.glob("*.ckpt"))
        hint = f": give a file inside it, e.g. {p / ('last.ckpt' if 'last.ckpt' in inside else inside[0])}" \
            if inside else ""
        raise NotACheckpoint(path, f"it is a directory{hint}")
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except zipfile.BadZipFile:
        size = p.stat().st_size
        what = "an empty file" if size == 0 else "not a torch archive: truncated, or another kind of file"
        raise NotACheckpoint(path, what) from None
    except (OSError, EOFError, RuntimeError) as err:  # unreadable, or a corrupt header
        raise NotACheckpoint(path, f"unreadable: {one_line(err)}") from None
    if bad is not None:
        raise NotACheckpoint(path, f"corrupt: record {bad} fails its CRC check")
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise NotACheckpoint(path, "a zip archive, but not one written by torch.save")


def load(path: str | Path, *, check: bool = True, weights_only: bool = False, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict of a cologen checkpoint (verified first unless `check` is False)."""
    import torch

    if check:
        verify(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - whatever torch says, the file is not usable
        raise NotACheckpoint(path, f"torch.load failed: {one_line(err)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise NotACheckpoint(path, "no state_dict: written by another program")
    if "cologen" not in ckpt:
        raise NotACheckpoint(path, "no 'cologen' section: not written by cologen's training")
    return ckpt


def check(path: str | Path) -> dict[str, Any]:
    """Verify `path` and return its metadata (everything but the tensors are memory-mapped, so it is cheap)."""
    return load(path, weights_only=True, mmap=True)


def curriculum_state(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The CurriculumCallback's saved position (`index`, `done`, `spec`), if the checkpoint has one."""
    return next((v for k, v in (ckpt.get("callbacks") or {}).items() if str(k).startswith("CurriculumCallback")),
                None)
