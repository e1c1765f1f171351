"""Reading and writing the file formats that evaluation consumes.

Ground truth is a COCO panoptic folder (one JSON plus one PNG per image). Predictions are a folder
``PRED_DIR`` laid out as ``samcp predict`` writes it::

    PRED_DIR/panoptic.json        COCO panoptic: {"annotations": [{image_id, file_name, segments_info}]}
    PRED_DIR/panoptic/<file_name> the PNGs named by panoptic.json
    PRED_DIR/semantic/<stem>.png  optional; contiguous class index, 255 = unlabelled
    PRED_DIR/instances.json       optional; COCO results list with RLE segmentations

Image ids may be ints or strings anywhere; they are always compared as strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samcp.pipeline.errors import SamcpError

# panopticapi: id = R + 256*G + 256^2*B; pairs (gt, pred) are packed as gt * OFFSET + pred.
OFFSET = 256 * 256 * 256
VOID = 0
# Label value meaning "no class" in semantic PNGs (detectron2's and mmseg's ignore label).
IGNORE_LABEL = 255


@dataclass(frozen=True)
class Category:
    """One category of the ground truth.

    Attributes:
        id: The dataset's category id (any int, 0 included).
        name: Human-readable name.
        isthing: True for countable things, False for stuff.
        index: Contiguous class index, the category's position in the ground-truth JSON's list.
    """

    id: int
    name: str
    isthing: bool
    index: int


@dataclass
class GroundTruth:
    """A COCO panoptic ground truth: categories, per-image annotations and where the PNGs are.

    Attributes:
        json_path: The panoptic JSON file.
        png_dir: The folder holding the panoptic PNGs.
        categories: Categories in the JSON's order (their ``index`` is that order).
        annotations: The JSON's ``annotations`` in order.
        image_sizes: ``str(image_id) -> (height, width)`` from the JSON's ``images`` when present.
    """

    json_path: Path
    png_dir: Path
    categories: list[Category]
    annotations: list[dict[str, Any]]
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def category_by_id(self) -> dict[int, Category]:
        """Categories keyed by dataset category id."""
        return {c.id: c for c in self.categories}


@dataclass
class Predictions:
    """A prediction folder (see the module docstring for the layout).

    Attributes:
        root: PRED_DIR.
        annotations: ``str(image_id) -> panoptic annotation`` from panoptic.json.
        png_dir: PRED_DIR/panoptic.
        semantic_dir: PRED_DIR/semantic when it exists, else None.
        instances: The parsed instances.json when it exists, else None.
    """

    root: Path
    annotations: dict[str, dict[str, Any]]
    png_dir: Path
    semantic_dir: Path | None
    instances: list[dict[str, Any]] | None


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Converts an (H, W, 3) uint8 panoptic PNG array to segment ids (panopticapi's ``rgb2id``)."""
    rgb = rgb.astype(np.uint32, copy=False)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Converts segment ids (< 256^3) to an (H, W, 3) uint8 array, the inverse of :func:`rgb_to_id`."""
    ids = np.asarray(ids, dtype=np.uint32)
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def read_panoptic_png(path: Path) -> np.ndarray:
    """Reads a COCO panoptic PNG as an (H, W) uint32 array of segment ids.

    Raises:
        SamcpError: If the file is missing, unreadable or not an RGB image.
    """
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                img = img.convert("RGB")
            if img.mode not in ("RGB", "RGBA"):
                raise SamcpError(
                    f"{path}: panoptic PNG has mode {img.mode}; write it as RGB with "
                    "id = R + 256*G + 256^2*B"
                )
            arr = np.asarray(img)
    except FileNotFoundError:
        raise SamcpError(
            f"{path}: panoptic PNG not found; check the folder and file_name"
        ) from None
    except OSError as exc:
        raise SamcpError(f"{path}: cannot read panoptic PNG ({exc}); rewrite the file") from None
    return rgb_to_id(arr[..., :3])


def write_panoptic_png(path: Path, ids: np.ndarray) -> None:
    """Writes an (H, W) array of segment ids as a COCO panoptic RGB PNG."""
    Image.fromarray(id_to_rgb(ids)).save(path)


def read_label_png(path: Path) -> np.ndarray:
    """Reads a single-channel semantic label PNG as an (H, W) uint8 array.

    Raises:
        SamcpError: If the file is missing or not a single-channel 8-bit image.
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise SamcpError(
                    f"{path}: semantic PNG has mode {img.mode}; write it as 8-bit single-channel "
                    "class indices with 255 for unlabelled"
                )
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise SamcpError(
            f"{path}: semantic prediction PNG not found; write one per image or remove the "
            "semantic/ folder to derive semantics from the panoptic output"
        ) from None
    except OSError as exc:
        raise SamcpError(f"{path}: cannot read semantic PNG ({exc}); rewrite the file") from None


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SamcpError(f"{path}: {what} not found; check the path") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SamcpError(f"{path}: cannot parse {what} ({exc}); rewrite the file") from None


