"""The FLUX.1-dev data configs name folders that the recipes write: every folder is produced here from
fixtures by its documented command, and each stage's DataModule (built from the YAML) trains and validates
on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cologen.data.builders import BuilderConfig
from cologen.data.datamodule import MixtureDataModule
from cologen.data.geometry import make_buckets
from cologen.testing import recipe_fixtures as F
from data_recipes import (
    dreambench,
    emu_edit,
    gedit_bench,
    inpainting,
    instructpix2pix,
    lvis,
    magicbrush,
    multigen,
    omniedit,
    refcoco,
    subjects200k,
    ultraedit,
)

CONFIGS = Path(__file__).parent.parent / "experiments" / "flux_dev"
STAGES = sorted(CONFIGS.glob("data_stage*.yaml"))
DOCS = (Path(__file__).parent.parent / "docs" / "data.md").read_text()


def _coco(root: Path, folder: str, lvis_format: bool = False) -> Path:
    data = F.coco_like(root, n_images=2, folder=folder, file_pattern="{:012d}.jpg", lvis=lvis_format)
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def _produce(name: str, out: Path, tmp: Path) -> None:
    """Write the folder `name` (e.g. "real/omniedit") with the recipe the docs name for it."""
    src = tmp / "sources" / name
    q = ["--output", str(out), "--quiet"]
    if name.startswith("val/"):  # a held-out share of a training source (most of these few fixture rows)
        q += ["--holdout", "val", "--holdout-fraction", "0.9"]

    def pq(table) -> str:
        return str(F.write_parquet(table, src / "train-00000-of-00001.parquet"))

    base = name.split("/")[1]
    if base == "subjects200k":
        subjects200k.main(["--input", pq(F.subjects200k_table(2)), *q])
    elif base in ("omniedit", "magicbrush", "ultraedit", "instructpix2pix"):
        table = {"omniedit": F.omniedit_table, "magicbrush": F.magicbrush_table, "ultraedit": F.ultraedit_table,
                 "instructpix2pix": F.instructpix2pix_table}[base](3)
        {"omniedit": omniedit, "magicbrush": magicbrush, "ultraedit": ultraedit,
         "instructpix2pix": instructpix2pix}[base].main(["--input", pq(table), *q])
    elif base in ("refcoco", "refcocoplus", "refcocog"):
        coco = F.coco_like(src / "coco", n_images=2)
        refcoco.main(["--input", pq(F.refcoco_table(coco)), "--images", str(src / "coco"), *q])
    elif base.startswith("refcoco_"):
        refcoco.main(["--input", pq(F.refcoco_eval_table(3)), "--split", base.split("_", 1)[1], *q])
    elif base == "lvis":
        lvis.main(["--input", str(_coco(src, "train2017", lvis_format=True)), "--images", str(src), *q])
    elif base.startswith(("multigen", "captioned", "ade20k")):
        kind = "depth" if "depth" in base else "canny" if "canny" in base else "seg"
        multigen.main(["--input", pq(F.multigen_table(kind, 2)), *q, *(["--eval"] if name.startswith("eval/") else [])])
    elif base == "inpainting_t2i":
        F.t2i_tars(src, n_tars=1, per_tar=3)
        inpainting.main(["--input", str(src), *q])
    elif base.startswith("inpainting_"):
        inpainting.main(["--input", str(_coco(src, "train2017")), "--images", str(src), *q])
    elif base == "dreambench":
        dreambench.main(["--input", str(F.dreambench_folder(src)), *q])
    elif base == "magicbrush_test":
        magicbrush.main(["--input", str(F.magicbrush_test_folder(src)), *q])
    elif base == "emu_edit_test":
        emu_edit.main(["--input", pq(F.emu_edit_table(2)), *q])
    elif base == "gedit_bench":
        gedit_bench.main(["--input", pq(F.gedit_table(2)), *q])
    else:
        raise AssertionError(f"no recipe produces {name}")


def _folders(spec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _data_folders(args: dict) -> list[str]:
    return [f for shards in (args["train_shards"], args.get("val_shards", {})) for spec in shards.values()
            for f in _folders(spec)]


def test_every_config_folder_is_documented_and_produced(tmp_path):
    folders = {f for path in STAGES for f in _data_folders(yaml.safe_load(path.read_text())["data"]["init_args"])}
    evals = yaml.safe_load((CONFIGS / "data_eval.yaml").read_text())["eval_shards"]
    folders |= {f for per_task in evals.values() for f in per_task.values()}
    for folder in sorted(folders):
        assert folder.startswith(("data/real/", "data/eval/", "data/val/")), folder
        name = folder.removeprefix("data/")
        assert name.split("/", 1)[1] in DOCS or folder in DOCS, folder
        out = tmp_path / folder
        _produce(name, out, tmp_path)
        assert list(out.glob("*.tar")), folder


@pytest.mark.parametrize("path", STAGES, ids=[p.stem for p in STAGES])
def test_stage_config_trains_and_validates(tmp_path, path):
    config = yaml.safe_load(path.read_text())["data"]
    assert config["class_path"] == "cologen.data.datamodule.MixtureDataModule"
    args = dict(config["init_args"])
    assert args["resolution"] == 512
    for folder in set(_data_folders(args)):
        _produce(folder.removeprefix("data/"), tmp_path / folder, tmp_path)

    def rebase(spec):
        return [str(tmp_path / f) for f in _folders(spec)]

    args["train_shards"] = {t: rebase(s) for t, s in args["train_shards"].items()}
    args["val_shards"] = {t: rebase(s) for t, s in args.get("val_shards", {}).items()}
    args |= {"builder": BuilderConfig(**args.get("builder", {})), "num_workers": 0, "batch_size": 2,
             "resolution": 64, "val_samples_per_task": 2}
    dm = MixtureDataModule(**args)
    for task in args["train_shards"]:
        dm.set_mixture({task: 1.0})
        batch = next(iter(dm.train_dataloader()))
        assert batch["task"] == [task, task] and tuple(batch["target"].shape[:2]) == (2, 3)
        assert tuple(batch["target"].shape[2:]) in {(h, w) for w, h in make_buckets(64)}  # aspect buckets
    for loader, task in zip(dm.val_dataloader(), dm.val_tasks):
        assert next(iter(loader))["task"][0] == task
