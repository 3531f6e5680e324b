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
