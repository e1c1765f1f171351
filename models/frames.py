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


def crop_frame_map(
    f: Tensor,
    src_size: tuple[int, int],
    window: tuple[float, float, float, float],
    dst_size: tuple[int, int],
) -> Tensor:
    """The frame map of an image made of a window of another image (crop + rescale on a cached map).

    ``f`` (..., h, w) is a map of the frame of an image of ``src_size`` = (H, W). The new image is
    ``dst_size`` = (H', W') pixels holding the window ``(x0, y0, w, h)`` (source pixels) at its
    top-left, at the same pixel size, and nothing else (so H' >= h, W' >= w; a bigger H', W' shows
    the window smaller in the frame). The result is that image's map in a frame of the same
    (h, w) cells: each cell centre is mapped back to the source frame and sampled bilinearly
    (``grid_sample``, ``align_corners=False``: the convention of ``roi_align(aligned=True)``, so a
    RoI pooled on the result matches the RoI pooled on ``f`` up to the interpolation). Cells that
    the window's content does not reach are 0, like the columns :func:`mirror_columns` leaves.
    """
    import torch.nn.functional as F

    rows, cols = f.shape[-2], f.shape[-1]
    x0, y0, win_w, win_h = (float(v) for v in window)
    src_long = float(max(src_size))
    dst_long = float(max(dst_size))
    out = torch.zeros_like(f)
    n_cols = min(cols, math.ceil(win_w * cols / dst_long - 1e-9))
    n_rows = min(rows, math.ceil(win_h * rows / dst_long - 1e-9))
    if n_cols <= 0 or n_rows <= 0:
        return out
    # Destination cell centre -> destination pixel -> source pixel -> source cell -> [-1, 1].
    xs = (torch.arange(n_cols, dtype=torch.float64) + 0.5) * dst_long / cols + x0
    ys = (torch.arange(n_rows, dtype=torch.float64) + 0.5) * dst_long / rows + y0
    gx = (2.0 * xs / src_long - 1.0).to(torch.float32)
    gy = (2.0 * ys / src_long - 1.0).to(torch.float32)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    lead = f.shape[:-2]
    flat = f.reshape(1, -1, rows, cols).float()
    sampled = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out[..., :n_rows, :n_cols] = sampled.reshape(*lead, n_rows, n_cols).to(f.dtype)
    return out
