"""Whole values of tensors that may be sharded: FSDP2 stores parameters as DTensors, of which each rank holds a
shard. Reading one's values (to save it, digest it or test it) must gather it first, and every rank must do so in
the same order, since gathering is a collective."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or its full value gathered from every rank's shard when it is a DTensor (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
