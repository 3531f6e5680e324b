"""Routing options beyond the paper's router: prompt input, straight-through weighting (an invisible entry anneal),
per-sample task supervision, oracle routing, experts with more targets, token gates, and the curriculum's
warm-up check."""

import pytest
import torch

from cologen.curriculum.spec import CurriculumSpec, CurriculumStep
from cologen.model.cologen_transformer import CoLoGenTransformer
from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.router import NoisyTop1Router
from cologen.model.veteran import task_balanced_weights, task_routing_loss, token_gate_loss, veteran_loss
from tests.test_model_prw import make_inputs, make_source, make_transformer, randomize_experts, run

FULL = dict(targets=["to_q", "to_k", "to_v", "to_out"], noisy_targets=["to_q", "to_k", "to_v", "to_out"],
            token_gate=True)


def model_with(router=None, **prw):
    cfg = PRWConfig(num_experts=3, rank=4, alpha=8, router=router or RouterConfig(), **prw)
    return CoLoGenTransformer(make_transformer(), cfg)


def inpainting_then_control_module(veteran, flow=None):
    """A tiny module after two curriculum steps (inpainting -> expert 0, control -> expert 1) whose routers prefer
    expert 1 for every input, so inpainting's (replayed) samples are routed wrong."""
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule

    preset = TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1, seed=0)
    kwargs = {} if flow is None else {"flow": flow}
    module = CoLoGenModule(preset=preset, prw=PRWConfig(num_experts=2, rank=4, alpha=8, router=RouterConfig(
                               noisy=False, timestep_bins=0)), veteran=veteran, **kwargs)
    module.model.activate_next_expert()
    module.model.set_entry_progress(1.0)
    module.task_experts = {"inpainting": 0, "control": 1}
    with torch.no_grad():
        for attn in module.model.prw_modules():
            attn.prw_router.gate.bias[:2] = torch.tensor([0.0, 2.0])
            attn.prw_router.gate.weight.zero_()  # the same preference whatever the source (also a dropped one)
    return module


# ----------------------------------------------------------------------------------------------- the router
def test_prompt_input_lets_the_router_separate_identical_sources():
    router = NoisyTop1Router(dim=8, num_experts=2, prompt_dim=4, timestep_bins=0).eval()
    with torch.no_grad():
        router.prompt_gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]) * 5)
    hidden = torch.randn(1, 3, 8).expand(2, 3, 8)  # the same source twice
    prompts = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]])
    r = router(hidden, 2, torch.zeros(2), prompt=prompts)
    assert r.index.tolist() == [0, 1]
    # without the prompt both samples route alike
    same = router(hidden, 2, torch.zeros(2))
    assert same.index[0] == same.index[1]


def test_normalized_router_input_ignores_the_scale_of_the_source_features():
    router = NoisyTop1Router(dim=8, num_experts=3, normalize=True, timestep_bins=0).eval()
    randomize = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(3, 8, generator=randomize))
    hidden = torch.randn(2, 5, 8, generator=randomize)
    a, b = router(hidden, 3, torch.zeros(3)), router(hidden * 50, 3, torch.zeros(3))
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-4, atol=1e-5)


def test_straight_through_weight_is_one_with_the_probability_gradient():
    router = NoisyTop1Router(dim=8, num_experts=3, weighting="straight_through", timestep_bins=0).train()
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    r = router(torch.randn(4, 5, 8), 3, torch.zeros(3))
    assert torch.equal(r.weight, torch.ones(4))
    r.weight.sum().backward()
    assert router.gate.bias.grad.abs().sum() > 0  # the chosen expert's probability still trains the gate


def test_a_detached_router_input_trains_the_gate_and_nothing_before_it():
    """detach_input: the same logits, the gate's gradient kept, none reaching the pooled source features."""
    grads = {}
    for detach in (False, True):
        router = NoisyTop1Router(dim=8, num_experts=3, timestep_bins=0, noisy=False, detach_input=detach)
        with torch.no_grad():
            router.gate.weight.copy_(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
        hidden = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        r = router(hidden, 3, torch.zeros(3))
        task_routing_loss({"block": r}, torch.tensor([0, 1, 2, 0]))[0].backward()
        grads[detach] = (r.probs.detach(), router.gate.weight.grad.clone(), hidden.grad)
    torch.testing.assert_close(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1])
    assert grads[False][2].abs().sum() > 0 and grads[True][2] is None


