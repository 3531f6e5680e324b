"""Benchmark metrics end to end on tiny random models saved to a temporary folder and loaded back
through the same code path a real evaluation uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from cologen.metrics.fid import frechet_distance, load_fid_features
from cologen.metrics.models import (
    MissingModelPath,
    load_clip,
    load_depth_model,
    load_dino,
    load_map_detector,
    load_segmenter,
)
from cologen.metrics.similarity import (
    clip_direction_score,
    clip_image_score,
    clip_score_100,
    clip_text_score,
    dino_score,
)
from cologen.testing.metric_models import save_tiny_segmenter


@pytest.fixture(scope="module")
def models(metric_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    seg = save_tiny_segmenter(tmp_path_factory.mktemp("seg") / "seg", num_labels=5)
    return {**metric_models, "seg": seg, "lineart": metric_models["map_detector"]}


def images(n: int, seed: int, size: tuple[int, int] = (40, 48), offset: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.integers(0, 200, (*size, 3)) + offset, 0, 255).astype(np.uint8) for _ in range(n)]


def test_clip_t_matches_the_models_own_logits(models: dict[str, Path]) -> None:
    clip = load_clip(models["clip"], device="cpu")
    ims = images(3, 0)
    texts = ["a red square", "two blue circles", "a green triangle on grey"]
    scores = clip_text_score(ims, texts, clip, batch_size=2)
    # Independent path: CLIPModel.forward's logits are exp(logit_scale) * cosine.
    inputs = clip.processor(text=texts, images=ims, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    expected = out.logits_per_image.diagonal() / clip.model.logit_scale.exp()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert clip_score_100(torch.tensor([0.3, -0.1])).tolist() == pytest.approx([30.0, 0.0])


def test_clip_i_dino_and_direction(models: dict[str, Path]) -> None:
    clip = load_clip(models["clip"], device="cpu")
    dino = load_dino(models["dino"], device="cpu")
    a, b = images(4, 1), images(4, 2, offset=50)
    torch.testing.assert_close(clip_image_score(a, a, clip), torch.ones(4))
    torch.testing.assert_close(dino_score(a, a, dino), torch.ones(4))
    d = dino_score(a, b, dino)
    assert d.shape == (4,) and (d < 1 - 1e-4).all()
    torch.testing.assert_close(d, dino_score(b, a, dino))
    # Loading by path gives the same numbers as the loaded encoder.
    torch.testing.assert_close(dino_score(a, b, models["dino"]), d)

    caps_src, caps_tgt = ["a red square"] * 4, ["a blue square"] * 4
    direction = clip_direction_score(a, b, caps_src, caps_tgt, clip)
    img_delta = clip.image_features(b) - clip.image_features(a)
    txt_delta = clip.text_features(caps_tgt) - clip.text_features(caps_src)
    torch.testing.assert_close(direction, torch.nn.functional.cosine_similarity(img_delta, txt_delta, dim=-1))
    with pytest.raises(ValueError, match="pairs"):
        clip_image_score(a, b[:2], clip)


def test_missing_model_paths_say_what_to_supply(tmp_path: Path) -> None:
    with pytest.raises(MissingModelPath, match=r"^clip_path is not set: .*CLIPModel.*save_pretrained"):
        clip_text_score(images(1, 0), ["x"], None)
    with pytest.raises(MissingModelPath, match=r"^dino_path is not set: .*dino-vits16"):
        dino_score(images(1, 0), images(1, 1), None)
    with pytest.raises(MissingModelPath, match="does not exist"):
        load_clip(tmp_path / "nowhere")
    with pytest.raises(MissingModelPath, match="^depth_path is not set"):
        load_depth_model(None)
    with pytest.raises(MissingModelPath, match="^segmenter_path is not set"):
        load_segmenter("")
    with pytest.raises(MissingModelPath, match="^lineart_path is not set"):
        load_map_detector(None, "lineart_path")
    with pytest.raises(MissingModelPath, match="^fid_path is not set"):
        frechet_distance(images(2, 0), images(2, 1), None)


def reference_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance of two feature sets, from the definition (scipy's matrix square root)."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class MeanColour(nn.Module):
    """A feature extractor passed in as a module: per-channel mean and std of a uint8 batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_with_a_module_passed_in_matches_the_definition() -> None:
    real, fake = images(12, 3), images(12, 4, offset=40)
    value = frechet_distance(real, fake, MeanColour(), batch_size=5, device="cpu")
    feats = [
        MeanColour()(torch.from_numpy(np.stack(s)).permute(0, 3, 1, 2)).double().numpy() for s in (real, fake)
    ]
    assert value == pytest.approx(reference_fid(*feats), rel=1e-3, abs=1e-6)
    assert abs(frechet_distance(real, real, MeanColour(), device="cpu")) < 1e-6
    assert value > 0.01


@pytest.mark.parametrize("kind", ["inception", "dino", "clip"])
def test_fid_from_a_local_path(models: dict[str, Path], kind: str) -> None:
    real, fake = images(6, 5), images(6, 6, size=(33, 35), offset=60)
    same = frechet_distance(real, real, models[kind], device="cpu")
    different = frechet_distance(real, fake, models[kind], device="cpu")
    assert abs(same) < 1e-4 and different > same


def test_torchscript_inception_gets_its_pool_features(models: dict[str, Path]) -> None:
    net = load_fid_features(models["inception"], device="cpu")
    batch = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    assert net(batch).shape == (3, 8)  # return_features=True: the pool features, not the logits


def test_depth_segmenter_and_line_detector_run_at_image_size(models: dict[str, Path]) -> None:
    ims = images(3, 7)
    depth = load_depth_model(models["depth"], device="cpu")(ims, batch_size=2)
    assert [d.shape for d in depth] == [(40, 48)] * 3
    assert all(d.min() >= 0 and d.max() <= 255 for d in depth)
    seg = load_segmenter(models["seg"], device="cpu")
    labels = seg(ims)
    assert seg.num_classes == 5 and [m.shape for m in labels] == [(40, 48)] * 3
    assert all(m.min() >= 0 and m.max() < 5 for m in labels)
    lines = load_map_detector(models["lineart"], "lineart_path", device="cpu")(ims)
    assert [m.shape for m in lines] == [(40, 48)] * 3 and lines[0].dtype == np.uint8
