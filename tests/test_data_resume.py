"""The training stream is a fixed function of its configuration, switches the mixture at exact batches, and a
fit resumed from `last.ckpt` sees exactly the batches (and ends with exactly the weights) of an
uninterrupted one: mid-epoch, at the switch, at an epoch boundary, and per rank."""

from __future__ import annotations

import json
import shutil

import cv2
import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from cologen.data.datamodule import MixtureDataModule
from data_recipes.shapeworld import shard_patterns

SCHEDULE = [(0, {"inpainting": 1.0}), (7, {"grounding": 1.0})]
STEPS, BPE = 12, 5


class _Recorder(L.LightningModule):
    """One linear layer on the pooled target; records every training batch's keys and tasks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)
        self.keys: list[list[str]] = []
        self.tasks: list[set[str]] = []

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch["key"]))
        self.tasks.append(set(batch["task"]))
        pooled = batch["target"].mean(dim=(2, 3))
        return (self.linear(pooled).squeeze(1) - batch["source"].mean(dim=(1, 2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _Schedule(Callback):
    """As the curriculum callback does: the schedule is set in `setup`, before any iterator exists."""

    def setup(self, trainer, pl_module, stage):
        trainer.datamodule.set_mixture_schedule(SCHEDULE)


def _dm(root, **kw) -> MixtureDataModule:
    args = dict(batch_size=4, num_workers=2, batches_per_epoch=BPE, shuffle_buffer=20, seed=5)
    return MixtureDataModule(shard_patterns(root), {"t2i": 1.0}, **(args | kw))


def _fit(root, ckpt_dir, steps, ckpt_path=None, **dm_kw):
    model = _Recorder()
    callbacks = [_Schedule(), ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(model, datamodule=_dm(root, **dm_kw), ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def uninterrupted(shapeworld_dir, tmp_path_factory):
    return _fit(shapeworld_dir, tmp_path_factory.mktemp("full"), STEPS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()  # a one-layer model gains nothing from threads on a busy 2-core machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_the_schedule_switches_at_the_exact_batch(uninterrupted):
    assert len(uninterrupted.keys) == STEPS and all(len(k) == 4 for k in uninterrupted.keys)
    assert uninterrupted.tasks == [{"inpainting"}] * 7 + [{"grounding"}] * 5
    assert all(k.startswith("sw-grounding-") for keys in uninterrupted.keys[7:] for k in keys)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [3, 7, 5])  # mid-epoch, at the switch, at an epoch boundary
def test_resume_from_last_ckpt_replays_the_uninterrupted_run(shapeworld_dir, tmp_path, uninterrupted, k):
    first = _fit(shapeworld_dir, tmp_path, k)
    resumed = _fit(shapeworld_dir, tmp_path, STEPS, ckpt_path=tmp_path / "last.ckpt")
    assert first.keys + resumed.keys == uninterrupted.keys
    assert first.tasks + resumed.tasks == uninterrupted.tasks
    for a, b in zip(resumed.parameters(), uninterrupted.parameters()):
        assert torch.equal(a, b)


@pytest.mark.timeout(120)
def test_ranks_resume_their_own_streams(shapeworld_dir, tmp_path):
    """DDP by rank settings: from the one checkpoint every rank resumes, each rank continues its own stream,
    and the ranks' streams differ (without resampling they read disjoint shards)."""
    kw = dict(world_size=2, resampled=False)  # 4 shards per task = 2 ranks x 2 workers
    first = _fit(shapeworld_dir, tmp_path / "first", 3, rank=0, **kw)
    keys = {}
    for rank in (0, 1):
        full = _fit(shapeworld_dir, tmp_path / f"full{rank}", 6, rank=rank, **kw)
        (tmp_path / f"r{rank}").mkdir()
        shutil.copy(tmp_path / "first" / "last.ckpt", tmp_path / f"r{rank}" / "last.ckpt")
        resumed = _fit(shapeworld_dir, tmp_path / f"r{rank}", 6, ckpt_path=tmp_path / f"r{rank}" / "last.ckpt",
                       rank=rank, **kw)
        assert resumed.keys == full.keys[3:]
        if rank == 0:
            assert first.keys == full.keys[:3]
        keys[rank] = {k for batch in resumed.keys for k in batch}
    assert keys[0] and keys[1] and not keys[0] & keys[1]


MIX = {"inpainting": 2, "grounding": 1, "control": 1, "customized": 1, "editing": 1}


