"""`cologen eval denoising` (cologen.eval.denoising): the x0 error split into changed and kept tokens, and token
gates forced to a given mask. Forced shut everywhere the experts add nothing (the base's output exactly); forced
open where the model's own gates are open, nothing changes; forcing one stream leaves the other's deltas."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cologen.eval.denoising import denoising_errors, forced_token_gates

PRW = dict(num_experts=2, rank=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out"),
           noisy_targets=("to_q", "to_k", "to_v", "to_out"), token_gate=True, hard_gate=True, noisy_gate=True)


def tiny_module():
    from cologen.model.config import PRWConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig

    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                           prw=PRWConfig(**PRW), veteran=VeteranConfig(gate_weight=0.1))
    return module.eval()


def batch(b=3):
    g = torch.Generator().manual_seed(0)
    source = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    target = source.clone()
    target[:, :, 4:12, 4:20] = 1.0  # an overlay: these tokens change, the rest is the source's
    return {"target": target, "source": source, "has_source": torch.ones(b, dtype=torch.bool),
            "prompt": ["draw a box"] * b, "task": ["grounding"] * b}


def expert_ups(module):
    return [p for n, p in module.model.named_parameters() if "lora_B" in n]


def outputs(module, inputs):
    with torch.no_grad():
        return module(inputs).sample


@pytest.fixture(scope="module")
def trained():
    """A module whose experts act (up-projections away from zero) and its inputs at t = 0.7."""
    module = tiny_module()
    with torch.no_grad():
        for p in expert_ups(module):
            p.normal_(0, 0.2)
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    inputs = dict(inputs, timestep=torch.full_like(inputs["timestep"], 0.7))
    return module, inputs


def test_gates_forced_shut_on_both_streams_give_the_base_exactly(trained):
    module, inputs = trained
    acting = outputs(module, inputs)
    shut = torch.zeros_like(inputs["changed"])
    with forced_token_gates(module.model, shut, ("source", "noisy")):
        forced = outputs(module, inputs)
    saved = [p.detach().clone() for p in expert_ups(module)]
    with torch.no_grad():
        for p in expert_ups(module):
            p.zero_()
    base = outputs(module, inputs)
    with torch.no_grad():
        for p, s in zip(expert_ups(module), saved):
            p.copy_(s)
    assert not torch.allclose(acting, base, atol=1e-4)  # the experts do act
    torch.testing.assert_close(forced, base, atol=1e-6, rtol=0)


def test_gates_forced_open_equal_the_models_own_open_gates_and_the_forcing_ends_with_the_block(trained):
    module, inputs = trained  # zero gate weights: every hard gate open
    own = outputs(module, inputs)
    with forced_token_gates(module.model, torch.ones_like(inputs["changed"]), ("source", "noisy")):
        forced = outputs(module, inputs)
    torch.testing.assert_close(forced, own, atol=1e-6, rtol=0)
    with forced_token_gates(module.model, torch.zeros_like(inputs["changed"]), ("source",)):
        pass
    torch.testing.assert_close(outputs(module, inputs), own, atol=0, rtol=0)


def test_forcing_one_stream_keeps_the_other_streams_deltas(trained):
    module, inputs = trained
    shut = torch.zeros_like(inputs["changed"])
    results = {}
    for streams in (("source",), ("noisy",), ("source", "noisy")):
        with forced_token_gates(module.model, shut, streams):
            results[streams] = outputs(module, inputs)
    own = outputs(module, inputs)
    for streams in (("source",), ("noisy",)):
        assert not torch.allclose(results[streams], own, atol=1e-5)
        assert not torch.allclose(results[streams], results[("source", "noisy")], atol=1e-5)
    with pytest.raises(ValueError, match="unknown streams"):
        with forced_token_gates(module.model, shut, ("text",)):
            pass


def test_errors_split_by_the_changed_tokens_and_vanish_at_t0_for_any_model(trained):
    module, _ = trained
    rows = denoising_errors(module, [batch()], timesteps=(0.0, 0.5))
    assert [r["t"] for r in rows] == [0.0, 0.5]
    assert len(rows[0]["changed"]) == len(rows[0]["kept"]) == 3  # every sample has both kinds of token
    assert max(rows[0]["changed"] + rows[0]["kept"]) < 1e-10  # x_0 is the target itself
    assert min(rows[1]["kept"]) > 0
    # forced shut on both streams: the kept tokens' error is the base's, whatever the experts learned
    forced = denoising_errors(module, [batch()], timesteps=(0.5,), gates=("source", "noisy"))
    assert forced[0]["kept"] != rows[1]["kept"]


def test_the_input_reference_is_what_a_model_that_leaves_x_t_as_it_is_scores(trained, monkeypatch):
    module, _ = trained
    rows = denoising_errors(module, [batch()], timesteps=(0.5, 1.0))
    # x_t - x0 = t (n - x0): its error grows as t^2, the same noise at every t
    for name in ("changed_input", "kept_input"):
        assert rows[0][name] == pytest.approx([0.25 * e for e in rows[1][name]], rel=1e-5)
    assert rows[0]["changed"] != rows[0]["changed_input"]  # the trained model denoises
    # a model predicting zero velocity hands x_t back as its clean estimate: it scores the reference exactly
    monkeypatch.setattr(module, "forward", lambda inputs: SimpleNamespace(sample=torch.zeros_like(inputs["latents"])))
    still = denoising_errors(module, [batch()], timesteps=(0.5,))
    for name in ("changed", "kept"):
        assert still[0][name] == pytest.approx(still[0][name + "_input"], rel=1e-6)


def test_the_command_writes_its_table_and_the_base_is_unchanged_by_forced_gates(shapeworld_dir, tmp_path, capsys):
    from cologen.commands.evaluate import main

    main(["denoising", "--base", "--data", str(shapeworld_dir), "--probes", "4", "--timesteps", "0.3", "0.9",
          "--oracle-gates", "both", "--out", str(tmp_path)])
    table = (tmp_path / "denoising.md").read_text()
    assert "| grounding, gates learned | 0.30 |" in table and "| grounding, gates forced on both | 0.90 |" in table
    data = json.loads((tmp_path / "denoising.json").read_text())
    learned, forced = data["grounding, gates learned"], data["grounding, gates forced on both"]
    assert [r["t"] for r in learned] == [0.3, 0.9]
    assert all(r["kept"]["n"] == 4 for r in learned)
    # the base's experts are zero: forcing their gates changes nothing
    assert [r["kept"]["mean"] for r in forced] == pytest.approx([r["kept"]["mean"] for r in learned], abs=1e-9)
    # its copy is better than its drawing at every noise level
    assert all(r["kept"]["mean"] < r["changed"]["mean"] for r in learned)
    # and every row carries x_t's own error beside the model's
    assert all(r["changed_input"]["n"] == r["changed"]["n"] for r in learned)
    assert "| x_t's on them |" in table
    assert "gates forced on both" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ cologen eval gates
def test_gate_accuracy_counts_what_the_hard_gates_open_against_the_changed_tokens(trained):
    from cologen.eval.gate_accuracy import UNION, accuracy, gate_counts

    module, _ = trained
    banks = [m.attn.prw_experts for m in module.model.transformer.transformer_blocks] + \
        [m.attn.prw_experts for m in module.model.transformer.single_transformer_blocks]
    biases = [e.token_gate.bias for bank in banks for e in bank.experts]
    saved = [b.detach().clone() for b in biases]
    try:
        for shift, recall in ((1e4, 1.0), (-1e4, 0.0)):  # every gate open / every gate shut
            with torch.no_grad():
                for b in biases:
                    b.fill_(shift)
            counts = gate_counts(module, [batch()])
            assert UNION in counts and len(counts) == 1 + 2  # the union, then each of the 2 blocks
            changed = counts[UNION]["changed"]
            assert changed == 3 * (8 // 4) * (16 // 4)  # the overlay's 4 x 4-pixel tokens in each of 3 samples
            for c in counts.values():
                a = accuracy(c)
                assert c["changed"] == changed and a["recall"] == recall
                if recall:
                    assert c["open"] == 3 * (32 // 4) ** 2 and a["precision"] == pytest.approx(changed / c["open"])
                else:
                    assert c["open"] == 0
    finally:
        with torch.no_grad():
            for b, s in zip(biases, saved):
                b.copy_(s)


def test_the_gates_command_writes_its_table(shapeworld_dir, tmp_path, capsys, monkeypatch):
    from cologen.commands import evaluate

    ckpt = tmp_path / "gated.ckpt"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(evaluate.checkpoints, "check", lambda path: None)  # the module below stands in for it
    monkeypatch.setattr(evaluate, "load_module",
                        lambda path, base="builtin": tiny_module() if path == str(ckpt) else None)
    evaluate.main(["gates", "--ckpt", str(ckpt), "--data", str(shapeworld_dir), "--probes", "4", "--tasks",
                   "inpainting", "grounding", "--out", str(tmp_path)])
    table = (tmp_path / "gates.md").read_text()
    assert "| inpainting | any block |" in table and "| grounding | any block |" in table
    data = json.loads((tmp_path / "gates.json").read_text())
    for task in ("inpainting", "grounding"):
        union = data[task]["any block"]
        assert union["changed"] > 0 and 0.0 <= union["recall"] <= 1.0
        assert union["open_changed"] <= min(union["open"], union["changed"])
    assert "any block" in capsys.readouterr().out


def test_the_gates_command_refuses_a_model_without_token_gates_in_one_line(shapeworld_dir, tmp_path, capsys,
                                                                          monkeypatch):
    from cologen.commands import evaluate
    from cologen.module import CoLoGenModule

    ckpt = tmp_path / "ungated.ckpt"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(evaluate.checkpoints, "check", lambda path: None)
    # the tiny base: no token gates
    monkeypatch.setattr(evaluate, "load_module", lambda path, base="builtin": CoLoGenModule())
    with pytest.raises(SystemExit):
        evaluate.main(["gates", "--ckpt", str(ckpt), "--data", str(shapeworld_dir), "--probes", "2", "--tasks",
                       "grounding"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "cologen eval: this model's experts have no token gates on the target's grid (prw.token_gate)"
