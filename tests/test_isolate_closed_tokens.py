"""`prw.isolate_closed_tokens`. 'source': the source tokens a hard gate closes keep the base's hidden states and
keys/values in every block, so the open tokens' deltas cannot reach them through the source stream's self-attention
(without it they do, from the second block on: the leak the option closes). 'output': the noisy tokens no gate opens
also take the base's velocity; with `prw.open_rule` 'majority' (or 'all') those fewer blocks open do too."""

from __future__ import annotations

import pytest
import torch

from cologen.eval.denoising import forced_token_gates
from tests.test_eval_denoising import PRW, batch, expert_ups, outputs


def module_with(isolate: str, open_gates: bool = False, open_rule: str = "any"):
    from cologen.model.config import PRWConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig

    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=2),
                           prw=PRWConfig(**PRW, isolate_closed_tokens=isolate, open_rule=open_rule),
                           veteran=VeteranConfig(gate_weight=0.1))
    with torch.no_grad():
        for p in expert_ups(module):
            p.normal_(0, 0.2)  # experts that act
        if not open_gates:  # gates that close some tokens and open others in every block
            for name, p in module.model.named_parameters():
                if "token_gate" in name:
                    p.normal_(0, 1.0) if name.endswith("weight") else p.zero_()
    return module.eval()


def source_state(module, zero_deltas: bool = False):
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    args = (inputs["source_tokens"], inputs["source_ids"], inputs["text"].pooled, inputs["timestep"])
    with torch.no_grad():
        if not zero_deltas:
            return module.model.encode_source(*args)
        shut = torch.zeros(inputs["source_tokens"].shape[:2])
        with forced_token_gates(module.model, shut, ["source"]):  # the base's source stream
            return module.model.encode_source(*args)


def closed_and_open(state, name):
    closed = state.gates[name] < 0  # (B, N): a hard gate is open where its logit is >= 0
    assert closed.any() and (~closed).any(), "the test needs both kinds of tokens"
    return closed, ~closed


def test_closed_source_tokens_keep_the_base_keys_and_values_in_every_block():
    module = module_with(isolate="source")
    base, isolated = source_state(module, zero_deltas=True), source_state(module)
    for name, (key, value) in isolated.kv.items():
        closed, open_ = closed_and_open(isolated, name)
        torch.testing.assert_close(key[closed], base.kv[name][0][closed], rtol=0, atol=1e-6)
        torch.testing.assert_close(value[closed], base.kv[name][1][closed], rtol=0, atol=1e-6)
        assert (key[open_] - base.kv[name][0][open_]).abs().max() > 1e-3  # the expert acts on the open ones


def test_without_isolation_the_open_tokens_deltas_reach_the_closed_ones_from_the_second_block_on():
    module = module_with(isolate="none")
    base, leaky = source_state(module, zero_deltas=True), source_state(module)
    names = list(leaky.kv)
    first, later = names[0], names[1:]
    closed, _ = closed_and_open(leaky, first)
    # before any attention a closed token's projections are the base's ...
    torch.testing.assert_close(leaky.kv[first][0][closed], base.kv[first][0][closed], rtol=0, atol=1e-6)
    # ... after one, what the open tokens' deltas changed reaches it
    for name in later:
        closed, _ = closed_and_open(leaky, name)
        assert (leaky.kv[name][0][closed] - base.kv[name][0][closed]).abs().max() > 1e-3


def test_with_every_gate_open_isolation_changes_nothing():
    off = module_with("none", open_gates=True)
    inputs = off.prepare(batch(), False, torch.Generator().manual_seed(0))
    for mode in ("source", "output"):
        on = module_with(mode, open_gates=True)
        for name, (key, value) in source_state(on).kv.items():
            torch.testing.assert_close(key, source_state(off).kv[name][0], rtol=0, atol=0)
            torch.testing.assert_close(value, source_state(off).kv[name][1], rtol=0, atol=0)
        torch.testing.assert_close(outputs(on, inputs), outputs(off, inputs), rtol=0, atol=0)


