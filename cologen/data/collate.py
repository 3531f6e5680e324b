"""Stack examples into the training batch every module reads (see docs/data.md, "The batch")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cologen.data.builders import Example

if TYPE_CHECKING:
    from cologen.data.precomputed import PrecomputedArrays


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def collate(examples: Sequence[Example], arrays: PrecomputedArrays | None = None) -> dict[str, Any]:
    """The batch; with `arrays`, also the precomputed arrays every example carries (`precomputed.py`)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    h, w = examples[0]["target"].shape[:2]
    if any(e["target"].shape[:2] != (h, w) for e in examples):
        raise ValueError("examples of one batch must share a target size (bucket the batch first)")
    has_source = [e["source"] is not None for e in examples]
    src_shape = next((e["source"].shape for e in examples if e["source"] is not None), (h, w, 3))
    sources = np.zeros((len(examples), *src_shape), np.uint8)
    for i, e in enumerate(examples):
        if e["source"] is not None:
            sources[i] = e["source"]
    regions = np.zeros((len(examples), 1, h, w), np.float32)
    for i, e in enumerate(examples):
        if e["region"] is not None:
            regions[i, 0] = e["region"] > 0
    source = _to_unit(sources)
    source[~torch.tensor(has_source)] = 0.0  # an absent source is zeros, not mid-grey
    batch = {
        "target": _to_unit(np.stack([e["target"] for e in examples])),
        "source": source,
        "has_source": torch.tensor(has_source, dtype=torch.bool),
        "prompt": [e["prompt"] for e in examples],
        "task": [e["task"] for e in examples],
        "key": [e["key"] for e in examples],
        "region": torch.from_numpy(regions),
        "meta": [e["meta"] for e in examples],
    }
    counts = {len(e.get("extra_sources") or ()) for e in examples}
    if len(counts) > 1:
        raise ValueError("examples of one batch must have as many conditions: bucket them by condition count "
                         "(data.aspect_buckets: true buckets by size and condition count)")
    extra = counts.pop()
    if extra:  # conditions after the first, each (B, 3, H, W) like `source` (docs/multi_condition.md)
        batch["extra_sources"] = [_to_unit(np.stack([e["extra_sources"][i] for e in examples])) for i in range(extra)]
    if arrays is not None:
        batch.update(arrays.stack(examples))
    return batch


def already_collated(batch: dict[str, Any]) -> dict[str, Any]:
    """For loaders whose items are batches already: torch's default would walk every meta dict again."""
    return batch
