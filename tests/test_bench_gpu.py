"""The GPU benchmark's pieces on the CPU: the trainable-aware FLOP count equals what torch's FlopCounterMode counts
op by op, the memory plan's switches move the counted bytes the right way, and `bench_gpu.py --tiny` runs the GPU
code path end to end and prints every column."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flux_models import (
    FLUX_DEV_TRANSFORMER,
    build_cologen,
    forward_loss,
    make_inputs,
)
from benchmarks.memory import activation_bytes, count_params
from cologen.model.config import PRWConfig
from cologen.model.packing import SourcePositionConfig
from cologen.model.text_encoders import TextEmbeddings
from cologen.sampling.sampler import FlowSampler, SamplerConfig
from cologen.testing.flux import TINY_TRANSFORMER
from cologen.training.flops import Workload, flux_workload, sampling_flops, training_step_flops

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 3, "num_attention_heads": 4,
          "pooled_projection_dim": 24}


@pytest.mark.parametrize("blocks", ["both", "double", "single"])
def test_flop_count_matches_flop_counter_mode(blocks, restore_attention_backend):
    torch.manual_seed(0)
    model = build_cologen(CONFIG, PRWConfig(num_experts=5, rank=4, alpha=8, blocks=blocks), dtype=torch.float32)
    model.transformer.set_attention_backend("_native_math")  # attention as bmm ops the counter sees
    inputs = make_inputs(CONFIG, batch=2, rows=4, cols=4, text_tokens=8)
    with FlopCounterMode(display=False) as fwd:
        loss = forward_loss(model, inputs)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    count = training_step_flops(CONFIG, Workload(2, 16, 16, 8), rank=4, num_experts=5, prw_blocks=blocks,
                                dense_attention_backward=False)
    assert count.forward == fwd.get_total_flops()
    assert count.backward == bwd.get_total_flops()
    # the frozen base costs no weight gradients: the backward is well under twice the forward
    assert count.backward < 1.5 * count.forward



def test_sampling_flop_count_matches_flop_counter_mode(restore_attention_backend):
    from benchmarks.bench_gpu import LatentStandIn

    torch.manual_seed(0)
    model = build_cologen(CONFIG, PRWConfig(num_experts=5, rank=4, alpha=8), dtype=torch.float32).eval()
    model.transformer.set_attention_backend("_native_math")
    g = torch.Generator().manual_seed(0)
    text = TextEmbeddings(torch.randn(1, 8, CONFIG["joint_attention_dim"], generator=g),
                          torch.randn(1, CONFIG["pooled_projection_dim"], generator=g))
    source = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    sampler = FlowSampler(model, LatentStandIn(CONFIG["in_channels"] // 4), SourcePositionConfig(),
                          CONFIG["guidance_embeds"], SamplerConfig(steps=5))
    with FlopCounterMode(display=False) as counter:
        _, stats = sampler.sample(text, 64, 64, source, ["editing"], seed=0)
    assert stats.source_passes >= 2  # once per timestep bin the 5 steps visit
    work = Workload(1, 16, 16, 8)  # 64 px: 4 x 4 packed tokens of 2 x 2 latent cells of 8 px
    assert sampling_flops(CONFIG, work, 5, stats.source_passes, rank=4, num_experts=5) == counter.get_total_flops()
    one_step = sampling_flops(CONFIG, work, 1, 0, rank=4, num_experts=5)
    assert sampling_flops(CONFIG, work, 6, stats.source_passes, rank=4, num_experts=5) - one_step == \
        counter.get_total_flops()  # linear in the steps

def test_flux_dev_flops_per_step():
    work = flux_workload(512, 512, batch=1)
    assert (work.noisy_tokens, work.source_tokens, work.text_tokens) == (1024, 1024, 512)
    count = training_step_flops(FLUX_DEV_TRANSFORMER, work, rank=128, num_experts=5)
    d = 3072
    base = 57 * 24 * d * d * (1536 + 1024)  # every block, both streams
    assert base < count.parts["blocks"][0] < 1.01 * base  # + the timestep modulation
    attention = 57 * 4 * d * (1536 * 2560 + 1024 * 1024)
    assert count.parts["attention"][0] == attention
    assert count.parts["lora"][0] == 57 * 8 * d * 128 * (1024 + 5)  # + each sample's pick among the 5 experts
    batch4 = training_step_flops(FLUX_DEV_TRANSFORMER, flux_workload(512, 512, batch=4), rank=128, num_experts=5)
    assert batch4.total == pytest.approx(4 * count.total)
    assert 70e12 < count.total < 85e12  # ~77 TFLOP per sample


def test_flux_dev_is_twelve_billion_parameters():
    from diffusers import FluxTransformer2DModel

    assert 11.8e9 < count_params(lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)) < 12.0e9


def test_activation_plan_switches_move_memory_the_right_way():
    model = build_cologen(CONFIG, PRWConfig(num_experts=5, rank=4, alpha=8), device="meta")
    one = make_inputs(CONFIG, 1, 8, 8, 8, device="meta")
    four = make_inputs(CONFIG, 4, 8, 8, 8, device="meta")
    full = activation_bytes(model, one, checkpointing=False)
    ckpt = activation_bytes(model, one, checkpointing=True)
    math = activation_bytes(model, one, checkpointing=False, attention="math")
    assert ckpt.total < 0.5 * full.total
    assert ckpt.kv_stash > 0 and 0 < ckpt.recompute == max(full.per_block.values())
    assert math.total > full.total  # the math kernel keeps the attention probabilities
    # activations grow with the batch (RoPE tables and the stacked expert weights do not)
    assert 3.5 * full.total < activation_bytes(model, four, checkpointing=False).total < 4 * full.total
    # one entry per block and stream
    assert {k.split(":")[0] for k in full.per_block if k != "outside"} == {"main", "source"}
    assert len([k for k in full.per_block if k != "outside"]) == 2 * 5


def test_peak_table_knows_the_common_gpus():
    from benchmarks import bench_gpu as bench

    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench.peak_tflops("NVIDIA H200") == 989
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench.peak_tflops("NVIDIA L40S") == 362
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") == 165
    assert bench.peak_tflops("Some Future GPU") is None


@pytest.mark.timeout(400)
def test_tiny_mode_runs_the_gpu_code_path_on_the_cpu_and_prints_every_column(tmp_path):
    out = tmp_path / "bench.json"
    rows_arg = ["1/full", "1/off", "4/off", "4/selective", "1/full:0.5", "4/off/compile", "4/budget:0.5/compile",
                "1/full/int8"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--tiny", "--steps", "2", "--sampler-steps", "6",
         "--peak-tflops", "0.5", "--compile-backend", "aot_eager", "--rows", *rows_arg, "--json", str(out),
         "--sampler", "eager", "compiled", "cudagraphs"],
        cwd=ROOT, capture_output=True, text=True, timeout=380, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["batch", "ckpt"])
    assert header.split() == ["batch", "ckpt", "compiled", "quant", "step_s", "first_s", "tokens/s", "TFLOP/s", "MFU",
                              "MFU_6N", "peak_mem_GB"]
    table = lines[lines.index(header) + 1:lines.index(header) + 1 + len(rows_arg)]
    rows = [line.split() for line in table]
    assert sorted(f"{r[0]}/{r[1]}{'/compile' if r[2] == 'yes' else ''}{'/' + r[3] if r[3] != 'bf16' else ''}"
                  for r in rows) == sorted(rows_arg)
    for r in rows:
        assert len(r) == 11 and float(r[4]) > 0 and float(r[5]) > 0 and float(r[6]) > 0 and float(r[7]) > 0
        assert r[8].endswith("%") and r[9].endswith("%") and r[10] == "n/a"  # no allocator statistics on the CPU
    eager = next(line for line in lines if "sampler (eager) 6 steps" in line)
    assert "cache on" in eager and "cache off" in eager and "speedup" in eager
    for label in ("compiled", "cudagraphs"):  # cudagraphs: recompiled in reduce-overhead mode (no graphs on a CPU)
        assert any(f"sampler ({label}) 6 steps" in line and "cache on" in line and "of peak" in line for line in lines)
    assert any("eval loss at batch 1, eager" in line for line in lines)
    for goal in ("goal MFU >= 45% at batch 4 without checkpointing", "goal peak memory <= 40 GB",
                 "goal int8 base's loss within 2% of bf16's", "goal first compiled step <= 90 s"):
        assert any(goal in line for line in lines), goal
    results = json.loads(out.read_text())
    assert len(results["rows"]) == len(rows_arg) and results["sampler"]["eager"]["speedup"] > 0
    for s in results["sampler"].values():  # the model FLOPs of a request over its time with the cache
        assert s["tflops"] > 0 and s["mfu"] == pytest.approx(s["tflops"] / 0.5)
    assert all(r["status"] == "ok" for r in results["rows"])
    assert abs(results["compiled_vs_eager"]["compiled_loss"] / results["compiled_vs_eager"]["eager_loss"] - 1) < 1e-2


def test_row_specs_parse_and_refuse_bad_ones():
    from benchmarks.bench_gpu import Variant

    assert Variant.parse("4/off/compile") == Variant(4, "off", True, None)
    assert Variant.parse("1/on/int8") == Variant(1, "full", False, "int8")
    assert str(Variant.parse("2/selective/compile/float8")) == "2/selective/compile/float8"
    assert Variant.parse("1/full:0.25/compile") == Variant(1, "full:0.25", True, None)
    assert Variant.parse("4/budget:0.7/compile").checkpointing == "budget:0.7"
    for bad in ("x/off", "4/sometimes", "4/off/fast", "4/off/int8/float8", "4/full:1.5", "4/full:x", "4/off:0.5",
                "4/budget:0.5", "4/budget/compile"):
        with pytest.raises(ValueError, match="expected BATCH"):
            Variant.parse(bad)


def test_a_failed_rows_status_keeps_the_cause():
    from benchmarks.bench_gpu import error_line

    error = RuntimeError("backend='inductor' raised:\n\nTraceback ...\n  File x\nAssertionError: no float8 kernel\n")
    assert error_line(error) == "RuntimeError: backend='inductor' raised: ... AssertionError: no float8 kernel"
    assert error_line(ValueError("one line")) == "ValueError: one line"


def test_checkpointing_breakdown_runs_every_variant_on_the_cpu():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu_checkpointing", "--tiny", "--batch-sizes", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=220,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines()[1:] if line.strip()]
    names = [line[:28].strip() for line in rows]
    assert names == ["none", "main pass", "source pass", "both", "both, no RNG preservation"]
    for line in rows:
        step_s, issue_s = (float(x) for x in line[28:].split()[1:3])
        assert 0 < issue_s <= step_s + 1e-6  # issuing a step never takes longer than the step (CPU: equal)


def test_docs_gpu_results_table_is_the_commands_output():
    """docs/benchmarks.md's 2026-11-30 and 2026-12-04 tables are `python -m benchmarks.bench_gpu --table` of the committed files."""
    from pathlib import Path

    from benchmarks.bench_gpu import markdown_table

    for pattern, count in (("h200_run*.json", 3), ("h200_1204_run*.json", 4)):  # 2026-11-30, 2026-12-04
        files = sorted(Path("docs/results/bench_gpu").glob(pattern))
        assert len(files) == count
        table = markdown_table(files)
        assert table.count("\n") > 10 and table in Path("docs/benchmarks.md").read_text()


def test_readme_compiled_and_quantized_rows_are_the_measured_ones():
    """The README's 2026-11-30 rows (compiled blocks, int8 base) are those of docs/results/bench_gpu's files."""
    from pathlib import Path

    measured = {}  # the 2026-11-30 files last: their rows are the README's where a later run repeated one
    for path in sorted(Path("docs/results/bench_gpu").glob("h200_*run*.json")):
        for r in json.loads(path.read_text())["rows"]:
            measured[(r["batch"], r["checkpointing"], r["compiled"], r["quantize"] or "bf16")] = r
    rows = [line.strip("|").split("|") for line in Path("README.md").read_text().splitlines()
            if re.match(r"^\| [14] \| (full|off|(full|budget):[0-9.]+) \| (eager|compiled) \|", line)]
    checked = 0
    for batch, ckpt, blocks, base, step, mfu, peak in (map(str.strip, r) for r in rows):
        key = (int(batch), ckpt, blocks == "compiled", base)
        if key[2] or base != "bf16":
            r = measured[key]
            assert (f"{r['step_s']:.2f}", f"{100 * r['mfu']:.1f}%", f"{r['peak_mem_gb']:.1f} GB") == (step, mfu, peak)
            checked += 1
    assert checked == 8
