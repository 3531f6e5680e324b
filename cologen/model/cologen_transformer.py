"""CoLoGenTransformer: a diffusers FluxTransformer2DModel with a source stream and the PRW expert bank.

Nothing of the diffusers forward is copied: the noisy stream is the model's own `forward`; the source stream calls
the same diffusers blocks on the source tokens alone; the two meet only inside `PRWAttnProcessor` (attention
processors and `joint_attention_kwargs` are diffusers' supported extension points).

A sample may have several conditions (a subject and a depth map, two references): each is its own source stream
through the same blocks, attending to its own tokens only and routed by its own pooled hidden state in every PRW
block; the main pass appends every condition's keys/values. One condition is exactly the single-condition model.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from .attention import BlockSource, PRWAttnProcessor, PRWContext, bind_block
from .checkpointing import checkpoint_function, some_blocks, spread_blocks, with_memory_budget
from .config import PRWConfig
from .experts import ConditionInputBank, ExpertBank, GateContext, hard_gate_open, place_features
from .gate_encoder import gate_encoder_dir, load_gate_encoder
from .gate_referrer import load_gate_referrer
from .presets import file_sha256
from .router import NoisyTop1Router, Routing
from .text_encoders import TextEmbeddings


@dataclass
class SourceState:
    """The source stream's per-block keys/values and routing: independent of the denoising step (t = 0
    modulation), so sampling computes it once per request (once per timestep bin with time-aware routing)."""

    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    routing: dict[str, Routing]
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # token-gate logits (B, N) per block with gates
    # the base's keys/values per block (no expert anywhere), kept for `prw.isolate_closed_tokens: output`
    base_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def copied(self) -> SourceState:
        """The same state in tensors of its own: what produced it may reuse its buffers (compiled blocks under CUDA
        graphs, `mode="reduce-overhead"`, write every replay's outputs into the same memory)."""
        def pair(kv: dict) -> dict:
            return {name: (k.clone(), v.clone()) for name, (k, v) in kv.items()}

        return SourceState(pair(self.kv), {name: Routing(r.index.clone(), r.weight.clone(), r.probs.clone())
                                           for name, r in self.routing.items()},
                           {name: g.clone() for name, g in self.gates.items()}, pair(self.base_kv))


Tokens = torch.Tensor | Sequence[torch.Tensor]  # one condition, or one tensor per condition


def conditions_of(source_tokens: Tokens | None, source_ids: Tokens | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, ids) per condition: a tensor is one condition, a list one per condition (ids alike)."""
    if source_tokens is None:
        return []
    if isinstance(source_tokens, torch.Tensor):
        return [(source_tokens, source_ids)]  # type: ignore[list-item]
    if isinstance(source_ids, torch.Tensor) or source_ids is None or len(source_ids) != len(source_tokens):
        raise ValueError("several conditions need one position-id tensor per condition (source_ids as a list)")
    return list(zip(source_tokens, source_ids))


def condition_key(block: str, condition: int) -> str:
    """The routing key of one (PRW block, condition) decision: the block's name for the first condition (so one
    condition is keyed as before), `{block}/cond{i}` for condition i."""
    return block if condition == 0 else f"{block}/cond{condition}"


@dataclass
class ConditionCache:
    """Holds SourceStates, keyed by the timestep bins that produced their routing (so a hit is exact) and by the
    condition: within one request, its index; in a cache kept across requests (`FlowSampler.sample(cache=...)`,
    `CoLoGenPipeline.enable_condition_cache`), its content (`keys`: a fingerprint per condition of what its stream
    depends on: tokens, ids, pooled prompt, guidance, forced experts), so a request that changes one condition
    recomputes only that condition's stream. `max_entries` bounds a kept cache (least recently used go first)."""

    entries: OrderedDict[tuple, SourceState] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0
    keys: list[str] | None = None
    max_entries: int | None = None

    def get(self, key: tuple) -> SourceState | None:
        state = self.entries.get(key)
        if state is not None:
            self.entries.move_to_end(key)
        return state

    def put(self, key: tuple, state: SourceState) -> SourceState:
        """Keep a copy of `state` (`SourceState.copied`: the cache outlives the buffers that produced it; one copy
        per source pass, a small share of a request's memory traffic) and return it."""
        state = self.entries[key] = state.copied()
        while self.max_entries is not None and len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return state