def test_forced_routing_picks_the_given_experts_at_weight_one():
    router = NoisyTop1Router(dim=8, num_experts=3, timestep_bins=0).eval()
    r = router(torch.randn(3, 5, 8), 3, torch.zeros(3), forced=torch.tensor([2, 0, 1]))
    assert r.index.tolist() == [2, 0, 1] and torch.equal(r.weight, torch.ones(3))


@pytest.mark.parametrize("weighting", ["straight_through", "prob"])
def test_the_entry_anneal_changes_nothing_by_itself_with_straight_through_weights(weighting):
    """A new expert is a copy of its predecessor with a copied router entry; annealing the entry offset from -20 to 0
    makes the two tie. With straight-through weights the output does not move; with the paper's probability
    weighting the tie halves the routed contribution, which is why this project's tiny preset uses the former."""
    router = RouterConfig(weighting=weighting, timestep_bins=0, prompt_input=True)
    model = model_with(router, **FULL).eval()
    randomize_experts(model)
    x, src = make_inputs(), make_source()
    with torch.no_grad():
        model.activate_next_expert()
        model.set_entry_progress(1.0)
        model.activate_next_expert()
        before = run(model, x, src).sample
        moved = []
        for fraction in (0.25, 0.5, 0.75, 1.0):
            model.set_entry_progress(fraction)
            moved.append(float((run(model, x, src).sample - before).abs().max()))
    if weighting == "straight_through":
        assert max(moved) < 1e-5
    else:
        assert moved[-1] > 1e-3


# ------------------------------------------------------------------------------------------ task supervision
def test_task_routing_loss_is_the_mean_negative_log_probability_of_the_own_expert():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    routing = {"b0": type("R", (), {"probs": probs, "index": probs.argmax(-1)})(),
               "b1": type("R", (), {"probs": probs.flip(-1), "index": probs.flip(-1).argmax(-1)})()}
    own = torch.tensor([0, 2])
    loss, share = task_routing_loss(routing, own)
    expected = -(torch.log(torch.tensor([0.7, 0.8])).mean() + torch.log(torch.tensor([0.1, 0.1])).mean()) / 2
    torch.testing.assert_close(loss, expected)
    assert float(share) == 0.5  # block b0 routes both right, b1 neither


def test_task_balance_weighs_every_task_in_the_batch_alike():
    tasks = ["control"] * 6 + ["inpainting"] * 2  # a new task and a replayed one
    w = task_balanced_weights(tasks)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[:6].sum(), w[6:].sum())  # each task's samples weigh the same in total
    probs = torch.tensor([[0.2, 0.8]] * 6 + [[0.6, 0.4]] * 2)
    routing = {"b0": type("R", (), {"probs": probs, "index": probs.argmax(-1)})()}
    own = torch.tensor([1] * 6 + [0] * 2)
    balanced, share = task_routing_loss(routing, own, w)
    plain, _ = task_routing_loss(routing, own)
    # balanced: the mean of the two tasks' mean losses; plain: the mean over samples (the new task dominates)
    torch.testing.assert_close(balanced, -(torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.6))) / 2)
    torch.testing.assert_close(plain, -(6 * torch.log(torch.tensor(0.8)) + 2 * torch.log(torch.tensor(0.6))) / 8)
    assert float(share) == 1.0
    torch.testing.assert_close(task_balanced_weights(["editing"] * 4), torch.ones(4))  # one task: the plain mean


def test_the_module_balances_the_task_routing_loss_when_asked():
    from cologen.training.config import VeteranConfig

    torch.manual_seed(0)
    batch = {"target": torch.rand(8, 3, 16, 16) * 2 - 1, "has_source": torch.ones(8, dtype=torch.bool),
             "prompt": ["make it"] * 6 + ["fill it"] * 2, "task": ["control"] * 6 + ["inpainting"] * 2}
    batch["source"] = batch["target"].flip(-1)
    losses = {}
    for balance in (False, True):
        module = inpainting_then_control_module(VeteranConfig(task_weight=1.0, task_balance=balance))
        losses[balance] = module.compute_losses(batch, train=False, generator=torch.Generator().manual_seed(0))
    p0, p1 = torch.tensor([0.0, 2.0]).softmax(-1)
    torch.testing.assert_close(losses[False]["loss_routing"], -(6 * p1.log() + 2 * p0.log()) / 8)
    torch.testing.assert_close(losses[True]["loss_routing"], -(p1.log() + p0.log()) / 2)


