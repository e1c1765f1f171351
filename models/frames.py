"""The cache's square frames: an image resized so its longer side fills the frame, at the top-left,
padded at the bottom/right (SAM's 1024 frame for ``sam_embed``, the CLIP input frame for
``clip_<level>``). Both frames share normalised coordinates, so one mask placed in the frame pools
every cached map."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def content_width_cells(height: int, width: int, cells: int) -> float:
    """Width of the image content, in cells of a ``cells``-wide map of the frame."""
    return width / max(height, width) * cells


def mirror_columns(f: Tensor, content_width: float) -> Tensor:
    """Mirror (..., h, w) about x = content_width / 2 (in cells); columns past the content stay 0.

    Cell j (centre j + 0.5) takes the value at content_width - (j + 0.5), i.e. source index
    content_width - j - 1, linearly interpolated between neighbouring cells (bilinear when the image
    edge falls inside a cell), so a map mirrored twice is the map again up to that interpolation.
    """
    w = f.shape[-1]
    out = torch.zeros_like(f)
    n = min(w, math.ceil(content_width))
    if n <= 0:
        return out
    src = content_width - torch.arange(n, dtype=torch.float64) - 1.0
    lo = src.floor().clamp(0, w - 1)
    t = (src - lo).clamp(0, 1).to(torch.float32)
    lo = lo.long()
    hi = (lo + 1).clamp(max=w - 1)
    ff = f.float()
    out[..., :n] = (ff[..., lo] * (1 - t) + ff[..., hi] * t).to(f.dtype)
    return out