def learning(isolate: str) -> set[str]:
    """The active expert's parameters a training step gives a nonzero gradient."""
    module = module_with(isolate).train()
    module.compute_losses(batch(), True, torch.Generator().manual_seed(0))["loss"].backward()
    return {n for n, p in module.model.named_parameters()
            if "experts.0." in n and p.grad is not None and p.grad.abs().sum() > 0}


def test_the_experts_learn_with_isolation_as_without():
    # (the last block's source query and output deltas learn in neither: only its keys and values are read)
    without = learning("none")
    assert any("lora" in n for n in without)
    assert learning("source") == without and learning("output") == without


def test_noisy_tokens_no_gate_opens_take_the_base_velocity():
    module = module_with("output")
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    inputs = dict(inputs, timestep=torch.full_like(inputs["timestep"], 0.7))
    with torch.no_grad():
        out = module(inputs)
        with forced_token_gates(module.model, torch.zeros(inputs["latents"].shape[:2]), ["source", "noisy"]):
            base = module(inputs).sample  # every delta shut: the base
    opened = torch.stack([g >= 0 for g in out.token_gates.values()]).any(0)
    assert opened.any() and (~opened).any()
    torch.testing.assert_close(out.sample[~opened], base[~opened], rtol=0, atol=1e-6)
    assert (out.sample[opened] - base[opened]).abs().max() > 1e-3
    # with the source isolated only, the closed tokens' velocity is not the base's (the noisy stream's attention)
    module.model.prw.isolate_closed_tokens = "source"
    with torch.no_grad():
        assert (module(inputs).sample[~opened] - base[~opened]).abs().max() > 1e-4


def test_the_effect_mask_keeps_the_base_velocity_where_the_expert_barely_acts():
    """`effect_mask` (sampling): an open token whose expert effect is at most that share of its sample's largest
    takes the base's velocity too; the others keep the expert's; 0 changes nothing."""
    module = module_with("output")
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    args = [inputs[k] for k in ("latents", "timestep", "text", "img_ids", "txt_ids", "source_tokens", "source_ids",
                                "guidance")]
    args[1] = torch.full_like(args[1], 0.7)
    with torch.no_grad():
        out = module.model(*args)
        with forced_token_gates(module.model, torch.zeros(inputs["latents"].shape[:2]), ["source", "noisy"]):
            base = module.model(*args).sample
        masked = module.model(*args, effect_mask=0.5).sample
        off = module.model(*args, effect_mask=0.0).sample
    opened = torch.stack([g >= 0 for g in out.token_gates.values()]).any(0)
    effect = (out.sample - base).abs().mean(-1)
    small = effect <= 0.5 * effect.amax(1, keepdim=True)
    acting = opened & ~small
    assert acting.any() and (opened & small).any(), "the test needs open tokens on both sides of the threshold"
    torch.testing.assert_close(masked[~acting], base[~acting], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked[acting], out.sample[acting], rtol=0, atol=1e-6)
    assert torch.equal(off, out.sample)


def test_the_effect_mask_needs_output_isolation_and_a_share_below_one():
    from cologen.sampling.sampler import SamplerConfig

    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="effect_mask must be in"):
            SamplerConfig(effect_mask=bad)
    module = module_with("source")
    with pytest.raises(ValueError, match="effect_mask .* needs a model with prw.isolate_closed_tokens: output"):
        module.generate(["x"], torch.zeros(1, 3, 32, 32), tasks=["editing"], steps=2, effect_mask=0.2)
    out = module_with("output").generate(["x"], torch.zeros(1, 3, 32, 32), tasks=["editing"], steps=2,
                                         effect_mask=0.2)
    assert torch.isfinite(out[0]).all()


