"""The side-by-side baseline of the GPU benchmark: stock diffusers FLUX with a peft LoRA, conditioned FLUX Kontext's way.

    python -m benchmarks.baseline_lora                  # FLUX.1-dev on a CUDA GPU
    python -m benchmarks.baseline_lora --tiny           # the same code path on the CPU with a toy-sized FLUX
    python -m benchmarks.baseline_lora --compare        # also CoLoGen's rows and the CoLoGen / baseline ratio

What a user would otherwise train to teach FLUX a conditioned task, and what `make bench-gpu` times next to CoLoGen,
in the same process and on the same tokens:

* the model: diffusers' stock `FluxTransformer2DModel` (FLUX.1-dev's config, random weights, bf16, frozen) with one
  peft LoRA added the way diffusers' LoRA training scripts add it (examples/dreambooth/train_dreambooth_lora_flux.py
  and train_dreambooth_lora_flux_kontext.py): `transformer.add_adapter(LoraConfig(r, lora_alpha,
  init_lora_weights="gaussian", target_modules=...))`, then the trainable (LoRA) parameters upcast to fp32 with
  `diffusers.training_utils.cast_training_params(..., dtype=torch.float32)`. Rank 128, alpha 256: one CoLoGen
  expert's size (`PAPER_PRW`), the one that trains at a time.
* the adapted projections: `attn.to_k` and `attn.to_v` of every block, the projections CoLoGen's experts adapt:
  the image stream's K/V of the 19 double blocks and the K/V of the 38 single blocks. The text stream's
  `attn.add_k_proj` / `attn.add_v_proj` are NOT adapted (CoLoGen's experts do not touch them either). peft matches
  `target_modules` by name suffix, so "attn.to_k" matches both block kinds and nothing else. Where CoLoGen's expert
  acts on the source tokens only, peft's LoRA acts on every token of its module: in the double blocks the noisy and
  condition tokens, in the single blocks text + noisy + condition tokens (there is no peft hook for a per-stream
  adapter; see the README, "No peft.").
* the conditioning: FLUX Kontext's. The condition's packed latent tokens are concatenated to the noisy tokens
  along the sequence, `hidden_states = cat([noisy, condition], 1)`, `img_ids = cat([noisy_ids, condition_ids])` with
  the condition on id plane 1 (Kontext's `cond_latents_ids[..., 0] = 1`; `make_inputs`' "aligned" source ids are
  exactly that), and the whole sequence text + noisy + condition goes through every block with full joint
  attention. The flow-matching loss is the MSE on the noisy tokens' part of the output only (Kontext's
  `model_pred[:, :n]`). `baseline_inputs` builds this from `benchmarks.flux_models.make_inputs`, so both models see
  the same latents, text, timestep, guidance, condition tokens and target.
* precision: the base in bf16, the LoRA's master weights in fp32, the forward under `torch.autocast(bf16)`: what
  diffusers' scripts run under accelerate with `--mixed_precision bf16`. The LoRA matmuls then run in bf16, like
  CoLoGen's experts (fp32 master weights cast to the activations' bf16). Without autocast (`--no-autocast`), peft
  casts each adapted module's input to the LoRA weights' fp32 and the LoRA matmuls run in fp32: slower, and not what
  the scripts do.
* attention: diffusers' default (native) backend, PyTorch SDPA, with cuDNN's fused attention excluded on CUDA as in
  CoLoGen's processor (its backward crashes on an H200 with torch 2.11): flash attention, else memory-efficient.
* a step: forward + loss + backward + AdamW (fused on CUDA) over the LoRA parameters, timed exactly as CoLoGen's
  rows (`benchmarks.bench_gpu.Clock`: CUDA events after warmup, the median of the timed steps), with and without
  gradient checkpointing (`transformer.enable_gradient_checkpointing()`, diffusers' non-reentrant checkpoint of
  every block, as `--gradient_checkpointing` in the scripts). Peak memory is `torch.cuda.max_memory_allocated` over
  the row (with `time_baseline(model=None)` the model is built inside the row, so its weights are counted, as in
  CoLoGen's rows).

Why the comparison is fair: the same frozen 12B base in the same dtype, the same tokens (per sample 512 text +
1024 noisy + 1024 condition tokens at 512 x 512), the same number of trainable LoRA parameters on the same kind of
projections (one rank-128 adapter on every block's K/V; CoLoGen also trains its routers, a few thousand weights),
the same optimizer and the same timer. What differs is the architecture under test: CoLoGen runs the condition as
its own stream that attends only to itself (its keys/values are appended to the noisy stream's attention), the
baseline runs one joint sequence in which every token attends to every token, so its attention is 2560^2 per block
and sample against CoLoGen's 1536 x 2560 + 1024^2, and its backward runs through every block for all 2560 tokens.

FLOPs conventions (per step; `FlopCount.total`):

* trainable-aware model FLOPs, the convention of `cologen/training/flops.py` (today's MFU column): 2 FLOPs per
  multiply-add forward; backward = activation gradients (2 per weight and token) where the input is on the gradient
  path + weight gradients (2 per weight and token) only for trainable weights (the LoRA), attention backward =
  2 x its forward. `baseline_step_flops` counts the baseline so: per sample, S = text + noisy + condition tokens,
      forward  = sum over the 57 blocks of [24 D^2 S + 4 D S^2 + 8 D r S_lora] + embedders, modulation, output,
  with S_lora = noisy + condition (double blocks: the image stream) or S (single blocks); the gradient path starts
  at the first block's K/V LoRA, so every block runs its activation backward except the first block's Q/K/V input
  side (its input comes from the frozen embedders), and the LoRA costs 1.5 x its forward backward (weights, and the
  gradient to its rank-r hidden), + 0.5 x where its input is on the gradient path. The frozen forward and the output
  projection are flops.py's own count (`training_step_flops` of a model without a condition stream and without
  trainable weights). Checked op by op against torch's FlopCounterMode (tests/test_bench_baseline.py).
* the usual "6 N per token" convention, to compare with published figures: `six_n_flops(N, tokens) = 6 N tokens`.
  N = all parameters a token goes through, tokens = batch x (text + noisy + condition tokens), the same token count
  for both models:
      baseline: N = every parameter of the model, the frozen base + the LoRA (`baseline_six_n_flops`);
      CoLoGen:  N = the frozen base + the trainable parameters, i.e. the newest expert and the routers
                (`cologen_six_n_flops`). With top-1 routing a token goes through one expert of the bank, and every
                expert has the trainable one's size, so these are the parameters a token uses; the frozen veteran
                experts are not counted a second time.
  6N overstates the work of a frozen base (it counts weight gradients that are never computed) and ignores
  attention; it is the figure papers report, hence the second MFU column, not a replacement of the first.

Neither count includes the forward that gradient checkpointing recomputes (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.flux_models import PAPER_PRW, build_transformer, make_inputs, workload_of
from cologen.training.flops import FlopCount, Workload, training_step_flops

# peft matches target_modules by suffix: every block's attention K/V (double: image stream; single: all tokens),
# not the text stream's add_k_proj / add_v_proj.
LORA_TARGETS: tuple[str, ...] = ("attn.to_k", "attn.to_v")
HALF = (torch.bfloat16, torch.float16)
# SDPA on CUDA without cuDNN's fused attention, as CoLoGen's processor calls it (cologen/model/attention.py): on an
# H200 with torch 2.11 cuDNN's attention backward fails ("illegal memory access"); flash / memory-efficient run.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def build_baseline(config: dict, rank: int = PAPER_PRW.rank, alpha: float = PAPER_PRW.alpha,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                   targets: tuple[str, ...] = LORA_TARGETS) -> FluxTransformer2DModel:
    """Stock diffusers FLUX (random weights in `dtype`, frozen) + one peft LoRA of `rank` on `targets`, trainable,
    in fp32: diffusers' LoRA training path (`add_adapter(LoraConfig(...))` + `cast_training_params`)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    transformer = build_transformer(config, device, dtype)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=list(targets)))
    cast_training_params(transformer, dtype=torch.float32)
    return transformer


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def baseline_inputs(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    """Keyword arguments of `FluxTransformer2DModel.forward` from `make_inputs`' CoLoGen inputs, FLUX Kontext's
    way: the condition tokens appended to the noisy tokens, their ids (plane 1) appended to the noisy ids."""
    dtype = dtype or inputs["latents"].dtype
    text = inputs["text"]
    return dict(hidden_states=torch.cat([inputs["latents"], inputs["source_tokens"]], 1).to(dtype),
                encoder_hidden_states=text.tokens.to(dtype), pooled_projections=text.pooled.to(dtype),
                timestep=inputs["timestep"].to(dtype),  # in [0, 1]: the model scales by 1000, as in CoLoGen
                img_ids=torch.cat([inputs["img_ids"], inputs["source_ids"]], 0), txt_ids=inputs["txt_ids"],
                guidance=inputs["guidance"], return_dict=False)


def sdpa_backends(device: torch.device):
    """`SDPA_BACKENDS` on CUDA. Hold it over the backward too: gradient checkpointing recomputes the forward there."""
    return sdpa_kernel(SDPA_BACKENDS) if torch.device(device).type == "cuda" else nullcontext()


def _autocast(transformer: torch.nn.Module, enabled: bool | None):
    """bf16 autocast as accelerate's `mixed_precision="bf16"` (on when the base is half precision and `enabled`
    is not False)."""
    weight = transformer.x_embedder.weight
    if enabled is False or (enabled is None and weight.dtype not in HALF):
        return nullcontext()
    return torch.autocast(weight.device.type, dtype=weight.dtype if weight.dtype in HALF else torch.bfloat16)


def baseline_prediction(transformer: FluxTransformer2DModel, inputs: dict, autocast: bool | None = None
                        ) -> torch.Tensor:
    """The model's output for the whole image sequence, (B, noisy + condition, C)."""
    with _autocast(transformer, autocast), sdpa_backends(transformer.x_embedder.weight.device):
        return transformer(**baseline_inputs(inputs, transformer.x_embedder.weight.dtype))[0]


def baseline_loss(transformer: FluxTransformer2DModel, inputs: dict, autocast: bool | None = None) -> torch.Tensor:
    """Flow-matching MSE on the noisy tokens' part of the output only (the condition's outputs are dropped)."""
    out = baseline_prediction(transformer, inputs, autocast)
    n = inputs["latents"].shape[1]
    return F.mse_loss(out[:, :n].float(), inputs["target"].float())


def _attention_backward(forward: float, q_grad: bool, kv_grad: bool, dense: bool) -> float:
    """flops.py's attention rule: 2 x the forward (fused kernels), or the gradients autograd's math path computes
    (dP, dV, dK, dQ, each half the forward)."""
    if not (q_grad or kv_grad):
        return 0.0
    if dense:
        return 2 * forward
    return 0.5 * ((q_grad or kv_grad) + 2 * kv_grad + q_grad) * forward


def baseline_step_flops(config: dict, work: Workload, rank: int, dense_attention_backward: bool = True
                        ) -> FlopCount:
    """Model FLOPs of one baseline training step, flops.py's trainable-aware convention (module docstring).

    `work.source_tokens` are the condition tokens, concatenated to `work.noisy_tokens`; the LoRA of `rank` sits on
    every block's `attn.to_k` / `attn.to_v`."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    b, n, nc, t = work.batch, work.noisy_tokens, work.source_tokens, work.text_tokens
    image = n + nc
    s = t + image
    # The frozen model's forward (embedders, blocks, joint attention) and the output projection's forward and
    # activation backward (over every image token: the slice's gradient is zero-filled): flops.py's count of a model
    # with one stream of text + image tokens and nothing trainable (so nothing else of its backward).
    frozen = training_step_flops(config, Workload(b, image, 0, t), rank=0, num_experts=0)
    fc = FlopCount()
    for part, (fwd, bwd) in frozen.parts.items():
        fc.add(part, fwd, bwd)
    kinds = ["double"] * config["num_layers"] + ["single"] * config["num_single_layers"]
    for k, kind in enumerate(kinds):
        grad_in = k > 0  # the first block's input comes from the frozen embedders
        input_side = 6 * d * d if kind == "double" else 14 * d * d  # Q/K/V (+ the single block's MLP in)
        output_side = 24 * d * d - input_side  # attention output, MLP (fused output): fed by the trainable K/V
        fc.add("blocks", 0.0, b * s * ((input_side if grad_in else 0) + output_side))
        fc.add("attention", 0.0, b * _attention_backward(4.0 * s * s * d, grad_in, True, dense_attention_backward))
        lora = 8.0 * d * rank * (image if kind == "double" else s)  # K and V: down D -> r, up r -> D
        fc.add("lora", b * lora, b * (1.5 * lora + (0.5 * lora if grad_in else 0.0)))
    return fc


def six_n_flops(n_params: int | float, tokens: int | float) -> float:
    """The usual convention: 6 FLOPs per parameter and token (2 forward, 2 activation and 2 weight gradients)."""
    return 6.0 * n_params * tokens


def step_tokens(work: Workload) -> int:
    """Tokens of one step, both models: batch x (text + noisy + condition/source)."""
    return work.batch * (work.text_tokens + work.noisy_tokens + work.source_tokens)


def baseline_six_n_flops(transformer: torch.nn.Module, work: Workload) -> float:
    """6 N tokens with N = every parameter of the baseline (the frozen base + the LoRA)."""
    return six_n_flops(sum(p.numel() for p in transformer.parameters()), step_tokens(work))


def cologen_six_n_flops(model, work: Workload) -> float:
    """6 N tokens for a CoLoGenTransformer, N = its frozen base + its trainable parameters (the newest expert and
    the routers: one expert's worth, what a top-1-routed token goes through)."""
    n = sum(p.numel() for p in model.base_parameters()) + sum(p.numel() for p in model.parameters() if p.requires_grad)
    return six_n_flops(n, step_tokens(work))


@dataclass
class BaselineRow:
    """`benchmarks.bench_gpu.Row`'s fields (same names and meaning) + the 6N convention's."""

    batch: int
    checkpointing: bool
    status: str = "ok"  # or "OOM"
    step_s: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None  # trainable-aware model FLOPs / step time
    mfu: float | None = None
    peak_mem_gb: float | None = None
    model_tflop_per_step: float | None = None
    six_n_tflop_per_step: float | None = None
    mfu_6n: float | None = None  # 6 N tokens / step time / peak
    autocast: bool = True
    lora_params: int | None = None
    parts: dict = field(default_factory=dict)  # FLOPs per part: [forward, backward]


def time_baseline(scale, batch: int, checkpointing: bool, steps: int, warmup: int, device: str | torch.device,
                  peak: float | None, model: FluxTransformer2DModel | None = None,
                  autocast: bool = True) -> BaselineRow:
    """Time baseline training steps at `scale` (a `benchmarks.bench_gpu.Scale`: its config, its PRW's rank and
    alpha, resolution and text tokens). `model=None` builds the baseline inside the row (bf16 base) and frees it
    after; pass `build_baseline(...)` to reuse one across rows (its LoRA weights then move with the steps)."""
    from benchmarks.bench_gpu import Clock, _free  # here, not at import: bench_gpu imports this module

    device = torch.device(device)
    row = BaselineRow(batch, checkpointing, autocast=autocast)
    inputs = make_inputs(scale.config, batch, scale.grid, scale.grid, scale.text_tokens, device=device)
    work = workload_of(inputs)
    count = baseline_step_flops(scale.config, work, scale.prw.rank)
    row.model_tflop_per_step = count.total / 1e12
    row.parts = {k: list(v) for k, v in count.parts.items()}
    _free(device)
    try:
        if model is None:
            model = build_baseline(scale.config, scale.prw.rank, scale.prw.alpha, device, torch.bfloat16)
    except torch.OutOfMemoryError:
        row.status = "OOM"
        return row
    n_all = sum(p.numel() for p in model.parameters())
    params = lora_parameters(model)
    row.lora_params = sum(p.numel() for p in params)
    six_n = six_n_flops(n_all, step_tokens(work))
    row.six_n_tflop_per_step = six_n / 1e12
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with sdpa_backends(device):
            baseline_loss(model, inputs, autocast).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock = Clock(device)
    times: list[float] = []
    try:
        for _ in range(warmup):
            step()
        times = [clock.time(step) for _ in range(steps)]
    except torch.OutOfMemoryError:
        row.status = "OOM"
    optimizer.zero_grad(set_to_none=True)
    if row.status == "ok":
        row.step_s = statistics.median(times)
        row.tokens_per_s = step_tokens(work) / row.step_s
        row.tflops = count.total / row.step_s / 1e12
        row.mfu = row.tflops / peak if peak else None
        row.mfu_6n = six_n / row.step_s / 1e12 / peak if peak else None
        if device.type == "cuda":
            row.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    return row  # inputs, optimizer states and a model built here are freed on return (the caller empties the cache)


def step_time_ratio(cologen_step_s: float | None, baseline_step_s: float | None) -> float | None:
    """CoLoGen's step time as a multiple of the baseline's (the issue's goal: <= 1.0 at batch 4)."""
    if not cologen_step_s or not baseline_step_s:
        return None
    return cologen_step_s / baseline_step_s


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_baseline_rows(rows: list[BaselineRow]) -> str:
    head = (f"{'batch':>5} {'ckpt':>4} {'step_s':>9} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'MFU_6N':>7} "
            f"{'peak_mem_GB':>11}")
    lines = [head]
    for r in rows:
        ckpt = "on" if r.checkpointing else "off"
        if r.status != "ok":
            lines.append(f"{r.batch:>5} {ckpt:>4} " + " ".join(f"{r.status:>{w}}" for w in (9, 10, 9, 7, 7, 11)))
            continue
        mem = "n/a" if r.peak_mem_gb is None else f"{r.peak_mem_gb:.2f}"
        lines.append(f"{r.batch:>5} {ckpt:>4} {r.step_s:>9.4f} {r.tokens_per_s:>10.1f} {r.tflops:>9.3g} "
                     f"{_pct(r.mfu):>7} {_pct(r.mfu_6n):>7} {mem:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-sized FLUX on the CPU (tests this script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (10; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; --tiny: 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (TFLOP/s)")
    parser.add_argument("--no-autocast", action="store_true",
                        help="no bf16 autocast: peft runs the LoRA matmuls in the LoRA weights' fp32")
    parser.add_argument("--compare", action="store_true",
                        help="also time CoLoGen's rows (bench_gpu.train_row) and print the step-time ratio")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from benchmarks.bench_gpu import Variant, _free, build_cologen, run_settings, train_row

    device, scale, name, steps, warmup, peak = run_settings(parser, args)
    torch.manual_seed(0)
    print(f"[baseline] device {name}; stock FLUX + peft LoRA rank {scale.prw.rank} alpha {scale.prw.alpha:g} on "
          f"{', '.join(LORA_TARGETS)} of every block; condition concatenated (Kontext); "
          f"autocast {'off' if args.no_autocast else 'bf16'}")
    results: dict = {"device": name, "peak_tflops": peak, "config": scale.config, "rank": scale.prw.rank,
                     "alpha": scale.prw.alpha, "targets": list(LORA_TARGETS), "autocast": not args.no_autocast}
    cases = [(b, c == "on") for b in args.batch_sizes for c in args.checkpointing]
    rows = []
    for b, c in cases:
        rows.append(time_baseline(scale, b, c, steps, warmup, device, peak, autocast=not args.no_autocast))
        _free(device)
    print(format_baseline_rows(rows))
    results["rows"] = [asdict(r) for r in rows]
    if args.compare:
        model = build_cologen(scale.config, scale.prw, device=device, dtype=torch.bfloat16)
        ours = []
        for b, c in cases:
            r = train_row(model, scale, Variant(b, "full" if c else "off"), steps, warmup, device, peak)
            six_n = cologen_six_n_flops(model, Workload(b, scale.grid ** 2, scale.grid ** 2, scale.text_tokens))
            ours.append({**asdict(r), "six_n_tflop_per_step": six_n / 1e12})
            _free(device)
        del model
        _free(device)
        results["cologen_rows"] = ours
        print("[baseline] CoLoGen / baseline step time ratio (goal <= 1.0x at batch 4):")
        for (b, c), base, r in zip(cases, rows, ours):
            ratio = step_time_ratio(r["step_s"], base.step_s)
            print(f"[baseline]   batch {b} ckpt {'on' if c else 'off'}: CoLoGen {r['step_s'] or float('nan'):.4f} s "
                  f"(MFU {_pct(r['mfu'])}, 6N {_pct(r['mfu_6n'])}), baseline {base.step_s or float('nan'):.4f} s "
                  f"(MFU {_pct(base.mfu)}, 6N {_pct(base.mfu_6n)}) -> "
                  f"{'n/a' if ratio is None else f'{ratio:.2f}x'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
