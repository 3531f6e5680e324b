"""Model FLOPs of one CoLoGen training step: matmuls and attention, trainable-aware.

The familiar "6 N per token" rule counts 2 FLOPs per multiply-add in the forward pass, 2 for the gradient with
respect to the activations and 2 for the gradient with respect to the weights. CoLoGen freezes the base, so this
module counts what the backward pass has to do and no more:

* forward: 2 x M x K x N for every matmul of the noisy stream (text + noisy tokens) and of the source stream (source
  tokens through the same weights), the LoRA experts on the source K/V, the routers, the embedders and the output
  projection; attention 4 x S_q x S_k x D per sample and block (QK^T and PV over all heads, D = heads x head dim):
  noisy and text queries over text + noisy + source keys, source queries over source keys;
* backward, activations: 2 x M x K x N for every matmul whose input is on the gradient path (the main pass from the
  block after the first source K/V that requires grad, the source pass from the block after the first expert;
  the first block's Q/K/V inputs come from frozen embedders and get no gradient; the last source block's output
  feeds nothing, so only its K/V path runs backward); attention backward = 2 x its forward (dense convention of
  fused kernels: dQ, dK, dV), or, with `dense_attention_backward=False`, only the gradients autograd's math path
  computes (used to check this count against torch's FlopCounterMode);
* backward, weights: 2 x M x K x N only for trainable weights: the expert bank (its stacked matrices take the
  gradient whichever expert a sample routes to) and the routers; the frozen base gets none;
* not counted: elementwise ops, norms, softmax, RoPE, and the recomputed forward of gradient checkpointing
  (model FLOPs, not hardware FLOPs, as MFU is usually defined).

Per block and sample, with D the width and S the tokens through it: every FLUX block (double- or single-stream)
has 24 D^2 S forward matmul FLOPs (Q/K/V 6, attention output 2, MLP 16; single-stream: Q/K/V 6, MLP in 8,
fused output 10), plus 24 D^2 (double: two streams) or 6 D^2 (single) for the timestep modulation, once per sample
and pass;
a LoRA expert of rank r on K and V costs 8 D r per source token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Workload:
    """One training step's shapes: samples and tokens per sample in each group."""

    batch: int
    noisy_tokens: int
    source_tokens: int
    text_tokens: int


@dataclass
class FlopCount:
    forward: float = 0.0
    backward: float = 0.0
    parts: dict[str, list[float]] = field(default_factory=dict)  # part -> [forward, backward]

    def add(self, part: str, forward: float, backward: float = 0.0) -> None:
        entry = self.parts.setdefault(part, [0.0, 0.0])
        entry[0] += forward
        entry[1] += backward
        self.forward += forward
        self.backward += backward

    @property
    def total(self) -> float:
        return self.forward + self.backward


def _prw_flags(num_blocks: int, prw_blocks: list[bool]) -> tuple[list[bool], list[bool], list[bool]]:
    """Which activations require grad: source input of block k, source K/V of block k, main input of block k."""
    src_in, src_kv, main_in = [], [], []
    seen_prw = seen_kv = False
    for k in range(num_blocks):
        src_in.append(seen_prw)
        src_kv.append(prw_blocks[k] or seen_prw)
        main_in.append(seen_kv)
        seen_prw = seen_prw or prw_blocks[k]
        seen_kv = seen_kv or src_kv[k]
    return src_in, src_kv, main_in