def test_the_task_routing_loss_leaves_out_the_samples_trained_without_their_source_when_asked():
    """With `skip_dropped_sources`, a sample whose condition image was dropped (the routers see a blank source)
    carries no weight in the task routing loss; without it, it counts like any other. With
    `skip_dropped_source_tasks`, only those tasks' dropped samples are left out."""
    from cologen.training.config import FlowMatchingConfig, VeteranConfig

    torch.manual_seed(0)
    tasks = ["control"] * 4 + ["inpainting"] * 4
    batch = {"target": torch.rand(8, 3, 16, 16) * 2 - 1, "has_source": torch.ones(8, dtype=torch.bool),
             "prompt": ["a scene"] * 8, "task": tasks}
    batch["source"] = batch["target"].flip(-1)
    settings = {"off": (False, None), "every task": (True, None), "control only": (True, ["control"])}
    losses, seen = {}, {}
    for name, (skip, skip_tasks) in settings.items():
        module = inpainting_then_control_module(
            VeteranConfig(task_weight=1.0, skip_dropped_sources=skip, skip_dropped_source_tasks=skip_tasks),
            flow=FlowMatchingConfig(source_dropout=0.5))
        generator = torch.Generator().manual_seed(3)
        seen[name] = module.prepare(batch, train=True, generator=torch.Generator().manual_seed(3))["source_seen"]
        losses[name] = module.compute_losses(batch, train=True, generator=generator)["loss_routing"]
    drawn = seen["off"]
    assert all(torch.equal(drawn, s) for s in seen.values())  # the same draws in every setting
    assert not drawn[:4].all() and not drawn[4:].all()  # some of each task's sources dropped
    p0, p1 = torch.tensor([0.0, 2.0]).softmax(-1)
    nll = torch.tensor([-p1.log()] * 4 + [-p0.log()] * 4)
    is_control = torch.tensor([t == "control" for t in tasks])
    for name, kept in {"off": torch.ones(8), "every task": drawn.float(),
                       "control only": (drawn | ~is_control).float()}.items():
        torch.testing.assert_close(losses[name], (nll * kept).sum() / kept.sum())
    values = [float(v.detach()) for v in losses.values()]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-3


def test_an_unknown_task_in_skip_dropped_source_tasks_is_refused_in_one_line():
    from cologen.training.config import VeteranConfig

    with pytest.raises(ValueError, match=r"veteran.skip_dropped_source_tasks: unknown tasks \['inpaint'\]"):
        VeteranConfig(skip_dropped_sources=True, skip_dropped_source_tasks=["inpaint"])


def test_a_batch_without_any_weighted_sample_has_no_task_routing_loss():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    routing = {"b0": type("R", (), {"probs": probs, "index": probs.argmax(-1)})()}
    loss, _ = task_routing_loss(routing, torch.tensor([0, 1]), torch.zeros(2))
    assert float(loss) == 0.0


def test_task_supervision_trains_routing_that_depends_on_the_task():
    """The paper's veteran loss is satisfied by one fixed expert per block; the per-sample task loss is not: a few
    steps of it on the routers alone make two tasks with different prompts choose different experts."""
    torch.manual_seed(0)
    router = RouterConfig(prompt_input=True, normalize_input=True, timestep_bins=0)
    model = model_with(router).train()
    model.activate_next_expert()
    model.set_entry_progress(1.0)
    x, src = make_inputs(), make_source()
    text = x["text"]
    text.pooled[:2] += 3.0  # two "tasks": samples 0-1 and 2-3 differ in their prompt
    own = torch.tensor([0, 0, 1, 1])
    optimizer = torch.optim.Adam(model.router_parameters(), lr=0.05)
    for _ in range(60):
        out = run(model, x, src)
        loss, _ = task_routing_loss(out.routing, own)
        vet, _ = veteran_loss(out.routing, model.newest_expert, rho=0.5, alpha=0.5)
        optimizer.zero_grad()
        (loss + vet).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = run(model, x, src)
    for r in out.routing.values():
        assert r.index.tolist() == [0, 0, 1, 1]


