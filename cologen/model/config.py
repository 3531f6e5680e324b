"""Typed configuration of the PRW expert bank and its routers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..typed_config import check_choices
from .experts import NOISY_TARGETS, SOURCE_TARGETS


@dataclass
class RouterConfig:
    """Noisy top-1 gate of each PRW block.

    enabled: False gives the single always-on adapter of OminiControl (expert 0, weight 1; for baselines).
    temperature: divides the logits before the softmax (paper: 1.0); the knob sweeps explore.
    noisy: add `eps * softplus(h W_n)` to the logits in training.
    timestep_bins: > 0 adds a learned bias per bin of the noisy timestep (time-aware routing); 0 ignores time.
    granularity: 'sample' routes each sample (mean-pooled source tokens), 'token' routes each source token.
    entry_offset: logit offset a newly activated expert starts with, so the old choice and its weight are kept
        (continuity at a curriculum boundary); the curriculum anneals it to 0 over `entry_warmup_steps`.
    prompt_input: (ours) add the layer-normed pooled prompt embedding to the gate's input, so routing can tell
        tasks apart by their instruction, not only by their source image.
    normalize_input: (ours) layer-norm the pooled source features before the gate.
    weighting: 'prob' scales the chosen expert by its softmax probability (the paper); 'straight_through' (ours)
        by exactly 1 with the probability's gradient, so the output depends only on the choice (a copied
        expert tying its original changes nothing: the entry anneal is then invisible).
    detach_input: (ours) stop the gradients of the router's logits at its input (the pooled source features): the
        routing losses then train the gate alone, not the newest expert and the blocks whose outputs the gate pools,
        which would otherwise be asked to make the tasks separable as well as to denoise.
    """

    enabled: bool = True
    temperature: float = 1.0
    noisy: bool = True
    timestep_bins: int = 4
    granularity: Literal["sample", "token"] = "sample"
    entry_offset: float = 20.0
    entry_warmup_steps: int = 100
    prompt_input: bool = False
    normalize_input: bool = False
    weighting: Literal["prob", "straight_through"] = "prob"
    detach_input: bool = False

    def __post_init__(self):
        check_choices(self, "prw.router")
        if self.entry_warmup_steps < 0:
            raise ValueError(f"prw.router.entry_warmup_steps must be >= 0, got {self.entry_warmup_steps}")


@dataclass
class PRWConfig:
    """Progressive Representation Weaving: a bank of LoRA experts on the source tokens' K and V.

    num_experts: experts allocated up front, one per curriculum step (0 disables PRW: plain source stream).
    rank / alpha: LoRA rank and alpha (paper: 128 / 256); the update is scaled by alpha / rank.
    blocks: which blocks carry experts ('both' double- and single-stream, 'double', 'single').
    init: a new expert starts as a copy of the previous one ('copy') or with a zero up-projection ('zero').
    targets: source-stream projections each expert adapts (paper: to_k, to_v; ours: also to_q, to_out).
    noisy_targets: (ours) noisy-stream projections each expert also adapts, with the same routing (empty: the
        paper's experts act on the source tokens only).
    token_gate: (ours) scale each expert's source deltas per token by a learned gate (needs sample routing).
    hard_gate: (ours) each token's gate is 1 where its logit is >= 0 and 0 elsewhere, so an expert acts exactly on
        the tokens its gate predicts the output changes and leaves the rest exactly alone; the gates then learn only
        from their supervision (`veteran.gate_weight`, which must be > 0).
    noisy_gate: (ours) scale the noisy-stream deltas of each token by the first condition's gate at the same token
        (needs `token_gate` and `noisy_targets`; applies where the condition has the target's token grid, ungated
        elsewhere), so an expert that leaves a copied source token alone leaves its output token alone too.
    isolate_closed_tokens: (ours) keep what a hard gate closes as the base's. 'source': the source tokens a gate
        closes keep the base's hidden states and keys/values in every block (a base source pass runs beside the
        adapted one, without gradients; once per request in sampling, with the condition cache), so the open tokens'
        deltas cannot reach them through the source stream's self-attention. 'output': that, and the noisy tokens no
        block's gate opens take the base's velocity (a base forward beside the adapted one, without gradients, every
        step), so an expert changes exactly the tokens its gates open. Needs `hard_gate`.
    open_rule: (ours) with `isolate_closed_tokens: output`, which noisy tokens take the expert's velocity: those
        'any' PRW block's hard gate opens, those a 'majority' of the blocks' gates open (more than half), or those
        'all' open. Each block's gate misses few changed tokens but opens kept ones too, each block other ones, so
        the union opens the most kept tokens (the tiny curriculum's grounding: 3.0 open tokens per changed one for
        the union, 1.6-2.7 for one block), where an expert redraws what the base would copy exactly.
    gate_prompt: (ours) each token gate also reads the pooled prompt and the token's place in its image (a
        bilinear term per expert of rank `gate_prompt_rank`, zero at init): an edit's object and its new place are
        named by the instruction, which the source tokens cannot see. Needs `token_gate`.
    gate_words: (ours) the prompt gates also read the prompt word by word: each token attends over the prompt's
        token states and reads a value per word (`PromptGate`; zero at init), so a gate can tell the object an
        instruction names from the others, which the pooled prompt mixes. Needs `gate_prompt`.
    gate_image: (ours) the prompt gates also read a small CNN of each expert over the condition's token grid, in a
        bilinear term with the pooled prompt (zero at init): the shape and size of the object under a token, which
        the source stream's token states do not hold. Needs `gate_prompt` and square conditions.
    gate_image_encoder: (ours) with `gate_image`, every gate reads the features of one pretrained, frozen encoder
        instead of training a CNN of its own: a folder written by `make gate-encoder`, or 'builtin' (the tiny
        preset's, pretrained on ShapeWorld to tell each token's object class, size and colour; cologen/model/
        gate_encoder.py). None: each expert's own CNN.
    gate_referrer: (ours) with `gate_image_encoder`, every prompt gate also reads the map of one pretrained, frozen
        `GateReferrer` (where the prompt will change the condition, from the gate encoder's features, the pooled
        prompt and each token's place, with neighbouring tokens deciding together) through a 3 x 3 convolution of
        its own that starts at zero: a folder written by `make gate-referrer`, or 'builtin' (the tiny preset's,
        pretrained on ShapeWorld grounding's training examples; cologen/model/gate_referrer.py). None: no map.
    concat_condition: (ours) each expert also maps the condition's latent token to the noisy token at the same place:
        a zero-initialised linear map (latent channels -> width) whose output is added to the noisy tokens'
        input embedding in the main pass, for samples whose first condition lies on the target's token grid
        (spatially aligned positions); the routed expert of the first PRW block applies it, gated like the noisy
        stream (`noisy_gate`). It is channel concatenation, as FLUX.1 Fill / Canny / Depth and InstructPix2Pix feed
        an aligned condition, split per expert. Without it a control map reaches the noisy tokens only through
        attention to source keys the base learned to copy, and the tiny preset's control expert learned to shut
        that path (its velocity moved by 0.7% when each sample got another's map) and draw from the caption alone.
    """

    num_experts: int = 5
    rank: int = 16
    alpha: float = 32.0
    blocks: Literal["both", "double", "single"] = "both"
    init: Literal["copy", "zero"] = "copy"
    targets: list[str] = field(default_factory=lambda: ["to_k", "to_v"])
    noisy_targets: list[str] = field(default_factory=list)
    token_gate: bool = False
    hard_gate: bool = False
    noisy_gate: bool = False
    isolate_closed_tokens: Literal["none", "source", "output"] = "none"
    open_rule: Literal["any", "majority", "all"] = "any"
    gate_prompt: bool = False
    gate_prompt_rank: int = 16
    gate_words: bool = False
    gate_image: bool = False
    gate_image_encoder: str | None = None
    gate_referrer: str | None = None
    concat_condition: bool = False
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self):
        if self.num_experts < 0:
            raise ValueError(f"prw.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and self.rank <= 0:
            raise ValueError(f"prw.rank must be > 0, got {self.rank}")
        check_choices(self, "prw")
        self.targets, self.noisy_targets = list(self.targets), list(self.noisy_targets)
        for name, given, known in (("targets", self.targets, SOURCE_TARGETS),
                                   ("noisy_targets", self.noisy_targets, NOISY_TARGETS)):
            unknown = [t for t in given if t not in known]
            if unknown or len(set(given)) != len(given):
                raise ValueError(f"prw.{name} must be distinct names among {known}, got {given}")
        if self.num_experts and not self.targets:
            raise ValueError("prw.targets is empty: an expert needs at least one source projection")
        if self.hard_gate and not self.token_gate:
            raise ValueError("prw.hard_gate is a kind of token gate: it needs prw.token_gate: true")
        if self.gate_prompt and not self.token_gate:
            raise ValueError("prw.gate_prompt adds the prompt to the token gates: it needs prw.token_gate: true")
        if self.gate_image and not self.gate_prompt:
            raise ValueError("prw.gate_image adds the condition image to the prompt gates: it needs prw.gate_prompt: "
                             "true")
        if self.gate_image_encoder and not self.gate_image:
            raise ValueError("prw.gate_image_encoder is what the image-reading gates read: it needs prw.gate_image: "
                             "true")
        if self.gate_referrer and not self.gate_image_encoder:
            raise ValueError("prw.gate_referrer reads the shared gate encoder's features: it needs "
                             "prw.gate_image_encoder")
        if self.gate_words and not self.gate_prompt:
            raise ValueError("prw.gate_words adds the prompt's words to the prompt gates: it needs prw.gate_prompt: true")
        if self.gate_prompt and self.gate_prompt_rank <= 0:
            raise ValueError(f"prw.gate_prompt_rank must be > 0, got {self.gate_prompt_rank}")
        if self.isolate_closed_tokens != "none" and not self.hard_gate:
            raise ValueError("prw.isolate_closed_tokens keeps the tokens a hard gate closes as the base's: it needs "
                             "prw.hard_gate: true")
        if self.open_rule != "any" and self.isolate_closed_tokens != "output":
            raise ValueError("prw.open_rule decides which noisy tokens keep the base's velocity: it needs "
                             "prw.isolate_closed_tokens: output")
        if self.noisy_gate and not (self.token_gate and self.noisy_targets):
            raise ValueError("prw.noisy_gate reuses the token gates on the noisy stream: it needs prw.token_gate: true "
                             "and prw.noisy_targets")
        if self.concat_condition and self.router.granularity != "sample":
            raise ValueError("prw.concat_condition applies each sample's routed expert: it needs "
                             "prw.router.granularity: sample")
        if (self.noisy_targets or self.token_gate) and self.router.granularity != "sample":
            raise ValueError("prw.noisy_targets and prw.token_gate need prw.router.granularity: sample")
