"""The Euler flow sampler and its condition cache."""

import pytest
import torch

from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule


def make_module(timestep_bins=4, weighting="prob"):
    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8,
                                         router=RouterConfig(timestep_bins=timestep_bins, weighting=weighting)))
    with torch.no_grad():  # non-trivial experts and routers
        for p in module.model.expert_parameters() + module.model.router_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    module.model.activate_next_expert()
    module.model.set_entry_progress(1.0)
    return module


def sources(b=2, seed=0):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("timestep_bins", [0, 4])
def test_cache_on_and_off_give_the_same_images(timestep_bins):
    module = make_module(timestep_bins)
    prompts, src = ["make the red square blue", "a green circle"], sources()
    on, stats_on = module.generate(prompts, src, ["editing", "customized"], seed=[1, 2], steps=8, use_cache=True)
    off, stats_off = module.generate(prompts, src, ["editing", "customized"], seed=[1, 2], steps=8, use_cache=False)
    # Same arithmetic in the same order: equal to float32 round-off (we allow 1e-5 on a [-1, 1] image).
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5)
    assert stats_off.source_passes == 8
    if timestep_bins == 0:
        assert stats_on.cache_hit_rate == 1.0 and stats_on.source_passes == 1
    else:
        # one source pass per timestep bin the schedule visits, never one per step
        assert 1 < stats_on.source_passes <= timestep_bins
        assert stats_on.cache_hit_rate == pytest.approx(1 - (stats_on.source_passes - 1) / 8)


def test_sampling_is_deterministic_per_sample_seed():
    module = make_module()
    prompts, src = ["a", "b"], sources()
    a, _ = module.generate(prompts, src, seed=[5, 6], steps=4)
    b, _ = module.generate(prompts[::-1], src.flip(0), seed=[6, 5], steps=4)
    torch.testing.assert_close(a, b.flip(0), rtol=0, atol=1e-5)
    c, _ = module.generate(prompts, src, seed=[7, 6], steps=4)
    assert (a[0] - c[0]).abs().max() > 1e-3
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_guidance_branches_and_text_to_image():
    module = make_module()
    src = sources()
    plain, _ = module.generate(["x", "y"], src, steps=3)
    cfg, _ = module.generate(["x", "y"], src, steps=3, cfg_scale=3.0)
    both, _ = module.generate(["x", "y"], src, steps=3, cfg_scale=3.0, image_cfg_scale=1.5)
    assert (plain - cfg).abs().max() > 1e-4 and (cfg - both).abs().max() > 1e-4
    t2i, stats = module.generate(["x"], None, height=32, width=32, steps=3)
    assert t2i.shape == (1, 3, 32, 32) and stats.source_passes == 0
    with pytest.raises(ValueError, match="divisible by the patch size"):
        module.generate(["x"], None, height=30, width=32, steps=2)


def test_strength_starts_from_the_noised_source_and_runs_that_share_of_the_steps(monkeypatch):
    """img2img (`strength` < 1): with a model that predicts zero velocity, Euler steps leave the start as it is, so
    the output is exactly the source noised to the first kept step's sigma; the steps run are the schedule's last
    round(steps * strength)."""
    from cologen.model.packing import pack_latents, unpack_latents
    from cologen.sampling.sampler import FlowSampler

    module = make_module()
    src, steps, strength = sources(1), 10, 0.3
    full, _ = module.generate(["a"], src, steps=steps, seed=3)
    img2img, stats = module.generate(["a"], src, steps=steps, seed=3, strength=strength)
    assert len(stats.routing) == 3 and (full - img2img).abs().max() > 1e-3
    # the timesteps run are the full schedule's last three
    sampler, codec = module.sampler(steps=steps), module.codec
    latent = codec.encode(src).float()
    tokens = pack_latents(latent).shape[1]
    _, all_t = sampler._timesteps(tokens, "cpu")
    assert [t for t, _ in stats.routing] == pytest.approx([float(t) / 1000 for t in all_t[-3:]])

    original = type(module.model).forward

    def zero_velocity(self, latents, *args, **kwargs):
        out = original(self, latents, *args, **kwargs)
        out.sample = torch.zeros_like(out.sample)
        return out

    monkeypatch.setattr(type(module.model), "forward", zero_velocity)
    still, _ = module.generate(["a"], src, steps=steps, seed=3, strength=strength)
    noise = torch.randn(latent.shape[1:], generator=torch.Generator().manual_seed(3))[None]
    scheduler, _ = FlowSampler(module.model, codec, module.positions, False, sampler.config)._timesteps(tokens, "cpu")
    sigma = float(scheduler.sigmas[steps - 3])
    expected = codec.decode(unpack_latents(pack_latents((1 - sigma) * latent + sigma * noise), *latent.shape[2:]))
    torch.testing.assert_close(still, expected.clamp(-1, 1), rtol=0, atol=1e-5)