def _mixed(root, num_workers, **kw) -> MixtureDataModule:
    args = dict(batch_size=4, num_workers=num_workers, batches_per_epoch=4, shuffle_buffer=20, seed=5)
    return MixtureDataModule(shard_patterns(root), MIX, **(args | kw))


def _fresh(dm: MixtureDataModule) -> MixtureDataModule:
    """A new DataModule of the same configuration."""
    return MixtureDataModule(dm.train_shards, dm.mixture, batch_size=dm.batch_size, num_workers=dm.num_workers,
                             batches_per_epoch=dm.batches_per_epoch, shuffle_buffer=dm.shuffle_buffer, seed=dm.seed,
                             resolution=dm.resolution, aspect_buckets=dm.buckets is not None, bucket_multiple=8)


def _start_at(dm: MixtureDataModule, position: int):
    loader = dm.train_dataloader()
    loader.start = lambda: position  # what the trainer's progress says in a fit
    return loader


def _same(a: list[dict], b: list[dict]) -> bool:
    """Bitwise-equal batches: keys, tasks, prompts, meta and every tensor."""
    def meta(batch):
        return json.dumps(batch["meta"], sort_keys=True, default=str)
    return len(a) == len(b) and all(
        x["key"] == y["key"] and x["task"] == y["task"] and x["prompt"] == y["prompt"] and meta(x) == meta(y)
        and all(torch.equal(x[f], y[f]) for f in ("target", "source", "region", "has_source"))
        for x, y in zip(a, b))


def _two_epochs(dm: MixtureDataModule) -> list[dict]:
    loader = dm.train_dataloader()
    return list(loader) + list(loader)


@pytest.mark.timeout(120)
def test_fresh_datamodules_yield_identical_batches(shapeworld_dir):
    runs = {}
    for workers in (0, 1, 2):
        runs[workers] = [_two_epochs(_mixed(shapeworld_dir, workers)) for _ in range(2)]  # two fresh DataModules
        a, b = runs[workers]
        assert len(a) == 8 and _same(a, b), workers
    assert _same(runs[0][0], runs[1][0])  # one worker serves the single logical stream of no workers
    assert not _same(runs[0][0], runs[2][0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_started_mid_epoch_yields_the_rest_of_that_epoch(shapeworld_dir, num_workers):
    dm = _mixed(shapeworld_dir, num_workers, batches_per_epoch=9)
    ref = list(dm.train_dataloader())  # epoch 0, outside a trainer
    for start in (4, 5):  # with two workers an odd start swaps which worker serves which logical stream
        assert _same(list(_start_at(_fresh(dm), start)), ref[start:])
    assert len(ref) == 9


def _scene(i: int, w: int, h: int, bad: bool = False) -> dict:
    img = np.full((h, w, 3), 37 * (i % 7), np.uint8)
    rec = {"task": "inpainting", "prompt": f"scene {i}", "width": w, "height": h, "objects": []}
    return {"__key__": f"s{i:03d}", "json": json.dumps(rec).encode(),
            "image.png": b"not a png" if bad else cv2.imencode(".png", img)[1].tobytes()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("buckets", [False, True])
def test_mid_epoch_start_is_exact_with_bad_samples_and_buckets(tmp_path, buckets):
    """A bad sample's slot is filled by the next good one, so slot i stays tied to raw sample i and a skip
    needs no decoding; with buckets the start replays. Either way the batches are those of a full epoch."""
    sizes = [(64, 32), (32, 64), (48, 48)] if buckets else [(32, 32)]
    with wds.TarWriter(str(tmp_path / "s.tar"), encoder=False, mtime=0) as sink:
        for i in range(60):
            sink.write(_scene(i, *sizes[i % len(sizes)], bad=i % 9 == 4))
    dm = MixtureDataModule({"inpainting": str(tmp_path / "s.tar")}, {"inpainting": 1, "t2i": 1}, batch_size=3,
                           num_workers=0, batches_per_epoch=8, shuffle_buffer=10, seed=2, aspect_buckets=buckets,
                           resolution=32, bucket_multiple=8)
    ref = [b for b in _start_at(dm, 8)]  # epoch 1, from its start
    assert dm.bad_samples["decode"] > 0 and len(ref) == 8
    for start in (3, 6):
        assert _same([b for b in _start_at(_fresh(dm), 8 + start)], ref[start:])
    if buckets:
        assert len({tuple(b["target"].shape[2:]) for b in ref}) > 1
