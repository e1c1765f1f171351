"""CLIP2SAM (Open-Vocabulary SAM, sec. 3.2-3.3): SAM's mask decoder, fine-tuned on box and point
prompts, with a recognition branch over the frozen CLIP's feature pyramid.

* SAM's prompt encoder (frozen) and mask decoder (fine-tuned) come from a segment_anything
  checkpoint: ``sam_model_registry[sam_arch](checkpoint=...)`` for vit_h/l/b; samcp's test-size
  architectures (``vit_tiny``, ``vit_test``) are built from the same segment_anything classes and
  the checkpoint's ``prompt_encoder.*`` / ``mask_decoder.*`` weights loaded into them.
* The decoder keeps all of SAM's output tokens (IoU token, 4 mask tokens) and returns mask token 0,
  SAM's single-mask output (``multimask_output=False``), so at initialisation and without a label
  token its masks are exactly segment_anything's. ``label_token`` appends the paper's learned
  label token to the decoder's queries (the code does; its output only feeds the classifier with
  ``label_token_logits``, the paper's variant: the released code multiplies it by 0).
* Recognition (the code's OVSAMHead): an FPN (torchvision's, 256 channels) on the cached CLIP
  levels; per prompt, RoIAlign 12 x 12 (aligned, sampling ratio 0) on the level chosen by
  mmdet's rule ``k = floor(log2(sqrt(wh) / 56))`` (stride 4 * 2^k, clamped to the cached levels);
  a 1 x 1 conv to the text dimension + ReLU; the mean over the RoI -> a region embedding, scored
  ``100 cos`` against the class text embeddings plus void (the code: a zero embedding, logit 0;
  or the shared learned void, ``void="learned"``).
* RoI of a prompt: the ground-truth box in training (for point prompts too, as the code); at
  inference the box prompt itself, and for a point prompt the box of its predicted mask
  (sigmoid > 0.5; the paper: "we first obtain the corresponding masks via the SAM decoder and
  obtain the box via the corresponding masks").
* Loss (sec. 3.3, code config): 2 CE (void weight 0.1) + 5 BCE + 5 Dice, the mask terms on 12544
  points per mask with importance sampling (3x oversampling, 75% most uncertain), as the code.

Frames: ``sam_embed`` is SAM's (sam_dim, G, G) at its input frame of ``sam_image_size`` pixels;
the mask logits are (4G, 4G) on that frame; CLIP levels are on the CLIP input frame of
``clip_input_size`` pixels. Prompts arrive in the frames' pixels (samcp.models.ovsam.prompts).
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MLP
from ..openvocab import OpenVocabClassifier, text_logits
from ..sam_decoder import (
    SamDecoderSize,
    build_prompt_decoder,
    load_state_part,
    sam_checkpoint_state,
)
from .sam2clip import tuple_fields

VOIDS = ("zero", "learned")
_TUPLES = ("clip_levels", "clip_channels", "clip_strides")


@dataclass(frozen=True)
class Clip2SamConfig:
    """Every knob of CLIP2SAM; defaults are the paper's / authors' code's (COCO, SAM-H)."""

    # --- SAM (the fine-tuned decoder and the frozen prompt encoder) ---
    sam_arch: str = "vit_h"  # code: SAM-H; segment_anything registry name or vit_tiny / vit_test
    sam_checkpoint: str = ""  # the .pth to initialise from; "" = random init (tests only)
    sam_dim: int = 256  # prompt_embed_dim (= cached sam_embed channels; configure)
    sam_grid: int = 64  # cached sam_embed side (configure)
    sam_image_size: int = 1024  # SAM's input frame (16 x sam_grid; configure)
    decoder_mlp_dim: int = 2048  # SAM's two-way transformer MLP (from sam_arch)
    decoder_heads: int = 8  # SAM (from sam_arch)
    iou_hidden: int = 256  # SAM's IoU head width (from sam_arch; the head is loaded, unused)
    label_token: bool = True  # code: a learned label token joins the decoder's queries
    label_token_logits: bool = False  # paper variant: add MLP(label token) to the RoI embedding
    #   (the released code multiplies it by 0, i.e. False)

    # --- recognition: FPN + RoI classifier on the CLIP levels (configure fills the inputs) ---
    clip_levels: tuple[str, ...] = ()  # code: res2..res5; configure: every cached level
    clip_channels: tuple[int, ...] = ()
    clip_strides: tuple[int, ...] = ()
    clip_input_size: int = 1024
    text_dim: int = 768  # CLIP text space (configure)
    fpn_dim: int = 256  # code: FPN out_channels 256
    roi_size: int = 12  # code: RoIAlign output 12
    finest_scale: float = 56.0  # mmdet SingleRoIExtractor: sqrt(wh) < 112 -> stride 4 ...
    void: str = "zero"  # code: zero void embedding (logit 0) | "learned" (samcp's shared one)
    logit_scale: float = 100.0  # code: exp(4.6052), fixed

    # --- training prompts (code: OVSAMDataPreprocessor, use_point_det) ---
    num_prompts: int = 40  # code: num_proposals=40 per image
    point_ratio: float = 0.5  # paper/code: half boxes, half points

    # --- losses (paper sec. 3.3 / code config) ---
    loss_cls: float = 2.0
    loss_mask: float = 5.0  # BCE on sampled points
    loss_dice: float = 5.0
    void_weight: float = 0.1  # code: CE class weight of the background
    train_points: int = 12544  # code: points per mask
    oversample_ratio: float = 3.0  # code
    importance_sample_ratio: float = 0.75  # code

    # --- inference ---
    alpha: float = 0.1  # code: CLIP's weight on seen classes (geometric ensemble)
    beta: float = 0.9  # code: CLIP's weight on unseen classes
    clip_logit_scale: float = 100.0  # frozen CLIP's logits: 100 cos
    mask_threshold: float = 0.0  # logit > 0 (sigmoid > 0.5, the code's MASK_THRESHOLD)
    # panoptic path of `samcp predict` (ours): box prompts from the cached proposals, composed
    score_thresh: float = 0.5
    overlap_thresh: float = 0.8
    max_instances: int = 100

    def __post_init__(self) -> None:
        n = len(self.clip_levels)
        if len(self.clip_channels) != n or len(self.clip_strides) != n:
            raise ValueError("clip_levels, clip_channels and clip_strides need one entry per level")
        if self.void not in VOIDS:
            raise ValueError(f"void must be one of {VOIDS}, got {self.void!r}")
        for name in (
            "sam_dim", "sam_grid", "sam_image_size", "decoder_mlp_dim", "decoder_heads",
            "iou_hidden", "clip_input_size", "text_dim", "fpn_dim", "roi_size", "train_points",
        ):  # fmt: skip
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"clip2sam {name} must be a positive integer")
        if self.num_prompts < 0:
            raise ValueError("num_prompts must be >= 0")
        for name in ("point_ratio", "alpha", "beta", "score_thresh", "overlap_thresh",
                     "importance_sample_ratio"):  # fmt: skip
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.oversample_ratio < 1.0:
            raise ValueError("oversample_ratio must be >= 1")
        for name in ("loss_cls", "loss_mask", "loss_dice", "void_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @classmethod
    def tiny(cls, **overrides: Any) -> Clip2SamConfig:
        """samcp's test-size SAM (``vit_test``: 32-wide decoder, 16 x 16 grid, 256 frame)."""
        params: dict[str, Any] = dict(
            sam_arch="vit_test",
            sam_dim=32,
            sam_grid=16,
            sam_image_size=256,
            decoder_mlp_dim=64,
            decoder_heads=2,
            iou_hidden=32,
            clip_levels=("clip_res5",),
            clip_channels=(24,),
            clip_strides=(8,),
            clip_input_size=64,
            text_dim=16,
            fpn_dim=16,
            roi_size=4,
            num_prompts=8,
            train_points=256,
        )
        params.update(overrides)
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if k in _TUPLES else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Clip2SamConfig:
        return tuple_fields(cls, data, _TUPLES, "clip2sam")


# ----------------------------------------------------------------------------------------------
# SAM's prompt encoder and mask decoder from a checkpoint.
# ----------------------------------------------------------------------------------------------


def _size(config: Clip2SamConfig) -> SamDecoderSize:
    return SamDecoderSize(
        config.sam_dim,
        config.decoder_mlp_dim,
        config.decoder_heads,
        config.iou_hidden,
        config.sam_image_size,
    )


def fresh_sam_parts(config: Clip2SamConfig) -> tuple[nn.Module, nn.Module]:
    """A randomly initialised (PromptEncoder, MaskDecoder) of segment_anything with the config's
    sizes (the arguments segment_anything's ``_build_sam`` gives them)."""
    return build_prompt_decoder(_size(config))


def load_sam_parts(config: Clip2SamConfig) -> tuple[nn.Module, nn.Module]:
    """(PromptEncoder, MaskDecoder) initialised from ``config.sam_checkpoint``.

    Raises:
        FileNotFoundError: the checkpoint is missing.
        ValueError: its weights do not fit ``sam_arch`` / the config's sizes.
    """
    fix = f"pass the {config.sam_arch} .pth with --set sam_checkpoint=PATH"
    state = sam_checkpoint_state(config.sam_checkpoint, config.sam_arch, "clip2sam", fix)
    pe, md = fresh_sam_parts(config)
    load_state_part(pe, state, "prompt_encoder.", config.sam_arch)
    load_state_part(md, state, "mask_decoder.", config.sam_arch)
    return pe, md


# ----------------------------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------------------------


@dataclass
class Clip2SamOutput:
    """What :class:`Clip2SamHead` returns (prompts padded to P per image).

    Attributes:
        mask_logits: (B, P, 4G, 4G) mask logits on SAM's frame.
        class_logits: (B, P, K + 1) recognition logits, void last.
        roi_boxes: (B, P, 4) XYXY RoIs on the CLIP frame the classifier pooled.
        valid: (B, P) bool, real prompts.
    """

    mask_logits: Tensor
    class_logits: Tensor
    roi_boxes: Tensor
    valid: Tensor


def mask_boxes(mask_logits: Tensor, frame: float, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """XYXY boxes (n, 4) in a frame of ``frame`` pixels of (n, g, g) mask logits > threshold
    (mmdet's mask2bbox: cell edges, max index + 1), and whether each mask is non-empty."""
    n, g = mask_logits.shape[0], mask_logits.shape[-1]
    fg = mask_logits > threshold
    rows, cols = fg.any(-1), fg.any(-2)  # (n, g)
    idx = torch.arange(g, device=mask_logits.device)
    big = torch.full_like(idx, g)
    x0 = torch.where(cols, idx, big).min(-1).values
    x1 = torch.where(cols, idx, -1).max(-1).values + 1
    y0 = torch.where(rows, idx, big).min(-1).values
    y1 = torch.where(rows, idx, -1).max(-1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], -1).float() * (frame / g)
    return boxes.reshape(n, 4), rows.any(-1)


def roi_levels(boxes: Tensor, strides: Sequence[int], finest_scale: float) -> Tensor:
    """Index into ``strides`` of the level each (n, 4) XYXY box is pooled from: mmdet's
    ``floor(log2(sqrt(wh) / finest_scale))`` picks stride 4 * 2^k; the nearest cached stride."""
    scale = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    k = torch.floor(torch.log2(scale.sqrt() / finest_scale + 1e-6)).clamp_min(0)
    target = k + 2  # log2 of the stride mmdet's level k has (4 * 2^k)
    logs = torch.log2(torch.as_tensor(strides, dtype=torch.float32, device=boxes.device))
    return (target[:, None] - logs[None]).abs().argmin(-1)


class Clip2SamHead(nn.Module):
    """SAM's decoder + CLIP2SAM's recognition branch (see the module docstring)."""

    def __init__(self, config: Clip2SamConfig, load_checkpoint: bool = True) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.config = config
        if config.sam_checkpoint and load_checkpoint:
            pe, md = load_sam_parts(config)
        else:
            pe, md = fresh_sam_parts(config)
        self.prompt_encoder = pe.requires_grad_(False).eval()  # frozen (paper)
        self.mask_decoder = md
        # SAM's outputs CLIP2SAM does not use (IoU head, multimask hypernetworks) stay frozen.
        md.iou_prediction_head.requires_grad_(False)
        for mlp in md.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)
        c = config.sam_dim
        self.label_token = nn.Embedding(1, c) if config.label_token else None
        self.label_mlp = (
            MLP(c, c, config.text_dim, 3)
            if config.label_token and config.label_token_logits
            else None
        )
        if not config.clip_levels:
            raise ValueError("clip2sam needs at least one CLIP level (configure fills them)")
        self.fpn = FeaturePyramidNetwork(list(config.clip_channels), config.fpn_dim)
        self.roi_conv = nn.Sequential(
            nn.Conv2d(config.fpn_dim, config.text_dim, 1, bias=False), nn.ReLU()
        )
        self.classifier = OpenVocabClassifier(config.text_dim) if config.void == "learned" else None

    def train(self, mode: bool = True) -> Clip2SamHead:
        super().train(mode)
        self.prompt_encoder.eval()
        return self

    # --- SAM ---------------------------------------------------------------------------------

    def encode_prompts(self, boxes: Tensor, points: Tensor, is_box: Tensor) -> Tensor:
        """(n, 2, C) sparse embeddings: box prompts (two corners) and single positive points
        (the point and SAM's padding point), in the given order."""
        n = is_box.shape[0]
        c = self.config.sam_dim
        sparse = boxes.new_zeros(n, 2, c)
        if bool(is_box.any()):
            sparse[is_box] = self.prompt_encoder(points=None, boxes=boxes[is_box], masks=None)[0]
        pt = ~is_box
        if bool(pt.any()):
            coords = points[pt][:, None, :]
            labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
            sparse[pt] = self.prompt_encoder(points=(coords, labels), boxes=None, masks=None)[0]
        return sparse

    def decode(self, image_embed: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor | None]:
        """Mask token 0's logits (n, 4G, 4G) and the label token's output (n, C) or None, for
        (n, C, G, G) image embeddings (one per prompt) and (n, T, C) sparse prompts.

        Without a label token this is segment_anything's ``MaskDecoder.predict_masks`` output 0
        (``multimask_output=False``) with the dense no-mask embedding."""
        md, pe = self.mask_decoder, self.prompt_encoder
        n = sparse.shape[0]
        tokens = [md.iou_token.weight, md.mask_tokens.weight]
        if self.label_token is not None:
            tokens.append(self.label_token.weight)
        out_tokens = torch.cat(tokens, 0)
        queries = torch.cat([out_tokens[None].expand(n, -1, -1), sparse.to(out_tokens.dtype)], 1)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = image_embed + dense
        pos = pe.get_dense_pe().expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pos, queries)
        src = src.transpose(1, 2).reshape(b, c, h, w)
        up = md.output_upscaling(src)
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1])
        masks = (hyper[:, None] @ up.flatten(2)).reshape(n, up.shape[-2], up.shape[-1])
        label = hs[:, 1 + md.num_mask_tokens] if self.label_token is not None else None
        return masks, label

    # --- recognition -------------------------------------------------------------------------

    def region_embed(self, levels: Sequence[Tensor], image_index: Tensor, rois: Tensor) -> Tensor:
        """(n, D) RoI embeddings of XYXY boxes (CLIP-frame pixels) of images ``image_index``."""
        from torchvision.ops import roi_align

        cfg = self.config
        feats = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(levels)))
        feats = list(feats.values())
        lvl = roi_levels(rois, cfg.clip_strides, cfg.finest_scale)
        pooled = rois.new_zeros(rois.shape[0], cfg.fpn_dim, cfg.roi_size, cfg.roi_size)
        all_rois = torch.cat([image_index[:, None].to(rois.dtype), rois], 1)
        for i, (f, stride) in enumerate(zip(feats, cfg.clip_strides)):
            sel = lvl == i
            if bool(sel.any()):
                pooled[sel] = roi_align(
                    f, all_rois[sel], cfg.roi_size, 1.0 / stride, sampling_ratio=0, aligned=True
                )
        return self.roi_conv(pooled).mean(dim=(-2, -1))

    def class_logits(self, embed: Tensor, text: Tensor) -> Tensor:
        """(n, K + 1) logits, void last."""
        if self.classifier is not None:
            return self.classifier(embed, text)
        void = text.new_zeros(1, text.shape[-1])  # cos with a zero vector is 0 -> logit 0
        return text_logits(embed, torch.cat([text.to(embed.dtype), void.to(embed.dtype)]),
                           self.config.logit_scale)  # fmt: skip

    # --- forward -----------------------------------------------------------------------------

    def forward(
        self,
        sam_embed: Tensor,
        levels: Sequence[Tensor],
        boxes: Tensor,
        points: Tensor,
        is_box: Tensor,
        roi_boxes: Tensor,
        roi_from_mask: Tensor,
        valid: Tensor,
        text_embed: Tensor,
    ) -> Clip2SamOutput:
        """Masks and class logits of P prompts per image.

        Args:
            sam_embed: (B, C, G, G) SAM image embeddings (cached, or SAM2CLIP's).
            levels: the CLIP levels, each (B, C_i, h_i, w_i).
            boxes: (B, P, 4) XYXY box prompts, SAM-frame pixels.
            points: (B, P, 2) point prompts, SAM-frame pixels.
            is_box: (B, P) bool.
            roi_boxes: (B, P, 4) XYXY RoIs on the CLIP frame (used where not roi_from_mask).
            roi_from_mask: (B, P) bool: RoI = box of the predicted mask.
            valid: (B, P) bool.
            text_embed: (K, D) class embeddings.
        """
        b, p = valid.shape
        g4 = 4 * self.config.sam_grid
        mask_out = sam_embed.new_zeros(b, p, g4, g4)
        k1 = text_embed.shape[0] + 1
        logit_out = sam_embed.new_zeros(b, p, k1)
        roi_out = sam_embed.new_zeros(b, p, 4)
        image_index, prompt_index = torch.nonzero(valid, as_tuple=True)
        if image_index.numel() == 0:
            zero = sum(x.sum() for x in self.parameters() if x.requires_grad) * 0.0
            return Clip2SamOutput(mask_out + zero, logit_out + zero, roi_out, valid)
        sel = (image_index, prompt_index)
        sparse = self.encode_prompts(boxes[sel], points[sel], is_box[sel])
        masks, label = self.decode(sam_embed[image_index], sparse)
        rois = roi_boxes[sel]
        from_mask = roi_from_mask[sel]
        if bool(from_mask.any()):
            frame = float(self.config.clip_input_size)
            mb, nonempty = mask_boxes(masks[from_mask].detach(), frame, self.config.mask_threshold)
            # An empty mask: a box of one mask cell around the point.
            pt = points[sel][from_mask] * (frame / self.config.sam_image_size)
            cell = frame / g4
            around = torch.cat([pt - cell, pt + cell], -1)
            rois = rois.clone()
            rois[from_mask] = torch.where(nonempty[:, None], mb, around)
        embed = self.region_embed(levels, image_index, rois)
        if self.label_mlp is not None and label is not None:
            embed = embed + self.label_mlp(label)
        mask_out[sel] = masks
        logit_out[sel] = self.class_logits(embed, text_embed)
        roi_out[sel] = rois.to(roi_out.dtype)
        return Clip2SamOutput(mask_out, logit_out, roi_out, valid)