def test_spec_assigns_each_task_to_the_step_that_introduced_it():
    spec = CurriculumSpec([
        CurriculumStep("inpainting", {"inpainting": 1.0}, 10),
        CurriculumStep("grounding", {"grounding": 0.75, "inpainting": 0.25}, 10),
        CurriculumStep("control", {"control": 0.5, "grounding": 0.25, "inpainting": 0.25}, 10),
    ])
    assert spec.task_experts(0) == {"inpainting": 0}
    assert spec.task_experts(2) == {"inpainting": 0, "grounding": 1, "control": 2}
    cotrain = CurriculumSpec([CurriculumStep("all", {"inpainting": 1.0, "control": 1.0}, 10)])
    assert cotrain.task_experts(0) == {"inpainting": 0, "control": 0}


def test_a_step_shorter_than_its_warmup_needs_is_refused():
    spec = CurriculumSpec([CurriculumStep("a", {"inpainting": 1.0}, 30), CurriculumStep("b", {"grounding": 1.0}, 40)])
    spec.validate(num_experts=2, entry_warmup_steps=20)
    with pytest.raises(ValueError, match=r"curriculum\.steps\[1\] \(b\)\.steps \(40\) must be >= 2 x "
                                         r"prw\.router\.entry_warmup_steps \(50\)") as err:
        spec.validate(num_experts=2, entry_warmup_steps=50)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- capacity options
def test_more_targets_keep_the_base_output_until_they_train_and_then_change_it():
    base = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=0)).eval()
    model = model_with(**FULL).eval()
    x, src = make_inputs(), make_source()
    with torch.no_grad():
        torch.testing.assert_close(run(model, x, src).sample, run(base, x, src).sample, rtol=0, atol=1e-6)
    keys = set(model.state_dict())
    for name in ("to_q", "to_out", "noisy_to_q", "noisy_to_v", "noisy_to_out"):
        assert f"transformer.transformer_blocks.0.attn.prw_experts.experts.1.{name}.lora_B.weight" in keys
    assert "transformer.single_transformer_blocks.0.attn.prw_experts.experts.0.token_gate.weight" in keys
    randomize_experts(model)
    with torch.no_grad():
        assert (run(model, x, src).sample - run(base, x, src).sample).abs().max() > 1e-4


def test_noisy_targets_follow_the_source_routing_and_leave_text_to_image_alone():
    with_noisy = model_with(noisy_targets=["to_q", "to_v", "to_out"]).eval()
    source_only = model_with().eval()
    with_noisy.activate_next_expert()
    source_only.activate_next_expert()
    randomize_experts(with_noisy)
    source_only.load_state_dict(with_noisy.state_dict(), strict=False)  # the same source-stream experts
    with torch.no_grad():
        for attn in with_noisy.prw_modules():
            for e, expert in enumerate(attn.prw_experts.experts):
                if e != 1:  # only expert 1 acts on the noisy tokens
                    for name in ("noisy_to_q", "noisy_to_v", "noisy_to_out"):
                        getattr(expert, name).lora_B.weight.zero_()
    x, src = make_inputs(), make_source()
    with torch.no_grad():
        # without a source there is no routing, so no expert acts on the noisy tokens
        torch.testing.assert_close(run(with_noisy, x).sample, run(source_only, x).sample, rtol=0, atol=1e-6)
        for e, differs in ((0, False), (1, True)):
            forced = torch.full((4,), e)
            gap = (run(with_noisy, x, src, experts=forced).sample
                   - run(source_only, x, src, experts=forced).sample).abs().max()
            assert (gap > 1e-4) == differs, (e, float(gap))


def test_oracle_routing_overrides_the_routers():
    model = model_with(router=RouterConfig(timestep_bins=0)).eval()
    randomize_experts(model, scale=1.0)
    model.activate_next_expert()
    model.set_entry_progress(1.0)
    with torch.no_grad():
        out = run(model, make_inputs(), make_source(), experts=torch.tensor([1, 0, 1, 0]))
    for r in out.routing.values():
        assert r.index.tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="forced expert 2 is not active"):
        run(model, make_inputs(), make_source(), experts=torch.tensor([2, 0, 0, 0]))


def test_a_closed_token_gate_silences_the_expert_on_its_tokens():
    model = model_with(token_gate=True).eval()
    randomize_experts(model)
    base = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=0)).eval()
    with torch.no_grad():
        for attn in model.prw_modules():
            for expert in attn.prw_experts.experts:
                expert.token_gate.weight.zero_()
                expert.token_gate.bias.fill_(-50.0)  # 2 * sigmoid(-50) = 0
    x, src = make_inputs(), make_source()
    with torch.no_grad():
        torch.testing.assert_close(run(model, x, src).sample, run(base, x, src).sample, rtol=0, atol=1e-6)


