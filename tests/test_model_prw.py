"""The backbone with its source stream, the PRW expert bank, the router and the veteran loss."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

from cologen.model.attention import PRWAttnProcessor
from cologen.model.cologen_transformer import CoLoGenTransformer, ConditionCache
from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.packing import source_ids, target_ids, text_ids
from cologen.model.presets import tiny_transformer_config
from cologen.model.text_encoders import TextEmbeddings
from cologen.model.veteran import veteran_loss

B, N, C, L = 4, 16, 48, 8  # 16 noisy tokens on a 4x4 grid, 8 text tokens


def make_transformer(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_transformer_config(width=64, heads=2, double_layers=1, single_layers=2)
    return FluxTransformer2DModel(**cfg)


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    text = TextEmbeddings(torch.randn(B, L, 384, generator=g), torch.randn(B, 384, generator=g))
    return dict(latents=torch.randn(B, N, C, generator=g), timestep=torch.rand(B, generator=g), text=text,
                img_ids=target_ids(4, 4), txt_ids=text_ids(L))


def make_source(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=g), source_ids("aligned", 4, 4, 4, 4)


def randomize_experts(model, scale=0.2, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.expert_parameters() + model.router_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def run(model, inputs, source=None, **kw):
    src, sids = source if source is not None else (None, None)
    return model(inputs["latents"], inputs["timestep"], inputs["text"], inputs["img_ids"], inputs["txt_ids"],
                 src, sids, **kw)


def test_without_source_tokens_output_equals_plain_diffusers():
    plain = make_transformer()
    model = CoLoGenTransformer(copy.deepcopy(plain), PRWConfig(num_experts=3, rank=4, alpha=8))
    randomize_experts(model)
    x = make_inputs()
    ours = run(model, x).sample
    ref = plain(hidden_states=x["latents"], encoder_hidden_states=x["text"].tokens,
                pooled_projections=x["text"].pooled, timestep=x["timestep"], img_ids=x["img_ids"],
                txt_ids=x["txt_ids"], return_dict=False)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_source_tokens_change_the_output():
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=2, rank=4, alpha=8)).eval()
    x = make_inputs()
    assert (run(model, x, make_source()).sample - run(model, x).sample).abs().max() > 1e-3


def test_zero_up_projection_expert_equals_the_base_source_stream():
    base = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=0)).eval()
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=2, rank=4, alpha=8)).eval()
    randomize_experts(model)
    with torch.no_grad():
        for attn in model.prw_modules():
            for expert in attn.prw_experts.experts:
                expert.to_k.lora_B.weight.zero_()
                expert.to_v.lora_B.weight.zero_()
    x, src = make_inputs(), make_source()
    torch.testing.assert_close(run(model, x, src).sample, run(base, x, src).sample, rtol=0, atol=1e-6)
    # and a non-zero expert does change it
    randomize_experts(model)
    assert (run(model, x, src).sample - run(base, x, src).sample).abs().max() > 1e-4


@pytest.mark.parametrize("init", ["copy", "zero"])
@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_activate_next_expert_keeps_the_eval_output(init, granularity):
    cfg = PRWConfig(num_experts=3, rank=4, alpha=8, init=init, router=RouterConfig(granularity=granularity))
    model = CoLoGenTransformer(make_transformer(), cfg).eval()
    randomize_experts(model)
    x, src = make_inputs(), make_source()
    with torch.no_grad():
        before = run(model, x, src).sample
        for expected in (1, 2):
            assert model.activate_next_expert() == expected
            after = run(model, x, src)
            torch.testing.assert_close(after.sample, before, rtol=0, atol=1e-5)
            # the old choice is kept: nobody is routed to the newcomer yet
            assert all((r.index != expected).all() for r in after.routing.values())
    with pytest.raises(RuntimeError, match="already active"):
        model.activate_next_expert()


def test_zero_init_gives_every_rank_the_same_expert():
    """Ranks draw different random numbers once training runs (each step is seeded per rank); a zero-init expert
    activated there must still be the same on every rank (DDP syncs the weights only when it wraps the model)."""
    cfg = PRWConfig(num_experts=2, rank=4, alpha=8, init="zero")
    models = []
    for rank in (0, 1):
        torch.manual_seed(0)  # the same model on both ranks
        model = CoLoGenTransformer(make_transformer(), cfg)
        torch.manual_seed(rank + 1)  # the ranks' own streams at the step boundary
        model.activate_next_expert()
        models.append(model)
    for p0, p1 in zip(models[0].expert_parameters(1), models[1].expert_parameters(1), strict=True):
        assert torch.equal(p0, p1)
    ups = [m.lora_B.weight for attn in models[0].prw_modules() for m in attn.prw_experts.experts[1].modules()
           if hasattr(m, "lora_B")]
    assert ups and all((w == 0).all() for w in ups)


def test_activation_freezes_veterans_and_trains_the_newest():
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=3, rank=4, alpha=8))
    model.freeze_for_curriculum()
    assert all(p.requires_grad for p in model.expert_parameters(0))
    assert not any(p.requires_grad for p in model.expert_parameters(1) + model.base_parameters())
    model.activate_next_expert()
    assert not any(p.requires_grad for p in model.expert_parameters(0) + model.expert_parameters(2))
    assert all(p.requires_grad for p in model.expert_parameters(1) + model.router_parameters())
    assert not any(p.requires_grad for p in model.base_parameters())


def test_entry_offset_anneals_so_the_newcomer_can_win():
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=2, rank=4, alpha=8)).eval()
    x, src = make_inputs(), make_source()
    model.activate_next_expert()
    assert model.entry_offset[1] == -model.prw.router.entry_offset
    model.set_entry_progress(1.0)
    assert model.entry_offset.abs().sum() == 0
    probs = run(model, x, src).routing["double.0"].probs
    # with the offset gone, the copied entry ties the veteran
    torch.testing.assert_close(probs[:, 0], probs[:, 1])


def capture_source_kv(model, inputs, source):
    """The source K/V that the main pass actually appends, block by block."""
    seen = {}
    original = PRWAttnProcessor.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
            prw=None):
        if prw is not None and prw.mode == "main" and prw.source is not None:
            seen[self.name] = tuple(t.detach().clone() for t in prw.source.kv)
        return original(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, prw)

    PRWAttnProcessor.__call__ = spy
    try:
        out = run(model, inputs, source)
    finally:
        PRWAttnProcessor.__call__ = original
    return seen, out.sample


def test_noisy_tokens_never_reach_the_source_stream():
    cfg = PRWConfig(num_experts=2, rank=4, alpha=8, router=RouterConfig(timestep_bins=0))
    model = CoLoGenTransformer(make_transformer(), cfg).eval()
    randomize_experts(model)
    src = make_source()
    a, b = make_inputs(seed=1), make_inputs(seed=1)
    b["latents"] = b["latents"] + torch.randn_like(b["latents"])
    b["timestep"] = torch.rand(B)
    kv_a, out_a = capture_source_kv(model, a, src)
    kv_b, out_b = capture_source_kv(model, b, src)
    assert set(kv_a) == set(model.block_names)
    for name in kv_a:
        torch.testing.assert_close(kv_a[name], kv_b[name], rtol=0, atol=0)
    assert (out_a - out_b).abs().max() > 1e-3  # while the noisy stream did see the change


def test_inactive_experts_are_never_selected_and_eval_routing_is_deterministic():
    cfg = PRWConfig(num_experts=4, rank=4, alpha=8, router=RouterConfig(granularity="token"))
    model = CoLoGenTransformer(make_transformer(), cfg)
    randomize_experts(model, scale=2.0)
    model.activate_next_expert()  # 2 of 4 active
    model.set_entry_progress(1.0)
    model.train()
    for seed in range(10):
        out = run(model, make_inputs(seed), make_source(seed + 100))
        for r in out.routing.values():
            assert int(r.index.max()) <= 1
            assert torch.all(r.probs[..., 2:] == 0)
    model.eval()
    x, src = make_inputs(), make_source()
    first, second = run(model, x, src), run(model, x, src)
    torch.testing.assert_close(first.sample, second.sample, rtol=0, atol=0)
    for name in first.routing:
        assert torch.equal(first.routing[name].index, second.routing[name].index)


def test_veteran_loss_reaches_the_routers_and_only_trainable_parameters():
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=3, rank=4, alpha=8)).train()
    randomize_experts(model)
    model.activate_next_expert()
    model.set_entry_progress(1.0)
    out = run(model, make_inputs(), make_source())
    loss, usage = veteran_loss(out.routing, model.newest_expert, rho=0.8, alpha=0.5)
    assert 0.0 <= float(usage) <= 1.0
    torch.testing.assert_close(loss, 0.5 * (usage - 0.8).abs())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router_parameters())
    for p in model.base_parameters() + model.expert_parameters(0) + model.expert_parameters(2):
        assert p.grad is None


def test_straight_through_usage_gradient_has_the_right_sign():
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=2, rank=4, alpha=8)).train()
    model.activate_next_expert()
    model.set_entry_progress(1.0)
    out = run(model, make_inputs(), make_source())
    # rho = 1 asks for more routing to the newest expert: a descent step must raise its logit bias
    loss, _ = veteran_loss(out.routing, model.newest_expert, rho=1.0, alpha=1.0)
    loss.backward()
    router = model.prw_modules()[0].prw_router
    assert router.gate.bias.grad[1] < 0 < router.gate.bias.grad[0]


def test_condition_cache_is_exact_and_keyed_by_timestep_bin():
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=2, rank=4, alpha=8)).eval()
    randomize_experts(model)
    x, src = make_inputs(), make_source()
    cache = ConditionCache()
    with torch.no_grad():
        for t in (0.9, 0.8, 0.1):
            x["timestep"] = torch.full((B,), t)
            torch.testing.assert_close(run(model, x, src, cache=cache).sample, run(model, x, src).sample,
                                       rtol=0, atol=1e-6)
    # 4 bins: 0.9 and 0.8 share bin 3, 0.1 is bin 0
    assert (cache.hits, cache.misses) == (1, 2)



def test_condition_cache_keeps_its_own_copy_of_a_source_state():
    # compiled blocks under CUDA graphs write every replay's outputs into the same buffers: a cached state that
    # shared them would change under the next source pass
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=2, rank=4, alpha=8)).eval()
    randomize_experts(model)
    x, (src, ids) = make_inputs(), make_source()
    with torch.no_grad():
        state = model.encode_source(src, ids, x["text"].pooled, torch.full((B,), 0.9))
    cache = ConditionCache()
    kept = cache.put(("c", 3), state)
    assert cache.get(("c", 3)) is kept
    expected = {name: (k.clone(), v.clone()) for name, (k, v) in state.kv.items()}
    index = {name: r.index.clone() for name, r in state.routing.items()}
    for k, v in state.kv.values():  # the producer reuses its buffers
        k.zero_()
        v.zero_()
    for r in state.routing.values():
        r.index.fill_(1 - r.index[0])
    assert state.kv and state.routing
    for name, (k, v) in kept.kv.items():
        torch.testing.assert_close((k, v), expected[name], rtol=0, atol=0)
    for name, r in kept.routing.items():
        assert torch.equal(r.index, index[name])

def test_per_sample_position_schemes_in_one_batch():
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=1, rank=4, alpha=8)).eval()
    x = make_inputs()
    src, aligned = make_source()
    shifted = source_ids("shifted", 4, 4, 4, 4)
    mixed = torch.stack([aligned, shifted, aligned, shifted])
    out_mixed = run(model, x, (src, mixed)).sample
    torch.testing.assert_close(out_mixed[0::2], run(model, x, (src, aligned)).sample[0::2], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_mixed[1::2], run(model, x, (src, shifted)).sample[1::2], rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=2, rank=4, alpha=8)).train()
        randomize_experts(model)
        model.freeze_for_curriculum()
        model.enable_gradient_checkpointing(ckpt)
        torch.manual_seed(7)  # same router noise
        out = run(model, make_inputs(), make_source())
        (out.sample.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.expert_parameters(0)]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
