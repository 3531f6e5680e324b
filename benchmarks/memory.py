"""The memory plan of CoLoGen training: parameter, gradient, optimizer and activation bytes per switch.

Parameters are counted from the models' published configs built on the meta device (no memory, no download).
Activations are the tensors autograd saves for the backward pass, recorded with `saved_tensors_hooks` while the real
CoLoGenTransformer forward runs on meta tensors of the real shapes, so every saved tensor of diffusers' blocks, the
source stream, the experts and the routers is counted, each storage once. Attention is replaced by a stand-in that
saves what the kernels save: q, k, v, the output and the log-sum-exp for fused kernels (flash, cuDNN, memory
efficient: what PyTorch SDPA picks on a GPU for bf16), q, k, v and the probabilities for the math kernel.

With gradient checkpointing a block keeps only its inputs (each block's input hidden states, the shared temb and
RoPE tables) and the source stream's keys/values (the main pass reads them); the backward pass recomputes one block
at a time, so the largest block's activations are added once. Selective checkpointing (`model.checkpointing_policy:
selective`, cologen/model/checkpointing.py) keeps, besides, the outputs its policy saves: the bytes are read from the
selective-checkpoint caches themselves at the end of the forward, with the matmul and attention FLOPs those saved ops
spare the recomputation (and what full checkpointing recomputes). Not counted: the allocator's fragmentation and
cache, CUDA/cuBLAS workspaces, transient tensors inside a block and gradient buffers in flight (the GPU benchmark's
peak-memory column measures all of it).
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import flop_registry

import cologen.model.attention as prw_attention
from benchmarks.flux_models import FLUX_DEV_TRANSFORMER, PAPER_PRW, build_cologen, forward_loss, make_inputs
from cologen.model.checkpointing import checkpoint_function, selective_policy
from cologen.model.cologen_transformer import CoLoGenTransformer

GB = 1e9


# ------------------------------------------------------------------------------------------------- attention
class _FusedAttention(torch.autograd.Function):
    """Saves what flash / memory-efficient kernels save; the values are never used (meta tensors). The output and
    log-sum-exp come from the flash kernel's op (its meta kernel on the meta device), so a selective checkpointing
    policy sees the attention op it would see on a GPU."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, S, H, D) as diffusers' dispatch
        aten = torch.ops.aten
        flash = aten._scaled_dot_product_flash_attention_for_cpu if q.device.type == "cpu" else \
            aten._scaled_dot_product_flash_attention
        out, lse = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[:2]  # (B, H, S, D), (B, H, S)
        out = out.transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _MathAttention(torch.autograd.Function):
    """Saves the (B, H, Sq, Sk) probabilities as the unfused math kernel does."""

    @staticmethod
    def forward(ctx, q, k, v):
        probs = q.new_empty(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        ctx.save_for_backward(q, k, v, probs)
        return torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2)  # the kernel's last bmm, as the policy sees it

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def attention_standin(kind: str) -> Iterator[None]:
    fn = {"fused": _FusedAttention, "math": _MathAttention}[kind]

    def dispatch(query, key, value, attn_mask=None, backend=None, parallel_config=None, **_):
        return fn.apply(query, key, value)

    original = prw_attention.dispatch_attention_fn
    prw_attention.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        prw_attention.dispatch_attention_fn = original


# ----------------------------------------------------------------------------------------------- activations
def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


def _pass_of(args, kwargs) -> str:
    for obj in list(args) + list(kwargs.values()):
        if isinstance(obj, dict) and "prw" in obj:
            return obj["prw"].mode
    return "main"


@dataclass
class ActivationBytes:
    saved: int  # saved for backward (with checkpointing: outside the blocks, and each checkpointed block's inputs)
    kv_stash: int = 0  # with checkpointing: the source keys/values the main pass reads back when recomputed
    recompute: int = 0  # with checkpointing: one block's activations while it is recomputed (the largest)
    per_block: dict[str, int] = field(default_factory=dict)  # without checkpointing: bytes saved per pass:block
    kept: int = 0  # selective checkpointing: the outputs its policy saves (held until the backward pass)
    block_flops: int = 0  # with checkpointing: matmul + attention FLOPs of the checkpointed blocks' forward
    recompute_flops: int = 0  # ... of which the backward pass recomputes (all with full checkpointing)

    @property
    def total(self) -> int:
        return self.saved + self.kept + self.kv_stash + self.recompute


def _flops(op, args, kwargs, out) -> int:
    count = flop_registry.get(getattr(op, "overloadpacket", None))
    return int(count(*args, **kwargs, out_val=out)) if count is not None else 0


