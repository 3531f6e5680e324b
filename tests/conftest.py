"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def shapeworld_dir(tmp_path_factory):
    """A small ShapeWorld dataset (all tasks; 4 train shards of 30 and 1 val shard of 24 per task)."""
    from data_recipes.shapeworld import ShapeWorldConfig, generate

    out = tmp_path_factory.mktemp("shapeworld")
    generate(out, train=120, val=24, seed=0, config=ShapeWorldConfig(shard_size=30), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def shapeworld_small(tmp_path_factory):
    """A smaller ShapeWorld (inpainting and grounding; 2 train shards of 12, 4 val) for multi-process runs."""
    from data_recipes.shapeworld import ShapeWorldConfig, generate

    out = tmp_path_factory.mktemp("shapeworld_small")
    generate(out, train=24, val=4, seed=0, config=ShapeWorldConfig(shard_size=12, tasks=("inpainting", "grounding")),
             workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def flux(tmp_path_factory):
    """A tiny randomly initialised FLUX.1 pipeline saved as a local diffusers folder (read-only for the tests)."""
    from cologen.testing.flux import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "flux")


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory):
    """Tiny random stand-ins of the metric networks (CLIP, DINO, Inception, depth, a map detector), saved once to
    local folders; the segmenter, whose label count differs by test, is each module's own."""
    from cologen.testing.metric_models import (
        save_tiny_clip,
        save_tiny_depth,
        save_tiny_dino,
        save_tiny_inception,
        save_tiny_map_detector,
    )

    root = tmp_path_factory.mktemp("tiny_models")
    return {"clip": save_tiny_clip(root / "clip"), "dino": save_tiny_dino(root / "dino"),
            "inception": save_tiny_inception(root / "inception.pt"), "depth": save_tiny_depth(root / "depth"),
            "map_detector": save_tiny_map_detector(root / "map_detector.pt")}


@pytest.fixture
def restore_attention_backend():
    """diffusers' set_attention_backend also sets a process-wide default backend: undo it after the test."""
    from cologen.compat import active_attention_backend, set_active_attention_backend

    active = active_attention_backend()
    yield
    set_active_attention_backend(active)