def fingerprint(*tensors: torch.Tensor | None) -> str:
    """A content key of tensors: a hash of their shapes, dtypes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            digest.update(b"-")
            continue
        t = t.detach().contiguous().cpu()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CoLoGenOutput:
    sample: torch.Tensor  # (B, N, C) velocity prediction for the noisy tokens
    routing: dict[str, Routing]  # per PRW block and condition (`condition_key`), empty without sources or experts
    # the first condition's token-gate logits (B, N) per PRW block (the one condition on the target's grid)
    token_gates: dict[str, torch.Tensor] = field(default_factory=dict)


def small_effect(adapted: torch.Tensor, base: torch.Tensor, share: float) -> torch.Tensor:
    """(B, N, 1): the tokens whose expert effect, the mean |adapted - base| velocity over channels, is at most `share`
    of the sample's largest: where an expert barely changes the prediction it is not drawing the edit, and the base's
    velocity keeps the exact copy there (DiffEdit's mask from the difference of two predictions, Couairon et al.
    2022, taken per step from the two passes `isolate_closed_tokens: output` already runs). Sampling only: in
    training an expert whose effect is still zero would get no gradient."""
    effect = (adapted.float() - base.float()).abs().mean(-1, keepdim=True)
    return effect <= share * effect.amax(1, keepdim=True)


def unaliased_single_block_forward(forward, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A single-stream block's `forward` (its bound method) with outputs that do not share storage (what its compiled
    graph runs). diffusers returns the text and image halves as slices of one tensor; AOT autograd refuses a graph
    whose outputs alias one another once any output is a tensor subclass, which a quantized base's weights
    (torchao), saved for the backward, are. The text half is copied: the shorter one."""
    encoder, hidden = forward(*args, **kwargs)
    return encoder.clone(), hidden


