"""The PRW expert bank: LoRA experts on the key and value projections of the source tokens of one block.

All experts are allocated up front (one per curriculum step) so checkpoint and optimizer shapes never change; the
router masks the inactive ones. Parameter names follow peft (`lora_A.weight`, `lora_B.weight`) so each expert is a
standard LoRA pair on `to_k` / `to_v`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRA(nn.Module):
    """One low-rank pair, `lora_B(lora_A(x))`, initialised like peft (A Kaiming-uniform, B zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)


class KVExpert(nn.Module):
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.to_k = LoRA(dim, dim, rank)
        self.to_v = LoRA(dim, dim, rank)


class ExpertBank(nn.Module):
    """`num_experts` KV experts of one PRW block; computes the routed expert's K and V deltas."""

    def __init__(self, dim: int, num_experts: int, rank: int, alpha: float):
        super().__init__()
        self.rank = rank
        self.scale = alpha / rank
        self.experts = nn.ModuleList(KVExpert(dim, rank) for _ in range(num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def _stacked(self):
        # Stacking costs one copy of E small matrices per call and keeps routing free of host syncs; every stacked
        # expert that requires grad takes part in autograd (zero grad when unselected), which DDP needs.
        down = torch.stack([torch.cat([e.to_k.lora_A.weight, e.to_v.lora_A.weight], 0) for e in self.experts])
        up_k = torch.stack([e.to_k.lora_B.weight for e in self.experts])
        up_v = torch.stack([e.to_v.lora_B.weight for e in self.experts])
        return down, up_k, up_v  # (E, 2r, D), (E, D, r), (E, D, r)

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                num_active: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V deltas for `hidden` (B, N, D).

        Sample routing: `index`, `weight` are (B,). Token routing: (B, N); then every active expert runs on all
        tokens and the result is masked (dense over the active experts, documented as the slower option).
        """
        down, up_k, up_v = self._stacked()
        # Compute in the activations' dtype (bf16 on FLUX; the fp32 master weights are cast, as autocast would):
        # fp32 copies of (B, N, D) activations would cost ~45 MB per block and sample.
        dtype = hidden.dtype
        down, up_k, up_v = down.to(dtype), up_k.to(dtype), up_v.to(dtype)
        r = self.rank
        if index.dim() == 1:
            # the routing weight scales the rank-r intermediate, the smallest tensor on the path
            z = torch.bmm(hidden, down[index].transpose(1, 2)) * (weight * self.scale).to(dtype)[:, None, None]
            dk = torch.bmm(z[..., :r], up_k[index].transpose(1, 2))
            dv = torch.bmm(z[..., r:], up_v[index].transpose(1, 2))
            return dk, dv
        dk = hidden.new_zeros(*hidden.shape[:2], up_k.shape[1])
        dv = torch.zeros_like(dk)
        for e in range(num_active):
            gate = ((index == e).to(dtype) * weight.to(dtype) * self.scale).unsqueeze(-1)
            z = (hidden @ down[e].T) * gate
            dk = dk + z[..., :r] @ up_k[e].T
            dv = dv + z[..., r:] @ up_v[e].T
        return dk, dv

    @torch.no_grad()
    def init_expert(self, new: int, mode: str = "copy") -> None:
        """Initialise expert `new` as a copy of expert `new - 1` (mode 'copy') or with a zero up-projection."""
        src, dst = self.experts[new - 1], self.experts[new]
        for name in ("to_k", "to_v"):
            s, d = getattr(src, name), getattr(dst, name)
            if mode == "copy":
                d.lora_A.weight.copy_(s.lora_A.weight)
                d.lora_B.weight.copy_(s.lora_B.weight)
            elif mode == "zero":
                nn.init.kaiming_uniform_(d.lora_A.weight, a=math.sqrt(5))
                d.lora_B.weight.zero_()
            else:
                raise ValueError(f"unknown expert init {mode!r}; expected 'copy' or 'zero'")
