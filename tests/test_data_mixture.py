"""The mixture is sampled exactly as configured, before and after set_mixture on a running loader."""

from collections import Counter

import pytest

from cologen.data.choice import StratifiedChooser
from cologen.data.datamodule import MixtureDataModule
from data_recipes.shapeworld import shard_patterns


def _shares(it, n_batches):
    counts = Counter()
    for _ in range(n_batches):
        counts.update(next(it)["task"])
    total = sum(counts.values())
    return {t: c / total for t, c in counts.items()}, total


@pytest.mark.timeout(240)
def test_mixture_shares_with_two_workers_before_and_after_set_mixture(shapeworld_dir):
    first = {"inpainting": 0.5, "grounding": 0.2, "control": 0.15, "customized": 0.1, "editing": 0.05}
    second = {"t2i": 0.3, "reconstruct": 0.3, "editing": 0.4}
    dm = MixtureDataModule(shard_patterns(shapeworld_dir), first, batch_size=20, num_workers=2,
                           batches_per_epoch=100_000, shuffle_buffer=50, seed=3)
    it = iter(dm.train_dataloader())
    shares, n = _shares(it, 250)
    assert n == 5000
    for task, w in first.items():
        assert abs(shares.get(task, 0) - w) <= 0.02, shares
    dm.set_mixture(second)
    assert dm.mixture == second
    # the batches already queued may still follow the old mixture; none after the documented bound
    for _ in range(dm.mixture_latency_samples // 20):
        next(it)
    shares, n = _shares(it, 250)
    assert set(shares) == set(second), shares
    for task, w in second.items():
        assert abs(shares[task] - w) <= 0.02, shares


def test_stratified_chooser_is_exact_at_block_boundaries():
    import numpy as np

    chooser, rng = StratifiedChooser({"a": 0.013, "b": 0.287, "c": 0.7}), np.random.default_rng(0)
    draws = Counter(chooser.draw(rng) for _ in range(10_000))
    assert abs(draws["a"] - 130) <= 1 and abs(draws["b"] - 2870) <= 1 and abs(draws["c"] - 7000) <= 1
    first_block = [chooser.draw(rng) for _ in range(100)]
    assert first_block != sorted(first_block)  # shuffled, not dealt in runs


def test_set_mixture_validates_and_state_dict_round_trips(shapeworld_dir):
    pats = shard_patterns(shapeworld_dir)
    dm = MixtureDataModule(pats, {"inpainting": 1.0}, num_workers=0)
    with pytest.raises(ValueError, match="unknown task 'paint'"):
        dm.set_mixture({"paint": 1.0})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        dm.set_mixture({"inpainting": -1.0})
    only = MixtureDataModule({"editing": pats["editing"]}, {"editing": 1.0}, num_workers=0)
    with pytest.raises(ValueError, match=r"tasks \['grounding'\] have no train_shards"):
        only.set_mixture({"grounding": 1.0})
    dm.set_mixture({"grounding": 3, "control": 1})
    state = dm.state_dict()
    assert state["mixture"] == {"grounding": 0.75, "control": 0.25}
    fresh = MixtureDataModule(pats, {"inpainting": 1.0}, num_workers=0)
    fresh.load_state_dict(state)
    assert fresh.mixture == dm.mixture
    batch = next(iter(fresh.train_dataloader()))
    assert set(batch["task"]) <= {"grounding", "control"}


def test_scene_tasks_fall_back_to_inpainting_shards(shapeworld_dir):
    pats = shard_patterns(shapeworld_dir)
    dm = MixtureDataModule({"inpainting": pats["inpainting"]}, {"t2i": 1, "reconstruct": 1}, num_workers=0,
                           batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["task"]) == {"t2i", "reconstruct"}
    assert all(k.startswith("sw-inpainting-") for k in batch["key"])


def test_epochs_have_the_configured_length_and_new_variants(shapeworld_dir):
    dm = MixtureDataModule(shard_patterns(shapeworld_dir), {"inpainting": 1.0}, num_workers=0, batch_size=4,
                           batches_per_epoch=5, seed=1)
    loader = dm.train_dataloader()
    assert len(loader) == 5
    epochs = [[(k, m["build"]["mask_box"]) for b in loader for k, m in zip(b["key"], b["meta"])] for _ in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 20 and epochs[0] != epochs[1]
    # the same seed replays the same stream
    again = MixtureDataModule(shard_patterns(shapeworld_dir), {"inpainting": 1.0}, num_workers=0, batch_size=4,
                              batches_per_epoch=5, seed=1)
    assert [(k, m["build"]["mask_box"]) for b in again.train_dataloader() for k, m in zip(b["key"], b["meta"])] \
        == epochs[0]


def test_validation_sets_are_fixed_per_task(shapeworld_dir):
    pats = shard_patterns(shapeworld_dir)
    val = shard_patterns(shapeworld_dir, "val")
    dm = MixtureDataModule(pats, {"inpainting": 1.0}, val, num_workers=0, val_samples_per_task=10,
                           val_batch_size=4)
    assert dm.val_tasks == ["inpainting", "grounding", "control", "customized", "editing", "t2i", "reconstruct"]
    loaders = dm.val_dataloader()
    runs = [[(b["task"], b["key"], b["prompt"], b["target"].sum().item()) for ld in loaders for b in ld]
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert [ld.dataset.num_examples for ld in loaders] == [10] * 7
    assert [len(ld) for ld in loaders] == [3] * 7  # batches of 4, 4, 2
    for ld, task in zip(loaders, dm.val_tasks):
        keys = [k for b in ld for k in b["key"]]
        assert all(t == task for b in ld for t in b["task"])
        assert all("-val-" in k for k in keys) and len(set(keys)) == 10
    other = MixtureDataModule(pats, {"inpainting": 1.0}, val, num_workers=0, val_samples_per_task=10,
                              val_batch_size=4)
    assert [b["prompt"] for ld in other.val_dataloader() for b in ld] == [r[2] for r in runs[0]]


@pytest.mark.timeout(90)
def test_workers_start_after_the_parent_used_opencv_threads(shapeworld_dir):
    """OpenCV's thread pool does not survive fork: a worker must not reconfigure it (that deadlocked)."""
    import cv2
    import numpy as np

    big = np.zeros((1500, 1500, 3), np.uint8)
    cv2.GaussianBlur(cv2.resize(big, (1200, 1200)), (9, 9), 0)
    dm = MixtureDataModule(shard_patterns(shapeworld_dir), {"control": 1.0}, num_workers=2, batches_per_epoch=3)
    assert len(list(dm.train_dataloader())) == 3


@pytest.mark.timeout(60)
def test_workers_stop_at_teardown_and_when_the_loader_is_dropped(shapeworld_dir):
    """Persistent workers left to the cyclic garbage collector took 5 s each to stop (they never got the stop
    signal): teardown stops them, and a dropped loader is not in a cycle, so they stop at once."""
    import gc
    import time

    def started(dm):
        loader = dm.train_dataloader()
        it = iter(loader)
        next(it)
        return loader, it, list(loader.loader._iterator._workers)

    dm = MixtureDataModule(shard_patterns(shapeworld_dir), {"inpainting": 1.0}, batch_size=2, num_workers=2,
                           batches_per_epoch=3, shuffle_buffer=10)
    loader, it, workers = started(dm)
    dm.teardown("fit")
    assert not any(w.is_alive() for w in workers)
    loader, it, workers = started(dm)
    t = time.perf_counter()
    del dm, loader, it
    gc.collect()
    assert time.perf_counter() - t < 3 and not any(w.is_alive() for w in workers)