def test_strength_needs_a_source_of_the_outputs_size_and_a_step_to_run():
    module = make_module()
    with pytest.raises(ValueError, match="needs one of the output's size"):
        module.generate(["x"], None, height=32, width=32, steps=4, strength=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength must be in"):
            module.generate(["x"], sources(1), steps=4, strength=bad)
    with pytest.raises(ValueError, match="leaves no step"):
        module.generate(["x"], sources(1), steps=4, strength=0.1)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (on a GPU each one waits for the device)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.counting, self.reads = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and func.__name__.split(".")[0] in self.SYNCING:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("use_cache,masked", [(True, False), (False, False), (True, True)])
def test_denoising_loop_never_reads_device_values_on_the_host(use_cache, masked):
    module = make_module(timestep_bins=4)  # time-aware routing: the cache key changes with the step's bin
    model, steps_done = module.model, []
    original = type(model).forward
    mode = _HostReads()

    def forward(self, *args, **kwargs):
        mode.counting = True  # from the first denoising step's model call ...
        return original(self, *args, **kwargs)

    def on_step(done: int) -> None:
        steps_done.append(done)
        mode.counting = done < 8  # ... to the end of the last step

    type(model).forward = forward
    try:
        with mode:
            module.eval()
            text = module.encode_text({"prompt": ["make the red square blue"]})
            sampler = module.sampler(steps=8, use_cache=use_cache)
            mask = torch.zeros(1, 1, 32, 32).index_fill_(2, torch.arange(8, 20), 1.0) if masked else None
            _, stats = sampler.sample(text, 32, 32, sources(1), ["editing"], seed=1, on_step=on_step, mask=mask)
    finally:
        type(model).forward = original
    assert steps_done == list(range(1, 9)) and len(stats.routing) == 8
    assert mode.reads == []


def route_everything_to(module, expert: int) -> None:
    with torch.no_grad():
        for attn in module.model.prw_modules():
            attn.prw_router.gate.bias.zero_()
            attn.prw_router.gate.bias[expert] = 5.0  # a clear choice at a probability visibly below 1


@pytest.mark.parametrize("weighting", ["straight_through", "prob"])
def test_the_oracle_run_is_skipped_exactly_where_it_would_repeat_the_learned_run(weighting, monkeypatch):
    """Where every decision already chose the task's own expert at weight exactly 1 (straight-through), oracle
    routing samples bit-identical images, so `cologen eval --oracle` and SampleValidation reuse the learned run;
    with the paper's probability weighting (weight < 1), or any other decision, they sample it."""
    from cologen.commands import evaluate as evaluate_command
    from cologen.eval import probes as probes_module
    from cologen.eval.probes import oracle_repeats_learned, run_probes

    module = make_module(timestep_bins=0, weighting=weighting).eval()
    module.task_experts = {"editing": 1}
    src = sources(3)
    probes = [{"prompt": p, "source": s, "target": s, "task": "editing", "key": str(i)}
              for i, (p, s) in enumerate(zip(["a red square", "a blue circle", "remove it"], src))]
    route_everything_to(module, 1)
    learned = run_probes(module, "editing", probes, metrics="none", steps=4)
    oracle = run_probes(module, "editing", probes, oracle=True, metrics="none", steps=4)
    same = all(torch.equal(a, b) for a, b in zip(learned.outputs, oracle.outputs))
    assert oracle_repeats_learned(module, "editing", learned) is (weighting == "straight_through")
    assert same is (weighting == "straight_through")

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("oracle", False))
        return run_probes(*args, **{**kwargs, "metrics": "none"})

    monkeypatch.setattr(probes_module, "run_probes", counted)
    evaluate_command.evaluate(module, {"editing": probes}, steps=4, oracle=True)
    assert calls == ([False] if weighting == "straight_through" else [False, True])

    route_everything_to(module, 0)  # another expert than the task's own: the oracle run is needed
    assert not oracle_repeats_learned(module, "editing", run_probes(module, "editing", probes, metrics="none",
                                                                    steps=4))