def resolve_ground_truth(path: Path, split: str = "val2017") -> tuple[Path, Path]:
    """Finds the panoptic JSON and PNG folder of a ground truth given as a dataset or a JSON file.

    Args:
        path: A dataset root holding ``annotations/panoptic_{split}.json`` and
            ``annotations/panoptic_{split}/``, or a panoptic JSON file ``X.json`` whose PNGs are in
            ``X/`` (panopticapi's convention).
        split: The split name used when ``path`` is a dataset root.

    Returns:
        ``(json_path, png_dir)``.

    Raises:
        SamcpError: If either does not exist.
    """
    path = Path(path)
    if path.is_file():
        json_path, png_dir = path, path.with_suffix("")
    else:
        json_path = path / "annotations" / f"panoptic_{split}.json"
        png_dir = path / "annotations" / f"panoptic_{split}"
    if not json_path.is_file():
        raise SamcpError(
            f"{json_path}: ground-truth panoptic JSON not found; pass a COCO panoptic dataset root "
            "(annotations/panoptic_<split>.json) or the JSON file itself, and check --split"
        )
    if not png_dir.is_dir():
        raise SamcpError(
            f"{png_dir}: ground-truth panoptic PNG folder not found; check the dataset"
        )
    return json_path, png_dir


def load_ground_truth(json_path: Path, png_dir: Path | None = None) -> GroundTruth:
    """Loads a COCO panoptic ground truth.

    Args:
        json_path: The panoptic JSON (needs ``categories`` and ``annotations``).
        png_dir: Folder of the PNGs; defaults to the JSON's path without ``.json``.

    Returns:
        The parsed ground truth.

    Raises:
        SamcpError: If the JSON is missing, malformed or has duplicate image or category ids.
    """
    json_path = Path(json_path)
    png_dir = Path(png_dir) if png_dir is not None else json_path.with_suffix("")
    data = _load_json(json_path, "ground-truth panoptic JSON")
    if not isinstance(data, dict) or "categories" not in data or "annotations" not in data:
        raise SamcpError(
            f"{json_path}: not a COCO panoptic JSON (needs 'categories' and 'annotations')"
        )
    categories: list[Category] = []
    seen_cats: set[int] = set()
    for i, c in enumerate(data["categories"]):
        cid = int(c["id"])
        if cid in seen_cats:
            raise SamcpError(
                f"{json_path}: category id {cid} appears twice; fix the categories list"
            )
        seen_cats.add(cid)
        categories.append(Category(cid, str(c.get("name", cid)), int(c.get("isthing", 0)) == 1, i))
    seen_imgs: set[str] = set()
    for ann in data["annotations"]:
        key = str(ann["image_id"])
        if key in seen_imgs:
            raise SamcpError(f"{json_path}: image id {key} has two annotations; keep one")
        seen_imgs.add(key)
    sizes = {
        str(img["id"]): (int(img["height"]), int(img["width"]))
        for img in data.get("images", [])
        if "height" in img and "width" in img
    }
    return GroundTruth(json_path, png_dir, categories, list(data["annotations"]), sizes)


def load_predictions(pred_dir: Path) -> Predictions:
    """Loads a prediction folder written in the layout of the module docstring.

    Raises:
        SamcpError: If panoptic.json or the panoptic/ folder is missing or malformed.
    """
    root = Path(pred_dir)
    if not root.is_dir():
        raise SamcpError(
            f"{root}: prediction folder not found; pass the folder samcp predict wrote"
        )
    json_path = root / "panoptic.json"
    data = _load_json(json_path, "predicted panoptic.json")
    if isinstance(data, dict):
        anns = data.get("annotations")
    else:
        anns = None
    if not isinstance(anns, list):
        raise SamcpError(f"{json_path}: needs an 'annotations' list (COCO panoptic format)")
    annotations: dict[str, dict[str, Any]] = {}
    for ann in anns:
        if "image_id" not in ann or "file_name" not in ann or "segments_info" not in ann:
            raise SamcpError(
                f"{json_path}: every annotation needs image_id, file_name and segments_info"
            )
        annotations[str(ann["image_id"])] = ann
    png_dir = root / "panoptic"
    if not png_dir.is_dir():
        raise SamcpError(f"{png_dir}: predicted panoptic PNG folder not found")
    semantic_dir = root / "semantic" if (root / "semantic").is_dir() else None
    instances = None
    if (root / "instances.json").is_file():
        instances = _load_json(root / "instances.json", "instances.json")
        if not isinstance(instances, list):
            raise SamcpError(f"{root / 'instances.json'}: must be a COCO results list")
    return Predictions(root, annotations, png_dir, semantic_dir, instances)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes JSON to ``path`` through a temporary file so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_panoptic_folder(
    json_path: Path,
    png_dir: Path,
    images: Sequence[tuple[str | int, np.ndarray, Sequence[dict[str, Any]]]],
    categories: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Writes a COCO panoptic JSON and its PNGs from id maps (ground truth or prediction).

    Args:
        json_path: JSON file to write.
        png_dir: Folder for the PNGs, named ``<image_id>.png``.
        images: ``(image_id, (H, W) id map, segments_info)`` per image; segments_info is written
            as given (so it may deliberately disagree with the PNG).
        categories: COCO categories to include (ground truth needs them).
    """
    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    anns, imgs = [], []
    for image_id, ids, segments in images:
        file_name = f"{image_id}.png"
        write_panoptic_png(png_dir / file_name, ids)
        anns.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "segments_info": [dict(s) for s in segments],
            }
        )
        imgs.append(
            {"id": image_id, "file_name": file_name, "height": ids.shape[0], "width": ids.shape[1]}
        )
    data: dict[str, Any] = {"images": imgs, "annotations": anns}
    if categories is not None:
        data["categories"] = [dict(c) for c in categories]
    write_json_atomic(Path(json_path), data)


def png_stem(file_name: str) -> str:
    """The stem used to name a per-image file (``000000000139.png`` -> ``000000000139``)."""
    return Path(file_name).stem


def segments_by_id(segments: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """``segments_info`` keyed by int id; a repeated id keeps the last entry, like panopticapi."""
    return {int(s["id"]): s for s in segments}
