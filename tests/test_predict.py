"""`cologen predict`: one image per valid request, one error line per invalid one."""

import json

import lightning as L
import numpy as np
import torch
from PIL import Image

from cologen.model.config import PRWConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from cologen.predict import PredictionWriter, RequestsDataModule
from cologen.sampling.sampler import SamplerConfig


def test_predict_writes_images_and_error_lines(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "scene.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    requests = [
        {"id": "edit", "task": "editing", "prompt": "make it blue", "source": "scene.png", "seed": 3},
        {"id": "inpaint", "task": "inpainting", "prompt": "a red square", "source": "scene.png",
         "mask": "mask.png", "steps": 3},
        {"id": "t2i", "task": "t2i", "prompt": "a green circle", "width": 32, "height": 32},
        {"id": "missing", "task": "editing", "prompt": "x", "source": "nope.png"},
        {"id": "unknown", "task": "painting", "prompt": "x", "source": "scene.png"},
        {"id": "badsize", "task": "t2i", "prompt": "x", "width": 30, "height": 32},
    ]
    lines = [json.dumps(r) for r in requests] + ["{not json"]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")

    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8), sampler=SamplerConfig(steps=2))
    dm = RequestsDataModule(str(tmp_path / "requests.jsonl"), output_dir=str(tmp_path / "out"))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[PredictionWriter()], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(module, datamodule=dm, return_predictions=False)

    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 8))
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {"edit", "inpaint", "t2i"}
    assert ok["inpaint"]["steps"] == 3 and ok["edit"]["steps"] == 2
    for rid in ok:
        img = Image.open(tmp_path / "out" / f"{rid}.png")
        assert img.size == (32, 32)
    errors = {r["line"]: r["error"] for r in rows if r["status"] == "error"}
    assert "file not found" in errors[4]
    assert "unknown task 'painting'" in errors[5]
    assert "not divisible by the patch size 4" in errors[6]
    assert 7 in errors  # the malformed JSON line
    assert all("\n" not in e for e in errors.values())
