"""The checkpointing policies (`cologen.model.checkpointing`): both compute exactly the gradients of a run without
checkpointing; the selective one keeps more than full checkpointing and less than none (measured: the storages
still alive when the forward ends), recomputes fewer FLOPs than full checkpointing, and is what the memory plan
counts; the module option reaches the model. And how selective checkpointing meets torch.compile."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections import Counter

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flux_models import build_cologen, forward_loss, make_inputs
from benchmarks.memory import activation_bytes
from cologen.model.checkpointing import POLICIES, checkpoint_function, selective_policy
from cologen.model.config import PRWConfig, RouterConfig
from cologen.testing.flux import TINY_TRANSFORMER

# every path of a block: experts on q/k/v/out of the source stream and on k/v of the noisy one, token gates, noisy
# routers (random draws inside the checkpointed blocks) with timestep bins and prompt input
PRW = PRWConfig(num_experts=3, rank=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out"),
                noisy_targets=("to_k", "to_v"), token_gate=True, noisy_gate=True,
                router=RouterConfig(timestep_bins=4, prompt_input=True))


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    config = {**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 2}
    model = build_cologen(config, PRW, dtype=torch.float32)
    with torch.no_grad():  # experts, gates and routers away from their zero init, so every path has a gradient
        for p in model.expert_parameters() + model.router_parameters():
            p.normal_(0, 0.1)
    model.train()
    return model, make_inputs(config, 2, 4, 4, 8)


def use(model, policy: str | None) -> None:
    model.enable_gradient_checkpointing(policy is not None, checkpoint_function(policy) if policy else None)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the routers' noise
    loss = forward_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_compute_exactly_the_gradients_without_checkpointing(model_and_inputs, policy):
    """Bit for bit on the CPU in fp32: the recomputation runs the same kernels on the same inputs (and the selective
    policy hands back the forward's own outputs), so no tolerance is needed."""
    model, inputs = model_and_inputs
    use(model, None)
    loss, grads = loss_and_grads(model, inputs)
    use(model, policy)
    try:
        ck_loss, ck_grads = loss_and_grads(model, inputs)
    finally:
        use(model, None)
    # every trainable parameter but those only the last source block's unused output reads (its queries, output)
    assert grads.keys() == ck_grads.keys() and len(grads) > 0.9 * sum(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, rtol=0, atol=0, msg=name)


class LiveStorages(TorchDispatchMode):
    """Remembers the storage of every tensor an op returns (weakly: storages keep their Python object)."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs.extend(weakref.ref(t.untyped_storage()) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def kept_bytes(model, inputs, policy: str | None) -> int:
    """Bytes of the storages the forward created that are still alive when it ends: what the step keeps for its
    backward pass (saved tensors, checkpoint inputs, selective-checkpoint caches) and the loss."""
    use(model, policy)
    try:
        with LiveStorages() as live:
            loss = forward_loss(model, inputs)
        alive = {id(s): s.nbytes() for ref in live.refs if (s := ref()) is not None}
        del loss
    finally:
        use(model, None)
    return sum(alive.values())


def test_selective_keeps_more_than_full_and_less_than_none_as_the_plan_counts(model_and_inputs):
    model, inputs = model_and_inputs
    none, full, selective = (kept_bytes(model, inputs, p) for p in (None, "full", "selective"))
    assert full < selective < none
    # what the memory plan adds for the selective policy (its caches, read from the caches) is what is measured
    plan = activation_bytes(model, inputs, True, policy="selective")
    assert plan.kept == selective - full > 0


def test_selective_recomputes_fewer_flops_than_full(model_and_inputs):
    model, inputs = model_and_inputs

    def backward_flops(policy):
        use(model, policy)
        try:
            torch.manual_seed(1)
            loss = forward_loss(model, inputs)
            with FlopCounterMode(display=False) as counter:
                loss.backward()
        finally:
            use(model, None)
            model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    none, full, selective = (backward_flops(p) for p in (None, "full", "selective"))
    assert none < selective < full
    # the plan's count of what each policy recomputes (matmuls; the CPU attention kernel has no FLOP formula)
    plan = {p: activation_bytes(model, inputs, True, policy=p) for p in POLICIES}
    assert plan["full"].recompute_flops == plan["full"].block_flops == full - none
    assert plan["selective"].recompute_flops == selective - none


def test_policy_saves_attention_down_projections_and_random_draws():
    save, recompute = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    aten = torch.ops.aten
    x, w_up, w_down = torch.empty(8, 32), torch.empty(32, 128), torch.empty(128, 32)
    bias = torch.empty(32)
    assert selective_policy(None, aten.addmm.default, bias, torch.empty(8, 128), w_down) == save  # 4D -> D
    assert selective_policy(None, aten.addmm.default, torch.empty(128), x, w_up) == recompute  # D -> 4D
    assert selective_policy(None, aten.mm.default, x, torch.empty(32, 32)) == recompute  # D -> D
    assert selective_policy(None, aten.bmm.default, torch.empty(2, 8, 32), torch.empty(2, 32, 4)) == save  # LoRA A
    assert selective_policy(None, aten.bmm.default, torch.empty(2, 8, 4), torch.empty(2, 4, 32)) == recompute
    assert selective_policy(None, aten._scaled_dot_product_flash_attention.default) == save
    assert selective_policy(None, aten.randn_like.default, x) == save
    for op in (aten.native_layer_norm.default, aten.gelu.default, aten.mul.Tensor, aten.cat.default):
        assert selective_policy(None, op, x) == recompute
    # ops writing into a given tensor (what inductor's code calls) are recomputed: a cached output would skip the
    # write (kept, inductor's RNG seeds failed "Tensor cached during selective activation checkpoint has been mutated")
    assert selective_policy(None, aten.mm.out, torch.empty(8, 128), w_down, out=x) == recompute
    assert selective_policy(None, aten.randint.low_out, 0, 10, [3], out=torch.empty(3, dtype=torch.long)) == recompute


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ValueError, match="'partial'.*full, selective"):
        checkpoint_function("partial")


def test_module_option_reaches_both_streams(flux):
    from cologen.model.presets import FluxDevPreset
    from cologen.module import CoLoGenModule

    preset = FluxDevPreset(str(flux), dtype="float32", text_max_length=16)
    module = CoLoGenModule(preset=preset, prw=PRWConfig(num_experts=2, rank=4, alpha=8), gradient_checkpointing=True,
                           checkpointing_policy="selective", load_text_encoder=False)
    selective = checkpoint_function("selective")
    assert module.model._checkpoint_fn is selective  # the source stream's
    assert module.model.transformer._gradient_checkpointing_func is selective  # diffusers' main pass
    assert module.hparams["checkpointing_policy"] == "selective"
    assert CoLoGenModule(preset=preset, load_text_encoder=False).hparams["checkpointing_policy"] == "full"
    with pytest.raises(ValueError, match="full, selective"):
        CoLoGenModule(preset=preset, gradient_checkpointing=True, checkpointing_policy="sometimes",
                      load_text_encoder=False)


# ------------------------------------------------------------------------------------------ with torch.compile
def _mlp(x, w1, w2):
    return torch.nn.functional.gelu(x @ w1) @ w2


def _policy_seeing(seen: Counter):
    def policy(ctx, op, *args, **kwargs):
        seen[str(op)] += 1
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def _checkpointed(context_fn):
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}

    def step(x, w1, w2):
        return checkpoint(_mlp, x, w1, w2, use_reentrant=False, **kwargs)

    return step


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_selective_checkpoint_inside_a_compiled_region_keeps_its_matmuls(fresh_dynamo):
    """The compile-native combination: the checkpoint with its policy *inside* the compiled function. Dynamo traces
    the policy into the graph (it sees every op), and AOT autograd's min-cut partitioner (inductor's) keeps the
    saved matmul for the backward graph instead of recomputing it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    backward_mms = []

    def backward_compiler(gm, example_inputs):
        backward_mms.append(sum(node.target == torch.ops.aten.mm.default for node in gm.graph.nodes))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward_compiler,
                           partition_fn=min_cut_rematerialization_partition)
    x = torch.randn(8, 16, requires_grad=True)
    w1, w2 = torch.randn(16, 64), torch.randn(64, 16)
    reference = torch.autograd.grad(_mlp(x, w1, w2).sum(), x)[0]
    results = {}
    for name in ("selective", "full"):
        seen: Counter = Counter()
        context_fn = _policy_seeing(seen) if name == "selective" else None

        torch._dynamo.reset()
        step = torch.compile(_checkpointed(context_fn), backend=backend, fullgraph=True)
        grad = torch.autograd.grad(step(x, w1, w2).sum(), x)[0]
        torch.testing.assert_close(grad, reference)
        results[name] = (backward_mms[-1], seen)
    # backward: two matmuls (the gradients through w2 and w1), plus the first one recomputed for GELU's backward
    # under full checkpointing; the selective policy saved it
    assert results["full"][0] == 3 and results["selective"][0] == 2
    assert results["selective"][1]["aten.mm.default"] >= 2  # the policy saw the matmuls while tracing


