"""The memory plan of CoLoGen training: parameter, gradient, optimizer and activation bytes per switch.

Parameters are counted from the models' published configs built on the meta device (no memory, no download).
Activations are the tensors autograd saves for the backward pass, recorded with `saved_tensors_hooks` while the real
CoLoGenTransformer forward runs on meta tensors of the real shapes, so every saved tensor of diffusers' blocks, the
source stream, the experts and the routers is counted, each storage once. Attention is replaced by a stand-in that
saves what the kernels save: q, k, v, the output and the log-sum-exp for fused kernels (flash, cuDNN, memory
efficient: what PyTorch SDPA picks on a GPU for bf16), q, k, v and the probabilities for the math kernel.

With gradient checkpointing a block keeps only its inputs (each block's input hidden states, the shared temb and
RoPE tables) and the source stream's keys/values (the main pass reads them); the backward pass recomputes one block
at a time, so the largest block's activations are added once. Not counted: the allocator's fragmentation and
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

import cologen.model.attention as prw_attention
from cologen.model.cologen_transformer import CoLoGenTransformer

from .flux import FLUX_DEV_TRANSFORMER, PAPER_PRW, build_cologen, forward_loss, make_inputs

GB = 1e9


# ------------------------------------------------------------------------------------------------- attention
class _FusedAttention(torch.autograd.Function):
    """Saves what flash / memory-efficient kernels save; the values are never used (meta tensors)."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, S, H, D) as diffusers' dispatch
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
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
        return torch.empty_like(q)

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

    @property
    def total(self) -> int:
        return self.saved + self.kv_stash + self.recompute


def activation_bytes(model: CoLoGenTransformer, inputs: dict, checkpointing: bool, attention: str = "fused",
                     recompute: int | None = None) -> ActivationBytes:
    """Bytes of activations one training step keeps for its backward pass (run it on meta tensors).

    With checkpointing, `recompute` is the largest block's activations (`max(per_block)` of a run without it;
    measured when not given).
    """
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
    was = model.gradient_checkpointing
    model.train()
    model.enable_gradient_checkpointing(checkpointing)
    seen: dict[int, int] = {}  # storage -> bytes: each live storage once, however many ops save it or its views
    per_block: dict[str, int] = {}
    try:
        with attention_standin(attention), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
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
        del loss
    finally:
        model.enable_gradient_checkpointing(was)
        for h in handles:
            h.remove()
    report = ActivationBytes(saved=sum(seen.values()), per_block={} if checkpointing else per_block)
    if checkpointing:
        b, ns = inputs["source_tokens"].shape[:2]
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
    activations: dict[tuple[int, bool, str], ActivationBytes]  # (batch, checkpointing, attention)

    def persistent(self, base_bytes: int = 2, eight_bit: bool = False, shards: int = 1) -> float:
        """Weights, gradients and AdamW states that live through a step (one trained expert's states)."""
        adam = 2 if eight_bit else 8
        return (self.base_params * base_bytes / shards + (self.expert_params + self.router_params) * 4
                + self.trainable_params * (4 + adam))


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
            full = acts[(b, False, attention)] = activation_bytes(model, inputs, False, attention)
            acts[(b, True, attention)] = activation_bytes(model, inputs, True, attention,
                                                          recompute=max(full.per_block.values()))
    return MemoryPlan(base, experts, routers, trainable, text_encoder_params(), vae_params(), acts)


def table(p: MemoryPlan) -> str:
    """The markdown rows of docs/memory.md (batch 1 unless stated; GB = 1e9 bytes)."""
    a = p.activations
    enc = sum(p.text_encoder_params.values())
    fused1, fused1_ck = a[(1, False, "fused")].total, a[(1, True, "fused")].total
    math1, math1_ck = a[(1, False, "math")].total, a[(1, True, "math")].total
    lines = [
        "| switch | saves (computed) |",
        "|---|---|",
        f"| frozen base in bf16, experts and routers fp32 | {p.base_params * 2 / GB:.1f} GB of base weights "
        f"({p.base_params / 1e9:.2f}B params: {p.base_params * 4 / GB:.1f} GB fp32 -> "
        f"{p.base_params * 2 / GB:.1f} GB bf16) |",
        f"| gradient checkpointing per block | {(fused1 - fused1_ck) / GB:.1f} GB of activations at batch 1 "
        f"({fused1 / GB:.1f} -> {fused1_ck / GB:.1f} GB); batch 4: {a[(4, False, 'fused')].total / GB:.1f} -> "
        f"{a[(4, True, 'fused')].total / GB:.1f} GB |" if (4, False, "fused") in a else "",
        f"| precomputed text embeddings (no text encoders) | {enc * 2 / GB:.1f} GB of T5-XXL + CLIP-L weights in "
        f"bf16 ({enc / 1e9:.2f}B params), on the GPU and in host memory |",
        f"| text encoders offloaded after encoding | {enc * 2 / GB:.1f} GB during the transformer's forward and "
        "backward; a step that encodes an uncached prompt still holds them briefly |",
        f"| fused attention (SDPA flash / cuDNN / efficient) vs the math kernel | {(math1 - fused1) / GB:.1f} GB "
        f"without checkpointing ({math1 / GB:.1f} -> {fused1 / GB:.1f} GB), {(math1_ck - fused1_ck) / GB:.1f} GB "
        "with it |",
        f"| 8-bit AdamW states (bitsandbytes) | {p.trainable_params * 6 / GB:.2f} GB per trained expert "
        f"({p.trainable_params / 1e6:.0f}M trainable params: 8 -> 2 bytes each) |",
    ]
    return "\n".join(line for line in lines if line)


def summary(p: MemoryPlan) -> str:
    a = p.activations
    lines = [f"base {p.base_params / 1e9:.3f}B params, experts {p.expert_params / 1e6:.1f}M, routers "
             f"{p.router_params / 1e6:.2f}M, trainable {p.trainable_params / 1e6:.1f}M, text encoders "
             f"{ {k: round(v / 1e9, 3) for k, v in p.text_encoder_params.items()} }B, VAE {p.vae_params / 1e6:.1f}M",
             f"persistent (bf16 base, fp32 experts, grads + AdamW of the trained expert): "
             f"{p.persistent() / GB:.2f} GB; 8-bit AdamW: {p.persistent(eight_bit=True) / GB:.2f} GB"]
    for (b, ckpt, attention), act in sorted(a.items()):
        total = p.persistent() + act.total
        lines.append(f"batch {b} checkpointing {'on ' if ckpt else 'off'} attention {attention:5s}: activations "
                     f"{act.total / GB:6.2f} GB (saved {act.saved / GB:.2f}, kv stash {act.kv_stash / GB:.2f}, "
                     f"recomputed block {act.recompute / GB:.2f}) -> "
                     f"estimated step peak {total / GB:.1f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    p = plan(batch_sizes=tuple(args.batch_sizes))
    print(summary(p))
    print()
    print(table(p))


if __name__ == "__main__":
    main()
