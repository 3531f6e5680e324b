"""The PRW expert bank: LoRA experts on the attention projections of one block, one routed expert per sample.

The paper's expert is a LoRA pair on the key and value projections of the source tokens (`to_k`, `to_v`). Two
options add capacity where K/V cannot reach (both ours, off in the paper's settings):
- `targets` adds source-stream projections (`to_q`, `to_out`: the source queries and the attention output, so
  the source stream's own hidden states change and every later block's K/V with them);
- `noisy_targets` gives each expert LoRA pairs on the noisy tokens' projections too (`noisy_to_q`, ...), applied
  in the main pass with the same routing decision, so a task's expert also changes how the noisy tokens read the
  prompt and the source;
- `token_gate` scales an expert's source deltas per token by `2 * sigmoid(w . h + b)` (1 at init), so an expert
  can leave tokens alone (the unmasked area of an inpainting source); `hard_gate` makes it 0 or 1 (the sign of
  `w . h + b`), learned from the supervision of which tokens change (`veteran.gate_weight`); `noisy_gate` applies
  the first condition's gates to the noisy tokens at the same places; `gate_prompt` lets the gate read what the
  instruction names and where (`PromptGate`), which the source tokens alone cannot tell (an edit's object, its new
  place); `gate_words` and `gate_image` let it read the prompt word by word and a small CNN of the condition image
  (both measured, off everywhere);
- `concat_condition` (`ConditionInputBank`, on the model's input embedding) gives each expert a linear map from an
  aligned condition's latent token to the noisy token at the same place, as channel concatenation does.

All experts are allocated up front (one per curriculum step) so checkpoint and optimizer shapes never change; the
router masks the inactive ones. Parameter names follow peft (`lora_A.weight`, `lora_B.weight`) so each expert is a
set of standard LoRA pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cologen.sharding import full_tensor

SOURCE_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
NOISY_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")


class LoRA(nn.Module):
    """One low-rank pair, `lora_B(lora_A(x))`, initialised like peft (A Kaiming-uniform, B zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)


