"""`samcp train`: decoupled head training on the proposal cache.

The frozen foundation models never run here: patches, their CLIP embeddings and the dense CLIP maps
come from the cache, ground truth from the dataset's panoptic annotations, class text embeddings from
the CLIP text tower once (cached on disk). A run folder holds everything:

    <run>/train_config.json        the resolved TrainConfig (+ head config) of the run
    <run>/text_embed.safetensors   the training vocabulary's class text embeddings
    <run>/classes.json             the training classes (dataset categories) in class-index order
    <run>/vocabulary.txt           their names and synonyms (FC-CLIP class-file format)
    <run>/checkpoints/step_XXXXXXX/  model.safetensors + config.json + train_state.pt
    <run>/model/                   the final weights (model.safetensors + config.json)
    <run>/metrics.jsonl            one line per logged step; TensorBoard events in <run>/tb/

Data order is a pure function of (seed, epoch), and augmentation (flips, the head's rescale + crop)
of (seed, epoch, step, position), so ``--resume`` continues exactly where the last checkpoint stopped
and reaches the weights of an uninterrupted run.

Under ``torchrun`` (WORLD_SIZE > 1) the head is wrapped in DistributedDataParallel: every rank walks
the same epoch order and takes its own ``batch_size`` slice of each global batch of
``batch_size * world_size`` images; rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from samcp.pipeline.cache import CacheReader
from samcp.pipeline.devices import resolve_device
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.folderlock import FolderLock
from samcp.pipeline.headdata import ClassSpace, cache_info, ground_truth_rles, image_inputs
from samcp.pipeline.outputs import MARKER, prepare_output_dir, write_marker

if TYPE_CHECKING:
    from samcp.pipeline.vocab import Vocabulary


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    cache: proposal cache of the training images (with CLIP features).
    dataset: the dataset root with the training annotations: a COCO panoptic root, or, for a
        cache made with ``precompute --dataset NAME``, that benchmark's root in its prepared layout
        (samcp.pipeline.benchmarks), read with the benchmark's reader.
    out: run folder.
    split: annotation split of the cached images; None: the split a benchmark cache records, else
        train2017.
    dataset_name: the benchmark whose ground truth ``dataset`` holds (a name of
        ``samcp.pipeline.benchmarks.benchmark_names()``); None: the one the cache records
        (``dataset_source.benchmark``), else the COCO panoptic layout. Semantic benchmarks
        (COCO-Stuff, ...) give one segment per class present in a label map (a region, not
        crowd), the ignore label void; panoptic ones their panoptic PNGs.
    head: a registered head (``samcp.models.registry.list_heads()``).
    preset: "default" or "tiny" head config before ``head_overrides``.
    head_overrides: head config fields to change (YAML / --set key=value).
    clip_checkpoint: CLIP weights for the text embeddings (not needed when they are cached).
    templates: prompt template set for the text embeddings.
    classes: FC-CLIP class file (``id:name,synonym,...``) of the training classes; None: every
        dataset category. Segments of the dataset's other categories become void (open-vocabulary
        training on the seen classes); the file's names make the class text embeddings.
    steps: optimisation steps; None: ``epochs`` when given, else 2000.
    epochs: train for this many passes over the cache instead (``steps`` = ceil(epochs * images /
        global batch)); give ``steps`` or ``epochs``, not both.
    batch_size: images per step.
    lr, weight_decay: AdamW; None: the head's default (``Head.train_defaults``: affinity 2e-4 and
        1e-4 as the authors' code, PosSAM weight decay 0.05), else 2e-4 / 0.05.
    lr_drop: fractions of ``steps`` where the learning rate is multiplied by 0.1; None: the head's
        default, else (8/12, 11/12) when training by ``epochs`` (the code's 12-epoch schedule:
        drops after epochs 8 and 11) and (0.8,) by ``steps``.
    clip_grad: max gradient norm (0 disables); None: the head's default, else 0.1.
    flip: random horizontal flips (the head mirrors its features, masks and targets together).
        Other random augmentation is the head's (its config; the affinity head's rescale + crop),
        drawn from a generator of (seed, epoch, step, position) like the flips.
    max_patches: proposals per image a head sees (the cache's first ones, i.e. the generator's
        order).
    seed: data order, flips and initialisation.
    device: "auto", "cpu" or "cuda".
    log_every, ckpt_every: steps between log lines / checkpoints.
    memo_images: keep up to this many prepared samples in memory (small sets train much faster).
    allow_incomplete: train on an unfinished cache (the missing images are counted and reported).
    allow_other_dataset: skip the check that the cache was made from ``dataset`` (for the same
        images moved or re-exported; image sizes are still checked).
    """

    cache: str
    dataset: str
    out: str
    split: str | None = None
    dataset_name: str | None = None
    head: str = "affinity"
    preset: str = "default"
    head_overrides: dict = field(default_factory=dict)
    clip_checkpoint: str | None = None
    templates: str = "vild"
    classes: str | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 4
    lr: float | None = None
    weight_decay: float | None = None
    lr_drop: tuple[float, ...] | None = None
    clip_grad: float | None = None
    flip: bool = True
    max_patches: int = 300
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    ckpt_every: int = 500
    memo_images: int = 5000
    progress: bool = True
    allow_incomplete: bool = False
    allow_other_dataset: bool = False

    def validate(self, resolved: bool = False) -> None:
        """Refuses settings that cannot train, before anything is read or written.

        ``resolved``: a config from :func:`resolve_train_config` (which sets ``steps`` from
        ``epochs``), so both may be set.

        Raises:
            SamcpError: naming the setting and its allowed range.
        """
        from samcp.models.registry import list_heads

        for name, kind in _FIELD_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise SamcpError(
                    f"{name} = {value!r} is a {type(value).__name__}; it must be {_kind_name(kind)}"
                )
        if self.lr_drop is not None and not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) for f in self.lr_drop
        ):
            raise SamcpError(f"lr_drop = {self.lr_drop!r} must be a list of fractions in (0, 1)")
        if self.steps is not None and self.epochs is not None and not resolved:
            raise SamcpError(
                f"steps = {self.steps} and epochs = {self.epochs} are both set; give --steps or "
                "--epochs, not both"
            )
        if self.head not in list_heads():
            raise SamcpError(
                f"unknown head {self.head!r}; use --head with one of: {', '.join(list_heads())}"
            )

        if self.dataset_name is not None:
            from samcp.pipeline.benchmarks import get_benchmark

            get_benchmark(self.dataset_name)  # names the known benchmarks when unknown

        def unset_or(value, ok) -> bool:
            return value is None or ok(value)

        checks = [
            ("steps", unset_or(self.steps, lambda v: v >= 0), ">= 0 (0 saves the initial weights)"),
            ("epochs", unset_or(self.epochs, lambda v: v >= 1), ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            (
                "lr",
                unset_or(self.lr, lambda v: math.isfinite(v) and v > 0),
                "a positive number such as 2e-4",
            ),
            (
                "weight_decay",
                unset_or(self.weight_decay, lambda v: math.isfinite(v) and v >= 0),
                ">= 0",
            ),
            ("clip_grad", unset_or(self.clip_grad, lambda v: math.isfinite(v) and v >= 0), ">= 0"),
            ("max_patches", self.max_patches >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("ckpt_every", self.ckpt_every >= 1, ">= 1"),
            ("memo_images", self.memo_images >= 0, ">= 0"),
            (
                "lr_drop",
                unset_or(self.lr_drop, lambda v: all(0 < f < 1 for f in v)),
                "fractions in (0, 1)",
            ),
        ]
        for name, ok, want in checks:
            if not ok:
                raise SamcpError(f"{name} = {getattr(self, name)!r} is invalid; it must be {want}")
        resolve_device(self.device)


# The type every scalar TrainConfig field must have (YAML configs can give anything).
_FIELD_TYPES: dict[str, Any] = {
    "cache": str,
    "dataset": str,
    "out": str,
    "split": (str, type(None)),
    "dataset_name": (str, type(None)),
    "head": str,
    "preset": str,
    "templates": str,
    "device": str,
    "steps": (int, type(None)),
    "epochs": (int, type(None)),
    "batch_size": int,
    "max_patches": int,
    "seed": int,
    "log_every": int,
    "ckpt_every": int,
    "memo_images": int,
    "lr": (int, float, type(None)),
    "weight_decay": (int, float, type(None)),
    "clip_grad": (int, float, type(None)),
    "flip": bool,
    "progress": bool,
    "allow_incomplete": bool,
    "allow_other_dataset": bool,
    "head_overrides": dict,
    "classes": (str, type(None)),
}


def _kind_name(kind: Any) -> str:
    if kind == (int, float):
        return "a number"
    if kind == (int, float, type(None)):
        return "a number or null"
    if kind == (int, type(None)):
        return "an int or null"
    if isinstance(kind, tuple):
        return " or ".join("null" if k is type(None) else f"a {k.__name__}" for k in kind)
    return f"a {kind.__name__}"


# What a TrainConfig field left unset (None) takes when the head has no default for it.
DEFAULT_STEPS = 2000
BUILTIN_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 2e-4, "weight_decay": 0.05, "clip_grad": 0.1}
STEPS_LR_DROP = (0.8,)
# The authors' schedule (MultiStepLR milestones [8, 11] of max_epochs 12): x0.1 after 8/12 and
# 11/12 of the run.
EPOCHS_LR_DROP = (8 / 12, 11 / 12)
# The fields a head's ``train_defaults`` may set.
HEAD_DEFAULT_FIELDS = ("lr", "weight_decay", "clip_grad", "lr_drop")


def epochs_to_steps(epochs: int, num_images: int, global_batch: int) -> int:
    """Steps of ``epochs`` passes over ``num_images`` images, ``global_batch`` images a step."""
    return math.ceil(epochs * num_images / global_batch)


def lr_milestones(lr_drop: tuple[float, ...], steps: int) -> list[int]:
    """The steps after which the learning rate is multiplied by 0.1 (each at least 1)."""
    # The epsilon keeps exact products (8/12 * 300 = 199.999...) on their step.
    return sorted({max(1, math.floor(f * steps + 1e-9)) for f in lr_drop})


def resolve_train_config(cfg: TrainConfig, num_images: int, world_size: int = 1) -> TrainConfig:
    """``cfg`` with every unset field decided: the user's value always wins, then the head's
    ``train_defaults``, then samcp's (``BUILTIN_TRAIN_DEFAULTS``, ``DEFAULT_STEPS``, the lr_drop of
    an epoch or step run); ``epochs`` becomes ``steps`` for ``num_images`` cached images.

    Raises:
        SamcpError: the head's defaults name a field they may not set (a plugin bug).
    """
    from samcp.models.registry import get_head

    head_defaults = dict(get_head(cfg.head).train_defaults)
    bad = sorted(set(head_defaults) - set(HEAD_DEFAULT_FIELDS))
    if bad:
        raise SamcpError(f"head {cfg.head}: train_defaults may not set {', '.join(bad)}")
    values: dict[str, Any] = {}
    for name in HEAD_DEFAULT_FIELDS:
        if getattr(cfg, name) is not None:
            continue
        if name in head_defaults:
            values[name] = head_defaults[name]
        elif name == "lr_drop":
            values[name] = EPOCHS_LR_DROP if cfg.epochs is not None else STEPS_LR_DROP
        else:
            values[name] = BUILTIN_TRAIN_DEFAULTS[name]
    if "lr_drop" in values:
        values["lr_drop"] = tuple(values["lr_drop"])
    if cfg.epochs is not None:
        values["steps"] = epochs_to_steps(cfg.epochs, num_images, cfg.batch_size * world_size)
    elif cfg.steps is None:
        values["steps"] = DEFAULT_STEPS
    return replace(cfg, **values)


def default_sources(cfg: TrainConfig) -> dict[str, str]:
    """For each field ``resolve_train_config`` will fill: ``"head"`` (the head's train_defaults),
    ``"epochs"`` (steps from epochs) or ``"samcp"`` (the built-in default)."""
    from samcp.models.registry import get_head

    head_defaults = get_head(cfg.head).train_defaults
    out = {
        name: "head" if name in head_defaults else "samcp"
        for name in HEAD_DEFAULT_FIELDS
        if getattr(cfg, name) is None
    }
    if cfg.epochs is not None:
        out["steps"] = "epochs"
    elif cfg.steps is None:
        out["steps"] = "samcp"
    return out


@dataclass
class TrainingData:
    """The dataset a run reads its ground truth from (:func:`open_training_dataset`).

    dataset: ``records``, ``categories`` and ``load_panoptic(image_id) -> (id_map,
        segments_info)``: a CocoPanopticDataset, or a benchmark of samcp.pipeline.benchmarks.
    annotations: what identifies its annotations (a panoptic JSON; a semantic benchmark's label
        folder), named in messages.
    split: the split read.
    name: the benchmark's name; None for a COCO panoptic root read without one.
    vocabulary: the vocabulary of every class when no ``--classes`` is given (a benchmark's
        builtin one, names and synonyms, as ``predict --dataset NAME`` uses); None: the dataset's
        category names.
    """

    dataset: Any
    annotations: Path
    split: str
    name: str | None = None
    vocabulary: Vocabulary | None = None


def open_training_dataset(cfg: TrainConfig, reader: CacheReader) -> TrainingData:
    """Opens ``cfg.dataset`` with the reader of the benchmark the cache was made from.

    The benchmark is ``cfg.dataset_name``, else the cache's ``dataset_source.benchmark``
    (``precompute --dataset NAME``); without either (a cache made from a COCO-layout root or a
    manifest) ``cfg.dataset`` is a COCO panoptic root, as always. The split is ``cfg.split``,
    else the one a benchmark cache records, else train2017. The cache's benchmark must be the one
    read and, for a semantic benchmark, its label files the recorded ones
    (:func:`samcp.pipeline.benchmarks.check_benchmark_source`; ``allow_other_dataset`` skips
    it); the JSON identity and image sizes are checked by the caller
    (:func:`samcp.pipeline.cache.check_cache_source`).

    Raises:
        SamcpError: an unknown benchmark, a root without the benchmark's layout, or a cache made
            from another benchmark or other labels.
    """
    from samcp.pipeline.benchmarks import (
        _dataset_dir,
        cache_source_name,
        check_benchmark_source,
        get_benchmark,
        open_benchmark,
    )
    from samcp.pipeline.datasets import CocoPanopticDataset

    src = reader.attrs.get("dataset_source") or {}
    name = cfg.dataset_name or src.get("benchmark") or None
    if name is not None:
        get_benchmark(name)  # an unknown name fails here, naming the known ones
    recorded = cache_source_name(reader.attrs)
    if recorded is not None and recorded != (name or "coco_panoptic"):
        if not cfg.allow_other_dataset:
            what = f"--dataset-name {name}" if name else "a COCO panoptic root (no benchmark)"
            raise SamcpError(
                f"cache {cfg.cache} was made from {recorded} ({src.get('path')}), not from "
                f"{name or 'COCO panoptic'} ({what}); train on a cache of it, or drop "
                "--dataset-name to read --dataset as the cache's benchmark, or "
                "--allow-other-dataset if the images are the same"
            )
    root = Path(cfg.dataset)
    if name is None or name == "coco_panoptic":
        # The COCO panoptic layout, read as always (a datasets root holding coco/ is accepted
        # for a cache made with --dataset coco_panoptic).
        split = cfg.split or (src.get("split") if name else None) or "train2017"
        if name is not None:
            root = _dataset_dir(root.absolute(), "coco", ("annotations",))
        dataset = CocoPanopticDataset(root, split)
        return TrainingData(dataset, dataset.json_path, split, name)
    split = cfg.split or (src.get("split") if recorded is not None else None) or "train"
    bench = open_benchmark(name, root, split)
    check_benchmark_source(reader.attrs, cfg.cache, bench, allow_other=cfg.allow_other_dataset)
    annotations = bench.json_path if bench.task == "panoptic" else bench.label_dir
    return TrainingData(bench, annotations, bench.split, name, _builtin_vocabulary(name, bench))


def _builtin_vocabulary(name: str, bench) -> Vocabulary | None:
    """The builtin vocabulary ``name`` when its ids are exactly the benchmark's class ids."""
    from samcp.pipeline.vocab import builtin_vocabularies, read_vocabulary

    if name not in builtin_vocabularies():
        return None
    vocab = read_vocabulary(name)
    ids = sorted(int(c["id"]) for c in bench.categories)
    return vocab if sorted(vocab.ids) == ids else None


def training_classes(
    categories: list[dict],
    class_file: str | None,
    dataset_json: str | Path,
    default_vocabulary: Vocabulary | None = None,
) -> tuple[ClassSpace, Vocabulary]:
    """The run's classes and the vocabulary their text embeddings are made from.

    Args:
        categories: The dataset's categories (its panoptic JSON's list; a benchmark's classes).
        class_file: FC-CLIP class file (or builtin vocabulary name) of the training classes, in
            class-index order; None for every dataset category (named by the dataset, or by
            ``default_vocabulary``).
        dataset_json: The dataset's annotations (panoptic JSON, label folder), named in messages.
        default_vocabulary: The names (and synonyms) of every category when ``class_file`` is
            None, in any order (a benchmark's builtin vocabulary); None: the categories' names.

    Returns:
        ``(classes, vocabulary)``: the classes, with the dataset's other categories void, and
        the vocabulary of their names (the file's names and synonyms).

    Raises:
        SamcpError: the file is missing or malformed, or lists an id that is not a category of
            the dataset.
    """
    from samcp.pipeline.vocab import read_vocabulary, vocabulary_from_dataset

    if class_file is None:
        if default_vocabulary is not None:
            # in class-index order: the text embeddings' rows are the classes'
            pos = {int(cid): i for i, cid in enumerate(default_vocabulary.ids)}
            order = [pos[int(c["id"])] for c in categories]
            vocab = replace(
                default_vocabulary,
                ids=tuple(default_vocabulary.ids[i] for i in order),
                names=tuple(default_vocabulary.names[i] for i in order),
            )
            return ClassSpace(categories), vocab
        return ClassSpace(categories), vocabulary_from_dataset(categories)
    vocab = read_vocabulary(class_file)
    by_id = {int(c["id"]): c for c in categories}
    unknown = [cid for cid in vocab.ids if cid not in by_id]
    if unknown:
        raise SamcpError(
            f"--classes {class_file}: class id(s) {', '.join(map(str, unknown))} are not "
            f"categories of {dataset_json}; list only that dataset's category ids"
        )
    listed = set(vocab.ids)
    void = [cid for cid in by_id if cid not in listed]
    return ClassSpace([by_id[cid] for cid in vocab.ids], void_ids=void), vocab


def head_config_for_cache(cfg: TrainConfig, reader: CacheReader):
    """The head config: preset, the user's overrides, then what the cache dictates (the plugin's
    ``configure``: CLIP geometry, channels of the chosen level)."""
    from samcp.models.registry import get_head

    plugin = get_head(cfg.head)
    if cfg.preset == "tiny":
        base = plugin.config_cls.tiny()
    elif cfg.preset == "default":
        base = plugin.config_cls()
    else:
        raise SamcpError(f"unknown head preset {cfg.preset!r}; use default or tiny")
    d = {**base.to_dict(), **cfg.head_overrides}
    try:  # after the overrides, so that a chosen level gets its own channels
        d.update(plugin.configure(d, cache_info(reader)))
    except ValueError as exc:
        raise SamcpError(f"cache {cfg.cache}: {exc}") from None
    try:
        return type(base).from_dict(d)
    except (TypeError, ValueError) as exc:
        raise SamcpError(f"bad head config: {exc}") from None


class CacheSampler:
    """Epoch orders over (shard, row) from shard metadata alone; samples prepared on demand.

    Shards are visited in a seeded random order and rows shuffled within their shard, so reads
    stay sequential per shard while batches mix images.

    ``rank`` / ``world_size`` (set by run_training under DDP): a step's global batch is
    ``batch_size * world_size`` consecutive images of the epoch order and this process yields the
    ``rank``-th ``batch_size`` chunk of it (flips drawn for the global batch, so they follow the
    image's position, not the rank). The head's ``augment`` gets a generator seeded by
    (seed, epoch, step, position in the global batch) for its other random augmentation.
    """

    rank: int = 0
    world_size: int = 1

    def __init__(
        self, reader: CacheReader, dataset, classes: ClassSpace, head_cfg, cfg: TrainConfig
    ):
        from samcp.models.registry import get_head

        self.reader, self.dataset, self.classes = reader, dataset, classes
        self.head_cfg, self.cfg = head_cfg, cfg
        self.plugin = get_head(cfg.head)
        image_arrays, mask_arrays = self.plugin.needs(head_cfg)
        self.arrays = [*image_arrays, *mask_arrays]
        self.shards = []
        for sid in reader.shard_ids:
            g = reader.root["shards"][sid]
            status = g["status"][...]
            self.shards.append((sid, [i for i, st in enumerate(status) if st == 0]))
        self.num_images = sum(len(r) for _, r in self.shards)
        if self.num_images == 0:
            raise SamcpError(f"cache {cfg.cache} has no usable images to train on")
        self._memo: dict[tuple[str, int], Any] = {}
        self._shard_rows: tuple[str, list] | None = None

    def epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = []
        for k in rng.permutation(len(self.shards)):
            sid, rows = self.shards[k]
            order.extend((sid, rows[j]) for j in rng.permutation(len(rows)))
        return order

    def sample(self, key: tuple[str, int]) -> Any:
        """The head's training sample of one cached image (memoised up to ``memo_images``)."""
        if key in self._memo:
            return self._memo[key]
        sid, i = key
        if self._shard_rows is None or self._shard_rows[0] != sid:
            self._shard_rows = (sid, self.reader.read_shard(sid, arrays=self.arrays))
        row = self._shard_rows[1][i]
        id_map, segs = self.dataset.load_panoptic(row.image_id)
        gt = ground_truth_rles(id_map, segs, self.classes)
        try:
            s = self.plugin.sample(image_inputs(row), self.head_cfg, self.cfg.max_patches, gt)
        except ValueError as exc:
            raise SamcpError(str(exc)) from None
        if len(self._memo) < self.cfg.memo_images:
            self._memo[key] = s
        return s

    def batches(self, start_step: int) -> Iterator[tuple[int, list[Any]]]:
        """(step, samples) from ``start_step`` on, forever; deterministic in (seed, step)."""
        bs = self.cfg.batch_size
        gbs = bs * self.world_size
        per_epoch = max(1, self.num_images // gbs)
        step = start_step
        while True:
            epoch, pos = divmod(step, per_epoch)
            order = self.epoch_order(epoch)
            keys = order[pos * gbs : (pos + 1) * gbs]
            flips = np.random.default_rng([self.cfg.seed, epoch, pos, 1]).random(len(keys)) < 0.5
            slots = list(range(len(keys)))  # positions in the global batch
            if self.world_size > 1:
                # An epoch shorter than the global batch wraps around so that every rank gets
                # images (tiny sets); with enough images this is a plain slice.
                slots = [(self.rank * bs + j) % len(keys) for j in range(bs)]
                keys = [keys[j] for j in slots]
                flips = flips[slots]
            out = []
            for key, flip, slot in zip(keys, flips, slots, strict=True):
                s = self.sample(key)
                # The head's other random augmentation: its own generator per position.
                rng = np.random.default_rng([self.cfg.seed, epoch, pos, 2, slot])
                flip = bool(self.cfg.flip and flip)
                out.append(self.plugin.augment(s, self.head_cfg, flip, rng=rng))
            yield step, out
            step += 1


def run_training(
    cfg: TrainConfig,
    resume: bool = False,
    stop_after: int | None = None,
    sampler_cls: type[CacheSampler] | None = None,
) -> dict:
    """Trains a head; returns a summary.

    Args:
        cfg: the run.
        resume: continue from the run folder's latest checkpoint.
        stop_after: end after this step (interrupted-run tests).
        sampler_cls: a CacheSampler subclass (benchmarks swap how samples are made).
    """
    cfg.validate()
    dist, device = _setup_distributed(cfg)
    try:
        with contextlib.ExitStack() as held:
            return _train(cfg, resume, stop_after, sampler_cls, dist, device, held)
    finally:
        dist.close()


def _train(
    cfg,
    resume,
    stop_after,
    sampler_cls,
    dist: _Dist,
    device: torch.device,
    held: contextlib.ExitStack,
) -> dict:
    from samcp.models.registry import build_head, get_head, save_head
    from samcp.pipeline.cache import check_cache_complete, check_cache_source
    from samcp.pipeline.vocab import class_text_embeddings

    # Everything that can be refused is checked before the run folder is touched.
    out = Path(cfg.out)
    prepare_output_dir(out, "run", reuse=True)
    reader = CacheReader(cfg.cache)
    note = check_cache_complete(reader, cfg.allow_incomplete)
    if note and dist.main:
        print(f"warning: {note}; training on the {len(reader)} cached images", file=sys.stderr)
    data = open_training_dataset(cfg, reader)
    dataset = data.dataset
    cfg = replace(cfg, split=data.split, dataset_name=data.name)
    check_cache_source(
        reader,
        data.annotations,
        {r.image_id: (r.height, r.width) for r in dataset.records},
        allow_other=cfg.allow_other_dataset,
    )
    classes, vocab = training_classes(
        dataset.categories, cfg.classes, data.annotations, data.vocabulary
    )
    head_cfg = head_config_for_cache(cfg, reader)
    plugin = get_head(cfg.head)
    sampler = (sampler_cls or CacheSampler)(reader, dataset, classes, head_cfg, cfg)
    # Unset fields take the head's defaults; epochs become steps (from the cached image count).
    sources = default_sources(cfg)
    cfg = resolve_train_config(cfg, sampler.num_images, dist.world)
    cfg.validate(resolved=True)
    sampler.cfg = cfg
    torch.manual_seed(cfg.seed)
    model = build_head(cfg.head, head_cfg)
    try:
        plugin.init_from_cache(model, head_cfg, cache_info(reader))
    except ValueError as exc:
        raise SamcpError(f"cache {cfg.cache}: {exc}") from None
    model = model.to(device)
    criterion = plugin.criterion(head_cfg).to(device)
    # The head's parameter groups (e.g. a slower learning rate for pre-trained SAM blocks).
    groups = plugin.param_groups(model, head_cfg, cfg.lr)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    milestones = lr_milestones(cfg.lr_drop, cfg.steps)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    if dist.main:  # one training per run folder at a time; released when the run ends
        held.enter_context(FolderLock(out, "run folder", "samcp train"))
    dist.barrier()
    _check_run_folder(out, cfg, head_cfg, resume, dist.world, classes, clear=dist.main)
    dist.barrier()

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        text = class_text_embeddings(
            vocab, reader.attrs, cfg.clip_checkpoint, cfg.templates, device
        )
        _write_run_files(out, cfg, head_cfg, classes, text, dist.world, vocab, sources)
    else:  # CLIP runs on rank 0 only; the others receive its embeddings
        text = torch.empty(len(classes), reader.attrs["clip"]["embed_dim"], device=device)
    dist.broadcast(text)

    start = 0
    if resume:
        start = _load_latest(out, model, opt, sched)  # every rank loads the same checkpoint
    net = model  # what runs forward/backward; `model` stays the plain head (saved, returned)
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler.rank, sampler.world_size = dist.rank, dist.world
    logger = _MetricLogger(out, enabled_tb=True) if dist.main else None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        unit="step",
        desc="train",
        file=sys.stderr,
        disable=not cfg.progress or not dist.main,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    images = 0
    last = {}
    model.train()
    for step, samples in sampler.batches(start):
        if step >= cfg.steps or (stop_after is not None and step >= stop_after):
            break
        batch = plugin.collate(samples, text, head_cfg, device)
        outputs = net(**batch)
        losses = criterion(outputs, samples)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise SamcpError(f"loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        sched.step()
        images += len(samples) * dist.world
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            names = [k for k in losses if "/" not in k]
            values = dist.mean(torch.stack([losses[k].detach().float() for k in names]))
            last = {k: float(v) for k, v in zip(names, values.tolist(), strict=True)}
            last["lr"] = opt.param_groups[0]["lr"]
            last["images_per_s"] = images / (time.perf_counter() - t0)
            if logger is not None:
                logger.log(done, last)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            dist.barrier()
            if dist.main:
                _save_checkpoint(out, done, model, head_cfg, opt, sched)
            dist.barrier()
        bar.update(1)
    bar.close()
    if logger is not None:
        logger.close()
    final_step = _latest_step(out)
    if final_step == cfg.steps and dist.main:
        save_head(model, head_cfg, out / "model")
    dist.barrier()
    return {
        "run": str(out),
        "steps_done": final_step,
        "images_per_s": images / max(time.perf_counter() - t0, 1e-9),
        "last": last,
    }


@dataclass
class _Dist:
    """The process group of a torchrun launch (world 1: a plain single process, no collectives)."""

    world: int = 1
    rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as tdist

            if self.device is not None and self.device.type == "cuda":
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()

    def broadcast(self, t: torch.Tensor) -> None:
        if self.enabled:
            import torch.distributed as tdist

            tdist.broadcast(t, src=0)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (log values; the gradients are averaged by DDP itself)."""
        if not self.enabled:
            return t
        import torch.distributed as tdist

        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t / self.world

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _setup_distributed(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    """torchrun's environment (WORLD_SIZE > 1): joins the process group, one device per rank.

    CUDA ranks use cuda:LOCAL_RANK and NCCL; CPU ranks (--device cpu, or no CUDA) use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(cfg.device)
    import torch.distributed as tdist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SamcpError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are "
                "visible; start at most that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(world=world, rank=rank, device=device, owns_group=owns), device


def _check_run_folder(
    out: Path,
    cfg: TrainConfig,
    head_cfg,
    resume: bool,
    world_size: int = 1,
    classes: ClassSpace | None = None,
    clear: bool = True,
) -> None:
    saved = out / "train_config.json"
    if saved.exists() and not resume and _latest_step(out) == 0 and not (out / "model").exists():
        # A run that failed before its first checkpoint holds nothing worth keeping: a rerun
        # starts cleanly instead of being blocked by it. (The folder lock, held by the caller,
        # guarantees that no live training owns it.)
        if clear:
            print(
                f"note: {out} holds a run that stopped before its first checkpoint; starting it "
                "again from scratch",
                file=sys.stderr,
            )
            _clear_unstarted_run(out)
        return
    if not saved.exists():
        if resume:
            raise SamcpError(f"nothing to resume in {out}; start a run without --resume")
        return
    if not resume:
        raise SamcpError(
            f"run folder {out} already holds a run; use --resume to continue it or another --out"
        )
    old = json.loads(saved.read_text())
    now = _config_json(cfg, head_cfg)
    for key in (
        "head",
        "head_config",
        "batch_size",
        "lr",
        "weight_decay",
        "lr_drop",
        "seed",
        "epochs",  # before steps, which an epoch count sets
        "steps",
        "max_patches",
        "flip",
    ):
        if old.get(key) != now.get(key):
            raise SamcpError(
                f"cannot resume {out}: {key} was {old.get(key)!r}, now {now.get(key)!r}; "
                "resume with the same settings or start another run"
            )
    saved_classes = out / "classes.json"
    if classes is not None and saved_classes.is_file():
        old_ids = [int(c["id"]) for c in json.loads(saved_classes.read_text())]
        if old_ids != classes.ids:
            raise SamcpError(
                f"cannot resume {out}: it trained on classes {old_ids}, now {classes.ids}; "
                "resume with the same --classes file or start another run"
            )
    if old.get("world_size", 1) != world_size:  # it changes the global batch and data order
        raise SamcpError(
            f"cannot resume {out}: it ran on {old.get('world_size', 1)} process(es), now "
            f"{world_size}; resume with the same torchrun --nproc_per_node / --nnodes"
        )


# What a run folder holds (all written by samcp): cleared when a run never reached a checkpoint.
_RUN_ENTRIES = (
    "train_config.json",
    "classes.json",
    "vocabulary.txt",
    "text_embed.safetensors",
    "metrics.jsonl",
    "tb",
    "checkpoints",
    MARKER,
)


def _clear_unstarted_run(out: Path) -> None:
    import shutil

    for name in _RUN_ENTRIES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _config_json(cfg: TrainConfig, head_cfg) -> dict:
    d = json.loads(json.dumps(asdict(cfg), default=str))
    d["head_config"] = json.loads(json.dumps(head_cfg.to_dict()))
    return d


def _write_run_files(
    out: Path,
    cfg,
    head_cfg,
    classes: ClassSpace,
    text: torch.Tensor,
    world_size: int = 1,
    vocab: Vocabulary | None = None,
    sources: dict[str, str] | None = None,
) -> None:
    from safetensors.torch import save_file

    d = _config_json(cfg, head_cfg)
    d["world_size"] = world_size
    if sources:  # where each field left unset got its value
        d["defaults_from"] = sources
    write_marker(out, "run")
    (out / "train_config.json").write_text(json.dumps(d, indent=2))
    (out / "classes.json").write_text(json.dumps(classes.categories, indent=1))
    if vocab is not None:  # names and synonyms: what "seen" means at predict time
        (out / "vocabulary.txt").write_text(vocab.to_text())
    save_file({"text_embed": text.detach().cpu().contiguous()}, str(out / "text_embed.safetensors"))


def _save_checkpoint(out: Path, step: int, model, head_cfg, opt, sched) -> None:
    from samcp.models.registry import save_head

    final = out / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    save_head(model, head_cfg, tmp)
    torch.save(
        {
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        tmp / "train_state.pt",
    )
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)  # a checkpoint exists only once complete


def _latest_step(out: Path) -> int:
    steps = [int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_???????")]
    return max(steps, default=0)


def _load_latest(out: Path, model, opt, sched) -> int:
    from safetensors.torch import load_file

    step = _latest_step(out)
    if step == 0:
        return 0
    ck = out / "checkpoints" / f"step_{step:07d}"
    model.load_state_dict(load_file(str(ck / "model.safetensors")))
    state = torch.load(ck / "train_state.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return step


class _MetricLogger:
    """metrics.jsonl always; TensorBoard when the tensorboard package is installed."""

    def __init__(self, out: Path, enabled_tb: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a")
        self.tb = None
        if enabled_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                self.tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
