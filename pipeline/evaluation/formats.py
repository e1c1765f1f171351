"""Reading and writing the file formats that evaluation consumes.

Ground truth is a COCO panoptic folder (one JSON plus one PNG per image). Predictions are a folder
``PRED_DIR`` laid out as ``samcp predict`` writes it::

    PRED_DIR/panoptic.json        COCO panoptic: {"annotations": [{image_id, file_name, segments_info}]}
    PRED_DIR/panoptic/<file_name> the PNGs named by panoptic.json
    PRED_DIR/semantic/<stem>.png  optional; contiguous class index, 255 = unlabelled: the position
                                  in panoptic.json's ``categories`` when it has them (as samcp
                                  predict writes), else in the ground truth's categories
    PRED_DIR/instances.json       optional; COCO results list with RLE segmentations

Image ids may be ints or strings anywhere; they are always compared as strings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
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
# The same in 16-bit semantic PNGs/TIFFs (benchmarks with more than 255 classes: ADE20K-847,
# Pascal Context 459).
IGNORE_LABEL_16 = 65535


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
        semantic_category_ids: The category id of each semantic PNG value: panoptic.json's
            ``categories`` in order when it lists them and semantic/ exists; None means the
            values index the ground truth's categories.
    """

    root: Path
    annotations: dict[str, dict[str, Any]]
    png_dir: Path
    semantic_dir: Path | None
    instances: list[dict[str, Any]] | None
    semantic_category_ids: list[int] | None = None


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
    """Reads a single-channel semantic label PNG as an (H, W) uint8 or uint16 array.

    8-bit PNGs use 255 for "no class", 16-bit ones (more than 255 classes) 65535
    (:func:`ignore_value`).

    Raises:
        SamcpError: If the file is missing or not a single-channel 8-bit or 16-bit image.
    """
    try:
        with Image.open(path) as img:
            if img.mode in ("L", "P"):
                return np.asarray(img, dtype=np.uint8)
            if img.mode.startswith("I;16") or img.mode == "I":
                arr = np.asarray(img)
                if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
                    raise SamcpError(f"{path}: semantic PNG has values outside 0..65535")
                return arr.astype(np.uint16)
            raise SamcpError(
                f"{path}: semantic PNG has mode {img.mode}; write it as 8-bit single-channel "
                "class indices with 255 for unlabelled (16-bit with 65535 beyond 255 classes)"
            )
    except FileNotFoundError:
        raise SamcpError(
            f"{path}: semantic prediction PNG not found; write one per image or remove the "
            "semantic/ folder to derive semantics from the panoptic output"
        ) from None
    except OSError as exc:
        raise SamcpError(f"{path}: cannot read semantic PNG ({exc}); rewrite the file") from None


def ignore_value(labels: np.ndarray) -> int:
    """The "no class" value of a semantic label map: 255 when 8-bit, 65535 when 16-bit."""
    return IGNORE_LABEL if labels.dtype == np.uint8 else IGNORE_LABEL_16


@dataclass
class SemanticGroundTruth:
    """The ground truth of a semantic-only benchmark: one label file per image.

    Attributes:
        name: The benchmark's name, for messages and the report.
        categories: Its classes (``index`` = position = class id for the registered benchmarks).
        items: ``(image_id, stem, label file)`` per image; predictions are ``semantic/<stem>.png``.
        ignore_label: The label files' "no class" value (255, or 65535 for 16-bit labels).
    """

    name: str
    categories: list[Category]
    items: list[tuple[str, str, Path]]
    ignore_label: int = IGNORE_LABEL


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
    """Loads a COCO panoptic ground truth, checking every entry (see :func:`check_panoptic`).

    Args:
        json_path: The panoptic JSON (needs ``categories`` and ``annotations``).
        png_dir: Folder of the PNGs; defaults to the JSON's path without ``.json``.

    Returns:
        The parsed ground truth.

    Raises:
        SamcpError: If the JSON is missing or malformed: duplicate image, category or segment
            ids, a segment of an unknown category, a field of the wrong type.
    """
    json_path = Path(json_path)
    png_dir = Path(png_dir) if png_dir is not None else json_path.with_suffix("")
    data = _load_json(json_path, "ground-truth panoptic JSON")
    if not isinstance(data, dict) or "categories" not in data or "annotations" not in data:
        raise SamcpError(
            f"{json_path}: not a COCO panoptic JSON (needs 'categories' and 'annotations'); "
            "pass the panoptic JSON of a COCO panoptic dataset"
        )
    categories = _check_categories(data["categories"], json_path)
    fix = "fix the ground-truth JSON"
    annotations = check_panoptic(
        data["annotations"], json_path, {c.id for c in categories}, fix=fix, role="ground-truth"
    )
    sizes = _image_sizes(data.get("images", []), json_path, fix)
    return GroundTruth(json_path, png_dir, categories, list(annotations.values()), sizes)


