"""The PRW attention processor: asymmetric attention between the noisy stream and the source stream.

A block runs twice per forward (method.md, "One way to build the source stream"):
- the *source pass* calls the diffusers block on the source tokens alone (no text tokens, temb of t = 0). The
  processor adds the routed expert's LoRA to the source keys/values and stashes the rotated K/V in the context;
- the *main pass* is the model's own forward over text + noisy tokens; the processor appends the stashed source K/V
  to its keys and values. Source queries never see noisy tokens; text and noisy queries see everything.
With no context (or no stash for this block) the processor computes exactly what diffusers' FluxAttnProcessor does.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch.nn.attention import SDPBackend, sdpa_kernel

from .experts import GateContext, noisy_name
from .router import Routing

# SDPA on CUDA without cuDNN's fused attention: on Hopper torch tries cuDNN first, and its backward fails on the
# asymmetric main-pass shapes (1536 queries against 2560 keys): "mha_graph.execute(...).is_good()" on an H200 with
# torch 2.11. Flash and memory-efficient attention run them; the math kernel stays as the last resort.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class BlockSource:
    """What one block's main pass reads from the source pass: the source keys/values (every condition's,
    concatenated), the first condition's routing and token-gate logits (the noisy-stream experts follow them)."""

    kv: tuple[torch.Tensor, torch.Tensor]
    routing: Routing | None = None
    gate: torch.Tensor | None = None


@dataclass
class PRWContext:
    """Per-call state handed to a block's processor through `joint_attention_kwargs={"prw": ctx}`.

    Nothing in it is keyed by block: a source-pass context serves one block call, and the main pass's is bound to
    each block by `bind_block` (a forward pre-hook, outside any compiled region). So the blocks of one class run the
    same code on the same kinds of inputs, and `torch.compile` builds one graph per block class and pass."""

    mode: str  # "source" or "main"
    num_active: int = 1
    entry_offset: torch.Tensor | None = None
    timestep_bin: torch.Tensor | None = None
    prompt: torch.Tensor | None = None  # pooled prompt embeddings (B, P), for routers with prompt input
    forced: torch.Tensor | None = None  # (B,) expert per sample: oracle routing (evaluation)
    adapt: bool = True  # False: the block's experts stay out of this call (the base's source pass beside the adapted)
    gate_context: GateContext | None = None  # source pass: the prompt and places prompt-aware token gates read
    text_len: int = 0  # main pass: text tokens in front of the noisy tokens of single-stream blocks
    use_gates: bool = False  # main pass: the noisy tokens take the source pass's token gates (`prw.noisy_gate`)
    # main pass: every block's source state by block name, and, once bound to a block, that block's
    sources: dict[str, BlockSource] = field(default_factory=dict)
    source: BlockSource | None = None
    # source pass: what the block's processor leaves for the caller (its rotated K/V, routing, token-gate logits)
    kv_out: tuple[torch.Tensor, torch.Tensor] | None = None
    routing_out: Routing | None = None
    gate_out: torch.Tensor | None = None

    def for_block(self, name: str) -> PRWContext:
        """The main-pass context of block `name`: its own source state, the other blocks' left out."""
        return replace(self, sources={}, source=self.sources.get(name))


def bind_block(name: str, block: torch.nn.Module):
    """A forward pre-hook (with kwargs) for block `name` that hands its processor the main-pass context bound to the
    block (`PRWContext.for_block`). It runs in the block's eager `__call__`, so a block compiled per class
    (`CoLoGenTransformer.compile_repeated_blocks`) never sees the block's name; it finds `joint_attention_kwargs`
    whether diffusers passes it by keyword or, under gradient checkpointing, by position."""
    position = list(inspect.signature(block.forward).parameters).index("joint_attention_kwargs")

    def hook(module, args, kwargs):
        by_keyword = "joint_attention_kwargs" in kwargs
        jak = kwargs["joint_attention_kwargs"] if by_keyword else args[position] if len(args) > position else None
        prw = (jak or {}).get("prw")
        if prw is None or prw.mode != "main":
            return None
        bound = {**jak, "prw": prw.for_block(name)}
        if by_keyword:
            return args, {**kwargs, "joint_attention_kwargs": bound}
        return (*args[:position], bound, *args[position + 1:]), kwargs

    return hook


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
    return router(hidden_states, prw.num_active, prw.entry_offset, prw.timestep_bin, prw.prompt, prw.forced)


def _pad_front(delta: torch.Tensor, skip: int) -> torch.Tensor:
    """`delta` for the last tokens of a sequence: zeros for the `skip` tokens in front (the text)."""
    return torch.cat([delta.new_zeros(delta.shape[0], skip, delta.shape[2]), delta], 1) if skip else delta


