"""Training-step time of the backbone alone, one always-on LoRA (OminiControl's setup) and PRW (5 experts, router).

All three variants see the same batch and the same source tokens and are timed in one process, interleaved round by
round so that machine noise hits them alike; we report medians and the ratios against the plain LoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from cologen.model.cologen_transformer import CoLoGenTransformer
from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.packing import source_ids, target_ids, text_ids
from cologen.model.presets import tiny_transformer_config
from cologen.model.text_encoders import TextEmbeddings


@dataclass
class BenchConfig:
    name: str
    width: int
    heads: int
    double_layers: int
    single_layers: int
    rank: int
    batch: int
    grid: int  # packed tokens per side (grid x grid noisy tokens, as many source tokens)
    text_tokens: int = 32
    rounds: int = 8
    warmup: int = 2


CONFIGS = {
    "tiny": BenchConfig("tiny", width=128, heads=4, double_layers=2, single_layers=4, rank=16, batch=8, grid=8),
    "wide": BenchConfig("wide", width=512, heads=8, double_layers=2, single_layers=4, rank=32, batch=2, grid=16,
                        rounds=6),
}

VARIANTS = {
    "backbone": PRWConfig(num_experts=0),
    "lora": None,  # filled per config: one always-on expert, no router
    "prw": None,  # 5 experts, all active, router on
}


def build_variant(kind: str, cfg: BenchConfig, seed: int = 0) -> CoLoGenTransformer:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_transformer_config(cfg.width, cfg.heads, cfg.double_layers,
                                                                   cfg.single_layers))
    if kind == "backbone":
        prw = PRWConfig(num_experts=0)
    elif kind == "lora":
        prw = PRWConfig(num_experts=1, rank=cfg.rank, alpha=2 * cfg.rank, router=RouterConfig(enabled=False))
    else:
        prw = PRWConfig(num_experts=5, rank=cfg.rank, alpha=2 * cfg.rank)
    model = CoLoGenTransformer(transformer, prw)
    for _ in range(max(prw.num_experts - 1, 0)):
        model.activate_next_expert()
    model.set_entry_progress(1.0)
    model.freeze_for_curriculum()
    return model.train()


def make_batch(cfg: BenchConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = cfg.grid * cfg.grid
    return dict(latents=torch.randn(cfg.batch, n, 48, generator=g), timestep=torch.rand(cfg.batch, generator=g),
                text=TextEmbeddings(torch.randn(cfg.batch, cfg.text_tokens, 384, generator=g),
                                    torch.randn(cfg.batch, 384, generator=g)),
                img_ids=target_ids(cfg.grid, cfg.grid), txt_ids=text_ids(cfg.text_tokens),
                source_tokens=torch.randn(cfg.batch, n, 48, generator=g),
                source_ids=source_ids("aligned", cfg.grid, cfg.grid, cfg.grid, cfg.grid))


def train_step(model: CoLoGenTransformer, batch: dict) -> None:
    latents = batch["latents"]
    if not any(p.requires_grad for p in model.parameters()):
        # The plain backbone has nothing to train; a gradient w.r.t. its input makes the backward traverse the
        # same graph the adapters' backward does.
        latents = latents.detach().requires_grad_(True)
    out = model(latents, batch["timestep"], batch["text"], batch["img_ids"], batch["txt_ids"],
                batch["source_tokens"], batch["source_ids"])
    out.sample.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def training_step_times(cfg: BenchConfig) -> dict:
    models = {kind: build_variant(kind, cfg) for kind in ("backbone", "lora", "prw")}
    batch = make_batch(cfg)
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(cfg.warmup + cfg.rounds):
        for kind, model in models.items():
            t0 = time.perf_counter()
            train_step(model, batch)
            if r >= cfg.warmup:
                times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "config": cfg.name,
        "step_s": med,
        "prw_over_lora": med["prw"] / med["lora"],
        "lora_over_backbone": med["lora"] / med["backbone"],
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    results = []
    for name in args.configs:
        res = training_step_times(CONFIGS[name])
        results.append(res)
        s = res["step_s"]
        print(f"[model/{name}] step time (s): backbone {s['backbone']:.4f}  lora {s['lora']:.4f}  "
              f"prw {s['prw']:.4f}  |  prw/lora {res['prw_over_lora']:.3f} (goal <= 1.10)  "
              f"lora/backbone {res['lora_over_backbone']:.3f}")
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