def test_isolation_needs_hard_gates():
    from cologen.model.config import PRWConfig

    with pytest.raises(ValueError, match="isolate_closed_tokens .* needs prw.hard_gate"):
        PRWConfig(token_gate=True, isolate_closed_tokens="source")
    with pytest.raises(ValueError, match="isolate_closed_tokens must be one of"):
        PRWConfig(token_gate=True, hard_gate=True, isolate_closed_tokens="yes")


def test_with_a_majority_rule_the_tokens_fewer_blocks_open_take_the_base_velocity_too():
    module = module_with("output", open_rule="majority")
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    inputs = dict(inputs, timestep=torch.full_like(inputs["timestep"], 0.7))
    with torch.no_grad():
        out = module(inputs)
        with forced_token_gates(module.model, torch.zeros(inputs["latents"].shape[:2]), ["source", "noisy"]):
            base = module(inputs).sample
    votes = torch.stack([g >= 0 for g in out.token_gates.values()]).sum(0)
    assert len(out.token_gates) == 3 and ((votes == 1).any() and (votes >= 2).any()), \
        "the test needs tokens one block opens and tokens two or more open"
    torch.testing.assert_close(out.sample[votes < 2], base[votes < 2], rtol=0, atol=1e-6)
    assert (out.sample[votes >= 2] - base[votes >= 2]).abs().amax(-1).min() > 1e-4  # each keeps the expert's
    assert torch.equal(module.model.opened_tokens(out.token_gates), votes >= 2)


def test_open_rule_all_needs_every_block_and_any_rule_but_any_needs_output_isolation():
    module = module_with("output", open_rule="all")
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    with torch.no_grad():
        gates = module(inputs).token_gates
    votes = torch.stack([g >= 0 for g in gates.values()]).sum(0)
    assert torch.equal(module.model.opened_tokens(gates), votes == 3)
    module.model.prw.open_rule = "any"
    assert torch.equal(module.model.opened_tokens(gates), votes >= 1)

    from cologen.model.config import PRWConfig

    with pytest.raises(ValueError, match="needs prw.isolate_closed_tokens: output"):
        PRWConfig(**PRW, isolate_closed_tokens="source", open_rule="majority")
    with pytest.raises(ValueError, match="open_rule"):
        PRWConfig(**PRW, isolate_closed_tokens="output", open_rule="most")


def test_the_gates_table_counts_the_tokens_the_vote_opens():
    from cologen.eval.gate_accuracy import UNION, gate_counts

    module = module_with("output", open_rule="majority")
    counts = gate_counts(module, [batch()])
    assert list(counts)[:2] == [UNION, "majority of blocks"]
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    with torch.no_grad():
        gates = module(inputs).token_gates
    votes = torch.stack([g >= 0 for g in gates.values()]).sum(0)
    assert counts["majority of blocks"]["open"] == int((votes >= 2).sum()) < counts[UNION]["open"]


def test_eval_samples_with_another_open_rule_and_refuses_a_model_it_does_not_apply_to_in_one_line():
    """`cologen eval shapeworld --open-rule`: the rule a model samples with, other than the one it trained with."""
    from cologen.commands import evaluate
    from cologen.errors import UsageError

    module = module_with("output")
    evaluate.set_open_rule(module, "majority")
    assert module.model.prw.open_rule == "majority"
    args = evaluate._parser().parse_args(["shapeworld", "--base", "--open-rule", "all"])
    assert args.open_rule == "all"
    with pytest.raises(UsageError, match="--open-rule majority: .*needs prw.isolate_closed_tokens: output"):
        evaluate.set_open_rule(module_with("source"), "majority")


