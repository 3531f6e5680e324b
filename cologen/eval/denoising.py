"""Where a model's one-step denoising errs: the error of its clean-image estimate on the tokens a task changes and
on those it keeps (what the output copies from its source), at fixed noise levels.

For x_t = (1 - t) x0 + t n the model predicts the velocity v = n - x0, so its estimate of the clean target is
x0_hat = x_t - t v_hat. A model that copies its source well keeps the kept tokens' error near 0 at every t; a model
unsure *where* to draw spreads its drawing over the kept tokens (the mean over what it cannot tell apart), so their
error grows with t, where x_t says least. `forced_token_gates` asks whether the expert's deltas on the kept tokens
are what costs the copy: it scales every token's deltas by the truth (1 on the changed tokens, 0 on the kept) on
the source stream, the noisy stream or both, the gate a perfect localiser would give.

Beside each error stands the error of x_t itself (`changed_input`, `kept_input`: x0_hat = x_t, what a model that
leaves its input as it is scores, t^2 E|n - x0|^2): a model near it at low t leaves the last steps' noise in what
it draws (README, "Where the speckle is not": on ShapeWorld a few levels of 255).

Used by `cologen eval denoising` (README, "Why grounding lags").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from cologen.metrics.stats import Estimate, bootstrap_ci
from cologen.model.experts import ExpertBank, noisy_name

TIMESTEPS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 0.98)
STREAMS: tuple[str, ...] = ("source", "noisy")
_NOISY_PREFIX = noisy_name("")


@contextlib.contextmanager
def forced_token_gates(model: torch.nn.Module, changed: torch.Tensor, streams: Sequence[str]) -> Iterator[None]:
    """Within the block, every expert bank of `model` scales each token's deltas by `changed` (B, N) (1 where the
    target changes, 0 elsewhere) on the `streams` named ('source': the source pass's first condition, 'noisy': the
    noisy tokens), whatever its own gates say; the other stream keeps the model's own gating. Forced on the noisy
    stream, the gates also decide which noisy tokens take the expert's velocity (`prw.isolate_closed_tokens:
    output`): the changed ones. Passes whose tokens are not the target's grid (a further condition) keep theirs."""
    unknown = set(streams) - set(STREAMS)
    if unknown:
        raise ValueError(f"unknown streams {sorted(unknown)}; expected some of {STREAMS}")
    gate = changed.float()[..., None]
    # hard-gate logits that open exactly the changed tokens (what the source pass hands to the noisy side)
    truth = torch.where(changed.bool(), 20.0, -20.0)
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]

    def forced(bank: ExpertBank, own):
        def forward(hidden, index, weight, num_active, names=("to_k", "to_v"), gate_from=None,
                    return_gate_logits=False, gate_logits=None, gate_context=None):
            stream = "noisy" if names[0].startswith(_NOISY_PREFIX) else "source"
            on_grid = hidden.shape[:2] == changed.shape
            if stream not in streams or not on_grid:
                out = own(hidden, index, weight, num_active, names, gate_from, return_gate_logits, gate_logits,
                          gate_context)
                if return_gate_logits and on_grid and "noisy" in streams and out[1] is not None:
                    return out[0], truth.to(out[1].device, out[1].dtype)
                return out
            deltas = bank._deltas(hidden, index, weight, num_active, names, gate.to(hidden.device, hidden.dtype))
            if not return_gate_logits:
                return deltas
            # the source pass also hands gate logits on (the noisy stream follows them when not forced, and they
            # decide which noisy tokens take the expert's velocity): the truth's where the noisy side is forced
            logits = (bank.gate_logits(gate_from, index, gate_context) if gate_from is not None and bank.has_token_gate
                      else None)
            if logits is not None and "noisy" in streams:
                logits = truth.to(logits.device, logits.dtype)
            return deltas, logits
        return forward

    for bank in banks:
        bank.forward = forced(bank, bank.forward)
    try:
        yield
    finally:
        for bank in banks:
            del bank.forward  # the class's forward again


@torch.no_grad()
def denoising_errors(module, batches: Iterable[dict], timesteps: Sequence[float] = TIMESTEPS, seed: int = 0,
                     gates: Sequence[str] = ()) -> list[dict]:
    """Per noise level t of `timesteps`: the per-sample mean squared error of x0_hat on the changed tokens and on
    the kept ones (`changed`, `kept`: lists over the samples of every batch of `batches` (collated, with sources)
    that have such tokens), and that of x_t itself (`changed_input`, `kept_input`), each batch's noise drawn from
    `seed` and shared by every t. `gates`: streams whose token gates are forced to the truth (`forced_token_gates`)."""
    module.eval()
    rows = [{"t": float(t), "changed": [], "kept": [], "changed_input": [], "kept_input": []} for t in timesteps]
    for batch in batches:
        inputs = module.prepare(batch, False, torch.Generator(device=module.device).manual_seed(seed))
        changed = inputs["changed"]
        if changed is None:
            raise ValueError("denoising errors need sources of the target's size (a task with a condition image)")
        s = inputs["timestep"][:, None, None]
        x0 = inputs["latents"] - s * inputs["velocity"]
        noise = x0 + inputs["velocity"]
        forcing = forced_token_gates(module.model, changed, gates) if gates else contextlib.nullcontext()
        with forcing:
            for row in rows:
                t = row["t"]
                x_t = (1 - t) * x0 + t * noise
                out = module(dict(inputs, latents=x_t, timestep=torch.full_like(inputs["timestep"], t))).sample
                errors = {"": (x_t - t * out.float() - x0).pow(2).mean(-1),  # (B, N)
                          "_input": (x_t - x0).pow(2).mean(-1)}
                for name, where in (("changed", changed), ("kept", ~changed)):
                    count = where.sum(1)
                    for suffix, err in errors.items():
                        per_sample = (err * where).sum(1) / count.clamp(min=1)
                        row[name + suffix] += [float(v) for v, c in zip(per_sample, count) if c > 0]
    return rows


def summarize_errors(rows: list[dict]) -> list[dict[str, float | Estimate]]:
    """Per t: the mean error on changed and kept tokens, the model's and x_t's, with 95% intervals over the
    samples."""
    names = ("changed", "kept", "changed_input", "kept_input")
    return [{"t": r["t"], **{name: bootstrap_ci([r[name]]) for name in names}} for r in rows]


def errors_table(summaries: dict[str, list[dict]]) -> str:
    """Markdown: one row per run label (e.g. 'grounding, gates forced on both') and t; beside each error, x_t's."""
    lines = ["| run | t | error on changed tokens | x_t's on them | error on kept tokens | x_t's on them |",
             "|---|---|---|---|---|---|"]
    for label, summary in summaries.items():
        for r in summary:
            lines.append(f"| {label} | {r['t']:.2f} | {r['changed'].format(4)} | {r['changed_input'].format(4)} | "
                         f"{r['kept'].format(4)} | {r['kept_input'].format(4)} |")
    return "\n".join(lines) + "\n"
