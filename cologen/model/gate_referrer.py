"""The pretrained, frozen map of where a prompt will change its condition image (`prw.gate_referrer`, ours).

Grounding's gates must open the tokens of the object an expression names ("the small orange circle") and of the box
drawn around it. Each gate's bilinear terms add up what a token holds and what the prompt asks, token by token, so
a token that matches two of the three words opens nearly as readily as one that matches all three, and the gates
opened other objects of the scene (docs/findings.md: "Which object grounding's gates open"). This module reads the
shared gate encoder's features, the pooled prompt and each token's place through a per-token MLP (the prompt inside
the non-linearity, so words combine) and two 3 x 3 convolutions over the token grid (neighbouring tokens decide
together, and a box's outline lies beside its object). It is pretrained on the tasks' own training examples to
predict their changed tokens (`python -m cologen.commands.pretrain_gate_referrer`, `make gate-referrer`), then
frozen: it runs once per source pass, and each expert's gates read its map through a 3 x 3 convolution of their
own that starts at zero (`PromptGate`).

A folder holds `model.safetensors`, `config.json` (`feature_dim`, `prompt_dim`, `width`, `convs`, the gate
encoder's sha256 it was trained on, the tasks and its held-out precision and recall) and `sha256`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gate_encoder import load_frozen_weights, read_frozen_config, save_frozen_module

BUILTIN_GATE_REFERRER = Path(__file__).resolve().parent.parent / "assets" / "tiny_gate_referrer"


class GateReferrer(nn.Module):
    """(gate encoder features (B, N, F), pooled prompt (B, P), place features (N or B, N, K)) -> logits (B, N)
    that a token will change; the tokens form a square grid packed row by row."""

    def __init__(self, feature_dim: int, prompt_dim: int, place_dim: int, width: int = 64, convs: int = 2):
        super().__init__()
        self.features = nn.Linear(feature_dim, width)
        self.prompt = nn.Linear(prompt_dim, width, bias=False)
        self.place = nn.Linear(place_dim, width, bias=False)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(convs))
        self.out = nn.Linear(width, 1)

    def forward(self, features: torch.Tensor, prompt: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
        b, n, _ = features.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"prw.gate_referrer reads a square condition's token grid; got {n} tokens")
        prompt = F.layer_norm(prompt.float(), prompt.shape[-1:])
        h = F.gelu(self.features(features.float()) + self.prompt(prompt)[:, None] + self.place(place.float()))
        for conv in self.convs:  # residual: each adds what the 3 x 3 tokens around says
            grid = h.transpose(1, 2).reshape(b, -1, side, side)
            h = h + F.gelu(conv(grid)).flatten(2).transpose(1, 2)
        return self.out(h)[..., 0]


def gate_referrer_dir(spec: str) -> Path:
    """The folder of `prw.gate_referrer`: 'builtin' is the tiny preset's committed one."""
    return BUILTIN_GATE_REFERRER if spec == "builtin" else Path(spec)


def save_gate_referrer(referrer: GateReferrer, folder: Path, extra: dict | None = None) -> str:
    """Write the referrer's weights, its config (plus `extra`) and their sha256 into `folder`; returns the digest."""
    config = {"feature_dim": referrer.features.in_features, "prompt_dim": referrer.prompt.in_features,
              "place_dim": referrer.place.in_features, "width": referrer.features.out_features,
              "convs": len(referrer.convs), **(extra or {})}
    return save_frozen_module(referrer, folder, config)


def load_gate_referrer(spec: str, feature_dim: int, prompt_dim: int, encoder_sha256: str | None) -> GateReferrer:
    """The referrer of `prw.gate_referrer`, frozen, for gate encoder features of `feature_dim` and pooled prompts of
    `prompt_dim`; `encoder_sha256` is the loaded gate encoder's, which must be the one it was trained on."""
    folder = gate_referrer_dir(spec)
    config = read_frozen_config(folder, "prw.gate_referrer", "gate-referrer")
    for key, want in (("feature_dim", feature_dim), ("prompt_dim", prompt_dim)):
        if config[key] != want:
            raise ValueError(f"prw.gate_referrer: {folder} reads {key} {config[key]}, this model gives {want}")
    trained_on = config.get("gate_encoder_sha256")
    if trained_on is not None and encoder_sha256 is not None and trained_on != encoder_sha256:
        raise ValueError(f"prw.gate_referrer: {folder} was trained on another gate encoder's features "
                         f"(sha256 {trained_on[:12]}..., this model's {encoder_sha256[:12]}...); retrain it with "
                         "`make gate-referrer`")
    referrer = GateReferrer(feature_dim, prompt_dim, config["place_dim"], config["width"], config["convs"])
    return load_frozen_weights(referrer, folder)
