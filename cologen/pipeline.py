"""CoLoGenPipeline: a diffusers `DiffusionPipeline` that generates with a trained expert bank, without the training
code's checkpoint.

An exported folder holds only what training produced: the experts and routers (`prw_adapters.safetensors`), the
settings needed to rebuild them (`cologen_config.json`), the scheduler config and a model card. The frozen base is
loaded from its own folder (`base=`): the tiny base that ships with cologen, or a local FLUX.1 diffusers folder.

Adapter tensor names are the diffusers module paths of the transformer, so they are stable across versions:

    transformer_blocks.{i}.attn.prw_experts.experts.{e}.{to_k,to_v}.lora_{A,B}.weight
    single_transformer_blocks.{i}.attn.prw_experts.experts.{e}.{to_k,to_v}.lora_{A,B}.weight
    {transformer_blocks|single_transformer_blocks}.{i}.attn.prw_router.{gate.weight,gate.bias,noise.weight,
        time_bias.weight}
    prw.entry_offset

Each expert is a standard LoRA pair on `to_k` / `to_v` (`lora_B @ lora_A`, scaled by alpha / rank), but it acts on
the *source tokens only*, weighted by its router: a plain LoRA loaded into a stock FLUX pipeline
(`load_lora_weights`) applies to every token and cannot reproduce it, so no such file is exported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image
from safetensors.torch import load_file, save_file

from cologen.errors import UsageError
from cologen.inputs import MASK_GREY, ImageInput, check_task, condition_tensor, image_size, mask_array
from cologen.model.cologen_transformer import CoLoGenTransformer, ConditionCache
from cologen.model.config import PRWConfig
from cologen.model.packing import SourcePositionConfig
from cologen.model.presets import FluxDevPreset, TinyPreset
from cologen.sampling.sampler import FlowSampler, SamplerConfig, SampleStats
from cologen.typed_config import coerce

ADAPTER_FILE = "prw_adapters.safetensors"
CONFIG_FILE = "cologen_config.json"
FORMAT_VERSION = 1
PRESETS = {"tiny": TinyPreset, "flux_dev": FluxDevPreset}


def adapter_state(model: CoLoGenTransformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The expert bank and routers under their stable names (stored as `dtype`; loading casts them back)."""
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.transformer.state_dict().items()
             if ".prw_" in k}
    state["prw.entry_offset"] = model.entry_offset.detach().float().cpu()
    return state


@dataclass
class CoLoGenPipelineOutput(ImagePipelineOutput):
    """The images, and what the sampler saw: source passes, cache hits and the expert each PRW block chose at
    each denoising step (`SampleStats`)."""

    stats: SampleStats | None = None


