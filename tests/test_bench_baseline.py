"""The GPU benchmark's side-by-side baseline (benchmarks/baseline_lora.py) on a toy FLUX on the CPU: stock diffusers
FLUX with a peft LoRA on every block's K/V, the condition concatenated FLUX Kontext's way. Its LoRA is what we
expect, a step trains only the LoRA, the loss reads only the noisy tokens (which the condition does influence), its
FLOP count equals torch's FlopCounterMode op by op, and the script prints its rows."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("peft")

from benchmarks.baseline_lora import (  # noqa: E402
    LORA_TARGETS,
    baseline_inputs,
    baseline_loss,
    baseline_prediction,
    baseline_six_n_flops,
    baseline_step_flops,
    build_baseline,
    cologen_six_n_flops,
    main,
    six_n_flops,
    step_tokens,
    time_baseline,
)
from benchmarks.flux_models import FLUX_DEV_TRANSFORMER, build_cologen, make_inputs, workload_of  # noqa: E402
from cologen.model.config import PRWConfig  # noqa: E402
from cologen.testing.flux import TINY_TRANSFORMER  # noqa: E402
from cologen.training.flops import Workload, flux_workload, training_step_flops  # noqa: E402

CONFIG = {**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 3, "num_attention_heads": 4,
          "pooled_projection_dim": 24}
RANK = 4
D = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]


def _adapted(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if hasattr(m, "lora_A"))


def test_the_lora_sits_on_every_blocks_k_and_v_only_and_trains_in_fp32():
    model = build_baseline(CONFIG, rank=RANK, alpha=2 * RANK, dtype=torch.bfloat16)
    blocks = [f"transformer_blocks.{i}" for i in range(CONFIG["num_layers"])] + [
        f"single_transformer_blocks.{i}" for i in range(CONFIG["num_single_layers"])]
    assert _adapted(model) == sorted(f"{b}.attn.to_{p}" for b in blocks for p in "kv")
    assert LORA_TARGETS == ("attn.to_k", "attn.to_v")  # not the text stream's add_k_proj / add_v_proj
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in trainable)
    # rank x (in + out) per adapted Linear: A is r x D, B is D x r; two per block (K and V)
    per_linear = RANK * (D + D)
    assert sum(p.numel() for p in trainable.values()) == 2 * len(blocks) * per_linear
    to_k = model.transformer_blocks[0].attn.to_k
    assert to_k.scaling["default"] == 2.0  # alpha / rank
    assert torch.count_nonzero(to_k.lora_B["default"].weight) == 0  # gaussian init: A random, B zero


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_training_step_changes_only_the_lora(checkpointing):
    torch.manual_seed(0)
    model = build_baseline(CONFIG, rank=RANK, alpha=2 * RANK, dtype=torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    inputs = make_inputs(CONFIG, batch=2, rows=4, cols=4, text_tokens=8)
    baseline_loss(model, inputs).backward()
    # every LoRA gets a gradient, the first block's too (diffusers' non-reentrant checkpoint), the base none
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        if not p.requires_grad:
            assert p.grad is None, n
    optimizer.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_the_condition_is_concatenated_and_the_loss_reads_only_the_noisy_tokens():
    torch.manual_seed(0)
    model = build_baseline(CONFIG, rank=RANK, alpha=2 * RANK, dtype=torch.float32)
    with torch.no_grad():  # a non-zero LoRA, so its path shows up too
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    inputs = make_inputs(CONFIG, batch=2, rows=4, cols=4, text_tokens=8)
    n, nc = inputs["latents"].shape[1], inputs["source_tokens"].shape[1]
    args = baseline_inputs(inputs)
    assert args["hidden_states"].shape == (2, n + nc, CONFIG["in_channels"])
    assert torch.equal(args["hidden_states"][:, :n], inputs["latents"])
    assert torch.equal(args["hidden_states"][:, n:], inputs["source_tokens"])
    ids = args["img_ids"]
    assert ids.shape == (n + nc, 3)
    assert torch.equal(ids[:n, 0], torch.zeros(n)) and torch.equal(ids[n:, 0], torch.ones(nc))  # Kontext's plane 1
    assert torch.equal(ids[n:, 1:], ids[:n, 1:])  # aligned: the condition on the target's grid
    out = baseline_prediction(model, inputs)
    assert out.shape == (2, n + nc, CONFIG["in_channels"])
    loss = baseline_loss(model, inputs)
    assert torch.allclose(loss, F.mse_loss(out[:, :n], inputs["target"]))

    # the loss's gradient reaches the noisy tokens' outputs only
    captured = {}

    def keep(module, args, output):
        output[0].retain_grad()
        captured["out"] = output[0]

    handle = model.register_forward_hook(keep)
    baseline_loss(model, inputs).backward()
    handle.remove()
    grad = captured["out"].grad
    assert grad[:, :n].abs().sum() > 0 and torch.count_nonzero(grad[:, n:]) == 0

    # the condition tokens do influence the noisy tokens' prediction, through the joint attention
    with torch.no_grad():
        other = {**inputs, "source_tokens": torch.randn_like(inputs["source_tokens"])}
        assert not torch.allclose(baseline_loss(model, other), loss.detach())
        assert not torch.allclose(baseline_prediction(model, other)[:, :n], out[:, :n].detach())


@pytest.mark.parametrize("batch,side,text", [(2, 4, 8), (1, 2, 5)])
def test_flop_count_matches_flop_counter_mode(batch, side, text, restore_attention_backend):
    torch.manual_seed(0)
    model = build_baseline(CONFIG, rank=RANK, alpha=2 * RANK, dtype=torch.float32)
    model.set_attention_backend("_native_math")  # attention as bmm ops the counter sees
    inputs = make_inputs(CONFIG, batch=batch, rows=side, cols=side, text_tokens=text)
    with FlopCounterMode(display=False) as fwd:
        loss = baseline_loss(model, inputs)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    count = baseline_step_flops(CONFIG, workload_of(inputs), RANK, dense_attention_backward=False)
    assert count.forward == fwd.get_total_flops()
    assert count.backward == bwd.get_total_flops()
    # the fused-kernel convention counts attention backward as 2 x its forward: more than the math path's
    assert baseline_step_flops(CONFIG, workload_of(inputs), RANK).backward > count.backward


def test_flux_dev_baseline_flops_per_step():
    work = flux_workload(512, 512, batch=1)
    count = baseline_step_flops(FLUX_DEV_TRANSFORMER, work, rank=128)
    d, s = 3072, 512 + 1024 + 1024
    base = 57 * 24 * d * d * s  # every block, the whole joint sequence
    assert base < count.parts["blocks"][0] < 1.01 * base  # + the timestep modulation
    assert count.parts["attention"][0] == 57 * 4 * d * s * s
    assert count.parts["lora"][0] == 8 * d * 128 * (19 * 2048 + 38 * s)
    assert count.parts["attention"][1] == 2 * count.parts["attention"][0]
    assert baseline_step_flops(FLUX_DEV_TRANSFORMER, flux_workload(512, 512, batch=4), 128).total == pytest.approx(
        4 * count.total)
    # the same tokens through the same frozen weights, but full joint attention and a backward through every block
    # for every token: more model FLOPs than CoLoGen's step
    cologen = training_step_flops(FLUX_DEV_TRANSFORMER, work, rank=128, num_experts=5)
    assert count.parts["blocks"][0] == pytest.approx(cologen.parts["blocks"][0], rel=1e-3)
    assert count.parts["attention"][0] > cologen.parts["attention"][0]
    assert cologen.total < count.total < 1.3 * cologen.total


def test_six_n_flops():
    assert six_n_flops(10, 7) == 420
    assert six_n_flops(12e9, 4 * 2560) == pytest.approx(6 * 12e9 * 10240)
    work = Workload(batch=3, noisy_tokens=16, source_tokens=16, text_tokens=8)
    assert step_tokens(work) == 3 * (16 + 16 + 8)
    baseline = build_baseline(CONFIG, rank=RANK, alpha=2 * RANK, device="meta")
    n_all = sum(p.numel() for p in baseline.parameters())  # the frozen base + the LoRA
    assert baseline_six_n_flops(baseline, work) == 6 * n_all * 120
    cologen = build_cologen(CONFIG, PRWConfig(num_experts=5, rank=RANK, alpha=2 * RANK), device="meta")
    base = sum(p.numel() for p in cologen.base_parameters())
    trainable = sum(p.numel() for p in cologen.parameters() if p.requires_grad)
    one_expert = sum(p.numel() for p in cologen.expert_parameters(cologen.newest_expert))
    assert trainable == one_expert + sum(p.numel() for p in cologen.router_parameters())
    assert cologen_six_n_flops(cologen, work) == 6 * (base + trainable) * 120
    # the same base and tokens; N differs only by the trainable parts
    assert base == n_all - sum(p.numel() for p in baseline.parameters() if p.requires_grad)


def test_time_baseline_reuses_a_given_model():
    from benchmarks.bench_gpu import TINY

    model = build_baseline(TINY.config, TINY.prw.rank, TINY.prw.alpha, dtype=torch.bfloat16)
    row = time_baseline(TINY, 2, True, steps=1, warmup=0, device="cpu", peak=1.0, model=model)
    assert row.status == "ok" and row.step_s > 0 and row.peak_mem_gb is None
    assert row.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert row.mfu == pytest.approx(row.tflops) and row.mfu_6n > 0
    assert set(row.parts) == {"embed", "proj_out", "blocks", "attention", "lora"}


@pytest.mark.timeout(240)
def test_main_tiny_prints_its_rows_and_the_ratio(tmp_path, capsys):
    out = tmp_path / "baseline.json"
    results = main(["--tiny", "--steps", "1", "--warmup", "0", "--batch-sizes", "1", "2", "--checkpointing", "on",
                    "off", "--peak-tflops", "0.5", "--compare", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["batch", "ckpt"])
    assert header.split() == ["batch", "ckpt", "step_s", "tokens/s", "TFLOP/s", "MFU", "MFU_6N", "peak_mem_GB"]
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert sorted((r[0], r[1]) for r in rows) == [("1", "off"), ("1", "on"), ("2", "off"), ("2", "on")]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0
        assert r[5].endswith("%") and r[6].endswith("%") and r[7] == "n/a"
    ratios = [line for line in lines if "CoLoGen" in line and line.rstrip().endswith("x")]
    assert len(ratios) == 4
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 4 and len(saved["cologen_rows"]) == 4
    assert all(r["status"] == "ok" and r["mfu_6n"] > 0 for r in results["rows"] + results["cologen_rows"])