def test_gates_forced_on_the_noisy_stream_decide_which_tokens_take_the_expert_velocity():
    """`forced_token_gates` with the noisy stream: the truth also opens the noisy tokens (a perfect localiser), so
    the tokens it leaves shut take the base's velocity exactly and the others the expert's; forced on the source
    stream alone, the gates that decide it stay the model's own."""
    module = module_with("output", open_rule="majority")
    inputs = module.prepare(batch(), False, torch.Generator().manual_seed(0))
    inputs = dict(inputs, timestep=torch.full_like(inputs["timestep"], 0.7))
    truth = torch.zeros(inputs["latents"].shape[:2], dtype=torch.bool)
    truth[:, ::3] = True
    with torch.no_grad():
        learned = module(inputs).token_gates
        with forced_token_gates(module.model, torch.zeros_like(truth), ["source", "noisy"]):
            base = module(inputs).sample
        with forced_token_gates(module.model, truth, ["source", "noisy"]):
            forced = module(inputs)
        with forced_token_gates(module.model, truth, ["source"]):
            source_only = module(inputs).token_gates
    assert torch.equal(module.model.opened_tokens(forced.token_gates), truth)
    torch.testing.assert_close(forced.sample[~truth], base[~truth], rtol=0, atol=1e-6)
    assert (forced.sample[truth] - base[truth]).abs().amax(-1).min() > 1e-4
    assert not torch.equal(module.model.opened_tokens(learned), truth)
    # the source stream's own gates, on its forced states: the first block's as learned (its input is the same)
    first = next(iter(learned))
    assert torch.equal(source_only[first], learned[first])
    assert not torch.equal(module.model.opened_tokens(source_only), truth)


def test_eval_samples_with_the_true_gates_and_scores_them_apart(shapeworld_dir):
    """`cologen eval shapeworld --true-gates`: each task's probes sampled again with the gates forced to the tokens
    each probe changes, rows `true_gates/...`; each chunk of the sampler gets its own probes' truth."""
    from cologen.commands import evaluate
    from cologen.errors import UsageError

    module = module_with("output", open_rule="majority")
    probes = evaluate.load_probes(str(shapeworld_dir), ["grounding"], 5)
    lines = evaluate.evaluate(module, probes, steps=2, true_gates=True)
    gated = [x for x in lines if x["routing"] == "true_gates"]
    learned = [x for x in lines if x["routing"] == "learned"]
    assert [x["index"] for x in gated] == [x["index"] for x in learned] == list(range(5))
    assert any(x["grounding/psnr_out"] != y["grounding/psnr_out"] for x, y in zip(gated, learned))
    # two sampler calls (chunks of 2, 2 and 1 probes), each forced to its own probes' truth: the same outputs
    from cologen.eval.probes import run_probes_with_true_gates

    whole = run_probes_with_true_gates(module, "grounding", probes["grounding"], steps=2)
    chunked = run_probes_with_true_gates(module, "grounding", probes["grounding"], steps=2, batch_size=2)
    for a, b in zip(whole.outputs, chunked.outputs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert "true_gates/grounding/psnr_out" in evaluate.summarize(lines)
    args = evaluate._parser().parse_args(["shapeworld", "--base", "--true-gates", "--cfg-scale", "3"])
    with pytest.raises(UsageError, match="--true-gates .* guidance doubles the batch"):
        evaluate.run_shapeworld(args)
    args = evaluate._parser().parse_args(["shapeworld", "--base", "--true-gates", "--other-sources"])
    with pytest.raises(UsageError, match="does not combine with --other-sources"):
        evaluate.run_shapeworld(args)
    # --skip-learned (make report's): the true gates' rows alone, the same as beside the learned ones
    alone = evaluate.evaluate(module, probes, steps=2, true_gates=True, learned=False)
    assert [x["routing"] for x in alone] == ["true_gates"] * 5
    assert [x["grounding/psnr_out"] for x in alone] == pytest.approx([x["grounding/psnr_out"] for x in gated])
    for argv, match in ((["--skip-learned"], "give --true-gates too"),
                        (["--true-gates", "--skip-learned", "--oracle"], "which --oracle and --routing-terms need")):
        with pytest.raises(UsageError, match=match):
            evaluate.run_shapeworld(evaluate._parser().parse_args(["shapeworld", "--base", *argv]))
