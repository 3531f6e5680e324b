"""Shard lists from config: local paths, brace patterns (`train-{0000..0007}.tar`), globs, directories
(every `*.tar` inside, recursively), lists of those, or `::`-joined strings; remote URLs pass through untouched."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import braceexpand

_REMOTE = ("http://", "https://", "s3://", "gs://", "pipe:", "hf://")


def expand_shards(spec: str | Sequence[str], what: str = "shards") -> list[str]:
    """All shard paths of `spec`, in order; a one-line error naming `what` if a local one is missing."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            for url in braceexpand.braceexpand(part):
                if url.startswith(_REMOTE):
                    out.append(url)
                elif os.path.isdir(url):
                    found = sorted(glob.glob(os.path.join(url, "**", "*.tar"), recursive=True))
                    if not found:
                        raise ValueError(f"{what}: directory {url!r} holds no .tar shards")
                    out.extend(found)
                elif any(c in url for c in "*?["):
                    found = sorted(glob.glob(url))
                    if not found:
                        raise ValueError(f"{what}: no shards match {url!r}")
                    out.extend(found)
                elif os.path.isfile(url):
                    out.append(url)
                else:
                    raise ValueError(f"{what}: no shard at {url!r}")
    if not out:
        raise ValueError(f"{what}: the shard list is empty")
    return out
