"""What each added condition costs (docs/multi_condition.md): K = 1, 2, 3 conditions of as many tokens as the target.

- training step (forward + backward of the PRW model, as bench_model times it), as a ratio to K = 1, beside the
  ratio of tokens the step processes ((noisy + K x source) / (noisy + source)): training should grow no faster than
  linearly in the condition tokens (each condition is its own stream, quadratic in its own tokens only);
- one denoising step with the condition cache filled (the main pass alone: each condition adds only keys and values
  to attend to), as a ratio to K = 1; goal: each added condition <= 15% at the wide config;
- a 28-step request with the cache (every condition's stream once per timestep bin), for reference.
Variants are interleaved round by round in one process; medians. `memory_by_conditions` computes FLUX.1-dev's
activation memory at 512 px for K = 1..4 with the memory plan's method (benchmarks/memory.py).

    python -m benchmarks.bench_conditions [--configs tiny wide] [--memory]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_model import CONFIGS, BenchConfig, build_variant, make_batch
from cologen.model.codecs import PixelCodec
from cologen.model.cologen_transformer import ConditionCache
from cologen.model.packing import SourcePositionConfig, source_ids
from cologen.sampling.sampler import FlowSampler, SamplerConfig

COUNTS = (1, 2, 3)


def _conditions(cfg: BenchConfig, k: int, seed: int = 5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = cfg.grid * cfg.grid
    tokens = [torch.randn(cfg.batch, n, 48, generator=g) for _ in range(k)]
    ids = [source_ids("aligned", cfg.grid, cfg.grid, cfg.grid, cfg.grid, condition=i) for i in range(k)]
    return tokens, ids


def _median_times(fns: dict[int, callable], rounds: int, warmup: int) -> dict[int, float]:
    times: dict[int, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in (list(fns.items()) if r % 2 else list(fns.items())[::-1]):  # alternate who goes first
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def condition_costs(cfg: BenchConfig, sampler_steps: int = 28) -> dict:
    model = build_variant("prw", cfg)
    batch = make_batch(cfg)
    inputs = {k: _conditions(cfg, k) for k in COUNTS}

    def train(k):
        def step():
            tokens, ids = inputs[k]
            out = model(batch["latents"], batch["timestep"], batch["text"], batch["img_ids"], batch["txt_ids"],
                        tokens, ids)
            out.sample.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return step

    train_s = _median_times({k: train(k) for k in COUNTS}, cfg.rounds, cfg.warmup)

    model.eval()
    caches = {}
    with torch.no_grad():
        for k in COUNTS:  # filled once: each timed call is one denoising step's main pass
            caches[k] = ConditionCache()
            tokens, ids = inputs[k]
            model.prefill(caches[k], tokens, ids, batch["text"].pooled, batch["timestep"])

    def denoise(k):
        def step():
            with torch.no_grad():
                tokens, ids = inputs[k]
                model(batch["latents"], batch["timestep"], batch["text"], batch["img_ids"], batch["txt_ids"], tokens,
                      ids, cache=caches[k])
        return step

    step_s = _median_times({k: denoise(k) for k in COUNTS}, cfg.rounds, cfg.warmup)

    codec, side = PixelCodec(2), cfg.grid * 4
    sampler = FlowSampler(model, codec, SourcePositionConfig(), False, SamplerConfig(steps=sampler_steps))
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, side, side, generator=g) * 2 - 1 for _ in COUNTS]
    text = type(batch["text"])(batch["text"].tokens[:1], batch["text"].pooled[:1])

    def request(k):
        def run():
            sampler.sample(text, side, side, images[:k], ["editing"], seed=0)
        return run

    request_s = _median_times({k: request(k) for k in COUNTS}, max(2, cfg.rounds // 3), 1)
    noisy = cfg.grid * cfg.grid
    return {
        "config": cfg.name, "tokens": {"noisy": noisy, "per_condition": noisy, "text": cfg.text_tokens},
        # keyed by the condition count as a string, as the results file (JSON) keeps them
        "train_step_s": _keyed(train_s), "train_ratio": _keyed({k: train_s[k] / train_s[1] for k in COUNTS}),
        "token_ratio": _keyed({k: (noisy + k * noisy) / (2 * noisy) for k in COUNTS}),
        "denoise_step_s": _keyed(step_s), "denoise_ratio": _keyed({k: step_s[k] / step_s[1] for k in COUNTS}),
        "added_condition_per_step": max((step_s[k] / step_s[k - 1]) - 1 for k in COUNTS[1:]),
        "request_s": _keyed(request_s), "sampler_steps": sampler_steps,
    }


def _keyed(values: dict[int, float]) -> dict[str, float]:
    return {str(k): v for k, v in values.items()}


def memory_by_conditions(counts: tuple[int, ...] = (1, 2, 3, 4), batch: int = 1, config: dict | None = None,
                         grid: int = 32, text_tokens: int = 512) -> dict[int, dict[str, float]]:
    """FLUX.1-dev (or `config`), a grid x grid packed target (32: 512 px) and K conditions as large, batch 1:
    activation GB with and without checkpointing, and the persistent GB (weights, the trained expert's gradients
    and AdamW states), from the memory plan."""
    from benchmarks.flux_models import FLUX_DEV_TRANSFORMER, PAPER_PRW, build_cologen, make_inputs
    from benchmarks.memory import GB, activation_bytes, plan

    config = config or FLUX_DEV_TRANSFORMER
    model = build_cologen(config, PAPER_PRW, device="meta", dtype=torch.bfloat16)
    persistent = plan(config, batch_sizes=()).persistent()
    out = {}
    for k in counts:
        inputs = make_inputs(config, batch, grid, grid, text_tokens, device="meta")
        inputs["source_tokens"] = [inputs["source_tokens"].clone() for _ in range(k)]
        inputs["source_ids"] = [source_ids("aligned", grid, grid, grid, grid, device="meta", condition=i)
                                for i in range(k)]
        full = activation_bytes(model, inputs, False)
        ckpt = activation_bytes(model, inputs, True, recompute=max(full.per_block.values()))
        out[k] = {"activations_gb": full.total / GB, "activations_checkpointed_gb": ckpt.total / GB,
                  "persistent_gb": persistent / GB, "total_checkpointed_gb": (persistent + ckpt.total) / GB}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--memory", action="store_true", help="also FLUX.1-dev's activation memory for K = 1..4")
    args = parser.parse_args(argv)
    results: dict = {"speed": []}
    for name in args.configs:
        res = condition_costs(CONFIGS[name])
        results["speed"].append(res)
        train = "  ".join(f"K={k} {res['train_ratio'][str(k)]:.2f}x (tokens {res['token_ratio'][str(k)]:.2f}x)"
                          for k in COUNTS)
        step = "  ".join(f"K={k} {res['denoise_ratio'][str(k)]:.2f}x" for k in COUNTS)
        print(f"[conditions/{name}] training step: {train}")
        print(f"[conditions/{name}] denoising step with the cache: {step}; each added condition at most "
              f"{100 * res['added_condition_per_step']:+.0f}% (goal <= 15% at the wide config)")
    if args.memory:
        results["memory"] = _keyed(memory_by_conditions())
        for k, m in results["memory"].items():
            print(f"[conditions/memory] FLUX.1-dev 512 px, batch 1, K={k}: activations {m['activations_gb']:.1f} GB, "
                  f"with checkpointing {m['activations_checkpointed_gb']:.1f} GB; with the persistent "
                  f"{m['persistent_gb']:.1f} GB: {m['total_checkpointed_gb']:.1f} GB")
    return results


if __name__ == "__main__":
    main()
