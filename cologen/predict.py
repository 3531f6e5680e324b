"""`cologen predict`: generate images for a JSONL file of requests.

One request per line:

    {"id": "edit-1", "task": "editing", "prompt": "make the red square blue", "source": "in/0.png",
     "mask": null, "seed": 0, "steps": 28, "width": 512, "height": 512}

`task` is one of the five tasks or `t2i`; `source` (an image path, relative to the JSONL file) is required except
for `t2i`; `mask` (inpainting only; white = the region to fill) turns a full image into the inpainting source (the
masked area greyed as in training), and the sampler keeps the image outside it at every step (`FlowSampler.sample`); `control: "canny"` (control only) computes the canny map of `source`.
Several conditions (each its own source stream, docs/multi_condition.md): `"sources": ["subject.png",
{"image": "depth.png", "role": "depth"}]` instead of `source`, paths or objects with a `role` (one of
CONDITION_ROLES; recorded in results.jsonl), in the order the model was trained with.
Optional: `seed` (>= 0), `steps` (>= 1), `width` / `height` (multiples of the model's patch size; default: the
model's sample size), `cfg_scale`, `image_cfg_scale`, `guidance`, `strength` (img2img: start from the source noised
to this level, 0-1), `effect_mask` (editing: keep the source's copy where the expert barely acts, 0-1).

Images and `results.jsonl` go to `data.output_dir` (default: `<requests stem>_outputs/` next to the requests file).
The outputs of an earlier run there are replaced, never mixed in. A bad request (a field of the wrong type or
value, a missing file, a line that is not JSON, a failed generation) gets its own error line naming the field, in
`results.jsonl` and on stderr; the other requests still run, and the command exits with status 1 saying how many
failed.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
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
from cologen.data.records import CONDITION_ROLES
from cologen.errors import MissingInput, UsageError, one_line
from cologen.inputs import GENERATION_TASKS, check_task, fit, mask_array, masked_source, read_rgb, to_tensor

PREDICT_TASKS = GENERATION_TASKS
FIELDS = ("id", "task", "prompt", "instruction", "source", "sources", "mask", "control", "seed", "steps", "width",
          "height", "cfg_scale", "image_cfg_scale", "guidance", "strength", "effect_mask")
RESULTS = "results.jsonl"


class BadRequest(UsageError):
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
    sources: list[torch.Tensor] = field(default_factory=list)  # per condition (3, H, W) in [-1, 1]
    roles: list[str] = field(default_factory=list)
    mask: np.ndarray | None = None  # inpainting: (H, W) bool, the region to fill; the sampler keeps the rest
    keep_image: torch.Tensor | None = None  # inpainting with a mask: (3, H, W), the image before it was greyed


def _int(raw: dict[str, Any], name: str, default: int | None, minimum: int, multiple: int = 1) -> int | None:
    value = raw.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % multiple:
        need = f"an integer >= {minimum}" + (f" and a multiple of {multiple} (the model's patch size)"
                                             if multiple > 1 else "")
        raise BadRequest(f"{name}: expected {need}, got {value!r}")
    return value


def _number(raw: dict[str, Any], name: str) -> float:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name}: expected a number, got {value!r}")
    return float(value)


def _image(base: Path, raw: dict[str, Any], name: str) -> np.ndarray:
    value = raw[name]
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name}: expected an image path (relative to the requests file), got {value!r}")
    try:
        return read_rgb(base / value, name)
    except (MissingInput, UsageError) as err:
        raise BadRequest(str(err)) from None


def parse_request(raw: Any, line: int, base: Path, patch: int, default_size: int) -> Request:
    """A checked request; a BadRequest naming the first bad field."""
    if not isinstance(raw, dict):
        raise BadRequest(f"expected a JSON object, got {type(raw).__name__}")
    for name in raw:
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            raise BadRequest(f"{name}: unknown field ({f'did you mean {close[0]!r}? ' if close else ''}"
                             f"fields: {', '.join(FIELDS)})")
    if "task" not in raw:
        raise BadRequest(f"task: missing (one of {', '.join(PREDICT_TASKS)})")
    try:
        task = check_task(raw["task"])
    except UsageError as err:
        raise BadRequest(str(err)) from None
    prompt = raw.get("prompt", raw.get("instruction"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest(f"prompt: expected a non-empty string (or 'instruction'), got {prompt!r}")
    width = _int(raw, "width", default_size, 1, patch)
    height = _int(raw, "height", default_size, 1, patch)
    rid = raw.get("id", f"line{line:05d}")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid) or any(c in str(rid) for c in "/\\") \
            or str(rid).startswith("."):
        raise BadRequest(f"id: expected a file-name-safe string (no '/', not starting with '.'), got {rid!r}")
    req = Request(line=line, id=str(rid), task=task, prompt=prompt, width=width,
                  height=height, seed=_int(raw, "seed", 0, 0), steps=_int(raw, "steps", None, 1),
                  overrides={k: _number(raw, k) for k in ("cfg_scale", "image_cfg_scale", "guidance", "strength",
                                                          "effect_mask")
                             if k in raw})
    if task == "t2i":
        for name in ("source", "sources", "mask", "control"):
            if raw.get(name) is not None:
                raise BadRequest(f"{name}: a t2i request takes no condition image")
        return req
    if raw.get("sources") is not None:
        if raw.get("source") is not None or raw.get("mask") is not None or raw.get("control") is not None:
            raise BadRequest("sources: give either 'sources' or 'source' (with its 'mask' / 'control'), not both")
        req.sources, req.roles = _conditions(base, raw["sources"], width, height)
        return req
    if raw.get("source") is None:
        raise BadRequest(f"source: missing (task {task} needs a condition image)")
    rgb = fit(_image(base, raw, "source"), width, height)
    if raw.get("mask") is not None:
        if task != "inpainting":
            raise BadRequest(f"mask: only inpainting requests take a mask (this one is {task})")
        req.mask = mask_array(_image(base, raw, "mask"), width, height)
        req.keep_image = to_tensor(rgb)  # what the sampler keeps outside the mask (not the grey)
        rgb = masked_source(rgb, req.mask)
    if raw.get("control") is not None:
        if raw["control"] != "canny" or task != "control":
            raise BadRequest(f"control: only 'canny', on control requests, got {raw['control']!r} on {task}")
        rgb = np.repeat(canny(rgb)[..., None], 3, axis=2)
    req.sources, req.roles = [to_tensor(rgb)], ["image"]
    return req


def _conditions(base: Path, value: Any, width: int, height: int) -> tuple[list[torch.Tensor], list[str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"sources: expected a non-empty list of image paths or {{image, role}} objects, got {value!r}")
    tensors, roles = [], []
    for i, item in enumerate(value):
        entry = {"image": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or set(entry) - {"image", "role"} or "image" not in entry:
            raise BadRequest(f"sources[{i}]: expected an image path or {{\"image\": path, \"role\": role}}, got {item!r}")
        role = entry.get("role", "image")
        if role not in CONDITION_ROLES:
            raise BadRequest(f"sources[{i}].role: expected one of {', '.join(CONDITION_ROLES)}, got {role!r}")
        tensors.append(to_tensor(fit(_image(base, {f"sources[{i}]": entry["image"]}, f"sources[{i}]"), width,
                                     height)))
        roles.append(role)
    return tensors, roles


class RequestsDataModule(L.LightningDataModule):
    """Reads a JSONL of requests for `cologen predict`.

    Args:
        requests: the JSONL file.
        output_dir: where images and `results.jsonl` go (default: `<requests stem>_outputs` next to the requests).
        patch_size: image sides must be multiples of this (default: the model's: tiny preset 4, FLUX 16).
        default_size: width/height of requests that give none (default: the model's sample size).
    """

    def __init__(self, requests: str, output_dir: str | None = None, patch_size: int | None = None,
                 default_size: int | None = None):
        super().__init__()
        self.requests_path = Path(requests)
        self.output_dir = Path(output_dir) if output_dir else self.requests_path.with_name(
            self.requests_path.stem + "_outputs")
        self.patch_size, self.default_size = patch_size, default_size
        self.valid: list[Request] = []
        self.errors: list[dict[str, Any]] = []

    def _model_defaults(self) -> tuple[int, int]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        patch = self.patch_size or (module.codec.patch_pixels if module is not None else 4)
        size = self.default_size or (module.preset.sample_size if module is not None else 32)
        return patch, size

    def setup(self, stage: str) -> None:
        if not self.requests_path.is_file():
            raise MissingInput(f"data.requests: {self.requests_path} does not exist")
        patch, size = self._model_defaults()
        self.valid, self.errors = [], []
        seen: dict[str, int] = {}
        base = self.requests_path.parent
        for i, text in enumerate(self.requests_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            raw = None
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                self._error(i, None, f"not a JSON object ({err.msg} at column {err.colno})")
                continue
            try:
                req = parse_request(raw, i, base, patch, size)
                if req.id in seen:
                    raise BadRequest(f"id: {req.id!r} is already used by line {seen[req.id]} (ids name the images)")
                seen[req.id] = i
                self.valid.append(req)
            except BadRequest as err:
                self._error(i, raw.get("id") if isinstance(raw, dict) else None, str(err))

    def _error(self, line: int, rid: Any, message: str) -> None:
        self.errors.append({"line": line, "id": rid, "status": "error", "error": one_line(message)})
        print(f"[cologen predict] line {line}{f' ({rid})' if rid is not None else ''}: {one_line(message)}",
              file=sys.stderr)

    def predict_dataloader(self) -> DataLoader:
        # one request per batch: requests differ in size, steps and guidance
        return DataLoader(self.valid, batch_size=None, collate_fn=lambda r: r)


class PredictionWriter(BasePredictionWriter):
    """Writes each generated image and one `results.jsonl` line per request (errors included), into a folder that
    holds only this run's outputs (an earlier run's, listed in its `results.jsonl`, are removed first)."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.rows: list[dict[str, Any]] = []
        self.failed = self.total = 0
        self.results_path: Path | None = None

    @staticmethod
    def _output_dir(trainer) -> Path:
        return Path(getattr(trainer.datamodule, "output_dir", None) or trainer.default_root_dir)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # after the datamodule's setup (its parse errors are known); also when no request is valid and Lightning
        # skips the prediction loop and its hooks
        if stage != "predict":
            return
        out = self._output_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        self.results_path = out / RESULTS
        removed = clear_previous(out)
        if removed:
            print(f"[cologen predict] removed the {removed} output(s) of an earlier run in {out}", file=sys.stderr)
        self.rows = list(getattr(trainer.datamodule, "errors", []))
        self.results_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        req: Request = prediction["request"]
        if "error" in prediction:
            row = {"line": req.line, "id": req.id, "status": "error", "error": prediction["error"]}
            print(f"[cologen predict] line {req.line} ({req.id}): {prediction['error']}", file=sys.stderr)
        else:
            path = self._output_dir(trainer) / f"{req.id}.png"
            img = ((prediction["image"].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            Image.fromarray(img).save(path)
            row = {"line": req.line, "id": req.id, "status": "ok", "task": req.task, "image": path.name,
                   "seed": req.seed, "steps": prediction["steps"], "width": req.width, "height": req.height,
                   "seconds": round(prediction["seconds"], 3), "cache_hit_rate": prediction["cache_hit_rate"]}
            if len(req.sources) > 1:
                row["roles"] = req.roles
        self.rows.append(row)
        with open(self.results_path, "a", encoding="utf-8") as f:  # a crash still leaves what was done
            f.write(json.dumps(row) + "\n")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict" or self.results_path is None:
            return
        rows = sorted(self.rows, key=lambda r: r["line"])
        self.results_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        self.total, self.failed = len(rows), sum(r["status"] != "ok" for r in rows)
        print(f"[cologen predict] {self.total - self.failed} image(s), {self.failed} error(s) -> {self.results_path}")
        self.rows = []


def clear_previous(out: Path) -> int:
    """Remove the files an earlier run listed in `out/results.jsonl` (and that file); how many were removed."""
    results = out / RESULTS
    if not results.is_file():
        return 0
    removed = 0
    for text in results.read_text(encoding="utf-8").splitlines():
        try:
            name = json.loads(text).get("image")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(name, str) and "/" not in name and "\\" not in name and (out / name).is_file():
            (out / name).unlink()
            removed += 1
    results.unlink()
    return removed


def predict_one(module, req: Request) -> dict[str, Any]:
    """Generate one request with the module's sampler (used by CoLoGenModule.predict_step); a failure becomes the
    request's error line instead of ending the run."""
    overrides = dict(req.overrides)
    if req.steps is not None:
        overrides["steps"] = req.steps
    start = time.perf_counter()
    sources = [s[None] for s in req.sources] or None
    try:
        mask = None if req.mask is None else torch.from_numpy(req.mask).float()[None, None]
        keep = None if req.keep_image is None else req.keep_image[None]
        images, stats = module.generate([req.prompt], sources, [req.task], req.height, req.width, seed=[req.seed],
                                        mask=mask, keep_image=keep, **overrides)
    except Exception as err:  # noqa: BLE001 - one request's failure must not end the others
        return {"request": req, "error": f"generation failed: {type(err).__name__}: {one_line(err)}"}
    return {"request": req, "image": images[0], "seconds": time.perf_counter() - start,
            "steps": overrides.get("steps", module.sampler_config.steps), "cache_hit_rate": stats.cache_hit_rate}
