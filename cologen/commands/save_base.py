"""`python -m cologen.commands.save_base CKPT OUT_DIR`: turn a `make base` checkpoint into the tiny base folder
(`model.safetensors`, `config.json` with the transformer config and provenance, `sha256`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from cologen.model.presets import Preset, recorded_sha256, save_tiny_base
from cologen.typed_config import coerce


def trained_weights(ckpt: dict) -> tuple[dict, str]:
    """The weights a base checkpoint saved, and which: Lightning's weight averaging stores its average as
    `state_dict` (the live weights under `current_model_state`), but before its first update (a run stopped before
    `update_starting_at_step`) that average is the starting weights, so the live ones are taken."""
    averaged = ckpt.get("averaging_state", {}).get("n_averaged")
    if averaged is not None and int(averaged) == 0 and "current_model_state" in ckpt:
        return ckpt["current_model_state"], "last iterate (the weight average had not started)"
    return ckpt["state_dict"], "weight average" if averaged is not None else "last iterate"


def save_base(checkpoint: str, out_dir: str) -> str:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    preset = coerce(Preset, ckpt["hyper_parameters"]["preset"])
    prefix = "model.transformer."
    weights, kind = trained_weights(ckpt)
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix) and ".prw_" not in k}
    transformer = FluxTransformer2DModel(**preset.transformer_config())
    transformer.load_state_dict(state)
    provenance = {"checkpoint": str(checkpoint), "global_step": ckpt.get("global_step"), "weights": kind,
                  "tasks": "t2i + reconstruct on ShapeWorld (make base)"}
    start = preset.base_dir()
    if start is not None:  # pretraining continued from a saved base (make base-continue): say which, before
        # out_dir, which may be that same folder, is overwritten
        previous = json.loads((start / "config.json").read_text())
        provenance["continued_from"] = {"base": str(preset.base), "sha256": recorded_sha256(start),
                                        "provenance": previous.get("provenance")}
    return save_tiny_base(transformer, Path(out_dir), {"provenance": provenance})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    digest = save_base(args.checkpoint, args.out_dir)
    print(f"tiny base written to {args.out_dir} (sha256 {digest[:16]}...)")


if __name__ == "__main__":
    main()
