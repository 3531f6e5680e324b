"""What the routers' decisions rest on: each block's logit margin of a task's own expert over its strongest rival,
split into the router's terms (pooled source features, prompt, timestep bias, entry offset).

A decision strays when the margin is below 0; the split says which input pulls it there (measured with it: the
grounding probes' source term favours editing's expert, and their prompt term wins it back). Used by
`cologen eval shapeworld --routing-terms`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch

from cologen.model.router import NoisyTop1Router

TERMS: tuple[str, ...] = ("source", "prompt", "timestep", "offset")


@contextlib.contextmanager
def record_routing_terms(model: torch.nn.Module) -> Iterator[dict[str, list[dict[str, torch.Tensor]]]]:
    """Within the block, every call of a router of `model` (a CoLoGenTransformer) adds its scaled logit terms (B, E)
    or (B, N, E) to `records[block name]` (the names of the routing statistics: 'double.0', 'single.3'): each term
    over the router's temperature, as the softmax sees it, plus the entry offset; they sum to the logits the router
    chose from."""
    records: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)

    def hook(name: str):
        def record(router: NoisyTop1Router, args: tuple, _output) -> None:
            hidden, _num_active, offset, timestep_bin, prompt = args[:5]
            with torch.no_grad():
                terms = {k: v / router.temperature for k, v in router.logit_terms(hidden, timestep_bin, prompt).items()
                         if k != "noise"}
                terms["offset"] = offset.float().expand_as(terms["source"])
            records[name].append({k: v.detach().cpu() for k, v in terms.items()})
        return record

    handles = [attn.prw_router.register_forward_hook(hook(name))
               for name, attn in zip(model.prw_block_names, model.prw_modules()) if attn.prw_router is not None]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def margin_terms(calls: list[dict[str, torch.Tensor]], own: int, num_active: int) -> dict[str, float]:
    """One router's decisions over `calls`: the share won by expert `own` (a positive margin: own minus the
    strongest active rival), the margin's mean and standard deviation, each term's mean part of it and the rival
    most often strongest."""
    terms = {k: torch.cat([c[k].reshape(-1, c[k].shape[-1]) for c in calls]) for k in TERMS if k in calls[0]}
    total = sum(terms.values())[:, :num_active]
    rivals = total.clone()
    rivals[:, own] = float("-inf")
    rival = rivals.argmax(-1)
    split = {k: v[:, own] - v.gather(1, rival[:, None])[:, 0] for k, v in terms.items()}
    margin = sum(split.values())
    out = {"decisions": int(margin.numel()), "own_expert": float((total.argmax(-1) == own).float().mean()),
           "margin_mean": float(margin.mean()),
           "margin_std": float(margin.std()) if margin.numel() > 1 else 0.0,
           "main_rival": int(torch.bincount(rival, minlength=num_active).argmax())}
    out.update({f"{k}_mean": float(v.mean()) for k, v in split.items()})
    return out


def summarize_routing_terms(records: dict[str, list[dict[str, torch.Tensor]]], own: int,
                            num_active: int) -> dict[str, dict[str, float]]:
    """`margin_terms` per block, in the order the routers were first called."""
    if num_active < 2:
        return {}
    return {name: margin_terms(calls, own, num_active) for name, calls in records.items() if calls}


def routing_terms_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per task and block."""
    header = ("task", "block", "own expert", "margin (mean ± sd)", "source", "prompt", "timestep", "offset",
              "main rival")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, blocks in summary.items():
        for block, s in blocks.items():
            terms = [f"{s[f'{k}_mean']:+.2f}" if f"{k}_mean" in s else "" for k in TERMS]
            lines.append("| " + " | ".join([task, block, f"{s['own_expert']:.3f}",
                                            f"{s['margin_mean']:+.2f} ± {s['margin_std']:.2f}", *terms,
                                            str(s["main_rival"])]) + " |")
    return "\n".join(lines) + "\n"
