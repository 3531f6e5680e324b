"""FLUX.1-dev-sized CoLoGen models with random weights and their inputs, for benchmarks and memory plans.

Nothing is downloaded: the transformer is FLUX.1-dev's published `transformer/config.json`, built directly in the
base dtype on the target device (or on the meta device, where no memory is allocated at all).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import FluxTransformer2DModel

from cologen.model.cologen_transformer import CoLoGenTransformer
from cologen.model.config import PRWConfig
from cologen.model.packing import source_ids, target_ids, text_ids
from cologen.model.text_encoders import TextEmbeddings
from cologen.training.flops import Workload

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# The paper's PRW bank: one expert per curriculum step, rank 128, alpha 2 x rank.
PAPER_PRW = PRWConfig(num_experts=5, rank=128, alpha=256)


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(config: dict, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """Random weights created in `dtype` on `device`: a 12B model never exists in fp32 or on the host."""
    with default_dtype(dtype), torch.device(device):
        return FluxTransformer2DModel(**config)


def build_cologen(config: dict, prw: PRWConfig = PAPER_PRW, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.bfloat16, all_active: bool = True) -> CoLoGenTransformer:
    """Base in `dtype`, experts and routers in fp32 (as FluxDevPreset + CoLoGenModule build them); with
    `all_active` every expert is active and the newest trains (the last curriculum step, the costliest)."""
    transformer = build_transformer(config, device, dtype)
    with torch.device(device):
        model = CoLoGenTransformer(transformer, prw)
    if all_active:
        for _ in range(prw.num_experts - 1):
            model.activate_next_expert()
        model.set_entry_progress(1.0)
    model.freeze_for_curriculum()
    return model


def make_inputs(config: dict, batch: int, rows: int, cols: int, text_tokens: int, device: str | torch.device = "cpu",
                source_rows: int | None = None, source_cols: int | None = None, seed: int = 0) -> dict:
    """Keyword arguments of `CoLoGenTransformer.forward` (rows x cols packed noisy tokens, an aligned source
    condition) plus the flow-matching `target`."""
    sr, sc = source_rows or rows, source_cols or cols
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = config["in_channels"]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    guidance = torch.ones(batch, device=device) if config.get("guidance_embeds") else None
    return dict(latents=randn(batch, rows * cols, c), timestep=torch.rand(batch, generator=g).to(device),
                text=TextEmbeddings(randn(batch, text_tokens, config["joint_attention_dim"]),
                                    randn(batch, config["pooled_projection_dim"])),
                img_ids=target_ids(rows, cols, device=device), txt_ids=text_ids(text_tokens, device=device),
                source_tokens=randn(batch, sr * sc, c),
                source_ids=source_ids("aligned", sr, sc, rows, cols, device=device), guidance=guidance,
                target=randn(batch, rows * cols, c))


def workload_of(inputs: dict) -> Workload:
    b, n, _ = inputs["latents"].shape
    return Workload(b, n, inputs["source_tokens"].shape[1], inputs["text"].tokens.shape[1])


def forward_loss(model: CoLoGenTransformer, inputs: dict) -> torch.Tensor:
    """The flow-matching MSE of CoLoGenModule (without the veteran term, which has no matmuls)."""
    args = {k: v for k, v in inputs.items() if k != "target"}
    out = model(**args)
    return torch.nn.functional.mse_loss(out.sample.float(), inputs["target"].float())