def test_token_gate_loss_is_the_cross_entropy_of_the_first_condition_gates():
    changed = torch.tensor([[True, False, False, True]])
    right = torch.tensor([[9.0, -9.0, -9.0, 9.0]])
    loss, accuracy = token_gate_loss({"a": right, "b": right}, changed)
    assert accuracy == 1.0 and loss < 1e-3
    loss, accuracy = token_gate_loss({"a": torch.zeros(1, 4)}, changed)
    assert accuracy == 0.5 and loss == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_the_model_returns_the_routed_expert_gate_logits_per_block():
    model = model_with(**FULL).eval()
    randomize_experts(model)
    with torch.no_grad():
        for attn in model.prw_modules():
            for e, expert in enumerate(attn.prw_experts.experts):
                expert.token_gate.weight.zero_()
                expert.token_gate.bias.fill_(e + 1.0)  # each expert's logit names it
        out = run(model, make_inputs(), make_source())
    assert out.token_gates and set(out.token_gates) == set(out.routing)
    for name, logits in out.token_gates.items():
        assert logits.shape == make_source()[0].shape[:2]
        expected = (out.routing[name].index.float() + 1)[:, None].expand_as(logits)
        assert torch.equal(logits, expected)
    assert not run(model_with(), make_inputs(), make_source()).token_gates  # no gates, no logits
    # two conditions: only the first's gates come out (the second is not on the target's grid): not supervised
    tokens, ids = make_source()
    with torch.no_grad():
        two = run(model, make_inputs(), ([tokens, tokens.flip(1)], [ids, ids.clone()]))
    assert set(two.token_gates) == set(out.token_gates)
    for name in out.token_gates:
        assert torch.equal(two.token_gates[name], out.token_gates[name])


