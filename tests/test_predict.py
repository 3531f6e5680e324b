"""`cologen predict`: one image per valid request, one error line naming the field per invalid one, a fresh
output folder next to the requests, and a non-zero exit status that says how many requests failed."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from cologen.model.config import PRWConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from cologen.predict import PredictionWriter, RequestsDataModule
from cologen.sampling.sampler import SamplerConfig

ROOT = Path(__file__).resolve().parents[1]


def write_inputs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / "scene.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(folder / "mask.png")


REQUESTS = [
    ({"id": "edit", "task": "editing", "prompt": "make it blue", "source": "scene.png", "seed": 3}, None),
    ({"id": "inpaint", "task": "inpainting", "prompt": "a red square", "source": "scene.png", "mask": "mask.png",
      "steps": 3}, None),
    ({"id": "t2i", "task": "t2i", "prompt": "a green circle", "width": 32, "height": 32}, None),
    ({"id": "missing", "task": "editing", "prompt": "x", "source": "nope.png"}, "source: file not found"),
    ({"id": "unknown", "task": "grnding", "prompt": "x", "source": "scene.png"},
     "task: unknown task 'grnding' (did you mean 'grounding'?"),
    ({"id": "badsize", "task": "t2i", "prompt": "x", "width": 30, "height": 32},
     "width: expected an integer >= 1 and a multiple of 4 (the model's patch size), got 30"),
    ({"id": "big", "task": "t2i", "prompt": "x", "width": "big"}, "width: expected an integer >= 1"),
    ({"id": "nosteps", "task": "t2i", "prompt": "x", "steps": 0}, "steps: expected an integer >= 1, got 0"),
    ({"id": "typo", "task": "t2i", "prompt": "x", "widht": 32}, "widht: unknown field (did you mean 'width'?"),
    ({"id": "maskedit", "task": "editing", "prompt": "x", "source": "scene.png", "mask": "mask.png"},
     "mask: only inpainting requests take a mask"),
    ({"id": "edit", "task": "t2i", "prompt": "again"}, "id: 'edit' is already used by line 1"),
    ({"id": "noprompt", "task": "t2i"}, "prompt: expected a non-empty string"),
    ({"id": "two", "task": "customized", "prompt": "the subject where the map puts it",
      "sources": ["scene.png", {"image": "mask.png", "role": "layout"}]}, None),
    ({"id": "both", "task": "customized", "prompt": "x", "source": "scene.png", "sources": ["scene.png"]},
     "sources: give either 'sources' or 'source'"),
    ({"id": "role", "task": "customized", "prompt": "x", "sources": [{"image": "scene.png", "role": "colour"}]},
     "sources[0].role: expected one of"),
    ({"id": "nofile", "task": "customized", "prompt": "x", "sources": ["scene.png", "nope.png"]},
     "sources[1]: file not found"),
]


def write_requests(folder: Path) -> Path:
    lines = [json.dumps(r) for r, _ in REQUESTS] + ["{not json", "[1, 2]"]
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def small_module(**kwargs) -> CoLoGenModule:
    torch.manual_seed(0)
    return CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2),
                         prw=PRWConfig(num_experts=2, rank=4, alpha=8), sampler=SamplerConfig(steps=2), **kwargs)


def test_predict_writes_images_and_one_error_line_per_bad_request(tmp_path, capfd):
    write_inputs(tmp_path)
    requests = write_requests(tmp_path)
    out = tmp_path / "requests_outputs"  # the default: next to the requests file
    out.mkdir()
    (out / "old.png").write_bytes(b"an earlier run's image")
    (out / "keep.txt").write_text("not ours")
    (out / "results.jsonl").write_text(json.dumps({"line": 1, "id": "old", "status": "ok", "image": "old.png"})
                                       + "\n")

    dm = RequestsDataModule(str(requests))
    assert dm.output_dir == out
    writer = PredictionWriter()
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(small_module(), datamodule=dm, return_predictions=False)

    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, len(REQUESTS) + 3))
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {"edit", "inpaint", "t2i", "two"}
    assert ok["inpaint"]["steps"] == 3 and ok["edit"]["steps"] == 2
    assert ok["two"]["roles"] == ["image", "layout"] and "roles" not in ok["edit"]  # two conditions, two streams
    for rid in ok:
        assert Image.open(out / f"{rid}.png").size == (32, 32)
    # the inpainting request keeps its (fitted) image outside the mask exactly, the sampler's mask
    from cologen.inputs import fit, read_rgb

    scene, hole = fit(read_rgb(tmp_path / "scene.png"), 32, 32), np.zeros((32, 32), bool)
    hole[8:20, 8:20] = True
    inpainted = np.asarray(Image.open(out / "inpaint.png"))
    assert np.array_equal(inpainted[~hole], scene[~hole]) and not np.array_equal(inpainted, scene)
    errors = {r["line"]: r["error"] for r in rows if r["status"] == "error"}
    for line, (_, expected) in enumerate(REQUESTS, start=1):
        if expected is not None:
            assert errors[line].startswith(expected), (line, errors[line])
    assert errors[len(REQUESTS) + 1].startswith("not a JSON object")
    assert errors[len(REQUESTS) + 2] == "expected a JSON object, got list"
    assert all("\n" not in e for e in errors.values())
    # the earlier run's outputs are gone, other files stay
    assert not (out / "old.png").exists() and (out / "keep.txt").exists()
    assert writer.failed == len(errors) and writer.total == len(rows)
    err = capfd.readouterr().err
    for line in errors:
        assert f"[cologen predict] line {line}" in err


def test_a_generation_failure_is_that_requests_error(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "task": "t2i", "prompt": "a"}, {"id": "b", "task": "t2i", "prompt": "boom"},
        {"id": "c", "task": "t2i", "prompt": "c"}]) + "\n")
    module = small_module()
    generate = module.generate

    def flaky(prompts, *args, **kwargs):
        if prompts == ["boom"]:
            raise RuntimeError("out of memory\n(details)")
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(module, "generate", flaky)
    writer = PredictionWriter()
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(module, datamodule=RequestsDataModule(str(path), output_dir=str(tmp_path / "o")),
                    return_predictions=False)
    rows = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"] == "generation failed: RuntimeError: out of memory"
    assert writer.failed == 1


def test_no_valid_request_still_writes_results(tmp_path):
    """With nothing to generate Lightning skips the prediction loop; the error lines are written all the same."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "a", "task": "t2i", "prompt": "x", "steps": 0}) + "\n")
    writer = PredictionWriter()
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(small_module(), datamodule=RequestsDataModule(str(path)), return_predictions=False)
    rows = [json.loads(x) for x in (tmp_path / "r_outputs" / "results.jsonl").read_text().splitlines()]
    assert rows == [{"line": 1, "id": "a", "status": "error", "error": "steps: expected an integer >= 1, got 0"}]
    assert (writer.failed, writer.total) == (1, 1)


