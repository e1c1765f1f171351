"""The real benchmarks of the seed papers, read in the layouts detectron2, Mask2Former, FC-CLIP and
CAT-Seg prepare them (their ``datasets/prepare_*.py``), selectable by name.

=====================  ========  =======  ======  ==================================================
name                   task      classes  ignore  layout under ROOT (= $DETECTRON2_DATASETS or the
                                                  dataset folder itself)
=====================  ========  =======  ======  ==================================================
coco_panoptic          panoptic  133      (void)  coco/{train,val}2017, coco/annotations/panoptic_*
ade20k_150             panoptic  150      255     ADEChallengeData2016/images/{training,validation},
                                                  ade20k_panoptic_{train,val}.json + PNG folder,
                                                  annotations_detectron2/{training,validation}
cityscapes             panoptic  19       255     cityscapes/leftImg8bit/{split}/{city}/,
                                                  cityscapes/gtFine/cityscapes_panoptic_{split}.json
ade20k_847             semantic  847      65535   ADE20K_2021_17_01/{images,annotations}_detectron2/
pascal_context_59      semantic  59       255     pascal_ctx_d2/images, annotations_ctx59
pascal_context_459     semantic  459      65535   pascal_ctx_d2/images, annotations_ctx459 (16-bit)
pascal_voc_20          semantic  20       255     pascal_voc_d2/images, annotations_pascal20
coco_stuff_171         semantic  171      255     coco/{train,val}2017, stuffthingmaps_detectron2
=====================  ========  =======  ======  ==================================================

Class ids are the benchmark's contiguous train ids (0..K-1; COCO panoptic keeps its own ids), the
ids of the builtin vocabulary of the same name. :func:`open_benchmark` returns a
:class:`PanopticBenchmark` or a :class:`SemanticBenchmark`; both give ``records`` (the images, for
precompute) and their ground truth for `samcp eval`. docs/datasets.md describes every layout.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samcp.pipeline.datasets import ImageRecord
from samcp.pipeline.errors import SamcpError

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "val": ("val", "validation", "val2017"),
    "train": ("train", "training", "train2017"),
    "test": ("test", "testing", "test2017"),
}

# Cityscapes label ids (cityscapesscripts/helpers/labels.py) of the 19 evaluated classes, in
# train-id order: train id i is CITYSCAPES_LABEL_IDS[i].
CITYSCAPES_LABEL_IDS: tuple[int, ...] = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
)
CITYSCAPES_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_THINGS = frozenset(range(11, 19))  # person .. bicycle


@dataclass(frozen=True)
class SemanticLayout:
    """Where a semantic benchmark's files are, relative to its dataset folder.

    Attributes:
        folder: The dataset folder under the datasets root (``pascal_ctx_d2``).
        images: Image folder, ``{split}`` standing for the on-disk split name.
        labels: Label folder, likewise.
        splits: Canonical split (val, train) -> on-disk split name.
        label_exts: Label file extensions, in preference order.
        origin: Which preparation writes this layout (for messages and docs).
    """

    folder: str
    images: str
    labels: str
    splits: dict[str, str]
    label_exts: tuple[str, ...] = (".png",)
    origin: str = ""


@dataclass(frozen=True)
class BenchmarkInfo:
    """What a benchmark is: its task, classes, ignore label, vocabulary and layouts.

    Attributes:
        name: Registry name (= the builtin vocabulary's name).
        task: "panoptic" (PQ, mIoU, AP) or "semantic" (mIoU, fwIoU, pixel accuracy).
        num_classes: K.
        ignore_label: The ground truth's "no class" value (255, or 65535 for 16-bit labels).
        label_bits: 8 or 16: the bit depth of the semantic labels.
        folder: The dataset folder under the datasets root.
        layout: The expected layout, one line, for error messages.
        prepare: The upstream preparation step that writes the layout.
        layouts: Semantic layouts tried in order (semantic benchmarks and ADE20K-150's
            annotations_detectron2); the first is the one named in errors.
    """

    name: str
    task: str
    num_classes: int
    ignore_label: int
    label_bits: int
    folder: str
    layout: str
    prepare: str
    layouts: tuple[SemanticLayout, ...] = field(default_factory=tuple)

    @property
    def vocabulary(self) -> str:
        """The builtin vocabulary whose ids are this benchmark's class ids."""
        return self.name


_TV = {"val": "validation", "train": "training"}

BENCHMARKS: dict[str, BenchmarkInfo] = {
    "coco_panoptic": BenchmarkInfo(
        "coco_panoptic", "panoptic", 133, 255, 8, "coco",
        "coco/{train,val}2017/*.jpg, coco/annotations/panoptic_{train,val}2017.json and "
        "coco/annotations/panoptic_{train,val}2017/*.png (or detectron2's coco/panoptic_{train,"
        "val}2017/)",
        "unzip COCO's {train,val}2017.zip and panoptic_annotations_trainval2017.zip",
    ),
    "ade20k_150": BenchmarkInfo(
        "ade20k_150", "panoptic", 150, 255, 8, "ADEChallengeData2016",
        "ADEChallengeData2016/images/{training,validation}/*.jpg, "
        "ADEChallengeData2016/ade20k_panoptic_{train,val}.json with ade20k_panoptic_{train,val}/ "
        "PNGs, and annotations_detectron2/{training,validation}/*.png",
        "Mask2Former/FC-CLIP datasets/prepare_ade20k_sem_seg.py and prepare_ade20k_pan_seg.py",
        (
            SemanticLayout("ADEChallengeData2016", "images/{split}", "annotations_detectron2/{split}",
                           _TV, origin="prepare_ade20k_sem_seg.py"),
        ),
    ),
    "cityscapes": BenchmarkInfo(
        "cityscapes", "panoptic", 19, 255, 8, "cityscapes",
        "cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
        "cityscapes/gtFine/cityscapes_panoptic_{train,val}.json with cityscapes_panoptic_{train,val}/ "
        "PNGs (optional: gtFine/<split>/<city>/*_gtFine_labelTrainIds.png)",
        "cityscapesscripts/preparation/createPanopticImgs.py (and createTrainIdLabelImgs.py)",
    ),
    "ade20k_847": BenchmarkInfo(
        "ade20k_847", "semantic", 847, 65535, 16, "ADE20K_2021_17_01",
        "ADE20K_2021_17_01/images_detectron2/{training,validation}/*.jpg and "
        "ADE20K_2021_17_01/annotations_detectron2/{training,validation}/*.tif (16-bit, 65535 = "
        "ignore)",
        "FC-CLIP/ODISE datasets/prepare_ade20k_full_sem_seg.py (CAT-Seg: prepare_ade20k_847.py)",
        (
            SemanticLayout("ADE20K_2021_17_01", "images_detectron2/{split}",
                           "annotations_detectron2/{split}", _TV, (".tif", ".tiff", ".png"),
                           "prepare_ade20k_full_sem_seg.py"),
        ),
    ),
    "pascal_context_59": BenchmarkInfo(
        "pascal_context_59", "semantic", 59, 255, 8, "pascal_ctx_d2",
        "pascal_ctx_d2/images/{training,validation}/*.jpg and "
        "pascal_ctx_d2/annotations_ctx59/{training,validation}/*.png (255 = ignore)",
        "FC-CLIP/ODISE datasets/prepare_pascal_ctx_sem_seg.py",
        (
            SemanticLayout("pascal_ctx_d2", "images/{split}", "annotations_ctx59/{split}", _TV,
                           origin="prepare_pascal_ctx_sem_seg.py"),
            SemanticLayout("VOCdevkit/VOC2010", "JPEGImages", "annotations_detectron2/pc59_{split}",
                           {"val": "val"}, origin="CAT-Seg prepare_pascal_context_59.py"),
        ),
    ),
    "pascal_context_459": BenchmarkInfo(
        "pascal_context_459", "semantic", 459, 65535, 16, "pascal_ctx_d2",
        "pascal_ctx_d2/images/{training,validation}/*.jpg and "
        "pascal_ctx_d2/annotations_ctx459/{training,validation}/*.tif (16-bit, 65535 = ignore)",
        "FC-CLIP/ODISE datasets/prepare_pascal_ctx_full_sem_seg.py",
        (
            SemanticLayout("pascal_ctx_d2", "images/{split}", "annotations_ctx459/{split}", _TV,
                           (".tif", ".tiff", ".png"), "prepare_pascal_ctx_full_sem_seg.py"),
            SemanticLayout("VOCdevkit/VOC2010", "JPEGImages",
                           "annotations_detectron2/pc459_{split}", {"val": "val"},
                           (".tif", ".tiff", ".png"), "CAT-Seg prepare_pascal_context_459.py"),
        ),
    ),
    "pascal_voc_20": BenchmarkInfo(
        "pascal_voc_20", "semantic", 20, 255, 8, "pascal_voc_d2",
        "pascal_voc_d2/images/{training,validation}/*.jpg and "
        "pascal_voc_d2/annotations_pascal20/{training,validation}/*.png (255 = ignore, "
        "background included)",
        "FC-CLIP/ODISE datasets/prepare_pascal_voc_sem_seg.py",
        (
            SemanticLayout("pascal_voc_d2", "images/{split}", "annotations_pascal20/{split}", _TV,
                           origin="prepare_pascal_voc_sem_seg.py"),
            SemanticLayout("VOCdevkit/VOC2012", "JPEGImages", "annotations_detectron2/{split}",
                           {"val": "val"}, origin="CAT-Seg prepare_voc.py"),
        ),
    ),
    "coco_stuff_171": BenchmarkInfo(
        "coco_stuff_171", "semantic", 171, 255, 8, "coco",
        "coco/{train,val}2017/*.jpg and coco/stuffthingmaps_detectron2/{train,val}2017/*.png "
        "(171 classes, 255 = ignore)",
        "SAN/OVSeg/ZegFormer datasets/prepare_coco_stuff_sem_seg.py (CAT-Seg: "
        "prepare_coco_stuff.py)",
        (
            SemanticLayout("coco", "{split}", "stuffthingmaps_detectron2/{split}",
                           {"val": "val2017", "train": "train2017"},
                           origin="prepare_coco_stuff_sem_seg.py"),
            SemanticLayout("coco-stuff", "images/{split}", "annotations_detectron2/{split}",
                           {"val": "val2017", "train": "train2017"},
                           origin="CAT-Seg prepare_coco_stuff.py"),
        ),
    ),
}


def benchmark_names() -> list[str]:
    """The registered benchmark names."""
    return list(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkInfo:
    """The registry entry of ``name``.

    Raises:
        SamcpError: unknown name (the message lists the known ones).
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise SamcpError(
            f"unknown dataset {name!r}; use one of {', '.join(BENCHMARKS)}"
        ) from None


def canonical_split(split: str) -> str:
    """``val``, ``train`` or ``test`` for any of their on-disk spellings (validation, val2017...).

    Raises:
        SamcpError: a split name none of the layouts uses.
    """
    s = str(split).strip().lower()
    for canon, aliases in SPLIT_ALIASES.items():
        if s in aliases:
            return canon
    raise SamcpError(f"unknown split {split!r}; use val or train")


def _dataset_dir(root: Path, folder: str, probes: Sequence[str] = ()) -> Path:
    """ROOT/folder when ROOT is the datasets root; ROOT itself when it is the dataset folder (its
    name is the folder's, or it holds the first folder of one of ``probes``); else ROOT/folder,
    so that errors name the full expected path."""
    cand = root / folder
    if cand.is_dir():
        return cand
    if root.name == Path(folder).name:
        return root
    if any((root / Path(p).parts[0]).exists() for p in probes if "{" not in Path(p).parts[0]):
        return root
    return cand


def _missing(name: str, path: Path, info: BenchmarkInfo, root: Path) -> SamcpError:
    return SamcpError(
        f"{name}: {path} not found; expected {info.layout} under {root} "
        f"(prepared by {info.prepare}; check the root and --split)"
    )


def _builtin_names(vocabulary: str) -> dict[int, str]:
    """``class id -> first name`` of a builtin vocabulary file (``id:name,synonym,...`` lines),
    read without samcp.pipeline.vocab (which imports torch): names are for display only."""
    from importlib import resources

    try:
        text = (
            resources.files("samcp.pipeline")
            .joinpath("vocabularies", f"{vocabulary}.txt")
            .read_text(encoding="utf-8")
        )
    except (FileNotFoundError, OSError):
        return {}
    names = {}
    for line in text.splitlines():
        head, sep, rest = line.strip().partition(":")
        if sep and head.strip().lstrip("-").isdigit():
            names[int(head)] = rest.split(",")[0].strip()
    return names


def _vocabulary_categories(info: BenchmarkInfo) -> list[dict[str, Any]]:
    """``{id, name, isthing}`` for class ids 0..K-1, named by the builtin vocabulary when it is
    installed (names are for display only; ids are the benchmark's)."""
    names = _builtin_names(info.vocabulary)
    return [
        {"id": i, "name": names.get(i) or f"class {i}", "isthing": 0}
        for i in range(info.num_classes)
    ]


def read_label_map(path: Path) -> np.ndarray:
    """Reads a semantic label file (8-bit PNG, 16-bit PNG or TIFF) as an (H, W) array of its raw
    values (uint8 or uint16).

    Raises:
        SamcpError: missing, unreadable or not single-channel 8/16-bit.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("L", "P"):
                return np.asarray(img, dtype=np.uint8)
            if mode.startswith("I;16") or mode == "I":
                arr = np.asarray(img)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise SamcpError(f"{path}: label values outside 0..65535; rewrite the file")
                return arr.astype(np.uint16)
    except FileNotFoundError:
        raise SamcpError(f"{path}: semantic label file not found") from None
    except OSError as exc:
        raise SamcpError(f"{path}: cannot read label file ({exc}); rewrite it") from None
    raise SamcpError(
        f"{path}: label image has mode {mode}; expected single-channel 8-bit or 16-bit class ids"
    )


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as exc:
        raise SamcpError(f"{path}: cannot read the image header ({exc})") from None


def semantic_to_panoptic(
    labels: np.ndarray, num_classes: int, ignore_label: int, where: str = "label map"
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A semantic label map as panoptic ground truth, the form training reads: one segment per
    class present (segment id = class id + 1, ``iscrowd`` 0: a region, not instances), the
    ignore label void (id 0).

    Args:
        labels: (H, W) class ids 0..K-1 and ``ignore_label``.
        num_classes: K.
        ignore_label: The benchmark's "no class" value.
        where: Named in errors (the label file).

    Returns:
        ``(id_map, segments_info)``: (H, W) int32 segment ids and one COCO-panoptic dict per
        present class (``id``, ``category_id``, ``iscrowd``, ``area``), in class-id order.

    Raises:
        SamcpError: a value that is neither a class id nor the ignore label.
    """
    lab = np.asarray(labels).astype(np.int64)
    values, counts = np.unique(lab, return_counts=True)
    bad = [int(v) for v in values if v != ignore_label and not 0 <= v < num_classes]
    if bad:
        raise SamcpError(
            f"{where}: label {bad[0]} is neither a class id (0..{num_classes - 1}) nor the "
            f"ignore label {ignore_label}; the label files do not belong to this benchmark"
        )
    id_map = np.where(lab == ignore_label, 0, lab + 1).astype(np.int32)
    segments = [
        {"id": int(v) + 1, "category_id": int(v), "iscrowd": 0, "area": int(n)}
        for v, n in zip(values.tolist(), counts.tolist(), strict=True)
        if v != ignore_label
    ]
    return id_map, segments


@dataclass(frozen=True)
class SemanticItem:
    """One image of a semantic benchmark: its id, file stem, image and label files."""

    image_id: str
    stem: str
    image: Path
    label: Path


class SemanticBenchmark:
    """A semantic-segmentation benchmark split: image/label pairs with class ids 0..K-1 and the
    benchmark's ignore label.

    Args:
        info: The registry entry.
        root: The datasets root or the dataset folder.
        split: Any spelling of val / train.

    Raises:
        SamcpError: a folder of the layout is missing or holds no label file (naming it and the
            expected layout), or a label file has no image.
    """

    task = "semantic"

    def __init__(self, info: BenchmarkInfo, root: str | os.PathLike, split: str = "val") -> None:
        self.info = info
        self.name = info.name
        self.given_root = Path(root).absolute()
        self.split = canonical_split(split)
        layout, base = self._pick_layout()
        self.layout = layout
        self.root = base
        on_disk = layout.splits[self.split]
        self.image_dir = base / layout.images.format(split=on_disk)
        self.label_dir = base / layout.labels.format(split=on_disk)
        self.ignore_label = info.ignore_label
        self.items = self._scan()

    def _pick_layout(self) -> tuple[SemanticLayout, Path]:
        first_error = None
        for layout in self.info.layouts:
            base = _dataset_dir(self.given_root, layout.folder, (layout.images, layout.labels))
            if self.split not in layout.splits:
                continue
            on_disk = layout.splits[self.split]
            for rel in (layout.labels, layout.images):
                p = base / rel.format(split=on_disk)
                if not p.is_dir():
                    first_error = first_error or _missing(self.name, p, self.info, self.given_root)
                    break
            else:
                return layout, base
        raise first_error or SamcpError(
            f"{self.name}: no {self.split} split in the layout ({self.info.layout}); use --split val"
        )

    def _scan(self) -> list[SemanticItem]:
        exts = self.layout.label_exts
        labels: dict[str, Path] = {}
        with os.scandir(self.label_dir) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() not in exts or not entry.is_file():
                    continue
                prev = labels.get(stem)
                if prev is None or exts.index(ext.lower()) < exts.index(prev.suffix.lower()):
                    labels[stem] = Path(entry.path)
        if not labels:
            raise SamcpError(
                f"{self.name}: {self.label_dir} holds no {'/'.join(exts)} label file; expected "
                f"{self.info.layout} (prepared by {self.info.prepare})"
            )
        items = []
        for stem in sorted(labels):
            image = None
            for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
                if (self.image_dir / f"{stem}{ext}").is_file():
                    image = self.image_dir / f"{stem}{ext}"
                    break
            if image is None:
                raise SamcpError(
                    f"{self.name}: label {labels[stem]} has no image {self.image_dir / stem}.jpg; "
                    f"expected {self.info.layout}"
                )
            items.append(SemanticItem(stem, stem, image, labels[stem]))
        return items

    def __len__(self) -> int:
        return len(self.items)

    @cached_property
    def records(self) -> list[ImageRecord]:
        """The images (reads each image's header for its size)."""
        out = []
        for it in self.items:
            h, w = _image_size(it.image)
            out.append(ImageRecord(it.image_id, str(it.image), h, w))
        return out

    @cached_property
    def categories(self) -> list[dict[str, Any]]:
        """``{id, name, isthing}`` per class, ids 0..K-1 (every class a region: isthing 0)."""
        return _vocabulary_categories(self.info)

    def file_stems(self) -> dict[str, str]:
        """``image_id -> stem`` of the per-image PNGs (prediction and ground truth)."""
        return {it.image_id: it.stem for it in self.items}

    @cached_property
    def _by_id(self) -> dict[str, SemanticItem]:
        return {it.image_id: it for it in self.items}

    def _item(self, image_id: str) -> SemanticItem:
        try:
            return self._by_id[str(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in {self.label_dir}") from None

    def load_labels(self, image_id: str) -> np.ndarray:
        """The raw label map of an image (class ids, ``ignore_label`` where unlabelled)."""
        return read_label_map(self._item(image_id).label)

    def load_panoptic(self, image_id: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The image's labels as panoptic ground truth (:func:`semantic_to_panoptic`: one
        segment per class present, not crowd; ignore pixels void), what `samcp train` reads.

        Raises:
            KeyError: not an image of this split.
            SamcpError: the label file is unreadable, holds a value that is neither a class id
                nor the ignore label, or is not of its image's size.
        """
        item = self._item(image_id)
        labels = read_label_map(item.label)
        h, w = _image_size(item.image)
        if labels.shape != (h, w):
            raise SamcpError(
                f"{self.name}: {item.label} is {labels.shape[1]}x{labels.shape[0]} but its image "
                f"{item.image} is {w}x{h}; the label folder does not match the images"
            )
        return semantic_to_panoptic(
            labels, self.info.num_classes, self.ignore_label, str(item.label)
        )

    @cached_property
    def labels_listing_sha256(self) -> str:
        """sha256 of the label files' names and byte sizes, in name order: the identity of the
        annotations that precompute records and train checks (cheap: no label file is read)."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.label.name}\t{it.label.stat().st_size}\n".encode())
        return h.hexdigest()

    def source_attrs(self) -> dict[str, Any]:
        """The cache's ``dataset_source`` for images of this benchmark."""
        return {**_source_attrs(self, None), "labels_listing_sha256": self.labels_listing_sha256}


class PanopticBenchmark:
    """A panoptic benchmark split in COCO panoptic format (JSON + PNGs), with its semantic labels
    when the layout has them.

    Category ids are the benchmark's class ids: ADE20K-150's JSON ids (0..149) as they are,
    Cityscapes' label ids (7..33) mapped to the 19 train ids (0..18), COCO's ids (1..200) as they are.
    """

    task = "panoptic"

    def __init__(self, info: BenchmarkInfo, root: str | os.PathLike, split: str = "val") -> None:
        self.info = info
        self.name = info.name
        self.given_root = Path(root).absolute()
        self.split = canonical_split(split)
        probes = {
            "coco_panoptic": ("annotations",),
            "ade20k_150": ("images", "annotations_detectron2", f"ade20k_panoptic_{self.split}"),
            "cityscapes": ("leftImg8bit", "gtFine"),
        }.get(info.name, ())
        base = self.root = _dataset_dir(self.given_root, info.folder, probes)
        self.semantic_dir: Path | None = None
        self.category_map: dict[int, int] | None = None  # JSON category id -> benchmark id
        s = self.split
        if info.name == "coco_panoptic":
            on_disk = f"{s}2017"
            self.json_path = base / "annotations" / f"panoptic_{on_disk}.json"
            self.png_dir = base / "annotations" / f"panoptic_{on_disk}"
            if not self.png_dir.is_dir() and (base / f"panoptic_{on_disk}").is_dir():
                self.png_dir = base / f"panoptic_{on_disk}"  # detectron2 / Mask2Former's place
            self.image_dir = base / on_disk
        elif info.name == "ade20k_150":
            self.json_path = base / f"ade20k_panoptic_{s}.json"
            self.png_dir = base / f"ade20k_panoptic_{s}"
            self.image_dir = base / "images" / _TV.get(s, s)
            sem = base / "annotations_detectron2" / _TV.get(s, s)
            self.semantic_dir = sem if sem.is_dir() else None
        elif info.name == "cityscapes":
            gt = base / "gtFine"
            self.json_path = gt / f"cityscapes_panoptic_{s}.json"
            if not self.json_path.is_file() and (gt / f"cityscapes_panoptic_{s}_trainId.json").is_file():
                self.json_path = gt / f"cityscapes_panoptic_{s}_trainId.json"
            self.png_dir = self.json_path.with_suffix("")
            self.image_dir = base / "leftImg8bit" / s
        else:  # pragma: no cover - the registry names only these
            raise SamcpError(f"{info.name} is not a panoptic benchmark")
        for p, is_file in ((self.image_dir, False), (self.json_path, True), (self.png_dir, False)):
            if not (p.is_file() if is_file else p.is_dir()):
                raise _missing(self.name, p, info, self.given_root)
        from samcp.pipeline.evaluation.formats import load_ground_truth

        gt_doc = load_ground_truth(self.json_path, self.png_dir)
        if info.name == "cityscapes":
            self.category_map = _cityscapes_map([c.id for c in gt_doc.categories], self.json_path)
        self._gt = gt_doc
        if info.name == "cityscapes":
            first = gt_doc.annotations[0] if gt_doc.annotations else None
            if first is not None and self._cityscapes_label_file(str(first["image_id"])).is_file():
                self.semantic_dir = base / "gtFine" / s

    # -- images -----------------------------------------------------------------------------

    def _image_entries(self) -> list[dict[str, Any]]:
        import json

        doc = json.loads(self.json_path.read_text(encoding="utf-8"))
        return list(doc.get("images", []))

    def image_path(self, entry: dict[str, Any]) -> Path:
        """The image file of a JSON ``images`` entry."""
        name = str(entry["file_name"])
        if self.name == "cityscapes":
            city = str(entry["id"]).split("_")[0]
            return self.image_dir / city / name
        return self.image_dir / name

    @cached_property
    def records(self) -> list[ImageRecord]:
        """The images of the JSON, in its order (COCO: by numeric id)."""
        from samcp.pipeline.datasets import _id_sort_key

        entries = self._image_entries()
        if self.name == "coco_panoptic":
            entries.sort(key=lambda im: _id_sort_key(im["id"]))
        out = []
        for im in entries:
            try:
                out.append(ImageRecord(str(im["id"]), str(self.image_path(im)),
                                       int(im["height"]), int(im["width"])))
            except (KeyError, TypeError, ValueError):
                raise SamcpError(
                    f"{self.json_path}: an images entry lacks id/file_name/height/width "
                    f"({str(im)[:80]}); re-run the preparation ({self.info.prepare})"
                ) from None
        return out

    def __len__(self) -> int:
        return len(self._gt.annotations)

    # -- ground truth -----------------------------------------------------------------------

    def ground_truth(self):
        """The panoptic ground truth (samcp.pipeline.evaluation.GroundTruth), category ids mapped
        to the benchmark's class ids."""
        if self.category_map is None:
            return self._gt
        return _remap_ground_truth(self._gt, self.category_map)

    @cached_property
    def categories(self) -> list[dict[str, Any]]:
        """``{id, name, isthing}`` in class-index order, benchmark ids."""
        return [
            {"id": c.id, "name": c.name, "isthing": int(c.isthing)}
            for c in self.ground_truth().categories
        ]

    def file_stems(self) -> dict[str, str]:
        """``image_id -> stem`` of the panoptic PNGs (predictions are written under these)."""
        return {str(a["image_id"]): Path(a["file_name"]).stem for a in self._gt.annotations}

    @cached_property
    def _annotations(self) -> dict[str, dict[str, Any]]:
        return {str(a["image_id"]): a for a in self.ground_truth().annotations}

    def load_panoptic(self, image_id: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The panoptic ground truth of an image, what `samcp train` reads: ``(segment id map,
        segments_info)`` with category ids the benchmark's class ids (Cityscapes: train ids).

        Raises:
            KeyError: the image has no annotation.
            SamcpError: its PNG is missing, unreadable or not of the image's size.
        """
        from samcp.pipeline.evaluation.formats import read_panoptic_png

        ann = self._annotations.get(str(image_id))
        if ann is None:
            raise KeyError(f"image id {image_id!r} has no annotation in {self.json_path}")
        png = self.png_dir / ann["file_name"]
        id_map = read_panoptic_png(png).astype(np.int32)
        hw = self._gt.image_sizes.get(str(image_id)) if self._gt.image_sizes else None
        if hw is not None and tuple(id_map.shape) != tuple(hw):
            raise SamcpError(
                f"{self.name}: {png} is {id_map.shape[1]}x{id_map.shape[0]} but image "
                f"{image_id} is {hw[1]}x{hw[0]} in {self.json_path}; re-run the preparation "
                f"({self.info.prepare})"
            )
        return id_map, list(ann["segments_info"])

    def _cityscapes_label_file(self, image_id: str) -> Path:
        city = image_id.split("_")[0]
        return (
            self.root / "gtFine" / self.split / city / f"{image_id}_gtFine_labelTrainIds.png"
        )

    def semantic_files(self) -> dict[str, Path] | None:
        """``image_id -> semantic label file`` (class ids, 255 = ignore) when the layout has them
        (ADE20K's annotations_detectron2, Cityscapes' labelTrainIds), else None: semantics are then
        derived from the panoptic PNGs."""
        if self.semantic_dir is None:
            return None
        out = {}
        for a in self._gt.annotations:
            image_id = str(a["image_id"])
            if self.name == "cityscapes":
                out[image_id] = self._cityscapes_label_file(image_id)
            else:
                out[image_id] = self.semantic_dir / f"{Path(a['file_name']).stem}.png"
        return out

    def source_attrs(self) -> dict[str, Any]:
        """The cache's ``dataset_source`` for images of this benchmark."""
        return _source_attrs(self, self.json_path)


def _cityscapes_map(ids: Sequence[int], json_path: Path) -> dict[int, int]:
    got = set(ids)
    if got == set(CITYSCAPES_LABEL_IDS):
        return {lid: i for i, lid in enumerate(CITYSCAPES_LABEL_IDS)}
    if got == set(range(len(CITYSCAPES_LABEL_IDS))):
        return {i: i for i in range(len(CITYSCAPES_LABEL_IDS))}
    raise SamcpError(
        f"{json_path}: categories {sorted(got)[:8]}... are neither the 19 Cityscapes label ids "
        "(7..33) nor train ids (0..18); regenerate it with cityscapesscripts createPanopticImgs.py"
    )


def _remap_ground_truth(gt, cmap: dict[int, int]):
    from samcp.pipeline.evaluation.formats import Category, GroundTruth

    by_new = sorted(((cmap[c.id], c) for c in gt.categories), key=lambda t: t[0])
    cats = [Category(new, c.name, c.isthing, i) for i, (new, c) in enumerate(by_new)]
    anns = []
    for a in gt.annotations:
        segs = [{**s, "category_id": cmap[int(s["category_id"])]} for s in a["segments_info"]]
        anns.append({**a, "segments_info": segs})
    return GroundTruth(gt.json_path, gt.png_dir, cats, anns, dict(gt.image_sizes))


def _source_attrs(bench, annotations: Path | None) -> dict[str, Any]:
    sha = None
    if annotations is not None and annotations.is_file():
        h = hashlib.sha256()
        with open(annotations, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        sha = h.hexdigest()
    coco = bench.name == "coco_panoptic"
    return {
        "path": str(bench.root),
        "split": f"{bench.split}2017" if coco else bench.split,
        # panoptic benchmarks are COCO panoptic JSONs: the identity check of train/predict/eval
        # compares their sha256, as for the default COCO layout
        "kind": "coco_panoptic" if bench.task == "panoptic" else bench.name,
        "benchmark": bench.name,
        "annotations_sha256": sha,
    }


def open_benchmark(
    name: str, root: str | os.PathLike, split: str = "val"
) -> PanopticBenchmark | SemanticBenchmark:
    """Opens a benchmark split by name.

    Args:
        name: A registry name (:func:`benchmark_names`).
        root: The datasets root (``$DETECTRON2_DATASETS``) or the dataset folder itself.
        split: val or train, in any on-disk spelling (validation, val2017, ...).

    Returns:
        A :class:`PanopticBenchmark` or :class:`SemanticBenchmark`. ADE20K-150 without its
        panoptic JSON (CAT-Seg prepares only annotations_detectron2) opens as semantic.

    Raises:
        SamcpError: unknown name, missing root, or a wrongly laid-out root: one line naming the
            missing path and the layout expected.
    """
    info = get_benchmark(name)
    root = Path(root)
    if not root.is_dir():
        raise SamcpError(
            f"{name}: {root.absolute()} is not a folder; pass the datasets root holding "
            f"{info.folder}/ (expected {info.layout})"
        )
    if info.task == "semantic":
        return SemanticBenchmark(info, root, split)
    if name == "ade20k_150":
        s = canonical_split(split)
        base = _dataset_dir(root.absolute(), info.folder, ("images", "annotations_detectron2"))
        if not (base / f"ade20k_panoptic_{s}.json").is_file() and (
            base / "annotations_detectron2" / _TV.get(s, s)
        ).is_dir():
            return SemanticBenchmark(info, root, split)
    return PanopticBenchmark(info, root, split)


def benchmark_categories(name: str, cache_attrs: dict | None = None) -> list[dict[str, Any]]:
    """The categories (id, name, isthing) of a benchmark's label space, in class-index order.

    Semantic benchmarks: ids 0..K-1 named by the builtin vocabulary, every class a region.
    Panoptic benchmarks need their JSON for thing/stuff: it is read from the dataset a cache was
    made from (``cache_attrs['dataset_source']``, when it is this benchmark).

    Raises:
        SamcpError: a panoptic benchmark whose JSON cannot be found that way.
    """
    info = get_benchmark(name)
    src = (cache_attrs or {}).get("dataset_source") or {}
    coco = name == "coco_panoptic" and src.get("kind") == "coco_panoptic" and not src.get(
        "benchmark"
    )  # a cache made from a COCO-layout folder without --dataset
    if (src.get("benchmark") == name or coco) and src.get("path"):
        try:
            return open_benchmark(name, src["path"], src.get("split") or "val").categories
        except SamcpError:
            if info.task == "panoptic":
                raise
    if info.task == "semantic":
        return _vocabulary_categories(info)
    raise SamcpError(
        f"--dataset {name}: thing/stuff of its classes comes from the dataset's panoptic JSON, but "
        f"the cache was not made from {name} (precompute with --dataset {name} ROOT)"
    )


def cache_benchmark(cache_attrs: dict) -> PanopticBenchmark | SemanticBenchmark | None:
    """The benchmark a cache was made from (``dataset_source.benchmark``), when it is readable."""
    src = cache_attrs.get("dataset_source") or {}
    if not src.get("benchmark") or not src.get("path"):
        return None
    try:
        return open_benchmark(src["benchmark"], src["path"], src.get("split") or "val")
    except SamcpError:
        return None


def cache_source_name(cache_attrs: dict) -> str | None:
    """The benchmark a cache's images come from: ``dataset_source.benchmark``, ``coco_panoptic``
    for a cache made from a COCO-layout root without ``--dataset``, None for a manifest (or a
    cache that records no source)."""
    src = cache_attrs.get("dataset_source") or {}
    if src.get("benchmark"):
        return str(src["benchmark"])
    kind = src.get("kind") or (
        "manifest" if str(src.get("path", "")).endswith(".jsonl") else "coco_panoptic"
    )
    return "coco_panoptic" if src and kind == "coco_panoptic" else None


def check_benchmark_source(
    cache_attrs: dict,
    cache: str,
    bench: PanopticBenchmark | SemanticBenchmark,
    *,
    allow_other: bool = False,
    option: str = "--dataset",
) -> None:
    """Refuses a cache recorded as made from another benchmark, or (semantic benchmarks) from
    other label files, than ``bench``.

    The panoptic benchmarks' identity (the sha256 of their JSON) and the image sizes are
    :func:`samcp.pipeline.cache.check_cache_source`'s; this adds what it cannot see: the
    benchmark's name, and for a semantic benchmark the ``labels_listing_sha256`` precompute
    records (caches made before it was recorded: the dataset folder and split).

    Raises:
        SamcpError: a mismatch, naming both sides and ``--allow-other-dataset``.
    """
    if allow_other:
        return
    src = cache_attrs.get("dataset_source") or {}
    recorded = cache_source_name(cache_attrs)
    override = "--allow-other-dataset"
    if recorded is not None and recorded != bench.name:
        raise SamcpError(
            f"cache {cache} was made from {recorded} ({src.get('path')}), not from {bench.name}; "
            f"pass a cache of {bench.name}, or {override} if its images are {bench.name}'s"
        )
    if bench.task != "semantic" or not src:
        return
    sha = src.get("labels_listing_sha256")
    if sha is not None:
        same = sha == bench.labels_listing_sha256
    else:  # caches written before the listing was recorded
        same = (
            Path(str(src.get("path", ""))).absolute() == Path(bench.root).absolute()
            and src.get("split") == bench.split
        )
    if not same:
        raise SamcpError(
            f"cache {cache} was made from {bench.name} at {src.get('path')} (split "
            f"{src.get('split')}), not from the label files in {bench.label_dir} given by "
            f"{option} (their listing differs); pass the dataset the cache was made from, or "
            f"{override} if these are the same images (moved, or labels rewritten)"
        )
