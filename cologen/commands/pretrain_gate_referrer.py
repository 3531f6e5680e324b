"""`python -m cologen.commands.pretrain_gate_referrer --out DIR`: pretrain the map of where a prompt will change its
condition (`prw.gate_referrer`) on the tasks' own training examples (`make gate-referrer` writes the tiny preset's,
cologen/assets/tiny_gate_referrer).

Each scene of the shards is built `--builds` times by the training's builder (each build draws its own overlay kind,
colour and expression), packed as the tiny preset packs a condition, and read by the frozen gate encoder; the target
is the build's changed tokens (`cologen.module.changed_tokens`, what the gates are supervised on), weighted
`--pos-weight` as the curriculum weights them. The last `--held-out` scenes of each task are kept out of training;
the token precision and recall at logit 0 on them are printed and recorded in config.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cologen.data.builders import BuilderConfig
from cologen.data.shards import expand_shards
from cologen.data.skips import SkipCounter
from cologen.data.validation import FixedTaskDataset
from cologen.inputs import to_tensor
from cologen.model.codecs import PixelCodec
from cologen.model.experts import place_features
from cologen.model.gate_encoder import gate_encoder_dir, load_gate_encoder
from cologen.model.gate_referrer import GateReferrer, save_gate_referrer
from cologen.model.packing import pack_latents
from cologen.model.presets import file_sha256
from cologen.model.text_encoders import MiniLMTextEncoder, TextEncoder
from cologen.module import changed_tokens


def grid_place(n: int) -> torch.Tensor:
    """`place_features` of a square grid of `n` tokens, as the model computes them from the condition's ids."""
    side = int(round(n ** 0.5))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return place_features(torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(n, 3))


