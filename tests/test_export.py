"""Export: a CoLoGenPipeline folder reproduces the training checkpoint's samples."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader

from cologen.commands.export import export
from cologen.errors import MissingInput, UsageError
from cologen.inputs import condition_tensor, masked_source, to_rgb
from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.presets import TinyPreset
from cologen.module import CoLoGenModule
from cologen.pipeline import ADAPTER_FILE, CoLoGenPipeline
from cologen.sampling.sampler import SamplerConfig


def batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    return {"target": t, "source": t.flip(-2), "has_source": torch.ones(b, dtype=torch.bool),
            "prompt": ["flip it", "turn it over"][:b], "task": ["editing", "customized"][:b]}


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader([batch(seed=i) for i in range(4)], batch_size=None)


# the paper's experts, and this project's tiny options (every projection of both streams, token gates, prompt input)
OPTIONS = {
    "paper": {},
    "tiny": dict(targets=["to_q", "to_k", "to_v", "to_out"], noisy_targets=["to_q", "to_k", "to_v", "to_out"],
                 token_gate=True, router=RouterConfig(prompt_input=True, normalize_input=True,
                                                      weighting="straight_through")),
}


@pytest.mark.parametrize("options", list(OPTIONS))
def test_export_round_trip_reproduces_samples(tmp_path, options):
    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2, seed=3),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8, **OPTIONS[options]),
                           sampler=SamplerConfig(steps=4))
    module.model.activate_next_expert()
    module.model.set_entry_progress(1.0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Data())
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    src = batch()["source"]
    prompts, tasks = ["flip it", "turn it over"], ["editing", "customized"]
    expected, _ = module.generate(prompts, src, tasks, seed=[11, 12])

    out = export(str(ckpt), str(tmp_path / "exported"))
    files = {p.name for p in out.iterdir()}
    assert {ADAPTER_FILE, "cologen_config.json", "README.md"} <= files
    with safe_open(str(out / ADAPTER_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["num_active"] == "2"
    assert "transformer_blocks.0.attn.prw_experts.experts.1.to_k.lora_A.weight" in keys
    assert "single_transformer_blocks.1.attn.prw_router.gate.weight" in keys
    if options == "tiny":
        assert {"transformer_blocks.0.attn.prw_experts.experts.1.noisy_to_out.lora_B.weight",
                "single_transformer_blocks.0.attn.prw_experts.experts.0.token_gate.weight",
                "transformer_blocks.0.attn.prw_router.prompt_gate.weight"} <= keys
    assert not any(".prw_" not in k and k != "prw.entry_offset" for k in keys)  # no base weights
    config = json.loads((out / "cologen_config.json").read_text())
    assert config["num_active"] == 2 and config["preset"]["name"] == "tiny" and config["sample_size"] == 32

    pipe = CoLoGenPipeline.from_pretrained(out)
    got = pipe(prompts, image=list(src), task=tasks, seed=[11, 12], output_type="pt").images
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    pil = pipe("flip it", image=src[0], task="editing", seed=11).images[0]
    assert pil.size == (32, 32)
    assert pipe("a red circle", seed=0, progress=False).images[0].size == (32, 32)  # t2i: the model's size
    result = pipe(prompts, image=list(src), task=tasks, seed=[11, 12], output_type="pt", progress=False)
    assert result.stats.source_passes >= 1 and result.stats.routing  # what the sampler saw comes with the images

    # float16 storage (the committed demo experts): half the file, loaded back as float32, nearly the same samples
    half = export(str(ckpt), str(tmp_path / "half"), "float16")
    ratio = (half / ADAPTER_FILE).stat().st_size / (out / ADAPTER_FILE).stat().st_size
    assert 0.45 < ratio < 0.6  # (the header of names is not halved)
    got16 = CoLoGenPipeline.from_pretrained(half)(prompts, image=list(src), task=tasks, seed=[11, 12],
                                                  output_type="pt", progress=False).images
    assert 0 < (got16 - expected).abs().max() < 0.05


def test_the_pipeline_takes_paths_pil_images_arrays_and_tensors_and_checks_tasks(tmp_path, capfd):
    torch.manual_seed(0)
    module = CoLoGenModule(preset=TinyPreset(base=None, width=64, heads=2, double_layers=1, single_layers=2, seed=3),
                           prw=PRWConfig(num_experts=2, rank=4, alpha=8), sampler=SamplerConfig(steps=4))
    pipe = CoLoGenPipeline(module.model, module.text_encoder, module.codec, module.preset.to_dict(),
                           module.positions, module.sampler_config, module.guidance_embeds)
    rgb = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    kwargs = dict(task="editing", seed=5, output_type="pt", progress=False, height=32, width=32)
    by_path = pipe("make it blue", image=str(tmp_path / "scene.png"), **kwargs).images
    for image in (tmp_path / "scene.png", Image.open(tmp_path / "scene.png"), rgb):
        torch.testing.assert_close(pipe("make it blue", image=image, **kwargs).images, by_path, rtol=0, atol=0)
    exact = condition_tensor(rgb, 32, 32)  # a (3, H, W) tensor in [-1, 1] of the output size is used as is
    torch.testing.assert_close(pipe("make it blue", image=exact, **kwargs).images, by_path, rtol=0, atol=0)
    # without a size, an image's own size; without an image, the model's sample size
    assert pipe("make it blue", image=rgb, task="editing", progress=False).images[0].size == (48, 40)
    assert pipe("a red circle", progress=False).images[0].size == (32, 32)

    # mask_image (diffusers' inpainting argument): the image greyed there as training builds inpainting sources, and
    # kept exactly everywhere else; one mask for all prompts or one per prompt, as a path, an array or a PIL image
    hole = np.zeros((32, 32), np.uint8)
    hole[4:16, 10:30] = 255
    Image.fromarray(hole).save(tmp_path / "hole.png")
    inpaint = dict(kwargs, task="inpainting")
    filled = pipe(["a red square", "a blue circle"], image=exact, mask_image=str(tmp_path / "hole.png"),
                  **inpaint).images
    keep = torch.from_numpy(hole == 0).expand(3, -1, -1)
    for image in filled:
        assert torch.equal(image[keep], exact[keep]) and not torch.equal(image, exact)
    torch.testing.assert_close(pipe(["a red square", "a blue circle"], image=exact, mask_image=[hole > 0, Image.open(
        tmp_path / "hole.png")], **inpaint).images, filled, rtol=0, atol=0)
    greyed = condition_tensor(masked_source(to_rgb(exact), hole > 0), 32, 32)
    torch.testing.assert_close(pipe(["a red square", "a blue circle"], image=greyed, mask_image=hole > 0,
                                    **inpaint).images, filled, rtol=0, atol=0)  # the greyed source is the model's
    with pytest.raises(UsageError, match="mask_image: only inpainting takes a mask"):
        pipe("make it blue", image=exact, mask_image=hole > 0, **kwargs)
    with pytest.raises(UsageError, match="mask_image: 3 masks for 2 prompts"):
        pipe(["a", "b"], image=exact, mask_image=[hole > 0] * 3, **inpaint)

    with pytest.raises(UsageError, match=r"unknown task 'grnding' \(did you mean 'grounding'\? known tasks: "
                                         r"inpainting, grounding, control, customized, editing, t2i, "
                                         r"customized_layout, two_subjects\)"):
        pipe("box it", image=rgb, task="grnding")
    with pytest.raises(UsageError, match="task= is required with an image"):
        pipe("box it", image=rgb)
    with pytest.raises(UsageError, match="task editing needs a condition image"):
        pipe("box it", task="editing")
    with pytest.raises(MissingInput, match="file not found"):
        pipe("box it", image=str(tmp_path / "none.png"), task="editing")

    capfd.readouterr()
    pipe("a red circle", seed=0)  # diffusers' progress bar over the 4 denoising steps
    err = capfd.readouterr().err
    assert "4/4" in err and "100%" in err
    pipe("a red circle", seed=0, progress=False)
    assert capfd.readouterr().err == ""
