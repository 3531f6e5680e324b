"""Routing supervision (the paper's Veteran Gate and this project's per-sample task routing) and routing
statistics.

Implements method.md, "Veteran Gate": `alpha * |U - rho|` on the newest expert's share U of the routing decisions.
"""

from __future__ import annotations

import torch

from .router import Routing


def chosen(r: Routing) -> torch.Tensor:
    """The router's own choice: its argmax, which is `r.index` unless the choice was forced (teacher forcing in
    training, oracle routing): the statistics below read what the routers decide, not what they were told."""
    return r.probs.argmax(-1)


def newest_usage(routing: dict[str, Routing], newest: int, executed: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """U = mean over PRW blocks (and batch, tokens) of 1[chosen expert == newest], hard and soft (its probability).
    `executed`: the routing as run (`r.index`, forced or not) instead of the routers' own choice."""
    hard = torch.stack([((r.index if executed else chosen(r)) == newest).float().mean() for r in routing.values()]).mean()
    soft = torch.stack([r.probs[..., newest].float().mean() for r in routing.values()]).mean()
    return hard, soft


def veteran_loss(routing: dict[str, Routing], newest: int, rho: float, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`alpha * |U - rho|` with a straight-through U: the forward value is the executed routing's hard usage, the
    gradient that of the newest expert's softmax probability (the indicator itself has none). Under teacher forcing
    the executed share is the forced one, which the batch's mix sets near rho: the loss is then nearly inert and the
    task routing loss trains the routers. Returns (loss, executed hard U)."""
    if not routing:
        zero = torch.zeros(())
        return zero, zero
    hard, soft = newest_usage(routing, newest, executed=True)
    usage = soft + (hard - soft).detach()
    return alpha * (usage - rho).abs(), hard.detach()


def routing_entropy(routing: dict[str, Routing]) -> torch.Tensor:
    """Mean entropy (nats) of the routers' softmax over the active experts."""
    if not routing:
        return torch.zeros(())
    return torch.stack([-torch.special.xlogy(r.probs, r.probs).sum(-1).mean() for r in routing.values()]).mean()


def expert_usage(routing: dict[str, Routing], num_experts: int) -> torch.Tensor:
    """(num_blocks, num_experts) fraction of samples (tokens) each block's router chooses each expert for, blocks in
    routing order."""
    usage = []
    for r in routing.values():
        choice = chosen(r).flatten()
        usage.append(torch.bincount(choice, minlength=num_experts)[:num_experts].float() / choice.numel())
    return torch.stack(usage)


def task_routing_loss(routing: dict[str, Routing], own: torch.Tensor, sample_weight: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample routing supervision (ours): mean over PRW blocks (and tokens) of `-log p[own expert]`, where
    `own` (B,) is the expert of the curriculum step that learned each sample's task. Unlike the veteran loss,
    which constrains only the batch-wide share of the newest expert (one fixed expert per block satisfies it), it
    rewards routing that depends on the task. `sample_weight` (B,), when given, weighs the samples in the batch
    mean (e.g. `task_balanced_weights`; 0 leaves a sample out). Returns (loss, share of decisions on the own
    expert by the routers' own choice, unweighted)."""
    losses, hits = [], []
    w = None if sample_weight is None else sample_weight.float().to(own.device)
    for r in routing.values():
        target = own.to(r.probs.device)
        if r.probs.dim() == 3:
            target = target[:, None].expand(r.probs.shape[:2])
        p = r.probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        nll = -torch.log(p.float().clamp_min(1e-12))
        nll = nll.mean(-1) if nll.dim() == 2 else nll  # (B,)
        losses.append(nll.mean() if w is None else (nll * w).sum() / w.sum().clamp_min(1e-12))  # all 0: no loss
        hits.append((chosen(r) == target).float().mean())
    return torch.stack(losses).mean(), torch.stack(hits).mean().detach()


def task_balanced_weights(tasks: list[str]) -> torch.Tensor:
    """(B,) weights under which every task in the batch weighs the same in total (1 / its sample count, scaled to
    mean 1): a replayed task's few samples are not outweighed by the new task's many."""
    counts = {t: tasks.count(t) for t in set(tasks)}
    w = torch.tensor([1.0 / counts[t] for t in tasks])
    return w * len(tasks) / w.sum()


def token_gate_loss(gates: dict[str, torch.Tensor], changed: torch.Tensor,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-gate supervision (ours): mean over PRW blocks of the binary cross-entropy between each token's gate
    `sigmoid(logit)` and whether the target changes there (`changed` (B, N)), so an expert learns to leave alone
    what the output copies (outside an inpainting hole). `gates` are the first condition's (`CoLoGenOutput.
    token_gates`): the others have no grid of their own in the target. `weights` (B, N): each token's weight
    (`veteran.gate_pos_weight`; None: 1). Returns (loss, accuracy of "open" (`logit >= 0`) against `changed`)."""
    target = changed.float()
    losses = [torch.nn.functional.binary_cross_entropy_with_logits(
        g.float(), target.to(g.device), weight=None if weights is None else weights.to(g.device))
        for g in gates.values()]
    hits = [((g >= 0) == changed.to(g.device)).float().mean() for g in gates.values()]  # open: logit >= 0
    return torch.stack(losses).mean(), torch.stack(hits).mean().detach()
