"""Validation under DDP evaluates each example exactly once: two CPU processes (gloo) validate sets whose batch counts
do not divide by the world size; every example is evaluated on one rank, the shorter rank runs a padding batch that
counts for nothing, and the logged means equal those of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cologen.data.validation import RankShare

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = '''
import json, sys
import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from cologen.data.datamodule import MixtureDataModule
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from data_recipes.shapeworld import shard_patterns


class Record(Callback):
    def __init__(self):
        self.seen, self.losses = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        valid = batch["valid"].tolist() if "valid" in batch else [True] * len(batch["key"])
        self.seen += [[batch["task"][0], k, v] for k, v in zip(batch["key"], valid)]
        if all(valid):
            self.losses.append([batch["task"][0], batch.get("batch_index", batch_idx), float(outputs)])


if __name__ == "__main__":
    data, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    L.seed_everything(0)
    module = CoLoGenModule(preset=TinyPreset(base=None))
    dm = MixtureDataModule(shard_patterns(data, "train"), {"inpainting": 1.0}, val_shards=shard_patterns(data, "val"),
                           val_tasks=["inpainting", "grounding"], val_samples_per_task=5, val_batch_size=2,
                           num_workers=0)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record],
                        strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto")
    metrics = trainer.validate(module, datamodule=dm, verbose=False)
    with open(f"{out}-{trainer.global_rank}.json", "w") as f:
        json.dump({"seen": record.seen, "losses": record.losses, "metrics": metrics}, f)
'''


def test_rank_shares_cover_each_batch_once_with_marked_padding():
    for n, world in [(3, 2), (1, 2), (4, 2), (5, 3), (2, 4)]:
        shares = [RankShare(n, r, world).indices for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank runs as many steps
        real = sorted(i for s in shares for i in s if i < n)
        assert real == list(range(n))  # each batch on exactly one rank
        assert all(s.count(n) <= 1 and set(s) <= set(range(n + 1)) for s in shares)  # padding: one item, index n
        assert shares[0] == list(range(0, n, world))  # rank zero (probes) never gets padding


@pytest.mark.timeout(1900)
def test_two_processes_validate_each_example_once(tmp_path):
    from data_recipes.shapeworld import ShapeWorldConfig, generate

    data = tmp_path / "data"  # 5 validation samples per task: batches of 2, 2 and 1, an odd count for 2 ranks
    generate(data, train=12, val=5, seed=0, config=ShapeWorldConfig(shard_size=12, tasks=("inpainting", "grounding")),
             workers=1, progress=False)
    script = tmp_path / "validate.py"
    script.write_text(SCRIPT)
    # the script lives outside the repository: PYTHONPATH makes it import this checkout's cologen, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"w{devices}"
        proc = subprocess.run([sys.executable, str(script), str(data), str(out), str(devices)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        results[devices] = [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(devices)]

    one, two = results[1][0], results[2]
    expected = Counter((t, k) for t, k, _ in one["seen"])
    assert len(expected) == 10 and set(expected.values()) == {1}  # 5 validation samples of each of two tasks
    evaluated = Counter((t, k) for r in two for t, k, valid in r["seen"] if valid)
    assert evaluated == expected  # each example once over the two ranks (Lightning's sampler repeats a batch)
    # per task, rank 0 runs batches 0 and 2 (2 + 1 examples), rank 1 batch 1 and a padding copy of batch 0
    assert [len(r["seen"]) for r in two] == [6, 8]
    assert any(not valid for t, k, valid in two[1]["seen"]) and all(valid for _, _, valid in two[0]["seen"])
    # each batch draws the same noise on any number of ranks, and the synced means equal one process's
    losses = {(t, i): loss for r in two for t, i, loss in r["losses"]}
    assert losses == pytest.approx({(t, i): loss for t, i, loss in one["losses"]}, rel=1e-5)
    for task_metrics_one, task_metrics_two in zip(one["metrics"], two[0]["metrics"]):
        for name, value in task_metrics_one.items():
            assert task_metrics_two[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
