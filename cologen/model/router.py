"""Noisy top-1 router of one PRW block (Shazeer et al.'s noisy gating, one expert per sample or token).

Implements method.md, "Router": the gate on the pooled source hidden states, time-aware bias and entry offset
(the prompt input and straight-through weighting are this project's options, off in the flux_dev preset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTINGS: tuple[str, ...] = ("prob", "straight_through")


@dataclass
class Routing:
    """One block's routing decision. Sample granularity: index/weight (B,), probs (B, E); token: (B, N), (B, N, E)."""

    index: torch.Tensor
    weight: torch.Tensor  # what the chosen expert's output is scaled by: the router's gradient path
    probs: torch.Tensor


class NoisyTop1Router(nn.Module):
    """`w = h W_r + eps * softplus(h W_n)` (+ a learned per-timestep-bin bias, + the prompt's term), softmax over the
    active experts, top-1.

    The noise is drawn only in training, so eval routing is deterministic. The timestep enters as a bias per bin of
    the noisy stream's timestep: routing is piecewise constant in t, which keeps the inference condition cache exact
    (the source stream is recomputed once per bin, not once per step).

    Options (ours; the paper's router is the first line above):
    - `prompt_dim > 0`: the layer-normed pooled prompt embedding adds `LN(p) W_p` to the logits, so the gate can
      tell tasks apart by their instruction as well as by their source image;
    - `normalize`: layer-norm the pooled source features before the gate (their scale grows block by block);
    - `weighting`: 'prob' scales the chosen expert by its softmax probability (the paper); 'straight_through'
      scales it by exactly 1 in the forward pass with the probability's gradient (`p / sg(p)`), so the output
      depends only on which expert is chosen: a copied expert that ties its original changes nothing;
    - `detach_input`: the logits' gradients stop at the pooled source features, so whatever trains the gate (the
      routing losses, the chosen expert's weight) does not reach the experts and blocks that produced them.
    """

    def __init__(self, dim: int, num_experts: int, temperature: float = 1.0, noisy: bool = True,
                 timestep_bins: int = 4, granularity: str = "sample", prompt_dim: int = 0, normalize: bool = False,
                 weighting: str = "prob", detach_input: bool = False):
        super().__init__()
        if granularity not in ("sample", "token"):
            raise ValueError(f"router granularity must be 'sample' or 'token', got {granularity!r}")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"router weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.temperature = temperature
        self.granularity = granularity
        self.normalize = normalize
        self.weighting = weighting
        self.detach_input = detach_input
        self.gate = nn.Linear(dim, num_experts)
        self.noise = nn.Linear(dim, num_experts, bias=False) if noisy else None
        self.time_bias = nn.Embedding(timestep_bins, num_experts) if timestep_bins > 0 else None
        self.prompt_gate = nn.Linear(prompt_dim, num_experts, bias=False) if prompt_dim > 0 else None
        # Zero init: every active expert starts equally likely; the routing losses and the task shape the gate.
        for p in self.parameters():
            nn.init.zeros_(p)

    def logits(self, hidden: torch.Tensor, timestep_bin: torch.Tensor | None = None,
               prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Gate logits before the temperature and the entry offsets: (B, E) or, per token, (B, N, E)."""
        return sum(self.logit_terms(hidden, timestep_bin, prompt).values())

    def logit_terms(self, hidden: torch.Tensor, timestep_bin: torch.Tensor | None = None,
                    prompt: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The logits' terms, each (B, E) or (B, N, E): 'source' (the gate on the pooled source features),
        'prompt', 'noise' (training only) and 'timestep' (the bin's bias), those the router has. They sum to
        `logits`; apart they show what a routing decision rests on (`cologen eval shapeworld --routing-terms`)."""
        if self.detach_input:
            hidden = hidden.detach()
        x = hidden.float().mean(1) if self.granularity == "sample" else hidden.float()
        if self.normalize:
            x = F.layer_norm(x, x.shape[-1:])
        source = F.linear(x, self.gate.weight.float(), self.gate.bias.float())
        terms = {"source": source}
        if self.prompt_gate is not None and prompt is not None:
            p = F.linear(F.layer_norm(prompt.float(), prompt.shape[-1:]), self.prompt_gate.weight.float())
            terms["prompt"] = p if source.dim() == 2 else p[:, None, :].expand_as(source)
        if self.noise is not None and self.training:
            terms["noise"] = torch.randn_like(source) * F.softplus(F.linear(x, self.noise.weight.float()))
        if self.time_bias is not None and timestep_bin is not None:
            bias = self.time_bias(timestep_bin).float()  # (B, E)
            terms["timestep"] = bias if source.dim() == 2 else bias[:, None, :].expand_as(source)
        return terms

    def forward(self, hidden: torch.Tensor, num_active: int, entry_offset: torch.Tensor,
                timestep_bin: torch.Tensor | None = None, prompt: torch.Tensor | None = None,
                forced: torch.Tensor | None = None) -> Routing:
        """Route `hidden` (B, N, D). `forced` (B,) overrides the choice (oracle routing for evaluation): the
        forced expert gets weight 1."""
        logits = self.logits(hidden, timestep_bin, prompt) / self.temperature + entry_offset.float()
        active = torch.arange(logits.shape[-1], device=logits.device) < num_active
        probs = logits.masked_fill(~active, float("-inf")).softmax(-1)
        if forced is not None:
            index = forced.to(probs.device)
            if probs.dim() == 3:
                index = index[:, None].expand(probs.shape[:2])
            return Routing(index=index, weight=torch.ones(index.shape, device=probs.device), probs=probs)
        weight, index = probs.max(-1)
        if self.weighting == "straight_through":
            weight = weight / weight.detach()  # exactly 1 forward, the probability's gradient backward
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
        if self.prompt_gate is not None:
            self.prompt_gate.weight[new] = self.prompt_gate.weight[new - 1]
