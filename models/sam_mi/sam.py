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

import errno
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sam_decoder import decode_points
from .config import RANDOM_SAM, SAM_DECODER_DIMS, SamMiConfig


class FrozenSamDecoder(nn.Module):
    """SAM's prompt encoder and mask decoder (the attributes ``decode_points`` reads)."""

    def __init__(self, config: SamMiConfig) -> None:
        super().__init__()
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        dim, mlp_dim, heads, iou_hidden = SAM_DECODER_DIMS[config.sam_arch]
        if dim != config.sam_dim:
            raise ValueError(
                f"sam_arch {config.sam_arch} decodes {dim}-channel embeddings but the cache's "
                f"sam_embed has {config.sam_dim}: set sam_arch to the SAM that made the cache"
            )
        g = config.sam_grid
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(g, g),
            input_image_size=(16 * g, 16 * g),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_hidden,
        )
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
        if not os.path.isfile(path):
            raise FileNotFoundError(
                errno.ENOENT,
                "SAM checkpoint not found (sam_mi sam_checkpoint; pass the .pth the cache's "
                "sam_embed was made with: --set sam_checkpoint=PATH)",
                path,
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip checkpoint: no mmap
            state = torch.load(path, map_location="cpu", weights_only=True)
        for prefix, part in (
            ("prompt_encoder.", self.prompt_encoder),
            ("mask_decoder.", self.mask_decoder),
        ):
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                part.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0][:120]
                raise ValueError(
                    f"SAM checkpoint {path} does not fit sam_arch's decoder ({first}); set "
                    "sam_arch to the checkpoint's architecture"
                ) from None
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