def build_clip2sam_head(config: Clip2SamConfig) -> Clip2SamHead:
    """The module; SAM's weights come from ``sam_checkpoint`` when the file exists (training
    checks that it does; a saved run carries every weight, so predicting needs no checkpoint)."""
    load = bool(config.sam_checkpoint) and os.path.isfile(config.sam_checkpoint)
    return Clip2SamHead(config, load_checkpoint=load)


# ----------------------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------------------


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """(n, P) bilinear samples of (n, g, g) maps at (n, P, 2) points (x, y) in [0, 1]."""
    grid = (coords * 2 - 1)[:, :, None, :]
    return F.grid_sample(maps[:, None].float(), grid, mode="bilinear", align_corners=False)[
        :, 0, :, 0
    ]


def uncertain_points(logits: Tensor, num: int, oversample: float, importance: float) -> Tensor:
    """(n, num, 2) points: of ``oversample * num`` uniform ones, the ``importance * num`` whose
    logit is nearest 0, and the rest uniform (Mask2Former / the code's
    ``get_uncertain_point_coords_with_randomness``)."""
    n = logits.shape[0]
    sampled = int(num * oversample)
    coords = torch.rand(n, sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits.detach(), coords).abs()
    k = int(importance * num)
    idx = uncertainty.topk(k, dim=1).indices
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num - k, 2, device=logits.device)
    return torch.cat([picked, rest], 1)


