"""Shards with precomputed arrays (as `data_recipes.precompute` writes them) give batches with `text_tokens`,
`text_pooled`, `target_latent` and `source_latent` where the arrays match what the builder produced."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from cologen.data.datamodule import MixtureDataModule
from data_recipes.precompute import builder_prompt

L, D, P, LATENT = 6, 8, 5, (4, 4, 4)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float16))
    return buf.getvalue()


def _arrays(i: int, source: bool) -> dict[str, bytes]:
    rng = np.random.default_rng(i)
    out = {"t5.npy": _npy(rng.normal(size=(L, D))), "clip.npy": _npy(rng.normal(size=P)),
           "latent.npy": _npy(rng.normal(size=LATENT))}
    if source:
        out["source_latent.npy"] = _npy(rng.normal(size=LATENT))
    return out


def _precomputed_shard(root: Path, task: str, out: Path, resolution=(32, 32), every: int = 1) -> list[dict]:
    """The first shard of a ShapeWorld task with arrays and a `precomputed` block added to every `every`-th
    sample, as `data_recipes.precompute` writes them."""
    raws = list(wds.tarfile_samples([{"url": str(root / task / "train-0000.tar")}]))
    with wds.TarWriter(str(out), encoder=False, mtime=0) as sink:
        for i, raw in enumerate(raws):
            sample = {k: v for k, v in raw.items() if not k.startswith("__")} | {"__key__": raw["__key__"]}
            if i % every == 0:
                rec = json.loads(raw["json"])
                rec["precomputed"] = {"text": "/flux", "latent": "/flux", "resolution": list(resolution),
                                      "prompt": builder_prompt(rec), "max_length": L}
                sample |= {"json": json.dumps(rec).encode()} | _arrays(i, task in ("editing", "customized"))
            sink.write(sample)
    return raws


def _dm(shards: dict, **kw) -> MixtureDataModule:
    return MixtureDataModule(shards, {next(iter(shards)): 1.0}, val_shards=shards, batch_size=4, num_workers=0,
                             batches_per_epoch=6, shuffle_buffer=0, resampled=False, val_samples_per_task=8, **kw)


def test_editing_batches_carry_the_arrays(shapeworld_dir, tmp_path):
    _precomputed_shard(Path(shapeworld_dir), "editing", tmp_path / "e.tar")
    stored = {r["__key__"]: r for r in wds.tarfile_samples([{"url": str(tmp_path / "e.tar")}])}
    dm = _dm({"editing": str(tmp_path / "e.tar")})
    batches = list(dm.train_dataloader()) + [b for ld in dm.val_dataloader() for b in ld]
    for batch in batches:
        assert batch["text_tokens"].shape == (4, L, D) and batch["text_pooled"].shape == (4, P)
        assert batch["target_latent"].shape == batch["source_latent"].shape == (4, *LATENT)
        assert all(batch[k].dtype == torch.float32 for k in ("text_tokens", "text_pooled", "target_latent"))
        assert batch["target"].shape == (4, 3, 32, 32)  # the images as before
        for j, key in enumerate(batch["key"]):
            t5 = np.load(io.BytesIO(stored[key]["t5.npy"])).astype(np.float32)
            assert torch.equal(batch["text_tokens"][j], torch.from_numpy(t5))
            assert batch["meta"][j]["precomputed"] == {"used": ["t5", "clip", "latent", "source_latent"],
                                                       "dropped": {}}
    counts = dm.precomputed_counts
    assert counts["samples"] == 6 * 4 + 8 and sum(v for k, v in counts.items() if k != "samples") == 0
    plain = _dm({"editing": str(tmp_path / "e.tar")}, use_precomputed=False)
    assert "text_tokens" not in next(iter(plain.train_dataloader())) and plain.precomputed_counts == {}


def test_arrays_that_do_not_match_the_build_are_dropped_and_counted(shapeworld_dir, tmp_path):
    root = Path(shapeworld_dir)
    # grounding: the prompt is drawn per example and the target carries the overlay: nothing fits
    _precomputed_shard(root, "grounding", tmp_path / "g.tar")
    dm = _dm({"grounding": str(tmp_path / "g.tar")})
    batch = next(iter(dm.train_dataloader()))
    assert not {"text_tokens", "text_pooled", "target_latent"} & set(batch)
    assert all(m["precomputed"]["dropped"] == {"t5": "prompt", "clip": "prompt", "latent": "view"}
               for m in batch["meta"])
    assert dm.precomputed_counts["prompt"] == 8 and dm.precomputed_counts["view"] == 4
    # control at another resolution: the text fits, the latents do not
    _precomputed_shard(root, "control", tmp_path / "c.tar", resolution=(64, 64))
    dm = _dm({"control": str(tmp_path / "c.tar")})
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_tokens"].shape == (4, L, D) and "target_latent" not in batch
    assert dm.precomputed_counts["resolution"] == 4
    # only every other sample has arrays: a batch never mixes, it goes without and is counted
    _precomputed_shard(root, "inpainting", tmp_path / "i.tar", every=2)
    dm = _dm({"inpainting": str(tmp_path / "i.tar")})
    batches = list(dm.train_dataloader())
    assert not any("text_tokens" in b for b in batches)
    assert dm.precomputed_counts["mixed_batch"] == 6 * 3  # t5, clip, latent in each of the 6 batches


@pytest.mark.parametrize("bad", [b"not an npy", None])
def test_unreadable_arrays_are_not_used(shapeworld_dir, tmp_path, bad):
    _precomputed_shard(Path(shapeworld_dir), "editing", tmp_path / "e.tar")
    raws = list(wds.tarfile_samples([{"url": str(tmp_path / "e.tar")}]))
    with wds.TarWriter(str(tmp_path / "bad.tar"), encoder=False, mtime=0) as sink:
        for raw in raws:
            sample = {k: v for k, v in raw.items() if not k.startswith("__")} | {"__key__": raw["__key__"]}
            if bad is None:
                sample["t5.npy"] = _npy(np.zeros((L + 1, D)))  # another length: cannot be stacked with the rest
                if raw is not raws[0]:
                    sample["t5.npy"] = raw["t5.npy"]
            else:
                sample["t5.npy"] = bad
            sink.write(sample)
    dm = _dm({"editing": str(tmp_path / "bad.tar")})
    batches = list(dm.train_dataloader())
    assert all(b["text_pooled"].shape == (4, P) for b in batches)  # the other arrays are unaffected
    if bad is None:
        assert sum("text_tokens" not in b for b in batches) == 1 and dm.precomputed_counts["mixed_batch"] == 1
    else:
        assert not any("text_tokens" in b for b in batches) and dm.precomputed_counts["unreadable"] == 24
