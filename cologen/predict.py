"""`cologen predict`: generate images for a JSONL file of requests.

One request per line:

    {"id": "edit-1", "task": "editing", "prompt": "make the red square blue", "source": "in/0.png",
     "mask": null, "seed": 0, "steps": 28, "width": 512, "height": 512}

`task` is one of the five tasks or `t2i`; `source` (an image path, relative to the JSONL file) is required except
for `t2i`; `mask` (white = region) turns a full image into the inpainting source (the masked area greyed as in
training); `control: "canny"` computes the canny map of `source`. Optional: `cfg_scale`, `image_cfg_scale`,
`guidance`. Images are written next to `results.jsonl` in the output folder; a bad line (missing file, unknown task,
a size not divisible by the patch size) gets an error line there and the rest still run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader

from cologen.data.control import canny
from cologen.data.geometry import fit_frame, warp
from cologen.data.tasks import TASKS

PREDICT_TASKS = ("inpainting", "grounding", "control", "customized", "editing", "t2i")
MASK_GREY = 128  # the builders' default: the masked area of an inpainting source


class BadRequest(ValueError):
    pass


@dataclass
class Request:
    line: int
    id: str
    task: str
    prompt: str
    width: int
    height: int
    seed: int = 0
    steps: int | None = None
    overrides: dict[str, float] = field(default_factory=dict)
    source: torch.Tensor | None = None  # (3, H, W) in [-1, 1]


def load_rgb(path: Path, width: int, height: int) -> np.ndarray:
    if not path.is_file():
        raise BadRequest(f"file not found: {path}")
    try:
        img = np.asarray(Image.open(path).convert("RGB"))
    except Exception as err:
        raise BadRequest(f"cannot read image {path}: {err}") from None
    return warp(img, fit_frame(img.shape[1], img.shape[0], width, height))


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1


def parse_request(raw: dict[str, Any], line: int, base: Path, patch: int, default_size: int) -> Request:
    if not isinstance(raw, dict):
        raise BadRequest("a request must be a JSON object")
    task = raw.get("task")
    if task not in PREDICT_TASKS:
        raise BadRequest(f"unknown task {task!r}; expected one of {', '.join(PREDICT_TASKS)}")
    prompt = raw.get("prompt", raw.get("instruction"))
    if not isinstance(prompt, str):
        raise BadRequest("missing 'prompt' (or 'instruction')")
    width, height = int(raw.get("width", default_size)), int(raw.get("height", default_size))
    if width <= 0 or height <= 0 or width % patch or height % patch:
        raise BadRequest(f"size {width}x{height} is not divisible by the patch size {patch}")
    req = Request(line=line, id=str(raw.get("id", f"line{line:05d}")), task=task, prompt=prompt, width=width,
                  height=height, seed=int(raw.get("seed", 0)),
                  steps=int(raw["steps"]) if raw.get("steps") is not None else None,
                  overrides={k: float(raw[k]) for k in ("cfg_scale", "image_cfg_scale", "guidance") if k in raw})
    if task == "t2i":
        return req
    if not raw.get("source"):
        raise BadRequest(f"task {task} needs a 'source' image")
    rgb = load_rgb(base / raw["source"], width, height)
    if raw.get("mask"):
        mask = load_rgb(base / raw["mask"], width, height).mean(-1) > 127
        rgb = rgb.copy()
        rgb[mask] = MASK_GREY
    if raw.get("control") == "canny":
        rgb = np.repeat(canny(rgb)[..., None], 3, axis=2)
    req.source = to_tensor(rgb)
    return req


class RequestsDataModule(L.LightningDataModule):
    """Reads a JSONL of requests for `cologen predict`.

    Args:
        requests: the JSONL file.
        output_dir: where images and `results.jsonl` go (default: `<requests stem>_outputs` next to it).
        patch_size: image sides must be multiples of this (tiny preset 4, FLUX 16).
        default_size: width/height of requests that give none.
    """

    def __init__(self, requests: str, output_dir: str | None = None, patch_size: int = 4, default_size: int = 32):
        super().__init__()
        self.requests_path = Path(requests)
        self.output_dir = Path(output_dir) if output_dir else self.requests_path.with_name(
            self.requests_path.stem + "_outputs")
        self.patch_size, self.default_size = patch_size, default_size
        self.valid: list[Request] = []
        self.errors: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        if not self.requests_path.is_file():
            raise FileNotFoundError(f"data.requests: {self.requests_path} does not exist")
        self.valid, self.errors = [], []
        base = self.requests_path.parent
        for i, text in enumerate(self.requests_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            raw = None
            try:
                raw = json.loads(text)
                self.valid.append(parse_request(raw, i, base, self.patch_size, self.default_size))
            except (BadRequest, json.JSONDecodeError, ValueError, TypeError) as err:
                rid = raw.get("id") if isinstance(raw, dict) else None
                self.errors.append({"line": i, "id": rid, "status": "error", "error": str(err).splitlines()[0]})
                print(f"[cologen predict] line {i}: {self.errors[-1]['error']}")

    def predict_dataloader(self) -> DataLoader:
        # one request per batch: requests differ in size, steps and guidance
        return DataLoader(self.valid, batch_size=None, collate_fn=lambda r: r)


class PredictionWriter(BasePredictionWriter):
    """Writes each generated image and one `results.jsonl` line per request (errors included)."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.rows: list[dict[str, Any]] = []

    def _output_dir(self, trainer) -> Path:
        dm = trainer.datamodule
        out = Path(getattr(dm, "output_dir", trainer.default_root_dir))
        out.mkdir(parents=True, exist_ok=True)
        return out

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        req: Request = prediction["request"]
        path = self._output_dir(trainer) / f"{req.id}.png"
        img = ((prediction["image"].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        Image.fromarray(img).save(path)
        self.rows.append({"line": req.line, "id": req.id, "status": "ok", "task": req.task, "image": path.name,
                          "seed": req.seed, "steps": prediction["steps"], "seconds": round(prediction["seconds"], 3),
                          "cache_hit_rate": prediction["cache_hit_rate"]})

    def on_predict_end(self, trainer, pl_module) -> None:
        errors = getattr(trainer.datamodule, "errors", [])
        rows = sorted(self.rows + errors, key=lambda r: r["line"])
        out = self._output_dir(trainer) / "results.jsonl"
        out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"[cologen predict] {len(self.rows)} image(s), {len(errors)} error(s) -> {out}")
        self.rows = []


def predict_one(module, req: Request) -> dict[str, Any]:
    """Generate one request with the module's sampler (used by CoLoGenModule.predict_step)."""
    overrides = dict(req.overrides)
    if req.steps is not None:
        overrides["steps"] = req.steps
    start = time.perf_counter()
    sources = req.source[None] if req.source is not None else None
    tasks = [req.task if req.task in TASKS else "editing"]
    images, stats = module.generate([req.prompt], sources, tasks, req.height, req.width, seed=[req.seed],
                                    **overrides)
    return {"request": req, "image": images[0], "seconds": time.perf_counter() - start,
            "steps": overrides.get("steps", module.sampler_config.steps), "cache_hit_rate": stats.cache_hit_rate}
