"""Shard manifests, and the one writer that writes a shard together with its manifest.

A tar cut at a header or at a member boundary reads as a valid, shorter archive, so a reader cannot tell a
truncated shard from a short one by reading it. Every shard this project writes therefore gets a manifest beside
it, `{shard}.tar.json`, in the format of webdataset's `wids` shard index (`wids-shard-index-v1`: a `shardlist` of
`{url, nsamples, filesize}`; the url is relative to the manifest, so a folder can be moved), with two more
fields per entry: `sha256` of the tar file and `keys`, its sample keys in order. The loader compares what it read
with `nsamples`; `python -m data_recipes.check` compares keys, size and hash.

No torch here: the converters import this without paying for it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

KIND = "wids-shard-index-v1"
SUFFIX = ".json"  # appended to the shard's name: train-0000.tar -> train-0000.tar.json


def manifest_path(url: str | os.PathLike) -> str:
    return f"{url}{SUFFIX}"


@dataclass(frozen=True)
class Manifest:
    """What a shard held when it was written."""

    url: str  # the shard's file name, relative to the manifest
    nsamples: int
    filesize: int
    sha256: str
    keys: tuple[str, ...]

    def to_json(self) -> str:
        entry = {"url": self.url, "nsamples": self.nsamples, "filesize": self.filesize, "sha256": self.sha256,
                 "keys": list(self.keys)}
        return json.dumps({"__kind__": KIND, "wids_version": 1, "name": Path(self.url).stem, "shardlist": [entry]})

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        """Parse a manifest; a one-line ValueError naming `where` when it is not one."""
        try:
            data = json.loads(text)
            if data.get("__kind__") != KIND or len(data["shardlist"]) != 1:
                raise ValueError(f"not a one-shard {KIND}")
            e = data["shardlist"][0]
            keys = tuple(str(k) for k in e["keys"])
            out = cls(str(e["url"]), int(e["nsamples"]), int(e["filesize"]), str(e["sha256"]), keys)
        except (KeyError, TypeError, ValueError, AttributeError) as exn:
            raise ValueError(f"{where}: unreadable shard manifest ({exn})") from None
        if len(keys) != out.nsamples:
            raise ValueError(f"{where}: manifest lists {len(keys)} keys for {out.nsamples} samples")
        return out


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def read_manifest(url: str) -> Manifest | None:
    """The manifest beside a local shard; None when there is none (or the shard is remote)."""
    if not is_local(url):
        return None
    path = manifest_path(url)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return Manifest.from_json(f.read(), path)


def without_manifest(urls: Iterable[str]) -> list[str]:
    """The local shards among `urls` that have no manifest beside them."""
    return [u for u in urls if is_local(u) and not os.path.isfile(manifest_path(u))]


@functools.lru_cache(maxsize=4096)
def cached_manifest(url: str) -> Manifest | None:
    """`read_manifest`, once per process and shard: a resampled stream reopens the same shards over and over."""
    return read_manifest(url)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(path: str | os.PathLike, keys: Iterable[str]) -> Manifest:
    """The manifest of the shard file at `path`, whose samples have `keys` (in order)."""
    path = Path(path)
    return Manifest(path.name, len(keys := tuple(keys)), path.stat().st_size, file_sha256(path), keys)


def sample_key(member: str) -> str:
    """webdataset's rule: a member's key is its path up to the first dot of its base name."""
    slash = member.rfind("/")
    dot = member.find(".", slash + 1)
    return member if dot < 0 else member[:dot]


def keys_in_tar(path: str | os.PathLike) -> list[str]:
    """The sample keys of an existing tar, in order (tar errors propagate: a broken archive has no manifest)."""
    keys: list[str] = []
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            if info.isfile() and (not keys or sample_key(info.name) != keys[-1]):
                keys.append(sample_key(info.name))
    return keys


def write_manifest(shard: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `{shard}.json` atomically."""
    final = Path(manifest_path(shard))
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, final)
    return final


class ShardWriter:
    """Writes one webdataset shard to `{path}.tmp` and, on `close()`, renames it to `path` and writes its manifest.

    Members are written in the order given, with a fixed mtime and mode and the given owner names, so the same
    samples give byte-identical shards. A key written twice is a bug of the caller (ValueError). An empty shard
    is not kept (`close()` returns None).
    """

    def __init__(self, path: str | os.PathLike, user: str = "", group: str = "", mode: int = 0o444):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.user, self.group, self.mode = user, group, mode
        self.keys: list[str] = []
        self._seen: set[str] = set()
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)

    def write(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        """One sample: `(field, bytes)` pairs become members `{key}.{field}`."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample keys must be non-empty, without dots or slashes: {key!r}")
        if key in self._seen:
            raise ValueError(f"sample key {key!r} written twice to {self.path.name}")
        self._seen.add(key)
        self.keys.append(key)
        for name, data in members:
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, self.mode
            info.uname, info.gname = self.user, self.group
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> Manifest | None:
        self._tar.close()
        if not self.keys:
            self.tmp.unlink()
            self.path.unlink(missing_ok=True)
            Path(manifest_path(self.path)).unlink(missing_ok=True)
            return None
        os.replace(self.tmp, self.path)
        manifest = describe(self.path, self.keys)
        write_manifest(self.path, manifest)
        return manifest

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