@pytest.mark.timeout(300)
def test_selective_checkpoint_around_an_inductor_compiled_function_sees_no_block_ops(fresh_dynamo):
    """The eager checkpoint around a compiled function (what `compile_repeated_blocks` + `checkpoint_fn` amounts
    to): inductor's fused kernels never reach the dispatcher, so the policy sees only the extern matmul calls
    (`mm.out`, into buffers inductor owns, which no policy may cache) and everything is recomputed."""
    x = torch.randn(8, 16, requires_grad=True)
    w1, w2 = torch.randn(16, 64), torch.randn(64, 16)
    compiled = torch.compile(_mlp, backend="inductor")
    seen: Counter = Counter()
    out = checkpoint(compiled, x, w1, w2, use_reentrant=False, context_fn=_policy_seeing(seen))
    grad = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(_mlp(x, w1, w2).sum(), x)[0])
    assert "aten.gelu.default" not in seen and "aten.mm.default" not in seen
    assert set(seen) <= {"aten.mm.out", "aten.addmm.out"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_selective_policy_around_inductor_compiled_blocks_gives_full_checkpointings_gradients(fresh_dynamo):
    """`compile_repeated_blocks` + the selective checkpoint function: the policy sees inductor's `out=` calls, which
    it recomputes (kept, the RNG seed draws failed: "Tensor cached during selective activation checkpoint has been
    mutated"), and the attention kernel; the gradients are full checkpointing's of the same compiled blocks, bit for
    bit."""
    torch.manual_seed(0)
    config = {**TINY_TRANSFORMER, "num_layers": 1, "num_single_layers": 2}
    model = build_cologen(config, PRWConfig(num_experts=2, rank=4, alpha=8), dtype=torch.float32)
    model.train()
    inputs = make_inputs(config, 2, 4, 4, 8)
    model.compile_repeated_blocks(backend="inductor")
    use(model, "full")
    full_loss, full_grads = loss_and_grads(model, inputs)
    use(model, "selective")
    loss, grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0)
    assert grads.keys() == full_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------- a share of the blocks