def load_predictions(pred_dir: Path, category_ids: Collection[int] | None = None) -> Predictions:
    """Loads a prediction folder written in the layout of the module docstring.

    panoptic.json is checked by :func:`check_panoptic` and instances.json by
    :func:`check_instance_results`, so everything downstream may trust their fields.

    Args:
        pred_dir: The prediction folder.
        category_ids: The ground truth's category ids; when given, a segment or result of any
            other category is refused here.

    Raises:
        SamcpError: If panoptic.json or the panoptic/ folder is missing or malformed, or
            instances.json is malformed.
    """
    root = Path(pred_dir)
    if not root.is_dir():
        raise SamcpError(
            f"{root}: prediction folder not found; pass the folder samcp predict wrote"
        )
    json_path = root / "panoptic.json"
    data = _load_json(json_path, "predicted panoptic.json")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise SamcpError(
            f"{json_path}: needs an 'annotations' list (COCO panoptic format); rewrite the file "
            "or re-run samcp predict"
        )
    fix = "fix panoptic.json or re-run samcp predict"
    annotations = check_panoptic(anns, json_path, category_ids, fix=fix, role="predicted")
    png_dir = root / "panoptic"
    if not png_dir.is_dir():
        raise SamcpError(
            f"{png_dir}: predicted panoptic PNG folder not found; a prediction folder holds "
            "panoptic.json and panoptic/"
        )
    semantic_dir = root / "semantic" if (root / "semantic").is_dir() else None
    semantic_ids = None
    if semantic_dir is not None and isinstance(data, dict) and "categories" in data:
        semantic_ids = _prediction_category_ids(data["categories"], json_path)
    instances = None
    if (root / "instances.json").is_file():
        instances = check_instance_results(
            _load_json(root / "instances.json", "instances.json"),
            root / "instances.json",
            category_ids,
        )
    return Predictions(root, annotations, png_dir, semantic_dir, instances, semantic_ids)


def _prediction_category_ids(cats: Any, json_path: Path) -> list[int]:
    """The ids of a prediction's ``categories`` list, in order (what its semantic PNGs index)."""
    fix = "fix it or remove 'categories' (semantic PNGs then index the ground truth's categories)"
    if not isinstance(cats, list) or not all(
        isinstance(c, dict) and _is_int(c.get("id")) for c in cats
    ):
        raise SamcpError(
            f"{json_path}: 'categories' must be a list of {{id, name, ...}} with integer ids; {fix}"
        )
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise SamcpError(f"{json_path}: 'categories' lists a category id twice; {fix}")
    return ids


# ---------------------------------------------------------------------------------------------
# Validation of the JSON files, in one place: the loaders above call these, and everything
# downstream (PQ, semantic, AP, the oracle) trusts the fields they checked. panopticapi and
# pycocotools would raise or silently misbehave on the same inputs.


def _is_int(v: Any) -> bool:
    # JSON true/false load as bool, a subclass of int; an id or count is never a bool.
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _is_image_id(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, str) and v != "")


def _check_categories(cats: Any, json_path: Path) -> list[Category]:
    if not isinstance(cats, list):
        raise SamcpError(
            f"{json_path}: 'categories' is {_kind(cats)}, not a list; fix the ground-truth JSON"
        )
    out: list[Category] = []
    seen: set[int] = set()
    for i, c in enumerate(cats):
        where = f"{json_path}: category {i}"
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise SamcpError(
                f"{where} needs an integer 'id' (got {_short(c)}); fix the categories list"
            )
        cid = int(c["id"])
        if cid in seen:
            raise SamcpError(
                f"{json_path}: category id {cid} appears twice; fix the categories list"
            )
        isthing = c.get("isthing", 0)
        if isthing not in (0, 1):
            raise SamcpError(
                f"{where} (id {cid}) has isthing {isthing!r}; use 1 for things and 0 for stuff"
            )
        seen.add(cid)
        out.append(Category(cid, str(c.get("name", cid)), isthing == 1, i))
    return out


