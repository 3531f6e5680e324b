"""GPU benchmark: CoLoGen training steps and the sampler on a FLUX.1-dev-sized transformer (random weights).

    make bench-gpu                      # any single CUDA GPU
    make bench-gpu ARGS=--tiny          # the same code path on the CPU with a toy-sized FLUX (tests the script)
    python -m benchmarks.bench_gpu --rows 4/off/compile 1/full/int8 --sampler compiled --baseline --json out.json
    python -m benchmarks.bench_gpu --table out.json     # the markdown tables of docs/benchmarks.md

What is timed: FLUX.1-dev's transformer (19 double + 38 single blocks, 24 heads x 128) built from its published
config in bf16 directly on the GPU, with the paper's PRW bank (5 experts of rank 128, alpha 256, fp32) and a router
per block; all 5 experts active, the newest one and the routers train (the last curriculum step). A training step
at 512 x 512 with a 512 x 512 condition: 1024 noisy tokens, 1024 source tokens, 512 T5 tokens, forward +
flow-matching loss + backward + AdamW, timed with CUDA events after warmup (median of the timed steps), per row:
`BATCH/CHECKPOINTING[:SHARE][/compile][/int8|/float8]` (checkpointing off / full / selective, of a share of the
blocks, or budget:SHARE, compiled graphs that keep that share of their backward's inputs; the blocks compiled; a
quantized frozen base). Then the 28-step Euler sampler at batch 1, eager (with and without the condition cache),
compiled (with it) and compiled over a float8 base (`--sampler float8`); a weight-free latent stand-in replaces the VAE, so only the transformer is timed. `--baseline`
also times the stock diffusers + peft LoRA baseline (benchmarks/baseline_lora.py) at the eager rows' settings.

Columns: step time (s); tokens/s = batch x (noisy + source + text tokens) / step time; TFLOP/s = model FLOPs /
step time; MFU = TFLOP/s / the GPU's dense bf16 peak (table by device name below, or --peak-tflops); peak memory =
`torch.cuda.max_memory_allocated` over the row (weights, optimizer states, activations; GB = 1e9 bytes). On the CPU
(--tiny) steps are timed with perf_counter and peak memory is "n/a": the CPU allocator keeps no peak statistic.
A configuration that runs out of memory prints OOM in its row.

Model FLOPs per step (cologen/training/flops.py, checked op by op against torch's FlopCounterMode), per sample:
  forward  = sum over the 57 blocks of [24 D^2 (S_main + S_src)                      base matmuls, both streams
                                        + 4 D S_main (S_main + S_src) + 4 D S_src^2    attention
                                        + 8 D r S_src]                                 LoRA on the source K/V
             + embedders, modulation (24 D^2 or 6 D^2 per block and pass) and output projection,
  backward = activation gradients (same cost as the forward matmul) where the input is on the gradient path
             (not the first block's Q/K/V inputs, not the last source block past its K/V; attention backward =
             2 x its forward) + weight gradients only for trainable weights (the expert bank, the routers),
with D = 3072, S_main = text + noisy tokens = 1536, S_src = 1024, r = 128. This is the "6 x params x tokens" rule
made trainable-aware: a frozen base costs 2 (forward) + 2 (activation gradients) FLOPs per weight and token, not 6.
The forward recomputed by gradient checkpointing is not counted (model FLOPs, the usual MFU convention).

Goals on an H100-class GPU: docs/benchmarks.md, "Goals" (the script prints the verdicts its rows can judge).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.flux_models import (
    FLUX_DEV_TRANSFORMER,
    PAPER_PRW,
    build_cologen,
    forward_loss,
    make_inputs,
    workload_of,
)
from cologen.model.codecs import LatentCodec
from cologen.model.config import PRWConfig
from cologen.model.packing import SourcePositionConfig
from cologen.model.text_encoders import TextEmbeddings
from cologen.sampling.sampler import FlowSampler, SamplerConfig
from cologen.testing.flux import TINY_TRANSFORMER
from cologen.training.flops import Workload, sampling_flops, training_step_flops

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in order against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.0)]


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


@dataclass
class Scale:
    """What the benchmark builds: FLUX.1-dev on the GPU, or a toy FLUX on the CPU (--tiny)."""

    config: dict
    prw: PRWConfig
    resolution: int  # target and condition side in pixels
    text_tokens: int
    vae_factor: int = 8

    @property
    def grid(self) -> int:  # packed tokens per side
        return self.resolution // (2 * self.vae_factor)


FLUX_DEV = Scale(FLUX_DEV_TRANSFORMER, PAPER_PRW, resolution=512, text_tokens=512)
TINY = Scale(TINY_TRANSFORMER, PRWConfig(num_experts=5, rank=4, alpha=8), resolution=64, text_tokens=8)


class LatentStandIn(LatentCodec):
    """A weight-free codec with FLUX's VAE shapes (16 channels, 8x downsampling): the sampler's timing is the
    transformer's alone."""

    def __init__(self, latent_channels: int = 16, downsample: int = 8):
        super().__init__()
        self.latent_channels, self.downsample = latent_channels, downsample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(images.float(), self.downsample)
        return x.repeat(1, -(-self.latent_channels // x.shape[1]), 1, 1)[:, :self.latent_channels]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latents[:, :3].float(), scale_factor=self.downsample)


class Clock:
    """CUDA events on a GPU (no host sync inside the timed region), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


CHECKPOINTING = ("off", "full", "selective", "budget")
QUANTIZATIONS = ("int8", "float8")  # -> cologen.model.quantize modes
QUANTIZE_MODES = {"int8": "int8_weight_only", "float8": "float8"}
ROW_SPEC = ("BATCH/CHECKPOINTING[:SHARE][/compile][/int8|/float8], CHECKPOINTING one of off, full, selective "
            "(SHARE: of the blocks checkpointed), budget:SHARE (compiled rows: the partitioner's activation memory "
            "budget)")


def checkpointing_parts(text: str) -> tuple[str, float | None]:
    """A row's checkpointing, `KIND[:SHARE]`, as (kind, share or None)."""
    kind, _, share = text.partition(":")
    return kind, float(share) if share else None


@dataclass(frozen=True)
class Variant:
    """One row's settings, written `BATCH/CHECKPOINTING[:SHARE][/compile][/int8|/float8]` (e.g. `4/off/compile`,
    `1/full:0.25/compile`: a quarter of the blocks checkpointed; `4/budget:0.3/compile`: no checkpoint calls, the
    compiled blocks' partitioner keeps 30% of what the backward would read and recomputes the rest)."""

    batch: int
    checkpointing: str = "off"  # off, full (everything recomputed) or selective (cologen.model.checkpointing)
    compiled: bool = False  # CoLoGenTransformer.compile_repeated_blocks
    quantize: str | None = None  # a quantized frozen base (cologen.model.quantize)

    @classmethod
    def parse(cls, text: str) -> Variant:
        batch, *rest = text.split("/")
        checkpointing = rest[0] if rest else "off"
        checkpointing = {"on": "full"}.get(checkpointing, checkpointing)
        flags = set(rest[1:])
        unknown = flags - {"compile", *QUANTIZATIONS}
        try:
            kind, share = checkpointing_parts(checkpointing)
        except ValueError:
            kind, share = "", None
        bad_share = (share is not None and not 0 < share <= 1) or (kind == "off" and share is not None) or (
            kind == "budget" and (share is None or "compile" not in flags))
        if (not batch.isdigit() or kind not in CHECKPOINTING or bad_share or unknown
                or len(flags & set(QUANTIZATIONS)) > 1):
            raise ValueError(f"row {text!r}: expected {ROW_SPEC}")
        quantize = next((q for q in QUANTIZATIONS if q in flags), None)
        return cls(int(batch), checkpointing, "compile" in flags, quantize)

    def __str__(self) -> str:
        return "/".join([str(self.batch), self.checkpointing] + (["compile"] if self.compiled else [])
                        + ([self.quantize] if self.quantize else []))


# the table: today's eager rows, compiled blocks, selective checkpointing and a quantized base
DEFAULT_ROWS = ("1/full", "1/off", "4/full", "4/off", "4/off/compile", "4/selective", "4/selective/compile",
                "1/full/compile", "1/full/int8")


@dataclass
class Row:
    batch: int
    checkpointing: str
    compiled: bool = False
    quantize: str | None = None
    status: str = "ok"  # or "OOM", or the error's first line
    step_s: float | None = None
    first_step_s: float | None = None  # the first step (with compilation for a compiled row: the cold start)
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    mfu_6n: float | None = None  # the 6 N tokens convention (benchmarks.baseline_lora.cologen_six_n_flops)
    peak_mem_gb: float | None = None
    model_tflop_per_step: float | None = None
    losses: list[float] | None = None  # per timed step (the quantized base's loss against bf16's, same batches)


def budget_rows_last(variants: list[Variant]) -> list[Variant]:
    """`variants` with the budget rows last (in order): each of them recompiles the blocks under its budget."""
    return sorted(variants, key=lambda v: checkpointing_parts(v.checkpointing)[0] == "budget")


def error_line(error: Exception) -> str:
    """A failed row's status: the error's type, its message's first line and, for a longer message (a compiler's,
    whose first line only names the backend), the last non-empty line, where the cause is."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0][:200] if lines else ""
    if len(lines) > 1:
        text += f" ... {lines[-1][:200]}"
    return f"{type(error).__name__}: {text}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_row(model, scale: Scale, variant: Variant, steps: int, warmup: int, device: torch.device,
              peak: float | None) -> Row:
    """Time `variant`'s training steps on `model`, which the caller has compiled / quantized as the variant says."""
    from benchmarks.baseline_lora import cologen_six_n_flops
    from cologen.model.checkpointing import checkpoint_function

    row = Row(variant.batch, variant.checkpointing, variant.compiled, variant.quantize)
    batch = variant.batch
    inputs = make_inputs(scale.config, batch, scale.grid, scale.grid, scale.text_tokens, device=device)
    work = workload_of(inputs)
    flops = training_step_flops(scale.config, work, scale.prw.rank, scale.prw.num_experts, scale.prw.blocks).total
    row.model_tflop_per_step = flops / 1e12
    kind, share = checkpointing_parts(variant.checkpointing)
    on = kind in ("full", "selective")  # (a budget row recomputes inside its compiled graphs: compile_blocks)
    model.enable_gradient_checkpointing(on, checkpoint_function(kind) if on else None, share if on and share else 1.0)
    model.train()
    optimizer = torch.optim.AdamW(
        [{"params": model.expert_parameters(), "lr": 1e-4}, {"params": model.router_parameters(), "lr": 5e-5}],
        fused=device.type == "cuda")
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss = forward_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    clock = Clock(device)
    _free(device)
    # the same expert weights for every row: rows train from the same state, so their losses compare
    start = {id(p): p.detach().clone() for p in model.expert_parameters() + model.router_parameters()}
    try:
        row.first_step_s = clock.time(step)
        for _ in range(warmup - 1):
            step()
        times = [clock.time(step) for _ in range(steps)]
    except torch.OutOfMemoryError:
        row.status = "OOM"
    except Exception as error:  # a failed variant (a compile error, say) is reported in its row; the next one runs
        row.status = error_line(error)
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in model.expert_parameters() + model.router_parameters():
            p.copy_(start[id(p)])
    if row.status == "ok":
        row.step_s = statistics.median(times)
        row.tokens_per_s = batch * (work.noisy_tokens + work.source_tokens + work.text_tokens) / row.step_s
        row.tflops = flops / row.step_s / 1e12
        row.mfu = row.tflops / peak if peak else None
        row.mfu_6n = cologen_six_n_flops(model, work) / row.step_s / 1e12 / peak if peak else None
        row.losses = [float(x) for x in losses]
        if device.type == "cuda":
            row.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    return row  # its inputs, activations and optimizer states are freed on return (the caller empties the cache)


# --sampler choices that compile the blocks in a torch.compile mode of their own (after the compiled rows): CUDA
# graphs for the eval graphs (inductor's cudagraph trees: one replay per block call instead of its kernels' launches),
# and inductor's GEMM autotuning without them
SAMPLER_COMPILE_MODES = {"cudagraphs": "reduce-overhead", "autotune": "max-autotune-no-cudagraphs"}


def sampler_times(model, scale: Scale, steps: int, device: torch.device, cache_off: bool = True,
                  peak: float | None = None) -> dict:
    """Seconds for one 512 x 512 conditioned sample (batch 1) with the condition cache (and without it, unless
    `cache_off` is False); `first_s`: the first request's (for a compiled model, with compilation). With the cache,
    also its model TFLOP/s (`cologen.training.flops.sampling_flops`, the request's source passes counted by the
    sampler) and their share of `peak`."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    text = TextEmbeddings(torch.randn(1, scale.text_tokens, scale.config["joint_attention_dim"], generator=g),
                          torch.randn(1, scale.config["pooled_projection_dim"], generator=g)).to(device)
    source = (torch.rand(1, 3, scale.resolution, scale.resolution, generator=g) * 2 - 1).to(device)
    codec = LatentStandIn(downsample=scale.vae_factor)
    clock = Clock(device)
    out: dict = {"steps": steps}
    try:
        for use_cache in (True, False) if cache_off else (True,):
            sampler = FlowSampler(model, codec, SourcePositionConfig(), bool(scale.config.get("guidance_embeds")),
                                  SamplerConfig(steps=steps, use_cache=use_cache))

            source_passes: list[int] = []

            def run(sampler: FlowSampler = sampler, passes: list[int] = source_passes) -> None:
                _, stats = sampler.sample(text, scale.resolution, scale.resolution, source, ["editing"], seed=0)
                passes.append(stats.source_passes)

            first = clock.time(run)  # warmup
            if use_cache:
                out["first_s"] = first
            out["cache_s" if use_cache else "no_cache_s"] = statistics.median(clock.time(run) for _ in range(3))
            if use_cache:
                work = Workload(1, scale.grid ** 2, scale.grid ** 2, scale.text_tokens)
                flops = sampling_flops(scale.config, work, steps, source_passes[-1], scale.prw.rank,
                                       scale.prw.num_experts, scale.prw.blocks)
                out["tflops"] = flops / out["cache_s"] / 1e12
                out["mfu"] = out["tflops"] / peak if peak else None
        if cache_off:
            out["speedup"] = out["no_cache_s"] / out["cache_s"]
    except torch.OutOfMemoryError:
        out["status"] = "OOM"
    except Exception as error:
        out["status"] = error_line(error)
    _free(device)
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_rows(rows: list[Row]) -> str:
    head = (f"{'batch':>5} {'ckpt':>9} {'compiled':>8} {'quant':>6} {'step_s':>9} {'first_s':>8} {'tokens/s':>10} "
            f"{'TFLOP/s':>9} {'MFU':>7} {'MFU_6N':>7} {'peak_mem_GB':>11}")
    # TFLOP/s with 3 significant digits: a GPU shows hundreds, the --tiny CPU run thousandths
    lines = [head]
    for r in rows:
        first = f"{r.batch:>5} {r.checkpointing:>9} {'yes' if r.compiled else 'no':>8} {r.quantize or 'bf16':>6} "
        if r.status != "ok":
            lines.append(first + (r.status if r.status != "OOM" else " ".join(f"{'OOM':>{w}}" for w in
                                                                                 (9, 8, 10, 9, 7, 7, 11))))
            continue
        pct = [(_fmt(m and 100 * m, ".1f") + ("%" if m else "")) for m in (r.mfu, r.mfu_6n)]
        lines.append(first + f"{r.step_s:>9.4f} {_fmt(r.first_step_s, '.2f'):>8} {r.tokens_per_s:>10.1f} "
                     f"{r.tflops:>9.3g} {pct[0]:>7} {pct[1]:>7} {_fmt(r.peak_mem_gb, '.2f'):>11}")
    return "\n".join(lines)


def _best(rows: list[Row], **match) -> Row | None:
    found = [r for r in rows if r.status == "ok" and all(getattr(r, k) == v for k, v in match.items())]
    return max(found, key=lambda r: r.mfu or 0.0) if found else None


def goals(rows: list[Row], tiny: bool) -> list[str]:
    """The issue's goals, judged on this run (only meaningful for FLUX.1-dev on an H100-class GPU)."""
    out = []

    def mfu_goal(label: str, goal: float, row: Row | None) -> None:
        if row is None or row.mfu is None:
            return
        out.append(f"goal MFU >= {100 * goal:.0f}% at {label}: {100 * row.mfu:.1f}% ({row.checkpointing}"
                   f"{', compiled' if row.compiled else ''}) -> {'met' if row.mfu >= goal else 'not met'}")

    mfu_goal("batch 4 without checkpointing", 0.45, _best(rows, batch=4, checkpointing="off", quantize=None))
    b4 = [r for r in rows if r.batch == 4 and r.checkpointing != "off" and r.quantize is None and r.status == "ok"
          and (r.peak_mem_gb is None or r.peak_mem_gb <= 40)]
    mfu_goal("batch 4 with checkpointing in <= 40 GB", 0.35, max(b4, key=lambda r: r.mfu or 0.0) if b4 else None)
    b1 = [r for r in rows if r.batch == 1 and r.checkpointing != "off" and r.quantize is None and r.status == "ok"
          and (r.peak_mem_gb is None or r.peak_mem_gb <= 40)]
    mfu_goal("batch 1 with checkpointing in <= 40 GB", 0.25, max(b1, key=lambda r: r.mfu or 0.0) if b1 else None)
    for r in rows:
        if r.batch == 1 and r.checkpointing != "off" and r.quantize is None and not r.compiled:
            verdict = ("not measured (no CUDA allocator statistics on the CPU)" if r.peak_mem_gb is None
                       else f"{r.peak_mem_gb:.2f} GB -> {'met' if r.peak_mem_gb <= 40 else 'not met'}"
                       ) if r.status == "ok" else f"{r.status} -> not met"
            out.append(f"goal peak memory <= 40 GB at batch 1 with checkpointing ({r.checkpointing}): {verdict}")
        if r.quantize and r.status == "ok" and r.peak_mem_gb is not None:
            out.append(f"goal peak memory <= 24 GB at batch {r.batch} with a {r.quantize} base: {r.peak_mem_gb:.2f} GB"
                       f" -> {'met' if r.peak_mem_gb <= 24 else 'not met'}")
        if r.quantize and r.losses:
            # the same batches and starting weights in every row; checkpointing does not change the loss
            refs = [b for b in rows if b.losses and b.quantize is None and b.batch == r.batch]
            ref = next((b for b in refs if b.compiled == r.compiled), refs[0] if refs else None)
            if ref is not None:
                n = min(len(ref.losses), len(r.losses))
                worst = max(abs(a - b) / abs(b) for a, b in zip(r.losses[:n], ref.losses[:n]))
                out.append(f"goal {r.quantize} base's loss within 2% of bf16's on the same {n} batches: worst "
                           f"{100 * worst:.3f}% -> {'met' if worst <= 0.02 else 'not met'}")
    cold = [r.first_step_s for r in rows if r.compiled and r.first_step_s is not None]
    if cold:
        out.append(f"goal first compiled step <= 90 s: {cold[0]:.1f} s -> {'met' if cold[0] <= 90 else 'not met'}")
    if tiny:
        out.append("(--tiny: toy model on the CPU; the goals apply to FLUX.1-dev on a GPU)")
    return out


def compile_blocks(model, device: torch.device, backend: str | None, budget: float | None = None,
                   mode: str | None = None) -> None:
    """Compile the blocks once for every row and the sampler: static shapes (one graph per block class, pass and
    shape), with room in Dynamo's per-function cache for this script's shapes (2 batch sizes x train/eval).
    `budget`: the compiled blocks' activation memory budget (a budget row's; the graphs compiled before are dropped,
    since the budget is read when a graph compiles); `mode`: a torch.compile mode (a `SAMPLER_COMPILE_MODES`
    sampler's; the graphs before are dropped too)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    if budget is not None or mode is not None:
        uncompile_blocks(model)
        torch._dynamo.reset()
    model.compile_repeated_blocks(activation_memory_budget=budget, dynamic=False,
                                  **({"backend": backend} if backend else {}), **({"mode": mode} if mode else {}))


def uncompile_blocks(model) -> None:
    for _, block in model._named_blocks():
        block.__dict__.pop("forward", None)  # the class's forward again


def baseline_ratios(rows: list[Row], scale: Scale, steps: int, warmup: int, device: torch.device,
                    peak: float | None) -> list[str]:
    """Time the stock diffusers + peft LoRA baseline (benchmarks.baseline_lora) at each eager row's batch and
    checkpointing and print CoLoGen's step time as a ratio to it."""
    from benchmarks.baseline_lora import format_baseline_rows, step_time_ratio, time_baseline

    lines, base_rows = [], []
    for r in rows:
        if r.compiled or r.quantize or r.checkpointing == "selective" or r.status != "ok":
            continue
        base = time_baseline(scale, r.batch, r.checkpointing == "full", steps, warmup, device, peak)
        _free(device)
        base_rows.append(base)
        ratio = step_time_ratio(r.step_s, base.step_s)
        lines.append(f"CoLoGen / baseline step time at batch {r.batch}, checkpointing {r.checkpointing}: "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}x'}"
                     f"{' (goal <= 1.0x)' if r.batch == 4 else ''}")
    if base_rows:
        print(format_baseline_rows(base_rows))
    return lines


def run_settings(parser: argparse.ArgumentParser, args) -> tuple[torch.device, Scale, str, int, int, float | None]:
    """Device, scale, device name, timed and warmup steps, and bf16 peak of a benchmark's arguments (`--tiny`,
    `--steps`, `--warmup`, `--peak-tflops`); one line through `parser.error` without a CUDA device."""
    if args.tiny:
        device, scale, name = torch.device("cpu"), TINY, "cpu (--tiny)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU mode")
        device, scale, name = torch.device("cuda"), FLUX_DEV, torch.cuda.get_device_name()
    steps = args.steps if args.steps is not None else (3 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    peak = args.peak_tflops or (None if args.tiny else peak_tflops(name))
    return device, scale, name, steps, warmup, peak


def markdown_table(paths: list[Path]) -> str:
    """The rows and sampler timings of results files (`--json`) as the markdown tables docs/benchmarks.md shows."""
    lines = ["| run | batch | checkpointing | compiled | base | step s | first step s | MFU | MFU (6N) | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    samplers = ["| run | sampler | 28 steps, cache on (s) | cache off (s) | first request (s) |", "|---|---|---|---|---|"]
    for path in paths:
        results = json.loads(path.read_text())
        for r in results["rows"]:
            cells = [path.stem, r["batch"], r["checkpointing"], "yes" if r["compiled"] else "no", r["quantize"] or "bf16"]
            if r["status"] != "ok":
                cells += [r["status"], "", "", "", ""]
            else:
                cells += [f"{r['step_s']:.3f}", f"{r['first_step_s']:.1f}", f"{100 * r['mfu']:.1f}%",
                          f"{100 * r['mfu_6n']:.1f}%", f"{r['peak_mem_gb']:.1f}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        for label, s in results.get("sampler", {}).items():
            cells = [path.stem, label] + ([s["status"], "", ""] if s.get("status") else [
                f"{s['cache_s']:.3f}", _fmt(s.get("no_cache_s"), ".3f"), f"{s['first_s']:.2f}"])
            samplers.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines + ([""] + samplers if len(samplers) > 2 else []))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-sized FLUX on the CPU (tests this script)")
    parser.add_argument("--table", type=Path, nargs="+", default=None,
                        help="print the markdown tables of these results files (--json) and exit")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help=f"{ROW_SPEC} per row (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (10; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, the first one timed as the "
                        "cold start (3; --tiny: 1)")
    parser.add_argument("--sampler-steps", type=int, default=28)
    parser.add_argument("--sampler", nargs="*", choices=["eager", "compiled", *SAMPLER_COMPILE_MODES, "float8"],
                        default=["eager", "compiled"],
                        help="sampler timings to run (none: skip the sampler); cudagraphs / autotune: the blocks "
                             "compiled in torch.compile's reduce-overhead / max-autotune-no-cudagraphs mode (after "
                             "the compiled rows); float8: compiled blocks over a float8 base (quantized after the "
                             "other rows, as a float8 row's)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the stock diffusers + peft LoRA baseline at the eager rows' settings")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (TFLOP/s)")
    parser.add_argument("--tf32", action="store_true", help="TF32 for the fp32 expert matmuls (training uses fp32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (after each phase)")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return {}
    try:
        variants = [Variant.parse(r) for r in args.rows]
    except ValueError as error:
        parser.error(str(error))

    device, scale, name, steps, warmup, peak = run_settings(parser, args)
    warmup = max(1, warmup)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(0)

    print(f"[bench-gpu] device {name}; dense bf16 peak {_fmt(peak, '.4g')} TFLOP/s"
          f"{'' if peak else ' (unknown: pass --peak-tflops for MFU)'}")
    results: dict = {"device": name, "peak_tflops": peak, "config": scale.config, "prw": asdict(scale.prw),
                     "resolution": scale.resolution, "text_tokens": scale.text_tokens, "torch": torch.__version__,
                     "rows": [], "goals": []}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    try:
        model = build_cologen(scale.config, scale.prw, device=device, dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        print("[bench-gpu] OOM while building the model: FLUX.1-dev in bf16 needs about 26 GB before activations")
        rows = [Row(v.batch, v.checkpointing, v.compiled, v.quantize, status="OOM") for v in variants]
        print(format_rows(rows))
        return {**results, "rows": [asdict(r) for r in rows]}
    n_base = sum(p.numel() for p in model.base_parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_experts = sum(p.numel() for p in model.expert_parameters())
    print(f"[bench-gpu] base {_count(n_base)} params (bf16, frozen), experts {_count(n_experts)} (fp32, "
          f"{scale.prw.num_experts} x rank {scale.prw.rank}), trainable {_count(n_train)}; {scale.resolution} px target + condition: "
          f"{scale.grid ** 2} noisy + {scale.grid ** 2} source + {scale.text_tokens} text tokens")

    rows: list[Row] = []

    def run_rows(selected: list[Variant]) -> None:
        for v in selected:
            kind, share = checkpointing_parts(v.checkpointing)
            if kind == "budget":  # (budget_rows_last puts these last in a compiled phase)
                compile_blocks(model, device, args.compile_backend, share)
            rows.append(train_row(model, scale, v, steps, warmup, device, peak))
            _free(device)
            print(format_rows([rows[-1]]).splitlines()[1], flush=True)
            results["rows"] = [asdict(r) for r in rows]
            save()

    def run_sampler(label: str) -> None:
        s = sampler_times(model, scale, args.sampler_steps, device, cache_off=label == "eager", peak=peak)
        results.setdefault("sampler", {})[label] = s
        save()
        if s.get("status"):
            print(f"[bench-gpu] sampler ({label}) {s['steps']} steps: {s['status']}")
        else:
            off = f", cache off {s['no_cache_s']:.3f} s, speedup {s['speedup']:.2f}x" if "no_cache_s" in s else ""
            share = f", {s['mfu']:.1%} of peak" if s.get("mfu") is not None else ""
            print(f"[bench-gpu] sampler ({label}) {s['steps']} steps, batch 1: cache on {s['cache_s']:.3f} s{off}"
                  f" (first request {s['first_s']:.2f} s; {s['tflops']:.3g} TFLOP/s{share})", flush=True)

    # eager rows (and sampler), then compiled, then the quantized base (in place: last)
    print("[bench-gpu] " + format_rows([]))
    run_rows([v for v in variants if not v.compiled and not v.quantize])
    if "eager" in args.sampler:
        run_sampler("eager")
    compiled = [v for v in variants if v.compiled and not v.quantize]
    if compiled or "compiled" in args.sampler:
        check = make_inputs(scale.config, 1, scale.grid, scale.grid, scale.text_tokens, device=device, seed=1)
        model.eval()
        with torch.no_grad():
            eager_loss = forward_loss(model, check).item()
        compile_blocks(model, device, args.compile_backend)
        with torch.no_grad():
            compiled_loss = forward_loss(model, check).item()
        results["compiled_vs_eager"] = {"eager_loss": eager_loss, "compiled_loss": compiled_loss}
        print(f"[bench-gpu] eval loss at batch 1, eager {eager_loss:.6f}, compiled {compiled_loss:.6f} "
              f"(relative difference {abs(compiled_loss - eager_loss) / abs(eager_loss):.2e})", flush=True)
        run_rows(budget_rows_last(compiled))
        if "compiled" in args.sampler:
            run_sampler("compiled")
        uncompile_blocks(model)
    for label, mode in SAMPLER_COMPILE_MODES.items():
        if label in args.sampler:
            compile_blocks(model, device, args.compile_backend, mode=mode)
            run_sampler(label)
            uncompile_blocks(model)
    quantized = [v for v in variants if v.quantize]
    modes = list(dict.fromkeys([v.quantize for v in quantized] + (["float8"] if "float8" in args.sampler else [])))
    for mode in modes:
        from cologen.model.quantize import quantize_frozen_base

        try:
            quantize_frozen_base(model, QUANTIZE_MODES[mode])
        except (ValueError, RuntimeError, ImportError) as error:
            print(f"[bench-gpu] {mode} base: {error}")
            rows.extend(Row(v.batch, v.checkpointing, v.compiled, v.quantize, status=str(error).splitlines()[0])
                        for v in quantized if v.quantize == mode)
            continue
        selected = [v for v in quantized if v.quantize == mode]
        sampler = mode == "float8" and "float8" in args.sampler
        if any(v.compiled for v in selected) or sampler:
            compile_blocks(model, device, args.compile_backend)
        run_rows(budget_rows_last(selected))
        if sampler:
            run_sampler("float8")
        uncompile_blocks(model)
        if len(modes) > 1:
            print(f"[bench-gpu] not run: {', '.join(modes[1:])} (a base is quantized once; run them in another process)")
        break
    print(format_rows(rows))
    if args.baseline:
        for line in baseline_ratios(rows, scale, steps, warmup, device, peak):
            print(f"[bench-gpu] {line}")
            results["goals"].append(line)
    for line in goals(rows, args.tiny):
        print(f"[bench-gpu] {line}")
        results["goals"].append(line)
    save()
    return results


if __name__ == "__main__":
    main()
