"""Read shards sample by sample, one shard at a time, checking what a tar cannot say about itself.

webdataset's own stages do the reading (`url_opener` -> `tar_file_expander` -> `group_by_keys`). Around them, per
shard:

* a problem of the archive (unreadable, cut inside a member) is reported once and placed after the last complete
  member read (webdataset's iterator and its expander each call the handler for one cut);
* a sample with a member twice, and a key met again later in the shard, are reported (`duplicate`) and not
  delivered (a repeated key is delivered once, the first time);
* with a manifest (`manifest.py`), a shard that yields fewer samples than it lists is reported once
  (`truncated`; the archive error, if any, in the reason); without one, an archive error is reported (`tar`).

Problems go to `handler(BadSample)`, like webdataset's handlers: the loader's `SkipCounter` counts them, the
validator lists them. The loader and the validator read through this same class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from cologen.data.manifest import Manifest, cached_manifest
from cologen.data.records import BadSample, one_line

Handler = Callable[[BaseException], Any]


def archive_reason(exn: BaseException) -> str:
    """One line for a tar-level error (webdataset appends its stream and url objects to the arguments)."""
    if isinstance(exn, OSError) and exn.strerror:
        text = exn.strerror + (f": {exn.filename}" if exn.filename else "")
    else:
        text = str(exn.args[0]) if exn.args else ""
    return one_line(f"{type(exn).__name__}: {text.split(' @ ')[0]}" if text else type(exn).__name__)


@dataclass
class ShardRead:
    """What one read of a shard met (the validator compares it with the manifest)."""

    url: str
    manifest: Manifest | None
    keys: list[str] = field(default_factory=list)  # every distinct key read, in order
    error: str | None = None  # the archive error, one line
    after: str | None = None  # the last complete member's key before the error
    last: str | None = None  # the last member's key read
    poisoned: set[str] = field(default_factory=set)  # keys with a member twice

    @property
    def name(self) -> str:
        return PurePosixPath(self.url).name

    def place(self) -> str:
        key = self.after if self.error else self.last
        return f"after {key}" if key else "at the start of the shard"


class ShardReader:
    """A webdataset pipeline stage: `{"url": ...}` dicts in, raw samples out (see the module docstring).

    `manifests=False` ignores manifests (a shard is then only checked for archive errors and duplicates).
    `last` is the `ShardRead` of the shard read most recently.
    """

    def __init__(self, handler: Handler, manifests: bool = True):
        self.handler, self.manifests = handler, manifests
        self.last: ShardRead | None = None

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            yield from self.read(shard["url"])

    def read(self, url: str) -> Iterator[dict[str, Any]]:
        state = ShardRead(url, cached_manifest(url) if self.manifests else None)
        self.last = state

        def on_error(exn: BaseException) -> bool:
            if state.error is None:  # the first error of a shard is the failure; what follows is its echo
                state.error, state.after = archive_reason(exn), state.last
            return True

        files = tar_file_expander(url_opener([{"url": url}], handler=on_error), handler=on_error)
        seen: set[str] = set()
        for sample in group_by_keys(self._members(files, state), handler=on_error):
            key = sample["__key__"]
            if key in seen:
                self.handler(BadSample("duplicate", f"{key} appears again in {state.name}; delivered once", key))
                continue
            seen.add(key)
            state.keys.append(key)
            if key in state.poisoned:
                self.handler(BadSample("duplicate", f"a member of {key} appears twice in {state.name}", key))
                continue
            yield sample
        self._report_end(state, seen)

    @staticmethod
    def _members(files: Iterable[dict[str, Any]], state: ShardRead) -> Iterator[dict[str, Any]]:
        """Pass tar members on, noting the last one read and dropping a member a sample already has."""
        current, suffixes = None, set()
        for f in files:
            prefix, suffix = base_plus_ext(f["fname"]) if "fname" in f else (None, None)
            if prefix is None:  # end-of-shard marker or a name webdataset ignores
                yield f
                continue
            if prefix != current:
                current, suffixes = prefix, set()
            state.last = prefix
            if suffix.lower() in suffixes:  # group_by_keys would raise and still deliver the sample
                state.poisoned.add(prefix)
                continue
            suffixes.add(suffix.lower())
            yield f

    def _report_end(self, state: ShardRead, seen: set[str]) -> None:
        m = state.manifest
        if m is not None and len(seen) < m.nsamples:
            missing = [k for k in m.keys if k not in seen]
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            reason = f"{state.name}: {len(seen)} of {m.nsamples} samples (missing {shown})"
            self.handler(BadSample("truncated", reason + (f"; {state.error}" if state.error else ""), state.place()))
        elif state.error:
            self.handler(BadSample("tar", f"{state.name}: {state.error}", state.place()))