class CoLoGenTransformer(nn.Module):
    def __init__(self, transformer: nn.Module, prw: PRWConfig | None = None):
        super().__init__()
        self.transformer = transformer
        self.prw = prw or PRWConfig(num_experts=0)
        self.num_active = 1 if self.prw.num_experts else 0
        # whether the base trains too (the module's train_base): every freeze below keeps it trainable then
        self.train_base = False
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.block_names: list[str] = []
        self.prw_block_names: list[str] = []
        selected = {"both": ("double", "single"), "double": ("double",), "single": ("single",)}[self.prw.blocks]
        # One frozen, pretrained encoder whose features every prompt gate reads (prw.gate_image_encoder), computed
        # once per source pass, in place of each expert's own CNN.
        self.gate_image_encoder = (load_gate_encoder(self.prw.gate_image_encoder, transformer.config.in_channels)
                                   if self.prw.gate_image_encoder and self.prw.num_experts else None)
        shared = self.gate_image_encoder
        # ...and one frozen, pretrained map of where the prompt will change the condition (prw.gate_referrer), which
        # reads the encoder's features and each gate reads through a convolution of its own
        self.gate_referrer = (load_gate_referrer(self.prw.gate_referrer, shared.embed.out_features,
                                                 transformer.config.pooled_projection_dim,
                                                 file_sha256(gate_encoder_dir(self.prw.gate_image_encoder)
                                                             / "model.safetensors"))
                              if self.prw.gate_referrer and shared is not None else None)
        image_channels = (0 if not self.prw.gate_image else shared.embed.out_features if shared is not None
                          else transformer.config.in_channels)
        for kind, block in self._named_blocks():
            block.attn.set_processor(PRWAttnProcessor(kind))
            block.register_forward_pre_hook(bind_block(kind, block), with_kwargs=True)
            self.block_names.append(kind)
            if self.prw.num_experts and kind.split(".")[0] in selected:
                # Registered on the diffusers attention module, as peft injects adapters: the keys read
                # `transformer_blocks.3.attn.prw_experts.experts.1.to_k.lora_A.weight`.
                pooled_dim = transformer.config.pooled_projection_dim
                block.attn.prw_experts = ExpertBank(dim, self.prw.num_experts, self.prw.rank, self.prw.alpha,
                                                    self.prw.targets, self.prw.noisy_targets, self.prw.token_gate,
                                                    self.prw.hard_gate, pooled_dim if self.prw.gate_prompt else 0,
                                                    self.prw.gate_prompt_rank,
                                                    transformer.config.joint_attention_dim if self.prw.gate_words
                                                    else 0,
                                                    image_channels, own_image_encoder=shared is None,
                                                    referred=self.gate_referrer is not None)
                r = self.prw.router
                prompt_dim = pooled_dim if r.prompt_input else 0
                block.attn.prw_router = (
                    NoisyTop1Router(dim, self.prw.num_experts, r.temperature, r.noisy, r.timestep_bins,
                                    r.granularity, prompt_dim, r.normalize_input, r.weighting, r.detach_input)
                    if r.enabled else None)
                self.prw_block_names.append(kind)
        # prw.concat_condition: registered on the diffusers input embedding, whose output a forward hook extends in
        # the adapted main pass (diffusers embeds the latents inside its forward; the keys read
        # `x_embedder.prw_condition.experts.1.weight`, exported with the other adapters)
        self._condition_input: torch.Tensor | None = None  # what the next x_embedder call adds (main pass only)
        if self.prw.num_experts and self.prw.concat_condition:
            transformer.x_embedder.prw_condition = ConditionInputBank(transformer.config.in_channels, dim,
                                                                      self.prw.num_experts)
            transformer.x_embedder.register_forward_hook(self._add_condition_input)
        self.register_buffer("entry_offset", torch.zeros(max(self.prw.num_experts, 1)), persistent=True)
        self.gradient_checkpointing = False
        self._checkpoint_fn = checkpoint_function("full")

    # ----------------------------------------------------------------------------------------------- structure
    def _named_blocks(self):
        for i, block in enumerate(self.transformer.transformer_blocks):
            yield f"double.{i}", block
        for i, block in enumerate(self.transformer.single_transformer_blocks):
            yield f"single.{i}", block

    def prw_modules(self) -> list[nn.Module]:
        return [block.attn for name, block in self._named_blocks() if name in self.prw_block_names]

    @property
    def condition_bank(self) -> ConditionInputBank | None:
        return getattr(self.transformer.x_embedder, "prw_condition", None)

    def expert_parameters(self, expert: int | None = None) -> list[nn.Parameter]:
        out = []
        banks = [attn.prw_experts for attn in self.prw_modules()]
        if self.condition_bank is not None:
            banks.append(self.condition_bank)
        for bank in banks:
            experts = bank.experts
            for e in range(len(experts)) if expert is None else [expert]:
                out.extend(experts[e].parameters())
        return out

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for attn in self.prw_modules() if attn.prw_router is not None for p in attn.prw_router.parameters()]

    def base_parameters(self) -> list[nn.Parameter]:
        adapter = {id(p) for p in self.expert_parameters() + self.router_parameters()}
        return [p for p in self.transformer.parameters() if id(p) not in adapter]

    @property
    def newest_expert(self) -> int:
        return self.num_active - 1

    def freeze_for_curriculum(self) -> None:
        """Base frozen (unless `train_base`); only the newest expert and the routers train (the veterans are
        frozen)."""
        for p in self.base_parameters():
            p.requires_grad_(self.train_base)
        for e in range(self.prw.num_experts):
            for p in self.expert_parameters(e):
                p.requires_grad_(e == self.newest_expert)
        for p in self.router_parameters():
            p.requires_grad_(True)
        for attn in self.prw_modules():  # weights may have been copied in without load_state_dict (FSDP's resume)
            for expert in attn.prw_experts.experts:
                if expert.prompt_gate is not None:
                    expert.prompt_gate.check_weights()

    @torch.no_grad()
    def hold_prompt_gate(self, expert: int) -> None:
        """Zero and freeze expert `expert`'s prompt gate terms in every block (`veteran.gate_prompt_tasks`): its
        gates read the tokens alone. While no expert's terms are live the source pass skips them."""
        for attn in self.prw_modules():
            gate = attn.prw_experts.experts[expert].prompt_gate
            if gate is not None:
                gate.requires_grad_(False)
                gate.zero_prompt_side()

    def prompt_gates_live(self) -> bool:
        """Whether the source pass computes the prompt's gate terms (`prw.gate_prompt`): some expert's can be non-zero
        (host state alone: no device sync per step)."""
        return self.prw.gate_prompt and any(attn.prw_experts.prompt_gates_live() for attn in self.prw_modules())

    @torch.no_grad()
    def activate_next_expert(self) -> int:
        """Activate the next expert: copy (or zero) init from the previous one, router entry copied with a large
        negative offset so the model's output is continuous; freezes the older experts. Returns its index."""
        if self.num_active >= self.prw.num_experts:
            raise RuntimeError(f"all {self.prw.num_experts} experts are already active (prw.num_experts)")
        new = self.num_active
        for attn in self.prw_modules():
            attn.prw_experts.init_expert(new, self.prw.init)
            if attn.prw_router is not None:
                attn.prw_router.init_entry(new)
        if self.condition_bank is not None:
            self.condition_bank.init_expert(new, self.prw.init)
        self.entry_offset[new] = -self.prw.router.entry_offset
        self.num_active = new + 1
        self.freeze_for_curriculum()
        return new

    def set_entry_progress(self, fraction: float) -> None:
        """Anneal the newest expert's entry offset: `fraction` 0 keeps it, 1 removes it."""
        f = min(max(fraction, 0.0), 1.0)
        if self.num_active > 1:
            self.entry_offset[self.newest_expert] = -self.prw.router.entry_offset * (1.0 - f)

    def get_extra_state(self):
        return {"num_active": self.num_active}

    def set_extra_state(self, state) -> None:
        self.num_active = int(state["num_active"])

    def enable_gradient_checkpointing(self, enabled: bool = True, checkpoint_fn=None, fraction: float = 1.0) -> None:
        """Recompute each block's activations in the backward pass, in both streams. `checkpoint_fn(function,
        *args)` checkpoints one block call (default: torch's non-reentrant checkpoint, everything recomputed;
        `cologen.model.checkpointing.checkpoint_function` builds the selective one). `fraction` < 1 checkpoints
        that share of the blocks, spread over the depth; the others keep their activations."""
        self.gradient_checkpointing = enabled
        self._checkpoint_fn = checkpoint_fn or checkpoint_function("full")
        if fraction < 1.0:
            blocks = [block for _, block in self._named_blocks()]
            self._checkpoint_fn = some_blocks(self._checkpoint_fn,
                                              [blocks[i] for i in spread_blocks(len(blocks), fraction)])
        if enabled:
            self.transformer.enable_gradient_checkpointing(self._checkpoint_fn)
        else:
            self.transformer.disable_gradient_checkpointing()

    def compile_repeated_blocks(self, activation_memory_budget: float | None = None, **compile_kwargs) -> None:
        """Regional compilation (as diffusers' `compile_repeated_blocks`): `torch.compile` each block's `forward`
        with `compile_kwargs`. Blocks of one class share their graphs (one per block class and pass, since nothing in
        a block call depends on which block it is: see `PRWContext`), so the compile cost does not grow with depth
        and FLUX.1-dev's 57 blocks stay far below Dynamo's recompile limit; routing decisions are tensors, so they
        never recompile. The block's `__call__` (and the forward pre-hook that binds each block's source state) stay
        eager; compiling `__call__` itself (`block.compile()`) would trace that hook and key a graph on each name.
        `activation_memory_budget` (0-1): the compiled blocks keep that share of what their backward reads and
        recompute the cheapest rest (`cologen.model.checkpointing.with_memory_budget`). Single-stream blocks run
        through `unaliased_single_block_forward`, so their graphs also compile over a quantized base."""
        single = torch.compile(unaliased_single_block_forward, **compile_kwargs)
        for name, block in self._named_blocks():
            compiled = (functools.partial(single, block.forward) if name.startswith("single")
                        else torch.compile(block.forward, **compile_kwargs))
            block.forward = (compiled if activation_memory_budget is None
                             else with_memory_budget(compiled, activation_memory_budget))

    # --------------------------------------------------------------------------------------------- computation
    @property
    def time_aware_routing(self) -> bool:
        r = self.prw.router
        return bool(self.prw_block_names) and r.enabled and r.timestep_bins > 0

    def timestep_bin(self, timestep: torch.Tensor) -> torch.Tensor | None:
        if not self.time_aware_routing:
            return None
        bins = self.prw.router.timestep_bins
        return (timestep.float() * bins).long().clamp(0, bins - 1)

    def cache_key(self, timestep: torch.Tensor, condition: int = 0, cache: ConditionCache | None = None) -> tuple:
        """A condition's cache key: the condition (its index, or its fingerprint in a cache kept across requests) and
        the routing inputs that vary over denoising (the timestep bins; none without time-aware routing)."""
        tbin = self.timestep_bin(timestep)
        ident = cache.keys[condition] if cache is not None and cache.keys else condition
        return (ident, *(tbin.tolist() if tbin is not None else ()))

    def prefill(self, cache: ConditionCache, source_tokens: Tokens, source_ids: Tokens, pooled: torch.Tensor,
                timestep: torch.Tensor, guidance: torch.Tensor | None = None,
                experts: torch.Tensor | None = None, words: torch.Tensor | None = None) -> int:
        """Compute each condition's source stream for `timestep` into `cache` unless it is there (once per request,
        before the first denoising step); returns the number of source passes."""
        passes = 0
        for i, (tokens, ids) in enumerate(conditions_of(source_tokens, source_ids)):
            key = self.cache_key(timestep, i, cache)
            if key not in cache.entries:
                cache.put(key, self.encode_source(tokens, ids, pooled, timestep, guidance, experts, words))
                passes += 1
        return passes

    def _source_states(self, conditions, pooled, timestep, guidance, experts, cache: ConditionCache | None,
                       key_timestep: torch.Tensor | None = None, words: torch.Tensor | None = None
                       ) -> list[SourceState]:
        states = []
        for i, (tokens, ids) in enumerate(conditions):
            if cache is None:
                states.append(self.encode_source(tokens, ids, pooled, timestep, guidance, experts, words))
                continue
            key = self.cache_key(timestep if key_timestep is None else key_timestep, i, cache)
            state = cache.get(key)
            if state is None:
                cache.misses += 1
                state = cache.put(key, self.encode_source(tokens, ids, pooled, timestep, guidance, experts, words))
            else:
                cache.hits += 1
            states.append(state)
        return states

    def _rope(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.dim() == 2:
            return self.transformer.pos_embed(ids)
        b, n, _ = ids.shape
        cos, sin = self.transformer.pos_embed(ids.reshape(b * n, 3))
        return cos.reshape(b, n, -1), sin.reshape(b, n, -1)

    def _source_block(self, block, name, hidden, temb, cos, sin, timestep_bin, prompt, forced, gate_context=None,
                      adapt=True):
        ctx = PRWContext(mode="source", num_active=self.num_active, entry_offset=self.entry_offset,
                         timestep_bin=timestep_bin, prompt=prompt, forced=forced, adapt=adapt,
                         gate_context=gate_context)
        empty_text = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[2])
        _, hidden = block(hidden_states=hidden, encoder_hidden_states=empty_text, temb=temb,
                          image_rotary_emb=(cos, sin), joint_attention_kwargs={"prw": ctx})
        key, value = ctx.kv_out
        r = ctx.routing_out
        return hidden, key, value, (r.index, r.weight, r.probs) if r is not None else None, ctx.gate_out

    def _gate_image(self, source_tokens: torch.Tensor) -> torch.Tensor:
        """What the image-reading gates get: the shared frozen encoder's features, else the tokens themselves."""
        if self.gate_image_encoder is None:
            return source_tokens
        with torch.no_grad():
            return self.gate_image_encoder(source_tokens)

    def _gate_context(self, source_tokens: torch.Tensor, source_ids: torch.Tensor, pooled: torch.Tensor,
                      words: torch.Tensor | None) -> GateContext:
        """What the prompt gates read beside the token states (`GateContext`), computed once per source pass."""
        place = place_features(source_ids)
        image = self._gate_image(source_tokens) if self.prw.gate_image else None
        referred = None
        if self.gate_referrer is not None:
            with torch.no_grad():
                referred = self.gate_referrer(image, pooled.float(), place.to(image.device))
        return GateContext(pooled.float(), place, words if self.prw.gate_words else None, image, referred)

    def encode_source(self, source_tokens: torch.Tensor, source_ids: torch.Tensor, pooled: torch.Tensor,
                      timestep: torch.Tensor, guidance: torch.Tensor | None = None,
                      experts: torch.Tensor | None = None, words: torch.Tensor | None = None) -> SourceState:
        """Run the source stream: every block on the source tokens alone, modulated with temb(t = 0).

        `pooled` is the pooled prompt embedding (for temb and for routers with prompt input); `experts` (B,)
        forces each sample's expert in every PRW block (oracle routing, for evaluation); `words` (B, L, T): the
        prompt's token states, which gates that read the words need (`prw.gate_words`)."""
        tf = self.transformer
        hidden = tf.x_embedder(source_tokens.to(tf.x_embedder.weight.dtype))
        zero = torch.zeros(hidden.shape[0], device=hidden.device, dtype=hidden.dtype)
        pooled = pooled.to(hidden.dtype)
        temb = (tf.time_text_embed(zero, pooled) if guidance is None
                else tf.time_text_embed(zero, guidance.to(hidden.dtype) * 1000, pooled))
        cos, sin = self._rope(source_ids)
        tbin = self.timestep_bin(timestep)
        state = SourceState({}, {})
        prompt = pooled.float() if self.prw.router.prompt_input else None
        # Experts that hold their prompt terms at zero (all of them before an asked task's step) skip computing them.
        gate_context = (self._gate_context(source_tokens, source_ids, pooled, words)
                        if self.prompt_gates_live() else None)
        forced = experts.to(hidden.device).long() if experts is not None else None
        if forced is not None and int(forced.max()) >= max(self.num_active, 1):
            raise ValueError(f"forced expert {int(forced.max())} is not active ({self.num_active} active)")
        isolate = self.prw.isolate_closed_tokens
        base = hidden if isolate != "none" and self.prw_block_names else None  # the base's source stream, in lockstep
        for name, block in self._named_blocks():
            args = (block, name, hidden, temb, cos, sin, tbin, prompt, forced, gate_context)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                out = self._checkpoint_fn(self._source_block, *args)
            else:
                out = self._source_block(*args)
            hidden, key, value, routing, gate = out
            if base is not None:
                with torch.no_grad():
                    base, base_key, base_value, _, _ = self._source_block(block, name, base, temb, cos, sin, tbin,
                                                                          prompt, forced, adapt=False)
                if isolate == "output":
                    state.base_kv[name] = (base_key, base_value)
                if gate is not None:  # closed tokens continue as the base's, open ones as adapted
                    open_ = hard_gate_open(gate)[..., None]  # (B, N, 1)
                    hidden = torch.where(open_, hidden, base)
                    key = torch.where(open_[..., None], key, base_key.to(key.dtype))
                    value = torch.where(open_[..., None], value, base_value.to(value.dtype))
            state.kv[name] = (key, value)
            if routing is not None:
                state.routing[name] = Routing(*routing)
            if gate is not None:
                state.gates[name] = gate
        return state

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: TextEmbeddings, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, source_tokens: Tokens | None = None, source_ids: Tokens | None = None,
                guidance: torch.Tensor | None = None, cache: ConditionCache | None = None,
                experts: torch.Tensor | None = None, host_timestep: torch.Tensor | None = None,
                effect_mask: float = 0.0) -> CoLoGenOutput:
        """Velocity prediction for the noisy `latents` (B, N, C) at `timestep` in [0, 1] (s of x_t = (1-s)x0 + s n).

        `source_tokens` (B, Ns, C) are the packed condition latents with ids (Ns, 3) or per sample (B, Ns, 3); or a
        list of such tensors, one per condition (every sample of the batch has as many), with a list of ids.
        With a `cache`, each condition's source stream is computed once per routing key and reused. `experts` (B,)
        forces each sample's expert (oracle routing, for evaluation). The noisy-stream experts (options
        `prw.noisy_targets`) follow the first condition's routing. `host_timestep`: `timestep`'s values in a CPU
        tensor, which the cache's key reads instead (a sampler knows its schedule on the host: no device-to-host
        copy per step). `effect_mask` (sampling, with `prw.isolate_closed_tokens: output`): a token the gates open
        keeps the base's velocity too where the expert's effect on it is at most this share of the sample's largest
        (`small_effect`; 0: off).
        """
        states = self._source_states(conditions_of(source_tokens, source_ids), text.pooled, timestep, guidance,
                                     experts, cache, host_timestep, text.tokens)
        routing = {condition_key(name, i): r for i, state in enumerate(states) for name, r in state.routing.items()}
        sources = {}
        for name in states[0].kv if states else ():
            sources[name] = BlockSource(self._kv_of(states, name), states[0].routing.get(name),
                                        states[0].gates.get(name))
        ctx = PRWContext(mode="main", sources=sources, num_active=self.num_active, use_gates=self.prw.noisy_gate,
                         text_len=text.tokens.shape[1])
        self._condition_input = self._condition_delta(states, conditions_of(source_tokens, source_ids), img_ids,
                                                      latents)
        try:
            sample = self._main_pass(latents, timestep, text, img_ids, txt_ids, guidance, ctx)
        finally:
            self._condition_input = None
        gates = states[0].gates if states else {}
        closed = self._closed_tokens(gates, latents) if self.prw.isolate_closed_tokens == "output" else None
        if closed is not None:  # the tokens no gate opens: the base's velocity, with the base's source
            base_sources = {name: BlockSource(self._kv_of(states, name, base=True)) for name in sources}
            with torch.no_grad():
                base = self._main_pass(latents, timestep, text, img_ids, txt_ids, guidance,
                                       replace(ctx, sources=base_sources, adapt=False))
            if effect_mask > 0:
                closed = closed | small_effect(sample, base, effect_mask)
            sample = torch.where(closed, base.to(sample.dtype), sample)
        return CoLoGenOutput(sample=sample, routing=routing, token_gates=gates)

    def _condition_delta(self, states: list[SourceState], conditions, img_ids: torch.Tensor, latents: torch.Tensor
                         ) -> torch.Tensor | None:
        """(B, N, D) what `prw.concat_condition` adds to the noisy tokens' embedding: the first condition's tokens
        through the expert the first PRW block routed each sample to, gated like the noisy stream (`noisy_gate`), for
        the samples whose condition lies on the target's token grid (aligned positions; zero for the others, a
        shifted subject reference). None without the option or a condition, or for a condition of another size."""
        bank = self.condition_bank
        if bank is None or not states or not self.prw_block_names:
            return None
        tokens, ids = conditions[0]
        first = self.prw_block_names[0]
        routing = states[0].routing.get(first)
        if routing is None or tokens.shape[:2] != latents.shape[:2]:
            return None
        delta = bank(tokens.to(self.transformer.x_embedder.weight.dtype), routing.index, routing.weight)
        aligned = (ids[..., 1:].to(img_ids.device) == img_ids[..., 1:]).all(-1).all(-1)  # () or (B,)
        delta = delta * aligned.to(delta.dtype).reshape(-1, 1, 1)
        gate = states[0].gates.get(first) if self.prw.noisy_gate else None
        if gate is not None and gate.shape == latents.shape[:2]:
            delta = delta * self.prw_modules()[0].prw_experts.gate(gate).to(delta.dtype)
        return delta

    def _add_condition_input(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the input embedding: adds `_condition_delta` in the adapted main pass (None elsewhere: the
        source stream's embedding, the base's pass beside the adapted one)."""
        delta = self._condition_input
        return output if delta is None else output + delta.to(output.dtype)

    def _main_pass(self, latents, timestep, text: TextEmbeddings, img_ids, txt_ids, guidance, ctx: PRWContext):
        dtype = self.transformer.x_embedder.weight.dtype
        return self.transformer(
            hidden_states=latents.to(dtype), encoder_hidden_states=text.tokens.to(dtype),
            pooled_projections=text.pooled.to(dtype), timestep=timestep.to(dtype), img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance, joint_attention_kwargs={"prw": ctx}, return_dict=False)[0]

    @staticmethod
    def _kv_of(states: list[SourceState], name: str, base: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `name`'s source keys/values, every condition's concatenated (the base's with `base`)."""
        keys, values = zip(*((state.base_kv if base else state.kv)[name] for state in states))
        return (keys[0], values[0]) if len(states) == 1 else (torch.cat(keys, 1), torch.cat(values, 1))

    def opened_tokens(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N) bool: the noisy tokens that take the expert's velocity under `prw.open_rule` (`gates`: each PRW
        block's logits on the target's grid): those any, more than half, or all of the blocks' hard gates open."""
        votes = torch.stack([hard_gate_open(g) for g in gates.values()]).sum(0)
        needed = {"any": 1, "majority": len(gates) // 2 + 1, "all": len(gates)}[self.prw.open_rule]
        return votes >= needed

    def _closed_tokens(self, gates: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor | None:
        """(B, N, 1): the noisy tokens that keep the base's velocity (`opened_tokens`' complement); None where the
        gates are not on the target's token grid (a condition of another size) or there are none."""
        if not gates or any(g.shape != latents.shape[:2] for g in gates.values()):
            return None
        return ~self.opened_tokens(gates)[..., None]
