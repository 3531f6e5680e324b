"""DDP, simulated by rank settings: world size 2, two workers per rank."""

import itertools

import pytest

from cologen.data.datamodule import MixtureDataModule
from data_recipes.shapeworld import shard_patterns

MIX = {"inpainting": 1, "grounding": 1, "control": 1, "customized": 1, "editing": 1}


def _ranks(root, **kw):
    return [MixtureDataModule(shard_patterns(root), MIX, batch_size=8, num_workers=2, batches_per_epoch=12,
                              seed=0, rank=r, world_size=2, **kw) for r in (0, 1)]


def _lockstep(loaders):
    """Iterate the ranks' loaders side by side, as DDP does; a rank with fewer batches would show as None."""
    out = [[], []]
    for pair in itertools.zip_longest(*loaders):
        assert None not in pair, "ranks got different numbers of batches"
        for r, batch in enumerate(pair):
            out[r].append(batch)
    return out


def _draws(batches):
    return [(k, repr(m["build"])) for b in batches for k, m in zip(b["key"], b["meta"])]


@pytest.mark.timeout(180)
def test_ranks_draw_different_samples_and_the_same_number_of_batches(shapeworld_dir):
    dms = _ranks(shapeworld_dir)
    loaders = [dm.train_dataloader() for dm in dms]
    for epoch in range(2):
        batches = _lockstep(loaders)
        assert [len(b) for b in batches] == [12, 12]
        d0, d1 = _draws(batches[0]), _draws(batches[1])
        assert len(d0) == len(d1) == 96
        same_position = sum(a == b for a, b in zip(d0, d1))
        assert same_position <= 2, "ranks drew the same stream"
        assert len(set(d0) & set(d1)) <= 10
        # within a rank, the two workers draw different streams too
        assert len(set(d0)) >= 90
        if epoch == 0:
            first = d0
    assert first != d0  # a new epoch draws new samples and variants


@pytest.mark.timeout(180)
def test_without_resampling_ranks_and_workers_read_disjoint_shards(shapeworld_dir):
    dms = _ranks(shapeworld_dir, resampled=False)  # 4 shards per task = 2 ranks x 2 workers
    batches = _lockstep([dm.train_dataloader() for dm in dms])
    urls = [{m["record"]["shapeworld"]["index"] // 30 for b in bs for m in b["meta"]} for bs in batches]
    assert urls[0] and urls[1] and not urls[0] & urls[1]  # shard index = sample index // shard size
    keys = [{k for b in bs for k in b["key"]} for bs in batches]
    assert not keys[0] & keys[1]


def test_too_few_shards_without_resampling_is_refused(shapeworld_dir):
    dm = MixtureDataModule(shard_patterns(shapeworld_dir), MIX, num_workers=3, rank=1, world_size=2,
                           resampled=False)
    with pytest.raises(ValueError, match=r"train_shards\.inpainting: 4 shards for 2 ranks x 3 workers = 6 readers"):
        dm.train_dataloader()
    ok = MixtureDataModule(shard_patterns(shapeworld_dir), MIX, num_workers=3, rank=1, world_size=2)
    ok.check_shards()  # resampling needs no minimum


def test_rank_arguments_are_checked(shapeworld_dir):
    with pytest.raises(ValueError, match="rank and world_size go together"):
        MixtureDataModule(shard_patterns(shapeworld_dir), MIX, rank=2, world_size=2)
