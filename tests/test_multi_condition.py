"""Several conditions per sample (issue 15): each condition is its own source stream through the same blocks,
routed by its own content and cached on its own; the main pass sees every condition; one condition given as a list
is exactly the single-condition model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cologen.model.codecs import PixelCodec
from cologen.model.cologen_transformer import CoLoGenTransformer, ConditionCache, condition_key
from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.packing import SourcePositionConfig, source_ids
from cologen.model.veteran import newest_usage
from cologen.sampling.sampler import FlowSampler, SamplerConfig
from tests.test_model_prw import B, make_inputs, make_source, make_transformer, randomize_experts, run


def model_with_experts(num_experts: int = 3, bins: int = 4, scale: float = 1.0) -> CoLoGenTransformer:
    model = CoLoGenTransformer(make_transformer(), PRWConfig(num_experts=num_experts, rank=4, alpha=8,
                                                             router=RouterConfig(timestep_bins=bins)))
    for _ in range(num_experts - 1):
        model.activate_next_expert()
    model.set_entry_progress(1.0)
    randomize_experts(model, scale=scale)
    return model.eval()


def second_condition(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, _ = make_source(seed)
    return tokens, source_ids("shifted", 4, 4, 4, 4, condition=1)


def test_condition_planes_keep_the_first_conditions_ids():
    for scheme in ("aligned", "shifted", "scaled"):
        first, second = source_ids(scheme, 4, 4, 4, 4), source_ids(scheme, 4, 4, 4, 4, condition=1)
        assert (first[:, 0] == 1).all() and (second[:, 0] == 2).all()
        torch.testing.assert_close(first[:, 1:], second[:, 1:], rtol=0, atol=0)


@torch.no_grad()
def test_one_condition_as_a_list_is_bit_identical_to_the_tensor():
    model, x = model_with_experts(), make_inputs()
    tokens, ids = make_source()
    single, listed = run(model, x, (tokens, ids)), run(model, x, ([tokens], [ids]))
    assert torch.equal(single.sample, listed.sample)
    assert single.routing.keys() == listed.routing.keys() == set(model.prw_block_names)
    for name in single.routing:
        assert torch.equal(single.routing[name].index, listed.routing[name].index)


@torch.no_grad()
def test_each_condition_is_its_own_stream_and_never_sees_the_noisy_tokens():
    model = model_with_experts()
    first, second = make_source(), second_condition()
    conditions = ([first[0], second[0]], [first[1], second[1]])
    x = make_inputs()
    cache = ConditionCache()
    out = run(model, x, conditions, cache=cache)
    # condition 2 perturbed: condition 1's keys/values and routing unchanged, the output changed
    moved = ([first[0], second[0] + torch.randn_like(second[0])], conditions[1])
    cache_moved = ConditionCache()
    out_moved = run(model, x, moved, cache=cache_moved)
    key = model.cache_key(x["timestep"], 0)
    for name, (k, v) in cache.entries[key].kv.items():
        assert torch.equal(k, cache_moved.entries[key].kv[name][0]) and torch.equal(v, cache_moved.entries[key].kv[name][1])
    assert (out.sample - out_moved.sample).abs().max() > 1e-4  # the main pass sees condition 2
    # noisy tokens and timestep inside one bin changed: no source stream moves
    y = make_inputs(seed=9)
    y["timestep"], y["text"] = x["timestep"], x["text"]
    cache_y = ConditionCache()
    run(model, y, conditions, cache=cache_y)
    for key, state in cache.entries.items():
        for name, (k, v) in state.kv.items():
            assert torch.equal(k, cache_y.entries[key].kv[name][0]) and torch.equal(v, cache_y.entries[key].kv[name][1])


@torch.no_grad()
def test_each_condition_is_routed_by_its_own_content():
    model = model_with_experts(scale=2.0)
    first, second = make_source(), second_condition()
    x = make_inputs()
    both = run(model, x, ([first[0], second[0]], [first[1], second[1]]))
    assert set(both.routing) == {condition_key(n, i) for n in model.prw_block_names for i in (0, 1)}
    alone = model.encode_source(second[0], second[1], x["text"].pooled, x["timestep"])
    for name in model.prw_block_names:  # the second condition decides as it would alone
        assert torch.equal(both.routing[f"{name}/cond1"].index, alone.routing[name].index)
    assert any(not torch.equal(both.routing[n].index, both.routing[f"{n}/cond1"].index)
               for n in model.prw_block_names)  # and here differently from the first condition
    # the veteran gate's U counts every (block, condition) decision alike
    hard, _ = newest_usage(both.routing, model.newest_expert)
    shares = [float((r.index == model.newest_expert).float().mean()) for r in both.routing.values()]
    assert len(shares) == 2 * len(model.prw_block_names)
    assert float(hard) == sum(shares) / len(shares)


@torch.no_grad()
def test_the_cache_holds_one_entry_per_condition_and_timestep_bin():
    model = model_with_experts()
    first, second = make_source(), second_condition()
    conditions = ([first[0], second[0]], [first[1], second[1]])
    x, cache = make_inputs(), ConditionCache()
    for t in (0.9, 0.8, 0.1):  # bins 3, 3, 0
        x["timestep"] = torch.full((B,), t)
        torch.testing.assert_close(run(model, x, conditions, cache=cache).sample, run(model, x, conditions).sample,
                                   rtol=0, atol=1e-6)
    assert (cache.hits, cache.misses) == (2, 4) and len(cache.entries) == 4


@torch.no_grad()
def test_sampler_takes_a_list_of_conditions_and_prefills_each_once():
    model = model_with_experts(bins=0)  # no time-aware routing: one source pass per condition per request
    codec, positions = PixelCodec(), SourcePositionConfig()
    sampler = FlowSampler(model, codec, positions, guidance_embeds=False, config=SamplerConfig(steps=3))
    text = make_inputs()["text"]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(B, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    tasks = ["editing"] * B
    one, stats_one = sampler.sample(text, 16, 16, a, tasks, seed=1)
    listed, _ = sampler.sample(text, 16, 16, [a], tasks, seed=1)
    assert torch.equal(one, listed)
    two, stats = sampler.sample(text, 16, 16, [a, b], tasks, seed=1)
    assert stats_one.source_passes == 1 and stats.source_passes == 2 and stats.cache_hits == 2 * 3
    assert (two - one).abs().max() > 1e-4
    assert {k for step in stats.routing for k in step[1]} == {
        condition_key(n, i) for n in model.prw_block_names for i in (0, 1)}


def test_an_exported_pipeline_takes_several_condition_images_per_prompt(tmp_path):
    from cologen.commands.export import pipeline_from_module
    from cologen.errors import UsageError
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule
    from cologen.pipeline import CoLoGenPipeline

    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2, seed=3),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8), sampler=SamplerConfig(steps=3))
    module.model.activate_next_expert()
    module.model.set_entry_progress(1.0)
    randomize_experts(module.model)
    g = torch.Generator().manual_seed(4)
    subject, layout = (torch.rand(3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    expected, stats = module.generate(["the subject where the map puts it"], [subject[None], layout[None]],
                                      ["customized"], seed=[7])
    assert stats.source_passes >= 2
    pipeline_from_module(module).save_pretrained(tmp_path / "exported")
    pipe = CoLoGenPipeline.from_pretrained(tmp_path / "exported")
    kwargs = dict(task="customized", seed=7, output_type="pt", progress=False)
    got = pipe("the subject where the map puts it", image=[subject, layout], **kwargs).images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # one list per prompt; a single condition as a one-element list is the plain call
    two = pipe(["a", "b"], image=[[subject, layout], [layout, subject]], task="customized", seed=[1, 2],
               output_type="pt", progress=False).images
    assert two.shape == (2, 3, 32, 32)
    assert torch.equal(pipe("a", image=[subject], **kwargs).images, pipe("a", image=subject, **kwargs).images)
    for image, message in (([[subject], [subject, layout]], "same number"), ([subject, layout, subject], "for 2")):
        with pytest.raises(UsageError, match=message):
            pipe(["a", "b"], image=image, task="customized", progress=False)


# ------------------------------------------------------------------------------------------ data and training
def _layout_datamodule(shapeworld_dir, **kwargs):
    from cologen.data import MixtureDataModule

    customized = str(shapeworld_dir / "customized" / "train-*.tar")
    return MixtureDataModule(
        train_shards={"inpainting": str(shapeworld_dir / "inpainting" / "train-*.tar"), "customized_layout": customized},
        val_shards={"customized_layout": str(shapeworld_dir / "customized" / "val-*.tar")},
        val_tasks=["customized_layout"], batch_size=4, num_workers=0, batches_per_epoch=6, shuffle_buffer=8,
        val_samples_per_task=4, **kwargs)


def test_customized_layout_adds_the_subjects_box_as_a_second_condition(shapeworld_dir):
    from cologen.data.geometry import box_of

    dm = _layout_datamodule(shapeworld_dir, mixture={"customized_layout": 1.0})
    batch = next(iter(dm.train_dataloader()))
    assert batch["task"] == ["customized_layout"] * 4 and len(batch["extra_sources"]) == 1
    layout = batch["extra_sources"][0]
    assert layout.shape == batch["source"].shape
    for i in range(4):  # white exactly over the subject's box in the target, black elsewhere
        x0, y0, x1, y1 = box_of(batch["region"][i, 0].numpy())
        expected = -torch.ones_like(layout[i])
        expected[:, y0:y1, x0:x1] = 1.0
        assert torch.equal(layout[i], expected)
        assert batch["meta"][i]["build"]["roles"] == ["subject", "layout"]


def test_batches_hold_one_condition_count_and_train_both_streams(shapeworld_dir):
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule

    dm = _layout_datamodule(shapeworld_dir, mixture={"inpainting": 0.5, "customized_layout": 0.5})
    seen = set()
    for batch, _ in zip(dm.train_dataloader(), range(6)):
        tasks = set(batch["task"])
        assert len(tasks) == 1  # the two tasks have different condition counts: never in one batch
        seen |= tasks
        assert ("extra_sources" in batch) == (tasks == {"customized_layout"})
    assert seen == {"inpainting", "customized_layout"}
    batch = next(b for b in dm.train_dataloader() if "extra_sources" in b)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=1),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8))
    inputs = module.prepare(batch, train=True, generator=torch.Generator().manual_seed(0))
    assert isinstance(inputs["source_tokens"], list) and len(inputs["source_tokens"]) == 2
    assert (inputs["source_ids"][0][..., 0] == 1).all() and (inputs["source_ids"][1][..., 0] == 2).all()
    assert (inputs["source_ids"][0][..., 2] < 0).any()  # the reference is shifted off the grid, the layout is not
    assert (inputs["source_ids"][1][..., 2] >= 0).all()
    losses = module.compute_losses(batch, train=True, generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.expert_parameters(0))


def test_layout_iou_rewards_the_layout_and_not_a_copy_of_the_reference(shapeworld_dir):
    from cologen.eval.probes import probes_from_batch, score_probes

    dm = _layout_datamodule(shapeworld_dir, mixture={"customized_layout": 1.0})
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))
    probes = probes_from_batch(batch, 4)
    assert all(len(p["extra_sources"]) == 1 for p in probes)
    target = score_probes(probes, [p["target"] for p in probes])
    copy = score_probes(probes, [p["source"] for p in probes])
    mean = lambda rows: sum(r["customized_layout/layout_iou"] for r in rows) / len(rows)  # noqa: E731
    assert mean(target) > 0.8 and mean(copy) < 0.3
    assert all("customized_layout/subject_score" in r for r in target)


@torch.no_grad()
def test_probes_with_two_conditions_are_sampled_with_both(shapeworld_dir):
    from cologen.eval.probes import probes_from_batch, run_probes
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule

    dm = _layout_datamodule(shapeworld_dir, mixture={"customized_layout": 1.0})
    dm.setup("fit")
    probes = probes_from_batch(next(iter(dm.val_dataloader()[0])), 2)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=1),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8), sampler=SamplerConfig(steps=2))
    run = run_probes(module, "customized_layout", probes)
    assert len(run.outputs) == 2 and "customized_layout/layout_iou" in run.rows[0]
    assert {k for _, per_block in run.routing for k in per_block} >= {
        condition_key(n, i) for n in module.model.prw_block_names for i in (0, 1)}


def test_the_tiny_multi_condition_config_adds_a_sixth_step_after_the_papers_five(shapeworld_dir):
    import yaml

    from cologen.curriculum.spec import CurriculumSpec, CurriculumStep
    from cologen.data import MixtureDataModule

    root = Path(__file__).resolve().parents[1] / "experiments" / "tiny"
    base = yaml.safe_load((root / "curriculum.yaml").read_text())
    layer = yaml.safe_load((root / "multi_condition.yaml").read_text())
    steps = layer["curriculum"]["spec"]["steps"]
    assert steps[:5] == base["curriculum"]["spec"]["steps"]  # the paper's five, as the default runs them
    assert steps[5]["name"] == "customized_layout" and layer["model"]["prw"]["num_experts"] == 6
    spec = CurriculumSpec(steps=[CurriculumStep(**s) for s in steps])
    spec.validate(6, available_tasks=list(layer["data"]["init_args"]["train_shards"]), entry_warmup_steps=50)
    shards = layer["data"]["init_args"]["train_shards"]
    rebase = {t: str(shapeworld_dir / Path(p).parent.name / Path(p).name) for t, p in shards.items()}
    dm = MixtureDataModule(train_shards=rebase, mixture=steps[5]["mixture"], batch_size=4, num_workers=0,
                           batches_per_epoch=8, shuffle_buffer=8)
    counts = {len(b.get("extra_sources") or ()) for b, _ in zip(dm.train_dataloader(), range(8))}
    assert counts == {0, 1}  # the step's own task with two conditions, the replayed tasks with one


@torch.no_grad()
def test_a_kept_condition_cache_recomputes_only_the_condition_that_changed():
    from cologen.commands.export import pipeline_from_module
    from cologen.model.presets import TinyPreset
    from cologen.module import CoLoGenModule

    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=1),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8), sampler=SamplerConfig(steps=6))
    randomize_experts(module.model)
    pipe = pipeline_from_module(module)
    g = torch.Generator().manual_seed(2)
    a, b, b2 = (torch.rand(3, 32, 32, generator=g) * 2 - 1 for _ in range(3))
    kwargs = dict(task="customized", seed=3, output_type="pt", progress=False)
    fresh = {name: pipe("p", image=images, **kwargs) for name, images in (("ab", [a, b]), ("ab2", [a, b2]))}
    per_condition = fresh["ab"].stats.source_passes // 2  # one pass per timestep bin the steps visit
    assert per_condition >= 1 and fresh["ab"].stats.source_passes == 2 * per_condition

    pipe.enable_condition_cache()
    first = pipe("p", image=[a, b], **kwargs)
    again = pipe("p", image=[a, b], **kwargs)
    changed = pipe("p", image=[a, b2], **kwargs)
    new_prompt = pipe("q", image=[a, b2], **kwargs)
    assert first.stats.source_passes == 2 * per_condition
    assert again.stats.source_passes == 0 and changed.stats.source_passes == per_condition  # only b2's stream
    assert new_prompt.stats.source_passes == 2 * per_condition  # the streams depend on the prompt
    for got, want in ((first, fresh["ab"]), (again, fresh["ab"]), (changed, fresh["ab2"])):
        assert torch.equal(got.images, want.images)  # a hit is exact


# ------------------------------------------------------------------------------------- stored two-condition data
def test_subjects200k_with_a_canny_map_of_the_target_gives_two_condition_samples(tmp_path):
    import io
    import json

    import numpy as np
    from PIL import Image

    from cologen.data.builders import TaskBuilder
    from cologen.data.control import canny
    from cologen.data.records import BadSample, decode_sample
    from cologen.testing import recipe_fixtures as F
    from data_recipes import subjects200k

    table = F.write_parquet(F.subjects200k_table(2), tmp_path / "in" / "train-00000-of-00001.parquet")
    subjects200k.main(["--input", str(table), "--output", str(tmp_path / "out"), "--crop-format", "png",
                       "--second-condition", "canny", "--quiet"])
    raws = F.read_samples(tmp_path / "out")
    assert len(raws) == 4
    for raw in raws:
        assert raw["json"]["conditions"] == [{"role": "subject"}, {"role": "canny"}]
        target = np.asarray(Image.open(io.BytesIO(raw["image.png"])).convert("RGB"))
        edges = np.asarray(Image.open(io.BytesIO(raw["source.1.png"])))
        assert np.array_equal(edges, canny(target))  # the target view's edges, as the control builder draws them
        members = {k: v for k, v in raw.items() if k not in ("__shard__",)}
        members["json"] = json.dumps(raw["json"]).encode()
        sample = decode_sample(members)
        assert len(sample.extra_sources) == 1 and sample.extra_sources[0].shape == target.shape
        ex = TaskBuilder(resolution=64)(sample, "customized", np.random.default_rng(0))
        assert len(ex["extra_sources"]) == 1 and ex["extra_sources"][0].shape == ex["target"].shape
        assert ex["meta"]["build"]["roles"] == ["subject", "canny"] and not ex["meta"]["build"]["swapped"]
    # a record whose conditions disagree with its members is one counted, one-line skip
    bad = {**members, "json": json.dumps({**raws[0]["json"], "conditions": [{"role": "subject"}]}).encode()}
    with pytest.raises(BadSample, match="conditions lists 1 conditions but the sample has 2"):
        decode_sample(bad)
    bad = {**members, "json": json.dumps({**raws[0]["json"], "conditions": [{"role": "subject"}, {"role": "x"}]}).encode()}
    with pytest.raises(BadSample, match=r"conditions\[1\].role must be one of"):
        decode_sample(bad)


def test_aspect_buckets_also_bucket_stored_samples_by_condition_count(tmp_path):
    from cologen.data import MixtureDataModule
    from cologen.testing import recipe_fixtures as F
    from data_recipes import subjects200k

    table = F.write_parquet(F.subjects200k_table(4), tmp_path / "in" / "train-00000-of-00001.parquet")
    for name, extra in (("two", ["--second-condition", "canny"]), ("one", [])):
        subjects200k.main(["--input", str(table), "--output", str(tmp_path / name), "--quiet", *extra])
    dm = MixtureDataModule(train_shards={"customized": [str(tmp_path / "two"), str(tmp_path / "one")]},
                           mixture={"customized": 1.0}, batch_size=2, num_workers=0, resolution=64,
                           aspect_buckets=True, batches_per_epoch=8, shuffle_buffer=4)
    counts = [len(b.get("extra_sources") or ()) for b, _ in zip(dm.train_dataloader(), range(8))]
    assert set(counts) == {0, 1}  # both kinds arrive, never in one batch (collate would refuse)


def test_two_subjects_in_one_scene_from_two_references(tmp_path):
    from cologen.data import MixtureDataModule
    from cologen.eval.probes import probes_from_batch, score_probes
    from data_recipes.shapeworld import ShapeWorldConfig, generate

    generate(tmp_path, train=8, val=8, seed=0, config=ShapeWorldConfig(tasks=("two_subjects",), shard_size=8),
             workers=1, progress=False)
    shards = {"two_subjects": str(tmp_path / "two_subjects" / "val-*.tar")}
    dm = MixtureDataModule(train_shards=shards, val_shards=shards, val_tasks=["two_subjects"],
                           mixture={"two_subjects": 1.0}, batch_size=4, num_workers=0, val_samples_per_task=8)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["extra_sources"]) == 1 and batch["task"] == ["two_subjects"] * 4
    probes = [p for b in dm.val_dataloader()[0] for p in probes_from_batch(b, 8)]
    for p in probes:
        first, second = p["meta"]["build"]["subject_boxes"]
        assert first[2] <= 16 <= second[0] + 4  # the first subject on the left, the second on the right
        assert p["meta"]["build"]["roles"] == ["subject", "subject"]
    mean = lambda rows: sum(r["two_subjects/both_placed"] for r in rows) / len(rows)  # noqa: E731
    target = score_probes(probes, [p["target"] for p in probes])
    copies = score_probes(probes, [p["source"] for p in probes]) + score_probes(
        probes, [p["extra_sources"][0] for p in probes])
    assert mean(target) == 1.0 and mean(copies) < 0.2