def select(stacked: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`stacked[index]` (each sample's expert's weights) as a one-hot product: exact (one 1, zeros elsewhere), and
    its backward is a product too, not a scatter into the stacked experts (inductor's CPU backend crashed on that
    scatter fused with the router's backward, torch 2.13)."""
    # a comparison, not F.one_hot, which checks the indices' range on the host (a device sync per call)
    one_hot = (index[..., None] == torch.arange(stacked.shape[0], device=index.device)).to(stacked.dtype)
    return (one_hot @ stacked.reshape(stacked.shape[0], -1)).reshape(*index.shape, *stacked.shape[1:])


def noisy_name(target: str) -> str:
    return f"noisy_{target}"


PLACE_FREQUENCIES = 3


def place_features(ids: torch.Tensor) -> torch.Tensor:
    """Where each token sits in its own image, (..., N, 2 + 4K) from position ids (..., N, 3) (axis 1 rows, axis 2
    columns): row and column scaled to [0, 1] over the condition's grid, and their sines and cosines at K
    frequencies, so a linear read-out can mark a region ("at the top right") at any resolution."""
    yx = ids[..., 1:].float()
    lo, hi = yx.amin(-2, keepdim=True), yx.amax(-2, keepdim=True)
    u = (yx - lo) / (hi - lo).clamp_min(1.0)  # (..., N, 2)
    k = torch.arange(1, PLACE_FREQUENCIES + 1, device=ids.device, dtype=u.dtype)
    angles = torch.pi * u[..., None] * k  # (..., N, 2, K)
    return torch.cat([u, angles.sin().flatten(-2), angles.cos().flatten(-2)], -1)


PLACE_DIM = 2 + 4 * PLACE_FREQUENCIES


class PromptGate(nn.Module):
    """The prompt's terms of a token gate's logit (ours, `prw.gate_prompt`): with `p` the layer-normed pooled
    prompt and `x` the token's place features, `(LN(h) U) . (p V)` (does this token hold what the prompt names?),
    `(x P) . (p Q)` (is it where the prompt puts something?) and `p . c`. V, Q and c start at zero, so the gate
    starts as it was.

    With `word_dim` (`prw.gate_words`) a fourth term reads the prompt word by word: the token attends over the
    layer-normed word states `w_j` (query `LN(h) A`, keys `w_j K`, and a sink word of score 0 and value 0, so a token
    that matches no word reads nothing) and takes the attended words' values `w_j . v`. The pooled prompt mixes the
    words' roles ("make the red square blue" holds both colours); a token that attends to the words naming an object
    can tell that object from the others. `v` starts at zero.

    With `image_channels` (`prw.gate_image`) a fifth term is `(E(x) A) . (p B)`: a `ConditionImageEncoder` E over
    the condition's tokens x, which sees the shape and size of the object under a token. `B` starts at zero. With
    `own_image_encoder=False` (`prw.gate_image_encoder`) the gate has no E: it reads features (B, N, image_channels)
    that one pretrained, frozen encoder computes for every gate.

    With `referred` (`prw.gate_referrer`) a sixth term is a 3 x 3 convolution, over the token grid, of the map of
    one pretrained, frozen `GateReferrer` (where the prompt will change the image), weights and bias starting at
    zero: each expert learns how far to trust it and where around it to open (a box's outline beside its object).

    `is_live` tells from host state alone (no device sync) whether the terms can be non-zero, so a model whose
    experts all hold them at zero (`veteran.gate_prompt_tasks`) skips computing them."""

    def __init__(self, dim: int, prompt_dim: int, rank: int, word_dim: int = 0, image_channels: int = 0,
                 image_width: int = 32, own_image_encoder: bool = True, referred: bool = False):
        super().__init__()
        self.token_down = nn.Linear(dim, rank, bias=False)
        self.place_down = nn.Linear(PLACE_DIM, rank, bias=False)
        self.token_prompt = nn.Linear(prompt_dim, rank, bias=False)
        self.place_prompt = nn.Linear(prompt_dim, rank, bias=False)
        self.prompt_bias = nn.Linear(prompt_dim, 1, bias=False)
        downs = [self.token_down, self.place_down]
        if word_dim:
            self.word_query = nn.Linear(dim, rank, bias=False)
            self.word_key = nn.Linear(word_dim, rank, bias=False)
            self.word_value = nn.Linear(word_dim, 1, bias=False)
            downs += [self.word_query, self.word_key]
        if image_channels and own_image_encoder:
            self.image_encoder = ConditionImageEncoder(image_channels, image_width)
        if image_channels:
            self.image_down = nn.Linear(image_width if own_image_encoder else image_channels, rank, bias=False)
            self.image_prompt = nn.Linear(prompt_dim, rank, bias=False)
            downs.append(self.image_down)
        if referred:
            self.referred = nn.Conv2d(1, 1, 3, padding=1)
        for down in downs:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        self.may_be_nonzero = False  # host mirror of "the prompt side has a non-zero weight"
        self.zero_prompt_side()
        self.register_load_state_dict_post_hook(_check_loaded_prompt_side)

    @property
    def reads_words(self) -> bool:
        return hasattr(self, "word_value")

    @property
    def reads_image(self) -> bool:
        return hasattr(self, "image_prompt")

    @property
    def reads_referred(self) -> bool:
        return hasattr(self, "referred")

    def _prompt_side(self) -> tuple[nn.Module, ...]:
        words = (self.word_value,) if self.reads_words else ()
        image = (self.image_prompt,) if self.reads_image else ()
        referred = (self.referred,) if self.reads_referred else ()
        return self.token_prompt, self.place_prompt, self.prompt_bias, *words, *image, *referred

    def _prompt_side_tensors(self) -> list[torch.Tensor]:
        return [t for m in self._prompt_side() for t in (m.weight, m.bias) if t is not None]

    @torch.no_grad()
    def zero_prompt_side(self) -> None:
        for t in self._prompt_side_tensors():
            t.zero_()
        self.may_be_nonzero = False

    @torch.no_grad()
    def check_weights(self) -> None:
        """Read whether the prompt side is non-zero (a device sync: on loads and curriculum steps, never per step)."""
        self.may_be_nonzero = any(any_nonzero(t) for t in self._prompt_side_tensors())

    def is_live(self) -> bool:
        """Whether the terms can be non-zero: the prompt side was seen non-zero, or the gate trains (or may), which
        makes the mark stick, so a gate trained and frozen since stays live."""
        if not self.may_be_nonzero and any(p.requires_grad for p in self.parameters()):
            self.may_be_nonzero = True
        return self.may_be_nonzero


class ConditionImageEncoder(nn.Module):
    """A small CNN over the condition's token grid (`prw.gate_image`): a per-token layer on the packed latents, then
    three 3 x 3 convolutions (each token sees 7 x 7 tokens around it), so a gate can read the shape and size of the
    object under a token, which the source stream's token states do not hold (measured: linear probes of every
    block's token states tell the object's class at chance)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.embed = nn.Linear(in_channels, width)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens of a square grid packed row by row (`pack_latents`) -> (B, N, width)."""
        b, n, _ = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"prw.gate_image reads a square condition's token grid; got {n} tokens")
        x = F.gelu(self.embed(tokens.float())).transpose(1, 2).reshape(b, -1, side, side)
        for conv in self.convs:
            x = F.gelu(conv(x))
        return x.flatten(2).transpose(1, 2)


def any_nonzero(weight: torch.Tensor) -> bool:
    """Whether any element of `weight` is non-zero; a sharded weight (FSDP's DTensor) is gathered first, so every
    rank gets the same answer (each shard's own would differ, and ranks that skip different terms hang)."""
    return bool(full_tensor(weight).any())


def _check_loaded_prompt_side(gate: PromptGate, incompatible_keys) -> None:
    gate.check_weights()


class Expert(nn.Module):
    """One expert of one block: LoRA pairs named after the projections they adapt."""

    def __init__(self, dim: int, rank: int, targets: Sequence[str] = ("to_k", "to_v"),
                 noisy_targets: Sequence[str] = (), token_gate: bool = False, prompt_dim: int = 0,
                 gate_rank: int = 16, word_dim: int = 0, image_channels: int = 0, own_image_encoder: bool = True,
                 referred: bool = False):
        super().__init__()
        for t in targets:
            self.add_module(t, LoRA(dim, dim, rank))
        for t in noisy_targets:
            self.add_module(noisy_name(t), LoRA(dim, dim, rank))
        self.token_gate = nn.Linear(dim, 1) if token_gate else None
        if self.token_gate is not None:
            nn.init.zeros_(self.token_gate.weight)
            nn.init.zeros_(self.token_gate.bias)
        self.prompt_gate = (PromptGate(dim, prompt_dim, gate_rank, word_dim, image_channels,
                                       own_image_encoder=own_image_encoder, referred=referred)
                            if token_gate and prompt_dim else None)


class ConditionInputBank(nn.Module):
    """`prw.concat_condition`: per expert, a linear map from a condition's latent token (C channels) to the noisy
    token's input embedding (D) at the same place, zero at init (so the model starts as it was). Adding `W c` to
    the embedding `W_x x` is channel concatenation `[W_x W] [x; c]`, as FLUX.1 Fill / Canny / Depth feed an aligned
    condition; one map per expert keeps a frozen veteran's."""

    def __init__(self, channels: int, dim: int, num_experts: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(channels, dim, bias=False) for _ in range(num_experts))
        for expert in self.experts:
            nn.init.zeros_(expert.weight)

    def forward(self, tokens: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, N, D): each sample's routed expert (`index`, `weight`: (B,)) applied to its tokens (B, N, C)."""
        stacked = torch.stack([e.weight for e in self.experts]).to(tokens.dtype)  # (E, D, C)
        return torch.bmm(tokens, select(stacked, index).transpose(1, 2)) * weight.to(tokens.dtype)[:, None, None]

    @torch.no_grad()
    def init_expert(self, new: int, mode: str = "copy") -> None:
        """Expert `new` as a copy of expert `new - 1` ('copy') or zero ('zero'), as `ExpertBank.init_expert`."""
        if mode == "copy":
            self.experts[new].weight.copy_(self.experts[new - 1].weight)
        elif mode == "zero":
            self.experts[new].weight.zero_()
        else:
            raise ValueError(f"unknown expert init {mode!r}; expected 'copy' or 'zero'")


@dataclass
class GateContext:
    """What a prompt-aware gate reads beside the tokens: the pooled prompt (B, P), each token's place features
    (N, F) or (B, N, F) (`place_features`) and, for gates that read the words, the prompt's token states (B, L, T)
    (all-zero rows are padding, which no token attends to)."""

    prompt: torch.Tensor
    place: torch.Tensor
    words: torch.Tensor | None = None
    # for gates that read the image: the condition's tokens (B, N, C), or the shared encoder's features of them
    image: torch.Tensor | None = None
    # for gates that read the referrer (`prw.gate_referrer`): its map (B, N) of where the prompt changes the image
    referred: torch.Tensor | None = None


def hard_gate_open(logits: torch.Tensor) -> torch.Tensor:
    """Which tokens a hard gate opens (bool, no gradient): those whose logit is >= 0."""
    return logits.detach() >= 0


class ExpertBank(nn.Module):
    """`num_experts` experts of one PRW block; computes the routed expert's deltas for a set of projections."""

    def __init__(self, dim: int, num_experts: int, rank: int, alpha: float, targets: Sequence[str] = ("to_k", "to_v"),
                 noisy_targets: Sequence[str] = (), token_gate: bool = False, hard_gate: bool = False,
                 prompt_dim: int = 0, gate_rank: int = 16, word_dim: int = 0, image_channels: int = 0,
                 own_image_encoder: bool = True, referred: bool = False):
        super().__init__()
        self.rank = rank
        self.hard_gate = hard_gate
        self.scale = alpha / rank
        self.targets = tuple(targets)
        self.noisy_targets = tuple(noisy_targets)
        self.experts = nn.ModuleList(Expert(dim, rank, targets, noisy_targets, token_gate, prompt_dim, gate_rank,
                                            word_dim, image_channels, own_image_encoder, referred)
                                     for _ in range(num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def has_token_gate(self) -> bool:
        return self.experts[0].token_gate is not None

    def _stacked(self, names: Sequence[str]):
        # Stacking costs one copy of E small matrices per call and keeps routing free of host syncs; every stacked
        # expert that requires grad takes part in autograd (zero grad when unselected), which DDP needs.
        down = torch.stack([torch.cat([getattr(e, n).lora_A.weight for n in names], 0) for e in self.experts])
        ups = [torch.stack([getattr(e, n).lora_B.weight for e in self.experts]) for n in names]
        return down, ups  # (E, len(names) * r, D), [(E, D, r)] * len(names)

    @property
    def has_prompt_gate(self) -> bool:
        return self.experts[0].prompt_gate is not None

    def prompt_gates_live(self) -> bool:
        """Whether any expert's prompt terms can be non-zero (host state alone, `PromptGate.is_live`)."""
        return self.has_prompt_gate and any(e.prompt_gate.is_live() for e in self.experts)

    def gate_logits(self, hidden: torch.Tensor, index: torch.Tensor, context: GateContext | None = None
                    ) -> torch.Tensor:
        """Per-token gate logits (B, N) of the routed expert for `hidden` (B, N, D) (sample routing), with the
        prompt's terms where the experts have them and `context` is given; `gate` turns them into the scale of
        each token's deltas."""
        if index.dim() != 1:
            raise ValueError("token gates need sample routing (prw.router.granularity: sample)")
        w = torch.stack([e.token_gate.weight[0] for e in self.experts]).to(hidden.dtype)  # (E, D)
        b = torch.stack([e.token_gate.bias[0] for e in self.experts]).to(hidden.dtype)  # (E,)
        logits = torch.bmm(hidden, select(w, index).unsqueeze(-1)).squeeze(-1) + select(b, index)[:, None]
        if context is None or not self.has_prompt_gate:
            return logits
        return logits + self._prompt_logits(hidden, index, context).to(logits.dtype)

    def _prompt_logits(self, hidden: torch.Tensor, index: torch.Tensor, context: GateContext) -> torch.Tensor:
        """The routed expert's `PromptGate` terms (B, N), in fp32 (the prompt's side is small)."""
        gates = [e.prompt_gate for e in self.experts]

        def routed(name: str) -> torch.Tensor:
            return select(torch.stack([getattr(g, name).weight.float() for g in gates]), index)  # (B, out, in)

        prompt = F.layer_norm(context.prompt.float(), context.prompt.shape[-1:])  # (B, P)
        tokens = F.layer_norm(hidden.float(), hidden.shape[-1:])  # (B, N, D)
        place = context.place.float().to(hidden.device)
        if place.dim() == 2:
            place = place.expand(hidden.shape[0], *place.shape)
        what = torch.bmm(tokens, routed("token_down").transpose(1, 2))  # (B, N, r)
        where = torch.bmm(place, routed("place_down").transpose(1, 2))  # (B, N, r)
        asks_what = torch.bmm(routed("token_prompt"), prompt[..., None])  # (B, r, 1)
        asks_where = torch.bmm(routed("place_prompt"), prompt[..., None])
        bias = torch.bmm(routed("prompt_bias"), prompt[..., None])[..., 0]  # (B, 1)
        logits = (torch.bmm(what, asks_what) + torch.bmm(where, asks_where))[..., 0] + bias
        if gates[0].reads_words:
            if context.words is None:
                raise ValueError("prw.gate_words: the gates read the prompt's word states, but none were given")
            logits = logits + self._word_logits(tokens, context.words, routed)
        if gates[0].reads_image:
            if context.image is None:
                raise ValueError("prw.gate_image: the gates read the condition image, but none was given")
            logits = logits + self._image_logits(gates, index, context.image, prompt, routed)
        if gates[0].reads_referred:
            if context.referred is None:
                raise ValueError("prw.gate_referrer: the gates read the referrer's map, but none was given")
            logits = logits + self._referred_logits(gates, index, context.referred)
        return logits

    @staticmethod
    def _referred_logits(gates, index: torch.Tensor, referred: torch.Tensor) -> torch.Tensor:
        """The referrer's term (B, N): the routed expert's 3 x 3 convolution of the map (B, N) over the token grid.
        Every expert's kernel runs as one convolution with E output channels, and each sample keeps its own's."""
        b, n = referred.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"prw.gate_referrer reads a square condition's token grid; got {n} tokens")
        weight = torch.cat([g.referred.weight for g in gates]).float()  # (E, 1, 3, 3)
        bias = torch.cat([g.referred.bias for g in gates]).float()  # (E,)
        every = F.conv2d(referred.float().reshape(b, 1, side, side), weight, bias, padding=1).flatten(2)  # (B, E, N)
        return torch.gather(every, 1, index.long()[:, None, None].expand(b, 1, n))[:, 0]

    @staticmethod
    def _image_logits(gates, index, image: torch.Tensor, prompt: torch.Tensor, routed) -> torch.Tensor:
        """The image term (B, N): `(E(x) A) . (p B)` with E the routed expert's `ConditionImageEncoder`. Every
        expert's encoder runs on the batch and each sample keeps its own expert's (no host sync; the encoders are
        small and the experts few). Gates without their own encoder read `image` as the shared features."""
        if hasattr(gates[0], "image_encoder"):
            every = torch.stack([g.image_encoder(image) for g in gates], 1)  # (B, E, N, w)
            one_hot = (index[:, None] == torch.arange(len(gates), device=index.device)).to(every.dtype)  # (B, E)
            features = torch.einsum("be,benw->bnw", one_hot, every)
        else:
            features = image.float()
        seen = torch.bmm(features, routed("image_down").transpose(1, 2))  # (B, N, r)
        asks = torch.bmm(routed("image_prompt"), prompt[..., None])  # (B, r, 1)
        return torch.bmm(seen, asks)[..., 0]

    @staticmethod
    def _word_logits(tokens: torch.Tensor, words: torch.Tensor, routed) -> torch.Tensor:
        """The word term (B, N) of `PromptGate`: each layer-normed token (B, N, D) attends over the words (B, L, T)
        and a sink of score 0 and value 0, and reads the attended words' values."""
        present = words.abs().amax(-1) > 0  # (B, L): padding rows are all zero
        words = F.layer_norm(words.float(), words.shape[-1:])
        query = torch.bmm(tokens, routed("word_query").transpose(1, 2))  # (B, N, r)
        key = torch.bmm(words, routed("word_key").transpose(1, 2))  # (B, L, r)
        value = torch.bmm(words, routed("word_value").transpose(1, 2))[..., 0]  # (B, L)
        scores = torch.bmm(query, key.transpose(1, 2)) / math.sqrt(query.shape[-1])  # (B, N, L)
        scores = scores.masked_fill(~present[:, None, :], float("-inf"))
        sink = scores.new_zeros(*scores.shape[:2], 1)
        attention = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        return (attention * value[:, None, :]).sum(-1)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, N, 1) scale of each token's deltas: `2 * sigmoid(logits)` (1 at init), or with hard gates
        `1[logits >= 0]` (no gradient: hard gates learn from their supervision alone)."""
        if self.hard_gate:
            return hard_gate_open(logits).to(logits.dtype).unsqueeze(-1)
        return 2 * torch.sigmoid(logits).unsqueeze(-1)

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, num_active: int,
                names: Sequence[str] = ("to_k", "to_v"), gate_from: torch.Tensor | None = None,
                return_gate_logits: bool = False, gate_logits: torch.Tensor | None = None,
                gate_context: GateContext | None = None):
        """Deltas of the projections `names` (module names of the expert) for `hidden` (B, N, D).

        Sample routing: `index`, `weight` are (B,). Token routing: (B, N); then every active expert runs on all
        tokens and the result is masked (dense over the active experts, documented as the slower option).
        `gate_from` (B, N, D): with token gates, the tokens whose gate scales each token's deltas (the pass's input
        to the attention, also for the output projection's delta); None: ungated. Everything the bank computes
        happens in this forward, so FSDP gathers the bank's weights for it. `return_gate_logits`: also return the
        gate logits (B, N) (token-gate supervision, `veteran.gate_weight`). `gate_logits` (B, N): gate with these
        logits instead (`prw.noisy_gate`: the noisy tokens take the source pass's gates). `gate_context`: the
        prompt and places a prompt-aware gate reads (`prw.gate_prompt`).
        """
        logits = gate_logits
        if logits is None and gate_from is not None and self.has_token_gate:
            logits = self.gate_logits(gate_from, index, gate_context)
        deltas = self._deltas(hidden, index, weight, num_active, names, None if logits is None else self.gate(logits))
        return (deltas, logits) if return_gate_logits else deltas

    def _deltas(self, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, num_active: int,
                names: Sequence[str], gate: torch.Tensor | None) -> list[torch.Tensor]:
        down, ups = self._stacked(names)
        # Compute in the activations' dtype (bf16 on FLUX; the fp32 master weights are cast, as autocast would):
        # fp32 copies of (B, N, D) activations would cost ~45 MB per block and sample.
        dtype = hidden.dtype
        down, ups = down.to(dtype), [u.to(dtype) for u in ups]
        r = self.rank
        if index.dim() == 1:
            # the routing weight scales the rank-r intermediate, the smallest tensor on the path
            z = torch.bmm(hidden, select(down, index).transpose(1, 2)) * (weight * self.scale).to(dtype)[:, None, None]
            if gate is not None:
                z = z * gate.to(dtype)
            return [torch.bmm(z[..., i * r:(i + 1) * r], select(up, index).transpose(1, 2)) for i, up in enumerate(ups)]
        if gate is not None:
            raise ValueError("token gates need sample routing (prw.router.granularity: sample)")
        deltas = [hidden.new_zeros(*hidden.shape[:2], up.shape[1]) for up in ups]
        for e in range(num_active):
            routed = ((index == e).to(dtype) * weight.to(dtype) * self.scale).unsqueeze(-1)
            z = (hidden @ down[e].T) * routed
            deltas = [d + z[..., i * r:(i + 1) * r] @ up[e].T for i, (d, up) in enumerate(zip(deltas, ups))]
        return deltas

    @torch.no_grad()
    def init_expert(self, new: int, mode: str = "copy") -> None:
        """Initialise expert `new` as a copy of expert `new - 1` (mode 'copy') or with zero up-projections (mode
        'zero'; its down-projections keep their draw from construction, which every rank shares: a draw here, after
        DDP has synced the model, would differ between ranks)."""
        src, dst = self.experts[new - 1], self.experts[new]
        if mode == "copy":
            dst.load_state_dict(src.state_dict())
        elif mode == "zero":
            for module in dst.modules():
                if isinstance(module, LoRA):
                    module.lora_B.weight.zero_()
            if dst.token_gate is not None:
                dst.token_gate.weight.zero_()
                dst.token_gate.bias.zero_()
            if dst.prompt_gate is not None:
                dst.prompt_gate.zero_prompt_side()
        else:
            raise ValueError(f"unknown expert init {mode!r}; expected 'copy' or 'zero'")