class PRWAttnProcessor:
    """Installed on every block's `attn`. PRW blocks carry `attn.prw_experts` and `attn.prw_router`."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, name: str):
        self.name = name  # for reading a model's processors; never read in a call (compiled graphs would key on it)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 prw: PRWContext | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Mirrors diffusers.models.transformers.transformer_flux.FluxAttnProcessor.__call__ (diffusers 0.42.1;
        # cologen.compat.COPIED checks it has not changed). What differs: the routed expert's low-rank updates on
        # q/k/v and on the output projection (`_adapter`); the source pass stores its keys/values and the main
        # pass appends them (`prw.kv`); RoPE through `apply_rope`; the CUDA SDPA kernels restricted; projections
        # computed inline instead of `_get_qkv_projections` (no fused QKV).
        source_pass = prw is not None and prw.mode == "source"
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        adapter = self._adapter(attn, hidden_states, encoder_hidden_states, prw)
        if adapter is not None:
            query, key, value = adapter.add_qkv(query, key, value)

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
            prw.kv_out = (key, value)  # the source pass has no text tokens: all of it is source
        elif prw is not None and prw.source is not None:
            source_key, source_value = prw.source.kv
            key = torch.cat([key, source_key.to(key.dtype)], dim=1)
            value = torch.cat([value, source_value.to(value.dtype)], dim=1)

        with sdpa_kernel(_CUDA_SDPA_BACKENDS) if query.is_cuda else nullcontext():
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            encoder_out, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
            out = out.contiguous()
            projected = attn.to_out[0](out)
            if adapter is not None:
                projected = adapter.add_out(projected, out)
            return attn.to_out[1](projected), attn.to_add_out(encoder_out.contiguous())
        if adapter is not None:  # single-stream block: the attention output goes on to the block's proj_out
            out = adapter.add_out(out, out)
        return out

    def _adapter(self, attn, hidden_states, encoder_hidden_states, prw: PRWContext | None) -> _RoutedAdapter | None:
        """The routed expert of this block for this pass: source targets in the source pass (routing decided
        here), noisy targets in the main pass (the source pass's decision); None when nothing adapts."""
        bank = getattr(attn, "prw_experts", None)
        if bank is None or prw is None or not prw.adapt:
            return None
        if prw.mode == "source":
            routing = route(attn.prw_router, hidden_states, prw)
            prw.routing_out = routing
            return _RoutedAdapter(bank, routing, prw.num_active, bank.targets, hidden_states, 0, gated=True, ctx=prw)
        source = prw.source
        if bank.noisy_targets and source is not None and source.routing is not None:
            # single-stream blocks see text + noisy tokens; the experts adapt the noisy ones
            skip = prw.text_len if encoder_hidden_states is None else 0
            adapter = _RoutedAdapter(bank, source.routing, prw.num_active,
                                     [noisy_name(t) for t in bank.noisy_targets], hidden_states, skip, gated=False)
            if prw.use_gates and source.gate is not None and source.gate.shape == adapter.hidden.shape[:2]:
                adapter.gate_logits = source.gate  # the same token grid
            return adapter
        return None


class _RoutedAdapter:
    """The routed expert's LoRA deltas on one pass's tokens (all of them, or those after `skip` text tokens)."""

    def __init__(self, bank, routing: Routing, num_active: int, names, hidden: torch.Tensor, skip: int, gated: bool,
                 ctx: PRWContext | None = None):
        self.bank, self.routing, self.num_active = bank, routing, num_active
        self.names, self.skip = list(names), skip
        self.hidden = hidden[:, skip:] if skip else hidden
        # the token gates read the attention's input tokens; their logits are computed by the pass's first call
        # and reused by the second (q/k/v, then the output projection), and left in the source pass's `ctx.gate_out`
        # (their supervision; the noisy stream's gates)
        self.gate_from = self.hidden if gated and bank.has_token_gate else None
        self.gate_logits: torch.Tensor | None = None  # computed, or given (the noisy stream's, from the source pass)
        self.ctx = ctx

    def _deltas(self, hidden: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        r = self.routing
        if self.gate_logits is not None or self.gate_from is None:
            return self.bank(hidden, r.index, r.weight, self.num_active, names, gate_logits=self.gate_logits)
        deltas, self.gate_logits = self.bank(hidden, r.index, r.weight, self.num_active, names, self.gate_from,
                                             return_gate_logits=True,
                                             gate_context=self.ctx.gate_context if self.ctx is not None else None)
        if self.ctx is not None:
            self.ctx.gate_out = self.gate_logits
        return deltas

    def add_qkv(self, query, key, value):
        names = [n for n in self.names if not n.endswith("to_out")]
        if not names:
            return query, key, value
        out = {"to_q": query, "to_k": key, "to_v": value}
        for name, delta in zip(names, self._deltas(self.hidden, names)):
            which = name.removeprefix("noisy_")
            out[which] = out[which] + _pad_front(delta, self.skip).to(out[which].dtype)
        return out["to_q"], out["to_k"], out["to_v"]

    def add_out(self, projected: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """`projected` + the expert's delta on the attention output `attn_out` (same tokens)."""
        names = [n for n in self.names if n.endswith("to_out")]
        if not names:
            return projected
        tokens = attn_out[:, self.skip:] if self.skip else attn_out
        (delta,) = self._deltas(tokens, names)
        return projected + _pad_front(delta, self.skip).to(projected.dtype)
