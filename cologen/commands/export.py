"""`cologen export CKPT OUT`: write a CoLoGenPipeline folder (experts, routers, config, model card).

The folder loads with `CoLoGenPipeline.from_pretrained` (cologen/pipeline.py) on top of its frozen base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cologen import checkpoints
from cologen.errors import UsageError


def pipeline_from_module(module, metadata: dict | None = None):
    """A CoLoGenPipeline around a CoLoGenModule's own model, text encoder and codec (shared, not copied)."""
    from cologen.pipeline import CoLoGenPipeline

    text_encoder = module.text_encoder
    if text_encoder is None and getattr(module, "_offloaded", None):
        text_encoder = module._offloaded[0]
    return CoLoGenPipeline(module.model, text_encoder, module.codec, module.preset.to_dict(), module.positions,
                           module.sampler_config, module.guidance_embeds, metadata, module.preset.sample_size)


def pipeline_from_checkpoint(checkpoint: str):
    """A CoLoGenPipeline holding a training checkpoint's experts and routers (what `export` saves)."""
    from cologen.module import CoLoGenModule

    ckpt = checkpoints.load(checkpoint)
    module = CoLoGenModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    module.eval()
    meta = ckpt.get("cologen", {})
    curriculum = checkpoints.curriculum_state(ckpt)
    metadata = {
        "source_checkpoint": str(checkpoint),
        "global_step": ckpt.get("global_step"),
        "routing": meta.get("routing"),
        "metrics": meta.get("metrics"),
        "curriculum": (curriculum or {}).get("spec"),
        "curriculum_position": {"step": (curriculum or {}).get("index"), "done": (curriculum or {}).get("done")},
    }
    return pipeline_from_module(module, metadata)


def load_pipeline(target: str, base_model: str | None = None):
    """A CoLoGenPipeline from an exported folder (its frozen base: `base_model`, or the tiny one shipped) or from a
    training checkpoint (checked first: anything else is one line saying what it is not)."""
    from cologen.pipeline import CONFIG_FILE, CoLoGenPipeline

    if (Path(target) / CONFIG_FILE).is_file():
        return CoLoGenPipeline.from_pretrained(target, base=base_model)
    checkpoints.check(str(target))
    return pipeline_from_checkpoint(str(target))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(checkpoint: str, out: str, dtype: str = "float32") -> Path:
    pipeline_from_checkpoint(checkpoint).save_pretrained(out, adapter_dtype=DTYPES[dtype])
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cologen export", description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="storage type of the adapters (float16: half the size; they load as float32)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.dtype)
    except UsageError as err:
        print(f"cologen export: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported to {path}")
