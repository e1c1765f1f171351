"""The head plugin interface: what every trainable head brings, and the data it is handed.

A head is a subclass of :class:`Head` registered with :func:`samcp.models.registry.register_head`
(the timm ``register_model`` pattern). ``samcp train`` and ``samcp predict`` are generic: they read
cache rows, turn them into :class:`ImageInputs` (plain numpy, no cache objects), and call the head's
methods in this order::

    train:    configure -> build -> sample(inputs, gt) -> augment -> collate -> module(**batch)
              -> criterion(outputs, samples)
    predict:  configure (saved) -> build/load -> sample(inputs) -> collate -> module(**batch)
              -> infer(outputs, samples, ctx) -> ImageResult (written by the prediction writer)

Everything here is pure torch / numpy: ``samcp.models`` never imports ``samcp.pipeline``. How to add
a head: docs/heads/README.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class CacheInfo:
    """What a proposal cache offers a head (from its root attributes and one shard).

    Attributes:
        clip_model: open_clip model name of the cached CLIP features.
        clip_input_size: S, the side of the square CLIP input (image resized so its longer side is S,
            padded at the bottom/right).
        clip_levels: dense CLIP map names in the cache (``clip_res3`` ...), shallow to deep.
        clip_strides: stride of each level w.r.t. the CLIP input.
        clip_channels: channels of each level.
        text_dim: D of the CLIP text space (``clip_mask_embed`` and text embeddings).
        image_arrays: every per-image array a row carries (``clip_res5``, ``sam_embed`` ...).
        mask_arrays: every per-proposal array (``clip_mask_embed``, ``predicted_iou`` ...).
        sam_embed_shape: (C, h, w) of the cached SAM embedding, None when not stored.
        clip_head: the CLIP's frozen head (:class:`samcp.models.cliphead.ClipHeadWeights`), None
            when the cache stores none.
    """

    clip_model: str | None
    clip_input_size: int
    clip_levels: tuple[str, ...]
    clip_strides: Mapping[str, int]
    clip_channels: Mapping[str, int]
    text_dim: int
    image_arrays: frozenset[str] = frozenset()
    mask_arrays: frozenset[str] = frozenset()
    sam_embed_shape: tuple[int, int, int] | None = None
    clip_head: Any = None


@dataclass
class ImageInputs:
    """One cached image as a head sees it (CPU numpy arrays, read from the cache).

    Attributes:
        image_id, height, width: the image and its original size.
        image_arrays: per-image arrays the head asked for (``clip_res5`` (C, h, w) float16 at the
            CLIP input geometry, ``sam_embed`` (256, 64, 64) float16 at SAM's 1024 geometry, ...).
        rles: the proposals' COCO RLEs at (height, width), in cache order.
        boxes: (P, 4) float32 XYWH in original pixels.
        areas: (P,) pixel areas.
        mask_arrays: per-proposal arrays the head asked for (``clip_mask_embed`` (P, D) ...).
    """

    image_id: str
    height: int
    width: int
    image_arrays: Mapping[str, np.ndarray]
    rles: list[dict]
    boxes: np.ndarray
    areas: np.ndarray
    mask_arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rles)

    def first(self, n: int) -> ImageInputs:
        """The first ``n`` proposals (cache order: SAM's, after NMS)."""
        return ImageInputs(
            self.image_id,
            self.height,
            self.width,
            self.image_arrays,
            self.rles[:n],
            self.boxes[:n],
            self.areas[:n],
            {k: v[:n] for k, v in self.mask_arrays.items()},
        )


@dataclass
class GroundTruth:
    """One image's panoptic ground truth as RLEs at the image size (contiguous class indices).

    Attributes:
        rles: one COCO RLE per segment.
        labels: (S,) int64 class index into the training classes.
        iscrowd: (S,) bool.
        isthing: (K,) bool of the training classes.
    """

    rles: list[dict]
    labels: np.ndarray
    iscrowd: np.ndarray
    isthing: np.ndarray


@dataclass(frozen=True)
class CompositionParams:
    """Thresholds of the shared composition (samcp.models.compose); each head has its defaults.

    score_thresh: a segment scoring below this is not painted (instances keep it in the top-k).
    overlap_thresh: a segment is kept only if at least this fraction of its mask is visible after
        the per-pixel competition (Mask2Former's overlap_threshold, 0.8).
    stuff_area_min: a stuff region smaller than this many pixels becomes void.
    max_instances: instances per image in instances.json (top-k, COCO's 100).
    semantic_from: which masks make the semantic map of ``compose_masks``: ``"all"`` (every mask
        votes, Mask2Former / FC-CLIP's semantic inference), ``"kept"`` (only masks scoring at
        least score_thresh vote) or ``"panoptic"`` (each pixel takes the class of its panoptic
        segment, void stays -1: SAM-CP's code).
    """

    score_thresh: float = 0.5
    overlap_thresh: float = 0.8
    stuff_area_min: int = 0
    max_instances: int = 100
    semantic_from: str = "all"

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_thresh <= 1.0:
            raise ValueError(f"--score-thresh {self.score_thresh} must be in [0, 1]")
        if not 0.0 <= self.overlap_thresh <= 1.0:
            raise ValueError(f"--overlap-thresh {self.overlap_thresh} must be in [0, 1]")
        if self.stuff_area_min < 0:
            raise ValueError(f"--stuff-area-min {self.stuff_area_min} must be >= 0")
        if self.max_instances < 0:
            raise ValueError(f"max_instances {self.max_instances} must be >= 0")
        if self.semantic_from not in ("all", "kept", "panoptic"):
            raise ValueError(
                f"semantic_from must be 'all', 'kept' or 'panoptic', got {self.semantic_from!r}"
            )


@dataclass
class InferContext:
    """What a head needs at inference besides its outputs.

    Attributes:
        text_embed: (K, D) the prediction vocabulary's class embeddings (samcp.models.openvocab rule).
        isthing: (K,) bool; instances take thing classes only, stuff is merged per class.
        seen: (K,) bool, classes of the training vocabulary (alpha applies), others unseen (beta).
        alpha, beta: the geometric-ensemble weights of CLIP for seen / unseen classes; None takes
            the head config's.
        params: composition thresholds.
        device: where the head runs.
        clip_head: the prediction cache's frozen CLIP head
            (:class:`samcp.models.cliphead.ClipHead`, on ``device``) to embed masks the cache
            does not hold by pooling its final dense map; None when the cache stores none.
    """

    text_embed: Tensor
    isthing: np.ndarray
    seen: np.ndarray
    params: CompositionParams
    device: torch.device
    alpha: float | None = None
    beta: float | None = None
    clip_head: nn.Module | None = None


@dataclass
class ImageResult:
    """One image's prediction, ready for the writers (COCO panoptic PNG/JSON, semantic, instances).

    Attributes:
        panoptic: (H, W) int32 segment ids, 0 = void.
        segments: one dict per segment id: ``{"id", "label", "isthing", "score", "area"}``.
        semantic: (H, W) int32 class index per pixel, -1 where no class.
        instance_rles, instance_labels, instance_scores: ranked instances (score descending).
    """

    image_id: str
    height: int
    width: int
    panoptic: np.ndarray
    segments: list[dict[str, Any]]
    semantic: np.ndarray
    instance_rles: list[dict]
    instance_labels: np.ndarray
    instance_scores: np.ndarray

    @classmethod
    def empty(cls, image_id: str, height: int, width: int) -> ImageResult:
        """All void: no segment, no class, no instance."""
        return cls(
            image_id,
            height,
            width,
            np.zeros((height, width), np.int32),
            [],
            np.full((height, width), -1, np.int32),
            [],
            np.zeros(0, np.int64),
            np.zeros(0, np.float32),
        )


class Head:
    """Base class of a head plugin. Subclasses set ``name`` and ``config_cls`` and implement the
    methods marked below; register them with ``@register_head``.

    The config class is a frozen dataclass with the paper's values as defaults, ``to_dict()``,
    ``from_dict(mapping)`` and a ``tiny()`` preset for tests.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    #: a one-line description for docs.
    summary: ClassVar[str] = ""
    #: config fields that only change inference, so ``samcp predict --set KEY=VALUE`` may change
    #: them on a trained run (ablations of the classifier, thresholds).
    inference_fields: ClassVar[tuple[str, ...]] = ()
    #: values for config fields added after a head was saved: a saved config.json without one of
    #: these keys predates it and gets the value that rebuilds the saved model exactly.
    legacy_defaults: ClassVar[dict[str, Any]] = {}
    #: optimisation defaults of the head's paper/code (``lr``, ``weight_decay``, ``clip_grad``,
    #: ``lr_drop``): ``samcp train`` uses them for the TrainConfig fields the user left unset.
    train_defaults: ClassVar[Mapping[str, Any]] = {}
    #: which parts of an ImageResult the head predicts: "panoptic" (the id map and segments),
    #: "semantic" (the class map), "instances" (ranked instances). A semantic head (CAT-Seg's
    #: cost aggregation) sets ("semantic",): its results still carry an all-void panoptic map and
    #: no instances, which predict and eval should neither write nor score as predictions.
    outputs: ClassVar[tuple[str, ...]] = ("panoptic", "semantic", "instances")

    # --- configuration -------------------------------------------------------------------------

    def configure(self, config: Mapping[str, Any], cache: CacheInfo) -> dict[str, Any]:
        """The config fields the cache dictates (CLIP geometry, channels, text dim), applied over
        the preset and under the user's overrides. Raise ValueError naming the precompute flag when
        the cache lacks what the head needs."""
        raise NotImplementedError

    def needs(self, config: Any) -> tuple[list[str], list[str]]:
        """(per-image arrays, per-proposal arrays) the head reads from cache rows."""
        raise NotImplementedError

    def default_params(self, config: Any) -> CompositionParams:
        """The composition thresholds of this head (its paper's)."""
        return CompositionParams()

    # --- model and training --------------------------------------------------------------------

    def build(self, config: Any) -> nn.Module:
        raise NotImplementedError

    def sample(
        self, inputs: ImageInputs, config: Any, max_masks: int, gt: GroundTruth | None = None
    ) -> Any:
        """One image's sample (CPU tensors), with training targets when ``gt`` is given. Samples
        are memoised by the trainer, so keep them compact."""
        raise NotImplementedError

    def augment(
        self, sample: Any, config: Any, flip: bool, rng: np.random.Generator | None = None
    ) -> Any:
        """The sample under a horizontal flip when ``flip`` (training only); default: unchanged.

        ``rng`` (training) is a generator seeded by (seed, epoch, step, position in the global
        batch): draw any other random augmentation from it, so that it is reproducible and a
        resumed run sees the same; None (tests, tools): no random augmentation besides ``flip``.
        """
        return sample

    def collate(self, samples: Sequence[Any], text_embed: Tensor, config: Any, device) -> dict:
        """The module's keyword arguments for a batch."""
        raise NotImplementedError

    def init_from_cache(self, module: nn.Module, config: Any, cache: CacheInfo) -> None:
        """Called once by ``samcp train`` on a freshly built module, before the optimiser is made:
        copy frozen weights the cache carries into it (e.g. the CLIP head, ``cache.clip_head``)
        and set ``requires_grad`` accordingly. They are saved with the model, so prediction needs
        nothing more. Raise ValueError naming the precompute step when the cache lacks them.
        Default: nothing."""

    def param_groups(self, module: nn.Module, config: Any, lr: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (``torch.optim`` format) for base learning rate
        ``lr``: a head whose paper trains some parts slower (ESC-Net's SAM blocks) gives those a
        group with its own ``"lr"``. Keep the order fixed (optimiser state is saved by group).
        Default: one group of every parameter, i.e. ``module.parameters()``."""
        return [{"params": list(module.parameters())}]

    def criterion(self, config: Any) -> nn.Module:
        """A module ``(outputs, samples) -> {"loss": total, other named terms}``."""
        raise NotImplementedError

    # --- inference -----------------------------------------------------------------------------

    def infer(
        self, outputs: Any, samples: Sequence[Any], config: Any, ctx: InferContext
    ) -> list[ImageResult]:
        """Outputs of one batch -> one ImageResult per sample (through samcp.models.compose)."""
        raise NotImplementedError

    def num_masks(self, sample: Any) -> int:
        """Proposals used by a sample (for summaries)."""
        return 0