class _BlockFlops(TorchDispatchMode):
    """Counts the matmul and attention FLOPs of the ops that run inside a block (`inside()` says when)."""

    def __init__(self, inside: Callable[[], bool]):
        super().__init__()
        self.inside, self.flops = inside, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside():
            self.flops += _flops(func, args, kwargs or {}, out)
        return out


class _Selective:
    """The selective `checkpoint_fn`, remembering its caches and the FLOPs of the ops its policy saves."""

    def __init__(self):
        self.caches: list[weakref.ref] = []  # each checkpointed call's cache (alive while its graph is)
        self.saved_flops = 0

    def policy(self, ctx, op, *args, **kwargs):
        decision = selective_policy(ctx, op, *args, **kwargs)
        if not ctx.is_recompute and decision == CheckpointPolicy.MUST_SAVE:
            self.saved_flops += _flops(op, args, kwargs, ctx.op_output)
        return decision

    def context_fn(self):
        forward, recompute = create_selective_checkpoint_contexts(self.policy)
        self.caches.append(weakref.ref(recompute))  # the recomputation's mode holds the cache
        return forward, recompute

    def __call__(self, function, *args):
        return checkpoint(function, *args, use_reentrant=False, context_fn=self.context_fn)

    def kept_tensors(self) -> Iterator[torch.Tensor]:
        for ref in self.caches:
            mode = ref()
            for entries in (mode.storage.values() if mode is not None else ()):
                for entry in entries.values():
                    yield from _cached(entry)


def _cached(entry) -> Iterator[torch.Tensor]:
    """The tensors of a selective-checkpoint cache entry (a wrapped output, or a tuple of them)."""
    if isinstance(entry, (tuple, list)):
        for item in entry:
            yield from _cached(item)
    elif isinstance(getattr(entry, "val", None), torch.Tensor):
        yield entry.val


def activation_bytes(model: CoLoGenTransformer, inputs: dict, checkpointing: bool, attention: str = "fused",
                     recompute: int | None = None, policy: str = "full") -> ActivationBytes:
    """Bytes of activations one training step keeps for its backward pass (run it on meta tensors).

    With checkpointing, `policy` is the checkpointing policy ("full" or "selective") and `recompute` the largest
    block's activations (`max(per_block)` of a run without it; measured when not given; with the selective policy
    an upper bound: the block's saved outputs, counted in `kept`, are not recomputed).
    """
    checkpoint_function(policy)  # a known policy
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    # Weak references: what counts is what is still alive when the forward ends (a branch that feeds nothing,
    # such as the last source block's output, is freed with its graph, and its storage address may be reused).
    saved: list[tuple[weakref.ref, str]] = []
    label = ["outside"]

    def record(t: torch.Tensor) -> None:
        saved.append((weakref.ref(t), label[0]))

    def pack(t: torch.Tensor):
        record(t)
        return t

    handles = []
    for name, block in model._named_blocks():
        def pre(module: nn.Module, args, kwargs, name=name):
            if checkpointing:  # a checkpointed block keeps its inputs (torch saves them, too: counted once)
                for t in _tensors(list(args) + list(kwargs.values())):
                    record(t)
            label[0] = f"{_pass_of(args, kwargs)}:{name}"

        def post(module: nn.Module, args, kwargs, output):
            label[0] = "outside"

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    was, was_fn = model.gradient_checkpointing, model._checkpoint_fn
    model.train()
    selective = _Selective() if checkpointing and policy == "selective" else None
    model.enable_gradient_checkpointing(checkpointing, selective or checkpoint_function(policy))
    seen: dict[int, int] = {}  # storage -> bytes: each live storage once, however many ops save it or its views
    per_block: dict[str, int] = {}
    kept = 0
    flops = _BlockFlops(lambda: label[0] != "outside")
    try:
        with attention_standin(attention), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flops:
            loss = forward_loss(model, inputs)
        for ref, where in saved:
            t = ref()
            if t is None:
                continue
            storage = t.untyped_storage()
            sid = storage._cdata
            if sid in params or sid in seen:
                continue
            seen[sid] = storage.nbytes()
            per_block[where] = per_block.get(where, 0) + storage.nbytes()
        for t in selective.kept_tensors() if selective is not None else ():
            storage = t.untyped_storage()
            if storage._cdata not in params and storage._cdata not in seen:
                seen[storage._cdata] = storage.nbytes()
                kept += storage.nbytes()
        del loss
    finally:
        model.enable_gradient_checkpointing(was, was_fn)
        for h in handles:
            h.remove()
    report = ActivationBytes(saved=sum(seen.values()) - kept, per_block={} if checkpointing else per_block,
                             kept=kept)
    if checkpointing:
        report.block_flops = flops.flops
        report.recompute_flops = flops.flops - (selective.saved_flops if selective is not None else 0)
        sources = inputs["source_tokens"]  # one condition, or one tensor per condition (each stashes its K/V)
        sources = sources if isinstance(sources, list) else [sources]
        b, ns = sources[0].shape[0], sum(s.shape[1] for s in sources)
        cfg = model.transformer.config
        width = cfg.num_attention_heads * cfg.attention_head_dim
        itemsize = model.transformer.x_embedder.weight.element_size()
        report.kv_stash = 2 * b * ns * width * itemsize * len(model.block_names)
        if recompute is None:
            recompute = max(activation_bytes(model, inputs, False, attention).per_block.values())
        report.recompute = recompute
    return report