class CoLoGenPipeline(DiffusionPipeline):
    """Generate for every CoLoGen task: `pipe(prompt, image=condition, task="editing")`."""

    def __init__(self, model: CoLoGenTransformer, text_encoder, codec, preset: dict[str, Any],
                 positions: SourcePositionConfig | None = None, sampler: SamplerConfig | None = None,
                 guidance_embeds: bool = False, metadata: dict[str, Any] | None = None,
                 sample_size: int | None = None):
        super().__init__()
        self.register_modules(model=model, text_encoder=text_encoder, codec=codec)
        self.preset = preset
        # the default side of text-to-image outputs: the preset's (tiny 32, FLUX.1-dev 1024)
        self.sample_size = sample_size or PRESETS[preset["name"]].sample_size
        self.positions = positions or SourcePositionConfig()
        self.sampler_config = sampler or SamplerConfig()
        self.guidance_embeds = guidance_embeds
        self.metadata = metadata or {}
        self.condition_cache: ConditionCache | None = None

    def enable_condition_cache(self, max_entries: int = 64) -> None:
        """Keep each condition's source stream across calls, keyed by its content (and the prompt, which the stream
        depends on): a call that changes one condition of a request recomputes only that condition's stream."""
        self.condition_cache = ConditionCache(max_entries=max_entries)

    def disable_condition_cache(self) -> None:
        self.condition_cache = None

    # ---------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | Path, adapter_dtype: torch.dtype = torch.float32,
                        **kwargs) -> None:
        """`adapter_dtype`: how the experts and routers are stored (float16 halves the file; they load as float32)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        model: CoLoGenTransformer = self.model
        save_file(adapter_state(model, adapter_dtype), str(out / ADAPTER_FILE),
                  metadata={"format": "cologen-prw", "version": str(FORMAT_VERSION),
                            "num_active": str(model.num_active)})
        config = {
            "format_version": FORMAT_VERSION,
            "preset": self.preset,
            "prw": asdict(model.prw),
            "num_active": model.num_active,
            "positions": asdict(self.positions),
            "sampler": asdict(self.sampler_config),
            "guidance_embeds": self.guidance_embeds,
            "sample_size": self.sample_size,
            "metadata": self.metadata,
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (out / "README.md").write_text(model_card(config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, base: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> CoLoGenPipeline:
        """Load an exported folder; `base` is the frozen base's folder (tiny: a `make base` output, default the
        one shipped with cologen; flux_dev: the local FLUX.1 diffusers folder)."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: export one with `cologen export CKPT OUT`")
        config = json.loads((folder / CONFIG_FILE).read_text())
        preset_info = dict(config["preset"])
        name = preset_info.pop("name")
        if name == "tiny":
            preset_info["base"] = base if base is not None else preset_info.get("base", "builtin")
            preset = TinyPreset(**preset_info)
        elif name == "flux_dev":
            if base is None:
                raise ValueError("base= must name the local FLUX.1 diffusers folder the experts were trained on")
            preset = FluxDevPreset(path=base, dtype=preset_info.get("dtype", "bfloat16"),
                                   text_max_length=preset_info.get("text_max_length", 512))
        else:
            raise ValueError(f"unknown preset {name!r} in {folder / CONFIG_FILE}")
        backbone = preset.build()
        model = CoLoGenTransformer(backbone.transformer, coerce(PRWConfig, config["prw"]))
        state = load_file(str(folder / ADAPTER_FILE))
        with torch.no_grad():
            model.entry_offset.copy_(state.pop("prw.entry_offset"))
        missing, unexpected = model.transformer.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".prw_" in k]
        if missing or unexpected:
            raise ValueError(f"{folder / ADAPTER_FILE} does not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        model.num_active = int(config["num_active"])
        model.eval()
        positions = coerce(SourcePositionConfig, config.get("positions") or None)
        pipe = cls(model, backbone.text_encoder, backbone.codec, config["preset"], positions,
                   coerce(SamplerConfig, config["sampler"]), bool(config["guidance_embeds"]), config.get("metadata"),
                   config.get("sample_size"))
        if torch_dtype is not None:
            backbone.transformer.to(torch_dtype)
        return pipe

    # --------------------------------------------------------------------------------------------- calling
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: ImageInput | list[ImageInput] | list[list[ImageInput]] | None = None,
                 task: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 cfg_scale: float | None = None, image_cfg_scale: float | None = None, strength: float | None = None,
                 effect_mask: float | None = None, mask_image: ImageInput | list[ImageInput] | None = None,
                 seed: int | list[int] = 0, output_type: str = "pil", progress: bool = True) -> CoLoGenPipelineOutput:
        """Generate one image per prompt.

        image: the condition image(s): a path, a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor in
            [-1, 1]; one for all prompts or one per prompt. Several conditions (each its own source stream): a
            list of images for a single prompt, or one such list per prompt (every prompt with as many). None:
            text-to-image.
        task: the task of each prompt (inpainting, grounding, control, customized, editing; t2i without an image);
            required with an image, t2i without one.
        height, width: output size; default the condition image's size, else the model's sample size.
        strength: img2img, as diffusers' img2img pipelines: start from the (first) condition image noised to this
            level and run that share of the steps (1 = off; the condition must have the output's size).
        effect_mask: (editing) a token the gates open keeps the base's copy where the expert's effect on it is at
            most this share of its largest (`SamplerConfig.effect_mask`; 0 = off).
        mask_image: (inpainting) the region to fill, white on black, one for all prompts or one per prompt, as in
            diffusers' inpainting pipelines: the condition image is greyed there (as training builds inpainting
            sources) and kept everywhere else at every step (exactly, with a pixel codec).
        progress: a progress bar over the denoising steps (`set_progress_bar_config` styles it, as in diffusers).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        if task is None and image is not None:
            raise UsageError("task= is required with an image (inpainting, grounding, control, customized or "
                             "editing)")
        tasks = [task or "t2i"] * b if task is None or isinstance(task, str) else list(task)
        if len(tasks) != b:
            raise UsageError(f"task: {len(tasks)} tasks for {b} prompts")
        tasks = [check_task(t) for t in tasks]
        conditions = per_prompt_conditions(image, b)
        if conditions is None and any(t != "t2i" for t in tasks):
            raise UsageError(f"image: task {next(t for t in tasks if t != 't2i')} needs a condition image")
        if conditions is not None and "t2i" in tasks:
            raise UsageError("task: t2i takes no image (give the image's task, or no image)")
        if height is None or width is None:
            w, h = image_size(conditions[0][0]) if conditions is not None else (self.sample_size, self.sample_size)
            width, height = width or w, height or h
        overrides = {k: v for k, v in (("steps", num_inference_steps), ("guidance", guidance_scale),
                                       ("cfg_scale", cfg_scale), ("image_cfg_scale", image_cfg_scale),
                                       ("strength", strength), ("effect_mask", effect_mask))
                     if v is not None}
        config = SamplerConfig(**{**asdict(self.sampler_config), **overrides})
        sources = None if conditions is None else [
            torch.stack([condition_tensor(per[i], width, height) for per in conditions])
            for i in range(len(conditions[0]))]
        mask = keep_image = None
        if mask_image is not None:
            mask = self._inpainting_mask(mask_image, tasks, sources, width, height)
            keep_image = sources[0]  # a VAE's cells near the mask keep the image's, not the grey's
            sources[0] = torch.where(mask.bool(), MASK_GREY / 127.5 - 1, sources[0])  # `masked_source` in [-1, 1]
        if sources is not None and len(sources) == 1:
            sources = sources[0]
        device = next(self.model.parameters()).device
        encoder_device = next(self.text_encoder.parameters(), torch.empty(0)).device
        if encoder_device != device and hasattr(self.text_encoder, "encode_offloaded"):
            text = self.text_encoder.encode_offloaded(prompts, device)  # an offloaded encoder visits the model's device
        else:
            text = self.text_encoder.encode(prompts)
        text = text.to(device, torch.float32)
        sampler = FlowSampler(self.model, self.codec, self.positions, self.guidance_embeds, config)
        if progress:
            with self.progress_bar(total=config.steps) as bar:
                out, stats = sampler.sample(text, height, width, sources, tasks, seed,
                                            on_step=lambda n: bar.update(), cache=self.condition_cache, mask=mask,
                                            keep_image=keep_image)
        else:
            out, stats = sampler.sample(text, height, width, sources, tasks, seed, cache=self.condition_cache,
                                        mask=mask, keep_image=keep_image)
        if output_type == "pt":
            return CoLoGenPipelineOutput(images=out, stats=stats)
        arr = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return CoLoGenPipelineOutput(images=[Image.fromarray(a) for a in arr], stats=stats)

    @staticmethod
    def _inpainting_mask(mask_image, tasks: list[str], sources: list[torch.Tensor] | None, width: int,
                         height: int) -> torch.Tensor:
        """(B, 1, height, width) float mask of `mask_image` (one for all prompts or one per prompt)."""
        if sources is None or any(t != "inpainting" for t in tasks):
            raise UsageError("mask_image: only inpainting takes a mask (with its image)")
        masks = mask_image if isinstance(mask_image, list) else [mask_image] * len(tasks)
        if len(masks) != len(tasks):
            raise UsageError(f"mask_image: {len(masks)} masks for {len(tasks)} prompts")
        return torch.stack([torch.from_numpy(mask_array(m, width, height, "mask_image")) for m in masks]
                           ).float()[:, None].to(sources[0].device)


def per_prompt_conditions(image, prompts: int) -> list[list[ImageInput]] | None:
    """`image` of `CoLoGenPipeline.__call__` as each prompt's list of condition images (None: text-to-image)."""
    if image is None:
        return None
    if not isinstance(image, list):
        return [[image]] * prompts
    if image and all(isinstance(x, list) for x in image):
        per = [list(x) for x in image]
    elif prompts == 1:
        per = [list(image)]  # several conditions of the one prompt
    else:
        per = [[x] for x in image]
    if len(per) != prompts:
        raise UsageError(f"image: {len(per)} images (or image lists) for {prompts} prompts")
    if not per[0] or any(len(x) != len(per[0]) for x in per):
        raise UsageError("image: every prompt needs the same number of condition images (at least one)")
    return per


