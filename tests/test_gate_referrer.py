"""`prw.gate_referrer`: one pretrained, frozen map of where a prompt will change its condition, which every prompt
gate reads through a 3 x 3 convolution of its own that starts at zero."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cologen.commands.pretrain_gate_referrer import grid_place, pretrain
from cologen.data.builders import BuilderConfig
from cologen.model.experts import ExpertBank, GateContext
from cologen.model.gate_encoder import BUILTIN_GATE_ENCODER
from cologen.model.gate_referrer import (
    BUILTIN_GATE_REFERRER,
    GateReferrer,
    load_gate_referrer,
    save_gate_referrer,
)
from cologen.model.presets import file_sha256
from tests.test_prompt_gates import prompt_gate_module

ENCODER_SHA = file_sha256(BUILTIN_GATE_ENCODER / "model.safetensors")


@pytest.fixture(scope="module")
def pretrained(shapeworld_dir, tmp_path_factory):
    builder = BuilderConfig(box_thickness=2, overlay_kinds={"box": 1.0, "mask": 1.0, "class_boxes": 0.0})
    referrer, record = pretrain({"grounding": [str(shapeworld_dir / "grounding")]}, scenes=120, builds=2,
                                held_out=20, steps=300, batch_size=32, width=16, builder=builder, log_every=100)
    folder = tmp_path_factory.mktemp("gate_referrer")
    save_gate_referrer(referrer, folder, record)
    return referrer, record, folder


def test_pretraining_finds_the_changed_tokens_and_writes_a_loadable_frozen_referrer(pretrained):
    referrer, record, folder = pretrained
    # an overlay changes about a tenth of a scene's tokens: opening them all would score that precision
    held = record["held_out"]["grounding"]
    assert held["recall"] > 0.6 and held["precision"] > 0.3, held
    assert record["gate_encoder_sha256"] == ENCODER_SHA and record["tasks"] == ["grounding"]
    loaded = load_gate_referrer(str(folder), 32, 384, ENCODER_SHA)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    for (name, a), b in zip(referrer.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    config = json.loads((folder / "config.json").read_text())
    assert (config["feature_dim"], config["prompt_dim"], config["width"], config["convs"]) == (32, 384, 16, 2)


def test_a_wrong_missing_or_corrupt_folder_is_one_clear_error(pretrained, tmp_path):
    _, _, folder = pretrained
    with pytest.raises(FileNotFoundError, match="make gate-referrer"):
        load_gate_referrer(str(tmp_path / "nowhere"), 32, 384, ENCODER_SHA)
    with pytest.raises(ValueError, match="prompt_dim 384, this model gives 768"):
        load_gate_referrer(str(folder), 32, 768, ENCODER_SHA)
    with pytest.raises(ValueError, match="another gate encoder"):
        load_gate_referrer(str(folder), 32, 384, "f" * 64)
    save_gate_referrer(GateReferrer(32, 384, 14, width=8), tmp_path)
    (tmp_path / "sha256").write_text("0" * 64 + "\n")
    with pytest.raises(ValueError, match="sha256"):
        load_gate_referrer(str(tmp_path), 32, 384, None)


def test_neighbouring_tokens_shape_a_tokens_map_and_far_ones_do_not():
    torch.manual_seed(0)
    referrer = GateReferrer(4, 6, 14, width=8, convs=2)
    features, prompt, place = torch.randn(1, 64, 4), torch.randn(1, 6), grid_place(64)
    before = referrer(features, prompt, place)
    moved = features.clone()
    moved[0, 0] += 1.0  # the top-left token: two 3 x 3 convolutions reach two tokens away, no farther
    changed = (referrer(moved, prompt, place) - before).abs()[0].reshape(8, 8) > 0
    assert changed[:3, :3].all() and not changed[3:].any() and not changed[:, 3:].any()
    with pytest.raises(ValueError, match="square"):
        referrer(torch.randn(1, 12, 4), prompt, place[:12])


def test_config_needs_the_gate_encoder():
    from cologen.model.config import PRWConfig

    with pytest.raises(ValueError, match="gate_referrer reads the shared gate encoder"):
        PRWConfig(token_gate=True, gate_prompt=True, gate_image=True, gate_referrer="builtin")


def test_each_sample_reads_the_map_through_its_own_experts_convolution():
    torch.manual_seed(0)
    bank = ExpertBank(8, 3, 2, 2.0, token_gate=True, hard_gate=True, prompt_dim=6, referred=True)
    hidden, index = torch.randn(3, 16, 8), torch.tensor([2, 0, 1])
    context = GateContext(torch.randn(3, 6), grid_place(16), referred=torch.randn(3, 16))
    with torch.no_grad():
        plain = bank.gate_logits(hidden, index, context)
        for expert in bank.experts:
            expert.prompt_gate.referred.weight.normal_()
            expert.prompt_gate.referred.bias.normal_()
        read = bank.gate_logits(hidden, index, context)
    for b, e in enumerate(index.tolist()):
        conv = bank.experts[e].prompt_gate.referred
        want = F.conv2d(context.referred[b].reshape(1, 1, 4, 4), conv.weight, conv.bias, padding=1).reshape(16)
        torch.testing.assert_close(read[b] - plain[b], want)
    with pytest.raises(ValueError, match="referrer's map"):
        bank.gate_logits(hidden, index, GateContext(context.prompt, context.place))


class NoiseMap(torch.nn.Module):
    def forward(self, features, prompt, place):
        return torch.randn(features.shape[:2]) * 10


def test_the_map_starts_unread_and_learns_while_the_referrer_stays_frozen_and_out_of_checkpoints():
    from tests.test_eval_denoising import batch

    module = prompt_gate_module(gate_image=True, gate_image_encoder="builtin", gate_referrer="builtin").train()
    model = module.model
    gates = [e.prompt_gate for attn in model.prw_modules() for e in attn.prw_experts.experts]
    assert gates and all(not g.referred.weight.any() and not g.referred.bias.any() for g in gates)
    data = batch()
    inputs = module.prepare(data, False, torch.Generator().manual_seed(0))
    args = (inputs["source_tokens"], inputs["source_ids"], inputs["text"].pooled, inputs["timestep"])
    for g in gates:
        g.is_live()
    with torch.no_grad():
        context = model._gate_context(*args[:3], None)
        referrer = load_gate_referrer("builtin", 32, 384, ENCODER_SHA)
        want = referrer(model._gate_image(args[0]), args[2].float(), context.place)
        torch.testing.assert_close(context.referred, want)
        # zero kernels: the gates do not depend on the map (any other map gives the same gates)
        read = model.encode_source(*args).gates
        saved = model.gate_referrer
        model.gate_referrer = NoiseMap()
        other = model.encode_source(*args).gates
        model.gate_referrer = saved
    assert read.keys() == other.keys()
    for name in read:
        torch.testing.assert_close(read[name], other[name])
    frozen = {k: v.clone() for k, v in model.gate_referrer.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], 1e-2)
    for _ in range(3):
        losses = module.compute_losses(batch(), train=True)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert any(g.referred.weight.any() for g in gates)
    with torch.no_grad():  # now the gates read it
        read = model.encode_source(*args).gates
        model.gate_referrer = NoiseMap()
        other = model.encode_source(*args).gates
        model.gate_referrer = saved
    assert any(not torch.equal(read[name], other[name]) for name in read)
    for k, v in model.gate_referrer.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert {k for k in module.state_dict() if ".gate_referrer." in k} <= module.frozen_state_keys()
    assert not any(".gate_referrer." in k for k in module.adapter_state_keys())


def test_the_builtin_referrer_was_trained_on_the_builtin_encoder_and_finds_most_changed_tokens():
    config = json.loads((BUILTIN_GATE_REFERRER / "config.json").read_text())
    assert config["gate_encoder_sha256"] == ENCODER_SHA
    held = config["held_out"]["grounding"]
    assert held["recall"] > 0.9 and held["precision"] > 0.7, held
    assert load_gate_referrer("builtin", 32, 384, ENCODER_SHA).out.in_features == config["width"]
