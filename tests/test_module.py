"""The flow-matching LightningModule on the tiny preset and on a tiny saved FLUX pipeline."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cologen.curriculum.spec import CurriculumStep
from cologen.model.config import PRWConfig
from cologen.model.presets import FluxDevPreset, TinyPreset
from cologen.module import CoLoGenModule
from cologen.testing.flux import save_tiny_flux_pipeline
from cologen.training.config import FlowMatchingConfig, OptimConfig


def synthetic_batch(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    return {"target": target, "source": target.flip(-1), "has_source": torch.ones(b, dtype=torch.bool),
            "prompt": [f"a scene number {i}" for i in range(b)], "task": ["editing", "customized"] * (b // 2)}


@pytest.fixture(scope="module")
def tiny_random_preset():
    return TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2)


def fixed_step_loss(module, batch, seed=123):
    gen = torch.Generator().manual_seed(seed)  # same noise and timesteps every step: a fixed regression target
    return module.compute_losses(batch, train=False, generator=gen)["loss"]


@pytest.mark.parametrize(("train_base", "ratio"), [(False, 0.85), (True, 0.5)])
def test_a_few_dozen_steps_on_one_batch_reduce_the_loss(tiny_random_preset, train_base, ratio):
    torch.manual_seed(0)
    module = CoLoGenModule(preset=tiny_random_preset, prw=PRWConfig(num_experts=2, rank=8, alpha=16),
                           optim=OptimConfig(lr=1e-2, base_lr=3e-3), train_base=train_base)
    batch = synthetic_batch()
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    first = float(fixed_step_loss(module, batch).detach())
    for _ in range(40):
        optimizer.zero_grad()
        fixed_step_loss(module, batch).backward()
        optimizer.step()
    last = float(fixed_step_loss(module, batch).detach())
    assert last < ratio * first, (first, last)



@pytest.mark.parametrize("train_base", [False, True])
def test_train_base_survives_each_curriculum_step(tiny_random_preset, train_base):
    # entering a step freezes the veterans; it once froze the base too, so train_base silently trained experts alone
    module = CoLoGenModule(preset=tiny_random_preset, prw=PRWConfig(num_experts=2, rank=4, alpha=8),
                           train_base=train_base)
    for index, task in enumerate(["inpainting", "editing"]):
        step = CurriculumStep(name=task, mixture={task: 1.0}, steps=60, lr=1e-3, rho=1.0, alpha=0.0)
        module.enter_curriculum_step(index, step, {task: index})
        assert all(p.requires_grad == train_base for p in module.model.base_parameters())
        assert [any(p.requires_grad for p in module.model.expert_parameters(e)) for e in range(2)] == \
            [e == index for e in range(2)]
    batch = synthetic_batch()
    module.compute_losses(batch, train=True)["loss"].backward()
    trained = [p.grad is not None for p in module.model.base_parameters()]
    assert all(trained) if train_base else not any(trained)

def test_text_encoder_encodes_each_prompt_once(tiny_random_preset):
    # without text dropout: a dropped prompt is replaced by the empty one (test_a_dropped_prompt_is_not_encoded)
    module = CoLoGenModule(preset=tiny_random_preset, prw=PRWConfig(num_experts=1, rank=4, alpha=8),
                           flow=FlowMatchingConfig(text_dropout=0.0))
    batch = synthetic_batch()
    for _ in range(3):
        module.compute_losses(batch, train=True)
    enc = module.text_encoder
    assert enc.cache_misses == 4 and enc.cache_hits == 8
    emb = enc.encode(["a red square", "a blue circle"])
    assert emb.tokens.shape == (2, 48, 384) and emb.pooled.shape == (2, 384)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(2))  # sentence-transformers normalization
    # a real pretrained encoder: related prompts are closer than unrelated ones
    e = enc.encode(["a red square", "a red box", "a quarterly financial report"]).pooled
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


def test_dropout_zeroes_text_and_source(tiny_random_preset):
    module = CoLoGenModule(preset=tiny_random_preset, prw=PRWConfig(num_experts=1, rank=4, alpha=8),
                           flow=FlowMatchingConfig(text_dropout=1.0, source_dropout=1.0))
    inputs = module.prepare(synthetic_batch(), train=True)
    assert inputs["text"].tokens.abs().sum() == 0 and inputs["text"].pooled.abs().sum() == 0
    assert inputs["source_tokens"].abs().sum() == 0
    kept = module.prepare(synthetic_batch(), train=False)  # no dropout outside training
    assert kept["text"].pooled.abs().sum() > 0 and kept["source_tokens"].abs().sum() > 0


def test_a_callers_generator_decides_every_training_draw(tiny_random_preset):
    """Text dropout included: with a generator the losses do not depend on the global RNG (a test's result must not
    depend on the tests that ran before it)."""
    module = CoLoGenModule(preset=tiny_random_preset, prw=PRWConfig(num_experts=1, rank=4, alpha=8),
                           flow=FlowMatchingConfig(text_dropout=0.5))
    batch = synthetic_batch(b=8)
    kept = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        inputs = module.prepare(batch, train=True, generator=torch.Generator().manual_seed(0))
        kept.append(inputs["text"].pooled.abs().sum(-1) > 0)  # which prompts were kept
    assert torch.equal(kept[0], kept[1]) and 0 < int(kept[0].sum()) < 8


def test_a_dropped_prompt_is_not_encoded(tiny_random_preset):
    """Its embedding is zeroed anyway: the (cached) empty prompt is encoded in its place, and the kept prompts get
    exactly the embeddings they get without dropout."""
    module = CoLoGenModule(preset=tiny_random_preset, prw=PRWConfig(num_experts=1, rank=4, alpha=8))
    prompts = ["a red square", "a blue circle", "a green cross"]
    text = module.encode_text({"prompt": prompts}, drop=torch.tensor([False, True, False]))
    assert "a blue circle" not in module.text_encoder._cache and "" in module.text_encoder._cache
    assert text.tokens[1].abs().sum() == 0 and text.pooled[1].abs().sum() == 0
    full = module.encode_text({"prompt": prompts})
    assert torch.equal(text.tokens[[0, 2]], full.tokens[[0, 2]]) and torch.equal(text.pooled[[0, 2]], full.pooled[[0, 2]])


def test_checkpoint_holds_adapters_not_the_frozen_base(tiny_random_preset):
    module = CoLoGenModule(preset=tiny_random_preset, prw=PRWConfig(num_experts=2, rank=4, alpha=8))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    keys = set(ckpt["state_dict"])
    assert any(".prw_experts." in k for k in keys) and any(".prw_router." in k for k in keys)
    assert not any(k.startswith(("text_encoder.", "codec.")) for k in keys)
    assert not any(".prw_" not in k and k.endswith(".weight") for k in keys)
    assert ckpt["cologen"]["num_active"] == 1
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])  # strict: the frozen keys are filled back in


class ListData(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def test_flux_dev_preset_loads_a_saved_pipeline_and_trains_one_step(tmp_path):
    folder = save_tiny_flux_pipeline(tmp_path / "flux")
    module = CoLoGenModule(preset=FluxDevPreset(str(folder), dtype="bfloat16", text_max_length=16),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8))
    # frozen base in bf16, experts and routers in fp32
    assert module.model.transformer.x_embedder.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.model.expert_parameters() + module.model.router_parameters())
    assert module.guidance_embeds and module.codec.downsample == 2 and module.codec.latent_channels == 16
    before = [p.detach().clone() for p in module.model.expert_parameters(0)]
    base_before = module.model.transformer.x_embedder.weight.detach().clone()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ListData([synthetic_batch(b=2)]))
    changed = [not torch.equal(a, p) for a, p in zip(before, module.model.expert_parameters(0))]
    assert any(changed)
    assert torch.equal(base_before, module.model.transformer.x_embedder.weight)


def test_flux_resolution_shift_matches_flux_settings():
    from cologen.module import flux_time_shift

    s = torch.tensor([0.25, 0.5, 0.75])
    # 256 tokens: mu = 0.5; 4096 tokens: mu = 1.15 (FLUX.1's base_shift / max_shift)
    for tokens, mu in ((256, 0.5), (4096, 1.15)):
        expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / s - 1))
        torch.testing.assert_close(flux_time_shift(s, tokens), expected)
    assert (flux_time_shift(s, 4096) > s).all()  # larger images spend more time at high noise
