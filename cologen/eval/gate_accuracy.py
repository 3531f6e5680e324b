"""How well a model's token gates find the tokens its task changes: per block, for the union of the blocks (the
noisy tokens no block opens keep the base's velocity with `prw.isolate_closed_tokens: output`) and, for a model with
`prw.open_rule` 'majority' or 'all', for the tokens that many blocks open (those that take the expert's velocity):
the share of the changed tokens the hard gates open (recall) and the share of the open tokens that change
(precision), over a task's validation examples. A gate that misses changed tokens leaves them the base's copy of the
source (an inpainting hole left grey); one that opens kept tokens lets the expert alter what should stay.

Used by `cologen eval gates` (README, "What the gates open").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cologen.model.experts import hard_gate_open

UNION = "any block"


@torch.no_grad()
def gate_counts(module, batches: Iterable[dict], seed: int = 0) -> dict[str, dict[str, int]]:
    """Per block name (and `UNION`): changed tokens, open tokens and open changed tokens summed over `batches`
    (collated, with sources of the target's size), each prepared with noise and timesteps drawn from `seed`."""
    module.eval()
    counts: dict[str, dict[str, int]] = {}

    def add(name: str, open_: torch.Tensor, changed: torch.Tensor) -> None:
        c = counts.setdefault(name, {"changed": 0, "open": 0, "open_changed": 0})
        c["changed"] += int(changed.sum())
        c["open"] += int(open_.sum())
        c["open_changed"] += int((open_ & changed).sum())

    for batch in batches:
        inputs = module.prepare(batch, False, torch.Generator(device=module.device).manual_seed(seed))
        changed = inputs["changed"]
        if changed is None:
            raise ValueError("gate accuracy needs sources of the target's size (a task with a condition image)")
        gates = {name: g for name, g in module(inputs).token_gates.items() if g.shape == changed.shape}
        if not gates:
            raise ValueError("this model's experts have no token gates on the target's grid (prw.token_gate)")
        opened = {name: hard_gate_open(g) for name, g in gates.items()}
        add(UNION, torch.stack(list(opened.values())).any(0), changed)
        rule = module.model.prw.open_rule
        if rule != "any":  # the tokens that take the expert's velocity under the model's rule (prw.open_rule)
            add(f"{rule} of blocks", module.model.opened_tokens(gates), changed)
        for name, open_ in opened.items():
            add(name, open_, changed)
    return counts


def accuracy(counts: dict[str, int]) -> dict[str, float]:
    """Recall (open changed / changed), precision (open changed / open) and open / changed (1: the gates open as
    many tokens as change)."""
    changed, open_, both = counts["changed"], counts["open"], counts["open_changed"]
    nan = float("nan")
    return {"recall": both / changed if changed else nan, "precision": both / open_ if open_ else nan,
            "open_per_changed": open_ / changed if changed else nan}


def gates_table(results: dict[str, dict[str, dict[str, int]]]) -> str:
    """Markdown: one row per task and block (the union first, then the model's vote when it has one)."""
    lines = ["| task | block | recall | precision | open / changed | changed tokens |", "|---|---|---|---|---|---|"]
    for task, per_block in results.items():
        for name in [UNION] + [n for n in per_block if n != UNION]:
            a = accuracy(per_block[name])
            lines.append(f"| {task} | {name} | {a['recall']:.3f} | {a['precision']:.3f} | "
                         f"{a['open_per_changed']:.2f} | {per_block[name]['changed']} |")
    return "\n".join(lines) + "\n"
