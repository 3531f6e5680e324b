"""`cologen demo`: try a trained model by hand in the browser (a Gradio app), or through `gradio_client`.

One page for every task: the condition image (upload, an example, or the source with an inpainting mask drawn on
it with the brush), the prompt, seed, steps, guidance and size; the output beside the source, the routing of the
request (the expert each PRW block chose, drawn as the validation heatmap draws it) and its timings (source passes,
condition-cache hits). Generation goes through the exported pipeline (`CoLoGenPipeline`), so the page shows what
`cologen export` ships. A bad request is one line in the page (and a `gradio_client` error); the app keeps serving.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cologen.errors import UsageError
from cologen.inputs import SINGLE_CONDITION_TASKS, fit, mask_array, masked_source

TINY_EXPERTS = Path(__file__).parent / "assets" / "tiny_experts"
# the phrasing each task was trained with (ShapeWorld's prompt templates, docs/data.md)
PLACEHOLDERS = {
    "inpainting": "a large blue diamond at the top, on a mottled slate background (the whole scene)",
    "grounding": "draw a cyan box around the large purple square",
    "control": "a large orange square in the center, on a striped beige background",
    "customized": "the subject, small, at the top, with a small orange cross, on a checkered slate background",
    "editing": "shift the small red triangle to the top right",
    "t2i": "a large red circle on the left and a small blue square on the right, on a plain grey background",
}


# ShapeWorld images are 32 px: shown enlarged with their pixels kept sharp (the API returns them at true size)
CSS = "#output img, #condition img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"


class DemoError(UsageError):
    """A request the page cannot run; the message is one line that names the field."""


@dataclass
class DemoRequest:
    task: str
    prompt: str
    source: np.ndarray | None  # (H, W, 3) uint8, the mask already applied for inpainting
    seed: int
    steps: int
    guidance: float
    size: int
    mask: np.ndarray | None = None  # inpainting: (size, size) bool, the drawn region; the sampler keeps the rest
    unmasked: np.ndarray | None = None  # inpainting with a mask: the source before the region was greyed


@dataclass
class DemoResult:
    image: Image.Image
    condition: Image.Image | None  # what the model was given: the source fitted to the size, masked for inpainting
    routing: Image.Image | None  # the heatmap; None for text-to-image (no source stream to route)
    info: str  # timings and routing in words (markdown)


def editor_parts(value: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(source RGB, drawn mask) of a Gradio ImageEditor value: the background image and where any layer has ink.
    A plain image (an upload through the API) is the source with no mask."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        background, layers = value.get("background"), value.get("layers") or []
    else:
        background, layers = value, []
    if background is None:
        return None, None
    rgb = _rgb(background, "source")
    mask = None
    for layer in layers:
        if layer is None:
            continue
        pixels = np.asarray(_open(layer))
        ink = pixels[..., 3] > 0 if pixels.ndim == 3 and pixels.shape[2] == 4 else pixels.reshape(pixels.shape[:2]) > 0
        mask = ink if mask is None else mask | ink
    if mask is not None and mask.shape != rgb.shape[:2]:
        raise DemoError(f"mask: the drawing is {mask.shape[1]}x{mask.shape[0]}, the source {rgb.shape[1]}x"
                        f"{rgb.shape[0]}; draw on the source itself")
    return rgb, mask if mask is not None and mask.any() else None


def _open(image: Any) -> Image.Image | np.ndarray:
    if isinstance(image, (str, Path)):
        try:
            return Image.open(image)
        except OSError:
            raise DemoError(f"source: {Path(image).name} is not a readable image") from None
    return image


def _rgb(image: Any, what: str) -> np.ndarray:
    image = _open(image)
    arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DemoError(f"{what}: expected an RGB image, got an array of shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


class DemoModel:
    """A CoLoGenPipeline with the demo's request checks, generation and routing figure."""

    def __init__(self, pipe, name: str):
        self.pipe, self.name = pipe, name
        self.patch = int(pipe.codec.patch_pixels)
        self.sample_size = int(pipe.sample_size)
        self.max_size = 2 * self.sample_size
        self.min_size = 2 * self.patch
        self.default_steps = int(pipe.sampler_config.steps)
        curriculum = (pipe.metadata or {}).get("curriculum") or {}
        self.expert_names = [s["name"] for s in curriculum.get("steps", [])] if isinstance(curriculum, dict) else []

    @classmethod
    def load(cls, target: str | None = None, base_model: str | None = None) -> DemoModel:
        """`target`: a training checkpoint, an exported pipeline folder, or None for the committed tiny experts."""
        if target is None:
            from cologen.pipeline import CoLoGenPipeline

            _check_asset(TINY_EXPERTS)
            return cls(CoLoGenPipeline.from_pretrained(TINY_EXPERTS), "the committed tiny experts")
        from cologen.commands.export import load_pipeline

        return cls(load_pipeline(target, base_model), str(target))

    def request(self, task: str | None, editor: Any, prompt: str | None, seed: float | None = 0,
                steps: float | None = None, guidance: float | None = None, size: float | None = None) -> DemoRequest:
        """A checked request from the page's fields; a DemoError naming the first bad one."""
        if task not in SINGLE_CONDITION_TASKS:
            raise DemoError(f"task: pick one of {', '.join(SINGLE_CONDITION_TASKS)}, got {task!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoError(f"prompt: empty; for {task}, e.g. \"{PLACEHOLDERS[task]}\"")
        size = int(size or self.sample_size)
        if not self.min_size <= size <= self.max_size or size % self.patch:
            raise DemoError(f"size: {size} px is not supported by this model: a multiple of {self.patch} from "
                            f"{self.min_size} to {self.max_size}")
        steps = int(steps or self.default_steps)
        if not 1 <= steps <= 200:
            raise DemoError(f"steps: {steps} is outside 1-200")
        if seed is None or int(seed) < 0:
            raise DemoError(f"seed: expected an integer >= 0, got {seed!r}")
        rgb, mask = editor_parts(editor)
        if task == "t2i":
            if rgb is not None:
                raise DemoError("source: text-to-image takes no source image (clear it, or pick the image's task)")
            source = mask = unmasked = None
        else:
            if rgb is None:
                raise DemoError(f"source: task {task} needs a source image (upload one or click an example)")
            if mask is not None and task != "inpainting":
                raise DemoError(f"mask: only inpainting takes a drawn mask (this is {task}); erase the strokes")
            source = unmasked = fit(rgb, size, size)
            if mask is not None:
                mask = mask_array(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2), size, size)
                source = masked_source(source, mask)
        return DemoRequest(task, prompt.strip(), source, int(seed), steps,
                           float(self.pipe.sampler_config.cfg_scale if guidance is None else guidance), size,
                           mask, unmasked if mask is not None else None)

    def run(self, req: DemoRequest) -> DemoResult:
        guidance = {"guidance_scale": req.guidance} if self.pipe.guidance_embeds else {"cfg_scale": req.guidance}
        start = time.perf_counter()
        # with a mask, the pipeline greys the source there itself and keeps the rest of the unmasked source
        image = req.unmasked if req.mask is not None else req.source
        out = self.pipe(req.prompt, image=image, task=req.task, height=req.size, width=req.size,
                        num_inference_steps=req.steps, seed=req.seed, progress=True, mask_image=req.mask, **guidance)
        seconds = time.perf_counter() - start
        stats = out.stats
        routing, chosen = self._routing(req.task, stats)
        info = (f"**{req.task}**, {req.size}x{req.size} px, {req.steps} steps, seed {req.seed}: {seconds:.2f} s. "
                f"Source stream computed {stats.source_passes} time(s) for {stats.cache_hits + stats.cache_misses} "
                f"denoising lookups (condition-cache hit rate {stats.cache_hit_rate:.0%}).")
        if chosen:
            info += f" Experts chosen per PRW block: {chosen}."
        condition = Image.fromarray(req.source) if req.source is not None else None
        return DemoResult(out.images[0], condition, routing, info)

    def _routing(self, task: str, stats) -> tuple[Image.Image | None, str]:
        from cologen.callbacks.routing import count_routing, routing_figure

        prw = self.pipe.model.prw
        counts = count_routing(stats.routing, prw.num_experts, max(prw.router.timestep_bins, 1))
        if counts is None:
            return None, ""
        usage = counts.counts.sum(1)  # (blocks, experts) over the steps
        chosen = ", ".join(f"{block} e{int(np.argmax(row))}" for block, row in zip(counts.blocks, usage))
        with tempfile.TemporaryDirectory() as tmp:
            path = routing_figure({task: counts}, Path(tmp) / "routing.png", title="this request's routing",
                                  expert_names=self.expert_names)
            figure = Image.open(path)
            figure.load()
        return figure, chosen


