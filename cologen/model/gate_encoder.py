"""The pretrained, frozen condition encoder that every prompt gate reads (`prw.gate_image_encoder`, ours).

A gate's own CNN (`prw.gate_image`) learns from one weak signal, which tokens an edit changes, and after editing's
600 steps it still cannot tell the object an instruction names ("the large square") from the others. This encoder
is the same `ConditionImageEncoder`, pretrained to tell the class, size and colour of the object under each token
(`python -m cologen.commands.pretrain_gate_encoder`, `make gate-encoder`) and then frozen: one copy runs once per
source pass and every gate reads its features. The tiny preset's is committed ('builtin'); a FLUX-scale analogue
would be pretrained segmentation or DINO features.

A folder holds `model.safetensors` (the encoder's weights), `config.json` (`in_channels`, `width`, the labels it
learned and its held-out accuracy) and `sha256` (checked on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from .experts import ConditionImageEncoder
from .presets import check_recorded_sha256, file_sha256

BUILTIN_GATE_ENCODER = Path(__file__).resolve().parent.parent / "assets" / "tiny_gate_encoder"


def gate_encoder_dir(spec: str) -> Path:
    """The folder of `prw.gate_image_encoder`: 'builtin' is the tiny preset's committed one."""
    return BUILTIN_GATE_ENCODER if spec == "builtin" else Path(spec)


def save_frozen_module(module: nn.Module, folder: Path, config: dict) -> str:
    """Write a frozen gate module's weights (fp32 safetensors), its `config` and their sha256 into `folder`, as
    `make gate-encoder` and `make gate-referrer` write theirs; returns the digest."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in module.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    digest = file_sha256(folder / "model.safetensors")
    (folder / "sha256").write_text(digest + "\n")
    return digest


def read_frozen_config(folder: Path, option: str, make_target: str) -> dict:
    """The config.json of a frozen gate module's `folder` (`option` names it in errors); a folder without its weights
    or config is one clear error naming the make target that writes one."""
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{option}: {folder} has no model.safetensors and config.json (write one with "
                                f"`make {make_target}`)")
    return json.loads((folder / "config.json").read_text())


def load_frozen_weights(module: nn.Module, folder: Path) -> nn.Module:
    """`module` with the weights of `folder` (checked against their recorded sha256), frozen and in eval mode."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    check_recorded_sha256(weights)
    module.load_state_dict(load_file(str(weights)))
    return module.eval().requires_grad_(False)


def save_gate_encoder(encoder: ConditionImageEncoder, folder: Path, extra: dict | None = None) -> str:
    """Write the encoder's weights, its config (plus `extra`) and their sha256 into `folder`; returns the digest."""
    config = {"in_channels": encoder.embed.in_features, "width": encoder.embed.out_features, **(extra or {})}
    return save_frozen_module(encoder, folder, config)


def load_gate_encoder(spec: str, in_channels: int) -> ConditionImageEncoder:
    """The encoder of `prw.gate_image_encoder`, frozen (no gradient, eval mode), for conditions of `in_channels`
    packed channels."""
    folder = gate_encoder_dir(spec)
    config = read_frozen_config(folder, "prw.gate_image_encoder", "gate-encoder")
    if config["in_channels"] != in_channels:
        raise ValueError(f"prw.gate_image_encoder: {folder} reads {config['in_channels']} packed channels per token, "
                         f"this model's conditions have {in_channels}")
    return load_frozen_weights(ConditionImageEncoder(in_channels, config["width"]), folder)