def test_spread_blocks_picks_the_share_evenly_over_the_depth():
    from cologen.model.checkpointing import spread_blocks

    assert spread_blocks(57, 1.0) == list(range(57))
    assert spread_blocks(57, 0.0) == []
    assert spread_blocks(8, 0.25) == [0, 4]
    quarter = spread_blocks(57, 0.25)
    assert len(quarter) == 14 and len(set(quarter)) == 14 and max(quarter) >= 50  # reaches the deep blocks
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        spread_blocks(8, 1.5)


def test_a_share_of_the_blocks_checkpoints_those_alone_with_the_same_gradients(model_and_inputs):
    model, inputs = model_and_inputs
    use(model, None)
    _, expected = loss_and_grads(model, inputs)
    calls: Counter = Counter()

    def counting(function, *args):
        block = function if isinstance(function, torch.nn.Module) else args[0]
        calls[id(block)] += 1
        return checkpoint(function, *args, use_reentrant=False)

    blocks = [block for _, block in model._named_blocks()]
    model.enable_gradient_checkpointing(True, counting, fraction=0.5)
    _, grads = loss_and_grads(model, inputs)
    use(model, None)
    assert set(calls) == {id(blocks[0]), id(blocks[2])}  # 2 of 4 blocks, spread; each in both streams
    assert all(n == 2 for n in calls.values())
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], msg=lambda m, n=name: f"{n}: {m}")


def test_module_options_for_a_share_of_the_blocks_and_the_memory_budget_are_checked(flux):
    from cologen.model.presets import FluxDevPreset
    from cologen.module import CoLoGenModule

    preset = FluxDevPreset(str(flux), dtype="float32", text_max_length=16)
    module = CoLoGenModule(preset=preset, prw=PRWConfig(num_experts=2, rank=4, alpha=8), gradient_checkpointing=True,
                           checkpointing_blocks=0.5, load_text_encoder=False)
    assert module.hparams["checkpointing_blocks"] == 0.5
    assert module.model._checkpoint_fn is not checkpoint_function("full")  # only some blocks
    assert module.model.transformer._gradient_checkpointing_func is module.model._checkpoint_fn
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        CoLoGenModule(preset=preset, gradient_checkpointing=True, checkpointing_blocks=2.0, load_text_encoder=False)
    budgeted = CoLoGenModule(preset=preset, prw=PRWConfig(num_experts=2, rank=4, alpha=8), compile_blocks=True,
                             activation_memory_budget=0.5, load_text_encoder=False)
    assert budgeted.hparams["activation_memory_budget"] == 0.5
    for _, block in budgeted.model._named_blocks():  # each compiled forward runs under the budget
        assert inspect.getclosurevars(block.__dict__["forward"]).nonlocals["budget"] == 0.5
    with pytest.raises(ValueError, match="needs compile_blocks"):
        CoLoGenModule(preset=preset, activation_memory_budget=0.5, load_text_encoder=False)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        CoLoGenModule(preset=preset, compile_blocks=True, activation_memory_budget=-0.1, load_text_encoder=False)


def test_with_memory_budget_sets_the_budget_only_while_the_function_runs():
    from cologen.model.checkpointing import with_memory_budget

    seen = []
    run = with_memory_budget(lambda x: seen.append(torch._functorch.config.activation_memory_budget) or x + 1, 0.3)
    assert run(1) == 2 and seen == [0.3]
    assert torch._functorch.config.activation_memory_budget == 1.0
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        with_memory_budget(lambda: None, 1.5)