def test_eval_guidance_options_reach_the_sampler(monkeypatch):
    """`cologen eval shapeworld --cfg-scale/--image-cfg-scale/--strength` sample every run (learned and oracle) with
    those settings: the images are the sampler's own with those settings, and differ from the unguided ones."""
    from cologen.commands import evaluate as evaluate_command
    from cologen.eval import probes as probes_module
    from cologen.eval.probes import run_probes

    module = make_module(timestep_bins=0).eval()
    module.task_experts = {"editing": 1}
    probes = [{"prompt": p, "source": s, "target": s, "task": "editing", "key": str(i)}
              for i, (p, s) in enumerate(zip(["a red square", "remove the circle"], sources(2)))]
    outputs = []

    def kept(*args, **kwargs):
        run = run_probes(*args, **{**kwargs, "metrics": "none"})
        outputs.append((kwargs.get("oracle", False), run.outputs))
        return run

    monkeypatch.setattr(probes_module, "run_probes", kept)
    route_everything_to(module, 0)  # not the task's own expert, so the oracle run is sampled too
    guidance = {"cfg_scale": 3.0, "image_cfg_scale": 1.5, "strength": 0.7}
    evaluate_command.evaluate(module, {"editing": probes}, steps=3, oracle=True, sampler=guidance)
    assert [oracle for oracle, _ in outputs] == [False, True]
    for oracle, images in outputs:
        guided = run_probes(module, "editing", probes, oracle=oracle, metrics="none", steps=3, **guidance)
        plain = run_probes(module, "editing", probes, oracle=oracle, metrics="none", steps=3)
        assert all(torch.equal(a, b) for a, b in zip(images, guided.outputs))
        assert not all(torch.allclose(a, b) for a, b in zip(images, plain.outputs))
    args = evaluate_command._parser().parse_args(["shapeworld", "--base", "--cfg-scale", "2.5", "--strength", "0.8"])
    assert (args.cfg_scale, args.image_cfg_scale, args.strength) == (2.5, 1.0, 0.8)


def test_a_mask_keeps_the_source_outside_it_at_every_step(monkeypatch):
    """Inpainting with a mask (diffusers' FluxInpaintPipeline blending): the model sees the kept region as the source
    noised to exactly the level of the step it is called at, the output keeps it exactly (pixel codec), and an
    all-paint mask samples as no mask."""
    from cologen.model.packing import pack_latents

    module = make_module()
    src = sources(2)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:20, 4:28] = 1
    mask[1, :, 0:5, 0:3] = 1  # 5 x 3 pixels: cuts through latent cells and tokens
    free, _ = module.generate(["a", "b"], src, ["inpainting"] * 2, seed=[1, 2], steps=5)
    painted, _ = module.generate(["a", "b"], src, ["inpainting"] * 2, seed=[1, 2], steps=5, mask=mask)
    kept = mask.expand(-1, 3, -1, -1) == 0
    assert torch.equal(painted[kept], src.clamp(-1, 1)[kept])
    assert (painted - free)[~kept].abs().max() > 0  # inside, the model paints (with the kept context)
    everything, _ = module.generate(["a", "b"], src, ["inpainting"] * 2, seed=[1, 2], steps=5,
                                    mask=torch.ones(2, 1, 32, 32))
    assert torch.equal(everything, free)

    seen, original = [], type(module.model).forward

    def record(self, latents, timestep, *args, **kwargs):
        seen.append((latents.clone(), timestep.clone()))
        return original(self, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(type(module.model), "forward", record)
    module.generate(["a", "b"], src, ["inpainting"] * 2, seed=[1, 2], steps=5, mask=mask)
    noise = pack_latents(torch.stack([torch.randn(12, 16, 16, generator=torch.Generator().manual_seed(s))
                                      for s in (1, 2)]))
    keep_tokens = pack_latents(module.codec.encode_mask(mask)) == 0
    source_tokens = pack_latents(module.codec.encode(src))
    assert len(seen) == 5
    for latents, timestep in seen[1:]:  # the first step starts from pure noise, as diffusers' does at strength 1
        sigma = timestep[:, None, None]
        expected = sigma * noise + (1 - sigma) * source_tokens
        torch.testing.assert_close(latents[keep_tokens], expected[keep_tokens], rtol=0, atol=1e-6)


def test_keep_image_is_what_the_mask_leaves():
    """`keep_image` (the image before its masked area was greyed, which a VAE's cells near the mask need) is what the
    output keeps outside the mask; it needs the output's shape, and then no condition of the output's size."""
    module = make_module()
    src, other = sources(1), sources(1, seed=5)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 10:22, 6:18] = 1
    out, _ = module.generate(["x"], src, ["inpainting"], seed=1, steps=3, mask=mask, keep_image=other)
    kept = mask.expand(-1, 3, -1, -1) == 0
    assert torch.equal(out[kept], other.clamp(-1, 1)[kept])
    with pytest.raises(ValueError, match=r"keep_image: expected shape \(1, 3, 32, 32\)"):
        module.generate(["x"], src, ["inpainting"], steps=2, mask=mask, keep_image=other[:, :, :16])
    t2i, _ = module.generate(["x"], None, height=32, width=32, steps=2, mask=mask, keep_image=other)
    assert torch.equal(t2i[kept], other.clamp(-1, 1)[kept])


