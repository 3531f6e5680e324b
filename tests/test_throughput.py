"""RunThroughput: the perf/* keys of a run (step time, samples and tokens per second, loader wait, ETA, MFU)."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from cologen.callbacks.throughput import RunThroughput, workload
from cologen.model.config import PRWConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from cologen.training.flops import Workload, training_step_flops


def batch(b=4, seed=0, sources=2):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    return {"target": t, "source": t.flip(-2), "has_source": torch.arange(b) < sources,
            "prompt": ["flip it"] * b, "task": ["editing"] * b}


def module():
    torch.manual_seed(0)
    return CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2, seed=3),
                         prw=PRWConfig(num_experts=2, rank=4, alpha=8))


def test_workload_counts_the_samples_their_tokens_and_the_flops_of_each_kind():
    m = module()
    samples, tokens, flops = workload(m, batch(b=4, sources=3))
    per_image = (32 // m.codec.patch_pixels) ** 2
    assert samples == 4 and tokens == 4 * per_image + 3 * per_image  # noisy tokens, plus the sources given
    config, text = m.model.transformer.config, m.preset.text_max_length
    expected = (training_step_flops(config, Workload(3, per_image, per_image, text), 4, 2, "both").total
                + training_step_flops(config, Workload(1, per_image, 0, text), 4, 2, "both").total)
    assert flops == pytest.approx(expected) and flops > 0


def test_a_run_logs_its_throughput_and_eta(tmp_path):
    m = module()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=2,
                        callbacks=[RunThroughput()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(m, train_dataloaders=DataLoader([batch(seed=i) for i in range(6)], batch_size=None))
    rows = [r for r in csv.DictReader(open(next((tmp_path / "csv").glob("version_*/metrics.csv"))))
            if r.get("perf/step_seconds")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # one row per logging interval
    for r in rows:
        assert float(r["perf/step_seconds"]) > 0 and 0 <= float(r["perf/data_wait_fraction"]) < 1
        assert float(r["perf/samples_per_second"]) == pytest.approx(4 / float(r["perf/step_seconds"]), rel=1e-6)
        assert float(r["perf/tokens_per_second"]) > float(r["perf/samples_per_second"])
        assert not r.get("perf/mfu")  # no peak FLOPs for a CPU: no MFU rather than a made-up one
    for r in rows:  # the steps left to max_steps x the interval's step time
        left = 6 - int(r["step"])
        assert float(r["perf/eta_seconds"]) == pytest.approx(left * float(r["perf/step_seconds"]), rel=1e-6)