def _image_sizes(images: Any, json_path: Path, fix: str) -> dict[str, tuple[int, int]]:
    if not isinstance(images, list):
        raise SamcpError(f"{json_path}: 'images' is {_kind(images)}, not a list; {fix}")
    sizes = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not _is_image_id(img.get("id")):
            raise SamcpError(
                f"{json_path}: images entry {i} needs an 'id' (integer or string); {fix}"
            )
        h, w = img.get("height"), img.get("width")
        if h is None and w is None:
            continue
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise SamcpError(
                f"{json_path}: image {img['id']} has height {h!r} and width {w!r}; both must be "
                f"positive integers; {fix}"
            )
        sizes[str(img["id"])] = (int(h), int(w))
    return sizes


def check_panoptic(
    annotations: Any,
    json_path: Path,
    category_ids: Collection[int] | None = None,
    *,
    fix: str = "fix the JSON",
    role: str = "predicted",
) -> dict[str, dict[str, Any]]:
    """Checks the ``annotations`` of a COCO panoptic JSON; returns them by ``str(image_id)``.

    Refuses what panopticapi would crash on or count wrongly: an annotation that is not an
    object, an image id given twice, a missing or unsafe ``file_name`` (it must be a plain
    ``.png`` name inside the PNG folder), ``segments_info`` that is not a list, a segment without
    an integer ``id`` in [1, 256^3) or an integer ``category_id``, the same segment id twice in
    one image, a category not in ``category_ids``, ``iscrowd`` other than 0/1, an ``area`` that
    is not a non-negative whole number, and a ``bbox`` that is not four finite numbers.

    Args:
        annotations: The JSON's ``annotations`` value, as parsed.
        json_path: The file, for messages.
        category_ids: Known category ids; None skips that check.
        fix: What the user should do, appended to every message.
        role: "ground-truth" or "predicted", for messages.

    Returns:
        ``str(image_id) -> annotation``, in the file's order.

    Raises:
        SamcpError: On the first bad entry, naming the image and the segment.
    """
    if not isinstance(annotations, list):
        raise SamcpError(f"{json_path}: 'annotations' is {_kind(annotations)}, not a list; {fix}")
    out: dict[str, dict[str, Any]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_image_id(ann.get("image_id")):
            raise SamcpError(
                f"{json_path}: annotation {i} needs an 'image_id' (integer or string), "
                f"'file_name' and 'segments_info' (got {_short(ann)}); {fix}"
            )
        key = str(ann["image_id"])
        where = f"{json_path}: image {key}"
        if key in out:
            raise SamcpError(f"{json_path}: image id {key} has two annotations; keep one")
        name = ann.get("file_name")
        if not isinstance(name, str) or not _plain_png_name(name):
            raise SamcpError(
                f"{where} has file_name {name!r}; it must be the name of a .png file in the "
                f"PNG folder (no folders, e.g. '{key}.png'); {fix}"
            )
        segments = ann.get("segments_info")
        if not isinstance(segments, list):
            raise SamcpError(
                f"{where}: segments_info is {_kind(segments)}, not a list of segments "
                f"{{id, category_id}} (use [] for an image without segments); {fix}"
            )
        seen: dict[int, Any] = {}
        for j, seg in enumerate(segments):
            _check_segment(seg, j, seen, where, category_ids, fix, role)
        out[key] = ann
    return out


def _check_segment(
    seg: Any,
    j: int,
    seen: dict[int, Any],
    where: str,
    category_ids: Collection[int] | None,
    fix: str,
    role: str,
) -> None:
    if not isinstance(seg, dict):
        raise SamcpError(f"{where}: segments_info entry {j} is {_kind(seg)}, not an object; {fix}")
    sid = seg.get("id")
    if not _is_int(sid):
        what = "has no 'id'" if sid is None else f"has id {sid!r} ({type(sid).__name__})"
        raise SamcpError(
            f"{where}: segments_info entry {j} {what}; segment ids are integers "
            f"(R + 256*G + 256^2*B of the PNG); {fix}"
        )
    sid = int(sid)
    if not 0 < sid < OFFSET:
        raise SamcpError(
            f"{where}: segment id {sid} is outside [1, 256^3); 0 is void and larger ids do not "
            f"fit in an RGB PNG; {fix}"
        )
    cid = seg.get("category_id")
    if not _is_int(cid):
        what = "has no category_id" if cid is None else f"has category_id {cid!r}"
        raise SamcpError(
            f"{where}: segment {sid} {what}; every segment needs an integer category_id; {fix}"
        )
    if sid in seen:
        prev = seen[sid]
        cats = f" (categories {prev} and {cid})" if prev != cid else ""
        raise SamcpError(
            f"{where}: segment id {sid} is listed twice in segments_info{cats}; give each "
            f"segment its own id, as in the PNG; {fix}"
        )
    seen[sid] = cid
    if category_ids is not None and int(cid) not in category_ids:
        todo = "use the ground truth's category ids" if role == "predicted" else fix
        raise SamcpError(
            f"{where}: {role} segment {sid} has unknown category_id {cid} (not in the ground "
            f"truth's categories); {todo}"
        )
    crowd = seg.get("iscrowd", 0)
    if crowd not in (0, 1):
        raise SamcpError(f"{where}: segment {sid} has iscrowd {crowd!r}; use 0 or 1; {fix}")
    area = seg.get("area")
    if area is not None and not (
        _is_number(area) and math.isfinite(area) and float(area).is_integer() and area >= 0
    ):
        raise SamcpError(
            f"{where}: segment {sid} has area {area!r}; an area is a pixel count (a whole "
            f"number >= 0), or leave it out to count the PNG's pixels; {fix}"
        )
    bbox = seg.get("bbox")
    if bbox is not None and not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(_is_number(v) and math.isfinite(v) for v in bbox)
    ):
        raise SamcpError(
            f"{where}: segment {sid} has bbox {_short(bbox)}; a bbox is [x, y, width, height] "
            f"of finite numbers, or leave it out; {fix}"
        )


