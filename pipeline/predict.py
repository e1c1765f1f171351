"""`samcp predict`: a trained head's predictions on a proposal cache, in COCO's formats.

Generic over heads: every cached image becomes the head's sample exactly as in training (the
plugin's ``sample`` and ``collate``), the head runs, and its ``infer`` turns the outputs into one
:class:`~samcp.models.heads.ImageResult` per image through the shared composition
(samcp.models.compose). The open-vocabulary classifier (samcp.models.openvocab) weighs CLIP by
``alpha`` on the classes the head was trained on and ``beta`` on the others (SAM-CP's ``kappa`` is
alpha = beta = kappa). The prediction folder::

    PRED_DIR/panoptic.json         COCO panoptic: images, annotations (segments_info), categories
    PRED_DIR/panoptic/<stem>.png   RGB panoptic PNGs, id = R + 256 G + 256^2 B, 0 = void
    PRED_DIR/semantic/<stem>.png   class index into panoptic.json's categories: uint8 with 255 = none,
                                   or uint16 with 65535 = none beyond 255 classes
    PRED_DIR/instances.json        COCO results: image_id, category_id, segmentation (RLE), score, bbox
    PRED_DIR/predict_info.json     run, cache, vocabulary, alpha/beta, composition thresholds, notes

``<stem>`` is the ground truth's PNG stem (COCO: the image's file stem) when the cache's dataset is
readable, else the image id. The composition rules are in docs/predict.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samcp.models.heads import CompositionParams, ImageResult, InferContext
from samcp.pipeline.cache import STATUS_OK, CachedImage, CacheReader, check_cache_complete
from samcp.pipeline.devices import resolve_device
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.headdata import cache_info, image_inputs
from samcp.pipeline.outputs import prepare_output_dir, staging_path, write_marker

NO_CLASS = -1  # "no region covers this pixel" in class-index maps
IGNORE_LABEL = 255  # the same in 8-bit semantic PNGs (detectron2's ignore label)
IGNORE_LABEL_16 = 65535  # and in 16-bit ones (more than 255 classes: ADE20K-847, PC-459)
INFO_FILE = "predict_info.json"


@dataclass
class LabelSpace:
    """The classes a prediction can take, and how they are written.

    Attributes:
        categories: one dict per class (id, name, isthing) in class-index order (the order of the
            text embeddings the head is run with).
        isthing: (K,) bool; instances take only thing classes, stuff fills the rest.
        output_categories: the categories of panoptic.json; semantic PNG values index this list.
        semantic_index: (K,) position of each class in ``output_categories``.
        source: what thing/stuff came from ("run", a dataset JSON, or "vocabulary" = all things).
    """

    categories: list[dict]
    isthing: np.ndarray
    output_categories: list[dict]
    semantic_index: np.ndarray
    source: str

    @classmethod
    def from_categories(cls, categories: Sequence[dict], source: str = "run") -> LabelSpace:
        """The label space of a dataset's own categories (semantic index = position)."""
        cats = [_category(c) for c in categories]
        isthing = np.array([bool(c["isthing"]) for c in cats])
        return cls(cats, isthing, cats, np.arange(len(cats)), source)

    @property
    def ids(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    def __len__(self) -> int:
        return len(self.categories)


# ----------------------------------------------------------------------------------------------
# The run: head, classes, text embeddings.
# ----------------------------------------------------------------------------------------------


def load_run_head(run_dir: Path, device: torch.device) -> tuple[torch.nn.Module, Any, str | None]:
    """The run's final model, else its latest checkpoint; returns (module, config, note)."""
    run_dir = Path(run_dir)
    final = run_dir / "model"
    if (final / "model.safetensors").is_file():
        model, cfg = _load_head_file(final, device)
        return model, cfg, None
    ckpts = sorted((run_dir / "checkpoints").glob("step_???????"))
    ckpts = [c for c in ckpts if (c / "model.safetensors").is_file()]
    if not ckpts:
        raise SamcpError(
            f"run {run_dir} has no model/ and no checkpoint; train it first (samcp train)"
        )
    model, cfg = _load_head_file(ckpts[-1], device)
    return model, cfg, f"run has no final model yet: using checkpoint {ckpts[-1].name}"


def _load_head_file(directory: Path, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """``load_head`` with its failures on damaged files turned into one-line errors."""
    from safetensors import SafetensorError

    from samcp.models.registry import load_head

    try:
        return load_head(directory, str(device))
    except SafetensorError as exc:
        raise SamcpError(
            f"{directory}/model.safetensors is truncated or damaged ({exc}); re-train, or "
            "restore the file"
        ) from None
    except (KeyError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SamcpError(
            f"{directory} does not hold a loadable head ({type(exc).__name__}: {first}); "
            "re-train, or restore its model.safetensors and config.json"
        ) from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SamcpError(f"{path}: {what} not found; is this a samcp run folder?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SamcpError(f"{path}: cannot read {what} ({exc})") from None


def vocabulary_text_embed(
    vocab, cache_attrs: dict, clip_checkpoint: str | None, templates: str, device: torch.device
) -> torch.Tensor:
    """(K, D) one embedding per vocabulary class (samcp.models.openvocab's rule)."""
    from samcp.pipeline.vocab import class_text_embeddings

    try:
        return class_text_embeddings(vocab, cache_attrs, clip_checkpoint, templates, device)
    except SamcpError:
        if clip_checkpoint:
            raise
        raise SamcpError(
            f"text embeddings of vocabulary {vocab.name!r} for CLIP {cache_attrs['clip']['model']} "
            "are not cached yet; pass --clip-checkpoint (the cache's CLIP) to compute them"
        ) from None


def _dataset_categories(cache_attrs: dict) -> tuple[str, list[dict]] | None:
    """The categories of the cache's source dataset (its panoptic JSON), when readable."""
    src = cache_attrs.get("dataset_source") or {}
    if not src.get("path"):
        return None
    if src.get("benchmark"):  # a cache made with precompute --dataset NAME
        from samcp.pipeline.benchmarks import cache_benchmark

        bench = cache_benchmark(cache_attrs)
        if bench is None:
            return None
        return f"benchmark {bench.name} ({bench.root})", bench.categories
    path = Path(src["path"]) / "annotations" / f"panoptic_{src.get('split') or 'val2017'}.json"
    try:
        cats = json.loads(path.read_text(encoding="utf-8")).get("categories")
    except (OSError, ValueError, AttributeError):
        return None
    return (str(path), cats) if isinstance(cats, list) else None


def _category(c: dict) -> dict:
    """id, name, isthing (and colour when known) of a dataset category."""
    out = {"id": int(c["id"]), "name": str(c["name"]), "isthing": int(c.get("isthing", 1))}
    if isinstance(c.get("color"), list) and len(c["color"]) == 3:
        out["color"] = [int(v) for v in c["color"]]
    return out


def _match(vocab, categories: list[dict]) -> np.ndarray | None:
    """Position of each vocabulary class in ``categories`` when every class is there by id and
    its first name equals the category's name (case-insensitive); else None."""
    by_id = {
        int(c["id"]): (i, str(c.get("name", "")).strip().lower()) for i, c in enumerate(categories)
    }
    pos = []
    for cid, names in zip(vocab.ids, vocab.names, strict=True):
        hit = by_id.get(int(cid))
        if hit is None or hit[1] != names[0].strip().lower():
            return None
        pos.append(hit[0])
    return np.asarray(pos, np.int64)


def vocabulary_label_space(
    vocab, candidates: Sequence[tuple[str, list[dict]]]
) -> tuple[LabelSpace, str | None]:
    """Thing/stuff for a prediction vocabulary: from the first dataset whose categories it matches
    (id and name), else every class is a thing (a free vocabulary says nothing about stuff)."""
    for source, cats in candidates:
        pos = _match(vocab, cats)
        if pos is not None:
            out_cats = [_category(c) for c in cats]
            classes = [out_cats[p] for p in pos.tolist()]
            isthing = np.array([bool(c["isthing"]) for c in classes])
            return LabelSpace(classes, isthing, out_cats, pos, source), None
    classes = [
        {"id": int(cid), "name": names[0], "isthing": 1}
        for cid, names in zip(vocab.ids, vocab.names, strict=True)
    ]
    note = (
        f"vocabulary {vocab.name!r} matches no known dataset's categories: thing/stuff is unknown, "
        "every class is treated as a thing (no stuff fill in the panoptic output)"
    )
    k = len(classes)
    return LabelSpace(classes, np.ones(k, bool), classes, np.arange(k), "vocabulary"), note


def benchmark_label_space(vocab, name: str, categories: Sequence[dict]) -> LabelSpace:
    """The label space of a benchmark (``--dataset NAME``): panoptic.json's categories are the
    benchmark's classes in class-id order, so a semantic PNG value is the class's position there
    (= its class id for every registered benchmark but COCO panoptic); thing/stuff is the
    benchmark's. Every vocabulary class must be a benchmark class (by id).

    Raises:
        SamcpError: a vocabulary id that is not a class of the benchmark.
    """
    out_cats = [_category(c) for c in categories]
    pos_of = {c["id"]: i for i, c in enumerate(out_cats)}
    bad = [int(cid) for cid in vocab.ids if int(cid) not in pos_of]
    if bad:
        ids = sorted(pos_of)
        raise SamcpError(
            f"vocabulary {vocab.name!r} has class id(s) {', '.join(map(str, bad[:5]))} that are not "
            f"classes of {name} (ids {ids[0]}..{ids[-1]}); use the benchmark's class ids, as its "
            f"builtin vocabulary {name} does"
        )
    pos = np.asarray([pos_of[int(cid)] for cid in vocab.ids], np.int64)
    classes = [out_cats[p] for p in pos.tolist()]
    isthing = np.array([bool(c["isthing"]) for c in classes])
    return LabelSpace(classes, isthing, out_cats, pos, f"benchmark {name}")


class Predictor:
    """A trained run ready to predict: head plugin, module, text embeddings, label space.

    Build it with :meth:`from_run`; :meth:`sample` turns a cache row into the head's sample the way
    training did, :meth:`predict` runs a batch of samples to ImageResults.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        head_cfg,
        text_embed: torch.Tensor,
        labels: LabelSpace,
        max_patches: int,
        device: torch.device,
        notes: list[str] | None = None,
        *,
        seen: np.ndarray | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        params: CompositionParams | None = None,
        clip_head: torch.nn.Module | None = None,
    ) -> None:
        from samcp.models.registry import get_head, head_name

        self.model = model.eval()
        self.head_cfg = head_cfg
        self.head = get_head(head_name(head_cfg))
        self.text_embed = text_embed.to(device).float()
        self.labels = labels
        self.max_patches = max_patches
        self.device = device
        self.notes = list(notes or [])
        self.seen = np.ones(len(labels), bool) if seen is None else np.asarray(seen, bool)
        self.alpha, self.beta = alpha, beta
        self.params = params or self.head.default_params(head_cfg)
        self.clip_head = None if clip_head is None else clip_head.to(device)
        image_arrays, mask_arrays = self.head.needs(head_cfg)
        self.arrays = [*image_arrays, *mask_arrays]

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        cache: CacheReader | dict,
        *,
        vocabulary=None,
        clip_checkpoint: str | None = None,
        kappa: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        params: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        device: str = "auto",
        dataset: str | None = None,
    ) -> Predictor:
        """Loads a run folder for predicting on a cache.

        Args:
            run_dir: the run folder `samcp train` wrote.
            cache: the prediction cache (a reader, or its root attributes; its CLIP must be the
                run's).
            vocabulary: None (the training classes) or a class file / builtin name / Vocabulary.
            clip_checkpoint: the cache's CLIP, to embed a vocabulary not yet in the text cache.
            kappa: SAM-CP's CLIP weight: alpha = beta = kappa.
            alpha, beta: CLIP's weight in the geometric ensemble for the seen (training) classes
                and the unseen ones; None takes the head config's.
            params: composition thresholds to change (``score_thresh``, ``overlap_thresh``,
                ``stuff_area_min``, ``max_instances``) over the head's defaults.
            overrides: head config fields to change for inference (only the head's
                ``inference_fields``, e.g. PosSAM's ``classifier``).
            device: "auto", "cpu" or "cuda".
            dataset: a benchmark name (samcp.pipeline.benchmarks): predict in its label space
                (its classes, ids and thing/stuff); ``vocabulary`` defaults to its builtin
                vocabulary and may only name its classes.
        """
        from samcp.models.openvocab import seen_classes
        from samcp.pipeline.vocab import read_vocabulary

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise SamcpError(f"run folder {run_dir} not found; pass the --out of samcp train")
        reader = cache if isinstance(cache, CacheReader) else None
        cache_attrs = reader.attrs if reader is not None else cache
        dev = resolve_device(device)
        train_cfg = _read_json(run_dir / "train_config.json", "train_config.json")
        classes = _read_json(run_dir / "classes.json", "classes.json")
        model, head_cfg, note = load_run_head(run_dir, dev)
        notes = [note] if note else []
        _check_cache(cache_attrs, reader, head_cfg, train_cfg)
        if overrides:
            head_cfg = _override(head_cfg, overrides)
        if kappa is not None:
            alpha = beta = kappa
        for name, value in (("alpha", alpha), ("beta", beta)):
            if value is not None and not 0.0 <= value <= 1.0:
                flag = "--kappa" if kappa is not None else f"--{name}"
                raise SamcpError(f"{flag} {value} must be in [0, 1]")

        train_names = _training_names(run_dir, classes)
        bench_categories = None
        if dataset is not None:
            from samcp.pipeline.benchmarks import benchmark_categories, get_benchmark

            vocabulary = vocabulary if vocabulary is not None else get_benchmark(dataset).vocabulary
            bench_categories = benchmark_categories(dataset, cache_attrs)
        if vocabulary is None:
            from safetensors.torch import load_file

            path = run_dir / "text_embed.safetensors"
            if not path.is_file():
                raise SamcpError(f"{path} not found; is {run_dir} a complete samcp run?")
            text = load_file(str(path))["text_embed"]
            labels = LabelSpace.from_categories(classes, "run")
            if text.shape[0] != len(labels):
                raise SamcpError(
                    f"{path} has {text.shape[0]} classes but classes.json {len(labels)}; "
                    "the run folder is inconsistent, re-train"
                )
            seen = np.ones(len(labels), bool)
        else:
            vocab = read_vocabulary(vocabulary)
            if bench_categories is not None:
                assert dataset is not None
                labels = benchmark_label_space(vocab, dataset, bench_categories)
            text = vocabulary_text_embed(
                vocab, cache_attrs, clip_checkpoint, train_cfg.get("templates", "vild"), dev
            )
            if bench_categories is None:
                candidates = [(str(run_dir / "classes.json"), classes)]
                ds = _dataset_categories(cache_attrs)
                if ds is not None:
                    candidates.append(ds)
                labels, note = vocabulary_label_space(vocab, candidates)
                if note:
                    notes.append(note)
            seen = seen_classes(vocab.names, train_names)
        if text.shape[1] != head_cfg.text_dim:
            raise SamcpError(
                f"text embeddings have dimension {text.shape[1]} but the head expects "
                f"{head_cfg.text_dim}; use the CLIP the run was trained with"
            )
        from samcp.models.registry import get_head, head_name

        base = get_head(head_name(head_cfg)).default_params(head_cfg)
        try:
            comp = replace(base, **{k: v for k, v in (params or {}).items() if v is not None})
        except ValueError as exc:
            raise SamcpError(str(exc)) from None
        max_patches = int(train_cfg.get("max_patches", 300))
        clip_weights = reader.clip_head() if reader is not None else None
        if clip_weights is not None:
            from samcp.models.cliphead import ClipHead

            clip_head = ClipHead(clip_weights)
        else:
            clip_head = None
        return cls(
            model,
            head_cfg,
            text,
            labels,
            max_patches,
            dev,
            notes,
            seen=seen,
            alpha=alpha,
            beta=beta,
            params=comp,
            clip_head=clip_head,
        )

    def sample(self, row: CachedImage) -> Any:
        """The head's sample of a cache row (the first ``max_patches`` proposals, as in training)."""
        try:
            return self.head.sample(image_inputs(row), self.head_cfg, self.max_patches)
        except ValueError as exc:
            raise SamcpError(str(exc)) from None

    def context(self) -> InferContext:
        return InferContext(
            text_embed=self.text_embed,
            isthing=self.labels.isthing,
            seen=self.seen,
            params=self.params,
            device=self.device,
            alpha=self.alpha,
            beta=self.beta,
            clip_head=self.clip_head,
        )

    @torch.no_grad()
    def predict(self, samples: Sequence[Any]) -> list[ImageResult]:
        """Runs the head on a batch; one ImageResult per sample."""
        if not samples:
            return []
        batch = self.head.collate(list(samples), self.text_embed, self.head_cfg, self.device)
        out = self.model(**batch)
        return self.head.infer(out, list(samples), self.head_cfg, self.context())


def _override(head_cfg, overrides: Mapping[str, Any]):
    """The config with inference settings changed (``--set KEY=VALUE``)."""
    from samcp.models.registry import get_head, head_name

    name = head_name(head_cfg)
    allowed = get_head(name).inference_fields
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise SamcpError(
            f"--set {', '.join(bad)}: not an inference setting of head {name!r}; "
            f"settable at predict time: {', '.join(allowed) or 'none'}"
        )
    try:
        return type(head_cfg).from_dict({**head_cfg.to_dict(), **overrides})
    except (TypeError, ValueError) as exc:
        raise SamcpError(f"--set: {exc}") from None


def _training_names(run_dir: Path, classes: list[dict]) -> list[list[str]]:
    """Names (with synonyms) of the classes a run trained on: its vocabulary.txt, else the
    class names of classes.json."""
    from samcp.pipeline.vocab import read_vocabulary

    path = run_dir / "vocabulary.txt"
    if path.is_file():
        return [list(n) for n in read_vocabulary(str(path)).names]
    return [[str(c["name"])] for c in classes]


def _check_cache(attrs: dict, reader: CacheReader | None, head_cfg, train_cfg: dict) -> None:
    """The prediction cache must carry the features the head was trained on, with the same CLIP."""
    from samcp.models.registry import get_head, head_name

    clip = attrs.get("clip")
    if not clip or not clip.get("store_dense", True):
        raise SamcpError(
            "the cache has no dense CLIP features; re-run precompute with --clip-checkpoint"
        )
    if reader is not None:
        plugin = get_head(head_name(head_cfg))
        saved = head_cfg.to_dict()
        try:
            dictated = plugin.configure(saved, cache_info(reader))
        except ValueError as exc:
            raise SamcpError(f"cache {reader.path}: {exc}") from None
        for key, value in dictated.items():
            if json.dumps(saved.get(key)) != json.dumps(value, default=list):
                raise SamcpError(
                    f"the cache gives {key} = {value!r} but the run was trained with "
                    f"{saved.get(key)!r}; precompute with the training cache's CLIP settings"
                )
    elif int(clip["input_size"]) != int(getattr(head_cfg, "clip_input_size", clip["input_size"])):
        raise SamcpError(
            f"the cache's CLIP input size is {clip['input_size']} but the run was trained at "
            f"{head_cfg.clip_input_size}; precompute with --clip-input-size "
            f"{head_cfg.clip_input_size}"
        )
    train_cache = train_cfg.get("cache")
    if train_cache:
        try:
            trained = CacheReader(train_cache).attrs.get("clip") or {}
        except SamcpError:
            return  # the training cache is gone; the checks above must do
        if trained.get("checkpoint_sha256") not in (None, clip.get("checkpoint_sha256")):
            raise SamcpError(
                f"the cache's CLIP ({clip.get('model')}, sha256 "
                f"{str(clip.get('checkpoint_sha256'))[:12]}) is not the one the run was trained "
                "on; precompute with the same CLIP checkpoint"
            )


# ----------------------------------------------------------------------------------------------
# Writing a prediction folder.
# ----------------------------------------------------------------------------------------------


def gt_file_stems(json_path: str | Path) -> dict[str, str]:
    """``str(image_id) -> PNG stem`` from a COCO panoptic JSON (annotations' file_name, else the
    images' file_name)."""
    data = _read_json(Path(json_path), "panoptic JSON")
    stems = {str(im["id"]): Path(im["file_name"]).stem for im in data.get("images", [])}
    stems.update(
        {str(a["image_id"]): Path(a["file_name"]).stem for a in data.get("annotations", [])}
    )
    return stems


def _default_stems(cache_attrs: dict) -> dict[str, str]:
    src = cache_attrs.get("dataset_source") or {}
    if not src.get("path"):
        return {}
    if src.get("benchmark"):  # a cache made with precompute --dataset NAME
        from samcp.pipeline.benchmarks import cache_benchmark

        bench = cache_benchmark(cache_attrs)
        return {} if bench is None else bench.file_stems()
    path = Path(src["path"]) / "annotations" / f"panoptic_{src.get('split') or 'val2017'}.json"
    if not path.is_file():
        return {}
    try:
        return gt_file_stems(path)
    except SamcpError:
        return {}


def _json_image_id(image_id: str) -> int | str:
    """COCO's int ids stay ints (pycocotools matches them by type); other ids stay strings."""
    return int(image_id) if image_id.isdigit() and str(int(image_id)) == image_id else image_id


def _safe_stem(stem: str) -> str:
    return stem.replace("/", "_").replace(os.sep, "_") or "_"


class PredictionWriter:
    """Writes a prediction folder image by image: everything goes to a hidden staging folder first
    and :meth:`finish` renames it to ``out`` (replacing an earlier prediction folder), so a crash
    never leaves half a folder behind; :meth:`abort` removes the staging folder.

    The JSON entries of each image (panoptic.json's images and annotations, instances.json's
    results) are appended to part files as they come and joined by :meth:`finish`, so memory does
    not grow with the number of images. Semantic PNGs are 8-bit (255 = no class) up to 255
    classes, 16-bit (65535 = no class) beyond.

    Args:
        out: the prediction folder.
        labels: classes of the ImageResults (category ids, thing/stuff, semantic PNG index).
        stems: ``image_id -> file stem`` of the PNGs (default the image id).
    """

    _PARTS = ("images", "annotations", "instances")

    def __init__(
        self,
        out: str | Path,
        labels: LabelSpace,
        stems: Mapping[str, str] | None = None,
    ) -> None:
        out = self.out = Path(out).absolute()
        self.tmp = staging_path(out, "samcp-partial")
        (self.tmp / "panoptic").mkdir(parents=True)
        self.labels, self.stems = labels, dict(stems or {})
        self.semantic = True
        wide = int(labels.semantic_index.max(initial=0)) >= IGNORE_LABEL
        self.semantic_dtype = np.uint16 if wide else np.uint8
        self.semantic_ignore = IGNORE_LABEL_16 if wide else IGNORE_LABEL
        (self.tmp / "semantic").mkdir()
        self.num_images = 0
        self._counts = dict.fromkeys(self._PARTS, 0)
        self._parts = {k: open(self.tmp / f".{k}.part", "w", encoding="utf-8") for k in self._PARTS}
        self.used_stems: set[str] = set()

    def _emit(self, part: str, obj: dict) -> None:
        fh = self._parts[part]
        if self._counts[part]:
            fh.write(",\n")
        fh.write(json.dumps(obj))
        self._counts[part] += 1

    def add(self, p: ImageResult) -> None:
        """Writes one image's PNGs; its JSON entries are kept for :meth:`finish`."""
        stem = _safe_stem(self.stems.get(p.image_id, p.image_id))
        if stem in self.used_stems:
            raise SamcpError(f"two cached images map to the file name {stem}.png; ids must differ")
        self.used_stems.add(stem)
        image_id = _json_image_id(p.image_id)
        ids = self.labels.ids
        sem = p.semantic
        png = np.full(sem.shape, self.semantic_ignore, self.semantic_dtype)
        has = sem >= 0
        png[has] = self.labels.semantic_index[sem[has]]
        _write_png(self.tmp / "semantic" / f"{stem}.png", png)
        pan, segments = p.panoptic, p.segments
        from samcp.pipeline.evaluation.formats import write_panoptic_png

        write_panoptic_png(self.tmp / "panoptic" / f"{stem}.png", pan)
        info = []
        for s in segments:
            ys, xs = np.nonzero(pan == s["id"])
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            info.append(
                {
                    "id": s["id"],
                    "category_id": ids[s["label"]],
                    "iscrowd": 0,
                    "isthing": int(s["isthing"]),
                    "area": s["area"],
                    "bbox": bbox,
                    "score": round(s["score"], 6),
                }
            )
        self._emit(
            "images",
            {"id": image_id, "file_name": f"{stem}.png", "height": p.height, "width": p.width},
        )
        self._emit(
            "annotations", {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": info}
        )
        self.num_images += 1
        for rle, label, score in zip(
            p.instance_rles, p.instance_labels.tolist(), p.instance_scores.tolist(), strict=True
        ):
            counts = rle["counts"]
            self._emit(
                "instances",
                {
                    "image_id": image_id,
                    "category_id": ids[int(label)],
                    "segmentation": {
                        "size": [int(v) for v in rle["size"]],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                    },
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "score": float(score),
                },
            )

    def _close_parts(self) -> None:
        for fh in self._parts.values():
            fh.close()

    def _join(self, fh, part: str) -> None:
        with open(self.tmp / f".{part}.part", encoding="utf-8") as src:
            shutil.copyfileobj(src, fh)

    def finish(self, info: dict) -> Path:
        """Writes the JSON files (``info`` as predict_info.json) and moves the folder into place."""
        from samcp.pipeline.evaluation.formats import write_json_atomic

        self._close_parts()
        with open(self.tmp / "panoptic.json", "w", encoding="utf-8") as fh:
            fh.write('{"images": [\n')
            self._join(fh, "images")
            fh.write('],\n"annotations": [\n')
            self._join(fh, "annotations")
            fh.write('],\n"categories": ')
            fh.write(json.dumps(self.labels.output_categories))
            fh.write("}\n")
        if "instances" in info.get("outputs", ("instances",)):
            with open(self.tmp / "instances.json", "w", encoding="utf-8") as fh:
                fh.write("[\n")
                self._join(fh, "instances")
                fh.write("]\n")
        for part in self._PARTS:
            (self.tmp / f".{part}.part").unlink()
        write_json_atomic(self.tmp / INFO_FILE, info)
        write_marker(self.tmp, "predictions")
        old = None
        if self.out.exists():
            prepare_output_dir(self.out, "predictions", reuse=True)  # still ours, just before
            old = staging_path(self.out, "samcp-old")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old)
        return self.out

    def abort(self) -> None:
        self._close_parts()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _batches(rows: Iterator[CachedImage], size: int) -> Iterator[list[CachedImage]]:
    batch: list[CachedImage] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_run(
    run_dir: str | Path,
    cache: str | Path,
    out_dir: str | Path,
    *,
    vocabulary=None,
    clip_checkpoint: str | None = None,
    kappa: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    device: str = "auto",
    score_thresh: float | None = None,
    overlap_thresh: float | None = None,
    stuff_area_min: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 4,
    file_stems: Mapping[str, str] | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
    dataset: str | None = None,
) -> Path:
    """Predicts every image of a cache with a trained run and writes a prediction folder.

    Args:
        run_dir: the run folder of `samcp train` (model/, or its latest checkpoint).
        cache: the proposal cache of the images to predict (same CLIP as the run's).
        out_dir: prediction folder to write (an earlier prediction folder there is replaced).
        vocabulary: None for the training classes, or an FC-CLIP class file / builtin name
            (open-vocabulary prediction; category ids come from the file).
        clip_checkpoint: the cache's CLIP weights, needed to embed a vocabulary that is not in
            the text-embedding cache yet.
        kappa: SAM-CP's CLIP weight for every class (alpha = beta = kappa); 0 = the head alone.
        alpha, beta: CLIP's weight in the geometric ensemble for classes the head was trained on
            (seen) and the others (unseen); None takes the head config's.
        device: "auto", "cpu" or "cuda".
        score_thresh, overlap_thresh, stuff_area_min: composition thresholds; None takes the
            head's defaults (docs/heads/<head>.md).
        overrides: inference settings of the head to change (``--set KEY=VALUE``).
        batch_size: images per forward pass (more is faster on a GPU, needs more memory).
        file_stems: ``image_id -> PNG stem``; default the cache's source dataset's PNG names
            (so `samcp eval` finds the semantic PNGs), else the image id.
        progress: show a progress bar on stderr.
        allow_incomplete: predict an unfinished cache (a note names what is missing) instead
            of refusing it.
        dataset: a benchmark name (samcp.pipeline.benchmarks): write in its label space
            (panoptic.json's categories are its classes; semantic PNGs hold its class ids, 16-bit
            beyond 255 classes); ``vocabulary`` defaults to its builtin vocabulary.

    Returns:
        ``out_dir``.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    prepare_output_dir(out, "predictions", reuse=True)  # an earlier prediction folder is replaced
    if batch_size < 1:
        raise SamcpError(f"--batch-size {batch_size} must be at least 1")
    reader = CacheReader(cache)
    unfinished = check_cache_complete(reader, allow_incomplete)
    if not reader.shard_ids:
        raise SamcpError(f"cache {cache} has no complete shard; run samcp precompute first")
    predictor = Predictor.from_run(
        run_dir,
        reader,
        vocabulary=vocabulary,
        clip_checkpoint=clip_checkpoint,
        kappa=kappa,
        alpha=alpha,
        beta=beta,
        params={
            "score_thresh": score_thresh,
            "overlap_thresh": overlap_thresh,
            "stuff_area_min": None if stuff_area_min is None else int(stuff_area_min),
        },
        overrides=overrides,
        device=device,
        dataset=dataset,
    )
    labels = predictor.labels
    notes = list(predictor.notes)
    if unfinished:
        notes.append(f"{unfinished}: only the {len(reader)} cached images are predicted")
    stems = dict(file_stems) if file_stems is not None else _default_stems(reader.attrs)
    writer = PredictionWriter(out, labels, stems)
    if writer.semantic_dtype == np.uint16:
        notes.append(
            f"{len(labels.output_categories)} classes: semantic PNGs are 16-bit (65535 = no class)"
        )
    failed = no_embed = 0
    bar = tqdm(
        total=len(reader),
        desc="predict",
        unit="img",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        rows = reader.iter_images(include_failed=True, arrays=predictor.arrays)
        for batch in _batches(rows, batch_size):
            ok = [r for r in batch if r.status == STATUS_OK]
            if "clip_mask_embed" in predictor.arrays:  # only heads that fuse with CLIP read it
                no_embed += sum("clip_mask_embed" not in r.mask_arrays for r in ok)
            samples = [predictor.sample(r) for r in ok]
            done = {r.image_id: p for r, p in zip(ok, predictor.predict(samples), strict=True)}
            for r in batch:
                if r.status != STATUS_OK:
                    failed += 1
                    writer.add(ImageResult.empty(r.image_id, r.height, r.width))
                else:
                    writer.add(done[r.image_id])
                bar.update(1)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if failed:
        notes.append(f"{failed} images failed in precompute and are predicted all void")
    if no_embed:
        notes.append(
            f"{no_embed} images have no clip_mask_embed in the cache: no CLIP fusion for them"
        )
    from samcp.models.registry import head_name

    cfg = predictor.head_cfg
    params = predictor.params
    used_vocab = vocabulary
    if used_vocab is None and dataset is not None:
        from samcp.pipeline.benchmarks import get_benchmark

        used_vocab = get_benchmark(dataset).vocabulary
    info = {
        "run": str(Path(run_dir)),
        "cache": str(Path(cache)),
        "head": head_name(cfg),
        "vocabulary": None if used_vocab is None else str(getattr(used_vocab, "name", used_vocab)),
        "dataset": dataset,
        "semantic_ignore": writer.semantic_ignore,
        "overrides": dict(overrides or {}),
        "alpha": predictor.alpha,
        "beta": predictor.beta,
        "seen_classes": int(predictor.seen.sum()),
        "thing_stuff_source": labels.source,
        "panoptic": {
            "score_thresh": params.score_thresh,
            "overlap_thresh": params.overlap_thresh,
            "stuff_area_min": params.stuff_area_min,
            "max_instances": params.max_instances,
            "semantic_from": params.semantic_from,
        },
        "num_images": writer.num_images,
        "num_failed": failed,
        "notes": notes,
        # what the head predicts: a semantic head's panoptic files are empty placeholders, and it
        # writes no instances.json (samcp eval then reports mIoU only)
        "outputs": list(predictor.head.outputs),
    }
    try:
        return writer.finish(info)
    except BaseException:
        writer.abort()
        raise


def prediction_notes(pred_dir: str | Path) -> list[str]:
    """The notes `predict_run` recorded in a prediction folder."""
    path = Path(pred_dir) / INFO_FILE
    if not path.is_file():
        return []
    return list(_read_json(path, INFO_FILE).get("notes", []))