def test_gate_supervision_teaches_the_gates_which_tokens_change():
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig

    preset = TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1, seed=0)
    prw = PRWConfig(num_experts=1, rank=4, alpha=8, token_gate=True)
    with pytest.raises(ValueError, match="set prw.token_gate: true"):
        CoLoGenModule(preset=preset, prw=PRWConfig(num_experts=1, rank=4), veteran=VeteranConfig(gate_weight=1.0))
    module = CoLoGenModule(preset=preset, prw=prw, veteran=VeteranConfig(gate_weight=1.0))
    torch.manual_seed(0)
    target = torch.rand(4, 3, 16, 16) * 2 - 1
    source = target.clone()
    source[:, :, :8] = 0.0  # the top half is a hole: its tokens change, the bottom half is copied
    batch = {"target": target, "source": source, "has_source": torch.ones(4, dtype=torch.bool),
             "prompt": ["fill the hole"] * 4, "task": ["inpainting"] * 4}
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(30):
        losses = module.compute_losses(batch, train=True, generator=torch.Generator().manual_seed(0))
        if first is None:
            first = (losses["loss_gate"].item(), losses["gate_accuracy"].item())
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert first[1] == pytest.approx(0.5, abs=0.01)  # gates start open everywhere: half the tokens right
    assert losses["gate_accuracy"].item() > 0.9 and losses["loss_gate"].item() < first[0] / 2
    # a task outside gate_tasks: its gates learn to stay open on every token
    others = CoLoGenModule(preset=preset, prw=prw, veteran=VeteranConfig(gate_weight=1.0, gate_tasks=["editing"]))
    opt = torch.optim.Adam([p for p in others.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        losses = others.compute_losses(batch, train=True, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["gate_accuracy"].item() > 0.95  # (nearly) every token open
    with pytest.raises(ValueError, match="gate_tasks: unknown tasks"):
        VeteranConfig(gate_tasks=["inpaint"])
    with pytest.raises(ValueError, match="hard_gate learns only from its supervision"):
        CoLoGenModule(preset=preset, prw=PRWConfig(num_experts=1, rank=4, token_gate=True, hard_gate=True))
    plain = CoLoGenModule(preset=preset, prw=prw).compute_losses(batch, train=True)
    assert "loss_gate" not in plain  # off by default (the paper)


def test_noisy_gate_closes_the_noisy_tokens_where_the_source_gate_is_closed():
    base = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=0)).eval()
    x, src = make_inputs(), make_source()
    outputs = {}
    for noisy_gate in (False, True):
        model = model_with(**FULL, noisy_gate=noisy_gate).eval()
        randomize_experts(model)
        with torch.no_grad():
            for attn in model.prw_modules():
                for expert in attn.prw_experts.experts:
                    expert.token_gate.weight.zero_()
                    expert.token_gate.bias.fill_(-50.0)  # every source token's gate closed
            outputs[noisy_gate] = run(model, x, src).sample
            reference = run(base, x, src).sample
    torch.testing.assert_close(outputs[True], reference, rtol=0, atol=1e-6)  # noisy deltas closed with them
    assert (outputs[False] - reference).abs().max() > 1e-3  # ungated noisy-stream experts still act
    with pytest.raises(ValueError, match="needs prw.token_gate: true and prw.noisy_targets"):
        PRWConfig(token_gate=True, noisy_gate=True)
    with pytest.raises(ValueError, match="hard_gate is a kind of token gate"):
        PRWConfig(hard_gate=True)


def test_a_hard_gate_passes_or_stops_each_token_exactly_and_learns_only_from_its_supervision():
    from cologen.model.experts import ExpertBank

    torch.manual_seed(0)
    soft, hard = ExpertBank(8, 2, 4, 8.0, token_gate=True), ExpertBank(8, 2, 4, 8.0, token_gate=True, hard_gate=True)
    hard.load_state_dict(soft.state_dict())
    for bank in (soft, hard):
        for p in bank.parameters():
            torch.nn.init.normal_(p, std=0.5)
    hard.load_state_dict(soft.state_dict())
    hidden, index, weight = torch.randn(2, 6, 8), torch.tensor([0, 1]), torch.ones(2)
    logits = hard.gate_logits(hidden, index)
    assert (logits >= 0).any() and (logits < 0).any()
    (gated,) = hard(hidden, index, weight, 2, ["to_k"], gate_from=hidden)
    (plain,) = hard(hidden, index, weight, 2, ["to_k"])
    open_ = (logits >= 0)[..., None]
    assert torch.equal(gated, torch.where(open_, plain, torch.zeros_like(plain)))
    gated.sum().backward()
    assert all(e.token_gate.weight.grad is None for e in hard.experts)  # no gradient through a hard gate
    (soft_gated,) = soft(hidden, index, weight, 2, ["to_k"], gate_from=hidden)
    soft_gated.sum().backward()
    assert any(e.token_gate.weight.grad is not None for e in soft.experts)


def test_capacity_options_are_checked():
    with pytest.raises(ValueError, match=r"prw\.targets must be distinct names"):
        PRWConfig(targets=["to_k", "to_x"])
    with pytest.raises(ValueError, match="need prw.router.granularity: sample"):
        PRWConfig(noisy_targets=["to_q"], router=RouterConfig(granularity="token"))
    with pytest.raises(ValueError, match="weighting must be one of"):
        RouterConfig(weighting="soft")


def test_spec_switches_change_every_step_for_ablations():
    spec = CurriculumSpec([
        CurriculumStep("inpainting", {"inpainting": 1.0}, 10, rho=1.0, alpha=0.0),
        CurriculumStep("grounding", {"grounding": 0.75, "inpainting": 0.25}, 10, alpha=0.5),
        CurriculumStep("control", {"control": 0.5, "grounding": 0.25, "inpainting": 0.25}, 10, alpha=0.5),
    ], veteran_alpha=0.0, replay=False)
    resolved = spec.resolved()
    assert [s.alpha for s in resolved.steps] == [0.0, 0.0, 0.0]
    assert [s.mixture for s in resolved.steps] == [{"inpainting": 1.0}, {"grounding": 0.75}, {"control": 0.5}]
    assert resolved.resolved() == resolved  # idempotent
    plain = CurriculumSpec(spec.steps).resolved()
    assert [s.alpha for s in plain.steps] == [0.0, 0.5, 0.5] and plain.steps[2].mixture == spec.steps[2].mixture


def test_change_weight_weighs_the_changed_tokens_of_the_chosen_tasks():
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule, changed_tokens
    from cologen.training.config import FlowMatchingConfig as FlowConfig

    preset = TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1, seed=0)
    x0 = torch.zeros(3, 4, 8)
    source = x0.clone()
    source[:, 1] = 1.0  # token 1 differs from the target in every sample
    has_source = torch.tensor([True, True, False])
    tasks = ["inpainting", "grounding", "grounding"]
    changed = changed_tokens(x0, source, has_source)
    assert changed.tolist() == [[False, True, False, False]] * 2 + [[True] * 4]  # no source: everything changes
    assert changed_tokens(x0, source[:, :3], has_source) is None  # another grid: nothing is aligned
    everywhere = CoLoGenModule(preset=preset, flow=FlowConfig(change_weight=4.0))
    w = everywhere.change_weights(changed, tasks)
    assert w[:2, 1].tolist() == [5.0, 5.0] and (w[:2, [0, 2, 3]] == 1).all()
    assert (w[2] == w[2, 0]).all()  # a sample without a source: uniform
    chosen = CoLoGenModule(preset=preset, flow=FlowConfig(change_weight=4.0, change_weight_tasks=["grounding"]))
    assert chosen.change_weights(changed, tasks)[:, 1].tolist() == [1.0, 5.0, 5.0]
    assert CoLoGenModule(preset=preset).change_weights(changed, tasks) is None  # the paper's loss
    with pytest.raises(ValueError, match="unknown tasks"):
        FlowConfig(change_weight=1.0, change_weight_tasks=["grnding"])


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_the_router_logit_terms_sum_to_its_logits(granularity):
    """`logit_terms` is how `logits` is computed: its terms add up to the logits bit for bit, in eval (no noise)
    and in training (the same noise draw)."""
    torch.manual_seed(0)
    router = NoisyTop1Router(8, 3, timestep_bins=4, granularity=granularity, prompt_dim=5, normalize=True)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn_like(p))
    hidden, prompt, bins = torch.randn(2, 6, 8), torch.randn(2, 5), torch.tensor([0, 3])
    for training in (False, True):
        router.train(training)
        torch.manual_seed(1)
        logits = router.logits(hidden, bins, prompt)
        torch.manual_seed(1)
        terms = router.logit_terms(hidden, bins, prompt)
        assert set(terms) == ({"source", "prompt", "timestep"} | ({"noise"} if training else set()))
        assert torch.equal(sum(terms.values()), logits)
        assert all(t.shape == logits.shape for t in terms.values())


