"""The examples of `cologen predict` and the figure of what a model does with them.

    python examples/make_examples.py sources                        # requests.jsonl (and two_conditions.jsonl)
    python examples/make_examples.py figure [--ckpt CKPT]           # examples/results.png (`make examples`)

`sources` takes the first validation probes of the default ShapeWorld dataset (seed 0; the same examples
`make data` writes, built with the tiny curriculum's builder settings), one per task, in the forms the tiny model
was trained on: an inpainting scene with its mask, a grounding scene with a referring prompt, a control map, a
subject reference, a recolouring edit, and a caption for text-to-image. Every request gives its seed, steps and size.

`figure` runs `cologen predict` on examples/requests.jsonl with the checkpoint (without one: the committed tiny
base and no trained expert) and draws each request's condition and output, with its prompt, into
examples/results.png; the figure says which model made it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REQUESTS = EXAMPLES / "requests.jsonl"
FIGURE = EXAMPLES / "results.png"
SIZE, STEPS = 32, 28


def _save(image, path: Path) -> str:
    from cologen.metrics.images import to_uint8_rgb

    Image.fromarray(to_uint8_rgb(image)).save(path)
    return path.name


def sources() -> list[dict]:
    from cologen.commands.evaluate import builder_from_config, load_probes
    from data_recipes.shapeworld import ShapeWorldConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, train=1, val=16, seed=0, config=ShapeWorldConfig(), workers=1, progress=False)
        tasks = ["inpainting", "grounding", "control", "customized", "editing"]
        # built as the tiny curriculum builds its examples (its overlays and box outlines)
        builder = builder_from_config(str(ROOT / "experiments/tiny/curriculum.yaml"))
        probes = load_probes(tmp, tasks, 16, builder=builder)
    requests = []
    first = probes["inpainting"][0]
    mask = (first["region"].astype(np.uint8) * 255)
    Image.fromarray(mask).save(EXAMPLES / "inpainting_mask.png")
    requests.append({"id": "inpainting", "task": "inpainting", "prompt": first["prompt"],
                     "source": _save(first["target"], EXAMPLES / "inpainting_image.png"),
                     "mask": "inpainting_mask.png"})
    for task in ("grounding", "control", "customized"):
        p = probes[task][0]
        requests.append({"id": task, "task": task, "prompt": p["prompt"],
                         "source": _save(p["source"], EXAMPLES / f"{task}_source.png")})
    edit = next(p for p in probes["editing"] if p["meta"]["record"]["edit"]["operation"] == "recolor")
    requests.append({"id": "editing", "task": "editing", "prompt": edit["prompt"],
                     "source": _save(edit["source"], EXAMPLES / "editing_source.png")})
    caption = probes["inpainting"][1]["meta"]["record"].get("caption") or probes["inpainting"][1]["prompt"]
    requests.append({"id": "t2i", "task": "t2i", "prompt": caption})
    for r in requests:
        r.update(seed=0, steps=STEPS, width=SIZE, height=SIZE)
    REQUESTS.write_text("".join(json.dumps(r) + "\n" for r in requests))
    (EXAMPLES / "inpainting_source.png").unlink(missing_ok=True)  # replaced by the image + mask pair
    two_condition_request()
    return requests


def two_condition_request() -> dict:
    """examples/two_conditions.jsonl: a customized_layout request (docs/multi_condition.md), a subject reference
    and the layout map of where it goes, from the first validation probe of that task."""
    from cologen.commands.evaluate import load_probes
    from data_recipes.shapeworld import ShapeWorldConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, train=1, val=16, seed=0, config=ShapeWorldConfig(), workers=1, progress=False)
        probe = load_probes(tmp, ["customized_layout"], 1)["customized_layout"][0]
    request = {"id": "subject_and_layout", "task": "customized_layout", "prompt": probe["prompt"],
               "sources": [{"image": _save(probe["source"], EXAMPLES / "subject_reference.png"), "role": "subject"},
                           {"image": _save(probe["extra_sources"][0], EXAMPLES / "subject_layout.png"),
                            "role": "layout"}],
               "seed": 0, "steps": STEPS, "width": SIZE, "height": SIZE}
    (EXAMPLES / "two_conditions.jsonl").write_text(json.dumps(request) + "\n")
    return request


def figure(ckpt: str | None) -> Path:
    from cologen import checkpoints
    from cologen.callbacks.grids import image_grid
    from cologen.cli import main as cologen
    from cologen.inputs import MASK_GREY

    args = ["predict", "--config", str(ROOT / "experiments/tiny/curriculum.yaml"),
            "--config", str(ROOT / "experiments/tiny/predict.yaml"), "--data.requests", str(REQUESTS)]
    if ckpt:
        args += ["--ckpt_path", ckpt]
    cologen(args)
    out = REQUESTS.with_name(REQUESTS.stem + "_outputs")
    results = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    requests = [json.loads(line) for line in REQUESTS.read_text().splitlines() if line.strip()]
    conditions, outputs, captions = [], [], []
    for r in requests:
        condition = None
        if r.get("source"):
            condition = np.asarray(Image.open(EXAMPLES / r["source"]).convert("RGB")).copy()
            if r.get("mask"):
                condition[np.asarray(Image.open(EXAMPLES / r["mask"]).convert("L")) > 127] = MASK_GREY
        conditions.append(condition)
        outputs.append(np.asarray(Image.open(out / results[r["id"]]["image"]).convert("RGB")))
        captions.append(f"{r['task']}: {r['prompt']}\nseed {r['seed']}, {r['steps']} steps, {r['width']}x{r['height']}")
    grid = Image.fromarray(image_grid([("condition", conditions), ("output", outputs)], captions=captions))
    if ckpt:
        step = checkpoints.check(ckpt).get("global_step")
        model = f"{ckpt} (global step {step})"
    else:
        model = "the committed tiny base alone (no trained expert)"
    title = f"cologen predict examples/requests.jsonl with {model}, {datetime.date.today().isoformat()}"
    canvas = Image.new("RGB", (grid.width, grid.height + 16), (255, 255, 255))
    canvas.paste(grid, (0, 16))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(0, 0, 0))
    canvas.save(FIGURE)
    return FIGURE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sources", help="requests.jsonl and its condition images")
    fig = sub.add_parser("figure", help="examples/results.png")
    fig.add_argument("--ckpt", help="a cologen checkpoint (default: none, the committed base alone)")
    args = parser.parse_args(argv)
    if args.command == "sources":
        print(f"{len(sources())} requests -> {REQUESTS}")
    else:
        print(f"figure -> {figure(args.ckpt)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
