"""Probe evaluation: sample a fixed set of examples with a model and score each one, against ShapeWorld's exact
ground truth or (real data) against its own reference images (`reference_scores.py`), with the routers' choice or
with oracle routing (every sample on its task's own expert).

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

from cologen.eval.reference_scores import reference_scores
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
            # conditions after the first (tasks with several, docs/multi_condition.md)
            "extra_sources": [x[i].detach().cpu().clone() for x in batch.get("extra_sources") or ()],
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
    rows: list[dict[str, float]]  # `{task}/{metric}` per probe (empty when not scored)
    routing: list = field(default_factory=list)  # SampleStats.routing of every chunk, concatenated
    cache_hits: int = 0
    cache_misses: int = 0


def probe_group(probe: Probe) -> tuple[bool, int, int, int]:
    """Probes sampled in one call share this: whether they have a condition image, the output size and the number
    of further conditions."""
    h, w = probe["target"].shape[-2:]
    return probe["source"] is None, int(h), int(w), len(probe.get("extra_sources") or ())


def inpainting_mask(probes: Sequence[Probe]) -> torch.Tensor | None:
    """(B, 1, H, W) sampler mask of a call's probes: an inpainting probe's `region` (1: paint), 1 everywhere for
    the others (nothing kept); None when no probe is an inpainting one with a region."""
    if not any(p["task"] == "inpainting" and p.get("region") is not None for p in probes):
        return None
    h, w = probes[0]["target"].shape[-2:]
    return torch.stack([
        torch.as_tensor(np.asarray(p["region"]), dtype=torch.float32) if p["task"] == "inpainting"
        and p.get("region") is not None else torch.ones(h, w) for p in probes])[:, None]


def sample_probes(module, probes: Sequence[Probe], *, seed: int = 0, oracle: bool = False, batch_size: int = 64,
                  ids: Sequence[int] | None = None, keep: Sequence[bool] | None = None, keep_unmasked: bool = False,
                  **sampler_overrides) -> tuple[list[torch.Tensor | None], list, int, int]:
    """Outputs in probe order (probe i uses noise seed `seed + ids[i]`, `ids` defaulting to 0, 1, ...: a probe's
    place in the whole probe set when this is a share of it). Probes go in calls of up to `batch_size` per
    `probe_group` (groups in sorted order, so ranks holding equal group counts make the same calls: FSDP needs it).
    A probe with `keep[i]` False is a filler that only keeps such ranks in step: its output is None and its
    routing is dropped. `keep_unmasked`: inpainting probes keep their source outside their `region` at every step
    (`inpainting_mask`). Returns (outputs, routing steps, cache hits, cache misses)."""
    ids = list(range(len(probes))) if ids is None else list(ids)
    keep = [True] * len(probes) if keep is None else list(keep)
    outputs: list[torch.Tensor | None] = [None] * len(probes)
    routing: list = []
    hits = misses = 0
    for group in sorted({probe_group(p) for p in probes}):
        without_source, h, w, extra = group
        idx = [i for i, p in enumerate(probes) if probe_group(p) == group]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            sources = None if without_source else torch.stack([probes[i]["source"] for i in chunk])
            if extra:
                sources = [sources, *(torch.stack([probes[i]["extra_sources"][k] for i in chunk])
                                      for k in range(extra))]
            images, stats = module.generate([probes[i]["prompt"] for i in chunk], sources,
                                            [probes[i]["task"] for i in chunk], height=h, width=w,
                                            seed=[seed + ids[i] for i in chunk],
                                            oracle_routing=oracle and not without_source,
                                            mask=inpainting_mask([probes[i] for i in chunk]) if keep_unmasked else None,
                                            **sampler_overrides)
            kept = torch.tensor([keep[i] for i in chunk])
            for j, i in enumerate(chunk):
                outputs[i] = images[j].float().cpu() if keep[i] else None
            routing += stats.routing if kept.all() else [(t, {k: v[kept] for k, v in per_block.items()})
                                                         for t, per_block in stats.routing]
            hits, misses = hits + stats.cache_hits, misses + stats.cache_misses
    return outputs, routing, hits, misses


SCORERS = ("shapeworld", "reference", "none")


def score_probes(probes: Sequence[Probe], outputs: Sequence[torch.Tensor],
                 metrics: str = "shapeworld") -> list[dict[str, float]]:
    """Scores per probe (`{task}/{metric}`): 'shapeworld' against the scenes' exact ground truth ([] for tasks
    without it), 'reference' against the probe's own target, region and condition, 'none' nothing."""
    if metrics not in SCORERS:
        raise ValueError(f"metrics must be one of {', '.join(SCORERS)}, got {metrics!r}")
    if not probes or metrics == "none" or (metrics == "shapeworld" and probes[0]["task"] not in SHAPEWORLD_TASKS):
        return []
    score = score_sample if metrics == "shapeworld" else reference_scores
    return [score(p, to_uint8_rgb(o)) for p, o in zip(probes, outputs)]


