"""Where a small-batch training step spends its time: the host issuing kernels, and each checkpointed pass.

    python -m benchmarks.bench_gpu_checkpointing            # any single CUDA GPU, FLUX.1-dev-sized (random weights)
    python -m benchmarks.bench_gpu_checkpointing --tiny     # the same code path on the CPU with a toy-sized FLUX
    python -m benchmarks.bench_gpu_checkpointing --policies full selective   # + both passes, selective policy

The model and inputs are bench_gpu.py's (FLUX.1-dev, 5 experts of rank 128, 512 px target + 512 px condition).
For each variant (no checkpointing; the source pass, the main pass or both checkpointed; both with the source pass's
RNG-state preservation off; with `--policies`, both passes under each further checkpointing policy of
cologen/model/checkpointing.py) it prints the median step time and the median time Python takes to *issue* the step
(forward, backward, AdamW, measured before the closing synchronize). Issue time close to step time means the GPU
waits for the host (launch-bound), which a larger batch, CUDA graphs or torch.compile address, not fewer FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_gpu import FLUX_DEV, TINY  # the same model and inputs as bench_gpu.py
from benchmarks.flux_models import build_cologen, forward_loss, make_inputs
from cologen.model.checkpointing import POLICIES, checkpoint_function

# (name, checkpoint the source pass, checkpoint the main pass, preserve the RNG state in the source pass)
VARIANTS = [("none", False, False, True), ("main pass", False, True, True), ("source pass", True, False, True),
            ("both", True, True, True), ("both, no RNG preservation", True, True, False)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-sized FLUX on the CPU (tests this script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (6; --tiny: 2)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=["full"],
                        help="checkpointing policies (the variants above are full's; each other adds 'both, POLICY')")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU mode")
    device = torch.device("cpu" if args.tiny else "cuda")
    scale = TINY if args.tiny else FLUX_DEV
    config, prw, grid, text_tokens = scale.config, scale.prw, scale.grid, scale.text_tokens
    steps = args.steps or (2 if args.tiny else 6)
    cuda = device.type == "cuda"

    torch.manual_seed(0)
    model = build_cologen(config, prw, device=device, dtype=torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW([{"params": model.expert_parameters()}, {"params": model.router_parameters()}],
                                  fused=cuda)
    def no_rng(function, *args):  # full checkpointing without RNG-state preservation (both streams)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)

    results = []
    variants = [(*v, None) for v in VARIANTS]  # None: the model's default checkpoint function (full)
    variants += [(f"both, {p}", True, True, True, checkpoint_function(p)) for p in args.policies if p != "full"]
    print(f"{'variant':<28} {'batch':>5} {'step_s':>8} {'issue_s':>8} {'peak_GB':>8}")
    for batch in args.batch_sizes:
        inputs = make_inputs(config, batch, grid, grid, text_tokens, device=device)
        for name, source_ckpt, main_ckpt, keep_rng, checkpoint_fn in variants:
            # diffusers' own per-block checkpointing, then the source pass's
            model.enable_gradient_checkpointing(main_ckpt, checkpoint_fn if keep_rng else no_rng)
            model.gradient_checkpointing = source_ckpt
            if cuda:
                torch.cuda.reset_peak_memory_stats()

            def step(inputs: dict = inputs) -> None:
                forward_loss(model, inputs).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()
            step()
            if cuda:
                torch.cuda.synchronize()
            total, issue = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                if cuda:
                    torch.cuda.synchronize()
                total.append(time.perf_counter() - t0)
                issue.append(t1 - t0)
            row = {"variant": name, "batch": batch, "step_s": statistics.median(total),
                   "issue_s": statistics.median(issue),
                   "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
            results.append(row)
            peak = "n/a" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}"
            print(f"{name:<28} {batch:>5} {row['step_s']:>8.4f} {row['issue_s']:>8.4f} {peak:>8}", flush=True)
    return results


if __name__ == "__main__":
    main()
