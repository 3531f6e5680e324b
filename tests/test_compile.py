"""torch.compile of the repeated blocks (`CoLoGenTransformer.compile_repeated_blocks`): the compiled model computes
what the eager one does, blocks of one class share their graphs whatever the depth, and nothing recompiles after
warm-up when the routing changes."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from benchmarks.flux_models import build_cologen, forward_loss, make_inputs
from cologen.model.config import PRWConfig, RouterConfig
from cologen.testing.flux import TINY_TRANSFORMER

PRW = PRWConfig(num_experts=3, rank=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out"),
                noisy_targets=("to_k", "to_v"), token_gate=True, noisy_gate=True,
                router=RouterConfig(timestep_bins=4, prompt_input=True, noisy=False))  # compiled RNG draws differ


class GraphCounter:
    """A Dynamo backend that runs each captured graph as it is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # graphs are cached per code object, across models and tests
    yield
    torch._dynamo.reset()


def model_of(layers: int = 1, single_layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = {**TINY_TRANSFORMER, "num_layers": layers, "num_single_layers": single_layers}
    model = build_cologen(config, PRW, dtype=torch.float32)
    with torch.no_grad():  # experts, gates and routers away from their zero init, so every path matters
        for p in model.expert_parameters() + model.router_parameters():
            p.normal_(0, 0.1)
    return model, config


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager(checkpointing):
    model, config = model_of()
    model.enable_gradient_checkpointing(checkpointing)
    inputs = make_inputs(config, 2, 4, 4, 8)
    eager_loss, eager_grads = loss_and_grads(model, inputs)
    # inductor, the default backend, with the checkpointed variant through AOT autograd alone (half the compile time)
    model.compile_repeated_blocks(backend="aot_eager" if checkpointing else "inductor")
    for _ in range(2):  # the first call compiles, the second runs the cached graphs
        loss, grads = loss_and_grads(model, inputs)
        # fp32, with inductor's fused reductions summing in another order: measured 4e-5 relative on the loss
        torch.testing.assert_close(loss, eager_loss, rtol=2e-4, atol=1e-6)
        assert len(eager_grads) > 0 and eager_grads.keys() <= grads.keys()
        for name, grad in grads.items():
            # a weight whose output feeds nothing (the last block's source-stream q / out LoRA) has no gradient
            # in eager mode and a zero one from a compiled graph
            expected = eager_grads.get(name, torch.zeros_like(grad))
            torch.testing.assert_close(grad, expected, rtol=2e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def graphs_after_warmup(layers: int, single_layers: int) -> int:
    model, config = model_of(layers, single_layers)
    counter = GraphCounter()
    model.compile_repeated_blocks(backend=counter, dynamic=False)
    loss_and_grads(model, make_inputs(config, 2, 4, 4, 8))
    return counter.graphs


def test_blocks_of_one_class_share_their_graphs():
    shallow = graphs_after_warmup(2, 3)
    torch._dynamo.reset()
    deep = graphs_after_warmup(4, 8)
    # per block class and pass (source, main), and within them the first block of a class apart from the later
    # ones: its input does not require grad (frozen embedders) or is a whole tensor where the later ones get a view
    # of the previous output (another stride). The count does not grow with depth.
    assert shallow == deep <= 8


def test_routing_changes_do_not_recompile():
    model, config = model_of(2, 3)
    counter = GraphCounter()
    model.compile_repeated_blocks(backend=counter, dynamic=False)
    inputs = make_inputs(config, 2, 4, 4, 8)
    optimizer = torch.optim.SGD(model.expert_parameters() + model.router_parameters(), lr=1.0)
    model(**{k: v for k, v in inputs.items() if k != "target"})  # warm-up: every graph compiled
    loss_and_grads(model, inputs)
    optimizer.step()
    warm = counter.graphs

    def routes(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            for router in (attn.prw_router for attn in model.prw_modules()):
                router.gate.weight.normal_(0, 5.0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = model(**{k: v for k, v in inputs.items() if k != "target"}, experts=None)
            loss_and_grads(model, inputs)
            optimizer.step()
        return torch.stack([r.index for r in out.routing.values()])

    decisions = [routes(seed) for seed in range(4)]
    assert any(not torch.equal(decisions[0], d) for d in decisions[1:]), "the routing never changed"
    assert counter.graphs == warm


def test_module_switch_compiles_the_blocks_and_keeps_the_loss(flux):
    from tests.test_memory_switches import _batch, _loss, _module

    plain, compiled = _module(flux), _module(flux, compile_blocks=True)
    assert all("forward" in block.__dict__ for _, block in compiled.model._named_blocks())
    assert not any("forward" in block.__dict__ for _, block in plain.model._named_blocks())
    batch = _batch()
    torch.testing.assert_close(_loss(compiled, batch), _loss(plain, batch), rtol=2e-2, atol=1e-4)  # bf16


def saved_bytes_and_grads(model, inputs):
    """The bytes the forward pass saves for the backward (compiled graphs save through the same hooks) and the
    gradients."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss(model, inputs)
    loss.backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_memory_budget_keeps_less_for_the_backward_with_the_same_gradients():
    # AOT autograd with the min-cut partitioner (inductor's), the graphs run as traced: quick on the CPU
    backend = "aot_eager_decomp_partition"
    model, config = model_of(2, 2)
    inputs = make_inputs(config, 2, 4, 4, 8)
    model.compile_repeated_blocks(backend=backend, dynamic=False)
    kept, grads = saved_bytes_and_grads(model, inputs)
    for _, block in model._named_blocks():
        block.__dict__.pop("forward")
    torch._dynamo.reset()  # the budget is read when a graph compiles
    model.compile_repeated_blocks(activation_memory_budget=0.05, backend=backend, dynamic=False)
    budget_kept, budget_grads = saved_bytes_and_grads(model, inputs)
    assert torch._functorch.config.activation_memory_budget == 1.0  # set only while the blocks run
    assert budget_kept < 0.9 * kept, (budget_kept, kept)  # measured 0.80 on this toy model
    assert budget_grads.keys() == grads.keys()
    for name, grad in budget_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