def check_instance_results(
    results: Any, source: str | Path, category_ids: Collection[int] | None = None
) -> list[dict[str, Any]]:
    """Checks COCO instance-segmentation results (an instances.json) entry by entry.

    Each result needs an ``image_id`` (integer or string), an integer ``category_id``, a finite
    numeric ``score`` (NaN and inf are refused, as they break the ranking that AP is computed
    from) and an RLE ``segmentation`` ``{size: [h, w], counts}`` with ``counts`` a compressed
    string (or bytes).

    Args:
        results: The parsed JSON.
        source: The file, for messages.
        category_ids: Known category ids; None skips that check.

    Returns:
        ``results``, unchanged.

    Raises:
        SamcpError: On the first bad result, naming its index and image.
    """
    if not isinstance(results, (list, tuple)):
        raise SamcpError(
            f"{source}: is {_kind(results)}, not a COCO results list "
            "[{image_id, category_id, segmentation, score}, ...]; rewrite the file"
        )
    need = (
        "every result needs image_id, category_id, a finite score and an RLE segmentation "
        "{size: [h, w], counts: str}"
    )
    for i, d in enumerate(results):
        if not isinstance(d, Mapping) or not _is_image_id(d.get("image_id")):
            raise SamcpError(f"{source}: result {i} ({_short(d)}): {need}")
        where = f"{source}: result {i} (image {d['image_id']})"
        cid = d.get("category_id")
        if not _is_int(cid):
            raise SamcpError(f"{where} has category_id {cid!r}; {need}")
        score = d.get("score")
        if not _is_number(score):
            raise SamcpError(f"{where} has score {score!r}; {need}")
        if not math.isfinite(score):
            raise SamcpError(
                f"{where} has score {score}; scores must be finite numbers (NaN or inf cannot be "
                "ranked): fix whatever produced it and rewrite instances.json"
            )
        seg = d.get("segmentation")
        size = seg.get("size") if isinstance(seg, Mapping) else None
        if not (
            isinstance(size, (list, tuple))
            and len(size) == 2
            and all(_is_int(v) and v >= 0 for v in size)
            and isinstance(seg.get("counts"), (str, bytes))
        ):
            raise SamcpError(f"{where} has segmentation {_short(seg)}; {need}")
        if category_ids is not None and int(cid) not in category_ids:
            raise SamcpError(
                f"{where} has unknown category_id {cid}; use the ground truth's category ids"
            )
    return results


def _plain_png_name(name: str) -> bool:
    # A file directly in the PNG folder: the oracle writes to this name, so no '..' or '/'.
    return (
        Path(name).name == name
        and "\\" not in name
        and name not in (".", "..")
        and name.lower().endswith(".png")
        and len(name) > 4
    )


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), f"a {type(v).__name__}"
    )


def _short(v: Any, n: int = 60) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, bytes) else repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


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
    """``segments_info`` keyed by int id.

    The loaders refuse a repeated id (:func:`check_panoptic`); for segments that did not come
    through them, a repeated id keeps the last entry, like panopticapi.
    """
    return {int(s["id"]): s for s in segments}
