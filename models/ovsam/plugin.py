"""Open-Vocabulary SAM as two samcp head plugins: ``sam2clip`` (the distillation neck) and
``clip2sam`` (the recognising, fine-tuned SAM decoder). See docs/heads/ovsam.md."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor, nn

from ..compose import compose_masks
from ..heads import (
    CacheInfo,
    CompositionParams,
    GroundTruth,
    Head,
    ImageInputs,
    ImageResult,
    InferContext,
)
from ..openvocab import geometric_ensemble, split_void, text_logits
from ..possam.targets import frame_coverage, frame_logits_to_rles
from ..registry import register_head
from ..sam_decoder import SAM_DECODER_SIZES
from .clip2sam import (
    Clip2SamConfig,
    Clip2SamCriterion,
    Clip2SamOutput,
    build_clip2sam_head,
)
from .prompts import Prompts, rle_boxes_xyxy, sample_training_prompts
from .sam2clip import (
    LEVELS_FLAG,
    SAM_EMBED_FLAG,
    Sam2ClipConfig,
    Sam2ClipCriterion,
    Sam2ClipNeck,
    Sam2ClipSample,
    cached_array,
    collate_levels,
    make_sam2clip_sample,
)

# ----------------------------------------------------------------------------------------------
# What both heads read from the cache.
# ----------------------------------------------------------------------------------------------


def clip_inputs(config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
    """The CLIP fields a head takes from the cache: the configured levels (default: every cached
    one), shallow to deep, with their channels and strides."""
    if not cache.clip_levels:
        raise ValueError(f"cache has no dense CLIP levels; {LEVELS_FLAG}")
    levels = tuple(config.get("clip_levels") or ()) or tuple(cache.clip_levels)
    missing = [lv for lv in levels if lv not in cache.clip_levels]
    if missing:
        raise ValueError(
            f"cache has no {', '.join(missing)} (it has {', '.join(cache.clip_levels)}); "
            f"{LEVELS_FLAG}, or set clip_levels to cached ones"
        )
    no_stride = [lv for lv in levels if lv not in cache.clip_strides]
    if no_stride:
        raise ValueError(
            f"cache records no stride for {', '.join(no_stride)}; re-run samcp precompute "
            "(a cache older than level strides)"
        )
    levels = tuple(sorted(levels, key=lambda lv: cache.clip_strides[lv]))
    return {
        "clip_levels": list(levels),
        "clip_channels": [int(cache.clip_channels[lv]) for lv in levels],
        "clip_strides": [int(cache.clip_strides[lv]) for lv in levels],
        "clip_input_size": int(cache.clip_input_size),
    }


def sam_embed_shape(cache: CacheInfo, head: str) -> tuple[int, int]:
    """(channels, side) of the cache's sam_embed; ValueError naming the flag when absent."""
    if "sam_embed" not in cache.image_arrays or cache.sam_embed_shape is None:
        raise ValueError(f"cache has no sam_embed, which {head} needs; {SAM_EMBED_FLAG}")
    c, h, w = cache.sam_embed_shape
    if h != w:
        raise ValueError(f"sam_embed is {h}x{w}; {head} needs SAM's square embedding")
    return int(c), int(h)


# ----------------------------------------------------------------------------------------------
# sam2clip
# ----------------------------------------------------------------------------------------------


@register_head
class Sam2ClipPlugin(Head):
    """SAM2CLIP: the multi-level neck from cached CLIP levels to SAM's embedding (eq. 3)."""

    name = "sam2clip"
    config_cls = Sam2ClipConfig
    summary = "OVSAM SAM2CLIP: SAM's image embedding distilled from the cached CLIP levels (MSE)"
    train_defaults = {"lr": 1e-4, "weight_decay": 0.05, "clip_grad": 5.0}  # code: sam2clip config
    outputs = ()  # a feature extractor: it predicts no segments

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        c, g = sam_embed_shape(cache, "sam2clip (its distillation target)")
        return {**clip_inputs(config, cache), "sam_dim": c, "sam_grid": g}

    def needs(self, config: Sam2ClipConfig) -> tuple[list[str], list[str]]:
        return ["sam_embed", *config.clip_levels], []

    def build(self, config: Sam2ClipConfig) -> nn.Module:
        return Sam2ClipNeck(config)

    def sample(
        self, inputs: ImageInputs, config: Sam2ClipConfig, max_masks: int, gt=None
    ) -> Sam2ClipSample:
        return make_sam2clip_sample(inputs, config, with_target=gt is not None)

    def collate(self, samples, text_embed: Tensor, config: Sam2ClipConfig, device) -> dict:
        return {"levels": collate_levels(samples, device)}

    def criterion(self, config: Sam2ClipConfig) -> nn.Module:
        return Sam2ClipCriterion()

    def infer(self, outputs, samples, config, ctx: InferContext) -> list[ImageResult]:
        """No segments: SAM2CLIP makes embeddings (samcp segment / precompute use them)."""
        return [ImageResult.empty(s.image_id, s.height, s.width) for s in samples]


