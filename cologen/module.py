"""CoLoGenModule: the LightningModule that trains the PRW experts and routers with rectified flow.

Implements method.md, "Training objective" (the loss, dropouts, optimizer groups) and the model side of a
curriculum step's entry (`enter_curriculum_step`: next expert, frozen veterans, rho / alpha, learning rates).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace

import lightning as L
import torch
import torch.nn.functional as F

from .compat import set_attention_backend
from .curriculum.spec import CurriculumStep
from .model.checkpointing import check_share, checkpoint_function
from .model.cologen_transformer import CoLoGenOutput, CoLoGenTransformer
from .model.config import PRWConfig
from .model.packing import SourcePositionConfig, pack_latents, target_ids, text_ids
from .model.presets import Preset, TinyPreset
from .model.quantize import check_quantize_base, quantize_frozen_base
from .model.text_encoders import TextEmbeddings
from .model.veteran import (
    expert_usage,
    newest_usage,
    routing_entropy,
    task_balanced_weights,
    task_routing_loss,
    token_gate_loss,
    veteran_loss,
)
from .sampling.sampler import FlowSampler, SamplerConfig, SampleStats
from .training.config import FlowMatchingConfig, OptimConfig, VeteranConfig
from .training.lr_schedule import LRSchedule
from .typed_config import coerce


def flux_time_shift(s: torch.Tensor, seq_len: int) -> torch.Tensor:
    """FLUX's resolution-dependent shift of s, with mu from diffusers' FluxPipeline (FLUX.1 defaults)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len)
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def changed_tokens(x0: torch.Tensor, source_tokens: torch.Tensor | None,
                   has_source: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) bool: the target tokens that differ from the source token at the same place (the hole of an
    inpainting source, a grounding overlay, an edit); None without a source of the target's token grid. A dropped
    source (zeros) or a sample without one counts as everything changed."""
    if source_tokens is None or source_tokens.shape != x0.shape:
        return None
    changed = (x0 - source_tokens).abs().amax(-1) > 1e-3
    if has_source is not None:
        changed = changed | ~has_source.to(changed.device).bool()[:, None]
    return changed


def samples_of(tasks: list[str], chosen: list[str], device) -> torch.Tensor:
    """(B,) bool: which samples' tasks are among `chosen`."""
    return torch.tensor([t in chosen for t in tasks], dtype=torch.bool, device=device)