@pytest.mark.timeout(1800)
def test_the_command_exits_non_zero_saying_how_many_failed(tmp_path, capfd):
    """`cologen predict` with the shipped predict config: sizes and patch size come from the model, the output
    folder is next to the requests, and two bad requests make the exit status 1 with one summary line."""
    from cologen.cli import main

    write_inputs(tmp_path)
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "ok", "task": "t2i", "prompt": "a red circle", "steps": 2},
        {"id": "bad", "task": "t2i", "prompt": "x", "steps": 0},
        {"id": "bad2", "task": "editing", "prompt": "x", "source": "missing.png"}]) + "\n")
    with pytest.raises(SystemExit) as exit:
        main(["predict", "--config", str(ROOT / "experiments/tiny/curriculum.yaml"),
              "--config", str(ROOT / "experiments/tiny/predict.yaml"), "--data.requests", str(path)])
    assert exit.value.code == 1
    err = capfd.readouterr().err
    summary = [line for line in err.splitlines() if line.startswith("cologen predict:")]
    assert summary == [f"cologen predict: 2 of 3 request(s) failed; their lines in "
                       f"{tmp_path / 'mine_outputs' / 'results.jsonl'} say why"]
    assert Image.open(tmp_path / "mine_outputs" / "ok.png").size == (32, 32)  # the model's sample size
    assert (tmp_path / "mine_outputs" / "config.yaml").is_file()  # the resolved config beside its outputs


def test_the_two_condition_example_request_is_valid():
    from cologen.predict import parse_request

    path = ROOT / "examples" / "two_conditions.jsonl"
    (raw,) = [json.loads(line) for line in path.read_text().splitlines()]
    req = parse_request(raw, 1, path.parent, patch=4, default_size=32)
    assert req.task == "customized_layout" and req.roles == ["subject", "layout"]
    assert [tuple(s.shape) for s in req.sources] == [(3, 32, 32), (3, 32, 32)]


def test_a_one_source_request_is_the_single_condition_sample(tmp_path):
    """predict hands the sampler a list of conditions: with one, the very image of the single-condition call."""
    from cologen.predict import parse_request, predict_one

    write_inputs(tmp_path)
    module = small_module()
    req = parse_request({"task": "editing", "prompt": "make it blue", "source": "scene.png", "seed": 3}, 1,
                        tmp_path, patch=4, default_size=32)
    expected, _ = module.generate([req.prompt], req.sources[0][None], [req.task], 32, 32, seed=[3])
    assert torch.equal(predict_one(module, req)["image"], expected[0])


def test_the_examples_figure_runs_predict_on_the_requests_and_draws_every_one(tmp_path, monkeypatch):
    """`make examples` (examples/make_examples.py figure): the committed requests through `cologen predict` with the
    committed base (no checkpoint), one condition and one output per request, in a figure that names its model."""
    import shutil
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import make_examples
    finally:
        sys.path.remove(str(ROOT / "examples"))
    examples = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", examples, ignore=shutil.ignore_patterns("*_outputs", "results.png"))
    monkeypatch.setattr(make_examples, "EXAMPLES", examples)
    monkeypatch.setattr(make_examples, "REQUESTS", examples / "requests.jsonl")
    monkeypatch.setattr(make_examples, "FIGURE", examples / "results.png")
    requests = [json.loads(line) for line in (examples / "requests.jsonl").read_text().splitlines() if line.strip()]
    figure = Image.open(make_examples.figure(None))
    results = (examples / "requests_outputs" / "results.jsonl").read_text().splitlines()
    assert len(results) == len(requests) and all("error" not in json.loads(r) for r in results)
    assert figure.width >= len(requests) * 32 and figure.height > 2 * 32  # a column per request, two image rows
