"""Expert usage of sampled images: per PRW block and timestep bin, as counts, tables and a heatmap figure.

Input is `SampleStats.routing` of the sampler: per denoising step `(t, {block: chosen expert (B,) or (B, N)})`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

StepRouting = Sequence[tuple[float, Mapping[str, torch.Tensor]]]


def timestep_bin(t: float, bins: int) -> int:
    """The bin of t in [0, 1]; the same rule as the model's router (floor(t * bins), clamped)."""
    return min(max(int(t * bins), 0), bins - 1)


@dataclass
class RoutingCounts:
    """How often each expert was chosen: `counts[block, bin, expert]` (samples or tokens, summed over steps)."""

    blocks: list[str]
    counts: np.ndarray

    @property
    def num_bins(self) -> int:
        return self.counts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    def shares(self) -> np.ndarray:
        """(blocks, bins, experts) usage share per block and bin; NaN for bins no step fell into."""
        total = self.counts.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, self.counts / np.maximum(total, 1), np.nan)

    def usage(self) -> np.ndarray:
        """(experts,) share of each expert over every block and step (every block weighs the same)."""
        total = self.counts.sum()
        return self.counts.sum((0, 1)) / total if total else np.full(self.num_experts, np.nan)


def count_routing(steps: StepRouting, num_experts: int, bins: int) -> RoutingCounts | None:
    """Tally the chosen experts per block and timestep bin; None when nothing was routed (no source, no PRW)."""
    blocks: list[str] = []
    for _, per_block in steps:
        blocks += [b for b in per_block if b not in blocks]
    if not blocks:
        return None
    counts = np.zeros((len(blocks), bins, num_experts), np.int64)
    for t, per_block in steps:
        column = timestep_bin(t, bins)
        for name, index in per_block.items():
            hist = torch.bincount(index.flatten().long(), minlength=num_experts)[:num_experts]
            counts[blocks.index(name), column] += hist.numpy()
    return RoutingCounts(blocks, counts)


def bin_labels(bins: int) -> list[str]:
    return [f"t {i / bins:.2f}-{(i + 1) / bins:.2f}" for i in range(bins)]


def usage_rows(per_task: Mapping[str, RoutingCounts]) -> tuple[list[str], list[list[object]]]:
    """The task x expert table: columns `task, expert0, ...`, shares rounded to 4 digits."""
    experts = max(c.num_experts for c in per_task.values())
    columns = ["task"] + [f"expert{e}" for e in range(experts)]
    rows: list[list[object]] = []
    for task, c in per_task.items():
        usage = np.full(experts, np.nan)
        usage[:c.num_experts] = c.usage()
        rows.append([task] + [round(float(u), 4) if math.isfinite(u) else None for u in usage])
    return columns, rows


def write_usage_tables(per_task: Mapping[str, RoutingCounts], out_dir: Path, global_step: int) -> None:
    """`routing_usage.csv` (task x expert) and `routing_usage.json` (the same plus per block and bin)."""
    columns, rows = usage_rows(per_task)
    with open(out_dir / "routing_usage.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)

    def clean(a: np.ndarray) -> list:
        return [clean(x) for x in a] if a.ndim > 1 else [None if math.isnan(v) else round(float(v), 4) for v in a]

    detail = {
        "global_step": global_step,
        "tasks": {task: {"usage": dict(zip(columns[1:], row[1:])), "blocks": c.blocks,
                         "timestep_bins": bin_labels(c.num_bins),
                         "share_block_bin_expert": clean(c.shares())}
                  for (task, c), row in zip(per_task.items(), rows)},
    }
    (out_dir / "routing_usage.json").write_text(json.dumps(detail, indent=1) + "\n")


def expert_labels(num_experts: int, names: Sequence[str] | None = None) -> list[str]:
    """`expert e` plus the task of the curriculum step that introduced it (`e1 grounding`), when known."""
    names = list(names or [])
    return [f"e{e} {names[e]}" if e < len(names) else f"expert {e}" for e in range(num_experts)]


def _annotate(ax, data: np.ndarray, size: int = 7) -> None:
    for (i, j), v in np.ndenumerate(data):
        if math.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size, color="black" if v > 0.6 else "white")


def routing_figure(per_task: Mapping[str, RoutingCounts], path: Path, title: str = "",
                   expert_names: Sequence[str] | None = None) -> Path:
    """First the summary: one row per task, one column per expert (labelled with its curriculum step's task when
    `expert_names` gives them), colour and number = the expert's share of that task's routing decisions over all
    PRW blocks and denoising steps. Then the detail, one panel per task: rows = PRW blocks, columns = experts, the
    share in that block over all steps (the split by timestep bin is in `routing_usage.json`). Shared 0-1 scale."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(per_task)
    experts = max(c.num_experts for c in per_task.values())
    blocks = max(len(c.blocks) for c in per_task.values())
    labels = expert_labels(experts, expert_names)
    cell_w, cell_h = 0.55, min(0.28, 8.0 / blocks)  # FLUX's 57 blocks still fit a readable figure
    panel_w = 0.9 + experts * cell_w
    summary_h = 1.4 + 0.3 * len(tasks)
    detail_h = 1.6 + blocks * cell_h
    fig = Figure(figsize=(max(len(tasks) * panel_w + 1.2, 2.5 + experts * 0.9), summary_h + detail_h),
                 layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[summary_h, detail_h])
    cmap = colormaps["viridis"].with_extremes(bad="0.85")

    ax = top.subplots()
    summary = np.full((len(tasks), experts), np.nan)
    for row, task in enumerate(tasks):
        summary[row, :per_task[task].num_experts] = per_task[task].usage()
    image = ax.imshow(np.ma.masked_invalid(summary), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(experts), labels, fontsize=7, rotation=20)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_title("share of each task's routing per expert (all blocks and steps)", fontsize=8)
    _annotate(ax, summary)
    top.colorbar(image, ax=ax, shrink=0.8, label="share")
    if title:
        top.suptitle(title, fontsize=9)

    axes = bottom.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        counts = per_task[task]
        per_block = counts.counts.sum(1).astype(float)  # (blocks, experts) over all timestep bins
        total = per_block.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            data = np.where(total > 0, per_block / np.maximum(total, 1), np.nan)
        if data.shape[1] < experts:
            data = np.pad(data, ((0, 0), (0, experts - data.shape[1])), constant_values=np.nan)
        ax.imshow(np.ma.masked_invalid(data), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
        ax.set_title(task, fontsize=8)
        ax.set_xticks(range(experts), [f"e{e}" for e in range(experts)], fontsize=6)
        ax.set_yticks(range(len(counts.blocks)), counts.blocks if ax is axes[0] else [""] * len(counts.blocks),
                      fontsize=6)
        if data.size <= 80:
            _annotate(ax, data, size=6)
    bottom.suptitle("per PRW block: share of each expert (e = expert, see the labels above)", fontsize=8)
    fig.savefig(path, dpi=110)
    return path
