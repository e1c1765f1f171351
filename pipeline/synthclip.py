"""samcp's own small CLIP for the synthetic world: trained on a `samcp synth` dataset in minutes.

No real CLIP weights can be downloaded here, and a random CLIP carries no signal, so every
open-vocabulary number would be meaningless. This module trains a small open_clip model
(:data:`SYNTH_CLIP_MODEL`, shipped in :data:`samcp.pipeline.clip.TEST_MODEL_CONFIGS`: timm's
``test_convnext`` trunk with ``convnext_large_d_320``'s layout, a 2-layer text tower) so that what
samcp uses of a CLIP works: the **mask-pooled dense feature** of a region, computed exactly as
:class:`~samcp.pipeline.clip.ClipFeatureExtractor` computes ``clip_mask_embed`` at the cache's input
geometry, lands near the text embedding of the region's class, under any of its synonyms and
prompt templates. The result is a plain open_clip state dict that
``samcp precompute --clip-model samcp-synth-convnext --clip-checkpoint FILE`` loads like any other.

Training (see docs/synthetic-clip.md):

* **regions**: every ground-truth segment of every image of the split, and the SLIC superpixels that
  ``--proposals slic`` makes (same parameters), each assigned to the segment it mostly lies in
  (IoP >= 0.5; the others are dropped; at most 32 per image, drawn once), so partial masks like the
  cache's proposals are trained too;
* **image side**: the extractor's own code: ``preprocess`` (longer side to ``input_size``, zero pad
  to a square), the trunk's final map, ``mask_weights``, :func:`~samcp.pipeline.clip.mask_pool`,
  ``embed_pooled``, L2 norm; only the autograd context differs (:func:`region_embeddings`);
* **text side**: captions drawn each step from the classes' names (synonyms included) and the
  prompt templates of :mod:`samcp.pipeline.vocab`;
* **loss**: cross-entropy of each region against the classes' caption embeddings, scaled by the
  model's ``logit_scale`` and weighted by inverse class frequency (CLIP's image->text term), plus
  the symmetric text->region term (:func:`region_text_loss`).

Deterministic: the same dataset, settings and seed give the same state dict (bit for bit on one
machine with the same number of threads).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from samcp.pipeline.clip import ClipConfig, ClipFeatureExtractor, mask_pool, register_test_models
from samcp.pipeline.datasets import CocoPanopticDataset, ImageRecord, load_image_rgb
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.files import file_sha256
from samcp.pipeline.outputs import check_out_file
from samcp.pipeline.proposals.slic import SlicGenerator, SlicParams
from samcp.pipeline.vocab import (
    VILD_TEMPLATES,
    Vocabulary,
    read_vocabulary,
    resolve_templates,
    vocabulary_from_dataset,
)

SYNTH_CLIP_MODEL = "samcp-synth-convnext"

# The cache geometry `samcp precompute` uses by default (ClipConfig.input_size, --clip-input-size),
# and so the demo's: a CLIP must be trained at the geometry its features are pooled at.
DEFAULT_INPUT_SIZE = ClipConfig.input_size
DEFAULT_STEPS = 160
DEFAULT_BATCH_SIZE = 2
DEFAULT_LR = 3e-3
DEFAULT_SUPERPIXELS_PER_IMAGE = 32
# A superpixel is a region of the segment holding at least this fraction of its pixels (IoP).
MIN_IOP = 0.5


@dataclass(frozen=True)
class SynthClipSummary:
    """What :func:`train_synth_clip` did.

    Attributes:
        out: The checkpoint written.
        model: open_clip model name the checkpoint is for.
        steps: Optimiser steps taken.
        seed: The seed.
        input_size: Cache geometry trained at.
        images: Training images.
        gt_regions: Ground-truth segments used as regions.
        superpixel_regions: SLIC superpixels assigned to a segment (IoP >= 0.5) and used.
        classes: Number of classes (text side).
        names: Number of class names, synonyms included.
        prepare_s: Seconds spent reading images, making superpixels and pooling weights.
        train_s: Seconds spent in the optimisation loop.
        final_loss: Mean loss over the last 10% of steps.
        final_region_accuracy: Region->class top-1 accuracy (sampled captions) over the last 10%
            of steps, on training regions.
        checkpoint_sha256: sha256 of the written file.
    """

    out: str
    model: str
    steps: int
    seed: int
    input_size: int
    images: int
    gt_regions: int
    superpixel_regions: int
    classes: int
    names: int
    prepare_s: float
    train_s: float
    final_loss: float
    final_region_accuracy: float
    checkpoint_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Data: classes, regions, captions


def dataset_vocabulary(dataset: CocoPanopticDataset) -> Vocabulary:
    """The dataset's classes with their synonyms: ``root/classes.txt`` when there is one.

    ``samcp synth`` writes ``classes.txt`` (FC-CLIP's ``id:name,synonym,...``); other COCO-layout
    datasets get their category names only.

    Raises:
        SamcpError: ``classes.txt`` is malformed or lacks a category of the dataset.
    """
    path = dataset.root / "classes.txt"
    if not path.is_file():
        return vocabulary_from_dataset(dataset.categories, name=dataset.root.name)
    vocab = read_vocabulary(path)
    missing = sorted(set(dataset.category_index) - set(vocab.ids))
    if missing:
        raise SamcpError(
            f"{path} has no line for category id(s) {', '.join(map(str, missing[:5]))} of "
            f"{dataset.json_path}; add them or remove classes.txt to use the JSON's names"
        )
    return vocab


def assign_superpixels(
    segment_index: np.ndarray, masks: np.ndarray, min_iop: float = MIN_IOP
) -> np.ndarray:
    """The segment each mask mostly lies in, by intersection over the mask's own area (IoP).

    Args:
        segment_index: (H, W) int, 0 for void and k + 1 for segment k.
        masks: (M, H, W) bool masks (superpixels).
        min_iop: Smallest fraction of a mask's pixels that must lie in one segment.

    Returns:
        (M,) int64: the segment k of each mask, or -1 when no segment holds ``min_iop`` of it (void
        counts against the mask, so a mostly-void superpixel is never assigned).
    """
    n = int(segment_index.max(initial=0))
    out = np.full(len(masks), -1, np.int64)
    if n == 0:
        return out
    flat = segment_index.ravel()
    for i, m in enumerate(masks):
        counts = np.bincount(flat[m.ravel()], minlength=n + 1)
        area = counts.sum()
        if area == 0:
            continue
        k = int(counts[1:].argmax())
        if counts[k + 1] >= min_iop * area:
            out[i] = k
    return out


@dataclass
class _ImageRegions:
    image: np.ndarray  # HxWx3 uint8 RGB, as precompute reads it
    weights: torch.Tensor  # (R, fh*fw) pooling weights at the cache geometry (GT rows first)
    labels: torch.Tensor  # (R,) class index into the vocabulary
    num_gt: int


def _image_regions(
    dataset: CocoPanopticDataset,
    rec: ImageRecord,
    extractor: ClipFeatureExtractor,
    feat_hw: tuple[int, int],
    class_of: dict[int, int],
    slic: SlicGenerator,
    chunk: int,
    max_superpixels: int | None,
    rng: np.random.Generator,
) -> _ImageRegions:
    try:
        image = load_image_rgb(rec.file_name)
    except OSError as exc:
        raise SamcpError(
            f"cannot read training image {rec.file_name} ({exc}); fix or re-create the dataset"
        ) from None
    id_map, segments = dataset.load_panoptic(rec.image_id)
    segment_index = np.zeros(id_map.shape, np.int32)
    labels = []
    for seg in segments:
        segment_index[id_map == int(seg["id"])] = len(labels) + 1
        labels.append(class_of[int(seg["category_id"])])
    gt_masks, gt_labels = [], []
    for k, label in enumerate(labels):
        mask = segment_index == k + 1
        if mask.any():  # a segment listed in the JSON but absent from the PNG has no region
            gt_masks.append(mask)
            gt_labels.append(label)

    sp = slic.generate(image).decode()
    owner = assign_superpixels(segment_index, sp)
    kept = np.flatnonzero(owner >= 0)
    if max_superpixels is not None and len(kept) > max_superpixels:
        kept = np.sort(rng.choice(kept, size=max_superpixels, replace=False))
    sp_masks = sp[kept]
    sp_labels = [labels[k] for k in owner[kept]]

    masks = np.concatenate([np.stack(gt_masks) if gt_masks else sp[:0], sp_masks])
    weights = []
    with torch.no_grad():
        for i in range(0, len(masks), chunk):
            part = torch.from_numpy(masks[i : i + chunk]).to(extractor.device)
            weights.append(extractor.mask_weights(part, feat_hw).cpu())
    w = torch.cat(weights) if weights else torch.zeros((0, feat_hw[0] * feat_hw[1]))
    return _ImageRegions(
        image=image,
        weights=w,
        labels=torch.tensor(gt_labels + sp_labels, dtype=torch.int64),
        num_gt=len(gt_labels),
    )


class CaptionSampler:
    """Draws one caption per class: a random name (synonyms included) in a random template.

    All (template, name) prompts are tokenised once; a draw only picks rows.

    Args:
        vocab: The classes and their names.
        templates: Prompt templates with one ``{}`` each.
        tokenizer: The model's open_clip tokenizer.
    """

    def __init__(self, vocab: Vocabulary, templates: Sequence[str], tokenizer) -> None:
        self.templates = tuple(templates)
        names, index = vocab.flat()
        self.num_classes = len(vocab)
        self.names_of = [np.flatnonzero(np.asarray(index) == k) for k in range(len(vocab))]
        prompts = [t.format(n) for n in names for t in self.templates]
        self.tokens = tokenizer(prompts)  # row = name * len(templates) + template
        self.num_names = len(names)

    def sample(self, rng: np.random.Generator) -> torch.Tensor:
        """(K, L) tokens: class k's caption in row k."""
        t = len(self.templates)
        rows = [int(rng.choice(ids)) * t + int(rng.integers(t)) for ids in self.names_of]
        return self.tokens[rows]


# --------------------------------------------------------------------------------------------
# The shared image path


def region_embeddings(
    extractor: ClipFeatureExtractor,
    images: Sequence[np.ndarray],
    weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """L2-normalised CLIP embeddings of regions, by the cache's own path, differentiable.

    Exactly what :meth:`ClipFeatureExtractor.extract` stores as ``clip_mask_embed``: each image is
    ``preprocess``-ed into the fixed square frame, the trunk gives its final map (``forward_features``
    = stem, stages, ``norm_pre``: the extractor's ``dense_features`` final map), regions are pooled
    with :func:`~samcp.pipeline.clip.mask_pool` under ``mask_weights`` and go through
    ``embed_pooled``. Gradients flow when the caller's autograd mode allows.

    Args:
        extractor: Built around the model being trained (or any model).
        images: HxWx3 uint8 RGB images, any size (each is resized into the square frame).
        weights: Per image, (R_i, fh*fw) pooling weights from ``extractor.mask_weights``.

    Returns:
        (sum R_i, D) embeddings, images in order.
    """
    x = torch.cat([extractor.preprocess(im) for im in images])
    maps = extractor.trunk.forward_features(x)
    pooled = [mask_pool(m.flatten(1), w.to(m.device)) for m, w in zip(maps, weights)]
    return extractor.embed_pooled(torch.cat(pooled))


# --------------------------------------------------------------------------------------------
# Training


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # open_clip warns on the root logger that a model without `pretrained` is randomly initialised,
    # which is the point here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def region_text_loss(
    regions: torch.Tensor,
    captions: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | float,
    class_weight: torch.Tensor | None = None,
    text_to_region: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's contrastive loss between regions and one caption per class, over caption draws.

    Per draw ``v``: the image->text term is the cross-entropy of each region's scaled cosine
    similarities to the K captions against its class (weighted by ``class_weight[class]`` and
    normalised by the weights' sum); the text->image term lets each class present in the batch
    pick its regions among all regions (several positives: their mean log-probability). The loss
    is the mean over draws.

    Args:
        regions: (N, D) L2-normalised region embeddings.
        captions: (V, K, D) L2-normalised caption embeddings, draw ``v``'s caption of class k in
            ``[v, k]``.
        target: (N,) class of each region.
        scale: The logit scale (``logit_scale.exp()``).
        class_weight: (K,) weight per class; None weighs all alike.
        text_to_region: Add the text->image term.

    Returns:
        The loss and the last draw's (N, K) logits (detached), for accuracy.
    """
    present = torch.unique(target)
    pos = (target[None, :] == present[:, None]).float()  # (P, N)
    loss = regions.new_zeros(())
    for txt in captions:
        logits = scale * regions @ txt.T  # (N, K)
        # With weights, torch's mean is sum(w[y_i] * ce_i) / sum(w[y_i]).
        loss = loss + F.cross_entropy(logits, target, weight=class_weight)
        if text_to_region:
            logp = F.log_softmax(logits.T[present], dim=1)  # (P, N)
            loss = loss + (-(logp * pos).sum(1) / pos.sum(1)).mean()
    return loss / len(captions), logits.detach()


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * 0.5 * (1.0 + float(np.cos(np.pi * t)))


def train_synth_clip(
    dataset_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "train2017",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    input_size: int = DEFAULT_INPUT_SIZE,
    model_name: str = SYNTH_CLIP_MODEL,
    batch_size: int = DEFAULT_BATCH_SIZE,
    superpixels_per_image: int | None = DEFAULT_SUPERPIXELS_PER_IMAGE,
    lr: float = DEFAULT_LR,
    class_balance: bool = True,
    slic: SlicParams | None = None,
    templates: str | Sequence[str] = VILD_TEMPLATES,
    text_to_region: bool = True,
    caption_draws: int = 3,
    limit: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> SynthClipSummary:
    """Trains samcp's synthetic-world CLIP on a COCO-panoptic dataset and saves its state dict.

    Args:
        dataset_root: A ``samcp synth`` dataset (or any COCO-panoptic-layout folder; synonyms come
            from its ``classes.txt`` when present).
        out: The checkpoint file to write (a plain open_clip state dict, loadable with
            ``open_clip.create_model(model_name, pretrained=out)`` and ``load_clip``).
        split: Split folder to train on.
        steps: Optimiser steps; each sees ``batch_size`` images.
        seed: Seeds the initial weights and every random choice; same seed, same weights.
        input_size: The cache geometry to train at (``--clip-input-size`` of the precompute that
            will use the model): longer side resized to it, zero-padded square. Multiple of 32.
        model_name: open_clip config to train; must have a timm ConvNeXt image tower.
        batch_size: Images per step. Higher is steadier but each step costs more.
        superpixels_per_image: Most superpixel regions kept per image (a random subset, drawn
            once); None keeps all. Their pooling weights are computed once, which costs about
            5 ms per region at 1024 px; every step pools all regions of its images (cheap next
            to the trunk pass). Ground-truth segments are always used.
        lr: Peak AdamW learning rate (warm-up, then cosine decay).
        class_balance: Weight each region's loss by the inverse frequency of its class among all
            training regions (superpixels are mostly stuff; things would otherwise learn slowly).
        slic: Superpixel settings; default those of ``samcp precompute --proposals slic``.
        templates: Prompt templates (or a set name of :mod:`samcp.pipeline.vocab`) captions are
            drawn from.
        text_to_region: Add CLIP's symmetric text->region term to the loss.
        caption_draws: Captions drawn per class and step (each a random name and template); the
            loss is averaged over them. The text tower is cheap next to the image tower.
        limit: Only the first N images of the split (tests, quick looks).
        progress: Show tqdm progress bars on stderr.
        overwrite: Replace an existing file at ``out`` (otherwise refused).

    Returns:
        What was done (:class:`SynthClipSummary`).

    Raises:
        SamcpError: A missing or malformed dataset, bad settings, an unwritable ``out``.
    """
    import open_clip
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = check_out_file(out, "--out")
    if out.exists() and not overwrite:
        raise SamcpError(
            f"--out {out} already exists; pass --overwrite to replace it, or choose another path"
        )
    if steps < 1:
        raise SamcpError(f"--steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise SamcpError(f"--batch-size must be at least 1, got {batch_size}")
    if caption_draws < 1:
        raise SamcpError(f"caption_draws must be at least 1, got {caption_draws}")
    if superpixels_per_image is not None and superpixels_per_image < 0:
        raise SamcpError(f"superpixels_per_image must be >= 0, got {superpixels_per_image}")
    root = Path(dataset_root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise SamcpError(
            f"dataset {root} {what}; pass a COCO-panoptic dataset folder (e.g. from `samcp synth`)"
        )
    clip_cfg = ClipConfig(model=model_name, input_size=input_size, store_dense=False)
    register_test_models()
    if open_clip.get_model_config(model_name) is None:
        raise SamcpError(
            f"unknown CLIP model {model_name!r}; train {SYNTH_CLIP_MODEL} or another open_clip "
            "config with a timm ConvNeXt image tower"
        )
    templates = resolve_templates(templates)
    dataset = CocoPanopticDataset(root, split)
    records = dataset.records[:limit] if limit is not None else dataset.records
    if not records:
        raise SamcpError(f"{dataset.json_path} lists no images; nothing to train on")
    vocab = dataset_vocabulary(dataset)
    class_of = {cid: k for k, cid in enumerate(vocab.ids)}

    with torch.random.fork_rng(devices=[]), _quiet_root_logger():
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name)
    # The extractor freezes what it is given; the tower is trained through its methods, so the
    # gradients are switched back on. ConvNeXt and the text transformer have no dropout or batch
    # statistics here, so eval mode is also training mode.
    extractor = ClipFeatureExtractor(clip_cfg, "cpu", model=model)
    model.requires_grad_(True)
    stride = int(extractor.trunk.feature_info[-1]["reduction"])
    feat_hw = (input_size // stride, input_size // stride)

    slic_gen = SlicGenerator(slic or SlicParams())
    pick_rng, rng = (np.random.default_rng([seed, i]) for i in range(2))
    regions: list[_ImageRegions] = []
    for rec in tqdm(
        records,
        desc="synth-clip regions",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ):
        regions.append(
            _image_regions(
                dataset,
                rec,
                extractor,
                feat_hw,
                class_of,
                slic_gen,
                clip_cfg.mask_chunk,
                superpixels_per_image,
                pick_rng,
            )
        )
    regions = [r for r in regions if len(r.labels)]
    if not regions:
        raise SamcpError(
            f"{dataset.json_path}: no image has a labelled segment; nothing to train on"
        )
    if batch_size > len(regions):
        raise SamcpError(
            f"--batch-size {batch_size} is more than the {len(regions)} training images with "
            "labelled segments; pass a smaller --batch-size"
        )
    t_prep = time.perf_counter() - t0

    counts = torch.bincount(torch.cat([r.labels for r in regions]), minlength=len(vocab))
    class_weight = (
        counts.sum() / (len(vocab) * counts.clamp(min=1)).float()
        if class_balance
        else torch.ones(len(vocab))
    )
    captions = CaptionSampler(vocab, templates, open_clip.get_tokenizer(model_name))
    k = len(vocab)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    # Fused: the default (foreach) AdamW spends about 0.1 s a step on the 3.2M-parameter token
    # embedding on two cores, up to a quarter of a 1024-pixel step; fused takes about 10 ms.
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=True,
    )
    order: list[int] = []
    losses, accs = [], []
    t1 = time.perf_counter()
    bar = tqdm(
        range(steps),
        desc="synth-clip train",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        if len(order) < batch_size:
            order += rng.permutation(len(regions)).tolist()
        batch = [regions[i] for i in order[:batch_size]]
        del order[:batch_size]
        target = torch.cat([r.labels for r in batch])
        img = region_embeddings(extractor, [r.image for r in batch], [r.weights for r in batch])
        # `caption_draws` independent captions per class, encoded in one batch: (V, K, D).
        tokens = torch.cat([captions.sample(rng) for _ in range(caption_draws)])
        txt = F.normalize(model.encode_text(tokens), dim=-1).reshape(caption_draws, k, -1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        loss, logits = region_text_loss(img, txt, target, scale, class_weight, text_to_region)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append((logits.argmax(1) == target).float().mean().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.2f}", refresh=False)
    bar.close()
    t_train = time.perf_counter() - t1

    _save_state_dict(model, out)
    tail = max(1, steps // 10)
    return SynthClipSummary(
        out=str(out),
        model=model_name,
        steps=steps,
        seed=seed,
        input_size=input_size,
        images=len(regions),
        gt_regions=sum(r.num_gt for r in regions),
        superpixel_regions=sum(len(r.labels) - r.num_gt for r in regions),
        classes=len(vocab),
        names=captions.num_names,
        prepare_s=t_prep,
        train_s=t_train,
        final_loss=float(np.mean(losses[-tail:])),
        final_region_accuracy=float(np.mean(accs[-tail:])),
        checkpoint_sha256=file_sha256(out),
    )


def _save_state_dict(model: torch.nn.Module, out: Path) -> None:
    """Writes the state dict to a temporary name beside ``out`` and renames it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # Serialised in memory: torch names the archive's root folder after a file's name, so saving
    # to the temporary name would make the bytes depend on the path. In memory they do not.
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Zero-shot mask classification from the cache alone


@dataclass(frozen=True)
class ZeroShotResult:
    """Top-1 accuracy of cached mask embeddings against class text embeddings.

    Attributes:
        accuracy: Fraction of ground-truth segments whose best-matching proposal's
            ``clip_mask_embed`` scores its own class highest (all names of each class,
            template-averaged, one embedding per class as the heads use it:
            :func:`samcp.pipeline.vocab.class_scores`).
        primary_name_accuracy: The same with only each class's first (dataset) name.
        synonym_accuracy: The same with only each class's other names (classes without synonyms
            keep their name).
        segments: Ground-truth segments scored.
        mean_best_iou: Mean IoU of each segment's best-matching proposal (the oracle assignment).
        per_class: Accuracy per class, by first name.
    """

    accuracy: float
    primary_name_accuracy: float
    synonym_accuracy: float
    segments: int
    mean_best_iou: float
    per_class: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def zero_shot_mask_accuracy(
    dataset_root: str | os.PathLike,
    cache: str | os.PathLike,
    clip_checkpoint: str | os.PathLike,
    *,
    split: str = "val2017",
    templates: str | Sequence[str] = VILD_TEMPLATES,
) -> ZeroShotResult:
    """Classifies every ground-truth segment by the cached CLIP embedding of its best proposal.

    For each segment of the cached images of ``split`` (failed rows are skipped), the cached proposal with the highest IoU (oracle assignment)
    lends its ``clip_mask_embed``; that is scored against the dataset's classes embedded with the
    CLIP's own text tower (``TextEmbedder``: ``templates`` averaged per name; best name per
    class). Nothing but the cache, the ground truth and the text tower is used.

    Args:
        dataset_root: The dataset the cache was made from.
        cache: A cache with CLIP features (``samcp precompute --clip-checkpoint``).
        clip_checkpoint: The CLIP weights the cache was made with (for the text tower).
        split: The cache's split.
        templates: Prompt templates or a set name.

    Raises:
        SamcpError: A cache without CLIP features, a checkpoint other than the cache's, or a cache
            image missing from the dataset.
    """
    import open_clip
    from pycocotools import mask as mask_utils

    from samcp.pipeline.cache import CacheReader
    from samcp.pipeline.clip import load_clip
    from samcp.pipeline.proposals.base import encode_masks
    from samcp.pipeline.vocab import TextEmbedder, class_scores

    reader = CacheReader(cache)
    clip = reader.attrs.get("clip")
    if not clip:
        raise SamcpError(
            f"cache {cache} has no CLIP features; make it with `samcp precompute --clip-checkpoint`"
        )
    if file_sha256(clip_checkpoint) != clip.get("checkpoint_sha256"):
        raise SamcpError(
            f"{clip_checkpoint} is not the CLIP checkpoint cache {cache} was made with; pass that one"
        )
    dataset = CocoPanopticDataset(dataset_root, split)
    vocab = dataset_vocabulary(dataset)
    class_of = {cid: k for k, cid in enumerate(vocab.ids)}
    model, _ = load_clip(clip["model"], clip_checkpoint)
    embed = TextEmbedder(model, open_clip.get_tokenizer(clip["model"]), templates)
    synonyms = tuple(ns[1:] or ns for ns in vocab.names)
    texts = {
        "all": embed(vocab),
        "primary": embed(Vocabulary(vocab.ids, tuple((ns[0],) for ns in vocab.names))),
        "synonyms": embed(Vocabulary(vocab.ids, synonyms)),
    }
    known = {r.image_id for r in dataset.records}
    correct = {k: 0 for k in texts}
    per_class_hits = np.zeros(len(vocab), np.int64)
    per_class_n = np.zeros(len(vocab), np.int64)
    ious: list[float] = []
    for row in reader.iter_images(arrays=["clip_mask_embed"]):
        if row.image_id not in known:
            raise SamcpError(
                f"cache {cache} holds image {row.image_id}, which is not in {dataset.json_path}; "
                "pass the dataset and split the cache was made from"
            )
        id_map, segments = dataset.load_panoptic(row.image_id)
        segs = [(id_map == int(s["id"]), class_of[int(s["category_id"])]) for s in segments]
        segs = [(m, c) for m, c in segs if m.any()]
        if not segs or len(row.proposals) == 0:
            np.add.at(per_class_n, [c for _, c in segs], 1)  # scored as misses
            ious += [0.0] * len(segs)
            continue
        gt = [
            {"size": [row.height, row.width], "counts": c}
            for c in encode_masks(np.stack([m for m, _ in segs]))
        ]
        iou = np.asarray(mask_utils.iou(row.proposals.coco_rles(), gt, [0] * len(gt)))
        best = iou.argmax(0)
        ious += iou.max(0).tolist()
        emb = torch.from_numpy(np.asarray(row.mask_arrays["clip_mask_embed"])[best]).float()
        labels = np.array([c for _, c in segs])
        for key, text in texts.items():
            hit = class_scores(emb, text).argmax(1).numpy() == labels
            correct[key] += int(hit.sum())
            if key == "all":
                np.add.at(per_class_hits, labels, hit)
        np.add.at(per_class_n, labels, 1)
    n = len(ious)
    if n == 0:
        raise SamcpError(f"cache {cache} covers no ground-truth segment; nothing to score")
    return ZeroShotResult(
        accuracy=correct["all"] / n,
        primary_name_accuracy=correct["primary"] / n,
        synonym_accuracy=correct["synonyms"] / n,
        segments=n,
        mean_best_iou=float(np.mean(ious)),
        per_class={
            vocab.names[k][0]: float(per_class_hits[k] / per_class_n[k])
            for k in range(len(vocab))
            if per_class_n[k]
        },
    )
