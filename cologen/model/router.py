"""Noisy top-1 router of one PRW block (Shazeer et al.'s noisy gating, one expert per sample or token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    """One block's routing decision. Sample granularity: index/weight (B,), probs (B, E); token: (B, N), (B, N, E)."""

    index: torch.Tensor
    weight: torch.Tensor  # the chosen expert's softmax probability: the router's gradient path
    probs: torch.Tensor


class NoisyTop1Router(nn.Module):
    """`w = h W_r + eps * softplus(h W_n)` (+ a learned per-timestep-bin bias), softmax over the active experts.

    The noise is drawn only in training, so eval routing is deterministic. The timestep enters as a bias per bin of
    the noisy stream's timestep: routing is piecewise constant in t, which keeps the inference condition cache exact
    (the source stream is recomputed once per bin, not once per step).
    """

    def __init__(self, dim: int, num_experts: int, temperature: float = 1.0, noisy: bool = True,
                 timestep_bins: int = 4, granularity: str = "sample"):
        super().__init__()
        if granularity not in ("sample", "token"):
            raise ValueError(f"router granularity must be 'sample' or 'token', got {granularity!r}")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.granularity = granularity
        self.gate = nn.Linear(dim, num_experts)
        self.noise = nn.Linear(dim, num_experts, bias=False) if noisy else None
        self.time_bias = nn.Embedding(timestep_bins, num_experts) if timestep_bins > 0 else None
        # Zero init: every active expert starts equally likely; the veteran loss and the task shape the gate.
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, hidden: torch.Tensor, num_active: int, entry_offset: torch.Tensor,
                timestep_bin: torch.Tensor | None = None) -> Routing:
        x = hidden.float().mean(1) if self.granularity == "sample" else hidden.float()
        w = F.linear(x, self.gate.weight.float(), self.gate.bias.float())
        if self.noise is not None and self.training:
            w = w + torch.randn_like(w) * F.softplus(F.linear(x, self.noise.weight.float()))
        if self.time_bias is not None and timestep_bin is not None:
            bias = self.time_bias(timestep_bin).float()  # (B, E)
            w = w + (bias if w.dim() == 2 else bias[:, None, :])
        logits = w / self.temperature + entry_offset.float()
        active = torch.arange(logits.shape[-1], device=logits.device) < num_active
        probs = logits.masked_fill(~active, float("-inf")).softmax(-1)
        weight, index = probs.max(-1)
        return Routing(index=index, weight=weight, probs=probs)

    @torch.no_grad()
    def init_entry(self, new: int) -> None:
        """Give expert `new` the gate of expert `new - 1` (it starts as that expert's copy)."""
        self.gate.weight[new] = self.gate.weight[new - 1]
        self.gate.bias[new] = self.gate.bias[new - 1]
        if self.noise is not None:
            self.noise.weight[new] = self.noise.weight[new - 1]
        if self.time_bias is not None:
            self.time_bias.weight[:, new] = self.time_bias.weight[:, new - 1]