def examples(shards: Sequence[str], task: str, scenes: int, builds: int, builder: BuilderConfig,
             resolution: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """(sources, targets, prompts) of `builds` builds of each of up to `scenes` scenes, build-major per scene."""
    urls = expand_shards(shards, f"gate referrer shards ({task})")
    sets = [FixedTaskDataset(urls, task, scenes, SkipCounter(), builder=builder, resolution=resolution,
                             buckets=None, seed=build) for build in range(builds)]
    sources, targets, prompts = [], [], []
    for i in range(sets[0].num_examples):
        for ds in sets:
            ex = ds.example(i)
            if ex.get("source") is None:
                raise ValueError(f"gate referrer: {task} example {ex['key']} has no condition image")
            sources.append(to_tensor(ex["source"]))
            targets.append(to_tensor(ex["target"]))
            prompts.append(ex["prompt"])
    return sources, targets, prompts


def precision_recall(logits: torch.Tensor, changed: torch.Tensor) -> tuple[float, float]:
    opened = logits >= 0
    hits = (opened & changed).sum().item()
    return hits / max(opened.sum().item(), 1), hits / max(changed.sum().item(), 1)


def pretrain(shards: dict[str, Sequence[str]], *, scenes: int = 2000, builds: int = 5, held_out: int = 256,
             steps: int = 3000, batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.05,
             pos_weight: float = 8.0, width: int = 64, convs: int = 2, gate_encoder: str = "builtin",
             text_encoder: TextEncoder | None = None, builder: BuilderConfig | None = None, resolution: int = 32,
             codec_factor: int = 2, seed: int = 0, log_every: int = 500) -> tuple[GateReferrer, dict[str, Any]]:
    """Train the referrer on each task's examples; returns it and what config.json records."""
    torch.manual_seed(seed)
    builder = builder or BuilderConfig()
    text_encoder = text_encoder or MiniLMTextEncoder()
    codec = PixelCodec(codec_factor)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    encoder = None
    for task, task_shards in shards.items():
        sources, targets, prompts = examples(task_shards, task, scenes, builds, builder, resolution)
        n_scenes = len(sources) // builds
        if n_scenes <= held_out:
            raise ValueError(f"gate referrer: {n_scenes} {task} scenes in {list(task_shards)}, need more than "
                             f"--held-out {held_out}")
        with torch.no_grad():
            source = pack_latents(codec.encode(torch.stack(sources)))
            target = pack_latents(codec.encode(torch.stack(targets)))
            encoder = encoder or load_gate_encoder(gate_encoder, source.shape[-1])
            pooled = torch.cat([text_encoder.encode(prompts[i:i + 256]).pooled.float().cpu()
                                for i in range(0, len(prompts), 256)])
            parts[task] = {"features": encoder(source), "pooled": pooled,
                           "changed": changed_tokens(target, source, None),
                           "train": torch.arange(len(sources)) < (n_scenes - held_out) * builds}
    assert encoder is not None
    n = next(iter(parts.values()))["features"].shape[1]
    place = grid_place(n)
    referrer = GateReferrer(encoder.embed.out_features, text_encoder.pooled_dim, place.shape[-1], width, convs)
    optimizer = torch.optim.AdamW(referrer.parameters(), lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    train = {t: torch.nonzero(p["train"])[:, 0] for t, p in parts.items()}
    tasks = list(parts)

    def held_out_scores() -> dict[str, dict[str, float]]:
        scores = {}
        with torch.no_grad():
            for task, p in parts.items():
                rows = ~p["train"]
                logits = referrer(p["features"][rows], p["pooled"][rows], place)
                precision, recall = precision_recall(logits, p["changed"][rows])
                scores[task] = {"precision": round(precision, 4), "recall": round(recall, 4)}
        return scores

    start = time.time()
    for step in range(steps):
        task = tasks[step % len(tasks)]  # the tasks take turns, whatever their sizes
        rows = train[task][torch.randint(0, len(train[task]), (batch_size,))]
        p = parts[task]
        logits = referrer(p["features"][rows], p["pooled"][rows], place)
        loss = F.binary_cross_entropy_with_logits(logits, p["changed"][rows].float(),
                                                  pos_weight=torch.tensor(pos_weight))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            scores = held_out_scores()
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f}, held-out precision / recall at 0: "
                  + ", ".join(f"{t} {s['precision']:.3f} / {s['recall']:.3f}" for t, s in scores.items()), flush=True)
    record = {"held_out": held_out_scores(), "tasks": tasks, "scenes": scenes, "builds": builds,
              "held_out_scenes": held_out, "steps": steps, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "pos_weight": pos_weight, "seed": seed,
              "shards": {t: list(s) for t, s in shards.items()},
              "gate_encoder_sha256": file_sha256(gate_encoder_dir(gate_encoder) / "model.safetensors"),
              "seconds": round(time.time() - start)}
    return referrer.requires_grad_(False).eval(), record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["grounding"], help="tasks whose changed tokens it learns")
    parser.add_argument("--data", default="data/shapeworld", help="folder of <task>/train-*.tar shards")
    parser.add_argument("--out", required=True, help="folder to write (model.safetensors, config.json, sha256)")
    parser.add_argument("--scenes", type=int, default=2000, help="scenes per task")
    parser.add_argument("--builds", type=int, default=5, help="builds of each scene")
    parser.add_argument("--held-out", type=int, default=256, help="scenes per task kept out of training")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--box-thickness", type=int, default=2, help="as the tiny preset's builder draws boxes")
    parser.add_argument("--gate-encoder", default="builtin")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # the tiny preset's overlays: boxes and masks (class boxes are left to the flux_dev data)
    builder = BuilderConfig(box_thickness=args.box_thickness,
                            overlay_kinds={"box": 1.0, "mask": 1.0, "class_boxes": 0.0})
    shards = {t: [f"{args.data}/{t}/train-*.tar"] for t in args.tasks}
    referrer, record = pretrain(shards, scenes=args.scenes, builds=args.builds, held_out=args.held_out,
                                steps=args.steps, gate_encoder=args.gate_encoder, builder=builder, seed=args.seed)
    command = " ".join(["python -m cologen.commands.pretrain_gate_referrer", *(sys.argv[1:] if argv is None else argv)])
    digest = save_gate_referrer(referrer, Path(args.out), {**record, "command": command})
    print(f"gate referrer written to {args.out} (sha256 {digest[:16]}...)")


if __name__ == "__main__":
    main()
