"""SAM online on TSPP's points: the frozen prompt encoder + mask decoder on the cached ``sam_embed``.

The decoder parts are segment_anything's own classes, sized by ``sam_arch`` and loaded from the
``prompt_encoder.*`` / ``mask_decoder.*`` entries of a segment_anything checkpoint (the state
dict that ``sam_model_registry[arch](checkpoint=...)`` loads; the image encoder's weights are not
read, the cache holds its output). They are frozen, kept in eval mode and saved with the head, so
prediction needs no checkpoint. Decoding goes through samcp's fast point decoder
(:func:`samcp.models.sam_decoder.decode_points`, the one pipeline/proposals uses).

One mask per point (the paper: "a single mask"; which one is not said): of SAM's three multimask
outputs, the one with the highest predicted IoU (segment_anything's own rule for resolving an
ambiguous single point), thresholded at ``mask_threshold`` (logit 0), with the cells past the image
(the frame's padding) cleared. No NMS and no quality filters: SMAgg merges what overlaps.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sam_decoder import (
    SAM_DECODER_SIZES,
    build_prompt_decoder,
    decode_points,
    load_state_part,
    sam_checkpoint_state,
)
from .config import RANDOM_SAM, SamMiConfig


class FrozenSamDecoder(nn.Module):
    """SAM's prompt encoder and mask decoder (the attributes ``decode_points`` reads)."""

    def __init__(self, config: SamMiConfig) -> None:
        super().__init__()
        size = SAM_DECODER_SIZES[config.sam_arch]
        if size.dim != config.sam_dim:
            raise ValueError(
                f"sam_arch {config.sam_arch} decodes {size.dim}-channel embeddings but the cache's "
                f"sam_embed has {config.sam_dim}: set sam_arch to the SAM that made the cache"
            )
        # The cached embedding's grid decides the frame (as segment_anything's image_size / 16).
        size = dataclasses.replace(size, image_size=16 * config.sam_grid)
        self.arch = config.sam_arch
        self.prompt_encoder, self.mask_decoder = build_prompt_decoder(size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenSamDecoder:
        return super().train(False)  # frozen: always eval

    def load_checkpoint(self, path: str) -> None:
        """Load the prompt encoder and mask decoder of a segment_anything checkpoint.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the weights do not fit ``sam_arch``'s decoder.
        """
        fix = "pass the .pth the cache's sam_embed was made with: --set sam_checkpoint=PATH"
        state = sam_checkpoint_state(path, self.arch, "sam_mi", fix)
        load_state_part(self.prompt_encoder, state, "prompt_encoder.", self.arch)
        load_state_part(self.mask_decoder, state, "mask_decoder.", self.arch)
        self.requires_grad_(False)

    @torch.no_grad()
    def masks(
        self, embed: Tensor, coords: Tensor, content: tuple[float, float], threshold: float
    ) -> Tensor:
        """Binary masks (n, 4G, 4G) of single positive points on one image.

        Args:
            embed: (1, C, G, G) the image's SAM embedding.
            coords: (n, 2) points (x, y) in SAM's input frame (pixels of 16G).
            content: (height, width) of the image content in cells of the 4G mask grid.
            threshold: mask logit threshold.
        """
        logits, iou = decode_points(self, embed, coords)
        best = iou.argmax(dim=1)
        m = logits[torch.arange(logits.shape[0], device=logits.device), best] > threshold
        side = m.shape[-1]
        centres = torch.arange(side, device=m.device) + 0.5
        rows = centres < content[0]
        cols = centres < content[1]
        return m & rows[:, None] & cols[None, :]


def build_sam(config: SamMiConfig, load: bool = False) -> FrozenSamDecoder:
    """The frozen SAM decoder of ``config``; ``load`` reads ``config.sam_checkpoint`` (unless it
    is ``"random"``)."""
    sam = FrozenSamDecoder(config)
    if load and config.sam_checkpoint != RANDOM_SAM:
        sam.load_checkpoint(config.sam_checkpoint)
    return sam


def coverage(masks: Tensor, size: int) -> Tensor:
    """Fractions (..., size, size) of each cell covered by binary or soft masks (..., R, R)."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks.float()
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.adaptive_avg_pool2d(flat, size).reshape(*lead, size, size)
