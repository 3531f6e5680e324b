"""Sharded training (FSDP2 through CoLoGenFSDPStrategy): the unit layout on a tiny FLUX with a bf16 base, and a
two-process CPU curriculum run through the CLI (torchrun, gloo): the ranks agree after every step, the frozen base
and the veteran expert stay bit-identical, the checkpoint is the usual adapter checkpoint, and a run resumed in the
middle of a curriculum step ends with exactly the weights of the uninterrupted one."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from benchmarks.flux_models import build_cologen, forward_loss, make_inputs
from cologen.model.config import PRWConfig
from cologen.model.presets import FluxDevPreset
from cologen.module import CoLoGenModule
from cologen.testing.cli import run_fit
from cologen.testing.flux import TINY_TRANSFORMER
from cologen.training.fsdp import data_parallel_mesh, shard_cologen
from cologen.training.replicas import read_reports

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _batch(b=2, size=32):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    return {"target": target, "source": target.flip(-1), "has_source": torch.ones(b, dtype=torch.bool),
            "prompt": ["a red square", "a blue circle"][:b], "task": ["editing"] * b}


def test_blocks_and_expert_banks_are_units_routers_stay_replicated(flux, one_rank):
    module = CoLoGenModule(preset=FluxDevPreset(str(flux), dtype="bfloat16", text_max_length=16),
                           prw=PRWConfig(num_experts=3, rank=4, alpha=8), gradient_checkpointing=True)
    model = module.model
    shard_cologen(model, data_parallel_mesh("cpu", 1))
    blocks = [b for _, b in model._named_blocks()]
    assert len(blocks) == 3 and all(isinstance(b, FSDPModule) for b in blocks)
    assert all(isinstance(a.prw_experts, FSDPModule) for a in model.prw_modules())
    assert isinstance(model, FSDPModule)
    assert not any(isinstance(a.prw_router, FSDPModule) for a in model.prw_modules())
    # frozen base sharded in bf16, experts sharded in fp32, routers whole
    base = model.base_parameters()
    assert all(isinstance(p, DTensor) and p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.expert_parameters())
    assert all(not isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.router_parameters())

    # the curriculum unfreezes expert 1 after wrapping: it trains, the veteran and the base get no gradient
    model.activate_next_expert()
    model.set_entry_progress(1.0)
    optimizer = module.configure_optimizers()["optimizer"]
    veteran = [p.full_tensor().clone() for p in model.expert_parameters(0)]
    base_before = [p.full_tensor().clone() for p in base[:8]]
    newest_before = [p.full_tensor().clone() for p in model.expert_parameters(1)]
    module.train()
    for _ in range(3):
        module.compute_losses(_batch(), train=True)["loss"].backward()
        assert all(p.grad is None for p in model.expert_parameters(0) + base)
        assert all(p.grad is not None for p in model.expert_parameters(1) + model.router_parameters())
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, p.full_tensor()) for a, p in zip(veteran, model.expert_parameters(0)))
    assert all(torch.equal(a, p.full_tensor()) for a, p in zip(base_before, base[:8]))
    assert any(not torch.equal(a, p.full_tensor()) for a, p in zip(newest_before, model.expert_parameters(1)))


@pytest.mark.parametrize(("checkpointing", "reshard_after_forward"), [(True, True), (False, True), (False, False)])
def test_sharded_gradients_equal_the_unsharded_model(one_rank, checkpointing, reshard_after_forward):
    """Each block runs twice per forward and the source keys/values leave it through the PRW context, not its
    outputs: the gradients must still be exactly those of the unsharded model, with and without checkpointing."""
    config = {**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 2}
    torch.manual_seed(0)
    reference = build_cologen(config, PRWConfig(num_experts=3, rank=4, alpha=8), dtype=torch.float32)
    for attn in reference.prw_modules():  # non-zero up-projections, so every path carries gradient
        for p in attn.prw_experts.parameters():
            torch.nn.init.normal_(p, std=0.1)
    reference.enable_gradient_checkpointing(checkpointing)
    sharded = copy.deepcopy(reference)
    shard_cologen(sharded, data_parallel_mesh("cpu", 1), reshard_after_forward=reshard_after_forward)
    inputs = make_inputs(config, 2, 4, 4, 8)
    reference.eval(), sharded.eval()  # deterministic routing
    forward_loss(reference, inputs).backward()
    for _ in range(2):  # the second step runs on weights resharded by the first
        sharded.zero_grad()
        forward_loss(sharded, inputs).backward()
    expected = [p.grad for p in reference.parameters() if p.grad is not None]
    got = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in sharded.parameters()
           if p.grad is not None]
    assert len(got) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def _config(root: Path, flux: Path, data: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root), "accelerator": "cpu", "devices": 2, "num_nodes": 1,
            "strategy": {"class_path": "cologen.training.fsdp.CoLoGenFSDPStrategy",
                         "init_args": {"process_group_backend": "gloo"}},
            "precision": "32-true", "log_every_n_steps": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "callbacks": [
                {"class_path": "cologen.training.run_checkpoint.RunCheckpoint",
                 "init_args": {"dirpath": str(root), "filename": "step{step}", "auto_insert_metric_name": False,
                               "save_last": True, "every_n_train_steps": 1, "save_top_k": -1}},
                {"class_path": "cologen.training.replicas.ReplicaReport",
                 "init_args": {"dirpath": str(root / "replicas"), "include_base": True}}]},
        "model": {"preset": {"class_path": "cologen.model.presets.FluxDevPreset",
                             "init_args": {"path": str(flux), "dtype": "bfloat16", "text_max_length": 16}},
                  "gradient_checkpointing": True,
                  "prw": {"num_experts": 5, "rank": 4, "alpha": 8, "router": {"entry_warmup_steps": 1}}},
        "data": {"class_path": "cologen.data.datamodule.MixtureDataModule",
                 "init_args": {"train_shards": {t: str(data / t / "train-*.tar") for t in ("inpainting", "grounding")},
                               "mixture": {"inpainting": 1.0}, "batch_size": 2, "num_workers": 0, "resolution": 32,
                               "batches_per_epoch": 100, "shuffle_buffer": 8}},
        "curriculum": {"spec": {"steps": [
            {"name": "inpainting", "stage": 1, "mixture": {"inpainting": 1.0}, "steps": 2, "lr": 1e-2, "rho": 1.0,
             "alpha": 0.0},
            {"name": "grounding", "stage": 1, "mixture": {"grounding": 1.0}, "steps": 2, "lr": 1e-2, "rho": 0.8,
             "alpha": 0.5}]}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(config: Path, *extra: str):
    return run_fit(config, extra=extra, processes=2)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, flux, shapeworld_small):
    root = tmp_path_factory.mktemp("fsdp") / "run"
    config = _config(root, flux, shapeworld_small)
    proc = _torchrun(config)
    return root, config, proc


@pytest.mark.timeout(450)
def test_two_cpu_processes_train_a_curriculum_in_lockstep(fsdp_run):
    root, _, proc = fsdp_run
    assert "curriculum: enter step 1 'grounding'" in proc.stdout
    reports = read_reports(root / "replicas")
    assert sorted(reports) == [0, 1]
    assert reports[0] == reports[1]  # same weights on both ranks after every optimizer step
    records = reports[0]
    assert [r["global_step"] for r in records] == [1, 2, 3, 4]
    assert [r["curriculum_step"] for r in records] == [0, 0, 1, 1]
    assert [r["trainable"] for r in records] == [[0], [0], [1], [1]]
    assert len({r["base"] for r in records}) == 1  # the frozen base never moved
    assert records[0]["experts"][0] != records[1]["experts"][0]  # expert 0 trained in step 0
    assert records[1]["experts"][0] == records[2]["experts"][0] == records[3]["experts"][0]  # then a veteran
    assert records[2]["experts"][1] == records[1]["experts"][0]  # expert 1 starts as its copy
    assert records[3]["experts"][1] != records[2]["experts"][1]  # and trains
    info = subprocess.run([sys.executable, "-m", "cologen.cli", "info", str(root / "last.ckpt")], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    summary = json.loads(info.stdout)
    assert summary["global_step"] == 4 and summary["curriculum"]["step"] == 1
    assert summary["experts"] == {"allocated": 5, "active": [0, 1], "frozen": [0], "training": 1}
    # the adapter checkpoint of single-device and DDP runs: full tensors, no base weights
    state = torch.load(root / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model_keys = [k for k in state if k.startswith("model.")]
    assert model_keys and all(".prw_" in k or k.endswith(("entry_offset", "_extra_state")) for k in model_keys)
    assert sum(".prw_experts." in k for k in model_keys) == 3 * 5 * 4  # blocks x experts x LoRA matrices
    assert not any(isinstance(v, DTensor) for v in state.values())


@pytest.mark.timeout(450)
def test_resume_in_the_middle_of_a_curriculum_step_replays_the_run(fsdp_run, flux, shapeworld_small, tmp_path):
    root, _, _ = fsdp_run
    start = tmp_path / "step3.ckpt"  # curriculum step 1 with one of its two optimizer steps done
    shutil.copy(root / "step3.ckpt", start)
    again = tmp_path / "run"
    proc = _torchrun(_config(again, flux, shapeworld_small), "--ckpt_path", str(start))
    assert "curriculum: resume step 1 'grounding'" in proc.stdout
    resumed = read_reports(again / "replicas")
    assert resumed[0] == resumed[1]
    assert resumed[0][-1] == read_reports(root / "replicas")[0][-1]
