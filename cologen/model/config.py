"""Typed configuration of the PRW expert bank and its routers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RouterConfig:
    """Noisy top-1 gate of each PRW block.

    enabled: False gives the single always-on adapter of OminiControl (expert 0, weight 1; for baselines).
    temperature: divides the logits before the softmax (paper: 1.0); the knob sweeps explore.
    noisy: add `eps * softplus(h W_n)` to the logits in training.
    timestep_bins: > 0 adds a learned bias per bin of the noisy timestep (time-aware routing); 0 ignores time.
    granularity: 'sample' routes each sample (mean-pooled source tokens), 'token' routes each source token.
    entry_offset: logit offset a newly activated expert starts with, so the old choice and its weight are kept
        (continuity at a curriculum boundary); the curriculum anneals it to 0 over `entry_warmup_steps`.
    """

    enabled: bool = True
    temperature: float = 1.0
    noisy: bool = True
    timestep_bins: int = 4
    granularity: Literal["sample", "token"] = "sample"
    entry_offset: float = 20.0
    entry_warmup_steps: int = 100


@dataclass
class PRWConfig:
    """Progressive Representation Weaving: a bank of LoRA experts on the source tokens' K and V.

    num_experts: experts allocated up front, one per curriculum step (0 disables PRW: plain source stream).
    rank / alpha: LoRA rank and alpha (paper: 128 / 256); the update is scaled by alpha / rank.
    blocks: which blocks carry experts ('both' double- and single-stream, 'double', 'single').
    init: a new expert starts as a copy of the previous one ('copy') or with a zero up-projection ('zero').
    """

    num_experts: int = 5
    rank: int = 16
    alpha: float = 32.0
    blocks: Literal["both", "double", "single"] = "both"
    init: Literal["copy", "zero"] = "copy"
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self):
        if self.num_experts < 0:
            raise ValueError(f"prw.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and self.rank <= 0:
            raise ValueError(f"prw.rank must be > 0, got {self.rank}")
        if self.blocks not in ("both", "double", "single"):
            raise ValueError(f"prw.blocks must be 'both', 'double' or 'single', got {self.blocks!r}")
        if self.init not in ("copy", "zero"):
            raise ValueError(f"prw.init must be 'copy' or 'zero', got {self.init!r}")