# ------------------------------------------------------------------------------------------------ parameters
def count_params(build: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def text_encoder_params() -> dict[str, int]:
    """FLUX.1's CLIP-L text encoder and T5-XXL encoder, from their published configs."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu")
    return {"clip_l": count_params(lambda: CLIPTextModel(clip)), "t5_xxl": count_params(lambda: T5EncoderModel(t5))}


def vae_params() -> int:
    from diffusers import AutoencoderKL

    return count_params(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False))


@dataclass
class MemoryPlan:
    base_params: int
    expert_params: int  # all experts of all PRW blocks
    router_params: int
    trainable_params: int  # newest expert + routers
    text_encoder_params: dict[str, int]
    vae_params: int
    activations: dict[tuple[int, str, str], ActivationBytes]  # (batch, checkpointing: CHECKPOINTING, attention)

    def persistent(self, base_bytes: int = 2, eight_bit: bool = False, shards: int = 1) -> float:
        """Weights, gradients and AdamW states that live through a step (one trained expert's states)."""
        adam = 2 if eight_bit else 8
        return (self.base_params * base_bytes / shards + (self.expert_params + self.router_params) * 4
                + self.trainable_params * (4 + adam))


CHECKPOINTING = ("off", "full", "selective")  # the budget's checkpointing column: none, then `checkpointing_policy`


def plan(config: dict | None = None, batch_sizes: tuple[int, ...] = (1, 4), rows: int = 32, cols: int = 32,
         text_tokens: int = 512) -> MemoryPlan:
    config = config or FLUX_DEV_TRANSFORMER
    model = build_cologen(config, PAPER_PRW, device="meta", dtype=torch.bfloat16)
    experts = sum(p.numel() for p in model.expert_parameters())
    routers = sum(p.numel() for p in model.router_parameters())
    base = sum(p.numel() for p in model.base_parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    acts = {}
    for b in batch_sizes:
        inputs = make_inputs(config, b, rows, cols, text_tokens, device="meta")
        for attention in ("fused", "math"):
            off = acts[(b, "off", attention)] = activation_bytes(model, inputs, False, attention)
            for policy in CHECKPOINTING[1:]:
                acts[(b, policy, attention)] = activation_bytes(model, inputs, True, attention,
                                                                recompute=max(off.per_block.values()), policy=policy)
    return MemoryPlan(base, experts, routers, trainable, text_encoder_params(), vae_params(), acts)


DOC = "docs/memory.md"
COMMAND = "python -m benchmarks.memory --write-docs"
GOAL_GB = 40.0
# measured with `make bench-gpu` on one H200 (docs/benchmarks.md); quoted beside the computed savings
MEASURED = {
    "bf16": "H200: the whole bf16 run peaks at 29.5 GB (batch 1, checkpointing); an fp32 base alone would be 47.6 GB",
    "checkpointing": "H200: 8.6 GB at batch 1 (38.1 -> 29.5 GB peak); 34.3 GB at batch 4 (72.8 -> 38.5 GB)",
}


def _gb(x: float, digits: int = 1) -> str:
    return f"{x / GB:.{digits}f} GB"


def _streams(act: ActivationBytes) -> dict[str, int]:
    """Activation bytes per pass (`source` stream, `main` pass) of a run without checkpointing."""
    out: dict[str, int] = {}
    for where, n in act.per_block.items():
        stream = where.split(":", 1)[0]
        out[stream] = out.get(stream, 0) + n
    return out


def switches_table(p: MemoryPlan) -> str:
    """The switches table of docs/memory.md (savings computed from `p`, batch 1 unless stated)."""
    a = p.activations
    enc = sum(p.text_encoder_params.values())
    fused1, fused1_ck = a[(1, "off", "fused")].total, a[(1, "full", "fused")].total
    math1, math1_ck = a[(1, "off", "math")].total, a[(1, "full", "math")].total
    adapters = (p.expert_params + p.router_params) * 4
    rows = [
        ("frozen base in bf16, experts and routers fp32",
         "`model.preset.init_args.dtype: bfloat16`, `trainer.precision: 32-true` (on)",
         f"{_gb(p.base_params * 2)} of base weights ({p.base_params / 1e9:.2f}B params: {_gb(p.base_params * 4)} "
         f"in fp32 -> {_gb(p.base_params * 2)} in bf16); the {p.expert_params / 1e6:.0f}M expert and "
         f"{p.router_params / 1e6:.2f}M router parameters stay fp32 ({_gb(adapters)})", MEASURED["bf16"]),
    ]
    if (4, "off", "fused") in a:
        fused4, fused4_ck = a[(4, "off", "fused")].total, a[(4, "full", "fused")].total
        rows.append(("gradient checkpointing per block", "`model.gradient_checkpointing: true` (on)",
                     f"{_gb(fused1 - fused1_ck)} of activations at batch 1 ({_gb(fused1)} -> {_gb(fused1_ck)}); "
                     f"{_gb(fused4 - fused4_ck)} at batch 4 ({_gb(fused4)} -> {_gb(fused4_ck)})",
                     MEASURED["checkpointing"]))
    if (1, "selective", "fused") in a:
        rows.append(("selective checkpointing: keep attention and the down projections, recompute the rest",
                     "`model.checkpointing_policy: selective` (off: `full`)", selective_saving(p), "not measured"))
    rows += [
        ("precomputed text embeddings, no text encoders",
         "`model.load_text_encoder: false` (`precomputed.yaml`)",
         f"{_gb(enc * 2)}: T5-XXL ({p.text_encoder_params.get('t5_xxl', 0) / 1e9:.2f}B) + CLIP-L "
         f"({p.text_encoder_params.get('clip_l', 0) / 1e9:.2f}B) in bf16 never reach the GPU, nor host memory",
         "not measured"),
        ("text encoders offloaded after encoding", "`model.offload_text_encoder: true` (on)",
         f"{_gb(enc * 2)} during the transformer's forward and backward; a step that encodes a prompt not yet "
         "cached holds them on the GPU for the encoding (see below)", "not measured"),
        ("fused / memory-efficient attention",
         "`model.attention_backend: null` (on: PyTorch SDPA with flash / memory-efficient kernels; cuDNN's is "
         "excluded on CUDA, its backward fails on these shapes, docs/benchmarks.md)",
         f"vs the math kernel: {_gb(math1 - fused1)} at batch 1 without checkpointing ({_gb(math1)} -> "
         f"{_gb(fused1)}); {_gb(math1_ck - fused1_ck)} with checkpointing (one block's probabilities while it is "
         "recomputed)", "not measured"),
        ("8-bit AdamW states", "`model.optim.eight_bit: true` (off; `pip install 'cologen[gpu]'`)",
         f"{_gb(p.trainable_params * 6, 2)} per trained expert: {p.trainable_params / 1e6:.1f}M trainable "
         "parameters (one expert in every block, plus the routers), 8 -> 2 bytes of state each", "not measured"),
        ("sharded frozen base (FSDP)", "`--config experiments/flux_dev/fsdp.yaml`",
         f"(1 - 1/N) x {_gb(p.base_params * 2 + adapters)} of base and expert weights per GPU on N GPUs: "
         f"{_gb((p.base_params * 2 + adapters) * 7 / 8)} on 8 GPUs", "not measured"),
    ]
    lines = ["| switch | config key (flux_dev default) | saves (computed) | measured |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {a_} | {b_} | {c_} | {d_} |" for a_, b_, c_, d_ in rows])


def selective_saving(p: MemoryPlan) -> str:
    """The switches table's cell of selective checkpointing: its cost in memory and what it spares (vs full)."""
    a = p.activations
    cells = []
    for b in sorted({k[0] for k in a}):
        full, sel = a[(b, "full", "fused")], a[(b, "selective", "fused")]
        cells.append(f"{_gb(sel.total - full.total)} more activations than full checkpointing at batch {b} "
                     f"({_gb(full.total)} -> {_gb(sel.total)}, peak {_gb(p.persistent() + sel.total)})")
    sel = a[(1, "selective", "fused")]
    return ("; ".join(cells) + f"; the backward pass recomputes {sel.recompute_flops / sel.block_flops:.0%} of the "
            f"blocks' matmul and attention FLOPs instead of all ({sel.recompute_flops / 1e12:.1f} of "
            f"{sel.block_flops / 1e12:.1f} TFLOP per sample)")


def selective_note(p: MemoryPlan) -> str:
    """What selective checkpointing keeps per block and token, and where it fits the 40 GB goal."""
    a = p.activations
    fits = [b for b in sorted({k[0] for k in a}) if p.persistent() + a[(b, "selective", "fused")].total <= GOAL_GB * GB]
    sel1, full1 = a[(1, "selective", "fused")], a[(1, "full", "fused")]
    text = (f"Selective checkpointing keeps {_gb(sel1.kept, 2)} per sample (batch 1) of attention outputs, "
            f"log-sum-exps and down-projection outputs, and the backward pass recomputes "
            f"{sel1.recompute_flops / 1e12:.1f} TFLOP of matmuls and attention per sample instead of "
            f"{full1.recompute_flops / 1e12:.1f} TFLOP ({1 - sel1.recompute_flops / full1.recompute_flops:.0%} less). ")
    text += (f"Its estimated peak stays under {GOAL_GB:.0f} GB at batch {', '.join(map(str, fits))}"
             if fits else f"Its estimated peak is over {GOAL_GB:.0f} GB at every batch size planned")
    over = [b for b in sorted({k[0] for k in a}) if b not in fits]
    if over:
        text += (f"; at batch {', '.join(map(str, over))} it is over, so there full checkpointing (or selective on "
                 "fewer blocks) is the one that fits")
    return text + "."


def persistent_line(p: MemoryPlan) -> str:
    trained = p.trainable_params
    return (f"Persistent through a step: base {_gb(p.base_params * 2, 2)} (bf16) + experts and routers "
            f"{_gb((p.expert_params + p.router_params) * 4, 2)} (fp32) + gradients of the trained expert and the "
            f"routers {_gb(trained * 4, 2)} + their AdamW states {_gb(trained * 8, 2)} = "
            f"**{_gb(p.persistent(), 2)}** ({_gb(p.persistent(eight_bit=True), 2)} with 8-bit states).")


def budget_table(p: MemoryPlan) -> str:
    """Activations and the estimated peak per (batch, checkpointing, attention); the flux_dev default in bold."""
    lines = ["| batch | checkpointing | attention | activations | estimated peak (persistent + activations) |",
             "|---|---|---|---|---|"]
    order = {mode: i for i, mode in enumerate(CHECKPOINTING)}
    for (b, ckpt, attention), act in sorted(p.activations.items(), key=lambda kv: (kv[0][0], order[kv[0][1]],
                                                                                       kv[0][2])):
        peak = p.persistent() + act.total
        default = b == 1 and ckpt == "full" and attention == "fused"
        acts = _gb(act.total, 2)
        if default:
            acts = (f"**{acts}** ({act.saved / GB:.2f} saved: block inputs and the embedders'; "
                    f"{act.kv_stash / GB:.2f} source K/V the main pass reads back; {act.recompute / GB:.2f} one "
                    "recomputed block)")
        if ckpt == "selective" and attention == "fused":
            acts += f" ({act.kept / GB:.2f} kept by the policy)"
        cells = [str(b), ckpt, attention, acts, _gb(peak)]
        if default:
            cells[1:3] = [f"**{c}**" for c in cells[1:3]]
            cells[4] = f"**{cells[4]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(p: MemoryPlan) -> str:
    """What the budget means for the 40 GB goal (and DDP's extra buckets)."""
    a = p.activations
    off, on = p.persistent() + a[(1, "off", "fused")].total, p.persistent() + a[(1, "full", "fused")].total
    streams = _streams(a[(1, "off", "fused")])
    text = [f"At batch 1 the estimate is {_gb(on)} with checkpointing and {_gb(off)} without it, "
            + ("over" if off > GOAL_GB * GB else "under") + f" the {GOAL_GB:.0f} GB goal before any allocator "
            "overhead (measured on an H200: 29.5 GB and 38.1 GB)"]
    if (4, "full", "fused") in a:
        text[0] += f"; batch 4 with checkpointing is {_gb(p.persistent() + a[(4, 'full', 'fused')].total)}"
    text[0] += "."
    if {"source", "main"} <= set(streams):
        text.append(f"Without checkpointing the source stream keeps almost as much as the noisy stream "
                    f"({_gb(streams['source'])} vs {_gb(streams['main'])} at batch 1): it has fewer tokens (1024 vs "
                    "1536) but every one of its blocks keeps fp32 tensors for the experts (below).")
    buckets = (p.expert_params + p.router_params) * 4
    text.append("A data-parallel run adds its own buffers: DDP's reducer allocates gradient buckets for every "
                "parameter registered with it, and `CurriculumDDPStrategy` registers the whole expert bank (so a "
                f"later curriculum step can train its expert): about {_gb(buckets)} more per GPU, {_gb(on + buckets)} "
                "at batch 1. FSDP has no such buckets.")
    return "\n".join(text)


def offload_note(p: MemoryPlan) -> str:
    enc = sum(p.text_encoder_params.values()) * 2
    step = p.persistent() + p.activations[(1, "full", "fused")].total
    return (f"* **Offloading is not a peak saving on its own.** The offloaded T5-XXL moves to the GPU while it "
            f"encodes prompts that are not in its cache. That moment holds the persistent {_gb(p.persistent())} "
            f"plus {_gb(enc)} of encoder weights ({_gb(p.persistent() + enc)}), which with checkpointing at batch 1 "
            f"is {'more' if p.persistent() + enc > step else 'less'} than the training step itself ({_gb(step)}). "
            f"It {'still fits' if p.persistent() + enc <= GOAL_GB * GB else 'does not fit'} {GOAL_GB:.0f} GB; the "
            "real saving is precomputed embeddings (`data_recipes.precompute`, then `precomputed.yaml`), which also "
            f"spare the {_gb(enc)} of host memory per process.")


def doc_sections(p: MemoryPlan) -> dict[str, str]:
    """The generated sections of docs/memory.md."""
    return {"memory.switches": switches_table(p), "memory.persistent": persistent_line(p),
            "memory.budget": budget_table(p), "memory.verdict": verdict(p), "memory.offload": offload_note(p),
            "memory.selective": selective_note(p)}


def summary(p: MemoryPlan) -> str:
    a = p.activations
    lines = [f"base {p.base_params / 1e9:.3f}B params, experts {p.expert_params / 1e6:.1f}M, routers "
             f"{p.router_params / 1e6:.2f}M, trainable {p.trainable_params / 1e6:.1f}M, text encoders "
             f"{ {k: round(v / 1e9, 3) for k, v in p.text_encoder_params.items()} }B, VAE {p.vae_params / 1e6:.1f}M",
             f"persistent (bf16 base, fp32 experts, grads + AdamW of the trained expert): "
             f"{p.persistent() / GB:.2f} GB; 8-bit AdamW: {p.persistent(eight_bit=True) / GB:.2f} GB"]
    for (b, ckpt, attention), act in sorted(a.items()):
        total = p.persistent() + act.total
        lines.append(f"batch {b} checkpointing {ckpt:9s} attention {attention:5s}: activations "
                     f"{act.total / GB:6.2f} GB (saved {act.saved / GB:.2f}, kept {act.kept / GB:.2f}, "
                     f"kv stash {act.kv_stash / GB:.2f}, "
                     f"recomputed block {act.recompute / GB:.2f}) -> "
                     f"estimated step peak {total / GB:.1f} GB"
                     + (f"; recomputes {act.recompute_flops / 1e12:.1f} of {act.block_flops / 1e12:.1f} TFLOP"
                        if act.block_flops else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the generated tables of {DOC}")
    parser.add_argument("--check-docs", action="store_true", help=f"exit 1 if {DOC} disagrees with this tool")
    args = parser.parse_args(argv)
    p = plan(batch_sizes=tuple(args.batch_sizes))
    print(summary(p))
    sections = doc_sections(p)
    if args.write_docs or args.check_docs:
        from cologen.docgen import stale, update

        if (1, "off", "fused") not in p.activations or (4, "off", "fused") not in p.activations:
            parser.error("the docs need --batch-sizes 1 4")
        names = update(DOC, sections) if args.write_docs else stale(DOC, sections)
        verb = "rewrote" if args.write_docs else "stale (run `" + COMMAND + "`)"
        print(f"{DOC}: {verb}: {', '.join(names)}" if names else f"{DOC}: up to date")
        return 1 if args.check_docs and names else 0
    print()
    for name, text in sections.items():
        print(f"<!-- {name} -->\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
