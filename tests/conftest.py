"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def shapeworld_dir(tmp_path_factory):
    """A small ShapeWorld dataset (all tasks; 4 train shards of 30 and 1 val shard of 24 per task)."""
    from data_recipes.shapeworld import ShapeWorldConfig, generate

    out = tmp_path_factory.mktemp("shapeworld")
    generate(out, train=120, val=24, seed=0, config=ShapeWorldConfig(shard_size=30), workers=1, progress=False)
    return out
