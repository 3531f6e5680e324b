"""The memory switches of the flux_dev preset change what they claim, on a tiny saved FLUX pipeline: parameter
dtypes, which blocks are recomputed, how many activation bytes a step keeps, whether text encoders are built or held
outside the module, the attention kernel, and the optimizer class."""

from __future__ import annotations

import sys
import types
import weakref

import lightning as L
import pytest
import torch
from jsonargparse import set_parsing_settings

from cologen.lightning_cli import CoLoGenCLI
from cologen.model.config import PRWConfig
from cologen.model.presets import FluxDevPreset
from cologen.model.text_encoders import FluxTextEncoder, TextEncoder
from cologen.module import CoLoGenModule
from cologen.training.config import OptimConfig
from cologen.training.fsdp import CoLoGenFSDPStrategy
from cologen.training.strategies import CurriculumDDPStrategy

PRW = PRWConfig(num_experts=3, rank=4, alpha=8)


def _module(flux, **kwargs) -> CoLoGenModule:
    torch.manual_seed(0)
    return CoLoGenModule(preset=FluxDevPreset(str(flux), dtype="bfloat16", text_max_length=16), prw=PRW, **kwargs)


def _batch(b=2, size=32):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    return {"target": target, "source": target.flip(-1), "has_source": torch.ones(b, dtype=torch.bool),
            "prompt": ["a red square", "a blue circle"][:b], "task": ["editing"] * b}


def _loss(module, batch, seed=7):
    return module.compute_losses(batch, train=False, generator=torch.Generator().manual_seed(seed))["loss"]


def _cli(flux, *configs: str) -> CoLoGenCLI:
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    args = []
    for c in ("curriculum.yaml", "data_stage1.yaml", *configs):
        args += ["--config", f"experiments/flux_dev/{c}"]
    args += ["--model.preset.init_args.path", str(flux), "--model.preset.init_args.text_max_length", "16",
             "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false"]
    return CoLoGenCLI(CoLoGenModule, L.LightningDataModule, subclass_mode_data=True, run=False,
                      save_config_callback=None, parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
                      args=args)


@pytest.mark.parametrize(("strategy", "cls"), [("ddp.yaml", CurriculumDDPStrategy), ("fsdp.yaml", CoLoGenFSDPStrategy)])
def test_flux_dev_configs_turn_the_memory_switches_on(flux, strategy, cls):
    cli = _cli(flux, strategy)
    module, model = cli.model, cli.model.model
    assert isinstance(cli.trainer.strategy, cls)
    # frozen base in bf16, experts and routers in fp32
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.base_parameters())
    assert all(p.dtype == torch.float32 for p in model.expert_parameters() + model.router_parameters())
    # checkpointing in both streams
    assert model.gradient_checkpointing and model.transformer.gradient_checkpointing
    # the text encoder is kept outside the module (not moved to the GPU, not in checkpoints)
    assert module.text_encoder is None and isinstance(module._offloaded[0], FluxTextEncoder)
    assert not any(k.startswith("text_encoder.") for k in module.state_dict())
    # the paper's settings
    assert (model.prw.rank, model.prw.alpha, model.prw.num_experts) == (128, 256, 5)
    assert module.optim.lr == 1e-4 and module.flow.guidance == 1.0 and not module.optim.eight_bit
    spec = cli.config_init["curriculum"].spec
    assert [s.steps for s in spec.steps] == [200000, 200000, 400000, 50000, 200000]


