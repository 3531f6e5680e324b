"""What the prompt's gate terms (`prw.gate_prompt`) cost a training step, with the tiny curriculum's expert bank
(rank 64 on every source and noisy projection, hard token gates shared with the noisy tokens, closed tokens kept as
the base's).

- `no_prompt`: gate_prompt off (the baseline);
- `held`: gate_prompt on, every expert holding its prompt terms at zero (`veteran.gate_prompt_tasks`: the steps
  before an asked task's); the source pass skips them;
- `live`: gate_prompt on, the newest expert training them (the asked task's own step), so they are computed;
- `encoder`: as `live`, the gates also reading the pretrained, frozen gate encoder's features of the condition
  (`prw.gate_image`, `gate_image_encoder: builtin`: the tiny curriculum's editing step).

Variants are interleaved round by round in one process, alternating who goes first; medians and ratios to
`no_prompt` (and `encoder`'s to `live`). Goal: `held` costs nothing (<= 1.02).

    python -m benchmarks.bench_gates [--configs tiny] [--rounds 40]
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.bench_conditions import _median_times
from benchmarks.bench_model import CONFIGS, BenchConfig, make_batch, train_step
from cologen.model.cologen_transformer import CoLoGenTransformer
from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.presets import tiny_transformer_config

VARIANTS = ("no_prompt", "held", "live", "encoder")


def build(kind: str, cfg: BenchConfig, seed: int = 0) -> CoLoGenTransformer:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_transformer_config(cfg.width, cfg.heads, cfg.double_layers,
                                                                   cfg.single_layers))
    all_projections = ["to_q", "to_k", "to_v", "to_out"]
    prw = PRWConfig(num_experts=5, rank=64, alpha=128, targets=all_projections,
                    noisy_targets=all_projections, token_gate=True, hard_gate=True, noisy_gate=True,
                    isolate_closed_tokens="output", gate_prompt=kind != "no_prompt", init="zero",
                    gate_image=kind == "encoder", gate_image_encoder="builtin" if kind == "encoder" else None,
                    router=RouterConfig(timestep_bins=4, prompt_input=True, normalize_input=True,
                                        weighting="straight_through"))
    model = CoLoGenTransformer(transformer, prw)
    for _ in range(prw.num_experts - 1):
        model.activate_next_expert()
    model.set_entry_progress(1.0)
    model.freeze_for_curriculum()
    if kind == "held":
        for e in range(prw.num_experts):
            model.hold_prompt_gate(e)
    with torch.no_grad():  # gates that open on some tokens and close on others, as trained ones do
        for name, p in model.named_parameters():
            if name.endswith("token_gate.weight"):
                p.normal_(std=0.1)
    assert model.prompt_gates_live() == (kind in ("live", "encoder")), kind
    return model.train()


def gate_costs(cfg: BenchConfig) -> dict:
    models = {kind: build(kind, cfg) for kind in VARIANTS}
    batch = make_batch(cfg)
    med = _median_times({k: (lambda m=m: train_step(m, batch)) for k, m in models.items()}, cfg.rounds, cfg.warmup)
    return {"config": cfg.name, "step_s": med, "held_over_no_prompt": med["held"] / med["no_prompt"],
            "live_over_no_prompt": med["live"] / med["no_prompt"], "encoder_over_live": med["encoder"] / med["live"]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["tiny"], choices=list(CONFIGS))
    # a 3% difference needs more rounds than the model benchmark's 8 to stand out of this machine's noise
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds per variant")
    args = parser.parse_args(argv)
    results = []
    for name in args.configs:
        cfg = CONFIGS[name]
        cfg = BenchConfig(**{**cfg.__dict__, "rounds": args.rounds})
        res = gate_costs(cfg)
        results.append(res)
        s = res["step_s"]
        print(f"[gates/{name}] step time (s): no prompt terms {s['no_prompt']:.4f}  held at zero {s['held']:.4f}  "
              f"live {s['live']:.4f}  with the gate encoder {s['encoder']:.4f}  |  held/none "
              f"{res['held_over_no_prompt']:.3f} (goal <= 1.02)  live/none {res['live_over_no_prompt']:.3f}  "
              f"encoder/live {res['encoder_over_live']:.3f}")
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
