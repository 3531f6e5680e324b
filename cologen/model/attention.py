"""The PRW attention processor: asymmetric attention between the noisy stream and the source stream.

A block runs twice per forward (method.md, "One way to build the source stream"):
- the *source pass* calls the diffusers block on the source tokens alone (no text tokens, temb of t = 0). The
  processor adds the routed expert's LoRA to the source keys/values and stashes the rotated K/V in the context;
- the *main pass* is the model's own forward over text + noisy tokens; the processor appends the stashed source K/V
  to its keys and values. Source queries never see noisy tokens; text and noisy queries see everything.
With no context (or no stash for this block) the processor computes exactly what diffusers' FluxAttnProcessor does.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch.nn.attention import SDPBackend, sdpa_kernel

from .router import Routing

# SDPA on CUDA without cuDNN's fused attention: on Hopper torch tries cuDNN first, and its backward fails on the
# asymmetric main-pass shapes (1536 queries against 2560 keys): "mha_graph.execute(...).is_good()" on an H200 with
# torch 2.11. Flash and memory-efficient attention run them; the math kernel stays as the last resort.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PRWContext:
    """Per-forward state handed to every processor through `joint_attention_kwargs={"prw": ctx}`."""

    mode: str  # "source" or "main"
    num_active: int = 1
    entry_offset: torch.Tensor | None = None
    timestep_bin: torch.Tensor | None = None
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    routing: dict[str, Routing] = field(default_factory=dict)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on (B, S, H, D); per-sample frequencies (B, S, D) are allowed (a batch may mix position schemes)."""
    cos, sin = rope
    if cos.dim() == 2:
        return apply_rotary_emb(x, rope, sequence_dim=1)
    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def route(router, hidden_states: torch.Tensor, prw: PRWContext) -> Routing:
    if router is None:  # a single always-on adapter (no router): expert 0 at weight 1
        b = hidden_states.shape[0]
        ones = hidden_states.new_ones(b, dtype=torch.float32)
        return Routing(torch.zeros(b, dtype=torch.long, device=hidden_states.device), ones, ones[:, None])
    return router(hidden_states, prw.num_active, prw.entry_offset, prw.timestep_bin)


class PRWAttnProcessor:
    """Installed on every block's `attn`. PRW blocks carry `attn.prw_experts` and `attn.prw_router`."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 prw: PRWContext | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        source_pass = prw is not None and prw.mode == "source"
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if source_pass and getattr(attn, "prw_experts", None) is not None:
            routing = route(attn.prw_router, hidden_states, prw)
            dk, dv = attn.prw_experts(hidden_states, routing.index, routing.weight, prw.num_active)
            key = key + dk.to(key.dtype)
            value = value + dv.to(value.dtype)
            prw.routing[self.name] = routing

        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            encoder_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rope(query, image_rotary_emb)
            key = apply_rope(key, image_rotary_emb)

        if source_pass:
            prw.kv[self.name] = (key, value)  # the source pass has no text tokens: all of it is source
        elif prw is not None and self.name in prw.kv:
            source_key, source_value = prw.kv[self.name]
            key = torch.cat([key, source_key.to(key.dtype)], dim=1)
            value = torch.cat([value, source_value.to(value.dtype)], dim=1)

        with sdpa_kernel(_CUDA_SDPA_BACKENDS) if query.is_cuda else nullcontext():
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            encoder_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(encoder_out.contiguous())
        return out