def test_margin_terms_split_the_own_experts_margin_over_its_strongest_rival():
    from cologen.eval.routing_terms import margin_terms

    # two decisions among 3 active experts (a 4th inactive); own expert 0
    calls = [{"source": torch.tensor([[1.0, 4.0, 0.0, 9.0], [2.0, 0.0, 1.0, 9.0]]),
              "prompt": torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]),
              "timestep": torch.zeros(2, 4), "offset": torch.zeros(2, 4)}]
    s = margin_terms(calls, own=0, num_active=3)
    # decision 1: totals (3, 4, 0): rival 1, margin -1 (source -3, prompt +2): strays; decision 2: (2, 0, 3): rival
    # 2, margin -1 (source +1, prompt -2): strays too
    assert s["own_expert"] == 0.0 and s["decisions"] == 2
    assert s["margin_mean"] == pytest.approx(-1.0) and s["margin_std"] == pytest.approx(0.0)
    assert s["source_mean"] == pytest.approx(-1.0) and s["prompt_mean"] == pytest.approx(0.0)
    calls[0]["prompt"][1, 0] = 3.0  # decision 2 now (5, 0, 3): own wins by 2
    s = margin_terms(calls, own=0, num_active=3)
    assert s["own_expert"] == 0.5 and s["margin_mean"] == pytest.approx(0.5)
    assert s["prompt_mean"] == pytest.approx((2.0 + 1.0) / 2) and s["main_rival"] in (1, 2)