def with_other_conditions(probes: Sequence[Probe]) -> list[Probe]:
    """Each probe with the condition images of the next probe of its `probe_group` (the last with the first's), its
    prompt and target its own. Sampled with these and scored against their own targets, a model that reads its
    condition scores lower than with its own; one that ignores it scores the same (`cologen eval shapeworld
    --other-sources`)."""
    out = list(probes)
    for group in {probe_group(p) for p in probes}:
        idx = [i for i, p in enumerate(probes) if probe_group(p) == group]
        for i, j in zip(idx, idx[1:] + idx[:1]):
            out[i] = {**probes[i], "source": probes[j]["source"], "extra_sources": probes[j].get("extra_sources")}
    return out


def run_probes(module, task: str, probes: Sequence[Probe], *, seed: int = 0, oracle: bool = False,
               batch_size: int = 64, ids: Sequence[int] | None = None, keep: Sequence[bool] | None = None,
               metrics: str = "shapeworld", sample_with: Sequence[Probe] | None = None,
               **sampler_overrides) -> ProbeRun:
    """Sample and score `probes` (`sample_probes`); the run holds the kept probes only, in order. `sample_with`:
    probes to sample instead, one per probe (e.g. `with_other_conditions`), scored as `probes`."""
    sampled = probes if sample_with is None else sample_with
    if len(sampled) != len(probes):
        raise ValueError(f"sample_with holds {len(sampled)} probes for {len(probes)}")
    outputs, routing, hits, misses = sample_probes(module, sampled, seed=seed, oracle=oracle, batch_size=batch_size,
                                                   ids=ids, keep=keep, **sampler_overrides)
    kept = [i for i, out in enumerate(outputs) if out is not None]
    images = [outputs[i] for i in kept]
    return ProbeRun(task, images, score_probes([probes[i] for i in kept], images, metrics), routing, hits, misses)


def changed_probe_tokens(module, probes: Sequence[Probe]) -> torch.Tensor | None:
    """(B, N) bool: the target tokens each probe changes against its source (`changed_tokens`, what the token gates'
    supervision calls changed); None where a probe has no source of its target's size."""
    from cologen.model.packing import pack_latents
    from cologen.module import changed_tokens

    if any(p["source"] is None or p["source"].shape != p["target"].shape for p in probes):
        return None

    def tokens(images):
        return pack_latents(module.codec.encode(torch.stack(images).to(module.device)).float())

    return changed_tokens(tokens([p["target"] for p in probes]), tokens([p["source"] for p in probes]), None)


def run_probes_with_true_gates(module, task: str, probes: Sequence[Probe], *, seed: int = 0, batch_size: int = 64,
                               **sampler_overrides) -> ProbeRun | None:
    """`run_probes` with every expert's token gates forced to the truth on both streams (`forced_token_gates`: the
    deltas and the noisy tokens that take the expert's velocity are those each probe's target changes): what a
    perfect localiser would give. One sampler call per `batch_size` probes, each with its own truth; None where the
    probes have no source of their target's size (nothing to localise)."""
    from cologen.eval.denoising import forced_token_gates

    if sampler_overrides.get("cfg_scale", 1.0) != 1.0 or sampler_overrides.get("image_cfg_scale", 1.0) != 1.0:
        raise ValueError("sampling with the true gates forces one sampler batch's gates: guidance doubles the batch")
    rows, images, routing = [], [], []
    for start in range(0, len(probes), batch_size):
        chunk = list(probes[start:start + batch_size])
        changed = changed_probe_tokens(module, chunk)
        if changed is None:
            return None
        with forced_token_gates(module.model, changed, ("source", "noisy")):
            run = run_probes(module, task, chunk, seed=seed, batch_size=batch_size,
                             ids=range(start, start + len(chunk)), **sampler_overrides)
        rows, images, routing = rows + run.rows, images + run.outputs, routing + run.routing
    return ProbeRun(task, images, rows, routing)


def own_expert_share(routing: Sequence, own: int) -> float:
    """Share of the routing decisions (every block, step and probe) that chose expert `own`; NaN without any."""
    chosen = [index.flatten() for _, per_block in routing for index in per_block.values()]
    if not chosen:
        return float("nan")
    flat = torch.cat(chosen)
    return float((flat == own).float().mean())


def oracle_repeats_learned(module, task: str, learned: ProbeRun) -> bool:
    """Sampling `learned`'s probes again with oracle routing would give exactly `learned` (so it need not be run):
    every routing decision already chose the task's own expert, and the chosen expert's weight is exactly 1 in the
    forward pass (straight-through weighting), which is what oracle routing sets. With the paper's probability
    weighting the weight is below 1 and the oracle run differs."""
    own = (getattr(module, "task_experts", None) or {}).get(task)
    if own is None or module.prw_config.router.weighting != "straight_through":
        return False
    return own_expert_share(learned.routing, own) == 1.0


def finite_mean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")
