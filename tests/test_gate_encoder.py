"""`prw.gate_image_encoder`: one pretrained, frozen encoder whose features every image-reading prompt gate shares,
pretrained on ShapeWorld's annotations to tell each token's object class, size and colour."""

from __future__ import annotations

import json

import pytest
import torch

from cologen.commands.pretrain_gate_encoder import ATTRIBUTES, pretrain, token_labels
from cologen.model.experts import ConditionImageEncoder
from cologen.model.gate_encoder import BUILTIN_GATE_ENCODER, load_gate_encoder, save_gate_encoder
from tests.test_prompt_gates import prompt_gate_module


def square(x0: float, y0: float, side: float) -> list[float]:
    return [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]


def test_a_token_takes_the_labels_of_the_object_covering_half_of_it():
    vocab = {a: {"background": 0} for a in ATTRIBUTES}
    objects = [{"polygon": [square(0, 0, 8)], "class": "square", "size": "large", "color": "red"},
               {"polygon": [square(12, 0, 2)], "class": "circle", "size": "small", "color": "blue"}]
    labels = token_labels(objects, 16, 4, vocab).reshape(4, 4, 3)
    red_square = [vocab[a][v] for a, v in zip(ATTRIBUTES, ("square", "large", "red"))]
    assert (labels[:2, :2] == red_square).all()  # the 8 x 8 square covers four tokens whole
    assert (labels[0, 3] == 0).all()  # the 2 x 2 object covers a quarter of its token: background
    assert (labels[2:] == 0).all() and (labels[:2, 2] == 0).all()
    assert vocab["class"] == {"background": 0, "square": 1}  # only labelled objects enter the vocabulary


@pytest.fixture(scope="module")
def pretrained(shapeworld_dir, tmp_path_factory):
    torch.manual_seed(0)
    encoder, record = pretrain([str(shapeworld_dir / "inpainting")], scene_limit=200, held_out=16, steps=300,
                               batch_size=32, log_every=100)
    folder = tmp_path_factory.mktemp("gate_encoder")
    save_gate_encoder(encoder, folder, record)
    return encoder, record, folder


def test_pretraining_learns_the_colour_under_a_token_and_writes_a_loadable_frozen_encoder(pretrained):
    encoder, record, folder = pretrained
    # ShapeWorld's colours are saturated and each object has one: 300 small steps tell them well above the majority
    assert record["held_out_accuracy"]["color"] > record["majority_label"]["color"] + 0.2
    assert all(not p.requires_grad for p in encoder.parameters())
    loaded = load_gate_encoder(str(folder), in_channels=48)
    assert all(not p.requires_grad for p in loaded.parameters())
    for (name, a), b in zip(encoder.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    config = json.loads((folder / "config.json").read_text())
    assert config["in_channels"] == 48 and config["width"] == 32 and "square" in config["vocab"]["class"]


def test_a_wrong_or_missing_or_corrupt_folder_is_one_clear_error(pretrained, tmp_path):
    _, _, folder = pretrained
    with pytest.raises(ValueError, match="reads 48 packed channels"):
        load_gate_encoder(str(folder), in_channels=12)
    with pytest.raises(FileNotFoundError, match="make gate-encoder"):
        load_gate_encoder(str(tmp_path / "nowhere"), in_channels=48)
    save_gate_encoder(ConditionImageEncoder(48, 8), tmp_path)
    (tmp_path / "sha256").write_text("0" * 64 + "\n")
    with pytest.raises(ValueError, match="sha256"):
        load_gate_encoder(str(tmp_path), in_channels=48)


def test_the_builtin_encoder_tells_class_and_size_better_than_the_majority_label():
    config = json.loads((BUILTIN_GATE_ENCODER / "config.json").read_text())
    for attribute in ATTRIBUTES:
        assert config["held_out_accuracy"][attribute] > config["majority_label"][attribute] + 0.2, attribute
    assert load_gate_encoder("builtin", in_channels=48).embed.out_features == config["width"]


def test_config_needs_image_gates():
    from cologen.model.config import PRWConfig

    with pytest.raises(ValueError, match="gate_image_encoder"):
        PRWConfig(token_gate=True, gate_prompt=True, gate_image_encoder="builtin")


def test_every_gate_reads_the_shared_features_which_stay_frozen_in_training_and_out_of_checkpoints():
    from tests.test_eval_denoising import batch

    module = prompt_gate_module(gate_image=True, gate_image_encoder="builtin").train()
    model = module.model
    gates = [e.prompt_gate for attn in model.prw_modules() for e in attn.prw_experts.experts]
    assert gates and not any(hasattr(g, "image_encoder") for g in gates)
    assert all(g.image_down.in_features == model.gate_image_encoder.embed.out_features for g in gates)
    frozen = {k: v.clone() for k, v in model.gate_image_encoder.state_dict().items()}
    # editing's prompt side live: the image term takes part and its weights learn
    for g in gates:
        g.is_live()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], 1e-2)
    before = gates[0].image_prompt.weight.clone()
    for _ in range(3):
        losses = module.compute_losses(batch(), train=True)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert not torch.equal(before, gates[0].image_prompt.weight)
    for k, v in model.gate_image_encoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None for p in model.gate_image_encoder.parameters())
    assert {k for k in module.state_dict() if ".gate_image_encoder." in k} <= module.frozen_state_keys()
    assert not any(".gate_image_encoder." in k for k in module.adapter_state_keys())


def test_the_shared_features_are_the_encoders_output_on_the_condition():
    from tests.test_eval_denoising import batch

    module = prompt_gate_module(gate_image=True, gate_image_encoder="builtin")
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    tokens = inputs["source_tokens"]
    torch.testing.assert_close(module.model._gate_image(tokens), load_gate_encoder("builtin", 48)(tokens))
