"""Precomputed encoder outputs in shards (`data_recipes.precompute`): T5 / CLIP embeddings of the prompt and VAE
latents of the target (and source), carried into the batch as `text_tokens` (B, L, D), `text_pooled` (B, P),
`target_latent` (B, C, h, w) and `source_latent`, float32.

A sample's cached arrays are only used where they encode what the builder produced:

* text (`t5`, `clip`): the built prompt equals `precomputed.prompt` (the builders never re-template to make it
  fit: grounding prompts, swapped subject pairs and custom templates differ, and then the text arrays are
  dropped for that sample and the module encodes its prompt);
* latents: `precomputed.resolution` equals the output size, and the target (source) is the stored image
  (source) framed unchanged: not a grounding target (it carries the overlay), not a swapped subject pair.

A batch carries a key only when every sample of it has that array (of one shape): otherwise the key is
dropped for that batch and counted (`mixed_batch`). Every drop is counted by reason and the first few logged.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the recipes import this module's helpers without torch
    from cologen.data.skips import SharedCounts

log = logging.getLogger("cologen.data")

ARRAY_KEYS = {"t5": "text_tokens", "clip": "text_pooled", "latent": "target_latent",
              "source_latent": "source_latent"}  # member name -> the training batch key it feeds
TEXT_ARRAYS = ("t5", "clip")
# Why arrays were not used: per sample (prompt, resolution, view, unreadable), per batch (mixed_batch).
COUNTS = ("samples", "prompt", "resolution", "view", "unreadable", "mixed_batch")
# Tasks whose target is the stored image framed unchanged, and those whose source is the stored source.
_STORED_TARGET = ("inpainting", "control", "customized", "editing", "t2i", "reconstruct")
_STORED_SOURCE = ("customized", "editing")


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_shape(data: bytes) -> tuple[int, ...] | None:
    """The array shape from an .npy header (None if it is not a readable .npy)."""
    try:
        buf = io.BytesIO(data)
        fmt = np.lib.format
        reader = fmt.read_array_header_1_0 if fmt.read_magic(buf) == (1, 0) else fmt.read_array_header_2_0
        return tuple(reader(buf)[0])
    except Exception:  # noqa: BLE001 - any malformed header
        return None


def stack_precomputed(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Training-batch tensors (`text_tokens`, `text_pooled`, `target_latent`, `source_latent`) from samples
    read with their `*.npy` members (`{"t5.npy": bytes, ...}`); a key is present when every sample has it."""
    import torch

    out = {}
    for name, key in ARRAY_KEYS.items():
        members = [s.get(f"{name}.npy") for s in samples]
        if all(m is not None for m in members):
            out[key] = torch.stack([torch.from_numpy(load_npy(m).astype(np.float32)) for m in members])
    return out


class PrecomputedArrays:
    """Attaches a built example's usable arrays (`attach`, in the stream) and stacks a batch's (`stack`)."""

    def __init__(self, counts: SharedCounts, log_first: int = 10):
        self.counts, self.log_first = counts, log_first
        self._logged = 0

    def _note(self, reason: str, message: str) -> None:
        self.counts.add(reason)
        self._logged += 1
        if self._logged <= self.log_first:
            log.warning("precomputed arrays not used [%s] %s", reason, message)

    def attach(self, ex: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        members = {name: raw[f"{name}.npy"] for name in ARRAY_KEYS if raw.get(f"{name}.npy") is not None}
        if not members:
            return ex
        self.counts.add("samples")
        pre = ex["meta"]["record"].get("precomputed")
        pre = pre if isinstance(pre, dict) else {}
        h, w = ex["target"].shape[:2]
        build = ex["meta"]["build"]
        stored_view = {"latent": ex["task"] in _STORED_TARGET and not build.get("swapped"),
                       "source_latent": ex["task"] in _STORED_SOURCE and not build.get("swapped")}
        used, dropped = [], {}
        for name, data in members.items():
            if npy_shape(data) is None:
                reason, why = "unreadable", f"{name}.npy is not a readable .npy array"
            elif name in TEXT_ARRAYS and pre.get("prompt") != ex["prompt"]:
                reason, why = "prompt", f"the built prompt {ex['prompt']!r} is not precomputed.prompt"
            elif name not in TEXT_ARRAYS and list(pre.get("resolution") or []) != [h, w]:
                reason, why = "resolution", f"precomputed.resolution {pre.get('resolution')} is not the output [{h}, {w}]"
            elif name not in TEXT_ARRAYS and not stored_view[name]:
                reason, why = "view", f"the {ex['task']} {'target' if name == 'latent' else 'source'} is not the stored image"
            else:
                used.append(name)
                continue
            dropped[name] = reason
            self._note(reason, f"{ex['key']}: {why}")
        ex["arrays"] = {f"{name}.npy": members[name] for name in used}
        ex["meta"]["precomputed"] = {"used": used, "dropped": dropped}
        return ex

    def stack(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        members = [e.get("arrays") or {} for e in examples]
        if not any(members):
            return {}
        keep = []
        for name in ARRAY_KEYS:
            have = [m.get(f"{name}.npy") for m in members]
            if all(d is None for d in have):
                continue
            if any(d is None for d in have) or len({npy_shape(d) for d in have}) > 1:
                self._note("mixed_batch", f"batch of {examples[0]['key']}...: not every sample has {name}.npy "
                                          "of one shape; the batch goes without it")
                continue
            keep.append(f"{name}.npy")
        return stack_precomputed([{k: m[k] for k in keep} for m in members])
