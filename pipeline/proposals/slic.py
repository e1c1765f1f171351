"""SLIC superpixel proposals: the fallback for machines without SAM weights, and for tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samcp.pipeline.proposals.base import Proposals, encode_masks_wh


@dataclass(frozen=True)
class SlicParams:
    """scikit-image SLIC settings.

    n_segments: target superpixel counts; one SLIC run per entry, so several entries give
        proposals at several granularities (coarse patches overlap the fine ones).
    compactness: colour vs space trade-off (higher gives squarer superpixels).
    sigma: Gaussian smoothing before segmenting.
    """

    n_segments: tuple[int, ...] = (30, 100)
    compactness: float = 10.0
    sigma: float = 1.0

    def cache_params(self) -> dict:
        return {
            "n_segments": list(self.n_segments),
            "compactness": self.compactness,
            "sigma": self.sigma,
        }


class SlicGenerator:
    """Superpixels as proposals: every segment of every SLIC run becomes one mask."""

    name = "slic"

    def __init__(self, params: SlicParams | None = None) -> None:
        self.params = params or SlicParams()

    def generate(self, image: np.ndarray) -> Proposals:
        from skimage.segmentation import slic

        h, w = image.shape[:2]
        rles: list[bytes] = []
        for n in self.params.n_segments:
            labels = slic(
                image,
                n_segments=n,
                compactness=self.params.compactness,
                sigma=self.params.sigma,
                start_label=0,
                channel_axis=-1,
            )
            ids = np.unique(labels)
            # (K, W, H) C-order == (H, W, K) Fortran order, the layout pycocotools encodes.
            onehot = (labels.T[None, :, :] == ids[:, None, None]).astype(np.uint8)
            rles.extend(encode_masks_wh(onehot.transpose(2, 1, 0)))
        return Proposals.from_rles(h, w, rles)
