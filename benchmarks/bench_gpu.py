"""GPU benchmark: CoLoGen training steps and the sampler on a FLUX.1-dev-sized transformer (random weights).

    make bench-gpu                      # any single CUDA GPU
    make bench-gpu ARGS=--tiny          # the same code path on the CPU with a toy-sized FLUX (tests the script)
    python -m benchmarks.bench_gpu --batch-sizes 1 4 --checkpointing on off --steps 10 --json out.json

What is timed: FLUX.1-dev's transformer (19 double + 38 single blocks, 24 heads x 128) built from its published
config in bf16 directly on the GPU, with the paper's PRW bank (5 experts of rank 128, alpha 256, fp32) and a router
per block; all 5 experts active, the newest one and the routers train (the last curriculum step). A training step
at 512 x 512 with a 512 x 512 condition: 1024 noisy tokens, 1024 source tokens, 512 T5 tokens, forward +
flow-matching loss + backward + AdamW, timed with CUDA events after warmup (median of the timed steps), per batch
size and with / without gradient checkpointing. Then the 28-step Euler sampler at batch 1 with and without the
condition cache (a weight-free latent stand-in replaces the VAE, so only the transformer is timed).

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

Goals on an H100-class GPU: peak memory <= 40 GB at batch 1 with checkpointing; MFU >= 40% at batch 4.
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
from cologen.training.flops import training_step_flops

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


@dataclass
class Row:
    batch: int
    checkpointing: bool
    status: str = "ok"  # or "OOM"
    step_s: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_mem_gb: float | None = None
    model_tflop_per_step: float | None = None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_row(model, scale: Scale, batch: int, checkpointing: bool, steps: int, warmup: int, device: torch.device,
              peak: float | None) -> Row:
    row = Row(batch, checkpointing)
    inputs = make_inputs(scale.config, batch, scale.grid, scale.grid, scale.text_tokens, device=device)
    work = workload_of(inputs)
    flops = training_step_flops(scale.config, work, scale.prw.rank, scale.prw.num_experts, scale.prw.blocks).total
    row.model_tflop_per_step = flops / 1e12
    model.enable_gradient_checkpointing(checkpointing)
    model.train()
    optimizer = torch.optim.AdamW(
        [{"params": model.expert_parameters(), "lr": 1e-4}, {"params": model.router_parameters(), "lr": 5e-5}],
        fused=device.type == "cuda")

    def step() -> None:
        forward_loss(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock = Clock(device)
    _free(device)
    try:
        for _ in range(warmup):
            step()
        times = [clock.time(step) for _ in range(steps)]
    except torch.OutOfMemoryError:
        row.status = "OOM"
    optimizer.zero_grad(set_to_none=True)
    if row.status == "ok":
        row.step_s = statistics.median(times)
        row.tokens_per_s = batch * (work.noisy_tokens + work.source_tokens + work.text_tokens) / row.step_s
        row.tflops = flops / row.step_s / 1e12
        row.mfu = row.tflops / peak if peak else None
        if device.type == "cuda":
            row.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    return row  # its inputs, activations and optimizer states are freed on return (the caller empties the cache)


def sampler_times(model, scale: Scale, steps: int, device: torch.device) -> dict:
    """Seconds for one 512 x 512 conditioned sample (batch 1) with and without the condition cache."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    text = TextEmbeddings(torch.randn(1, scale.text_tokens, scale.config["joint_attention_dim"], generator=g),
                          torch.randn(1, scale.config["pooled_projection_dim"], generator=g)).to(device)
    source = (torch.rand(1, 3, scale.resolution, scale.resolution, generator=g) * 2 - 1).to(device)
    codec = LatentStandIn(downsample=scale.vae_factor)
    clock = Clock(device)
    out: dict = {"steps": steps}
    try:
        for use_cache in (True, False):
            sampler = FlowSampler(model, codec, SourcePositionConfig(), bool(scale.config.get("guidance_embeds")),
                                  SamplerConfig(steps=steps, use_cache=use_cache))

            def run(sampler: FlowSampler = sampler) -> None:
                sampler.sample(text, scale.resolution, scale.resolution, source, ["editing"], seed=0)

            run()  # warmup
            out["cache_s" if use_cache else "no_cache_s"] = clock.time(run)
        out["speedup"] = out["no_cache_s"] / out["cache_s"]
    except torch.OutOfMemoryError:
        out["status"] = "OOM"
    _free(device)
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_rows(rows: list[Row]) -> str:
    head = f"{'batch':>5} {'ckpt':>4} {'step_s':>9} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak_mem_GB':>11}"
    # TFLOP/s with 3 significant digits: a GPU shows hundreds, the --tiny CPU run thousandths
    lines = [head]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.batch:>5} {'on' if r.checkpointing else 'off':>4} " + " ".join(
                f"{'OOM':>{w}}" for w in (9, 10, 9, 7, 11)))
            continue
        lines.append(f"{r.batch:>5} {'on' if r.checkpointing else 'off':>4} {r.step_s:>9.4f} {r.tokens_per_s:>10.1f} "
                     f"{r.tflops:>9.3g} {_fmt(r.mfu and 100 * r.mfu, '.1f') + ('%' if r.mfu else ''):>7} "
                     f"{_fmt(r.peak_mem_gb, '.2f'):>11}")
    return "\n".join(lines)


