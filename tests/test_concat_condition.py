"""`prw.concat_condition`: each expert maps an aligned condition's latent token to the noisy token at the same place
(channel concatenation, split per expert). Zero at init; only samples whose condition lies on the target's token grid
get it; the routed expert's map applies, gated like the noisy stream; frozen with its expert; trained, sampled and
exported like the other adapters."""

from __future__ import annotations

import pytest
import torch

from tests.test_eval_denoising import PRW


def module_with(concat: bool = True, seed: int = 0, **prw):
    from cologen.model.config import PRWConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig

    torch.manual_seed(seed)
    return CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                         prw=PRWConfig(**{**PRW, **prw}, concat_condition=concat),
                         veteran=VeteranConfig(gate_weight=0.1)).eval()


def batch(tasks=("control", "customized")):
    g = torch.Generator().manual_seed(0)
    b = len(tasks)
    return {"target": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, "source": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
            "has_source": torch.ones(b, dtype=torch.bool), "prompt": ["a red square"] * b, "task": list(tasks)}


def velocity(module, inputs, experts=None):
    with torch.no_grad():
        return module.model(inputs["latents"], inputs["timestep"], inputs["text"], inputs["img_ids"],
                            inputs["txt_ids"], inputs["source_tokens"], inputs["source_ids"], experts=experts).sample


def bank(module):
    return module.model.condition_bank


def test_zero_at_init_the_model_is_the_one_without_it():
    plain, concat = module_with(concat=False), module_with(concat=True)
    missing, unexpected = concat.model.load_state_dict(plain.model.state_dict(), strict=False)
    assert not unexpected and missing and all(".prw_condition." in k for k in missing)
    inputs = plain.prepare(batch(), False, torch.Generator().manual_seed(0))
    torch.testing.assert_close(velocity(concat, inputs), velocity(plain, inputs), rtol=0, atol=0)


def test_only_samples_whose_condition_is_on_the_target_grid_get_it():
    module = module_with()
    inputs = module.prepare(batch(("control", "customized")), False, torch.Generator().manual_seed(0))
    assert inputs["source_ids"].dim() == 3  # per-sample positions: control aligned, the subject shifted
    before = velocity(module, inputs)
    with torch.no_grad():
        for expert in bank(module).experts:
            expert.weight.normal_(0, 0.5)
    after = velocity(module, inputs)
    assert (after[0] - before[0]).abs().max() > 1e-3  # the aligned control map reaches its noisy tokens
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)  # the shifted reference does not


def test_the_routed_expert_applies_its_own_map():
    module = module_with()
    inputs = module.prepare(batch(("control", "control")), False, torch.Generator().manual_seed(0))
    module.model.activate_next_expert()  # two active experts
    reference = {e: velocity(module, inputs, torch.full((2,), e)) for e in (0, 1)}
    with torch.no_grad():
        bank(module).experts[1].weight.normal_(0, 0.5)
    torch.testing.assert_close(velocity(module, inputs, torch.zeros(2, dtype=torch.long)), reference[0],
                               rtol=0, atol=0)
    assert (velocity(module, inputs, torch.ones(2, dtype=torch.long)) - reference[1]).abs().max() > 1e-3


def test_closed_gates_keep_it_out():
    module = module_with()
    inputs = module.prepare(batch(("control",)), False, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "token_gate.bias" in name:
                p.fill_(-10.0)  # every hard gate closed
    before = velocity(module, inputs)
    with torch.no_grad():
        bank(module).experts[0].weight.normal_(0, 0.5)
    torch.testing.assert_close(velocity(module, inputs), before, rtol=0, atol=0)


def test_it_trains_with_its_expert_and_freezes_with_it():
    module = module_with(init="zero")
    module.train()
    module.model.freeze_for_curriculum()
    params = module.model.expert_parameters(0)
    assert any(p is bank(module).experts[0].weight for p in params)
    losses = module.compute_losses(batch(("control", "control")), train=True, generator=torch.Generator().manual_seed(1))
    losses["loss"].backward()
    assert bank(module).experts[0].weight.grad.abs().max() > 0
    with torch.no_grad():
        bank(module).experts[0].weight.normal_(0, 0.5)
    module.model.activate_next_expert()
    assert not bank(module).experts[0].weight.requires_grad and bank(module).experts[1].weight.requires_grad
    assert bank(module).experts[1].weight.abs().max() == 0  # a new expert starts from zero (init: zero)


def test_the_sampler_and_the_exported_adapters_carry_it(tmp_path):
    from cologen.pipeline import adapter_state

    module = module_with()
    b = batch(("control",))
    first = module.generate(b["prompt"], b["source"], b["task"], seed=0, steps=2)[0]
    with torch.no_grad():
        bank(module).experts[0].weight.normal_(0, 0.5)
    second = module.generate(b["prompt"], b["source"], b["task"], seed=0, steps=2)[0]
    assert (first - second).abs().max() > 1e-3
    state = adapter_state(module.model)
    assert "x_embedder.prw_condition.experts.0.weight" in state


def test_config_needs_sample_routing():
    from cologen.model.config import PRWConfig, RouterConfig

    with pytest.raises(ValueError, match="concat_condition"):
        PRWConfig(num_experts=2, concat_condition=True, router=RouterConfig(granularity="token"))
