"""The evaluation loop every protocol shares: generate, score in batches, write JSONL, average.

A protocol is a ``Scorer``: it scores a batch of (sample, output) pairs one row per sample, and
may add set-level numbers at the end (FID, dataset-level mIoU) that replace the per-sample mean
of the same name. Samples are plain dicts (keys documented by each protocol and in
docs/metrics.md); ``generate(sample)`` returns the model's image for one sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from cologen.metrics.images import ImageLike, to_uint8_rgb
from cologen.metrics.shapeworld import aggregate

if TYPE_CHECKING:  # the metric networks' loaders import transformers: only when a scorer is built
    import torch

    from cologen.metrics.models import PathLike

Sample = Mapping[str, Any]
Generate = Callable[[Sample], ImageLike]


class Scorer(Protocol):
    def score(self, samples: list[Sample], outputs: list[np.ndarray]) -> list[dict[str, float]]: ...

    def summary(self) -> dict[str, float]: ...


class ClipDinoScorer:
    """The base of the scorers that compare images with CLIP and DINO loaded from local paths (DreamBench,
    editing); they add no set-level number."""

    def __init__(self, clip_path: PathLike | None, dino_path: PathLike | None,
                 device: str | torch.device | None = None) -> None:
        from cologen.metrics.models import load_clip, load_dino

        self.clip = load_clip(clip_path, device)
        self.dino = load_dino(dino_path, device)

    def summary(self) -> dict[str, float]:
        return {}


def sample_key(sample: Sample, index: int) -> str:
    return str(sample.get("key", sample.get("__key__", index)))


def _json_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None  # JSON has no NaN
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_protocol(
    samples: Iterable[Sample],
    generate: Generate,
    scorer: Scorer,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    jsonl_path: str | Path | None = None,
    output_dir: str | Path | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Run ``generate`` on every sample (up to ``limit``), score, and return metric means plus
    ``num_samples``. ``jsonl_path``: one JSON line per sample (``index``, ``key``, its metrics;
    NaN written as null). ``output_dir``: the generated images as ``{index:06d}.png``."""
    from PIL import Image  # local: only needed when saving

    rows: list[dict[str, Any]] = []
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = None
    if jsonl_path is not None:
        Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(jsonl_path, "w", encoding="utf-8")  # closed in the finally below
    total = limit if limit is not None else (len(samples) if hasattr(samples, "__len__") else None)  # type: ignore[arg-type]
    batch: list[Sample] = []
    outputs: list[np.ndarray] = []

    def flush() -> None:
        scored = scorer.score(batch, outputs)
        for sample, row in zip(batch, scored):
            index = len(rows)
            row = {"index": index, "key": sample_key(sample, index), **row}
            rows.append(row)
            if log is not None:
                log.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
        batch.clear()
        outputs.clear()

    try:
        for i, sample in enumerate(tqdm(samples, total=total, desc=desc)):
            if limit is not None and i >= limit:
                break
            image = to_uint8_rgb(generate(sample))
            if out_dir is not None:
                Image.fromarray(image).save(out_dir / f"{i:06d}.png")
            batch.append(sample)
            outputs.append(image)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        if log is not None:
            log.close()
    means = aggregate({k: v for k, v in row.items() if k != "index"} for row in rows)
    means.update(scorer.summary())
    means["num_samples"] = float(len(rows))
    return means
