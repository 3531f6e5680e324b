"""`python -m cologen.commands.pretrain_gate_encoder --out DIR`: pretrain the encoder the prompt gates read
(`prw.gate_image_encoder`) to tell the class, size and colour of the object under each token of a ShapeWorld scene,
from the scenes' exact annotations (`make gate-encoder` writes the tiny preset's, cologen/assets/tiny_gate_encoder).

Scenes are the plain images of the shards given (each sample's target with `record["objects"]`, and an editing
sample's source with `record["edit"]["source_objects"]`), packed as the tiny preset packs a condition (the pixel
codec, then 2 x 2 patches). A token's label is the object covering at least half of it, else background (a label of
each attribute). The last `--held-out` scenes are kept out of training; their accuracy on object tokens is printed
and recorded in config.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cologen.data.geometry import fill_polygons
from cologen.data.reader import ShardReader
from cologen.data.records import BadSample, decode_sample
from cologen.data.shards import expand_shards
from cologen.data.skips import SkipCounter
from cologen.inputs import to_tensor
from cologen.model.codecs import PixelCodec
from cologen.model.experts import ConditionImageEncoder
from cologen.model.gate_encoder import save_gate_encoder
from cologen.model.packing import pack_latents

ATTRIBUTES: tuple[str, ...] = ("class", "size", "color")
BACKGROUND = "background"  # label 0 of every attribute


def scenes(shards: Sequence[str], limit: int) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """(RGB uint8 image, its objects) of up to `limit` plain scenes; a bad sample is counted and skipped."""
    skips = SkipCounter()
    reader, n = ShardReader(skips), 0
    for url in expand_shards(shards, "gate encoder shards"):
        for raw in reader.read(url):
            try:
                sample = decode_sample(raw)
            except BadSample as bad:
                skips(bad)
                continue
            pairs = [(sample.image, sample.record.get("objects", []))]
            edit = sample.record.get("edit") or {}
            if sample.source is not None and "source_objects" in edit:
                pairs.append((sample.source, edit["source_objects"]))
            for image, objects in pairs:
                if n >= limit:
                    return
                n += 1
                yield image, objects


def token_labels(objects: Sequence[dict[str, Any]], size: int, token_px: int,
                 vocab: dict[str, dict[str, int]]) -> np.ndarray:
    """(tokens, len(ATTRIBUTES)) labels of a `size` x `size` scene cut into `token_px` tokens: the attributes of
    the object covering at least half of a token (its polygons rasterised), 0 (background) elsewhere. New names are
    added to `vocab`."""
    side = size // token_px
    labels = np.zeros((side * side, len(ATTRIBUTES)), np.int64)
    if not objects:
        return labels
    cover = np.stack([fill_polygons([np.asarray(p, np.float32).reshape(-1, 2) for p in o.get("polygon", [])],
                                    size, size).astype(np.float32) for o in objects])
    share = cover.reshape(len(objects), side, token_px, side, token_px).mean((2, 4)).reshape(len(objects), -1)
    best = share.argmax(0)
    for t in np.flatnonzero(share.max(0) >= 0.5):
        obj = objects[best[t]]
        labels[t] = [vocab[a].setdefault(str(obj[a]), len(vocab[a])) for a in ATTRIBUTES]
    return labels


def pretrain(shards: Sequence[str], *, scene_limit: int = 20000, held_out: int = 256, steps: int = 3000,
             batch_size: int = 64, lr: float = 3e-3, width: int = 32, codec_factor: int = 2, seed: int = 0,
             log_every: int = 500) -> tuple[ConditionImageEncoder, dict[str, Any]]:
    """Train the encoder with one linear head per attribute; returns it and what config.json records."""
    torch.manual_seed(seed)
    vocab: dict[str, dict[str, int]] = {a: {BACKGROUND: 0} for a in ATTRIBUTES}
    images, labels = [], []
    for image, objects in scenes(shards, scene_limit):
        if image.shape[0] != image.shape[1]:
            raise ValueError(f"gate encoder: scenes must be square, got {image.shape[1]} x {image.shape[0]}")
        labels.append(token_labels(objects, image.shape[0], 2 * codec_factor, vocab))
        images.append(to_tensor(image))
    if len(images) <= held_out:
        raise ValueError(f"gate encoder: {len(images)} scenes in {list(shards)}, need more than --held-out {held_out}")
    with torch.no_grad():
        tokens = pack_latents(PixelCodec(codec_factor).encode(torch.stack(images)))  # (S, N, C)
    y = torch.from_numpy(np.stack(labels))  # (S, N, A)
    train = len(images) - held_out
    encoder = ConditionImageEncoder(tokens.shape[-1], width)
    sizes = [len(vocab[a]) for a in ATTRIBUTES]
    head = nn.Linear(width, sum(sizes))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def loss_and_accuracy(x: torch.Tensor, labels_: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        outs = head(encoder(x)).split(sizes, -1)
        loss = sum(F.cross_entropy(o.flatten(0, 1), labels_[..., j].flatten()) for j, o in enumerate(outs))
        on_object = labels_[..., 0] > 0
        accuracy = [(o.argmax(-1)[on_object] == labels_[..., j][on_object]).float().mean().item()
                    for j, o in enumerate(outs)]
        return loss, accuracy

    start = time.time()
    for step in range(steps):
        batch = torch.randint(0, train, (batch_size,))
        loss, _ = loss_and_accuracy(tokens[batch], y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            with torch.no_grad():
                _, accuracy = loss_and_accuracy(tokens[train:], y[train:])
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f}, held-out accuracy on object tokens "
                  + ", ".join(f"{a} {v:.3f}" for a, v in zip(ATTRIBUTES, accuracy)), flush=True)
    held = y[train:][y[train:][..., 0] > 0]
    majority = {a: float(np.bincount(held[:, j].numpy()).max() / max(len(held), 1)) for j, a in enumerate(ATTRIBUTES)}
    record = {"vocab": vocab, "held_out_accuracy": dict(zip(ATTRIBUTES, accuracy)), "majority_label": majority,
              "scenes": {"train": train, "held_out": held_out}, "steps": steps, "batch_size": batch_size, "lr": lr,
              "seed": seed, "shards": list(shards), "seconds": round(time.time() - start)}
    return encoder.requires_grad_(False), record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", default=["data/shapeworld_base/inpainting/train-*.tar"],
                        help="shards of plain scenes with object polygons (default: make base's 20,000 scenes)")
    parser.add_argument("--out", required=True, help="folder to write (model.safetensors, config.json, sha256)")
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    encoder, record = pretrain(args.shards, scene_limit=args.scenes, held_out=args.held_out, steps=args.steps,
                               width=args.width, seed=args.seed)
    command = " ".join(["python -m cologen.commands.pretrain_gate_encoder", *(sys.argv[1:] if argv is None else argv)])
    digest = save_gate_encoder(encoder, Path(args.out), {**record, "command": command})
    print(f"gate encoder written to {args.out} (sha256 {digest[:16]}...)")


if __name__ == "__main__":
    main()