def test_recorded_routing_terms_reproduce_every_decision_of_a_sampling_run(monkeypatch):
    """`cologen eval shapeworld --routing-terms`: the terms recorded in a sampling run add up to the logits the
    routers chose from (the task's own-expert share from them equals the one of the run's routing), and the
    evaluation fills one summary per routed block."""
    from cologen.commands import evaluate as evaluate_command
    from cologen.eval.probes import own_expert_share, run_probes
    from cologen.eval.routing_terms import record_routing_terms, routing_terms_table, summarize_routing_terms
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule

    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2),
                           prw=PRWConfig(num_experts=3, rank=4, alpha=8,
                                         router=RouterConfig(prompt_input=True, normalize_input=True))).eval()
    for _ in range(2):
        module.model.activate_next_expert()
        module.model.set_entry_progress(1.0)
    with torch.no_grad():  # after the activations, which copy each new expert's gate from the one before
        for p in module.model.router_parameters():
            p.copy_(torch.randn_like(p))
    module.task_experts = {"editing": 1}
    src = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    probes = [{"prompt": p, "source": s, "target": s, "task": "editing", "key": str(i)}
              for i, (p, s) in enumerate(zip(["make it red", "a blue circle", "remove it", "a scene"], src))]
    with record_routing_terms(module.model) as records:
        run = run_probes(module, "editing", probes, metrics="none", steps=4)
    summary = summarize_routing_terms(records, own=1, num_active=3)
    assert len(summary) == len(module.model.prw_modules())
    decisions = sum(s["decisions"] * s["own_expert"] for s in summary.values())
    total = sum(s["decisions"] for s in summary.values())
    assert decisions / total == pytest.approx(own_expert_share(run.routing, 1))
    assert 0 < own_expert_share(run.routing, 1) < 1  # random routers: some decisions each way
    assert all({"source_mean", "prompt_mean", "timestep_mean", "offset_mean"} <= set(s) for s in summary.values())
    from cologen.eval import probes as probes_module

    monkeypatch.setattr(probes_module, "run_probes", lambda *a, **k: run_probes(*a, **{**k, "metrics": "none"}))
    terms: dict = {}
    evaluate_command.evaluate(module, {"editing": probes}, steps=4, routing_terms=terms)
    assert terms == {"editing": summary}  # the same decisions again
    assert routing_terms_table(terms).count("| editing |") == len(summary)


def test_teacher_forcing_trains_each_expert_on_its_own_tasks_and_validates_with_the_learned_routing():
    """`veteran.teacher_forcing`: in training every sample goes to its own expert whatever the routers prefer (a
    replayed sample never reaches the new expert), the task routing loss still trains the routers; in eval mode
    the routers choose. The logged routing statistics read the routers' own choices, not the forced ones."""
    from cologen.training.config import VeteranConfig

    torch.manual_seed(0)
    tasks = ["control"] * 4 + ["inpainting"] * 4
    batch = {"target": torch.rand(8, 3, 16, 16) * 2 - 1, "has_source": torch.ones(8, dtype=torch.bool),
             "prompt": ["a scene"] * 8, "task": tasks}
    batch["source"] = batch["target"].flip(-1)
    own = [1] * 4 + [0] * 4
    indices, routing_losses, statistics = {}, {}, {}
    for forcing in (False, True):
        module = inpainting_then_control_module(VeteranConfig(task_weight=1.0, teacher_forcing=forcing))
        for mode in ("train", "eval"):
            getattr(module, mode)()
            losses = module.compute_losses(batch, train=mode == "train", generator=torch.Generator().manual_seed(0))
            indices[forcing, mode] = {name: r.index.tolist() for name, r in losses["routing"].items()}
            routing_losses[forcing, mode] = losses["loss_routing"]
            statistics[forcing, mode] = (float(losses["routing_own_expert"]), float(losses["usage_newest"]))
        assert all(index == [1] * 8 for index in indices[forcing, "eval"].values())  # learned in eval mode
    assert all(index == own for index in indices[True, "train"].values())
    assert all(index == [1] * 8 for index in indices[False, "train"].values())
    # the routers' probabilities, and so the routing loss that trains them, do not depend on the forcing
    torch.testing.assert_close(routing_losses[True, "train"], routing_losses[False, "train"])
    # the routers send every sample to the newest expert (1): half the samples on their own, all on the newest
    assert statistics[True, "train"] == statistics[False, "train"] == (0.5, 1.0)
    routing_losses[True, "train"].backward()
    router = next(iter(module.model.prw_modules())).prw_router
    assert router.gate.bias.grad.abs().sum() > 0


def test_teacher_forcing_without_the_task_routing_loss_is_refused_in_one_line():
    from cologen.training.config import VeteranConfig

    with pytest.raises(ValueError, match="veteran.teacher_forcing needs veteran.task_weight > 0"):
        VeteranConfig(teacher_forcing=True)