def training_step_flops(config: Mapping, work: Workload, rank: int, num_experts: int, prw_blocks: str = "both",
                        noisy_router: bool = True, dense_attention_backward: bool = True) -> FlopCount:
    """FLOPs of one training step of a CoLoGenTransformer with frozen base and a trainable expert bank.

    config: the FluxTransformer2DModel config (num_layers, num_single_layers, num_attention_heads,
        attention_head_dim, in_channels, joint_attention_dim, pooled_projection_dim, guidance_embeds).
    rank / num_experts / prw_blocks / noisy_router: the PRW bank ('both', 'double' or 'single' blocks).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    c = config["in_channels"]
    c_out = config.get("out_channels") or c
    n_double, n_single = config["num_layers"], config["num_single_layers"]
    b, n, ns, t = work.batch, work.noisy_tokens, work.source_tokens, work.text_tokens
    s_main = t + n
    has_source = ns > 0 and num_experts > 0
    kinds = ["double"] * n_double + ["single"] * n_single
    selected = {"both": ("double", "single"), "double": ("double",), "single": ("single",)}[prw_blocks]
    prw = [has_source and kind in selected for kind in kinds]
    src_in, src_kv, main_in = _prw_flags(len(kinds), prw)
    fc = FlopCount()

    # Embedders and output: frozen, inputs without grad; only proj_out back-propagates to its input.
    temb = 2 * 256 * d + 2 * d * d + 2 * config["pooled_projection_dim"] * d + 2 * d * d
    if config.get("guidance_embeds"):
        temb += 2 * 256 * d + 2 * d * d
    passes = 2 if has_source else 1
    fc.add("embed", b * (2 * c * d * (n + (ns if has_source else 0)) + 2 * config["joint_attention_dim"] * d * t
                         + passes * temb + 4 * d * d))
    fc.add("proj_out", b * 2 * d * c_out * n, b * 2 * d * c_out * n)

    def attention(s_q: int, s_k: int, q_grad: bool, kv_grad: bool) -> tuple[float, float]:
        fwd = 4.0 * s_q * s_k * d
        if not (q_grad or kv_grad):
            return fwd, 0.0
        if dense_attention_backward:
            return fwd, 2 * fwd
        units = (q_grad or kv_grad) + kv_grad + kv_grad + q_grad  # dS, dV, dK, dQ: each half the forward
        return fwd, 0.5 * units * fwd

    last = len(kinds) - 1
    for k, kind in enumerate(kinds):
        modulation = 24 * d * d if kind == "double" else 6 * d * d
        input_side = 6 * d * d if kind == "double" else 14 * d * d  # matmuls fed by the block's normed input
        output_side = 24 * d * d - input_side  # matmuls fed by the attention output (and the MLP)
        # main pass: text + noisy tokens
        attn_out_grad = src_kv[k] or main_in[k]
        fc.add("blocks", b * (modulation + 24 * d * d * s_main),
               b * s_main * ((input_side if main_in[k] else 0) + (output_side if attn_out_grad else 0)))
        f, g = attention(s_main, s_main + (ns if has_source else 0), main_in[k], attn_out_grad)
        fc.add("attention", b * f, b * g)
        if not has_source:
            continue
        # source pass: source tokens alone, same weights
        kv_only = k == last  # the last block's source output feeds nothing: only its K/V run backward
        fwd_src = b * (modulation + 24 * d * d * ns)
        if kv_only:
            bwd_src = b * ns * 4 * d * d if src_in[k] else 0.0
            fc.add("blocks", fwd_src, bwd_src)
            fc.add("attention", b * 4.0 * ns * ns * d)
        else:
            fc.add("blocks", fwd_src,
                   b * ns * ((input_side if src_in[k] else 0) + (output_side if src_kv[k] else 0)))
            f, g = attention(ns, ns, src_in[k], src_kv[k])
            fc.add("attention", b * f, b * g)
        if prw[k]:
            lora = 8.0 * d * rank * ns  # down (D -> 2r, K and V stacked) and up (r -> D, twice)
            # each sample's expert picked from the E stacked ones by a one-hot product (experts.select), and its
            # weight gradient back
            pick = 8.0 * d * rank * num_experts
            fc.add("lora", b * (lora + pick), b * (1.5 * lora + (0.5 * lora if src_in[k] else 0.0) + pick))
            router = (2 if noisy_router else 1) * 2.0 * d * num_experts
            fc.add("router", b * router, b * router * (2 if src_in[k] else 1))
    return fc



def sampling_flops(config: Mapping, work: Workload, steps: int, source_passes: int, rank: int, num_experts: int,
                   prw_blocks: str = "both") -> float:
    """Forward FLOPs of one sampling request with the condition cache: `steps` main passes (text + noisy tokens,
    their queries over the cached source keys too; the experts on the source K/V only, as `training_step_flops`
    counts them) and `source_passes` source passes (the sampler's `SampleStats.source_passes`: one per routing key,
    e.g. per timestep bin). No router noise: it is drawn in training only."""
    kinds = config["num_layers"] + config["num_single_layers"]
    d = config["num_attention_heads"] * config["attention_head_dim"]
    b, s_main = work.batch, work.text_tokens + work.noisy_tokens
    alone = Workload(b, work.noisy_tokens, 0, work.text_tokens)
    main = training_step_flops(config, alone, rank, num_experts, prw_blocks, noisy_router=False).forward
    if work.source_tokens and num_experts:
        main += kinds * b * 4.0 * s_main * work.source_tokens * d  # the main pass's queries over the source keys
    both = training_step_flops(config, work, rank, num_experts, prw_blocks, noisy_router=False).forward
    return steps * main + source_passes * (both - main)

def flux_workload(height: int, width: int, batch: int, text_tokens: int = 512, source_height: int | None = None,
                  source_width: int | None = None, vae_factor: int = 8) -> Workload:
    """Token counts of FLUX at a pixel size: a packed token covers 2 x 2 latent cells of `vae_factor` pixels."""
    per = 2 * vae_factor
    sh, sw = source_height or height, source_width or width
    return Workload(batch, (height // per) * (width // per), (sh // per) * (sw // per), text_tokens)