class Clip2SamCriterion(nn.Module):
    """``loss = loss_cls CE + loss_mask BCE + loss_dice Dice`` over the valid prompts.

    ``targets``: per image, (labels (P,) int64, masks (P, 4G, 4G) float coverage on SAM's frame).
    CE is the weighted mean with weight ``void_weight`` on void (the code's avg_factor = the sum
    of the targets' class weights); BCE is the mean over points and masks, Dice (+1 smoothing,
    "naive") the mean over masks.
    """

    def __init__(self, config: Clip2SamConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, out: Clip2SamOutput, targets: Sequence[tuple[Tensor, Tensor]]) -> dict:
        cfg = self.config
        valid = out.valid
        labels = torch.cat([t[0][: int(v.sum())] for t, v in zip(targets, valid)])
        gt = torch.cat([t[1][: int(v.sum())] for t, v in zip(targets, valid)]).float()
        logits = out.class_logits[valid]
        masks = out.mask_logits[valid]
        if labels.numel() == 0:
            zero = out.mask_logits.sum() * 0.0 + out.class_logits.sum() * 0.0
            return {"loss": zero, "loss_cls": zero.detach(), "loss_mask": zero.detach(),
                    "loss_dice": zero.detach()}  # fmt: skip
        k = logits.shape[-1] - 1
        weight = torch.ones(k + 1, device=logits.device)
        weight[k] = cfg.void_weight
        loss_cls = F.cross_entropy(logits.float(), labels.to(logits.device), weight=weight)
        coords = uncertain_points(
            masks, cfg.train_points, cfg.oversample_ratio, cfg.importance_sample_ratio
        )
        pl = point_sample(masks, coords)
        pg = point_sample(gt.to(masks.device), coords)
        loss_mask = F.binary_cross_entropy_with_logits(pl, pg)
        prob = pl.sigmoid()
        dice = 1 - (2 * (prob * pg).sum(-1) + 1) / (prob.sum(-1) + pg.sum(-1) + 1)
        loss_dice = dice.mean()
        total = cfg.loss_cls * loss_cls + cfg.loss_mask * loss_mask + cfg.loss_dice * loss_dice
        return {
            "loss": total,
            "loss_cls": loss_cls.detach(),
            "loss_mask": loss_mask.detach(),
            "loss_dice": loss_dice.detach(),
        }
