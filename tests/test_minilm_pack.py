"""Carrying MiniLM to a machine without its package (tools/minilm_pack.py) and loading it from a folder
(`TinyPreset(text_encoder=...)`): the rebuilt encoder encodes every prompt the ShapeWorld builders make as the
package's does, up to float16 rounding; a prompt's token that was not packed is refused by name."""

import io
import json
import tarfile

import pytest
import torch

from cologen.commands.evaluate import load_probes
from cologen.model.presets import TinyPreset
from cologen.model.text_encoders import MiniLMTextEncoder
from tools import minilm_pack

TASKS = ["inpainting", "grounding", "control", "customized", "editing"]


@pytest.fixture(scope="module")
def packed(shapeworld_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    info = minilm_pack.pack(root / "packed", [str(shapeworld_dir / "*" / "*.tar")])
    minilm_pack.unpack(root / "packed", root / "minilm", [str(shapeworld_dir / "*" / "val-*.tar")])
    return root, info


def test_the_pack_is_a_quarter_of_the_package_and_keeps_shapeworlds_tokens(packed):
    root, info = packed
    assert info["bytes"] < 25e6  # the package's weights are 88 MB in float32
    assert 100 < info["kept_tokens"] < 1000 < info["vocab"]


def test_the_rebuilt_encoder_encodes_every_builders_prompt_as_the_package_does(packed, shapeworld_dir):
    root, _ = packed
    probes = load_probes(str(shapeworld_dir), TASKS, 24)
    prompts = [p["prompt"] for task in TASKS for p in probes[task]]
    assert any("cyan" in p or "magenta" in p or "white" in p for p in prompts)  # grounding's overlay colours
    ours = TinyPreset(base=None, text_encoder=str(root / "minilm")).build().text_encoder.encode(prompts)
    theirs = MiniLMTextEncoder(cache_size=0).encode(prompts)
    relative = (ours.tokens - theirs.tokens).norm(dim=-1) / theirs.tokens.norm(dim=-1).clamp(min=1e-6)
    assert relative.max() < 1e-2  # float16 weights: 0.2% measured
    assert torch.nn.functional.cosine_similarity(ours.pooled, theirs.pooled).min() > 0.9999


def test_a_token_that_was_not_packed_is_refused_by_name(packed, tmp_path):
    root, _ = packed
    shard = tmp_path / "extra.tar"
    record = json.dumps({"caption": "a large zebra on a plain grey background"}).encode()
    with tarfile.open(shard, "w") as tar:
        member = tarfile.TarInfo("x.json")
        member.size = len(record)
        tar.addfile(member, io.BytesIO(record))
    with pytest.raises(ValueError, match="zebra"):
        minilm_pack.unpack(root / "packed", tmp_path / "out", [str(shard)])
    assert minilm_pack.main(["unpack", str(root / "packed"), str(tmp_path / "out"), "--shards", str(shard)]) == 2


def test_the_encoders_folder_is_a_place_not_a_setting_checkpoints_keep(packed, tmp_path):
    root, _ = packed
    assert "text_encoder" not in TinyPreset(text_encoder=str(root / "minilm")).to_dict()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TinyPreset(base=None, text_encoder=str(tmp_path / "missing")).build()
