"""`prw.gate_prompt`: token gates that read the pooled prompt and each token's place, so a gate can open where an
instruction names something (an edit's object, its new place) that the source tokens alone cannot tell."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from cologen.model.experts import PLACE_DIM, ExpertBank, GateContext, place_features
from cologen.model.veteran import token_gate_loss


def grid_ids(h: int, w: int, y0: int = 0, x0: int = 0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h) + y0, torch.arange(w) + x0, indexing="ij")
    return torch.stack([torch.zeros_like(y), y, x], -1).reshape(-1, 3)


def test_place_features_scale_each_grid_to_the_unit_square_wherever_its_ids_start():
    f = place_features(grid_ids(4, 6))
    assert f.shape == (24, PLACE_DIM)
    torch.testing.assert_close(f[0, :2], torch.tensor([0.0, 0.0]))  # top left
    torch.testing.assert_close(f[-1, :2], torch.tensor([1.0, 1.0]))  # bottom right
    torch.testing.assert_close(f[5, :2], torch.tensor([0.0, 1.0]))  # top right
    shifted = torch.stack([grid_ids(4, 6, 10, 3), grid_ids(4, 6)])  # per-sample ids (a condition placed elsewhere)
    torch.testing.assert_close(place_features(shifted), torch.stack([f, f]))


def bank(prompt_dim: int, dim: int = 16) -> ExpertBank:
    return ExpertBank(dim, num_experts=2, rank=2, alpha=2, token_gate=True, hard_gate=True, prompt_dim=prompt_dim,
                      gate_rank=4)


def test_a_prompt_gate_starts_as_the_plain_gate():
    torch.manual_seed(0)
    b = bank(prompt_dim=8)
    with torch.no_grad():
        for e in b.experts:
            e.token_gate.weight.normal_()
    hidden, index = torch.randn(3, 16, 16), torch.tensor([0, 1, 1])
    context = GateContext(torch.randn(3, 8), place_features(grid_ids(4, 4)))
    torch.testing.assert_close(b.gate_logits(hidden, index, context), b.gate_logits(hidden, index))


def test_a_new_zero_init_expert_starts_with_no_prompt_term():
    torch.manual_seed(0)
    b = bank(prompt_dim=8)
    with torch.no_grad():
        for p in b.experts[0].prompt_gate.parameters():
            p.normal_()
    b.init_expert(1, "zero")
    hidden, context = torch.randn(2, 16, 16), GateContext(torch.randn(2, 8), place_features(grid_ids(4, 4)))
    assert b.gate_logits(hidden, torch.tensor([0, 0]), context).abs().max() > 0
    assert b.gate_logits(hidden, torch.tensor([1, 1]), context).abs().max() == 0


def fit_gate(b: ExpertBank, hidden, context, changed, steps: int = 300) -> float:
    """Train the gates of expert 0 on their supervision alone; returns the accuracy of 'open' against `changed`."""
    opt = torch.optim.Adam(b.experts[0].parameters(), lr=3e-2)
    index = torch.zeros(hidden.shape[0], dtype=torch.long)
    for _ in range(steps):
        loss, accuracy = token_gate_loss({"block": b.gate_logits(hidden, index, context)}, changed)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(accuracy)


def test_a_prompt_gate_learns_the_region_a_prompt_names_where_the_tokens_alone_cannot_tell():
    torch.manual_seed(0)
    scene = torch.randn(1, 16, 16).expand(8, -1, -1)  # every sample shows the same source tokens (4 x 4 grid)
    top, right = F.one_hot(torch.tensor(0), 8).float(), F.one_hot(torch.tensor(1), 8).float()
    prompts = torch.stack([top, right] * 4)  # "... at the top" / "... on the right"
    rows, cols = grid_ids(4, 4)[:, 1], grid_ids(4, 4)[:, 2]
    changed = torch.stack([rows < 2, cols >= 2] * 4)  # (8, 16)
    context = GateContext(prompts, place_features(grid_ids(4, 4)))
    with_prompt = fit_gate(bank(prompt_dim=8), scene, context, changed)
    without = fit_gate(bank(prompt_dim=0), scene, context, changed)
    assert with_prompt == 1.0
    assert without <= 0.75 + 1e-6  # the two regions agree on half the tokens: a gate blind to the prompt is wrong on a quarter


def prompt_gate_module(**options):
    """A tiny model in eval mode whose gates read the prompt, with further `PRWConfig` options."""
    from cologen.model.config import PRWConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig
    from tests.test_eval_denoising import PRW

    torch.manual_seed(0)
    return CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                         prw=PRWConfig(**PRW, gate_prompt=True, **options),
                         veteran=VeteranConfig(gate_weight=0.1)).eval()


def test_the_prompt_reaches_each_samples_gate_in_the_model():
    from tests.test_eval_denoising import batch

    module = prompt_gate_module()
    data = batch()
    data["prompt"] = ["make the red square blue", "draw a box", "remove the circle"]
    inputs = module.prepare(data, False, torch.Generator().manual_seed(0))
    args = (inputs["source_tokens"], inputs["source_ids"], inputs["text"].pooled, inputs["timestep"])
    with torch.no_grad():
        plain = module.model.encode_source(*args).gates
        biases = {}
        for name, p in module.model.named_parameters():
            if "experts.0.prompt_gate.prompt_bias" in name:
                biases[name] = p.normal_()[0].clone()
        prompted = module.model.encode_source(*args).gates
    pooled = F.layer_norm(inputs["text"].pooled.float(), inputs["text"].pooled.shape[-1:])
    assert set(plain) == set(prompted) and len(plain) == len(biases)
    for block, bias in zip(plain, biases.values()):  # blocks and their banks in the same order
        # each sample's gates move by its own prompt's term, the same on all its tokens (only the bias changed)
        torch.testing.assert_close(prompted[block] - plain[block], (pooled @ bias)[:, None].expand_as(plain[block]),
                                   rtol=1e-4, atol=1e-4)


def test_the_changed_tokens_of_the_chosen_tasks_weigh_gate_pos_weight_in_the_gate_supervision():
    from cologen.training.config import VeteranConfig
    from tests.test_eval_denoising import tiny_module

    module = tiny_module()
    logits, changed = torch.randn(2, 5), torch.rand(2, 5) > 0.5
    changed[:, 0] = True
    tasks = ["editing", "inpainting"]
    assert module.gate_token_weights(changed, tasks) is None  # weight 1: the plain cross-entropy
    module.veteran = VeteranConfig(gate_weight=0.1, gate_pos_weight=3.0, gate_pos_weight_tasks=["editing"])
    weights = module.gate_token_weights(changed, tasks)
    torch.testing.assert_close(weights[0], 1 + 2 * changed[0].float())  # editing's changed tokens weigh 3
    torch.testing.assert_close(weights[1], torch.ones(5))  # inpainting's all 1
    loss, _ = token_gate_loss({"b": logits}, changed, weights)
    per_token = F.binary_cross_entropy_with_logits(logits, changed.float(), reduction="none")
    torch.testing.assert_close(loss, (per_token * weights).mean())


def test_config_errors():
    from cologen.model.config import PRWConfig
    from cologen.training.config import VeteranConfig

    with pytest.raises(ValueError, match="gate_prompt"):
        PRWConfig(gate_prompt=True)
    with pytest.raises(ValueError, match="gate_pos_weight"):
        VeteranConfig(gate_pos_weight=0.0)
    with pytest.raises(ValueError, match="gate_prompt_tasks: unknown tasks"):
        VeteranConfig(gate_prompt_tasks=["drawing"])


def test_gate_prompt_tasks_needs_prompt_gates():
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig

    with pytest.raises(ValueError, match="needs prw.gate_prompt"):
        CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                      veteran=VeteranConfig(gate_prompt_tasks=["editing"]))


def prompt_sides(module, expert: int) -> list[torch.Tensor]:
    return [p.detach().clone() for name, p in module.model.named_parameters()
            if f"experts.{expert}.prompt_gate." in name and name.rsplit(".", 2)[-2] in
            ("token_prompt", "place_prompt", "prompt_bias")]


def test_only_the_steps_of_gate_prompt_tasks_give_their_expert_a_prompt_term(tmp_path, shapeworld_dir,
                                                                              monkeypatch):
    """Curriculum inpainting (2 steps), grounding (3), control (2) with gate_prompt_tasks [grounding]: grounding's
    expert learns its prompt terms; inpainting's and control's keep them at exactly zero and frozen, though
    control's expert starts as a copy of grounding's."""
    from lightning.pytorch.callbacks import Callback

    from cologen.model.config import PRWConfig, RouterConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig
    from tests.test_curriculum import fit

    class Trainable(Callback):
        def __init__(self):
            self.rows, self.computed, self.calls = [], [], 0

        def on_train_batch_start(self, trainer, module, *args):
            self.rows.append([any(p.requires_grad for n, p in module.model.named_parameters()
                                  if f"experts.{e}.prompt_gate." in n) for e in range(3)])
            self.calls_before = self.calls

        def on_train_batch_end(self, *args):
            self.computed.append(self.calls > self.calls_before)

    recorder = Trainable()

    def counted(bank, *args, **kwargs):
        recorder.calls += 1
        return prompt_logits(bank, *args, **kwargs)

    prompt_logits = ExpertBank._prompt_logits
    monkeypatch.setattr(ExpertBank, "_prompt_logits", counted)

    module = CoLoGenModule(
        preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
        prw=PRWConfig(num_experts=3, rank=4, alpha=8, token_gate=True, gate_prompt=True, init="copy",
                      router=RouterConfig(entry_warmup_steps=1)),
        veteran=VeteranConfig(gate_weight=1.0, gate_prompt_tasks=["grounding"]))
    fit(tmp_path, shapeworld_dir, [recorder], module=module)
    assert recorder.rows == [[False] * 3] * 2 + [[False, True, False]] * 3 + [[False] * 3] * 2
    # the source pass skips the prompt terms until grounding's expert has them, then computes them for good
    assert recorder.computed == [False] * 2 + [True] * 5
    for expert, learned in ((0, False), (1, True), (2, False)):
        sides = prompt_sides(module, expert)
        assert sides and any(s.abs().max() > 0 for s in sides) == learned


def test_a_prompt_gate_is_live_once_it_may_train_or_holds_weights_and_stays_so_when_frozen():
    b = bank(prompt_dim=8)
    gate = b.experts[0].prompt_gate
    assert gate.is_live()  # a new module trains by default
    b.requires_grad_(False)
    assert gate.is_live()  # it may have trained while it could: the mark sticks
    gate.check_weights()
    assert not gate.is_live() and not b.prompt_gates_live()  # read off the weights: zero
    with torch.no_grad():
        gate.prompt_bias.weight[0, 3] = 0.5
    gate.check_weights()
    assert gate.is_live()
    gate.zero_prompt_side()
    assert not gate.is_live()
    # a load reads the weights it brings in: a whole state, and the copy that starts a new expert
    trained = bank(prompt_dim=8).requires_grad_(False)
    with torch.no_grad():
        trained.experts[0].prompt_gate.place_prompt.weight.normal_()
    b.load_state_dict(trained.state_dict())
    assert b.experts[0].prompt_gate.is_live() and not b.experts[1].prompt_gate.is_live()
    b.init_expert(1, "copy")
    assert b.experts[1].prompt_gate.is_live()
    b.init_expert(1, "zero")
    assert not b.experts[1].prompt_gate.is_live()


def test_a_model_whose_experts_all_hold_their_prompt_terms_skips_them_with_the_same_output(monkeypatch):
    from cologen.model.config import PRWConfig
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.training.config import VeteranConfig
    from tests.test_eval_denoising import PRW, batch

    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=32, heads=2, double_layers=1, single_layers=1),
                           prw=PRWConfig(**PRW, gate_prompt=True), veteran=VeteranConfig(gate_weight=0.1)).eval()
    model = module.model
    for e in range(model.prw.num_experts):
        model.hold_prompt_gate(e)
    with torch.no_grad():  # gates that read their tokens, so the prompt terms land on something non-trivial
        for name, p in model.named_parameters():
            if name.endswith("token_gate.weight"):
                p.normal_()
    calls = []
    prompt_logits = ExpertBank._prompt_logits
    monkeypatch.setattr(ExpertBank, "_prompt_logits",
                        lambda bank, *a, **k: calls.append(1) or prompt_logits(bank, *a, **k))
    data = batch()
    inputs = module.prepare(data, False, torch.Generator().manual_seed(0))
    args = (inputs["source_tokens"], inputs["source_ids"], inputs["text"].pooled, inputs["timestep"])
    with torch.no_grad():
        skipped = model.encode_source(*args)
        assert not calls and not model.prompt_gates_live() and skipped.gates
        model.prw_modules()[0].prw_experts.experts[0].prompt_gate.requires_grad_(True)  # live, weights still zero
        computed = model.encode_source(*args)
    assert calls and model.prompt_gates_live()
    for name in skipped.gates:  # the zero terms skipped: bit for bit what computing them gives
        assert torch.equal(skipped.gates[name], computed.gates[name])
    for name in skipped.kv:
        assert all(torch.equal(a, b) for a, b in zip(skipped.kv[name], computed.kv[name]))


SHARDED_CHECK = """
import os
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from cologen.model.experts import any_nonzero
dist.init_process_group("gloo")
weight = torch.zeros(4, 3)
weight[3, 0] = 1.0  # on rank 1's shard only
sharded = distribute_tensor(weight, init_device_mesh("cpu", (2,)), [Shard(0)])
print(f"rank {dist.get_rank()}: {any_nonzero(sharded)}", flush=True)
dist.destroy_process_group()
# torch 2.13's gloo can abort rank 0 at interpreter exit, after destroy_process_group has returned ("terminate
# called without an active exception", 4 in 60 launches on 2 busy cores): leave without the finaliser.
os._exit(0)
"""


@pytest.mark.timeout(120)
def test_every_rank_reads_the_same_liveness_off_a_sharded_weight(tmp_path):
    """FSDP shards the expert banks: a rank whose shard is zero must not skip the terms its peers compute."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(SHARDED_CHECK)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)],
                         capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(re.findall(r"rank \d: (?:True|False)", out.stdout)) == ["rank 0: True",
                                                                                         "rank 1: True"]
