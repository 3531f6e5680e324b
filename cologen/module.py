"""CoLoGenModule: the LightningModule that trains the PRW experts and routers with rectified flow."""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F

from .model.cologen_transformer import CoLoGenOutput, CoLoGenTransformer
from .model.config import PRWConfig
from .model.packing import pack_latents, source_ids, target_ids, text_ids
from .model.presets import Preset, TinyPreset
from .model.text_encoders import TextEmbeddings
from .model.veteran import routing_entropy, veteran_loss
from .training.config import FlowMatchingConfig, OptimConfig, SourcePositionConfig, VeteranConfig
from .training.schedule import WarmupSchedule


def flux_time_shift(s: torch.Tensor, seq_len: int, base_len: int = 256, max_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> torch.Tensor:
    """FLUX's resolution-dependent shift of s (calculate_shift in diffusers' FluxPipeline)."""
    mu = base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


class CoLoGenModule(L.LightningModule):
    """The backbone (frozen), the PRW expert bank and routers, the flow-matching objective.

    Args:
        preset: builds the backbone (TinyPreset by default; FluxDevPreset for FLUX.1-dev).
        prw: expert bank and router settings.
        flow: the rectified-flow objective and the condition dropout.
        veteran: rho and alpha of the veteran loss (the curriculum sets them per step).
        optim: optimizer and learning-rate schedule.
        positions: position scheme of the source tokens per task.
        train_base: train the whole backbone (the tiny base pretraining of `make base`) instead of the experts.
        gradient_checkpointing: recompute each block's activations in the backward pass.
        load_text_encoder: False when batches carry precomputed text embeddings (`text_tokens`, `text_pooled`).
        offload_text_encoder: keep the frozen text encoder in CPU memory and move it to the accelerator only while
            it encodes prompts that are not cached yet (saves its GPU memory; precomputed embeddings save more).
        attention_backend: a diffusers attention backend name ('native', 'flash', '_native_cudnn', ...);
            null keeps diffusers' default (PyTorch SDPA, which picks flash / memory-efficient kernels itself).
    """

    def __init__(self, preset: Preset | None = None, prw: PRWConfig | None = None,
                 flow: FlowMatchingConfig | None = None, veteran: VeteranConfig | None = None,
                 optim: OptimConfig | None = None, positions: SourcePositionConfig | None = None,
                 train_base: bool = False, gradient_checkpointing: bool = False, load_text_encoder: bool = True,
                 offload_text_encoder: bool = False, attention_backend: str | None = None):
        super().__init__()
        self.preset = preset or TinyPreset()
        self.prw_config = prw or PRWConfig()
        self.flow = flow or FlowMatchingConfig()
        self.veteran = veteran or VeteranConfig()
        self.optim = optim or OptimConfig()
        self.positions = positions or SourcePositionConfig()
        self.train_base = train_base
        self.save_hyperparameters()

        backbone = self.preset.build(load_text_encoder=load_text_encoder)
        self.guidance_embeds = backbone.guidance_embeds
        self.offload_text_encoder = offload_text_encoder
        if offload_text_encoder:
            # Not a registered submodule: Lightning's device placement and checkpoints leave it alone.
            self._offloaded = [backbone.text_encoder]
            self.text_encoder = None
        else:
            self.text_encoder = backbone.text_encoder
        self.codec = backbone.codec
        self.model = CoLoGenTransformer(backbone.transformer, self.prw_config)
        self.model.freeze_for_curriculum()
        if train_base:
            for p in self.model.base_parameters():
                p.requires_grad_(True)
        self.model.enable_gradient_checkpointing(gradient_checkpointing)
        if attention_backend is not None:
            self.model.transformer.set_attention_backend(attention_backend)
        self.lr_schedule = WarmupSchedule(self.optim.warmup_steps, self.optim.schedule, self.optim.total_steps,
                                          self.optim.min_lr_ratio)

    # ------------------------------------------------------------------------------------------------ inputs
    def encode_text(self, batch: dict, drop: torch.Tensor | None = None) -> TextEmbeddings:
        """Prompt embeddings from the batch's precomputed arrays when present, else from the (cached) encoder.
        Dropped prompts get zero embeddings."""
        if "text_tokens" in batch:
            text = TextEmbeddings(batch["text_tokens"], batch["text_pooled"])
        elif self.offload_text_encoder and self._offloaded[0] is not None:
            encoder = self._offloaded[0]
            text = encoder.encode_offloaded(list(batch["prompt"]), self.device)
        else:
            if self.text_encoder is None:
                raise RuntimeError("batch has no precomputed text embeddings and the text encoder was not loaded "
                                   "(model.load_text_encoder: false)")
            text = self.text_encoder.encode(list(batch["prompt"]))
        text = text.to(self.device, torch.float32)
        if drop is not None:
            keep = (~drop).float()
            text = TextEmbeddings(text.tokens * keep[:, None, None], text.pooled * keep[:, None])
        return text

    def encode_images(self, batch: dict, key: str, latent_key: str) -> torch.Tensor:
        if latent_key in batch:
            return batch[latent_key].to(self.device, torch.float32)
        return self.codec.encode(batch[key].to(self.device)).float()

    def source_position_ids(self, tasks: list[str], rows: int, cols: int, t_rows: int, t_cols: int) -> torch.Tensor:
        schemes = [self.positions.scheme(t) for t in tasks]
        per_scheme = {s: source_ids(s, rows, cols, t_rows, t_cols, device=self.device) for s in set(schemes)}
        if len(per_scheme) == 1:
            return next(iter(per_scheme.values()))
        return torch.stack([per_scheme[s] for s in schemes])

    def prepare(self, batch: dict, train: bool, generator: torch.Generator | None = None) -> dict:
        """Everything the transformer needs for one flow-matching step on `batch`."""
        target = self.encode_images(batch, "target", "target_latent")
        b, _, h, w = target.shape
        x0 = pack_latents(target)

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=self.device)

        text_drop = rand(b) < self.flow.text_dropout if train else None
        text = self.encode_text(batch, text_drop)

        has_source = batch.get("has_source")
        source_tokens = sids = None
        if has_source is not None and bool(has_source.any()):
            source = self.encode_images(batch, "source", "source_latent")
            keep = has_source.to(self.device)
            if train:
                keep = keep & (rand(b) >= self.flow.source_dropout)
            source_tokens = pack_latents(source) * keep.float()[:, None, None]
            sids = self.source_position_ids(list(batch["task"]), source.shape[2] // 2, source.shape[3] // 2,
                                            h // 2, w // 2)

        s = torch.sigmoid(torch.randn(b, generator=generator, device=self.device) * self.flow.logit_std
                          + self.flow.logit_mean)
        if self.flow.resolution_shift:
            s = flux_time_shift(s, x0.shape[1])
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        x_t = (1 - s)[:, None, None] * x0 + s[:, None, None] * noise
        guidance = (torch.full((b,), self.flow.guidance, device=self.device) if self.guidance_embeds else None)
        return dict(latents=x_t, timestep=s, text=text, img_ids=target_ids(h // 2, w // 2, device=self.device),
                    txt_ids=text_ids(text.tokens.shape[1], device=self.device), source_tokens=source_tokens,
                    source_ids=sids, guidance=guidance, velocity=noise - x0)

    # ------------------------------------------------------------------------------------------------- steps
    def forward(self, inputs: dict) -> CoLoGenOutput:
        return self.model(inputs["latents"], inputs["timestep"], inputs["text"], inputs["img_ids"],
                          inputs["txt_ids"], inputs["source_tokens"], inputs["source_ids"], inputs["guidance"])

    def compute_losses(self, batch: dict, train: bool, generator: torch.Generator | None = None) -> dict:
        inputs = self.prepare(batch, train, generator)
        out = self(inputs)
        per_sample = F.mse_loss(out.sample.float(), inputs["velocity"], reduction="none").mean(dim=(1, 2))
        losses = {"loss_task": per_sample.mean(), "per_sample": per_sample}
        if out.routing:
            vet, usage = veteran_loss(out.routing, self.model.newest_expert, self.veteran.rho, self.veteran.alpha)
            losses.update(loss_veteran=vet, usage_newest=usage, routing_entropy=routing_entropy(out.routing).detach())
            losses["loss"] = losses["loss_task"] + vet
        else:
            losses["loss"] = losses["loss_task"]
        return losses

    def _log_losses(self, losses: dict, tasks: list[str], stage: str) -> None:
        on_step = stage == "train"
        b = len(tasks)
        for key in ("loss", "loss_task", "loss_veteran", "usage_newest", "routing_entropy"):
            if key in losses:
                self.log(f"{stage}/{key}", losses[key], on_step=on_step, on_epoch=not on_step, batch_size=b,
                         prog_bar=key == "loss", sync_dist=not on_step)
        per_sample = losses["per_sample"].detach()
        for task in sorted(set(tasks)):
            idx = [i for i, t in enumerate(tasks) if t == task]
            self.log(f"{stage}/loss_task/{task}", per_sample[idx].mean(), on_step=on_step, on_epoch=not on_step,
                     batch_size=len(idx), sync_dist=not on_step)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch, train=True)
        self._log_losses(losses, list(batch["task"]), "train")
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        # A fixed generator per batch: the validation loss is comparable across evaluations.
        gen = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        losses = self.compute_losses(batch, train=False, generator=gen)
        self._log_losses(losses, list(batch["task"]), "val")
        return losses["loss"]

    # ------------------------------------------------------------------------------------------- optimization
    def configure_optimizers(self):
        o = self.optim
        router_lr = o.router_lr if o.router_lr is not None else o.lr / 2
        # Every expert is in the optimizer from the start (frozen and inactive ones have no grad and are skipped),
        # so the optimizer's state layout never changes across curriculum steps.
        groups = [
            {"name": "experts", "params": self.model.expert_parameters(), "lr": o.lr},
            {"name": "routers", "params": self.model.router_parameters(), "lr": router_lr},
        ]
        if self.train_base:
            groups.append({"name": "base", "params": self.model.base_parameters(), "lr": o.base_lr})
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("nothing to train: prw.num_experts is 0 and train_base is false")
        kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if o.eight_bit:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError("optim.eight_bit needs bitsandbytes: pip install 'cologen[gpu]'") from err
            optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- checkpoints
    def frozen_state_keys(self) -> set[str]:
        """State-dict keys restored from the preset rather than stored: the frozen base and the encoders."""
        if self.train_base:
            return {k for k in self.state_dict() if k.startswith(("text_encoder.", "codec."))}
        base = {id(p) for p in self.model.base_parameters()}
        named = dict(self.named_parameters())
        return {k for k, p in named.items() if id(p) in base or k.startswith(("text_encoder.", "codec."))}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = self.frozen_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["cologen"] = {"preset": self.preset.name, "num_active": self.model.num_active,
                                 "prw": asdict(self.prw_config)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The frozen weights come from the preset, not the checkpoint; everything else must be present.
        current = self.state_dict()
        for k in self.frozen_state_keys():
            checkpoint["state_dict"].setdefault(k, current[k])
