"""The Veteran Gate's routing supervision and routing statistics."""

from __future__ import annotations

import torch

from .router import Routing


def newest_usage(routing: dict[str, Routing], newest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U = mean over PRW blocks (and batch, tokens) of 1[routed expert == newest], hard and soft (its probability)."""
    hard = torch.stack([(r.index == newest).float().mean() for r in routing.values()]).mean()
    soft = torch.stack([r.probs[..., newest].float().mean() for r in routing.values()]).mean()
    return hard, soft


def veteran_loss(routing: dict[str, Routing], newest: int, rho: float, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`alpha * |U - rho|` with a straight-through U: the forward value is the hard usage, the gradient that of the
    newest expert's softmax probability (the indicator itself has none). Returns (loss, hard U)."""
    if not routing:
        zero = torch.zeros(())
        return zero, zero
    hard, soft = newest_usage(routing, newest)
    usage = soft + (hard - soft).detach()
    return alpha * (usage - rho).abs(), hard.detach()


def routing_entropy(routing: dict[str, Routing]) -> torch.Tensor:
    """Mean entropy (nats) of the routers' softmax over the active experts."""
    if not routing:
        return torch.zeros(())
    return torch.stack([-torch.special.xlogy(r.probs, r.probs).sum(-1).mean() for r in routing.values()]).mean()


def expert_usage(routing: dict[str, Routing], num_experts: int) -> torch.Tensor:
    """(num_blocks, num_experts) fraction of samples (tokens) routed to each expert, blocks in routing order."""
    return torch.stack([torch.bincount(r.index.flatten(), minlength=num_experts)[:num_experts].float()
                        / r.index.numel() for r in routing.values()])
