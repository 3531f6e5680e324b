"""`precompute`: cached T5/CLIP embeddings and VAE latents added to converted shards (tiny saved FLUX
pipeline), equal to a direct encoding, and enough to train one step without loading the text encoders."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cologen.data.builders import TaskBuilder
from cologen.data.geometry import warp
from cologen.model.codecs import VAECodec
from cologen.model.config import PRWConfig
from cologen.model.presets import FluxDevPreset
from cologen.model.text_encoders import FluxTextEncoder
from cologen.module import CoLoGenModule
from cologen.testing import recipe_fixtures as F
from data_recipes import multigen, omniedit, precompute, refcoco, subjects200k

RES, MAX_LEN = 32, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they thrash (10x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")

    def parquet(table, name):
        return str(F.write_parquet(table, root / "in" / name / "train-00000.parquet"))

    omniedit.main(["--input", parquet(F.omniedit_table(4, bad=True), "omni"), "--output", str(root / "editing"),
                   "--shard-size", "3", "--quiet"])
    subjects200k.main(["--input", parquet(F.subjects200k_table(1), "s200k"), "--output", str(root / "customized"),
                       "--quiet"])
    multigen.main(["--input", parquet(F.multigen_table("depth", 2), "depth"), "--output", str(root / "control"),
                   "--quiet"])
    refcoco.main(["--input", parquet(F.refcoco_eval_table(2), "rc"), "--output", str(root / "grounding"), "--quiet"])
    return root


TASKS = ("editing", "customized", "control", "grounding")


def _precompute(flux, src, dst, *extra):
    return precompute.main(["--input", str(src), "--output", str(dst), "--flux", str(flux), "--resolution",
                            str(RES), "--max-length", str(MAX_LEN), "--dtype", "float32", "--quiet", *extra])


@pytest.fixture(scope="module")
def precomputed(flux, converted):
    out = converted / "flux"
    stats = {t: _precompute(flux, converted / t, out / t, "--batch-size", "3") for t in TASKS}
    return out, stats


def test_arrays_equal_a_direct_encoding(flux, converted, precomputed):
    out, stats = precomputed
    assert {t: (s.shards_written, s.samples) for t, s in stats.items()} == {
        "editing": (3, 5), "customized": (1, 2), "control": (1, 2), "grounding": (1, 2)}
    assert not any(s.skipped for s in stats.values())
    text = FluxTextEncoder.from_pretrained(flux, dtype=torch.float32, max_length=MAX_LEN)
    codec = VAECodec.from_pretrained(flux, dtype=torch.float32)
    builder = TaskBuilder(resolution=RES)
    for task in TASKS:
        before, after = F.read_samples(converted / task), F.read_samples(out / task)
        assert [s["__key__"] for s in before] == [s["__key__"] for s in after]
        for b, a in zip(before, after):
            # The original members are copied byte for byte; the record only gains its `precomputed` block.
            assert all(a[k] == b[k] for k in b if k not in ("json", "__shard__"))
            pre = a["json"].pop("precomputed")
            assert a["json"] == b["json"]
            assert pre["text"] == pre["latent"] == str(flux.resolve()) and pre["resolution"] == [RES, RES]
            assert pre["prompt"] == precompute.builder_prompt(b["json"]) and pre["max_length"] == MAX_LEN
            t5, clip = (precompute.load_npy(a[f"{n}.npy"]) for n in ("t5", "clip"))
            assert t5.dtype == np.float16 and t5.shape == (MAX_LEN, 32) and clip.shape == (32,)
            direct = text.encode([pre["prompt"]])
            np.testing.assert_allclose(t5, direct.tokens[0].numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(clip, direct.pooled[0].numpy(), atol=2e-3, rtol=2e-3)
            image = F.decode(next(v for k, v in b.items() if k.startswith("image.")))
            frame = builder.frame_for(image.shape[1], image.shape[0])
            _check_latent(codec, a["latent.npy"], warp(image, frame))
            if task in ("editing", "customized"):
                source = F.decode(next(v for k, v in b.items() if k.startswith("source.")))
                _check_latent(codec, a["source_latent.npy"], warp(source, frame))
            else:
                assert "source_latent.npy" not in a
    assert json.loads(json.dumps(pre))  # plain JSON


def _check_latent(codec, member: bytes, framed: np.ndarray) -> None:
    lat = precompute.load_npy(member)
    x = torch.from_numpy(framed).permute(2, 0, 1)[None].float() / 127.5 - 1
    direct = codec.encode(x)[0].numpy()
    assert lat.dtype == np.float16 and lat.shape == direct.shape == (16, RES // 2, RES // 2)
    np.testing.assert_allclose(lat, direct, atol=5e-3, rtol=5e-3)


def test_rerun_skips_written_shards(flux, converted, precomputed):
    out, _ = precomputed
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    stats = _precompute(flux, converted / "editing", out / "editing")
    assert stats.shards_written == 0 and stats.shards_skipped == 3
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}


class _Batches(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def test_precomputed_shards_train_one_step_without_text_encoders(flux, precomputed):
    out, _ = precomputed
    # The batch as the DataModule builds it, plus the cached arrays of the same samples.
    val, _, bad = F.read_through_datamodule(out / "editing", "editing", 4, resolution=RES)
    assert bad["total"] == 0
    stored = {s["__key__"]: s for s in F.read_samples(out / "editing")}
    assert all(p == stored[k]["json"]["precomputed"]["prompt"] for k, p in zip(val["key"], val["prompt"]))
    stacked = precompute.stack_precomputed([stored[k] for k in val["key"]])
    assert set(stacked) == {"text_tokens", "text_pooled", "target_latent", "source_latent"}
    assert all(torch.equal(val[k], v) for k, v in stacked.items())  # the DataModule puts them in its batches
    batch = dict(val) | stacked
    assert batch["text_tokens"].shape == (4, MAX_LEN, 32) and batch["target_latent"].shape == (4, 16, RES // 2, RES // 2)
    batch.pop("meta")

    module = CoLoGenModule(preset=FluxDevPreset(str(flux), dtype="float32", text_max_length=MAX_LEN),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8), load_text_encoder=False)
    assert module.text_encoder is None
    # Encoding a batch's images would need the codec; with cached latents it must not be called.
    module.codec.encode = None
    before = [p.detach().clone() for p in module.model.expert_parameters(0)]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=_Batches([batch]))
    assert any(not torch.equal(a, p) for a, p in zip(before, module.model.expert_parameters(0)))