def _check_asset(folder: Path) -> None:
    """The committed experts are what their sha256 says (a truncated clone or a merge accident is one line)."""
    from cologen.model.presets import check_recorded_sha256
    from cologen.pipeline import ADAPTER_FILE

    weights = folder / ADAPTER_FILE
    if not weights.is_file() or not (folder / "sha256").is_file():
        raise DemoError(f"{folder} lacks {ADAPTER_FILE} or sha256: run `make tiny-experts` after `make stage3`")
    try:
        check_recorded_sha256(weights)
    except ValueError:
        raise DemoError(f"{weights} does not match its sha256 (a partial checkout?): git checkout {folder}") from None


def examples() -> list[list[str]]:
    """[task, source image, prompt] of each ShapeWorld example shipped with the tiny experts."""
    listing = TINY_EXPERTS / "examples" / "examples.json"
    if not listing.is_file():
        return []
    return [[e["task"], str(TINY_EXPERTS / "examples" / e["source"]) if e.get("source") else None, e["prompt"]]
            for e in json.loads(listing.read_text())]


def build_app(model: DemoModel):
    """The page. Its one endpoint, `/generate` (task, source, prompt, seed, steps, guidance, size) -> (image,
    the model's input, routing figure, info), is what `gradio_client` calls."""
    import gradio as gr

    # Gradio finds its progress tracker as a default argument (its documented pattern): a bar over the sampler's
    # steps
    def generate(task, editor, prompt, seed, steps, guidance, size, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        try:
            req = model.request(task, editor, prompt, seed, steps, guidance, size)
        except UsageError as err:
            raise gr.Error(str(err), print_exception=False) from None
        result = model.run(req)
        return result.image, result.condition, result.routing, result.info

    def placeholder(task):
        return gr.update(placeholder=PLACEHOLDERS.get(task, ""))

    with gr.Blocks(title="CoLoGen demo", analytics_enabled=False) as app:
        gr.Markdown(f"# CoLoGen\nModel: `{model.name}`. Pick a task, give a source (for inpainting, paint the region "
                    "to fill with the brush), write the prompt, and generate.")
        with gr.Row():
            with gr.Column():
                task = gr.Radio(list(SINGLE_CONDITION_TASKS), value="inpainting", label="task", elem_id="task")
                source = gr.ImageEditor(label="source (brush: the inpainting mask)", type="numpy",
                                        image_mode="RGBA", sources=("upload", "clipboard"), layers=False,
                                        transforms=(), brush=gr.Brush(colors=["#ff00ff"], default_size=4),
                                        canvas_size=(256, 256), elem_id="source")
                prompt = gr.Textbox(label="prompt / instruction", placeholder=PLACEHOLDERS["inpainting"],
                                    elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, minimum=0)
                    steps = gr.Slider(1, 100, value=model.default_steps, step=1, label="steps")
                with gr.Row():
                    guidance = gr.Slider(0.0, 10.0, value=float(model.pipe.sampler_config.cfg_scale), step=0.5,
                                         label="guidance")
                    size = gr.Slider(model.min_size, model.max_size, value=model.sample_size, step=model.patch,
                                     label=f"size (px; this model: {model.min_size}-{model.max_size})")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                with gr.Row():
                    output = gr.Image(label="output", type="pil", format="png", height=256, elem_id="output")
                    condition = gr.Image(label="what the model was given", type="pil", format="png", height=256,
                                         elem_id="condition")
                routing = gr.Image(label="routing of this request", type="pil", format="png", height=340,
                                   elem_id="routing")
                info = gr.Markdown(elem_id="info")
        shipped = examples()
        if shipped:
            gr.Examples(shipped, inputs=[task, source, prompt], label="ShapeWorld examples")
        task.change(placeholder, task, prompt)
        button.click(generate, [task, source, prompt, seed, steps, guidance, size], [output, condition, routing, info],
                     api_name="generate", concurrency_limit=1)
    return app.queue(default_concurrency_limit=1)


def serve(model: DemoModel, host: str = "127.0.0.1", port: int = 7860, share: bool = False):
    """Start serving the page in the background; the returned app's `block_thread()` waits on it."""
    app = build_app(model)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, css=CSS)
    return app
