"""`make base` / `make base-continue` turn a training checkpoint into the tiny base folder: the weights exactly, and
a provenance that names the base a continued pretraining started from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from cologen.commands.save_base import save_base
from cologen.model.presets import TinyPreset, load_tiny_base


def _checkpoint(path: Path, preset: TinyPreset, seed: int, step: int) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**preset.transformer_config())
    state = {f"model.transformer.{k}": v for k, v in transformer.state_dict().items()}
    torch.save({"hyper_parameters": {"preset": preset.to_hparams()}, "state_dict": state, "global_step": step}, path)
    return transformer


def test_a_continued_base_names_the_base_it_started_from(tmp_path: Path) -> None:
    small = dict(width=32, heads=2, double_layers=1, single_layers=1)
    first = _checkpoint(tmp_path / "base.ckpt", TinyPreset(base=None, **small), seed=0, step=8000)
    folder = tmp_path / "tiny_base"
    digest = save_base(str(tmp_path / "base.ckpt"), str(folder))
    provenance = json.loads((folder / "config.json").read_text())["provenance"]
    assert provenance["global_step"] == 8000 and "continued_from" not in provenance
    loaded = load_tiny_base(folder, TinyPreset(**small).transformer_config())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), first.state_dict().values()))

    # continued from that folder and saved over it, as `make base-continue` does with the committed base
    second = _checkpoint(tmp_path / "continued.ckpt", TinyPreset(base=str(folder), **small), seed=1, step=10000)
    new_digest = save_base(str(tmp_path / "continued.ckpt"), str(folder))
    provenance = json.loads((folder / "config.json").read_text())["provenance"]
    assert new_digest != digest and (folder / "sha256").read_text().strip() == new_digest
    assert provenance["global_step"] == 10000
    assert provenance["continued_from"]["sha256"] == digest
    assert provenance["continued_from"]["provenance"]["global_step"] == 8000
    loaded = load_tiny_base(folder, TinyPreset(**small).transformer_config())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), second.state_dict().values()))


def test_a_run_stopped_before_its_weight_average_started_saves_what_it_trained(tmp_path: Path) -> None:
    """Lightning's EMA callback checkpoints its average as `state_dict`; before its first update that is the
    starting weights (a `make base-gpu` stopped by its time limit early), so save_base takes the live weights."""
    small = TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1)
    start = _checkpoint(tmp_path / "start.ckpt", small, seed=0, step=0)
    trained = _checkpoint(tmp_path / "trained.ckpt", small, seed=1, step=300)
    ckpt = torch.load(tmp_path / "trained.ckpt", weights_only=False)
    live = ckpt["state_dict"]
    starting = {f"model.transformer.{k}": v for k, v in start.state_dict().items()}
    for averaged, expected, kind in [(0, trained, "last iterate"), (5, start, "weight average")]:
        path = tmp_path / f"ema{averaged}.ckpt"
        torch.save({**ckpt, "state_dict": starting, "current_model_state": live,
                    "averaging_state": {"n_averaged": torch.tensor(averaged)}}, path)
        save_base(str(path), str(tmp_path / f"base{averaged}"))
        loaded = load_tiny_base(tmp_path / f"base{averaged}", small.transformer_config())
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))
        provenance = json.loads((tmp_path / f"base{averaged}" / "config.json").read_text())["provenance"]
        assert provenance["weights"].startswith(kind)
