"""FLUX's Euler flow-matching sampler with the condition cache.

The sigma schedule and the Euler step are diffusers' own (`FlowMatchEulerDiscreteScheduler` with FLUX's
resolution-dependent shift, as `FluxPipeline` sets it up). The source stream is computed once per request (once per
timestep bin with time-aware routing) and reused at every denoising step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from cologen.model.codecs import LatentCodec
from cologen.model.cologen_transformer import CoLoGenTransformer, ConditionCache, fingerprint
from cologen.model.packing import SourcePositionConfig, pack_latents, target_ids, text_ids, unpack_latents
from cologen.model.text_encoders import TextEmbeddings

# FLUX.1's scheduler settings (scheduler/scheduler_config.json of FLUX.1-dev)
FLUX_SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                             base_image_seq_len=256, max_image_seq_len=4096)


@dataclass
class SamplerConfig:
    """steps: Euler steps (FLUX.1-dev: 28).
    guidance: value of the guidance embedding of guidance-distilled backbones (FLUX.1-dev: 3.5); ignored otherwise.
    cfg_scale: true classifier-free guidance on the prompt (1 = off); the unconditional branch has zero text
        embeddings, as text dropout trains it.
    image_cfg_scale: guidance on the source image (1 = off; InstructPix2Pix's formula), zero source latents.
    use_cache: reuse the source stream across steps (exact; off only for comparisons).
    strength: (img2img, SDEdit) start from the first condition image noised to this level instead of from pure
        noise, and run only the schedule's last `round(steps * strength)` steps, as diffusers' img2img pipelines do
        (1 = off; needs a condition image of the output's size). For tasks whose output mostly copies the source
        (inpainting, grounding, editing) it skips the noisiest steps, where a model unsure where to draw spreads
        its drawing over what it should copy.
    effect_mask: (ours; models with `prw.isolate_closed_tokens: output`) a token the gates open keeps the base's
        velocity too where the expert's effect on it is at most this share of the sample's largest at that step
        (DiffEdit's mask; `cologen.model.cologen_transformer.small_effect`), so an edit leaves what it barely touches
        the exact copy (0 = off). An editing option: an inpainting expert's gates already find its hole.
    scheduler: FlowMatchEulerDiscreteScheduler settings (a FLUX folder's scheduler config wins when loaded).
    """

    steps: int = 28
    guidance: float = 3.5
    cfg_scale: float = 1.0
    image_cfg_scale: float = 1.0
    use_cache: bool = True
    strength: float = 1.0
    effect_mask: float = 0.0
    scheduler: dict = field(default_factory=lambda: dict(FLUX_SCHEDULER_CONFIG))

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"sampler.strength must be in (0, 1], got {self.strength}")
        if round(self.steps * self.strength) < 1:
            raise ValueError(f"sampler.strength {self.strength} leaves no step of {self.steps}: raise one of them")
        if not 0 <= self.effect_mask < 1:
            raise ValueError(f"sampler.effect_mask must be in [0, 1), got {self.effect_mask}")


@dataclass
class SampleStats:
    cache_hits: int = 0
    cache_misses: int = 0
    source_passes: int = 0  # source-stream computations (prefill included)
    # per denoising step: (timestep in [0, 1], {PRW block: chosen expert per sample (B,) or token (B, N)}),
    # for the conditional branch only
    routing: list[tuple[float, dict[str, torch.Tensor]]] = field(default_factory=list)

    @property
    def cache_hit_rate(self) -> float:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else 0.0


class FlowSampler:
    def __init__(self, model: CoLoGenTransformer, codec: LatentCodec, positions: SourcePositionConfig,
                 guidance_embeds: bool, config: SamplerConfig | None = None):
        self.model = model
        self.codec = codec
        self.positions = positions
        self.guidance_embeds = guidance_embeds
        self.config = config or SamplerConfig()

    def _timesteps(self, num_tokens: int, device) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
        """The scheduler and the timesteps to run: all `steps`, or with `strength` < 1 the last
        `round(steps * strength)` of them (diffusers' img2img `get_timesteps`)."""
        cfg = self.config
        scheduler = FlowMatchEulerDiscreteScheduler(**cfg.scheduler)
        sigmas = torch.linspace(1.0, 1.0 / cfg.steps, cfg.steps).tolist()
        sc = scheduler.config
        mu = calculate_shift(num_tokens, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
        start = cfg.steps - round(cfg.steps * cfg.strength)
        # else its first step finds its index by a device-side search (a host sync)
        scheduler.set_begin_index(start)
        return scheduler, scheduler.timesteps[start:]

    @torch.no_grad()
    def sample(self, text: TextEmbeddings, height: int, width: int,
               sources: torch.Tensor | Sequence[torch.Tensor] | None = None,
               tasks: list[str] | None = None, seed: int | list[int] = 0,
               experts: torch.Tensor | None = None, on_step: Callable[[int], None] | None = None,
               cache: ConditionCache | None = None, mask: torch.Tensor | None = None,
               keep_image: torch.Tensor | None = None) -> tuple[torch.Tensor, SampleStats]:
        """Generate images (B, 3, height, width) in [-1, 1].

        text: prompt embeddings (B, ...); sources: condition images (B, 3, Hs, Ws) in [-1, 1], a list of such
        batches (several conditions per sample: each its own source stream), or None (text-to-image); tasks: per-sample task names (choose the source position scheme); seed: one seed for the
        batch or one per sample (each sample's noise depends only on its own seed); experts: (B,) forced expert per
        sample in every PRW block (oracle routing, for evaluation; None: the routers decide); on_step: called with
        the number of denoising steps done after each one (a progress bar); cache: a condition cache kept across
        requests (keyed by each condition's content: a request that repeats a condition reuses its stream; None: one
        cache for this request); mask: (B, 1, height, width), 1 where to paint (inpainting): after every step the
        latents outside it are `keep_image`'s (B, 3, height, width; default: the first condition image), noised to
        the next step's level (its clean latents after the last), as diffusers' `FluxInpaintPipeline` does for a
        model without mask channels, so what the mask leaves is kept (exactly, with a pixel codec; None: the model
        decides what to keep). Give the image before its masked area was greyed as `keep_image` where a VAE's cells
        near the mask would otherwise carry the grey.
        """
        cfg, model, codec = self.config, self.model, self.codec
        device = next(model.parameters()).device
        b = len(text)
        if cfg.effect_mask and model.prw.isolate_closed_tokens != "output":
            raise ValueError("sampler.effect_mask keeps the base's velocity where an expert barely acts: it needs a "
                             "model with prw.isolate_closed_tokens: output (which runs the base beside it)")
        patch = codec.patch_pixels
        if height % patch or width % patch:
            raise ValueError(f"size {height}x{width} is not divisible by the patch size {patch}")
        rows, cols = height // patch, width // patch
        seeds = [seed] * b if isinstance(seed, int) else list(seed)
        noise = torch.stack([
            torch.randn(codec.latent_channels, 2 * rows, 2 * cols, generator=torch.Generator().manual_seed(s))
            for s in seeds]).to(device)
        latents = pack_latents(noise)
        noise_tokens = latents

        conditions = [] if sources is None else [sources] if isinstance(sources, torch.Tensor) else list(sources)
        tasks = tasks or ["editing"] * b
        src_tokens, sids = [], []
        for i, condition in enumerate(conditions):
            src = codec.encode(condition.to(device)).float()
            src_tokens.append(pack_latents(src))
            sids.append(self.positions.ids(tasks, src.shape[2] // 2, src.shape[3] // 2, rows, cols, device=device,
                                           condition=i))

        # Classifier-free guidance branches, batched into one forward: (text, source) kept or zeroed.
        branches = [(True, True)]
        if cfg.image_cfg_scale != 1.0 and src_tokens:
            branches += [(False, True), (False, False)]  # InstructPix2Pix: (I, 0) and (0, 0)
        elif cfg.cfg_scale != 1.0:
            branches += [(False, True)]
        text_b = TextEmbeddings(
            torch.cat([text.tokens.to(device) * float(keep_t) for keep_t, _ in branches]),
            torch.cat([text.pooled.to(device) * float(keep_t) for keep_t, _ in branches]))
        src_b = [torch.cat([tokens * float(keep_s) for _, keep_s in branches]) for tokens in src_tokens] or None
        sids_b = [ids if ids.dim() == 2 else ids.repeat(len(branches), 1, 1) for ids in sids] or None
        nb = len(branches)
        experts_b = experts.repeat(nb) if experts is not None else None
        img_ids = target_ids(rows, cols, device=device)
        txt_ids = text_ids(text_b.tokens.shape[1], device=device)
        guidance = torch.full((b * nb,), cfg.guidance, device=device) if self.guidance_embeds else None

        scheduler, timesteps = self._timesteps(latents.shape[1], device)
        paint = None
        if mask is not None:
            paint, kept_tokens = self._paint_tokens(mask, keep_image, b, height, width, src_tokens, latents, device)
            # sigma after each step (the last: 0), for the kept region's noising; indexed on the device, no host read
            next_sigmas = scheduler.sigmas[len(scheduler.sigmas) - len(timesteps):].to(device)
        if cfg.strength < 1:
            if not src_tokens or src_tokens[0].shape != latents.shape:
                raise ValueError("sampler.strength < 1 starts from the condition image: it needs one of the output's "
                                 "size")
            latents = scheduler.scale_noise(src_tokens[0], timesteps[:1], latents)
        stats = SampleStats()
        if not (cfg.use_cache and src_b is not None):
            cache = None
        elif cache is None:
            cache = ConditionCache()
        else:  # kept across requests: conditions are keyed by their content
            words = text_b.tokens if model.prw.gate_words else None  # what the gates read beside the pooled prompt
            cache.keys = [fingerprint(tokens, ids, text_b.pooled, words, guidance, experts_b)
                          for tokens, ids in zip(src_b, sids_b)]
        hits0, misses0 = (cache.hits, cache.misses) if cache is not None else (0, 0)
        if cache is not None:  # computed once per request, before the first step
            t0 = (timesteps[0] / 1000).expand(b * nb)
            stats.source_passes += model.prefill(cache, src_b, sids_b, text_b.pooled, t0, guidance, experts_b,
                                                 text_b.tokens)
        # Nothing in the loop waits for the device: the cache keys read the schedule's host copy and the routing
        # statistics are copied to the host once, after the last step.
        host_timesteps = timesteps.cpu()
        routing = []
        for t, t_host in zip(timesteps, host_timesteps):
            s = (t / 1000).expand(b * nb).to(latents.dtype)
            s_host = (t_host / 1000).expand(b * nb).to(latents.dtype)
            out = model(latents.repeat(nb, 1, 1), s, text_b, img_ids, txt_ids, src_b, sids_b, guidance, cache=cache,
                        experts=experts_b, host_timestep=s_host, effect_mask=cfg.effect_mask)
            routing.append({k: r.index[:b] for k, r in out.routing.items()})
            v = out.sample.float().chunk(nb)
            if nb == 1:
                velocity = v[0]
            elif nb == 2:
                velocity = v[1] + cfg.cfg_scale * (v[0] - v[1])
            else:
                full, img_only, none = v
                velocity = none + cfg.image_cfg_scale * (img_only - none) + cfg.cfg_scale * (full - img_only)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            if paint is not None:
                sigma = next_sigmas[len(routing) - 1].to(latents.dtype)
                kept = sigma * noise_tokens + (1 - sigma) * kept_tokens
                latents = paint * latents + (1 - paint) * kept
            if on_step is not None:
                on_step(len(routing))
        stats.routing = [(float(t) / 1000, {k: index.cpu() for k, index in step.items()})
                         for t, step in zip(host_timesteps, routing)]
        if cache is not None:
            stats.cache_hits, stats.cache_misses = cache.hits - hits0, cache.misses - misses0
            stats.source_passes += stats.cache_misses
        elif src_b is not None:
            stats.source_passes = len(timesteps) * len(src_b)
        images = codec.decode(unpack_latents(latents.float(), 2 * rows, 2 * cols))
        return images.clamp(-1, 1), stats

    def _paint_tokens(self, mask: torch.Tensor, keep_image: torch.Tensor | None, b: int, height: int, width: int,
                      src_tokens: list[torch.Tensor], latents: torch.Tensor, device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the packed latent mask (B, N, C) of `mask`, 1: paint; the packed latents the rest keeps), checked
        against the batch and the output's size."""
        if tuple(mask.shape) != (b, 1, height, width):
            raise ValueError(f"mask: expected shape {(b, 1, height, width)} (batch, 1, height, width), got "
                             f"{tuple(mask.shape)}")
        if keep_image is not None:
            if tuple(keep_image.shape) != (b, 3, height, width):
                raise ValueError(f"keep_image: expected shape {(b, 3, height, width)}, got {tuple(keep_image.shape)}")
            kept = pack_latents(self.codec.encode(keep_image.to(device)).float())
        elif not src_tokens or src_tokens[0].shape != latents.shape:
            raise ValueError("mask: the region outside it is kept from the first condition image, which must have "
                             "the output's size")
        else:
            kept = src_tokens[0]
        return pack_latents(self.codec.encode_mask(mask.to(device))).to(latents.dtype), kept.to(latents.dtype)
