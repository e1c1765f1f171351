"""TSPP's point grid and its training targets (SAM-MI sec. 3.2, eqs. 2-5).

The grid is SAM's everything-mode grid: ``grid`` x ``grid`` points at the cell centres of the
image, ``((j + 0.5) W / grid, (i + 0.5) H / grid)`` in original pixels (segment_anything's
``build_point_grids``). Each point takes the semantic label of the pixel it falls on, and the
targets are built from those grid labels, so ``|M_k|`` of eq. 5 is counted in grid points (at pixel
scale every mask would reach ``m_p`` and ``g_p`` would do nothing, against the paper's table 7).

For each class k present on the grid (its instances together: the ground truth is semantic)::

    P_k = min(ceil(|M_k| / g_p), m_p)                                       eq. 5
    d(x) = distance of grid point x to the skeleton of M_k (grid units)
    sigma_k = max_{x in M_k} d(x) / 3                                       eq. 4
    p(x) = P_k w(x) / sum_{M_k} w,   w = exp(-d^2 / (2 sigma_k^2))          eq. 3

so ``p`` sums to P_k over M_k and is 0 on void points. When sigma_k = 0 (the mask is its own
skeleton: a one-cell-wide line, a single point) the weights are uniform, w = 1. p can exceed 1
(a small round mask with P_k = 3 puts 1.085 on its centre); sampling clamps it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt
from skimage.morphology import skeletonize


def grid_pixels(height: int, width: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the grid points in original pixels (float64, each (grid,))."""
    ys = (np.arange(grid) + 0.5) * height / grid
    xs = (np.arange(grid) + 0.5) * width / grid
    return ys, xs


def grid_labels(label_map: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) int16: the label of the pixel each grid point falls on."""
    h, w = label_map.shape
    ys, xs = grid_pixels(h, w, grid)
    rows = np.minimum(np.floor(ys).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(xs).astype(np.int64), w - 1)
    return label_map[np.ix_(rows, cols)].astype(np.int16)


def points_per_mask(count: int, g_p: int, m_p: int) -> int:
    """P_k of eq. 5 for a mask of ``count`` grid points."""
    return min(math.ceil(count / g_p), m_p)


def skeleton_weights(mask: np.ndarray) -> np.ndarray:
    """w = exp(-d^2 / 2 sigma^2) on the True cells of ``mask`` (eqs. 3-4), 1 where sigma = 0.

    Returns:
        (count,) float64 weights in the order of ``mask``'s True cells (row-major).
    """
    skeleton = skeletonize(mask)
    if not skeleton.any():  # (skeletonize keeps at least a point of a non-empty mask; be safe)
        return np.ones(int(mask.sum()))
    d = distance_transform_edt(~skeleton)[mask]
    sigma = d.max() / 3.0
    if sigma <= 0.0:  # the mask is its own skeleton: uniform
        return np.ones_like(d)
    return np.exp(-(d**2) / (2.0 * sigma**2))


def tspp_targets(labels: np.ndarray, g_p: int, m_p: int) -> np.ndarray:
    """Target sampling probabilities (eq. 3) of a (grid, grid) label grid.

    Args:
        labels: class index per grid point; negative values (void) get p = 0.
        g_p, m_p: eq. 5's density and cap.

    Returns:
        (grid, grid) float32 p; it sums to P_k over each class's points.
    """
    p = np.zeros(labels.shape, np.float64)
    for k in np.unique(labels):
        if k < 0:
            continue
        mask = labels == k
        w = skeleton_weights(mask)
        p[mask] = points_per_mask(int(mask.sum()), g_p, m_p) * w / w.sum()
    return p.astype(np.float32)