# ----------------------------------------------------------------------------------------------
# clip2sam
# ----------------------------------------------------------------------------------------------


@dataclass
class Clip2SamSample:
    """One cached image for CLIP2SAM (CPU tensors).

    Attributes:
        sam_embed: (C, G, G) float16.
        levels: the CLIP levels (float16), named by ``level_names``.
        prompts: the prompts to run (training: drawn by ``augment``; prediction: the cached
            proposals' boxes; ``samcp segment``: the user's).
        gt_rles, gt_labels, gt_masks: usable ground-truth segments (not crowd, not empty), their
            class, and their coverage of SAM's (4G, 4G) mask frame (float16); training only.
    """

    image_id: str
    height: int
    width: int
    sam_embed: Tensor
    levels: list[Tensor]
    level_names: tuple[str, ...]
    prompts: Prompts
    gt_rles: list[dict] | None = None
    gt_labels: np.ndarray | None = None
    gt_boxes: np.ndarray | None = None
    gt_masks: Tensor | None = None


def make_clip2sam_sample(
    inputs: ImageInputs,
    config: Clip2SamConfig,
    max_masks: int,
    gt: GroundTruth | None = None,
    sam_embed: Tensor | None = None,
) -> Clip2SamSample:
    """A sample; without ``gt`` its prompts are the first ``max_masks`` proposals' boxes.
    ``sam_embed`` replaces the cached one (e.g. SAM2CLIP's)."""
    if sam_embed is None:
        sam_embed = cached_array(inputs, "sam_embed", SAM_EMBED_FLAG)
    want = (config.sam_dim, config.sam_grid, config.sam_grid)
    if tuple(sam_embed.shape) != want:
        raise ValueError(
            f"sam_embed of {inputs.image_id} is {tuple(sam_embed.shape)}, the head expects {want}"
        )
    levels = [cached_array(inputs, lv, LEVELS_FLAG) for lv in config.clip_levels]
    h, w = int(inputs.height), int(inputs.width)
    sample = Clip2SamSample(
        inputs.image_id, h, w, sam_embed.to(torch.float16), levels, tuple(config.clip_levels),
        Prompts.empty(),
    )  # fmt: skip
    if gt is None:
        props = inputs.first(max_masks)
        xywh = np.asarray(props.boxes, np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        sample.prompts = Prompts.from_user(boxes=boxes)
        return sample
    areas = np.asarray(mask_utils.area(list(gt.rles)), np.int64) if len(gt.rles) else np.zeros(0)
    keep = [i for i in range(len(gt.rles)) if not gt.iscrowd[i] and areas[i] > 0]
    rles = [gt.rles[i] for i in keep]
    sample.gt_rles = rles
    sample.gt_labels = np.asarray(gt.labels, np.int64)[keep]
    sample.gt_boxes = rle_boxes_xyxy(rles)
    sample.gt_masks = frame_coverage(rles, h, w, 4 * config.sam_grid).to(torch.float16)
    # Prompts of a sample used without augmentation; training draws new ones every step.
    seed = int.from_bytes(inputs.image_id.encode()[-8:].rjust(8, b"\0"), "little")
    sample.prompts = sample_training_prompts(
        rles, sample.gt_boxes, config.num_prompts, np.random.default_rng(seed), config.point_ratio
    )
    return sample


def collate_clip2sam(
    samples: Sequence[Clip2SamSample], text_embed: Tensor, config: Clip2SamConfig, device
) -> dict:
    """The module's keyword arguments; prompts padded to the largest count (``valid``)."""
    b = len(samples)
    p = max(1, max(len(s.prompts) for s in samples))
    boxes = torch.zeros(b, p, 4)
    points = torch.zeros(b, p, 2)
    rois = torch.zeros(b, p, 4)
    is_box = torch.zeros(b, p, dtype=torch.bool)
    from_mask = torch.zeros(b, p, dtype=torch.bool)
    valid = torch.zeros(b, p, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.prompts)
        if not n:
            continue
        side = max(s.height, s.width)
        to_sam, to_clip = config.sam_image_size / side, config.clip_input_size / side
        pr = s.prompts
        boxes[i, :n] = torch.from_numpy(pr.boxes * np.float32(to_sam))
        points[i, :n] = torch.from_numpy(pr.points * np.float32(to_sam))
        rois[i, :n] = torch.from_numpy(pr.boxes * np.float32(to_clip))
        is_box[i, :n] = torch.from_numpy(pr.is_box)
        from_mask[i, :n] = torch.from_numpy(pr.roi_from_mask)
        valid[i, :n] = True
    n_levels = len(samples[0].levels)
    return {
        "sam_embed": torch.stack([s.sam_embed for s in samples]).to(device).float(),
        "levels": [
            torch.stack([s.levels[j] for s in samples]).to(device).float() for j in range(n_levels)
        ],
        "boxes": boxes.to(device),
        "points": points.to(device),
        "is_box": is_box.to(device),
        "roi_boxes": rois.to(device),
        "roi_from_mask": from_mask.to(device),
        "valid": valid.to(device),
        "text_embed": text_embed.to(device).float(),
    }


class _Clip2SamCriterion(nn.Module):
    """Clip2SamCriterion with the targets of each sample's prompts."""

    def __init__(self, config: Clip2SamConfig) -> None:
        super().__init__()
        if config.sam_checkpoint and not os.path.isfile(config.sam_checkpoint):
            import errno

            raise FileNotFoundError(
                errno.ENOENT,
                "SAM checkpoint to fine-tune from not found (clip2sam sam_checkpoint)",
                config.sam_checkpoint,
            )
        self.inner = Clip2SamCriterion(config)

    def forward(self, outputs: Clip2SamOutput, samples: Sequence[Clip2SamSample]) -> dict:
        targets = []
        for s in samples:
            if s.gt_masks is None or s.gt_labels is None:
                raise ValueError(f"sample {s.image_id} has no training targets (built without gt)")
            t = torch.from_numpy(s.prompts.target)
            targets.append((torch.from_numpy(s.gt_labels)[t], s.gt_masks[t]))
        return self.inner(outputs, targets)


@torch.no_grad()
def prompt_predictions(
    outputs: Clip2SamOutput,
    index: int,
    sample: Clip2SamSample,
    config: Clip2SamConfig,
    text_embed: Tensor,
    seen: np.ndarray,
    alpha: float,
    beta: float,
    clip_head: nn.Module | None,
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Per prompt of image ``index``: its mask (RLE at the image size), its class scores (P, K)
    (the geometric ensemble of CLIP2SAM's and frozen CLIP's probabilities, alpha on seen classes
    and beta on unseen ones, renormalised), and CLIP2SAM's own probabilities (P, K).

    Frozen CLIP's side pools the cached final map (``clip_head.level``) over the predicted mask
    with the cache's own head (samcp.models.cliphead); without it, or for an empty mask, the
    score is CLIP2SAM's alone (the code's ``valid_masking``)."""
    n = int(outputs.valid[index].sum())
    logits = outputs.mask_logits[index, :n].float()
    rles = frame_logits_to_rles(logits - config.mask_threshold, sample.height, sample.width)
    p_in = split_void(outputs.class_logits[index, :n].float())[0]
    probs = p_in
    if n and clip_head is not None and clip_head.level in sample.level_names:
        dense = sample.levels[sample.level_names.index(clip_head.level)]
        device = text_embed.device
        dense = dense.to(device)
        embeds = []
        for s in range(0, n, 16):
            dec = mask_utils.decode(rles[s : s + 16])
            m = torch.from_numpy(np.ascontiguousarray(dec.transpose(2, 0, 1))).to(device)
            embeds.append(clip_head.embed_masks(dense, m))
        emb = torch.cat(embeds)
        p_clip = text_logits(emb, text_embed.float(), config.clip_logit_scale).softmax(-1)
        ens = geometric_ensemble(p_in.to(device), p_clip, seen, alpha, beta)
        nonempty = torch.as_tensor(mask_utils.area(rles) > 0, device=device)[:, None]
        probs = torch.where(nonempty, ens, p_in.to(device))
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    return rles, probs.cpu().numpy(), p_in.cpu().numpy()


@register_head
class Clip2SamPlugin(Head):
    """CLIP2SAM: SAM's fine-tuned decoder + an RoI classifier on a CLIP FPN, for box/point prompts."""

    name = "clip2sam"
    config_cls = Clip2SamConfig
    summary = (
        "OVSAM CLIP2SAM: SAM's mask decoder fine-tuned on GT box/point prompts over cached "
        "sam_embed, with an FPN + RoI open-vocabulary classifier on the CLIP levels"
    )
    train_defaults = {"lr": 1e-4, "weight_decay": 0.05, "clip_grad": 0.01}  # code: clip2sam
    inference_fields = (
        "alpha",
        "beta",
        "clip_logit_scale",
        "mask_threshold",
        "score_thresh",
        "overlap_thresh",
        "max_instances",
    )

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        c, g = sam_embed_shape(cache, "clip2sam")
        out: dict[str, Any] = {
            **clip_inputs(config, cache),
            "text_dim": int(cache.text_dim),
            "sam_dim": c,
            "sam_grid": g,
            "sam_image_size": 16 * g,  # SAM's patch size
        }
        arch = config.get("sam_arch", "vit_h")
        if arch in SAM_DECODER_SIZES:
            d = SAM_DECODER_SIZES[arch]
            if (d.dim, d.image_size) != (c, 16 * g):
                raise ValueError(
                    f"the cache's sam_embed is {c} x {g} x {g} but sam_arch {arch} decodes "
                    f"{d.dim} x {d.grid} x {d.grid}; set sam_arch (and sam_checkpoint) to "
                    "the SAM the cache was made with"
                )
            out.update(decoder_mlp_dim=d.mlp_dim, decoder_heads=d.heads, iou_hidden=d.iou_hidden)
        return out

    def needs(self, config: Clip2SamConfig) -> tuple[list[str], list[str]]:
        return ["sam_embed", *config.clip_levels], []

    def default_params(self, config: Clip2SamConfig) -> CompositionParams:
        return CompositionParams(
            score_thresh=config.score_thresh,
            overlap_thresh=config.overlap_thresh,
            max_instances=config.max_instances,
        )

    def build(self, config: Clip2SamConfig) -> nn.Module:
        return build_clip2sam_head(config)

    def sample(
        self, inputs: ImageInputs, config: Clip2SamConfig, max_masks: int, gt=None
    ) -> Clip2SamSample:
        return make_clip2sam_sample(inputs, config, max_masks, gt)

    def augment(
        self, sample: Clip2SamSample, config: Clip2SamConfig, flip: bool, rng=None
    ) -> Clip2SamSample:
        """Training prompts drawn afresh from ``rng`` (without it, the sample's own); no flip
        (docs/heads/ovsam.md)."""
        if sample.gt_rles is None or rng is None:
            return sample
        assert sample.gt_boxes is not None
        prompts = sample_training_prompts(
            sample.gt_rles, sample.gt_boxes, config.num_prompts, rng, config.point_ratio
        )
        return replace(sample, prompts=prompts)

    def collate(self, samples, text_embed: Tensor, config: Clip2SamConfig, device) -> dict:
        return collate_clip2sam(list(samples), text_embed, config, device)

    def criterion(self, config: Clip2SamConfig) -> nn.Module:
        return _Clip2SamCriterion(config)

    def num_masks(self, sample: Clip2SamSample) -> int:
        return len(sample.prompts)

    @torch.no_grad()
    def infer(
        self,
        outputs: Clip2SamOutput,
        samples: Sequence[Clip2SamSample],
        config: Clip2SamConfig,
        ctx: InferContext,
    ) -> list[ImageResult]:
        """The panoptic path (ours): every prompt's mask and class scores, composed."""
        alpha = config.alpha if ctx.alpha is None else float(ctx.alpha)
        beta = config.beta if ctx.beta is None else float(ctx.beta)
        isthing = np.asarray(ctx.isthing, bool)
        results = []
        for i, s in enumerate(samples):
            if not len(s.prompts):
                results.append(ImageResult.empty(s.image_id, s.height, s.width))
                continue
            rles, probs, _ = prompt_predictions(
                outputs, i, s, config, ctx.text_embed, ctx.seen, alpha, beta, ctx.clip_head
            )
            results.append(
                compose_masks(s.image_id, s.height, s.width, rles, probs, isthing, ctx.params)
            )
        return results