def model_card(config: dict[str, Any]) -> str:
    meta = config.get("metadata", {})
    curriculum = meta.get("curriculum") or {}
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [cologen, flux, lora, mixture-of-experts, image-editing]",
        "---",
        "",
        "# CoLoGen expert bank",
        "",
        f"Preset: `{config['preset'].get('name')}`; {config['num_active']} of {config['prw']['num_experts']} experts "
        f"active (rank {config['prw']['rank']}, alpha {config['prw']['alpha']}, blocks: {config['prw']['blocks']}).",
        "",
        "```python",
        "from cologen.pipeline import CoLoGenPipeline",
        "pipe = CoLoGenPipeline.from_pretrained('THIS_FOLDER', base='BASE_FOLDER')",
        "image = pipe('make the red square blue', image='source.png', task='editing').images[0]",
        "```",
        "",
        "The experts act on the condition (source) tokens only and are chosen per block by a router; a plain LoRA in a "
        "stock FLUX pipeline cannot reproduce them (see the cologen docs).",
        "",
        "## Curriculum",
        "",
    ]
    steps = curriculum.get("steps") or []
    if steps:
        lines += ["| step | name | stage | mixture | steps | rho | alpha |", "|---|---|---|---|---|---|---|"]
        for i, s in enumerate(steps):
            lines.append(f"| {i} | {s['name']} | {s['stage']} | {s['mixture']} | {s['steps']} | {s['rho']} | "
                         f"{s['alpha']} |")
    else:
        lines.append("(not recorded)")
    lines += ["", "## Metrics", ""]
    metrics = meta.get("metrics") or {}
    lines += [f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())] or ["(none recorded in the checkpoint)"]
    lines += ["", "## Routing (expert usage per PRW block at the last logged step)", ""]
    routing = meta.get("routing")
    if routing:
        for block, row in zip(routing["blocks"], routing["usage"]):
            lines.append(f"- {block}: " + ", ".join(f"e{e} {u:.2f}" for e, u in enumerate(row) if u > 0))
    else:
        lines.append("(not recorded)")
    return "\n".join(lines) + "\n"
