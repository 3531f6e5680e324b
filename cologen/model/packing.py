"""FLUX's 2x2 latent packing and the RoPE position ids of text, target and source tokens.

Position ids of the condition tokens are the paper's per-task position scheme (method.md, "Source tokens"):
`SourcePositionConfig` picks a scheme per task and `SourcePositionConfig.ids` builds a batch's ids; training
(`CoLoGenModule.prepare`) and sampling (`FlowSampler`) both use it. With several conditions per sample, condition
i sits on its own plane, axis0 = 1 + i, with the same scheme: the noisy tokens, which attend to every condition,
can tell them apart, and one condition keeps the single-condition ids exactly (docs/multi_condition.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

POSITION_SCHEMES: tuple[str, ...] = ("aligned", "shifted", "scaled")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), the same channel order as diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent grid {h}x{w} must be even to pack 2x2 patches")
    return F.pixel_unshuffle(latents, 2).flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4C) -> (B, C, height, width); `height`/`width` are the latent grid size before packing."""
    b, n, c4 = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, c4, height // 2, width // 2)
    return F.pixel_shuffle(grid, 2)


def grid_ids(rows: int, cols: int, axis0: float = 0.0, row_scale: float = 1.0, col_scale: float = 1.0,
             col_offset: float = 0.0, device=None) -> torch.Tensor:
    """(rows * cols, 3) ids `(axis0, row, col)` in raster order, as FLUX's _prepare_latent_image_ids."""
    r = torch.arange(rows, device=device, dtype=torch.float32) * row_scale
    c = torch.arange(cols, device=device, dtype=torch.float32) * col_scale + col_offset
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 0] = axis0
    ids[..., 1] = r[:, None]
    ids[..., 2] = c[None, :]
    return ids.reshape(rows * cols, 3)


def target_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """Ids of the noisy target tokens on a packed grid of rows x cols."""
    return grid_ids(rows, cols, device=device)


def source_ids(scheme: str, rows: int, cols: int, target_rows: int, target_cols: int, device=None,
               condition: int = 0) -> torch.Tensor:
    """Ids of the source (condition) tokens on a packed grid of rows x cols; `condition` is the condition's index
    in its sample (axis0 = 1 + condition).

    aligned: the target grid with axis0 = 1 (FLUX Kontext's convention for spatially aligned conditions).
    shifted: axis0 = 1 and columns moved left by the condition width, off the target grid (OminiControl's
             subject condition), so the model cannot confuse the reference with the target layout.
    scaled:  a low-resolution condition spread over the target grid (row/col stride target/condition).
    """
    plane = 1.0 + condition
    if scheme == "aligned":
        if (rows, cols) != (target_rows, target_cols):
            raise ValueError(
                f"aligned source grid {rows}x{cols} differs from the target grid {target_rows}x{target_cols}; "
                "use the 'scaled' position scheme for a condition of another size"
            )
        return grid_ids(rows, cols, axis0=plane, device=device)
    if scheme == "shifted":
        return grid_ids(rows, cols, axis0=plane, col_offset=-float(cols), device=device)
    if scheme == "scaled":
        return grid_ids(rows, cols, axis0=plane, row_scale=target_rows / rows, col_scale=target_cols / cols,
                        device=device)
    raise ValueError(f"unknown source position scheme {scheme!r}; expected one of {POSITION_SCHEMES}")


def text_ids(length: int, device=None) -> torch.Tensor:
    """FLUX gives every text token the id (0, 0, 0)."""
    return torch.zeros(length, 3, device=device)


@dataclass
class SourcePositionConfig:
    """Position scheme of the source tokens per task ('aligned', 'shifted', 'scaled'); others use `default`. A task
    with several conditions may give a list, one scheme per condition (the last one for any further condition)."""

    default: str = "aligned"
    per_task: dict[str, str | list[str]] = field(default_factory=lambda: {
        # references off the target grid (each on its own plane), a layout on it
        "customized": "shifted", "customized_layout": ["shifted", "aligned"], "two_subjects": "shifted"})

    def scheme(self, task: str, condition: int = 0) -> str:
        scheme = self.per_task.get(task, self.default)
        return scheme if isinstance(scheme, str) else scheme[min(condition, len(scheme) - 1)]

    def ids(self, tasks: list[str], rows: int, cols: int, target_rows: int, target_cols: int,
            device=None, condition: int = 0) -> torch.Tensor:
        """Ids of a batch's source tokens (a rows x cols packed grid, target grid target_rows x target_cols) for the
        samples' condition number `condition`: (N, 3) when every task of `tasks` uses the same scheme, else
        (B, N, 3), one row per sample."""
        schemes = [self.scheme(t, condition) for t in tasks]
        per = {s: source_ids(s, rows, cols, target_rows, target_cols, device=device, condition=condition)
               for s in set(schemes)}
        return per[schemes[0]] if len(per) == 1 else torch.stack([per[s] for s in schemes])