def test_precomputed_config_builds_no_text_encoder(flux, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder must not be loaded")

    monkeypatch.setattr(FluxTextEncoder, "from_pretrained", refuse)
    module = _cli(flux, "precomputed.yaml").model
    assert module.text_encoder is None and not hasattr(module, "_offloaded")
    assert not any(isinstance(m, TextEncoder) for m in module.modules())


def test_precomputed_embeddings_train_without_a_text_encoder(flux):
    module = _module(flux, load_text_encoder=False)
    assert module.text_encoder is None
    assert not any(isinstance(m, TextEncoder) for m in module.modules())
    batch = _batch()
    with pytest.raises(RuntimeError, match="load_text_encoder"):
        module.compute_losses(batch, train=True)
    g = torch.Generator().manual_seed(1)
    batch.update(text_tokens=torch.randn(2, 16, 32, generator=g), text_pooled=torch.randn(2, 32, generator=g))
    module.compute_losses(batch, train=True)["loss"].backward()
    assert all(p.grad is not None for p in module.model.expert_parameters(0))


def test_offloaded_encoder_stays_outside_the_module(flux):
    module = _module(flux, offload_text_encoder=True)
    encoder = module._offloaded[0]
    assert module.text_encoder is None and encoder not in list(module.modules())
    assert not any(k.startswith("text_encoder.") for k in module.state_dict())
    emb = module.encode_text({"prompt": ["a red square", "a blue circle"]})
    assert emb.tokens.shape == (2, 16, 32)
    module.encode_text({"prompt": ["a red square"]})
    assert (encoder.cache_misses, encoder.cache_hits) == (2, 1)  # an encoded prompt is not encoded again
    assert encoder.device.type == "cpu"  # back on the host after encoding
    module.to("meta")  # device placement (Lightning's .to) moves the model, not the offloaded encoder
    assert module.model.transformer.x_embedder.weight.is_meta and encoder.device.type == "cpu"


def _block_calls(module, batch) -> dict[str, int]:
    calls: dict[str, int] = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, block in module.model._named_blocks()]
    module.compute_losses(batch, train=False, generator=torch.Generator().manual_seed(7))["loss"].backward()
    for h in hooks:
        h.remove()
    return calls


def _saved_bytes(module, batch) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass at the end of the forward."""
    refs: list[weakref.ref] = []
    params = {p.untyped_storage()._cdata for p in module.parameters()}

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(module, batch)
    storages = {}
    for ref in refs:
        t = ref()
        if t is not None and t.untyped_storage()._cdata not in params:
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    del loss
    return sum(storages.values())


def test_checkpointing_recomputes_every_block_of_both_streams_and_keeps_less(flux):
    plain, ckpt = _module(flux), _module(flux, gradient_checkpointing=True)
    batch = _batch()
    names = plain.model.block_names
    assert _block_calls(plain, batch) == dict.fromkeys(names, 2)  # source pass + main pass
    assert _block_calls(ckpt, batch) == dict.fromkeys(names, 4)  # + both recomputed in the backward pass
    grads = [p.grad for p in plain.model.expert_parameters(0)]
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, ckpt.model.expert_parameters(0)))
    assert _saved_bytes(ckpt, batch) < 0.5 * _saved_bytes(plain, batch)


def test_attention_backend_switch_reaches_the_prw_processors(flux, restore_attention_backend):
    from diffusers.models.attention_dispatch import AttentionBackendName

    from cologen.compat import set_active_attention_backend

    math = _module(flux, attention_backend="_native_math")
    set_active_attention_backend(AttentionBackendName.NATIVE)  # the default module's backend
    default = _module(flux)
    processors = [b.attn.processor for _, b in math.model._named_blocks()]
    assert all(str(p._attention_backend.value) == "_native_math" for p in processors)
    batch = _batch()
    torch.testing.assert_close(_loss(default, batch), _loss(math, batch), rtol=2e-2, atol=1e-3)
    # the unfused kernel keeps the attention probabilities for the backward pass; PyTorch's fused one does not
    assert _saved_bytes(math, batch) > _saved_bytes(default, batch)


def _fake_bitsandbytes() -> types.ModuleType:
    class AdamW8bit(torch.optim.AdamW):
        pass

    AdamW8bit.__module__ = "bitsandbytes.optim.adamw"
    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    return bnb


def test_eight_bit_optimizer_switch(flux, monkeypatch):
    module = _module(flux, optim=OptimConfig(eight_bit=True))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match="bitsandbytes"):
        module.configure_optimizers()
    bnb = _fake_bitsandbytes()
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    adapters = {id(p) for p in module.model.expert_parameters() + module.model.router_parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == adapters  # states only for adapters
    # sharded adapters are DTensors, which 8-bit optimizers cannot step: the FSDP strategy says so
    strategy = CoLoGenFSDPStrategy()
    strategy.optimizers = [optimizer]
    with pytest.raises(ValueError, match="shard_adapters"):
        strategy._check_optimizers()
    CoLoGenFSDPStrategy(shard_adapters=False)._check_optimizers()