def changed_token_weights(changed: torch.Tensor, extra: float, tasks: list[str] | None,
                          chosen: list[str] | None) -> torch.Tensor:
    """(B, N): `1 + extra` on the `changed` tokens of the samples whose task is among `chosen` (every sample when
    `chosen` or `tasks` is None), 1 elsewhere."""
    if chosen is not None and tasks is not None:
        changed = changed & samples_of(tasks, chosen, changed.device)[:, None]
    return 1.0 + extra * changed.float()


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
        checkpointing_policy: what a checkpointed block recomputes (with `gradient_checkpointing`): 'full'
            (everything; the least memory) or 'selective' (keeps the attention outputs and the down-projection
            matmuls, recomputes the cheap rest: less recompute for more memory; docs/memory.md has both).
        checkpointing_blocks: the share of the blocks checkpointed (with `gradient_checkpointing`), spread over the
            depth; the others keep their activations. 1 checkpoints all; a smaller share trades memory for the
            recompute (on an H200, compiled FLUX.1-dev: docs/benchmarks.md).
        load_text_encoder: False when batches carry precomputed text embeddings (`text_tokens`, `text_pooled`).
        offload_text_encoder: keep the frozen text encoder in CPU memory and move it to the accelerator only while
            it encodes prompts that are not cached yet (saves its GPU memory; precomputed embeddings save more).
        attention_backend: a diffusers attention backend name ('native', 'flash', '_native_cudnn', ...);
            null keeps diffusers' default (PyTorch SDPA, which picks flash / memory-efficient kernels itself).
        quantize_base: store the frozen base's block weights quantized with torchao (`pip install
            'cologen[quant]'`): 'int8_weight_only' (any device) or 'float8' (CUDA compute capability >= 8.9, bf16
            base); null keeps the preset's dtype. Experts and routers stay fp32. Not with train_base
            (docs/quantization.md).
        compile_blocks: `torch.compile` the transformer blocks (regional compilation: one graph per block class and
            pass, so the compile cost does not grow with depth; `CoLoGenTransformer.compile_repeated_blocks`). On
            an H200 it made FLUX.1-dev's batch-4 step 1.32x faster (docs/benchmarks.md); the first step compiles.
        activation_memory_budget: with `compile_blocks`, the share (0-1) of what each compiled block's backward reads
            that its forward keeps; the rest is recomputed in the backward, the cheapest ops first (torch's
            partitioner: selective recompute that sees the fused kernels). On an H200, FLUX.1-dev batch 1 at 0.7:
            29.3% MFU in 39.5 GB; batch 4 at 0.01: 37.2% in 43.9 GB, 15% faster than checkpointing every block
            (docs/benchmarks.md). null keeps everything the backward reads.
        sampler: the sampler used by validation, `predict` and `generate`.
        init_from: a checkpoint of an earlier stage: its experts, routers and active-expert count are loaded
            (the optimizer starts fresh), e.g. `runs/tiny/stage1/last.ckpt` for stage 2.
    """

    def __init__(self, preset: Preset | None = None, prw: PRWConfig | None = None,
                 flow: FlowMatchingConfig | None = None, veteran: VeteranConfig | None = None,
                 optim: OptimConfig | None = None, positions: SourcePositionConfig | None = None,
                 train_base: bool = False, gradient_checkpointing: bool = False, checkpointing_policy: str = "full",
                 checkpointing_blocks: float = 1.0,
                 load_text_encoder: bool = True,
                 offload_text_encoder: bool = False, attention_backend: str | None = None,
                 sampler: SamplerConfig | None = None, init_from: str | None = None,
                 quantize_base: str | None = None, compile_blocks: bool = False,
                 activation_memory_budget: float | None = None):
        super().__init__()
        # Configs arrive as objects (Python, LightningCLI) or as the plain dicts a checkpoint stores.
        self.preset = coerce(Preset, preset) or TinyPreset()
        self.prw_config = coerce(PRWConfig, prw) or PRWConfig()
        self.flow = coerce(FlowMatchingConfig, flow) or FlowMatchingConfig()
        self.veteran = coerce(VeteranConfig, veteran) or VeteranConfig()
        self.optim = coerce(OptimConfig, optim) or OptimConfig()
        self.positions = coerce(SourcePositionConfig, positions) or SourcePositionConfig()
        sampler = coerce(SamplerConfig, sampler)
        if self.veteran.gate_weight and not self.prw_config.token_gate:
            raise ValueError("veteran.gate_weight supervises token gates: set prw.token_gate: true (or gate_weight: 0)")
        if self.prw_config.hard_gate and not self.veteran.gate_weight:
            raise ValueError("prw.hard_gate learns only from its supervision: set veteran.gate_weight > 0")
        if self.veteran.gate_prompt_tasks is not None and not self.prw_config.gate_prompt:
            raise ValueError("veteran.gate_prompt_tasks picks the experts whose gates read the prompt: it needs "
                             "prw.gate_prompt: true")
        check_quantize_base(quantize_base, train_base)
        checkpoint_fn = checkpoint_function(checkpointing_policy)  # ValueError naming the policies
        check_share("checkpointing_blocks", checkpointing_blocks)
        if activation_memory_budget is not None:
            if not compile_blocks:
                raise ValueError("activation_memory_budget sets what compiled blocks keep: it needs compile_blocks: true")
            check_share("activation_memory_budget", activation_memory_budget)
        self.train_base = train_base
        # Plain data only: checkpoints load with torch.load(weights_only=True) and loggers show readable values.
        self.save_hyperparameters({
            "preset": self.preset.to_hparams(), "prw": asdict(self.prw_config), "flow": asdict(self.flow),
            "veteran": asdict(self.veteran), "optim": asdict(self.optim), "positions": asdict(self.positions),
            "sampler": asdict(sampler) if sampler is not None else None, "train_base": train_base,
            "gradient_checkpointing": gradient_checkpointing, "checkpointing_policy": checkpointing_policy,
            "checkpointing_blocks": checkpointing_blocks,
            "load_text_encoder": load_text_encoder,
            "offload_text_encoder": offload_text_encoder, "attention_backend": attention_backend,
            "quantize_base": quantize_base, "compile_blocks": compile_blocks,
            "activation_memory_budget": activation_memory_budget, "init_from": init_from})

        backbone = self.preset.build(load_text_encoder=load_text_encoder)
        self.guidance_embeds = backbone.guidance_embeds
        self.sampler_config = sampler or SamplerConfig()
        if backbone.scheduler_config is not None and sampler is None:
            self.sampler_config.scheduler = dict(backbone.scheduler_config)
        self.offload_text_encoder = offload_text_encoder
        if offload_text_encoder:
            # Not a registered submodule: Lightning's device placement and checkpoints leave it alone.
            self._offloaded = [backbone.text_encoder]
            self.text_encoder = None
        else:
            self.text_encoder = backbone.text_encoder
        self.codec = backbone.codec
        self.model = CoLoGenTransformer(backbone.transformer, self.prw_config)
        self.model.train_base = train_base  # kept through every curriculum step's freeze
        self.model.freeze_for_curriculum()
        if quantize_base is not None:
            quantize_frozen_base(self.model, quantize_base)
        self.model.enable_gradient_checkpointing(gradient_checkpointing, checkpoint_fn, checkpointing_blocks)
        if compile_blocks:
            self.model.compile_repeated_blocks(activation_memory_budget)
        if attention_backend is not None:
            set_attention_backend(self.model.transformer, attention_backend)
        if init_from is not None:
            self.load_adapters(init_from)
        self.last_routing: dict | None = None
        self.checkpoint_step: int | None = None
        # task -> expert of the curriculum step that introduced it (set by the curriculum; per-sample task routing
        # and oracle routing read it)
        self.task_experts: dict[str, int] = {}
        o = self.optim
        self.lr_schedule = LRSchedule(o.warmup_steps, o.schedule, o.total_steps, o.min_lr_ratio)
        self.router_lr_schedule = LRSchedule(o.warmup_steps, o.router_schedule or o.schedule, o.total_steps,
                                             o.min_lr_ratio)

    # ------------------------------------------------------------------------------------------------ inputs
    def encode_text(self, batch: dict, drop: torch.Tensor | None = None) -> TextEmbeddings:
        """Prompt embeddings from the batch's precomputed arrays when present, else from the (cached) encoder.
        Dropped prompts get zero embeddings."""
        if "text_tokens" in batch:
            text = TextEmbeddings(batch["text_tokens"], batch["text_pooled"])
        else:
            prompts = list(batch["prompt"])
            if drop is not None:  # a dropped prompt's embedding is zeroed below: encode the (cached) empty one
                prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
            if self.offload_text_encoder and self._offloaded[0] is not None:
                text = self._offloaded[0].encode_offloaded(prompts, self.device)
            elif self.text_encoder is None:
                raise RuntimeError("batch has no precomputed text embeddings and the text encoder was not loaded "
                                   "(model.load_text_encoder: false)")
            else:
                text = self.text_encoder.encode(prompts)
        text = text.to(self.device, torch.float32)
        if drop is not None:
            keep = (~drop).to(self.device).float()
            text = TextEmbeddings(text.tokens * keep[:, None, None], text.pooled * keep[:, None])
        return text

    def encode_images(self, batch: dict, key: str, latent_key: str) -> torch.Tensor:
        if latent_key in batch:
            return batch[latent_key].to(self.device, torch.float32)
        return self.codec.encode(batch[key].to(self.device)).float()

    def prepare(self, batch: dict, train: bool, generator: torch.Generator | None = None) -> dict:
        """Everything the transformer needs for one flow-matching step on `batch`."""
        target = self.encode_images(batch, "target", "target_latent")
        b, _, h, w = target.shape
        x0 = pack_latents(target)

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=self.device)

        # `encode_text` reads the drops on the host to skip encoding dropped prompts: training draws them there (no
        # device sync per step); a caller's generator (tests, fixed-noise losses) still decides them, reproducibly
        host = generator.device if generator is not None else "cpu"
        text_drop = (torch.rand(b, generator=generator, device=host) < self.flow.text_dropout).cpu() if train else None
        text = self.encode_text(batch, text_drop)

        has_source = batch.get("has_source")
        source_tokens = sids = keep = None
        if has_source is not None and bool(has_source.any()):
            source = self.encode_images(batch, "source", "source_latent")
            keep = has_source.to(self.device)
            if train:
                keep = keep & (rand(b) >= self.flow.source_dropout)
            source_tokens = pack_latents(source) * keep.float()[:, None, None]
            sids = self.positions.ids(list(batch["task"]), source.shape[2] // 2, source.shape[3] // 2, h // 2,
                                      w // 2, device=self.device)
            if batch.get("extra_sources"):  # several conditions: one stream each, dropped together
                tokens, ids = [source_tokens], [sids]
                for i, extra in enumerate(batch["extra_sources"], start=1):
                    latent = self.codec.encode(extra.to(self.device)).float()
                    tokens.append(pack_latents(latent) * keep.float()[:, None, None])
                    ids.append(self.positions.ids(list(batch["task"]), latent.shape[2] // 2, latent.shape[3] // 2,
                                                  h // 2, w // 2, device=self.device, condition=i))
                source_tokens, sids = tokens, ids

        s = torch.sigmoid(torch.randn(b, generator=generator, device=self.device) * self.flow.logit_std
                          + self.flow.logit_mean)
        if self.flow.resolution_shift:
            s = flux_time_shift(s, x0.shape[1])
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        x_t = (1 - s)[:, None, None] * x0 + s[:, None, None] * noise
        guidance = (torch.full((b,), self.flow.guidance, device=self.device) if self.guidance_embeds else None)
        return dict(latents=x_t, timestep=s, text=text, img_ids=target_ids(h // 2, w // 2, device=self.device),
                    txt_ids=text_ids(text.tokens.shape[1], device=self.device), source_tokens=source_tokens,
                    source_ids=sids, guidance=guidance, velocity=noise - x0, tasks=list(batch["task"]),
                    changed=changed_tokens(x0, source_tokens[0] if isinstance(source_tokens, list) else source_tokens,
                                           has_source),
                    source_seen=keep)  # (B,) which samples see their condition image (None: no sample has one)

    def gate_token_weights(self, changed: torch.Tensor, tasks: list[str]) -> torch.Tensor | None:
        """(B, N) weights of the gate supervision: `veteran.gate_pos_weight` on the changed tokens of the samples of
        `veteran.gate_pos_weight_tasks`, 1 elsewhere; None when the weight is 1."""
        if self.veteran.gate_pos_weight == 1.0:
            return None
        return changed_token_weights(changed, self.veteran.gate_pos_weight - 1.0, tasks,
                                     self.veteran.gate_pos_weight_tasks)

    def change_weights(self, changed: torch.Tensor | None, tasks: list[str] | None = None) -> torch.Tensor | None:
        """(B, N) loss weights: `1 + flow.change_weight` on the `changed` tokens (`changed_tokens`), 1 elsewhere,
        for samples of `flow.change_weight_tasks` (all when None); None when the option is off or no sample has a
        source of the target's size."""
        if not self.flow.change_weight or changed is None:
            return None
        return changed_token_weights(changed, self.flow.change_weight, tasks, self.flow.change_weight_tasks)

    # --------------------------------------------------------------------------------------------- sampling
    def sampler(self, **overrides) -> FlowSampler:
        config = replace(self.sampler_config, **overrides) if overrides else self.sampler_config
        return FlowSampler(self.model, self.codec, self.positions, self.guidance_embeds, config)

    def own_experts(self, tasks: list[str]) -> torch.Tensor:
        """(B,) the expert of each task's curriculum step (the newest expert for a task the curriculum has not
        assigned), clamped to the active experts."""
        newest = max(self.model.newest_expert, 0)
        return torch.tensor([min(self.task_experts.get(t, newest), newest) for t in tasks], dtype=torch.long,
                            device=self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], sources: torch.Tensor | list[torch.Tensor] | None = None,
                 tasks: list[str] | None = None,
                 height: int | None = None, width: int | None = None, seed: int | list[int] = 0,
                 oracle_routing: bool = False, mask: torch.Tensor | None = None,
                 keep_image: torch.Tensor | None = None, **sampler_overrides) -> tuple[torch.Tensor, SampleStats]:
        """Images (B, 3, H, W) in [-1, 1] for `prompts` (and condition images `sources`: a (B, 3, Hs, Ws) batch, or
        a list of them, one per condition), eval-mode routing. `mask` (B, 1, H, W), 1 where to paint: the rest is
        kept from `keep_image` (default: the first condition image) at every step (`FlowSampler.sample`; inpainting).
        `oracle_routing` sends every sample to its task's own expert (`own_experts`) instead of the routers'
        choice (an evaluation of what the routers lose)."""
        was_training = self.training
        self.eval()
        try:
            text = self.encode_text({"prompt": prompts})
            if height is None or width is None:
                if sources is None:
                    raise ValueError("generate needs height and width for text-to-image")
                height, width = (sources if isinstance(sources, torch.Tensor) else sources[0]).shape[-2:]
            experts = None
            if oracle_routing:
                if tasks is None:
                    raise ValueError("oracle routing needs the tasks of the prompts")
                experts = self.own_experts(tasks)
            return self.sampler(**sampler_overrides).sample(text, height, width, sources, tasks, seed, experts,
                                                            mask=mask, keep_image=keep_image)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------------- steps
    def forward(self, inputs: dict) -> CoLoGenOutput:
        return self.model(inputs["latents"], inputs["timestep"], inputs["text"], inputs["img_ids"],
                          inputs["txt_ids"], inputs["source_tokens"], inputs["source_ids"], inputs["guidance"],
                          experts=self.training_experts(inputs["tasks"]))

    def training_experts(self, tasks: list[str]) -> torch.Tensor | None:
        """(B,) the experts `veteran.teacher_forcing` sends a training batch to (each sample's own), else None (the
        routers choose)."""
        if not (self.veteran.teacher_forcing and self.training and self.model.num_active > 1):
            return None
        return self.own_experts(list(tasks))

    def compute_losses(self, batch: dict, train: bool, generator: torch.Generator | None = None) -> dict:
        inputs = self.prepare(batch, train, generator)
        out = self(inputs)
        per_token = F.mse_loss(out.sample.float(), inputs["velocity"], reduction="none").mean(dim=2)
        weight = self.change_weights(inputs["changed"], inputs["tasks"])
        if weight is None:
            per_sample = per_token.mean(dim=1)
        else:
            per_sample = (per_token * weight).sum(dim=1) / weight.sum(dim=1)
        losses = {"loss_task": per_sample.mean(), "per_sample": per_sample}
        losses["loss"] = losses["loss_task"]
        if out.routing:
            vet, _ = veteran_loss(out.routing, self.model.newest_expert, self.veteran.rho, self.veteran.alpha)
            usage = newest_usage(out.routing, self.model.newest_expert)[0].detach()  # the routers' own choices
            losses.update(loss_veteran=vet, usage_newest=usage, routing_entropy=routing_entropy(out.routing).detach(),
                          routing=out.routing)
            losses["loss"] = losses["loss"] + vet
            if self.model.num_active > 1:
                tasks = list(batch["task"])
                weights = task_balanced_weights(tasks) if self.veteran.task_balance else None
                if self.veteran.skip_dropped_sources and inputs["source_seen"] is not None:
                    seen = inputs["source_seen"]
                    if self.veteran.skip_dropped_source_tasks is not None:  # the other tasks keep theirs
                        seen = seen | ~samples_of(tasks, self.veteran.skip_dropped_source_tasks, seen.device)
                    seen = seen.float()
                    weights = seen if weights is None else weights.to(seen.device) * seen
                routed, own_share = task_routing_loss(out.routing, self.own_experts(tasks), weights)
                losses["routing_own_expert"] = own_share
                if self.veteran.task_weight > 0:
                    losses["loss_routing"] = self.veteran.task_weight * routed
                    losses["loss"] = losses["loss"] + losses["loss_routing"]
        if out.token_gates and self.veteran.gate_weight > 0 and inputs["changed"] is not None:
            changed = inputs["changed"]
            if self.veteran.gate_tasks is not None:  # the other tasks' gates stay open
                changed = changed | ~samples_of(inputs["tasks"], self.veteran.gate_tasks, changed.device)[:, None]
            gate_loss, accuracy = token_gate_loss(out.token_gates, changed, self.gate_token_weights(changed,
                                                                                               inputs["tasks"]))
            losses.update(loss_gate=self.veteran.gate_weight * gate_loss, gate_accuracy=accuracy)
            losses["loss"] = losses["loss"] + losses["loss_gate"]
        return losses

    def _log_losses(self, losses: dict, tasks: list[str], stage: str, counted: bool = True) -> None:
        """`counted` False (a DDP padding batch): logged with weight 0, so every rank logs the same keys (their
        epoch means are synced together) while the means count each real example once."""
        on_step = stage == "train"
        # float weights: Lightning syncs an epoch mean as mean(weighted sums) / mean(weights) and truncates an
        # integer weight total's mean (Lightning-AI/pytorch-lightning#21859): 5 examples on 2 ranks counted as 4
        weight = 1.0 if counted else 0.0
        # Validation has one loader per task: its values are named by the task (`val/loss/grounding`), never by the
        # loader's position as well (Lightning's `/dataloader_idx_N`); MetricsSummary adds the mean over tasks.
        suffix = f"/{tasks[0]}" if stage == "val" and len(set(tasks)) == 1 else ""
        for key in ("loss", "loss_task", "loss_veteran", "loss_routing", "loss_gate", "gate_accuracy", "usage_newest",
                    "routing_entropy", "routing_own_expert"):
            if key in losses and not (suffix and key == "loss_task"):  # loss_task/{task} is logged below
                self.log(f"{stage}/{key}{suffix}", losses[key], on_step=on_step, on_epoch=not on_step,
                         batch_size=weight * len(tasks), prog_bar=key == "loss" and not suffix,
                         sync_dist=not on_step, add_dataloader_idx=False)
        per_sample = losses["per_sample"].detach()
        for task in sorted(set(tasks)):
            idx = [i for i, t in enumerate(tasks) if t == task]
            self.log(f"{stage}/loss_task/{task}", per_sample[idx].mean(), on_step=on_step, on_epoch=not on_step,
                     batch_size=weight * len(idx), sync_dist=not on_step, add_dataloader_idx=False)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # The step's randomness (timesteps, noise, dropout, router noise) is a function of (seed, step, rank):
        # a run resumed from a checkpoint draws exactly what the uninterrupted run drew.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro = self.global_step * accumulate + batch_idx % accumulate  # distinct per accumulated micro-batch
        torch.manual_seed((seed * 1_000_003 + micro * 7919 + self.global_rank) % (2**63 - 1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch, train=True)
        self._log_losses(losses, list(batch["task"]), "train")
        if "routing" in losses and self.trainer is not None and self.global_step % self.trainer.log_every_n_steps == 0:
            self._log_routing(losses["routing"])
        return losses["loss"]

    def _log_routing(self, routing: dict) -> None:
        """Expert usage per PRW block (fraction of samples/tokens routed to each expert), kept for `cologen info`."""
        usage = expert_usage(routing, self.prw_config.num_experts).detach().cpu()
        for e in range(self.model.num_active):
            self.log(f"routing/usage_expert{e}", usage[:, e].mean(), on_step=True, on_epoch=False, batch_size=1)
        self.last_routing = {"global_step": int(self.global_step), "blocks": list(routing),
                             "usage": [[round(float(v), 4) for v in row] for row in usage]}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        # A fixed generator per batch, seeded by its place in the validation set (the same on any number of ranks):
        # the validation loss is comparable across evaluations and world sizes.
        gen = torch.Generator(device=self.device).manual_seed(1000 + int(batch.get("batch_index", batch_idx)))
        losses = self.compute_losses(batch, train=False, generator=gen)
        # a DDP padding batch (`valid` False) still runs, as every rank must under FSDP, but weighs nothing
        counted = bool(batch["valid"].all()) if "valid" in batch else True
        self._log_losses(losses, list(batch["task"]), "val", counted=counted)
        return losses["loss"]

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        from .predict import predict_one

        return predict_one(self, batch)

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
        schedules = [self.router_lr_schedule if g["name"] == "routers" else self.lr_schedule for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------------------------- curriculum
    # Entering a curriculum step (method.md, "Curriculum"): everything a step boundary changes in the model and its
    # optimization lives here, next to `configure_optimizers` (whose group names it uses); `CurriculumCallback`
    # decides when, `MixtureDataModule.set_mixture_schedule` switches the data.
    def enter_curriculum_step(self, index: int, step: CurriculumStep, task_experts: dict[str, int]) -> None:
        """Start curriculum step `index` (its settings `step`; `task_experts`: task -> expert up to it): activate its
        expert (copy init), freeze the veterans, set the veteran loss's rho and alpha, and, inside a fit, drop the
        veterans' optimizer moments and set the step's learning rates (restarting the schedule if it says so)."""
        model = self.model
        while model.num_active < index + 1:
            model.activate_next_expert()
        model.set_entry_progress(0.0 if index > 0 else 1.0)
        self.resume_curriculum_step(step, task_experts)
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return
        # A veteran never trains again: drop its optimizer moments (on FLUX, 0.7 GB per rank-128 expert).
        for optimizer in trainer.optimizers:
            for e in range(model.newest_expert):
                for p in model.expert_parameters(e):
                    optimizer.state.pop(p, None)
        self.set_learning_rates(step.lr, step.router_lr if step.router_lr is not None else step.lr / 2,
                                restart_steps=step.steps if step.reset_schedule else None)

    def resume_curriculum_step(self, step: CurriculumStep, task_experts: dict[str, int]) -> None:
        """The settings of curriculum step `step` on a model whose experts (count and weights) and optimizer come
        from a checkpoint: which experts train (the newest expert's prompt gate terms held at zero unless its tasks are
        among `veteran.gate_prompt_tasks`), rho / alpha, the task -> expert map."""
        self.model.freeze_for_curriculum()
        self.veteran.rho, self.veteran.alpha = step.rho, step.alpha
        self.task_experts = dict(task_experts)
        asked = self.veteran.gate_prompt_tasks
        newest = self.model.newest_expert
        if asked is not None and newest >= 0:
            own_tasks = {t for t, e in task_experts.items() if e == newest}
            if not own_tasks & set(asked):
                self.model.hold_prompt_gate(newest)

    def set_learning_rates(self, lr: float, router_lr: float, restart_steps: int | None = None) -> None:
        """Base learning rates of the `experts` and `routers` groups of `configure_optimizers`; `restart_steps`
        restarts the schedule (warmup, cosine over that many steps) at the current step. In effect for the next
        optimizer step."""
        trainer = self.trainer
        step = trainer.global_step
        lrs = {"experts": lr, "routers": router_lr}
        if restart_steps is not None:
            for schedule in (self.lr_schedule, self.router_lr_schedule):
                schedule.restart(step, total_steps=restart_steps)
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            for i, group in enumerate(sched.optimizer.param_groups):
                if group.get("name") in lrs:
                    sched.base_lrs[i] = group["initial_lr"] = lrs[group["name"]]
                group["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](step)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Frozen veterans must not move: drop any gradient a strategy may have materialized for them (DDP can
        # write zeros into unused parameters, and AdamW would still apply its momentum).
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    p.grad = None

    # ------------------------------------------------------------------------------------------- checkpoints
    def adapter_state_keys(self) -> list[str]:
        """Experts, routers and the expert schedule: what a stage hands to the next."""
        return [k for k in self.state_dict() if k.startswith("model.") and k not in self.frozen_state_keys()]

    def load_adapters(self, path: str) -> None:
        """Load the experts, routers and active-expert count of a checkpoint (not its optimizer or position)."""
        from pathlib import Path

        from . import checkpoints
        from .errors import MissingInput, UsageError

        if not Path(path).exists():
            raise MissingInput(f"model.init_from: checkpoint {path} does not exist (train the previous stage "
                               "first, e.g. `make stage1` before `make stage2`)")
        try:
            ckpt = checkpoints.load(path)
        except checkpoints.NotACheckpoint as err:
            raise UsageError(f"model.init_from: {err}") from None
        state = ckpt["state_dict"]
        wanted = self.adapter_state_keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise UsageError(f"model.init_from: {path} lacks {len(missing)} adapter tensors (e.g. {missing[0]}); "
                             "was it trained with the same preset and prw settings?")
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        self.task_experts = dict((ckpt.get("cologen") or {}).get("task_experts") or {})
        self.model.freeze_for_curriculum()


    def frozen_state_keys(self) -> set[str]:
        """State-dict keys restored from the preset rather than stored: the frozen base and the encoders (the text
        encoder, the codec, and the gates' pretrained image encoder and referrer)."""
        restored = ("text_encoder.", "codec.", "model.gate_image_encoder.", "model.gate_referrer.")
        if self.train_base:
            return {k for k in self.state_dict() if k.startswith(restored)}
        base = {id(p) for p in self.model.base_parameters()}
        named = dict(self.named_parameters(remove_duplicate=False))  # tied weights (T5's embeddings) too
        return {k for k, p in named.items() if id(p) in base or k.startswith(restored)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint is self-contained: `init_from` only seeds a fresh stage, so loading this checkpoint must not
        # read that file again (a relative path would resolve elsewhere, or to another file). Kept as provenance.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "init_from": None}
        frozen = self.frozen_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["cologen"] = {"preset": self.preset.name, "num_active": self.model.num_active,
                                 "prw": asdict(self.prw_config), "routing": self.last_routing,
                                 "task_experts": dict(self.task_experts), "init_from": self.hparams.get("init_from"),
                                 "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.task_experts = dict((checkpoint.get("cologen") or {}).get("task_experts") or {})
        # the training step these weights are from (`cologen validate` names its samples after it)
        self.checkpoint_step = checkpoint.get("global_step")
        # The frozen weights come from the preset, not the checkpoint; everything else must be present.
        current = self.state_dict()
        for k in self.frozen_state_keys():
            checkpoint["state_dict"].setdefault(k, current[k])
