"""Sampler time for one 28-step request with and without the condition cache (as many source tokens as noisy ones).

Without the cache every denoising step re-runs the source stream; with it the source stream runs once per request
(once per timestep bin when routing is time-aware). Both variants are timed in one process, interleaved round by
round; we report medians and the speed-up. Outputs of the two agree (tests/test_sampling.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench_model import CONFIGS, BenchConfig, build_variant
from cologen.model.codecs import PixelCodec
from cologen.model.packing import SourcePositionConfig
from cologen.model.text_encoders import TextEmbeddings
from cologen.sampling.sampler import FlowSampler, SamplerConfig


def sampler_times(cfg: BenchConfig, timestep_bins: int, steps: int = 28, rounds: int = 3) -> dict:
    model = build_variant("prw", cfg).eval()
    for attn in model.prw_modules():  # time-aware (bins > 0) or time-independent routing
        if timestep_bins == 0:
            attn.prw_router.time_bias = None
    model.prw.router.timestep_bins = timestep_bins
    codec = PixelCodec(2)
    g = torch.Generator().manual_seed(0)
    text = TextEmbeddings(torch.randn(1, cfg.text_tokens, 384, generator=g), torch.randn(1, 384, generator=g))
    side = cfg.grid * codec.patch_pixels
    source = torch.rand(1, 3, side, side, generator=g) * 2 - 1
    samplers = {name: FlowSampler(model, codec, SourcePositionConfig(), False,
                                  SamplerConfig(steps=steps, use_cache=(name == "cache")))
                for name in ("no_cache", "cache")}
    times: dict[str, list[float]] = {k: [] for k in samplers}
    hit_rate = 0.0
    for r in range(rounds + 1):
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            _, stats = sampler.sample(text, side, side, source, ["editing"], seed=0)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            if name == "cache":
                hit_rate = stats.cache_hit_rate
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": cfg.name, "timestep_bins": timestep_bins, "steps": steps, "seconds": med,
            "speedup": med["no_cache"] / med["cache"], "cache_hit_rate": hit_rate,
            "tokens": {"noisy": cfg.grid ** 2, "source": cfg.grid ** 2, "text": cfg.text_tokens}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--bins", nargs="+", type=int, default=[0, 4])
    args = parser.parse_args(argv)
    results = []
    for name in args.configs:
        for bins in args.bins:
            res = sampler_times(CONFIGS[name], bins)
            results.append(res)
            s = res["seconds"]
            print(f"[sampler/{name}] 28 steps, routing {'time-aware (' + str(bins) + ' bins)' if bins else 'time-independent'}: "
                  f"no cache {s['no_cache']:.3f} s, cache {s['cache']:.3f} s  |  speed-up {res['speedup']:.2f}x "
                  f"(goal >= 1.8x on 'wide'), hit rate {res['cache_hit_rate']:.2f}")
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
