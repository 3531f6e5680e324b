"""Activation checkpointing policies: what a checkpointed block keeps for its backward pass, and what it recomputes.

`checkpoint_function(policy)` returns the `checkpoint_fn(function, *args)` that
`CoLoGenTransformer.enable_gradient_checkpointing` applies to every block call of both streams:

* ``"full"``: torch's non-reentrant checkpoint. A block keeps only its inputs; the backward pass reruns its whole
  forward (every matmul and attention kernel again: with the base frozen the backward itself is about one forward,
  so recomputing costs about half of a step's FLOPs).
* ``"selective"``: the same checkpoint with selective activation checkpointing (SAC,
  `torch.utils.checkpoint.create_selective_checkpoint_contexts`). While the block runs forward, a dispatch mode asks
  `selective_policy` about every aten op: the outputs of the ops it marks `MUST_SAVE` are cached and handed back
  when the backward pass recomputes the block (those ops do not run again); everything else is recomputed.

What `selective_policy` keeps, and why (the plan in docs/memory.md computes what it costs):

* **Attention** (`_scaled_dot_product_{flash,efficient,cudnn}_attention`, the CPU flash kernel): the costliest op
  per output element (4 x keys FLOPs per element: 10k for the main pass's 2560 keys), and its output and
  log-sum-exp are what its backward reads anyway.
* **Matmuls that shrink their input** (`mm` / `addmm` / `bmm` / `baddbmm` with a contraction at least twice the
  output's width): the feed-forward down projections (4D -> D), the single blocks' `proj_out` (5D -> D), the LoRA
  down projections (D -> rank) and the routers (D -> experts). Recomputing a matmul costs 2K FLOPs per output
  element for a contraction of K, so these are the most FLOPs avoided per byte kept: 8D and 10D per element against
  2D for the D -> D and D -> 4D projections (q, k, v, output, up projections, modulation), which are recomputed.
  Saving every matmul (torchtitan's op list) would keep about 9 D-wide tensors per token and block: 32 GB at batch 4
  on FLUX.1-dev, far over a 40 GB budget; these keep about 2 (the plan's figures).
* **Random ops** (tagged `nondeterministic_seeded`: the noisy routers' `randn_like`): kept, so a recomputed block
  draws exactly the forward's noise even without the checkpoint's RNG-state preservation. FLUX has no dropout.
  The SDPA kernels carry the tag for their dropout argument; they are kept anyway.

Everything else (layer norms, RMS norms, RoPE, the adaLN modulation and gates, GELU, the LoRA up projections and
scaling, casts, concatenations) is `PREFER_RECOMPUTE`: cheap pointwise work whose outputs are as large as their
inputs.

Ops that write into a tensor they are given (in-place, `out=`) are always recomputed: a cached output would skip
the write on recompute.

SAC works through the eager dispatcher: it sees the ops of a block that runs eagerly. An inductor-compiled block is
opaque to it: it sees only the ATen calls inductor's code makes (`mm.out` and the like, recomputed by the rule
above, and the attention kernel, kept), so it amounts to full checkpointing that keeps the attention outputs. With
compiled blocks, compile the checkpointed call instead (the checkpoint inside the compiled region: Dynamo traces the
policy and the partitioner keeps what it saves). docs/memory.md, "Selective checkpointing"; tests/test_checkpointing.py.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps
from typing import Any

import torch
import torch._functorch.config as functorch_config
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("full", "selective")

aten = torch.ops.aten
ATTENTION_OPS = frozenset(
    getattr(aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(aten, name))
# op -> index of its (M, K) left operand and (K, N) right operand (batched: (B, M, K) and (B, K, N))
MATMUL_OPERANDS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
                   aten.baddbmm.default: (1, 2)}
SHRINK = 2  # a matmul is kept when its contraction is at least SHRINK x its output's width


def shrinking_matmul(op, args) -> bool:
    """True for a matmul whose contraction is at least `SHRINK` times its output's width."""
    operands = MATMUL_OPERANDS.get(op)
    if operands is None:
        return False
    left, right = args[operands[0]], args[operands[1]]
    return left.shape[-1] >= SHRINK * right.shape[-1]


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The SAC policy of `checkpoint_function("selective")` (see the module's docstring)."""
    if isinstance(op, torch._ops.OpOverload) and op._schema.is_mutable:
        # in-place and out= ops write into a caller's tensor: a cached output would skip that write on recompute
        # (inductor's code calls such ops: `mm.out`, the RNG seeds' `randint.low_out`)
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in ATTENTION_OPS or shrinking_matmul(op, args):
        return CheckpointPolicy.MUST_SAVE
    if isinstance(op, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in op.tags:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _full(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def selective_checkpoint(policy_fn: Callable[..., CheckpointPolicy]) -> Callable[..., Any]:
    """A `checkpoint_fn(function, *args)`: torch's non-reentrant checkpoint with the SAC policy `policy_fn(ctx, op,
    *args, **kwargs)`."""
    context_fn = partial(create_selective_checkpoint_contexts, policy_fn)

    def checkpoint_fn(function, *args):
        return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn)

    checkpoint_fn.policy_fn = policy_fn  # type: ignore[attr-defined]
    return checkpoint_fn


_SELECTIVE = selective_checkpoint(selective_policy)


def checkpoint_function(policy: str) -> Callable[..., Any]:
    """The `checkpoint_fn(function, *args)` of `policy` ("full" or "selective") for
    `CoLoGenTransformer.enable_gradient_checkpointing`."""
    if policy == "full":
        return _full
    if policy == "selective":
        return _SELECTIVE
    raise ValueError(f"checkpointing policy {policy!r}: choose one of {', '.join(POLICIES)}")


def check_share(what: str, share: float) -> float:
    """`share` if it is in [0, 1]; else a one-line ValueError naming `what` (the module checks its options with it
    before the backbone loads)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{what} {share}: expected a number in [0, 1]")
    return share


def spread_blocks(count: int, fraction: float) -> list[int]:
    """The indices of `round(fraction * count)` of `count` blocks, spread evenly over the depth (`fraction` 1: all)."""
    check_share("checkpointed fraction of the blocks", fraction)
    chosen = round(fraction * count)
    return [(i * count) // chosen for i in range(chosen)] if chosen else []


def some_blocks(checkpoint_fn: Callable[..., Any], blocks: list[torch.nn.Module]) -> Callable[..., Any]:
    """`checkpoint_fn` for the calls of `blocks` alone; every other block runs plainly and keeps its activations
    (less recompute for more memory). A block call is `checkpoint_fn(block, *args)` (diffusers' main pass) or
    `checkpoint_fn(source_block_fn, block, *args)` (CoLoGenTransformer's source pass)."""
    chosen = {id(b) for b in blocks}

    def checkpoint_some(function, *args):
        block = function if isinstance(function, torch.nn.Module) else args[0]
        return checkpoint_fn(function, *args) if id(block) in chosen else function(*args)

    return checkpoint_some


def with_memory_budget(function: Callable[..., Any], budget: float) -> Callable[..., Any]:
    """A compiled `function` whose graphs keep only `budget` of what their backward pass reads and recompute the rest
    in it, the cheapest ops first (torch's activation memory budget, read by the partitioner of the compiled forward
    and backward: selective recompute inside the compiled region, where fused kernels are visible). It is set only
    while `function` runs, when its graphs compile; 1 keeps what the default partitioner keeps. Every block call
    pays it, so the attribute is set and restored directly (4 us on a 2-core CPU, against 19 us for `config.patch`)."""
    check_share("activation memory budget", budget)

    @wraps(function)
    def run(*args, **kwargs):
        previous = functorch_config.activation_memory_budget
        functorch_config.activation_memory_budget = budget
        try:
            return function(*args, **kwargs)
        finally:
            functorch_config.activation_memory_budget = previous

    return run
