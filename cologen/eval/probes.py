"""Probe evaluation: sample a fixed set of examples with a model and score each one against ShapeWorld's exact
ground truth, with the routers' choice or with oracle routing (every sample on its task's own expert).

One function for every caller: `SampleValidation` (after each curriculum step), `cologen eval`, the gate
temperature sweep and `make ablation`. Scores are kept per probe, so means come with confidence intervals
(`cologen.metrics.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cologen.eval.shapeworld import TASKS as SHAPEWORLD_TASKS
from cologen.eval.shapeworld import score_sample
from cologen.metrics.images import to_uint8_rgb

Probe = dict[str, Any]


def probes_from_batch(batch: Mapping[str, Any], limit: int) -> list[Probe]:
    """Up to `limit` examples of a collated batch as standalone dicts (CPU copies; the batch can be freed)."""
    out: list[Probe] = []
    for i in range(min(limit, len(batch["task"]))):
        region = batch["region"][i, 0].cpu().numpy() > 0 if "region" in batch else None
        has_source = bool(batch["has_source"][i]) if "has_source" in batch else False
        out.append({
            "task": batch["task"][i], "prompt": batch["prompt"][i],
            "key": batch["key"][i] if "key" in batch else str(i),
            "target": batch["target"][i].detach().cpu().clone(),
            "source": batch["source"][i].detach().cpu().clone() if has_source else None,
            # collate stores an absent region as zeros; the scorers expect None then
            "region": region if region is not None and region.any() else None,
            "meta": batch["meta"][i] if "meta" in batch else {},
        })
    return out


@dataclass
class ProbeRun:
    """What sampling one task's probes gave: images, per-probe scores, routing of every denoising step."""

    task: str
    outputs: list[torch.Tensor]
    rows: list[dict[str, float]]  # `{task}/{metric}` per probe (empty without ShapeWorld ground truth)
    routing: list = field(default_factory=list)  # SampleStats.routing of every chunk, concatenated
    cache_hits: int = 0
    cache_misses: int = 0


def sample_probes(module, probes: Sequence[Probe], *, seed: int = 0, oracle: bool = False, batch_size: int = 64,
                  **sampler_overrides) -> tuple[list[torch.Tensor], list, int, int]:
    """Outputs in probe order (probe i uses noise seed `seed + i`); probes with and without a source go in
    separate calls. Returns (outputs, routing steps, cache hits, cache misses)."""
    outputs: list[torch.Tensor | None] = [None] * len(probes)
    routing: list = []
    hits = misses = 0
    for with_source in (True, False):
        idx = [i for i, p in enumerate(probes) if (p["source"] is not None) == with_source]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            h, w = probes[chunk[0]]["target"].shape[-2:]
            sources = torch.stack([probes[i]["source"] for i in chunk]) if with_source else None
            images, stats = module.generate([probes[i]["prompt"] for i in chunk], sources,
                                            [probes[i]["task"] for i in chunk], height=h, width=w,
                                            seed=[seed + i for i in chunk], oracle_routing=oracle and with_source,
                                            **sampler_overrides)
            for j, i in enumerate(chunk):
                outputs[i] = images[j].float().cpu()
            routing += stats.routing
            hits, misses = hits + stats.cache_hits, misses + stats.cache_misses
    return outputs, routing, hits, misses  # type: ignore[return-value]


def score_probes(probes: Sequence[Probe], outputs: Sequence[torch.Tensor]) -> list[dict[str, float]]:
    """ShapeWorld scores per probe (`{task}/{metric}`); [] for tasks without ShapeWorld ground truth."""
    if not probes or probes[0]["task"] not in SHAPEWORLD_TASKS:
        return []
    return [score_sample(p, to_uint8_rgb(o)) for p, o in zip(probes, outputs)]


def run_probes(module, task: str, probes: Sequence[Probe], *, seed: int = 0, oracle: bool = False,
               batch_size: int = 64, **sampler_overrides) -> ProbeRun:
    outputs, routing, hits, misses = sample_probes(module, probes, seed=seed, oracle=oracle, batch_size=batch_size,
                                                   **sampler_overrides)
    return ProbeRun(task, outputs, score_probes(probes, outputs), routing, hits, misses)


def own_expert_share(routing: Sequence, own: int) -> float:
    """Share of the routing decisions (every block, step and probe) that chose expert `own`; NaN without any."""
    chosen = [index.flatten() for _, per_block in routing for index in per_block.values()]
    if not chosen:
        return float("nan")
    flat = torch.cat(chosen)
    return float((flat == own).float().mean())


def finite_mean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")