def test_a_mask_needs_its_shape_and_a_source_of_the_outputs_size():
    module = make_module()
    with pytest.raises(ValueError, match=r"mask: expected shape \(1, 1, 32, 32\)"):
        module.generate(["x"], sources(1), ["inpainting"], steps=2, mask=torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="kept from the first condition image, which must have the output's size"):
        module.generate(["x"], None, height=32, width=32, steps=2, mask=torch.ones(1, 1, 32, 32))


def test_a_latent_cell_is_painted_when_any_of_its_pixels_is():
    """A VAE-like codec (8 x 8 pixels per latent cell): one masked pixel repaints its whole cell, so no pixel of the
    region is kept from the greyed source; the pixel codec maps each pixel's mask exactly."""
    from cologen.model.codecs import LatentCodec, PixelCodec

    class Cells(LatentCodec):
        latent_channels, downsample = 16, 8

        def encode(self, images):
            return images

        def decode(self, latents):
            return latents

    mask = torch.zeros(1, 1, 32, 32)
    mask[0, 0, 9, 17] = 1
    cells = Cells().encode_mask(mask)
    assert cells.shape == (1, 16, 4, 4)
    expected = torch.zeros(4, 4)
    expected[1, 2] = 1
    assert torch.equal(cells[0, 0], expected) and torch.equal(cells[0, 15], expected)
    exact = PixelCodec(2)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    # painting = where the mask is: the codec's latents of (image * mask) equal (its latents) * (latent mask)
    torch.testing.assert_close(exact.encode(image * mask), exact.encode(image) * exact.encode_mask(mask))


def test_eval_keep_unmasked_keeps_each_inpainting_probes_source_outside_its_region():
    """`cologen eval shapeworld --keep-unmasked`: each inpainting probe is sampled with its own region as the mask
    (its source kept exactly outside it); probes of other tasks in the same call paint everywhere."""
    import numpy as np

    from cologen.commands import evaluate as evaluate_command
    from cologen.eval.probes import inpainting_mask, run_probes

    module = make_module(timestep_bins=0).eval()
    src = sources(2)
    regions = [np.zeros((32, 32), bool), np.zeros((32, 32), bool)]
    regions[0][4:12, 4:12] = True
    regions[1][20:30, 2:9] = True
    probes = [{"prompt": "a red square", "source": s, "target": s, "task": "inpainting", "key": str(i), "region": r}
              for i, (s, r) in enumerate(zip(src, regions))]
    run = run_probes(module, "inpainting", probes, metrics="none", steps=3, keep_unmasked=True)
    for image, s, r in zip(run.outputs, src, regions):
        assert torch.equal(image[:, ~torch.from_numpy(r)], s.clamp(-1, 1)[:, ~torch.from_numpy(r)])
        assert not torch.equal(image, s)
    plain = run_probes(module, "inpainting", probes, metrics="none", steps=3)
    assert not torch.equal(plain.outputs[0][:, ~torch.from_numpy(regions[0])], src[0][:, ~torch.from_numpy(regions[0])])

    mixed = inpainting_mask([probes[0], {**probes[1], "task": "editing"}])
    assert torch.equal(mixed[0, 0], torch.from_numpy(regions[0]).float()) and bool((mixed[1] == 1).all())
    assert inpainting_mask([{**probes[0], "task": "editing"}]) is None
    args = evaluate_command._parser().parse_args(["shapeworld", "--base", "--keep-unmasked"])
    assert args.keep_unmasked