def goals(rows: list[Row], tiny: bool) -> list[str]:
    """The issue's goals, judged on this run (only meaningful for FLUX.1-dev on an H100-class GPU)."""
    out = []
    b1 = [r for r in rows if r.batch == 1 and r.checkpointing]
    if b1:
        r = b1[0]
        if r.status != "ok":
            verdict = "OOM -> not met"
        elif r.peak_mem_gb is None:
            verdict = "not measured (no CUDA allocator statistics on the CPU)"
        else:
            verdict = f"{r.peak_mem_gb:.2f} GB -> {'met' if r.peak_mem_gb <= 40 else 'not met'}"
        out.append(f"goal peak memory <= 40 GB at batch 1 with checkpointing: {verdict}")
    b4 = [r for r in rows if r.batch == 4 and r.status == "ok" and r.mfu is not None]
    if b4:
        best = max(b4, key=lambda r: r.mfu)
        out.append(f"goal MFU >= 40% at batch 4: {100 * best.mfu:.1f}% (checkpointing "
                   f"{'on' if best.checkpointing else 'off'}) -> {'met' if best.mfu >= 0.4 else 'not met'}")
    if tiny:
        out.append("(--tiny: toy model on the CPU; the goals apply to FLUX.1-dev on a GPU)")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-sized FLUX on the CPU (tests this script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (10; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; --tiny: 1)")
    parser.add_argument("--sampler-steps", type=int, default=28)
    parser.add_argument("--no-sampler", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (TFLOP/s)")
    parser.add_argument("--tf32", action="store_true", help="TF32 for the fp32 expert matmuls (training uses fp32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.tiny:
        device, scale, name = torch.device("cpu"), TINY, "cpu (--tiny)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU mode")
        device, scale, name = torch.device("cuda"), FLUX_DEV, torch.cuda.get_device_name()
    steps = args.steps if args.steps is not None else (3 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    peak = args.peak_tflops or (None if args.tiny else peak_tflops(name))
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(0)

    print(f"[bench-gpu] device {name}; dense bf16 peak {_fmt(peak, '.4g')} TFLOP/s"
          f"{'' if peak else ' (unknown: pass --peak-tflops for MFU)'}")
    results: dict = {"device": name, "peak_tflops": peak, "config": scale.config, "prw": asdict(scale.prw),
                     "resolution": scale.resolution, "text_tokens": scale.text_tokens}
    try:
        model = build_cologen(scale.config, scale.prw, device=device, dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        print("[bench-gpu] OOM while building the model: FLUX.1-dev in bf16 needs about 26 GB before activations")
        rows = [Row(b, c == "on", status="OOM") for b in args.batch_sizes for c in args.checkpointing]
        print(format_rows(rows))
        return {**results, "rows": [asdict(r) for r in rows]}
    n_base = sum(p.numel() for p in model.base_parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_experts = sum(p.numel() for p in model.expert_parameters())
    print(f"[bench-gpu] base {_count(n_base)} params (bf16, frozen), experts {_count(n_experts)} (fp32, "
          f"{scale.prw.num_experts} x rank {scale.prw.rank}), trainable {_count(n_train)}; {scale.resolution} px target + condition: "
          f"{scale.grid ** 2} noisy + {scale.grid ** 2} source + {scale.text_tokens} text tokens")

    rows = []
    for b in args.batch_sizes:
        for c in args.checkpointing:
            rows.append(train_row(model, scale, b, c == "on", steps, warmup, device, peak))
            _free(device)
    print(format_rows(rows))
    results["rows"] = [asdict(r) for r in rows]
    for line in goals(rows, args.tiny):
        print(f"[bench-gpu] {line}")
    if not args.no_sampler:
        s = sampler_times(model, scale, args.sampler_steps, device)
        results["sampler"] = s
        if s.get("status") == "OOM":
            print(f"[bench-gpu] sampler {s['steps']} steps: OOM")
        else:
            print(f"[bench-gpu] sampler {s['steps']} steps, batch 1: cache on {s['cache_s']:.3f} s, cache off "
                  f"{s['no_cache_s']:.3f} s, speedup {s['speedup']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
